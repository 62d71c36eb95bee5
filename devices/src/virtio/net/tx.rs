//! virtio-net transmit: frames from the guest's TX chains to the backend.

use std::io;

use virtio_bindings::virtio_net as vn;
use vm_memory::GuestMemoryMmap;

use super::{
    bit, Net, NetBackend, NetCounters, GSO_NONE, GSO_TCPV4, GSO_TCPV6, HDR_F_DATA_VALID,
    HDR_F_NEEDS_CSUM, MAX_TX_CHAIN_LEN, MIN_FRAME_LEN, QUEUE_SIZE, TXQ,
};
use crate::tap::VNET_HDR_LEN;
use crate::virtio::chain::{Chain, Layout, Limits};
use crate::virtio::queue::Served;

/// Chains sent per event before returning to the event loop.
const TX_BUDGET: usize = 64;
/// Transmit chains are a header and a frame, device-readable only.
const TX_SHAPE: (Layout, Limits) = (
    Layout::ReadOnly,
    Limits::descriptors(QUEUE_SIZE as usize).with_max_bytes(MAX_TX_CHAIN_LEN as u64),
);

impl<B: NetBackend> Net<B> {
    /// Sends the TX chains (up to a budget), unless the transmit rate limit
    /// waits for its timer; a chain it cannot pay for stays in the ring.
    pub(super) fn process_tx(&mut self) {
        if self.tx_throttle.is_blocked() {
            return;
        }
        let features = self.virtio.active().map_or(0, |a| a.features);
        let label = self.virtio.label().to_owned();
        let (backend, frame, counters) = (&mut self.backend, &mut self.tx_frame, &*self.counters);
        let throttle = &mut self.tx_throttle;
        self.virtio.serve(TXQ, TX_BUDGET, TX_SHAPE, |mem, chain| {
            let frame_len = chain.readable_len().saturating_sub(VNET_HDR_LEN as u64);
            if !throttle.admit(frame_len) {
                counters.tx_rate_limited.inc();
                return Served::Later;
            }
            transmit(mem, chain, features, frame, backend, counters, &label);
            // TX chains are only read: nothing written into them.
            Served::Used(0)
        });
    }
}

/// Sends the frame of one TX chain, or counts why not.
fn transmit(
    mem: &GuestMemoryMmap,
    chain: &Chain,
    features: u64,
    frame: &mut [u8],
    backend: &mut impl NetBackend,
    counters: &NetCounters,
    label: &str,
) {
    let len = chain.readable_len() as usize;
    let whole = chain.check().is_ok() && len >= VNET_HDR_LEN + MIN_FRAME_LEN;
    if !whole || chain.reader().read_exact(mem, &mut frame[..len]).is_err() {
        if counters.tx_malformed.get() == 0 {
            log::debug!(
                "{label}: malformed TX chain ({} bytes): {:?}",
                len,
                chain.fault()
            );
        }
        counters.tx_malformed.inc();
        return;
    }
    let frame_len = (len - VNET_HDR_LEN) as u32;
    let Some(gso) = check_tx_header(&mut frame[..VNET_HDR_LEN], features, frame_len) else {
        counters.tx_malformed.inc();
        return;
    };
    let frame = &frame[..len];
    // One write is one frame: a TAP takes all of it or none.
    let sent = match backend.write(frame) {
        Ok(n) if n == frame.len() => Ok(()),
        Ok(n) => Err(io::Error::other(format!(
            "took {n} of {} bytes",
            frame.len()
        ))),
        Err(e) => Err(e),
    };
    match sent {
        Ok(()) => {
            let bytes = (len - VNET_HDR_LEN) as u64;
            counters.tx_frames.inc();
            counters.tx_bytes.add(bytes);
            counters.tx_max_frame.raise_to(bytes);
            if gso {
                counters.tx_gso.inc();
            }
            if frame[0] & HDR_F_NEEDS_CSUM != 0 {
                counters.tx_csum.inc();
            }
        }
        Err(e) => {
            if counters.tx_errors.get() == 0 {
                log::warn!("{label}: the backend refused a frame: {e}");
            }
            counters.tx_errors.inc();
        }
    }
}

/// Checks a TX header from the guest against what it negotiated and the
/// frame behind it (`frame_len` bytes); returns whether it is a GSO frame,
/// or None for a malformed one.
fn check_tx_header(hdr: &mut [u8], features: u64, frame_len: u32) -> Option<bool> {
    let flags = hdr[0];
    if flags & !(HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID) != 0 {
        return None;
    }
    if flags & HDR_F_NEEDS_CSUM != 0 && features & bit(vn::VIRTIO_NET_F_CSUM) == 0 {
        return None;
    }
    // DATA_VALID is an RX-only flag.
    hdr[0] &= HDR_F_NEEDS_CSUM;
    hdr[10] = 0;
    hdr[11] = 0;
    let gso = match hdr[1] {
        GSO_NONE => false,
        GSO_TCPV4 if features & bit(vn::VIRTIO_NET_F_HOST_TSO4) != 0 => true,
        GSO_TCPV6 if features & bit(vn::VIRTIO_NET_F_HOST_TSO6) != 0 => true,
        _ => return None,
    };
    // Segmentation needs the checksum offload the spec ties it to.
    if gso && hdr[0] & HDR_F_NEEDS_CSUM == 0 {
        return None;
    }
    // Lengths and offsets past the frame, and a segment size of 0, which
    // the TAP refuses too: refused here, they are the guest's mistake
    // (counted as such), not the backend's.
    let field = |at: usize| u32::from(u16::from_le_bytes([hdr[at], hdr[at + 1]]));
    let (hdr_len, gso_size, csum_start, csum_offset) = (field(2), field(4), field(6), field(8));
    let csum_end = csum_start + csum_offset + 2;
    if hdr_len > frame_len
        || (hdr[0] & HDR_F_NEEDS_CSUM != 0 && csum_end > frame_len)
        || (gso && gso_size == 0)
    {
        return None;
    }
    Some(gso)
}
