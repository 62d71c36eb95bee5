//! virtio-vsock against guest memory and mock queues, with real Unix
//! sockets on the host side and the real event loop (event-manager) driving
//! the device, so the poll-set management is tested too.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use proptest::prelude::*;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::conn::CONN_BUF_ALLOC;
use super::packet::*;
use super::*;
use crate::irq::IrqLine;
use crate::virtio::test_queue::{self, DriverQueue, RING_SIZE};
use crate::virtio::{Activation, Interrupt};

const CID: u64 = 3;
const MEM_SIZE: usize = 32 << 20;
const RX_RING: u64 = 0x1_0000;
const TX_RING: u64 = 0x2_0000;
const EV_RING: u64 = 0x3_0000;
/// Each rx chain: a 44-byte header descriptor and a 4 KiB data descriptor
/// (the layout Linux uses), at a slot derived from its head index.
const RX_BUFS: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x2000;
const RX_DATA: u32 = 4096;
/// Each tx packet: one descriptor, header then payload.
const TX_BUFS: u64 = 0x40_0000;
const TX_SLOT: u64 = 0x1_1000;

struct TestDir(PathBuf);

impl TestDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kvs-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Harness {
    mem: &'static GuestMemoryMmap,
    dev: Arc<Mutex<Vsock>>,
    em: EventManager<Arc<Mutex<Vsock>>>,
    rx: DriverQueue,
    tx: DriverQueue,
    path: PathBuf,
    guest_buf_alloc: u32,
    guest_fwd_cnt: u32,
    /// rx chains posted and not yet used (descriptors are reused in order).
    rx_outstanding: usize,
    _dir: TestDir,
}

impl Harness {
    fn new() -> Self {
        let dir = TestDir::new();
        let path = dir.0.join("v.sock");
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        ));
        let dev = Arc::new(Mutex::new(Vsock::new(CID, &path).unwrap()));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(dev.clone());
        Self {
            mem,
            dev,
            em,
            rx: DriverQueue::new(mem, RX_RING),
            tx: DriverQueue::new(mem, TX_RING),
            path,
            guest_buf_alloc: 1 << 20,
            guest_fwd_cnt: 0,
            rx_outstanding: 0,
            _dir: dir,
        }
    }

    fn activated() -> Self {
        let mut h = Self::new();
        h.activate();
        h
    }

    fn activate(&mut self) {
        self.activate_with_event_queue();
    }

    /// Activates the device; returns the driver's side of its event queue.
    fn activate_with_event_queue(&mut self) -> DriverQueue {
        let ev = DriverQueue::new(self.mem, EV_RING);
        let queues = vec![self.rx.queue(), self.tx.queue(), ev.queue()];
        self.dev
            .lock()
            .unwrap()
            .activate(Activation {
                mem: self.mem.clone(),
                queues,
                interrupt: Interrupt::new(IrqLine::new().unwrap()),
                features: VIRTIO_F_VERSION_1,
            })
            .unwrap();
        self.pump();
        ev
    }

    fn pump(&mut self) {
        test_queue::pump(&mut self.em);
    }

    fn assert_idle(&mut self) {
        test_queue::assert_idle(&mut self.em);
    }

    fn kick(&self, q: usize) {
        self.dev.lock().unwrap().queue_events()[q].write(1).unwrap();
    }

    /// Posts up to `n` rx buffers (as many as the ring has room for).
    fn post_rx(&mut self, n: usize) {
        let room = usize::from(RING_SIZE / 2) - self.rx_outstanding;
        self.rx_outstanding += n.min(room);
        for _ in 0..n.min(room) {
            let head = self.rx.next_desc;
            let addr = RX_BUFS + u64::from(head) * RX_SLOT;
            self.rx.add(&[
                (addr, HDR_SIZE as u32, VRING_DESC_F_WRITE),
                (addr + 64, RX_DATA, VRING_DESC_F_WRITE),
            ]);
        }
        self.kick(RXQ);
        self.pump();
    }

    /// Packets the device put in the rx queue since last time.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let used = self.rx.used();
        self.rx_outstanding -= used.len();
        for (head, len) in used {
            let addr = RX_BUFS + u64::from(head) * RX_SLOT;
            assert!(len as usize >= HDR_SIZE, "short rx packet ({len})");
            let mut raw = [0u8; HDR_SIZE];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let hdr = Header::from_bytes(&raw);
            assert_eq!(hdr.len as usize, len as usize - HDR_SIZE);
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + 64))
                .unwrap();
            if hdr.op == OP_RW {
                self.guest_fwd_cnt = self.guest_fwd_cnt.wrapping_add(hdr.len);
            }
            out.push((hdr, data));
        }
        out
    }

    fn guest_hdr(&self, op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: self.guest_buf_alloc,
            fwd_cnt: self.guest_fwd_cnt,
            ..Default::default()
        }
    }

    /// Queues a raw tx chain (without kicking).
    fn add_tx_raw(&mut self, bytes: &[u8]) {
        let head = self.tx.next_desc;
        let addr = TX_BUFS + u64::from(head) * TX_SLOT;
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        self.tx.add(&[(addr, bytes.len() as u32, 0)]);
    }

    fn send(&mut self, mut hdr: Header, payload: &[u8]) {
        hdr.len = payload.len() as u32;
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.add_tx_raw(&bytes);
        self.kick(TXQ);
        self.pump();
    }

    fn conns(&self) -> usize {
        self.dev.lock().unwrap().muxer.connection_count()
    }

    /// Host program connects and asks for guest `port`; returns the stream
    /// and the REQUEST the guest got.
    fn host_connect(&mut self, port: u32) -> (UnixStream, Header) {
        let mut s = UnixStream::connect(&self.path).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.pump();
        let pkts = self.recv();
        assert_eq!(pkts.len(), 1, "{pkts:?}");
        let req = pkts[0].0;
        assert_eq!(
            (req.op, req.src_cid, req.dst_cid, req.dst_port, req.type_),
            (OP_REQUEST, HOST_CID, CID, port, TYPE_STREAM)
        );
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        (s, req)
    }

    /// Completes a host-initiated connection; returns the host stream and
    /// the host-side port.
    fn host_established(&mut self, port: u32) -> (UnixStream, u32) {
        let (mut s, req) = self.host_connect(port);
        self.send(self.guest_hdr(OP_RESPONSE, port, req.src_port), b"");
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while b[0] != b'\n' {
            s.read_exact(&mut b).unwrap();
            line.push(b[0]);
        }
        assert_eq!(line, format!("OK {}\n", req.src_port).as_bytes());
        (s, req.src_port)
    }
}

/// Reads until the device closes the stream (EOF, or a reset when the
/// device closed with unread data).
fn read_until_closed(s: &mut UnixStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return all,
            Err(e) => panic!("{e}"),
        }
    }
}

fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

#[test]
fn identity_config_and_validation() {
    let h = Harness::new();
    let dev = h.dev.lock().unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.features(), VIRTIO_F_VERSION_1);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    let mut cfg = [0xffu8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), CID);
    let mut part = [0xffu8; 6];
    dev.read_config(4, &mut part);
    assert_eq!(part, [0; 6]);
    dev.read_config(u64::MAX, &mut part);
    assert_eq!(part, [0; 6]);
    drop(dev);

    for bad in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            Vsock::new(bad, &h._dir.0.join("x.sock")),
            Err(VsockError::InvalidCid(_))
        ));
    }
    // A regular file is never replaced; a stale socket is.
    let file = h._dir.0.join("file");
    std::fs::write(&file, b"keep").unwrap();
    assert!(Vsock::new(3, &file).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    let stale = h._dir.0.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let v = Vsock::new(3, &stale).unwrap();
    assert!(UnixStream::connect(&stale).is_ok());
    drop(v);
    assert!(
        !stale.exists(),
        "the socket file is removed with the device"
    );
    let long = h._dir.0.join("x".repeat(100));
    assert!(Vsock::new(3, &long).is_err());
}

#[test]
fn host_initiated_stream_both_ways_and_guest_close() {
    let mut h = Harness::activated();
    h.post_rx(16);
    let (mut s, hport) = h.host_established(1234);
    assert!(hport >= 1 << 30);

    s.write_all(b"hello guest").unwrap();
    h.pump();
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RW);
    assert_eq!(pkts[0].0.buf_alloc, CONN_BUF_ALLOC);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (hport, 1234));
    assert_eq!(pkts[0].1, b"hello guest");

    h.send(h.guest_hdr(OP_RW, 1234, hport), b"hello host");
    assert_eq!(read_exactly(&mut s, 10), b"hello host");

    // The guest closes: it gets a reset and the host sees end of file.
    let mut shut = h.guest_hdr(OP_SHUTDOWN, 1234, hport);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.send(shut, b"");
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RST);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(h.conns(), 0);
    h.assert_idle();
}

#[test]
fn guest_refusal_closes_the_host_connection() {
    let mut h = Harness::activated();
    h.post_rx(4);
    let (mut s, req) = h.host_connect(99);
    h.send(h.guest_hdr(OP_RST, 99, req.src_port), b"");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "no OK line after a refusal");
    assert_eq!(h.conns(), 0);
    assert!(h.recv().is_empty(), "no reply to a reset");
}

#[test]
fn bad_connect_lines_are_dropped() {
    let mut h = Harness::activated();
    h.post_rx(4);
    for line in [&b"HELLO\n"[..], b"CONNECT x\n", &[b'9'; 64]] {
        let mut s = UnixStream::connect(&h.path).unwrap();
        s.write_all(line).unwrap();
        h.pump();
        assert!(read_until_closed(&mut s).is_empty());
    }
    assert!(h.recv().is_empty());
    assert_eq!(h.conns(), 0);
    // A host that connects and leaves without a line.
    drop(UnixStream::connect(&h.path).unwrap());
    h.pump();
    assert_eq!(h.conns(), 0);
    h.assert_idle();
}

#[test]
fn host_connection_waits_for_activation() {
    let mut h = Harness::new();
    let mut s = UnixStream::connect(&h.path).unwrap();
    s.write_all(b"CONNECT 7\n").unwrap();
    h.pump();
    // Kicks before activation are drained and ignored.
    h.kick(TXQ);
    h.kick(RXQ);
    h.assert_idle();
    h.activate();
    h.post_rx(2);
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!((pkts[0].0.op, pkts[0].0.dst_port), (OP_REQUEST, 7));
}

#[test]
fn guest_initiated_stream_and_host_close_after_sending() {
    let mut h = Harness::activated();
    h.post_rx(16);
    let listener = UnixListener::bind(format!("{}_5678", h.path.display())).unwrap();
    h.send(h.guest_hdr(OP_REQUEST, 40000, 5678), b"");
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(
        (pkts[0].0.op, pkts[0].0.src_port, pkts[0].0.dst_port),
        (OP_RESPONSE, 5678, 40000)
    );
    let (mut s, _) = listener.accept().unwrap();
    h.send(h.guest_hdr(OP_RW, 40000, 5678), b"ping");
    assert_eq!(read_exactly(&mut s, 4), b"ping");

    // The host answers and closes at once: the data still arrives, then a
    // shutdown of both directions.
    s.write_all(b"pong").unwrap();
    drop(s);
    h.pump();
    let pkts = h.recv();
    let ops: Vec<u16> = pkts.iter().map(|p| p.0.op).collect();
    assert!(ops.contains(&OP_RW), "{ops:?}");
    let data: Vec<u8> = pkts
        .iter()
        .filter(|p| p.0.op == OP_RW)
        .flat_map(|p| p.1.clone())
        .collect();
    assert_eq!(data, b"pong");
    let last = pkts.last().unwrap().0;
    // SHUTDOWN RCV may come first, on the hang-up; the final one has both.
    assert_eq!(last.op, OP_SHUTDOWN);
    assert_eq!(last.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    h.assert_idle();
    // The guest answers the shutdown with a reset: all gone.
    h.send(h.guest_hdr(OP_RST, 40000, 5678), b"");
    assert_eq!(h.conns(), 0);
    h.assert_idle();
}

#[test]
fn guest_connect_to_nobody_is_reset() {
    let mut h = Harness::activated();
    h.post_rx(4);
    h.send(h.guest_hdr(OP_REQUEST, 40001, 1111), b"");
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(
        (
            pkts[0].0.op,
            pkts[0].0.src_port,
            pkts[0].0.dst_port,
            pkts[0].0.src_cid
        ),
        (OP_RST, 1111, 40001, HOST_CID)
    );
    // Packets for unknown connections are reset too; resets are not answered.
    h.send(h.guest_hdr(OP_RW, 40001, 1111), b"zz");
    assert_eq!(h.recv()[0].0.op, OP_RST);
    h.send(h.guest_hdr(OP_RST, 40001, 1111), b"");
    assert!(h.recv().is_empty());
    assert_eq!(h.conns(), 0);
}

#[test]
fn host_data_respects_guest_credit_and_does_not_spin() {
    let mut h = Harness::activated();
    h.guest_buf_alloc = 10_000;
    h.post_rx(64);
    let (mut s, hport) = h.host_established(5);
    s.set_nonblocking(true).unwrap();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    let mut written = 0;
    while written < data.len() {
        match s.write(&data[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(written >= 20_000);
    h.pump();
    let got: Vec<u8> = h.recv().into_iter().flat_map(|p| p.1).collect();
    assert_eq!(got.len(), 10_000, "exactly the guest's credit");
    assert_eq!(got, data[..10_000]);
    // No credit: the stream is not polled, nothing wakes the loop.
    h.assert_idle();
    // The guest consumed it all and says so: the rest flows.
    let mut total = got;
    while total.len() < written {
        let before = total.len();
        h.send(h.guest_hdr(OP_CREDIT_UPDATE, 5, hport), b"");
        h.post_rx(8);
        total.extend(h.recv().into_iter().flat_map(|p| p.1));
        assert!(total.len() > before, "stalled at {}", total.len());
        assert!(total.len() - h.guest_fwd_cnt as usize == 0);
    }
    assert_eq!(total, data[..written]);
    h.assert_idle();
}

#[test]
fn no_rx_buffers_means_waiting_not_spinning() {
    let mut h = Harness::activated();
    h.post_rx(3);
    let (mut s, _) = h.host_established(6);
    // All rx buffers used: the REQUEST took one; use the other two.
    s.write_all(&[1u8; 10_000]).unwrap();
    h.pump();
    let got: usize = h.recv().iter().map(|p| p.1.len()).sum();
    assert_eq!(got, 2 * RX_DATA as usize);
    h.assert_idle();
    h.post_rx(8);
    let got: usize = h.recv().iter().map(|p| p.1.len()).sum();
    assert_eq!(got, 10_000 - 2 * RX_DATA as usize);
}

#[test]
fn guest_buffering_is_bounded_when_the_host_does_not_read() {
    let mut h = Harness::activated();
    h.post_rx(64);
    let (_s, hport) = h.host_established(8);
    let chunk = vec![0xabu8; MAX_PKT_PAYLOAD];
    let mut sent: u64 = 0;
    let mut fwd = 0u32;
    // Send within the credit the device advertises until it is exhausted.
    loop {
        for (hdr, _) in h.recv() {
            fwd = hdr.fwd_cnt;
            assert_eq!(hdr.buf_alloc, CONN_BUF_ALLOC);
        }
        let credit = CONN_BUF_ALLOC - (sent as u32).wrapping_sub(fwd);
        if credit == 0 {
            break;
        }
        let n = (credit as usize).min(chunk.len());
        h.send(h.guest_hdr(OP_RW, 8, hport), &chunk[..n]);
        sent += n as u64;
        assert!(sent < 16 << 20, "host socket never filled");
    }
    let dev = h.dev.lock().unwrap();
    let conn = dev.muxer.connections().next().unwrap();
    assert!(conn.to_host_len() as u32 <= CONN_BUF_ALLOC);
    assert_eq!(conn.credit.our_free(), 0);
    drop(dev);
    h.assert_idle();
    // One byte beyond the credit: the connection is reset.
    h.send(h.guest_hdr(OP_RW, 8, hport), b"x");
    assert_eq!(h.recv().last().unwrap().0.op, OP_RST);
    assert_eq!(h.conns(), 0);
}

#[test]
fn slow_host_gets_credit_updates() {
    let mut h = Harness::activated();
    h.post_rx(64);
    let (mut s, hport) = h.host_established(9);
    let total = 3 * CONN_BUF_ALLOC as usize;
    let mut sent = 0usize;
    let mut received = 0usize;
    let mut fwd = 0u32;
    let mut buf = vec![0u8; 1 << 16];
    s.set_nonblocking(true).unwrap();
    while received < total {
        for (hdr, _) in h.recv() {
            fwd = hdr.fwd_cnt;
        }
        let credit = CONN_BUF_ALLOC - (sent as u32).wrapping_sub(fwd);
        let n = (credit as usize).min(MAX_PKT_PAYLOAD).min(total - sent);
        if n > 0 {
            h.send(h.guest_hdr(OP_RW, 9, hport), &vec![7u8; n]);
            sent += n;
        }
        match s.read(&mut buf) {
            Ok(n) => received += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        h.pump();
        if n == 0 {
            h.post_rx(8);
        }
    }
    assert_eq!(received, total);
}

#[test]
fn hostile_tx_packets_are_returned_and_ignored() {
    let mut h = Harness::activated();
    h.post_rx(32);
    let (mut s, hport) = h.host_established(11);
    let _ = h.tx.used();
    // Too short for a header.
    h.add_tx_raw(&[0u8; 10]);
    // A length far beyond the chain, and beyond any packet.
    let mut hdr = h.guest_hdr(OP_RW, 11, hport);
    hdr.len = u32::MAX;
    h.add_tx_raw(&hdr.to_bytes());
    // Device-writable only (nothing readable).
    let head = h.tx.next_desc;
    let addr = TX_BUFS + u64::from(head) * TX_SLOT;
    h.tx.add(&[(addr, 64, VRING_DESC_F_WRITE)]);
    // Outside guest memory.
    h.tx.add(&[(MEM_SIZE as u64 + 0x1000, 64, 0)]);
    // A descriptor loop.
    let head = h.tx.next_desc;
    h.tx.store_desc(head, addr, 64, VRING_DESC_F_NEXT as u16, head);
    h.tx.next_desc = (head + 1) % RING_SIZE;
    h.tx.publish(head);
    h.kick(TXQ);
    h.pump();
    assert_eq!(h.tx.used().len(), 5, "every chain is returned");
    // The oversized packet reset its connection.
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RST);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // Spoofed source CID: dropped without a reply. Wrong type: reset.
    let mut spoof = h.guest_hdr(OP_REQUEST, 1, 2);
    spoof.src_cid = 77;
    h.send(spoof, b"");
    assert!(h.recv().is_empty());
    let mut dgram = h.guest_hdr(OP_REQUEST, 1, 2);
    dgram.type_ = 2;
    h.send(dgram, b"");
    assert_eq!(h.recv()[0].0.op, OP_RST);
    // Unknown op on a live connection resets it.
    let (_s2, hport2) = h.host_established(12);
    h.send(h.guest_hdr(99, 12, hport2), b"");
    assert_eq!(h.recv()[0].0.op, OP_RST);
    assert_eq!(h.conns(), 0);
    h.assert_idle();
}

#[test]
fn rings_of_bad_chains_are_served_a_budget_per_turn() {
    // A guest that keeps its avail indices a whole ring ahead over bad
    // chains: each turn returns one budget of them and re-kicks for the rest.
    let mut h = Harness::activated();
    let ring = usize::from(RING_SIZE);
    for _ in 0..ring {
        h.tx.add(&[(MEM_SIZE as u64 + 0x1000, 64, 0)]);
    }
    h.dev.lock().unwrap().run_queues();
    assert_eq!(h.tx.used().len(), CHAINS_PER_TURN);
    h.pump();
    assert_eq!(h.tx.used().len(), ring - CHAINS_PER_TURN);
    // Device-readable rx buffers while a reset waits for the guest.
    for _ in 0..ring {
        h.rx.add(&[(RX_BUFS, 4096, 0)]);
    }
    let mut to_nobody = h.guest_hdr(OP_RW, 1, 2).to_bytes();
    to_nobody[24..28].copy_from_slice(&0u32.to_le_bytes());
    h.add_tx_raw(&to_nobody);
    h.dev.lock().unwrap().run_queues();
    assert_eq!(h.tx.used().len(), 1);
    let used = h.rx.used();
    assert_eq!(used.len(), CHAINS_PER_TURN);
    h.pump();
    let rest = h.rx.used();
    assert_eq!(used.len() + rest.len(), ring);
    assert!(used.iter().chain(&rest).all(|&(_, len)| len == 0));
    let c = h.dev.lock().unwrap().muxer.counters.clone();
    assert_eq!(c.bad_chains.get(), 2 * ring as u64);
    assert_eq!((c.tx_packets.get(), c.resets.get()), (1, 1));
    assert_eq!(c.rx_packets.get(), 0, "the reset still waits");
    h.assert_idle();
}

#[test]
fn unusable_rx_buffers_are_returned_empty() {
    let mut h = Harness::activated();
    // Read-only, too small, and outside memory; then a good one.
    h.rx.add(&[(RX_BUFS, 4096, 0)]);
    h.rx.add(&[(RX_BUFS + 0x4000, 20, VRING_DESC_F_WRITE)]);
    h.rx.add(&[(MEM_SIZE as u64, 4096, VRING_DESC_F_WRITE)]);
    let mut s = UnixStream::connect(&h.path).unwrap();
    s.write_all(b"CONNECT 3\n").unwrap();
    h.pump();
    let used = h.rx.used();
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [0, 0, 0]);
    h.post_rx(1);
    assert_eq!(h.recv()[0].0.op, OP_REQUEST);
}

#[test]
fn credit_request_and_header_only_buffers() {
    let mut h = Harness::activated();
    h.post_rx(4);
    let (mut s, hport) = h.host_established(13);
    h.send(h.guest_hdr(OP_CREDIT_REQUEST, 13, hport), b"");
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_CREDIT_UPDATE);
    assert_eq!(pkts[0].0.buf_alloc, CONN_BUF_ALLOC);
    // A buffer with room for a header only cannot carry data: it is used
    // for a credit update, never left to loop on.
    s.write_all(b"abc").unwrap();
    let head = h.rx.next_desc;
    let addr = RX_BUFS + u64::from(head) * RX_SLOT;
    h.rx.add(&[(addr, HDR_SIZE as u32, VRING_DESC_F_WRITE)]);
    h.pump();
    let pkts: Vec<_> = h.recv().into_iter().map(|p| (p.0.op, p.1)).collect();
    // The two buffers left from post_rx carry the data first.
    assert_eq!(pkts[0], (OP_RW, b"abc".to_vec()));
    h.assert_idle();
}

#[test]
fn reset_closes_every_connection() {
    let mut h = Harness::activated();
    h.post_rx(8);
    let (mut a, _) = h.host_established(20);
    let listener = UnixListener::bind(format!("{}_21", h.path.display())).unwrap();
    h.send(h.guest_hdr(OP_REQUEST, 50000, 21), b"");
    let (mut b, _) = listener.accept().unwrap();
    b.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    assert_eq!(h.conns(), 2);
    h.dev.lock().unwrap().reset();
    h.pump();
    assert_eq!(h.conns(), 0);
    for s in [&mut a, &mut b] {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
    }
    h.assert_idle();
    // The main socket still accepts (for the next driver).
    let mut s = UnixStream::connect(&h.path).unwrap();
    s.write_all(b"CONNECT 1\n").unwrap();
    h.pump();
    assert_eq!(h.conns(), 1);
}

#[test]
fn guest_half_close_shuts_the_host_write_side() {
    let mut h = Harness::activated();
    h.post_rx(8);
    let (mut s, hport) = h.host_established(30);
    h.send(h.guest_hdr(OP_RW, 30, hport), b"last words");
    let mut shut = h.guest_hdr(OP_SHUTDOWN, 30, hport);
    shut.flags = SHUTDOWN_SEND;
    h.send(shut, b"");
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"last words");
    // The other direction still works.
    s.write_all(b"reply").unwrap();
    h.pump();
    let data: Vec<u8> = h.recv().into_iter().flat_map(|p| p.1).collect();
    assert_eq!(data, b"reply");
    assert_eq!(h.conns(), 1);
}

#[test]
fn too_many_connections_are_refused() {
    let mut h = Harness::activated();
    let mut keep = Vec::new();
    for _ in 0..muxer::MAX_CONNS {
        keep.push(UnixStream::connect(&h.path).unwrap());
    }
    h.pump();
    assert_eq!(h.conns(), muxer::MAX_CONNS);
    let mut extra = UnixStream::connect(&h.path).unwrap();
    h.pump();
    assert!(read_until_closed(&mut extra).is_empty());
    assert_eq!(h.conns(), muxer::MAX_CONNS);
    h.post_rx(1);
    h.send(h.guest_hdr(OP_REQUEST, 1, 2), b"");
    assert_eq!(h.recv()[0].0.op, OP_RST);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random header bytes: the length check never accepts more than the
    /// chain holds or the packet limit.
    #[test]
    fn payload_length_check(raw in proptest::collection::vec(any::<u8>(), HDR_SIZE), avail in 0usize..200_000) {
        let hdr = Header::from_bytes(&raw.clone().try_into().unwrap());
        prop_assert_eq!(hdr.to_bytes().to_vec(), raw);
        match checked_payload_len(&hdr, avail) {
            Ok(n) => prop_assert!(n == hdr.len as usize && n <= avail && n <= MAX_PKT_PAYLOAD),
            Err(_) => prop_assert!(hdr.len as usize > avail || hdr.len as usize > MAX_PKT_PAYLOAD),
        }
    }

    /// Random descriptor tables on the tx queue (random addresses, lengths,
    /// flags, next links, heads) with random bytes in memory: the device
    /// never panics, returns at most what was offered, and settles.
    #[test]
    fn random_tx_descriptor_tables(
        descs in proptest::collection::vec(
            (0u64..(MEM_SIZE as u64 + 0x10000), any::<u32>(), 0u16..8, 0u16..RING_SIZE),
            1..32,
        ),
        heads in proptest::collection::vec(0u16..RING_SIZE, 1..16),
        fill in any::<u8>(),
        ports in (0u32..4, 0u32..4),
    ) {
        let mut h = Harness::activated();
        h.post_rx(8);
        // Plausible headers in the data area so some chains parse.
        let mut hdr = h.guest_hdr(OP_REQUEST, ports.0, ports.1);
        for (i, op) in [OP_REQUEST, OP_RW, OP_SHUTDOWN, OP_CREDIT_REQUEST].iter().enumerate() {
            hdr.op = *op;
            hdr.len = u32::from(fill) * i as u32;
            let at = TX_BUFS + i as u64 * 0x1000;
            h.mem.write_slice(&hdr.to_bytes(), GuestAddress(at)).unwrap();
            h.mem.write_slice(&[fill; 64], GuestAddress(at + HDR_SIZE as u64)).unwrap();
        }
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            // Bias some descriptors onto the prepared headers.
            let addr = if i % 3 == 0 { TX_BUFS + (addr % 4) * 0x1000 } else { addr };
            let len = if i % 2 == 0 { len % 0x2000 } else { len };
            h.tx.store_desc(i as u16, addr, len, flags, next);
        }
        for &head in &heads {
            h.tx.publish(head);
        }
        h.kick(TXQ);
        h.pump();
        let used = h.tx.used();
        prop_assert!(used.len() <= heads.len());
        prop_assert!(used.iter().all(|&(_, len)| len == 0));
        let _ = h.recv();
        h.assert_idle();
    }
}

#[test]
fn rx_state_unaffected_by_unknown_tokens() {
    // Events for tokens that are gone (closed in the same round) are ignored.
    let mut h = Harness::activated();
    let mut dev = h.dev.lock().unwrap();
    dev.muxer.conn_event(12345, event_manager::EventSet::IN);
    drop(dev);
    h.assert_idle();
}

// Bulk streams through odd buffers: MiBs of pseudo-random bytes each way,
// with rx/tx chains of odd sizes split over several descriptors (the header
// too), a driver that runs out of rx buffers and refills late, and credit
// updates that arrive late. Every byte is checked, in order.

/// Where the odd rx chains live: one slot per descriptor index.
const ODD_RX_BUFS: u64 = 0x180_0000;
const ODD_RX_SLOT: u64 = 0x2000;
/// Where the odd tx chains of one kick are laid out, one after another.
const ODD_TX_BUFS: u64 = 0x1a0_0000;

/// xorshift64*: deterministic, so a failing seed replays.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.next().is_multiple_of(one_in)
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng::new(seed ^ 0x5eed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Descriptor lengths of one rx chain: the layouts Linux uses (header and
/// 4 KiB data; one buffer for both) and odd ones (the header split, many
/// small pieces, some chains too small to be usable at all).
fn odd_rx_layout(r: &mut Rng) -> Vec<u32> {
    match r.range(0, 7) {
        0 => vec![HDR_SIZE as u32, 4096],
        1 => vec![HDR_SIZE as u32 + 4096],
        2 => {
            let a = r.range(1, HDR_SIZE as u64 - 1) as u32;
            vec![
                a,
                HDR_SIZE as u32 - a + r.range(0, 3) as u32,
                r.range(1, 5000) as u32,
            ]
        }
        3 => (0..r.range(1, 8)).map(|_| r.range(1, 200) as u32).collect(),
        4 => vec![HDR_SIZE as u32, r.range(1, 8000) as u32],
        5 => vec![r.range(HDR_SIZE as u64, 300) as u32],
        6 => vec![HDR_SIZE as u32 + 1, 3, 4095, 17],
        _ => (0..r.range(2, 6))
            .map(|_| r.range(1, 3000) as u32)
            .collect(),
    }
}

/// A guest driver posting odd rx chains and reading them back.
#[derive(Default)]
struct OddRx {
    /// head -> its descriptors (address, length).
    chains: std::collections::HashMap<u16, Vec<(u64, u32)>>,
    descs: usize,
}

impl OddRx {
    /// Posts one chain if the descriptor table has room; false if not.
    fn post(&mut self, h: &mut Harness, lens: &[u32]) -> bool {
        if self.descs + lens.len() > usize::from(RING_SIZE) {
            return false;
        }
        let first = h.rx.next_desc;
        let descs: Vec<(u64, u32)> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let idx = (first + i as u16) % RING_SIZE;
                // Odd start addresses too.
                let addr = ODD_RX_BUFS + u64::from(idx) * ODD_RX_SLOT + u64::from(idx % 7);
                assert!(u64::from(len) + 8 <= ODD_RX_SLOT);
                (addr, len)
            })
            .collect();
        // Poison, so bytes the device did not write are noticed.
        for &(addr, len) in &descs {
            h.mem
                .write_slice(&vec![0xa5; len as usize], GuestAddress(addr))
                .unwrap();
        }
        let table: Vec<(u64, u32, u32)> = descs
            .iter()
            .map(|&(a, l)| (a, l, VRING_DESC_F_WRITE))
            .collect();
        let head = h.rx.add(&table);
        self.descs += descs.len();
        self.chains.insert(head, descs);
        true
    }

    /// Used chains since last time, as (header, payload); chains returned
    /// empty (unusable) are skipped.
    fn recv(&mut self, h: &mut Harness) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        for (head, len) in h.rx.used() {
            let descs = self.chains.remove(&head).expect("a posted head");
            self.descs -= descs.len();
            let total: u32 = descs.iter().map(|d| d.1).sum();
            assert!(len <= total, "used length {len} beyond the chain's {total}");
            if len == 0 {
                assert!((total as usize) < HDR_SIZE, "usable chain returned empty");
                continue;
            }
            let mut bytes = Vec::new();
            for &(addr, dlen) in &descs {
                let n = (len as usize - bytes.len()).min(dlen as usize);
                let mut b = vec![0u8; n];
                h.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                bytes.extend(b);
            }
            let hdr = Header::from_bytes(bytes[..HDR_SIZE].try_into().unwrap());
            assert_eq!(hdr.len as usize, len as usize - HDR_SIZE, "{hdr:?}");
            out.push((hdr, bytes.split_off(HDR_SIZE)));
        }
        out
    }
}

/// Guest-initiated connection to a host listener on `port` (as kiln's
/// agent connects); returns the accepted host stream and the guest port.
fn guest_connects(h: &mut Harness, port: u32) -> (UnixStream, u32) {
    let listener = UnixListener::bind(format!("{}_{port}", h.path.display())).unwrap();
    let gport = 50_000;
    h.post_rx(1);
    h.send(h.guest_hdr(OP_REQUEST, gport, port), b"");
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RESPONSE);
    let (s, _) = listener.accept().unwrap();
    (s, gport)
}

/// Host -> guest: `len` bytes written by a host thread in random pieces,
/// received through odd rx chains with late refills and late credit.
fn bulk_host_to_guest(seed: u64, len: usize, buf_alloc: u32) {
    let mut r = Rng::new(seed);
    let mut h = Harness::activated();
    h.guest_buf_alloc = buf_alloc;
    let port = 7000 + seed as u32;
    let (s, gport) = guest_connects(&mut h, port);
    let data = pattern(len, seed);
    let writer = {
        let data = data.clone();
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut r = Rng::new(seed ^ 0xabc);
            let mut at = 0;
            while at < data.len() {
                let n = (r.range(1, 100_000) as usize).min(data.len() - at);
                s.write_all(&data[at..at + n]).unwrap();
                at += n;
                if r.chance(16) {
                    std::thread::sleep(std::time::Duration::from_micros(r.range(1, 2000)));
                }
            }
            s.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut rx = OddRx::default();
    let mut got: Vec<u8> = Vec::with_capacity(len);
    // What the guest application consumed, and what it told the device.
    let (mut consumed, mut told) = (0usize, 0usize);
    let mut eof = false;
    let mut idle = 0u32;
    let credit_update = |h: &mut Harness, fwd: usize| {
        let mut hdr = h.guest_hdr(OP_CREDIT_UPDATE, gport, port);
        hdr.fwd_cnt = fwd as u32;
        h.send(hdr, b"");
    };
    for round in 0u64.. {
        assert!(round < 2_000_000, "stalled at {} of {len} bytes", got.len());
        // Sometimes leave the queue dry for a while; refill in bursts.
        if !r.chance(4) {
            for _ in 0..r.range(0, 12) {
                let layout = odd_rx_layout(&mut r);
                if !rx.post(&mut h, &layout) {
                    break;
                }
            }
            h.kick(RXQ);
        }
        h.pump();
        let before = got.len();
        for (hdr, payload) in rx.recv(&mut h) {
            assert_eq!((hdr.src_port, hdr.dst_port), (port, gport));
            assert_eq!(hdr.buf_alloc, CONN_BUF_ALLOC);
            match hdr.op {
                OP_RW => {
                    assert!(!eof, "data after the shutdown");
                    assert!(!payload.is_empty(), "empty RW packet");
                    let at = got.len();
                    got.extend_from_slice(&payload);
                    assert!(
                        got.len() - told <= buf_alloc as usize,
                        "the device sent {} bytes beyond the guest's credit",
                        got.len() - told - buf_alloc as usize
                    );
                    if got[at..] != data[at..got.len().min(len)] {
                        let bad = (at..got.len()).find(|&i| got[i] != data[i]).unwrap();
                        panic!(
                            "seed {seed}: byte {bad} differs (packet of {} at {at})",
                            payload.len()
                        );
                    }
                }
                OP_SHUTDOWN => {
                    assert_eq!(hdr.flags & SHUTDOWN_SEND, SHUTDOWN_SEND);
                    eof = true;
                }
                OP_CREDIT_UPDATE => {}
                op => panic!("unexpected op {op}"),
            }
        }
        if eof && got.len() == len {
            break;
        }
        // The application reads some of what arrived; the driver tells the
        // device late, and not every time.
        if r.chance(2) {
            consumed += (r.range(0, 70_000) as usize).min(got.len() - consumed);
        }
        let no_credit = got.len() - told == buf_alloc as usize;
        if told < consumed && (r.chance(5) || no_credit && r.chance(2)) {
            told = consumed;
            credit_update(&mut h, told);
        }
        if got.len() == before {
            idle += 1;
            if idle.is_multiple_of(64) {
                // Let the writer thread run.
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        } else {
            idle = 0;
        }
    }
    writer.join().unwrap();
    assert!(got == data, "seed {seed}: stream altered");
}

#[test]
fn bulk_host_to_guest_through_odd_rx_buffers_is_byte_exact() {
    // Small credit windows stall the device often; the default one (Linux:
    // 256 KiB) lets whole 64 KiB reads land in split buffers.
    for (seed, buf_alloc) in [(1, 256 << 10), (2, 12_345), (3, 64 << 10), (4, 4096)] {
        bulk_host_to_guest(seed, 3 << 20, buf_alloc);
    }
}

/// Guest -> host: `len` bytes in RW packets of random sizes within the
/// device's credit, each packet split over several tx descriptors at random
/// points (the header too), read by a slow host in random pieces.
fn bulk_guest_to_host(seed: u64, len: usize) {
    let mut r = Rng::new(seed);
    let mut h = Harness::activated();
    let port = 8000 + seed as u32;
    let (s, gport) = guest_connects(&mut h, port);
    let data = pattern(len, seed);
    let reader = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut r = Rng::new(seed ^ 0xdef);
            let mut got = Vec::new();
            let mut buf = vec![0u8; 100_000];
            loop {
                let want = r.range(1, buf.len() as u64) as usize;
                match s.read(&mut buf[..want]) {
                    Ok(0) => return got,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => panic!("{e}"),
                }
                if r.chance(8) {
                    std::thread::sleep(std::time::Duration::from_micros(r.range(1, 3000)));
                }
            }
        })
    };
    let (mut sent, mut fwd, mut buf_alloc) = (0usize, 0u32, 0u32);
    let mut idle = 0u32;
    h.post_rx(4);
    let _ = h.tx.used();
    for round in 0u64.. {
        assert!(round < 1_000_000, "stalled at {sent} of {len} bytes");
        for (hdr, _) in h.recv() {
            assert_eq!(hdr.op, OP_CREDIT_UPDATE, "{hdr:?}");
            (fwd, buf_alloc) = (hdr.fwd_cnt, hdr.buf_alloc);
        }
        if sent == len {
            break;
        }
        // Several packets per kick, each its own odd chain.
        let mut at = ODD_TX_BUFS;
        let mut queued = 0;
        for _ in 0..r.range(1, 4) {
            let credit = buf_alloc.wrapping_sub((sent as u32).wrapping_sub(fwd)) as usize;
            let n = (r.range(1, MAX_PKT_PAYLOAD as u64) as usize)
                .min(credit)
                .min(len - sent);
            if n == 0 {
                break;
            }
            let mut hdr = h.guest_hdr(OP_RW, gport, port);
            hdr.len = n as u32;
            let mut bytes = hdr.to_bytes().to_vec();
            bytes.extend_from_slice(&data[sent..sent + n]);
            let mut cuts: Vec<usize> = (0..r.range(0, 4))
                .map(|_| r.range(1, bytes.len() as u64 - 1) as usize)
                .collect();
            cuts.push(0);
            cuts.push(bytes.len());
            cuts.sort_unstable();
            cuts.dedup();
            let mut descs = Vec::new();
            for w in cuts.windows(2) {
                let piece = &bytes[w[0]..w[1]];
                h.mem.write_slice(piece, GuestAddress(at)).unwrap();
                descs.push((at, piece.len() as u32, 0));
                // A gap, and odd alignment, between pieces.
                at += piece.len() as u64 + r.range(1, 64);
            }
            h.tx.add(&descs);
            sent += n;
            queued += 1;
        }
        if queued > 0 {
            h.kick(TXQ);
            h.pump();
            assert_eq!(h.tx.used().len(), queued, "every tx chain is taken at once");
            idle = 0;
        } else {
            // Out of credit: wait for the host to read and the device to say
            // so, with rx buffers offered late.
            idle += 1;
            if r.chance(3) {
                h.post_rx(r.range(1, 4) as usize);
            } else {
                h.pump();
            }
            if r.chance(16) {
                h.send(h.guest_hdr(OP_CREDIT_REQUEST, gport, port), b"");
                let _ = h.tx.used();
            }
            if idle.is_multiple_of(8) {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
    }
    let mut shut = h.guest_hdr(OP_SHUTDOWN, gport, port);
    shut.flags = SHUTDOWN_SEND;
    h.send(shut, b"");
    // The device flushes what the host has not read yet as it drains.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !reader.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "host never saw the end"
        );
        h.pump();
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let got = reader.join().unwrap();
    if got != data {
        let bad = got.iter().zip(&data).position(|(a, b)| a != b);
        panic!(
            "seed {seed}: got {} of {len} bytes, first difference at {bad:?}",
            got.len()
        );
    }
}

#[test]
fn bulk_guest_to_host_through_odd_tx_chains_is_byte_exact() {
    for seed in 1..=3 {
        bulk_guest_to_host(seed, 3 << 20);
    }
}

/// After a restore the driver is told, once, on its event queue, that every
/// connection is gone (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, id 0): as soon as
/// it has posted an event buffer, and not before.
#[test]
fn a_restored_device_sends_one_transport_reset_event() {
    const EV_BUF: u64 = 0x8_0000;
    let mut h = Harness::new();
    let mut ev = h.activate_with_event_queue();
    // A device that was booted, not restored, keeps the buffers.
    h.mem.write_obj(u32::MAX, GuestAddress(EV_BUF)).unwrap();
    ev.add(&[(EV_BUF, 4, VRING_DESC_F_WRITE)]);
    h.kick(EVQ);
    h.pump();
    assert!(ev.used().is_empty(), "no event without a restore");

    h.dev.lock().unwrap().restored();
    h.pump();
    let used = ev.used();
    assert_eq!(used, vec![(0, 4)], "the held buffer carries the reset");
    assert_eq!(h.mem.read_obj::<u32>(GuestAddress(EV_BUF)).unwrap(), 0);
    // Once only.
    h.mem
        .write_obj(u32::MAX, GuestAddress(EV_BUF + 16))
        .unwrap();
    ev.add(&[(EV_BUF + 16, 4, VRING_DESC_F_WRITE)]);
    h.kick(EVQ);
    h.pump();
    assert!(ev.used().is_empty(), "a second event");
}

/// Restored before the driver posted an event buffer: the reset waits for one.
#[test]
fn a_transport_reset_waits_for_an_event_buffer() {
    const EV_BUF: u64 = 0x8_0000;
    let mut h = Harness::new();
    let mut ev = h.activate_with_event_queue();
    h.dev.lock().unwrap().restored();
    h.pump();
    // Too small for an event: returned empty, the reset still pending.
    ev.add(&[(EV_BUF, 2, VRING_DESC_F_WRITE)]);
    h.kick(EVQ);
    h.pump();
    assert_eq!(ev.used(), vec![(0, 0)]);
    h.mem
        .write_obj(u32::MAX, GuestAddress(EV_BUF + 16))
        .unwrap();
    ev.add(&[(EV_BUF + 16, 4, VRING_DESC_F_WRITE)]);
    h.kick(EVQ);
    h.pump();
    assert_eq!(ev.used(), vec![(1, 4)]);
    assert_eq!(h.mem.read_obj::<u32>(GuestAddress(EV_BUF + 16)).unwrap(), 0);
}
