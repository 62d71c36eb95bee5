//! virtio-net TX and RX: transmit chains from a hostile driver, receive
//! buffers of any shape, and frames of any size and header from the
//! backend (a datagram socket standing in for the TAP). Every frame the
//! device sends out must be one the TAP can take as it is: a whole Ethernet
//! frame within the size limit behind a header that only asks for the
//! offloads the driver negotiated, with its lengths and offsets within the
//! frame.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;

use kiln_devices::fuzzing::{
    self, NET_HDR_LEN as VNET_HDR_LEN, NET_MAX_FRAME_LEN as MAX_FRAME_LEN,
    NET_QUEUE_SIZE as QUEUE_SIZE,
};
use kiln_devices::virtio::net::{MacAddr, NetBackend};
use virtio_bindings::virtio_net as vn;

use crate::input::{Input, Script};
use crate::virtio::{Harness, RingScript, BUFFERS, OP_ACTIVATE, RING_OPS};
use crate::Target;

pub const TARGET: Target = Target {
    name: "net",
    run,
    // One frame buffer each way, the RX chains held for a frame (at most a
    // ring of chains of at most a ring of segments), the harness's own
    // frame and the event loop.
    memory_cap: 4 * MAX_FRAME_LEN + (QUEUE_SIZE as usize).pow(2) * 32 + (512 << 10),
    memory_per_input_byte: 0,
    seeds,
};

const OP_INJECT: u8 = RING_OPS;
const OP_DRAIN: u8 = RING_OPS + 1;
const OPS: u8 = RING_OPS + 2;
const RXQ: u8 = 0;
const TXQ: u8 = 1;

/// The device's end of the socket pair.
pub(crate) struct Backend(pub(crate) UnixDatagram);

impl Read for Backend {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
}

impl Write for Backend {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Backend {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for Backend {
    fn set_offload(&mut self, _tun_flags: u32) -> io::Result<()> {
        Ok(())
    }
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let (device_end, peer) = UnixDatagram::pair().expect("socketpair");
    device_end.set_nonblocking(true).expect("nonblocking");
    peer.set_nonblocking(true).expect("nonblocking");
    let mac = MacAddr([0x02, 0, 0, 0, 0, 1]);
    let mtu = input.bool().then(|| input.u16());
    let net = fuzzing::net(Backend(device_end), "fuzz", mac, mtu).expect("eventfd");
    let mut h = Harness::new(net);
    let mut frame = Vec::new();
    while !input.is_empty() {
        match input.u8() % OPS {
            OP_INJECT => {
                inject(&peer, &mut input, &mut frame);
                h.pump();
            }
            OP_DRAIN => drain(&peer, h.features, &mut frame),
            op => {
                if op == OP_ACTIVATE {
                    // Frames sent so far are checked against the old features.
                    drain(&peer, h.features, &mut frame);
                }
                h.ring_op(op, &mut input);
            }
        }
    }
    drain(&peer, h.features, &mut frame);
}

/// Sends the device one frame: a 12-byte header from the input, then a
/// frame of the given length filled from the input (any size, up to past
/// the largest the device takes).
fn inject(peer: &UnixDatagram, input: &mut Input, frame: &mut Vec<u8>) {
    let header = input.take(VNET_HDR_LEN);
    let len = (input.buf_len() as usize) % (MAX_FRAME_LEN + 64);
    let fill = input.bytes();
    frame.clear();
    frame.extend_from_slice(header);
    frame.resize(VNET_HDR_LEN, 0);
    frame.extend((0..len).map(|i| fill.get(i % fill.len().max(1)).copied().unwrap_or(0)));
    // A full socket drops it, as a TAP queue would.
    let _ = peer.send(frame);
}

/// Takes every frame the device sent and checks it.
fn drain(peer: &UnixDatagram, features: u64, frame: &mut Vec<u8>) {
    frame.resize(VNET_HDR_LEN + MAX_FRAME_LEN + 64, 0);
    while let Ok(n) = peer.recv(frame) {
        check_tx_frame(&frame[..n], features);
    }
}

fn check_tx_frame(frame: &[u8], features: u64) {
    let has = |bit: u32| features & (1 << bit) != 0;
    assert!(
        (VNET_HDR_LEN + 14..=VNET_HDR_LEN + MAX_FRAME_LEN).contains(&frame.len()),
        "the device sent a {} byte frame to the TAP",
        frame.len()
    );
    let (flags, gso) = (frame[0], frame[1]);
    let needs_csum = vn::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    assert_eq!(
        flags & !needs_csum,
        0,
        "header flags {flags:#x} sent to the TAP"
    );
    assert!(
        flags == 0 || has(vn::VIRTIO_NET_F_CSUM),
        "checksum offload the driver did not negotiate"
    );
    assert_eq!(&frame[10..12], &[0, 0], "num_buffers sent to the TAP");
    let allowed = match u32::from(gso) {
        vn::VIRTIO_NET_HDR_GSO_NONE => true,
        vn::VIRTIO_NET_HDR_GSO_TCPV4 => has(vn::VIRTIO_NET_F_HOST_TSO4) && flags != 0,
        vn::VIRTIO_NET_HDR_GSO_TCPV6 => has(vn::VIRTIO_NET_F_HOST_TSO6) && flags != 0,
        _ => false,
    };
    assert!(
        allowed,
        "GSO type {gso} sent to the TAP (features {features:#x})"
    );
    // What the TAP refuses besides: lengths and offsets past the frame, a
    // segment size of 0.
    let field = |at: usize| u32::from(u16::from_le_bytes([frame[at], frame[at + 1]]));
    let frame_len = (frame.len() - VNET_HDR_LEN) as u32;
    assert!(
        field(2) <= frame_len,
        "hdr_len {} sent with a {frame_len} byte frame",
        field(2)
    );
    assert!(
        flags == 0 || field(6) + field(8) + 2 <= frame_len,
        "checksum at {} + {} sent with a {frame_len} byte frame",
        field(6),
        field(8)
    );
    assert!(
        u32::from(gso) == vn::VIRTIO_NET_HDR_GSO_NONE || field(4) != 0,
        "GSO with gso_size 0 sent to the TAP"
    );
}

/// An Ethernet frame as a guest sends it: a virtio header (no offloads),
/// then broadcast destination, a source MAC, an ethertype and a payload.
fn ethernet(payload_len: usize) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend((0..payload_len).map(|i| i as u8));
    f
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let features = u64::MAX;
    let tx_frame = ethernet(50);
    let tx = Script::new()
        .u8(0)
        .activate(2, 256, features)
        // Linux's TX chain: the header and the frame in one buffer.
        .mem(BUFFERS, &tx_frame)
        .chain(TXQ, &[(BUFFERS, tx_frame.len() as u32, false)])
        .kick(TXQ)
        .u8(OP_DRAIN)
        .build();

    let mut rx = Script::new();
    rx.u8(1).u16(1500).activate(2, 16, features);
    // Two mergeable receive buffers, then a frame from the TAP.
    rx.chain(RXQ, &[(BUFFERS, 2048, true)])
        .chain(RXQ, &[(BUFFERS + 0x1000, 2048, true)])
        .kick(RXQ);
    let frame = ethernet(1000);
    rx.u8(OP_INJECT)
        .raw(&frame[..VNET_HDR_LEN])
        .buf_len((frame.len() - VNET_HDR_LEN) as u32)
        .bytes(&frame[VNET_HDR_LEN..]);
    let rx = rx.build();

    // A 64 KiB TSO frame to a guest without mergeable buffers.
    let mut gso = Script::new();
    gso.u8(0).activate(2, 8, 1 << vn::VIRTIO_NET_F_GUEST_CSUM);
    gso.chain(RXQ, &[(0x11_0000, 0x1_0000, true)]).kick(RXQ);
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[0] = vn::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    hdr[1] = vn::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    gso.u8(OP_INJECT)
        .raw(&hdr)
        .buf_len(65_000)
        .bytes(b"payload");
    let gso = gso.build();
    vec![
        ("tx-frame", tx),
        ("rx-mergeable", rx),
        ("rx-gso-unwanted", gso),
    ]
}
