//! The proxy component: compiles `spec.routes` into routes whose endpoint forwards to an upstream, and
//! provides the [`Forward`] port (command handlers). Upstreams keep their pooled state (breaker, retry
//! budget) across reloads while their target is unchanged.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::StatusCode;
use kube::ResourceExt as _;
use umw_crds::middleware::{Route as RouteSpec, RouteMatch, Upstream as UpstreamSpec};
use umw_crds::validate::duration_or;

use super::upstream::{Target, Upstream};
use super::{Proxied, Retry};
use crate::kernel::component::{BuildCx, Built, Component, Env, Precedence};
use crate::kernel::config::Loaded;
use crate::kernel::endpoint::{DEFAULT_MAX_BODY, DEFAULT_TIMEOUT, Route};
use crate::kernel::ports::Forward;
use crate::kernel::routing::Matcher;

/// Default first retry delay, as documented on `retry.backoff`.
pub const DEFAULT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(25);

type Pool = BTreeMap<Target, Arc<Upstream>>;

/// The upstreams of the committed snapshot, by target.
#[derive(Default)]
pub struct Proxy {
    upstreams: Arc<Mutex<Pool>>,
}

/// The upstreams one build uses: reused from the pool or new (shown once committed).
#[derive(Clone)]
struct Next {
    env: Env,
    namespace: String,
    pool: Arc<Mutex<Pool>>,
    used: Arc<Mutex<Pool>>,
}

impl Next {
    fn upstream(&self, spec: &UpstreamSpec) -> Result<Arc<Upstream>, String> {
        let target = Target::from_spec(spec, &self.namespace, &self.env.overrides).map_err(|e| e.to_string())?;
        let mut used = self.used.lock().map_err(|_| "internal state poisoned".to_string())?;
        if let Some(upstream) = used.get(&target) {
            return Ok(upstream.clone());
        }
        let existing = self.pool.lock().ok().and_then(|pool| pool.get(&target).cloned());
        let upstream = match existing {
            Some(upstream) => upstream,
            None => Arc::new(
                Upstream::new(target.clone(), &self.env.health, self.env.metrics.clone()).map_err(|e| e.to_string())?,
            ),
        };
        used.insert(target, upstream.clone());
        Ok(upstream)
    }

    fn route(&self, spec: &RouteSpec) -> Result<Route, (&'static str, String)> {
        let matcher = Matcher::compile(&spec.matches).map_err(|e| (".match", e.to_string()))?;
        let upstream = self.upstream(&spec.upstream).map_err(|e| (".upstream", e))?;
        let retry = spec.retry.as_ref().map(|r| Retry {
            attempts: r.attempts,
            backoff: duration_or(r.backoff.as_ref(), DEFAULT_BACKOFF),
            on_statuses: if r.on_statuses.is_empty() {
                vec![StatusCode::BAD_GATEWAY, StatusCode::SERVICE_UNAVAILABLE, StatusCode::GATEWAY_TIMEOUT]
            } else {
                r.on_statuses.iter().filter_map(|s| StatusCode::from_u16(*s).ok()).collect()
            },
        });
        let schema = match &spec.request_schema {
            Some(schema) => {
                let value = serde_json::Value::Object(schema.0.clone());
                Some(Arc::new(
                    jsonschema::validator_for(&value)
                        .map_err(|e| (".requestSchema", format!("not a valid JSON Schema: {e}")))?,
                ))
            }
            None => None,
        };
        let endpoint = Arc::new(Proxied { upstream, retry, clients: self.env.clients.clone() });
        let mut route = Route::new(&spec.name, matcher, endpoint, &self.env.metrics, &self.env.traces);
        route.timeout = duration_or(spec.timeout.as_ref(), DEFAULT_TIMEOUT);
        route.max_body = spec.max_body_bytes.map_or(DEFAULT_MAX_BODY, |n| u64::try_from(n).unwrap_or(0));
        route.schema = schema;
        Ok(route)
    }

    /// Swaps the pool for what this build used: upstreams that went are retired, new ones shown.
    fn commit(&self) {
        let (Ok(mut pool), Ok(used)) = (self.pool.lock(), self.used.lock()) else { return };
        for (target, upstream) in pool.iter() {
            if !used.contains_key(target) {
                upstream.retire();
            }
        }
        for upstream in used.values() {
            upstream.activate();
        }
        *pool = used.clone();
    }
}

impl Forward for Next {
    fn route(
        &self,
        name: &str,
        matches: &RouteMatch,
        upstream: &UpstreamSpec,
        max_body: u64,
    ) -> Result<Arc<Route>, (String, String)> {
        let upstream = self.upstream(upstream).map_err(|e| (String::new(), e))?;
        let endpoint = Arc::new(Proxied { upstream, retry: None, clients: self.env.clients.clone() });
        let matcher = Matcher::compile(matches).map_err(|e| (".match".to_string(), e.to_string()))?;
        let mut route = Route::new(name, matcher, endpoint, &self.env.metrics, &self.env.traces);
        route.max_body = max_body;
        Ok(Arc::new(route))
    }
}

impl Component for Proxy {
    fn name(&self) -> &'static str {
        "proxy"
    }

    fn build(&self, config: &Loaded, cx: &mut BuildCx<'_>) -> Result<Built, Vec<String>> {
        let next = Next {
            env: cx.env.clone(),
            namespace: config.namespace().to_string(),
            pool: self.upstreams.clone(),
            used: Arc::default(),
        };
        let bundle = &config.bundle;
        let at = config.origin(&format!("Middleware/{}", bundle.middleware.name_any()));
        let mut built = Built::default();
        let mut problems = Vec::new();
        for (i, spec) in bundle.middleware.spec.routes.iter().enumerate() {
            match next.route(spec) {
                Ok(route) => {
                    built.route(Precedence::Configured, route);
                }
                Err((field, message)) => problems.push(format!("{at}: spec.routes[{i}]{field}: {message}")),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        cx.ports.provide::<dyn Forward>(Arc::new(next.clone()));
        built.on_commit(move || next.commit());
        Ok(built)
    }
}
