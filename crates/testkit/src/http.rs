//! One HTTP/1.1 request with `Connection: close`, written by hand so the
//! relay is seen exactly as it answers (status line, headers, body).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Error, Result};

/// Sends one request and returns the whole response as text. `headers` are
/// added as given; a body gets its JSON content type and length.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await?;
    if let Some(b) = body {
        // A server may answer (413) before reading it all.
        let _ = s.write_all(b.as_bytes()).await;
    }
    let mut raw = Vec::new();
    if let Err(e) = s.read_to_end(&mut raw).await {
        // A server that answered and then reset still answered.
        if raw.is_empty() {
            return Err(e.into());
        }
    }
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

/// `GET path`: the whole response as text.
pub async fn get(addr: SocketAddr, path: &str) -> Result<String> {
    request(addr, "GET", path, &[], None).await
}

/// The status code of a response.
pub fn status(response: &str) -> Result<u16> {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| Error::NoStatus(response.chars().take(200).collect()))
}

/// The body of a response (empty if it has none).
pub fn body(response: &str) -> &str {
    response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("")
}
