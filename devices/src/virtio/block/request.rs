//! virtio-blk requests, parsed from their descriptor chains before any byte
//! moves: the header must be device-readable and come first, data
//! descriptors must point the right way for the request type, every buffer
//! must lie inside guest memory, and the status byte is the last byte of the
//! last descriptor, which must be device-writable.

#[cfg(test)]
use std::ops::Deref;

use virtio_bindings::virtio_blk::*;
#[cfg(test)]
use virtio_queue::DescriptorChain;
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::disk::SECTOR_SIZE;
use crate::virtio::chain::{Chain, ChainError, Layout, Limits, Segment};

/// Entries in the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request (the header and status take two descriptors).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest DISCARD / WRITE_ZEROES range and segment count advertised.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
pub const MAX_DISCARD_SEG: u32 = 32;
/// Request header: type, reserved, sector.
const HEADER_LEN: usize = 16;
/// One DISCARD / WRITE_ZEROES segment: sector, num_sectors, flags.
pub const DISCARD_SEGMENT_LEN: usize = 16;

/// How block chains are walked: a request, then room for its answer; a
/// longer chain than SEG_MAX data segments plus header and status is
/// malformed (even in an indirect table).
pub const CHAIN_SHAPE: (Layout, Limits) = (
    Layout::ReadThenWrite,
    Limits::descriptors(SEG_MAX as usize + 2),
);

pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// The request type from the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl From<u32> for RequestKind {
    fn from(kind: u32) -> Self {
        match kind {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

/// A well-formed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub sector: u64,
    /// The data buffers, without header and status byte: device-writable
    /// for In and GetId, device-readable for Out, Discard and WriteZeroes
    /// (the segment list), none for Flush.
    pub data: Vec<Segment>,
}

impl Request {
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// Why a chain with a status byte carries no request to execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// The chain broke a descriptor rule.
    BadChain(ChainError),
    /// The header or the data buffers do not fit the request type.
    Malformed,
    /// A request type kiln does not know.
    Unsupported(u32),
}

impl RequestError {
    /// The status the driver gets.
    pub fn status(self) -> u8 {
        match self {
            Self::BadChain(_) | Self::Malformed => STATUS_IOERR,
            Self::Unsupported(_) => STATUS_UNSUPP,
        }
    }
}

/// What a descriptor chain turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// No writable status byte at the end: return the chain with length 0.
    NoStatus,
    /// A status byte at `status`, and the request or why there is none.
    WithStatus {
        status: GuestAddress,
        request: Result<Request, RequestError>,
    },
}

/// Walks a chain from the ring and parses it (see `parse`).
#[cfg(test)] // the device walks chains through `VirtioCommon::serve`
pub fn parse_chain<M>(mem: &GuestMemoryMmap, descriptors: DescriptorChain<M>) -> Parsed
where
    M: Deref,
    M::Target: GuestMemory,
{
    let (layout, limits) = CHAIN_SHAPE;
    parse(mem, &Chain::parsed(mem, descriptors, layout, limits))
}

/// Parses a walked chain into a request; never touches memory outside the
/// guest's.
pub fn parse(mem: &GuestMemoryMmap, chain: &Chain) -> Parsed {
    // The status byte: the last byte of the last descriptor, device-writable.
    let Some(last) = chain.last() else {
        return Parsed::NoStatus;
    };
    if !last.writable || last.len == 0 {
        return Parsed::NoStatus;
    }
    let Some(status) = last.addr.checked_add(u64::from(last.len) - 1) else {
        return Parsed::NoStatus;
    };
    if !mem.check_range(status, 1, Permissions::Write) {
        return Parsed::NoStatus;
    }
    Parsed::WithStatus {
        status,
        request: parse_request(mem, chain),
    }
}

fn parse_request(mem: &GuestMemoryMmap, chain: &Chain) -> Result<Request, RequestError> {
    chain.check().map_err(RequestError::BadChain)?;
    // The status byte ends the last writable segment (the chain is whole and
    // its last descriptor writable): leave it out of the data.
    let mut writable = chain.writable().to_vec();
    match writable.last_mut() {
        Some(s) if s.len > 1 => s.len -= 1,
        Some(_) => {
            writable.pop();
        }
        None => return Err(RequestError::Malformed),
    }
    // The header: the first 16 readable bytes.
    let mut header = [0u8; HEADER_LEN];
    let mut reader = chain.reader();
    reader
        .read_exact(mem, &mut header)
        .map_err(|_| RequestError::Malformed)?;
    let readable = reader.rest();
    let kind = RequestKind::from(u32::from_le_bytes(
        header[0..4].try_into().unwrap_or_default(),
    ));
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let len = |segs: &[Segment]| segs.iter().map(|s| u64::from(s.len)).sum::<u64>();
    let (rd, wr) = (len(&readable), len(&writable));
    let sector_multiple = |n: u64| n & (SECTOR_SIZE - 1) == 0;
    let data = match kind {
        RequestKind::In if rd == 0 && sector_multiple(wr) => writable,
        RequestKind::Out if wr == 0 && sector_multiple(rd) => readable,
        RequestKind::Flush if rd == 0 && wr == 0 => Vec::new(),
        RequestKind::GetId if rd == 0 => writable,
        RequestKind::Discard | RequestKind::WriteZeroes
            if wr == 0
                && rd > 0
                && rd % DISCARD_SEGMENT_LEN as u64 == 0
                && rd / DISCARD_SEGMENT_LEN as u64 <= u64::from(MAX_DISCARD_SEG) =>
        {
            readable
        }
        RequestKind::Unsupported(other) => return Err(RequestError::Unsupported(other)),
        _ => return Err(RequestError::Malformed),
    };
    Ok(Request { kind, sector, data })
}
