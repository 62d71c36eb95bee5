//! virtio-net without a VM: guest memory, hand-built split queues, a
//! datagram socket pair standing in for the TAP, and a real event manager.

use std::os::fd::RawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use proptest::prelude::*;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use super::*;
use crate::irq::IrqLine;
use crate::rate_limiter::test_clock::ManualClock;
use crate::rate_limiter::{RateLimit, RateLimiter, Throttle};
use crate::virtio::counters::Counters;
use crate::virtio::Interrupt;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM_SIZE: usize = 4 << 20;
const RXQ_BASE: u64 = 0x1_0000;
const TXQ_BASE: u64 = 0x2_0000;
const QSIZE: u16 = 16;

/// The device's end of a socket pair; records the offloads it was given.
struct SockBackend {
    sock: UnixDatagram,
    offload: Arc<Mutex<Option<u32>>>,
}

impl Read for SockBackend {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.recv(buf)
    }
}

impl Write for SockBackend {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.send(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for SockBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl NetBackend for SockBackend {
    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()> {
        *self.offload.lock().unwrap() = Some(tun_flags);
        Ok(())
    }
}

/// The driver side of one split queue of `size` entries, laid out at `base`.
struct DriverQueue {
    base: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        // Zero the rings (flags, idx, event fields).
        mem.write_slice(&[0u8; 0x4000], GuestAddress(base)).unwrap();
        Self {
            base,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }
    fn desc_addr(&self) -> u64 {
        self.base
    }
    fn avail_addr(&self) -> u64 {
        self.base + 16 * u64::from(self.size)
    }
    fn used_addr(&self) -> u64 {
        // After the avail ring (flags, idx, ring, used_event), 2 KiB aligned.
        (self.avail_addr() + 6 + 2 * u64::from(self.size)).next_multiple_of(0x800)
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (l, h) = split(self.desc_addr());
        q.set_desc_table_address(l, h);
        let (l, h) = split(self.avail_addr());
        q.set_avail_ring_address(l, h);
        let (l, h) = split(self.used_addr());
        q.set_used_ring_address(l, h);
        q.set_ready(true);
        q
    }

    /// Writes raw descriptors (addr, len, flags, next) at the next free
    /// table slots and publishes the first as a chain head.
    fn add_raw(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let head = self.next_desc % self.size;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let at = GuestAddress(self.desc_addr() + 16 * u64::from(idx));
            mem.write_obj(addr.to_le(), at).unwrap();
            mem.write_obj(len.to_le(), at.unchecked_add(8)).unwrap();
            mem.write_obj(flags.to_le(), at.unchecked_add(12)).unwrap();
            mem.write_obj(next.to_le(), at.unchecked_add(14)).unwrap();
        }
        self.next_desc = self.next_desc.wrapping_add(descs.len() as u16);
        self.publish(mem, head);
        head
    }

    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(self.avail_addr() + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx.to_le(), GuestAddress(self.avail_addr() + 2))
            .unwrap();
    }

    /// A well-formed chain of buffers (addr, len), all readable or all writable.
    fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32)], writable: bool) -> u16 {
        let start = self.next_desc;
        let descs: Vec<_> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len))| {
                let last = i + 1 == bufs.len();
                let mut flags = if writable {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = (start + i as u16 + 1) % self.size;
                (addr, len, flags, if last { 0 } else { next })
            })
            .collect();
        self.add_raw(mem, &descs)
    }

    /// Used elements published since the last call: (id, len).
    fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used_addr() + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.size);
            let at = GuestAddress(self.used_addr() + 4 + 8 * slot);
            let id: u32 = mem.read_obj(at).unwrap();
            let len: u32 = mem.read_obj(at.unchecked_add(4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

type Dev = Arc<Mutex<Net<SockBackend>>>;

struct Harness {
    mem: GuestMemoryMmap,
    em: EventManager<Dev>,
    net: Dev,
    peer: UnixDatagram,
    offload: Arc<Mutex<Option<u32>>>,
    irq: EventFd,
    rx: DriverQueue,
    tx: DriverQueue,
}

impl Harness {
    fn new() -> Self {
        Self::with_rings(QSIZE)
    }

    /// Both queues with `size` entries.
    fn with_rings(size: u16) -> Self {
        Self::with_device(size, |net| net)
    }

    /// Both directions limited by `limit` on the test's clock.
    fn with_limit(limit: &RateLimit, clock: &ManualClock) -> Self {
        let throttle = || {
            let limiter = RateLimiter::with_clock(limit, clock.clock());
            Throttle::with_limiter(limiter).unwrap()
        };
        Self::with_device(QSIZE, |net| net.with_throttles(throttle(), throttle()))
    }

    /// `size`-entry rings and the device as `adjust` makes it.
    fn with_device(size: u16, adjust: impl FnOnce(Net<SockBackend>) -> Net<SockBackend>) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let offload = Arc::new(Mutex::new(None));
        let backend = SockBackend {
            sock: a,
            offload: offload.clone(),
        };
        let net = Arc::new(Mutex::new(adjust(
            Net::new(backend, "test0", MacAddr::derived("test0")).unwrap(),
        )));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(net.clone());
        let rx = DriverQueue::new(&mem, RXQ_BASE, size);
        let tx = DriverQueue::new(&mem, TXQ_BASE, size);
        Self {
            mem,
            em,
            net,
            peer: b,
            offload,
            irq: EventFd::new(EFD_NONBLOCK).unwrap(),
            rx,
            tx,
        }
    }

    fn activate(&mut self, features: u64) {
        let line = IrqLine::new().unwrap();
        self.irq = line.eventfd().try_clone().unwrap();
        let mut rxq = self.rx.queue();
        let mut txq = self.tx.queue();
        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        rxq.set_event_idx(event_idx);
        txq.set_event_idx(event_idx);
        let activation = Activation {
            mem: self.mem.clone(),
            queues: vec![rxq, txq],
            interrupt: Interrupt::new(line),
            features,
        };
        self.net.lock().unwrap().activate(activation).unwrap();
        self.run();
    }

    /// Runs the event loop until nothing is pending; returns the number of
    /// events dispatched.
    fn run(&mut self) -> usize {
        let mut total = 0;
        for _ in 0..100 {
            let n = self.em.run_with_timeout(0).unwrap();
            if n == 0 {
                return total;
            }
            total += n;
        }
        panic!("the device keeps the event loop busy (spinning)");
    }

    fn kick_rx(&mut self) {
        self.net.lock().unwrap().queue_events()[0].write(1).unwrap();
    }

    fn kick_tx(&mut self) {
        self.net.lock().unwrap().queue_events()[1].write(1).unwrap();
    }

    fn irq_raised(&self) -> bool {
        self.irq.read().is_ok()
    }

    fn stats(&self) -> Arc<NetCounters> {
        self.net.lock().unwrap().counters.clone()
    }

    fn peer_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 1 << 17];
        match self.peer.recv(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Some(buf)
            }
            Err(_) => None,
        }
    }
}

const ALL: u64 = NET_FEATURES;

fn hdr(flags: u8, gso: u8) -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = flags;
    h[1] = gso;
    h
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn identity_config_space_and_mac() {
    let h = Harness::new();
    let net = h.net.lock().unwrap();
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes().len(), 2);
    assert_ne!(net.features() & VIRTIO_F_VERSION_1, 0);
    let mac = MacAddr::derived("test0");
    assert_eq!(mac.0[0], 0x02, "locally administered unicast");
    assert_eq!(mac, MacAddr::derived("test0"));
    assert_ne!(mac, MacAddr::derived("test1"));
    let mut cfg = [0xffu8; 8];
    net.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &mac.0);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    let mut tail = [0xffu8; 4];
    net.read_config(6, &mut tail);
    assert_eq!(tail, [1, 0, 1, 0]);
    net.read_config(u64::MAX, &mut tail);
    assert_eq!(tail, [0; 4]);
    assert_eq!(
        net.features() & bit(vn::VIRTIO_NET_F_MTU),
        0,
        "no MTU unless known"
    );
}

/// A restored copy's new MAC goes into the saved config space where the
/// driver reads it (bytes 0-5), leaving link status and MTU as saved; a
/// config space too short for a MAC is left for the restore to refuse.
#[test]
fn a_new_mac_replaces_the_saved_one_in_the_config_space() {
    let net = device_with_mtu(1500);
    let mut saved = vec![0; net.virtio().config_len()];
    net.read_config(0, &mut saved);
    let mut config = saved.clone();
    let mac = MacAddr([2, 0, 0, 0, 0, 0x0a]);
    super::set_config_mac(&mut config, mac);
    assert_eq!(&config[..6], &mac.0);
    assert_eq!(config[6..], saved[6..], "link status and MTU as saved");
    let mut short = vec![7; 5];
    super::set_config_mac(&mut short, mac);
    assert_eq!(short, [7; 5]);
}

/// A device on a socket of its own that offers `mtu`.
fn device_with_mtu(mtu: u16) -> Net<SockBackend> {
    let (a, _b) = UnixDatagram::pair().unwrap();
    let backend = SockBackend {
        sock: a,
        offload: Arc::default(),
    };
    let net = Net::new(backend, "m", MacAddr::derived("m")).unwrap();
    net.with_mtu(mtu)
}

#[test]
fn mtu_is_offered_when_known() {
    let net = device_with_mtu(9000);
    assert_ne!(net.features() & bit(vn::VIRTIO_NET_F_MTU), 0);
    let mut cfg = [0u8; 2];
    net.read_config(10, &mut cfg);
    assert_eq!(u16::from_le_bytes(cfg), 9000);
    let net = net.with_mtu(u16::MAX);
    net.read_config(10, &mut cfg);
    assert_eq!(u16::from_le_bytes(cfg), MAX_MTU);
    let s = (&NetCounters::default() as &dyn Counters).to_string();
    assert!(
        s.starts_with("rx_frames=0 ") && s.ends_with(" tx_errors=0"),
        "{s}"
    );
}

#[test]
fn mac_parsing() {
    let m = MacAddr::parse("02:AB:cd:00:11:22").unwrap();
    assert_eq!(m.0, [2, 0xab, 0xcd, 0, 0x11, 0x22]);
    assert_eq!(m.to_string(), "02:ab:cd:00:11:22");
    assert_eq!(MacAddr::parse("02-00-00-00-00-01").unwrap().0[5], 1);
    for bad in [
        "",
        "02:00:00:00:00",
        "02:00:00:00:00:00:00",
        "0g:00:00:00:00:01",
        "002:00:00:00:00:01",
        "01:00:5e:00:00:01",
        "00:00:00:00:00:00",
        "02:00:00:00:00:+1",
    ] {
        assert!(MacAddr::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn offloads_follow_negotiation() {
    let mut h = Harness::new();
    h.activate(ALL);
    assert_eq!(
        *h.offload.lock().unwrap(),
        Some(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
    );
    h.net.lock().unwrap().reset();
    assert_eq!(*h.offload.lock().unwrap(), Some(0));
    h.activate(VIRTIO_F_VERSION_1 | bit(vn::VIRTIO_NET_F_GUEST_TSO4));
    assert_eq!(
        *h.offload.lock().unwrap(),
        Some(0),
        "TSO without checksum is not enabled"
    );
}

#[test]
fn tx_gathers_a_split_frame() {
    let mut h = Harness::new();
    h.activate(ALL);
    let f = frame(1500, 7);
    let mut bytes = hdr(HDR_F_NEEDS_CSUM, GSO_NONE).to_vec();
    bytes.extend_from_slice(&f);
    // Header and frame split across three descriptors, one of them empty.
    h.mem
        .write_slice(&bytes[..5], GuestAddress(0x10_0000))
        .unwrap();
    h.mem
        .write_slice(&bytes[5..], GuestAddress(0x20_0000))
        .unwrap();
    let head = h.tx.add_chain(
        &h.mem,
        &[
            (0x10_0000, 5),
            (0x30_0000, 0),
            (0x20_0000, bytes.len() as u32 - 5),
        ],
        false,
    );
    h.kick_tx();
    h.run();
    assert_eq!(h.peer_recv().unwrap(), bytes);
    assert_eq!(h.tx.take_used(&h.mem), vec![(u32::from(head), 0)]);
    assert!(h.irq_raised());
    let s = h.stats();
    assert_eq!(
        (s.tx_frames.get(), s.tx_bytes.get(), s.tx_malformed.get()),
        (1, 1500, 0)
    );
    assert_eq!((s.tx_csum.get(), s.tx_max_frame.get()), (1, 1500));
}

/// A TCPv4 segmentation header as Linux sends it: the TCP header at 34,
/// its checksum at 34 + 16, 1448-byte segments.
fn tso4_hdr() -> [u8; VNET_HDR_LEN] {
    let mut h = hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4);
    for (at, value) in [(2, 54u16), (4, 1448), (6, 34), (8, 16)] {
        h[at..at + 2].copy_from_slice(&value.to_le_bytes());
    }
    h
}

#[test]
fn tx_gso_frame_passes_with_negotiated_tso() {
    let mut h = Harness::new();
    h.activate(ALL);
    let mut bytes = tso4_hdr().to_vec();
    bytes.extend_from_slice(&frame(60_000, 1));
    h.mem.write_slice(&bytes, GuestAddress(0x10_0000)).unwrap();
    h.tx.add_chain(&h.mem, &[(0x10_0000, bytes.len() as u32)], false);
    h.kick_tx();
    h.run();
    assert_eq!(h.peer_recv().unwrap().len(), bytes.len());
    assert_eq!(h.stats().tx_gso.get(), 1);
}

#[test]
fn hostile_tx_chains_are_completed_and_never_sent() {
    let mut h = Harness::new();
    // Without HOST_TSO4 a TSO header is malformed.
    h.activate(VIRTIO_F_VERSION_1 | bit(vn::VIRTIO_NET_F_CSUM));
    let mut good = hdr(0, GSO_NONE).to_vec();
    good.extend_from_slice(&frame(100, 3));
    h.mem.write_slice(&good, GuestAddress(0x10_0000)).unwrap();
    let mut gso = hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4).to_vec();
    gso.extend_from_slice(&frame(100, 3));
    h.mem.write_slice(&gso, GuestAddress(0x11_0000)).unwrap();
    let mut bad_flags = hdr(0x80, GSO_NONE).to_vec();
    bad_flags.extend_from_slice(&frame(100, 3));
    h.mem
        .write_slice(&bad_flags, GuestAddress(0x12_0000))
        .unwrap();
    let w = VRING_DESC_F_WRITE as u16;
    let n = VRING_DESC_F_NEXT as u16;
    let len = good.len() as u32;
    let mem_end = MEM_SIZE as u64;
    let heads = [
        // A device-writable descriptor in a TX chain.
        h.tx.add_raw(&h.mem, &[(0x10_0000, len, w, 0)]),
        // Header only, no frame; and a frame shorter than an Ethernet header.
        h.tx.add_chain(&h.mem, &[(0x10_0000, 12)], false),
        h.tx.add_chain(&h.mem, &[(0x10_0000, 20)], false),
        // Longer than 64 KiB + header.
        h.tx.add_chain(&h.mem, &[(0x10_0000, MAX_TX_CHAIN_LEN as u32 + 1)], false),
        // Huge length, and a buffer past the end of guest memory.
        h.tx.add_chain(&h.mem, &[(0x10_0000, u32::MAX)], false),
        h.tx.add_chain(&h.mem, &[(mem_end - 8, 64)], false),
        // A descriptor that points to itself.
        h.tx.add_raw(&h.mem, &[(0x10_0000, len, n, 6)]),
        // Offloads that were not negotiated, unknown header flags.
        h.tx.add_chain(&h.mem, &[(0x11_0000, gso.len() as u32)], false),
        h.tx.add_chain(&h.mem, &[(0x12_0000, bad_flags.len() as u32)], false),
        // Finally a good one.
        h.tx.add_chain(&h.mem, &[(0x10_0000, len)], false),
    ];
    assert_eq!(heads[6], 6);
    h.kick_tx();
    h.run();
    let used = h.tx.take_used(&h.mem);
    let expected: Vec<(u32, u32)> = heads.iter().map(|&h| (u32::from(h), 0)).collect();
    assert_eq!(used, expected);
    assert_eq!(h.peer_recv().unwrap(), good);
    assert!(h.peer_recv().is_none(), "only the good frame is sent");
    let s = h.stats();
    assert_eq!((s.tx_frames.get(), s.tx_malformed.get()), (1, 9));
}

#[test]
fn tx_headers_past_their_frame_are_malformed_not_sent() {
    // What the TAP would refuse with EINVAL (a backend error and a warning
    // on the host's log): the device refuses it as the guest's mistake.
    let mut h = Harness::new();
    h.activate(ALL);
    let frame_len: u16 = 1000;
    let with = |base: [u8; VNET_HDR_LEN], at: usize, value: u16| {
        let mut h = base;
        h[at..at + 2].copy_from_slice(&value.to_le_bytes());
        h
    };
    let csum = with(with(hdr(HDR_F_NEEDS_CSUM, GSO_NONE), 6, 34), 8, 16);
    let headers = [
        (with(tso4_hdr(), 4, 0), false),                 // gso_size 0
        (with(tso4_hdr(), 2, frame_len + 1), false),     // hdr_len past the frame
        (with(tso4_hdr(), 2, frame_len), true),          // hdr_len the whole frame
        (with(csum, 6, frame_len - 17), false),          // checksum field past the end
        (with(csum, 6, frame_len - 18), true),           // ... ending at the frame's end
        (with(csum, 8, frame_len), false),               // csum_offset past the frame
        (with(with(csum, 6, 0xfff0), 8, 0xfff0), false), // their sum past 16 bits
        (with(hdr(0, GSO_NONE), 2, u16::MAX), false),    // hdr_len without offloads
        (with(with(hdr(0, GSO_NONE), 6, u16::MAX), 8, u16::MAX), true), // ignored without NEEDS_CSUM
    ];
    for (i, (header, _)) in headers.iter().enumerate() {
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(&frame(frame_len.into(), i as u8));
        let at = 0x10_0000 + 0x1000 * i as u64;
        h.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        h.tx.add_chain(&h.mem, &[(at, bytes.len() as u32)], false);
    }
    h.kick_tx();
    h.run();
    assert_eq!(h.tx.take_used(&h.mem).len(), headers.len());
    // Each frame's first byte is its index (`frame`'s seed).
    let sent: Vec<u8> = std::iter::from_fn(|| h.peer_recv())
        .map(|f| f[VNET_HDR_LEN])
        .collect();
    let takes = (0..headers.len() as u8).filter(|&i| headers[usize::from(i)].1);
    assert_eq!(sent, takes.collect::<Vec<u8>>(), "the frames sent");
    let s = h.stats();
    assert_eq!((s.tx_frames.get(), s.tx_malformed.get()), (3, 6));
    assert_eq!(s.tx_errors.get(), 0);
}

#[test]
fn kicks_before_activation_and_after_reset_are_ignored() {
    let mut h = Harness::new();
    h.kick_tx();
    h.kick_rx();
    h.peer.send(&[0u8; 64]).unwrap();
    h.run();
    assert!(h.stats().values().iter().all(|&(_, v)| v == 0));
    // The frame is still waiting: the backend is not read before activation.
    h.activate(ALL);
    h.rx.add_chain(&h.mem, &[(0x10_0000, 4096)], true);
    h.kick_rx();
    h.run();
    assert_eq!(h.stats().rx_frames.get(), 1);
    // Reset with a frame pending, then traffic: no panic, no spin, no reads.
    h.peer.send(&[0u8; 64]).unwrap();
    h.net.lock().unwrap().reset();
    h.kick_tx();
    h.kick_rx();
    h.run();
    assert_eq!(h.run(), 0);
    assert_eq!(h.stats().rx_frames.get(), 1);
}

#[test]
fn rx_mergeable_buffers_span_chains() {
    let mut h = Harness::new();
    h.activate(ALL);
    let heads: Vec<u16> = (0..3)
        .map(|i| {
            h.rx.add_chain(&h.mem, &[(0x10_0000 + i * 0x1000, 2048)], true)
        })
        .collect();
    h.kick_rx();
    h.run();
    let mut pkt = hdr(HDR_F_DATA_VALID, GSO_NONE).to_vec();
    pkt.extend_from_slice(&frame(3000, 9));
    h.peer.send(&pkt).unwrap();
    h.run();
    let used = h.rx.take_used(&h.mem);
    assert_eq!(
        used,
        vec![
            (u32::from(heads[0]), 2048),
            (u32::from(heads[1]), 3012 - 2048)
        ]
    );
    let mut got = vec![0u8; 3012];
    h.mem
        .read_slice(&mut got[..2048], GuestAddress(0x10_0000))
        .unwrap();
    h.mem
        .read_slice(&mut got[2048..], GuestAddress(0x10_1000))
        .unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
    assert_eq!(got[0], HDR_F_DATA_VALID);
    assert_eq!(&got[12..], &pkt[12..]);
    assert!(h.irq_raised());
    let s = h.stats();
    assert_eq!(
        (s.rx_frames.get(), s.rx_buffers.get(), s.rx_bytes.get()),
        (1, 2, 3000)
    );
}

#[test]
fn rx_without_buffers_stops_polling_until_the_guest_kicks() {
    let mut h = Harness::new();
    h.activate(ALL);
    for seed in 0..3 {
        let mut pkt = hdr(0, GSO_NONE).to_vec();
        pkt.extend_from_slice(&frame(1000, seed));
        h.peer.send(&pkt).unwrap();
    }
    // Readable backend, no buffers: one look, then the backend is left alone.
    h.run();
    assert_eq!(h.run(), 0, "no events while the guest has no buffers");
    assert!(!h.net.lock().unwrap().backend_watched);
    assert_eq!(
        h.stats().rx_dropped.get(),
        0,
        "nothing dropped while waiting"
    );
    // One buffer: exactly one frame, then waiting again.
    h.rx.add_chain(&h.mem, &[(0x10_0000, 2048)], true);
    h.kick_rx();
    h.run();
    assert_eq!(h.rx.take_used(&h.mem).len(), 1);
    assert_eq!(h.run(), 0);
    // Two more buffers: the rest arrives in order.
    h.rx.add_chain(&h.mem, &[(0x11_0000, 2048)], true);
    h.rx.add_chain(&h.mem, &[(0x12_0000, 2048)], true);
    h.kick_rx();
    h.run();
    assert_eq!(h.rx.take_used(&h.mem).len(), 2);
    let mut got = vec![0u8; 1000];
    h.mem
        .read_slice(&mut got, GuestAddress(0x12_0000 + 12))
        .unwrap();
    assert_eq!(got, frame(1000, 2));
    assert_eq!(h.stats().rx_frames.get(), 3);
}

#[test]
fn rx_event_idx_asks_for_a_kick_when_out_of_buffers() {
    let mut h = Harness::new();
    h.activate(ALL);
    h.rx.add_chain(&h.mem, &[(0x10_0000, 2048)], true);
    h.rx.add_chain(&h.mem, &[(0x11_0000, 2048)], true);
    h.kick_rx();
    h.run();
    for seed in 0..3 {
        let mut pkt = hdr(0, GSO_NONE).to_vec();
        pkt.extend_from_slice(&frame(100, seed));
        h.peer.send(&pkt).unwrap();
    }
    h.run();
    assert_eq!(h.rx.take_used(&h.mem).len(), 2);
    // avail_event (after the used ring) asks the driver to kick as soon as
    // it publishes entry 2, the next one the device wants.
    let avail_event: u16 = h
        .mem
        .read_obj(GuestAddress(h.rx.used_addr() + 4 + 8 * u64::from(QSIZE)))
        .unwrap();
    assert_eq!(avail_event, 2);
    assert_eq!(h.run(), 0);
}

#[test]
fn rx_bad_chains_are_completed_empty_and_skipped() {
    let mut h = Harness::new();
    h.activate(ALL);
    let bad_dir = h.rx.add_chain(&h.mem, &[(0x10_0000, 2048)], false);
    let outside =
        h.rx.add_chain(&h.mem, &[(MEM_SIZE as u64 - 100, 2048)], true);
    let tiny = h.rx.add_chain(&h.mem, &[(0x10_0000, 4)], true);
    let good = h.rx.add_chain(&h.mem, &[(0x11_0000, 2048)], true);
    let mut pkt = hdr(0, GSO_NONE).to_vec();
    pkt.extend_from_slice(&frame(500, 4));
    h.peer.send(&pkt).unwrap();
    h.kick_rx();
    h.run();
    let used = h.rx.take_used(&h.mem);
    assert_eq!(
        used,
        vec![
            (u32::from(bad_dir), 0),
            (u32::from(outside), 0),
            (u32::from(tiny), 0),
            (u32::from(good), 512)
        ]
    );
    assert_eq!(h.stats().rx_bad_chains.get(), 3);
}

#[test]
fn rx_frames_the_guest_cannot_take_are_dropped_and_counted() {
    let mut h = Harness::new();
    // No mergeable buffers, no offloads.
    h.activate(VIRTIO_F_VERSION_1);
    h.rx.add_chain(&h.mem, &[(0x10_0000, 1000)], true);
    h.kick_rx();
    h.run();
    // Too big for the single chain.
    let mut big = hdr(0, GSO_NONE).to_vec();
    big.extend_from_slice(&frame(1500, 1));
    h.peer.send(&big).unwrap();
    // Offloads the guest did not negotiate.
    let mut gso = hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4).to_vec();
    gso.extend_from_slice(&frame(500, 1));
    h.peer.send(&gso).unwrap();
    // Too short to be a frame at all.
    h.peer.send(&[0u8; 5]).unwrap();
    // A good one fits, with DATA_VALID cleared and num_buffers 1.
    let mut ok = hdr(HDR_F_DATA_VALID, GSO_NONE).to_vec();
    ok.extend_from_slice(&frame(900, 1));
    h.peer.send(&ok).unwrap();
    h.run();
    let s = h.stats();
    assert_eq!((s.rx_dropped.get(), s.rx_frames.get()), (3, 1));
    assert_eq!(h.rx.take_used(&h.mem), vec![(0, 912)]);
    let mut got = [0u8; 12];
    h.mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(got[0], 0);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
}

#[test]
fn a_frame_larger_than_the_whole_ring_is_dropped_not_waited_for() {
    let mut h = Harness::new();
    h.activate(ALL);
    for i in 0..u64::from(QSIZE) {
        h.rx.add_chain(&h.mem, &[(0x10_0000 + i * 0x1000, 64)], true);
    }
    let mut pkt = hdr(0, GSO_NONE).to_vec();
    pkt.extend_from_slice(&frame(4000, 0));
    h.peer.send(&pkt).unwrap();
    let mut small = hdr(0, GSO_NONE).to_vec();
    small.extend_from_slice(&frame(40, 0));
    h.peer.send(&small).unwrap();
    h.kick_rx();
    h.run();
    let s = h.stats();
    assert_eq!((s.rx_dropped.get(), s.rx_frames.get()), (1, 1));
}

#[test]
fn a_bogus_avail_index_does_not_spin() {
    let mut h = Harness::new();
    h.activate(ALL);
    // The driver claims 1000 new entries in a 16-entry ring.
    h.tx.set_avail_idx(&h.mem, 1000);
    h.kick_tx();
    h.run();
    h.rx.set_avail_idx(&h.mem, 1000);
    h.kick_rx();
    let mut pkt = hdr(0, GSO_NONE).to_vec();
    pkt.extend_from_slice(&frame(100, 0));
    // Two frames: the one waiting for a buffer, and one that keeps the
    // backend readable.
    h.peer.send(&pkt).unwrap();
    h.peer.send(&pkt).unwrap();
    h.run();
    assert_eq!(h.run(), 0);
    assert!(!h.net.lock().unwrap().backend_watched);
}

#[test]
fn a_ring_of_bad_tx_chains_is_served_a_budget_per_event() {
    // A guest that keeps its TX avail index a whole (256-entry) ring ahead
    // over malformed chains: one event takes one budget of them, the rest
    // come on later turns.
    let mut h = Harness::with_rings(256);
    h.activate(ALL);
    let w = VRING_DESC_F_WRITE as u16;
    for _ in 0..256 {
        h.tx.add_raw(&h.mem, &[(0x10_0000, 64, w, 0)]);
    }
    h.kick_tx();
    assert_eq!(h.em.run_with_timeout(0).unwrap(), 1);
    assert_eq!(h.tx.take_used(&h.mem).len(), 64);
    h.run();
    assert_eq!(h.tx.take_used(&h.mem).len(), 256 - 64);
    assert_eq!(h.stats().tx_malformed.get(), 256);
}

#[test]
fn a_ring_of_bad_rx_chains_is_taken_at_most_once_per_turn() {
    // A frame waits while the guest offers a whole ring of unusable RX
    // chains: one turn completes a ring's worth and leaves the frame for a
    // later turn (the RX queue is kicked again) instead of popping on.
    let mut h = Harness::new();
    h.activate(ALL);
    for i in 0..u64::from(QSIZE) {
        h.rx.add_chain(&h.mem, &[(0x10_0000 + i * 0x1000, 2048)], false);
    }
    let mut pkt = hdr(0, GSO_NONE).to_vec();
    pkt.extend_from_slice(&frame(100, 7));
    h.peer.send(&pkt).unwrap();
    assert_eq!(
        h.em.run_with_timeout(0).unwrap(),
        1,
        "the backend is readable"
    );
    assert_eq!(h.rx.take_used(&h.mem).len(), usize::from(QSIZE));
    assert_eq!(h.stats().rx_bad_chains.get(), u64::from(QSIZE));
    assert_eq!(
        h.em.run_with_timeout(0).unwrap(),
        1,
        "the RX queue was re-kicked"
    );
    // The frame waited, and goes into the next good buffer.
    let s = h.stats();
    assert_eq!((s.rx_frames.get(), s.rx_dropped.get()), (0, 0));
    h.rx.add_chain(&h.mem, &[(0x11_0000, 2048)], true);
    h.kick_rx();
    h.run();
    assert_eq!(h.rx.take_used(&h.mem), vec![(0, 112)]);
    assert_eq!(h.stats().rx_frames.get(), 1);
}

#[test]
fn tx_budget_yields_and_resumes() {
    let mut h = Harness::new();
    h.activate(ALL);
    let mut bytes = hdr(0, GSO_NONE).to_vec();
    bytes.extend_from_slice(&frame(60, 0));
    h.mem.write_slice(&bytes, GuestAddress(0x10_0000)).unwrap();
    // More chains than the ring size over time: add, process, repeat.
    for _ in 0..3 {
        for _ in 0..QSIZE {
            h.tx.add_chain(&h.mem, &[(0x10_0000, bytes.len() as u32)], false);
        }
        h.kick_tx();
        h.run();
        assert_eq!(h.tx.take_used(&h.mem).len(), usize::from(QSIZE));
    }
    assert_eq!(h.stats().tx_frames.get(), 3 * u64::from(QSIZE));
}

proptest! {
    /// Any split of a frame into descriptors reaches the backend intact.
    #[test]
    fn tx_gathering_preserves_bytes(
        len in (VNET_HDR_LEN + MIN_FRAME_LEN)..9000usize,
        cuts in proptest::collection::vec(0usize..9000, 0..(QSIZE as usize - 1)),
        seed in any::<u8>(),
    ) {
        let mut h = Harness::new();
        h.activate(ALL);
        let mut bytes = hdr(0, GSO_NONE).to_vec();
        bytes.extend_from_slice(&frame(len - VNET_HDR_LEN, seed));
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (len + 1)).collect();
        cuts.push(0);
        cuts.push(len);
        cuts.sort_unstable();
        let bufs: Vec<(u64, u32)> = cuts
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let addr = 0x10_0000 + i as u64 * 0x4000;
                h.mem.write_slice(&bytes[w[0]..w[1]], GuestAddress(addr)).unwrap();
                (addr, (w[1] - w[0]) as u32)
            })
            .collect();
        h.tx.add_chain(&h.mem, &bufs, false);
        h.kick_tx();
        h.run();
        prop_assert_eq!(h.peer_recv(), Some(bytes));
        prop_assert_eq!(h.tx.take_used(&h.mem).len(), 1);
    }

    /// Any frame and any buffer sizes: what the guest reads back from the
    /// used buffers is the frame, with num_buffers matching.
    #[test]
    fn rx_scatter_preserves_bytes(
        len in MIN_FRAME_LEN..20000usize,
        sizes in proptest::collection::vec(12u32..5000, 1..(QSIZE as usize)),
    ) {
        let mut h = Harness::new();
        h.activate(ALL);
        let heads: Vec<(u16, u64)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let addr = 0x10_0000 + i as u64 * 0x2000;
                (h.rx.add_chain(&h.mem, &[(addr, s)], true), addr)
            })
            .collect();
        let mut pkt = hdr(0, GSO_NONE).to_vec();
        pkt.extend_from_slice(&frame(len, 5));
        h.peer.send(&pkt).unwrap();
        h.kick_rx();
        h.run();
        let total: usize = sizes.iter().map(|&s| s as usize).sum();
        let used = h.rx.take_used(&h.mem);
        if total < pkt.len() {
            // Waits for more buffers, nothing published, nothing dropped.
            prop_assert!(used.is_empty());
            prop_assert_eq!(h.stats().rx_dropped.get(), 0);
        } else {
            let mut got = Vec::new();
            for (i, &(id, n)) in used.iter().enumerate() {
                prop_assert_eq!(id, u32::from(heads[i].0));
                let mut b = vec![0u8; n as usize];
                h.mem.read_slice(&mut b, GuestAddress(heads[i].1)).unwrap();
                got.extend_from_slice(&b);
            }
            prop_assert_eq!(u16::from_le_bytes([got[10], got[11]]) as usize, used.len());
            prop_assert_eq!(&got[12..], &pkt[12..]);
        }
    }
}

/// README: the device offers checksum offload and TSO (IPv4 and IPv6) both
/// ways, mergeable receive buffers, event-index notification suppression
/// and link status. Bit numbers from the virtio 1.x spec (5.1.3, 6), not
/// the implementation's own constants.
#[test]
fn offered_features_are_the_documented_ones() {
    let bits = |numbers: &[u32]| numbers.iter().fold(0u64, |all, &n| all | 1 << n);
    // CSUM 0, GUEST_CSUM 1, MAC 5, GUEST_TSO4 7, GUEST_TSO6 8, HOST_TSO4 11,
    // HOST_TSO6 12, MRG_RXBUF 15, STATUS 16, RING_EVENT_IDX 29, VERSION_1 32.
    let documented = bits(&[0, 1, 5, 7, 8, 11, 12, 15, 16, 29, 32]);
    let h = Harness::new();
    assert_eq!(h.net.lock().unwrap().features(), documented);
    // MTU (3) only when the TAP's MTU is known.
    assert_eq!(device_with_mtu(1500).features(), documented | 1 << 3);
}

/// IPv6 TSO both ways: a TCPv6 segment (gso_type 4 in the virtio header)
/// passes when HOST_TSO6 (TX) or GUEST_TSO6 (RX) was negotiated, byte for
/// byte, and is refused without it.
#[test]
fn tcpv6_segments_pass_both_ways_with_negotiated_tso6() {
    const TCPV6: u8 = 4;
    const NEEDS_CSUM: u8 = 1;
    let mut segment = hdr(NEEDS_CSUM, TCPV6).to_vec();
    segment[2..4].copy_from_slice(&74u16.to_le_bytes()); // hdr_len
    segment[4..6].copy_from_slice(&1440u16.to_le_bytes()); // gso_size
    segment.extend_from_slice(&frame(60_000, 6));

    // The guest transmits the segment with `features` negotiated.
    let transmit = |features: u64| {
        let mut h = Harness::new();
        h.activate(features);
        h.mem
            .write_slice(&segment, GuestAddress(0x10_0000))
            .unwrap();
        h.tx.add_chain(&h.mem, &[(0x10_0000, segment.len() as u32)], false);
        h.kick_tx();
        h.run();
        h
    };
    // TX with everything offered: the segment reaches the TAP unchanged.
    let h = transmit(ALL);
    let sent = h.peer_recv();
    assert!(sent.as_deref() == Some(&segment[..]), "the segment changed");
    let s = h.stats();
    assert_eq!((s.tx_gso.get(), s.tx_csum.get()), (1, 1));
    // TX without HOST_TSO6 (IPv4 TSO still on): malformed, never sent.
    let h = transmit(ALL & !(1 << 12));
    assert!(h.peer_recv().is_none(), "sent without HOST_TSO6");
    assert_eq!(h.stats().tx_malformed.get(), 1);

    // RX: the guest gets the segment with its header, across buffers.
    let mut h = Harness::new();
    h.activate(ALL);
    for i in 0..u64::from(QSIZE) {
        h.rx.add_chain(&h.mem, &[(0x10_0000 + i * 0x1_0000, 0x1_0000)], true);
    }
    h.kick_rx();
    h.run();
    h.peer.send(&segment).unwrap();
    h.run();
    let used = h.rx.take_used(&h.mem);
    assert_eq!(used, vec![(0, segment.len() as u32)]);
    let mut got = vec![0u8; segment.len()];
    h.mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(&got[..10], &segment[..10], "flags, gso type and sizes");
    assert_eq!(&got[12..], &segment[12..]);
    assert_eq!(h.stats().rx_gso.get(), 1);
    // RX without GUEST_TSO6: dropped and counted, not delivered.
    let mut h = Harness::new();
    h.activate(ALL & !(1 << 8));
    h.rx.add_chain(&h.mem, &[(0x10_0000, 0x1_0000)], true);
    h.kick_rx();
    h.run();
    h.peer.send(&segment).unwrap();
    h.run();
    assert!(h.rx.take_used(&h.mem).is_empty());
    let s = h.stats();
    assert_eq!((s.rx_dropped.get(), s.rx_gso.get()), (1, 0));
}

/// 1000 bytes/s each way, on the test's clock: one 600-byte frame goes at
/// once, the next 200 ms later. The test moves its clock, then waits for
/// the limit's timerfd to wake the event loop (real time, about 200 ms:
/// an event, not a sleep).
fn limited_harness() -> (Harness, ManualClock) {
    let clock = ManualClock::default();
    let limit = RateLimit {
        bytes_per_sec: Some(1000),
        ..RateLimit::default()
    };
    let mut h = Harness::with_limit(&limit, &clock);
    h.activate(ALL);
    (h, clock)
}

#[test]
fn a_limited_tx_queue_holds_its_chains_until_the_timer_fires() {
    let (mut h, clock) = limited_harness();
    let mut heads = Vec::new();
    for seed in 0..2 {
        let mut bytes = hdr(0, GSO_NONE).to_vec();
        bytes.extend_from_slice(&frame(600, seed));
        let at = 0x10_0000 + u64::from(seed) * 0x1000;
        h.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        heads.push(h.tx.add_chain(&h.mem, &[(at, bytes.len() as u32)], false));
    }
    h.kick_tx();
    h.run();
    assert_eq!(h.tx.take_used(&h.mem), vec![(u32::from(heads[0]), 0)]);
    assert_eq!(h.peer_recv().unwrap()[VNET_HDR_LEN..], frame(600, 0));
    assert!(
        h.peer_recv().is_none(),
        "the second frame waits in the ring"
    );
    assert_eq!(h.stats().tx_rate_limited.get(), 1);
    // Kicks while the limit waits are no work: the loop goes idle.
    h.kick_tx();
    assert_eq!(h.run(), 1);
    assert_eq!(h.run(), 0);
    clock.advance(Duration::from_millis(200));
    assert_eq!(h.em.run_with_timeout(10_000).unwrap(), 1, "the timer");
    assert_eq!(h.tx.take_used(&h.mem), vec![(u32::from(heads[1]), 0)]);
    assert_eq!(h.peer_recv().unwrap()[VNET_HDR_LEN..], frame(600, 1));
    assert_eq!(
        (h.stats().tx_frames.get(), h.stats().tx_bytes.get()),
        (2, 1200)
    );
}

#[test]
fn a_limited_rx_direction_keeps_its_frame_and_leaves_the_tap_alone() {
    let (mut h, clock) = limited_harness();
    for i in 0..3 {
        h.rx.add_chain(&h.mem, &[(0x10_0000 + i * 0x1000, 2048)], true);
    }
    h.kick_rx();
    h.run();
    for seed in 0..2 {
        let mut pkt = hdr(0, GSO_NONE).to_vec();
        pkt.extend_from_slice(&frame(600, seed));
        h.peer.send(&pkt).unwrap();
    }
    h.run();
    assert_eq!(h.rx.take_used(&h.mem).len(), 1);
    assert_eq!(h.stats().rx_rate_limited.get(), 1);
    assert!(
        !h.net.lock().unwrap().backend_watched,
        "the readable TAP is out of the poll set while the limit waits"
    );
    assert_eq!(h.run(), 0, "no busy loop");
    // A guest kick (more buffers) does not bypass the limit.
    h.rx.add_chain(&h.mem, &[(0x13_0000, 2048)], true);
    h.kick_rx();
    h.run();
    assert_eq!(h.rx.take_used(&h.mem).len(), 0);
    clock.advance(Duration::from_millis(200));
    assert_eq!(h.em.run_with_timeout(10_000).unwrap(), 1, "the timer");
    h.run();
    assert_eq!(h.rx.take_used(&h.mem).len(), 1);
    let mut got = vec![0u8; 600];
    h.mem
        .read_slice(&mut got, GuestAddress(0x10_1000 + 12))
        .unwrap();
    assert_eq!(got, frame(600, 1), "the held frame, not a lost one");
    assert_eq!(
        (h.stats().rx_frames.get(), h.stats().rx_dropped.get()),
        (2, 0)
    );
}
