//! Driving a virtio device from fuzz input, as a hostile guest driver would:
//! split queues in guest memory whose descriptors, rings and buffers come
//! from the input, kicks through the queue eventfds, and the device's
//! host-side work run by a real event loop (event-manager), pumped until it
//! goes idle.
//!
//! Guest memory is two regions with a hole between them, so buffers can
//! straddle a region edge or fall in the hole:
//! `[0, 1 MiB)` (rings at `ring_base`, buffers above 512 KiB) and
//! `[1 MiB + 64 KiB, 2 MiB)`.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kiln_devices::fuzzing::VIRTIO_F_VERSION_1;
use kiln_devices::irq::IrqLine;
use kiln_devices::virtio::{Activation, Interrupt, VirtioDevice};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::input::{Input, Script};

/// The hole between the two memory regions.
pub const HOLE: (u64, u64) = (0x10_0000, 0x11_0000);
/// Where the fuzz guest's memory ends.
pub const MEM_END: u64 = 0x20_0000;
/// Buffers of the seeds live from here (region 0's upper half and region 1).
pub const BUFFERS: u64 = 0x8_0000;
/// Rounds of the event loop before a device counts as spinning. A device
/// with work left after its per-event budget re-kicks itself, but the
/// guest here adds nothing while the loop runs, so it must settle.
const MAX_ROUNDS: usize = 100;

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), HOLE.0 as usize),
        (GuestAddress(HOLE.1), (MEM_END - HOLE.1) as usize),
    ])
    .expect("the fuzz guest's memory maps")
}

/// Where queue `queue` of device `device` (0 unless a target has several)
/// keeps its rings: descriptor table, avail ring at +4 KiB, used ring at
/// +8 KiB, room for 256 entries each.
pub fn ring_base(device: usize, queue: usize) -> u64 {
    0x1_0000 + device as u64 * 0x1_0000 + queue as u64 * 0x3000
}

/// The driver's side of one split queue.
#[derive(Clone, Debug)]
pub struct Ring {
    pub base: u64,
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl Ring {
    /// A ring of `size` entries at `base`, emptied (flags and indices zero).
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        let _ = mem.write_slice(&[0u8; 0x3000], GuestAddress(base));
        Self {
            base,
            size: size.max(1),
            next_desc: 0,
            avail_idx: 0,
        }
    }

    pub fn avail_addr(&self) -> u64 {
        self.base + 0x1000
    }

    pub fn used_addr(&self) -> u64 {
        self.base + 0x2000
    }

    /// A device-side queue for this ring (as the transport would set it up).
    pub fn queue(&self, max_size: u16, event_idx: bool) -> Queue {
        let mut q = Queue::new(max_size).expect("device queue sizes are valid");
        q.set_size(self.size);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(self.base);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail_addr());
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used_addr());
        q.set_used_ring_address(lo, hi);
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    pub fn store_desc(
        &self,
        mem: &GuestMemoryMmap,
        idx: u16,
        (addr, len, flags, next): (u64, u32, u16, u16),
    ) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let at = self.base + u64::from(idx % self.size) * 16;
        let _ = mem.write_slice(&raw, GuestAddress(at));
    }

    /// Puts `head` in the avail ring and moves the avail index past it.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        let _ = mem.write_obj(head, GuestAddress(self.avail_addr() + 4 + slot * 2));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
        let _ = mem.write_obj(idx, GuestAddress(self.avail_addr() + 2));
    }

    pub fn set_avail_flags(&self, mem: &GuestMemoryMmap, flags: u16) {
        let _ = mem.write_obj(flags, GuestAddress(self.avail_addr()));
    }

    /// used_event, after the avail ring (read with EVENT_IDX).
    pub fn set_used_event(&self, mem: &GuestMemoryMmap, idx: u16) {
        let at = self.avail_addr() + 4 + 2 * u64::from(self.size);
        let _ = mem.write_obj(idx, GuestAddress(at));
    }

    /// Writes a chain of (addr, len, device-writable) buffers into the next
    /// free descriptors, linked in order, and publishes it.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc % self.size;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let next = (idx + 1) % self.size;
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 } as u16;
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.store_desc(mem, idx, (addr, len, flags, next));
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.publish(mem, head);
        head
    }
}

/// Queue size from one input byte: a power of two up to `max`.
pub fn queue_size(byte: u8, max: u16) -> u16 {
    (1u16 << (byte % 9)).min(max)
}

/// The ring operations every device target shares; `op` numbers below
/// `RING_OPS` (see `Harness::ring_op`).
pub const RING_OPS: u8 = 10;
pub const OP_ACTIVATE: u8 = 0;
pub const OP_RESET: u8 = 1;
pub const OP_KICK: u8 = 2;
pub const OP_DESC: u8 = 3;
pub const OP_PUBLISH: u8 = 4;
pub const OP_CHAIN: u8 = 5;
pub const OP_AVAIL_IDX: u8 = 6;
pub const OP_MEM: u8 = 7;
pub const OP_AVAIL_FLAGS: u8 = 8;
pub const OP_USED_EVENT: u8 = 9;

/// One virtio device on its own event loop, with a guest driver's rings.
pub struct Harness<D: VirtioDevice + MutEventSubscriber + 'static> {
    pub mem: GuestMemoryMmap,
    pub dev: Arc<Mutex<D>>,
    em: EventManager<Traced<D>>,
    pub rings: Vec<Ring>,
    /// Features of the last activation.
    pub features: u64,
}

impl<D: VirtioDevice + MutEventSubscriber + 'static> Harness<D> {
    pub fn new(device: D) -> Self {
        let mem = guest_memory();
        let queues = device.queue_max_sizes().len();
        let dev = Arc::new(Mutex::new(device));
        let mut em = EventManager::new().expect("epoll");
        em.add_subscriber(Traced(dev.clone()));
        let rings = (0..queues)
            .map(|q| Ring::new(&mem, ring_base(0, q), 1))
            .collect();
        Self {
            mem,
            dev,
            em,
            rings,
            features: 0,
        }
    }

    pub fn device(&self) -> std::sync::MutexGuard<'_, D> {
        self.dev.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves events until none is ready; panics if that never happens.
    pub fn pump(&mut self) {
        pump(&mut self.em);
    }

    /// What a driver setting DRIVER_OK hands the device: one ring per queue
    /// (sizes from the input), features the device offered (from the
    /// input, with VERSION_1, which the transport insists on).
    pub fn activate(&mut self, input: &mut Input) {
        let max = self.device().queue_max_sizes().to_vec();
        let offered = self.device().features();
        self.features = offered & input.u64() | VIRTIO_F_VERSION_1;
        let event_idx = self.features & kiln_devices::fuzzing::VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for (q, &max) in max.iter().enumerate() {
            let ring = Ring::new(&self.mem, ring_base(0, q), queue_size(input.u8(), max));
            queues.push(ring.queue(max, event_idx));
            self.rings[q] = ring;
        }
        let interrupt = Interrupt::new(IrqLine::new().expect("eventfd"));
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            interrupt,
            features: self.features,
        };
        let result = self.device().activate(activation);
        if result.is_ok() {
            self.pump();
        }
    }

    pub fn kick(&mut self, queue: usize) {
        if let Some(evt) = self.device().queue_events().get(queue) {
            let _ = evt.write(1);
        }
        self.pump();
    }

    /// Runs ring operation `op` (below `RING_OPS`) with its fields from `input`.
    pub fn ring_op(&mut self, op: u8, input: &mut Input) {
        if op == OP_ACTIVATE {
            return self.activate(input);
        }
        if op == OP_RESET {
            self.device().reset();
            return self.pump();
        }
        if op == OP_MEM {
            let addr = input.guest_addr();
            let _ = self.mem.write_slice(input.bytes(), GuestAddress(addr));
            return;
        }
        let q = input.below(self.rings.len());
        if op == OP_KICK {
            return self.kick(q);
        }
        let mem = &self.mem;
        let ring = &mut self.rings[q];
        match op {
            OP_DESC => {
                let idx = input.u16();
                let desc = (
                    input.guest_addr(),
                    input.buf_len(),
                    input.u16(),
                    input.u16(),
                );
                ring.store_desc(mem, idx, desc);
            }
            OP_PUBLISH => ring.publish(mem, input.u16()),
            OP_CHAIN => {
                let n = 1 + input.below(8);
                let bufs: Vec<_> = (0..n)
                    .map(|_| (input.guest_addr(), input.buf_len(), input.bool()))
                    .collect();
                ring.add_chain(mem, &bufs);
            }
            OP_AVAIL_IDX => ring.set_avail_idx(mem, input.u16()),
            OP_AVAIL_FLAGS => ring.set_avail_flags(mem, input.u16()),
            OP_USED_EVENT => ring.set_used_event(mem, input.u16()),
            _ => unreachable!("ring op {op}"),
        }
    }
}

impl<D: VirtioDevice + MutEventSubscriber + 'static> Drop for Harness<D> {
    fn drop(&mut self) {
        if debug() {
            eprintln!("counters: {:?}", self.device().counters().values());
        }
    }
}

/// What the event loop serves: the device, with each event it gets logged
/// when `KILN_FUZZ_DEBUG` is set (to see what keeps a device busy).
pub struct Traced<D>(pub Arc<Mutex<D>>);

impl<D: MutEventSubscriber> MutEventSubscriber for Traced<D> {
    fn init(&mut self, ops: &mut event_manager::EventOps) {
        self.0.init(ops);
    }

    fn process(&mut self, events: event_manager::Events, ops: &mut event_manager::EventOps) {
        if debug() {
            eprintln!("event: data {} set {:?}", events.data(), events.event_set());
        }
        self.0.process(events, ops);
    }
}

/// `KILN_FUZZ_DEBUG` is set: targets print what they did.
pub fn debug() -> bool {
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("KILN_FUZZ_DEBUG").is_some())
}

/// Runs `em` until no event is ready; panics if it keeps finding events
/// (a device that re-arms itself forever spins the monitor's event thread).
pub fn pump<S: MutEventSubscriber>(em: &mut EventManager<S>) {
    for _ in 0..MAX_ROUNDS {
        // An error (EINTR from libFuzzer's timer) counts as a busy round.
        if let Ok(0) = em.run_with_timeout(0) {
            return;
        }
    }
    panic!("the event loop never went idle: a device keeps waking itself up (it spins)");
}

/// Seed helpers writing the ring operations as `Harness::ring_op` reads them.
pub trait RingScript {
    /// Activation with every queue at `size` entries and `features`.
    fn activate(&mut self, queues: usize, size: u16, features: u64) -> &mut Self;
    fn kick(&mut self, queue: u8) -> &mut Self;
    fn chain(&mut self, queue: u8, bufs: &[(u64, u32, bool)]) -> &mut Self;
    fn mem(&mut self, addr: u64, bytes: &[u8]) -> &mut Self;
}

impl RingScript for Script {
    fn activate(&mut self, queues: usize, size: u16, features: u64) -> &mut Self {
        assert!(size.is_power_of_two() && size <= 256);
        self.u8(OP_ACTIVATE).u64(features);
        for _ in 0..queues {
            self.u8(size.trailing_zeros() as u8);
        }
        self
    }

    fn kick(&mut self, queue: u8) -> &mut Self {
        self.u8(OP_KICK).u8(queue)
    }

    fn chain(&mut self, queue: u8, bufs: &[(u64, u32, bool)]) -> &mut Self {
        assert!((1..=8).contains(&bufs.len()));
        self.u8(OP_CHAIN).u8(queue).u8(bufs.len() as u8 - 1);
        for &(addr, len, writable) in bufs {
            self.guest_addr(addr).buf_len(len).u8(u8::from(writable));
        }
        self
    }

    fn mem(&mut self, addr: u64, bytes: &[u8]) -> &mut Self {
        self.u8(OP_MEM).guest_addr(addr).bytes(bytes)
    }
}
