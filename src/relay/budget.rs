//! One budget, for the whole relay, of catch-up data in memory (G7).
//!
//! A session that is behind its topic's ring reads batches from the log.
//! Each batch is reserved here, in bytes, before it is read and given back
//! as soon as it is written or let go. So however many clients lag, stall
//! or resume at once, the batches they hold together never exceed the
//! budget: a read that does not fit waits (and is counted as deferred)
//! until others give bytes back. What a waiting client would have been
//! sent stays in the log.
//!
//! Nothing holds a reservation while it waits on a socket: a session whose
//! socket stops taking bytes lets its batch go (see `session`), so the
//! budget turns over in the time of a read, and a crowd of stalled clients
//! cannot keep it from clients that read.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::metrics::Metrics;

/// The relay-wide budget: one semaphore permit per byte.
pub struct CatchupBudget {
    bytes: Semaphore,
    /// The budget's size, the most any one reservation may take.
    limit: usize,
    metrics: Arc<Metrics>,
}

/// Bytes reserved for one batch; given back on drop.
pub struct Reservation<'a> {
    permit: SemaphorePermit<'a>,
    metrics: &'a Metrics,
}

impl CatchupBudget {
    pub fn new(limit: usize, metrics: Arc<Metrics>) -> Self {
        // A semaphore counts at most `MAX_PERMITS`, and one read reserves
        // at most u32::MAX bytes.
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        metrics.catchup_budget_bytes.store(limit as i64, Relaxed);
        CatchupBudget {
            bytes: Semaphore::new(limit),
            limit,
            metrics,
        }
    }

    /// Reserves `bytes` (at most the whole budget), waiting while the
    /// budget is spent; a wait is counted as a deferred read.
    pub async fn reserve(&self, bytes: usize) -> Reservation<'_> {
        let n = self.clamp(bytes);
        let permit = match self.bytes.try_acquire_many(n) {
            Ok(permit) => permit,
            Err(_) => {
                self.metrics.catchup_deferred.fetch_add(1, Relaxed);
                // The semaphore is never closed.
                match self.bytes.acquire_many(n).await {
                    Ok(permit) => permit,
                    Err(_) => unreachable!("the catch-up budget is never closed"),
                }
            }
        };
        self.metrics
            .catchup_bytes
            .fetch_add(permit.num_permits() as i64, Relaxed);
        Reservation {
            permit,
            metrics: &self.metrics,
        }
    }

    /// Bytes reserved right now.
    pub fn in_use(&self) -> usize {
        self.limit - self.bytes.available_permits()
    }

    fn clamp(&self, bytes: usize) -> u32 {
        bytes.clamp(1, self.limit).min(u32::MAX as usize) as u32
    }
}

impl Reservation<'_> {
    pub fn bytes(&self) -> usize {
        self.permit.num_permits()
    }

    /// Gives back what a read did not use. (A single event larger than
    /// the reservation is still read whole: the log returns at least one
    /// row. It is held as it is, a bounded overshoot of one event.)
    pub fn shrink_to(&mut self, bytes: usize) {
        let keep = bytes.max(1);
        if keep < self.permit.num_permits() {
            let extra = self.permit.num_permits() - keep;
            if let Some(returned) = self.permit.split(extra) {
                self.metrics.catchup_bytes.fetch_sub(extra as i64, Relaxed);
                drop(returned);
            }
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.metrics
            .catchup_bytes
            .fetch_sub(self.permit.num_permits() as i64, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_wait_for_the_budget_and_give_it_back() {
        let metrics = Arc::new(Metrics::default());
        let budget = Arc::new(CatchupBudget::new(1000, metrics.clone()));
        let mut a = budget.reserve(800).await;
        assert_eq!(budget.in_use(), 800);
        a.shrink_to(300);
        assert_eq!(budget.in_use(), 300);
        assert_eq!(metrics.catchup_bytes.load(Relaxed), 300);
        // More than what is left waits, and is counted as deferred.
        let waiting = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.reserve(900).await.bytes() })
        };
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        assert_eq!(metrics.catchup_deferred.load(Relaxed), 1);
        drop(a);
        assert_eq!(waiting.await.expect("task"), 900);
        assert_eq!(budget.in_use(), 0);
        assert_eq!(metrics.catchup_bytes.load(Relaxed), 0);
        // A reservation larger than the budget takes the whole budget.
        assert_eq!(budget.reserve(5000).await.bytes(), 1000);
    }
}
