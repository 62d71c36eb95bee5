//! The guest-visible state of a virtio device and its MMIO transport, as
//! plain serde data a snapshot saves, kept apart from the host resources
//! (guest memory, eventfds, files, sockets) that a restore opens anew.
//!
//! A restore applies a saved state to a freshly built device of the same
//! kind ([`MmioTransport::restore`](super::mmio::MmioTransport::restore)).
//! The state comes from a file on disk, so every value is checked as the
//! guest's register writes are: a bad one is a [`RestoreError`], never a
//! panic or a ring outside guest memory.

use serde::{Deserialize, Serialize};

/// One virtqueue as the driver set it up, and how far the device got.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Entries the driver chose (a power of two, at most the device's maximum).
    pub size: u16,
    /// The driver set QueueReady.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the avail ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
    /// The next avail ring entry the device reads.
    pub next_avail: u16,
    /// The next used ring entry the device writes.
    pub next_used: u16,
}

/// A virtio-mmio device's registers, its device's config space and queues.
/// Device models keep nothing else the guest can see: the rest of their
/// state is host-side (connections, buffered frames) and starts fresh.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The virtio device ID (2 block, 1 net, 3 console, 4 rng, 19 vsock):
    /// a restore onto another kind of device is refused.
    pub device_type: u32,
    /// The device status register.
    pub status: u32,
    /// Which half of the offered features the driver reads.
    pub device_features_sel: u32,
    /// Which half of its features the driver writes.
    pub driver_features_sel: u32,
    /// Features the driver wrote (accepted at FEATURES_OK).
    pub driver_features: u64,
    /// The queue the driver selected.
    pub queue_sel: u32,
    /// Changes whenever the config space changed under the driver.
    pub config_generation: u32,
    /// InterruptStatus bits not yet acknowledged.
    pub interrupt_status: u32,
    /// The device's config space as the driver saw it (e.g. a net device's
    /// MAC address, which may have been random).
    pub config: Vec<u8>,
    /// Every queue, in queue-index order.
    pub queues: Vec<QueueSnapshot>,
}

/// Why a saved device state cannot be applied to the device built for it:
/// the snapshot does not fit this configuration, or its file was altered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    /// The saved device is of another kind than the one built in its slot.
    #[error("saved device type {saved} but the configuration builds type {built}")]
    DeviceType {
        /// From the snapshot.
        saved: u32,
        /// Of the device built now.
        built: u32,
    },
    /// The saved device has another number of queues.
    #[error("device type {device_type}: {saved} saved queues for {built}")]
    QueueCount {
        /// The virtio device ID.
        device_type: u32,
        /// From the snapshot.
        saved: usize,
        /// Of the device built now.
        built: usize,
    },
    /// A saved queue is not one a driver could have set up.
    #[error("device type {device_type}, queue {queue}: {reason}")]
    BadQueue {
        /// The virtio device ID.
        device_type: u32,
        /// The queue index.
        queue: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Any other saved value this device cannot take.
    #[error("device type {device_type}: {reason}")]
    BadValue {
        /// The virtio device ID (0 for the UART).
        device_type: u32,
        /// What is wrong.
        reason: String,
    },
}
