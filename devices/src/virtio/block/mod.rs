//! virtio-blk (device id 2): a raw disk image, or a copy-on-write overlay
//! over one (`overlay`: the image only read, the writes in a private
//! unnamed file), served from the event loop.
//!
//! Every request is parsed from its descriptor chain before any byte moves
//! (`request`); a chain that breaks a rule is answered with
//! `VIRTIO_BLK_S_IOERR` when it ends in a writable status byte, and
//! returned with length 0 otherwise. Requests run against the image
//! (`disk`) through a bounce buffer, with every file access overflow-checked
//! against the image size; FLUSH is `fdatasync`; DISCARD and WRITE_ZEROES
//! are `fallocate` (PUNCH_HOLE / ZERO_RANGE) where the host file system has
//! them. A rate limit ([`Block::with_rate_limit`]) charges each read or
//! write its data bytes and every request one operation; a request the
//! limit cannot pay for yet stays in the ring until the limit's timer fires.

mod disk;
mod overlay;
mod request;

use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestMemoryMmap};

use self::request::{
    Parsed, Request, RequestKind, CHAIN_SHAPE, DISCARD_SEGMENT_LEN, MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG, QUEUE_SIZE, SEG_MAX, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
};
use super::chain::{Chain, Cursor};
use super::common::VirtioCommon;
use super::counters::device_counters;
use super::queue::Served;
use super::{SavedOverlay, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::rate_limiter::{RateLimit, Throttle};
pub use disk::{DiskError, DiskImage};
pub(crate) use disk::{ID_BYTES, SECTOR_SIZE};
pub use overlay::{copy_sparse, BaseStamp, OverlayPlace, OverlayState};

/// virtio device id of a block device.
pub(crate) const DEVICE_ID_BLOCK: u32 = 2;
/// Largest single data segment.
pub(crate) const SIZE_MAX: u32 = 1 << 20;
/// Discard granularity in sectors (4 KiB, the usual host block size).
const DISCARD_ALIGNMENT_SECTORS: u32 = 8;
const SECTOR_SHIFT: u32 = 9;
/// Bounce buffer size: each pread/pwrite moves at most this much.
const BOUNCE_LEN: usize = 1 << 20;
/// Chains served per event before yielding to other devices.
const CHAINS_PER_EVENT: usize = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Event data of the rate limit's timer (the queue's kick is 0).
const TOKEN_RATE_TIMER: u32 = 1;

const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

device_counters! {
    /// virtio-blk counters.
    pub(crate) struct BlockCounters {
        /// Well-formed requests executed.
        requests,
        /// Bytes read from the image into the guest (IN).
        read_bytes,
        /// Bytes written from the guest into the image (OUT).
        write_bytes,
        /// Requests answered IOERR: out of range, read-only, or a host I/O
        /// failure.
        errors,
        /// Requests answered UNSUPP: unknown type, or an operation the
        /// driver did not negotiate or the host cannot do.
        unsupported,
        /// Chains that broke the rules: no status byte (returned with
        /// length 0) or a malformed request (answered IOERR).
        bad_chains,
        /// Times the rate limit held the queue (a request waited for
        /// tokens).
        rate_limited,
    }
}

/// Runs requests against a disk image.
struct Executor<'a> {
    disk: &'a DiskImage,
    mem: &'a GuestMemoryMmap,
    bounce: &'a mut Vec<u8>,
    /// Features the driver accepted.
    features: u64,
}

impl Executor<'_> {
    /// Executes one request; returns (status, bytes written into the data buffers).
    fn execute(&mut self, req: &Request) -> (u8, u32) {
        match req.kind {
            RequestKind::In => self.read(req),
            RequestKind::Out => (self.write(req), 0),
            RequestKind::Flush => (self.flush(), 0),
            RequestKind::GetId => self.get_id(req),
            RequestKind::Discard | RequestKind::WriteZeroes => (self.discard(req), 0),
            RequestKind::Unsupported(_) => (STATUS_UNSUPP, 0),
        }
    }

    fn bounce(&mut self, len: u64) -> &mut [u8] {
        let n = len.min(BOUNCE_LEN as u64) as usize;
        if self.bounce.len() < n {
            self.bounce.resize(n, 0);
        }
        &mut self.bounce[..n]
    }

    /// Moves the request's data between guest memory and the image in
    /// bounce-buffer pieces; `step` moves one piece at an image offset.
    /// Returns the status and the bytes moved.
    fn transfer<F>(&mut self, req: &Request, mut step: F) -> (u8, u32)
    where
        F: FnMut(&DiskImage, &GuestMemoryMmap, &mut Cursor, &mut [u8], u64) -> bool,
    {
        let len = req.data_len();
        let Some(mut offset) = self.disk.range(req.sector, len) else {
            return (STATUS_IOERR, 0);
        };
        let (disk, mem) = (self.disk, self.mem);
        let mut cursor = Cursor::new(&req.data);
        let mut done: u64 = 0;
        while done < len {
            let buf = self.bounce(len - done);
            let n = buf.len() as u64;
            if !step(disk, mem, &mut cursor, buf, offset) {
                return (STATUS_IOERR, done as u32);
            }
            done += n;
            offset += n;
        }
        (STATUS_OK, done as u32)
    }

    fn read(&mut self, req: &Request) -> (u8, u32) {
        self.transfer(req, |disk, mem, guest, buf, offset| {
            disk.read_at(buf, offset).is_ok() && guest.write_all(mem, buf).is_ok()
        })
    }

    fn write(&mut self, req: &Request) -> u8 {
        if self.disk.read_only() {
            return STATUS_IOERR;
        }
        let (status, _) = self.transfer(req, |disk, mem, guest, buf, offset| {
            guest.read_exact(mem, buf).is_ok() && disk.write_at(buf, offset).is_ok()
        });
        status
    }

    fn flush(&mut self) -> u8 {
        if self.disk.read_only() {
            return STATUS_OK;
        }
        match self.disk.sync() {
            Ok(()) => STATUS_OK,
            Err(e) => {
                log::warn!(
                    "virtio-blk: fdatasync on {} failed: {e}",
                    self.disk.path().display()
                );
                STATUS_IOERR
            }
        }
    }

    fn get_id(&mut self, req: &Request) -> (u8, u32) {
        let n = req.data_len().min(ID_BYTES as u64) as usize;
        let mut cursor = Cursor::new(&req.data);
        match cursor.write_all(self.mem, &self.disk.id()[..n]) {
            Ok(()) => (STATUS_OK, n as u32),
            Err(_) => (STATUS_IOERR, 0),
        }
    }

    fn discard(&mut self, req: &Request) -> u8 {
        let discard = req.kind == RequestKind::Discard;
        let feature = if discard {
            1u64 << VIRTIO_BLK_F_DISCARD
        } else {
            1u64 << VIRTIO_BLK_F_WRITE_ZEROES
        };
        if self.disk.read_only() {
            return STATUS_IOERR;
        }
        if self.features & feature == 0 || !self.disk.supports_discard() {
            return STATUS_UNSUPP;
        }
        let mut cursor = Cursor::new(&req.data);
        let mut ranges = Vec::new();
        while cursor.remaining() > 0 {
            let mut seg = [0u8; DISCARD_SEGMENT_LEN];
            if cursor.read_exact(self.mem, &mut seg).is_err() {
                return STATUS_IOERR;
            }
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
            let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            // Reserved flag bits, or "unmap" on a discard, are not supported.
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && unmap) {
                return STATUS_UNSUPP;
            }
            if sectors > MAX_DISCARD_SECTORS {
                return STATUS_IOERR;
            }
            let len = u64::from(sectors) << SECTOR_SHIFT;
            let Some(offset) = self.disk.range(sector, len) else {
                return STATUS_IOERR;
            };
            ranges.push((offset, len, unmap));
        }
        for (offset, len, unmap) in ranges {
            if len == 0 {
                continue;
            }
            let result = if discard || unmap {
                self.disk.punch_hole(offset, len)
            } else {
                self.disk.write_zeroes(offset, len)
            };
            match result {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return STATUS_UNSUPP,
                Err(e) => {
                    log::warn!(
                        "virtio-blk: fallocate on {} failed: {e}",
                        self.disk.path().display()
                    );
                    return STATUS_IOERR;
                }
            }
        }
        STATUS_OK
    }
}

/// The bytes a request is charged by a rate limit: the data of a read or
/// write (every request is also one operation).
fn charged_bytes(req: &Request) -> u64 {
    match req.kind {
        RequestKind::In | RequestKind::Out => req.data_len(),
        _ => 0,
    }
}

/// Serves one parsed chain end to end (`Used` with the length to report),
/// or leaves it in the ring (`Later`) when `throttle` cannot pay for it yet.
/// Malformed chains move nothing on the host and are not charged.
fn serve_chain(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    bounce: &mut Vec<u8>,
    features: u64,
    chain: &Chain,
    counters: &BlockCounters,
    throttle: &mut Throttle,
) -> Served {
    let Parsed::WithStatus { status, request } = request::parse(mem, chain) else {
        counters.bad_chains.inc();
        return Served::Used(0);
    };
    if let Ok(req) = &request {
        if !throttle.admit(charged_bytes(req)) {
            counters.rate_limited.inc();
            return Served::Later;
        }
    }
    let (code, written) = match request {
        Ok(req) => {
            counters.requests.inc();
            let (code, written) = Executor {
                disk,
                mem,
                bounce,
                features,
            }
            .execute(&req);
            match (code, req.kind) {
                (STATUS_OK, RequestKind::In) => counters.read_bytes.add(u64::from(written)),
                (STATUS_OK, RequestKind::Out) => counters.write_bytes.add(req.data_len()),
                (STATUS_IOERR, _) => counters.errors.inc(),
                (STATUS_UNSUPP, _) => counters.unsupported.inc(),
                _ => {}
            }
            (code, written)
        }
        Err(e) => {
            match e.status() {
                STATUS_UNSUPP => counters.unsupported.inc(),
                _ => counters.bad_chains.inc(),
            }
            (e.status(), 0)
        }
    };
    Served::Used(match mem.write_obj(code, status) {
        Ok(()) => written.saturating_add(1),
        Err(_) => written,
    })
}

/// The virtio-blk device: one request queue served on the event loop.
pub struct Block {
    /// Features, config space, the queue while running, counters.
    virtio: VirtioCommon,
    counters: Arc<BlockCounters>,
    /// The host side: the image file.
    disk: DiskImage,
    bounce: Vec<u8>,
    /// The rate limit (unlimited unless set).
    throttle: Throttle,
}

/// struct virtio_blk_config up to write_zeroes_may_unmap (and its padding).
const CONFIG_LEN: usize = 60;

impl Block {
    /// A device serving `disk` (read-only when the image is). It offers
    /// DISCARD and WRITE_ZEROES only where the host file system can punch
    /// holes, and allocates a bounce buffer of up to 1 MiB when it first
    /// moves data. Fails only when the host is out of file descriptors.
    pub fn new(disk: DiskImage) -> std::io::Result<Self> {
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if disk.read_only() {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        if disk.supports_discard() {
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let mut config = vec![0u8; CONFIG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            config[offset..offset + bytes.len()].copy_from_slice(bytes)
        };
        put(0, &(disk.size() >> SECTOR_SHIFT).to_le_bytes()); // capacity
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEG.to_le_bytes());
        put(44, &DISCARD_ALIGNMENT_SECTORS.to_le_bytes());
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        let counters = Arc::new(BlockCounters::default());
        let id = disk.id();
        let id_len = id.iter().position(|&b| b == 0).unwrap_or(ID_BYTES);
        let label = format!("block {}", String::from_utf8_lossy(&id[..id_len]));
        Ok(Self {
            virtio: VirtioCommon::new(
                label,
                DEVICE_ID_BLOCK,
                &QUEUE_SIZES,
                features,
                config,
                counters.clone(),
            )?,
            counters,
            disk,
            bounce: Vec::new(),
            throttle: Throttle::unlimited(),
        })
    }

    /// Limits the bytes read and written per second and the requests per
    /// second (see [`RateLimit`]). Fails only when the host is out of file
    /// descriptors (the limit's timer).
    pub fn with_rate_limit(self, limit: &RateLimit) -> std::io::Result<Self> {
        Ok(self.with_throttle(Throttle::new(limit)?))
    }

    pub(crate) fn with_throttle(mut self, throttle: Throttle) -> Self {
        self.throttle = throttle;
        self
    }

    // Only the tests ask.
    #[cfg(test)]
    pub(crate) fn disk(&self) -> &DiskImage {
        &self.disk
    }

    // Only the tests ask.
    #[cfg(test)]
    pub(crate) fn is_active(&self) -> bool {
        self.virtio.is_active()
    }

    /// Serves the available chains (up to a budget; the rest on the next
    /// turn), unless the rate limit waits for its timer.
    pub(crate) fn process_queue(&mut self) {
        if self.throttle.is_blocked() {
            return;
        }
        let features = self.virtio.active().map_or(0, |a| a.features);
        let (disk, bounce, counters) = (&self.disk, &mut self.bounce, &*self.counters);
        let throttle = &mut self.throttle;
        self.virtio
            .serve(0, CHAINS_PER_EVENT, CHAIN_SHAPE, |mem, chain| {
                serve_chain(disk, mem, bounce, features, chain, counters, throttle)
            });
    }

    /// The rate limit's timer fired: tokens are back, serve what waits.
    pub(crate) fn rate_timer_fired(&mut self) {
        self.throttle.timer_fired();
        self.process_queue();
    }
}

impl VirtioDevice for Block {
    fn virtio(&self) -> &VirtioCommon {
        &self.virtio
    }

    fn virtio_mut(&mut self) -> &mut VirtioCommon {
        &mut self.virtio
    }

    fn disk_overlay(&self) -> Option<std::io::Result<SavedOverlay>> {
        let state = self.disk.overlay_state()?;
        let file = self.disk.overlay_file()?.try_clone();
        Some(file.map(|file| SavedOverlay { file, state }))
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        self.virtio.watch_kicks(ops);
        self.throttle.watch(ops, TOKEN_RATE_TIMER);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() == TOKEN_RATE_TIMER {
            self.rate_timer_fired();
        } else if self.virtio.take_kick(&events).is_some() {
            self.process_queue();
        }
    }
}

#[cfg(test)]
mod overlay_tests;
#[cfg(test)]
mod tests;
