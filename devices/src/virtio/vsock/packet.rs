//! virtio-vsock packets: the 44-byte little-endian header every packet starts
//! with, and the checked parsing of a packet the guest put on its tx queue.
//!
//! Every field comes from the guest and is hostile until checked: the payload
//! length is compared against what the descriptor chain really holds and
//! against the largest packet kiln accepts, before any byte is copied.

use vm_memory::GuestMemoryMmap;

use crate::virtio::chain::Cursor;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;
/// Largest payload kiln accepts in one guest packet (Linux sends at most 64 KiB).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

/// The host's well-known CID.
pub const HOST_CID: u64 = 2;

/// Socket type: stream (the only one kiln supports).
pub const TYPE_STREAM: u16 = 1;

// Operations.
/// Operation: open a connection.
pub const OP_REQUEST: u16 = 1;
/// Operation: accept a connection.
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
/// Operation: half- or fully close a connection (flags `SHUTDOWN_*`).
pub const OP_SHUTDOWN: u16 = 4;
/// Operation: stream data.
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// `struct virtio_vsock_hdr`, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Sender's CID.
    pub src_cid: u64,
    /// Receiver's CID.
    pub dst_cid: u64,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Payload bytes after the header.
    pub len: u32,
    /// Socket type (`TYPE_STREAM`).
    pub type_: u16,
    /// Operation (`OP_*`).
    pub op: u16,
    /// Operation flags (`SHUTDOWN_*` for `OP_SHUTDOWN`).
    pub flags: u32,
    /// Sender's receive buffer size (credit).
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from this connection (credit).
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes a header from its wire bytes.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes"));
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the header to its wire bytes.
    pub fn to_bytes(self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a guest packet was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("descriptor chain is not readable guest memory")]
    BadChain,
    #[error("chain holds {0} bytes, less than a header")]
    Short(usize),
    #[error("payload length {len} is more than the {max} bytes allowed")]
    TooLong { len: u32, max: usize },
    #[error("payload length {len} is more than the {avail} bytes the chain holds")]
    Truncated { len: u32, avail: usize },
}

/// Checks a header's payload length against the chain and kiln's limit;
/// returns the payload length to copy.
pub fn checked_payload_len(hdr: &Header, avail_after_header: usize) -> Result<usize, PacketError> {
    let len = hdr.len as usize;
    // Only RW packets carry data; anything else with a length is still
    // bounded the same way (and its payload ignored).
    if len > MAX_PKT_PAYLOAD {
        return Err(PacketError::TooLong {
            len: hdr.len,
            max: MAX_PKT_PAYLOAD,
        });
    }
    if len > avail_after_header {
        return Err(PacketError::Truncated {
            len: hdr.len,
            avail: avail_after_header,
        });
    }
    Ok(len)
}

/// Reads the header of a guest tx packet; the reader is left at the payload,
/// whose length the caller checks with `checked_payload_len` against
/// `reader.remaining()`.
pub fn read_header(mem: &GuestMemoryMmap, reader: &mut Cursor<'_>) -> Result<Header, PacketError> {
    let avail = usize::try_from(reader.remaining()).unwrap_or(usize::MAX);
    if avail < HDR_SIZE {
        return Err(PacketError::Short(avail));
    }
    let mut raw = [0u8; HDR_SIZE];
    reader
        .read_exact(mem, &mut raw)
        .map_err(|_| PacketError::BadChain)?;
    Ok(Header::from_bytes(&raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_little_endian() {
        let h = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1122_3344,
            dst_port: 1234,
            len: 7,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 0x40000,
            fwd_cnt: 99,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }

    /// Reads the header from a one-descriptor chain of `len` bytes holding
    /// `bytes` (then zeroes); returns the result and what is left to read.
    fn read_chain(bytes: &[u8], len: u32) -> (Result<Header, PacketError>, usize) {
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use virtio_queue::QueueOwnedT;
        use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(bytes, GuestAddress(0x1000)).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x8_0000), 16);
        let desc = Descriptor::new(0x1000, len, 0, 0);
        vq.desc_table().store(0, RawDescriptor::from(desc)).unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
        let descriptors = q.iter(&mem).unwrap().next().unwrap();
        let chain = crate::virtio::chain::Chain::parsed(
            &mem,
            descriptors,
            crate::virtio::chain::Layout::ReadOnly,
            crate::virtio::chain::Limits::descriptors(16),
        );
        let mut reader = chain.reader();
        let header = read_header(&mem, &mut reader);
        (header, reader.remaining() as usize)
    }

    #[test]
    fn headers_are_read_from_the_chain_and_short_chains_refused() {
        let h = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            len: 5,
            op: OP_RW,
            ..Default::default()
        };
        let mut packet = h.to_bytes().to_vec();
        packet.extend_from_slice(b"hello");
        assert_eq!(read_chain(&packet, packet.len() as u32), (Ok(h), 5));
        assert_eq!(read_chain(&packet, HDR_SIZE as u32), (Ok(h), 0));
        assert_eq!(
            read_chain(&packet, HDR_SIZE as u32 - 1).0,
            Err(PacketError::Short(HDR_SIZE - 1))
        );
    }

    #[test]
    fn hostile_lengths_are_refused() {
        let mut h = Header {
            len: u32::MAX,
            ..Default::default()
        };
        assert!(matches!(
            checked_payload_len(&h, usize::MAX),
            Err(PacketError::TooLong { .. })
        ));
        h.len = MAX_PKT_PAYLOAD as u32 + 1;
        assert!(checked_payload_len(&h, usize::MAX).is_err());
        h.len = 100;
        assert_eq!(
            checked_payload_len(&h, 99),
            Err(PacketError::Truncated {
                len: 100,
                avail: 99
            })
        );
        assert_eq!(checked_payload_len(&h, 100), Ok(100));
        h.len = 0;
        assert_eq!(checked_payload_len(&h, 0), Ok(0));
    }
}
