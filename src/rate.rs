//! Rate limits: a token bucket, and the per-user buckets of HTTP publish.
//!
//! WebSocket limits are per connection (`limits.publish_rate`,
//! `limits.subscribe_rate`), each a [`TokenBucket`] owned by the
//! connection's task. HTTP publishes are limited per token subject
//! (`limits.http_publish_rate`) by [`PerUser`], shared by the node's
//! workers: per node, not across the cluster.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Users tracked before buckets back at their full burst (idle users) are
/// dropped; the sweep then waits until twice as many are tracked.
const SWEEP_MIN: usize = 1024;

/// `rate` operations per second, bursts up to `rate`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(per_second: u32) -> TokenBucket {
        let rate = f64::from(per_second);
        TokenBucket {
            rate,
            tokens: rate,
            last: Instant::now(),
        }
    }

    /// Its rate, per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Moves its rate (and burst) to `per_second`, keeping the tokens it
    /// holds up to the new burst.
    fn set_rate(&mut self, per_second: u32) {
        self.refill();
        self.rate = f64::from(per_second);
        self.tokens = self.tokens.min(self.rate);
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self) -> bool {
        self.try_take_n(1).is_ok()
    }

    /// Takes `n` tokens if there are that many; otherwise takes none and
    /// says how long until there will be (never, for more than the burst:
    /// `None`).
    pub fn try_take_n(&mut self, n: u32) -> Result<(), Option<Duration>> {
        self.refill();
        let n = f64::from(n);
        if self.tokens >= n {
            self.tokens -= n;
            return Ok(());
        }
        if n > self.rate {
            return Err(None);
        }
        Err(Some(Duration::from_secs_f64((n - self.tokens) / self.rate)))
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
    }

    /// Whether the bucket is back at its full burst (its user is idle).
    fn is_full(&mut self) -> bool {
        self.refill();
        self.tokens >= self.rate
    }
}

/// One [`TokenBucket`] per user (token `sub`). Memory stays bounded by the
/// users active within about a second: idle ones are swept.
pub struct PerUser {
    rate: u32,
    buckets: Mutex<Buckets>,
}

struct Buckets {
    by_sub: HashMap<String, TokenBucket>,
    sweep_at: usize,
}

impl PerUser {
    pub fn new(per_second: u32) -> PerUser {
        PerUser {
            rate: per_second,
            buckets: Mutex::new(Buckets {
                by_sub: HashMap::new(),
                sweep_at: SWEEP_MIN,
            }),
        }
    }

    /// The configured rate, per second.
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Takes `n` tokens from `sub`'s bucket (see [`TokenBucket::try_take_n`]),
    /// which refills at `rate` (the configured [`rate`](Self::rate), or the
    /// one the user's token sets).
    pub fn try_take(&self, sub: &str, rate: u32, n: u32) -> Result<(), Option<Duration>> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let result = match buckets.by_sub.get_mut(sub) {
            Some(bucket) => {
                if bucket.rate != f64::from(rate) {
                    bucket.set_rate(rate);
                }
                bucket.try_take_n(n)
            }
            None => {
                let mut bucket = TokenBucket::new(rate);
                let result = bucket.try_take_n(n);
                buckets.by_sub.insert(sub.to_owned(), bucket);
                result
            }
        };
        if buckets.by_sub.len() >= buckets.sweep_at {
            buckets.by_sub.retain(|_, bucket| !bucket.is_full());
            buckets.sweep_at = (buckets.by_sub.len() * 2).max(SWEEP_MIN);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_of_rate_then_refuses() {
        let mut bucket = TokenBucket::new(5);
        assert!((0..5).all(|_| bucket.try_take()));
        assert!(!bucket.try_take());
    }

    #[test]
    fn takes_many_at_once_and_says_how_long_to_wait() {
        let mut bucket = TokenBucket::new(10);
        assert_eq!(bucket.try_take_n(8), Ok(()));
        let wait = bucket.try_take_n(5).unwrap_err().unwrap();
        assert!(wait > Duration::from_millis(200) && wait <= Duration::from_millis(300));
        assert_eq!(bucket.try_take_n(11), Err(None));
    }

    #[test]
    fn users_have_buckets_of_their_own() {
        let users = PerUser::new(2);
        assert!(users.try_take("a", 2, 2).is_ok());
        assert!(users.try_take("a", 2, 1).is_err());
        assert!(users.try_take("b", 2, 2).is_ok());
    }
}
