//! virtio-vsock (device ID 19): stream sockets between the guest and host
//! programs, carried over Unix sockets on the host (see `muxer`).
//!
//! Three queues: rx (device to guest), tx (guest to device) and event (only
//! filled by the driver; kiln never needs to report transport events).

pub mod conn;
pub mod muxer;
pub mod packet;

use std::io;
use std::os::fd::RawFd;
use std::path::Path;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use muxer::{Muxer, Poller, LISTENER_TOKEN};

/// Virtio device ID of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Lowest CID a guest may have (0-2 are reserved: hypervisor, local, host).
pub const MIN_GUEST_CID: u64 = 3;
/// Highest usable CID (`u32::MAX` means "any").
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

const RXQ: usize = 0;
const TXQ: usize = 1;
const QUEUE_SIZES: [u16; 3] = [256, 256, 256];
/// Rounds of tx/rx processing per event before yielding to other devices.
const MAX_ROUNDS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is out of range ({MIN_GUEST_CID} to {MAX_GUEST_CID})")]
    InvalidCid(u64),
    #[error("socket {path}: {source}")]
    Socket { path: String, source: io::Error },
    #[error("eventfd: {0}")]
    EventFd(io::Error),
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Interrupt,
}

pub struct Vsock {
    cid: u64,
    queue_evts: Vec<EventFd>,
    active: Option<Active>,
    muxer: Muxer,
}

/// Validates a guest CID.
pub fn check_cid(cid: u64) -> Result<(), VsockError> {
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
        let muxer = Muxer::new(cid, path).map_err(|source| VsockError::Socket {
            path: path.display().to_string(),
            source,
        })?;
        let queue_evts = QUEUE_SIZES
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(VsockError::EventFd)?;
        Ok(Self {
            cid,
            queue_evts,
            active: None,
            muxer,
        })
    }

    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Moves data both ways until nothing more can move right now.
    fn run_queues(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let (mut rx_used, mut tx_used) = (false, false);
        for round in 0.. {
            let tx = self.muxer.process_tx(&a.mem, &mut a.queues[TXQ]);
            tx_used |= tx.used;
            rx_used |= self.muxer.process_rx(&a.mem, &mut a.queues[RXQ]);
            // More tx work only if it stopped for want of control room that rx made.
            if !tx.stalled || !self.muxer.control_has_room() {
                break;
            }
            if round + 1 >= MAX_ROUNDS {
                // Come back later instead of starving the other devices.
                let _ = self.queue_evts[TXQ].write(1);
                break;
            }
        }
        for (q, used) in [(RXQ, rx_used), (TXQ, tx_used)] {
            if used && a.queues[q].needs_notification(&a.mem).unwrap_or(true) {
                a.interrupt.signal_used_queue();
            }
        }
    }

    /// Makes the event thread run (it does the housekeeping that needs the poll set).
    fn kick(&self) {
        let _ = self.queue_evts[RXQ].write(1);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let config = self.cid.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok());
            *byte = at.and_then(|o| config.get(o)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if activation.queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::Device(format!(
                "vsock needs {} queues, got {}",
                QUEUE_SIZES.len(),
                activation.queues.len()
            )));
        }
        if let Some(i) = activation.queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::BadQueue(i));
        }
        self.active = Some(Active {
            mem: activation.mem,
            queues: activation.queues,
            interrupt: activation.interrupt,
        });
        // Host connections may already be waiting for the guest.
        self.kick();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset();
        self.kick();
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
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                log::error!("vsock: cannot watch queue {i}: {e:?}");
            }
        }
        self.muxer.sync(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            // Queue kicks (the event queue's buffers are only held: kiln
            // has no transport events to report).
            d if (d as usize) < self.queue_evts.len() => {
                let _ = self.queue_evts[d as usize].read();
            }
            LISTENER_TOKEN => self.muxer.accept(),
            token => self.muxer.conn_event(token, events.event_set()),
        }
        self.run_queues();
        self.muxer.sync(ops);
    }
}

#[cfg(test)]
pub(crate) mod test_queue;
#[cfg(test)]
mod tests;
