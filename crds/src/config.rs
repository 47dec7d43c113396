//! The data-plane configuration contract, shared by the operator (which renders it into a ConfigMap) and
//! the data plane (which loads it).
//!
//! The configuration is the very form a user writes: a multi-document YAML stream of one `Middleware` and
//! the `CachePolicy`, `EventRoute` and `AuthPolicy` resources attached to it, so that
//! `umw-dataplane --config examples/shop/` and a pod in a cluster read the same schema. The operator writes
//! only accepted policies, with metadata reduced to name, namespace and generation, and never a Secret
//! value: every `secretKeyRef` stays a reference, and the pod gets the value in the environment variable
//! named by [`secret_env_var`].

use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::common::SecretKeyRef;
use crate::{AuthPolicy, CachePolicy, EventRoute, Middleware};

/// File name of the configuration inside the rendered ConfigMap and the pod's config directory.
pub const CONFIG_FILE: &str = "config.yaml";

/// One Middleware with its attached policies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Bundle {
    pub middleware: Middleware,
    pub cache_policies: Vec<CachePolicy>,
    pub event_routes: Vec<EventRoute>,
    pub auth_policies: Vec<AuthPolicy>,
}

/// Why a configuration could not be read. `at` names the file and document (`shop.yaml, document 2`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{at}: {source}")]
    Parse { at: String, source: serde_yaml::Error },
    #[error("{at}: {path}: {message}")]
    Invalid { at: String, path: String, message: String },
    #[error("{at}: apiVersion {api_version:?} is not {expected}")]
    ApiVersion { at: String, api_version: String, expected: &'static str },
    #[error("{at}: kind {kind:?} is not one of Middleware, CachePolicy, EventRoute, AuthPolicy")]
    UnknownKind { at: String, kind: String },
    #[error("{at}: unknown field {field} (a typo, or a field of a newer version)")]
    UnknownField { at: String, field: String },
    #[error("the configuration holds no Middleware")]
    NoMiddleware,
    #[error("the configuration holds {} Middlewares ({}); one data plane serves exactly one", .0.len(), .0.join("; "))]
    SeveralMiddlewares(Vec<String>),
    #[error("cannot write the configuration: {0}")]
    Serialize(#[from] serde_yaml::Error),
}

/// Every problem found in a configuration, in the order of the sources.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigError>);

#[derive(Deserialize)]
struct TypeMeta {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

/// Where each resource of a [`Bundle`] was read from, keyed by `Kind/name`.
pub type Origins = std::collections::BTreeMap<String, String>;

impl Bundle {
    /// Reads a multi-document YAML stream. Empty documents and objects outside the `umw.dev` group are
    /// skipped. Returns the first problem; [`Bundle::load`] returns all of them.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        Self::load(&[("", text)]).map(|(bundle, _)| bundle).map_err(|mut errors| errors.0.remove(0))
    }

    /// Reads several named YAML streams (files) as one configuration. Every problem is reported, each
    /// with its source, document and field path; on success, also says where each resource came from.
    pub fn load(sources: &[(&str, &str)]) -> Result<(Self, Origins), ConfigErrors> {
        match Self::load_all(sources) {
            (Some(loaded), errors) if errors.is_empty() => Ok(loaded),
            (_, errors) => Err(ConfigErrors(errors)),
        }
    }

    /// Like [`Bundle::load`], but also returns the bundle when the only problems are unknown fields (the
    /// values read are then complete), so that a caller can go on to report what else is wrong.
    pub fn load_all(sources: &[(&str, &str)]) -> (Option<(Self, Origins)>, Vec<ConfigError>) {
        let mut errors = Vec::new();
        let mut middlewares: Vec<(Middleware, String)> = Vec::new();
        let mut bundle = Bundle::default();
        let mut origins = Origins::new();
        for (source, text) in sources {
            for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
                let at = if source.is_empty() {
                    format!("document {}", index + 1)
                } else {
                    format!("{source}, document {}", index + 1)
                };
                let value = match serde_yaml::Value::deserialize(document) {
                    Ok(value) => value,
                    Err(source) => {
                        // A syntax error ends the stream: what follows cannot be split into documents.
                        errors.push(ConfigError::Parse { at, source });
                        break;
                    }
                };
                if value.is_null() {
                    continue;
                }
                let meta: TypeMeta = match serde_yaml::from_value(value.clone()) {
                    Ok(meta) => meta,
                    Err(source) => {
                        errors.push(ConfigError::Parse { at, source });
                        continue;
                    }
                };
                // Other Kubernetes objects in the same files (a Secret, a Namespace) are the cluster's.
                if !meta.api_version.starts_with("umw.dev/") {
                    continue;
                }
                if meta.api_version != crate::API_VERSION {
                    errors.push(ConfigError::ApiVersion {
                        at,
                        api_version: meta.api_version,
                        expected: crate::API_VERSION,
                    });
                    continue;
                }
                let name = value.get("metadata").and_then(|m| m.get("name")).and_then(|n| n.as_str()).unwrap_or("");
                origins.insert(format!("{}/{name}", meta.kind), at.clone());
                match meta.kind.as_str() {
                    "Middleware" => {
                        if let Some(mw) = strict(value, &at, &mut errors) {
                            middlewares.push((mw, at));
                        }
                    }
                    "CachePolicy" => bundle.cache_policies.extend(strict(value, &at, &mut errors)),
                    "EventRoute" => bundle.event_routes.extend(strict(value, &at, &mut errors)),
                    "AuthPolicy" => bundle.auth_policies.extend(strict(value, &at, &mut errors)),
                    _ => errors.push(ConfigError::UnknownKind { at, kind: meta.kind }),
                }
            }
        }
        match middlewares.len() {
            0 if errors.is_empty() => errors.push(ConfigError::NoMiddleware),
            0 | 1 => {}
            _ => errors.push(ConfigError::SeveralMiddlewares(middlewares.iter().map(|(_, at)| at.clone()).collect())),
        }
        let complete = middlewares.len() == 1 && errors.iter().all(|e| matches!(e, ConfigError::UnknownField { .. }));
        if !complete {
            return (None, errors);
        }
        bundle.middleware = middlewares.remove(0).0;
        (Some((bundle, origins)), errors)
    }

    /// Writes the stream: the Middleware first, then policies by kind and name, specs only, so that equal
    /// inputs give byte-equal output (and an equal [`Bundle::hash`]).
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        let mut out = String::new();
        push_document(&mut out, &strip(&self.middleware))?;
        for policy in sorted(&self.cache_policies) {
            push_document(&mut out, &strip(policy))?;
        }
        for policy in sorted(&self.event_routes) {
            push_document(&mut out, &strip(policy))?;
        }
        for policy in sorted(&self.auth_policies) {
            push_document(&mut out, &strip(policy))?;
        }
        Ok(out)
    }
}

/// The CRD's OpenAPI schema of each kind, compiled once.
fn schema(kind: &str) -> Option<&'static jsonschema::Validator> {
    use kube::CustomResourceExt as _;
    use std::sync::OnceLock;
    static SCHEMAS: OnceLock<std::collections::HashMap<&'static str, jsonschema::Validator>> = OnceLock::new();
    let schemas = SCHEMAS.get_or_init(|| {
        let crds = [
            ("Middleware", Middleware::crd()),
            ("CachePolicy", CachePolicy::crd()),
            ("EventRoute", EventRoute::crd()),
            ("AuthPolicy", AuthPolicy::crd()),
        ];
        crds.into_iter()
            .filter_map(|(kind, crd)| {
                let schema = crd.spec.versions.first()?.schema.as_ref()?.open_api_v3_schema.as_ref()?;
                let schema = serde_json::to_value(schema).ok()?;
                Some((kind, jsonschema::validator_for(&schema).ok()?))
            })
            .collect()
    });
    schemas.get(kind)
}

/// The document's violations of its kind's schema (what the API server checks besides the CEL rules:
/// patterns, ranges, sizes, enums), as field paths (`spec.rules[0].ttl`) and messages.
pub fn schema_violations(kind: &str, document: &serde_json::Value) -> Vec<(String, String)> {
    let Some(schema) = schema(kind) else { return Vec::new() };
    schema
        .iter_errors(document)
        .take(20)
        .map(|error| {
            let pointer = error.instance_path().to_string();
            let mut path = String::new();
            for segment in pointer.split('/').skip(1) {
                let segment = segment.replace("~1", "/").replace("~0", "~");
                if segment.parse::<usize>().is_ok() {
                    path.push_str(&format!("[{segment}]"));
                } else {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(&segment);
                }
            }
            let mut message = error.to_string();
            if message.contains(crate::common::DURATION_PATTERN) {
                message = format!(
                    "{} is not a duration (a positive number with unit ms, s, m or h, e.g. 30s or 1m30s)",
                    error.instance()
                );
            }
            (path, message)
        })
        .collect()
}

/// Deserialises one document, refusing fields the types do not know, and naming the field of every
/// problem. The types themselves accept unknown fields, so that a watch never fails on an object written
/// against a newer CRD; files are held to the stricter standard, since an unknown field there is almost
/// always a typo.
fn strict<T: serde::de::DeserializeOwned>(
    value: serde_yaml::Value,
    at: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    let mut unknown = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| {
        let path = bracket_indices(&path.to_string());
        // The generated root types read apiVersion and kind themselves.
        if path != "apiVersion" && path != "kind" {
            unknown.push(path);
        }
    };
    let parsed: Result<T, _> = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut record));
    errors.extend(unknown.into_iter().map(|field| ConfigError::UnknownField { at: at.to_string(), field }));
    match parsed {
        Ok(parsed) => Some(parsed),
        Err(error) => {
            let path = error.path().to_string();
            let message = error.into_inner().to_string();
            errors.push(ConfigError::Invalid { at: at.to_string(), path, message });
            None
        }
    }
}

/// `spec.rules.0.ttl` → `spec.rules[0].ttl`, the form of the other error paths.
fn bracket_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 4);
    for (i, segment) in path.split('.').enumerate() {
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push('[');
            out.push_str(segment);
            out.push(']');
        } else {
            if i > 0 {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

/// A short, stable hash of a rendered configuration (hex SHA-256, first 16 digits).
pub fn hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The environment variable through which a data-plane pod receives a Secret key's value:
/// `UMW_SECRET_<NAME>_<KEY>`, upper-cased, with every other character turned into `_`, plus a short hash
/// of the exact name and key so that `a-b/c` and `a/b-c` cannot collide.
pub fn secret_env_var(secret: &SecretKeyRef) -> String {
    let clean = |s: &str| -> String {
        s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect()
    };
    let unique = &hash(&format!("{}/{}", secret.name, secret.key))[..6];
    format!("UMW_SECRET_{}_{}_{}", clean(&secret.name), clean(&secret.key), unique.to_ascii_uppercase())
}

/// The value of a setting at run time: inline, or from the environment variable that carries its Secret
/// key (`secret_env_var`). `Err` names the variable that is missing.
pub fn resolve(value: &crate::ValueSource) -> Result<String, String> {
    match (&value.value, &value.secret_key_ref) {
        (Some(value), _) => Ok(value.clone()),
        (None, Some(secret)) => {
            let var = secret_env_var(secret);
            std::env::var(&var).map_err(|_| {
                format!("the value of Secret {:?} key {:?} is not in the environment ({var})", secret.name, secret.key)
            })
        }
        (None, None) => Err("neither value nor secretKeyRef is set".into()),
    }
}

fn sorted<K: ResourceExt>(items: &[K]) -> Vec<&K> {
    let mut items: Vec<&K> = items.iter().collect();
    items.sort_by_key(|k| k.name_any());
    items
}

#[derive(Serialize)]
struct Document<'a, S: Serialize> {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    metadata: ObjectMeta,
    spec: &'a S,
}

/// Anything with a spec that the configuration carries.
pub trait HasSpec {
    type Spec: Serialize;
    fn spec(&self) -> &Self::Spec;
}

macro_rules! has_spec {
    ($($kind:ty => $spec:ty),*) => {$(
        impl HasSpec for $kind {
            type Spec = $spec;
            fn spec(&self) -> &$spec {
                &self.spec
            }
        }
    )*};
}

has_spec!(
    Middleware => crate::MiddlewareSpec,
    CachePolicy => crate::CachePolicySpec,
    EventRoute => crate::EventRouteSpec,
    AuthPolicy => crate::AuthPolicySpec
);

fn strip<K>(resource: &K) -> Document<'_, K::Spec>
where
    K: Resource<DynamicType = ()> + HasSpec,
{
    let meta = resource.meta();
    Document {
        api_version: crate::API_VERSION,
        kind: leak_kind::<K>(),
        metadata: ObjectMeta {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            generation: meta.generation,
            ..ObjectMeta::default()
        },
        spec: resource.spec(),
    }
}

fn leak_kind<K: Resource<DynamicType = ()>>() -> &'static str {
    // The four kinds are static strings; match instead of leaking memory.
    match K::kind(&()).as_ref() {
        "Middleware" => "Middleware",
        "CachePolicy" => "CachePolicy",
        "EventRoute" => "EventRoute",
        _ => "AuthPolicy",
    }
}

fn push_document<T: Serialize>(out: &mut String, document: &T) -> Result<(), ConfigError> {
    out.push_str("---\n");
    out.push_str(&serde_yaml::to_string(document)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::PolicyTargetRef;
    use crate::{CachePolicySpec, MiddlewareSpec};

    fn bundle() -> Bundle {
        let mut mw = Middleware::new("shop", MiddlewareSpec::default());
        mw.metadata.namespace = Some("default".into());
        mw.metadata.uid = Some("dropped".into());
        let cache = |name: &str| {
            let mut p = CachePolicy::new(
                name,
                CachePolicySpec { target_refs: vec![PolicyTargetRef::middleware("shop")], ..Default::default() },
            );
            p.metadata.namespace = Some("default".into());
            p
        };
        Bundle { middleware: mw, cache_policies: vec![cache("b"), cache("a")], ..Default::default() }
    }

    #[test]
    fn round_trips_and_is_stable() {
        let text = bundle().to_yaml().unwrap();
        assert!(!text.contains("dropped"), "uid is not part of the configuration:\n{text}");
        let back = Bundle::from_yaml(&text).unwrap();
        assert_eq!(back.middleware.metadata.name.as_deref(), Some("shop"));
        let names: Vec<_> = back.cache_policies.iter().map(|p| p.name_any()).collect();
        assert_eq!(names, ["a", "b"], "policies are written sorted");
        assert_eq!(back.to_yaml().unwrap(), text);
        assert_eq!(hash(&text).len(), 16);
    }

    #[test]
    fn refuses_what_it_cannot_serve() {
        let err = Bundle::from_yaml("apiVersion: umw.dev/v1alpha1\nkind: Gateway\n").unwrap_err();
        assert!(err.to_string().contains("kind \"Gateway\""), "{err}");
        let err = Bundle::from_yaml("apiVersion: umw.dev/v2\nkind: Middleware\n").unwrap_err();
        assert!(err.to_string().contains("apiVersion"), "{err}");
        let secret_only = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n";
        assert!(matches!(Bundle::from_yaml(secret_only).unwrap_err(), ConfigError::NoMiddleware));
        assert!(matches!(Bundle::from_yaml("").unwrap_err(), ConfigError::NoMiddleware));
        let two = "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {name: a}\nspec: {}\n---\napiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {name: b}\nspec: {}\n";
        assert!(matches!(Bundle::from_yaml(two).unwrap_err(), ConfigError::SeveralMiddlewares(at) if at.len() == 2));
        let unknown_field = "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {name: a}\nspec: {replica: 2}\n";
        let err = Bundle::from_yaml(unknown_field).unwrap_err();
        assert!(err.to_string().contains("unknown field spec.replica"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_source_document_and_field() {
        let bad = "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {name: a}\nspec:\n  replica: 2\n  routes:\n    - name: r\n      upstream: {url: http://x}\n      timeout: 5\n---\napiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata: {name: c}\nspec: {targetRefs: [{name: a}], rules: [{ttl: 1s, jiter: 3}]}\n";
        let errors = Bundle::load(&[("a.yaml", bad)]).unwrap_err().0;
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(text.iter().any(|e| e.starts_with("a.yaml, document 1: unknown field spec.replica")), "{text:?}");
        assert!(
            text.iter().any(|e| e.starts_with("a.yaml, document 2: unknown field spec.rules[0].jiter")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|e| e.starts_with("a.yaml, document 1: spec.routes[0].timeout: invalid type")),
            "{text:?}"
        );
        assert_eq!(text.len(), 3, "{text:?}");
        let wrong_type = "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {name: a}\nspec:\n  routes:\n    - name: r\n      upstream: {url: http://x}\n      retry: {attempts: many}\n";
        let errors = Bundle::load(&[("b.yaml", wrong_type)]).unwrap_err().0;
        let text = errors[0].to_string();
        assert!(text.starts_with("b.yaml, document 1: spec.routes[0].retry.attempts: invalid type"), "{text}");
    }

    #[test]
    fn secret_env_vars_are_valid_and_distinct() {
        let a = secret_env_var(&SecretKeyRef { name: "a-b".into(), key: "c".into() });
        let b = secret_env_var(&SecretKeyRef { name: "a".into(), key: "b-c".into() });
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'), "{a}");
    }
}
