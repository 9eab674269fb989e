//! The edges: one router for `GET /ws` (the WebSocket upgrade, in
//! [`websocket`]), `GET /healthz` (ready only while LISTENing), `GET
//! /metrics` (Prometheus text), the demo page at `/` ([`demo`]), the
//! JavaScript client SDK at `/client.js` ([`sdk`]) and the chat API under
//! `/v1` ([`api`]); and the accept loop that serves them.
//! Every error is a JSON body with a status ([`response`]), never an empty
//! reply.

pub mod api;
pub mod demo;
pub mod request;
pub mod response;
pub mod sdk;
pub mod websocket;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::api::Api;
use crate::http::response::{json_error, json_response, Body};
use crate::metrics::Metrics;
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
        (&Method::GET, "/ws") => websocket::upgrade(req, &state),
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

/// Accepts connections until shutdown, then lets plain HTTP requests in
/// flight finish.
pub async fn serve(socket: TcpListener, state: Arc<HttpState>, shutdown: CancellationToken) {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
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
        let state = state.clone();
        let service = service_fn(move |req| handle(req, state.clone()));
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(socket);
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}
