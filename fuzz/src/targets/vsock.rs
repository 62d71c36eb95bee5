//! virtio-vsock and its muxer: guest packets of any header and length on
//! the TX queue, receive buffers of any shape, and host programs that
//! connect, send `CONNECT` lines, write, read, half-close and vanish, on
//! real Unix sockets. Beyond the bounds every target has, guest data the
//! device buffers stays within what it advertises per connection, and
//! every host stream it opened is closed again (the fd check).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln_devices::fuzzing::{
    Header, HDR_SIZE, HOST_CID, MAX_PKT_PAYLOAD, OP_REQUEST, OP_RESPONSE, OP_RW, OP_SHUTDOWN,
    TYPE_STREAM,
};
use kiln_devices::fuzzing::{CONN_BUF_ALLOC, MAX_CONNS, MAX_CONTROL};
use kiln_devices::virtio::vsock::Vsock;
use vm_memory::{Bytes, GuestAddress};

use crate::input::{Input, Script};
use crate::virtio::{Harness, RingScript, BUFFERS, RING_OPS};
use crate::Target;

pub const TARGET: Target = Target {
    name: "vsock",
    run,
    // Per connection, the guest data buffered for the host (at most the
    // advertised receive buffer; twice that while its deque grows), the
    // control queue, the payload scratch buffer, parsed chains and the
    // event loop.
    memory_cap: MAX_CONNS * 2 * CONN_BUF_ALLOC as usize
        + MAX_CONTROL * HDR_SIZE * 4
        + MAX_PKT_PAYLOAD
        + (1 << 20),
    memory_per_input_byte: 0,
    seeds,
};

const CID: u64 = 3;
const RXQ: u8 = 0;
const TXQ: u8 = 1;
/// Host ports with a listener behind them (`PATH_<port>`).
const LISTENING: [u32; 2] = [1000, 1001];
/// The first port of host-initiated connections (the muxer's choice).
const LOCAL_PORTS: u32 = 1 << 30;
/// Host streams the harness holds at once.
const MAX_STREAMS: usize = 16;

const OP_PACKET: u8 = RING_OPS;
const OP_RX_BUFFERS: u8 = RING_OPS + 1;
const OP_HOST_CONNECT: u8 = RING_OPS + 2;
const OP_HOST_WRITE: u8 = RING_OPS + 3;
const OP_HOST_READ: u8 = RING_OPS + 4;
const OP_HOST_CLOSE: u8 = RING_OPS + 5;
const OP_HOST_SHUTDOWN: u8 = RING_OPS + 6;
const OP_HOST_ACCEPT: u8 = RING_OPS + 7;
const OPS: u8 = RING_OPS + 8;

/// TX packets: 8 slots of header plus the largest payload.
const TX_SLOTS: u64 = 0x11_0000;
const TX_SLOT: u64 = 0x1_1000;
/// RX buffers as Linux posts them: a header buffer and a 4 KiB data buffer.
const RX_SLOT: u64 = 0x2000;
const RX_SLOTS: u64 = 32;

/// This process's socket directory (one per process, reused by inputs).
pub(crate) fn socket_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kiln-fuzz-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("socket directory");
        dir
    })
}

fn port_path(main: &Path, port: u32) -> PathBuf {
    let mut p = main.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// A port as a guest (or the harness) names it: a listening host port, a
/// host-initiated connection's port, a guest port, or anything.
fn port(input: &mut Input) -> u32 {
    let b = input.u8();
    match b & 3 {
        0 => LISTENING[usize::from(b >> 2) % LISTENING.len()],
        1 => LOCAL_PORTS + u32::from(b >> 2),
        2 => 1024 + u32::from(b >> 2),
        _ => input.u32(),
    }
}

struct Host {
    main: PathBuf,
    listeners: Vec<(UnixListener, PathBuf)>,
    streams: Vec<UnixStream>,
}

impl Host {
    fn new(main: PathBuf) -> Self {
        let listeners = LISTENING
            .iter()
            .map(|&p| {
                let path = port_path(&main, p);
                let _ = std::fs::remove_file(&path);
                let l = UnixListener::bind(&path).expect("bind a host port");
                l.set_nonblocking(true).expect("nonblocking");
                (l, path)
            })
            .collect();
        Self {
            main,
            listeners,
            streams: Vec::new(),
        }
    }

    fn add(&mut self, s: UnixStream) {
        if self.streams.len() < MAX_STREAMS && s.set_nonblocking(true).is_ok() {
            self.streams.push(s);
        }
    }

    fn pick(&mut self, input: &mut Input) -> Option<&mut UnixStream> {
        let i = input.u8();
        let n = self.streams.len();
        (n > 0).then(|| &mut self.streams[usize::from(i) % n])
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for (_, path) in &self.listeners {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let main = socket_dir().join("v.sock");
    let vsock = Vsock::new(CID, &main).expect("vsock device");
    let mut h = Harness::new(vsock);
    let mut host = Host::new(main);
    let mut scratch = vec![0u8; 1 << 16];
    let mut tx_slot = 0u64;
    while !input.is_empty() {
        match input.u8() % OPS {
            OP_PACKET => {
                let at = TX_SLOTS + (tx_slot % 8) * TX_SLOT;
                tx_slot += 1;
                guest_packet(&mut h, &mut input, at);
                h.kick(usize::from(TXQ));
            }
            OP_RX_BUFFERS => {
                for k in 0..1 + input.below(16) as u64 {
                    let at = BUFFERS + (k % RX_SLOTS) * RX_SLOT;
                    let ring = &mut h.rings[usize::from(RXQ)];
                    ring.add_chain(
                        &h.mem,
                        &[(at, HDR_SIZE as u32, true), (at + 0x100, 4096, true)],
                    );
                }
                h.kick(usize::from(RXQ));
            }
            OP_HOST_CONNECT => {
                if let Ok(s) = UnixStream::connect(&host.main) {
                    host.add(s);
                }
                h.pump();
            }
            OP_HOST_WRITE => {
                let bytes = input.bytes();
                if let Some(s) = host.pick(&mut input) {
                    let _ = s.write(bytes);
                }
                h.pump();
            }
            OP_HOST_READ => {
                if let Some(s) = host.pick(&mut input) {
                    let _ = s.read(&mut scratch);
                }
                h.pump();
            }
            OP_HOST_CLOSE => {
                let n = host.streams.len();
                let i = input.u8();
                if n > 0 {
                    host.streams.swap_remove(usize::from(i) % n);
                }
                h.pump();
            }
            OP_HOST_SHUTDOWN => {
                let how = match input.below(3) {
                    0 => Shutdown::Read,
                    1 => Shutdown::Write,
                    _ => Shutdown::Both,
                };
                if let Some(s) = host.pick(&mut input) {
                    let _ = s.shutdown(how);
                }
                h.pump();
            }
            OP_HOST_ACCEPT => {
                let l = input.below(host.listeners.len());
                if let Ok((s, _)) = host.listeners[l].0.accept() {
                    host.add(s);
                }
                h.pump();
            }
            op => h.ring_op(op, &mut input),
        }
    }
}

/// A guest packet on the TX queue: a header with fields from the input
/// (the claimed length may disagree with the payload), the payload, in one
/// descriptor or split after the header.
fn guest_packet(h: &mut Harness<Vsock>, input: &mut Input, at: u64) {
    let op = match input.u8() % 8 {
        0 => input.u16(),
        op => u16::from(op),
    };
    let src_cid = if input.bool() { input.u64() } else { CID };
    let dst_cid = if input.bool() { input.u64() } else { HOST_CID };
    let src_port = port(input);
    let dst_port = port(input);
    let type_ = if input.bool() {
        input.u16()
    } else {
        TYPE_STREAM
    };
    let flags = u32::from(input.u8());
    let buf_alloc = input.u32();
    let fwd_cnt = input.u32();
    let payload = input.bytes();
    let claimed = if input.bool() {
        input.u32()
    } else {
        payload.len() as u32
    };
    let split = input.bool();
    // The chain may hold more than the payload: zeroes from guest memory.
    let extra = u32::from(input.u16());
    let hdr = Header {
        src_cid,
        dst_cid,
        src_port,
        dst_port,
        len: claimed,
        type_,
        op,
        flags,
        buf_alloc,
        fwd_cnt,
    };
    let _ = h.mem.write_slice(&hdr.to_bytes(), GuestAddress(at));
    let body = at + HDR_SIZE as u64;
    let _ = h.mem.write_slice(payload, GuestAddress(body));
    let body_len = (payload.len() as u32 + extra).min(MAX_PKT_PAYLOAD as u32 + 64);
    let ring = &mut h.rings[usize::from(TXQ)];
    if split {
        ring.add_chain(
            &h.mem,
            &[(at, HDR_SIZE as u32, false), (body, body_len, false)],
        );
    } else {
        ring.add_chain(&h.mem, &[(at, HDR_SIZE as u32 + body_len, false)]);
    }
}

/// A guest packet as `guest_packet` reads it: listed ports are written
/// raw, CIDs are the usual ones.
#[allow(clippy::too_many_arguments)]
fn script_packet<'a>(
    s: &'a mut Script,
    op: u16,
    src_port: u32,
    dst_port: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    flags: u8,
    payload: &[u8],
) -> &'a mut Script {
    assert!((1..8).contains(&op));
    s.u8(OP_PACKET).u8(op as u8).u8(0).u8(0);
    s.u8(3).u32(src_port).u8(3).u32(dst_port);
    s.u8(0).u8(flags).u32(buf_alloc).u32(fwd_cnt);
    s.bytes(payload).u8(0).u8(0).u16(0);
    s.kick(TXQ)
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let guest_port = 50_000;
    let credit = 1 << 20;
    // The guest connects to a listening host port, sends data, reads the
    // host's answer and shuts down: a whole stream's life.
    let mut s = Script::new();
    s.activate(3, 256, u64::MAX);
    s.u8(OP_RX_BUFFERS).u8(7);
    script_packet(&mut s, OP_REQUEST, guest_port, 1000, credit, 0, 0, &[]);
    s.u8(OP_HOST_ACCEPT).u8(0);
    script_packet(
        &mut s,
        OP_RW,
        guest_port,
        1000,
        credit,
        0,
        0,
        b"GET / HTTP/1.0\r\n\r\n",
    );
    s.u8(OP_HOST_READ).u8(0);
    s.u8(OP_HOST_WRITE)
        .bytes(b"HTTP/1.0 200 OK\r\n\r\nhello")
        .u8(0);
    s.u8(OP_RX_BUFFERS).u8(3);
    script_packet(&mut s, OP_SHUTDOWN, guest_port, 1000, credit, 24, 3, &[]);
    let guest_connect = s.build();

    // A host program connects to the main socket and asks for guest port
    // 52; the guest accepts and the host writes.
    let mut s = Script::new();
    s.activate(3, 64, u64::MAX);
    s.u8(OP_RX_BUFFERS).u8(3);
    s.u8(OP_HOST_CONNECT);
    s.u8(OP_HOST_WRITE).bytes(b"CONNECT 52\n").u8(0);
    script_packet(&mut s, OP_RESPONSE, 52, LOCAL_PORTS, credit, 0, 0, &[]);
    s.u8(OP_HOST_READ).u8(0);
    s.u8(OP_HOST_WRITE).bytes(b"hello guest").u8(0);
    s.u8(OP_HOST_CLOSE).u8(0);
    let host_connect = s.build();

    // A packet to nobody (answered with a reset) and one claiming more
    // payload than it carries.
    let mut s = Script::new();
    s.activate(3, 16, u64::MAX);
    s.u8(OP_RX_BUFFERS).u8(0);
    script_packet(&mut s, OP_REQUEST, 7, 9, 0, 0, 0, &[]);
    s.u8(OP_PACKET).u8(OP_RW as u8).u8(0).u8(0).u8(2).u8(2);
    s.u8(0)
        .u8(0)
        .u32(0)
        .u32(0)
        .bytes(b"short")
        .u8(1)
        .u32(1 << 16)
        .u8(0)
        .u16(0);
    let hostile = s.kick(TXQ).build();
    vec![
        ("guest-connect", guest_connect),
        ("host-connect", host_connect),
        ("reset-and-truncated", hostile),
    ]
}
