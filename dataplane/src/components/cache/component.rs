//! The cache component: CachePolicies compiled into a cache stage for each route a rule covers, their
//! backends (kept across reloads while their settings are unchanged: a memory cache keeps its entries,
//! Redis its connections), the `/cache/invalidate` admin endpoint, the [`Invalidate`] port, invalidation by
//! events, and warm-up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::IntoResponse as _;
use http::{Method, StatusCode};
use kube::ResourceExt as _;
use umw_crds::cache_policy::{CacheBackend, CacheableMethod};
use umw_crds::validate::duration_or;

use super::invalidation::{self, Current};
use super::memory::{DEFAULT_MAX_BYTES, MemoryCache};
use super::redis::{OPERATION_TIMEOUT, RedisCache, RedisSettings};
use super::stage::{CacheStage, Flights, Rule};
use super::tiered::TieredCache;
use super::warmup::{self, Plan};
use super::{Cache, Invalidation, Invalidator};
use crate::kernel::component::{AdminHandler, AdminRoute, BuildCx, Built, Component, Env, StageEntry};
use crate::kernel::config::Loaded;
use crate::kernel::metrics::Metrics;
use crate::kernel::ports::{Invalidate, Subscribe};
use crate::kernel::problem::{Kind, Problem, kinds};
use crate::kernel::secret::Secret;
use crate::kernel::stage::{Phase, Stage};
use crate::kernel::task::{TaskKey, TaskSpec, version_of};

/// Where entries live, by backend.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum BackendKey {
    Memory,
    Redis(RedisSettings),
    Tiered(RedisSettings),
}

#[derive(Clone)]
enum Backend {
    Memory(Arc<MemoryCache>),
    Redis(Arc<RedisCache>),
    Tiered(Arc<TieredCache>),
}

impl Backend {
    fn cache(&self) -> Arc<dyn Cache> {
        match self {
            Backend::Memory(cache) => cache.clone(),
            Backend::Redis(cache) => cache.clone(),
            Backend::Tiered(cache) => cache.clone(),
        }
    }

    fn activate(&self) {
        match self {
            Backend::Memory(_) => {}
            Backend::Redis(cache) => cache.activate(),
            Backend::Tiered(cache) => cache.activate(),
        }
    }
}

type Pool = HashMap<BackendKey, Backend>;

#[derive(Default)]
pub struct CacheComponent {
    backends: Arc<Mutex<Pool>>,
    /// Requests in flight per key, shared by every snapshot.
    flights: Flights,
    /// The committed snapshot's invalidator, for event consumers that outlive reloads.
    invalidator: Current,
}

impl Component for CacheComponent {
    fn name(&self) -> &'static str {
        "cache"
    }

    fn build(&self, config: &Loaded, cx: &mut BuildCx<'_>) -> Result<Built, Vec<String>> {
        let env = cx.env;
        let metrics = &env.metrics;
        let pool = self.backends.lock().map(|p| p.clone()).unwrap_or_default();
        let (used, rules, tokens) = self.rules(config, &pool, env)?;
        let mut built = Built::default();
        built.admin.push(AdminRoute {
            method: Method::POST,
            path: "/cache/invalidate",
            handler: invalidate_endpoint(self.invalidator.clone(), metrics.clone()),
        });
        let invalidator = (!rules.is_empty()).then(|| {
            Arc::new(Invalidator {
                prefix: format!("umw:{}:", config.middleware()),
                caches: used.values().map(Backend::cache).collect(),
                tokens,
                metrics: metrics.clone(),
            })
        });
        if let Some(invalidator) = &invalidator {
            let stage = CacheStage::new(rules, invalidator.prefix.clone(), self.flights.clone(), metrics.clone());
            built.stages.push(StageEntry {
                phase: Phase::Cache,
                stage_for: Arc::new(move |route| {
                    route.and_then(|r| stage.for_route(&r.name)).map(|s| Arc::new(s) as Arc<dyn Stage>)
                }),
            });
            cx.ports.provide::<dyn Invalidate>(invalidator.clone());
            if let Some(subscribe) = cx.ports.get::<dyn Subscribe>() {
                built.tasks.extend(invalidation::subscriptions(config, &self.invalidator, subscribe.as_ref()));
            }
        }
        let plan = warmup_plan(config);
        if !plan.paths.is_empty() {
            // Every configuration warms again (a changed rule may store what it did not before).
            let version = version_of(&config.hash);
            built.tasks.push(TaskSpec::new(TaskKey::new("cache", "warmup", "paths"), version, move |cx| {
                Ok(Box::new(warmup::start(plan, cx)))
            }));
        }
        let (backends, current) = (self.backends.clone(), self.invalidator.clone());
        built.on_commit(move || {
            for backend in used.values() {
                backend.activate();
            }
            if let Ok(mut pool) = backends.lock() {
                *pool = used;
            }
            current.store(invalidator);
        });
        Ok(built)
    }
}

impl CacheComponent {
    /// The rules of every CachePolicy with their backends (reused from `pool` when the settings did not
    /// change), and the admin tokens.
    #[allow(clippy::type_complexity)]
    fn rules(&self, loaded: &Loaded, pool: &Pool, env: &Env) -> Result<(Pool, Vec<Rule>, Vec<String>), Vec<String>> {
        let bundle = &loaded.bundle;
        let mut used = Pool::new();
        let mut problems = Vec::new();
        let mut rules = Vec::new();
        let mut tokens = Vec::new();
        let mw_name = bundle.middleware.name_any();
        let redis = &bundle.middleware.spec.connections.redis;
        for policy in &bundle.cache_policies {
            let at = loaded.origin(&format!("CachePolicy/{}", policy.name_any()));
            let spec = &policy.spec;
            let wanted = match (spec.backend, redis, env.in_process) {
                (_, _, true) | (Some(CacheBackend::Memory), _, _) | (None, None, _) => BackendKey::Memory,
                (_, Some(redis), false) => {
                    let url = umw_crds::config::resolve(&redis.url);
                    let password = redis.password.as_ref().map(umw_crds::config::resolve).transpose();
                    let ca_cert = redis.ca_cert.as_ref().map(umw_crds::config::resolve).transpose();
                    match (url, password, ca_cert) {
                        (Ok(url), Ok(password), Ok(ca_cert)) => {
                            let settings = RedisSettings {
                                url,
                                password: password.map(Secret::from),
                                ca_cert,
                                cluster: redis.mode == umw_crds::middleware::RedisMode::Cluster,
                                timeout: duration_or(redis.timeout.as_ref(), OPERATION_TIMEOUT),
                            };
                            if spec.backend == Some(CacheBackend::Tiered) {
                                BackendKey::Tiered(settings)
                            } else {
                                BackendKey::Redis(settings)
                            }
                        }
                        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                            problems.push(format!("{at}: spec.connections.redis of Middleware {mw_name}: {e}"));
                            continue;
                        }
                    }
                }
                (Some(_), None, false) => {
                    problems.push(format!("{at}: spec.backend: needs spec.connections.redis on Middleware {mw_name}"));
                    continue;
                }
            };
            let backend = match used.get(&wanted).or_else(|| pool.get(&wanted)) {
                Some(backend) => backend.clone(),
                None => match new_backend(&wanted, loaded, env) {
                    Ok(backend) => backend,
                    Err(error) => {
                        problems.push(format!("{at}: spec.connections.redis: {error}"));
                        continue;
                    }
                },
            };
            let cache = backend.cache();
            used.insert(wanted, backend);
            if let Some(invalidation) = spec.invalidation.as_ref().filter(|i| i.admin_api)
                && let Some(token) = &invalidation.admin_token
            {
                match umw_crds::config::resolve(token) {
                    Ok(token) if !token.is_empty() => tokens.push(token),
                    Ok(_) => problems.push(format!("{at}: spec.invalidation.adminToken: empty")),
                    Err(e) => problems.push(format!("{at}: spec.invalidation.adminToken: {e}")),
                }
            }
            let own: Vec<_> = spec.target_refs.iter().filter(|t| t.name == mw_name).collect();
            let routes = if own.iter().any(|t| t.section_name.is_none()) {
                None
            } else {
                Some(own.iter().filter_map(|t| t.section_name.clone()).collect())
            };
            for (i, rule) in spec.rules.iter().enumerate() {
                let methods = &rule.matches.methods;
                let key_headers: Result<Vec<http::HeaderName>, _> =
                    rule.key.headers.iter().map(|h| http::HeaderName::try_from(h.as_str())).collect();
                let Ok(key_headers) = key_headers else {
                    problems.push(format!("{at}: spec.rules[{i}].key.headers: not a header name"));
                    continue;
                };
                let window = |d: &Option<umw_crds::common::Duration>| {
                    d.as_ref().map_or(Duration::ZERO, |d| duration_or(Some(d), Duration::ZERO))
                };
                rules.push(Rule {
                    routes: routes.clone(),
                    path_prefix: rule.matches.path_prefix.clone(),
                    get: methods.is_empty() || methods.contains(&CacheableMethod::Get),
                    head_too: methods.is_empty() || methods.contains(&CacheableMethod::Head),
                    ttl: duration_or(Some(&rule.ttl), Duration::from_secs(60)),
                    jitter_percent: rule.jitter_percent.unwrap_or(10),
                    negative_ttl: rule.negative_ttl.as_ref().map(|d| duration_or(Some(d), Duration::from_secs(5))),
                    negative_statuses: if rule.negative_statuses.is_empty() {
                        vec![404, 410]
                    } else {
                        rule.negative_statuses.clone()
                    },
                    stale_while_revalidate: window(&rule.stale_while_revalidate),
                    stale_if_error: window(&rule.stale_if_error),
                    query_params: rule.key.query_params.clone(),
                    key_headers,
                    max_entry_bytes: rule
                        .max_entry_bytes
                        .map_or(1024 * 1024, |n| usize::try_from(n).unwrap_or(usize::MAX)),
                    single_flight: rule.single_flight.enabled || rule.single_flight.distributed,
                    distributed: rule.single_flight.distributed,
                    lock_timeout: duration_or(rule.single_flight.lock_timeout.as_ref(), Duration::from_secs(5)),
                    tags: rule.tags.iter().filter_map(|t| umw_crds::template::parse(t).ok()).collect(),
                    cache: cache.clone(),
                });
            }
        }
        if problems.is_empty() { Ok((used, rules, tokens)) } else { Err(problems) }
    }
}

/// A backend; Redis connects once activated.
fn new_backend(key: &BackendKey, loaded: &Loaded, env: &Env) -> Result<Backend, String> {
    let redis = |settings| RedisCache::new(settings, &env.health, env.metrics.clone()).map_err(|e| e.to_string());
    match key {
        BackendKey::Memory => Ok(Backend::Memory(Arc::new(MemoryCache::new(DEFAULT_MAX_BYTES)))),
        BackendKey::Redis(settings) => redis(settings).map(|cache| Backend::Redis(Arc::new(cache))),
        BackendKey::Tiered(settings) => {
            let channel = format!("umw:{}:l1", loaded.middleware());
            redis(settings).map(|cache| Backend::Tiered(Arc::new(TieredCache::new(Arc::new(cache), channel))))
        }
    }
}

/// The warm-up of every CachePolicy, together; the shortest interval wins.
fn warmup_plan(loaded: &Loaded) -> Plan {
    let mut plan = Plan::default();
    for warmup in loaded.bundle.cache_policies.iter().filter_map(|p| p.spec.warmup.as_ref()) {
        plan.paths.extend(warmup.paths.iter().cloned());
        if let Some(interval) = &warmup.interval {
            let interval = duration_or(Some(interval), Duration::from_secs(300));
            plan.interval = Some(plan.interval.map_or(interval, |i| i.min(interval)));
        }
    }
    plan
}

/// `POST /cache/invalidate` with `Authorization: Bearer <adminToken>` and a JSON body
/// `{"keys": [...], "prefixes": [...], "tags": [...]}`; answers `{"deleted": N}`.
fn invalidate_endpoint(current: Current, metrics: Metrics) -> AdminHandler {
    Arc::new(move |request| {
        let (current, metrics) = (current.clone(), metrics.clone());
        Box::pin(async move {
            const UNAUTHORIZED: Kind =
                Kind { slug: "unauthorized", title: "A valid admin token is needed", status: StatusCode::UNAUTHORIZED };
            const NO_ADMIN_API: Kind = Kind {
                slug: "no-admin-api",
                title: "No CachePolicy enables the admin API",
                status: StatusCode::NOT_FOUND,
            };
            let Some(invalidator) = current.load_full().filter(|i| !i.tokens.is_empty()) else {
                return Problem::new(NO_ADMIN_API, "set spec.invalidation.adminApi and adminToken on a CachePolicy")
                    .into_response();
            };
            if !invalidator.accepts(crate::kernel::context::bearer_token(request.headers())) {
                metrics.gateway_errors.with_label_values(&["admin", "unauthorized"]).inc();
                return Problem::new(UNAUTHORIZED, "present the CachePolicy's adminToken as a bearer token")
                    .into_response();
            }
            let bad_request = || metrics.gateway_errors.with_label_values(&["admin", "bad_request"]).inc();
            let body =
                match http_body_util::BodyExt::collect(http_body_util::Limited::new(request.into_body(), 1024 * 1024))
                    .await
                {
                    Ok(body) => body.to_bytes(),
                    Err(_) => {
                        bad_request();
                        return Problem::new(kinds::BAD_REQUEST, "the body could not be read (at most 1 MiB)")
                            .into_response();
                    }
                };
            let what: Invalidation = match serde_json::from_slice(&body) {
                Ok(what) => what,
                Err(error) => {
                    bad_request();
                    return Problem::new(
                        kinds::BAD_REQUEST,
                        format!("expected {{\"keys\": [], \"prefixes\": [], \"tags\": []}}: {error}"),
                    )
                    .into_response();
                }
            };
            if what.keys.is_empty() && what.prefixes.is_empty() && what.tags.is_empty() {
                bad_request();
                return Problem::new(kinds::BAD_REQUEST, "name at least one of keys, prefixes and tags")
                    .into_response();
            }
            if what.prefixes.iter().any(String::is_empty) {
                bad_request();
                return Problem::new(
                    kinds::BAD_REQUEST,
                    "an empty prefix would delete every entry; name a prefix (every entry of a path: \"GET:host/path\")",
                )
                .into_response();
            }
            match invalidator.invalidate(&what).await {
                Ok(deleted) => {
                    tracing::info!(
                        keys = what.keys.len(),
                        prefixes = what.prefixes.len(),
                        tags = what.tags.len(),
                        deleted,
                        "cache invalidated"
                    );
                    axum::Json(serde_json::json!({ "deleted": deleted })).into_response()
                }
                Err(error) => {
                    metrics.gateway_errors.with_label_values(&["admin", "cache_unavailable"]).inc();
                    tracing::warn!(%error, "cache invalidation failed");
                    Problem::new(
                        kinds::UPSTREAM_UNAVAILABLE,
                        format!("the cache could not be invalidated: {}", error.kind()),
                    )
                    .into_response()
                }
            }
        })
    })
}
