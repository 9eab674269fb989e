//! Token buckets: how the relay says "this many per second, twice that in
//! a burst" to a connection's frames and to a project's signals.

use tokio::time::Instant;

/// `rate` per second sustained, `2 * rate` in a burst.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        TokenBucket {
            rate,
            tokens: rate * 2.0,
            last: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.rate * 2.0);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_twice_its_rate_at_once_then_refuses() {
        let mut bucket = TokenBucket::new(10);
        let taken = (0..100).filter(|_| bucket.take()).count();
        // 20 at once; the loop may run long enough to earn one more.
        assert!((20..=21).contains(&taken), "{taken}");
    }
}
