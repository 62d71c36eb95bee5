//! The hostile-guest suite: a guest drives kiln's virtio-mmio devices
//! (block, rng, vsock, console, net) through the real transport the way a
//! broken or malicious driver would, and each test asserts what kiln does
//! about it.
//!
//! The guest is `resources/test-guests/mmio_script.S`, which runs a script
//! of memory and MMIO accesses handed to it as its initrd; the scripts are
//! built here, with a small virtio driver ([`Driver`]) for the well-behaved
//! parts. Every case runs the same way ([`run_case`]):
//! 1. the hostile VM does its attack and reads back what the device did
//!    (each read is one line of hex on its console);
//! 2. it then waits at a prompt: while it waits, the test checks the
//!    process's resident memory against a bound and runs a second VM
//!    (`hello`) in the same process, which must exit 42;
//! 3. on the test's go (a byte on its UART, or on hvc0 when the case has a
//!    virtio console), the hostile guest resets block, rng and vsock, reads
//!    sector 0 of the disk and 16 random bytes, and reports exit status 0.
//!
//! Step 3 is the proof that nothing spins or hangs: it needs the event
//! thread that serves every device, and the run must end with the
//! guest's own status. A device that never answered would leave the guest
//! polling until the VM's timeout (outcome `Timeout`), and a monitor that
//! stopped serving events entirely would not even time out, which
//! `common::HANG_LIMIT` turns into a failure. No assertion depends on time.
//!
//! A case with a net device (`Driver::tap`) runs its VM's TAP in a network
//! namespace of its own, with a packet socket there that shows which of
//! the guest's frames the TAP took (needs root). The net device is not
//! part of step 3: the case itself resets it and sends a good frame last.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Mutex;
use std::time::Instant;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use common::{
    guest_config, have_kvm, is_root, require, run_guest, wait_finished, Capture, Netns, Scratch,
};
use kiln::config::{DiskConfig, NetConfig, VsockConfig};
use kiln::{ConsoleIo, VmOutcome};

// ---- The script the guest runs (see mmio_script.S for the format).

const OP_END: u32 = 0;
const OP_W8: u32 = 1;
const OP_W16: u32 = 2;
const OP_W32: u32 = 3;
const OP_W64: u32 = 4;
const OP_R8: u32 = 5;
const OP_R16: u32 = 6;
const OP_R32: u32 = 7;
const OP_R64: u32 = 8;
const OP_WAIT16: u32 = 9;
const OP_COPY: u32 = 10;
const OP_FILL: u32 = 11;
const OP_PROMPT: u32 = 12;

/// A read the guest prints: its place among the printed values.
#[derive(Clone, Copy, Debug)]
struct Read(usize);

/// A script: records, then the bytes COPY takes from (appended after them).
#[derive(Default)]
struct Script {
    records: Vec<(u32, u32, u64, u64)>,
    data: Vec<u8>,
    reads: usize,
}

impl Script {
    fn op(&mut self, op: u32, count: u32, addr: u64, val: u64) {
        self.records.push((op, count, addr, val));
    }

    fn read(&mut self, op: u32, addr: u64) -> Read {
        self.op(op, 0, addr, 0);
        self.reads += 1;
        Read(self.reads - 1)
    }

    fn w8(&mut self, addr: u64, val: u8) {
        self.op(OP_W8, 0, addr, val.into());
    }
    fn w16(&mut self, addr: u64, val: u16) {
        self.op(OP_W16, 0, addr, val.into());
    }
    fn w32(&mut self, addr: u64, val: u32) {
        self.op(OP_W32, 0, addr, val.into());
    }
    /// The same 4-byte write, `count` times in a row.
    fn w32_times(&mut self, addr: u64, val: u32, count: u32) {
        self.op(OP_W32, count, addr, val.into());
    }
    fn w64(&mut self, addr: u64, val: u64) {
        self.op(OP_W64, 0, addr, val);
    }
    fn r8(&mut self, addr: u64) -> Read {
        self.read(OP_R8, addr)
    }
    fn r16(&mut self, addr: u64) -> Read {
        self.read(OP_R16, addr)
    }
    fn r32(&mut self, addr: u64) -> Read {
        self.read(OP_R32, addr)
    }
    fn r64(&mut self, addr: u64) -> Read {
        self.read(OP_R64, addr)
    }
    /// Waits until the 2 bytes at `addr` are `val` (no bound: see mmio_script.S).
    fn wait16(&mut self, addr: u64, val: u16) {
        self.op(OP_WAIT16, 0, addr, val.into());
    }
    /// Puts `bytes` at `addr` in guest memory.
    fn copy(&mut self, addr: u64, bytes: &[u8]) {
        let offset = self.data.len() as u64;
        self.data.extend_from_slice(bytes);
        self.op(OP_COPY, bytes.len() as u32, addr, offset);
    }
    fn fill(&mut self, addr: u64, len: u32, byte: u8) {
        self.op(OP_FILL, len, addr, byte.into());
    }
    fn prompt(&mut self) {
        self.op(OP_PROMPT, 0, 0, 0);
    }
    /// The prompt without the wait (the test's go comes another way).
    fn prompt_only(&mut self) {
        self.op(OP_PROMPT, 0, 0, 1);
    }
    fn end(&mut self, status: u8) {
        self.op(OP_END, 0, 0, status.into());
    }

    /// The initrd the guest reads: records, then the COPY data (whose
    /// offsets become offsets from the script's start).
    fn bytes(&self) -> Vec<u8> {
        let data_start = (self.records.len() * 24) as u64;
        let mut out = Vec::with_capacity(data_start as usize + self.data.len());
        for &(op, count, addr, val) in &self.records {
            let val = if op == OP_COPY { val + data_start } else { val };
            out.extend_from_slice(&op.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
            out.extend_from_slice(&addr.to_le_bytes());
            out.extend_from_slice(&val.to_le_bytes());
        }
        out.extend_from_slice(&self.data);
        out
    }
}

// ---- The VM the scripts run in: its memory and its virtio devices.

/// Guest RAM (`common::GUEST_MEM`): everything at or past it is outside.
const MEM_END: u64 = common::GUEST_MEM;
/// The virtio-mmio windows, in kiln's slot order (disks, rng, vsock; see
/// src/layout.rs and src/vmm/builder.rs).
const BLOCK: u64 = 0xd000_1000;
const RNG: u64 = 0xd000_2000;
const VSOCK: u64 = 0xd000_3000;
/// The virtio console, when a case asks for one (`Driver::console`).
const CONSOLE: u64 = 0xd000_4000;
/// The virtio-net device, when a case asks for one (`Driver::tap`; never
/// with a console).
const NET: u64 = 0xd000_4000;
/// Past the last device: the window no device claims (without a console).
const UNCLAIMED_WINDOW: u64 = 0xd000_4000;
/// The guest's vsock CID.
const GUEST_CID: u64 = 3;
/// The disk: 128 sectors, sector N filled with the byte N (sector 0 starts
/// with `DISK_MARKER`).
const DISK_SECTORS: u64 = 128;
const DISK_MARKER: &[u8; 8] = b"KILNDISK";

// virtio-mmio registers.
const REG_MAGIC: u64 = 0x000;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC: u64 = 0x080;
const REG_QUEUE_AVAIL: u64 = 0x090;
const REG_QUEUE_USED: u64 = 0x0a0;
const CONFIG: u64 = 0x100;

// Device status bits.
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const NEEDS_RESET: u32 = 0x40;
/// Status of a device the driver runs: what "ignored" reads back as.
const RUNNING: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;

const VERSION_1: u64 = 1 << 32;
const F_INDIRECT_DESC: u64 = 1 << 28;
const F_BLK_DISCARD: u64 = 1 << 13;
const F_BLK_WRITE_ZEROES: u64 = 1 << 14;
/// The config-change bit of InterruptStatus.
const INT_CONFIG_CHANGE: u64 = 2;

// Descriptor flags.
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

// virtio-blk request types and statuses.
const BLK_IN: u32 = 0;
const BLK_OUT: u32 = 1;
const BLK_DISCARD: u32 = 11;
const BLK_WRITE_ZEROES: u32 = 13;
const BLK_OK: u64 = 0;
const BLK_IOERR: u64 = 1;
const BLK_UNSUPP: u64 = 2;

/// A descriptor's buffer: address, length, flags.
type Buf = (u64, u32, u16);

/// Entries in every queue the driver sets up.
const QSIZE: u16 = 16;

/// A split virtqueue in guest memory: descriptor table at `base`, avail
/// ring one page up, used ring two pages up.
#[derive(Clone, Copy)]
struct Ring {
    base: u64,
    /// The next avail index the driver publishes.
    next_avail: u16,
}

impl Ring {
    const fn at(base: u64) -> Self {
        Self {
            base,
            next_avail: 0,
        }
    }
    fn desc(&self, i: u16) -> u64 {
        self.base + 16 * u64::from(i)
    }
    fn avail(&self) -> u64 {
        self.base + 0x1000
    }
    fn used(&self) -> u64 {
        self.base + 0x2000
    }
    fn used_idx(&self) -> u64 {
        self.used() + 2
    }
    /// Used ring entry `i`: (id, len).
    fn used_elem(&self, i: u16) -> (u64, u64) {
        let e = self.used() + 4 + 8 * u64::from(i % QSIZE);
        (e, e + 4)
    }
}

// Where the scripts keep their rings and buffers (all far below the
// script, which kiln puts at the top of low RAM).
const BLOCK_RING: u64 = 0x30_0000;
const RNG_RING: u64 = 0x31_0000;
const VSOCK_RINGS: [u64; 3] = [0x32_0000, 0x33_0000, 0x34_0000];
const CONSOLE_RINGS: [u64; 2] = [0x35_0000, 0x36_0000];
const NET_RINGS: [u64; 2] = [0x37_0000, 0x38_0000];
const HEADERS: u64 = 0x40_0000;
const STATUSES: u64 = 0x40_1000;
const DATA: u64 = 0x41_0000;
const TABLE: u64 = 0x50_0000;
const PACKETS: u64 = 0x60_0000;
const RX_BUFFERS: u64 = 0x70_0000;
const RNG_BUFFERS: u64 = 0x80_0000;

/// A script plus the driver steps every case uses.
#[derive(Default)]
struct Driver {
    s: Script,
    /// Requests the block device got so far (each has its own header and
    /// status byte).
    block_requests: u64,
    /// Host vsock ports with a listening socket while the VM runs.
    vsock_listeners: Vec<u32>,
    /// Connections the host makes to guest ports once the guest printed
    /// its first value (the script starts with a read): the port, and what
    /// the host sends right behind its `CONNECT` line.
    vsock_connects: Vec<(u32, Vec<u8>)>,
    /// Checks the host's vsock ends while the guest waits at its prompt.
    at_prompt: Option<fn(&HostEnds)>,
    /// The VM has a virtio console (hvc0): kiln's input goes there, not to
    /// the UART.
    console: bool,
    /// The VM has a virtio-net device on `TAP`, in a network namespace of
    /// the case's own (needs root).
    tap: bool,
}

impl Driver {
    fn reset(&mut self, dev: u64) {
        self.s.w32(dev + REG_STATUS, 0);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, `features`, FEATURES_OK.
    fn negotiate(&mut self, dev: u64, features: u64) {
        self.reset(dev);
        self.s.w32(dev + REG_STATUS, ACKNOWLEDGE);
        self.s.w32(dev + REG_STATUS, ACKNOWLEDGE | DRIVER);
        self.s.w32(dev + REG_DRIVER_FEATURES_SEL, 1);
        self.s
            .w32(dev + REG_DRIVER_FEATURES, (features >> 32) as u32);
        self.s.w32(dev + REG_DRIVER_FEATURES_SEL, 0);
        self.s.w32(dev + REG_DRIVER_FEATURES, features as u32);
        self.s
            .w32(dev + REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }

    /// Queue `index` of `dev` at `ring`'s addresses, QSIZE entries, ready;
    /// the rings are cleared first.
    fn queue(&mut self, dev: u64, index: u32, ring: &mut Ring) {
        self.queue_at(dev, index, ring, [ring.base, ring.avail(), ring.used()]);
    }

    /// Like `queue`, with the three ring addresses given.
    fn queue_at(&mut self, dev: u64, index: u32, ring: &mut Ring, addrs: [u64; 3]) {
        ring.next_avail = 0;
        self.s.fill(ring.base, 0x3000, 0);
        self.s.w32(dev + REG_QUEUE_SEL, index);
        self.s.w32(dev + REG_QUEUE_NUM, QSIZE.into());
        for (reg, addr) in [REG_QUEUE_DESC, REG_QUEUE_AVAIL, REG_QUEUE_USED]
            .into_iter()
            .zip(addrs)
        {
            self.s.w32(dev + reg, addr as u32);
            self.s.w32(dev + reg + 4, (addr >> 32) as u32);
        }
        self.s.w32(dev + REG_QUEUE_READY, 1);
    }

    fn driver_ok(&mut self, dev: u64) {
        self.s.w32(dev + REG_STATUS, RUNNING);
    }

    fn status(&mut self, dev: u64) -> Read {
        self.s.r32(dev + REG_STATUS)
    }

    fn desc(&mut self, ring: &Ring, i: u16, (addr, len, flags): Buf, next: u16) {
        self.s.w64(ring.desc(i), addr);
        let rest = u64::from(len) | u64::from(flags) << 32 | u64::from(next) << 48;
        self.s.w64(ring.desc(i) + 8, rest);
    }

    /// Descriptors `first..` linked in order (the last without NEXT).
    fn chain(&mut self, ring: &Ring, first: u16, bufs: &[Buf]) {
        for (k, &(addr, len, flags)) in bufs.iter().enumerate() {
            let i = first + k as u16;
            let more = k + 1 < bufs.len();
            let flags = if more { flags | NEXT } else { flags };
            self.desc(ring, i, (addr, len, flags), if more { i + 1 } else { 0 });
        }
    }

    /// Makes `head` available (the avail ring entry, then the index).
    fn publish(&mut self, ring: &mut Ring, head: u16) {
        let slot = ring.avail() + 4 + 2 * u64::from(ring.next_avail % QSIZE);
        self.s.w16(slot, head);
        ring.next_avail = ring.next_avail.wrapping_add(1);
        self.s.w16(ring.avail() + 2, ring.next_avail);
    }

    fn notify(&mut self, dev: u64, queue: u32) {
        self.s.w32(dev + REG_QUEUE_NOTIFY, queue);
    }

    /// Waits until the device has used `n` chains in all.
    fn wait_used(&mut self, ring: &Ring, n: u16) {
        self.s.wait16(ring.used_idx(), n);
    }

    /// A block request header (type, sector) and a status byte preset to
    /// 0xff; returns their addresses.
    fn block_header(&mut self, kind: u32, sector: u64) -> (u64, u64) {
        let n = self.block_requests;
        self.block_requests += 1;
        let (header, status) = (HEADERS + 16 * n, STATUSES + n);
        self.s.w64(header, u64::from(kind));
        self.s.w64(header + 8, sector);
        self.s.w8(status, 0xff);
        (header, status)
    }

    /// A block request of `kind` at `sector` with these data buffers, as
    /// descriptors `first..` (header, data, status), published; returns
    /// the status byte's address.
    fn block_request(
        &mut self,
        ring: &mut Ring,
        first: u16,
        (kind, sector): (u32, u64),
        data: &[Buf],
    ) -> u64 {
        let (header, status) = self.block_header(kind, sector);
        let mut bufs = vec![(header, 16, 0)];
        bufs.extend_from_slice(data);
        bufs.push((status, 1, WRITE));
        self.chain(ring, first, &bufs);
        self.publish(ring, first);
        status
    }

    /// Block set up with VERSION_1 and `features`, its queue ready, running.
    fn block_running(&mut self, features: u64) -> Ring {
        let mut ring = Ring::at(BLOCK_RING);
        self.negotiate(BLOCK, VERSION_1 | features);
        self.queue(BLOCK, 0, &mut ring);
        self.driver_ok(BLOCK);
        ring
    }

    /// A well-behaved rng request on `rng` (running), waited for: once it
    /// is served, the event thread has finished whatever it was doing when
    /// the guest published it (it serves one device at a time), and has
    /// taken every kick the guest made before.
    fn barrier(&mut self, rng: &mut Ring) {
        let head = rng.next_avail % QSIZE;
        self.chain(rng, head, &[(RNG_BUFFERS, 16, WRITE)]);
        self.publish(rng, head);
        self.notify(RNG, 0);
        self.wait_used(rng, rng.next_avail);
    }

    /// vsock set up and running (its event queue too); returns its rx and
    /// tx rings.
    fn vsock_running(&mut self) -> (Ring, Ring) {
        let mut rx = Ring::at(VSOCK_RINGS[0]);
        let mut tx = Ring::at(VSOCK_RINGS[1]);
        self.negotiate(VSOCK, VERSION_1);
        self.queue(VSOCK, 0, &mut rx);
        self.queue(VSOCK, 1, &mut tx);
        self.queue(VSOCK, 2, &mut Ring::at(VSOCK_RINGS[2]));
        self.driver_ok(VSOCK);
        (rx, tx)
    }

    /// Posts `n` 256-byte receive buffers on vsock (heads 0..n, buffer i at
    /// `RX_BUFFERS + 0x100 * i`) and notifies.
    fn post_vsock_rx(&mut self, rx: &mut Ring, n: u16) {
        for i in 0..n {
            self.chain(rx, i, &[(RX_BUFFERS + 0x100 * u64::from(i), 0x100, WRITE)]);
            self.publish(rx, i);
        }
        self.notify(VSOCK, 0);
    }

    /// rng set up and running.
    fn rng_running(&mut self) -> Ring {
        let mut ring = Ring::at(RNG_RING);
        self.negotiate(RNG, VERSION_1);
        self.queue(RNG, 0, &mut ring);
        self.driver_ok(RNG);
        ring
    }
}

/// What the well-behaved end of every case read back.
struct Recovery {
    block_status: Read,
    sector0: Read,
    rng_len: Read,
}

/// After the prompt: resets every device, reads sector 0 of the disk and
/// 16 random bytes, then reports status 0.
fn recover(d: &mut Driver) -> Recovery {
    d.s.prompt();
    recovery_steps(d)
}

/// `recover` after the test's go has arrived.
fn recovery_steps(d: &mut Driver) -> Recovery {
    for dev in [BLOCK, RNG, VSOCK] {
        d.reset(dev);
    }
    let mut ring = d.block_running(0);
    let data = DATA + 0x1_0000;
    let status = d.block_request(&mut ring, 0, (BLK_IN, 0), &[(data, 512, WRITE)]);
    d.notify(BLOCK, 0);
    d.wait_used(&ring, 1);
    let block_status = d.s.r8(status);
    let sector0 = d.s.r64(data);
    let mut rng = d.rng_running();
    d.chain(&rng, 0, &[(RNG_BUFFERS, 16, WRITE)]);
    d.publish(&mut rng, 0);
    d.notify(RNG, 0);
    d.wait_used(&rng, 1);
    let rng_len = d.s.r32(rng.used_elem(0).1);
    d.s.end(0);
    Recovery {
        block_status,
        sector0,
        rng_len,
    }
}

// ---- Running a case.

/// One test at a time in this file, checks included, so that resident
/// memory measures one VM: a panicking test elsewhere in the process would
/// grow it (a backtrace's symbols take tens of MiB).
fn one_case() -> std::sync::MutexGuard<'static, ()> {
    static ONE_CASE: Mutex<()> = Mutex::new(());
    ONE_CASE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Growth of the process's resident memory that a hostile guest may
/// cause while it runs: its whole RAM (touched by kiln when the initrd is
/// written, or by the device) plus the monitor's own buffers, with room to
/// spare. The cases grow it by 0.1 to 1.5 MiB; a device that kept what
/// each hostile request left behind (a leaked buffer per chain) exceeds
/// it, a leak of a few bytes per request would not.
const RSS_BOUND: u64 = 2 * common::GUEST_MEM;

fn rss_bytes() -> u64 {
    let status = fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

/// The disk every case's VM has (see `DISK_SECTORS`).
fn disk_image(dir: &Scratch) -> (std::path::PathBuf, Vec<u8>) {
    let mut image = Vec::new();
    for sector in 0..DISK_SECTORS {
        image.extend(std::iter::repeat_n(sector as u8, 512));
    }
    image[..8].copy_from_slice(DISK_MARKER);
    let path = dir.path("disk.img");
    fs::write(&path, &image).expect("writing the disk image");
    (path, image)
}

/// The TAP of a case with a net device, in the case's own namespace.
const TAP: &str = "tap0";
/// The source MAC address of every frame a case sends but its last byte
/// (the frame's number): how the TAP side tells the guest's frames from
/// the host's own.
const FRAME_SOURCE: [u8; 5] = [0x02, 0x6b, 0x69, 0x6c, 0x6e];

/// The host side of a net case: `TAP` in a network namespace of the
/// case's own, and a packet socket on it that sees every frame the TAP
/// took from kiln.
struct TapSide {
    ns: Netns,
    socket: OwnedFd,
}

impl TapSide {
    /// None (after `require`'s message) without root or /dev/net/tun.
    fn create(name: &str) -> Option<Self> {
        if !require(is_root(), "needs root (network namespace, TAP)")
            || !require(
                std::path::Path::new("/dev/net/tun").exists(),
                "/dev/net/tun does not exist",
            )
        {
            return None;
        }
        let ns = Netns::create(
            &format!("hostile-{name}"),
            &[
                // No IPv6: the host sends next to nothing on the TAP.
                "sysctl -qw net.ipv6.conf.default.disable_ipv6=1",
                "ip tuntap add dev tap0 mode tap",
                "ip link set tap0 up",
            ],
        );
        let socket = ns.on_thread(packet_socket);
        Some(Self { ns, socket })
    }

    /// The guest's frames (by source address) the TAP took so far, in order.
    fn frames(&self) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 1 << 17];
        loop {
            // SAFETY: `buf` is writable for its whole length.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                assert_eq!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock,
                    "reading the TAP's frames: {e}"
                );
                return frames;
            }
            let frame = &buf[..n as usize];
            if frame.get(6..11) == Some(&FRAME_SOURCE[..]) {
                frames.push(frame.to_vec());
            }
        }
    }
}

/// A non-blocking packet socket that receives every frame on `TAP` (in
/// the calling thread's network namespace).
fn packet_socket() -> OwnedFd {
    let all = (libc::ETH_P_ALL as u16).to_be();
    let flags = libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, flags, all.into()) };
    assert!(
        fd >= 0,
        "a packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(TAP).expect("a TAP name");
    // SAFETY: a NUL-terminated name that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "{TAP}: {}", std::io::Error::last_os_error());
    // SAFETY: sockaddr_ll is plain data, valid all zero.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = all;
    addr.sll_ifindex = index as i32;
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: `addr` is a sockaddr_ll of `len` bytes that outlives the call.
    let rc = unsafe { libc::bind(fd, std::ptr::from_ref(&addr).cast(), len) };
    assert_eq!(
        rc,
        0,
        "binding to {TAP}: {}",
        std::io::Error::last_os_error()
    );
    // Room for every frame a case sends, 64 KiB GSO frames among them.
    let size: libc::c_int = 16 << 20;
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int option of `len` bytes that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&size).cast(),
            len,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
    socket
}

/// The host's ends of a case's vsock: a listener for each of
/// `Driver::vsock_listeners`, and the connections of `vsock_connects`.
struct HostEnds {
    listeners: Vec<UnixListener>,
    connected: Vec<UnixStream>,
}

/// Stops the VM when a check fails while it waits at its prompt, so the
/// failure is reported at once (not after the VM's timeout).
struct StopOnPanic(kiln::VmStopper);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.stop(VmOutcome::Stopped);
        }
    }
}

/// While the hostile VM waits at its prompt: the process's resident
/// memory is within `RSS_BOUND` of what it was before the VM started, and
/// a second VM in the same process runs `hello` to its end.
fn check_bystanders(name: &str, rss_before: u64) {
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(
        grown < RSS_BOUND,
        "{name}: resident memory grew by {grown} bytes (bound {RSS_BOUND})"
    );
    let (hello, out) = run_guest(&guest_config("hello"), None);
    assert_eq!(
        hello.outcome,
        VmOutcome::Exited(42),
        "{name}: the second VM"
    );
    assert_eq!(
        out, b"hello from a tiny kiln guest\n",
        "{name}: the second VM"
    );
}

/// The values the hostile guest printed (on the UART), what reached
/// kiln's output from the virtio console, and the frames of the guest's
/// that reached the TAP (cases with a net device), in order.
struct Seen(Vec<u64>, Vec<u8>, Vec<Vec<u8>>);

/// A byte of the guest's UART output: lowercase hex, '?' and newlines.
/// Console output of a case uses none of them, so the two (which reach the
/// output from different threads) can be told apart byte by byte.
fn from_uart(b: &u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'f' | b'?' | b'\n')
}

impl Seen {
    fn get(&self, r: Read) -> u64 {
        self.0[r.0]
    }
}

/// The VM `d`'s script runs in (written to `dir` with the disk): a disk,
/// rng and vsock, a console if `d.console`, a net device on `TAP` if
/// `d.tap`. Returns the config, the disk's path and its bytes.
fn case_config(dir: &Scratch, d: &Driver) -> (kiln::config::VmConfig, PathBuf, Vec<u8>) {
    let (disk, image) = disk_image(dir);
    let script = dir.path("script");
    fs::write(&script, d.s.bytes()).expect("writing the script");
    let mut config = guest_config("mmio_script");
    config.initrd = Some(script);
    // The initrd is the guest's own: kiln adds no init of its own to it.
    config.extra_cmdline = Some("rdinit=/script".into());
    config.disks.push(DiskConfig {
        path: disk.clone(),
        read_only: false,
        id: Some("hostile".into()),
        rate_limit: Default::default(),
    });
    config.rng = true;
    config.vsock = Some(VsockConfig {
        cid: GUEST_CID,
        socket: dir.path("vsock"),
    });
    if d.tap {
        config.nets.push(NetConfig {
            tap: TAP.into(),
            mac: None,
            rate_limit: Default::default(),
        });
    }
    if d.console {
        config.console = kiln::config::ConsoleKind::Virtio;
    }
    (config, disk, image)
}

/// Runs `d`'s script (which must end with `recover` or `recovery_steps`)
/// in the VM of `case_config`; returns what the guest printed. See the module docs for everything this
/// asserts. Callers hold `one_case`.
fn run_case(name: &str, d: Driver, recovery: Recovery) -> Option<Seen> {
    if !require(have_kvm(), "/dev/kvm not accessible") {
        return None;
    }
    let tap = match d.tap {
        true => Some(TapSide::create(name)?),
        false => None,
    };
    let dir = Scratch::new(&format!("hostile-{name}"));
    let (mut config, disk, image) = case_config(&dir, &d);
    let (reads, console_expected, at_prompt) = (d.s.reads, d.console, d.at_prompt);
    let mut host = HostEnds {
        listeners: d
            .vsock_listeners
            .iter()
            .map(|port| {
                UnixListener::bind(dir.path(&format!("vsock_{port}")))
                    .expect("binding a vsock port")
            })
            .collect(),
        connected: Vec::new(),
    };
    // A backstop only: every case ends by the guest's own report.
    config.timeout = Some(common::HANG_LIMIT / 2);

    let rss_before = rss_bytes();
    let capture = Capture::default();
    let (input, mut go) = common::pipe();
    let io = ConsoleIo {
        output: Box::new(capture.clone()),
        input: Some(input),
    };
    let vm = match &tap {
        // kiln opens the TAP in the namespace of the thread that spawns it.
        Some(tap) => tap
            .ns
            .on_thread(move || kiln::spawn(config, io, Instant::now())),
        None => kiln::spawn(config, io, Instant::now()),
    }
    .expect("spawning the hostile VM");
    // Once the guest printed its first value: kiln built its devices (and
    // bound the vsock socket) before the guest ran.
    if !d.vsock_connects.is_empty() {
        assert!(
            capture.wait_for(b"\n", common::HANG_LIMIT),
            "{name}: the guest printed nothing"
        );
    }
    for (port, data) in &d.vsock_connects {
        let mut stream =
            UnixStream::connect(dir.path("vsock")).expect("connecting to kiln's vsock");
        let mut bytes = format!("CONNECT {port}\n").into_bytes();
        bytes.extend_from_slice(data);
        // kiln reads nothing past the line until the guest accepts: the
        // bytes wait in the socket's buffer.
        stream.write_all(&bytes).expect("writing to kiln's vsock");
        host.connected.push(stream);
    }
    // The prompt, or the VM's end (then nothing more is coming).
    let (prompted, ended) = std::thread::scope(|s| {
        // Dropped while the closure unwinds, before the scope joins.
        let _stop_on_panic = StopOnPanic(vm.stopper());
        let (closer, vm) = (capture.clone(), &vm);
        let watcher = s.spawn(move || {
            let ended = wait_finished(vm);
            closer.close();
            ended
        });
        let prompted = capture.wait_for(b"?\n", common::HANG_LIMIT);
        if prompted {
            check_bystanders(name, rss_before);
            if let Some(check) = at_prompt {
                check(&host);
            }
            go.write_all(b"g").expect("releasing the hostile guest");
        }
        (prompted, watcher.join().expect("the watcher thread"))
    });
    if !ended {
        // Not dropped: stopping a monitor that hangs would hang the test.
        std::mem::forget(vm);
        panic!(
            "{name}: the hostile VM hangs (prompt seen: {prompted}), console {:?}",
            String::from_utf8_lossy(&capture.bytes())
        );
    }
    let report = vm.wait().expect("the hostile VM's report");
    let (uart, console): (Vec<u8>, Vec<u8>) = capture.bytes().into_iter().partition(from_uart);
    let text = String::from_utf8_lossy(&uart).into_owned();
    assert_eq!(
        report.outcome,
        VmOutcome::Exited(0),
        "{name}: console {text:?}"
    );

    let values: Vec<u64> = text
        .lines()
        .filter(|&l| l != "?")
        .map(|l| u64::from_str_radix(l, 16).unwrap_or_else(|_| panic!("{name}: line {l:?}")))
        .collect();
    assert_eq!(values.len(), reads, "{name}: values the guest printed");
    if !console_expected {
        assert_eq!(console, b"", "{name}: output besides the guest's values");
    }
    let seen = Seen(values, console, tap.map(|t| t.frames()).unwrap_or_default());
    assert_eq!(
        seen.get(recovery.block_status),
        BLK_OK,
        "{name}: block after reset"
    );
    assert_eq!(
        seen.get(recovery.sector0),
        u64::from_le_bytes(*DISK_MARKER),
        "{name}: sector 0 after reset"
    );
    assert_eq!(seen.get(recovery.rng_len), 16, "{name}: rng after reset");
    // No case writes to the disk: whatever it tried, not a byte changed
    // (nor was added past its end).
    assert!(
        fs::read(&disk).expect("reading the disk back") == image,
        "{name}: the disk image changed"
    );
    Some(seen)
}

/// Runs a case and hands what the guest saw to `check`.
macro_rules! case {
    ($name:expr, $d:ident, $recovery:ident, $check:expr) => {
        let _one = one_case();
        if let Some(seen) = run_case($name, $d, $recovery) {
            let check: &dyn Fn(&Seen) = &$check;
            check(&seen);
        }
    };
}

/// A 16-byte descriptor as it sits in a table.
fn raw_desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    d
}

/// An indirect table: `bufs` linked in order.
fn indirect_table(bufs: &[Buf]) -> Vec<u8> {
    let mut table = Vec::new();
    for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
        let more = i + 1 < bufs.len();
        let flags = if more { flags | NEXT } else { flags };
        table.extend_from_slice(&raw_desc(
            addr,
            len,
            flags,
            if more { i as u16 + 1 } else { 0 },
        ));
    }
    table
}

#[test]
fn block_descriptor_loops_and_chains_longer_than_the_queue() {
    let mut d = Driver::default();
    let mut ring = d.block_running(F_INDIRECT_DESC);
    // A loop: header -> status -> header -> ... (the walk stops after a
    // ring's worth, on a descriptor that still says NEXT).
    let (header, looped) = d.block_header(BLK_IN, 0);
    d.desc(&ring, 0, (header, 16, NEXT), 1);
    d.desc(&ring, 1, (looped, 1, WRITE | NEXT), 0);
    d.publish(&mut ring, 0);
    // 257 descriptors through an indirect table: more than the 16-entry
    // queue, and one more than a block request may have (header, 254 data
    // segments, status), though its 127 sectors fit the disk (the extra
    // descriptor is empty).
    let (header, overlong) = d.block_header(BLK_IN, 0);
    let mut bufs = vec![(header, 16, 0)];
    bufs.extend((0..254).map(|i| (DATA + 256 * i, 256, WRITE)));
    bufs.push((DATA, 0, WRITE));
    bufs.push((overlong, 1, WRITE));
    d.s.copy(TABLE, &indirect_table(&bufs));
    d.desc(&ring, 2, (TABLE, 257 * 16, INDIRECT), 0);
    d.publish(&mut ring, 2);
    // An indirect table whose length is near u32::MAX.
    d.desc(&ring, 3, (TABLE, 0xffff_fff0, INDIRECT), 0);
    d.publish(&mut ring, 3);
    // The longest chain allowed, 256 descriptors: served (127 sectors).
    let (header, longest) = d.block_header(BLK_IN, 0);
    let mut bufs = vec![(header, 16, 0)];
    bufs.extend((0..254).map(|i| (DATA + 256 * i, 256, WRITE)));
    bufs.push((longest, 1, WRITE));
    d.s.copy(TABLE + 0x1_0000, &indirect_table(&bufs));
    d.desc(&ring, 4, (TABLE + 0x1_0000, 256 * 16, INDIRECT), 0);
    d.publish(&mut ring, 4);
    d.notify(BLOCK, 0);
    d.wait_used(&ring, 4);
    let lens: Vec<Read> = (0..4).map(|i| d.s.r32(ring.used_elem(i).1)).collect();
    let statuses = [looped, overlong, longest].map(|a| d.s.r8(a));
    let last_byte = d.s.r8(DATA + 254 * 256 - 1);
    let status = d.status(BLOCK);
    let recovery = recover(&mut d);
    case!("loops", d, recovery, |seen| {
        let lens: Vec<u64> = lens.iter().map(|&r| seen.get(r)).collect();
        assert_eq!(lens, [1, 1, 0, 254 * 256 + 1], "used lengths");
        let statuses = statuses.map(|r| seen.get(r));
        assert_eq!(statuses, [BLK_IOERR, BLK_IOERR, BLK_OK], "status bytes");
        assert_eq!(seen.get(last_byte), 126, "sectors 0-126 were read");
        assert_eq!(seen.get(status), u64::from(RUNNING));
    });
}

#[test]
fn block_buffers_outside_memory_across_its_end_and_near_u32_max() {
    let mut d = Driver::default();
    let mut ring = d.block_running(0);
    let read = (BLK_IN, 0);
    let mut statuses = Vec::new();
    for (first, data) in [
        (0, (0x4000_0000, 512, WRITE)),    // past the end of RAM
        (3, (MEM_END - 256, 512, WRITE)),  // across the end
        (6, (DATA, 0xffff_fe00, WRITE)),   // a length near u32::MAX
        (9, (u64::MAX - 511, 512, WRITE)), // an address that wraps
    ] {
        statuses.push(d.block_request(&mut ring, first, read, &[data]));
    }
    // The header outside memory, the status byte fine.
    let (_, status) = d.block_header(BLK_IN, 0);
    d.chain(&ring, 12, &[(0x4000_0000, 16, 0), (status, 1, WRITE)]);
    d.publish(&mut ring, 12);
    statuses.push(status);
    // The status byte outside memory, then across its end.
    let (header, _) = d.block_header(BLK_IN, 0);
    d.chain(&ring, 14, &[(header, 16, 0), (0x4000_0000, 1, WRITE)]);
    d.publish(&mut ring, 14);
    d.notify(BLOCK, 0);
    d.wait_used(&ring, 6);
    d.chain(&ring, 0, &[(header, 16, 0), (MEM_END - 1, 2, WRITE)]);
    d.publish(&mut ring, 0);
    d.notify(BLOCK, 0);
    d.wait_used(&ring, 7);
    let lens: Vec<Read> = (0..7).map(|i| d.s.r32(ring.used_elem(i).1)).collect();
    let statuses: Vec<Read> = statuses.iter().map(|&a| d.s.r8(a)).collect();
    let status = d.status(BLOCK);
    let recovery = recover(&mut d);
    case!("outside", d, recovery, |seen| {
        let lens: Vec<u64> = lens.iter().map(|&r| seen.get(r)).collect();
        // Answered IOERR (1 byte: the status) where the status byte is
        // usable, returned empty where it is not.
        assert_eq!(lens, [1, 1, 1, 1, 1, 0, 0], "used lengths");
        let statuses: Vec<u64> = statuses.iter().map(|&r| seen.get(r)).collect();
        assert_eq!(statuses, [BLK_IOERR; 5], "status bytes");
        assert_eq!(seen.get(status), u64::from(RUNNING));
    });
}

/// A DISCARD / WRITE_ZEROES segment: sector, sectors, flags.
fn discard_segment(sector: u64, sectors: u32) -> [u8; 16] {
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&sectors.to_le_bytes());
    seg
}

#[test]
fn block_requests_past_the_end_and_with_overflowing_sectors() {
    let mut d = Driver::default();
    let mut ring = d.block_running(F_BLK_DISCARD | F_BLK_WRITE_ZEROES);
    let data = |len| [(DATA, len, WRITE)];
    let out = |len| [(DATA, len, 0)];
    let mut statuses = vec![
        d.block_request(&mut ring, 0, (BLK_IN, DISK_SECTORS), &data(512)),
        d.block_request(&mut ring, 3, (BLK_IN, DISK_SECTORS - 1), &data(1024)),
        // sector * 512 overflows u64.
        d.block_request(&mut ring, 6, (BLK_OUT, 1 << 55), &out(512)),
        d.block_request(&mut ring, 9, (BLK_OUT, u64::MAX), &out(512)),
        // sector * 512 fits, + the length overflows.
        d.block_request(&mut ring, 12, (BLK_OUT, (u64::MAX >> 9)), &out(512)),
    ];
    d.notify(BLOCK, 0);
    d.wait_used(&ring, 5);
    // The last sector itself is fine.
    statuses.push(d.block_request(&mut ring, 0, (BLK_IN, DISK_SECTORS - 1), &data(512)));
    // Discard and write-zeroes ranges that overflow or run past the end.
    d.s.copy(DATA + 0x1000, &discard_segment(u64::MAX - 3, 8));
    d.s.copy(DATA + 0x1010, &discard_segment(DISK_SECTORS - 8, 16));
    statuses.push(d.block_request(&mut ring, 3, (BLK_DISCARD, 0), &[(DATA + 0x1000, 16, 0)]));
    statuses.push(d.block_request(
        &mut ring,
        6,
        (BLK_WRITE_ZEROES, 0),
        &[(DATA + 0x1010, 16, 0)],
    ));
    d.notify(BLOCK, 0);
    d.wait_used(&ring, 8);
    let statuses: Vec<Read> = statuses.iter().map(|&a| d.s.r8(a)).collect();
    let last_sector = d.s.r8(DATA);
    let status = d.status(BLOCK);
    let recovery = recover(&mut d);
    case!("past-end", d, recovery, |seen| {
        let statuses: Vec<u64> = statuses.iter().map(|&r| seen.get(r)).collect();
        assert_eq!(
            statuses,
            [BLK_IOERR, BLK_IOERR, BLK_IOERR, BLK_IOERR, BLK_IOERR, BLK_OK, BLK_IOERR, BLK_IOERR],
            "status bytes"
        );
        assert_eq!(seen.get(last_sector), DISK_SECTORS - 1);
        assert_eq!(seen.get(status), u64::from(RUNNING));
    });
}

#[test]
fn queue_sizes_zero_not_a_power_of_two_or_too_big_are_ignored() {
    let mut d = Driver::default();
    let mut ring = Ring::at(BLOCK_RING);
    d.negotiate(BLOCK, VERSION_1);
    let max = d.s.r32(BLOCK + REG_QUEUE_NUM_MAX);
    // A queue the device does not have.
    d.s.w32(BLOCK + REG_QUEUE_SEL, 7);
    let max7 = d.s.r32(BLOCK + REG_QUEUE_NUM_MAX);
    d.s.w32(BLOCK + REG_QUEUE_NUM, 16);
    d.s.w32(BLOCK + REG_QUEUE_READY, 1);
    let ready7 = d.s.r32(BLOCK + REG_QUEUE_READY);
    // Queue 0 with 16 entries, then sizes that must not replace it.
    d.queue(BLOCK, 0, &mut ring);
    for size in [0, 15, 512, 0x1_0010, u32::MAX] {
        d.s.w32(BLOCK + REG_QUEUE_NUM, size);
    }
    d.driver_ok(BLOCK);
    let status = d.status(BLOCK);
    // 17 requests, one at a time: with 16 entries the 17th wraps to used
    // slot 0 and slot 16 (past the ring) stays empty.
    for n in 1..=17 {
        d.block_request(&mut ring, 0, (BLK_IN, 1), &[(DATA, 512, WRITE)]);
        d.notify(BLOCK, 0);
        d.wait_used(&ring, n);
    }
    let slot16 = d.s.r64(ring.used() + 4 + 8 * 16);
    let recovery = recover(&mut d);
    case!("queue-size", d, recovery, |seen| {
        assert_eq!(seen.get(max), 256);
        assert_eq!(seen.get(max7), 0, "no queue 7");
        assert_eq!(seen.get(ready7), 0, "no queue 7");
        assert_eq!(seen.get(status), u64::from(RUNNING));
        assert_eq!(seen.get(slot16), 0, "the queue kept 16 entries");
    });
}

#[test]
fn rings_outside_memory_make_the_device_need_a_reset() {
    let mut d = Driver::default();
    let mut ring = Ring::at(BLOCK_RING);
    let mut statuses = Vec::new();
    let bad_layouts = [
        [0x4000_0000, ring.avail(), ring.used()], // descriptors past RAM
        [ring.base, ring.avail(), MEM_END - 8],   // used ring across its end
        [ring.base, u64::MAX - 0xfff, ring.used()], // avail ring at the top of u64
    ];
    for layout in bad_layouts {
        d.negotiate(BLOCK, VERSION_1);
        d.queue_at(BLOCK, 0, &mut ring, layout);
        d.driver_ok(BLOCK);
        let status = d.status(BLOCK);
        statuses.push((status, d.s.r32(BLOCK + REG_INTERRUPT_STATUS)));
    }
    // A request on the failed device, then a well-behaved rng request as
    // a barrier for the event thread: the block request stays unserved.
    d.block_request(&mut ring, 0, (BLK_IN, 0), &[(DATA, 512, WRITE)]);
    d.notify(BLOCK, 0);
    let mut rng = d.rng_running();
    d.barrier(&mut rng);
    let used = d.s.r16(ring.used_idx());
    // After a reset, a good layout works.
    d.block_running(0);
    let fixed = d.status(BLOCK);
    let recovery = recover(&mut d);
    case!("rings-outside", d, recovery, |seen| {
        for &(status, interrupt) in &statuses {
            assert_eq!(seen.get(status), u64::from(RUNNING | NEEDS_RESET), "status");
            assert_eq!(
                seen.get(interrupt) & INT_CONFIG_CHANGE,
                INT_CONFIG_CHANGE,
                "config-change interrupt"
            );
        }
        assert_eq!(seen.get(used), 0, "nothing served by a failed device");
        assert_eq!(seen.get(fixed), u64::from(RUNNING));
    });
}

#[test]
fn notifications_for_unconfigured_or_disabled_queues_are_ignored() {
    let mut d = Driver::default();
    // Block with its only queue set up but never made ready: refused.
    let mut ring = Ring::at(BLOCK_RING);
    d.negotiate(BLOCK, VERSION_1);
    d.queue(BLOCK, 0, &mut ring);
    d.s.w32(BLOCK + REG_QUEUE_READY, 0);
    d.block_request(&mut ring, 0, (BLK_IN, 0), &[(DATA, 512, WRITE)]);
    d.driver_ok(BLOCK);
    let disabled = d.status(BLOCK);
    for queue in [0, 1, 7, u32::MAX] {
        d.notify(BLOCK, queue);
    }
    // rng: a chain published and notified before DRIVER_OK, and
    // notifications for queues it does not have; DRIVER_OK serves the chain.
    let mut rng = Ring::at(RNG_RING);
    d.negotiate(RNG, VERSION_1);
    d.queue(RNG, 0, &mut rng);
    d.chain(&rng, 0, &[(RNG_BUFFERS, 16, WRITE)]);
    d.publish(&mut rng, 0);
    for queue in [0, 3, u32::MAX] {
        d.notify(RNG, queue);
    }
    d.driver_ok(RNG);
    d.wait_used(&rng, 1);
    let rng_len = d.s.r32(rng.used_elem(0).1);
    let rng_status = d.status(RNG);
    let block_used = d.s.r16(ring.used_idx());
    let recovery = recover(&mut d);
    case!("notify", d, recovery, |seen| {
        assert_eq!(seen.get(disabled), u64::from(RUNNING | NEEDS_RESET));
        assert_eq!(seen.get(rng_len), 16);
        assert_eq!(seen.get(rng_status), u64::from(RUNNING));
        assert_eq!(seen.get(block_used), 0, "the refused device served nothing");
    });
}

#[test]
fn config_space_out_of_range_and_odd_widths() {
    let mut d = Driver::default();
    d.block_running(0);
    // The capacity (128 sectors) at every width, the last config byte,
    // past the config and the last dword of the window.
    let capacity = [OP_R64, OP_R32, OP_R16, OP_R8].map(|op| d.s.read(op, BLOCK + CONFIG));
    let unmap = d.s.r8(BLOCK + CONFIG + 56);
    let tail = d.s.r64(BLOCK + CONFIG + 56);
    let window_end = d.s.r32(BLOCK + 0xffc);
    // Across the end of the window into the next device's: KVM splits an
    // access at the page boundary, so each device sees 4 bytes of its own.
    let straddle = d.s.r64(BLOCK + 0xffc);
    let unclaimed = d.s.r32(UNCLAIMED_WINDOW);
    // Registers at the wrong width or offset read as zero.
    let magic = d.s.r32(BLOCK + REG_MAGIC);
    let odd_magic = [
        d.s.r16(BLOCK + REG_MAGIC),
        d.s.r64(BLOCK + REG_MAGIC),
        d.s.r8(BLOCK + REG_MAGIC + 1),
        d.s.r32(BLOCK + REG_MAGIC + 2),
    ];
    // ... and writes at the wrong width are dropped.
    d.s.w8(BLOCK + REG_STATUS, 0);
    d.s.w16(BLOCK + REG_STATUS, 0);
    d.s.w64(BLOCK + REG_STATUS, 0);
    d.s.w32(BLOCK + REG_STATUS + 1, 0);
    let status = d.status(BLOCK);
    // Config writes: block's config is read-only, at any width and offset.
    d.s.w32(BLOCK + CONFIG, 0xdead_beef);
    d.s.w8(BLOCK + CONFIG + 0xeff, 1);
    d.s.w64(BLOCK + CONFIG + 0x100, u64::MAX);
    let capacity_after = d.s.r64(BLOCK + CONFIG);
    // rng has no config space; vsock's is the guest CID (8 bytes).
    let rng_config = d.s.r64(RNG + CONFIG);
    d.s.w64(VSOCK + CONFIG, 99);
    let cid = d.s.r64(VSOCK + CONFIG);
    let cid_high = d.s.r32(VSOCK + CONFIG + 4);
    let recovery = recover(&mut d);
    case!("config", d, recovery, |seen| {
        let capacity = capacity.map(|r| seen.get(r));
        assert_eq!(capacity, [DISK_SECTORS; 4], "capacity at 8/4/2/1 bytes");
        assert_eq!(seen.get(unmap), 1, "write_zeroes_may_unmap");
        assert_eq!(seen.get(tail), 1, "config bytes past its end read zero");
        assert_eq!(seen.get(window_end), 0);
        assert_eq!(
            seen.get(straddle),
            0x7472_6976 << 32,
            "block's last dword, rng's magic"
        );
        assert_eq!(seen.get(unclaimed), 0xffff_ffff);
        assert_eq!(seen.get(magic), 0x7472_6976);
        assert_eq!(odd_magic.map(|r| seen.get(r)), [0; 4]);
        assert_eq!(seen.get(status), u64::from(RUNNING));
        assert_eq!(seen.get(capacity_after), DISK_SECTORS);
        assert_eq!(seen.get(rng_config), 0);
        assert_eq!(seen.get(cid), GUEST_CID);
        assert_eq!(seen.get(cid_high), 0);
    });
}

#[test]
fn features_written_after_features_ok_are_ignored() {
    let mut d = Driver::default();
    let offered = [0, 1, 7].map(|sel| {
        d.s.w32(BLOCK + REG_DEVICE_FEATURES_SEL, sel);
        d.s.r32(BLOCK + REG_DEVICE_FEATURES)
    });
    // Features written before DRIVER: dropped.
    d.reset(BLOCK);
    d.s.w32(BLOCK + REG_DRIVER_FEATURES_SEL, 0);
    d.s.w32(BLOCK + REG_DRIVER_FEATURES, F_BLK_DISCARD as u32);
    // A feature never offered: FEATURES_OK does not stick.
    d.negotiate(BLOCK, VERSION_1 | 1 << 40);
    let refused = d.status(BLOCK);
    // VERSION_1 only; then, after FEATURES_OK, DISCARD on and VERSION_1 off.
    let mut ring = Ring::at(BLOCK_RING);
    d.negotiate(BLOCK, VERSION_1);
    d.s.w32(BLOCK + REG_DRIVER_FEATURES_SEL, 0);
    d.s.w32(
        BLOCK + REG_DRIVER_FEATURES,
        (F_BLK_DISCARD | F_BLK_WRITE_ZEROES) as u32,
    );
    d.s.w32(BLOCK + REG_DRIVER_FEATURES_SEL, 1);
    d.s.w32(BLOCK + REG_DRIVER_FEATURES, 0);
    d.queue(BLOCK, 0, &mut ring);
    d.driver_ok(BLOCK);
    let status = d.status(BLOCK);
    // DISCARD was not negotiated: UNSUPP, and the disk keeps its bytes.
    d.s.copy(DATA, &discard_segment(0, 8));
    let discard = d.block_request(&mut ring, 0, (BLK_DISCARD, 0), &[(DATA, 16, 0)]);
    d.notify(BLOCK, 0);
    d.wait_used(&ring, 1);
    let discard = d.s.r8(discard);
    let recovery = recover(&mut d);
    case!("features", d, recovery, |seen| {
        let [low, high, beyond] = offered.map(|r| seen.get(r));
        assert_ne!(low & F_BLK_DISCARD, 0, "the disk offers DISCARD");
        assert_eq!(high, 1, "VERSION_1");
        assert_eq!(beyond, 0);
        assert_eq!(seen.get(refused), u64::from(ACKNOWLEDGE | DRIVER));
        assert_eq!(seen.get(status), u64::from(RUNNING));
        assert_eq!(seen.get(discard), BLK_UNSUPP);
    });
}

#[test]
fn a_status_written_backwards_is_ignored() {
    let mut d = Driver::default();
    d.reset(BLOCK);
    // DRIVER_OK alone, then FEATURES_OK alone (no VERSION_1): neither sticks.
    d.s.w32(BLOCK + REG_STATUS, DRIVER_OK);
    let driver_ok_first = d.status(BLOCK);
    d.s.w32(BLOCK + REG_STATUS, FEATURES_OK);
    let features_ok_first = d.status(BLOCK);
    let mut ring = d.block_running(0);
    let backwards = [
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
        ACKNOWLEDGE | DRIVER | DRIVER_OK,
        ACKNOWLEDGE,
        DRIVER_OK,
    ]
    .map(|value| {
        d.s.w32(BLOCK + REG_STATUS, value);
        d.status(BLOCK)
    });
    let status = d.block_request(&mut ring, 0, (BLK_IN, 2), &[(DATA, 512, WRITE)]);
    d.notify(BLOCK, 0);
    d.wait_used(&ring, 1);
    let status = d.s.r8(status);
    let byte = d.s.r8(DATA);
    let recovery = recover(&mut d);
    case!("status", d, recovery, |seen| {
        assert_eq!(seen.get(driver_ok_first), 0);
        assert_eq!(seen.get(features_ok_first), 0);
        assert_eq!(backwards.map(|r| seen.get(r)), [u64::from(RUNNING); 4]);
        assert_eq!(seen.get(status), BLK_OK, "the device still runs");
        assert_eq!(seen.get(byte), 2, "sector 2");
    });
}

#[test]
fn device_reset_in_the_middle_of_requests() {
    let mut d = Driver::default();
    let mut after_reset = Vec::new();
    for _ in 0..20 {
        // Five 8 KiB reads, a notify, and a reset right behind it.
        let mut ring = d.block_running(0);
        for first in (0..15).step_by(3) {
            d.block_request(&mut ring, first, (BLK_IN, 0), &[(DATA, 8192, WRITE)]);
        }
        d.notify(BLOCK, 0);
        d.reset(BLOCK);
        after_reset.push(d.status(BLOCK));
        // Four 64 KiB rng requests, likewise.
        let mut rng = d.rng_running();
        for i in 0..4u16 {
            d.chain(
                &rng,
                i,
                &[(RNG_BUFFERS + 0x1_0000 * u64::from(i), 0x1_0000, WRITE)],
            );
            d.publish(&mut rng, i);
        }
        d.notify(RNG, 0);
        d.reset(RNG);
        after_reset.push(d.status(RNG));
    }
    // vsock reset while it holds the driver's receive buffers.
    let (mut rx, _) = d.vsock_running();
    d.post_vsock_rx(&mut rx, 8);
    d.reset(VSOCK);
    after_reset.push(d.status(VSOCK));
    let recovery = recover(&mut d);
    case!("reset", d, recovery, |seen| {
        for r in &after_reset {
            assert_eq!(seen.get(*r), 0, "status after a reset");
        }
    });
}

#[test]
fn a_notification_storm_serves_each_chain_once() {
    let mut d = Driver::default();
    let mut ring = d.block_running(0);
    d.block_request(&mut ring, 0, (BLK_IN, 3), &[(DATA, 512, WRITE)]);
    // 20000 notifies of the queue (KVM ioeventfd: they never leave the kernel).
    d.s.w32_times(BLOCK + REG_QUEUE_NOTIFY, 0, 20_000);
    d.wait_used(&ring, 1);
    let used_once = d.s.r16(ring.used_idx());
    // 2000 notifies of queues block does not have: each reaches the transport.
    d.s.w32_times(BLOCK + REG_QUEUE_NOTIFY, 9, 2_000);
    // And a storm on rng with nothing in its ring.
    let mut rng = d.rng_running();
    d.s.w32_times(RNG + REG_QUEUE_NOTIFY, 0, 20_000);
    d.block_request(&mut ring, 3, (BLK_IN, 4), &[(DATA, 512, WRITE)]);
    d.notify(BLOCK, 0);
    d.wait_used(&ring, 2);
    let used_twice = d.s.r16(ring.used_idx());
    d.chain(&rng, 0, &[(RNG_BUFFERS, 16, WRITE)]);
    d.publish(&mut rng, 0);
    d.notify(RNG, 0);
    d.wait_used(&rng, 1);
    let rng_used = d.s.r16(rng.used_idx());
    let status = d.status(BLOCK);
    let recovery = recover(&mut d);
    case!("storm", d, recovery, |seen| {
        assert_eq!(seen.get(used_once), 1);
        assert_eq!(seen.get(used_twice), 2);
        assert_eq!(seen.get(rng_used), 1);
        assert_eq!(seen.get(status), u64::from(RUNNING));
    });
}

// vsock packet types and ops.
const STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;

/// A vsock packet header (struct virtio_vsock_hdr).
fn vsock_header(
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
) -> [u8; 44] {
    let mut h = [0u8; 44];
    h[0..8].copy_from_slice(&src_cid.to_le_bytes());
    h[8..16].copy_from_slice(&dst_cid.to_le_bytes());
    h[16..20].copy_from_slice(&src_port.to_le_bytes());
    h[20..24].copy_from_slice(&dst_port.to_le_bytes());
    h[24..28].copy_from_slice(&len.to_le_bytes());
    h[28..30].copy_from_slice(&type_.to_le_bytes());
    h[30..32].copy_from_slice(&op.to_le_bytes());
    h[36..40].copy_from_slice(&(64u32 << 10).to_le_bytes()); // buf_alloc
    h
}

#[test]
fn vsock_packets_with_bad_ops_lengths_and_cids() {
    let mut d = Driver::default();
    let (mut rx, mut tx) = d.vsock_running();
    d.post_vsock_rx(&mut rx, 8);
    let host = 2;
    // Ports 2004 and 2005 have listeners: only the packets' CID and type
    // keep them from connecting.
    d.vsock_listeners = vec![2004, 2005];
    // (header, bytes of the chain, descriptor flags).
    let packets: [([u8; 44], u32, u16); 10] = [
        (
            vsock_header(GUEST_CID, host, 1001, 2001, 0, STREAM, 99),
            44,
            0,
        ), // unknown op
        (
            vsock_header(GUEST_CID, host, 1002, 2002, u32::MAX, STREAM, OP_RW),
            44,
            0,
        ),
        (
            vsock_header(77, host, 1003, 2003, 0, STREAM, OP_REQUEST),
            44,
            0,
        ), // not our CID
        (
            vsock_header(GUEST_CID, 99, 1004, 2004, 0, STREAM, OP_REQUEST),
            44,
            0,
        ), // not the host
        (
            vsock_header(GUEST_CID, host, 1005, 2005, 0, 2, OP_REQUEST),
            44,
            0,
        ), // not a stream
        (
            vsock_header(GUEST_CID, host, 1006, 2006, 0, STREAM, OP_RW),
            10,
            0,
        ), // short
        (
            vsock_header(GUEST_CID, host, 1007, 2007, 100, STREAM, OP_RW),
            44,
            0,
        ), // len > chain
        (
            vsock_header(GUEST_CID, host, 1008, 5555, 0, STREAM, OP_REQUEST),
            44,
            0,
        ), // no listener
        (
            vsock_header(GUEST_CID, host, 1009, 2009, 0, STREAM, OP_REQUEST),
            44,
            WRITE,
        ), // writable
        (
            vsock_header(GUEST_CID, host, 0xabcd, 2010, 0, STREAM, 99),
            44,
            0,
        ), // the last RST
    ];
    for (i, (header, len, flags)) in packets.iter().enumerate() {
        let at = PACKETS + 0x100 * i as u64;
        d.s.copy(at, header);
        d.chain(&tx, i as u16, &[(at, *len, *flags)]);
        d.publish(&mut tx, i as u16);
    }
    // A header outside memory, and one across its end.
    d.chain(&tx, 10, &[(0x4000_0000, 44, 0)]);
    d.publish(&mut tx, 10);
    d.chain(&tx, 11, &[(MEM_END - 20, 44, 0)]);
    d.publish(&mut tx, 11);
    d.notify(VSOCK, 1);
    d.wait_used(&tx, 12);
    // Seven resets come back (for packets 1, 2, 4, 5, 7, 8 and 10).
    d.wait_used(&rx, 7);
    let tx_lens: Vec<Read> = (0..12).map(|i| d.s.r32(tx.used_elem(i).1)).collect();
    let rsts: Vec<[Read; 4]> = (0..7)
        .map(|i| {
            let buf = RX_BUFFERS + 0x100 * i;
            [
                d.s.r16(buf + 30),                 // op
                d.s.r32(buf + 20),                 // dst_port
                d.s.r64(buf),                      // src_cid
                d.s.r32(rx.used_elem(i as u16).1), // used length
            ]
        })
        .collect();
    let status = d.status(VSOCK);
    let recovery = recover(&mut d);
    case!("vsock", d, recovery, |seen| {
        let tx_lens: Vec<u64> = tx_lens.iter().map(|&r| seen.get(r)).collect();
        assert_eq!(tx_lens, [0; 12], "tx chains come back with nothing written");
        let rsts: Vec<[u64; 4]> = rsts.iter().map(|r| r.map(|r| seen.get(r))).collect();
        let expect: Vec<[u64; 4]> = [
            (1001, 2),
            (1002, 2),
            (1004, 99),
            (1005, 2),
            (1007, 2),
            (1008, 2),
            (0xabcd, 2),
        ]
        .map(|(port, cid)| [u64::from(OP_RST), port, cid, 44])
        .to_vec();
        assert_eq!(rsts, expect, "resets: op, port, source CID, length");
        assert_eq!(seen.get(status), u64::from(RUNNING));
    });
}

#[test]
fn rng_zero_length_read_only_and_misordered_descriptors() {
    let mut d = Driver::default();
    let mut rng = d.rng_running();
    let buf = RNG_BUFFERS;
    let chains: [(u16, &[Buf]); 8] = [
        (0, &[(buf, 0, WRITE)]),                      // zero length
        (1, &[(buf, 64, 0)]),                         // device-readable only
        (2, &[(buf, 32, WRITE), (buf + 64, 32, 0)]),  // readable after writable
        (4, &[(buf, u32::MAX, WRITE)]),               // near u32::MAX
        (5, &[(MEM_END - 16, 32, WRITE)]),            // across the end of RAM
        (6, &[(buf, 1 << 20, WRITE)]),                // more than one chain gets
        (9, &[(0x4000_0000, 16, WRITE)]),             // past the end of RAM
        (10, &[(buf, 16, 0), (buf + 16, 16, WRITE)]), // readable, then writable
    ];
    for (head, bufs) in chains {
        d.chain(&rng, head, bufs);
        d.publish(&mut rng, head);
    }
    // A loop of two 8-byte writable descriptors.
    d.desc(&rng, 7, (buf, 8, WRITE | NEXT), 8);
    d.desc(&rng, 8, (buf + 8, 8, WRITE | NEXT), 7);
    d.publish(&mut rng, 7);
    d.notify(RNG, 0);
    d.wait_used(&rng, 9);
    let lens: Vec<Read> = (0..9).map(|i| d.s.r32(rng.used_elem(i).1)).collect();
    let status = d.status(RNG);
    let recovery = recover(&mut d);
    case!("rng", d, recovery, |seen| {
        let lens: Vec<u64> = lens.iter().map(|&r| seen.get(r)).collect();
        assert_eq!(lens, [0, 0, 32, 0, 0, 64 << 10, 0, 16, 128], "used lengths");
        assert_eq!(seen.get(status), u64::from(RUNNING));
    });
}

/// Runs `script` with `kiln run` (its default log level) in a VM with
/// the suite's disk and an rng (the same windows as `run_case`); returns the exit status and stderr.
fn kiln_run_script(name: &str, script: &Script) -> (Option<i32>, String) {
    kiln_run_script_with(name, script, "--rng", None)
}

/// [`kiln_run_script`] with the rng given by `rng_arg` (`--rng` or
/// `--rng=LIMITS`) and `KILN_LOG` set to `log` if given.
fn kiln_run_script_with(
    name: &str,
    script: &Script,
    rng_arg: &str,
    log: Option<&str>,
) -> (Option<i32>, String) {
    let dir = Scratch::new(&format!("hostile-cli-{name}"));
    let (disk, _) = disk_image(&dir);
    let path = dir.path("script");
    fs::write(&path, script.bytes()).expect("writing the script");
    let mut cmd = common::kiln_cli();
    cmd.args(["run", "--kernel"])
        .arg(common::test_guest("mmio_script"))
        .arg("--initrd")
        .arg(&path)
        .args([
            "--cmdline",
            "rdinit=/script",
            "--mem",
            "32M",
            "--timeout",
            "60s",
        ])
        .args([rng_arg, "--disk"])
        .arg(&disk);
    if let Some(level) = log {
        cmd.env("KILN_LOG", level);
    }
    let out = cmd.output().expect("running kiln");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--rng=ops=N` on `kiln run` reaches the device: a guest that asks for
/// twice what the bucket holds gets every request served, and the device's
/// counters in kiln's exit log say the limit held its queue for tokens
/// (without the limit the count stays 0: no timing is asserted).
#[test]
fn an_rng_rate_limit_from_the_command_line_holds_the_queue() {
    if !require(have_kvm(), "/dev/kvm not accessible") {
        return;
    }
    let _one = one_case();
    let mut d = Driver::default();
    let mut rng = d.rng_running();
    const REQUESTS: u16 = 8;
    for i in 0..REQUESTS {
        d.chain(&rng, i, &[(RNG_BUFFERS + 64 * u64::from(i), 16, WRITE)]);
        d.publish(&mut rng, i);
    }
    d.notify(RNG, 0);
    d.wait_used(&rng, REQUESTS);
    d.s.end(0);
    // A bucket of 4 requests (one second's worth) for 8 requests.
    let (code, stderr) = kiln_run_script_with("rng-limit", &d.s, "--rng=ops=4", Some("info"));
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let line = stderr
        .lines()
        .find_map(|l| l.split_once("rng: ").map(|(_, c)| c.to_string()))
        .unwrap_or_else(|| panic!("no 'rng:' counter line in {stderr}"));
    let count = |key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
    };
    assert!(count("requests") >= u64::from(REQUESTS), "{line}");
    assert!(count("rate_limited") >= 1, "{line}");
}

#[test]
fn guest_mistakes_do_not_reach_the_host_log() {
    // Each of these used to print one warning or error line on kiln's
    // stderr per guest access (2222 lines for this script): a guest could
    // flood the host's log, or stall its vCPU on a stderr nobody reads.
    if !require(have_kvm(), "/dev/kvm not accessible") {
        return;
    }
    let _one = one_case();
    let mut d = Driver::default();
    // rng barriers make sure block's kicks were served (register writes
    // are handled, and logged, on the vCPU thread as they happen).
    let mut rng = d.rng_running();
    let mut ring = Ring::at(BLOCK_RING);
    d.negotiate(BLOCK, VERSION_1);
    d.queue(BLOCK, 0, &mut ring);
    d.s.w32_times(BLOCK + REG_QUEUE_NUM, 15, 1000); // not a power of two
    d.s.w32_times(BLOCK + REG_QUEUE_DESC, 8, 1000); // misaligned
    d.s.w32_times(BLOCK + REG_QUEUE_AVAIL, 1, 1000);
    d.s.w32_times(BLOCK + REG_QUEUE_USED, 2, 1000);
    d.driver_ok(BLOCK);
    // Made-up head indexes, then an avail index far ahead of the ring.
    for _ in 0..QSIZE {
        d.publish(&mut ring, 0xffff);
    }
    d.notify(BLOCK, 0);
    d.barrier(&mut rng);
    d.s.w16(ring.avail() + 2, 1000);
    d.s.w32_times(BLOCK + REG_QUEUE_NOTIFY, 0, 1000);
    d.barrier(&mut rng);
    // Rings outside memory, over and over.
    for _ in 0..100 {
        d.negotiate(BLOCK, VERSION_1);
        let layout = [0x4000_0000, ring.avail(), ring.used()];
        d.queue_at(BLOCK, 0, &mut ring, layout);
        d.driver_ok(BLOCK);
    }
    // A queue left disabled.
    d.negotiate(BLOCK, VERSION_1);
    d.driver_ok(BLOCK);
    d.s.end(0);
    let (code, stderr) = kiln_run_script("log", &d.s);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(stderr, "", "kiln's stderr");
}

impl Driver {
    /// vsock running with 272 packets sent on its TX queue, each of which
    /// earns a reset, and no receive buffers: it took 256 and holds the
    /// reset for each, the last 16 wait in the ring. Returns its rx and tx
    /// rings; an rng barrier was the last step.
    fn vsock_held_back(&mut self) -> (Ring, Ring) {
        let (rx, mut tx) = self.vsock_running();
        self.s.copy(
            PACKETS,
            &vsock_header(GUEST_CID, 2, 1000, 2000, 0, 1, 99), // unknown op
        );
        for i in 0..QSIZE {
            self.desc(&tx, i, (PACKETS, 44, 0), 0);
        }
        // 16 rounds of 16 packets: all taken.
        for round in 1..=16 {
            for i in 0..QSIZE {
                self.publish(&mut tx, i);
            }
            self.notify(VSOCK, 1);
            self.wait_used(&tx, round * QSIZE);
        }
        // 16 more, then an rng request as a barrier for the event thread.
        for i in 0..QSIZE {
            self.publish(&mut tx, i);
        }
        self.notify(VSOCK, 1);
        let mut rng = self.rng_running();
        self.barrier(&mut rng);
        (rx, tx)
    }
}

#[test]
fn vsock_replies_the_guest_never_takes_are_bounded() {
    // Every packet below earns a reset the guest never makes room for: the
    // device holds at most 256 of them, then takes no more packets until
    // the guest posts receive buffers.
    let mut d = Driver::default();
    let (mut rx, tx) = d.vsock_held_back();
    let held_back = d.s.r16(tx.used_idx());
    // 16 receive buffers: 16 resets out, room for the 16 packets left.
    d.post_vsock_rx(&mut rx, QSIZE);
    d.wait_used(&rx, QSIZE);
    d.wait_used(&tx, 17 * QSIZE);
    let first_op = d.s.r16(RX_BUFFERS + 30);
    let last_op = d.s.r16(RX_BUFFERS + 0xf00 + 30);
    let status = d.status(VSOCK);
    let recovery = recover(&mut d);
    case!("vsock-flood", d, recovery, |seen| {
        assert_eq!(
            seen.get(held_back),
            256,
            "packets taken without room for replies"
        );
        assert_eq!([first_op, last_op].map(|r| seen.get(r)), [3, 3], "resets");
        assert_eq!(seen.get(status), u64::from(RUNNING));
    });
}

#[test]
fn virtio_console_prints_only_whole_chains_and_skips_unusable_input_buffers() {
    let mut d = Driver {
        console: true,
        ..Driver::default()
    };
    let mut rx = Ring::at(CONSOLE_RINGS[0]);
    let mut tx = Ring::at(CONSOLE_RINGS[1]);
    d.negotiate(CONSOLE, VERSION_1);
    d.queue(CONSOLE, 0, &mut rx);
    d.queue(CONSOLE, 1, &mut tx);
    d.driver_ok(CONSOLE);
    // Output (none of it looks like the UART's hex: see `from_uart`).
    let (text, big) = (DATA, DATA + 0x1000);
    d.s.copy(text, b"HVC-OK");
    d.s.fill(big, 1 << 20, b'x');
    let chains: [(u16, &[Buf]); 6] = [
        (0, &[(text, 6, 0)]),                                     // printed
        (3, &[(0x4000_0000, 6, 0)]),                              // past RAM
        (4, &[(big, 1 << 20, 0)]),                                // 64 KiB printed
        (5, &[(text, 6, WRITE)]),                                 // nothing to print
        (6, &[(text, 2, 0), (text, 2, WRITE), (text + 2, 2, 0)]), // misordered
        (9, &[(MEM_END - 3, 6, 0)]),                              // across the end
    ];
    for (head, bufs) in chains {
        d.chain(&tx, head, bufs);
        d.publish(&mut tx, head);
    }
    d.desc(&tx, 1, (text, 6, NEXT), 2); // a loop
    d.desc(&tx, 2, (text, 6, NEXT), 1);
    d.publish(&mut tx, 1);
    d.notify(CONSOLE, 1);
    d.wait_used(&tx, 7);
    let status = d.status(CONSOLE);
    // Input buffers: read-only, past RAM, then a good one, which gets the
    // test's go (kiln's input is the console's, not the UART's).
    let input = RX_BUFFERS;
    d.chain(&rx, 0, &[(input, 16, 0)]);
    d.chain(&rx, 1, &[(0x4000_0000, 16, WRITE)]);
    d.chain(&rx, 2, &[(input + 0x100, 16, WRITE)]);
    for head in 0..3 {
        d.publish(&mut rx, head);
    }
    d.notify(CONSOLE, 0);
    d.s.prompt_only();
    d.wait_used(&rx, 3);
    let rx_lens: Vec<Read> = (0..3).map(|i| d.s.r32(rx.used_elem(i).1)).collect();
    let go = d.s.r8(input + 0x100);
    let recovery = recovery_steps(&mut d);
    case!("console", d, recovery, |seen| {
        assert_eq!(seen.get(status), u64::from(RUNNING));
        let mut printed = b"HVC-OK".to_vec();
        printed.extend(std::iter::repeat_n(b'x', 64 << 10));
        assert!(seen.1 == printed, "console output: {} bytes", seen.1.len());
        let rx_lens: Vec<u64> = rx_lens.iter().map(|&r| seen.get(r)).collect();
        assert_eq!(rx_lens, [0, 0, 1], "input buffers");
        assert_eq!(seen.get(go), u64::from(b'g'));
    });
}

/// What the host end of a guest's vsock connection reads now, without
/// waiting, and whether kiln keeps it open (no end of file yet).
fn host_end_state(mut stream: &UnixStream) -> (Vec<u8>, bool) {
    use std::io::Read as _;
    stream.set_nonblocking(true).expect("non-blocking");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (got, false),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return (got, true),
            Err(e) => panic!("reading a vsock connection: {e}"),
        }
    }
}

#[test]
fn vsock_bad_packets_on_live_connections_reset_them() {
    let mut d = Driver::default();
    let (mut rx, mut tx) = d.vsock_running();
    d.post_vsock_rx(&mut rx, QSIZE);
    // Five connections to host port 2100 (kiln connects each to its
    // listener), then one bad packet on each of the first four.
    d.vsock_listeners = vec![2100];
    let header = |port, len, op| vsock_header(GUEST_CID, 2, port, 2100, len, STREAM, op);
    let mut packets: Vec<(Vec<u8>, u32)> = (1101..=1105)
        .map(|port| (header(port, 0, OP_REQUEST).to_vec(), 44))
        .collect();
    packets.push((header(1101, 0, 99).to_vec(), 44)); // unknown op
    packets.push((header(1102, 0, OP_REQUEST).to_vec(), 44)); // a second request
    packets.push((header(1103, 0, OP_RESPONSE).to_vec(), 44)); // a response
    packets.push((header(1104, 100, OP_RW).to_vec(), 44 + 10)); // len past the chain
    let mut hello = header(1105, 5, OP_RW).to_vec(); // well-formed data
    hello.extend_from_slice(b"hello");
    packets.push((hello, 49));
    for (i, (bytes, len)) in packets.iter().enumerate() {
        let at = PACKETS + 0x100 * i as u64;
        d.s.copy(at, bytes);
        d.chain(&tx, i as u16, &[(at, *len, 0)]);
        d.publish(&mut tx, i as u16);
    }
    d.notify(VSOCK, 1);
    d.wait_used(&tx, packets.len() as u16);
    // kiln closes a reset connection's host end once the turn that reset
    // it is over: after the barrier.
    let mut rng = d.rng_running();
    d.barrier(&mut rng);
    let status = d.status(VSOCK);
    d.at_prompt = Some(|host| {
        // Connections arrive in the order of the guest's requests.
        let states: Vec<(Vec<u8>, bool)> = (0..5)
            .map(|_| host_end_state(&host.listeners[0].accept().expect("accept").0))
            .collect();
        let closed = (Vec::new(), false);
        assert_eq!(
            states,
            [
                closed.clone(),
                closed.clone(),
                closed.clone(),
                closed,
                (b"hello".to_vec(), true)
            ],
            "host ends: what they read, whether kiln keeps them open"
        );
    });
    let recovery = recover(&mut d);
    case!("vsock-live", d, recovery, |seen| {
        assert_eq!(seen.get(status), u64::from(RUNNING));
    });
}

// ---- virtio-net: TX headers with garbage offload fields.

const F_NET_CSUM: u64 = 1 << 0;
const F_NET_HOST_TSO4: u64 = 1 << 11;
const F_NET_HOST_TSO6: u64 = 1 << 12;
const NEEDS_CSUM: u8 = 1;
const DATA_VALID: u8 = 2;
const GSO_TCPV4: u8 = 1;
const GSO_UDP: u8 = 3;
const GSO_ECN: u8 = 0x80;
/// The longest frame virtio-net sends: 64 KiB plus Ethernet and VLAN
/// headers (`MAX_FRAME_LEN` in devices/src/virtio/net).
const NET_MAX_FRAME: usize = 65536 + 14 + 4 + 8;

/// struct virtio_net_hdr_v1, as a TX chain starts.
#[derive(Clone, Copy, Default)]
struct NetHdr {
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
    num_buffers: u16,
}

impl NetHdr {
    fn bytes(self) -> Vec<u8> {
        let mut h = vec![self.flags, self.gso_type];
        for field in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        ] {
            h.extend_from_slice(&field.to_le_bytes());
        }
        h
    }
}

/// Frame number `n`: Ethernet to another host from `FRAME_SOURCE`:n,
/// `len` bytes in all, the payload bytes all `n`.
fn eth_frame(n: u8, len: usize) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1];
    f.extend_from_slice(&FRAME_SOURCE);
    f.push(n);
    f.extend_from_slice(&0x88b5u16.to_be_bytes()); // local experimental
    f.resize(len, n);
    f
}

/// Frame `n` as an IPv4 TCP segment with `payload` bytes (of `n`): what
/// segmentation offload takes. The TCP header starts at 34, its checksum
/// at 34 + 16.
fn tcp_frame(n: u8, payload: usize) -> Vec<u8> {
    let mut f = eth_frame(n, 12);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 20 + payload) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1]);
    f.extend_from_slice(&[0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0]);
    f.extend_from_slice(&[0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    f.resize(f.len() + payload, n);
    f
}

/// A TX chain: its buffers, its frame, and whether the TAP must see that
/// frame (or the device must refuse it).
struct TxChain {
    bufs: Vec<Buf>,
    frame: Vec<u8>,
    sent: bool,
}

impl TxChain {
    /// The chain's one buffer cut to `len` bytes.
    fn cut_to(mut self, len: u32) -> Self {
        self.bufs[0].1 = len;
        self
    }

    /// The frame must reach the TAP.
    fn sent(mut self) -> Self {
        self.sent = true;
        self
    }
}

/// What a net case expects, and the reads that tell what happened.
#[derive(Default)]
struct NetRounds {
    /// The frames the TAP must see, in order.
    sent: Vec<Vec<u8>>,
    /// Each TX chain's used length, and the device status after each round.
    used_lens: Vec<Read>,
    statuses: Vec<Read>,
}

impl Driver {
    /// `hdr` and a frame of `len` bytes at `at` that starts with `head`
    /// (the rest is filled with its number), as one buffer of a chain.
    fn big_packet(&mut self, at: u64, hdr: NetHdr, head: &[u8], len: usize) -> TxChain {
        let chain = self.tx_packet(at, hdr, head);
        let rest = at + u64::from(chain.bufs[0].1);
        self.s.fill(rest, (len - head.len()) as u32, head[11]);
        chain.cut_to((12 + len) as u32)
    }

    /// `hdr` and `frame` at `at`, as one buffer of a chain.
    fn tx_packet(&mut self, at: u64, hdr: NetHdr, frame: &[u8]) -> TxChain {
        let mut bytes = hdr.bytes();
        bytes.extend_from_slice(frame);
        self.s.copy(at, &bytes);
        TxChain {
            bufs: vec![(at, bytes.len() as u32, 0)],
            frame: frame.to_vec(),
            sent: false,
        }
    }

    /// One round: the net device reset and running with `features` (both
    /// queues ready), `chains` published from descriptor 0 on and notified;
    /// waits until the device used them all, then reads each used length
    /// and the device status into `rounds`.
    fn transmit(&mut self, rounds: &mut NetRounds, features: u64, chains: Vec<TxChain>) {
        let (mut rx, mut tx) = (Ring::at(NET_RINGS[0]), Ring::at(NET_RINGS[1]));
        self.negotiate(NET, VERSION_1 | features);
        self.queue(NET, 0, &mut rx);
        self.queue(NET, 1, &mut tx);
        self.driver_ok(NET);
        let mut first = 0;
        for chain in &chains {
            self.chain(&tx, first, &chain.bufs);
            self.publish(&mut tx, first);
            first += chain.bufs.len() as u16;
        }
        self.notify(NET, 1);
        self.wait_used(&tx, tx.next_avail);
        let lens = (0..tx.next_avail).map(|i| self.s.r32(tx.used_elem(i).1));
        rounds.used_lens.extend(lens.collect::<Vec<_>>());
        rounds.statuses.push(self.status(NET));
        let sent = chains.into_iter().filter(|c| c.sent);
        rounds.sent.extend(sent.map(|c| c.frame));
    }
}

/// `base` changed by `change`.
fn hdr(base: NetHdr, change: impl FnOnce(&mut NetHdr)) -> NetHdr {
    let mut h = base;
    change(&mut h);
    h
}

/// Packet slots in guest memory: 4 KiB each, and two past 64 KiB.
fn packet_slot(i: u64) -> u64 {
    PACKETS + 0x1000 * i
}
const BIG_PACKETS: [u64; 2] = [0x90_0000, 0xa0_0000];

#[test]
fn net_tx_headers_with_garbage_offload_fields() {
    let mut d = Driver {
        tap: true,
        ..Driver::default()
    };
    let plain = NetHdr::default();
    let csum = NetHdr {
        flags: NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        ..plain
    };
    let tso = NetHdr {
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1000,
        ..csum
    };
    let mut rounds = NetRounds::default();

    // 1. No offloads negotiated.
    let mut chains = vec![
        d.tx_packet(packet_slot(0), plain, &eth_frame(1, 60)).sent(),
        // NEEDS_CSUM without CSUM (and GSO, which needs it).
        d.tx_packet(packet_slot(1), csum, &tcp_frame(2, 100)),
        d.tx_packet(packet_slot(2), tso, &tcp_frame(3, 3000)),
        // A flag the spec lacks.
        d.tx_packet(
            packet_slot(3),
            hdr(plain, |h| h.flags = 0x80),
            &eth_frame(4, 60),
        ),
        // DATA_VALID (a receive flag), num_buffers (a receive field), and
        // checksum fields without NEEDS_CSUM: ignored, the frame is sent.
        d.tx_packet(
            packet_slot(4),
            hdr(plain, |h| {
                h.flags = DATA_VALID;
                (h.csum_start, h.csum_offset, h.num_buffers) = (0xffff, 0xffff, 0xffff);
            }),
            &eth_frame(5, 60),
        )
        .sent(),
        // hdr_len past the frame.
        d.tx_packet(
            packet_slot(5),
            hdr(plain, |h| h.hdr_len = 0xffff),
            &eth_frame(6, 60),
        ),
        // A chain shorter than the header, and one shorter than an
        // Ethernet header after it.
        d.tx_packet(packet_slot(6), plain, &[]).cut_to(8),
        d.tx_packet(packet_slot(7), plain, &eth_frame(8, 13)),
    ];
    // The header split across descriptors (5 + 7 bytes, then the frame in
    // two): the frame goes out whole.
    let (at, split) = (packet_slot(8), eth_frame(9, 200));
    d.s.copy(at, &plain.bytes());
    d.s.copy(at + 0x100, &split);
    chains.push(TxChain {
        bufs: vec![
            (at, 5, 0),
            (at + 5, 7, 0),
            (at + 0x100, 20, 0),
            (at + 0x114, 180, 0),
        ],
        frame: split,
        sent: true,
    });
    // A frame one byte over the longest.
    chains.push(d.big_packet(BIG_PACKETS[0], plain, &eth_frame(10, 14), NET_MAX_FRAME + 1));
    d.transmit(&mut rounds, 0, chains);

    // 2. Checksum offload only: GSO was not negotiated.
    let chains = vec![
        d.tx_packet(packet_slot(0), csum, &tcp_frame(11, 100))
            .sent(),
        d.tx_packet(packet_slot(1), tso, &tcp_frame(12, 3000)),
    ];
    d.transmit(&mut rounds, F_NET_CSUM, chains);

    // 3. Checksum and TCP segmentation offload (not ECN, not UDP).
    let mut chains = vec![
        d.tx_packet(packet_slot(0), tso, &tcp_frame(21, 3000))
            .sent(),
        d.tx_packet(packet_slot(1), csum, &tcp_frame(22, 100))
            .sent(),
    ];
    let bad = [
        // The ECN bit, unknown and UDP GSO types, GSO without NEEDS_CSUM.
        hdr(tso, |h| h.gso_type |= GSO_ECN),
        hdr(tso, |h| h.gso_type = 0x42),
        hdr(tso, |h| h.gso_type = GSO_UDP),
        hdr(tso, |h| h.flags = 0),
        // gso_size 0, hdr_len past the frame.
        hdr(tso, |h| h.gso_size = 0),
        hdr(tso, |h| h.hdr_len = 0xffff),
        // csum_start or csum_offset past the frame, and both near u16::MAX
        // (their sum overflows 16 bits).
        hdr(csum, |h| h.csum_start = 3100),
        hdr(csum, |h| h.csum_offset = 3100),
        hdr(csum, |h| (h.csum_start, h.csum_offset) = (0xfff0, 0xfff0)),
    ];
    for (i, bad) in bad.into_iter().enumerate() {
        let n = 23 + i as u8;
        chains.push(d.tx_packet(packet_slot(2 + i as u64), bad, &tcp_frame(n, 3000)));
    }
    // A GSO frame one byte over the longest.
    chains.push(d.big_packet(BIG_PACKETS[1], tso, &tcp_frame(32, 0), NET_MAX_FRAME + 1));
    d.transmit(
        &mut rounds,
        F_NET_CSUM | F_NET_HOST_TSO4 | F_NET_HOST_TSO6,
        chains,
    );

    // 4. After all that (and a reset), a plain frame goes out.
    let chains = vec![d
        .tx_packet(packet_slot(0), plain, &eth_frame(40, 60))
        .sent()];
    d.transmit(&mut rounds, 0, chains);
    d.reset(NET);

    let recovery = recover(&mut d);
    case!("net-tx", d, recovery, |seen| {
        let lens: Vec<u64> = rounds.used_lens.iter().map(|&r| seen.get(r)).collect();
        assert_eq!(
            lens,
            vec![0; 25],
            "TX chains come back with nothing written"
        );
        let statuses: Vec<u64> = rounds.statuses.iter().map(|&r| seen.get(r)).collect();
        assert_eq!(
            statuses,
            [u64::from(RUNNING); 4],
            "net status after each round"
        );
        let numbers = |frames: &[Vec<u8>]| frames.iter().map(|f| f[11]).collect::<Vec<u8>>();
        assert_eq!(
            numbers(&seen.2),
            [1, 5, 9, 11, 21, 22, 40],
            "the frames that reached the TAP (by number)"
        );
        assert!(
            seen.2 == rounds.sent,
            "the frames reached the TAP unchanged"
        );
    });
}

// ---- vsock credit.

/// A guest packet on the host-initiated connection of the credit case:
/// guest port `CREDIT_GUEST_PORT` to kiln's first host-side port, with the
/// guest's `buf_alloc` and `fwd_cnt`.
fn credit_packet(op: u16, buf_alloc: u32, fwd_cnt: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut p = vsock_header(
        GUEST_CID,
        2,
        CREDIT_GUEST_PORT,
        KILN_FIRST_PORT,
        len,
        STREAM,
        op,
    )
    .to_vec();
    p[36..40].copy_from_slice(&buf_alloc.to_le_bytes());
    p[40..44].copy_from_slice(&fwd_cnt.to_le_bytes());
    p.extend_from_slice(payload);
    p
}

/// The guest port the host connects to, and the first port kiln gives a
/// host-initiated connection (`FIRST_LOCAL_PORT` in devices/src/virtio/vsock).
const CREDIT_GUEST_PORT: u32 = 1201;
const KILN_FIRST_PORT: u32 = 1 << 30;
/// Payload room in each of the case's 256-byte receive buffers.
const RX_ROOM: u32 = 0x100 - 44;

/// The bytes the host sends the guest: byte `i` is `i % 251`.
fn host_data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

impl Driver {
    /// Sends `packets` (at most a ring's worth) on vsock's `tx` and waits
    /// until the device took them all.
    fn vsock_send(&mut self, tx: &mut Ring, packets: &[Vec<u8>]) {
        for packet in packets {
            let slot = tx.next_avail % QSIZE;
            let at = PACKETS + 0x100 * u64::from(slot);
            self.s.copy(at, packet);
            self.chain(tx, slot, &[(at, packet.len() as u32, 0)]);
            self.publish(tx, slot);
        }
        self.notify(VSOCK, 1);
        self.wait_used(tx, tx.next_avail);
    }

    /// Posts `n` receive buffers of 256 bytes on vsock's `rx`.
    fn vsock_rx_buffers(&mut self, rx: &mut Ring, n: u16) {
        for _ in 0..n {
            let slot = rx.next_avail % QSIZE;
            let buf = (RX_BUFFERS + 0x100 * u64::from(slot), 0x100, WRITE);
            self.chain(rx, slot, &[buf]);
            self.publish(rx, slot);
        }
        self.notify(VSOCK, 0);
    }

    /// Receive packet `i` (its place in the used ring): (op, used length,
    /// first payload byte).
    fn vsock_received(&mut self, rx: &Ring, i: u16) -> [Read; 3] {
        let buf = RX_BUFFERS + 0x100 * u64::from(i % QSIZE);
        [
            self.s.r16(buf + 30),
            self.s.r32(rx.used_elem(i).1),
            self.s.r8(buf + 44),
        ]
    }
}

#[test]
fn vsock_credit_that_overflows_wraps_or_storms() {
    let mut d = Driver::default();
    // The host connects to guest port 1201 (after this first read) and has
    // 32 KiB for it at once.
    let cid = d.s.r32(VSOCK + CONFIG);
    d.vsock_connects = vec![(CREDIT_GUEST_PORT, host_data(32 << 10))];
    let (mut rx, mut tx) = d.vsock_running();
    let mut rng = d.rng_running();
    // Reads of (op, length, first payload byte) of each packet received,
    // and of how many were received after each step (behind a barrier).
    let mut received = Vec::new();
    let mut counts = Vec::new();
    let mut step = |d: &mut Driver, rx: &Ring, rng: &mut Ring, upto: u16| {
        d.wait_used(rx, upto);
        d.barrier(rng);
        counts.push(d.s.r16(rx.used_idx()));
        let from = received.len() as u16;
        received.extend((from..upto).map(|i| d.vsock_received(rx, i)));
    };
    // Kiln's REQUEST; the guest accepts with room for 100 bytes: one
    // packet of 100, though three more buffers wait.
    d.vsock_rx_buffers(&mut rx, 4);
    step(&mut d, &rx, &mut rng, 1);
    let request_ports = [16, 20].map(|at| d.s.r32(RX_BUFFERS + at));
    d.vsock_send(&mut tx, &[credit_packet(OP_RESPONSE, 100, 0, &[])]);
    step(&mut d, &rx, &mut rng, 2);
    // It consumed 50: 50 more.
    d.vsock_send(&mut tx, &[credit_packet(OP_CREDIT_UPDATE, 100, 50, &[])]);
    step(&mut d, &rx, &mut rng, 3);
    // fwd_cnt going backwards, then past what was ever sent (the
    // difference wraps): no credit, though 13 buffers wait.
    d.vsock_rx_buffers(&mut rx, 12);
    d.vsock_send(
        &mut tx,
        &[
            credit_packet(OP_CREDIT_UPDATE, 100, 10, &[]),
            credit_packet(OP_CREDIT_UPDATE, 100, 1000, &[]),
        ],
    );
    step(&mut d, &rx, &mut rng, 3);
    // buf_alloc u32::MAX and fwd_cnt behind 0 (wrapped): credit near
    // u32::MAX, one buffer's worth per buffer, the data in order.
    d.vsock_send(
        &mut tx,
        &[credit_packet(
            OP_CREDIT_UPDATE,
            u32::MAX,
            u32::MAX - 15,
            &[],
        )],
    );
    step(&mut d, &rx, &mut rng, 16);
    // 64 credit requests with no room (buf_alloc 0) and fwd_cnt all over
    // u32: one credit update answers them all.
    let fwd_cnts = [0, u32::MAX, 1 << 31, 150, 7, u32::MAX - 149, 1 << 30, 3];
    for op in [OP_CREDIT_REQUEST, OP_CREDIT_UPDATE] {
        for _ in 0..4 {
            let storm: Vec<Vec<u8>> = (0..QSIZE)
                .map(|i| credit_packet(op, 0, fwd_cnts[usize::from(i) % 8], &[]))
                .collect();
            d.vsock_send(&mut tx, &storm);
        }
        if op == OP_CREDIT_REQUEST {
            d.vsock_rx_buffers(&mut rx, 4);
        }
        // 64 credit updates: no answer.
        step(&mut d, &rx, &mut rng, 17);
    }
    // The connection still works both ways: the guest's data reaches the
    // host, and room for 4096 more bytes brings 3 more packets (3 buffers).
    d.vsock_send(&mut tx, &[credit_packet(OP_RW, 0, 0, b"hello")]);
    let sent = 100 + 50 + 13 * RX_ROOM;
    d.vsock_send(&mut tx, &[credit_packet(OP_CREDIT_UPDATE, 4096, sent, &[])]);
    step(&mut d, &rx, &mut rng, 20);
    let status = d.status(VSOCK);
    d.at_prompt = Some(|host| {
        let port = format!("OK {KILN_FIRST_PORT}\n");
        let expect = ([port.as_bytes(), b"hello"].concat(), true);
        assert_eq!(
            host_end_state(&host.connected[0]),
            expect,
            "the host end: what it read, whether kiln keeps it open"
        );
    });
    let recovery = recover(&mut d);
    case!("vsock-credit", d, recovery, |seen| {
        assert_eq!(seen.get(cid), GUEST_CID);
        assert_eq!(
            request_ports.map(|r| seen.get(r)),
            [KILN_FIRST_PORT, CREDIT_GUEST_PORT].map(u64::from),
            "the request's ports"
        );
        let counts: Vec<u64> = counts.iter().map(|&r| seen.get(r)).collect();
        assert_eq!(
            counts,
            [1, 2, 3, 3, 16, 17, 17, 20],
            "packets received after each step"
        );
        let received: Vec<[u64; 3]> = received.iter().map(|r| r.map(|r| seen.get(r))).collect();
        let data = host_data(32 << 10);
        let rw = |offset: u32, len: u32| {
            [
                u64::from(OP_RW),
                44 + u64::from(len),
                u64::from(data[offset as usize]),
            ]
        };
        let mut expect = vec![[u64::from(OP_REQUEST), 44, 0], rw(0, 100), rw(100, 50)];
        expect.extend((0..13).map(|k| rw(150 + k * RX_ROOM, RX_ROOM)));
        expect.push([u64::from(OP_CREDIT_UPDATE), 44, 0]);
        expect.extend((0..3).map(|k| rw(sent + k * RX_ROOM, RX_ROOM)));
        assert_eq!(
            received, expect,
            "packets received: op, length, first payload byte"
        );
        assert_eq!(seen.get(status), u64::from(RUNNING));
    });
}

#[test]
fn the_deadline_ends_a_vm_whose_event_thread_is_kept_busy() {
    // A queue that never empties (vsock's TX, held back: 256 resets wait
    // for receive buffers that never come) and one whose avail index is
    // far ahead of its ring (rng's: it yields no chain, and must not make
    // the device look again forever), notified without end: each notify
    // wakes the event thread, which finds the queue as before. The VM's
    // deadline must still end the run (a hang is caught by
    // common::HANG_LIMIT).
    if !require(have_kvm(), "/dev/kvm not accessible") {
        return;
    }
    let _one = one_case();
    let mut d = Driver::default();
    let (_, tx) = d.vsock_held_back();
    // Printed first: how many packets vsock took.
    d.s.r16(tx.used_idx());
    d.s.prompt_only();
    d.s.w16(Ring::at(RNG_RING).avail() + 2, 1000);
    for _ in 0..8 {
        d.s.w32_times(RNG + REG_QUEUE_NOTIFY, 0, u32::MAX);
        d.s.w32_times(VSOCK + REG_QUEUE_NOTIFY, 1, u32::MAX);
    }
    d.s.end(0);
    let dir = Scratch::new("hostile-deadline");
    let (mut config, _, _) = case_config(&dir, &d);
    // Long enough for the set-up before the storm (a fraction of a second).
    config.timeout = Some(std::time::Duration::from_secs(10));
    let (report, out) = common::run_to_end(&config);
    let out = String::from_utf8_lossy(&out);
    assert_eq!(report.outcome, VmOutcome::Timeout, "console {out:?}");
    assert_eq!(
        out, "0000000000000100\n?\n",
        "256 packets held back, then the storm"
    );
}

/// Where the snapshot case's vsock event buffer is.
const EVENT_BUFFER: u64 = 0x90_0000;

/// A guest driving rng and vsock (its read-only disk idle) is saved while
/// it waits at its prompt, and restored into a fresh VM: the restored
/// devices go on from their saved queue indices (the chains rng returned
/// before are not served again: a mark the guest put in used entry 0
/// before the snapshot stays, and its next request is used entry 3), and
/// vsock reports a transport reset (event id 0) in the event buffer the
/// guest had posted before the snapshot, where the booted VM left it.
#[test]
fn driven_devices_go_on_from_their_saved_queues_after_a_restore() {
    use kiln::snapshot;
    if !require(have_kvm(), "/dev/kvm not accessible") {
        return;
    }
    let _one = one_case();
    let mut d = Driver::default();
    let mut rng = d.rng_running();
    d.barrier(&mut rng);
    d.barrier(&mut rng);
    d.vsock_running();
    let mut events = Ring::at(VSOCK_RINGS[2]);
    d.s.fill(EVENT_BUFFER, 4, 0xff);
    d.chain(&events, 0, &[(EVENT_BUFFER, 4, WRITE)]);
    d.publish(&mut events, 0);
    d.notify(VSOCK, 2);
    d.barrier(&mut rng); // vsock's notify taken, as the barrier says
    let booted_events = d.s.r16(events.used_idx());
    d.s.w32(rng.used_elem(0).1, 0xdead);
    d.s.prompt();
    // Restored from here on.
    d.barrier(&mut rng);
    let mark = d.s.r32(rng.used_elem(0).1);
    let (fourth_id, fourth_len) = rng.used_elem(3);
    let (fourth_id, fourth_len) = (d.s.r32(fourth_id), d.s.r32(fourth_len));
    d.wait_used(&events, 1);
    let event = d.s.r32(EVENT_BUFFER);
    d.s.end(0);

    let dir = Scratch::new("hostile-snapshot");
    let (mut config, _disk, _image) = case_config(&dir, &d);
    // A writable disk cannot be snapshotted.
    config.disks[0].read_only = true;
    config.timeout = Some(common::HANG_LIMIT / 2);
    let console = || {
        let capture = Capture::default();
        let (input, go) = common::pipe();
        let io = ConsoleIo {
            output: Box::new(capture.clone()),
            input: Some(input),
        };
        (io, capture, go)
    };
    let (io, booted, _go) = console();
    let vm = kiln::spawn(config, io, Instant::now()).expect("spawning the VM");
    assert!(
        booted.wait_for(b"?\n", common::HANG_LIMIT),
        "no prompt: {:?}",
        String::from_utf8_lossy(&booted.bytes())
    );
    let snap = dir.path("snap");
    snapshot::save(&vm, &snap).expect("saving the VM");
    vm.stop();
    vm.wait().unwrap();

    let (io, restored, mut go) = console();
    let vm = snapshot::restore(&snap, io, Instant::now()).expect("restoring");
    go.write_all(b"g").unwrap();
    assert!(wait_finished(&vm), "the restored VM did not end");
    let report = vm.wait().expect("the restored VM's report");
    let text = String::from_utf8_lossy(&[booted.bytes(), restored.bytes()].concat()).into_owned();
    assert_eq!(report.outcome, VmOutcome::Exited(0), "{text:?}");
    let values: Vec<u64> = text
        .lines()
        .filter(|&l| l != "?")
        .map(|l| u64::from_str_radix(l, 16).unwrap_or_else(|_| panic!("line {l:?}")))
        .collect();
    assert_eq!(values.len(), d.s.reads, "{text:?}");
    let seen = Seen(values, Vec::new(), Vec::new());
    assert_eq!(seen.get(booted_events), 0, "an event before the snapshot");
    assert_eq!(seen.get(mark), 0xdead, "rng served its old chains again");
    assert_eq!(
        (seen.get(fourth_id), seen.get(fourth_len)),
        (3, 16),
        "rng's request after the restore"
    );
    assert_eq!(seen.get(event), 0, "no transport reset event");
}
