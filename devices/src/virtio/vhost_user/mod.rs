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
//! - The backend's death (its socket hangs up) is logged once; the device
//!   then stops: a later DRIVER_OK fails (DEVICE_NEEDS_RESET) and the
//!   requests in flight are never answered, but nothing in kiln waits on
//!   them.
//!
//! The messages that start and stop the rings run on the thread that
//! writes the device status (a vCPU); see `connection` on waiting.

pub mod connection;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

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

/// Event data of the socket's hang-up; the call eventfds are the queue
/// indices below it.
const TOKEN_SOCKET: u32 = u32::MAX;

/// A virtio device served by a vhost-user backend (see the module docs).
pub struct VhostUserDevice {
    virtio: VirtioCommon,
    connection: VhostUserConnection,
    /// One per queue, signalled by the backend when it used buffers.
    calls: Vec<EventFd>,
    counters: Arc<VhostUserCounters>,
    /// Set once the backend hung up: nothing is sent to it any more.
    gone: bool,
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
        })
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
        log::error!(
            "{}: the vhost-user backend closed its connection; the device stops (the guest's requests to it get no answer)",
            self.virtio.label()
        );
        let socket =
            Events::with_data_raw(self.connection.socket_fd(), TOKEN_SOCKET, EventSet::empty());
        let _ = ops.remove(socket);
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
        for (i, call) in self.calls.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(call, i as u32, EventSet::IN)) {
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
        if events.data() == TOKEN_SOCKET {
            let set = events.event_set();
            if set.intersects(EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR) {
                self.backend_hung_up(ops);
            }
            return;
        }
        let Some(call) = self.calls.get(events.data() as usize) else {
            return;
        };
        let _ = call.read();
        self.counters.calls.inc();
        if let Some(active) = self.virtio.active() {
            active.interrupt.signal_used_queue();
        }
    }
}
