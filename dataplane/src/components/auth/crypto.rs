//! The signature algorithms behind `jsonwebtoken`, on `ring` (the library the TLS stack already uses):
//! one cryptography implementation in the binary, RSA keys held to 2048–8192 bits by ring itself.

use std::sync::Once;

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::signature::{self as sig, UnparsedPublicKey};
use ring::{hmac, rand};

static PROVIDER: CryptoProvider =
    CryptoProvider { signer_factory: signer, verifier_factory: verifier, key_utils: KeyUtils::new_unimplemented() };

/// Makes this provider the process's: call before the first token is checked or made. Idempotent.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Another provider installed first (only a test would) serves as well.
        let _ = PROVIDER.install_default();
    });
}

fn rsa_params(algorithm: Algorithm) -> Option<&'static sig::RsaParameters> {
    Some(match algorithm {
        Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

fn hmac_algorithm(algorithm: Algorithm) -> Option<hmac::Algorithm> {
    match algorithm {
        Algorithm::HS256 => Some(hmac::HMAC_SHA256),
        Algorithm::HS384 => Some(hmac::HMAC_SHA384),
        Algorithm::HS512 => Some(hmac::HMAC_SHA512),
        _ => None,
    }
}

enum Public {
    RsaComponents { n: Vec<u8>, e: Vec<u8>, params: &'static sig::RsaParameters },
    Unparsed(UnparsedPublicKey<Vec<u8>>),
    Hmac(hmac::Key),
}

struct Verifier {
    algorithm: Algorithm,
    key: Public,
}

impl signature::Verifier<Vec<u8>> for Verifier {
    fn verify(&self, message: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        let ok = match &self.key {
            Public::RsaComponents { n, e, params } => {
                sig::RsaPublicKeyComponents { n, e }.verify(params, message, signature).is_ok()
            }
            Public::Unparsed(key) => key.verify(message, signature).is_ok(),
            Public::Hmac(key) => hmac::verify(key, message, signature).is_ok(),
        };
        if ok { Ok(()) } else { Err(signature::Error::new()) }
    }
}

impl JwtVerifier for Verifier {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

/// A verifier for `algorithm`, only with a key of the same family (an RSA key never checks an HMAC).
fn verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    let algorithm = *algorithm;
    if key.family() != algorithm.family() {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    let public = match (algorithm, key.kind()) {
        (a, DecodingKeyKind::RsaModulusExponent { n, e }) => {
            let params = rsa_params(a).ok_or(ErrorKind::InvalidAlgorithm)?;
            Public::RsaComponents { n: n.clone(), e: e.clone(), params }
        }
        (a, DecodingKeyKind::SecretOrDer(bytes)) => {
            if let Some(h) = hmac_algorithm(a) {
                Public::Hmac(hmac::Key::new(h, bytes))
            } else {
                let algorithm: &'static dyn sig::VerificationAlgorithm = match a {
                    Algorithm::ES256 => &sig::ECDSA_P256_SHA256_FIXED,
                    Algorithm::ES384 => &sig::ECDSA_P384_SHA384_FIXED,
                    Algorithm::EdDSA => &sig::ED25519,
                    other => rsa_params(other).ok_or(ErrorKind::InvalidAlgorithm)?,
                };
                Public::Unparsed(UnparsedPublicKey::new(algorithm, bytes.clone()))
            }
        }
    };
    Ok(Box::new(Verifier { algorithm, key: public }))
}

enum Private {
    Rsa(sig::RsaKeyPair, &'static dyn sig::RsaEncoding),
    Ecdsa(sig::EcdsaKeyPair),
    Ed25519(sig::Ed25519KeyPair),
    Hmac(hmac::Key),
}

struct Signer {
    algorithm: Algorithm,
    key: Private,
}

impl signature::Signer<Vec<u8>> for Signer {
    fn try_sign(&self, message: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let random = rand::SystemRandom::new();
        match &self.key {
            Private::Rsa(pair, padding) => {
                let mut out = vec![0; pair.public().modulus_len()];
                pair.sign(*padding, &random, message, &mut out).map_err(|_| signature::Error::new())?;
                Ok(out)
            }
            Private::Ecdsa(pair) => {
                pair.sign(&random, message).map(|s| s.as_ref().to_vec()).map_err(|_| signature::Error::new())
            }
            Private::Ed25519(pair) => Ok(pair.sign(message).as_ref().to_vec()),
            Private::Hmac(key) => Ok(hmac::sign(key, message).as_ref().to_vec()),
        }
    }
}

impl JwtSigner for Signer {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

/// A signer: RSA keys as PKCS#1 or PKCS#8 DER, EC and Ed25519 keys as PKCS#8 DER, HMAC keys as bytes.
fn signer(algorithm: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    let algorithm = *algorithm;
    if key.family() != algorithm.family() {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    let der = key.as_bytes();
    let rejected = |_| Error::from(ErrorKind::InvalidKeyFormat);
    let private = match algorithm {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            Private::Hmac(hmac::Key::new(hmac_algorithm(algorithm).ok_or(ErrorKind::InvalidAlgorithm)?, der))
        }
        Algorithm::ES256 | Algorithm::ES384 => {
            let curve = if algorithm == Algorithm::ES256 {
                &sig::ECDSA_P256_SHA256_FIXED_SIGNING
            } else {
                &sig::ECDSA_P384_SHA384_FIXED_SIGNING
            };
            Private::Ecdsa(sig::EcdsaKeyPair::from_pkcs8(curve, der, &rand::SystemRandom::new()).map_err(rejected)?)
        }
        Algorithm::EdDSA => Private::Ed25519(sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(rejected)?),
        rsa => {
            let padding: &'static dyn sig::RsaEncoding = match rsa {
                Algorithm::RS256 => &sig::RSA_PKCS1_SHA256,
                Algorithm::RS384 => &sig::RSA_PKCS1_SHA384,
                Algorithm::RS512 => &sig::RSA_PKCS1_SHA512,
                Algorithm::PS256 => &sig::RSA_PSS_SHA256,
                Algorithm::PS384 => &sig::RSA_PSS_SHA384,
                _ => &sig::RSA_PSS_SHA512,
            };
            let pair =
                sig::RsaKeyPair::from_pkcs8(der).or_else(|_| sig::RsaKeyPair::from_der(der)).map_err(rejected)?;
            Private::Rsa(pair, padding)
        }
    };
    Ok(Box::new(Signer { algorithm, key: private }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Header, Validation, decode, encode};

    #[test]
    fn hmac_round_trips_and_an_rsa_key_never_checks_an_hmac() {
        install();
        let claims = serde_json::json!({"sub": "a", "exp": 4_000_000_000u64});
        let token = encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(b"k").unwrap()).unwrap();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_aud = false;
        let ok = decode::<serde_json::Value>(&token, &DecodingKey::from_secret(b"k").unwrap(), &validation);
        assert_eq!(ok.unwrap().claims["sub"], "a");
        let wrong = decode::<serde_json::Value>(&token, &DecodingKey::from_secret(b"x").unwrap(), &validation);
        assert_eq!(wrong.unwrap_err().kind(), &ErrorKind::InvalidSignature);
        // The RSA "public key" bytes as an HMAC secret: refused by family before any HMAC is computed.
        let rsa = DecodingKey::from_rsa_der(b"k");
        assert!(verifier(&Algorithm::HS256, &rsa).is_err());
    }

    #[test]
    fn ecdsa_round_trips_and_an_all_zero_signature_is_refused() {
        install();
        let random = rand::SystemRandom::new();
        let pkcs8 = sig::EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, &random).unwrap();
        let pair =
            sig::EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &random).unwrap();
        use ring::signature::KeyPair as _;
        let point = pair.public_key().as_ref();
        let b64 = |b: &[u8]| {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        };
        let key = DecodingKey::from_ec_components(&b64(&point[1..33]), &b64(&point[33..])).unwrap();
        let claims = serde_json::json!({"sub": "a", "exp": 4_000_000_000u64});
        let token = encode(&Header::new(Algorithm::ES256), &claims, &EncodingKey::from_ec_der(pkcs8.as_ref())).unwrap();
        let mut validation = Validation::new(Algorithm::ES256);
        validation.validate_aud = false;
        assert!(decode::<serde_json::Value>(&token, &key, &validation).is_ok());
        let (message, _) = token.rsplit_once('.').unwrap();
        let zero = format!("{message}.{}", b64(&[0u8; 64]));
        assert_eq!(
            decode::<serde_json::Value>(&zero, &key, &validation).unwrap_err().kind(),
            &ErrorKind::InvalidSignature
        );
    }
}
