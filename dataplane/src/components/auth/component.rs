//! The auth component: each AuthPolicy compiled into an authenticate stage in front of the routes it
//! targets, and the issuers' key sets, kept across reloads while an issuer's settings are unchanged (so a
//! reload neither drops the keys nor fetches them again).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderName;
use jsonwebtoken::Algorithm;
use kube::ResourceExt as _;
use umw_crds::auth_policy::JwtAlgorithm;
use umw_crds::validate::{HttpUrl, duration_or};

use super::jwks::{Issuer, REFRESH, Source};
use super::jwt::{Trusted, normalise_type};
use super::stage::{AuthStage, JwtAuth};
use crate::kernel::component::{BuildCx, Built, Component, StageEntry};
use crate::kernel::config::Loaded;
use crate::kernel::stage::{Phase, Stage};

/// Clock skew allowed when a policy does not say.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Algorithms accepted when an issuer does not list them.
pub const DEFAULT_ALGORITHMS: [Algorithm; 3] = [Algorithm::RS256, Algorithm::PS256, Algorithm::ES256];
/// Token types accepted when an issuer does not list them (RFC 9068 access tokens).
pub const DEFAULT_TOKEN_TYPES: [&str; 1] = ["at+jwt"];

type Issuers = HashMap<Source, Arc<Issuer>>;

#[derive(Default)]
pub struct Auth {
    issuers: Arc<Mutex<Issuers>>,
}

/// A policy's stage and the routes it covers (`None`: every route of the Middleware).
struct Compiled {
    routes: Option<Vec<String>>,
    stage: Arc<AuthStage>,
}

impl Component for Auth {
    fn name(&self) -> &'static str {
        "auth"
    }

    fn build(&self, config: &Loaded, cx: &mut BuildCx<'_>) -> Result<Built, Vec<String>> {
        super::crypto::install();
        let env = cx.env;
        let pool = self.issuers.lock().map(|p| p.clone()).unwrap_or_default();
        let mut used = Issuers::new();
        let mut problems = Vec::new();
        let mut compiled = Vec::new();
        let bundle = &config.bundle;
        let mw_name = bundle.middleware.name_any();
        for policy in &bundle.auth_policies {
            let name = policy.name_any();
            let at = config.origin(&format!("AuthPolicy/{name}"));
            let Some(spec) = &policy.spec.jwt else { continue };
            let mut trusted = Vec::new();
            for (i, issuer) in spec.issuers.iter().enumerate() {
                let field = format!("{at}: spec.jwt.issuers[{i}]");
                for (what, url) in [("issuer", Some(&issuer.issuer)), ("jwksUri", issuer.jwks_uri.as_ref())] {
                    if let Some(url) = url
                        && let Err(why) = HttpUrl::parse(url)
                    {
                        problems.push(format!("{field}.{what}: {why}"));
                    }
                }
                let source = Source {
                    issuer: issuer.issuer.clone(),
                    jwks_uri: issuer.jwks_uri.clone(),
                    refresh: duration_or(issuer.jwks_refresh_interval.as_ref(), REFRESH),
                };
                let shared = used.get(&source).or_else(|| pool.get(&source)).cloned().unwrap_or_else(|| {
                    Issuer::new(source.clone(), env.clients.clone(), env.metrics.auth_jwks_fetches.clone())
                });
                used.insert(source, shared.clone());
                let algorithms = if issuer.algorithms.is_empty() {
                    DEFAULT_ALGORITHMS.to_vec()
                } else {
                    issuer.algorithms.iter().map(|a| algorithm(*a)).collect()
                };
                let token_types = if issuer.token_types.is_empty() {
                    DEFAULT_TOKEN_TYPES.iter().map(|t| t.to_string()).collect()
                } else {
                    issuer.token_types.iter().map(|t| normalise_type(t)).collect()
                };
                trusted.push(Trusted {
                    issuer: shared,
                    audiences: issuer.audiences.clone(),
                    leeway: duration_or(issuer.leeway.as_ref(), DEFAULT_LEEWAY),
                    algorithms,
                    token_types,
                });
            }
            let mut claims_to_headers = Vec::new();
            for (i, copy) in spec.claims_to_headers.iter().enumerate() {
                match HeaderName::try_from(copy.header.as_str()) {
                    Ok(header) => claims_to_headers.push((copy.claim.clone(), header)),
                    Err(_) => problems.push(format!("{at}: spec.jwt.claimsToHeaders[{i}].header: not a header name")),
                }
            }
            let own: Vec<_> = policy.spec.target_refs.iter().filter(|t| t.name == mw_name).collect();
            let routes = if own.iter().any(|t| t.section_name.is_none()) {
                None
            } else {
                Some(own.iter().filter_map(|t| t.section_name.clone()).collect())
            };
            let jwt = JwtAuth { trusted, optional: spec.optional, claims_to_headers };
            compiled.push(Compiled {
                routes,
                stage: Arc::new(AuthStage { policy: name, jwt, metrics: env.metrics.clone() }),
            });
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut built = Built::default();
        if !compiled.is_empty() {
            let compiled = Arc::new(compiled);
            built.stages.push(StageEntry {
                phase: Phase::Authenticate,
                stage_for: Arc::new(move |route| {
                    let route = route?;
                    // A policy that names the route wins over one for the whole Middleware.
                    let named = compiled.iter().find(|c| c.routes.as_ref().is_some_and(|r| r.contains(&route.name)));
                    let chosen = named.or_else(|| compiled.iter().find(|c| c.routes.is_none()))?;
                    Some(Arc::new(chosen.stage.clone()) as Arc<dyn Stage>)
                }),
            });
        }
        let issuers = self.issuers.clone();
        built.on_commit(move || {
            for issuer in used.values() {
                issuer.prefetch();
            }
            if let Ok(mut pool) = issuers.lock() {
                *pool = used;
            }
        });
        Ok(built)
    }
}

fn algorithm(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::RS384 => Algorithm::RS384,
        JwtAlgorithm::RS512 => Algorithm::RS512,
        JwtAlgorithm::PS256 => Algorithm::PS256,
        JwtAlgorithm::PS384 => Algorithm::PS384,
        JwtAlgorithm::PS512 => Algorithm::PS512,
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::ES384 => Algorithm::ES384,
        JwtAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}
