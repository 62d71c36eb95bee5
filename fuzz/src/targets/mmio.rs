//! The virtio-mmio transport, with every kiln device behind it (block,
//! net, console, rng, vsock) on an MMIO bus placed as the monitor places
//! them: register reads and writes of any offset and width, feature
//! negotiation, queue setup with any sizes and ring addresses, status
//! written in any order, resets while requests are in flight, and the
//! queues then used through the rings. Beyond the bounds every target
//! has, the identity registers always read what the spec says.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kiln::fuzzing::{VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use kiln_devices::bus::Bus;
use kiln_devices::fuzzing::{self, BLOCK_SECTOR_SIZE as SECTOR_SIZE};
use kiln_devices::irq::IrqLine;
use kiln_devices::virtio::block::{Block, DiskImage};
use kiln_devices::virtio::console::VirtioConsole;
use kiln_devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use kiln_devices::virtio::net::MacAddr;
use kiln_devices::virtio::rng::Rng;
use kiln_devices::virtio::vsock::Vsock;
use kiln_devices::virtio::{Interrupt, VirtioDevice};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as STATUS_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as STATUS_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as STATUS_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK as STATUS_FEATURES_OK,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::input::{Input, Script};
use crate::targets::{block, console, net, vsock};
use crate::virtio::{guest_memory, pump, ring_base, Ring, BUFFERS};
use crate::Target;

pub const TARGET: Target = Target {
    name: "mmio",
    run,
    // Every device's own bound at once.
    memory_cap: block::TARGET.memory_cap
        + net::TARGET.memory_cap
        + console::TARGET.memory_cap
        + super::rng::TARGET.memory_cap
        + vsock::TARGET.memory_cap,
    memory_per_input_byte: 0,
    seeds,
};

// virtio-mmio registers (virtio 1.2, 4.2.2).
const MAGIC: u64 = 0x000;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_AVAIL_LOW: u64 = 0x090;
const QUEUE_AVAIL_HIGH: u64 = 0x094;
const QUEUE_USED_LOW: u64 = 0x0a0;
const QUEUE_USED_HIGH: u64 = 0x0a4;
const WINDOW_REGS: u64 = 0x200;

const OP_READ: u8 = 0;
const OP_WRITE: u8 = 1;
const OP_NEGOTIATE: u8 = 2;
const OP_SETUP_QUEUE: u8 = 3;
const OP_DRIVER_OK: u8 = 4;
const OP_NOTIFY: u8 = 5;
const OP_CHAIN: u8 = 6;
const OP_MEM: u8 = 7;
const OP_AVAIL_IDX: u8 = 8;
const OPS: u8 = 9;

/// The devices in slot order.
const DEVICES: usize = 5;

struct Slot {
    base: u64,
    rings: Vec<Ring>,
    max_sizes: Vec<u16>,
}

struct Rig {
    mem: GuestMemoryMmap,
    bus: Bus,
    em: EventManager<Box<dyn MutEventSubscriber + Send>>,
    slots: Vec<Slot>,
}

impl Rig {
    fn attach<D: VirtioDevice + MutEventSubscriber + 'static>(&mut self, device: D) {
        let index = self.slots.len();
        let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE;
        let max_sizes = device.queue_max_sizes().to_vec();
        let device = Arc::new(Mutex::new(device));
        let interrupt = Interrupt::new(IrqLine::new().expect("eventfd"));
        let transport = MmioTransport::new(device.clone(), self.mem.clone(), interrupt);
        self.bus
            .insert(Arc::new(Mutex::new(transport)), base, VIRTIO_MMIO_SIZE)
            .expect("device windows do not overlap");
        self.em.add_subscriber(Box::new(device));
        let rings = (0..max_sizes.len())
            .map(|q| Ring::new(&self.mem, ring_base(index, q), 1))
            .collect();
        self.slots.push(Slot {
            base,
            rings,
            max_sizes,
        });
    }

    fn read(&self, addr: u64, width: usize) -> u64 {
        let mut b = [0u8; 8];
        self.bus.read(addr, &mut b[..width]);
        u64::from_le_bytes(b)
    }

    fn write(&mut self, addr: u64, width: usize, value: u64) {
        self.bus.write(addr, &value.to_le_bytes()[..width]);
        pump(&mut self.em);
    }

    fn reg(&mut self, slot: usize, reg: u64, value: u32) {
        let base = self.slots[slot].base;
        self.write(base + reg, 4, u64::from(value));
    }

    fn check_identity(&self, slot: usize) {
        let magic = self.read(self.slots[slot].base + MAGIC, 4);
        assert_eq!(
            magic, 0x7472_6976,
            "MagicValue of device {slot} reads {magic:#x}"
        );
        let max = self.read(self.slots[slot].base + QUEUE_NUM_MAX, 4);
        assert!(max <= 256, "QueueNumMax of device {slot} reads {max}");
    }
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mem = guest_memory();
    let mut rig = Rig {
        mem: mem.clone(),
        bus: Bus::new(),
        em: EventManager::new().expect("epoll"),
        slots: Vec::new(),
    };
    let disk = DiskImage::from_file(
        block::memfd(16 * SECTOR_SIZE),
        std::path::Path::new("fuzz.img"),
        false,
        None,
    )
    .expect("memfd disk");
    rig.attach(Block::new(disk).expect("eventfd"));
    let (device_end, _peer) = std::os::unix::net::UnixDatagram::pair().expect("socketpair");
    device_end.set_nonblocking(true).expect("nonblocking");
    let mac = MacAddr([0x02, 0, 0, 0, 0, 2]);
    rig.attach(fuzzing::net(net::Backend(device_end), "fuzz", mac, None).expect("eventfd"));
    let output = console::Output::default();
    let (reader, _writer) = console::pipe();
    rig.attach(VirtioConsole::new(Box::new(output), Some(reader)).expect("eventfd"));
    rig.attach(Rng::new().expect("eventfd"));
    let sock = vsock::socket_dir().join("m.sock");
    rig.attach(Vsock::new(3, &sock).expect("vsock device"));
    assert_eq!(rig.slots.len(), DEVICES);

    while !input.is_empty() {
        let op = input.u8() % OPS;
        let slot = input.below(DEVICES);
        let base = rig.slots[slot].base;
        match op {
            OP_READ | OP_WRITE => {
                let offset = match input.bool() {
                    true => u64::from(input.u8()) * 4 % WINDOW_REGS,
                    false => u64::from(input.u16()) % (VIRTIO_MMIO_SIZE + 8),
                };
                let width = 1 + input.below(8);
                if op == OP_READ {
                    rig.read(base + offset, width);
                } else {
                    let value = input.u64();
                    rig.write(base + offset, width, value);
                }
            }
            OP_NEGOTIATE => {
                let (lo, hi) = (input.u32(), input.u32());
                let ack = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
                rig.reg(slot, STATUS, 0);
                rig.reg(slot, STATUS, STATUS_ACKNOWLEDGE);
                rig.reg(slot, STATUS, ack);
                for (sel, half) in [(0, lo), (1, hi)] {
                    rig.reg(slot, DEVICE_FEATURES_SEL, sel);
                    rig.reg(slot, DRIVER_FEATURES_SEL, sel);
                    rig.reg(slot, DRIVER_FEATURES, half);
                }
                rig.reg(slot, STATUS, ack | STATUS_FEATURES_OK);
            }
            OP_SETUP_QUEUE => {
                let q = input.below(rig.slots[slot].max_sizes.len());
                let size = input.u16();
                let max = rig.slots[slot].max_sizes[q];
                let ring_size = match size.is_power_of_two() && size <= max {
                    true => size,
                    false => max,
                };
                let ring = Ring::new(&mem, ring_base(slot, q), ring_size);
                rig.reg(slot, QUEUE_SEL, q as u32);
                rig.reg(slot, QUEUE_NUM, u32::from(size));
                for (reg, addr) in [
                    (QUEUE_DESC_LOW, ring.base),
                    (QUEUE_AVAIL_LOW, ring.avail_addr()),
                    (QUEUE_USED_LOW, ring.used_addr()),
                ] {
                    rig.reg(slot, reg, addr as u32);
                }
                for reg in [QUEUE_DESC_HIGH, QUEUE_AVAIL_HIGH, QUEUE_USED_HIGH] {
                    rig.reg(slot, reg, 0);
                }
                rig.reg(slot, QUEUE_READY, 1);
                rig.slots[slot].rings[q] = ring;
            }
            OP_DRIVER_OK => {
                let status = rig.read(base + STATUS, 4) as u32;
                rig.reg(slot, STATUS, status | STATUS_DRIVER_OK);
            }
            OP_NOTIFY => {
                let q = u32::from(input.u8() % 4);
                rig.reg(slot, REG_QUEUE_NOTIFY, q);
            }
            OP_CHAIN => {
                let q = input.below(rig.slots[slot].rings.len());
                let n = 1 + input.below(8);
                let bufs: Vec<_> = (0..n)
                    .map(|_| (input.guest_addr(), input.buf_len(), input.bool()))
                    .collect();
                rig.slots[slot].rings[q].add_chain(&mem, &bufs);
            }
            OP_MEM => {
                let addr = input.guest_addr();
                let _ = mem.write_slice(input.bytes(), GuestAddress(addr));
            }
            OP_AVAIL_IDX => {
                let q = input.below(rig.slots[slot].rings.len());
                let idx = input.u16();
                rig.slots[slot].rings[q].set_avail_idx(&mem, idx);
            }
            _ => unreachable!(),
        }
        rig.check_identity(slot);
    }
}

/// Seed writers for the ops above.
fn negotiate(s: &mut Script, slot: u8, features: u64) -> &mut Script {
    s.u8(OP_NEGOTIATE)
        .u8(slot)
        .u32(features as u32)
        .u32((features >> 32) as u32)
}

fn setup_queue(s: &mut Script, slot: u8, q: u8, size: u16) -> &mut Script {
    s.u8(OP_SETUP_QUEUE).u8(slot).u8(q).u16(size)
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let version_1 = kiln_devices::fuzzing::VIRTIO_F_VERSION_1;
    let queues = [1u8, 2, 2, 1, 3];
    // Linux's probe of every device: negotiate, set up each queue,
    // DRIVER_OK; then one request to the rng and one to the block device.
    let mut s = Script::new();
    for (slot, &n) in queues.iter().enumerate() {
        let slot = slot as u8;
        s.u8(OP_READ).u8(slot).u8(1).u8(0).u8(3);
        negotiate(&mut s, slot, version_1);
        for q in 0..n {
            setup_queue(&mut s, slot, q, 64);
        }
        s.u8(OP_DRIVER_OK).u8(slot);
    }
    s.u8(OP_CHAIN).u8(3).u8(0).u8(0);
    s.guest_addr(BUFFERS).buf_len(64).u8(1);
    s.u8(OP_NOTIFY).u8(3).u8(0);
    let mut header = [0u8; 16];
    header[8] = 1; // sector 1
    s.u8(OP_MEM)
        .u8(0)
        .guest_addr(BUFFERS + 0x1000)
        .bytes(&header);
    s.u8(OP_CHAIN).u8(0).u8(0).u8(2);
    s.guest_addr(BUFFERS + 0x1000).buf_len(16).u8(0);
    s.guest_addr(BUFFERS + 0x2000).buf_len(512).u8(1);
    s.guest_addr(BUFFERS + 0x3000).buf_len(1).u8(1);
    s.u8(OP_NOTIFY).u8(0).u8(0);
    let probe = s.build();

    // A driver that breaks the rules: queue size 3, DRIVER_OK without
    // FEATURES_OK, features after FEATURES_OK, status written backwards,
    // config space at odd widths, a reset mid-request.
    let mut s = Script::new();
    s.u8(OP_WRITE).u8(1).u8(1).u8(STATUS as u8 / 4).u8(3).u64(7);
    negotiate(&mut s, 1, version_1 | 1 << 5);
    setup_queue(&mut s, 1, 0, 3);
    setup_queue(&mut s, 1, 1, 512);
    s.u8(OP_WRITE)
        .u8(1)
        .u8(1)
        .u8(DRIVER_FEATURES as u8 / 4)
        .u8(3)
        .u64(u64::MAX);
    s.u8(OP_DRIVER_OK).u8(1);
    s.u8(OP_WRITE).u8(1).u8(1).u8(STATUS as u8 / 4).u8(3).u64(1);
    s.u8(OP_READ).u8(1).u8(0).u16(0x103).u8(2);
    s.u8(OP_WRITE).u8(4).u8(0).u16(0x100).u8(7).u64(u64::MAX);
    negotiate(&mut s, 4, version_1);
    for q in 0..3 {
        setup_queue(&mut s, 4, q, 16);
    }
    s.u8(OP_DRIVER_OK).u8(4);
    s.u8(OP_NOTIFY).u8(4).u8(1);
    s.u8(OP_WRITE).u8(4).u8(1).u8(STATUS as u8 / 4).u8(3).u64(0);
    vec![("linux-probe", probe), ("rule-breaker", s.build())]
}
