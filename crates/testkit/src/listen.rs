//! A direct LISTEN connection to Postgres: the doorbells themselves, as any
//! app that LISTENs gets them, and the floor no NOTIFY-based relay can
//! beat.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::{now_us, Error, Result};

/// One notification as it arrived.
pub struct Notice {
    /// When it was read off the connection ([`now_us`]), before any queue,
    /// so a latency measured from it is the connection's own.
    pub at_us: u64,
    pub payload: String,
}

/// A connection LISTENing on one channel; notices arrive in `rx` in
/// arrival order.
pub struct Notices {
    pub rx: UnboundedReceiver<Notice>,
    /// Kept so the connection stays open; it is only ever driven for
    /// notifications.
    _client: Client,
}

impl Notices {
    /// Connects and LISTENs. The connection is driven with `poll_message`,
    /// the only way tokio-postgres surfaces notifications (spawning it as a
    /// plain future drops them).
    pub async fn listen(url: &str, channel: &str) -> Result<Notices> {
        let (client, mut conn) = tokio_postgres::connect(url, NoTls).await?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message {
                    let notice = Notice {
                        at_us: now_us(),
                        payload: n.payload().to_string(),
                    };
                    if tx.send(notice).is_err() {
                        break;
                    }
                }
            }
        });
        client.batch_execute(&format!("LISTEN {channel}")).await?;
        Ok(Notices {
            rx,
            _client: client,
        })
    }

    /// The next notice; an error if none comes within `wait` or the
    /// connection has closed.
    pub async fn next(&mut self, wait: Duration) -> Result<Notice> {
        tokio::time::timeout(wait, self.rx.recv())
            .await
            .map_err(|_| Error::Timeout(wait))?
            .ok_or(Error::Ended)
    }
}
