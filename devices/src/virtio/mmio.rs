//! The virtio-mmio transport (version 2, "modern"): the register window the
//! guest driver uses to discover a device, negotiate features, set up queues
//! and drive the device status state machine.
//!
//! Every value the guest writes is checked here before a device sees it:
//! out-of-range queue selectors, queue sizes, feature pages and status
//! transitions are ignored (or fail the negotiation), never trusted.
//!
//! What a guest gets wrong is logged at debug level only: a guest can
//! repeat a bad write as fast as it exits, and a log line per write would
//! flood the host's log (and, on a stderr nobody reads, stall the vCPU).

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::persist::{QueueSnapshot, RestoreError, TransportState};
use super::{
    ActivateError, Activation, Interrupt, VirtioDevice, INT_CONFIG_CHANGE, INT_USED_RING,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::bus::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4b49_4c4e; // "KILN"

// Register offsets.
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// QueueNotify: normally caught by a KVM ioeventfd before it gets here.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

// Device status bits.
#[cfg(test)] // the driver sets it; the device never looks
pub(crate) const STATUS_ACKNOWLEDGE: u32 = 1;
pub(crate) const STATUS_DRIVER: u32 = 2;
pub(crate) const STATUS_DRIVER_OK: u32 = 4;
pub(crate) const STATUS_FEATURES_OK: u32 = 8;
pub(crate) const STATUS_NEEDS_RESET: u32 = 64;
const STATUS_FAILED: u32 = 128;
/// Every status bit a driver (or the device's NEEDS_RESET) can set.
const STATUS_KNOWN: u32 =
    1 | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK | STATUS_NEEDS_RESET | STATUS_FAILED;

/// The virtio-mmio (version 2) register window of one device, on the MMIO
/// bus: feature negotiation, queue setup, status, interrupt status and the
/// config space. It activates the device at DRIVER_OK and resets it when
/// the driver writes 0 to the status. Queue notifications do not pass
/// through here: the monitor registers the device's queue eventfds as KVM
/// ioeventfds on [`REG_QUEUE_NOTIFY`].
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    /// Cached from the device: offered features and queue count never change.
    offered_features: u64,
}

impl MmioTransport {
    /// The window of `device`, whose queues live in `mem` and whose
    /// interrupts go through `interrupt`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
    ) -> Self {
        let (offered_features, queues) = {
            let dev = device.lock().unwrap_or_else(|e| e.into_inner());
            let queues = dev
                .queue_max_sizes()
                .iter()
                .map(|&max| {
                    Queue::new(max)
                        .unwrap_or_else(|_| Queue::new(256).expect("256 is a valid queue size"))
                })
                .collect();
            (dev.features(), queues)
        };
        Self {
            device,
            mem,
            interrupt,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            offered_features,
        }
    }

    fn device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The selected queue, if the selector is in range and queue setup is allowed.
    fn selected_queue_for_setup(&mut self) -> Option<&mut Queue> {
        // Queues may be configured after FEATURES_OK and before DRIVER_OK.
        if self.status & STATUS_FEATURES_OK == 0 || self.status & STATUS_DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.status & STATUS_DRIVER_OK != 0 {
            self.device().reset();
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (apart from reset); FAILED is always accepted.
        if value & self.status != self.status {
            log::debug!(
                "virtio-mmio: status {value:#x} drops bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        let new = value & !self.status;
        if new & STATUS_FEATURES_OK != 0 && !self.features_acceptable() {
            // Leave FEATURES_OK clear: the driver reads it back and gives up.
            self.status = value & !STATUS_FEATURES_OK;
            return;
        }
        if new & STATUS_DRIVER_OK != 0 {
            if self.status & STATUS_FEATURES_OK == 0 {
                log::debug!("virtio-mmio: DRIVER_OK before FEATURES_OK; ignored");
                return;
            }
            self.status = value;
            self.activate();
            return;
        }
        self.status = value;
    }

    /// Only what was offered, and always VIRTIO_F_VERSION_1 (no legacy mode).
    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.offered_features == 0
            && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self) {
        match self.start_device() {
            Ok(()) => {}
            // The guest's doing: see the module docs on log lines.
            Err(e @ ActivateError::BadQueue(_)) => {
                log::debug!("virtio-mmio: activation failed: {e}");
                self.fail();
            }
            Err(e) => {
                log::warn!("virtio-mmio: activation failed: {e}");
                self.fail();
            }
        }
    }

    /// Hands the device copies of the queues (at DRIVER_OK, or at a
    /// restore: with the saved indices), once each ring is checked to lie
    /// in guest memory.
    fn start_device(&mut self) -> Result<(), ActivateError> {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for (i, q) in self.queues.iter_mut().enumerate() {
            q.set_event_idx(event_idx);
            if q.ready() && !rings_fit(q, &self.mem) {
                return Err(ActivateError::BadQueue(i));
            }
        }
        // The device gets its own copies; the transport keeps the register view.
        // The transport checked every value as it was written: a queue
        // that does not convert is the guest's doing, as a bad layout is.
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| Queue::try_from(q.state()).map_err(|_| ActivateError::BadQueue(i)));
        let queues = queues.collect::<Result<Vec<_>, _>>()?;
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            features: self.driver_features,
        };
        self.device().activate(activation)
    }

    /// The guest-visible state: registers, config space, and each queue as
    /// the device last left it (its own copy while it runs: the transport's
    /// register view keeps the indices of DRIVER_OK).
    ///
    /// Taken while nothing else uses the device: the vCPUs and the event
    /// loop are paused, so no request is half-done.
    pub fn save(&self) -> TransportState {
        let device = self.device();
        let live = device.virtio().active().map(|a| &a.queues);
        let queues = match live {
            Some(queues) => queues.iter().map(|q| q.state()).collect::<Vec<_>>(),
            None => self.queues.iter().map(|q| q.state()).collect(),
        };
        let mut config = vec![0; device.virtio().config_len()];
        device.read_config(0, &mut config);
        TransportState {
            device_type: device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            config,
            queues: queues
                .into_iter()
                .map(|q| QueueSnapshot {
                    size: q.size,
                    ready: q.ready,
                    desc_table: q.desc_table,
                    avail_ring: q.avail_ring,
                    used_ring: q.used_ring,
                    next_avail: q.next_avail,
                    next_used: q.next_used,
                })
                .collect(),
        }
    }

    /// The device's overlay disk, if it has one (see
    /// [`VirtioDevice::disk_overlay`]).
    pub fn disk_overlay(&self) -> Option<std::io::Result<super::SavedOverlay>> {
        self.device().disk_overlay()
    }

    /// Applies `state` (saved by [`MmioTransport::save`]) to this freshly
    /// built transport and its device, and, if the driver had the device
    /// running, starts it again with the saved queues, as DRIVER_OK would,
    /// without the guest doing anything; the device is then told it was
    /// restored ([`VirtioDevice::restored`]). Every value is checked first:
    /// on an error nothing was applied.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), RestoreError> {
        let device_type = self.device().device_type();
        let bad = |reason: String| RestoreError::BadValue {
            device_type,
            reason,
        };
        if state.device_type != device_type {
            return Err(RestoreError::DeviceType {
                saved: state.device_type,
                built: device_type,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                device_type,
                saved: state.queues.len(),
                built: self.queues.len(),
            });
        }
        if state.status & !STATUS_KNOWN != 0 {
            return Err(bad(format!("unknown status bits {:#x}", state.status)));
        }
        let features_ok = state.status & STATUS_FEATURES_OK != 0;
        if state.status & STATUS_DRIVER_OK != 0 && !features_ok {
            return Err(bad("DRIVER_OK without FEATURES_OK".into()));
        }
        // The device built now may offer less (e.g. a TAP without offloads).
        if features_ok
            && (state.driver_features & !self.offered_features != 0
                || state.driver_features & VIRTIO_F_VERSION_1 == 0)
        {
            return Err(bad(format!(
                "negotiated features {:#x} are not all offered ({:#x})",
                state.driver_features, self.offered_features
            )));
        }
        if state.interrupt_status & !(INT_USED_RING | INT_CONFIG_CHANGE) != 0 {
            return Err(bad(format!(
                "unknown interrupt status bits {:#x}",
                state.interrupt_status
            )));
        }
        let config_len = self.device().virtio().config_len();
        if state.config.len() != config_len {
            return Err(bad(format!(
                "{} bytes of config space saved for {config_len}",
                state.config.len()
            )));
        }
        let event_idx = state.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, (saved, built)) in state.queues.iter().zip(&self.queues).enumerate() {
            let queue = restored_queue(saved, built.max_size(), event_idx, &self.mem).map_err(
                |reason| RestoreError::BadQueue {
                    device_type,
                    queue: index,
                    reason,
                },
            )?;
            queues.push(queue);
        }

        self.queues = queues;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        self.device().virtio_mut().set_config(state.config.clone());
        let running = STATUS_DRIVER_OK | STATUS_NEEDS_RESET | STATUS_FAILED;
        if state.status & running == STATUS_DRIVER_OK {
            self.start_device()
                .map_err(|e| bad(format!("cannot start the device again: {e}")))?;
            self.device().restored();
        }
        if state.interrupt_status != 0 {
            // Raised again: one the driver already saw is a spurious
            // interrupt it ignores; one it had not seen would be lost.
            self.interrupt.restore_status(state.interrupt_status);
        }
        Ok(())
    }

    fn fail(&mut self) {
        self.status |= STATUS_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config_change();
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device().device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features as u32,
                1 => (self.offered_features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                // Features are fixed once FEATURES_OK is set.
                if self.status & STATUS_FEATURES_OK != 0 || self.status & STATUS_DRIVER == 0 {
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => {
                if let Some(q) = self.selected_queue_for_setup() {
                    // Sizes that are zero, too big or not a power of two are ignored.
                    if q.try_set_size(value.min(u32::from(u16::MAX)) as u16)
                        .is_err()
                    {
                        log::debug!("virtio-mmio: queue size {value} ignored");
                    }
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue_for_setup() {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_NOTIFY => self.notify(value),
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.set_status(value),
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH | REG_QUEUE_AVAIL_LOW
            | REG_QUEUE_AVAIL_HIGH | REG_QUEUE_USED_LOW | REG_QUEUE_USED_HIGH => {
                if let Some(q) = self.selected_queue_for_setup() {
                    let ring = offset & !4;
                    let old = match ring {
                        REG_QUEUE_DESC_LOW => q.desc_table(),
                        REG_QUEUE_AVAIL_LOW => q.avail_ring(),
                        _ => q.used_ring(),
                    };
                    let addr = GuestAddress(if offset & 4 == 0 {
                        old & !0xffff_ffff | u64::from(value)
                    } else {
                        old & 0xffff_ffff | u64::from(value) << 32
                    });
                    // A misaligned address is ignored.
                    let set = match ring {
                        REG_QUEUE_DESC_LOW => q.try_set_desc_table_address(addr),
                        REG_QUEUE_AVAIL_LOW => q.try_set_avail_ring_address(addr),
                        _ => q.try_set_used_ring_address(addr),
                    };
                    if set.is_err() {
                        log::debug!("virtio-mmio: misaligned ring address {addr:?} ignored");
                    }
                }
            }
            _ => log::debug!("virtio-mmio: write to read-only or unknown register {offset:#x}"),
        }
    }

    /// QueueNotify without an ioeventfd (tests, or KVM without ioeventfd):
    /// forward to the device's queue eventfd.
    fn notify(&self, queue: u32) {
        let dev = self.device();
        if let Some(evt) = dev.queue_events().get(queue as usize) {
            let _ = evt.write(1);
        }
    }
}

/// A queue of the device (its largest size `max_size`) as `saved` says,
/// checked as the driver's register writes are (a size the device takes,
/// aligned rings) and, if ready, with its rings inside guest memory.
fn restored_queue(
    saved: &QueueSnapshot,
    max_size: u16,
    event_idx: bool,
    mem: &GuestMemoryMmap,
) -> Result<Queue, String> {
    let state = virtio_queue::QueueState {
        max_size,
        next_avail: saved.next_avail,
        next_used: saved.next_used,
        event_idx_enabled: event_idx,
        size: saved.size,
        ready: saved.ready,
        desc_table: saved.desc_table,
        avail_ring: saved.avail_ring,
        used_ring: saved.used_ring,
    };
    let queue = Queue::try_from(state).map_err(|e| {
        format!(
            "size {} (at most {max_size}) or ring addresses {:#x}/{:#x}/{:#x}: {e}",
            saved.size, saved.desc_table, saved.avail_ring, saved.used_ring
        )
    })?;
    if queue.ready() && !rings_fit(&queue, mem) {
        return Err(format!(
            "rings at {:#x}/{:#x}/{:#x} of {} entries are not inside guest memory",
            saved.desc_table, saved.avail_ring, saved.used_ring, saved.size
        ));
    }
    Ok(queue)
}

/// The three rings of `queue` lie in `mem`: virtio-queue's `is_valid`
/// without its error-level log lines (the guest picks the addresses).
fn rings_fit(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    let size = usize::from(queue.size());
    // Descriptors 16 bytes each; flags, index, ring, event of 2 bytes each
    // (avail); flags, index, event of 2 bytes and ring elements of 8 (used).
    [
        (queue.desc_table(), 16 * size, Permissions::Read),
        (queue.avail_ring(), 6 + 2 * size, Permissions::Read),
        (queue.used_ring(), 6 + 8 * size, Permissions::Write),
    ]
    .into_iter()
    .all(|(addr, len, access)| mem.check_range(GuestAddress(addr), len, access))
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            data.fill(0);
            self.device().read_config(offset - CONFIG_SPACE, data);
            return;
        }
        // Registers are 32-bit and aligned; anything else reads as zero.
        let value = if data.len() == 4 && offset.is_multiple_of(4) {
            self.read_register(offset)
        } else {
            0
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            // Config writes only make sense once the driver is in charge.
            if self.status & STATUS_DRIVER != 0 {
                self.device().write_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqLine;
    use crate::virtio::common::VirtioCommon;
    use crate::virtio::counters::NoCounters;
    use crate::virtio::ActivateError;
    use vm_memory::GuestAddress;

    struct Dummy {
        virtio: VirtioCommon,
        activations: usize,
        resets: usize,
        restored: usize,
    }

    impl VirtioDevice for Dummy {
        fn virtio(&self) -> &VirtioCommon {
            &self.virtio
        }
        fn virtio_mut(&mut self) -> &mut VirtioCommon {
            &mut self.virtio
        }
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            assert_eq!(a.queues.len(), 2);
            self.activations += 1;
            self.virtio.activate(a)
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.virtio.reset();
        }
        fn restored(&mut self) {
            self.restored += 1;
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let virtio = VirtioCommon::new(
            "dummy".into(),
            42,
            &[16, 16],
            VIRTIO_F_VERSION_1 | 1,
            b"cfgbytes".to_vec(),
            Arc::new(NoCounters),
        )
        .unwrap();
        let dev = Arc::new(Mutex::new(Dummy {
            virtio,
            activations: 0,
            resets: 0,
            restored: 0,
        }));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let t = MmioTransport::new(dev.clone(), mem, Interrupt::new(IrqLine::new().unwrap()));
        (t, dev)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features_hi: u32) {
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, features_hi);
        w(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, sel: u32, base: u32) {
        w(t, REG_QUEUE_SEL, sel);
        w(t, REG_QUEUE_NUM, 16);
        w(t, REG_QUEUE_DESC_LOW, base);
        w(t, REG_QUEUE_AVAIL_LOW, base + 0x1000);
        w(t, REG_QUEUE_USED_LOW, base + 0x2000);
        w(t, REG_QUEUE_READY, 1);
    }

    #[test]
    fn identity_and_config_space() {
        let (mut t, _) = setup();
        assert_eq!(r(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 42);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 0);
        let mut b = [0u8; 3];
        t.read(CONFIG_SPACE + 3, &mut b);
        assert_eq!(&b, b"byt");
        // Unaligned or narrow register reads give zero, not a panic.
        let mut b = [0xffu8; 2];
        t.read(REG_MAGIC + 1, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn full_negotiation_activates_and_reset_resets() {
        let (mut t, dev) = setup();
        negotiate(&mut t, 1);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        setup_queue(&mut t, 0, 0x10000);
        setup_queue(&mut t, 1, 0x20000);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(dev.lock().unwrap().activations, 1);
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        // Queue setup is frozen after DRIVER_OK.
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        w(&mut t, REG_STATUS, 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
    }

    #[test]
    fn features_without_version_1_or_not_offered_are_refused() {
        let (mut t, _) = setup();
        negotiate(&mut t, 0);
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        let (mut t, _) = setup();
        negotiate(&mut t, 1 | 2); // bit 33 was never offered
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn hostile_register_use_is_ignored() {
        let (mut t, dev) = setup();
        // Queue setup before FEATURES_OK, and out-of-range selectors.
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        w(&mut t, REG_QUEUE_SEL, 99);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0);
        w(&mut t, REG_QUEUE_NOTIFY, 99);
        // DRIVER_OK before FEATURES_OK does not activate.
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
        );
        assert_eq!(dev.lock().unwrap().activations, 0);
        // A queue pointing outside guest memory fails activation cleanly.
        let (mut t, dev) = setup();
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0, 0xfff0_0000);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(dev.lock().unwrap().activations, 0);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        assert_ne!(
            r(&mut t, REG_INTERRUPT_STATUS) & super::super::INT_CONFIG_CHANGE,
            0
        );
    }

    #[test]
    fn a_ring_must_fit_in_memory_to_its_last_byte() {
        // 16 entries: the used ring is 6 + 8 * 16 = 134 bytes; memory ends at 1 MiB.
        for (used, fits) in [(0x10_0000 - 136, true), (0x10_0000 - 132, false)] {
            let (mut t, dev) = setup();
            negotiate(&mut t, 1);
            setup_queue(&mut t, 0, 0x10000);
            setup_queue(&mut t, 1, 0x20000);
            w(&mut t, REG_QUEUE_USED_LOW, used);
            w(
                &mut t,
                REG_STATUS,
                STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
            );
            let failed = r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET != 0;
            assert_eq!(failed, !fits, "used ring at {used:#x}");
            assert_eq!(dev.lock().unwrap().activations, usize::from(fits));
        }
    }

    #[test]
    fn notify_without_ioeventfd_reaches_the_queue_eventfd() {
        let (mut t, dev) = setup();
        w(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(dev.lock().unwrap().queue_events()[1].read().unwrap(), 1);
    }

    /// A transport the driver set running, with the device 5 chains into
    /// queue 0 (4 returned) and an interrupt not yet acknowledged.
    fn running_transport() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let (mut t, dev) = setup();
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0, 0x10000);
        setup_queue(&mut t, 1, 0x20000);
        w(&mut t, REG_QUEUE_SEL, 1);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        {
            let mut d = dev.lock().unwrap();
            let q = &mut d.virtio.active_mut().unwrap().queues[0];
            q.set_next_avail(5);
            q.set_next_used(4);
        }
        t.interrupt.signal_used_queue();
        (t, dev)
    }

    #[test]
    fn a_saved_transport_restores_onto_a_fresh_one_and_runs_again() {
        let (t, _) = running_transport();
        let state = t.save();
        assert_eq!(state.device_type, 42);
        assert_eq!(state.config, b"cfgbytes");
        assert_eq!(state.interrupt_status, super::super::INT_USED_RING);
        // The device's own copy of the queue, not the register view.
        assert_eq!(
            (state.queues[0].next_avail, state.queues[0].next_used),
            (5, 4)
        );
        assert_eq!((state.queues[1].size, state.queues[1].ready), (16, true));

        let (mut fresh, dev) = setup();
        fresh.restore(&state).unwrap();
        {
            let d = dev.lock().unwrap();
            assert_eq!(
                (d.activations, d.restored),
                (1, 1),
                "started as at DRIVER_OK"
            );
            let q = &d.virtio.active().unwrap().queues[0];
            assert_eq!((q.next_avail(), q.next_used()), (5, 4));
        }
        assert_eq!(fresh.save(), state);
        assert_eq!(r(&mut fresh, REG_STATUS), state.status);
        assert_eq!(r(&mut fresh, REG_QUEUE_READY), 1, "queue 1 stays selected");
        assert_eq!(r(&mut fresh, REG_INTERRUPT_STATUS), state.interrupt_status);
        // The driver can reset it as any running device.
        w(&mut fresh, REG_STATUS, 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
    }

    #[test]
    fn a_device_the_driver_had_not_started_is_not_started_by_a_restore() {
        let (mut t, _) = setup();
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0, 0x10000);
        let state = t.save();
        let (mut fresh, dev) = setup();
        fresh.restore(&state).unwrap();
        assert_eq!(dev.lock().unwrap().activations, 0);
        assert_eq!(fresh.save(), state);
        // The driver goes on where it was: queue 1, then DRIVER_OK.
        setup_queue(&mut fresh, 1, 0x20000);
        w(
            &mut fresh,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(dev.lock().unwrap().activations, 1);
    }

    #[test]
    fn bad_saved_values_are_typed_errors_and_change_nothing() {
        let (t, _) = running_transport();
        let good = t.save();
        type Edit = fn(&mut TransportState);
        let cases: &[(&str, Edit)] = &[
            ("device type", |s| s.device_type = 7),
            ("queue count", |s| {
                s.queues.pop();
            }),
            ("size not a power of two", |s| s.queues[0].size = 3),
            ("size above the maximum", |s| s.queues[0].size = 32),
            ("size zero", |s| s.queues[0].size = 0),
            ("misaligned ring", |s| s.queues[1].desc_table = 0x20001),
            ("ring outside memory", |s| {
                s.queues[0].used_ring = 0xfff0_0000
            }),
            ("ring past the end", |s| {
                s.queues[0].used_ring = u64::MAX - 7
            }),
            ("DRIVER_OK alone", |s| s.status = STATUS_DRIVER_OK),
            ("unknown status", |s| s.status |= 0x400),
            ("features not offered", |s| s.driver_features |= 1 << 40),
            ("no VERSION_1", |s| s.driver_features = 0),
            ("interrupt bits", |s| s.interrupt_status = 0x80),
            ("config size", |s| s.config.push(0)),
        ];
        for (what, edit) in cases {
            let mut bad = good.clone();
            edit(&mut bad);
            let (mut fresh, dev) = setup();
            let before = fresh.save();
            let e = fresh.restore(&bad).expect_err(what);
            let expected = match *what {
                "device type" => matches!(
                    e,
                    RestoreError::DeviceType {
                        saved: 7,
                        built: 42
                    }
                ),
                "queue count" => matches!(e, RestoreError::QueueCount { saved: 1, .. }),
                w if w.contains("size") && w != "config size" || w.contains("ring") => {
                    matches!(e, RestoreError::BadQueue { .. })
                }
                _ => matches!(e, RestoreError::BadValue { .. }),
            };
            assert!(expected, "{what}: {e:?}");
            assert_eq!(fresh.save(), before, "{what}: the transport changed");
            assert_eq!(dev.lock().unwrap().activations, 0, "{what}");
        }
    }
}
