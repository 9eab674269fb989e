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
//! A receiving client ([`Conn::receive`]) reads into one buffer per
//! thread, not one per connection, and hands every text frame of a read
//! to its caller: a thousand subscribers at a thousand events a second
//! cost the load generator one read per wake-up and a scan of the bytes,
//! not a tungstenite message per frame.
//!
//! Only what the relay sends is understood: unfragmented frames, no
//! extensions. A close frame, or anything unexpected, ends the client with
//! an error, so a connection the relay dropped is counted, not hidden.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
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

/// Bytes asked of the socket per read by a receiving client: many frames
/// of a few hundred bytes each.
const READ_CHUNK: usize = 64 * 1024;

thread_local! {
    /// The buffer every receiving connection on this thread reads into.
    /// It is borrowed only inside one poll of one connection (never
    /// across an await), so the connections of a thread share it.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

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

    /// Subscribes to `project` and waits for its `subscribed` frame;
    /// returns the seq it names (0 when the project has no event yet), the
    /// last one before this subscription's events.
    pub async fn subscribe(&mut self, project: &str, wait: Duration) -> anyhow::Result<u64> {
        let request = testkit::ws::subscribe_request(project, None).to_string();
        self.send_text(&request).await?;
        let frame = self.next_text(wait).await?;
        if !frame.contains(r#""type":"subscribed""#) {
            bail!("expected subscribed, got {frame}");
        }
        Ok(crate::subscriber::seq_of(&frame).unwrap_or(0))
    }

    /// Receives until `stop`, handing each text frame's payload to
    /// `on_text` with the time its read returned ([`testkit::now_us`]);
    /// pings are answered. Each wake-up is one read of up to 64 KiB into
    /// the thread's buffer, every whole frame in it handled at once; only
    /// a frame cut by the read's end is kept, in the connection's own
    /// (usually empty) buffer. `Err`: the relay closed or ended the
    /// connection, or a read failed.
    pub async fn receive(
        self,
        stop: &CancellationToken,
        mut on_text: impl FnMut(&[u8], u64),
    ) -> anyhow::Result<()> {
        let Conn {
            mut stream,
            buf: mut kept,
        } = self;
        // Frames that came with the `subscribed` reply.
        let (mut pings, used) = split_frames(&kept, testkit::now_us(), &mut on_text)?;
        kept.drain(..used);
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        loop {
            for _ in 0..pings {
                stream.write_all(&PONG).await?;
            }
            pings = tokio::select! {
                biased;
                _ = &mut stopped => return Ok(()),
                read = std::future::poll_fn(|cx| poll_frames(&mut stream, &mut kept, cx, &mut on_text)) => read?,
            };
        }
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

/// One read into the thread's buffer, behind the bytes `kept` from the
/// last one; hands out the whole frames and keeps the rest. Ready with
/// the pings read. A read through `poll_read` that fills less than it was
/// offered tells tokio the socket is drained, so a wake-up costs one
/// `read` call, not a second one that would block.
fn poll_frames(
    stream: &mut TcpStream,
    kept: &mut Vec<u8>,
    cx: &mut TaskContext<'_>,
    on_text: &mut impl FnMut(&[u8], u64),
) -> Poll<anyhow::Result<u32>> {
    SCRATCH.with_borrow_mut(|scratch| {
        let carried = kept.len();
        if scratch.len() < carried + READ_CHUNK {
            scratch.resize(carried + READ_CHUNK, 0);
        }
        let mut read = ReadBuf::new(&mut scratch[carried..]);
        match Pin::new(&mut *stream).poll_read(cx, &mut read) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            Poll::Ready(Ok(())) => {}
        }
        let n = read.filled().len();
        if n == 0 {
            return Poll::Ready(Err(anyhow::anyhow!("relay ended the connection")));
        }
        scratch[..carried].copy_from_slice(kept);
        let bytes = &scratch[..carried + n];
        Poll::Ready(
            split_frames(bytes, testkit::now_us(), on_text).map(|(pings, used)| {
                kept.clear();
                kept.extend_from_slice(&bytes[used..]);
                pings
            }),
        )
    })
}

/// Hands every whole text frame at the start of `bytes` to `on_text`
/// (stamped `at`); returns the pings among them and the bytes they span.
fn split_frames(
    bytes: &[u8],
    at: u64,
    on_text: &mut impl FnMut(&[u8], u64),
) -> anyhow::Result<(u32, usize)> {
    let (mut pings, mut used) = (0, 0);
    while let Some((opcode, range, total)) = parse_frame(&bytes[used..])? {
        let payload = &bytes[used + range.start..used + range.end];
        match opcode {
            OP_TEXT => on_text(payload, at),
            OP_PING => pings += 1,
            OP_CLOSE => bail!("relay closed: {}", close_reason(payload)),
            _ => {}
        }
        used += total;
    }
    Ok((pings, used))
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
    fn split_frames_hands_out_whole_frames_and_keeps_the_rest() {
        let text = |s: &str| {
            let mut f = vec![0x81, s.len() as u8];
            f.extend_from_slice(s.as_bytes());
            f
        };
        let mut stream = text("one");
        stream.extend([0x89, 0]);
        stream.extend(text("two"));
        for cut in 0..=stream.len() {
            let mut got = Vec::new();
            let (pings, used) = split_frames(&stream[..cut], 7, &mut |p: &[u8], at| {
                got.push((p.to_vec(), at))
            })
            .unwrap();
            let mut rest = stream[used..cut].to_vec();
            rest.extend_from_slice(&stream[cut..]);
            let (more_pings, more_used) =
                split_frames(&rest, 8, &mut |p: &[u8], at| got.push((p.to_vec(), at))).unwrap();
            assert_eq!(more_used, rest.len(), "cut at {cut}");
            assert_eq!(pings + more_pings, 1, "cut at {cut}");
            let payloads: Vec<&[u8]> = got.iter().map(|(p, _)| p.as_slice()).collect();
            assert_eq!(payloads, [&b"one"[..], b"two"], "cut at {cut}");
        }
    }

    #[test]
    fn split_frames_reports_close() {
        let r = split_frames(&[0x88, 2, 0x03, 0xE8], 0, &mut |_: &[u8], _| {});
        assert!(r.is_err());
    }

    #[test]
    fn skipper_reports_close() {
        let mut s = Skipper::default();
        assert!(s.feed(&[0x88, 2, 0x03, 0xE8]).is_err());
    }
}
