//! virtio-rng (device id 4): entropy for the guest from the host's
//! getrandom(2).
//!
//! Each chain gets at most `MAX_BYTES_PER_CHAIN` bytes, written into its
//! device-writable buffers in order; device-readable buffers ahead of them
//! are skipped, and a chain that breaks a rule (a buffer outside guest
//! memory, a loop) is filled up to the fault. The used length is the number
//! of bytes actually written. A rate limit ([`Rng::with_rate_limit`])
//! charges each chain the bytes it asks for (up to the per-chain cap) and
//! one operation; a chain it cannot pay for yet stays in the ring until
//! the limit's timer fires.

use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_memory::GuestMemoryMmap;

use super::chain::{Chain, Layout, Limits};
use super::common::VirtioCommon;
use super::counters::device_counters;
use super::queue::Served;
use super::{VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::rate_limiter::{RateLimit, Throttle};

/// virtio device id of an entropy source.
pub(crate) const DEVICE_ID_RNG: u32 = 4;
pub(crate) const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Bytes of entropy handed out per chain, whatever the chain's size.
pub(crate) const MAX_BYTES_PER_CHAIN: usize = 64 << 10;
/// Chains served per event before yielding to other devices.
const CHAINS_PER_EVENT: usize = 64;
/// Event data of the rate limit's timer (the queue's kick is 0).
const TOKEN_RATE_TIMER: u32 = 1;
/// Buffers to fill, then nothing: a chain is at most a ring long.
const CHAIN_SHAPE: (Layout, Limits) = (
    Layout::ReadThenWrite,
    Limits::descriptors(QUEUE_SIZE as usize),
);

device_counters! {
    /// virtio-rng counters.
    pub(crate) struct RngCounters {
        /// Chains filled and returned.
        requests,
        /// Random bytes handed to the guest.
        bytes,
        /// getrandom(2) failures (the chain got fewer bytes).
        errors,
        /// Chains that broke a rule (filled up to the fault).
        bad_chains,
        /// Times the rate limit held the queue (a chain waited for tokens).
        rate_limited,
    }
}

/// Fills `buf` from getrandom(2); returns how many bytes it got.
fn host_random(buf: &mut [u8], counters: &RngCounters) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe `rest`, a live, writable
        // slice that getrandom writes at most `rest.len()` bytes into.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::warn!(
                "virtio-rng: getrandom failed: {}",
                std::io::Error::last_os_error()
            );
            counters.errors.inc();
            break;
        }
        done += n as usize;
    }
    done
}

/// Fills the chain's writable buffers (up to the size of `scratch`);
/// returns the used length.
fn fill_chain(
    mem: &GuestMemoryMmap,
    chain: &Chain,
    scratch: &mut [u8],
    counters: &RngCounters,
) -> u32 {
    if chain.fault().is_some() {
        counters.bad_chains.inc();
    }
    let want = chain.writable_len().min(scratch.len() as u64) as usize;
    let got = host_random(&mut scratch[..want], counters);
    let written = chain.writer().write(mem, &scratch[..got]);
    counters.requests.inc();
    counters.bytes.add(written as u64);
    written as u32
}

/// The entropy device: one request queue served on the event loop.
pub struct Rng {
    /// Features, the queue while running, counters.
    virtio: VirtioCommon,
    counters: Arc<RngCounters>,
    scratch: Vec<u8>,
    /// The rate limit (unlimited unless set).
    throttle: Throttle,
}

impl Rng {
    /// An entropy device fed from the host's getrandom(2), at most 64 KiB
    /// per request (its scratch buffer). Fails only when the host is out of
    /// file descriptors.
    pub fn new() -> std::io::Result<Self> {
        let counters = Arc::new(RngCounters::default());
        Ok(Self {
            virtio: VirtioCommon::new(
                "rng".into(),
                DEVICE_ID_RNG,
                &QUEUE_SIZES,
                VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
                // virtio-rng has no configuration space.
                Vec::new(),
                counters.clone(),
            )?,
            counters,
            scratch: vec![0; MAX_BYTES_PER_CHAIN],
            throttle: Throttle::unlimited(),
        })
    }

    /// Limits the random bytes and requests per second (see
    /// [`RateLimit`]). Fails only when the host is out of file descriptors
    /// (the limit's timer).
    pub fn with_rate_limit(mut self, limit: &RateLimit) -> std::io::Result<Self> {
        self.throttle = Throttle::new(limit)?;
        Ok(self)
    }

    // Only the tests ask.
    #[cfg(test)]
    pub(crate) fn is_active(&self) -> bool {
        self.virtio.is_active()
    }

    /// Serves the available chains (up to a budget; the rest on the next
    /// turn), unless the rate limit waits for its timer.
    pub(crate) fn process_queue(&mut self) {
        if self.throttle.is_blocked() {
            return;
        }
        let (scratch, counters) = (&mut self.scratch, &*self.counters);
        let throttle = &mut self.throttle;
        self.virtio
            .serve(0, CHAINS_PER_EVENT, CHAIN_SHAPE, |mem, chain| {
                let asked = chain.writable_len().min(scratch.len() as u64);
                if !throttle.admit(asked) {
                    counters.rate_limited.inc();
                    return Served::Later;
                }
                Served::Used(fill_chain(mem, chain, scratch, counters))
            });
    }
}

impl VirtioDevice for Rng {
    fn virtio(&self) -> &VirtioCommon {
        &self.virtio
    }

    fn virtio_mut(&mut self) -> &mut VirtioCommon {
        &mut self.virtio
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        self.virtio.watch_kicks(ops);
        self.throttle.watch(ops, TOKEN_RATE_TIMER);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() == TOKEN_RATE_TIMER {
            self.throttle.timer_fired();
            self.process_queue();
        } else if self.virtio.take_kick(&events).is_some() {
            self.process_queue();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqLine;
    use crate::virtio::test_queue::{DriverQueue, RING_SIZE};
    use crate::virtio::{Activation, Interrupt};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// Puts one chain (descriptors 0..n linked in order) on the queue.
    fn push_chain(q: &MockSplitQueue<GuestMemoryMmap>, descs: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let next = if i + 1 < descs.len() { F_NEXT } else { 0 };
            let d = SplitDesc::new(addr, len, flags | next, i as u16 + 1);
            q.desc_table()
                .store(i as u16, RawDescriptor::from(d))
                .unwrap();
        }
        let idx = q.avail().idx().load();
        q.avail().ring().ref_at(idx as usize % 16).unwrap().store(0);
        q.avail().idx().store(idx.wrapping_add(1));
    }

    fn activate(rng: &mut Rng, mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>) {
        let queue: Queue = q.create_queue().unwrap();
        rng.activate(Activation {
            mem: mem.clone(),
            queues: vec![queue],
            interrupt: Interrupt::new(IrqLine::new().unwrap()),
            features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
    }

    fn used(q: &MockSplitQueue<GuestMemoryMmap>, i: usize) -> (u32, u32) {
        let e = q.used().ring().ref_at(i).unwrap().load();
        (e.id(), e.len())
    }

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        let mut rng = Rng::new().unwrap();
        activate(&mut rng, &mem, &q);
        push_chain(&q, &[(0x10000, 4096, F_WRITE), (0x20000, 100, F_WRITE)]);
        rng.process_queue();
        assert_eq!(q.used().idx().load(), 1);
        assert_eq!(used(&q, 0), (0, 4196));
        let mut buf = vec![0u8; 4096];
        mem.read_slice(&mut buf, GuestAddress(0x10000)).unwrap();
        // 4096 random bytes are not all zero.
        assert!(buf.iter().any(|&b| b != 0));
    }

    #[test]
    fn huge_requests_are_capped() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        let mut rng = Rng::new().unwrap();
        activate(&mut rng, &mem, &q);
        // Three 256 KiB buffers overlapping the same memory: only 64 KiB in total.
        push_chain(
            &q,
            &[
                (0x40000, 256 << 10, F_WRITE),
                (0x40000, 256 << 10, F_WRITE),
                (0x40000, 256 << 10, F_WRITE),
            ],
        );
        rng.process_queue();
        assert_eq!(used(&q, 0), (0, MAX_BYTES_PER_CHAIN as u32));
    }

    #[test]
    fn hostile_chains_get_zero_or_partial_lengths() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        let mut rng = Rng::new().unwrap();
        activate(&mut rng, &mem, &q);
        // Device-readable only: nothing is written.
        push_chain(&q, &[(0x10000, 4096, 0)]);
        rng.process_queue();
        assert_eq!(used(&q, 0), (0, 0));
        // Outside guest memory, and straddling its end.
        push_chain(&q, &[(0xffff_0000, 4096, F_WRITE)]);
        rng.process_queue();
        assert_eq!(used(&q, 1), (0, 0));
        push_chain(&q, &[(0x10000, 8, F_WRITE), ((1 << 20) - 8, 64, F_WRITE)]);
        rng.process_queue();
        assert_eq!(used(&q, 2), (0, 8));
        // A descriptor loop (0 -> 0): bounded by the table size.
        let d = SplitDesc::new(0x10000, 16, F_WRITE | F_NEXT, 0);
        q.desc_table().store(0, RawDescriptor::from(d)).unwrap();
        let idx = q.avail().idx().load();
        q.avail().ring().ref_at(idx as usize % 16).unwrap().store(0);
        q.avail().idx().store(idx + 1);
        rng.process_queue();
        assert_eq!(q.used().idx().load(), 4);
        assert_eq!(used(&q, 3), (0, 16 * 16));
        // Zero-length descriptors.
        push_chain(&q, &[(0x10000, 0, F_WRITE)]);
        rng.process_queue();
        assert_eq!(used(&q, 4), (0, 0));
    }

    #[test]
    fn kicks_before_activation_and_after_reset_are_ignored() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        let mut rng = Rng::new().unwrap();
        push_chain(&q, &[(0x10000, 64, F_WRITE)]);
        rng.process_queue();
        assert_eq!(q.used().idx().load(), 0);
        activate(&mut rng, &mem, &q);
        rng.reset();
        rng.process_queue();
        assert_eq!(q.used().idx().load(), 0);
        assert!(!rng.is_active());
    }

    #[test]
    fn garbage_avail_index_does_not_spin() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        let mut rng = Rng::new().unwrap();
        activate(&mut rng, &mem, &q);
        q.avail().idx().store(1000);
        rng.process_queue();
        assert_eq!(q.used().idx().load(), 0);
    }

    #[test]
    fn a_rate_limited_rng_fills_its_budget_then_waits_for_its_timer() {
        use crate::rate_limiter::test_clock::ManualClock;
        use crate::rate_limiter::{RateLimit, RateLimiter, Throttle};
        use std::time::Duration;
        // 1 KiB/s: four 256-byte requests at once, the fifth 250 ms later.
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        let clock = ManualClock::default();
        let limit = RateLimit {
            bytes_per_sec: Some(1024),
            ..RateLimit::default()
        };
        let mut rng = Rng::new().unwrap();
        rng.throttle =
            Throttle::with_limiter(RateLimiter::with_clock(&limit, clock.clock())).unwrap();
        activate(&mut rng, &mem, &q);
        for _ in 0..5 {
            push_chain(&q, &[(0x10000, 256, F_WRITE)]);
            rng.process_queue();
        }
        assert_eq!(q.used().idx().load(), 4);
        assert_eq!(rng.counters.rate_limited.get(), 1);
        clock.advance(Duration::from_millis(250));
        rng.process_queue();
        assert_eq!(q.used().idx().load(), 4, "only the timer resumes it");
        rng.throttle.timer_fired();
        rng.process_queue();
        assert_eq!(q.used().idx().load(), 5);
        assert_eq!(used(&q, 4), (0, 256));
        assert_eq!(rng.counters.bytes.get(), 5 * 256);
    }

    #[test]
    fn a_ring_of_bad_chains_is_served_a_budget_per_turn() {
        // A guest that keeps its avail index a whole ring ahead over chains
        // whose buffer lies outside guest memory: each call returns one
        // budget of them and re-kicks itself for the rest.
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(memory()));
        let mut driver = DriverQueue::new(mem, 0x1_0000);
        let mut rng = Rng::new().unwrap();
        rng.activate(Activation {
            mem: mem.clone(),
            queues: vec![driver.queue()],
            interrupt: Interrupt::new(IrqLine::new().unwrap()),
            features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
        let _ = rng.queue_events()[0].read();
        for _ in 0..RING_SIZE {
            driver.add(&[(0xffff_0000, 64, VRING_DESC_F_WRITE)]);
        }
        rng.process_queue();
        assert_eq!(driver.used().len(), CHAINS_PER_EVENT);
        let mut used = CHAINS_PER_EVENT;
        while rng.queue_events()[0].read().is_ok() {
            rng.process_queue();
            let more = driver.used();
            assert!(more.len() <= CHAINS_PER_EVENT);
            assert!(more.iter().all(|&(_, len)| len == 0));
            used += more.len();
        }
        assert_eq!(used, usize::from(RING_SIZE));
        assert_eq!(rng.counters.bad_chains.get(), u64::from(RING_SIZE));
        assert_eq!(rng.counters.bytes.get(), 0);
    }
}
