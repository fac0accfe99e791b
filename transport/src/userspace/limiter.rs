//! Handshake rate limiting per source address, on top of boringtun's device-wide cookie limiter.
//!
//! boringtun's [`RateLimiter`](boringtun::noise::rate_limiter::RateLimiter) counts handshake
//! messages with a valid MAC1; past [`HANDSHAKE_RATE_LIMIT`](super::device) a second it answers
//! each with a cookie reply and admits only messages carrying a valid MAC2 for their source
//! address. That stops spoofed floods (a spoofed source never receives its cookie) but not a
//! real address that fetched a cookie and keeps sending initiations, each of which costs the
//! responder Diffie-Hellman work. While the device is under load, [`PerSource`] therefore also
//! holds every source address to wireguard-go's budget: 20 handshake messages a second, bursts
//! of 5. A device that is not under load limits nobody, so peers re-keying quickly (or a test
//! forcing handshakes) are untouched.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

/// Handshake messages a second per source address under load (wireguard-go's ratelimiter).
pub const PER_SOURCE_RATE: u64 = 20;
/// Messages a source may send at once after being quiet.
pub const PER_SOURCE_BURST: u64 = 5;
/// Sources remembered at most; a new one beyond them is refused while under load (memory stays
/// bounded whatever the flood; the table is swept every second).
const MAX_SOURCES: usize = 1 << 16;
/// A source quiet this long is forgotten (its bucket would be full again anyway).
const FORGET_AFTER: Duration = Duration::from_secs(1);

/// One source's token bucket, in nanoseconds of budget (each message costs 1 s / rate).
struct Bucket {
    budget_ns: u64,
    last: Instant,
}

const COST_NS: u64 = 1_000_000_000 / PER_SOURCE_RATE;
const MAX_BUDGET_NS: u64 = COST_NS * PER_SOURCE_BURST;

/// The device's load (handshake messages admitted this second) and the per-source buckets.
pub struct PerSource {
    /// Handshake messages that passed boringtun's limiter since the last [`PerSource::tick`].
    this_second: AtomicU64,
    /// The device-wide limit at which boringtun starts demanding cookies.
    load_limit: u64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl PerSource {
    pub fn new(load_limit: u64) -> Self {
        PerSource {
            this_second: AtomicU64::new(0),
            load_limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a handshake message from `src`, already admitted by boringtun's limiter, may be
    /// processed: always while the device is not under load, else within `src`'s budget.
    pub fn allow(&self, src: IpAddr, now: Instant) -> bool {
        if self.this_second.fetch_add(1, Ordering::Relaxed) < self.load_limit {
            return true;
        }
        let mut buckets = self.buckets.lock().expect("limiter lock");
        let full = buckets.len() >= MAX_SOURCES;
        let b = match buckets.get_mut(&src) {
            Some(b) => b,
            None if full => return false,
            None => buckets.entry(src).or_insert(Bucket {
                budget_ns: MAX_BUDGET_NS,
                last: now,
            }),
        };
        let earned = now.saturating_duration_since(b.last).as_nanos();
        b.budget_ns = (u128::from(b.budget_ns) + earned).min(u128::from(MAX_BUDGET_NS)) as u64;
        b.last = now;
        if b.budget_ns >= COST_NS {
            b.budget_ns -= COST_NS;
            true
        } else {
            false
        }
    }

    /// Once a second (with boringtun's `reset_count`): a new second of load, quiet sources
    /// forgotten.
    pub fn tick(&self, now: Instant) {
        self.this_second.store(0, Ordering::Relaxed);
        self.buckets
            .lock()
            .expect("limiter lock")
            .retain(|_, b| now.saturating_duration_since(b.last) < FORGET_AFTER);
    }

    #[cfg(test)]
    fn sources(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0xc612_0000 + n))
    }

    #[test]
    fn below_the_device_limit_nobody_is_limited() {
        let l = PerSource::new(100);
        let t = Instant::now();
        assert!((0..100).all(|_| l.allow(ip(1), t)));
        assert_eq!(l.sources(), 0);
    }

    #[test]
    fn under_load_a_source_gets_its_burst_then_its_rate() {
        let l = PerSource::new(0);
        let t = Instant::now();
        let burst = (0..50).filter(|_| l.allow(ip(1), t)).count();
        assert_eq!(burst as u64, PER_SOURCE_BURST);
        // Another source has its own bucket.
        assert!(l.allow(ip(2), t));
        // One second later: 20 more, not 50.
        let t1 = t + Duration::from_secs(1);
        let next = (0..50).filter(|_| l.allow(ip(1), t1)).count();
        assert_eq!(
            next as u64, PER_SOURCE_BURST,
            "the budget refills to the burst, no more"
        );
        // A steady 20 per second passes, a 21st within the same 50 ms does not.
        let mut now = t1 + Duration::from_secs(1);
        let mut passed = 0;
        for i in 0..200 {
            now += Duration::from_millis(10);
            passed += u64::from(l.allow(ip(3), now)) * u64::from(i >= 100);
        }
        assert_eq!(passed, PER_SOURCE_RATE, "100 tries in 1 s after the burst");
    }

    #[test]
    fn the_table_is_bounded_and_swept() {
        let l = PerSource::new(0);
        let t = Instant::now();
        for n in 0..MAX_SOURCES as u32 {
            assert!(l.allow(ip(n), t));
        }
        // Full: a new source is refused, a known one still has its budget.
        assert!(!l.allow(ip(MAX_SOURCES as u32), t));
        assert!(l.allow(ip(7), t));
        // The sweep forgets quiet sources and resets the load.
        l.tick(t + FORGET_AFTER);
        assert_eq!(l.sources(), 0);
        assert!(l.allow(ip(MAX_SOURCES as u32), t + FORGET_AFTER));
        let l = PerSource::new(3);
        l.tick(t);
        assert!((0..3).all(|_| l.allow(ip(1), t)));
        assert_eq!(l.sources(), 0, "not under load yet");
    }
}
