//! An identity provider's signing keys, from its JWKS document
//! (`PGRELAY_JWT_JWKS_URL`, or found through OIDC discovery from
//! `PGRELAY_JWT_OIDC_ISSUER`): fetched at start, kept in memory, picked by
//! a token's `kid`, fetched again on a schedule and when a token names a
//! `kid` the set lacks.
//!
//! - Verification reads the current set through an [`ArcSwap`]: no lock,
//!   whatever the number of connections verifying at once.
//! - Fetches are serialized by one lock. A token with an unknown `kid`
//!   starts a fetch only if no other unknown `kid` started one in the last
//!   `min_fetch_interval`;
//!   misses that arrive while a fetch runs wait for that fetch and share
//!   its result. So a flood of made-up `kid`s costs the provider at most
//!   one request per `min_fetch_interval`.
//! - A failed fetch (provider down, bad document, no usable key) keeps the
//!   last good set; it is logged and counted, and retried sooner (backing
//!   off up to the refresh interval). A set that was fetched replaces the
//!   old one whole: a key the provider removed stops verifying at the next
//!   successful fetch.
//! - Only public signature keys are taken: RSA (RS256/384/512,
//!   PS256/384/512), EC P-256 (ES256) and P-384 (ES384), Ed25519 (EdDSA).
//!   Symmetric (`oct`) keys, encryption keys (`use: enc`) and keys of other
//!   types are skipped, so a JWKS can never make HS256 tokens acceptable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio_util::sync::CancellationToken;

use crate::auth::AuthError;
use crate::metrics::JwksMetrics;

/// Largest JWKS or discovery document taken (real ones are a few KiB).
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// Where the keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// The JWKS document's URL.
    Url(String),
    /// An OIDC issuer: its `/.well-known/openid-configuration` names the
    /// JWKS (`jwks_uri`), read again at every fetch.
    Issuer(String),
}

/// How the keys are fetched and kept.
#[derive(Debug, Clone)]
pub struct JwksConfig {
    pub source: JwksSource,
    /// The set is fetched again this often (`PGRELAY_JWT_JWKS_REFRESH`):
    /// the longest a key the provider removed keeps verifying.
    pub refresh_interval: Duration,
    /// At most one fetch per this interval because of unknown `kid`s, and
    /// the first retry after a failure (`PGRELAY_JWT_JWKS_MIN_FETCH_INTERVAL`).
    pub min_fetch_interval: Duration,
    /// Deadline of one fetch, discovery included (`PGRELAY_JWT_JWKS_TIMEOUT`).
    pub fetch_timeout: Duration,
}

impl JwksConfig {
    /// The documented defaults: refresh every 5 minutes, at most one
    /// unknown-`kid` fetch per 10 seconds, 5 seconds per fetch.
    pub fn new(source: JwksSource) -> Self {
        JwksConfig {
            source,
            refresh_interval: Duration::from_secs(300),
            min_fetch_interval: Duration::from_secs(10),
            fetch_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a fetch gave no key set.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url} is not a usable URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("GET {url}: {reason}")]
    Request { url: String, reason: String },
    #[error("GET {url}: HTTP status {status}")]
    Status { url: String, status: u16 },
    #[error("fetching the keys took longer than {0:?}")]
    Timeout(Duration),
    #[error("{url}: {reason}")]
    Document { url: String, reason: String },
}

/// One verifying key of the set, with the validation its algorithms use.
pub struct JwksKey {
    pub key: DecodingKey,
    pub validation: Validation,
}

/// A fetched set.
#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Arc<JwksKey>>,
    /// The set's key when it holds exactly one: tokens without a `kid`
    /// are checked with it.
    only: Option<Arc<JwksKey>>,
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The cached key set and its fetcher; shared by every clone of the
/// [`Authenticator`](crate::auth::Authenticator).
pub struct Jwks {
    config: JwksConfig,
    client: HttpClient,
    /// What every key's validation starts from (leeway, `aud`, `iss`,
    /// required claims); the algorithms are the key's.
    base: Validation,
    keys: ArcSwap<KeySet>,
    loaded: AtomicBool,
    /// Serializes fetches.
    fetch_lock: tokio::sync::Mutex<()>,
    /// Fetches started; a waiter that sees it move shares that fetch.
    attempts: AtomicU64,
    fetching: AtomicBool,
    /// When the last fetch for an unknown `kid` started.
    last_miss_fetch: Mutex<Option<Instant>>,
    consecutive_failures: AtomicU64,
    /// The last failure, while no set was ever loaded (for `/healthz`).
    problem: Mutex<Option<String>>,
    metrics: Arc<JwksMetrics>,
}

impl Jwks {
    /// The fetcher, with no keys yet (see [`load_at_start`](Self::load_at_start)
    /// and [`run`](Self::run)).
    pub fn new(
        config: JwksConfig,
        base: Validation,
        metrics: Arc<JwksMetrics>,
    ) -> Result<Self, AuthError> {
        let url = match &config.source {
            JwksSource::Url(u) | JwksSource::Issuer(u) => u,
        };
        check_url(url).map_err(|e| AuthError::Config(e.to_string()))?;
        let client = http_client()?;
        Ok(Jwks {
            config,
            client,
            base,
            keys: ArcSwap::from_pointee(KeySet::default()),
            loaded: AtomicBool::new(false),
            fetch_lock: tokio::sync::Mutex::new(()),
            attempts: AtomicU64::new(0),
            fetching: AtomicBool::new(false),
            last_miss_fetch: Mutex::new(None),
            consecutive_failures: AtomicU64::new(0),
            problem: Mutex::new(Some("the JWKS has not been fetched yet".into())),
            metrics,
        })
    }

    /// The key named `kid`, or the only key for a token without one.
    pub fn key(&self, kid: Option<&str>) -> Option<Arc<JwksKey>> {
        let set = self.keys.load();
        match kid {
            Some(kid) => set.by_kid.get(kid).cloned(),
            None => set.only.clone(),
        }
    }

    /// True once a set was fetched.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(SeqCst)
    }

    /// Why no key set is available, while none was ever loaded.
    pub fn problem(&self) -> Option<String> {
        if self.is_loaded() {
            return None;
        }
        lock(&self.problem).clone()
    }

    /// The `kid`s of the current set, sorted.
    pub fn kids(&self) -> Vec<String> {
        let mut kids: Vec<String> = self.keys.load().by_kid.keys().cloned().collect();
        kids.sort();
        kids
    }

    /// The first fetch; the caller goes on whether it worked or not (the
    /// schedule retries, and `/healthz` says 503 until a set is loaded).
    pub async fn load_at_start(&self) -> bool {
        let _guard = self.fetch_lock.lock().await;
        self.fetch_and_install("start").await
    }

    /// Refreshes on the schedule until `shutdown`: every
    /// `refresh_interval` while fetches work; after a failure, from
    /// `min_fetch_interval` doubling up to `refresh_interval`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let failures = self.consecutive_failures.load(SeqCst);
            let wait = if failures == 0 {
                self.config.refresh_interval
            } else {
                let shift = (failures - 1).min(16) as u32;
                self.config
                    .min_fetch_interval
                    .saturating_mul(1 << shift)
                    .min(self.config.refresh_interval)
            }
            // However it was configured, never a busy loop.
            .max(Duration::from_millis(50));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let _guard = tokio::select! {
                _ = shutdown.cancelled() => return,
                g = self.fetch_lock.lock() => g,
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.fetch_and_install("schedule") => {}
            }
        }
    }

    /// A token named a `kid` the set lacks: fetch again, unless a fetch
    /// for an unknown `kid` started less than `min_fetch_interval` ago (the
    /// schedule's fetches do not count: they are not the tokens' doing). A
    /// fetch under way (for any cause) is waited for and shared instead.
    pub async fn refresh_for_unknown_kid(&self) {
        let seen = self.attempts.load(SeqCst);
        if !self.fetching.load(SeqCst) && !self.may_fetch_now() {
            return;
        }
        let _guard = self.fetch_lock.lock().await;
        if self.attempts.load(SeqCst) != seen || !self.may_fetch_now() {
            return;
        }
        *lock(&self.last_miss_fetch) = Some(Instant::now());
        self.fetch_and_install("unknown_kid").await;
    }

    /// The same, in the background, for callers that cannot wait.
    pub fn request_refresh(self: &Arc<Self>) {
        if self.fetching.load(SeqCst) || !self.may_fetch_now() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let this = self.clone();
            runtime.spawn(async move { this.refresh_for_unknown_kid().await });
        }
    }

    fn may_fetch_now(&self) -> bool {
        lock(&self.last_miss_fetch).is_none_or(|t| t.elapsed() >= self.config.min_fetch_interval)
    }

    /// One fetch; the caller holds `fetch_lock`. True if a set was
    /// installed.
    async fn fetch_and_install(&self, cause: &'static str) -> bool {
        self.attempts.fetch_add(1, SeqCst);
        self.fetching.store(true, SeqCst);
        let _fetching = ClearOnDrop(&self.fetching);
        self.metrics.fetches.fetch_add(1, SeqCst);
        let result = tokio::time::timeout(self.config.fetch_timeout, self.fetch_once())
            .await
            .unwrap_or(Err(FetchError::Timeout(self.config.fetch_timeout)));
        match result {
            Ok((url, set, skipped)) => {
                let kids: Vec<&str> = {
                    let mut k: Vec<&str> = set.by_kid.keys().map(String::as_str).collect();
                    k.sort_unstable();
                    k
                };
                let changed = {
                    let old = self.keys.load();
                    old.by_kid.len() != set.by_kid.len()
                        || kids.iter().any(|k| !old.by_kid.contains_key(*k))
                        || !self.is_loaded()
                };
                if changed {
                    tracing::info!(url = %url, cause, kids = ?kids, skipped, "JWKS loaded");
                } else {
                    tracing::debug!(url = %url, cause, keys = kids.len(), "JWKS unchanged");
                }
                self.metrics.keys.store(
                    set.by_kid.len().max(usize::from(set.only.is_some())) as i64,
                    SeqCst,
                );
                self.metrics
                    .last_success_unix
                    .store(crate::auth::unix_now() as i64, SeqCst);
                self.keys.store(Arc::new(set));
                self.loaded.store(true, SeqCst);
                self.consecutive_failures.store(0, SeqCst);
                *lock(&self.problem) = None;
                true
            }
            Err(e) => {
                self.metrics.fetch_failures.fetch_add(1, SeqCst);
                let failures = self.consecutive_failures.fetch_add(1, SeqCst) + 1;
                let kept = self.keys.load().by_kid.len();
                if self.is_loaded() {
                    tracing::warn!(
                        error = %e,
                        cause,
                        consecutive_failures = failures,
                        kept_keys = kept,
                        "JWKS fetch failed; keeping the last good keys"
                    );
                } else {
                    tracing::error!(
                        error = %e,
                        cause,
                        consecutive_failures = failures,
                        "JWKS fetch failed and no keys were ever loaded: every token is refused"
                    );
                }
                *lock(&self.problem) = Some(e.to_string());
                false
            }
        }
    }

    /// Discovery if configured, then the JWKS: (its URL, the set, keys
    /// skipped).
    async fn fetch_once(&self) -> Result<(String, KeySet, usize), FetchError> {
        let url = match &self.config.source {
            JwksSource::Url(url) => url.clone(),
            JwksSource::Issuer(issuer) => self.discover(issuer).await?,
        };
        let body = self.get(&url).await?;
        let (set, skipped) =
            parse_key_set(&body, &self.base).map_err(|reason| FetchError::Document {
                url: url.clone(),
                reason,
            })?;
        Ok((url, set, skipped))
    }

    /// The `jwks_uri` of the issuer's discovery document, whose `issuer`
    /// must be the one configured (OpenID Connect Discovery 1.0, 4.3).
    async fn discover(&self, issuer: &str) -> Result<String, FetchError> {
        let url = discovery_url(issuer);
        let body = self.get(&url).await?;
        let doc: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| FetchError::Document {
                url: url.clone(),
                reason: format!("not JSON: {e}"),
            })?;
        let named = doc.get("issuer").and_then(|v| v.as_str()).unwrap_or("");
        if named.trim_end_matches('/') != issuer.trim_end_matches('/') {
            return Err(FetchError::Document {
                url,
                reason: format!("names issuer {named:?}, not {issuer:?}"),
            });
        }
        let Some(jwks_uri) = doc.get("jwks_uri").and_then(|v| v.as_str()) else {
            return Err(FetchError::Document {
                url,
                reason: "has no `jwks_uri`".into(),
            });
        };
        check_url(jwks_uri)?;
        Ok(jwks_uri.to_string())
    }

    async fn get(&self, url: &str) -> Result<Bytes, FetchError> {
        let request_error = |reason: String| FetchError::Request {
            url: url.to_string(),
            reason,
        };
        let uri: hyper::Uri = url.parse().map_err(|e| FetchError::BadUrl {
            url: url.to_string(),
            reason: format!("{e}"),
        })?;
        let request = hyper::Request::get(uri)
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("pgrelay/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::new())
            .map_err(|e| request_error(e.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| request_error(error_chain(&e)))?;
        if !response.status().is_success() {
            return Err(FetchError::Status {
                url: url.to_string(),
                status: response.status().as_u16(),
            });
        }
        Limited::new(response.into_body(), MAX_DOCUMENT_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| request_error(format!("reading the body: {e}")))
    }
}

/// Where an issuer's discovery document is.
pub fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

fn check_url(url: &str) -> Result<(), FetchError> {
    let bad = |reason: &str| FetchError::BadUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let uri: hyper::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") => {
            let host = uri.host().unwrap_or("");
            let loopback = host == "localhost"
                || host
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                tracing::warn!(
                    url,
                    "the JWKS is fetched over plain HTTP: use https outside a trusted network"
                );
            }
            Ok(())
        }
        _ => Err(bad("only http:// and https:// URLs are fetched")),
    }
}

/// HTTPS with rustls (ring), trusting the Mozilla roots and the system's
/// (which includes `SSL_CERT_FILE`/`SSL_CERT_DIR`, for a private CA).
fn http_client() -> Result<HttpClient, AuthError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(
        system_roots = added,
        errors = native.errors.len(),
        "TLS roots for the JWKS"
    );
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| AuthError::Config(format!("TLS set-up: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// The usable keys of a JWKS document, and how many were skipped.
fn parse_key_set(body: &[u8], base: &Validation) -> Result<(KeySet, usize), String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let doc: Document =
        serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut set = KeySet::default();
    let mut usable = Vec::new();
    let mut skipped = 0;
    for value in doc.keys {
        let kid = value
            .get("kid")
            .and_then(|k| k.as_str())
            .map(str::to_string);
        let parsed = serde_json::from_value::<Jwk>(value)
            .map_err(|e| e.to_string())
            .and_then(|jwk| {
                let algorithms = algorithms_of(&jwk)?;
                let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
                let mut validation = base.clone();
                validation.algorithms = algorithms;
                Ok(Arc::new(JwksKey { key, validation }))
            });
        match parsed {
            Ok(key) => usable.push((kid, key)),
            Err(reason) => {
                skipped += 1;
                tracing::debug!(kid = ?kid, reason, "JWKS key skipped");
            }
        }
    }
    if usable.is_empty() {
        return Err(format!(
            "no usable signature key (RSA, EC P-256/P-384 or Ed25519) among {skipped}"
        ));
    }
    if usable.len() == 1 {
        set.only = Some(usable[0].1.clone());
    }
    for (kid, key) in usable {
        if let Some(kid) = kid {
            set.by_kid.insert(kid, key);
        }
    }
    Ok((set, skipped))
}

/// The algorithms a key verifies: those of its family, narrowed to its
/// `alg` when it names one.
fn algorithms_of(jwk: &Jwk) -> Result<Vec<Algorithm>, String> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("an encryption key (use: enc)".into());
    }
    let family: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return Err(format!("unsupported curve {:?}", p.curve)),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
            _ => return Err(format!("unsupported curve {:?}", p.curve)),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err("a symmetric (oct) key: never taken from a JWKS".into())
        }
        _ => return Err("an unknown key type".into()),
    };
    match jwk.common.key_algorithm {
        None => Ok(family),
        Some(named) => {
            let named = key_algorithm(named)
                .ok_or_else(|| format!("algorithm {named:?} is not a signature algorithm"))?;
            if family.contains(&named) {
                Ok(vec![named])
            } else {
                Err(format!("algorithm {named:?} does not fit the key"))
            }
        }
    }
}

fn key_algorithm(a: KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Validation {
        Validation::new(Algorithm::RS256)
    }

    #[test]
    fn symmetric_encryption_and_unknown_keys_are_skipped() {
        let doc = br#"{"keys":[
            {"kty":"oct","kid":"s","k":"c2VjcmV0LW9mLTE2LWJ5dGVz"},
            {"kty":"RSA","kid":"enc","use":"enc","alg":"RSA-OAEP","n":"AQAB","e":"AQAB"},
            {"kty":"XYZ","kid":"x"},
            {"kty":"OKP","crv":"Ed25519","kid":"ed","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
        ]}"#;
        let (set, skipped) = parse_key_set(doc, &base()).expect("one usable key");
        assert_eq!(skipped, 3);
        assert_eq!(set.by_kid.len(), 1);
        let ed = set.by_kid.get("ed").expect("the Ed25519 key");
        assert_eq!(ed.validation.algorithms, vec![Algorithm::EdDSA]);
        assert!(set.only.is_some());
    }

    #[test]
    fn a_document_without_usable_keys_is_an_error() {
        assert!(parse_key_set(br#"{"keys":[{"kty":"oct","k":"AAAA"}]}"#, &base()).is_err());
        assert!(parse_key_set(br#"{"keys":[]}"#, &base()).is_err());
        assert!(parse_key_set(b"<html>", &base()).is_err());
        assert!(parse_key_set(br#"{"nokeys":1}"#, &base()).is_err());
    }

    #[test]
    fn urls_are_checked_and_discovery_is_well_known() {
        assert!(check_url("https://example.com/.well-known/jwks.json").is_ok());
        assert!(check_url("http://127.0.0.1:8080/jwks").is_ok());
        assert!(check_url("ftp://example.com/jwks").is_err());
        assert!(check_url("not a url").is_err());
        assert_eq!(
            discovery_url("https://tenant.auth0.com/"),
            "https://tenant.auth0.com/.well-known/openid-configuration"
        );
    }
}
