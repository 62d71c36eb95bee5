//! virtio-blk (device id 2): a raw disk image served from the event loop.
//!
//! Every request is parsed from its descriptor chain before any byte moves:
//! the header must be device-readable and come first, data descriptors must
//! point the right way for the request type, every buffer must lie inside
//! guest memory, and every file access is overflow-checked against the image
//! size. A chain that breaks a rule is answered with `VIRTIO_BLK_S_IOERR` when
//! it ends in a writable status byte, and returned with length 0 otherwise.
//!
//! I/O goes through a bounce buffer with `pread`/`pwrite` at explicit offsets
//! (never the file position); FLUSH is `fdatasync`; DISCARD and WRITE_ZEROES
//! are `fallocate` (PUNCH_HOLE / ZERO_RANGE) where the host file system has
//! them.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::*;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::VIRTIO_RING_F_EVENT_IDX;
use super::{ActivateError, Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// virtio device id of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;
pub const SECTOR_SIZE: u64 = 512;
const SECTOR_SHIFT: u32 = 9;
/// Entries in the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request (the header and status take two descriptors).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest single data segment.
pub const SIZE_MAX: u32 = 1 << 20;
/// Length of the id string GET_ID returns (not NUL-terminated at 20 bytes).
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Limits advertised for DISCARD / WRITE_ZEROES.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
pub const MAX_DISCARD_SEG: u32 = 32;
/// Discard granularity in sectors (4 KiB, the usual host block size).
const DISCARD_ALIGNMENT_SECTORS: u32 = 8;

/// Descriptors kept per chain; a longer chain is malformed (the legitimate
/// maximum is SEG_MAX + 2, even with indirect tables).
const MAX_CHAIN_DESCRIPTORS: usize = QUEUE_SIZE as usize + 2;
/// Request header: type, reserved, sector.
const HEADER_LEN: usize = 16;
/// One DISCARD / WRITE_ZEROES segment: sector, num_sectors, flags.
const DISCARD_SEGMENT_LEN: usize = 16;
/// Bounce buffer size: each pread/pwrite moves at most this much.
const BOUNCE_LEN: usize = 1 << 20;
/// Chains served per event before yielding to other devices.
const CHAINS_PER_EVENT: usize = 256;

const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Why a disk image cannot be used; each message is one line naming the path.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk image {0} does not exist")]
    NotFound(PathBuf),
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {0} is a directory, not a file")]
    Directory(PathBuf),
    #[error("disk image {0} is neither a regular file nor a block device")]
    NotAFile(PathBuf),
    #[error("disk image {path} is {size} bytes, not a multiple of 512")]
    BadSize { path: PathBuf, size: u64 },
    #[error("disk image {0} is in use by another process (locked)")]
    Locked(PathBuf),
    #[error("disk id '{0}' is longer than 20 bytes")]
    IdTooLong(String),
}

/// An open raw disk image and what the host file system allows on it.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    /// fallocate(PUNCH_HOLE) works on this file.
    punch_hole: bool,
}

impl DiskImage {
    /// Opens `path` (read-write unless `read_only`) and checks it is a usable
    /// raw image. `id` is the serial GET_ID reports; by default it is derived
    /// from the file name.
    pub fn open(path: &Path, read_only: bool, id: Option<&str>) -> Result<Self, DiskError> {
        let id = match id {
            Some(id) if id.len() > ID_BYTES => return Err(DiskError::IdTooLong(id.to_string())),
            Some(id) => id_bytes(id.as_bytes()),
            None => default_id(path),
        };
        // Look before opening: opening a FIFO would block, a directory may succeed.
        let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => DiskError::NotFound(path.to_path_buf()),
            _ => DiskError::Open {
                path: path.to_path_buf(),
                source,
            },
        })?;
        if meta.is_dir() {
            return Err(DiskError::Directory(path.to_path_buf()));
        }
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(DiskError::NotAFile(path.to_path_buf()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        lock(&file, read_only).map_err(|source| {
            if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
                DiskError::Locked(path.to_path_buf())
            } else {
                DiskError::Open {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        Self::with_file(file, path, read_only, id, meta.is_file())
    }

    /// A disk on a file the caller opened (read-write unless `read_only`),
    /// e.g. a private scratch copy nobody else can see: it is not locked.
    /// `path` names the disk in messages.
    pub fn from_file(
        file: File,
        path: &Path,
        read_only: bool,
        id: Option<&str>,
    ) -> Result<Self, DiskError> {
        let id = match id {
            Some(id) if id.len() > ID_BYTES => return Err(DiskError::IdTooLong(id.to_string())),
            Some(id) => id_bytes(id.as_bytes()),
            None => default_id(path),
        };
        let meta = file.metadata().map_err(|source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(DiskError::NotAFile(path.to_path_buf()));
        }
        Self::with_file(file, path, read_only, id, meta.is_file())
    }

    fn with_file(
        mut file: File,
        path: &Path,
        read_only: bool,
        id: [u8; ID_BYTES],
        is_file: bool,
    ) -> Result<Self, DiskError> {
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| DiskError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        if size & (SECTOR_SIZE - 1) != 0 {
            return Err(DiskError::BadSize {
                path: path.to_path_buf(),
                size,
            });
        }
        // Punching a hole past the end changes nothing, but tells whether the
        // file system supports it.
        let punch_hole =
            !read_only && is_file && fallocate(&file, PUNCH_HOLE_MODE, size, SECTOR_SIZE).is_ok();
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size,
            read_only,
            id,
            punch_hole,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GET_ID string (zero-padded).
    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// DISCARD and WRITE_ZEROES are offered (writable image, hole punching works).
    pub fn supports_discard(&self) -> bool {
        self.punch_hole
    }
}

fn lock(file: &File, shared: bool) -> std::io::Result<()> {
    let op = if shared { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    let ret = unsafe { libc::flock(file.as_raw_fd(), op) };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

const PUNCH_HOLE_MODE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE_MODE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    loop {
        // SAFETY: fallocate on a file descriptor we own; no memory is passed.
        let ret = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if ret == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn id_bytes(src: &[u8]) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let n = src.len().min(ID_BYTES);
    id[..n].copy_from_slice(&src[..n]);
    id
}

/// The file name, printable ASCII only (others become '_'), cut to 20 bytes.
fn default_id(path: &Path) -> [u8; ID_BYTES] {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let clean: Vec<u8> = name
        .chars()
        .map(|c| if c.is_ascii_graphic() { c as u8 } else { b'_' })
        .collect();
    id_bytes(&clean)
}

/// A guest buffer: validated to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A parsed request. `readable` excludes the header, `writable` the status byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: u32,
    pub sector: u64,
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
}

impl Request {
    fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// What a descriptor chain turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// No writable status byte at the end: return the chain with length 0.
    NoStatus,
    /// A status byte at `status`; `request` is the request, or the status to
    /// answer without doing anything.
    WithStatus {
        status: GuestAddress,
        request: Result<Request, u8>,
    },
}

/// One descriptor as the parser sees it.
#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

/// Parses a chain into a request; never touches memory outside the guest's.
pub fn parse_chain<M>(mem: &GuestMemoryMmap, chain: DescriptorChain<M>) -> Parsed
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut descs = Vec::new();
    let mut too_long = false;
    let mut last = None;
    // The iterator stops on loops (bounded by the table size), bad indices and
    // unreadable tables; it never yields more than the table holds.
    for d in chain {
        let desc = Desc {
            addr: d.addr(),
            len: d.len(),
            writable: d.is_write_only(),
        };
        if descs.len() < MAX_CHAIN_DESCRIPTORS {
            descs.push(desc);
        } else {
            too_long = true;
        }
        last = Some(desc);
    }
    parse_descriptors(mem, &descs, last, too_long)
}

fn parse_descriptors(
    mem: &GuestMemoryMmap,
    descs: &[Desc],
    last: Option<Desc>,
    too_long: bool,
) -> Parsed {
    // The status byte: the last byte of the last descriptor, device-writable.
    let Some(last) = last else {
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
    let request = parse_body(mem, descs, too_long);
    Parsed::WithStatus { status, request }
}

fn parse_body(mem: &GuestMemoryMmap, descs: &[Desc], too_long: bool) -> Result<Request, u8> {
    if too_long {
        return Err(STATUS_IOERR);
    }
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for d in descs {
        let access = if d.writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(d.addr, d.len as usize, access) {
            return Err(STATUS_IOERR);
        }
        if d.len == 0 {
            // Carries nothing; its address is never used.
            continue;
        }
        if d.writable {
            writable.push(Segment {
                addr: d.addr,
                len: d.len,
            });
        } else if !writable.is_empty() {
            // Device-readable after device-writable breaks the chain layout.
            return Err(STATUS_IOERR);
        } else {
            readable.push(Segment {
                addr: d.addr,
                len: d.len,
            });
        }
    }
    // Drop the status byte from the writable side.
    match writable.last_mut() {
        Some(s) if s.len > 1 => s.len -= 1,
        Some(_) => {
            writable.pop();
        }
        None => return Err(STATUS_IOERR),
    }

    // The header: the first 16 readable bytes.
    let mut header = [0u8; HEADER_LEN];
    let mut cursor = Cursor::new(&readable);
    if cursor.remaining() < HEADER_LEN as u64 {
        return Err(STATUS_IOERR);
    }
    cursor.gather(mem, &mut header).map_err(|_| STATUS_IOERR)?;
    let readable = cursor.rest();
    let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let request = Request {
        kind,
        sector,
        readable,
        writable,
    };
    let (rd, wr) = (request.readable_len(), request.writable_len());
    let sector_multiple = |n: u64| n & (SECTOR_SIZE - 1) == 0;
    let ok = match kind {
        VIRTIO_BLK_T_IN => rd == 0 && sector_multiple(wr),
        VIRTIO_BLK_T_OUT => wr == 0 && sector_multiple(rd),
        VIRTIO_BLK_T_FLUSH => rd == 0 && wr == 0,
        VIRTIO_BLK_T_GET_ID => rd == 0,
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            wr == 0
                && rd > 0
                && rd & (DISCARD_SEGMENT_LEN as u64 - 1) == 0
                && rd / DISCARD_SEGMENT_LEN as u64 <= u64::from(MAX_DISCARD_SEG)
        }
        _ => return Err(STATUS_UNSUPP),
    };
    if ok {
        Ok(request)
    } else {
        Err(STATUS_IOERR)
    }
}

/// A position in a list of guest segments, for copying in and out in order.
struct Cursor<'a> {
    segs: &'a [Segment],
    index: usize,
    offset: u32,
}

impl<'a> Cursor<'a> {
    fn new(segs: &'a [Segment]) -> Self {
        Self {
            segs,
            index: 0,
            offset: 0,
        }
    }

    fn remaining(&self) -> u64 {
        let total: u64 = self.segs[self.index.min(self.segs.len())..]
            .iter()
            .map(|s| u64::from(s.len))
            .sum();
        total - u64::from(self.offset)
    }

    /// The current segment's unconsumed part and how far it reaches.
    fn current(&self) -> Option<(GuestAddress, u32)> {
        let s = self.segs.get(self.index)?;
        Some((
            s.addr.unchecked_add(u64::from(self.offset)),
            s.len - self.offset,
        ))
    }

    fn advance(&mut self, n: u32) {
        self.offset += n;
        if let Some(s) = self.segs.get(self.index) {
            if self.offset >= s.len {
                self.index += 1;
                self.offset = 0;
            }
        }
    }

    /// Fills `buf` from guest memory; fails if the segments run out.
    fn gather(&mut self, mem: &GuestMemoryMmap, buf: &mut [u8]) -> Result<(), ()> {
        let mut done = 0;
        while done < buf.len() {
            let (addr, avail) = self.current().ok_or(())?;
            let n = (avail as usize).min(buf.len() - done);
            mem.read_slice(&mut buf[done..done + n], addr)
                .map_err(|_| ())?;
            self.advance(n as u32);
            done += n;
        }
        Ok(())
    }

    /// Copies `buf` into guest memory; fails if the segments run out.
    fn scatter(&mut self, mem: &GuestMemoryMmap, buf: &[u8]) -> Result<(), ()> {
        let mut done = 0;
        while done < buf.len() {
            let (addr, avail) = self.current().ok_or(())?;
            let n = (avail as usize).min(buf.len() - done);
            mem.write_slice(&buf[done..done + n], addr)
                .map_err(|_| ())?;
            self.advance(n as u32);
            done += n;
        }
        Ok(())
    }

    /// What is left, as segments.
    fn rest(&self) -> Vec<Segment> {
        let mut out = Vec::new();
        if let Some((addr, len)) = self.current() {
            if len > 0 {
                out.push(Segment { addr, len });
            }
            out.extend_from_slice(&self.segs[self.index + 1..]);
        }
        out
    }
}

/// Runs requests against a disk image.
pub struct Executor<'a> {
    pub disk: &'a DiskImage,
    pub mem: &'a GuestMemoryMmap,
    pub bounce: &'a mut Vec<u8>,
    /// Features the driver accepted.
    pub features: u64,
}

impl Executor<'_> {
    /// Executes one request; returns (status, bytes written into the data buffers).
    pub fn execute(&mut self, req: &Request) -> (u8, u32) {
        match req.kind {
            VIRTIO_BLK_T_IN => self.read(req),
            VIRTIO_BLK_T_OUT => (self.write(req), 0),
            VIRTIO_BLK_T_FLUSH => (self.flush(), 0),
            VIRTIO_BLK_T_GET_ID => self.get_id(req),
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => (self.discard(req), 0),
            _ => (STATUS_UNSUPP, 0),
        }
    }

    /// The byte range `[offset, offset + len)` of the image, if it fits.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len)?;
        (end <= self.disk.size).then_some(offset)
    }

    fn bounce(&mut self, len: u64) -> &mut [u8] {
        let n = len.min(BOUNCE_LEN as u64) as usize;
        if self.bounce.len() < n {
            self.bounce.resize(n, 0);
        }
        &mut self.bounce[..n]
    }

    fn read(&mut self, req: &Request) -> (u8, u32) {
        let len = req.writable_len();
        let Some(mut offset) = self.range(req.sector, len) else {
            return (STATUS_IOERR, 0);
        };
        let mem = self.mem;
        let mut cursor = Cursor::new(&req.writable);
        let mut done: u64 = 0;
        while done < len {
            let file = &self.disk.file;
            let buf = self.bounce(len - done);
            let n = buf.len();
            if file.read_exact_at(buf, offset).is_err() || cursor.scatter(mem, buf).is_err() {
                return (STATUS_IOERR, done as u32);
            }
            done += n as u64;
            offset += n as u64;
        }
        (STATUS_OK, done as u32)
    }

    fn write(&mut self, req: &Request) -> u8 {
        if self.disk.read_only {
            return STATUS_IOERR;
        }
        let len = req.readable_len();
        let Some(mut offset) = self.range(req.sector, len) else {
            return STATUS_IOERR;
        };
        let mem = self.mem;
        let mut cursor = Cursor::new(&req.readable);
        let mut done: u64 = 0;
        while done < len {
            let file = &self.disk.file;
            let buf = self.bounce(len - done);
            let n = buf.len();
            if cursor.gather(mem, buf).is_err() || file.write_all_at(buf, offset).is_err() {
                return STATUS_IOERR;
            }
            done += n as u64;
            offset += n as u64;
        }
        STATUS_OK
    }

    fn flush(&mut self) -> u8 {
        if self.disk.read_only {
            return STATUS_OK;
        }
        match self.disk.file.sync_data() {
            Ok(()) => STATUS_OK,
            Err(e) => {
                log::warn!(
                    "virtio-blk: fdatasync on {} failed: {e}",
                    self.disk.path.display()
                );
                STATUS_IOERR
            }
        }
    }

    fn get_id(&mut self, req: &Request) -> (u8, u32) {
        let n = req.writable_len().min(ID_BYTES as u64) as usize;
        let mut cursor = Cursor::new(&req.writable);
        match cursor.scatter(self.mem, &self.disk.id[..n]) {
            Ok(()) => (STATUS_OK, n as u32),
            Err(()) => (STATUS_IOERR, 0),
        }
    }

    fn discard(&mut self, req: &Request) -> u8 {
        let feature = if req.kind == VIRTIO_BLK_T_DISCARD {
            1u64 << VIRTIO_BLK_F_DISCARD
        } else {
            1u64 << VIRTIO_BLK_F_WRITE_ZEROES
        };
        if self.disk.read_only {
            return STATUS_IOERR;
        }
        if self.features & feature == 0 || !self.disk.punch_hole {
            return STATUS_UNSUPP;
        }
        let mut cursor = Cursor::new(&req.readable);
        let mut ranges = Vec::new();
        while cursor.remaining() > 0 {
            let mut seg = [0u8; DISCARD_SEGMENT_LEN];
            if cursor.gather(self.mem, &mut seg).is_err() {
                return STATUS_IOERR;
            }
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
            let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            // Reserved flag bits, or "unmap" on a discard, are not supported.
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
                || (req.kind == VIRTIO_BLK_T_DISCARD && unmap)
            {
                return STATUS_UNSUPP;
            }
            if sectors > MAX_DISCARD_SECTORS {
                return STATUS_IOERR;
            }
            let len = u64::from(sectors) << SECTOR_SHIFT;
            let Some(offset) = self.range(sector, len) else {
                return STATUS_IOERR;
            };
            ranges.push((offset, len, unmap));
        }
        for (offset, len, unmap) in ranges {
            if len == 0 {
                continue;
            }
            let result = if req.kind == VIRTIO_BLK_T_DISCARD || unmap {
                fallocate(&self.disk.file, PUNCH_HOLE_MODE, offset, len)
            } else {
                // Zeroes in place; a hole reads back as zeroes too.
                match fallocate(&self.disk.file, ZERO_RANGE_MODE, offset, len) {
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                        fallocate(&self.disk.file, PUNCH_HOLE_MODE, offset, len)
                    }
                    other => other,
                }
            };
            match result {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return STATUS_UNSUPP,
                Err(e) => {
                    log::warn!(
                        "virtio-blk: fallocate on {} failed: {e}",
                        self.disk.path.display()
                    );
                    return STATUS_IOERR;
                }
            }
        }
        STATUS_OK
    }
}

/// Serves one chain end to end; returns the used length to report.
pub fn serve_chain<M>(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    bounce: &mut Vec<u8>,
    features: u64,
    chain: DescriptorChain<M>,
) -> u32
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    match parse_chain(mem, chain) {
        Parsed::NoStatus => 0,
        Parsed::WithStatus { status, request } => {
            let (code, written) = match request {
                Ok(req) => Executor {
                    disk,
                    mem,
                    bounce,
                    features,
                }
                .execute(&req),
                Err(code) => (code, 0),
            };
            match mem.write_obj(code, status) {
                Ok(()) => written.saturating_add(1),
                Err(_) => written,
            }
        }
    }
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Interrupt,
    features: u64,
}

/// The virtio-blk device: one request queue served on the event loop.
pub struct Block {
    disk: DiskImage,
    avail_features: u64,
    config: [u8; CONFIG_LEN],
    queue_evts: [EventFd; 1],
    active: Option<Active>,
    bounce: Vec<u8>,
}

/// struct virtio_blk_config up to write_zeroes_may_unmap (and its padding).
const CONFIG_LEN: usize = 60;

impl Block {
    pub fn new(disk: DiskImage) -> std::io::Result<Self> {
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if disk.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        if disk.supports_discard() {
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let mut config = [0u8; CONFIG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            config[offset..offset + bytes.len()].copy_from_slice(bytes)
        };
        put(0, &(disk.size >> SECTOR_SHIFT).to_le_bytes()); // capacity
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEG.to_le_bytes());
        put(44, &DISCARD_ALIGNMENT_SECTORS.to_le_bytes());
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        Ok(Self {
            disk,
            avail_features: features,
            config,
            queue_evts: [EventFd::new(EFD_NONBLOCK)?],
            active: None,
            bounce: Vec::new(),
        })
    }

    pub fn disk(&self) -> &DiskImage {
        &self.disk
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Serves the available chains (up to a budget; the rest on the next turn).
    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Active {
            mem,
            queue,
            interrupt,
            features,
        } = active;
        let (disk, bounce) = (&self.disk, &mut self.bounce);
        let more = super::serve_queue(queue, mem, interrupt, CHAINS_PER_EVENT, |chain| {
            serve_chain(disk, mem, bounce, *features, chain)
        });
        if more {
            // Come back after the other event sources had a turn.
            let _ = self.queue_evts[0].write(1);
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Some(queue) = activation.queues.into_iter().next() else {
            return Err(ActivateError::BadQueue(0));
        };
        self.active = Some(Active {
            mem: activation.mem,
            queue,
            interrupt: activation.interrupt,
            features: activation.features,
        });
        // Requests queued before DRIVER_OK were ignored: look once now.
        let _ = self.queue_evts[0].write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

/// Copies `config[offset..]` into `data`; bytes past the end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = (config.len() - start).min(data.len());
    data[..n].copy_from_slice(&config[start..start + n]);
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_evts[0], EventSet::IN)) {
            log::error!("virtio-blk: cannot watch the queue eventfd: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.queue_evts[0].as_raw_fd() {
            // Drained even when inactive: kicks before DRIVER_OK are ignored.
            let _ = self.queue_evts[0].read();
            self.process_queue();
        }
    }
}

#[cfg(test)]
mod tests;
