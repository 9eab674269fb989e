//! Who is connecting: JWT verification (HS256 with a shared secret, a PEM
//! public key, or an identity provider's JWKS, see [`crate::jwks`]) and the
//! token extraction rules of the protocol (`Authorization: Bearer` header,
//! or the `token` query parameter, since browsers cannot set headers on a
//! WebSocket). Tokens are never logged.
//!
//! Whether that user may receive a scope's events is not decided here but
//! in the database (`relay.authorize`), at subscribe time.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::jwks::{Jwks, JwksConfig, JwksSource};
use crate::metrics::JwksMetrics;

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

/// How tokens are checked. At least one of the HS256 secret, the public
/// key and the JWKS must be set.
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
    /// An identity provider's keys, fetched from its JWKS (or found by
    /// OIDC discovery); asymmetric algorithms only.
    pub jwks: Option<JwksConfig>,
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
///
/// With a JWKS, a token of an asymmetric algorithm is checked with the key
/// its `kid` names (a token without `kid` only when the set has a single
/// key), and that key's own algorithms; a `kid` the set lacks falls back
/// to the PEM key when one is configured for the algorithm. HS256 never
/// goes to the JWKS.
#[derive(Clone)]
pub struct Authenticator {
    keys: Vec<(Algorithm, DecodingKey, Validation)>,
    encoding: Option<EncodingKey>,
    leeway: Duration,
    jwks: Option<Arc<Jwks>>,
    jwks_metrics: Arc<JwksMetrics>,
}

/// What [`Authenticator::check`] found.
enum Checked {
    Done(Result<Identity, AuthError>),
    /// The token names a `kid` the JWKS lacks.
    UnknownKid(Arc<Jwks>),
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
        Self::build(&config, Arc::default()).unwrap_or_else(|_| Authenticator {
            keys: Vec::new(),
            encoding: None,
            leeway,
            jwks: None,
            jwks_metrics: Arc::default(),
        })
    }

    /// Like [`hs256`](Self::hs256), from a full configuration, enforcing
    /// the policy on secrets (at least 16 bytes) and keys.
    pub fn new(config: &AuthConfig) -> Result<Self, AuthError> {
        Self::with_metrics(config, Arc::default())
    }

    /// Like [`new`](Self::new), counting JWKS fetches in `metrics`. With a
    /// JWKS, no key is fetched yet: see [`jwks`](Self::jwks).
    pub fn with_metrics(config: &AuthConfig, metrics: Arc<JwksMetrics>) -> Result<Self, AuthError> {
        if config
            .hs256_secret
            .as_ref()
            .is_some_and(|secret| secret.len() < 16)
        {
            return Err(AuthError::Config(
                "the HS256 secret must be at least 16 bytes".into(),
            ));
        }
        Self::build(config, metrics)
    }

    fn build(config: &AuthConfig, metrics: Arc<JwksMetrics>) -> Result<Self, AuthError> {
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
            } else if let Some(JwksSource::Issuer(iss)) = config.jwks.as_ref().map(|j| &j.source) {
                // The provider's own issuer, as its tokens write it (with
                // or without a trailing slash).
                let bare = iss.trim_end_matches('/');
                v.set_issuer(&[bare.to_string(), format!("{bare}/")]);
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
        let jwks = match &config.jwks {
            Some(j) => Some(Arc::new(Jwks::new(
                j.clone(),
                validation(Algorithm::RS256),
                metrics.clone(),
            )?)),
            None => None,
        };
        if keys.is_empty() && jwks.is_none() {
            return Err(AuthError::Config(
                "set a shared secret (PGRELAY_JWT_SECRET), a public key (PGRELAY_JWT_PUBLIC_KEY_FILE) \
                 or an identity provider (PGRELAY_JWT_JWKS_URL or PGRELAY_JWT_OIDC_ISSUER)"
                    .into(),
            ));
        }
        Ok(Authenticator {
            keys,
            encoding,
            leeway: config.leeway,
            jwks,
            jwks_metrics: metrics,
        })
    }

    /// The JWKS fetcher, when one is configured: the relay loads it at
    /// start ([`Jwks::load_at_start`]) and runs its schedule ([`Jwks::run`]).
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        self.jwks.as_ref()
    }

    /// Why no token can be verified yet (a JWKS that never loaded), for
    /// `/healthz`.
    pub fn problem(&self) -> Option<String> {
        let problem = self.jwks.as_ref()?.problem()?;
        Some(format!("the JWKS is not loaded: {problem}"))
    }

    /// The clock-skew allowance, for expiry timers.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// Checks `token` with the keys at hand. A `kid` the JWKS lacks is
    /// refused, and makes the JWKS fetched again in the background (rate
    /// limited); [`verify_fresh`](Self::verify_fresh) waits for that fetch.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        match self.check(token) {
            Checked::Done(result) => result,
            Checked::UnknownKid(jwks) => {
                jwks.request_refresh();
                self.unknown_kid(&jwks)
            }
        }
    }

    /// Like [`verify`](Self::verify), but a token naming a `kid` the JWKS
    /// lacks waits for a fetch of the JWKS (one started now if none did in
    /// the last `min_fetch_interval`, or the one under way) and is checked
    /// again: a key the provider just added works at once.
    pub async fn verify_fresh(&self, token: &str) -> Result<Identity, AuthError> {
        match self.check(token) {
            Checked::Done(result) => result,
            Checked::UnknownKid(jwks) => {
                jwks.refresh_for_unknown_kid().await;
                match self.check(token) {
                    Checked::Done(result) => result,
                    Checked::UnknownKid(jwks) => self.unknown_kid(&jwks),
                }
            }
        }
    }

    fn unknown_kid(&self, jwks: &Jwks) -> Result<Identity, AuthError> {
        self.jwks_metrics.unknown_kid.fetch_add(1, Relaxed);
        Err(AuthError::Invalid(if jwks.is_loaded() {
            "unknown signing key (kid)".into()
        } else {
            "the identity provider's keys are not loaded yet".into()
        }))
    }

    fn check(&self, token: &str) -> Checked {
        let header = match jsonwebtoken::decode_header(token) {
            Ok(h) => h,
            Err(_) => {
                return Checked::Done(Err(AuthError::Invalid(
                    "malformed token or unsupported algorithm".into(),
                )))
            }
        };
        let has_static = self.keys.iter().any(|(alg, _, _)| *alg == header.alg);
        if let Some(jwks) = &self.jwks {
            let symmetric = matches!(
                header.alg,
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
            );
            if !symmetric {
                if let Some(key) = jwks.key(header.kid.as_deref()) {
                    return Checked::Done(Self::decode(token, &key.key, &key.validation));
                }
                if !has_static {
                    return match header.kid {
                        Some(_) => Checked::UnknownKid(jwks.clone()),
                        None => Checked::Done(Err(AuthError::Invalid(
                            "the token names no signing key (kid)".into(),
                        ))),
                    };
                }
            }
        }
        let Some((_, key, validation)) = self.keys.iter().find(|(alg, _, _)| *alg == header.alg)
        else {
            return Checked::Done(Err(AuthError::Invalid(format!(
                "algorithm {:?} not accepted",
                header.alg
            ))));
        };
        Checked::Done(Self::decode(token, key, validation))
    }

    fn decode(
        token: &str,
        key: &DecodingKey,
        validation: &Validation,
    ) -> Result<Identity, AuthError> {
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
