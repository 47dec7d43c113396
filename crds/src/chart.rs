//! The Helm chart's `values.schema.json`, generated: the chart's own values are described here, and the
//! values that are Kubernetes types (`resources`, `securityContext`, `podSecurityContext`, `tolerations`,
//! `affinity`, `imagePullSecrets`) take the Kubernetes API's own schemas (from its OpenAPI document, as
//! `k8s-openapi` carries them). Kubernetes objects refuse fields they do not define, so a typo such as
//! `resources.limts` fails `helm lint` instead of being dropped by the API server. `make crds` writes the
//! file; a test checks it for drift.

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, PodSecurityContext, ResourceRequirements, SecurityContext, Toleration,
};
use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

/// The schema, as the file holds it (pretty JSON with a final newline).
pub fn values_schema_json() -> String {
    let mut text = serde_json::to_string_pretty(&values_schema()).unwrap_or_default();
    text.push('\n');
    text
}

/// The values schema (JSON Schema draft-07, which Helm reads).
pub fn values_schema() -> Value {
    let mut generator = SchemaSettings::draft07().into_generator();
    let resources = subschema::<ResourceRequirements>(&mut generator);
    let security_context = subschema::<SecurityContext>(&mut generator);
    let pod_security_context = subschema::<PodSecurityContext>(&mut generator);
    let toleration = subschema::<Toleration>(&mut generator);
    let affinity = subschema::<Affinity>(&mut generator);
    let pull_secret = subschema::<LocalObjectReference>(&mut generator);
    let mut definitions: Map<String, Value> = generator.take_definitions(true).into_iter().collect();
    for definition in definitions.values_mut() {
        strict(definition);
    }

    let image = |required_tag: bool| {
        let mut properties = json!({
            "repository": { "type": "string", "minLength": 1 },
            "tag": { "type": "string" },
        });
        if required_tag {
            properties["pullPolicy"] = json!({ "type": "string", "enum": ["Always", "IfNotPresent", "Never"] });
        }
        json!({ "type": "object", "additionalProperties": false, "required": ["repository"], "properties": properties })
    };
    let string_map = json!({ "type": "object", "additionalProperties": { "type": "string" } });
    json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Values of the umw chart",
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "global": { "type": "object" },
            "replicaCount": { "type": "integer", "minimum": 0 },
            "image": image(true),
            "imagePullSecrets": { "type": "array", "items": pull_secret },
            "dataplane": {
                "type": "object",
                "additionalProperties": false,
                "properties": { "image": image(false) }
            },
            "watchNamespace": { "type": "string" },
            "leaderElection": {
                "type": "object",
                "additionalProperties": false,
                "properties": { "enabled": { "type": "boolean" } }
            },
            "logFormat": { "type": "string", "enum": ["json", "text"] },
            "logLevel": { "type": "string", "minLength": 1 },
            "resync": {
                "type": "string",
                "pattern": crate::common::DURATION_PATTERN,
                "not": { "pattern": "^(0+(\\.0+)?(ms|s|m|h))+$" }
            },
            "serviceAccount": {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "create": { "type": "boolean" },
                    "name": { "type": "string" },
                    "annotations": string_map
                }
            },
            "podAnnotations": string_map,
            "podLabels": string_map,
            "podSecurityContext": pod_security_context,
            "securityContext": security_context,
            "resources": resources,
            "metrics": {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "service": {
                        "type": "object",
                        "additionalProperties": false,
                        "properties": { "port": { "type": "integer", "minimum": 1, "maximum": 65535 } }
                    },
                    "serviceMonitor": {
                        "type": "object",
                        "additionalProperties": false,
                        "properties": {
                            "enabled": { "type": "boolean" },
                            "interval": { "type": "string", "pattern": "^[0-9]+(ms|s|m|h)$" },
                            "labels": string_map
                        }
                    }
                }
            },
            "nodeSelector": string_map,
            "tolerations": { "type": "array", "items": toleration },
            "affinity": affinity,
            "priorityClassName": { "type": "string" }
        },
        // Two operators without an election would fight over every object.
        "if": {
            "properties": { "replicaCount": { "minimum": 2 } },
            "required": ["replicaCount"]
        },
        "then": {
            "properties": {
                "leaderElection": {
                    "properties": { "enabled": { "const": true } },
                    "required": ["enabled"]
                }
            },
            "required": ["leaderElection"]
        },
        "definitions": definitions
    })
}

/// A reference to `T`'s schema, whose definition the generator collects.
fn subschema<T: JsonSchema>(generator: &mut schemars::SchemaGenerator) -> Value {
    generator.subschema_for::<T>().to_value()
}

/// Kubernetes objects accept only the fields they define; descriptions are left to the API reference (they
/// would make the file ten times larger); a quantity or int-or-string is a string or a number.
fn strict(schema: &mut Value) {
    let Value::Object(object) = schema else { return };
    object.remove("description");
    if object.remove("x-kubernetes-int-or-string").is_some() && !object.contains_key("type") {
        object.insert("type".into(), json!(["string", "number"]));
    }
    if object.contains_key("properties") && !object.contains_key("additionalProperties") {
        object.insert("additionalProperties".into(), Value::Bool(false));
    }
    for (key, value) in object.iter_mut() {
        match key.as_str() {
            "properties" | "definitions" => {
                if let Value::Object(children) = value {
                    children.values_mut().for_each(strict);
                }
            }
            // A property named "description" or "type" is a schema, not a keyword.
            _ => match value {
                Value::Object(_) => strict(value),
                Value::Array(items) => items.iter_mut().for_each(strict),
                _ => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(values: Value) -> Result<(), String> {
        let schema = values_schema();
        let validator = jsonschema::validator_for(&schema).map_err(|e| e.to_string())?;
        let errors: Vec<String> = validator.iter_errors(&values).map(|e| e.to_string()).collect();
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }

    #[test]
    fn kubernetes_values_refuse_typos_and_accept_what_the_api_accepts() {
        assert!(valid(json!({"resources": {"limits": {"memory": "256Mi", "cpu": 1}}})).is_ok());
        assert!(valid(json!({"resources": {"limts": {"memory": "256Mi"}}})).is_err());
        assert!(valid(json!({"securityContext": {"runAsNonRoot": true, "capabilities": {"drop": ["ALL"]}}})).is_ok());
        assert!(valid(json!({"securityContext": {"runAsNonroot": true}})).is_err());
        assert!(valid(json!({"tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule"}]})).is_ok());
        assert!(valid(json!({"tolerations": [{"keys": "k"}]})).is_err());
        assert!(valid(json!({"podSecurityContext": {"seccompProfile": {"type": "RuntimeDefault"}}})).is_ok());
    }

    #[test]
    fn more_than_one_replica_needs_leader_election() {
        assert!(valid(json!({"replicaCount": 3, "leaderElection": {"enabled": true}})).is_ok());
        assert!(valid(json!({"replicaCount": 3, "leaderElection": {"enabled": false}})).is_err());
        assert!(valid(json!({"replicaCount": 1, "leaderElection": {"enabled": false}})).is_ok());
    }
}
