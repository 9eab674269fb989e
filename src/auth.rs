//! Who is connecting: JWT verification (HS256 with a shared secret) and the
//! token extraction rules of the protocol (`Authorization: Bearer` header,
//! or the `token` query parameter, since browsers cannot set headers on a
//! WebSocket). Tokens are never logged.
//!
//! Whether that user may receive a scope's events is not decided here but
//! in the database (`relay.authorize`), at subscribe time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Why a token was refused, or the verifier could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send `Authorization: Bearer <jwt>` or `?token=<jwt>`")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token expired")]
    Expired,
    #[error("token configuration: {0}")]
    Config(String),
}

/// How tokens are checked. At least one of the HS256 secret and the
/// public key must be set.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Shared secret for HS256 (also what `pgrelay token` signs with).
    pub hs256_secret: Option<Vec<u8>>,
    /// PEM public key; RS256 for an RSA key, ES256 for a P-256 key.
    pub public_key_pem: Option<Vec<u8>>,
    /// Clock-skew allowance on `exp` and `nbf`.
    pub leeway: Duration,
    /// When set, `aud` must contain it.
    pub audience: Option<String>,
    /// When set, `iss` must equal it.
    pub issuer: Option<String>,
}

/// The claims pgrelay reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id, as `relay.authorize` expects it.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// A verified identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    /// When the token stops being valid, seconds since the epoch.
    pub expires_at: u64,
}

/// Verifies and (with a shared secret) issues tokens.
///
/// Each accepted algorithm is bound to its own key, and a token is checked
/// only against the key of the algorithm its header names: so `alg: none`
/// is refused (no key has it), and algorithm confusion (an HS256 token
/// "signed" with the RSA public key as secret) is refused too, since
/// HS256 is only ever checked with the shared secret.
#[derive(Clone)]
pub struct Authenticator {
    keys: Vec<(Algorithm, DecodingKey, Validation)>,
    encoding: Option<EncodingKey>,
    leeway: Duration,
}

impl Authenticator {
    /// HS256 with a shared secret of any length, for development tokens and
    /// tests; `leeway` absorbs clock skew on `exp` and `nbf`. Configuration
    /// from users goes through [`new`](Self::new), which enforces policy.
    pub fn hs256(secret: &[u8], leeway: Duration) -> Self {
        let config = AuthConfig {
            hs256_secret: Some(secret.to_vec()),
            leeway,
            ..AuthConfig::default()
        };
        Self::build(&config).unwrap_or_else(|_| Authenticator {
            keys: Vec::new(),
            encoding: None,
            leeway,
        })
    }

    /// Like [`hs256`](Self::hs256), from a full configuration, enforcing
    /// the policy on secrets (at least 16 bytes) and keys.
    pub fn new(config: &AuthConfig) -> Result<Self, AuthError> {
        if config
            .hs256_secret
            .as_ref()
            .is_some_and(|secret| secret.len() < 16)
        {
            return Err(AuthError::Config(
                "the HS256 secret must be at least 16 bytes".into(),
            ));
        }
        Self::build(config)
    }

    fn build(config: &AuthConfig) -> Result<Self, AuthError> {
        let validation = |alg: Algorithm| {
            let mut v = Validation::new(alg);
            v.leeway = config.leeway.as_secs();
            v.validate_nbf = true;
            let mut required = vec!["exp", "sub"];
            if let Some(aud) = &config.audience {
                v.set_audience(&[aud]);
                required.push("aud");
            } else {
                v.validate_aud = false;
            }
            if let Some(iss) = &config.issuer {
                v.set_issuer(&[iss]);
                required.push("iss");
            }
            v.set_required_spec_claims(&required);
            v
        };
        let mut keys = Vec::new();
        let mut encoding = None;
        if let Some(secret) = &config.hs256_secret {
            keys.push((
                Algorithm::HS256,
                DecodingKey::from_secret(secret),
                validation(Algorithm::HS256),
            ));
            encoding = Some(EncodingKey::from_secret(secret));
        }
        if let Some(pem) = &config.public_key_pem {
            let (alg, key) = if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
                (Algorithm::RS256, k)
            } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
                (Algorithm::ES256, k)
            } else {
                return Err(AuthError::Config(
                    "the public key is neither an RSA nor an EC (P-256) PEM key".into(),
                ));
            };
            keys.push((alg, key, validation(alg)));
        }
        if keys.is_empty() {
            return Err(AuthError::Config(
                "set a shared secret (PGRELAY_JWT_SECRET) or a public key (PGRELAY_JWT_PUBLIC_KEY_FILE)".into(),
            ));
        }
        Ok(Authenticator {
            keys,
            encoding,
            leeway: config.leeway,
        })
    }

    /// The clock-skew allowance, for expiry timers.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed token or unsupported algorithm".into()))?;
        let Some((_, key, validation)) = self.keys.iter().find(|(alg, _, _)| *alg == header.alg)
        else {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} not accepted",
                header.alg
            )));
        };
        let data =
            jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => {
                    AuthError::Invalid("token not yet valid (nbf)".into())
                }
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
                ErrorKind::InvalidAlgorithm => AuthError::Invalid("algorithm not accepted".into()),
                ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience".into()),
                ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer".into()),
                ErrorKind::MissingRequiredClaim(c) => {
                    AuthError::Invalid(format!("missing claim `{c}`"))
                }
                _ => AuthError::Invalid("malformed token".into()),
            })?;
        let claims = data.claims;
        if claims.sub.is_empty() || claims.sub.len() > 128 {
            return Err(AuthError::Invalid("`sub` must be 1 to 128 bytes".into()));
        }
        Ok(Identity {
            user_id: claims.sub,
            expires_at: claims.exp,
        })
    }

    /// Signs an HS256 token for `user_id` valid for `ttl`.
    pub fn issue(&self, user_id: &str, ttl: Duration) -> Result<String, AuthError> {
        let Some(encoding) = &self.encoding else {
            return Err(AuthError::Config(
                "tokens can only be issued with a shared secret".into(),
            ));
        };
        let now = unix_now();
        let claims = Claims {
            sub: user_id.to_string(),
            exp: now + ttl.as_secs(),
            nbf: None,
            iat: Some(now),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, encoding)
            .map_err(|e| AuthError::Config(format!("cannot sign: {e}")))
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_and_wrong_secrets_do_not() {
        let a = Authenticator::hs256(b"secret-of-16-bytes", Duration::from_secs(0));
        let t = a.issue("alice", Duration::from_secs(60)).expect("sign");
        assert_eq!(a.verify(&t).expect("verify").user_id, "alice");
        let b = Authenticator::hs256(b"other-secret-16-bytes", Duration::from_secs(0));
        assert!(matches!(b.verify(&t), Err(AuthError::Invalid(_))));
        assert!(matches!(a.verify("garbage"), Err(AuthError::Invalid(_))));
    }
}
