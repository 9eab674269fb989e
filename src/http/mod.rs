//! The edges: one router for `GET /ws` (the WebSocket upgrade, in
//! [`websocket`]), `GET /healthz` (ready only while LISTENing), `GET
//! /metrics` (Prometheus text), the demo page at `/` ([`demo`]), the
//! JavaScript client SDK at `/client.js` ([`sdk`]) and the chat API under
//! `/v1` ([`api`]); and the accept loop that serves them.
//! Every error is a JSON body with a status ([`response`]), never an empty
//! reply. [`connection`] admits, counts and bounds each TCP connection.
//!
//! HTTP/1.1 only. WebSockets are served by the HTTP/1.1 upgrade (RFC 6455);
//! browsers speak HTTP/2 only over TLS, which a proxy in front terminates,
//! and WebSockets over HTTP/2 (RFC 8441) would be a second handshake to
//! bound and test for no client that needs it. A connection that opens
//! with the HTTP/2 preface is closed at once.

pub mod api;
pub mod connection;
pub mod demo;
pub mod request;
pub mod response;
pub mod sdk;
pub mod websocket;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::api::Api;
use crate::http::connection::Admission;
use crate::http::response::{json_error, json_response, Body};
use crate::metrics::Metrics;
use crate::relay::listener::ListenHealth;
use crate::relay::session::SessionContext;

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
    /// Why LISTEN is not proven, for `/healthz`.
    pub listen_health: Arc<ListenHealth>,
    /// Inbound WebSocket frame and message limit, in bytes.
    pub max_frame_bytes: usize,
    /// Ends sessions on shutdown.
    pub shutdown: CancellationToken,
    /// Tracks upgraded connections, which hyper no longer tracks.
    pub tasks: TaskTracker,
    /// The connection caps, checked at accept.
    pub admission: Admission,
    /// Time for a request head, a `/v1` body, and an upgrade.
    pub http_read_timeout: Duration,
}

pub async fn handle(
    req: Request<Incoming>,
    state: Arc<HttpState>,
) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/v1" || req.uri().path().starts_with("/v1/") {
        return Ok(state.api.handle(req).await);
    }
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/ws") => websocket::upgrade(req, &state).await,
        (&Method::GET, "/healthz") => healthz(&state),
        (&Method::GET, "/") => demo::page(),
        (&Method::GET, "/client.js") => sdk::entry(),
        (&Method::GET, path) if path.starts_with("/client/") => {
            sdk::module(&path["/client/".len()..]).unwrap_or_else(|| {
                json_error(StatusCode::NOT_FOUND, "not_found", "no such SDK module")
            })
        }
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

/// Ready only while both halves of delivery work: LISTEN is up and proven
/// (else events are only polled), and the pool serves reads (else nothing
/// is delivered and no one can subscribe), and, with a JWKS, its keys were
/// loaded once (else every token is refused). A 503 names the reason.
fn healthz(state: &HttpState) -> Response<Body> {
    let listening = *state.listening.borrow();
    let reads = state.sessions.log.pool().health().problem();
    let keys = state.sessions.auth.problem();
    if listening && reads.is_none() && keys.is_none() {
        return json_response(
            StatusCode::OK,
            json!({"status": "ok", "listening": true, "reads": true}),
        );
    }
    let mut reasons = Vec::new();
    if !listening {
        let problem = state.listen_health.problem();
        reasons.push(if problem.is_empty() {
            "LISTEN is not proven yet".to_string()
        } else {
            problem
        });
    }
    if let Some(problem) = &reads {
        reasons.push(format!("database reads fail: {problem}"));
    }
    if let Some(problem) = &keys {
        reasons.push(problem.clone());
    }
    let message = if !listening {
        "not LISTENing on the database; events are being polled"
    } else if reads.is_some() {
        "the event log cannot be read; delivery and subscribe wait for the database"
    } else {
        "the identity provider's keys (JWKS) are not loaded; every token is refused"
    };
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"status": "unavailable", "listening": listening, "reads": reads.is_none(),
               "token_keys": keys.is_none(),
               "reason": reasons.join("; "), "message": message}),
    )
}

async fn metrics(state: &HttpState) -> Response<Body> {
    let usage = tokio::time::timeout(
        Duration::from_secs(1),
        state.sessions.log.notification_queue_usage(),
    )
    .await
    .ok()
    .and_then(Result::ok);
    state.metrics.db_timeouts.store(
        state.sessions.log.pool().health().timeouts.load(Relaxed),
        Relaxed,
    );
    let mut response = Response::new(Full::new(Bytes::from(state.metrics.render(usage))));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// Accepts connections until shutdown, then lets plain HTTP requests in
/// flight finish (at most 5 s).
///
/// Each connection is admitted against the caps first (503 beyond them).
/// hyper's timer bounds the request head: it must arrive within
/// `http_read_timeout` of the connection's first read, and on an idle
/// keep-alive connection the next head within the same time, else the
/// connection is closed without an answer.
pub async fn serve(socket: TcpListener, state: Arc<HttpState>, shutdown: CancellationToken) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(state.http_read_timeout);
    let connections = TaskTracker::new();
    loop {
        let (stream, _peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = socket.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Some((io, pending)) = state.admission.admit(stream) else {
            continue;
        };
        let upgraded = io.upgraded_flag();
        let service = {
            let state = state.clone();
            service_fn(move |req| handle(req, state.clone()))
        };
        let conn = builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        let shutdown = shutdown.clone();
        let metrics = state.metrics.clone();
        connections.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.as_mut().await
                }
            };
            // Upgraded (the session has the socket now) or closed: either
            // way no longer a pending connection.
            upgraded.store(true, std::sync::atomic::Ordering::Relaxed);
            drop(pending);
            if let Err(e) = result {
                if e.is_timeout() {
                    metrics
                        .timeouts
                        .head
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(socket);
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
}
