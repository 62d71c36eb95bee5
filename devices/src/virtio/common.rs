//! What every virtio device has apart from its backend, kept in one place:
//! identity, offered features, config space, the queues while the driver
//! runs the device, counters, and the queue kicks.
//!
//! A device is this plus its host resources (a file, a TAP, sockets). The
//! guest-visible part is plain data a snapshot can save: offered and
//! negotiated features, config bytes, each queue's addresses and indices
//! (`Queue::state()`) and the counters. Guest memory, the interrupt and the
//! kick eventfds are host handles that a restore attaches anew.

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::chain::{Chain, Layout, Limits};
use super::counters::Counters;
use super::queue::{needs_interrupt, serve_queue, Served, Stop, Turn};
use super::{ActivateError, Activation};

/// The state every virtio device keeps (see the module docs); a device
/// model holds one and [`VirtioDevice`](super::VirtioDevice) answers from
/// it. Only this crate's devices build and drive one.
pub struct VirtioCommon {
    label: String,
    device_type: u32,
    queue_max_sizes: &'static [u16],
    avail_features: u64,
    config: Vec<u8>,
    /// From DRIVER_OK to reset.
    active: Option<Activation>,
    counters: Arc<dyn Counters>,
    /// One per queue, signalled by the driver's notify (a KVM ioeventfd).
    queue_evts: Vec<EventFd>,
}

impl VirtioCommon {
    /// `label` names the device in log lines (`net tap0`, `block disk.img`).
    pub(crate) fn new(
        label: String,
        device_type: u32,
        queue_max_sizes: &'static [u16],
        avail_features: u64,
        config: Vec<u8>,
        counters: Arc<dyn Counters>,
    ) -> std::io::Result<Self> {
        let queue_evts = queue_max_sizes
            .iter()
            .map(|_| crate::new_eventfd())
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            label,
            device_type,
            queue_max_sizes,
            avail_features,
            config,
            active: None,
            counters,
            queue_evts,
        })
    }

    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    pub(crate) fn device_type(&self) -> u32 {
        self.device_type
    }

    pub(crate) fn queue_max_sizes(&self) -> &[u16] {
        self.queue_max_sizes
    }

    pub(crate) fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Changes what is offered (before the driver reads it).
    pub(crate) fn set_avail_features(&mut self, features: u64) {
        self.avail_features = features;
    }

    /// Replaces the config space (before the driver reads it).
    pub(crate) fn set_config(&mut self, config: Vec<u8>) {
        self.config = config;
    }

    /// The size of the config space.
    pub(crate) fn config_len(&self) -> usize {
        self.config.len()
    }

    /// Copies `config[offset..]` into `data`; bytes past the end read as zero.
    pub(crate) fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    pub(crate) fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    pub(crate) fn counters(&self) -> Arc<dyn Counters> {
        self.counters.clone()
    }

    /// Takes over the queues the driver set up (see `check_activation`).
    pub(crate) fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.check_activation(&activation)?;
        self.active = Some(activation);
        Ok(())
    }

    /// The driver set up one queue per queue the device offers, each ready.
    pub(crate) fn check_activation(&self, activation: &Activation) -> Result<(), ActivateError> {
        let (want, got) = (self.queue_max_sizes.len(), activation.queues.len());
        if want != got {
            return Err(ActivateError::Device(format!(
                "{} needs {want} queues, got {got}",
                self.label
            )));
        }
        match activation.queues.iter().position(|q| !q.ready()) {
            Some(i) => Err(ActivateError::BadQueue(i)),
            None => Ok(()),
        }
    }

    /// Forgets the queues (driver reset).
    pub(crate) fn reset(&mut self) {
        self.active = None;
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active.is_some()
    }

    pub(crate) fn active(&self) -> Option<&Activation> {
        self.active.as_ref()
    }

    pub(crate) fn active_mut(&mut self) -> Option<&mut Activation> {
        self.active.as_mut()
    }

    /// Makes the event loop serve `queue` again (work left after a budget,
    /// or chains queued before DRIVER_OK).
    pub(crate) fn kick(&self, queue: usize) {
        if let Some(evt) = self.queue_evts.get(queue) {
            let _ = evt.write(1);
        }
    }

    /// Puts the kick eventfds in the event loop's poll set, each with its
    /// queue index as the event data (devices number their other event
    /// sources from the queue count up).
    pub(crate) fn watch_kicks(&self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                log::error!("{}: cannot watch the kicks of queue {i}: {e:?}", self.label);
            }
        }
    }

    /// If `events` is a queue's kick: drains it (kicks before DRIVER_OK are
    /// dropped) and returns the queue.
    pub(crate) fn take_kick(&self, events: &Events) -> Option<usize> {
        let queue = usize::try_from(events.data()).ok()?;
        let _ = self.queue_evts.get(queue)?.read();
        Some(queue)
    }

    /// Serves `queue` with `serve_queue` (see there); when the budget runs
    /// out, kicks the queue so the rest waits for the other event sources.
    /// None while the device is not running.
    pub(crate) fn serve<F>(
        &mut self,
        queue: usize,
        budget: usize,
        shape: (Layout, Limits),
        serve: F,
    ) -> Option<Turn>
    where
        F: FnMut(&GuestMemoryMmap, &Chain) -> Served,
    {
        let active = self.active.as_mut()?;
        let q = active.queues.get_mut(queue)?;
        let turn = serve_queue(q, &active.mem, &active.interrupt, budget, shape, serve);
        if turn.stop == Stop::Budget {
            self.kick(queue);
        }
        Some(turn)
    }

    /// Interrupts the driver for the chains a device returned on `queue`
    /// itself (outside `serve`), if the driver wants to be told.
    pub(crate) fn signal_used(&mut self, queue: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if let Some(q) = active.queues.get_mut(queue) {
            if needs_interrupt(q, &active.mem) {
                active.interrupt.signal_used_queue();
            }
        }
    }
}

impl Drop for VirtioCommon {
    /// The counters, once, when the VM goes away (KILN_LOG=info).
    fn drop(&mut self) {
        log::info!("{}: {}", self.label, &*self.counters);
    }
}

/// Copies `config[offset..]` into `data`; bytes past the end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = (config.len() - start).min(data.len());
    data[..n].copy_from_slice(&config[start..start + n]);
}
