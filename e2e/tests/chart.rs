//! The Helm chart: lint, template, a real install into the test control plane, and the operator's
//! ServiceAccount holding exactly the permissions it needs.

use umw_e2e::{Operator, TestNamespace, control_plane, repo_root};

fn helm(args: &[&str]) -> std::process::Output {
    control_plane().tool("helm", args, None)
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn helm_lint_refuses_bad_values_naming_them_and_accepts_good_ones() {
    let chart = repo_root().join("charts/umw");
    let chart = chart.to_string_lossy();
    let lint = |sets: &[&str]| {
        let mut args = vec!["lint", "--strict", chart.as_ref()];
        for set in sets {
            args.extend(["--set", set]);
        }
        helm(&args)
    };
    // (values, what the error names)
    let bad: &[(&[&str], &str)] = &[
        (&["resources.limts.memory=1Gi"], "limts"),
        (&["resources.requests.cpu=true"], "/resources/requests/cpu"),
        (&["securityContext.runAsNonroot=true"], "runAsNonroot"),
        (&["securityContext.runAsUser=root"], "/securityContext/runAsUser"),
        (&["securityContext.capabilities.drop=ALL"], "/securityContext/capabilities/drop"),
        (&["podSecurityContext.fsGroup=x"], "/podSecurityContext/fsGroup"),
        (&["podSecurityContext.seccompProfile.kind=RuntimeDefault"], "kind"),
        (&["tolerations[0].keys=a"], "keys"),
        (&["tolerations[0].tolerationSeconds=soon"], "tolerationSeconds"),
        (&["affinity.nodeAffinty.x=y"], "nodeAffinty"),
        (&["imagePullSecrets[0].nam=regcred"], "nam"),
        (&["nodeSelector.zone=1"], "/nodeSelector/zone"),
        (&["replicaCount=3", "leaderElection.enabled=false"], "/leaderElection/enabled"),
        (&["replicaCount=-1"], "replicaCount"),
        (&["logFormat=yaml"], "logFormat"),
        (&["resync=0s"], "resync"),
        (&["image.pullPolicy=Sometimes"], "pullPolicy"),
        (&["metrics.service.port=70000"], "port"),
        (&["unknownTopLevel=1"], "unknownTopLevel"),
    ];
    for (sets, named) in bad {
        let out = lint(sets);
        assert!(!out.status.success(), "helm lint accepted {sets:?}");
        assert!(text(&out).contains(named), "the error for {sets:?} names {named}: {}", text(&out));
    }
    let good: &[&[&str]] = &[
        &["resources.limits.cpu=1", "resources.limits.memory=512Mi"],
        &["resources.requests.cpu=0.5"],
        &["tolerations[0].key=dedicated", "tolerations[0].operator=Exists", "tolerations[0].effect=NoSchedule"],
        &["securityContext.runAsUser=1000"],
        &["imagePullSecrets[0].name=regcred"],
        &["replicaCount=1", "leaderElection.enabled=false"],
    ];
    for sets in good {
        let out = lint(sets);
        assert!(out.status.success(), "helm lint refused {sets:?}: {}", text(&out));
    }
}

#[test]
fn the_chart_lints_templates_installs_and_grants_least_privilege() {
    let chart = repo_root().join("charts/umw");
    let chart = chart.to_string_lossy();
    let out = helm(&["lint", "--strict", &chart]);
    assert!(out.status.success(), "helm lint: {}", text(&out));

    let out =
        helm(&["template", "umw", &chart, "--namespace", "umw-system", "--set", "metrics.serviceMonitor.enabled=true"]);
    assert!(out.status.success(), "helm template: {}", text(&out));
    let rendered = String::from_utf8_lossy(&out.stdout);
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "Deployment",
        "ServiceMonitor",
    ] {
        assert!(rendered.contains(&format!("kind: {kind}\n")), "helm template renders no {kind}");
    }
    assert!(rendered.contains("readOnlyRootFilesystem: true") && rendered.contains("runAsNonRoot: true"));
    let out = helm(&["template", "umw", &chart, "--namespace", "umw-system", "--set", "watchNamespace=apps"]);
    let namespaced = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !namespaced.contains("kind: ClusterRole"),
        "a namespaced install grants no cluster-wide role"
    );
    assert!(namespaced.contains("kind: Role\n") && namespaced.contains("--namespace=apps"));
    let out = helm(&["template", "umw", &chart, "--set", "leaderElection.enabled=false"]);
    assert!(!out.status.success() && text(&out).contains("/leaderElection/enabled"), "{}", text(&out));
    let out = helm(&["template", "umw", &chart, "--set", "replicaCount=-1"]);
    assert!(
        !out.status.success() && text(&out).contains("replicaCount"),
        "values.schema.json refuses bad values: {}",
        text(&out)
    );
    for resync in ["0s", "forever", "10"] {
        let out = helm(&["template", "umw", &chart, "--set", &format!("resync={resync}")]);
        assert!(!out.status.success() && text(&out).contains("resync"), "resync={resync} is refused: {}", text(&out));
    }
    let out = helm(&["template", "umw", &chart, "--set", "resync=1m30s"]);
    assert!(out.status.success() && text(&out).contains("--resync=1m30s"), "{}", text(&out));

    let ns = TestNamespace::new("helm");
    let release = ns.name.clone();
    let out = helm(&["install", &release, &chart, "--namespace", &ns.name, "--set", "replicaCount=2"]);
    assert!(out.status.success(), "helm install: {}", text(&out));
    let out = ns.kubectl(&[
        "get",
        "deployment",
        "-l",
        "app.kubernetes.io/name=umw-operator",
        "-o",
        "jsonpath={.items[0].spec.replicas}",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2", "the operator Deployment exists with 2 replicas");

    let out = ns.kubectl(&[
        "get",
        "serviceaccount",
        "-l",
        "app.kubernetes.io/name=umw-operator",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    let service_account = format!("system:serviceaccount:{}:{}", ns.name, String::from_utf8_lossy(&out.stdout));
    let can = |verb: &str, resource: &str, namespace: &str| {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        let subresource = format!("--subresource={subresource}");
        let mut args = vec!["auth", "can-i", verb, resource, "--as", &service_account, "-n", namespace];
        if subresource != "--subresource=" {
            args.push(&subresource);
        }
        let out = control_plane().kubectl(&args);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    let allowed = [
        ("watch", "middlewares.umw.dev", "default"),
        ("list", "cachepolicies.umw.dev", "default"),
        ("patch", "middlewares.umw.dev/status", "default"),
        ("patch", "authpolicies.umw.dev/status", "default"),
        ("create", "deployments.apps", "default"),
        ("patch", "deployments.apps", "default"),
        ("delete", "horizontalpodautoscalers.autoscaling", "default"),
        ("patch", "poddisruptionbudgets.policy", "default"),
        ("patch", "configmaps", "default"),
        ("get", "secrets", "default"),
        ("watch", "secrets", "default"),
        ("list", "secrets", "default"),
        ("watch", "pods", "default"),
        ("list", "pods", "default"),
        ("update", "middlewares.umw.dev/finalizers", "default"),
        ("create", "events.events.k8s.io", "default"),
        ("update", "leases.coordination.k8s.io", ns.name.as_str()),
    ];
    let denied = [
        ("create", "secrets", "default"),
        ("patch", "secrets", "default"),
        ("delete", "secrets", "default"),
        ("patch", "middlewares.umw.dev", "default"),
        ("delete", "middlewares.umw.dev", "default"),
        ("create", "pods", "default"),
        ("delete", "pods", "default"),
        ("get", "pods/proxy", "default"),
        ("patch", "nodes", ""),
        ("update", "leases.coordination.k8s.io", "default"),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io", ""),
        ("*", "*", "default"),
    ];
    let mut wrong = Vec::new();
    for (verb, resource, namespace) in allowed {
        if !can(verb, resource, namespace) {
            wrong.push(format!("denied but needed: {verb} {resource} in {namespace:?}"));
        }
    }
    for (verb, resource, namespace) in denied {
        if can(verb, resource, namespace) {
            wrong.push(format!("allowed but not needed: {verb} {resource} in {namespace:?}"));
        }
    }
    assert!(wrong.is_empty(), "RBAC of {service_account}:\n{}", wrong.join("\n"));

    // Those permissions are enough: the operator, running as that ServiceAccount, does its whole job.
    let sa_name = service_account.rsplit(':').next().unwrap_or_default().to_string();
    let kubeconfig = control_plane().token_kubeconfig(&ns.name, &sa_name);
    let apps = TestNamespace::new("helm-apps");
    let lease_namespace = format!("--lease-namespace={}", ns.name);
    let operator = Operator::start_as(kubeconfig, &apps.name, &[&lease_namespace]);
    apps.must_apply("apiVersion: v1\nkind: Secret\nmetadata: {name: kafka}\nstringData: {bootstrap: kafka:9092}\n");
    let mw = |extra: &str| {
        format!(
            "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: shop}}\nspec:\n  disruptionBudget: {{maxUnavailable: 1}}\n  connections:\n    kafka:\n      bootstrapServers: {{secretKeyRef: {{name: kafka, key: bootstrap}}}}\n{extra}"
        )
    };
    // With an autoscaler first, then without: creating and deleting children as that ServiceAccount.
    apps.must_apply(&mw("  autoscaling: {minReplicas: 1, maxReplicas: 2}\n"));
    let out = apps.kubectl(&["wait", "--for=create", "hpa/umw-shop", "--timeout=60s"]);
    assert!(out.status.success(), "HPA as the chart's ServiceAccount: {}\n{}", text(&out), operator.log());
    apps.must_apply(&mw("  replicas: 0\n"));
    let out = apps.kubectl(&["wait", "--for=delete", "hpa/umw-shop", "--timeout=60s"]);
    assert!(out.status.success(), "HPA deleted as the chart's ServiceAccount: {}\n{}", text(&out), operator.log());
    apps.must_apply("apiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata: {name: cache}\nspec:\n  targetRefs: [{name: shop}]\n  rules: [{ttl: 1m}]\n");
    for (object, condition) in [("middleware/shop", "Ready"), ("cachepolicy/cache", "Accepted")] {
        let out = apps.kubectl(&["wait", &format!("--for=condition={condition}"), object, "--timeout=60s"]);
        assert!(
            out.status.success(),
            "{object} {condition} as the chart's ServiceAccount: {}\n{}",
            text(&out),
            operator.log()
        );
    }
    let out = apps.kubectl(&["get", "pdb,deployment,configmap,events.events.k8s.io", "-o", "name"]);
    let names = String::from_utf8_lossy(&out.stdout);
    assert!(
        names.contains("poddisruptionbudget.policy/umw-shop") && names.contains("deployment.apps/umw-shop"),
        "{names}"
    );
    assert!(names.contains("event.events.k8s.io/"), "Events were published: {names}");
    let log = operator.log();
    assert!(!log.contains("forbidden") && !log.contains("Forbidden"), "the operator hit RBAC denials:\n{log}");
    let _ = helm(&["uninstall", &release, "--namespace", &ns.name]);
}
