//! virtio-net receive: frames from the backend into the guest's RX buffers.
//!
//! A frame is read once and kept in `rx_frame` until guest buffers take it
//! (or it is dropped and counted); with mergeable buffers it may span
//! several chains, which are held until enough room is there.

use std::io;

use event_manager::EventOps;
use virtio_bindings::virtio_net as vn;
use virtio_queue::QueueT;

use super::{
    bit, Net, NetBackend, GSO_NONE, GSO_TCPV4, GSO_TCPV6, HDR_F_DATA_VALID, HDR_F_NEEDS_CSUM,
    MAX_FRAME_LEN, MIN_FRAME_LEN, QUEUE_SIZE, RXQ,
};
use crate::tap::VNET_HDR_LEN;
use crate::virtio::chain::{Chain, Layout, Limits};
use crate::virtio::queue::{pop_chain, return_chain};

/// Frames moved per event before returning to the event loop.
const RX_BUDGET: usize = 64;
/// Receive chains are room for a frame only, at most a ring long.
const RX_SHAPE: (Layout, Limits) = (Layout::WriteOnly, Limits::descriptors(QUEUE_SIZE as usize));

/// Result of trying to hand the pending frame to the guest.
enum Delivery {
    Delivered,
    Dropped,
    /// The ring ran dry: wait for the guest's RX kick.
    NoBuffers,
    /// A ring's worth of chains was taken without room for the frame
    /// appearing (the guest keeps offering bad ones): go on next turn.
    Later,
}

/// Result of taking RX chains for a frame.
enum Hold {
    /// Enough room is held (or every buffer the ring can hold is, and the
    /// frame still does not fit: the caller drops it).
    Enough,
    Dry,
    Budget,
}

impl<B: NetBackend> Net<B> {
    /// Moves frames from the backend to the guest until the backend is
    /// empty, the guest has no buffers, or the budget is spent.
    pub(super) fn process_rx(&mut self, ops: &mut EventOps) {
        let used_before = self.virtio.active().map(|a| a.queues[RXQ].next_used());
        // Whether the ring was looked at again after it ran dry, with no
        // frame moved since.
        let mut looked_again = false;
        for _ in 0..RX_BUDGET {
            if self.rx_frame_len == 0 {
                match self.backend.read(&mut self.rx_frame) {
                    Ok(n) => self.rx_frame_len = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::error!(
                            "{}: reading the backend failed: {e}; receive stops",
                            self.virtio.label()
                        );
                        self.backend_failed = true;
                        self.unwatch_backend(ops);
                        break;
                    }
                }
                if self.rx_frame_len == 0 {
                    break;
                }
                self.rx_frame_paid = false;
            }
            if !self.rx_frame_paid {
                let frame_len = self.rx_frame_len.saturating_sub(VNET_HDR_LEN) as u64;
                if !self.rx_throttle.admit(frame_len) {
                    // The frame waits in rx_frame and the TAP is left alone
                    // until the timer fires.
                    self.counters.rx_rate_limited.inc();
                    self.unwatch_backend(ops);
                    break;
                }
                self.rx_frame_paid = true;
            }
            match self.deliver_rx_frame() {
                Delivery::Delivered => {
                    self.rx_frame_len = 0;
                    looked_again = false;
                }
                Delivery::Dropped => {
                    self.counters.rx_dropped.inc();
                    self.rx_frame_len = 0;
                    looked_again = false;
                }
                Delivery::NoBuffers => {
                    // Wait for the guest's RX kick. Ask for it first (event
                    // index), then look again in case buffers arrived
                    // meanwhile: once, as an avail index that yields nothing
                    // (garbage) always claims more.
                    let retry = !looked_again
                        && self
                            .virtio
                            .active_mut()
                            .map(|a| a.queues[RXQ].enable_notification(&a.mem))
                            .is_some_and(|r| r.unwrap_or(false));
                    if retry {
                        looked_again = true;
                        continue;
                    }
                    self.unwatch_backend(ops);
                    break;
                }
                Delivery::Later => {
                    self.virtio.kick(RXQ);
                    break;
                }
            }
        }
        let used_after = self.virtio.active().map(|a| a.queues[RXQ].next_used());
        if used_after.is_some() && used_after != used_before {
            self.virtio.signal_used(RXQ);
        }
    }

    /// Takes RX chains until `needed` bytes fit (or one chain without
    /// mergeable buffers), popping at most a ring's worth per call.
    /// Malformed chains are completed with length 0.
    fn hold_rx_chains(&mut self, needed: usize, mergeable: bool) -> Hold {
        let Some(a) = self.virtio.active_mut() else {
            return Hold::Dry;
        };
        let queue = &mut a.queues[RXQ];
        let mut held_cap: u64 = self.held.iter().map(Chain::writable_len).sum();
        let qsize = usize::from(queue.size());
        let mut popped = 0;
        loop {
            let enough = if mergeable {
                held_cap >= needed as u64
            } else {
                !self.held.is_empty()
            };
            // With every buffer the ring can hold here, the frame does not
            // fit: the caller drops it.
            if enough || self.held.len() >= qsize {
                return Hold::Enough;
            }
            if popped >= qsize {
                return Hold::Budget;
            }
            let Some(descriptors) = pop_chain(queue, &a.mem) else {
                return Hold::Dry;
            };
            popped += 1;
            let (layout, limits) = RX_SHAPE;
            let chain = Chain::parsed(&a.mem, descriptors, layout, limits);
            if chain.check().is_ok() && chain.writable_len() >= VNET_HDR_LEN as u64 {
                held_cap += chain.writable_len();
                self.held.push(chain);
            } else {
                self.counters.rx_bad_chains.inc();
                return_chain(queue, &a.mem, chain.head(), 0);
            }
        }
    }

    fn deliver_rx_frame(&mut self) -> Delivery {
        let len = self.rx_frame_len;
        let Some(features) = self.virtio.active().map(|a| a.features) else {
            return Delivery::Dropped;
        };
        let mergeable = features & bit(vn::VIRTIO_NET_F_MRG_RXBUF) != 0;
        if !(VNET_HDR_LEN + MIN_FRAME_LEN..=VNET_HDR_LEN + MAX_FRAME_LEN).contains(&len) {
            return Delivery::Dropped;
        }
        let Some(gso) = check_rx_header(&mut self.rx_frame[..VNET_HDR_LEN], features) else {
            return Delivery::Dropped;
        };
        match self.hold_rx_chains(len, mergeable) {
            Hold::Enough => {}
            Hold::Dry => return Delivery::NoBuffers,
            Hold::Budget => return Delivery::Later,
        }
        // How many held chains the frame needs.
        let mut count = 0;
        let mut cap = 0u64;
        for c in &self.held {
            if cap >= len as u64 {
                break;
            }
            cap += c.writable_len();
            count += 1;
            if !mergeable {
                break;
            }
        }
        if cap < len as u64 {
            return Delivery::Dropped;
        }
        let num_buffers = count as u16;
        self.rx_frame[10..12].copy_from_slice(&num_buffers.to_le_bytes());

        let Some(a) = self.virtio.active_mut() else {
            return Delivery::Dropped;
        };
        let mut off = 0usize;
        for c in self.held.drain(..count) {
            let n = c.writer().write(&a.mem, &self.rx_frame[off..len]);
            off += n;
            return_chain(&mut a.queues[RXQ], &a.mem, c.head(), n as u32);
        }
        let frame = (len - VNET_HDR_LEN) as u64;
        let c = &self.counters;
        c.rx_frames.inc();
        c.rx_bytes.add(frame);
        c.rx_max_frame.raise_to(frame);
        if self.rx_frame[0] & HDR_F_NEEDS_CSUM != 0 {
            c.rx_csum.inc();
        }
        c.rx_buffers.add(count as u64);
        if gso {
            c.rx_gso.inc();
        }
        Delivery::Delivered
    }

    /// The guest added RX buffers, or the receive limit's timer fired.
    pub(super) fn rx_kick(&mut self, ops: &mut EventOps) {
        // While the limit waits, its timer resumes receiving.
        if !self.virtio.is_active() || self.rx_throttle.is_blocked() {
            return;
        }
        // The guest added buffers: resume receiving (the pending frame first).
        self.watch_backend(ops);
        if self.backend_watched {
            self.process_rx(ops);
        }
    }
}

/// Checks an RX header from the backend against the guest's offloads;
/// returns whether it is a GSO frame, or None to drop it.
fn check_rx_header(hdr: &mut [u8], features: u64) -> Option<bool> {
    let has = |feature: u32| features & bit(feature) != 0;
    if !has(vn::VIRTIO_NET_F_GUEST_CSUM) {
        if hdr[0] & HDR_F_NEEDS_CSUM != 0 {
            return None;
        }
        // DATA_VALID is only meaningful to a driver that negotiated GUEST_CSUM.
        hdr[0] = 0;
    }
    hdr[0] &= HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID;
    match hdr[1] {
        GSO_NONE => Some(false),
        GSO_TCPV4 if has(vn::VIRTIO_NET_F_GUEST_TSO4) => Some(true),
        GSO_TCPV6 if has(vn::VIRTIO_NET_F_GUEST_TSO6) => Some(true),
        _ => None,
    }
}
