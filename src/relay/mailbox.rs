//! What reaches one connection besides its events: broadcasts, presence
//! frames and the replies the relay owes it (G9).
//!
//! Events are never queued per connection (each session reads them from
//! its topic's ring or the log at its own pace); ephemeral signals have no
//! log to go back to, so each connection has a small queue of its own,
//! bounded in count, whose entries share their bytes with every other
//! recipient. Past the bound a broadcast is dropped (broadcasts are at
//! most once; the drop is counted), and presence frames of a scope are
//! replaced by one marker that makes the session send a fresh snapshot:
//! presence is never left wrong, only summarized.
//!
//! The mailbox is also the session's doorbell: topics ring it when they
//! publish events.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Most signals one connection holds before it drops broadcasts.
pub const MAX_QUEUED: usize = 128;

/// What kind of frame a queued signal is; decides what an overflow does
/// and when the session may write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A broadcast: at most once, dropped on overflow.
    Broadcast,
    /// A presence snapshot or diff, for subscriptions that watch presence.
    Presence,
    /// An answer to this connection's own request (an ack, an error): a
    /// client's requests are rate-limited, so these never overflow.
    Reply,
}

/// One queued frame.
#[derive(Debug, Clone)]
pub enum Signal {
    /// Written as is while the connection still subscribes to `scope`
    /// (replies are written whatever).
    Frame {
        scope: Arc<str>,
        kind: Kind,
        bytes: Utf8Bytes,
    },
    /// Presence frames of `scope` were dropped: send a fresh snapshot.
    PresenceResync { scope: Arc<str> },
}

/// One connection's doorbell and signal queue.
pub struct Mailbox {
    /// The connection's number on this relay: names it in presence and
    /// lets a sender skip its own broadcasts.
    pub conn: u64,
    /// The doorbell: a flag and the session's waker, without a lock. A
    /// topic rings every subscriber's mailbox on each publish, and the
    /// session waits on it again after every wake, so `tokio::sync::Notify`
    /// (a mutex and a waiter list on both sides) cost more per delivery.
    rung: AtomicBool,
    waker: AtomicWaker,
    queue: Mutex<VecDeque<Signal>>,
}

/// What [`Mailbox::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// A broadcast found the queue full and was dropped.
    Dropped,
    /// Presence frames were summarized into a resync marker.
    Summarized,
}

impl Mailbox {
    pub fn new(conn: u64) -> Arc<Self> {
        Arc::new(Mailbox {
            conn,
            rung: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            queue: Mutex::new(VecDeque::new()),
        })
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Signal>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rings the session: events were published, or it has more to do.
    pub fn wake(&self) {
        // Already rung: the session has not looked since, and will see it.
        if !self.rung.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Waits for the doorbell (one waiter: the session). A ring that came
    /// while nobody waited is kept, like a `Notify` permit.
    pub async fn rung(&self) {
        poll_fn(|cx| {
            if self.rung.swap(false, Ordering::AcqRel) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.rung.swap(false, Ordering::AcqRel) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Queues a frame and rings the session.
    pub fn push(&self, scope: &Arc<str>, kind: Kind, bytes: Utf8Bytes) -> Pushed {
        let pushed = {
            let mut queue = self.queue();
            if queue.len() < MAX_QUEUED || kind == Kind::Reply {
                queue.push_back(Signal::Frame {
                    scope: scope.clone(),
                    kind,
                    bytes,
                });
                Pushed::Queued
            } else if kind == Kind::Broadcast {
                return Pushed::Dropped;
            } else {
                summarize(&mut queue, scope);
                Pushed::Summarized
            }
        };
        self.wake();
        pushed
    }

    /// Asks the session to send a fresh presence snapshot of `scope`.
    pub fn resync(&self, scope: &Arc<str>) {
        summarize(&mut self.queue(), scope);
        self.wake();
    }

    /// The oldest queued signal.
    pub fn pop(&self) -> Option<Signal> {
        self.queue().pop_front()
    }

    /// Puts back a signal the socket could not take, first in line.
    pub fn unpop(&self, signal: Signal) {
        self.queue().push_front(signal);
    }

    /// Signals queued now.
    pub fn len(&self) -> usize {
        self.queue().len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue().is_empty()
    }
}

/// Replaces the presence frames of `scope` in `queue` by one resync
/// marker, where the first of them stood.
fn summarize(queue: &mut VecDeque<Signal>, scope: &Arc<str>) {
    let mut at = None;
    let mut i = 0;
    queue.retain(|signal| {
        let ours = match signal {
            Signal::Frame {
                scope: s,
                kind: Kind::Presence,
                ..
            }
            | Signal::PresenceResync { scope: s } => s == scope,
            _ => false,
        };
        if ours && at.is_none() {
            at = Some(i);
        }
        if !ours {
            i += 1;
        }
        !ours
    });
    let marker = Signal::PresenceResync {
        scope: scope.clone(),
    };
    match at {
        Some(at) => queue.insert(at, marker),
        None => queue.push_back(marker),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(s: &str) -> Utf8Bytes {
        Utf8Bytes::from(s.to_string())
    }

    #[tokio::test]
    async fn the_doorbell_keeps_one_ring_and_wakes_a_waiting_session() {
        use std::time::Duration;
        let mailbox = Mailbox::new(1);
        // Rung while nobody waited: kept, and two rings are one.
        mailbox.wake();
        mailbox.wake();
        tokio::time::timeout(Duration::from_secs(5), mailbox.rung())
            .await
            .expect("a kept ring");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), mailbox.rung())
                .await
                .is_err(),
            "two rings before a wait are one"
        );
        // Rung from another task while the session waits.
        let ringer = {
            let mailbox = mailbox.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                mailbox.wake();
            })
        };
        tokio::time::timeout(Duration::from_secs(5), mailbox.rung())
            .await
            .expect("woken by the other task");
        ringer.await.expect("ringer");
    }

    #[test]
    fn a_full_mailbox_drops_broadcasts_and_summarizes_presence() {
        let mailbox = Mailbox::new(1);
        let p: Arc<str> = Arc::from("p");
        let q: Arc<str> = Arc::from("q");
        assert_eq!(
            mailbox.push(&p, Kind::Presence, frame("p0")),
            Pushed::Queued
        );
        for i in 1..MAX_QUEUED {
            let scope = if i % 2 == 0 { &p } else { &q };
            mailbox.push(scope, Kind::Broadcast, frame(&format!("b{i}")));
        }
        assert_eq!(mailbox.len(), MAX_QUEUED);
        assert_eq!(
            mailbox.push(&p, Kind::Broadcast, frame("late")),
            Pushed::Dropped
        );
        assert_eq!(mailbox.push(&p, Kind::Reply, frame("ack")), Pushed::Queued);
        assert_eq!(
            mailbox.push(&p, Kind::Presence, frame("p1")),
            Pushed::Summarized
        );
        // p's presence frame became one marker, first in line where it
        // stood; nothing of q's was touched.
        assert!(matches!(mailbox.pop(), Some(Signal::PresenceResync { scope }) if scope == p));
        let mut rest = Vec::new();
        while let Some(signal) = mailbox.pop() {
            rest.push(signal);
        }
        assert_eq!(rest.len(), MAX_QUEUED);
        assert!(rest.iter().all(|s| matches!(s,
            Signal::Frame { kind, .. } if *kind != Kind::Presence)));
        assert!(mailbox.is_empty());
    }
}
