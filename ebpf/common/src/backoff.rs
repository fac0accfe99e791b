//! The one retry backoff of every veil process: capped exponential, optionally with "equal
//! jitter". Pure arithmetic on `core::time::Duration` (no clock, no randomness source), so the
//! callers' state machines stay testable and each caller supplies its own random bits.

use core::time::Duration;

/// Attempt `n` (0-based) waits `min(max, initial·2ⁿ)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max }
    }

    /// The delay before retry `attempt`, without jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay with "equal jitter": uniform in `[d/2, d]` for `d = delay(attempt)`, drawn from
    /// `random` (any 64 random bits). Never zero unless `initial` is, so nothing busy-loops, and
    /// spread so clients of a restarted server do not come back in lockstep.
    pub fn jittered(&self, attempt: u32, random: u64) -> Duration {
        let ceiling = self.delay(attempt);
        let floor = ceiling / 2;
        let span = (ceiling - floor).as_nanos() as u64;
        floor + Duration::from_nanos(random % span.saturating_add(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_jitters_within_half() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let ms = |d: Duration| d.as_millis() as u64;
        let plain: [u64; 8] = core::array::from_fn(|n| ms(b.delay(n as u32)));
        assert_eq!(plain, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(2));
        for (n, hi) in plain.iter().enumerate() {
            for r in [0, 1, 12_345_678_901, u64::MAX] {
                let d = ms(b.jittered(n as u32, r));
                assert!(d >= hi / 2 && d <= *hi, "{d} not in [{}, {hi}]", hi / 2);
            }
        }
        assert_ne!(b.jittered(7, 1), b.jittered(7, 987_654_321));
    }
}
