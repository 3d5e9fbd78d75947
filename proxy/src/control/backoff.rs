//! Reconnect delays: exponential with jitter, so that the proxies that lost the same operator
//! replica do not all come back in the same instant.

use std::time::Duration;

/// The delay policy: the first retry waits about `initial`, each failure after it doubles the
/// step up to `max`, and every delay is jittered to between half and all of its step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    /// 125–250 ms for the first retry (an operator replica that restarts is often back at
    /// once), at most 30 s.
    fn default() -> Self {
        Self { initial: Duration::from_millis(250), max: Duration::from_secs(30) }
    }
}

impl Backoff {
    /// The delay before retry `attempt` (0 is the first retry), for `jitter` in `[0, 1]`:
    /// between half and all of `min(initial × 2^attempt, max)`.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let step = self.initial.saturating_mul(2u32.saturating_pow(attempt)).min(self.max);
        step.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// A fresh sequence of retries under this policy.
    pub fn retries(self) -> Retries {
        Retries { policy: self, attempt: 0 }
    }
}

/// Where a reconnecting client is in its sequence of retries.
#[derive(Debug)]
pub struct Retries {
    policy: Backoff,
    attempt: u32,
}

impl Retries {
    /// The delay before the next retry; each call moves one step on.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.policy.delay(self.attempt, fastrand::f64());
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Starts over from the first step (after a stream that worked).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JITTERS: [f64; 5] = [0.0, 0.25, 0.5, 0.75, 1.0];

    #[test]
    fn first_retry_comes_well_under_a_second() {
        for jitter in JITTERS {
            let delay = Backoff::default().delay(0, jitter);
            assert!(delay > Duration::ZERO && delay <= Duration::from_millis(250), "{delay:?}");
        }
    }

    #[test]
    fn each_delay_lies_between_half_and_all_of_its_doubled_step() {
        let policy = Backoff::default();
        for attempt in 0..7 {
            let step = Duration::from_millis(250) * 2u32.pow(attempt);
            assert_eq!(policy.delay(attempt, 0.0), step / 2, "attempt {attempt}");
            assert_eq!(policy.delay(attempt, 1.0), step, "attempt {attempt}");
            for jitter in JITTERS {
                let delay = policy.delay(attempt, jitter);
                assert!(delay >= step / 2 && delay <= step, "attempt {attempt}, jitter {jitter}: {delay:?}");
            }
        }
    }

    #[test]
    fn delays_are_capped_at_30s_however_many_retries_failed() {
        let policy = Backoff::default();
        for attempt in [7, 8, 20, 31, 32, 1_000, u32::MAX] {
            for jitter in JITTERS {
                let delay = policy.delay(attempt, jitter);
                assert!(delay >= Duration::from_secs(15) && delay <= Duration::from_secs(30), "{attempt}: {delay:?}");
            }
        }
    }

    #[test]
    fn jitter_outside_zero_to_one_is_held_to_the_bounds() {
        let policy = Backoff::default();
        assert_eq!(policy.delay(0, -3.0), Duration::from_millis(125));
        assert_eq!(policy.delay(0, 7.0), Duration::from_millis(250));
    }

    #[test]
    fn retries_grow_then_start_over_after_a_reset() {
        let mut retries = Backoff::default().retries();
        let first = retries.next_delay();
        assert!(first <= Duration::from_millis(250), "{first:?}");
        for _ in 0..20 {
            retries.next_delay();
        }
        assert!(retries.next_delay() >= Duration::from_secs(15));
        retries.reset();
        assert!(retries.next_delay() <= Duration::from_millis(250));
    }
}
