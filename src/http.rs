//! The HTTP surface: `GET /ws` (the WebSocket upgrade), `GET /healthz`
//! (ready only while LISTENing), `GET /metrics` (Prometheus text). Every
//! error is a JSON body with a status, never an empty reply.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::Api;
use crate::auth::{self, AuthError};
use crate::metrics::Metrics;
use crate::protocol::close;
use crate::session::{self, SessionContext};

pub type Body = Full<Bytes>;

/// What request handling shares.
pub struct HttpState {
    pub sessions: Arc<SessionContext>,
    /// The chat API under `/v1`.
    pub api: Api,
    pub metrics: Arc<Metrics>,
    /// Browser origins allowed to open a WebSocket; empty allows any.
    pub allowed_origins: Vec<String>,
    pub max_connections_per_user: usize,
    /// Open WebSockets per user id.
    pub user_connections: Arc<Mutex<HashMap<String, usize>>>,
    pub listening: watch::Receiver<bool>,
    /// Inbound WebSocket frame and message limit, in bytes.
    pub max_frame_bytes: usize,
    /// Ends sessions on shutdown.
    pub shutdown: CancellationToken,
    /// Tracks upgraded connections, which hyper no longer tracks.
    pub tasks: TaskTracker,
}

pub async fn handle(
    req: Request<Incoming>,
    state: Arc<HttpState>,
) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/v1" || req.uri().path().starts_with("/v1/") {
        return Ok(state.api.handle(req).await);
    }
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/ws") => upgrade(req, &state),
        (&Method::GET, "/healthz") => healthz(&state),
        (&Method::GET, "/") => demo_page(),
        (&Method::GET, "/metrics") => metrics(&state).await,
        (_, "/ws" | "/healthz" | "/metrics") => {
            let mut r = json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use GET",
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
            r
        }
        _ => json_error(StatusCode::NOT_FOUND, "not_found", "no such route"),
    };
    Ok(response)
}

pub fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(status, json!({"error": {"code": code, "message": message}}))
}

/// The demo chat page: a complete client in one file (history over HTTP,
/// live events over the WebSocket, resume with since_seq).
fn demo_page() -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(include_bytes!("demo.html"))));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

fn healthz(state: &HttpState) -> Response<Body> {
    if *state.listening.borrow() {
        json_response(StatusCode::OK, json!({"status": "ok", "listening": true}))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "unavailable", "listening": false,
                   "message": "not LISTENing on the database; events are being polled"}),
        )
    }
}

async fn metrics(state: &HttpState) -> Response<Body> {
    let usage = tokio::time::timeout(
        Duration::from_secs(1),
        state.sessions.log.notification_queue_usage(),
    )
    .await
    .ok()
    .and_then(Result::ok);
    let mut response = Response::new(Full::new(Bytes::from(state.metrics.render(usage))));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

fn header_has_token(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Completes the WebSocket handshake, then runs the session. A missing or
/// bad token still gets the upgrade, then a close with the documented
/// code: browsers cannot read the status of a refused handshake, but they
/// can read a close code.
fn upgrade(mut req: Request<Incoming>, state: &Arc<HttpState>) -> Response<Body> {
    if !header_has_token(&req, header::UPGRADE, "websocket")
        || !header_has_token(&req, header::CONNECTION, "upgrade")
    {
        return json_error(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint speaks WebSocket: send Connection: Upgrade, Upgrade: websocket",
        );
    }
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return json_error(
            StatusCode::BAD_REQUEST,
            "bad_handshake",
            "Sec-WebSocket-Version must be 13",
        );
    }
    if !origin_allowed(&req, &state.allowed_origins) {
        state.metrics.refused_connections.fetch_add(1, Relaxed);
        return json_error(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this Origin may not connect",
        );
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "bad_handshake",
            "missing Sec-WebSocket-Key",
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let verdict = match auth::token_from_request(&req) {
        Some(token) => state.sessions.auth.verify(&token),
        None => Err(AuthError::Missing),
    }
    .map_err(Refusal::from);
    let on_upgrade = hyper::upgrade::on(&mut req);
    let state2 = state.clone();
    state.tasks.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket upgrade failed");
                return;
            }
        };
        // The read buffer is allocated up front for every connection;
        // clients send small control frames, so 4 KiB (not tungstenite's
        // 128 KiB) keeps an idle connection cheap. Larger frames still
        // arrive whole: the buffer only sizes each socket read.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .max_message_size(Some(state2.max_frame_bytes))
            .max_frame_size(Some(state2.max_frame_bytes));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        let verdict = verdict.and_then(|identity| {
            ConnectionSlot::take(&state2, &identity.user_id).map(|slot| (identity, slot))
        });
        match verdict {
            Ok((identity, _slot)) => {
                session::run(
                    ws,
                    state2.sessions.clone(),
                    identity,
                    state2.shutdown.clone(),
                )
                .await;
            }
            Err(refusal) => {
                state2.metrics.refused_connections.fetch_add(1, Relaxed);
                tracing::debug!(reason = %refusal.reason, "refusing a connection");
                session::refuse(ws, refusal.code, &refusal.reason).await;
            }
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    response
}

/// Why an upgraded connection is closed at once.
struct Refusal {
    code: u16,
    reason: String,
}

impl From<AuthError> for Refusal {
    fn from(e: AuthError) -> Self {
        let code = match e {
            AuthError::Expired => close::TOKEN_EXPIRED,
            AuthError::Missing | AuthError::Invalid(_) | AuthError::Config(_) => {
                close::UNAUTHORIZED
            }
        };
        Refusal {
            code,
            reason: e.to_string(),
        }
    }
}

/// One of a user's connection slots; given back on drop.
struct ConnectionSlot {
    user_id: String,
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

impl ConnectionSlot {
    fn take(state: &HttpState, user_id: &str) -> Result<Self, Refusal> {
        let mut counts = state
            .user_connections
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(user_id.to_string()).or_insert(0);
        if *n >= state.max_connections_per_user {
            return Err(Refusal {
                code: close::RATE_LIMITED,
                reason: format!(
                    "too many connections for this user (limit {})",
                    state.max_connections_per_user
                ),
            });
        }
        *n += 1;
        Ok(ConnectionSlot {
            user_id: user_id.to_string(),
            counts: state.user_connections.clone(),
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.user_id) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.user_id);
            }
        }
    }
}

/// Browsers always send Origin on a WebSocket handshake; other clients
/// need not. With an allow-list set, a browser from elsewhere is refused
/// (cross-site WebSocket hijacking), whatever its token.
fn origin_allowed<B>(req: &Request<B>, allowed: &[String]) -> bool {
    if allowed.is_empty() {
        return true;
    }
    match req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
    {
        None => true,
        Some(origin) => allowed.iter().any(|a| a == origin || a == "*"),
    }
}

/// Decodes `%XX` escapes (and, in query strings, `+` as space). Invalid
/// escapes are kept as they are; invalid UTF-8 becomes U+FFFD.
pub fn percent_decode(s: &str, plus_as_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if plus_as_space && bytes[i] == b'+' {
            b' '
        } else {
            bytes[i]
        });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
