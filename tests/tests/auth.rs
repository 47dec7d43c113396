//! JWT authentication against a real OpenID provider (oidc-provider from npm, tests/idp/) and an attack
//! table against a key server the test controls: every forged, misdirected or stale token is answered
//! 401 with `WWW-Authenticate: Bearer error="invalid_token"`, for the reason the metric names, and never
//! reaches the upstream.

#[path = "../../dataplane/tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::routing::get as route_get;
use base64::Engine as _;
use bytes::Bytes;
use http::{Method, StatusCode};
use ring::{hmac, rand, signature};
use serde_json::{Value, json};
use support::{Gateway, Upstream, eventually, send};
use umw_tests::IdentityProvider;
use umw_tests::idp::{KeyType, SigningKey, make_key};

const AUDIENCE: &str = "urn:umw:api";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A compact JWS of these exact header and claims, signed by `sign` over `header.claims`.
fn jws(header: &Value, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let message = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let signature = sign(message.as_bytes());
    format!("{message}.{}", b64(&signature))
}

fn rs256(key: &SigningKey) -> impl Fn(&[u8]) -> Vec<u8> + '_ {
    move |message| {
        let pair = signature::RsaKeyPair::from_pkcs8(&key.pkcs8).expect("an RSA key");
        let mut out = vec![0; pair.public().modulus_len()];
        pair.sign(&signature::RSA_PKCS1_SHA256, &rand::SystemRandom::new(), message, &mut out).expect("signing");
        out
    }
}

/// RS256 with `openssl dgst` (ring refuses to sign with an RSA key under 2048 bits).
fn rs256_openssl(key: &SigningKey) -> impl Fn(&[u8]) -> Vec<u8> + '_ {
    move |message| {
        use std::io::Write as _;
        let der = key.private_jwk.with_extension("der");
        let mut child = std::process::Command::new("openssl")
            .args(["dgst", "-sha256", "-keyform", "DER", "-sign"])
            .arg(&der)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("openssl (make testenv installs it)");
        child.stdin.take().unwrap().write_all(message).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "openssl dgst -sign failed");
        out.stdout
    }
}

fn es256(key: &SigningKey) -> impl Fn(&[u8]) -> Vec<u8> + '_ {
    move |message| {
        let random = rand::SystemRandom::new();
        let pair =
            signature::EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &key.pkcs8, &random)
                .expect("an EC key");
        pair.sign(&random, message).expect("signing").as_ref().to_vec()
    }
}

fn hs256(secret: &[u8]) -> impl Fn(&[u8]) -> Vec<u8> + '_ {
    move |message| hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), message).as_ref().to_vec()
}

/// A key server the test controls: discovery and a JWKS document, counting the JWKS fetches.
struct KeyServer {
    issuer: String,
    keys: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct KeyState {
    issuer: String,
    keys: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
}

impl KeyServer {
    async fn start(keys: Vec<Value>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let keys = Arc::new(Mutex::new(json!({ "keys": keys })));
        let fetches = Arc::new(AtomicUsize::new(0));
        let state = KeyState { issuer: issuer.clone(), keys: keys.clone(), fetches: fetches.clone() };
        let app = Router::new()
            .route(
                "/.well-known/openid-configuration",
                route_get(|State(s): State<KeyState>| async move {
                    axum::Json(json!({ "issuer": s.issuer, "jwks_uri": format!("{}/jwks", s.issuer) }))
                }),
            )
            .route(
                "/jwks",
                route_get(|State(s): State<KeyState>| async move {
                    s.fetches.fetch_add(1, Ordering::SeqCst);
                    axum::Json(s.keys.lock().unwrap().clone())
                }),
            )
            .with_state(state);
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { issuer, keys, fetches, task }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for KeyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A Middleware with one route to `upstream` and an AuthPolicy trusting `issuers` (YAML list items).
fn config(upstream: &Upstream, issuers: &str, optional: bool) -> String {
    format!(
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: shop, namespace: auth}}\nspec:\n  routes:\n    - name: api\n      match: {{pathPrefix: /}}\n      upstream: {{url: '{}'}}\n---\napiVersion: umw.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {{name: api-auth, namespace: auth}}\nspec:\n  targetRefs: [{{name: shop}}]\n  jwt:\n    optional: {optional}\n    issuers:\n{issuers}    claimsToHeaders:\n      - {{claim: sub, header: x-user}}\n      - {{claim: roles, header: x-roles}}\n",
        upstream.url()
    )
}

async fn call(gw: &Gateway, headers: &[(&str, &str)]) -> support::Reply {
    send(Method::GET, &gw.url("/echo"), headers, Bytes::new()).await
}

async fn with_token(gw: &Gateway, token: &str) -> support::Reply {
    call(gw, &[("authorization", &format!("Bearer {token}"))]).await
}

fn challenge(reply: &support::Reply) -> &str {
    reply.headers.get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or("")
}

#[tokio::test]
async fn a_token_from_the_provider_reaches_the_upstream_with_its_claims_and_nothing_else_does() {
    let dir = tempdir();
    let key = make_key(&dir, "k1", KeyType::Rsa);
    let idp = IdentityProvider::start(&[&key]);
    let upstream = Upstream::start("api").await;
    let issuers = format!("      - {{issuer: '{}', audiences: ['{AUDIENCE}']}}\n", idp.issuer());
    let gw = Gateway::start(&config(&upstream, &issuers, false)).await;

    let token = idp.client_token().await;
    let reply = call(&gw, &[("authorization", &format!("Bearer {token}")), ("x-user", "admin")]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = reply.json();
    // The claims, not the client's own copy of the header.
    assert_eq!(seen["headers"]["x-user"], "svc");
    assert_eq!(seen["headers"]["x-roles"], r#"["reader"]"#);
    // The token itself goes on to the upstream, which may check it again.
    assert_eq!(seen["headers"]["authorization"], format!("Bearer {token}"));

    // No token: a challenge without an error (RFC 6750 §3.1), and the upstream never asked.
    let hits = upstream.hits();
    let missing = call(&gw, &[("x-user", "admin")]).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(challenge(&missing), "Bearer");
    assert_eq!(missing.json()["type"], "https://umw.dev/problems/unauthenticated");
    let basic = call(&gw, &[("authorization", "Basic c3ZjOnN2Yy1zZWNyZXQ=")]).await;
    assert_eq!((basic.status, challenge(&basic)), (StatusCode::UNAUTHORIZED, "Bearer"));

    // A token that is not one, a tampered one, two Authorization headers, an empty bearer.
    let (message, sig) = token.rsplit_once('.').unwrap();
    let tampered = format!("{message}.{}{}", if sig.starts_with('A') { "B" } else { "A" }, &sig[1..]);
    let bad: Vec<Vec<(&str, String)>> = vec![
        vec![("authorization", "Bearer not-a-jwt".into())],
        vec![("authorization", format!("Bearer {tampered}"))],
        vec![("authorization", format!("Bearer {token}")), ("authorization", format!("Bearer {token}"))],
        vec![("authorization", "Bearer ".into())],
    ];
    for headers in &bad {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let reply = call(&gw, &headers).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(challenge(&reply), r#"Bearer error="invalid_token""#, "{headers:?}");
        // The same words whatever the reason: nothing to tune a forgery by.
        assert_eq!(reply.json()["detail"], "The bearer token is not valid.");
    }
    assert_eq!(upstream.hits(), hits, "a refused request reached the upstream");

    assert_eq!(gw.metric("umw_auth_decisions_total", &["outcome=\"allowed\"", "policy=\"api-auth\""]).await, 1.0);
    assert_eq!(gw.metric("umw_auth_decisions_total", &["outcome=\"missing\""]).await, 2.0);
    assert_eq!(gw.metric("umw_auth_decisions_total", &["outcome=\"invalid\""]).await, 4.0);
    assert_eq!(gw.metric("umw_auth_jwt_rejections_total", &["reason=\"signature\""]).await, 1.0);
    assert!(gw.metric("umw_auth_jwks_fetches_total", &["outcome=\"ok\""]).await >= 1.0);
}

#[tokio::test]
async fn an_optional_policy_lets_anonymous_requests_through_but_not_bad_tokens() {
    let dir = tempdir();
    let key = make_key(&dir, "k1", KeyType::Rsa);
    let idp = IdentityProvider::start(&[&key]);
    let upstream = Upstream::start("api").await;
    let issuers = format!("      - {{issuer: '{}', audiences: ['{AUDIENCE}']}}\n", idp.issuer());
    let gw = Gateway::start(&config(&upstream, &issuers, true)).await;

    let anonymous = call(&gw, &[("x-user", "admin")]).await;
    assert_eq!(anonymous.status, StatusCode::OK);
    assert!(anonymous.json()["headers"].get("x-user").is_none(), "the client's x-user reached the upstream");
    let bad = with_token(&gw, "a.b.c").await;
    assert_eq!((bad.status, challenge(&bad)), (StatusCode::UNAUTHORIZED, r#"Bearer error="invalid_token""#));
    let good = with_token(&gw, &idp.client_token().await).await;
    assert_eq!(good.json()["headers"]["x-user"], "svc");
    assert_eq!(gw.metric("umw_auth_decisions_total", &["outcome=\"anonymous\""]).await, 1.0);
}

/// Old tokens stay valid while their key is published; tokens signed with a new key work at once; a key
/// that left the set stops working once the set is fetched again; the provider down changes nothing.
#[tokio::test]
async fn keys_rotate_with_an_overlap_and_survive_the_provider_going_away() {
    let dir = tempdir();
    let (k1, k2) = (make_key(&dir, "k1", KeyType::Rsa), make_key(&dir, "k2", KeyType::Rsa));
    let mut idp = IdentityProvider::start(&[&k1]);
    let upstream = Upstream::start("api").await;
    let issuers =
        format!("      - {{issuer: '{}', audiences: ['{AUDIENCE}'], jwksRefreshInterval: 5s}}\n", idp.issuer());
    let gw = Gateway::start(&config(&upstream, &issuers, false)).await;
    let old = idp.client_token().await;
    assert_eq!(with_token(&gw, &old).await.status, StatusCode::OK);

    // The new key published beside the old one, and signing.
    idp.restart(&[&k2, &k1]);
    let new = idp.client_token().await;
    let new_header = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(new.split('.').next().unwrap()).unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&new_header).unwrap()["kid"], "k2", "not signed by the new key");
    // An unknown kid is fetched for at once, or after the cooldown if a fetch just happened.
    eventually("the token signed with the new key accepted", Duration::from_secs(15), || async {
        with_token(&gw, &new).await.status == StatusCode::OK
    })
    .await;
    assert_eq!(with_token(&gw, &old).await.status, StatusCode::OK, "the old key is still published");

    // The old key withdrawn: its tokens stop working once the set is refreshed.
    idp.restart(&[&k2]);
    eventually("the token of the withdrawn key refused", Duration::from_secs(20), || async {
        with_token(&gw, &old).await.status == StatusCode::UNAUTHORIZED
    })
    .await;
    assert_eq!(with_token(&gw, &new).await.status, StatusCode::OK);

    // The provider unreachable: the keys held stay in use, and the failed fetches are counted.
    idp.stop();
    // (A set is refreshed when a request finds it older than the interval.)
    eventually("a failed JWKS fetch counted", Duration::from_secs(20), || async {
        assert_eq!(with_token(&gw, &new).await.status, StatusCode::OK, "the held keys were dropped");
        gw.metric("umw_auth_jwks_fetches_total", &["outcome=\"error\""]).await >= 1.0
    })
    .await;
    assert_eq!(with_token(&gw, &new).await.status, StatusCode::OK, "the held keys were dropped");
}

/// Every forged or misused token of the table is refused with 401, for the reason named.
#[tokio::test]
async fn the_attack_table_is_refused() {
    let dir = tempdir();
    let rsa = make_key(&dir, "rsa", KeyType::Rsa);
    let ec = make_key(&dir, "ec", KeyType::EcP256);
    let weak = make_key(&dir, "weak", KeyType::Rsa1024);
    let attacker = make_key(&dir, "attacker", KeyType::Rsa);
    let server = KeyServer::start(vec![rsa.public_jwk.clone(), ec.public_jwk.clone(), weak.public_jwk.clone()]).await;
    let upstream = Upstream::start("api").await;
    let issuers = format!("      - {{issuer: '{}', audiences: ['{AUDIENCE}']}}\n", server.issuer);
    let gw = Gateway::start(&config(&upstream, &issuers, false)).await;

    let iss = server.issuer.as_str();
    let claims = json!({"iss": iss, "sub": "alice", "aud": AUDIENCE, "exp": now() + 300, "iat": now()});
    let with = |changes: Value| {
        let mut c = claims.clone();
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let header = |alg: &str, kid: &str| json!({"alg": alg, "typ": "at+jwt", "kid": kid});

    // Controls: the same construction with nothing wrong is accepted, with either key.
    for token in [jws(&header("RS256", "rsa"), &claims, rs256(&rsa)), jws(&header("ES256", "ec"), &claims, es256(&ec))]
    {
        let reply = with_token(&gw, &token).await;
        assert_eq!(reply.status, StatusCode::OK, "control token refused: {}", reply.text());
        assert_eq!(reply.json()["headers"]["x-user"], "alice");
    }
    let hits = upstream.hits();

    let rsa_public = rsa.public_jwk.to_string();
    let mut deep = String::new();
    for _ in 0..1500 {
        deep.push('[');
    }
    for _ in 0..1500 {
        deep.push(']');
    }
    // Built as text: serde_json would refuse to build (or print) claims nested this deep.
    let deep_claims = {
        let text = claims.to_string();
        format!("{},\"deep\":{deep}}}", &text[..text.len() - 1])
    };
    let raw = |header: &Value, claims_text: &str, sign: &dyn Fn(&[u8]) -> Vec<u8>| {
        let message = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims_text.as_bytes()));
        format!("{message}.{}", b64(&sign(message.as_bytes())))
    };
    let unsigned = |alg: &str| {
        let h = json!({"alg": alg, "typ": "at+jwt", "kid": "rsa"});
        format!("{}.{}.", b64(h.to_string().as_bytes()), b64(claims.to_string().as_bytes()))
    };
    let zero_es = {
        let t = jws(&header("ES256", "ec"), &claims, es256(&ec));
        format!("{}.{}", t.rsplit_once('.').unwrap().0, b64(&[0u8; 64]))
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("alg none", unsigned("none"), "algorithm"),
        ("alg made up", unsigned("RS257"), "algorithm"),
        ("alg None", unsigned("None"), "algorithm"),
        ("alg NONE", unsigned("NONE"), "algorithm"),
        ("alg nOnE", unsigned("nOnE"), "algorithm"),
        ("alg none with a signature", format!("{}{}", unsigned("none"), b64(&rs256(&rsa)(b"x"))), "algorithm"),
        (
            "HS256 keyed with the RSA public JWK",
            jws(&header("HS256", "rsa"), &claims, hs256(rsa_public.as_bytes())),
            "algorithm",
        ),
        (
            "HS256 keyed with the RSA modulus",
            jws(&header("HS256", "rsa"), &claims, hs256(rsa.public_jwk["n"].as_str().unwrap().as_bytes())),
            "algorithm",
        ),
        ("ES256 naming the RSA key", jws(&header("ES256", "rsa"), &claims, es256(&ec)), "unknown_key"),
        ("RS256 naming the EC key", jws(&header("RS256", "ec"), &claims, rs256(&rsa)), "unknown_key"),
        ("PS256 naming a key published for RS256", jws(&header("PS256", "rsa"), &claims, rs256(&rsa)), "unknown_key"),
        ("an all-zero ES256 signature", zero_es, "signature"),
        ("an unknown kid", jws(&header("RS256", "nobody"), &claims, rs256(&rsa)), "unknown_key"),
        (
            "a kid with path traversal",
            jws(&header("RS256", "../../../../etc/passwd"), &claims, rs256(&rsa)),
            "unknown_key",
        ),
        ("a kid of 1000 characters", jws(&header("RS256", &"k".repeat(1000)), &claims, rs256(&rsa)), "header"),
        (
            "jku naming the attacker's key set",
            jws(
                &json!({"alg": "RS256", "typ": "at+jwt", "kid": "attacker", "jku": format!("{iss}/jwks")}),
                &claims,
                rs256(&attacker),
            ),
            "header",
        ),
        (
            "x5u",
            jws(
                &json!({"alg": "RS256", "typ": "at+jwt", "kid": "rsa", "x5u": format!("{iss}/cert.pem")}),
                &claims,
                rs256(&attacker),
            ),
            "header",
        ),
        (
            "an embedded jwk",
            jws(&json!({"alg": "RS256", "typ": "at+jwt", "jwk": attacker.public_jwk}), &claims, rs256(&attacker)),
            "header",
        ),
        (
            "the attacker's key under a trusted kid",
            jws(&header("RS256", "rsa"), &claims, rs256(&attacker)),
            "signature",
        ),
        (
            "an unknown crit",
            jws(
                &json!({"alg": "RS256", "typ": "at+jwt", "kid": "rsa", "crit": ["urn:x"], "urn:x": true}),
                &claims,
                rs256(&rsa),
            ),
            "header",
        ),
        (
            "an embedded certificate chain (x5c)",
            jws(&json!({"alg": "RS256", "typ": "at+jwt", "kid": "rsa", "x5c": ["MIIB"]}), &claims, rs256(&attacker)),
            "header",
        ),
        ("a header that is not JSON", format!("{}.{}.", b64(b"{alg"), b64(claims.to_string().as_bytes())), "malformed"),
        ("expired", jws(&header("RS256", "rsa"), &with(json!({"exp": now() - 120})), rs256(&rsa)), "expired"),
        (
            "not yet valid",
            jws(&header("RS256", "rsa"), &with(json!({"nbf": now() + 120})), rs256(&rsa)),
            "not_yet_valid",
        ),
        ("without exp", jws(&header("RS256", "rsa"), &with(json!({"exp": null})), rs256(&rsa)), "claims"),
        ("exp as a string", jws(&header("RS256", "rsa"), &with(json!({"exp": "never"})), rs256(&rsa)), "claims"),
        (
            "a wrong iss",
            jws(&header("RS256", "rsa"), &with(json!({"iss": "http://127.0.0.1:1"})), rs256(&rsa)),
            "issuer",
        ),
        (
            "iss with a trailing slash",
            jws(&header("RS256", "rsa"), &with(json!({"iss": format!("{iss}/")})), rs256(&rsa)),
            "issuer",
        ),
        ("without iss", jws(&header("RS256", "rsa"), &with(json!({"iss": null})), rs256(&rsa)), "claims"),
        ("a wrong aud", jws(&header("RS256", "rsa"), &with(json!({"aud": "urn:other"})), rs256(&rsa)), "audience"),
        ("without aud", jws(&header("RS256", "rsa"), &with(json!({"aud": null})), rs256(&rsa)), "claims"),
        (
            "an ID token (typ JWT)",
            jws(&json!({"alg": "RS256", "typ": "JWT", "kid": "rsa"}), &with(json!({"nonce": "n"})), rs256(&rsa)),
            "type",
        ),
        ("a token without typ", jws(&json!({"alg": "RS256", "kid": "rsa"}), &claims, rs256(&rsa)), "type"),
        (
            "a logout token",
            jws(&json!({"alg": "RS256", "typ": "logout+jwt", "kid": "rsa"}), &claims, rs256(&rsa)),
            "type",
        ),
        (
            "an oversized token",
            jws(&header("RS256", "rsa"), &with(json!({"pad": "x".repeat(9000)})), rs256(&rsa)),
            "too_large",
        ),
        ("deeply nested claims", raw(&header("RS256", "rsa"), &deep_claims, &rs256(&rsa)), "malformed"),
        (
            "signed with an RSA-1024 key from the set",
            jws(&header("RS256", "weak"), &claims, rs256_openssl(&weak)),
            "unknown_key",
        ),
        ("a JWE (five segments)", "a.b.c.d.e".to_string(), "malformed"),
    ];
    let mut failures = Vec::new();
    for (name, token, reason) in &cases {
        let before = gw.metric("umw_auth_jwt_rejections_total", &[&format!("reason=\"{reason}\"")]).await;
        let reply = with_token(&gw, token).await;
        let after = gw.metric("umw_auth_jwt_rejections_total", &[&format!("reason=\"{reason}\"")]).await;
        if reply.status != StatusCode::UNAUTHORIZED || challenge(&reply) != r#"Bearer error="invalid_token""# {
            failures.push(format!("{name}: {} {:?}", reply.status, challenge(&reply)));
        } else if after != before + 1.0 {
            failures.push(format!("{name}: refused, but not counted as {reason}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases:\n{}", failures.len(), cases.len(), failures.join("\n"));
    assert_eq!(upstream.hits(), hits, "a refused token reached the upstream");

    // A storm of made-up kids: at most one fetch per cooldown (5 s), however many tokens.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = server.fetches();
    let started = std::time::Instant::now();
    let storm: Vec<String> =
        (0..300).map(|i| jws(&header("RS256", &format!("storm-{i}")), &claims, rs256(&rsa))).collect();
    let gw_ref = &gw;
    let replies = futures::future::join_all(storm.chunks(30).map(|chunk| async move {
        let mut statuses = Vec::new();
        for token in chunk {
            statuses.push(with_token(gw_ref, token).await.status);
        }
        statuses
    }))
    .await;
    let elapsed = started.elapsed();
    assert!(replies.iter().flatten().all(|s| *s == StatusCode::UNAUTHORIZED));
    let fetched = server.fetches() - before;
    let allowed = 1 + (elapsed.as_secs() / 5) as usize;
    assert!(fetched >= 1, "no fetch for an unknown kid");
    assert!(fetched <= allowed, "{fetched} JWKS fetches in {elapsed:?} for 300 random kids (at most {allowed})");

    // And the real keys still work after all that.
    assert_eq!(with_token(&gw, &jws(&header("RS256", "rsa"), &claims, rs256(&rsa))).await.status, StatusCode::OK);
}

/// The JWKS that a server publishes is bounded: a key set over the size limit is refused whole and the
/// keys held stay in use.
#[tokio::test]
async fn an_oversized_key_set_is_refused_and_the_keys_held_stay() {
    let dir = tempdir();
    let rsa = make_key(&dir, "rsa", KeyType::Rsa);
    let server = KeyServer::start(vec![rsa.public_jwk.clone()]).await;
    let upstream = Upstream::start("api").await;
    let issuers =
        format!("      - {{issuer: '{}', audiences: ['{AUDIENCE}'], jwksRefreshInterval: 5s}}\n", server.issuer);
    let gw = Gateway::start(&config(&upstream, &issuers, false)).await;
    let claims = json!({"iss": server.issuer, "sub": "alice", "aud": AUDIENCE, "exp": now() + 300});
    let token = jws(&json!({"alg": "RS256", "typ": "at+jwt", "kid": "rsa"}), &claims, rs256(&rsa));
    assert_eq!(with_token(&gw, &token).await.status, StatusCode::OK);

    let mut huge = vec![rsa.public_jwk.clone()];
    huge.push(json!({"kty": "oct", "kid": "pad", "k": "x".repeat(300 * 1024)}));
    *server.keys.lock().unwrap() = json!({ "keys": huge });
    eventually("the oversized set fetched and refused", Duration::from_secs(20), || async {
        assert_eq!(with_token(&gw, &token).await.status, StatusCode::OK, "the held keys were dropped");
        gw.metric("umw_auth_jwks_fetches_total", &["outcome=\"error\""]).await >= 1.0
    })
    .await;
    assert_eq!(with_token(&gw, &token).await.status, StatusCode::OK, "the held keys were dropped");
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("umw-auth-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
