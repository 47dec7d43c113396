//! Checking a bearer token (RFC 7519, with the practices of RFC 8725): the application, not the token,
//! picks the algorithm; each key checks one algorithm family (or the one its JWK names); `exp`, `iss` and
//! `aud` are required, `nbf` is honoured, all with the issuer's leeway; the `typ` header keeps ID and
//! logout tokens out; header parameters that point at other keys (`jku`, `x5u`, `jwk`, `x5c`) are refused,
//! never followed, and so is any `crit` (no extension is understood). Why a token was refused goes to the
//! log and a metric, never to the client.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::jwks::{Issuer, MAX_KID};

/// The longest token checked.
pub const MAX_TOKEN: usize = 8 * 1024;

/// Why a token was refused: a bounded label for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    TooLarge,
    Malformed,
    /// A header parameter that names another key (`jku`, `x5u`, `jwk`), or a `kid` too long to be one.
    Header,
    Algorithm,
    Type,
    Issuer,
    UnknownKey,
    Signature,
    Expired,
    NotYetValid,
    Audience,
    Claims,
}

impl Reject {
    pub fn label(self) -> &'static str {
        match self {
            Reject::TooLarge => "too_large",
            Reject::Malformed => "malformed",
            Reject::Header => "header",
            Reject::Algorithm => "algorithm",
            Reject::Type => "type",
            Reject::Issuer => "issuer",
            Reject::UnknownKey => "unknown_key",
            Reject::Signature => "signature",
            Reject::Expired => "expired",
            Reject::NotYetValid => "not_yet_valid",
            Reject::Audience => "audience",
            Reject::Claims => "claims",
        }
    }

    pub const ALL: [Reject; 12] = [
        Reject::TooLarge,
        Reject::Malformed,
        Reject::Header,
        Reject::Algorithm,
        Reject::Type,
        Reject::Issuer,
        Reject::UnknownKey,
        Reject::Signature,
        Reject::Expired,
        Reject::NotYetValid,
        Reject::Audience,
        Reject::Claims,
    ];
}

/// What one trusted issuer's tokens must satisfy.
pub struct Trusted {
    pub issuer: Arc<Issuer>,
    pub audiences: Vec<String>,
    pub leeway: Duration,
    pub algorithms: Vec<Algorithm>,
    /// Lower case, without `application/`.
    pub token_types: Vec<String>,
}

/// The verified claims of a token.
pub type Claims = Map<String, Value>;

/// Checks `token` against the issuers of one policy.
pub async fn verify(trusted: &[Trusted], token: &str) -> Result<Claims, Reject> {
    if token.len() > MAX_TOKEN {
        return Err(Reject::TooLarge);
    }
    // A JWS in compact form: three segments (a five-segment JWE is not a signed token).
    if token.bytes().filter(|b| *b == b'.').count() != 2 {
        return Err(Reject::Malformed);
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| unparsed_header(token))?;
    if header.jku.is_some() || header.x5u.is_some() || header.jwk.is_some() || header.x5c.is_some() {
        return Err(Reject::Header);
    }
    // No extension is understood, so none may be critical (RFC 7515 §4.1.11).
    if header.crit.is_some() {
        return Err(Reject::Header);
    }
    if header.kid.as_ref().is_some_and(|k| k.len() > MAX_KID) {
        return Err(Reject::Header);
    }
    let typ = normalise_type(header.typ.as_deref().unwrap_or("JWT"));
    // With one issuer, `decode` checks `iss`; with several, the unverified `iss` picks which one to check
    // against (only a hint until the signature and `iss` are checked), at the cost of a second parse.
    let trusted = match trusted {
        [one] => one,
        _ => {
            let named: Claims =
                jsonwebtoken::dangerous::insecure_decode_claims(token).map_err(|_| Reject::Malformed)?;
            let Some(iss) = named.get("iss").and_then(Value::as_str) else { return Err(Reject::Claims) };
            trusted.iter().find(|t| t.issuer.source.issuer == iss).ok_or(Reject::Issuer)?
        }
    };
    if !trusted.algorithms.contains(&header.alg) {
        return Err(Reject::Algorithm);
    }
    if !trusted.token_types.contains(&typ) {
        return Err(Reject::Type);
    }
    let keys = trusted.issuer.candidates(header.kid.as_deref(), header.alg).await;
    if keys.is_empty() {
        return Err(Reject::UnknownKey);
    }
    let mut validation = Validation::new(header.alg);
    validation.leeway = trusted.leeway.as_secs();
    validation.validate_nbf = true;
    validation.set_issuer(&[trusted.issuer.source.issuer.as_str()]);
    validation.set_audience(&trusted.audiences);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    let mut last = Reject::Signature;
    for key in keys {
        match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
            Ok(data) => return Ok(data.claims),
            Err(error) => {
                last = match error.kind() {
                    ErrorKind::InvalidSignature => Reject::Signature,
                    ErrorKind::ExpiredSignature => Reject::Expired,
                    ErrorKind::ImmatureSignature => Reject::NotYetValid,
                    ErrorKind::InvalidIssuer => Reject::Issuer,
                    ErrorKind::InvalidAudience => Reject::Audience,
                    ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => Reject::Algorithm,
                    ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => Reject::Claims,
                    _ => Reject::Malformed,
                };
                // Only a bad signature may be another key's: anything else is the token's own fault.
                if last != Reject::Signature {
                    return Err(last);
                }
            }
        }
    }
    Err(last)
}

/// Why a header that does not parse was refused: an `alg` that names no algorithm (`none` in any casing,
/// or a made-up one) is told apart from a header that is not JSON.
fn unparsed_header(token: &str) -> Reject {
    let segment = token.split('.').next().unwrap_or_default();
    let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(segment) else { return Reject::Malformed };
    match serde_json::from_slice::<Value>(&json) {
        Ok(Value::Object(header)) if header.get("alg").is_some_and(Value::is_string) => Reject::Algorithm,
        _ => Reject::Malformed,
    }
}

/// A `typ` value as compared: lower case, without the `application/` prefix (RFC 7515 §4.1.9).
pub fn normalise_type(typ: &str) -> String {
    let lower = typ.trim().to_ascii_lowercase();
    lower.strip_prefix("application/").map(str::to_string).unwrap_or(lower)
}
