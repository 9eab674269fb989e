//! `GET /ws`: the WebSocket handshake, the checks made before a session
//! starts (origin, token, connections per user), and the hand-over to
//! [`session::run`].

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use crate::auth::{AuthError, Identity};
use crate::http::request::token_from_request;
use crate::http::response::{json_error, Body};
use crate::http::HttpState;
use crate::relay::protocol::close;
use crate::relay::session;

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
pub async fn upgrade(mut req: Request<Incoming>, state: &Arc<HttpState>) -> Response<Body> {
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
    let verdict = match token_from_request(&req) {
        Some(token) => state.sessions.auth.verify_fresh(&token).await,
        None => Err(AuthError::Missing),
    }
    .map_err(Refusal::from);
    let on_upgrade = hyper::upgrade::on(&mut req);
    state
        .tasks
        .spawn(connection_task(on_upgrade, verdict, state.clone()));
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

/// The task of one upgraded connection: the WebSocket over the socket
/// hyper hands over, then the session (or the refusal's close). Its
/// future is what every open connection keeps, so it holds only what the
/// session needs.
async fn connection_task(
    on_upgrade: OnUpgrade,
    verdict: Result<Identity, Refusal>,
    state: Arc<HttpState>,
) {
    // hyper hands the socket over once the 101 is written; a peer that
    // does not take it in time is dropped.
    let upgraded = match tokio::time::timeout(state.http_read_timeout, on_upgrade).await {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "WebSocket upgrade failed");
            return;
        }
        Err(_) => {
            state.metrics.timeouts.upgrade.fetch_add(1, Relaxed);
            tracing::debug!("WebSocket upgrade did not complete in time");
            return;
        }
    };
    // The read buffer is allocated up front for every connection, idle
    // or not; clients send small frames (a subscribe, a pong), so 512
    // bytes (not tungstenite's 128 KiB, nor the 4 KiB this was) keeps an
    // idle connection cheap. A larger frame still arrives whole: the
    // buffer grows to hold it, and is read in steps of this size.
    //
    // The write buffer keeps its largest size for as long as the
    // connection lives, and a session fills it before it waits on a
    // full socket: 32 KiB (not tungstenite's 128 KiB) keeps that cost
    // per connection small. Frames are written out whenever it fills,
    // so larger frames and bursts only take more write calls.
    let config = WebSocketConfig::default()
        .read_buffer_size(512)
        .write_buffer_size(32 * 1024)
        .max_message_size(Some(state.max_frame_bytes))
        .max_frame_size(Some(state.max_frame_bytes));
    let ws =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
    let verdict = verdict.and_then(|identity| {
        ConnectionSlot::take(&state, &identity.user_id).map(|slot| (identity, slot))
    });
    match verdict {
        Ok((identity, _slot)) => {
            session::run(ws, state.sessions.clone(), identity, state.shutdown.clone()).await;
        }
        Err(refusal) => {
            state.metrics.refused_connections.fetch_add(1, Relaxed);
            tracing::debug!(reason = %refusal.reason, "refusing a connection");
            session::refuse(ws, refusal.code, &refusal.reason).await;
        }
    }
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

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, F: Future>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every open connection keeps this future (its task) for as long as it
    /// lives, idle or not: 1,656 bytes when this was written, 5.2 KiB
    /// before the session boxed the large steps it rarely takes (a client
    /// frame, a read of the log, a re-authorization). Such a step awaited
    /// inline again would make every connection pay for it.
    #[test]
    fn an_open_connection_keeps_a_small_task() {
        let size = future_size(connection_task);
        assert!(
            size <= 2048,
            "a connection's task is {size} bytes, kept by every open connection"
        );
    }
}
