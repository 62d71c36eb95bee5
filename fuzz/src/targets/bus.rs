//! The PIO and MMIO buses with the legacy devices every kiln VM has, placed
//! as the monitor places them: the UART (its output through the console's
//! panic matcher, its input fed from a host pipe by the event loop), the
//! i8042, the debug port and the control page. Accesses of any width at
//! any address, as vCPU exits deliver them. Beyond the bounds every target
//! has: unclaimed reads see all ones, the first exit report the control
//! page takes is final, the UART prints at most a byte per write, and the
//! panic message kept stays short.

use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kiln::fuzzing::{ConsoleOutput, ControlReports, Lifecycle, SerialInput};
use kiln::fuzzing::{
    CONTROL_PAGE_START, DEBUG_PORT, I8042_COMMAND_PORT, I8042_DATA_PORT, SERIAL_PORT_BASE,
    SERIAL_PORT_SIZE,
};
use kiln::VmOutcome;
use kiln_devices::bus::{Access, Bus};
use kiln_devices::control::{ControlPage, GuestExit, CONTROL_PAGE_SIZE, REG_EXIT};
use kiln_devices::i8042::{NullDevice, I8042};
use kiln_devices::irq::IrqLine;
use kiln_devices::serial::SerialDevice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::input::{Input, Script};
use crate::targets::console::pipe;
use crate::virtio::pump;
use crate::Target;

pub const TARGET: Target = Target {
    name: "bus",
    run,
    // A UART FIFO, the panic matcher's message, the event loop.
    memory_cap: 256 << 10,
    memory_per_input_byte: 0,
    seeds,
};

const OP_PIO_READ: u8 = 0;
const OP_PIO_WRITE: u8 = 1;
const OP_MMIO_READ: u8 = 2;
const OP_MMIO_WRITE: u8 = 3;
const OP_HOST_INPUT: u8 = 4;
const OPS: u8 = 5;

/// Serial output as the host gets it: only counted.
#[derive(Clone, Default)]
struct Counted(Arc<AtomicU64>);

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A port near the devices (or anywhere).
fn port(input: &mut Input) -> u64 {
    let b = input.u8();
    let near = |base: u16, span: u16| u64::from(base) + u64::from(b >> 3) % u64::from(span);
    match b & 7 {
        0 | 1 => near(SERIAL_PORT_BASE, SERIAL_PORT_SIZE + 2),
        2 => near(I8042_DATA_PORT, I8042_COMMAND_PORT - I8042_DATA_PORT + 2),
        3 => near(DEBUG_PORT - 1, 3),
        _ => u64::from(input.u16()),
    }
}

/// An MMIO address in or around the control page (or anywhere).
fn mmio_addr(input: &mut Input) -> u64 {
    match input.u8() % 8 {
        7 => input.u64(),
        _ => {
            (CONTROL_PAGE_START - 8).wrapping_add(u64::from(input.u16()) % (CONTROL_PAGE_SIZE + 16))
        }
    }
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let output = Counted::default();
    let (console, panic_watch) = ConsoleOutput::new(Box::new(output.clone()));
    let serial =
        SerialDevice::new(IrqLine::new().expect("eventfd"), Box::new(console)).expect("eventfd");
    let serial = Arc::new(Mutex::new(serial));
    let reset = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let life = Arc::new(Lifecycle::new(Instant::now()).expect("eventfd"));
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let serial_ports = u64::from(SERIAL_PORT_SIZE);
    pio.insert(serial.clone(), u64::from(SERIAL_PORT_BASE), serial_ports)
        .expect("free");
    let i8042 = I8042::new(reset.try_clone().expect("dup"));
    let i8042_ports = u64::from(I8042_COMMAND_PORT - I8042_DATA_PORT + 1);
    pio.insert(
        Arc::new(Mutex::new(i8042)),
        u64::from(I8042_DATA_PORT),
        i8042_ports,
    )
    .expect("free");
    pio.insert(Arc::new(Mutex::new(NullDevice)), u64::from(DEBUG_PORT), 1)
        .expect("free");
    let control = ControlPage::new(ControlReports(life.clone()));
    mmio.insert(
        Arc::new(Mutex::new(control)),
        CONTROL_PAGE_START,
        CONTROL_PAGE_SIZE,
    )
    .expect("free");
    let (host_in, mut host_writer): (File, File) = pipe();
    let mut em: EventManager<Box<dyn MutEventSubscriber + Send>> =
        EventManager::new().expect("epoll");
    let feeder = SerialInput::new(host_in, serial.clone()).expect("eventfd");
    em.add_subscriber(Box::new(feeder));

    let mut writes = 0u64;
    let mut first_exit: Option<GuestExit> = None;
    while !input.is_empty() {
        let op = input.u8() % OPS;
        let mut buf = [0u8; 8];
        match op {
            OP_PIO_READ | OP_PIO_WRITE => {
                let addr = port(&mut input);
                // KVM delivers port I/O of 1, 2 or 4 bytes.
                let width = [1, 2, 4][input.below(3)];
                if op == OP_PIO_READ {
                    let access = pio.read(addr, &mut buf[..width]);
                    check_unclaimed(access, &buf[..width]);
                } else {
                    buf = input.u64().to_le_bytes();
                    pio.write(addr, &buf[..width]);
                    writes += 1;
                }
            }
            OP_MMIO_READ | OP_MMIO_WRITE => {
                let addr = mmio_addr(&mut input);
                let width = 1 + input.below(8);
                if op == OP_MMIO_READ {
                    let access = mmio.read(addr, &mut buf[..width]);
                    check_unclaimed(access, &buf[..width]);
                } else {
                    buf = input.u64().to_le_bytes();
                    let exit =
                        GuestExit::decode(u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]));
                    if addr == CONTROL_PAGE_START + REG_EXIT && width == 4 && first_exit.is_none() {
                        first_exit = exit;
                    }
                    mmio.write(addr, &buf[..width]);
                }
            }
            OP_HOST_INPUT => {
                let _ = host_writer.write(input.bytes());
            }
            _ => unreachable!(),
        }
        pump(&mut em);
        let expected = first_exit.map(|e| match e {
            GuestExit::Code(c) => VmOutcome::Exited(c),
            GuestExit::Signal(s) => VmOutcome::Signaled(s),
        });
        assert_eq!(
            life.outcome(),
            expected,
            "the control page's first exit report is final"
        );
    }
    let printed = output.0.load(Ordering::Relaxed);
    assert!(
        printed <= writes,
        "the UART printed {printed} bytes for {writes} writes"
    );
    let message = panic_watch.panic_message().unwrap_or_default();
    // 200 bytes kept, each at most a 3-byte replacement character.
    assert!(
        message.len() <= 600,
        "a {} byte panic message kept",
        message.len()
    );
    drop(host_writer);
}

fn check_unclaimed(access: Access, data: &[u8]) {
    if access == Access::Unclaimed {
        assert!(
            data.iter().all(|&b| b == 0xff),
            "an unclaimed read saw {data:?}"
        );
    }
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let thr = 0; // SERIAL_PORT_BASE + 0, written as a port choice
    let mut s = Script::new();
    // The kernel's early console: LCR, then a panic line byte by byte.
    s.u8(OP_PIO_WRITE).u8(3 << 3).u8(0).u64(3);
    for &b in b"Kernel panic - not syncing: VFS: Unable to mount root fs\n" {
        s.u8(OP_PIO_WRITE).u8(thr).u8(0).u64(u64::from(b));
    }
    // Host input, then the guest reads the line status and the byte.
    s.u8(OP_HOST_INPUT).bytes(b"y\n");
    s.u8(OP_PIO_READ).u8(5 << 3).u8(0);
    s.u8(OP_PIO_READ).u8(thr).u8(0);
    // Init reads the control page magic, reports boot and exit 3, then
    // tries to change it to a signal.
    s.u8(OP_MMIO_READ).u8(0).u16(8).u8(3);
    s.u8(OP_MMIO_WRITE).u8(0).u16(8 + 4).u8(3).u64(1);
    s.u8(OP_MMIO_WRITE).u8(0).u16(8 + 8).u8(3).u64(3);
    s.u8(OP_MMIO_WRITE).u8(0).u16(8 + 8).u8(3).u64(0x109);
    // The i8042 reset (reboot=k) and an unclaimed port.
    s.u8(OP_PIO_WRITE).u8((4 << 3) | 2).u8(0).u64(0xfe);
    s.u8(OP_PIO_READ).u8(7).u16(0x1234).u8(2);
    vec![("boot-panic-exit", s.build())]
}
