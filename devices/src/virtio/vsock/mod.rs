//! virtio-vsock (device ID 19): stream sockets between the guest and host
//! programs, carried over Unix sockets on the host (see `muxer`).
//!
//! Three queues: rx (device to guest), tx (guest to device) and event (the
//! driver's buffers for transport events: kiln sends one, a transport reset,
//! after a restore from a snapshot, whose host sockets are all new).

pub(crate) mod conn;
pub(crate) mod muxer;
pub(crate) mod packet;

use std::io;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::chain::{Layout, Limits};
use super::common::VirtioCommon;
use super::counters::device_counters;
use super::queue::{Served, Stop};
use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use muxer::{Muxer, Poller, LISTENER_TOKEN};

/// Virtio device ID of a socket device.
pub(crate) const VIRTIO_ID_VSOCK: u32 = 19;
/// Lowest CID a guest may have (0-2 are reserved: hypervisor, local, host).
pub(crate) const MIN_GUEST_CID: u64 = 3;
/// Highest usable CID (`u32::MAX` means "any").
pub(crate) const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
/// struct virtio_vsock_event { le32 id; } with id VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
const TRANSPORT_RESET_EVENT: [u8; 4] = 0u32.to_le_bytes();
const QUEUE_SIZES: [u16; 3] = [256, 256, 256];
/// Chains taken from one queue per turn before yielding to other devices.
const CHAINS_PER_TURN: usize = 64;
/// Rounds of tx/rx processing per event before yielding to other devices.
const MAX_ROUNDS: usize = 16;
/// Packets in either direction (a tx chain's writable buffers and an rx
/// chain's readable ones are ignored), at most a ring long.
const CHAIN_SHAPE: (Layout, Limits) = (
    Layout::ReadThenWrite,
    Limits::descriptors(QUEUE_SIZES[0] as usize),
);

device_counters! {
    /// virtio-vsock counters ("tx" is guest to host, "rx" host to guest).
    pub(crate) struct VsockCounters {
        /// Packets taken from the guest.
        tx_packets,
        /// Stream bytes taken from the guest.
        tx_bytes,
        /// Guest packets dropped unanswered (no header, another source CID).
        tx_dropped,
        /// Packets given to the guest.
        rx_packets,
        /// Stream bytes given to the guest.
        rx_bytes,
        /// Connection resets sent to the guest.
        resets,
        /// Chains that broke a rule or were too small (returned unused).
        bad_chains,
    }
}

/// Why the vsock device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved (0-2) or does not fit in 32 bits.
    #[error("guest CID {0} is out of range ({MIN_GUEST_CID} to {MAX_GUEST_CID})")]
    InvalidCid(u64),
    /// The host socket cannot be bound: a path too long, a file there that
    /// is not a socket, no permission.
    #[error("socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: String,
        /// Why it cannot be bound.
        source: io::Error,
    },
    /// An eventfd cannot be created (the host is out of file descriptors).
    #[error("eventfd: {0}")]
    EventFd(io::Error),
}

/// The virtio-vsock device: stream connections between the guest and host
/// programs over Unix sockets. A host program connects to the device's
/// socket and sends `CONNECT <port>\n` to reach a guest port; a guest
/// connection to host port P goes to the socket `<path>_P`. At most 128
/// connections, each buffering at most 256 KiB of guest data the host has
/// not read.
pub struct Vsock {
    /// Features, config space (the guest CID), the queues while running,
    /// counters.
    virtio: VirtioCommon,
    /// The host side: the Unix sockets and the connections over them.
    muxer: Muxer,
    /// Restored from a snapshot, and the driver not yet told that every
    /// connection it had is gone (sent as soon as it has an event buffer).
    reset_pending: bool,
}

/// Validates a guest CID.
pub(crate) fn check_cid(cid: u64) -> Result<(), VsockError> {
    if (MIN_GUEST_CID..=MAX_GUEST_CID).contains(&cid) {
        Ok(())
    } else {
        Err(VsockError::InvalidCid(cid))
    }
}

impl Vsock {
    /// Creates the device and starts listening on `path` (a stale socket
    /// file there is replaced; any other file is an error).
    pub fn new(cid: u64, path: &Path) -> Result<Self, VsockError> {
        check_cid(cid)?;
        let counters = Arc::new(VsockCounters::default());
        let muxer =
            Muxer::new(cid, path, counters.clone()).map_err(|source| VsockError::Socket {
                path: path.display().to_string(),
                source,
            })?;
        // struct virtio_vsock_config { le64 guest_cid; }
        let config = cid.to_le_bytes().to_vec();
        let virtio = VirtioCommon::new(
            format!("vsock cid {cid}"),
            VIRTIO_ID_VSOCK,
            &QUEUE_SIZES,
            VIRTIO_F_VERSION_1,
            config,
            counters,
        )
        .map_err(VsockError::EventFd)?;
        Ok(Self {
            virtio,
            muxer,
            reset_pending: false,
        })
    }

    /// Sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET if it is pending and the
    /// driver has posted an event buffer: the driver then resets every
    /// socket it had (their host ends are gone) and reads the CID again.
    fn send_transport_reset(&mut self) {
        if !self.reset_pending {
            return;
        }
        let shape = (
            Layout::WriteOnly,
            Limits::descriptors(QUEUE_SIZES[EVQ] as usize),
        );
        let mut sent = false;
        // One chain: a too-small one is returned and the next tried later.
        self.virtio.serve(EVQ, 1, shape, |mem, chain| {
            match chain.writer().write_all(mem, &TRANSPORT_RESET_EVENT) {
                Ok(()) => {
                    sent = true;
                    Served::Used(TRANSPORT_RESET_EVENT.len() as u32)
                }
                // Too small for an event: returned unused, as Linux would.
                Err(_) => Served::Used(0),
            }
        });
        if sent {
            self.reset_pending = false;
            log::info!(
                "{}: told the guest its connections were reset (restored)",
                self.virtio.label()
            );
        }
    }

    /// Moves data both ways until nothing more can move right now.
    fn run_queues(&mut self) {
        let muxer = &mut self.muxer;
        for round in 0.. {
            let tx = self
                .virtio
                .serve(TXQ, CHAINS_PER_TURN, CHAIN_SHAPE, |mem, chain| {
                    muxer.tx_chain(mem, chain)
                });
            let Some(tx) = tx else {
                return;
            };
            self.virtio
                .serve(RXQ, CHAINS_PER_TURN, CHAIN_SHAPE, |mem, chain| {
                    muxer.rx_chain(mem, chain)
                });
            // More tx work only if it stopped for want of control room that rx made.
            if tx.stop != Stop::Later || !muxer.control_has_room() {
                break;
            }
            if round + 1 >= MAX_ROUNDS {
                // Come back later instead of starving the other devices.
                self.virtio.kick(TXQ);
                break;
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn virtio(&self) -> &VirtioCommon {
        &self.virtio
    }

    fn virtio_mut(&mut self) -> &mut VirtioCommon {
        &mut self.virtio
    }

    fn restored(&mut self) {
        self.reset_pending = true;
        // Served on the event thread, as every queue is.
        self.virtio.kick(EVQ);
    }

    fn reset(&mut self) {
        self.virtio.reset();
        self.reset_pending = false;
        self.muxer.reset();
        // The event thread takes the closed streams out of the poll set.
        self.virtio.kick(RXQ);
    }
}

impl Poller for EventOps<'_> {
    fn add(&mut self, fd: RawFd, data: u32, set: EventSet) -> io::Result<()> {
        EventOps::add(self, Events::with_data_raw(fd, data, set))
            .map_err(|e| io::Error::other(format!("{e:?}")))
    }

    fn modify(&mut self, fd: RawFd, data: u32, set: EventSet) -> io::Result<()> {
        EventOps::modify(self, Events::with_data_raw(fd, data, set))
            .map_err(|e| io::Error::other(format!("{e:?}")))
    }

    fn remove(&mut self, fd: RawFd) {
        if let Err(e) = EventOps::remove(self, Events::empty_raw(fd)) {
            log::debug!("vsock: cannot unpoll fd {fd}: {e:?}");
        }
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.virtio.watch_kicks(ops);
        self.muxer.sync(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // A queue kick needs no more than the runs below (the event queue's
        // buffers are held for a transport reset after a restore).
        if self.virtio.take_kick(&events).is_none() {
            match events.data() {
                LISTENER_TOKEN => self.muxer.accept(),
                token => self.muxer.conn_event(token, events.event_set()),
            }
        }
        self.send_transport_reset();
        self.run_queues();
        self.muxer.sync(ops);
    }
}

#[cfg(test)]
mod tests;
