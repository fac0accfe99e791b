//! Reconnect backoff of the SPIRE clients: an attempt counter around veil's one backoff
//! ([`veil_common::backoff::Backoff`], capped exponential with equal jitter).

use std::time::Duration;

use rand::Rng;

/// Reconnect policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackoffConfig {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

/// Delay `n` is uniform in `[d/2, d]` with `d = min(max, initial·2ⁿ)`.
#[derive(Debug)]
pub(crate) struct Backoff {
    cfg: BackoffConfig,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(cfg: BackoffConfig) -> Self {
        Self { cfg, attempt: 0 }
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    pub(crate) fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let b = veil_common::backoff::Backoff::new(self.cfg.initial, self.cfg.max);
        let d = b.jittered(self.attempt, rng.random());
        self.attempt = self.attempt.saturating_add(1);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_jitters_and_resets() {
        let cfg = BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let mut b = Backoff::new(cfg);
        let mut rng = rand::rng();
        let bounds = [100u64, 200, 400, 800, 1600, 2000, 2000, 2000];
        for hi in bounds {
            let d = b.next_delay(&mut rng).as_millis() as u64;
            assert!(d >= hi / 2 && d <= hi, "{d} not in [{}, {hi}]", hi / 2);
        }
        // Jitter: many draws at the cap are not all equal.
        let draws: std::collections::BTreeSet<_> =
            (0..20).map(|_| b.next_delay(&mut rng)).collect();
        assert!(draws.len() > 1);
        b.reset();
        assert!(b.next_delay(&mut rng) <= Duration::from_millis(100));
    }
}
