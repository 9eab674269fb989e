//! The lightest WebSocket client that can hold a subscription: a plain
//! tokio `TcpStream`, a hand-written upgrade request, masked client frames
//! and a reader of the relay's unmasked ones.
//!
//! A tungstenite stream per connection reserves read and write buffers of
//! its own; at 100,000 idle connections on the relay's two cores, that
//! memory and the per-frame work would be the load generator's, not the
//! relay's, and could decide the result. An idle client here keeps a few
//! dozen bytes of state besides the socket, answers the relay's pings (it
//! closes a silent peer) and reads nothing else.
//!
//! Only what the relay sends is understood: unfragmented frames, no
//! extensions. A close frame, or anything unexpected, ends the client with
//! an error, so a connection the relay dropped is counted, not hidden.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;

/// A pong with no payload, masked as a client's frames must be. The relay
/// pings with an empty payload, which an empty pong echoes exactly.
const PONG: [u8; 6] = [0x80 | 0xA, 0x80, 0, 0, 0, 0];

/// Upgrade responses longer than this are not the relay's.
const MAX_RESPONSE_HEAD: usize = 4096;

/// An open, upgraded connection, with what was read past the last frame.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Connects from `source` (any 127.0.0.x: each has its own ~28,000
    /// ephemeral ports) to the relay's `/ws` with `token`, and completes
    /// the upgrade.
    pub async fn open(source: IpAddr, relay: SocketAddr, token: &str) -> anyhow::Result<Conn> {
        let socket = TcpSocket::new_v4()?;
        socket
            .bind(SocketAddr::new(source, 0))
            .with_context(|| format!("binding a client socket to {source}"))?;
        let mut stream = socket
            .connect(relay)
            .await
            .with_context(|| format!("connecting from {source} to {relay}"))?;
        // The subscribe frame follows the upgrade at once: no waiting for
        // an acknowledgement of the request first.
        stream.set_nodelay(true)?;
        let request = format!(
            "GET /ws?token={token} HTTP/1.1\r\nHost: {relay}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(512);
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_RESPONSE_HEAD {
                bail!("upgrade response head longer than {MAX_RESPONSE_HEAD} bytes");
            }
            if stream.read_buf(&mut buf).await? == 0 {
                bail!("relay closed the connection during the upgrade");
            }
        };
        if !buf.starts_with(b"HTTP/1.1 101") {
            let head = String::from_utf8_lossy(&buf[..head_end]);
            bail!("upgrade refused: {}", head.lines().next().unwrap_or(""));
        }
        buf.drain(..head_end);
        Ok(Conn { stream, buf })
    }

    /// Sends `text` as one masked text frame.
    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        let payload = text.as_bytes();
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(0x80 | OP_TEXT);
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        // The mask only has to differ between frames in a browser (where a
        // page controls the payload); any key is valid to the relay.
        let mask = [0x5a, 0xc3, 0x3c, 0xa5];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    /// The next text frame, answering pings meanwhile; an error on a
    /// close frame, the end of the stream, or nothing within `wait`.
    pub async fn next_text(&mut self, wait: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some((opcode, range, total)) = parse_frame(&self.buf)? {
                let payload = self.buf[range].to_vec();
                self.buf.drain(..total);
                match opcode {
                    OP_TEXT => return Ok(String::from_utf8(payload)?),
                    OP_PING => self.stream.write_all(&PONG).await?,
                    OP_CLOSE => bail!("relay closed: {}", close_reason(&payload)),
                    _ => {}
                }
                continue;
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf));
            match read.await {
                Err(_) => bail!("no frame within {wait:?}"),
                Ok(Ok(0)) => bail!("relay ended the connection"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
            }
        }
    }

    /// Subscribes to `project` and waits for its `subscribed` frame.
    pub async fn subscribe(&mut self, project: &str, wait: Duration) -> anyhow::Result<()> {
        let request = testkit::ws::subscribe_request(project, None).to_string();
        self.send_text(&request).await?;
        let frame = self.next_text(wait).await?;
        if !frame.contains(r#""type":"subscribed""#) {
            bail!("expected subscribed, got {frame}");
        }
        Ok(())
    }

    /// Holds the connection until `stop`, answering pings and discarding
    /// anything else, with no buffer of its own between reads. `Err`: the
    /// relay closed or ended the connection, or it failed.
    pub async fn idle(self, stop: &CancellationToken) -> anyhow::Result<()> {
        let Conn { stream, buf } = self;
        let mut frames = Skipper::default();
        let mut pings = frames.feed(&buf)?;
        drop(buf);
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        loop {
            for _ in 0..pings {
                write_all_now_or_later(&stream, &PONG).await?;
            }
            tokio::select! {
                biased;
                _ = &mut stopped => return Ok(()),
                ready = stream.readable() => ready?,
            }
            pings = read_available(&stream, &mut frames)?;
        }
    }
}

/// Reads whatever the socket holds through a stack buffer (not part of
/// the idle future's state) and returns the pings in it.
fn read_available(stream: &TcpStream, frames: &mut Skipper) -> anyhow::Result<u32> {
    let mut chunk = [0u8; 1024];
    let mut pings = 0;
    loop {
        match stream.try_read(&mut chunk) {
            Ok(0) => bail!("relay ended the connection"),
            Ok(n) => pings += frames.feed(&chunk[..n])?,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(pings),
            Err(e) => return Err(e.into()),
        }
    }
}

async fn write_all_now_or_later(stream: &TcpStream, bytes: &[u8]) -> anyhow::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        stream.writable().await?;
        match stream.try_write(&bytes[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Follows frame boundaries across reads with constant state, so an idle
/// connection holds no buffer: only ping and close frames matter.
#[derive(Default)]
struct Skipper {
    header: [u8; 10],
    have: usize,
    opcode: u8,
    skip: u64,
}

impl Skipper {
    /// Consumes `bytes`; returns the pings whose frames ended in them.
    fn feed(&mut self, mut bytes: &[u8]) -> anyhow::Result<u32> {
        let mut pings = 0;
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = (self.skip.min(bytes.len() as u64)) as usize;
                self.skip -= n as u64;
                bytes = &bytes[n..];
                if self.skip == 0 {
                    pings += self.frame_ended()?;
                }
                continue;
            }
            self.header[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            let Some((opcode, len, header_len)) = parse_header(&self.header[..self.have])? else {
                continue;
            };
            debug_assert_eq!(header_len, self.have);
            self.have = 0;
            self.opcode = opcode;
            self.skip = len;
            if len == 0 {
                pings += self.frame_ended()?;
            }
        }
        Ok(pings)
    }

    fn frame_ended(&mut self) -> anyhow::Result<u32> {
        match self.opcode {
            OP_PING => Ok(1),
            OP_CLOSE => bail!("relay closed the connection"),
            _ => Ok(0),
        }
    }
}

/// A frame header: (opcode, payload length, header length), or `None`
/// while incomplete.
fn parse_header(bytes: &[u8]) -> anyhow::Result<Option<(u8, u64, usize)>> {
    if bytes.len() < 2 {
        return Ok(None);
    }
    if bytes[0] & 0x80 == 0 {
        bail!("fragmented frame (FIN clear): not something the relay sends");
    }
    if bytes[1] & 0x80 != 0 {
        bail!("masked frame from the relay");
    }
    let (len, header_len) = match bytes[1] & 0x7F {
        126 if bytes.len() < 4 => return Ok(None),
        126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as u64, 4),
        127 if bytes.len() < 10 => return Ok(None),
        127 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&bytes[2..10]);
            (u64::from_be_bytes(n), 10)
        }
        n => (n as u64, 2),
    };
    Ok(Some((bytes[0] & 0x0F, len, header_len)))
}

/// A whole frame at the start of `buf`: (opcode, payload range, frame
/// length), or `None` while incomplete.
fn parse_frame(buf: &[u8]) -> anyhow::Result<Option<(u8, std::ops::Range<usize>, usize)>> {
    let Some((opcode, len, header_len)) = parse_header(buf)? else {
        return Ok(None);
    };
    let total = header_len + usize::try_from(len)?;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((opcode, header_len..total, total)))
}

fn close_reason(payload: &[u8]) -> String {
    if payload.len() < 2 {
        return "no code".into();
    }
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    format!("{code} {}", String::from_utf8_lossy(&payload[2..]))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipper_counts_pings_split_anywhere() {
        // A text frame of 130 bytes (16-bit length), a ping, a ping.
        let mut stream = vec![0x81, 126, 0, 130];
        stream.extend(std::iter::repeat_n(b'x', 130));
        stream.extend([0x89, 0, 0x89, 0]);
        for split in 0..stream.len() {
            let mut s = Skipper::default();
            let pings = s.feed(&stream[..split]).unwrap() + s.feed(&stream[split..]).unwrap();
            assert_eq!(pings, 2, "split at {split}");
        }
    }

    #[test]
    fn skipper_reports_close() {
        let mut s = Skipper::default();
        assert!(s.feed(&[0x88, 2, 0x03, 0xE8]).is_err());
    }
}
