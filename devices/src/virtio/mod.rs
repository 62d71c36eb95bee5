//! Virtio devices and their MMIO transport.
//!
//! A device model implements `VirtioDevice` (identity, features, config space,
//! activation with its queues) and, separately, `MutEventSubscriber` so the
//! monitor's event loop drives it: queue kicks arrive on the device's queue
//! eventfds (KVM ioeventfds on the QueueNotify register) and interrupts leave
//! through `Interrupt` (a KVM irqfd). The vCPU threads only touch registers.

pub mod block;
pub mod console;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::irq::IrqLine;

/// Feature bit every modern device offers and kiln requires.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Used/available event index notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Interrupt status bits (InterruptStatus register).
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    /// One per queue, configured and ready (in queue-index order).
    pub queues: Vec<Queue>,
    pub interrupt: Interrupt,
    /// Features the driver accepted.
    pub features: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not usable (bad size or addresses outside guest memory)")]
    BadQueue(usize),
    #[error("device cannot start: {0}")]
    Device(String),
}

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (2 = block, 1 = net, 3 = console, 4 = rng, 19 = vsock).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the number of entries is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered features, including `VIRTIO_F_VERSION_1`.
    fn features(&self) -> u64;
    /// One eventfd per queue, signalled when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd];
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (ignored by default).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// Starts serving the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops serving and forgets the queues (driver reset). In-flight requests
    /// are dropped: the driver has abandoned them.
    fn reset(&mut self);
}

/// A device's interrupt: sets the status bits the driver reads, then raises
/// the IRQ line. Cheap to clone into worker state.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    line: Arc<IrqLine>,
}

impl Interrupt {
    pub fn new(line: IrqLine) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            line: Arc::new(line),
        }
    }

    pub fn signal_used_queue(&self) {
        self.raise(INT_USED_RING);
    }

    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG_CHANGE);
    }

    fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.line.raise() {
            log::warn!("virtio: cannot raise interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn line(&self) -> &IrqLine {
        &self.line
    }
}

/// Serves a request queue: pops each available chain, hands it to `serve`
/// (which returns the number of bytes written to the chain) and returns it
/// as used, until the queue is empty or `budget` chains were served; then
/// interrupts the driver if it wants to be told. Returns true when the
/// budget ran out with work left: the caller re-kicks itself so other event
/// sources get a turn. An avail index that yields nothing (garbage) ends the
/// loop instead of spinning.
pub fn serve_queue<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    budget: usize,
    mut serve: F,
) -> bool
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    let mut served = 0;
    let mut more = false;
    'outer: loop {
        if queue.disable_notification(mem).is_err() {
            break;
        }
        let before = served;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = serve(chain);
            if queue.add_used(mem, head, len).is_err() {
                // A head index past the ring: the chain cannot be returned.
                log::debug!("virtio: cannot return chain {head}");
            }
            served += 1;
            if served >= budget {
                more = true;
                break 'outer;
            }
        }
        match queue.enable_notification(mem) {
            // More arrived while notifications were off.
            Ok(true) if served > before => continue,
            _ => break,
        }
    }
    if served > 0 && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used_queue();
    }
    more
}
