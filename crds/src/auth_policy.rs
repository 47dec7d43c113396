//! `AuthPolicy`: authentication, rate limits and authorization for routes of a Middleware.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Duration, PolicyTargetRef, ValueSource};
use crate::middleware::HttpMethod;
use crate::policy::{Policy, PolicyStatus, section_key};

/// Authentication (JWT, OIDC login, API keys), rate limits and authorization (OPA, role rules).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "umw.dev",
    version = "v1alpha1",
    kind = "AuthPolicy",
    plural = "authpolicies",
    singular = "authpolicy",
    shortname = "authpol",
    category = "umw",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "Authentication (JWT/JWKS, OIDC login with sessions, API keys), rate limits and authorization (OPA policies compiled to Wasm, role rules) for routes of a Middleware. The Enforced condition says which fields this data-plane version acts on.",
    printcolumn(name = "Accepted", type_ = "string", json_path = ".status.conditions[?(@.type==\"Accepted\")].status"),
    printcolumn(name = "Enforced", type_ = "string", json_path = ".status.conditions[?(@.type==\"Enforced\")].status"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].reason",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.jwt) || has(self.oidc) || has(self.apiKeys) || (has(self.rateLimits) && size(self.rateLimits) > 0) || has(self.authorization)",
        "message": "an AuthPolicy needs at least one of jwt, oidc, apiKeys, rateLimits and authorization"
    },
    {
        "rule": "self.targetRefs.all(t, self.targetRefs.exists_one(o, o.name == t.name && (has(o.sectionName) ? o.sectionName : '') == (has(t.sectionName) ? t.sectionName : '')))",
        "message": "targetRefs must not name the same target twice"
    }
]))]
pub struct AuthPolicySpec {
    /// The Middlewares (and optionally routes) this policy applies to.
    #[schemars(length(min = 1, max = 16))]
    pub target_refs: Vec<PolicyTargetRef>,
    /// Bearer tokens checked against the issuers' JWKS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<Jwt>,
    /// Browser login through an OpenID Connect provider, with a session cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc: Option<Oidc>,
    /// Static API keys from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<ApiKeys>,
    /// Rate limits, all of which apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub rate_limits: Vec<RateLimit>,
    /// Who may do what, once authenticated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
}

/// JWT validation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Jwt {
    /// Trusted issuers.
    #[schemars(length(min = 1, max = 16))]
    pub issuers: Vec<JwtIssuer>,
    /// Let requests without a token through (unauthenticated); a present but invalid token is still
    /// refused. Defaults to false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
    /// Claims copied to upstream request headers, e.g. `sub: X-User-Id`. The client's own copies of these
    /// headers are always removed, with or without a token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub claims_to_headers: Vec<ClaimToHeader>,
}

/// One trusted issuer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtIssuer {
    /// Expected `iss` claim.
    #[schemars(length(min = 1, max = 2048))]
    pub issuer: String,
    /// JWKS URL. Defaults to discovery through `<issuer>/.well-known/openid-configuration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = "^https?://"))]
    pub jwks_uri: Option<String>,
    /// Accepted `aud` values: the token's `aud` must name at least one. A token without `aud` is refused.
    #[schemars(length(min = 1, max = 16))]
    pub audiences: Vec<String>,
    /// How long a fetched key set is used before it is fetched again (in the background, while the old set
    /// keeps serving). A token naming a key not in the set triggers a fetch at once, at most one per 5s.
    /// Defaults to 5m; values under 5s count as 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_refresh_interval: Option<Duration>,
    /// Allowed clock skew for `exp` and `nbf`. Defaults to 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leeway: Option<Duration>,
    /// Signature algorithms accepted from this issuer. Defaults to `RS256`, `PS256` and `ES256`. Symmetric
    /// algorithms and `none` are never accepted; a key whose JWK names an `alg` is used with that one only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub algorithms: Vec<JwtAlgorithm>,
    /// Accepted values of the token's `typ` header (compared without case and without an `application/`
    /// prefix; a token without `typ` counts as `JWT`). Defaults to `at+jwt` (RFC 9068 access tokens), which
    /// keeps ID tokens and logout tokens out; add `JWT` for an issuer that does not type its access tokens.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub token_types: Vec<String>,
}

/// A JWS algorithm with a public key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum JwtAlgorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

/// A claim copied to a request header.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimToHeader {
    /// Claim name. A string is copied as it is, a number or boolean as its JSON text, an array or object as
    /// its JSON.
    #[schemars(length(min = 1, max = 256))]
    pub claim: String,
    /// Header name.
    #[schemars(length(min = 1, max = 256), extend("pattern" = crate::common::HEADER_NAME_PATTERN))]
    pub header: String,
}

/// OIDC login.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Oidc {
    /// Issuer URL; endpoints come from its discovery document.
    #[schemars(extend("pattern" = "^https?://"))]
    pub issuer: String,
    /// OAuth client id.
    pub client_id: String,
    /// OAuth client secret; use a `secretKeyRef`.
    pub client_secret: ValueSource,
    /// Callback path on the HTTP listener. Defaults to `/oauth2/callback`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = "^/"))]
    pub redirect_path: Option<String>,
    /// Scopes. Defaults to `openid`, `profile`, `email`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Sessions after login.
    #[serde(default)]
    pub session: Session,
}

/// Login sessions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    /// Cookie name. Defaults to `umw_session`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie_name: Option<String>,
    /// Session lifetime. Defaults to 8h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    /// Where sessions live: `redis` (default when the Middleware has Redis) or `memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<SessionStoreKind>,
}

/// Session store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SessionStoreKind {
    Memory,
    Redis,
}

/// API keys.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeys {
    /// Request header carrying the key. Defaults to `X-API-Key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Secret whose every data entry is one key: the entry name is the client's name, the value its key.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

/// A rate limit (token bucket).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Name, for metrics and the `RateLimit-Policy` header.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Requests allowed per `period`.
    #[schemars(range(min = 1))]
    pub requests: u32,
    /// The period, e.g. `1s` or `1m`.
    pub period: Duration,
    /// Extra requests allowed in a burst. Defaults to 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub burst: Option<u32>,
    /// What is counted separately.
    #[serde(default)]
    pub key: RateLimitKey,
    /// Counters shared by all replicas through Redis (`redis`) or per pod (`local`). Defaults to `redis`
    /// when the Middleware has Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<RateLimitScope>,
}

/// What a rate limit counts by: one of `clientIp` (default), `header`, `claim`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(has(self.header) && has(self.claim))",
    "message": "rate limit key takes at most one of header and claim"
}]))]
pub struct RateLimitKey {
    /// Count per value of this request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Count per value of this JWT claim (e.g. `sub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
}

/// Where rate-limit counters live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RateLimitScope {
    Local,
    Redis,
}

/// Authorization.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.opa) || (has(self.rules) && size(self.rules) > 0)",
    "message": "authorization needs opa or at least one rule"
}]))]
pub struct Authorization {
    /// An OPA policy compiled to Wasm, evaluated with the request and the token's claims as input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opa: Option<OpaPolicy>,
    /// Role rules, checked in order; the first whose match applies decides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RoleRule>,
    /// Decision when no rule matches. Defaults to `deny`.
    #[serde(default)]
    pub default_action: DefaultAction,
}

/// An OPA Wasm bundle in a ConfigMap.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OpaPolicy {
    /// ConfigMap holding the compiled policy (`opa build -t wasm`) in `binaryData`.
    pub config_map_name: String,
    /// Key in the ConfigMap. Defaults to `policy.wasm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Entrypoint, e.g. `httpapi/authz/allow`.
    pub entrypoint: String,
}

/// A role rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleRule {
    /// Path prefix the rule covers. Defaults to every path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = "^/"))]
    pub path_prefix: Option<String>,
    /// Methods the rule covers. Empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<HttpMethod>,
    /// Roles of which the caller needs at least one.
    #[schemars(length(min = 1))]
    pub roles: Vec<String>,
    /// Claim holding the caller's roles. Defaults to `roles`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
}

/// Decision when nothing matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DefaultAction {
    #[default]
    Deny,
    Allow,
}

impl Policy for AuthPolicy {
    fn target_refs(&self) -> &[PolicyTargetRef] {
        &self.spec.target_refs
    }

    fn set_target_refs(&mut self, refs: Vec<PolicyTargetRef>) {
        self.spec.target_refs = refs;
    }

    fn rule_violations(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let secret = self.spec.oidc.as_ref().map(|o| &o.client_secret);
        if let Some(Err(message)) = secret.map(crate::validate::value_source) {
            out.push(("spec.oidc.clientSecret".to_string(), message));
        }
        for (i, issuer) in self.spec.jwt.iter().flat_map(|j| j.issuers.iter()).enumerate() {
            let urls = [("issuer", Some(&issuer.issuer)), ("jwksUri", issuer.jwks_uri.as_ref())];
            for (field, url) in urls {
                if let Some(Err(message)) = url.map(|u| crate::validate::HttpUrl::parse(u)) {
                    out.push((format!("spec.jwt.issuers[{i}].{field}"), message));
                }
            }
        }
        out
    }

    fn policy_status(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }

    fn conflict_key(&self, target: &PolicyTargetRef) -> String {
        section_key(target)
    }

    fn not_enforced_fields(&self) -> Vec<&'static str> {
        // JWT is enforced; the other kinds land one by one.
        let mut fields = Vec::new();
        let spec = &self.spec;
        if spec.oidc.is_some() {
            fields.push("spec.oidc");
        }
        if spec.api_keys.is_some() {
            fields.push("spec.apiKeys");
        }
        if !spec.rate_limits.is_empty() {
            fields.push("spec.rateLimits");
        }
        if spec.authorization.is_some() {
            fields.push("spec.authorization");
        }
        fields
    }

    fn validate_against(&self, middleware: &crate::Middleware) -> Result<(), String> {
        let has_redis = middleware.spec.connections.redis.is_some();
        if let Some(limit) = self.spec.rate_limits.iter().find(|l| l.scope == Some(RateLimitScope::Redis))
            && !has_redis
        {
            return Err(crate::policy::needs_connection(
                &format!("rate limit {:?} (scope redis)", limit.name),
                "redis",
                middleware,
            ));
        }
        if let Some(oidc) = &self.spec.oidc
            && oidc.session.store == Some(SessionStoreKind::Redis)
            && !has_redis
        {
            return Err(crate::policy::needs_connection("oidc.session.store redis", "redis", middleware));
        }
        Ok(())
    }

    fn secret_key_refs(&self) -> Vec<(&'static str, &crate::SecretKeyRef)> {
        let oidc = self.spec.oidc.as_ref().and_then(|o| o.client_secret.secret_key_ref.as_ref());
        oidc.map(|r| ("spec.oidc.clientSecret", r)).into_iter().collect()
    }

    fn secret_names(&self) -> Vec<(&'static str, &str)> {
        self.spec.api_keys.iter().map(|k| ("spec.apiKeys.secretName", k.secret_name.as_str())).collect()
    }
}
