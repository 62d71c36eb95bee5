//! Rate limiting for the devices that move host I/O on the guest's behalf
//! (block, net, rng), so one guest cannot take all of the host's disk,
//! network or entropy.
//!
//! A limit ([`RateLimit`], plain data) is up to two token buckets: one of
//! bytes and one of operations (requests, frames). Each bucket holds one
//! second of its rate, starts full and refills continuously from a
//! monotonic clock; a one-time burst (tokens that are spent first and never
//! refilled) lets a guest start faster. A request goes when both buckets
//! can pay for it; a request larger than a whole bucket goes once the
//! bucket is full and leaves it in debt, so the long-run rate holds for any
//! request size.
//!
//! [`RateLimiter`] is the accounting alone (the clock is injectable, so it
//! is tested without sleeping). [`Throttle`] is what a device holds: a
//! limiter and a timerfd. When a request cannot go, the device leaves it in
//! its ring (nothing is lost), the throttle arms its timer for when the
//! tokens are due, and the device serves the queue again when the event
//! loop reports the timer: no busy-waiting, no sleeping on the event thread.

use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

const NANOS_PER_SEC: i128 = 1_000_000_000;

/// How fast one device may move data: unlimited by default.
///
/// Each rate set is a token bucket holding one second of it (full at
/// start, so a device can move up to one second's worth at once after it
/// was idle); the bursts are one-time extra tokens spent before the
/// bucket's. A burst without its rate has no effect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimit {
    /// Bytes per second (block: data read or written; net: frame bytes per
    /// direction; rng: random bytes).
    pub bytes_per_sec: Option<u64>,
    /// Operations per second (block requests, net frames per direction,
    /// rng requests).
    pub ops_per_sec: Option<u64>,
    /// One-time extra bytes, spent before the byte bucket's.
    pub bytes_burst: u64,
    /// One-time extra operations, spent before the operation bucket's.
    pub ops_burst: u64,
}

impl RateLimit {
    /// Whether any rate is set.
    pub fn is_limited(&self) -> bool {
        self.bytes_per_sec.is_some() || self.ops_per_sec.is_some()
    }
}

/// The limiter's time: how long since some fixed point, never going back.
pub(crate) type Clock = Arc<dyn Fn() -> Duration + Send + Sync>;

/// The monotonic clock, counted from now.
pub(crate) fn monotonic_clock() -> Clock {
    let start = Instant::now();
    Arc::new(move || start.elapsed())
}

/// One token bucket. The level is kept in token-nanoseconds (tokens times
/// 10^9) so refilling at any rate is exact integer arithmetic.
#[derive(Debug)]
struct TokenBucket {
    /// Tokens per second (> 0); the bucket holds one second of them.
    rate: u64,
    /// Tokens x 10^9; below zero after a request larger than the bucket.
    level: i128,
    /// One-time tokens left.
    burst: u64,
    /// When the level was last brought up to date.
    updated: Duration,
}

impl TokenBucket {
    fn new(rate: u64, burst: u64, now: Duration) -> Self {
        let mut bucket = Self {
            rate,
            level: 0,
            burst,
            updated: now,
        };
        bucket.level = bucket.capacity();
        bucket
    }

    fn capacity(&self) -> i128 {
        i128::from(self.rate) * NANOS_PER_SEC
    }

    fn refill(&mut self, now: Duration) {
        let elapsed = now.saturating_sub(self.updated).as_nanos();
        self.updated = self.updated.max(now);
        let added = i128::try_from(elapsed)
            .unwrap_or(i128::MAX)
            .saturating_mul(i128::from(self.rate));
        self.level = self.level.saturating_add(added).min(self.capacity());
    }

    /// How long until `cost` tokens can be taken (zero: now). More than the
    /// bucket holds can be taken once it is full.
    fn wait(&self, cost: u64) -> Duration {
        let from_bucket = i128::from(cost.saturating_sub(self.burst));
        let needed = from_bucket
            .saturating_mul(NANOS_PER_SEC)
            .min(self.capacity());
        if from_bucket == 0 || self.level >= needed {
            return Duration::ZERO;
        }
        // Rounded up: at the returned time the tokens are there.
        let rate = i128::from(self.rate);
        let nanos = (needed - self.level + rate - 1) / rate;
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    fn take(&mut self, cost: u64) {
        let from_burst = cost.min(self.burst);
        self.burst -= from_burst;
        let from_bucket = i128::from(cost - from_burst);
        self.level -= from_bucket.saturating_mul(NANOS_PER_SEC);
    }
}

/// The accounting of one [`RateLimit`]: a byte bucket and an operation
/// bucket (either absent when its rate is not set).
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    clock: Clock,
}

impl RateLimiter {
    /// A limiter for `limit`, on the monotonic clock.
    pub fn new(limit: &RateLimit) -> Self {
        Self::with_clock(limit, monotonic_clock())
    }

    /// A limiter for `limit` reading the time from `clock`.
    pub(crate) fn with_clock(limit: &RateLimit, clock: Clock) -> Self {
        let now = clock();
        let bucket = |rate: Option<u64>, burst| {
            rate.filter(|&r| r > 0)
                .map(|r| TokenBucket::new(r, burst, now))
        };
        Self {
            bytes: bucket(limit.bytes_per_sec, limit.bytes_burst),
            ops: bucket(limit.ops_per_sec, limit.ops_burst),
            clock,
        }
    }

    /// Whether any bucket is set.
    pub fn is_limited(&self) -> bool {
        self.bytes.is_some() || self.ops.is_some()
    }

    /// Pays for one operation of `bytes` if both buckets can: `Ok` (the
    /// request may go now), or `Err` with how long until they can (nothing
    /// is taken then).
    pub fn consume(&mut self, bytes: u64) -> Result<(), Duration> {
        let now = (self.clock)();
        let mut wait = Duration::ZERO;
        for (bucket, cost) in [(&mut self.bytes, bytes), (&mut self.ops, 1)] {
            if let Some(bucket) = bucket {
                bucket.refill(now);
                wait = wait.max(bucket.wait(cost));
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        for (bucket, cost) in [(&mut self.bytes, bytes), (&mut self.ops, 1)] {
            if let Some(bucket) = bucket {
                bucket.take(cost);
            }
        }
        Ok(())
    }
}

/// A device's rate limit in the event loop: a [`RateLimiter`] and, when it
/// limits anything, a timerfd (non-blocking, close-on-exec) that is armed
/// while the device waits for tokens.
pub struct Throttle {
    limiter: RateLimiter,
    timer: Option<TimerFd>,
    /// The timer is armed: the device takes no requests until it fires.
    blocked: bool,
}

impl Throttle {
    /// A throttle for `limit`; an unlimited one has no timer and lets
    /// everything through.
    pub fn new(limit: &RateLimit) -> io::Result<Self> {
        Self::with_limiter(RateLimiter::new(limit))
    }

    /// A throttle with this limiter (tests inject one with their clock).
    pub(crate) fn with_limiter(limiter: RateLimiter) -> io::Result<Self> {
        let timer = match limiter.is_limited() {
            true => Some(new_timer()?),
            false => None,
        };
        Ok(Self {
            limiter,
            timer,
            blocked: false,
        })
    }

    /// No limit at all (what every device starts with).
    pub fn unlimited() -> Self {
        Self {
            limiter: RateLimiter::new(&RateLimit::default()),
            timer: None,
            blocked: false,
        }
    }

    /// Whether the device waits for its timer (and should take nothing).
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Pays for one operation of `bytes`: true if it may go now. Otherwise
    /// (or while already waiting) false, with the timer armed for when the
    /// tokens are due; the device keeps the request and tries again when
    /// the timer fires.
    pub fn admit(&mut self, bytes: u64) -> bool {
        let Some(timer) = self.timer.as_mut() else {
            return true;
        };
        if self.blocked {
            return false;
        }
        let Err(wait) = self.limiter.consume(bytes) else {
            return true;
        };
        // A zero duration would disarm the timer.
        match timer.reset(wait.max(Duration::from_nanos(1)), None) {
            Ok(()) => {
                self.blocked = true;
                false
            }
            Err(e) => {
                // Without a timer nothing would resume the device: let it go.
                log::error!("rate limiter: cannot arm its timer ({e}); not limiting this request");
                true
            }
        }
    }

    /// Puts the timer in the event loop's poll set with `data` as its
    /// event data (nothing for an unlimited throttle).
    pub fn watch(&self, ops: &mut EventOps, data: u32) {
        if let Some(timer) = &self.timer {
            if let Err(e) = ops.add(Events::with_data(timer, data, EventSet::IN)) {
                log::error!("rate limiter: cannot watch its timer: {e:?}");
            }
        }
    }

    /// The timer fired: reads it and lets requests through again (the
    /// device then serves what waits).
    pub fn timer_fired(&mut self) {
        if let Some(timer) = self.timer.as_mut() {
            // Non-blocking: a timer that has not expired reads EAGAIN.
            let _ = timer.wait();
        }
        self.blocked = false;
    }

    /// The timer's fd, if any (for tests).
    #[cfg(test)]
    fn timer_fd(&self) -> Option<RawFd> {
        self.timer.as_ref().map(std::os::fd::AsRawFd::as_raw_fd)
    }

    /// Whether the timer is armed (for tests).
    #[cfg(test)]
    pub(crate) fn timer_armed(&self) -> bool {
        self.timer
            .as_ref()
            .is_some_and(|t| t.is_armed().unwrap_or(false))
    }
}

/// A monotonic timerfd, non-blocking and close-on-exec.
fn new_timer() -> io::Result<TimerFd> {
    let flags = libc::TFD_CLOEXEC | libc::TFD_NONBLOCK;
    // SAFETY: no memory is passed; the result is checked.
    let fd: RawFd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a timerfd just created and owned by nothing else.
    Ok(unsafe { TimerFd::from_raw_fd(fd) })
}

/// A clock the tests move by hand.
#[cfg(test)]
pub(crate) mod test_clock {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::Clock;

    /// Nanoseconds since the start; `advance` moves it.
    #[derive(Clone, Default)]
    pub(crate) struct ManualClock(Arc<AtomicU64>);

    impl ManualClock {
        pub(crate) fn advance(&self, by: Duration) {
            self.0.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
        }

        pub(crate) fn clock(&self) -> Clock {
            let now = self.0.clone();
            Arc::new(move || Duration::from_nanos(now.load(Ordering::SeqCst)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_clock::ManualClock;
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn limiter(limit: RateLimit) -> (RateLimiter, ManualClock) {
        let clock = ManualClock::default();
        (RateLimiter::with_clock(&limit, clock.clock()), clock)
    }

    fn bytes(rate: u64, burst: u64) -> RateLimit {
        RateLimit {
            bytes_per_sec: Some(rate),
            bytes_burst: burst,
            ..RateLimit::default()
        }
    }

    #[test]
    fn unlimited_lets_everything_through() {
        let (mut l, _) = limiter(RateLimit::default());
        assert!(!l.is_limited());
        for _ in 0..1000 {
            assert_eq!(l.consume(u64::MAX), Ok(()));
        }
    }

    #[test]
    fn a_full_bucket_then_the_rate() {
        // 1000 bytes/s: one second's worth at once, then 1 byte per ms.
        let (mut l, clock) = limiter(bytes(1000, 0));
        assert_eq!(l.consume(600), Ok(()));
        assert_eq!(l.consume(400), Ok(()));
        assert_eq!(l.consume(100), Err(100 * MS));
        clock.advance(99 * MS);
        assert_eq!(l.consume(100), Err(MS), "nothing was taken by the refusal");
        clock.advance(MS);
        assert_eq!(l.consume(100), Ok(()));
        // A long idle time fills the bucket only to one second's worth.
        clock.advance(Duration::from_secs(3600));
        assert_eq!(l.consume(1000), Ok(()));
        assert_eq!(l.consume(1), Err(MS));
    }

    #[test]
    fn the_long_run_rate_holds() {
        // 10 KiB/s, requests of 700 bytes served whenever allowed: after
        // the first second's bucket, 100 seconds move 100 seconds' worth.
        let (mut l, clock) = limiter(bytes(10 << 10, 0));
        let mut moved = 0u64;
        let mut elapsed = Duration::ZERO;
        while elapsed < Duration::from_secs(100) {
            match l.consume(700) {
                Ok(()) => moved += 700,
                Err(wait) => {
                    clock.advance(wait);
                    elapsed += wait;
                }
            }
        }
        let allowed = (10 << 10) * 101;
        assert!(moved <= allowed, "{moved} > {allowed}");
        assert!(moved + 700 > allowed - (10 << 10), "{moved} too slow");
    }

    #[test]
    fn the_one_time_burst_is_spent_first_and_not_refilled() {
        let (mut l, clock) = limiter(bytes(1000, 5000));
        assert_eq!(l.consume(5500), Ok(()), "the burst and half the bucket");
        assert_eq!(l.consume(500), Ok(()));
        assert_eq!(l.consume(1), Err(MS));
        clock.advance(Duration::from_secs(10));
        assert_eq!(l.consume(1000), Ok(()));
        assert_eq!(l.consume(1), Err(MS), "the burst did not come back");
    }

    #[test]
    fn a_request_larger_than_the_bucket_goes_when_it_is_full_and_leaves_a_debt() {
        let (mut l, clock) = limiter(bytes(1000, 0));
        assert_eq!(l.consume(10), Ok(()));
        assert_eq!(l.consume(3000), Err(10 * MS), "waits for a full bucket");
        clock.advance(10 * MS);
        assert_eq!(l.consume(3000), Ok(()));
        // The debt of 2000 bytes is paid before the next byte goes.
        assert_eq!(l.consume(1), Err(2001 * MS));
    }

    #[test]
    fn both_buckets_must_pay_and_neither_pays_alone() {
        let limit = RateLimit {
            bytes_per_sec: Some(1000),
            ops_per_sec: Some(2),
            ..RateLimit::default()
        };
        let (mut l, clock) = limiter(limit);
        assert_eq!(l.consume(100), Ok(()));
        assert_eq!(l.consume(100), Ok(()));
        // The op bucket is empty: 500 ms until the next op, bytes unchanged.
        assert_eq!(l.consume(100), Err(500 * MS));
        clock.advance(500 * MS);
        // Bytes: 800 + 500 refilled, capped at 1000; the op pays now.
        assert_eq!(l.consume(1000), Ok(()));
        clock.advance(500 * MS);
        // One op is there, but only 500 bytes: the longer wait wins.
        assert_eq!(l.consume(1000), Err(500 * MS));
        clock.advance(500 * MS);
        assert_eq!(l.consume(1000), Ok(()));
    }

    #[test]
    fn ops_only_and_burst_of_ops() {
        let limit = RateLimit {
            ops_per_sec: Some(1),
            ops_burst: 2,
            ..RateLimit::default()
        };
        let (mut l, clock) = limiter(limit);
        for _ in 0..3 {
            assert_eq!(l.consume(u64::MAX), Ok(()), "bytes are not limited");
        }
        assert_eq!(l.consume(0), Err(Duration::from_secs(1)));
        clock.advance(Duration::from_secs(1));
        assert_eq!(l.consume(0), Ok(()));
    }

    #[test]
    fn huge_rates_and_costs_do_not_overflow() {
        let (mut l, clock) = limiter(bytes(u64::MAX, u64::MAX));
        assert_eq!(l.consume(u64::MAX), Ok(()), "the burst");
        assert_eq!(l.consume(u64::MAX), Ok(()), "the bucket");
        assert_eq!(l.consume(u64::MAX), Err(Duration::from_secs(1)));
        clock.advance(Duration::from_secs(1000));
        assert_eq!(l.consume(u64::MAX), Ok(()));
        let (mut l, _) = limiter(bytes(1, 0));
        assert_eq!(l.consume(1), Ok(()));
        assert_eq!(l.consume(u64::MAX), Err(Duration::from_secs(1)));
    }

    #[test]
    fn a_throttle_arms_its_timer_until_it_fires() {
        let clock = ManualClock::default();
        let limiter = RateLimiter::with_clock(&bytes(1000, 0), clock.clock());
        let mut t = Throttle::with_limiter(limiter).unwrap();
        assert!(t.admit(1000));
        assert!(!t.timer_armed());
        assert!(!t.admit(1));
        assert!(t.is_blocked() && t.timer_armed());
        // Tokens being back does not unblock it: only the timer does.
        clock.advance(Duration::from_secs(1));
        assert!(!t.admit(1));
        t.timer_fired();
        assert!(!t.is_blocked());
        assert!(t.admit(1));
        // An unlimited throttle has no timer.
        let mut free = Throttle::new(&RateLimit::default()).unwrap();
        assert_eq!(free.timer_fd(), None);
        assert!(free.admit(u64::MAX) && !free.is_blocked());
    }

    #[test]
    fn the_timer_is_nonblocking_and_cloexec() {
        let t = Throttle::new(&bytes(1, 0)).unwrap();
        let timer = t.timer_fd().unwrap();
        // SAFETY: F_GETFL/F_GETFD on an fd this test owns.
        let (fl, fd) = unsafe {
            (
                libc::fcntl(timer, libc::F_GETFL),
                libc::fcntl(timer, libc::F_GETFD),
            )
        };
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        assert_ne!(fd & libc::FD_CLOEXEC, 0);
    }
}
