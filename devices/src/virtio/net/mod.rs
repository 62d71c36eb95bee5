//! virtio-net (device ID 1) over a TAP interface.
//!
//! Two queues: 0 = receive (frames for the guest, `rx`), 1 = transmit
//! (`tx`). Both are served from the monitor's event loop: the TX queue on
//! its kick, the RX queue whenever the TAP is readable and the guest has
//! posted buffers. When the guest has no RX buffers left the TAP is taken
//! out of the epoll set (the frame already read waits in `rx_frame`) until
//! the guest kicks the RX queue, so the loop never spins on a readable TAP
//! nobody can drain.
//!
//! Every frame carries a 12-byte `virtio_net_hdr_v1` in both directions, the
//! same layout the TAP uses (IFF_VNET_HDR, TUNSETVNETHDRSZ 12), so headers
//! pass through after a check against the negotiated offloads and the frame
//! (no length or offset past it, no GSO segment size of 0: what the TAP
//! would refuse is refused as the guest's mistake, not sent).
//!
//! A rate limit ([`Net::with_rate_limit`]) applies to each direction on
//! its own, with the same rates: a frame is charged its bytes (without the
//! virtio header) and one operation. A TX chain the limit cannot pay for
//! stays in the ring; an RX frame already read waits in `rx_frame` with the
//! TAP unwatched; either resumes when that direction's timer fires.

mod rx;
mod tx;

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_net as vn;

use super::chain::Chain;
use super::common::VirtioCommon;
use super::counters::device_counters;
use super::VIRTIO_RING_F_EVENT_IDX;
use super::{ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::rate_limiter::{RateLimit, Throttle};
use crate::tap::{Tap, TapError, VNET_HDR_LEN};

/// Virtio device ID of a network card.
pub(crate) const DEVICE_ID_NET: u32 = 1;
/// Queue size offered for both queues.
pub(crate) const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];
/// Largest Ethernet frame (without the virtio header) in either direction:
/// a 64 KiB GSO packet plus Ethernet and VLAN headers.
pub(crate) const MAX_FRAME_LEN: usize = 65536 + 14 + 4 + 8;
/// Largest MTU the device offers (MTU + Ethernet + VLAN headers fit in
/// `MAX_FRAME_LEN`).
pub(crate) const MAX_MTU: u16 = u16::MAX;
const _: () = assert!(MAX_MTU as usize + 18 <= MAX_FRAME_LEN);
/// Largest TX chain: header plus frame.
pub(crate) const MAX_TX_CHAIN_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Shortest frame a TAP accepts: an Ethernet header.
const MIN_FRAME_LEN: usize = 14;

const RXQ: usize = 0;
const TXQ: usize = 1;

const fn bit(n: u32) -> u64 {
    1 << n
}

/// Offered features: checksum offload and TCP segmentation offload in both
/// directions, mergeable RX buffers, MAC and link status.
pub(crate) const NET_FEATURES: u64 = VIRTIO_F_VERSION_1
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

/// Event data of the backend (the queue kicks use their indices).
const TOKEN_BACKEND: u32 = 2;
/// Event data of the receive and transmit rate limits' timers.
const TOKEN_RX_RATE_TIMER: u32 = 3;
const TOKEN_TX_RATE_TIMER: u32 = 4;

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

device_counters! {
    /// virtio-net counters: nothing is dropped without being counted here.
    pub(crate) struct NetCounters {
        rx_frames,
        rx_bytes,
        /// RX frames that were GSO (TSO) packets.
        rx_gso,
        /// RX frames whose checksum the guest completes (NEEDS_CSUM).
        rx_csum,
        /// RX chains used for all frames (more than rx_frames with
        /// mergeable buffers).
        rx_buffers,
        /// Longest RX frame (without the virtio header).
        rx_max_frame,
        /// Frames from the backend the guest cannot take (too big for its
        /// buffers, or offloads it did not negotiate).
        rx_dropped,
        /// RX chains the guest got wrong (completed with length 0).
        rx_bad_chains,
        /// Times the receive rate limit held a frame (it waited for tokens).
        rx_rate_limited,
        tx_frames,
        tx_bytes,
        /// TX frames that were GSO (TSO) packets.
        tx_gso,
        /// TX frames whose checksum the other side completes (NEEDS_CSUM).
        tx_csum,
        /// Longest TX frame (without the virtio header).
        tx_max_frame,
        /// TX chains the guest got wrong, or headers with offloads it did
        /// not negotiate or lengths and offsets past their frame
        /// (completed with length 0, not sent).
        tx_malformed,
        /// Times the transmit rate limit held the TX queue.
        tx_rate_limited,
        /// Frames the backend refused to take.
        tx_errors,
    }
}

/// The virtio-net device: one receive and one transmit queue served on the
/// event loop, frames to and from a backend (a [`Tap`] in kiln). Holds two
/// frame buffers of about 64 KiB each.
pub struct Net<B: NetBackend> {
    /// Guest-visible: features, config space (MAC, link, MTU), the queues
    /// while running, counters.
    virtio: VirtioCommon,
    counters: Arc<NetCounters>,
    mac: MacAddr,
    /// Offered to the driver (VIRTIO_NET_F_MTU) when set.
    mtu: Option<u16>,
    /// RX chains taken from the ring but not used yet (guest-visible too:
    /// the driver considers them the device's).
    held: Vec<Chain>,
    /// The host side: the TAP, and whether its fd is in the epoll set.
    backend: B,
    backend_watched: bool,
    /// The backend failed for good; it is not watched again.
    backend_failed: bool,
    /// A frame read from the backend that no guest buffer took yet.
    rx_frame: Vec<u8>,
    rx_frame_len: usize,
    /// The receive limit has paid for the frame in `rx_frame`.
    rx_frame_paid: bool,
    tx_frame: Vec<u8>,
    /// The rate limit of each direction (unlimited unless set).
    rx_throttle: Throttle,
    tx_throttle: Throttle,
}

impl Net<Tap> {
    /// A virtio-net device on the TAP interface `tap_name`, which is opened
    /// (or created, with CAP_NET_ADMIN) now; the MAC defaults to one derived
    /// from the name, the MTU offered is the TAP's.
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

/// Puts `mac` into a saved net device's config space (`TransportState::
/// config`), e.g. for a restored copy of a guest that takes a new address.
/// A config space too short to hold one is left as it is (the restore then
/// refuses its length).
pub fn set_config_mac(config: &mut [u8], mac: MacAddr) {
    if let Some(bytes) = config.get_mut(..6) {
        bytes.copy_from_slice(&mac.0);
    }
}

/// struct virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu (le16
/// each).
fn config_space(mac: MacAddr, mtu: Option<u16>) -> Vec<u8> {
    let mut config = mac.0.to_vec();
    config.extend_from_slice(&(vn::VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    config.extend_from_slice(&1u16.to_le_bytes());
    config.extend_from_slice(&mtu.unwrap_or(0).to_le_bytes());
    config
}

impl<B: NetBackend> Net<B> {
    /// A device on `backend`; `label` names it in log lines (`net LABEL`).
    pub(crate) fn new(backend: B, label: &str, mac: MacAddr) -> io::Result<Self> {
        let counters = Arc::new(NetCounters::default());
        Ok(Self {
            virtio: VirtioCommon::new(
                format!("net {label}"),
                DEVICE_ID_NET,
                &QUEUE_SIZES,
                NET_FEATURES,
                config_space(mac, None),
                counters.clone(),
            )?,
            counters,
            mac,
            mtu: None,
            held: Vec::new(),
            backend,
            backend_watched: false,
            backend_failed: false,
            rx_frame: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN + 1],
            rx_frame_len: 0,
            rx_frame_paid: false,
            tx_frame: vec![0; MAX_TX_CHAIN_LEN],
            rx_throttle: Throttle::unlimited(),
            tx_throttle: Throttle::unlimited(),
        })
    }

    /// Limits each direction to `limit` on its own (frame bytes and frames
    /// per second; see [`RateLimit`]). Fails only when the host is out of
    /// file descriptors (the limits' timers).
    pub fn with_rate_limit(self, limit: &RateLimit) -> io::Result<Self> {
        Ok(self.with_throttles(Throttle::new(limit)?, Throttle::new(limit)?))
    }

    pub(crate) fn with_throttles(mut self, rx: Throttle, tx: Throttle) -> Self {
        self.rx_throttle = rx;
        self.tx_throttle = tx;
        self
    }

    /// Offers `mtu` (at least 68, at most `MAX_MTU`) to the driver.
    pub(crate) fn with_mtu(mut self, mtu: u16) -> Self {
        let mtu = mtu.clamp(68, MAX_MTU);
        self.mtu = Some(mtu);
        self.virtio
            .set_avail_features(NET_FEATURES | bit(vn::VIRTIO_NET_F_MTU));
        self.virtio.set_config(config_space(self.mac, self.mtu));
        self
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    // ---- event-loop plumbing ----

    fn watch_backend(&mut self, ops: &mut EventOps) {
        if self.backend_watched || self.backend_failed {
            return;
        }
        let ev = Events::with_data(&self.backend, TOKEN_BACKEND, EventSet::IN);
        match ops.add(ev) {
            Ok(()) => self.backend_watched = true,
            Err(e) => log::error!("{}: cannot watch the backend: {e:?}", self.virtio.label()),
        }
    }

    fn unwatch_backend(&mut self, ops: &mut EventOps) {
        if !self.backend_watched {
            return;
        }
        let ev = Events::with_data(&self.backend, TOKEN_BACKEND, EventSet::IN);
        if let Err(e) = ops.remove(ev) {
            log::error!(
                "{}: cannot stop watching the backend: {e:?}",
                self.virtio.label()
            );
        }
        self.backend_watched = false;
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
    fn virtio(&self) -> &VirtioCommon {
        &self.virtio
    }

    fn virtio_mut(&mut self) -> &mut VirtioCommon {
        &mut self.virtio
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.virtio.check_activation(&activation)?;
        let features = activation.features;
        let offload = tun_offload_flags(features);
        self.backend.set_offload(offload).map_err(|e| {
            ActivateError::Device(format!(
                "{}: setting TAP offloads: {e}",
                self.virtio.label()
            ))
        })?;
        log::debug!(
            "{}: activated, features {features:#x}, TAP offloads {offload:#x}",
            self.virtio.label()
        );
        self.rx_frame_len = 0;
        self.rx_frame_paid = false;
        self.held.clear();
        self.virtio.activate(activation)?;
        // The event thread starts watching the backend (and takes any
        // frames waiting there).
        self.virtio.kick(RXQ);
        Ok(())
    }

    fn reset(&mut self) {
        self.virtio.reset();
        if self.rx_frame_len != 0 {
            self.counters.rx_dropped.inc();
        }
        self.rx_frame_len = 0;
        self.rx_frame_paid = false;
        self.held.clear();
        let _ = self.backend.set_offload(0);
    }
}

impl<B: NetBackend> MutEventSubscriber for Net<B> {
    fn init(&mut self, ops: &mut EventOps) {
        self.virtio.watch_kicks(ops);
        self.rx_throttle.watch(ops, TOKEN_RX_RATE_TIMER);
        self.tx_throttle.watch(ops, TOKEN_TX_RATE_TIMER);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.virtio.take_kick(&events) {
            Some(RXQ) => self.rx_kick(ops),
            Some(_) => self.process_tx(),
            None => match events.data() {
                TOKEN_BACKEND => self.backend_ready(events.event_set(), ops),
                TOKEN_RX_RATE_TIMER => {
                    self.rx_throttle.timer_fired();
                    self.rx_kick(ops);
                }
                TOKEN_TX_RATE_TIMER => {
                    self.tx_throttle.timer_fired();
                    self.process_tx();
                }
                _ => {}
            },
        }
    }
}

impl<B: NetBackend> Net<B> {
    fn backend_ready(&mut self, set: EventSet, ops: &mut EventOps) {
        if !self.virtio.is_active() {
            // Reset: nobody takes frames until the next activation.
            self.unwatch_backend(ops);
            return;
        }
        if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            log::error!(
                "{}: the backend hung up; receive stops",
                self.virtio.label()
            );
            self.backend_failed = true;
            self.unwatch_backend(ops);
            return;
        }
        self.process_rx(ops);
    }
}

#[cfg(test)]
mod tests;
