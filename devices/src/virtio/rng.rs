//! virtio-rng (device id 4): entropy for the guest from the host's
//! getrandom(2).
//!
//! Each chain gets at most `MAX_BYTES_PER_CHAIN` bytes, written into its
//! device-writable descriptors in order; device-readable descriptors are
//! skipped, and a descriptor outside guest memory ends the chain's filling.
//! The used length is the number of bytes actually written.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivateError, Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// virtio device id of an entropy source.
pub const DEVICE_ID_RNG: u32 = 4;
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of entropy handed out per chain, whatever the chain's size.
pub const MAX_BYTES_PER_CHAIN: usize = 64 << 10;
/// Chains served per event before yielding to other devices.
const CHAINS_PER_EVENT: usize = 64;

/// Fills `buf` from getrandom(2); returns how many bytes it got.
fn host_random(buf: &mut [u8]) -> usize {
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
            break;
        }
        done += n as usize;
    }
    done
}

/// Fills the chain's writable buffers (up to the cap); returns the used length.
pub fn fill_chain<M>(mem: &GuestMemoryMmap, chain: DescriptorChain<M>, scratch: &mut [u8]) -> u32
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let cap = scratch.len();
    let mut written = 0usize;
    // The iterator is bounded by the descriptor table size (loops end there).
    for desc in chain.writable() {
        if written >= cap {
            break;
        }
        let n = (desc.len() as usize).min(cap - written);
        if n == 0 {
            continue;
        }
        if !mem.check_range(desc.addr(), n, Permissions::Write) {
            break;
        }
        let buf = &mut scratch[..n];
        let got = host_random(buf);
        if mem.write_slice(&buf[..got], desc.addr()).is_err() {
            break;
        }
        written += got;
        if got < n {
            break;
        }
    }
    written as u32
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Interrupt,
}

/// The entropy device: one request queue served on the event loop.
pub struct Rng {
    queue_evts: [EventFd; 1],
    active: Option<Active>,
    scratch: Vec<u8>,
}

impl Rng {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            queue_evts: [EventFd::new(EFD_NONBLOCK)?],
            active: None,
            scratch: vec![0; MAX_BYTES_PER_CHAIN],
        })
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Serves the available chains (up to a budget; the rest on the next turn).
    pub fn process_queue(&mut self) {
        let Some(Active {
            mem,
            queue,
            interrupt,
        }) = self.active.as_mut()
        else {
            return;
        };
        let scratch = &mut self.scratch;
        let more = super::serve_queue(queue, mem, interrupt, CHAINS_PER_EVENT, |chain| {
            fill_chain(mem, chain, scratch)
        });
        if more {
            let _ = self.queue_evts[0].write(1);
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        DEVICE_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Some(queue) = activation.queues.into_iter().next() else {
            return Err(ActivateError::BadQueue(0));
        };
        self.active = Some(Active {
            mem: activation.mem,
            queue,
            interrupt: activation.interrupt,
        });
        let _ = self.queue_evts[0].write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_evts[0], EventSet::IN)) {
            log::error!("virtio-rng: cannot watch the queue eventfd: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.queue_evts[0].as_raw_fd() {
            let _ = self.queue_evts[0].read();
            self.process_queue();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqLine;
    use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

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
}
