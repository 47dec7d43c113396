//! Pure rendering: a Middleware and its accepted policies in, the desired child objects out.
//!
//! Nothing here talks to the API server, so almost every rule of what the operator creates is tested as a
//! plain unit test on values.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec, MetricTarget,
    ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecretVolumeSource, SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use umw_crds::config::{self, Bundle, CONFIG_FILE, secret_env_var};
use umw_crds::{Middleware, SecretKeyRef};

/// Annotation on every child: hash of what the operator rendered, so that an unchanged child is not
/// written again.
pub const RENDER_HASH_ANNOTATION: &str = "umw.dev/render-hash";
/// Label naming the Middleware a child belongs to.
pub const MIDDLEWARE_LABEL: &str = "umw.dev/middleware";
/// `app.kubernetes.io/managed-by` value of every child; the operator watches only objects with it.
pub const MANAGED_BY: &str = "umw-operator";
/// Where the configuration is mounted in the data-plane container.
pub const CONFIG_DIR: &str = "/etc/umw";
/// Longest Middleware name whose children's names stay valid DNS labels (`umw-<name>-config` ≤ 63).
pub const MAX_NAME_LEN: usize = 52;

/// Operator-wide settings that rendering needs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Data-plane image used when a Middleware does not set one.
    pub dataplane_image: String,
}

/// Everything the operator wants to exist for one Middleware.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub config_map: ConfigMap,
    pub service_account: ServiceAccount,
    pub service: Service,
    pub deployment: Deployment,
    pub disruption_budget: Option<PodDisruptionBudget>,
    pub autoscaler: Option<HorizontalPodAutoscaler>,
    /// Hash of the rendered data-plane configuration.
    pub config_hash: String,
}

/// Why rendering failed. Only a configuration that cannot be serialised, which means a bug.
#[derive(Debug, thiserror::Error)]
#[error("cannot render the data-plane configuration: {0}")]
pub struct RenderError(#[from] config::ConfigError);

/// Name shared by the Deployment, Service, ServiceAccount, PDB and HPA of a Middleware.
pub fn child_name(mw: &Middleware) -> String {
    format!("umw-{}", mw.name_any())
}

/// Name of the ConfigMap holding the data-plane configuration.
pub fn config_map_name(mw: &Middleware) -> String {
    format!("umw-{}-config", mw.name_any())
}

/// Labels that select a Middleware's pods.
pub fn selector_labels(mw: &Middleware) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "umw-dataplane".to_string()),
        ("app.kubernetes.io/instance".to_string(), mw.name_any()),
    ])
}

/// The label selector as a string, for the scale subresource.
pub fn selector_string(mw: &Middleware) -> String {
    selector_labels(mw).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn labels(mw: &Middleware) -> BTreeMap<String, String> {
    let mut labels = selector_labels(mw);
    labels.insert("app.kubernetes.io/component".into(), "dataplane".into());
    labels.insert("app.kubernetes.io/managed-by".into(), MANAGED_BY.into());
    labels.insert(MIDDLEWARE_LABEL.into(), mw.name_any());
    labels
}

fn owner_reference(mw: &Middleware) -> OwnerReference {
    OwnerReference {
        api_version: Middleware::api_version(&()).into_owned(),
        kind: Middleware::kind(&()).into_owned(),
        name: mw.name_any(),
        uid: mw.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn metadata(mw: &Middleware, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: mw.namespace(),
        labels: Some(labels(mw)),
        owner_references: Some(vec![owner_reference(mw)]),
        ..ObjectMeta::default()
    }
}

/// Stamps the render hash: a hash of the object as rendered, before the stamp.
fn stamped<K: Resource + Serialize>(mut object: K) -> K {
    let text = serde_json::to_string(&object).unwrap_or_default();
    object.annotations_mut().insert(RENDER_HASH_ANNOTATION.into(), config::hash(&text));
    object
}

/// Annotation on the pod template: hash of the resourceVersions of the Secrets the pods use, so that a
/// rotated Secret rolls the pods.
pub const SECRETS_HASH_ANNOTATION: &str = "umw.dev/secrets-hash";
/// Where whole Secrets (e.g. API keys) are mounted, one directory per Secret.
pub const SECRETS_DIR: &str = "/etc/umw/secrets";

/// The Middleware as the data plane sees it: without the fields that only shape the Deployment, so that
/// scaling, pod settings or `paused` do not change the configuration and roll the pods.
fn data_plane_view(mw: &Middleware) -> Middleware {
    let mut view = mw.clone();
    view.metadata.generation = None;
    let spec = &mut view.spec;
    spec.replicas = None;
    spec.image = None;
    spec.paused = false;
    spec.pod = Default::default();
    spec.autoscaling = None;
    spec.disruption_budget = None;
    view
}

/// Renders the children of `bundle.middleware`. `secret_versions` maps each Secret the pods use to its
/// resourceVersion.
pub fn render(
    bundle: &Bundle,
    settings: &Settings,
    secret_versions: &BTreeMap<String, String>,
) -> Result<Desired, RenderError> {
    let mw = &bundle.middleware;
    let config_text = Bundle { middleware: data_plane_view(mw), ..bundle.clone() }.to_yaml()?;
    let config_hash = config::hash(&config_text);
    let secrets_hash = config::hash(&format!("{secret_versions:?}"));

    let config_map = ConfigMap {
        metadata: metadata(mw, config_map_name(mw)),
        data: Some(BTreeMap::from([(CONFIG_FILE.to_string(), config_text)])),
        ..ConfigMap::default()
    };
    let service_account = ServiceAccount {
        metadata: metadata(mw, child_name(mw)),
        // The data plane does not call the Kubernetes API.
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    };
    Ok(Desired {
        config_map: stamped(config_map),
        service_account: stamped(service_account),
        service: stamped(service(mw)),
        deployment: stamped(deployment(bundle, settings, &secrets_hash)),
        disruption_budget: disruption_budget(mw).map(stamped),
        autoscaler: autoscaler(mw).map(stamped),
        config_hash,
    })
}

fn service(mw: &Middleware) -> Service {
    let listeners = &mw.spec.listeners;
    let port = |name: &str, port: u16, app_protocol: &str| ServicePort {
        name: Some(name.into()),
        port: i32::from(port),
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        app_protocol: Some(app_protocol.into()),
        ..ServicePort::default()
    };
    let app_protocol = if listeners.http.tls.is_some() { "https" } else { "http" };
    let mut ports = vec![port("http", listeners.http.port, app_protocol)];
    if let Some(grpc) = &listeners.grpc {
        ports.push(port("grpc", grpc.port, "kubernetes.io/h2c"));
    }
    // The admin port (health, /status, /metrics, cache invalidation) is not published: the operator and
    // Prometheus reach it on the pods, and nothing that can reach the Service should.
    Service {
        metadata: metadata(mw, child_name(mw)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(mw)),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// A Secret the pods need: one key (as an env var), the whole Secret (as files), or certificates as files
/// that the data plane watches.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SecretUse {
    Key(SecretKeyRef),
    Whole(String),
    /// Mounted under [`TLS_DIR`] and re-read by the data plane when it changes: these keys must exist, and
    /// a new version is served in place, without rolling the pods.
    Watched {
        name: String,
        keys: Vec<&'static str>,
    },
}

impl SecretUse {
    pub fn secret_name(&self) -> &str {
        match self {
            SecretUse::Key(r) => &r.name,
            SecretUse::Whole(name) | SecretUse::Watched { name, .. } => name,
        }
    }
}

/// Where the Secrets of the listener's TLS are mounted, one directory per Secret (the data plane's
/// default `--tls-dir`).
pub const TLS_DIR: &str = "/etc/umw/tls";

/// Every Secret the pods need, from the Middleware and its accepted policies, with the field that names
/// it (for messages), in a stable order.
pub fn secret_uses(bundle: &Bundle) -> Vec<(String, SecretUse)> {
    use umw_crds::Policy;
    fn of_policy<P: Policy>(policy: &P, out: &mut Vec<(String, SecretUse)>) {
        let who = format!("{} {:?}", P::kind(&()), policy.name_any());
        for (field, reference) in policy.secret_key_refs() {
            out.push((format!("{who} {field}"), SecretUse::Key(reference.clone())));
        }
        for (field, name) in policy.secret_names() {
            out.push((format!("{who} {field}"), SecretUse::Whole(name.to_string())));
        }
    }
    let mut uses: Vec<(String, SecretUse)> = bundle
        .middleware
        .spec
        .connections
        .values()
        .into_iter()
        .filter_map(|(field, v)| v.secret_key_ref.clone().map(|r| (field.to_string(), SecretUse::Key(r))))
        .collect();
    if let Some(r) = bundle.middleware.spec.outbox.admin_token.as_ref().and_then(|t| t.secret_key_ref.clone()) {
        uses.push(("spec.outbox.adminToken".to_string(), SecretUse::Key(r)));
    }
    if let Some(tls) = &bundle.middleware.spec.listeners.http.tls {
        use umw_crds::middleware::tls_keys;
        for (field, name) in tls.secret_names() {
            let keys =
                if field.ends_with("caSecretName") { vec![tls_keys::CA] } else { vec![tls_keys::CERT, tls_keys::KEY] };
            uses.push((field, SecretUse::Watched { name: name.to_string(), keys }));
        }
    }
    bundle.cache_policies.iter().for_each(|p| of_policy(p, &mut uses));
    bundle.event_routes.iter().for_each(|p| of_policy(p, &mut uses));
    bundle.auth_policies.iter().for_each(|p| of_policy(p, &mut uses));
    uses.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
    uses
}

/// How long a terminating pod keeps serving while it is already unready, so that Service endpoints and
/// load balancers stop sending it new requests before it stops accepting.
pub const SHUTDOWN_DELAY: &str = "5s";

fn deployment(bundle: &Bundle, settings: &Settings, secrets_hash: &str) -> Deployment {
    let mw = &bundle.middleware;
    let spec = &mw.spec;
    let uses = secret_uses(bundle);
    let mut keys: Vec<&SecretKeyRef> =
        uses.iter().filter_map(|(_, u)| if let SecretUse::Key(r) = u { Some(r) } else { None }).collect();
    keys.dedup();
    let mut wholes: Vec<&str> =
        uses.iter().filter_map(|(_, u)| if let SecretUse::Whole(n) = u { Some(n.as_str()) } else { None }).collect();
    wholes.dedup();
    let mut watched: Vec<&str> = uses
        .iter()
        .filter_map(|(_, u)| if let SecretUse::Watched { name, .. } = u { Some(name.as_str()) } else { None })
        .collect();
    watched.sort_unstable();
    watched.dedup();
    let listeners = &spec.listeners;
    let container_port = |name: &str, port: u16| ContainerPort {
        name: Some(name.into()),
        container_port: i32::from(port),
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    };
    let mut ports = vec![container_port("http", listeners.http.port)];
    if let Some(grpc) = &listeners.grpc {
        ports.push(container_port("grpc", grpc.port));
    }
    ports.push(container_port("admin", listeners.admin_port));

    let mut env = vec![
        field_env("UMW_POD_NAME", "metadata.name"),
        field_env("UMW_POD_NAMESPACE", "metadata.namespace"),
        worker_threads_env(),
    ];
    env.extend(keys.into_iter().map(|secret| EnvVar {
        name: secret_env_var(secret),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.name.clone(),
                key: secret.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }));

    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("admin".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    };

    let container = Container {
        name: "dataplane".into(),
        image: Some(spec.image.clone().unwrap_or_else(|| settings.dataplane_image.clone())),
        args: Some(vec!["--config".into(), CONFIG_DIR.into(), "--shutdown-delay".into(), SHUTDOWN_DELAY.into()]),
        ports: Some(ports),
        env: Some(env),
        resources: Some(spec.pod.resources.clone().unwrap_or_else(default_resources)),
        // The data plane writes why it cannot start to the termination log; a crash without one is quoted
        // from the end of its log. The operator shows either on the Middleware (`PodsFailing`).
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        readiness_probe: Some(probe("/readyz", 5, 2)),
        volume_mounts: Some(
            std::iter::once(VolumeMount {
                name: "config".into(),
                mount_path: CONFIG_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            })
            .chain(wholes.iter().enumerate().map(|(i, name)| VolumeMount {
                name: format!("secret-{i}"),
                mount_path: format!("{SECRETS_DIR}/{name}"),
                read_only: Some(true),
                ..VolumeMount::default()
            }))
            // Whole directories, not subPath mounts: the kubelet updates those in place when the Secret changes.
            .chain(watched.iter().enumerate().map(|(i, name)| VolumeMount {
                name: format!("tls-{i}"),
                mount_path: format!("{TLS_DIR}/{name}"),
                read_only: Some(true),
                ..VolumeMount::default()
            }))
            .collect(),
        ),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };

    let mut pod_labels = spec.pod.labels.clone();
    pod_labels.retain(|k, _| !k.starts_with("umw.dev/") && !k.starts_with("app.kubernetes.io/"));
    pod_labels.extend(labels(mw));
    let mut pod_annotations = spec.pod.annotations.clone();
    // The configuration is deliberately not hashed into the template: the pods reload it in place when the
    // ConfigMap changes, without a restart.
    pod_annotations.insert(SECRETS_HASH_ANNOTATION.into(), secrets_hash.into());

    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: Some(pod_annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(child_name(mw)),
            automount_service_account_token: Some(false),
            containers: vec![container],
            volumes: Some(
                std::iter::once(Volume {
                    name: "config".into(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: config_map_name(mw),
                        ..ConfigMapVolumeSource::default()
                    }),
                    ..Volume::default()
                })
                .chain(wholes.iter().enumerate().map(|(i, name)| Volume {
                    name: format!("secret-{i}"),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(name.to_string()),
                        optional: Some(false),
                        ..SecretVolumeSource::default()
                    }),
                    ..Volume::default()
                }))
                .chain(watched.iter().enumerate().map(|(i, name)| Volume {
                    name: format!("tls-{i}"),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(name.to_string()),
                        optional: Some(false),
                        ..SecretVolumeSource::default()
                    }),
                    ..Volume::default()
                }))
                .collect(),
            ),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(65532),
                run_as_group: Some(65532),
                seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
                ..PodSecurityContext::default()
            }),
            node_selector: (!spec.pod.node_selector.is_empty()).then(|| spec.pod.node_selector.clone()),
            tolerations: (!spec.pod.tolerations.is_empty()).then(|| spec.pod.tolerations.clone()),
            affinity: spec.pod.affinity.clone(),
            priority_class_name: spec.pod.priority_class_name.clone(),
            // The data plane's shutdown: 5 s unready-but-serving, up to 20 s of draining, then flushing traces.
            termination_grace_period_seconds: Some(40),
            ..PodSpec::default()
        }),
    };

    Deployment {
        metadata: metadata(mw, child_name(mw)),
        spec: DeploymentSpec {
            // With autoscaling the HPA owns the replica count, so the operator leaves the field alone.
            replicas: spec.autoscaling.is_none().then(|| spec.desired_replicas()),
            selector: LabelSelector { match_labels: Some(selector_labels(mw)), ..LabelSelector::default() },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::String("25%".into())),
                }),
            }),
            template,
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(k8s_openapi::api::core::v1::ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// `UMW_WORKER_THREADS` from the container's CPU limit, rounded up to whole cores by the kubelet (`500m`
/// gives 1, `2500m` gives 3); without a limit, the node's allocatable CPUs. A runtime with more threads
/// than the CPU quota allows is throttled in bursts, which shows as tail latency.
fn worker_threads_env() -> EnvVar {
    EnvVar {
        name: "UMW_WORKER_THREADS".into(),
        value_from: Some(EnvVarSource {
            resource_field_ref: Some(k8s_openapi::api::core::v1::ResourceFieldSelector {
                container_name: Some("dataplane".into()),
                resource: "limits.cpu".into(),
                divisor: Some(Quantity("1".into())),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("100m".into())),
            ("memory".to_string(), Quantity("64Mi".into())),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), Quantity("256Mi".into()))])),
        ..ResourceRequirements::default()
    }
}

fn disruption_budget(mw: &Middleware) -> Option<PodDisruptionBudget> {
    let budget = mw.spec.disruption_budget.as_ref()?;
    Some(PodDisruptionBudget {
        metadata: metadata(mw, child_name(mw)),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: budget.min_available.clone(),
            max_unavailable: budget.max_unavailable.clone(),
            selector: Some(LabelSelector { match_labels: Some(selector_labels(mw)), ..LabelSelector::default() }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}

fn autoscaler(mw: &Middleware) -> Option<HorizontalPodAutoscaler> {
    let autoscaling = mw.spec.autoscaling.as_ref()?;
    Some(HorizontalPodAutoscaler {
        metadata: metadata(mw, child_name(mw)),
        spec: HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: child_name(mw),
            },
            min_replicas: Some(autoscaling.min_replicas),
            max_replicas: autoscaling.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".into(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".into(),
                    target: MetricTarget {
                        type_: "Utilization".into(),
                        average_utilization: Some(autoscaling.target_cpu_utilization),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            ..HorizontalPodAutoscalerSpec::default()
        },
        ..HorizontalPodAutoscaler::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use umw_crds::middleware::{Autoscaling, Connections, DisruptionBudget, GrpcListener, RedisConnection};
    use umw_crds::{MiddlewareSpec, ValueSource};

    fn settings() -> Settings {
        Settings { dataplane_image: "umw-dataplane:test".into() }
    }

    fn middleware(spec: MiddlewareSpec) -> Middleware {
        let mut mw = Middleware::new("shop", spec);
        mw.metadata.namespace = Some("team-a".into());
        mw.metadata.uid = Some("uid-1".into());
        mw
    }

    fn render_spec(spec: MiddlewareSpec) -> Desired {
        render(&Bundle { middleware: middleware(spec), ..Bundle::default() }, &settings(), &BTreeMap::new()).unwrap()
    }

    #[test]
    fn renders_the_four_base_children_with_owner_references() {
        let desired = render_spec(MiddlewareSpec::default());
        assert!(desired.disruption_budget.is_none() && desired.autoscaler.is_none());
        let metas = [
            &desired.config_map.metadata,
            &desired.service_account.metadata,
            &desired.service.metadata,
            &desired.deployment.metadata,
        ];
        for meta in metas {
            let owner = &meta.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
                ("Middleware", "uid-1", Some(true))
            );
            assert_eq!(meta.namespace.as_deref(), Some("team-a"));
            assert!(meta.annotations.as_ref().unwrap().contains_key(RENDER_HASH_ANNOTATION));
        }
        assert_eq!(desired.config_map.metadata.name.as_deref(), Some("umw-shop-config"));
        let deployment = &desired.deployment.spec;
        assert_eq!(deployment.replicas, Some(1));
        let pod = deployment.template.spec.as_ref().unwrap();
        assert_eq!(pod.containers[0].image.as_deref(), Some("umw-dataplane:test"));
    }

    #[test]
    fn a_configuration_change_reloads_in_place_rather_than_rolling_the_pods() {
        let mut spec = MiddlewareSpec::default();
        spec.routes.push(umw_crds::middleware::Route {
            name: "r".into(),
            upstream: umw_crds::middleware::Upstream { url: Some("http://x".into()), ..Default::default() },
            ..Default::default()
        });
        let (a, b) = (render_spec(MiddlewareSpec::default()), render_spec(spec));
        assert_ne!(a.config_hash, b.config_hash);
        assert_ne!(a.config_map, b.config_map);
        assert_eq!(a.deployment, b.deployment, "the pod template must not change with the configuration");
    }

    #[test]
    fn rendering_is_deterministic() {
        assert_eq!(render_spec(MiddlewareSpec::default()), render_spec(MiddlewareSpec::default()));
    }

    #[test]
    fn scaling_changes_the_deployment_but_not_the_configuration() {
        let a = render_spec(MiddlewareSpec::default());
        let b = render_spec(MiddlewareSpec { replicas: Some(3), paused: true, ..MiddlewareSpec::default() });
        assert_eq!(a.config_hash, b.config_hash, "scaling must not roll the pods");
        let hash = |d: &Deployment| d.metadata.annotations.as_ref().unwrap()[RENDER_HASH_ANNOTATION].clone();
        assert_ne!(hash(&a.deployment), hash(&b.deployment));
    }

    #[test]
    fn a_route_change_changes_the_configuration() {
        let mut spec = MiddlewareSpec::default();
        spec.listeners.websocket = Some(umw_crds::middleware::WebSocketListener { path: "/ws".into() });
        assert_ne!(render_spec(MiddlewareSpec::default()).config_hash, render_spec(spec).config_hash);
    }

    #[test]
    fn a_rotated_secret_rolls_the_pods() {
        let bundle = Bundle { middleware: middleware(MiddlewareSpec::default()), ..Bundle::default() };
        let before = render(&bundle, &settings(), &BTreeMap::from([("s".to_string(), "1".to_string())])).unwrap();
        let after = render(&bundle, &settings(), &BTreeMap::from([("s".to_string(), "2".to_string())])).unwrap();
        let annotation = |d: &Desired| {
            d.deployment.spec.template.metadata.as_ref().unwrap().annotations.as_ref().unwrap()[SECRETS_HASH_ANNOTATION]
                .clone()
        };
        assert_ne!(annotation(&before), annotation(&after));
        assert_eq!(before.config_hash, after.config_hash);
    }

    #[test]
    fn tls_secrets_are_mounted_whole_for_the_data_plane_to_watch() {
        use umw_crds::middleware::{ClientCertificates, ListenerTls, TlsCertificate};
        let mut spec = MiddlewareSpec::default();
        spec.listeners.http.tls = Some(ListenerTls {
            certificates: vec![TlsCertificate::secret("shop-tls"), TlsCertificate::secret("api-tls")],
            min_version: Default::default(),
            client_certificates: Some(ClientCertificates {
                ca_secret_name: Some("clients-ca".into()),
                ..ClientCertificates::default()
            }),
        });
        let bundle = Bundle { middleware: middleware(spec.clone()), ..Bundle::default() };
        let uses: Vec<SecretUse> = secret_uses(&bundle).into_iter().map(|(_, u)| u).collect();
        assert!(uses.contains(&SecretUse::Watched { name: "clients-ca".into(), keys: vec!["ca.crt"] }), "{uses:?}");
        assert!(uses.contains(&SecretUse::Watched { name: "shop-tls".into(), keys: vec!["tls.crt", "tls.key"] }));
        let desired = render_spec(spec);
        let pod = desired.deployment.spec.template.spec.unwrap();
        let mounts: Vec<(String, String)> = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| m.name.starts_with("tls-"))
            .map(|m| (m.name.clone(), m.mount_path.clone()))
            .collect();
        assert_eq!(
            mounts,
            [
                ("tls-0".to_string(), "/etc/umw/tls/api-tls".to_string()),
                ("tls-1".to_string(), "/etc/umw/tls/clients-ca".to_string()),
                ("tls-2".to_string(), "/etc/umw/tls/shop-tls".to_string())
            ]
        );
        assert!(pod.containers[0].volume_mounts.iter().flatten().all(|m| m.sub_path.is_none()));
        let volume = pod.volumes.unwrap().into_iter().find(|v| v.name == "tls-2").unwrap();
        assert_eq!(volume.secret.unwrap().secret_name.as_deref(), Some("shop-tls"));
        assert_eq!(desired.service.spec.unwrap().ports.unwrap()[0].app_protocol.as_deref(), Some("https"));
    }

    #[test]
    fn worker_threads_follow_the_cpu_limit() {
        let pod = render_spec(MiddlewareSpec::default()).deployment.spec.template.spec.unwrap();
        let env = pod.containers[0].env.clone().unwrap();
        let threads = env.iter().find(|e| e.name == "UMW_WORKER_THREADS").expect("UMW_WORKER_THREADS");
        let field = threads.value_from.as_ref().unwrap().resource_field_ref.as_ref().unwrap();
        assert_eq!((field.resource.as_str(), field.container_name.as_deref()), ("limits.cpu", Some("dataplane")));
        assert_eq!(field.divisor, Some(Quantity("1".into())), "whole cores, rounded up");
        assert_eq!(pod.containers[0].name, "dataplane");
    }

    #[test]
    fn autoscaling_renders_an_hpa_and_leaves_replicas_to_it() {
        let desired = render_spec(MiddlewareSpec {
            autoscaling: Some(Autoscaling { min_replicas: 2, max_replicas: 5, target_cpu_utilization: 70 }),
            disruption_budget: Some(DisruptionBudget {
                min_available: Some(IntOrString::Int(1)),
                max_unavailable: None,
            }),
            ..MiddlewareSpec::default()
        });
        let hpa = desired.autoscaler.unwrap().spec;
        assert_eq!((hpa.min_replicas, hpa.max_replicas), (Some(2), 5));
        assert_eq!(desired.deployment.spec.replicas, None);
        assert!(desired.disruption_budget.is_some());
    }

    #[test]
    fn secrets_become_env_references_never_config_values() {
        let desired = render_spec(MiddlewareSpec {
            connections: Connections {
                redis: Some(RedisConnection {
                    url: ValueSource::secret("redis-creds", "url"),
                    password: Some(ValueSource::inline("not-a-secret")),
                    ..RedisConnection::default()
                }),
                ..Connections::default()
            },
            ..MiddlewareSpec::default()
        });
        let config = &desired.config_map.data.as_ref().unwrap()[CONFIG_FILE];
        assert!(config.contains("secretKeyRef"), "{config}");
        let pod = desired.deployment.spec.template.spec.unwrap();
        let env = pod.containers[0].env.clone().unwrap();
        let secret_env = env.iter().find(|e| e.name.starts_with("UMW_SECRET_REDIS_CREDS_URL_")).unwrap();
        let selector = secret_env.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((selector.name.as_str(), selector.key.as_str()), ("redis-creds", "url"));
    }

    #[test]
    fn webhook_headers_and_the_outbox_token_from_secrets_reach_the_pods_as_env_references() {
        let mut spec = MiddlewareSpec::default();
        spec.outbox.admin_token = Some(ValueSource::secret("outbox-admin", "token"));
        let mut route: umw_crds::EventRoute = serde_yaml::from_str(
            "apiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata: {name: hooks, namespace: shop}\nspec:\n  targetRefs: [{name: shop}]\n  source: {http: {path: /events/in}}\n  destination: {http: {url: 'https://hooks.example.com/', headersFrom: {authorization: {name: hooks-token, key: header}}}}\n",
        )
        .unwrap();
        route.metadata.namespace = Some("shop".into());
        let bundle = Bundle { middleware: middleware(spec), event_routes: vec![route], ..Bundle::default() };
        let uses = secret_uses(&bundle);
        let names: Vec<&str> = uses.iter().map(|(_, u)| u.secret_name()).collect();
        assert_eq!(names, ["hooks-token", "outbox-admin"], "{uses:?}");
        let desired = render(&bundle, &settings(), &BTreeMap::new()).unwrap();
        let config = &desired.config_map.data.as_ref().unwrap()[CONFIG_FILE];
        assert!(config.contains("hooks-token") && !config.contains("Bearer"), "only the reference: {config}");
        let env = desired.deployment.spec.template.spec.unwrap().containers[0].env.clone().unwrap();
        for prefix in ["UMW_SECRET_HOOKS_TOKEN_HEADER_", "UMW_SECRET_OUTBOX_ADMIN_TOKEN_"] {
            assert!(env.iter().any(|e| e.name.starts_with(prefix) && e.value_from.is_some()), "{prefix} in {env:?}");
        }
    }

    #[test]
    fn grpc_listener_adds_ports() {
        let mut spec = MiddlewareSpec::default();
        spec.listeners.grpc = Some(GrpcListener { port: 9090 });
        let desired = render_spec(spec);
        let ports: Vec<_> =
            desired.service.spec.unwrap().ports.unwrap().into_iter().map(|p| (p.name.unwrap(), p.port)).collect();
        assert_eq!(ports, [("http".into(), 8080), ("grpc".into(), 9090)], "never the admin port");
    }
}
