//! A virtio device whose queues a vhost-user backend (another process,
//! e.g. virtiofsd) serves: kiln keeps the transport, features and config
//! space; the backend reads and writes the rings in guest memory directly
//! (shared with it as file descriptors at DRIVER_OK).
//!
//! - The guest's queue notifications are the device's queue eventfds (KVM
//!   ioeventfds on QueueNotify), handed to the backend as its kick fds:
//!   kiln's event loop does not touch them.
//! - The backend signals one call eventfd per queue; the event loop turns
//!   that into the device's interrupt (a virtio-mmio interrupt needs its
//!   status bit set, so the call cannot be the irqfd itself).
//! - The backend's death (its socket hangs up) is logged once. The device
//!   then answers the guest's requests itself with the device type's error
//!   reply (virtio-fs: EIO), those the backend took but never finished
//!   included (from the used ring's index on: virtiofsd finishes a queue's
//!   requests in order), so the guest's processes get errors instead of
//!   waiting forever; a later DRIVER_OK fails (DEVICE_NEEDS_RESET).
//!
//! The messages that start and stop the rings run on the thread that
//! writes the device status (a vCPU); see `connection` on waiting.

pub mod connection;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::chain::{Chain, Layout, Limits};
use super::queue::Served;

use super::common::VirtioCommon;
use super::counters::device_counters;
use super::{ActivateError, Activation, VirtioDevice};
use super::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
pub use connection::{VhostUserConnection, VhostUserError};

/// The ring features kiln's transport can pass through to a backend
/// (indirect descriptors, event index) and the one every device needs.
const PASSED_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | (1 << 28);

device_counters! {
    /// vhost-user device counters.
    pub(crate) struct VhostUserCounters {
        /// Interrupts the backend asked for (call eventfd signals).
        calls,
        /// Times the device was started by the driver (DRIVER_OK).
        activations,
        /// Set-up or tear-down messages that failed.
        errors,
    }
}

/// Event data of the socket's hang-up. The kicks (watched once the
/// backend is gone) are the queue indices, the calls follow them.
const TOKEN_SOCKET: u32 = u32::MAX;
/// Requests answered per event once the backend is gone, before yielding.
const ORPHANS_PER_EVENT: usize = 64;
/// A request's shape: what the driver sends, then room for the answer.
const ORPHAN_SHAPE: (Layout, Limits) = (Layout::ReadThenWrite, Limits::descriptors(1024));

/// How the device answers a request itself once the backend is gone (the
/// device type's error reply); returns the bytes written into the chain.
pub(crate) type OrphanReply = fn(&GuestMemoryMmap, &Chain) -> u32;

/// A virtio device served by a vhost-user backend (see the module docs).
pub struct VhostUserDevice {
    virtio: VirtioCommon,
    connection: VhostUserConnection,
    /// One per queue, signalled by the backend when it used buffers.
    calls: Vec<EventFd>,
    counters: Arc<VhostUserCounters>,
    /// Set once the backend hung up: nothing is sent to it any more.
    gone: bool,
    /// The requests' error reply once the backend is gone (none: they are
    /// left unanswered).
    orphan_reply: Option<OrphanReply>,
}

impl VhostUserDevice {
    /// A device of type `device_type` with `queue_sizes` queues and the
    /// config space `config`, served by the backend of `connection`. The
    /// guest is offered the backend's features that kiln's transport
    /// passes through; `label` names the device in log lines.
    pub fn new(
        label: String,
        device_type: u32,
        queue_sizes: &'static [u16],
        config: Vec<u8>,
        connection: VhostUserConnection,
    ) -> Result<Self, VhostUserError> {
        let features = connection.features() & PASSED_FEATURES;
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserError::Backend(
                "it does not offer VIRTIO_F_VERSION_1".into(),
            ));
        }
        let counters = Arc::new(VhostUserCounters::default());
        let virtio = VirtioCommon::new(
            label,
            device_type,
            queue_sizes,
            features,
            config,
            counters.clone(),
        )
        .map_err(VhostUserError::Socket)?;
        let calls = queue_sizes
            .iter()
            .map(|_| crate::new_eventfd())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(VhostUserError::Socket)?;
        Ok(Self {
            virtio,
            connection,
            calls,
            counters,
            gone: false,
            orphan_reply: None,
        })
    }

    /// Answers the guest's requests with `reply` once the backend is gone.
    pub(crate) fn with_orphan_reply(mut self, reply: OrphanReply) -> Self {
        self.orphan_reply = Some(reply);
        self
    }

    /// Whether the backend hung up.
    pub fn backend_gone(&self) -> bool {
        self.gone
    }

    fn backend_hung_up(&mut self, ops: &mut EventOps) {
        if self.gone {
            return;
        }
        self.gone = true;
        let answered = match self.orphan_reply {
            Some(_) => "kiln answers the guest's requests to it with errors",
            None => "the guest's requests to it get no answer",
        };
        log::error!(
            "{}: the vhost-user backend closed its connection; the device stops ({answered})",
            self.virtio.label()
        );
        let socket =
            Events::with_data_raw(self.connection.socket_fd(), TOKEN_SOCKET, EventSet::empty());
        let _ = ops.remove(socket);
        if self.orphan_reply.is_some() {
            self.take_over_queues();
            self.virtio.watch_kicks(ops);
            self.answer_orphans();
        }
    }

    /// Resumes each running queue where the backend's answers stopped: the
    /// used ring's index (the guest's memory, as the backend left it).
    fn take_over_queues(&mut self) {
        let Some(active) = self.virtio.active_mut() else {
            return;
        };
        for queue in &mut active.queues {
            let used_idx = GuestAddress(queue.used_ring().wrapping_add(2));
            if let Ok(idx) = active.mem.read_obj::<u16>(used_idx) {
                queue.set_next_avail(idx);
                queue.set_next_used(idx);
            }
        }
    }

    /// Answers what waits in each queue with the error reply (up to a
    /// budget per queue; the rest on the kick that `serve` leaves).
    fn answer_orphans(&mut self) {
        let Some(reply) = self.orphan_reply else {
            return;
        };
        for queue in 0..self.calls.len() {
            self.virtio
                .serve(queue, ORPHANS_PER_EVENT, ORPHAN_SHAPE, |mem, chain| {
                    Served::Used(reply(mem, chain))
                });
        }
    }
}

impl VirtioDevice for VhostUserDevice {
    fn virtio(&self) -> &VirtioCommon {
        &self.virtio
    }

    fn virtio_mut(&mut self) -> &mut VirtioCommon {
        &mut self.virtio
    }

    /// Hands the rings to the backend (see `VhostUserConnection::start`).
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.virtio.check_activation(&activation)?;
        if self.gone {
            return Err(ActivateError::Device(format!(
                "{}: the vhost-user backend is gone",
                self.virtio.label()
            )));
        }
        self.counters.activations.inc();
        let started = self.connection.start(
            activation.features,
            &activation.mem,
            &activation.queues,
            self.virtio.queue_events(),
            &self.calls,
        );
        if let Err(e) = started {
            self.counters.errors.inc();
            return Err(ActivateError::Device(format!(
                "{}: {e}",
                self.virtio.label()
            )));
        }
        self.virtio.activate(activation)
    }

    /// Stops the backend's rings, then forgets the queues.
    fn reset(&mut self) {
        if self.virtio.is_active() && !self.gone {
            if let Err(e) = self.connection.stop(self.calls.len()) {
                self.counters.errors.inc();
                log::warn!("{}: stopping the backend's rings: {e}", self.virtio.label());
            }
        }
        self.virtio.reset();
    }
}

impl MutEventSubscriber for VhostUserDevice {
    fn init(&mut self, ops: &mut EventOps) {
        let queues = self.calls.len() as u32;
        for (i, call) in self.calls.iter().enumerate() {
            let token = queues + i as u32;
            if let Err(e) = ops.add(Events::with_data(call, token, EventSet::IN)) {
                log::error!("{}: cannot watch call {i}: {e:?}", self.virtio.label());
            }
        }
        // Only the hang-up: the answers on the socket are read by the
        // thread that sent the message.
        let socket = Events::with_data_raw(
            self.connection.socket_fd(),
            TOKEN_SOCKET,
            EventSet::READ_HANG_UP,
        );
        if let Err(e) = ops.add(socket) {
            log::error!(
                "{}: cannot watch the backend's socket: {e:?}",
                self.virtio.label()
            );
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let queues = self.calls.len() as u32;
        match events.data() {
            TOKEN_SOCKET => {
                let set = events.event_set();
                if set.intersects(EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR) {
                    self.backend_hung_up(ops);
                }
            }
            // A kick: watched only once the backend is gone.
            data if data < queues => {
                if self.virtio.take_kick(&events).is_some() {
                    self.answer_orphans();
                }
            }
            data => {
                let Some(call) = self.calls.get((data - queues) as usize) else {
                    return;
                };
                let _ = call.read();
                self.counters.calls.inc();
                if let Some(active) = self.virtio.active() {
                    active.interrupt.signal_used_queue();
                }
            }
        }
    }
}
