//! A WebSocket client of the relay: connect with a token, send frames,
//! read the JSON frames back, subscribe, and read the close code.
//!
//! These are functions over the socket itself ([`Ws`]), so a caller that
//! needs to can still read raw messages off it (the benchmark's hot loop
//! does, to avoid a JSON parse per delivery).

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::{Error, Result};

/// A client socket to the relay's `/ws`.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `/ws` with the token in the query string, as browsers must.
pub async fn connect(addr: SocketAddr, token: &str) -> Result<Ws> {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={token}")).await?;
    Ok(ws)
}

pub async fn send_json(ws: &mut Ws, frame: &Value) -> Result<()> {
    ws.send(Message::Text(frame.to_string().into())).await?;
    Ok(())
}

/// The next text frame as JSON, skipping pings and other control frames;
/// `None` if none comes within `wait`. A close, an error or the end of the
/// stream is an error.
pub async fn next_json(ws: &mut Ws, wait: Duration) -> Result<Option<Value>> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let Ok(msg) = tokio::time::timeout_at(deadline, ws.next()).await else {
            return Ok(None);
        };
        match msg {
            Some(Ok(Message::Text(t))) => return Ok(Some(serde_json::from_str(&t)?)),
            Some(Ok(Message::Close(frame))) => return Err(Error::Closed(frame)),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(Error::Ended),
        }
    }
}

/// The `subscribe` action, resuming after `since` when given.
pub fn subscribe_request(project: &str, since: Option<u64>) -> Value {
    let mut request = json!({"action": "subscribe", "project_id": project});
    if let Some(seq) = since {
        request["since_seq"] = seq.into();
    }
    request
}

/// Subscribes and returns the `subscribed` frame (which carries the latest
/// seq); any other first frame, or none within `wait`, is an error.
pub async fn subscribe(
    ws: &mut Ws,
    project: &str,
    since: Option<u64>,
    wait: Duration,
) -> Result<Value> {
    send_json(ws, &subscribe_request(project, since)).await?;
    match next_json(ws, wait).await? {
        Some(frame) if frame["type"] == "subscribed" => Ok(frame),
        Some(frame) => Err(Error::NotSubscribed(frame)),
        None => Err(Error::Timeout(wait)),
    }
}

/// The close frame's code, after skipping whatever comes first; `None` if
/// no close frame comes within `wait`, or the connection fails or ends
/// without one.
pub async fn close_code(ws: &mut Ws, wait: Duration) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) | Ok(None) => return None,
        }
    }
}
