//! A TCP fault proxy between the relay and Postgres: the network faults of
//! production, on 127.0.0.1, on demand.
//!
//! - `freeze_existing`: the connections open now stop forwarding in both
//!   directions, without a reset (a half-open partition). New connections
//!   pass. Until `heal`, or forever.
//! - `freeze_all`: the same for new connections too (they are accepted and
//!   then hear nothing): the database is out of reach.
//! - `reset_existing`: every connection open now is closed with a TCP reset
//!   (SO_LINGER 0).
//! - `set_latency`: every chunk is held this long in each direction, order
//!   kept.
//! - `refuse_new`: new connections are closed as soon as they are accepted
//!   (the server is out of reach for newcomers; connections open now keep
//!   working). Until `heal`.
//!
//! A frozen connection is the hardest case for the relay: the proxy's
//! kernel still acknowledges what the relay sends and answers its
//! keepalives, so only the relay's own deadlines can find it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Default)]
struct Faults {
    latency: Duration,
    /// Connections with an id below this forward nothing.
    frozen_below: u64,
    /// Connections with an id below this are reset.
    reset_below: u64,
    /// New connections are closed at once.
    refusing: bool,
}

/// A running proxy; dropping it closes every connection through it.
pub struct FaultProxy {
    pub port: u16,
    upstream_port: u16,
    faults: watch::Sender<Faults>,
    next_id: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl FaultProxy {
    /// Starts a proxy on a free port of 127.0.0.1 to `127.0.0.1:upstream`.
    pub async fn start(upstream_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fault proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (faults, _) = watch::channel(Faults::default());
        let next_id = Arc::new(AtomicU64::new(1));
        let stop = CancellationToken::new();
        let upstream: SocketAddr = ([127, 0, 0, 1], upstream_port).into();
        {
            let faults = faults.subscribe();
            let next_id = next_id.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    let (client, _) = tokio::select! {
                        _ = stop.cancelled() => return,
                        accepted = listener.accept() => match accepted {
                            Ok(a) => a,
                            Err(_) => continue,
                        },
                    };
                    if faults.borrow().refusing {
                        drop(client);
                        continue;
                    }
                    let id = next_id.fetch_add(1, Relaxed);
                    let faults = faults.clone();
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = forward(id, client, server, faults) => {}
                        }
                    });
                }
            });
        }
        FaultProxy {
            port,
            upstream_port,
            faults,
            next_id,
            stop,
        }
    }

    /// `url` (a URL of the upstream server) through this proxy.
    pub fn url(&self, url: &str) -> String {
        let from = format!("127.0.0.1:{}", self.upstream_port);
        assert!(
            url.contains(&from),
            "{url} is not a URL of port {}",
            self.upstream_port
        );
        url.replace(&from, &format!("127.0.0.1:{}", self.port))
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.next_id.load(Relaxed) - 1
    }

    /// Half-open partition of every connection open now.
    pub fn freeze_existing(&self) {
        let below = self.next_id.load(Relaxed);
        self.faults.send_modify(|f| f.frozen_below = below);
    }

    /// Half-open partition of every connection, new ones included.
    pub fn freeze_all(&self) {
        self.faults.send_modify(|f| f.frozen_below = u64::MAX);
    }

    /// Ends every partition, and refuses no one.
    pub fn heal(&self) {
        self.faults.send_modify(|f| {
            f.frozen_below = 0;
            f.refusing = false;
        });
    }

    /// Closes every new connection at once, until `heal`.
    pub fn refuse_new(&self) {
        self.faults.send_modify(|f| f.refusing = true);
    }

    /// Resets every connection open now.
    pub fn reset_existing(&self) {
        let below = self.next_id.load(Relaxed);
        self.faults.send_modify(|f| f.reset_below = below);
    }

    /// Holds every chunk this long, in each direction.
    pub fn set_latency(&self, latency: Duration) {
        self.faults.send_modify(|f| f.latency = latency);
    }
}

/// Forwards one connection until either side closes or a fault ends it.
async fn forward(
    id: u64,
    mut client: TcpStream,
    mut server: TcpStream,
    mut faults: watch::Receiver<Faults>,
) {
    let reset = {
        let (mut client_in, mut client_out) = client.split();
        let (mut server_in, mut server_out) = server.split();
        let mut to_server: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
        let mut to_client: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
        let mut from_client = vec![0u8; 16 * 1024];
        let mut from_server = vec![0u8; 16 * 1024];
        let (mut client_done, mut server_done) = (false, false);
        let far = Instant::now() + Duration::from_secs(86_400);
        loop {
            let f = faults.borrow_and_update().clone();
            if id < f.reset_below {
                break true;
            }
            if (client_done && to_server.is_empty()) || (server_done && to_client.is_empty()) {
                break false;
            }
            let frozen = id < f.frozen_below;
            let next_server = to_server.front().map(|(at, _)| *at);
            let next_client = to_client.front().map(|(at, _)| *at);
            tokio::select! {
                changed = faults.changed() => {
                    if changed.is_err() {
                        break false;
                    }
                }
                n = client_in.read(&mut from_client), if !frozen && !client_done => match n {
                    Ok(0) | Err(_) => client_done = true,
                    Ok(n) => to_server.push_back((Instant::now() + f.latency, from_client[..n].to_vec())),
                },
                n = server_in.read(&mut from_server), if !frozen && !server_done => match n {
                    Ok(0) | Err(_) => server_done = true,
                    Ok(n) => to_client.push_back((Instant::now() + f.latency, from_server[..n].to_vec())),
                },
                _ = tokio::time::sleep_until(next_server.unwrap_or(far)), if !frozen && next_server.is_some() => {
                    if let Some((_, chunk)) = to_server.pop_front() {
                        if server_out.write_all(&chunk).await.is_err() {
                            break false;
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_client.unwrap_or(far)), if !frozen && next_client.is_some() => {
                    if let Some((_, chunk)) = to_client.pop_front() {
                        if client_out.write_all(&chunk).await.is_err() {
                            break false;
                        }
                    }
                }
            }
        }
    };
    if reset {
        // A zero linger makes close() send a reset at once; it is a
        // non-zero linger that would block the thread on drop.
        #[allow(deprecated)]
        {
            let _ = client.set_linger(Some(Duration::ZERO));
            let _ = server.set_linger(Some(Duration::ZERO));
        }
    }
}
