// umw-kstatus prints what kstatus (sigs.k8s.io/cli-utils/pkg/kstatus/status, the library Flux, kpt and
// cli-utils' `status` use) computes for each object of a `kubectl get -o json` document read from stdin:
// one line per object, `<kind>/<name> <status> <message>`. The e2e suite checks with it that every kind's
// conditions read as intended (Current, InProgress, Failed).
package main

import (
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	// Unlike encoding/json, it reads whole numbers as int64, as the accessors of unstructured expect.
	"k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "reading stdin:", err)
		os.Exit(2)
	}
	var doc map[string]interface{}
	if err := json.Unmarshal(data, &doc); err != nil {
		fmt.Fprintln(os.Stderr, "stdin is not a JSON object:", err)
		os.Exit(2)
	}
	objects := []map[string]interface{}{doc}
	if items, ok := doc["items"].([]interface{}); ok {
		objects = objects[:0]
		for _, item := range items {
			if object, ok := item.(map[string]interface{}); ok {
				objects = append(objects, object)
			}
		}
	}
	for _, object := range objects {
		u := &unstructured.Unstructured{Object: object}
		result, err := status.Compute(u)
		if err != nil {
			fmt.Printf("%s/%s Error %s\n", u.GetKind(), u.GetName(), err)
			continue
		}
		fmt.Printf("%s/%s %s %s\n", u.GetKind(), u.GetName(), result.Status, result.Message)
	}
}
