//! A test driver for split virtqueues in guest memory: publishes descriptor
//! chains and reads back the used ring, as a guest driver would.

use event_manager::{EventManager, MutEventSubscriber};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub(crate) const RING_SIZE: u16 = 256;

/// The driver's side of one split queue: descriptor table at `base`, avail
/// ring at +4 KiB, used ring at +8 KiB (laid out here rather than with the
/// crate's mock, whose layout overlaps the rings for 256-entry queues).
pub(crate) struct DriverQueue {
    mem: &'static GuestMemoryMmap,
    base: u64,
    pub(crate) next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    pub(crate) fn new(mem: &'static GuestMemoryMmap, base: u64) -> Self {
        // Zero both rings (flags, idx).
        mem.write_slice(&[0u8; 0x3000], GuestAddress(base)).unwrap();
        Self {
            mem,
            base,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    pub(crate) fn avail_addr(&self) -> u64 {
        self.base + 0x1000
    }

    pub(crate) fn used_addr(&self) -> u64 {
        self.base + 0x2000
    }

    pub(crate) fn queue(&self) -> Queue {
        let mut q = Queue::new(RING_SIZE).unwrap();
        q.set_size(RING_SIZE);
        for (addr, set) in [
            (
                self.base,
                Queue::set_desc_table_address as fn(&mut Queue, Option<u32>, Option<u32>),
            ),
            (self.avail_addr(), Queue::set_avail_ring_address),
            (self.used_addr(), Queue::set_used_ring_address),
        ] {
            set(&mut q, Some(addr as u32), Some((addr >> 32) as u32));
        }
        q.set_ready(true);
        q
    }

    pub(crate) fn store_desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.base + u64::from(idx % RING_SIZE) * 16;
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(at)).unwrap();
    }

    /// Publishes a chain of (addr, len, flags) descriptors; returns its head.
    pub(crate) fn add(&mut self, descs: &[(u64, u32, u32)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % RING_SIZE;
            let last = i + 1 == descs.len();
            let flags = flags | if last { 0 } else { VRING_DESC_F_NEXT };
            self.store_desc(idx, addr, len, flags as u16, (idx + 1) % RING_SIZE);
        }
        self.next_desc = (head + descs.len() as u16) % RING_SIZE;
        self.publish(head);
        head
    }

    /// Sets the avail index directly (a driver that lies about it).
    pub(crate) fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail_addr() + 2))
            .unwrap();
    }

    /// Sets the avail ring's flags (VRING_AVAIL_F_NO_INTERRUPT).
    pub(crate) fn set_avail_flags(&self, flags: u16) {
        self.mem
            .write_obj(flags, GuestAddress(self.avail_addr()))
            .unwrap();
    }

    /// Sets used_event (after the avail ring), read when EVENT_IDX is on.
    pub(crate) fn set_used_event(&self, idx: u16) {
        let at = self.avail_addr() + 4 + 2 * u64::from(RING_SIZE);
        self.mem.write_obj(idx, GuestAddress(at)).unwrap();
    }

    pub(crate) fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % RING_SIZE);
        self.mem
            .write_obj(head, GuestAddress(self.avail_addr() + 4 + slot * 2))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail_addr() + 2))
            .unwrap();
    }

    /// New used entries: (head, length).
    pub(crate) fn used(&mut self) -> Vec<(u16, u32)> {
        let idx: u16 = self
            .mem
            .read_obj(GuestAddress(self.used_addr() + 2))
            .unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used_addr() + 4 + u64::from(self.used_seen % RING_SIZE) * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// Runs the event loop until nothing is ready; panics if it never settles
/// (a spinning device).
pub(crate) fn pump<S: MutEventSubscriber>(em: &mut EventManager<S>) {
    for _ in 0..1000 {
        if em.run_with_timeout(0).unwrap() == 0 {
            return;
        }
    }
    panic!("the event loop never went idle");
}

/// After settling, nothing is ready: no busy loop.
pub(crate) fn assert_idle<S: MutEventSubscriber>(em: &mut EventManager<S>) {
    pump(em);
    for _ in 0..3 {
        assert_eq!(em.run_with_timeout(0).unwrap(), 0, "device keeps waking up");
    }
}
