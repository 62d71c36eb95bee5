//! What kiln's fuzz targets (`fuzz/`, the `kiln-fuzz` crate) need beyond the
//! monitor's API: the limits they hold the devices to, the virtio constants
//! they negotiate, and the constructors the monitor reaches
//! through its own modules. Public only for `kiln-fuzz`; not part of the API.

use std::io;

use crate::virtio::net::{MacAddr, Net, NetBackend};

pub use crate::virtio::vsock::conn::CONN_BUF_ALLOC;
pub use crate::virtio::vsock::muxer::{MAX_CONNS, MAX_CONTROL};
pub use crate::virtio::vsock::packet::{
    Header, HDR_SIZE, HOST_CID, MAX_PKT_PAYLOAD, OP_REQUEST, OP_RESPONSE, OP_RW, OP_SHUTDOWN,
    TYPE_STREAM,
};

/// The virtio feature bits a driver negotiates.
pub const VIRTIO_F_VERSION_1: u64 = crate::virtio::VIRTIO_F_VERSION_1;
/// See [`VIRTIO_F_VERSION_1`].
pub const VIRTIO_RING_F_EVENT_IDX: u64 = crate::virtio::VIRTIO_RING_F_EVENT_IDX;

/// Block: the sector size and the most bytes one request segment may move.
pub const BLOCK_SECTOR_SIZE: u64 = crate::virtio::block::SECTOR_SIZE;
/// See [`BLOCK_SECTOR_SIZE`].
pub const BLOCK_SIZE_MAX: u32 = crate::virtio::block::SIZE_MAX;

/// Console: output buffered while the host stalls, and per chain.
pub const CONSOLE_OUTPUT_HIGH: usize = crate::virtio::console::OUTPUT_HIGH;
/// See [`CONSOLE_OUTPUT_HIGH`].
pub const CONSOLE_MAX_CHAIN_OUTPUT: usize = crate::virtio::console::MAX_CHAIN_OUTPUT;

/// Net: the virtio-net header, the largest frame and the queue size.
pub const NET_HDR_LEN: usize = crate::tap::VNET_HDR_LEN;
/// See [`NET_HDR_LEN`].
pub const NET_MAX_FRAME_LEN: usize = crate::virtio::net::MAX_FRAME_LEN;
/// See [`NET_HDR_LEN`].
pub const NET_QUEUE_SIZE: u16 = crate::virtio::net::QUEUE_SIZE;

/// Rng: the most bytes one chain gets.
pub const RNG_MAX_BYTES_PER_CHAIN: usize = crate::virtio::rng::MAX_BYTES_PER_CHAIN;

/// A virtio-net device on any backend (the monitor builds its TAP one),
/// offering `mtu` when given.
pub fn net<B: NetBackend>(
    backend: B,
    label: &str,
    mac: MacAddr,
    mtu: Option<u16>,
) -> io::Result<Net<B>> {
    let net = Net::new(backend, label, mac)?;
    Ok(match mtu {
        Some(mtu) => net.with_mtu(mtu),
        None => net,
    })
}
