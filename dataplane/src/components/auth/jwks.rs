//! An issuer's signing keys: found through OIDC discovery or a configured `jwksUri`, fetched when first
//! needed, refreshed every [`REFRESH`] and when a token names a key not in the set (under one fetch at a
//! time, at most once per [`COOLDOWN`], so a storm of made-up `kid`s costs one fetch), and served stale
//! when the issuer cannot be reached. Only public signing keys are kept: no symmetric keys, no
//! encryption keys, no RSA key under 2048 bits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::body::Body;
use base64::Engine as _;
use http_body_util::BodyExt as _;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde_json::Value;

use crate::kernel::net::Clients;

/// How long a key set is used before it is fetched again in the background, unless configured.
pub const REFRESH: Duration = Duration::from_secs(300);
/// The shortest time between two fetches of one issuer's keys.
pub const COOLDOWN: Duration = Duration::from_secs(5);
/// How long a discovery or JWKS request may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest discovery document or key set read.
const MAX_BODY: usize = 256 * 1024;
/// The most keys kept of one set.
const MAX_KEYS: usize = 64;
/// The longest `kid` kept or looked up.
pub const MAX_KID: usize = 256;

/// One verification key.
pub struct Key {
    /// The algorithm the JWK names, which is then the only one it verifies.
    pub algorithm: Option<Algorithm>,
    pub family: AlgorithmFamily,
    pub key: DecodingKey,
}

impl Key {
    /// Whether this key may check a token signed with `algorithm`.
    pub fn fits(&self, algorithm: Algorithm) -> bool {
        self.algorithm.map_or(algorithm.family() == self.family, |a| a == algorithm)
    }
}

/// A parsed key set.
#[derive(Default)]
pub struct KeySet {
    by_kid: HashMap<String, Arc<Key>>,
    /// Keys without a `kid`.
    unnamed: Vec<Arc<Key>>,
}

impl KeySet {
    pub fn len(&self) -> usize {
        self.by_kid.len() + self.unnamed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key a token names, or (for a token without `kid`) the keys that could have signed it.
    pub fn candidates(&self, kid: Option<&str>, algorithm: Algorithm) -> Vec<Arc<Key>> {
        match kid {
            Some(kid) => self.by_kid.get(kid).filter(|k| k.fits(algorithm)).cloned().into_iter().collect(),
            None => {
                self.unnamed.iter().chain(self.by_kid.values()).filter(|k| k.fits(algorithm)).take(4).cloned().collect()
            }
        }
    }

    /// Parses a JWKS document; keys that cannot be used are skipped and named in `skipped`.
    pub fn parse(body: &[u8], skipped: &mut Vec<String>) -> Result<Self, String> {
        let document: Value = serde_json::from_slice(body).map_err(|e| format!("not a JSON key set: {e}"))?;
        let Some(keys) = document.get("keys").and_then(Value::as_array) else {
            return Err("not a key set: no \"keys\" array".into());
        };
        let mut set = KeySet::default();
        for (i, jwk) in keys.iter().enumerate() {
            if set.len() == MAX_KEYS {
                skipped.push(format!("keys after the first {MAX_KEYS}"));
                break;
            }
            let kid = jwk.get("kid").and_then(Value::as_str);
            let name = kid.map_or_else(|| format!("key {i}"), |k| format!("key {:?}", truncate(k)));
            match parse_key(jwk) {
                Ok(key) => match kid {
                    Some(kid) if kid.len() > MAX_KID => skipped.push(format!("{name}: kid longer than {MAX_KID}")),
                    Some(kid) => {
                        set.by_kid.insert(kid.to_string(), Arc::new(key));
                    }
                    None => set.unnamed.push(Arc::new(key)),
                },
                Err(why) => skipped.push(format!("{name}: {why}")),
            }
        }
        Ok(set)
    }
}

fn truncate(s: &str) -> &str {
    let end = s.char_indices().nth(64).map_or(s.len(), |(i, _)| i);
    &s[..end]
}

fn parse_key(jwk: &Value) -> Result<Key, String> {
    let text = |name: &str| jwk.get(name).and_then(Value::as_str);
    if let Some(use_) = text("use")
        && use_ != "sig"
    {
        return Err(format!("use {use_:?} is not \"sig\""));
    }
    if let Some(ops) = jwk.get("key_ops").and_then(Value::as_array)
        && !ops.iter().any(|o| o == "verify")
    {
        return Err("key_ops does not allow \"verify\"".into());
    }
    let algorithm = match text("alg") {
        None => None,
        Some(name) => Some(
            public_algorithm(name)
                .ok_or_else(|| format!("alg {name:?} is not a signature algorithm with a public key"))?,
        ),
    };
    let required = |name: &str| text(name).ok_or_else(|| format!("no {name:?}"));
    let (family, key) = match required("kty")? {
        "RSA" => {
            let n = required("n")?;
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(n.trim_end_matches('='))
                .map_err(|_| "n is not base64url".to_string())?;
            let bits = bytes
                .iter()
                .position(|b| *b != 0)
                .map_or(0, |first| (bytes.len() - first) * 8 - bytes[first].leading_zeros() as usize);
            if bits < 2048 {
                return Err(format!("an RSA key of {bits} bits; at least 2048 are required"));
            }
            let key = DecodingKey::from_rsa_components(n, required("e")?).map_err(|e| format!("RSA key: {e}"))?;
            (AlgorithmFamily::Rsa, key)
        }
        "EC" => {
            let curve = required("crv")?;
            let fits = match curve {
                "P-256" => Algorithm::ES256,
                "P-384" => Algorithm::ES384,
                other => return Err(format!("curve {other:?} is not P-256 or P-384")),
            };
            if algorithm.is_some_and(|a| a != fits) {
                return Err(format!("alg does not match curve {curve}"));
            }
            let key =
                DecodingKey::from_ec_components(required("x")?, required("y")?).map_err(|e| format!("EC key: {e}"))?;
            // The curve decides the one algorithm.
            return Ok(Key { algorithm: Some(fits), family: AlgorithmFamily::Ec, key });
        }
        "OKP" => {
            if required("crv")? != "Ed25519" {
                return Err("an OKP key that is not Ed25519".into());
            }
            let key = DecodingKey::from_ed_components(required("x")?).map_err(|e| format!("Ed25519 key: {e}"))?;
            (AlgorithmFamily::Ed, key)
        }
        "oct" => return Err("a symmetric key (kty oct) is never used to check tokens".into()),
        other => return Err(format!("kty {other:?} is not RSA, EC or OKP")),
    };
    if algorithm.is_some_and(|a| a.family() != family) {
        return Err("alg does not match kty".into());
    }
    Ok(Key { algorithm, family, key })
}

/// The asymmetric JWS algorithm of that name.
pub fn public_algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// Where an issuer's keys come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Source {
    pub issuer: String,
    /// The configured `jwksUri`; without one, discovery finds it.
    pub jwks_uri: Option<String>,
    /// How long a fetched set is used before it is fetched again (at least [`COOLDOWN`]).
    pub refresh: Duration,
}

/// One issuer's keys, shared by every policy and snapshot that trusts it.
pub struct Issuer {
    pub source: Source,
    clients: Clients,
    keys: ArcSwap<KeySet>,
    /// When the keys were last fetched successfully.
    fetched: Mutex<Option<Instant>>,
    /// When a fetch last started.
    attempted: Mutex<Option<Instant>>,
    /// One fetch at a time.
    flight: tokio::sync::Mutex<()>,
    fetches: prometheus::IntCounterVec,
}

impl Issuer {
    pub fn new(source: Source, clients: Clients, fetches: prometheus::IntCounterVec) -> Arc<Self> {
        Arc::new(Self {
            source,
            clients,
            keys: ArcSwap::from_pointee(KeySet::default()),
            fetched: Mutex::new(None),
            attempted: Mutex::new(None),
            flight: tokio::sync::Mutex::new(()),
            fetches,
        })
    }

    /// The keys that may have signed a token with this `kid` and algorithm. A key not in the set is
    /// fetched for (unless a fetch started less than [`COOLDOWN`] ago); an old set is refreshed in the
    /// background.
    pub async fn candidates(self: &Arc<Self>, kid: Option<&str>, algorithm: Algorithm) -> Vec<Arc<Key>> {
        let found = self.keys.load().candidates(kid, algorithm);
        if !found.is_empty() {
            if self.stale() {
                self.refresh_in_background();
            }
            return found;
        }
        // Waits for a fetch under way (the first one, started with the configuration, included).
        let _flight = self.flight.lock().await;
        // Another request may have fetched while this one waited.
        let found = self.keys.load().candidates(kid, algorithm);
        if !found.is_empty() || !self.may_fetch() {
            return found;
        }
        self.fetch().await;
        self.keys.load().candidates(kid, algorithm)
    }

    /// Fetches now unless a fetch is under way (for the first keys, before the first request).
    pub fn prefetch(self: &Arc<Self>) {
        if tokio::runtime::Handle::try_current().is_ok() && self.fetched.lock().map(|f| f.is_none()).unwrap_or(true) {
            self.refresh_in_background();
        }
    }

    fn stale(&self) -> bool {
        self.fetched
            .lock()
            .map(|f| f.is_none_or(|at| at.elapsed() >= self.source.refresh.max(COOLDOWN)))
            .unwrap_or(false)
            && self.may_fetch()
    }

    fn may_fetch(&self) -> bool {
        self.attempted.lock().map(|a| a.is_none_or(|at| at.elapsed() >= COOLDOWN)).unwrap_or(false)
    }

    fn refresh_in_background(self: &Arc<Self>) {
        let issuer = self.clone();
        tokio::spawn(async move {
            if let Ok(_flight) = issuer.flight.try_lock()
                && issuer.may_fetch()
            {
                issuer.fetch().await;
            }
        });
    }

    /// One fetch (the caller holds `flight`). On failure the keys held so far stay in use.
    async fn fetch(&self) {
        if let Ok(mut attempted) = self.attempted.lock() {
            *attempted = Some(Instant::now());
        }
        let issuer = self.source.issuer.as_str();
        match self.fetch_keys().await {
            Ok((set, skipped)) => {
                for why in &skipped {
                    tracing::warn!(issuer, "JWKS: skipped {why}");
                }
                tracing::info!(issuer, keys = set.len(), "JWKS fetched");
                self.keys.store(Arc::new(set));
                if let Ok(mut fetched) = self.fetched.lock() {
                    *fetched = Some(Instant::now());
                }
                self.fetches.with_label_values(&[issuer, "ok"]).inc();
            }
            Err(error) => {
                let held = self.keys.load().len();
                tracing::warn!(issuer, %error, keys_in_use = held, "JWKS fetch failed; the keys held so far stay in use");
                self.fetches.with_label_values(&[issuer, "error"]).inc();
            }
        }
    }

    async fn fetch_keys(&self) -> Result<(KeySet, Vec<String>), String> {
        let uri = match &self.source.jwks_uri {
            Some(uri) => uri.clone(),
            None => self.discover().await?,
        };
        let body = self.get(&uri).await.map_err(|e| format!("{uri}: {e}"))?;
        let mut skipped = Vec::new();
        let set = KeySet::parse(&body, &mut skipped).map_err(|e| format!("{uri}: {e}"))?;
        if set.is_empty() {
            return Err(format!("{uri}: no usable signing key ({})", skipped.join("; ")));
        }
        Ok((set, skipped))
    }

    /// The `jwks_uri` of the issuer's discovery document, whose `issuer` must be the configured one.
    async fn discover(&self) -> Result<String, String> {
        let issuer = &self.source.issuer;
        let uri = format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
        let body = self.get(&uri).await.map_err(|e| format!("discovery {uri}: {e}"))?;
        let document: Value = serde_json::from_slice(&body).map_err(|e| format!("discovery {uri}: not JSON: {e}"))?;
        let named = document.get("issuer").and_then(Value::as_str).unwrap_or("");
        if named != issuer {
            return Err(format!("discovery {uri}: names issuer {named:?}, not {issuer:?}"));
        }
        document
            .get("jwks_uri")
            .and_then(Value::as_str)
            .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
            .map(str::to_string)
            .ok_or_else(|| format!("discovery {uri}: no http(s) jwks_uri"))
    }

    async fn get(&self, uri: &str) -> Result<bytes::Bytes, String> {
        let request = http::Request::get(uri)
            .header(http::header::ACCEPT, "application/json")
            .body(Body::empty())
            .map_err(|e| format!("not a URL: {e}"))?;
        let exchange = async {
            let response = self.clients.http1.request(request).await.map_err(|e| format!("unreachable: {e}"))?;
            if response.status() != http::StatusCode::OK {
                return Err(format!("answered {}", response.status()));
            }
            let body = http_body_util::Limited::new(response.into_body(), MAX_BODY);
            body.collect().await.map(|b| b.to_bytes()).map_err(|e| format!("body: {e} (at most {MAX_BODY} bytes)"))
        };
        tokio::time::timeout(FETCH_TIMEOUT, exchange).await.map_err(|_| format!("no answer in {FETCH_TIMEOUT:?}"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn only_public_signing_keys_of_sound_sizes_are_kept() {
        let n2048 = b64(&[0xC5; 256]);
        let n1024 = b64(&[0xC5; 128]);
        let body = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "good", "n": n2048, "e": "AQAB", "alg": "RS256", "use": "sig"},
            {"kty": "RSA", "kid": "small", "n": n1024, "e": "AQAB"},
            {"kty": "RSA", "kid": "enc", "n": n2048, "e": "AQAB", "use": "enc"},
            {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "ec", "crv": "P-256", "x": b64(&[1; 32]), "y": b64(&[2; 32])},
            {"kty": "EC", "kid": "p521", "crv": "P-521", "x": "AA", "y": "AA"},
            {"kty": "RSA", "kid": "confused", "n": n2048, "e": "AQAB", "alg": "ES256"},
            {"kty": "RSA", "kid": "hs", "n": n2048, "e": "AQAB", "alg": "HS256"},
        ]});
        let mut skipped = Vec::new();
        let set = KeySet::parse(body.to_string().as_bytes(), &mut skipped).unwrap();
        assert_eq!(set.len(), 2, "{skipped:?}");
        assert_eq!(set.candidates(Some("good"), Algorithm::RS256).len(), 1);
        assert!(set.candidates(Some("good"), Algorithm::PS256).is_empty(), "a JWK's alg is the only one it checks");
        assert_eq!(set.candidates(Some("ec"), Algorithm::ES256).len(), 1);
        assert!(set.candidates(Some("ec"), Algorithm::ES384).is_empty());
        assert!(set.candidates(Some("../../etc/passwd"), Algorithm::RS256).is_empty());
        let all = skipped.join("\n");
        for expected in ["1024 bits", "use \"enc\"", "symmetric", "P-521", "alg does not match kty", "HS256"] {
            assert!(all.contains(expected), "{expected}: {all}");
        }
    }

    #[test]
    fn a_document_that_is_not_a_key_set_is_an_error() {
        let mut skipped = Vec::new();
        assert!(KeySet::parse(b"[]", &mut skipped).is_err());
        assert!(KeySet::parse(b"{\"keys\": 1}", &mut skipped).is_err());
        assert!(KeySet::parse(b"not json", &mut skipped).is_err());
    }
}
