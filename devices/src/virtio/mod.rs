//! Virtio devices and their MMIO transport.
//!
//! A device model implements `VirtioDevice` (identity, features, config space,
//! activation with its queues) and, separately, `MutEventSubscriber` so the
//! monitor's event loop drives it: queue kicks arrive on the device's queue
//! eventfds (KVM ioeventfds on the QueueNotify register) and interrupts leave
//! through `Interrupt` (a KVM irqfd). The vCPU threads only touch registers.

pub mod block;
pub(crate) mod chain;
pub mod common;
pub mod console;
pub mod counters;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod persist;
pub(crate) mod queue;
pub mod rng;
pub mod vhost_user;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_queue;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::irq::IrqLine;
use common::VirtioCommon;
use counters::Counters;

/// Feature bit every modern device offers and kiln requires.
pub(crate) const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Used/available event index notification suppression.
pub(crate) const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Interrupt status bits (InterruptStatus register).
pub(crate) const INT_USED_RING: u32 = 1;
pub(crate) const INT_CONFIG_CHANGE: u32 = 2;

/// What a device gets when the driver sets DRIVER_OK, and keeps until reset:
/// the negotiated features and the queues (guest-visible state), guest memory
/// and the interrupt (host handles).
pub struct Activation {
    /// Guest memory, where the queues and every buffer live.
    pub mem: GuestMemoryMmap,
    /// One per queue, configured and ready (in queue-index order).
    pub queues: Vec<Queue>,
    /// How the device tells the driver it used buffers.
    pub interrupt: Interrupt,
    /// Features the driver accepted.
    pub features: u64,
}

/// An overlay disk's writes as a snapshot saves them
/// ([`VirtioDevice::disk_overlay`]).
pub struct SavedOverlay {
    /// A descriptor of the overlay's file (read while the VM is paused).
    pub file: std::fs::File,
    /// The base's stamp and the chunk map.
    pub state: block::OverlayState,
}

/// Why a device refused to start. The transport then sets
/// DEVICE_NEEDS_RESET and tells the driver; the VM goes on.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up this queue badly: a size the device does not take,
    /// or rings outside guest memory.
    #[error("queue {0} is not usable (bad size or addresses outside guest memory)")]
    BadQueue(usize),
    /// The device's host side cannot serve the negotiated features (e.g. the
    /// TAP refused its offloads); the reason.
    #[error("device cannot start: {0}")]
    Device(String),
}

/// A virtio device model, independent of the transport. A device keeps what
/// every device has in a `VirtioCommon`; the methods answer from it unless
/// the device has more to do.
pub trait VirtioDevice: Send {
    /// Identity, features, config space, queues, counters and kicks.
    fn virtio(&self) -> &VirtioCommon;
    /// The same, to change (activation, reset).
    fn virtio_mut(&mut self) -> &mut VirtioCommon;
    /// Virtio device ID (2 = block, 1 = net, 3 = console, 4 = rng, 19 = vsock,
    /// 26 = fs).
    fn device_type(&self) -> u32 {
        self.virtio().device_type()
    }
    /// Largest size of each queue; the number of entries is the queue count.
    fn queue_max_sizes(&self) -> &[u16] {
        self.virtio().queue_max_sizes()
    }
    /// Offered features, including `VIRTIO_F_VERSION_1`.
    fn features(&self) -> u64 {
        self.virtio().avail_features()
    }
    /// One eventfd per queue, signalled when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd] {
        self.virtio().queue_events()
    }
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.virtio().read_config(offset, data);
    }
    /// Writes the device-specific configuration space (ignored by default).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// Starts serving the queues; each is looked at once, for chains the
    /// driver queued before DRIVER_OK.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.virtio_mut().activate(activation)?;
        for queue in 0..self.queue_max_sizes().len() {
            self.virtio().kick(queue);
        }
        Ok(())
    }
    /// Stops serving and forgets the queues (driver reset). In-flight requests
    /// are dropped: the driver has abandoned them.
    fn reset(&mut self) {
        self.virtio_mut().reset();
    }
    /// Called once the device was started again from a snapshot (after
    /// [`activate`](Self::activate) with the saved queues): what the guest's
    /// driver must learn about host state that did not survive (vsock: its
    /// connections are gone). Nothing by default.
    fn restored(&mut self) {}
    /// A copy-on-write disk's overlay (the guest's writes) and its chunk
    /// map, for a snapshot; None for every other device.
    fn disk_overlay(&self) -> Option<std::io::Result<SavedOverlay>> {
        None
    }
    /// The device's counters, readable while it runs (logged at exit).
    fn counters(&self) -> Arc<dyn Counters> {
        self.virtio().counters()
    }
}

/// A device's interrupt: sets the status bits the driver reads, then raises
/// the IRQ line. Cheap to clone into worker state.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    line: Arc<IrqLine>,
}

impl Interrupt {
    /// An interrupt on `line` with no status bits set.
    pub fn new(line: IrqLine) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            line: Arc::new(line),
        }
    }

    pub(crate) fn signal_used_queue(&self) {
        self.raise(INT_USED_RING);
    }

    pub(crate) fn signal_config_change(&self) {
        self.raise(INT_CONFIG_CHANGE);
    }

    fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.line.raise() {
            log::warn!("virtio: cannot raise interrupt: {e}");
        }
    }

    pub(crate) fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets status `bits` saved in a snapshot and raises the line.
    pub(crate) fn restore_status(&self, bits: u32) {
        self.raise(bits);
    }

    pub(crate) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}
