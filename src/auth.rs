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

/// Why a token was refused. Maps to a close code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send `Authorization: Bearer <jwt>` or `?token=<jwt>`")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token expired")]
    Expired,
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

/// Verifies and (for development and tests) issues tokens.
#[derive(Clone)]
pub struct Authenticator {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

impl Authenticator {
    /// HS256 with a shared secret; `leeway` absorbs clock skew on `exp` and
    /// `nbf`.
    pub fn hs256(secret: &[u8], leeway: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Authenticator {
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => {
                    AuthError::Invalid("token not yet valid (nbf)".into())
                }
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
                ErrorKind::InvalidAlgorithm => AuthError::Invalid("algorithm not accepted".into()),
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

    /// Signs a token for `user_id` valid for `ttl`.
    pub fn issue(&self, user_id: &str, ttl: Duration) -> Result<String, AuthError> {
        let now = unix_now();
        let claims = Claims {
            sub: user_id.to_string(),
            exp: now + ttl.as_secs(),
            nbf: None,
            iat: Some(now),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Invalid(format!("cannot sign: {e}")))
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The token of an upgrade request: the `Authorization: Bearer` header
/// first, then the `token` query parameter.
pub fn token_from_request<B>(req: &hyper::Request<B>) -> Option<String> {
    if let Some(value) = req.headers().get(hyper::header::AUTHORIZATION) {
        if let Ok(text) = value.to_str() {
            if let Some(token) = text
                .strip_prefix("Bearer ")
                .or_else(|| text.strip_prefix("bearer "))
            {
                let token = token.trim();
                if !token.is_empty() {
                    return Some(token.to_string());
                }
            }
        }
    }
    let query = req.uri().query()?;
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == "token" && !value.is_empty()).then(|| percent_decode(value))
    })
}

/// JWTs are base64url and dots, so decoding only matters for clients that
/// escape anyway; invalid escapes are kept as they are (and fail
/// verification).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_and_wrong_secrets_do_not() {
        let a = Authenticator::hs256(b"secret", Duration::from_secs(0));
        let t = a.issue("alice", Duration::from_secs(60)).expect("sign");
        assert_eq!(a.verify(&t).expect("verify").user_id, "alice");
        let b = Authenticator::hs256(b"other", Duration::from_secs(0));
        assert!(matches!(b.verify(&t), Err(AuthError::Invalid(_))));
        assert!(matches!(a.verify("garbage"), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn query_tokens_are_found_and_decoded() {
        let req = hyper::Request::builder()
            .uri("/ws?x=1&token=a%2Eb.c")
            .body(())
            .expect("request");
        assert_eq!(token_from_request(&req).as_deref(), Some("a.b.c"));
        let req = hyper::Request::builder()
            .uri("/ws?token=q")
            .header("authorization", "Bearer h")
            .body(())
            .expect("request");
        assert_eq!(token_from_request(&req).as_deref(), Some("h"));
        let req = hyper::Request::builder()
            .uri("/ws")
            .body(())
            .expect("request");
        assert_eq!(token_from_request(&req), None);
    }
}
