//! Places devices on the VM: legacy devices on fixed ports, virtio devices in
//! consecutive MMIO windows with their own IRQ line, ioeventfds for queue
//! notifications, an irqfd for interrupts, and their host-side work on the
//! event loop. The manager borrows the VM, guest memory and the event loop
//! once, so attaching a device takes only the device.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kiln_devices::bus::Bus;
use kiln_devices::control::{ControlPage, CONTROL_PAGE_SIZE};
use kiln_devices::i8042::{NullDevice, I8042};
use kiln_devices::irq::IrqLine;
use kiln_devices::serial::SerialDevice;
use kiln_devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use kiln_devices::virtio::{Interrupt, VirtioDevice};
use kvm_ioctls::IoEventAddress;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::console::PanicWatch;
use crate::error::{Error, Result};
use crate::event_loop::{EventLoop, SerialInput, Subscriber, VmEvents};
use crate::layout::{
    CONTROL_PAGE_START, DEBUG_PORT, I8042_COMMAND_PORT, I8042_DATA_PORT, IRQ_MAX, SERIAL_IRQ,
    SERIAL_PORT_BASE, SERIAL_PORT_SIZE, VIRTIO_IRQ_BASE, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::lifecycle::{ControlReports, Lifecycle};
use crate::vm::Vm;

/// The buses the vCPU threads dispatch guest accesses to.
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

/// The devices whose guest-visible state a snapshot saves: the UART and
/// every virtio device's transport, in slot order (the order of their MMIO
/// windows).
#[derive(Clone)]
pub struct DeviceHandles {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub virtio: Vec<Arc<Mutex<MmioTransport>>>,
}

/// Puts devices on one VM; [`DeviceManager::into_parts`] ends the placing.
pub struct DeviceManager<'a> {
    vm: &'a Vm,
    mem: &'a GuestMemoryMmap,
    event_loop: &'a mut EventLoop,
    buses: Buses,
    serial: Arc<Mutex<SerialDevice>>,
    reset_evt: EventFd,
    /// In slot order: the next one goes in slot `virtio.len()`.
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
}

impl<'a> DeviceManager<'a> {
    /// Creates the devices every kiln VM has: UART (printing to `console`),
    /// i8042, debug port, control page (reporting to `life`).
    pub fn new(
        vm: &'a Vm,
        mem: &'a GuestMemoryMmap,
        event_loop: &'a mut EventLoop,
        life: &Arc<Lifecycle>,
        console: Box<dyn Write + Send>,
    ) -> Result<Self> {
        let mut pio = Bus::new();
        let mut mmio = Bus::new();

        let irq = IrqLine::new().map_err(Error::device_io("serial IRQ"))?;
        vm.register_irq(irq.eventfd(), SERIAL_IRQ)?;
        let serial = SerialDevice::new(irq, console).map_err(Error::device_io("serial"))?;
        let serial = Arc::new(Mutex::new(serial));
        let (base, len) = (u64::from(SERIAL_PORT_BASE), u64::from(SERIAL_PORT_SIZE));
        pio.insert(serial.clone(), base, len)?;

        let reset_evt = kiln_devices::new_eventfd().map_err(Error::device_io("reset eventfd"))?;
        let reset_dup = reset_evt
            .try_clone()
            .map_err(Error::device_io("reset eventfd"))?;
        let i8042 = Arc::new(Mutex::new(I8042::new(reset_dup)));
        let i8042_ports = I8042_COMMAND_PORT - I8042_DATA_PORT + 1;
        pio.insert(i8042, u64::from(I8042_DATA_PORT), u64::from(i8042_ports))?;
        pio.insert(Arc::new(Mutex::new(NullDevice)), u64::from(DEBUG_PORT), 1)?;

        let control = Arc::new(Mutex::new(ControlPage::new(ControlReports(life.clone()))));
        mmio.insert(control, CONTROL_PAGE_START, CONTROL_PAGE_SIZE)?;
        Ok(Self {
            vm,
            mem,
            event_loop,
            buses: Buses { pio, mmio },
            serial,
            reset_evt,
            virtio: Vec::new(),
        })
    }

    /// Attaches a virtio device in the next MMIO window and IRQ (see
    /// `virtio_window`): an ioeventfd per queue, an irqfd for its
    /// interrupt, its host-side work on the event loop.
    pub fn attach_virtio<D>(&mut self, device: D) -> Result<()>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        let (base, irq) = virtio_window(self.virtio.len())?;
        let line = IrqLine::new().map_err(Error::device_io("virtio IRQ"))?;
        self.vm.register_irq(line.eventfd(), irq)?;
        let notify = IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY);
        for (index, evt) in device.queue_events().iter().enumerate() {
            self.vm
                .fd()
                .register_ioevent(evt, &notify, index as u32)
                .map_err(Error::kvm("KVM_IOEVENTFD"))?;
        }
        let device = Arc::new(Mutex::new(device));
        let transport = MmioTransport::new(device.clone(), self.mem.clone(), Interrupt::new(line));
        let transport = Arc::new(Mutex::new(transport));
        self.buses
            .mmio
            .insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
        self.event_loop.add(Box::new(device) as Subscriber);
        self.virtio.push(transport);
        Ok(())
    }

    /// Feeds `input` (kiln's stdin) into the UART.
    pub fn attach_serial_input(&mut self, input: File) -> Result<()> {
        let input = SerialInput::new(input, self.serial.clone())?;
        self.event_loop.add(Box::new(input));
        Ok(())
    }

    /// Ends the VM on a guest reset (through the i8042) or when `life` says
    /// so; a reset right after a panic message is the panic.
    pub fn watch_vm_events(
        &mut self,
        life: &Arc<Lifecycle>,
        panic_watch: PanicWatch,
    ) -> Result<()> {
        let reset_evt = self
            .reset_evt
            .try_clone()
            .map_err(Error::io("duplicating the reset eventfd"))?;
        self.event_loop.add(Box::new(VmEvents {
            life: life.clone(),
            reset_evt,
            panic_watch,
        }));
        Ok(())
    }

    /// The highest IRQ line a device placed so far uses (the MP table routes
    /// the IOAPIC pins up to it).
    pub fn highest_irq(&self) -> u32 {
        highest_irq(self.virtio.len())
    }

    /// The buses, with every device placed, and the devices a snapshot saves.
    pub fn into_parts(self) -> (Buses, DeviceHandles) {
        let handles = DeviceHandles {
            serial: self.serial,
            virtio: self.virtio,
        };
        (self.buses, handles)
    }
}

/// The MMIO window base and IRQ of the virtio device in `slot` (0 for the
/// first device attached).
fn virtio_window(slot: usize) -> Result<(u64, u32)> {
    let max = (IRQ_MAX - VIRTIO_IRQ_BASE + 1) as usize;
    if slot >= max {
        return Err(Error::Config(format!(
            "too many virtio devices (at most {max})"
        )));
    }
    let base = VIRTIO_MMIO_START + slot as u64 * VIRTIO_MMIO_SIZE;
    Ok((base, VIRTIO_IRQ_BASE + slot as u32))
}

/// The highest IRQ line in use with `virtio_devices` virtio devices placed
/// (the UART's alone without any).
fn highest_irq(virtio_devices: usize) -> u32 {
    let last_virtio = virtio_devices.checked_sub(1).map(virtio_window);
    match last_virtio {
        Some(Ok((_, irq))) => irq.max(SERIAL_IRQ),
        _ => SERIAL_IRQ,
    }
}

/// The kernel command-line word that tells the guest where the virtio
/// device in `slot` is, so it finds it without probing.
pub fn virtio_mmio_word(slot: usize) -> Result<String> {
    let (base, irq) = virtio_window(slot)?;
    Ok(format!(
        "virtio_mmio.device={}K@{base:#x}:{irq}",
        VIRTIO_MMIO_SIZE >> 10
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The highest IRQ is the UART's, then the last virtio device's: the
    /// 12th device is the first past the ISA IRQs (the MP table then routes
    /// IOAPIC pin 16 too).
    #[test]
    fn highest_irq_is_the_last_device_line() {
        for (devices, irq) in [(0, SERIAL_IRQ), (1, 5), (11, 15), (12, 16), (19, IRQ_MAX)] {
            assert_eq!(highest_irq(devices), irq, "{devices} virtio devices");
        }
        let last = (IRQ_MAX - VIRTIO_IRQ_BASE) as usize;
        assert_eq!(highest_irq(last + 1), virtio_window(last).unwrap().1);
    }
}
