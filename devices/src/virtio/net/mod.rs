//! virtio-net (device ID 1) over a TAP interface.
//!
//! Two queues: 0 = receive (frames for the guest), 1 = transmit. Both are
//! served from the monitor's event loop: the TX queue on its kick, the RX
//! queue whenever the TAP is readable and the guest has posted buffers. When
//! the guest has no RX buffers left the TAP is taken out of the epoll set (the
//! frame already read waits in `rx_frame`) until the guest kicks the RX queue,
//! so the loop never spins on a readable TAP nobody can drain.
//!
//! Every frame carries a 12-byte `virtio_net_hdr_v1` in both directions, the
//! same layout the TAP uses (IFF_VNET_HDR, TUNSETVNETHDRSZ 12), so headers
//! pass through after a check against the negotiated offloads.

pub mod chain;

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_net as vn;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::chain::{Direction, Segment};
use super::VIRTIO_RING_F_EVENT_IDX;
use super::{ActivateError, Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::tap::{Tap, TapError, VNET_HDR_LEN};

/// Virtio device ID of a network card.
pub const DEVICE_ID_NET: u32 = 1;
/// Queue size offered for both queues.
pub const QUEUE_SIZE: u16 = 256;
/// Largest Ethernet frame (without the virtio header) in either direction:
/// a 64 KiB GSO packet plus Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65536 + 14 + 4 + 8;
/// Largest MTU the device offers (MTU + Ethernet + VLAN headers fit in
/// `MAX_FRAME_LEN`).
pub const MAX_MTU: u16 = u16::MAX;
const _: () = assert!(MAX_MTU as usize + 18 <= MAX_FRAME_LEN);
/// Largest TX chain: header plus frame.
pub const MAX_TX_CHAIN_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Shortest frame a TAP accepts: an Ethernet header.
const MIN_FRAME_LEN: usize = 14;
/// Frames moved per event before returning to the event loop.
const RX_BUDGET: usize = 64;

const fn bit(n: u32) -> u64 {
    1 << n
}

/// Offered features: checksum offload and TCP segmentation offload in both
/// directions, mergeable RX buffers, MAC and link status.
pub const NET_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | bit(vn::VIRTIO_NET_F_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_CSUM)
    | bit(vn::VIRTIO_NET_F_MAC)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO4)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO6)
    | bit(vn::VIRTIO_NET_F_HOST_TSO4)
    | bit(vn::VIRTIO_NET_F_HOST_TSO6)
    | bit(vn::VIRTIO_NET_F_MRG_RXBUF)
    | bit(vn::VIRTIO_NET_F_STATUS);

const HDR_F_NEEDS_CSUM: u8 = vn::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
const HDR_F_DATA_VALID: u8 = vn::VIRTIO_NET_HDR_F_DATA_VALID as u8;
const GSO_NONE: u8 = vn::VIRTIO_NET_HDR_GSO_NONE as u8;
const GSO_TCPV4: u8 = vn::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
const GSO_TCPV6: u8 = vn::VIRTIO_NET_HDR_GSO_TCPV6 as u8;
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

// Event-loop tokens.
const TOKEN_RXQ: u32 = 0;
const TOKEN_TXQ: u32 = 1;
const TOKEN_BACKEND: u32 = 2;
const TOKEN_ACTIVATE: u32 = 3;

/// Where frames go and come from: a TAP in production, a socket pair in
/// tests. Every read and write is one whole frame with its 12-byte header.
pub trait NetBackend: Read + Write + AsRawFd + Send {
    /// Which offloads the guest accepts on RX (`TUN_F_*` flags).
    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()>;
}

impl NetBackend for Tap {
    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()> {
        Tap::set_offload(self, tun_flags).map_err(io::Error::other)
    }
}

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Parses `aa:bb:cc:dd:ee:ff` (or with `-`); refuses multicast and zero.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid MAC address '{text}' (expected six hex pairs like 02:00:00:00:00:01)")
        };
        let parts: Vec<&str> = text.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (b, p) in mac.iter_mut().zip(parts) {
            if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if mac[0] & 1 != 0 {
            return Err(format!("MAC address '{text}' is a multicast address"));
        }
        if mac == [0; 6] {
            return Err(format!("MAC address '{text}' is all zeros"));
        }
        Ok(Self(mac))
    }

    /// A locally administered unicast address derived from `seed` (the TAP
    /// name): stable across runs, different for different interfaces.
    pub fn derived(seed: &str) -> Self {
        // FNV-1a, 64 bit.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_le_bytes();
        Self([0x02, b[0], b[1], b[2], b[3], b[4]])
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Counters: nothing is dropped without being counted here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// RX frames that were GSO (TSO) packets.
    pub rx_gso_frames: u64,
    /// RX chains used for all frames (more than rx_frames with mergeable buffers).
    pub rx_buffers: u64,
    /// Frames from the backend the guest cannot take (too big for its
    /// buffers, or offloads it did not negotiate).
    pub rx_dropped: u64,
    /// RX chains the guest got wrong (completed with length 0).
    pub rx_bad_chains: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// TX frames that were GSO (TSO) packets.
    pub tx_gso_frames: u64,
    /// TX chains the guest got wrong, or headers with offloads it did not
    /// negotiate (completed with length 0, not sent).
    pub tx_malformed: u64,
    /// Frames the backend refused to take.
    pub tx_errors: u64,
    /// Frames whose checksum the other side completes (NEEDS_CSUM).
    pub rx_csum_frames: u64,
    pub tx_csum_frames: u64,
    /// Longest frame (without the virtio header) in each direction.
    pub rx_max_frame: u64,
    pub tx_max_frame: u64,
}

/// An RX chain taken from the queue but not yet used.
struct HeldChain {
    head: u16,
    segments: Vec<Segment>,
    capacity: usize,
}

struct Active {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    interrupt: Interrupt,
    features: u64,
}

impl Active {
    fn has(&self, feature: u32) -> bool {
        self.features & bit(feature) != 0
    }
}

/// Result of trying to hand the pending frame to the guest.
enum Delivery {
    Delivered,
    Dropped,
    NoBuffers,
}

pub struct Net<B: NetBackend> {
    backend: B,
    label: String,
    mac: MacAddr,
    /// Offered to the driver (VIRTIO_NET_F_MTU) when set.
    mtu: Option<u16>,
    queue_evts: Vec<EventFd>,
    /// Written by `activate` (on a vCPU thread) so the event loop starts
    /// watching the backend.
    activate_evt: EventFd,
    active: Option<Active>,
    /// The backend's fd is in the epoll set.
    backend_watched: bool,
    /// The backend failed for good; it is not watched again.
    backend_failed: bool,
    /// A frame read from the backend that no guest buffer took yet.
    rx_frame: Vec<u8>,
    rx_frame_len: usize,
    held: Vec<HeldChain>,
    tx_frame: Vec<u8>,
    segments: Vec<Segment>,
    stats: NetStats,
}

impl Net<Tap> {
    /// A virtio-net device on the TAP interface `tap_name`.
    pub fn with_tap(tap_name: &str, mac: Option<MacAddr>) -> Result<Self, TapError> {
        let tap = Tap::open(tap_name)?;
        let mac = mac.unwrap_or_else(|| MacAddr::derived(tap_name));
        // The guest's MTU follows the TAP's (a jumbo TAP gives a jumbo guest).
        let mtu = tap.mtu()?;
        let net = Self::new(tap, tap_name, mac).map_err(|e| TapError::Ioctl {
            name: tap_name.to_string(),
            what: "eventfd",
            source: e,
        })?;
        Ok(net.with_mtu(u16::try_from(mtu).unwrap_or(MAX_MTU)))
    }
}

impl<B: NetBackend> Net<B> {
    pub fn new(backend: B, label: &str, mac: MacAddr) -> io::Result<Self> {
        Ok(Self {
            backend,
            label: label.to_string(),
            mac,
            mtu: None,
            queue_evts: vec![EventFd::new(EFD_NONBLOCK)?, EventFd::new(EFD_NONBLOCK)?],
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
            active: None,
            backend_watched: false,
            backend_failed: false,
            rx_frame: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN + 1],
            rx_frame_len: 0,
            held: Vec::new(),
            tx_frame: vec![0; MAX_TX_CHAIN_LEN],
            segments: Vec::new(),
            stats: NetStats::default(),
        })
    }

    /// Offers `mtu` (at least 68, at most `MAX_MTU`) to the driver.
    pub fn with_mtu(mut self, mtu: u16) -> Self {
        self.mtu = Some(mtu.clamp(68, MAX_MTU));
        self
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    // ---- event-loop plumbing ----

    fn watch_backend(&mut self, ops: &mut EventOps) {
        if self.backend_watched || self.backend_failed {
            return;
        }
        let ev = Events::with_data(&self.backend, TOKEN_BACKEND, EventSet::IN);
        match ops.add(ev) {
            Ok(()) => self.backend_watched = true,
            Err(e) => log::error!("net {}: cannot watch the backend: {e:?}", self.label),
        }
    }

    fn unwatch_backend(&mut self, ops: &mut EventOps) {
        if !self.backend_watched {
            return;
        }
        let ev = Events::with_data(&self.backend, TOKEN_BACKEND, EventSet::IN);
        if let Err(e) = ops.remove(ev) {
            log::error!(
                "net {}: cannot stop watching the backend: {e:?}",
                self.label
            );
        }
        self.backend_watched = false;
    }

    // ---- RX: backend -> guest ----

    /// Moves frames from the backend to the guest until the backend is
    /// empty, the guest has no buffers, or the budget is spent.
    fn process_rx(&mut self, ops: &mut EventOps) {
        let used_before = self.active.as_ref().map(|a| a.rxq.next_used());
        for _ in 0..RX_BUDGET {
            if self.rx_frame_len == 0 {
                match self.backend.read(&mut self.rx_frame) {
                    Ok(n) => self.rx_frame_len = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::error!(
                            "net {}: reading the backend failed: {e}; receive stops",
                            self.label
                        );
                        self.backend_failed = true;
                        self.unwatch_backend(ops);
                        break;
                    }
                }
                if self.rx_frame_len == 0 {
                    break;
                }
            }
            match self.deliver_rx_frame() {
                Delivery::Delivered => self.rx_frame_len = 0,
                Delivery::Dropped => {
                    self.stats.rx_dropped += 1;
                    self.rx_frame_len = 0;
                }
                Delivery::NoBuffers => {
                    // Wait for the guest's RX kick. Ask for it first (event
                    // index), then look again in case buffers arrived meanwhile.
                    let retry = self
                        .active
                        .as_mut()
                        .map(|a| a.rxq.enable_notification(&a.mem).unwrap_or(false))
                        .unwrap_or(false);
                    if retry {
                        continue;
                    }
                    self.unwatch_backend(ops);
                    break;
                }
            }
        }
        let used_after = self.active.as_ref().map(|a| a.rxq.next_used());
        if used_after.is_some() && used_after != used_before {
            self.signal_rx();
        }
    }

    fn signal_rx(&mut self) {
        if let Some(a) = self.active.as_mut() {
            if needs_interrupt(&mut a.rxq, &a.mem) {
                a.interrupt.signal_used_queue();
            }
        }
    }

    /// Takes RX chains until `needed` bytes fit (or one chain without
    /// mergeable buffers). Malformed chains are completed with length 0.
    /// Returns false when the queue ran dry.
    fn hold_rx_chains(&mut self, needed: usize, mergeable: bool) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let mut held_cap: usize = self.held.iter().map(|c| c.capacity).sum();
        let qsize = usize::from(a.rxq.size());
        loop {
            if (mergeable && held_cap >= needed) || (!mergeable && !self.held.is_empty()) {
                return true;
            }
            if self.held.len() >= qsize {
                // Every buffer the ring can hold is here and the frame still
                // does not fit: the caller drops it.
                return true;
            }
            let Some(chain) = a.rxq.pop_descriptor_chain(&a.mem) else {
                return false;
            };
            let head = chain.head_index();
            let mut segments = Vec::new();
            match chain::parse(
                &a.mem,
                chain,
                Direction::Writable,
                usize::MAX,
                &mut segments,
            ) {
                Ok(capacity) if capacity >= VNET_HDR_LEN => {
                    held_cap += capacity;
                    self.held.push(HeldChain {
                        head,
                        segments,
                        capacity,
                    });
                }
                Ok(_) | Err(_) => {
                    self.stats.rx_bad_chains += 1;
                    if a.rxq.add_used(&a.mem, head, 0).is_err() {
                        log::debug!("net {}: cannot complete a bad RX chain", self.label);
                    }
                }
            }
        }
    }

    fn deliver_rx_frame(&mut self) -> Delivery {
        let len = self.rx_frame_len;
        let Some(a) = self.active.as_ref() else {
            return Delivery::Dropped;
        };
        let mergeable = a.has(vn::VIRTIO_NET_F_MRG_RXBUF);
        if !(VNET_HDR_LEN + MIN_FRAME_LEN..=VNET_HDR_LEN + MAX_FRAME_LEN).contains(&len) {
            return Delivery::Dropped;
        }
        let Some(gso) = check_rx_header(&mut self.rx_frame[..VNET_HDR_LEN], a) else {
            return Delivery::Dropped;
        };
        if !self.hold_rx_chains(len, mergeable) {
            return Delivery::NoBuffers;
        }
        // How many held chains the frame needs.
        let mut count = 0;
        let mut cap = 0usize;
        for c in &self.held {
            if cap >= len {
                break;
            }
            cap += c.capacity;
            count += 1;
            if !mergeable {
                break;
            }
        }
        if cap < len {
            return Delivery::Dropped;
        }
        let num_buffers = count as u16;
        self.rx_frame[10..12].copy_from_slice(&num_buffers.to_le_bytes());

        let Some(a) = self.active.as_mut() else {
            return Delivery::Dropped;
        };
        let mut off = 0usize;
        for c in self.held.drain(..count) {
            let n = chain::scatter(&a.mem, &c.segments, 0, &self.rx_frame[off..len]);
            off += n;
            if a.rxq.add_used(&a.mem, c.head, n as u32).is_err() {
                log::debug!("net {}: cannot add an RX used element", self.label);
            }
        }
        let frame = (len - VNET_HDR_LEN) as u64;
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += frame;
        self.stats.rx_max_frame = self.stats.rx_max_frame.max(frame);
        if self.rx_frame[0] & HDR_F_NEEDS_CSUM != 0 {
            self.stats.rx_csum_frames += 1;
        }
        self.stats.rx_buffers += count as u64;
        if gso {
            self.stats.rx_gso_frames += 1;
        }
        Delivery::Delivered
    }

    fn rx_kick(&mut self, ops: &mut EventOps) {
        if self.active.is_none() {
            return;
        }
        // The guest added buffers: resume receiving (the pending frame first).
        self.watch_backend(ops);
        if self.backend_watched {
            self.process_rx(ops);
        }
    }

    // ---- TX: guest -> backend ----

    fn process_tx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let qsize = u32::from(a.txq.size());
        let mut done = 0u32;
        loop {
            if a.txq.disable_notification(&a.mem).is_err() {
                break;
            }
            let mut progressed = false;
            while done < qsize {
                let Some(chain) = a.txq.pop_descriptor_chain(&a.mem) else {
                    break;
                };
                progressed = true;
                done += 1;
                let head = chain.head_index();
                let parsed = chain::parse(
                    &a.mem,
                    chain,
                    Direction::Readable,
                    MAX_TX_CHAIN_LEN,
                    &mut self.segments,
                );
                let frame_len = parsed
                    .ok()
                    .filter(|&n| n >= VNET_HDR_LEN + MIN_FRAME_LEN)
                    .and_then(|_| chain::gather(&a.mem, &self.segments, &mut self.tx_frame));
                match frame_len {
                    Some(n) => {
                        match check_tx_header(&mut self.tx_frame[..VNET_HDR_LEN], a.features) {
                            Some(gso) => match self.backend.write(&self.tx_frame[..n]) {
                                Ok(_) => self.stats.count_tx(&self.tx_frame[..n], gso),
                                Err(e) => {
                                    if self.stats.tx_errors == 0 {
                                        log::warn!(
                                            "net {}: the backend refused a frame: {e}",
                                            self.label
                                        );
                                    }
                                    self.stats.tx_errors += 1;
                                }
                            },
                            None => self.stats.tx_malformed += 1,
                        }
                    }
                    None => {
                        if self.stats.tx_malformed == 0 {
                            log::debug!("net {}: malformed TX chain: {parsed:?}", self.label);
                        }
                        self.stats.tx_malformed += 1;
                    }
                }
                if a.txq.add_used(&a.mem, head, 0).is_err() {
                    log::debug!("net {}: cannot add a TX used element", self.label);
                }
            }
            if done >= qsize {
                // Budget spent: come back through the event loop.
                let _ = self.queue_evts[1].write(1);
                break;
            }
            // `progressed` guards against an avail index the queue refuses
            // (it would otherwise look pending forever).
            match a.txq.enable_notification(&a.mem) {
                Ok(true) if progressed => continue,
                _ => break,
            }
        }
        if done > 0 && needs_interrupt(&mut a.txq, &a.mem) {
            a.interrupt.signal_used_queue();
        }
    }
}

/// Checks an RX header from the backend against the guest's offloads;
/// returns whether it is a GSO frame, or None to drop it.
fn check_rx_header(hdr: &mut [u8], a: &Active) -> Option<bool> {
    let csum = a.has(vn::VIRTIO_NET_F_GUEST_CSUM);
    if !csum {
        if hdr[0] & HDR_F_NEEDS_CSUM != 0 {
            return None;
        }
        // DATA_VALID is only meaningful to a driver that negotiated GUEST_CSUM.
        hdr[0] = 0;
    }
    hdr[0] &= HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID;
    match hdr[1] {
        GSO_NONE => Some(false),
        GSO_TCPV4 if a.has(vn::VIRTIO_NET_F_GUEST_TSO4) => Some(true),
        GSO_TCPV6 if a.has(vn::VIRTIO_NET_F_GUEST_TSO6) => Some(true),
        _ => None,
    }
}

/// Checks a TX header from the guest against what it negotiated; returns
/// whether it is a GSO frame, or None for a malformed one.
fn check_tx_header(hdr: &mut [u8], features: u64) -> Option<bool> {
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
    Some(gso)
}

/// Whether the driver wants an interrupt for the used buffers just added:
/// the event index when negotiated, otherwise the avail ring's
/// NO_INTERRUPT flag.
fn needs_interrupt(q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    if q.event_idx_enabled() {
        return q.needs_notification(mem).unwrap_or(true);
    }
    fence(Ordering::SeqCst);
    match mem.read_obj::<u16>(GuestAddress(q.avail_ring())) {
        Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0,
        Err(_) => true,
    }
}

/// TUN offload flags for what the driver accepts on RX.
fn tun_offload_flags(features: u64) -> u32 {
    let mut flags = 0;
    if features & bit(vn::VIRTIO_NET_F_GUEST_CSUM) != 0 {
        flags |= libc::TUN_F_CSUM;
        if features & bit(vn::VIRTIO_NET_F_GUEST_TSO4) != 0 {
            flags |= libc::TUN_F_TSO4;
        }
        if features & bit(vn::VIRTIO_NET_F_GUEST_TSO6) != 0 {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        DEVICE_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        match self.mtu {
            Some(_) => NET_FEATURES | bit(vn::VIRTIO_NET_F_MTU),
            None => NET_FEATURES,
        }
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6], status, max_virtqueue_pairs,
        // mtu (le16 each).
        let status = (vn::VIRTIO_NET_S_LINK_UP as u16).to_le_bytes();
        let mtu = self.mtu.unwrap_or(0).to_le_bytes();
        let m = self.mac.0;
        let config = [
            m[0], m[1], m[2], m[3], m[4], m[5], status[0], status[1], 1, 0, mtu[0], mtu[1],
        ];
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.checked_add(i as u64);
            *b = at
                .and_then(|o| config.get(usize::try_from(o).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            queues,
            interrupt,
            features,
        } = activation;
        let [rxq, txq]: [Queue; 2] = queues
            .try_into()
            .map_err(|_| ActivateError::Device("virtio-net needs exactly 2 queues".into()))?;
        if !rxq.ready() || !txq.ready() {
            return Err(ActivateError::Device(
                "virtio-net needs both queues ready".into(),
            ));
        }
        let offload = tun_offload_flags(features);
        self.backend.set_offload(offload).map_err(|e| {
            ActivateError::Device(format!("net {}: setting TAP offloads: {e}", self.label))
        })?;
        log::debug!(
            "net {}: activated, features {features:#x}, TAP offloads {offload:#x}",
            self.label
        );
        self.rx_frame_len = 0;
        self.held.clear();
        self.active = Some(Active {
            mem,
            rxq,
            txq,
            interrupt,
            features,
        });
        let _ = self.activate_evt.write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        if self.rx_frame_len != 0 {
            self.stats.rx_dropped += 1;
        }
        self.rx_frame_len = 0;
        self.held.clear();
        let _ = self.backend.set_offload(0);
    }
}

impl<B: NetBackend> MutEventSubscriber for Net<B> {
    fn init(&mut self, ops: &mut EventOps) {
        let sources = [
            (&self.queue_evts[0], TOKEN_RXQ),
            (&self.queue_evts[1], TOKEN_TXQ),
            (&self.activate_evt, TOKEN_ACTIVATE),
        ];
        for (fd, token) in sources {
            if let Err(e) = ops.add(Events::with_data(fd, token, EventSet::IN)) {
                log::error!("net {}: cannot watch an eventfd: {e:?}", self.label);
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_RXQ => {
                let _ = self.queue_evts[0].read();
                self.rx_kick(ops);
            }
            TOKEN_TXQ => {
                let _ = self.queue_evts[1].read();
                self.process_tx();
            }
            TOKEN_ACTIVATE => {
                let _ = self.activate_evt.read();
                if self.active.is_some() {
                    self.watch_backend(ops);
                }
            }
            TOKEN_BACKEND => {
                if self.active.is_none() {
                    // Reset: nobody takes frames until the next activation.
                    self.unwatch_backend(ops);
                    return;
                }
                if events
                    .event_set()
                    .intersects(EventSet::ERROR | EventSet::HANG_UP)
                {
                    log::error!("net {}: the backend hung up; receive stops", self.label);
                    self.backend_failed = true;
                    self.unwatch_backend(ops);
                    return;
                }
                self.process_rx(ops);
            }
            _ => {}
        }
    }
}

impl NetStats {
    /// Counts a frame (with its header) handed to the backend.
    fn count_tx(&mut self, frame: &[u8], gso: bool) {
        let len = frame.len().saturating_sub(VNET_HDR_LEN) as u64;
        self.tx_frames += 1;
        self.tx_bytes += len;
        self.tx_max_frame = self.tx_max_frame.max(len);
        if gso {
            self.tx_gso_frames += 1;
        }
        if frame.first().is_some_and(|f| f & HDR_F_NEEDS_CSUM != 0) {
            self.tx_csum_frames += 1;
        }
    }
}

impl std::fmt::Display for NetStats {
    /// `key=value` pairs, one space apart.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self;
        write!(
            f,
            "rx_frames={} rx_bytes={} rx_gso={} rx_csum={} rx_buffers={} rx_max_frame={} \
             rx_dropped={} rx_bad_chains={} tx_frames={} tx_bytes={} tx_gso={} tx_csum={} \
             tx_max_frame={} tx_malformed={} tx_errors={}",
            s.rx_frames,
            s.rx_bytes,
            s.rx_gso_frames,
            s.rx_csum_frames,
            s.rx_buffers,
            s.rx_max_frame,
            s.rx_dropped,
            s.rx_bad_chains,
            s.tx_frames,
            s.tx_bytes,
            s.tx_gso_frames,
            s.tx_csum_frames,
            s.tx_max_frame,
            s.tx_malformed,
            s.tx_errors
        )
    }
}

impl<B: NetBackend> Drop for Net<B> {
    fn drop(&mut self) {
        log::info!("net {}: {}", self.label, self.stats);
    }
}

#[cfg(test)]
mod tests;
