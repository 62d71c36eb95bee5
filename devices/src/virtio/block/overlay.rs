//! A copy-on-write disk: a base image that is only ever read, under a
//! private sparse overlay that takes every write.
//!
//! The disk is cut into chunks of [`CHUNK`] bytes. A bitmap (one bit per
//! chunk: 2 MiB of memory per TiB of base) tells which chunks live in the
//! overlay; the others are read from the base. A write to part of a chunk
//! not yet in the overlay first copies the rest of that chunk up from the
//! base, so a chunk in the overlay is always whole. Discard and write-zeroes
//! punch holes in the overlay and mark their chunks as in it: the guest reads
//! zeroes there, never the base's bytes again. The overlay is an unnamed
//! file (O_TMPFILE, or a memfd) that vanishes with its last descriptor.
//!
//! 64 KiB chunks: small enough that the copy-up before a guest's 4 KiB write
//! is cheap (one 64 KiB read of the base, mostly in the page cache), large
//! enough that the bitmap stays small for big images and that a long read
//! crosses few chunk boundaries (runs of chunks on one side are read with one
//! `pread`). It is also qcow2's default cluster size.

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::disk::{fallocate, PUNCH_HOLE_MODE};

/// Bytes per chunk of the block map.
pub(crate) const CHUNK: u64 = 64 << 10;

/// What the base looked like when it was opened: a base whose size or
/// modification time differs later was written meanwhile. A snapshot keeps
/// it, to check the base at restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BaseStamp {
    size: u64,
    mtime: (i64, i64),
}

impl BaseStamp {
    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The stamp of `base` now.
    pub fn of(base: &File) -> io::Result<Self> {
        let meta = base.metadata()?;
        Ok(Self {
            // A block device has no length in its metadata: seek to its end.
            size: (&mut &*base).seek(SeekFrom::End(0))?,
            mtime: (meta.mtime(), meta.mtime_nsec()),
        })
    }
}

/// The base and its overlay.
#[derive(Debug)]
pub(crate) struct Overlay {
    base: File,
    overlay: File,
    stamp: BaseStamp,
    /// One bit per chunk, set once the chunk lives in `overlay`. Cells: the
    /// device serves its queue through a shared reference, on one thread.
    in_overlay: Vec<Cell<u64>>,
}

impl Overlay {
    /// An overlay over `base` (whose size is the disk's) in the empty file
    /// `overlay`, which is given the base's size (sparse). `stamp` is the
    /// base as it was when it was opened: if it changed since, this fails
    /// with [`io::ErrorKind::InvalidData`] (see [`Overlay::check_base`]).
    pub(crate) fn new(base: File, stamp: BaseStamp, overlay: File) -> io::Result<Self> {
        overlay.set_len(stamp.size)?;
        let words = stamp.size.div_ceil(CHUNK).div_ceil(64) as usize;
        let this = Self {
            base,
            overlay,
            stamp,
            in_overlay: (0..words).map(|_| Cell::new(0)).collect(),
        };
        this.check_base()?;
        Ok(this)
    }

    /// An overlay over `base` whose chunks in `chunks` (a map saved by
    /// [`Overlay::saved`]) are already in `overlay`. A map of another size
    /// than `stamp`'s disk needs, or with chunks past its end, is refused
    /// with [`io::ErrorKind::InvalidInput`] (it comes from a file on disk).
    pub(crate) fn with_chunks(
        base: File,
        stamp: BaseStamp,
        overlay: File,
        chunks: &[u64],
    ) -> io::Result<Self> {
        let this = Self::new(base, stamp, overlay)?;
        let total = stamp.size.div_ceil(CHUNK);
        let last_word = chunks.last().copied().unwrap_or(0);
        let past_end = match total % 64 {
            0 => 0,
            used => last_word >> used,
        };
        if chunks.len() != this.in_overlay.len() || past_end != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a chunk map of {} words for a disk of {total} chunks",
                    chunks.len()
                ),
            ));
        }
        for (cell, &word) in this.in_overlay.iter().zip(chunks) {
            cell.set(word);
        }
        Ok(this)
    }

    /// The base's stamp and which chunks live in the overlay: with a copy
    /// of the overlay file, what [`Overlay::with_chunks`] starts from.
    pub(crate) fn saved(&self) -> OverlayState {
        OverlayState {
            base: self.stamp,
            chunks: self.in_overlay.iter().map(Cell::get).collect(),
        }
    }

    /// Fails with [`io::ErrorKind::InvalidData`] if the base's size or
    /// modification time is no longer what it was when it was opened.
    pub(crate) fn check_base(&self) -> io::Result<()> {
        match BaseStamp::of(&self.base)? == self.stamp {
            true => Ok(()),
            false => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the base image changed (size or modification time)",
            )),
        }
    }

    pub(crate) fn size(&self) -> u64 {
        self.stamp.size
    }

    /// The file that takes the writes.
    pub(crate) fn overlay_file(&self) -> &File {
        &self.overlay
    }

    fn is_in_overlay(&self, chunk: u64) -> bool {
        let word = &self.in_overlay[(chunk / 64) as usize];
        word.get() & (1 << (chunk % 64)) != 0
    }

    fn mark(&self, chunk: u64) {
        let word = &self.in_overlay[(chunk / 64) as usize];
        word.set(word.get() | 1 << (chunk % 64));
    }

    /// The byte range of `chunk` (the last one ends with the disk).
    fn extent(&self, chunk: u64) -> (u64, u64) {
        let start = chunk * CHUNK;
        (start, (start + CHUNK).min(self.size()))
    }

    /// Reads `buf.len()` bytes at `offset` (inside the disk): each run of
    /// chunks on one side with one `pread`.
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let first = at / CHUNK;
            let upper = self.is_in_overlay(first);
            let mut next = first + 1;
            while next * CHUNK < end && self.is_in_overlay(next) == upper {
                next += 1;
            }
            let run_end = (next * CHUNK).min(end);
            let piece = &mut buf[(at - offset) as usize..(run_end - offset) as usize];
            match upper {
                true => self.overlay.read_exact_at(piece, at)?,
                false => self.base.read_exact_at(piece, at)?,
            }
            at = run_end;
        }
        Ok(())
    }

    /// Writes `buf` at `offset` (inside the disk) into the overlay, copying
    /// up the rest of each chunk it covers only in part.
    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let chunk = at / CHUNK;
            let (start, stop) = self.extent(chunk);
            let piece_end = stop.min(end);
            let piece = &buf[(at - offset) as usize..(piece_end - offset) as usize];
            if self.is_in_overlay(chunk) || (at == start && piece_end == stop) {
                self.overlay.write_all_at(piece, at)?;
            } else {
                // The chunk from the base with the new bytes in it, in one write.
                let mut whole = vec![0u8; (stop - start) as usize];
                self.base.read_exact_at(&mut whole, start)?;
                whole[(at - start) as usize..(piece_end - start) as usize].copy_from_slice(piece);
                self.overlay.write_all_at(&whole, start)?;
            }
            self.mark(chunk);
            at = piece_end;
        }
        Ok(())
    }

    /// Makes the range `[offset, offset + len)` (inside the disk) read back
    /// as zeroes: a hole in the overlay, after the chunks it covers only in
    /// part were copied up.
    pub(crate) fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let (first, last) = (offset / CHUNK, (end - 1) / CHUNK);
        for chunk in [first, last] {
            let (start, stop) = self.extent(chunk);
            let whole = offset <= start && stop <= end;
            if !whole && !self.is_in_overlay(chunk) {
                let mut bytes = vec![0u8; (stop - start) as usize];
                self.base.read_exact_at(&mut bytes, start)?;
                self.overlay.write_all_at(&bytes, start)?;
                self.mark(chunk);
            }
        }
        fallocate(&self.overlay, PUNCH_HOLE_MODE, offset, len)?;
        (first..=last).for_each(|chunk| self.mark(chunk));
        Ok(())
    }

    /// Makes written data durable (`fdatasync` of the overlay; the base is
    /// never written).
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.overlay.sync_data()
    }

    /// Punching a hole past the end changes nothing, but tells whether the
    /// overlay's file system supports it.
    pub(crate) fn can_punch_holes(&self) -> bool {
        fallocate(&self.overlay, PUNCH_HOLE_MODE, self.size(), 512).is_ok()
    }
}

/// What an overlay disk's snapshot holds besides the overlay's bytes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OverlayState {
    /// The base as it was: a restore refuses a base that changed since.
    pub base: BaseStamp,
    /// One bit per chunk of [`CHUNK`] bytes, set if it is in the overlay.
    pub chunks: Vec<u64>,
}

/// Copies the data of `from` (its first `len` bytes) into `to` at the same
/// offsets, skipping holes (SEEK_DATA/SEEK_HOLE: the copy is as sparse as
/// the source, and costs what was written, not the disk's size), and gives
/// `to` the size `len`.
pub fn copy_sparse(from: &File, to: &File, len: u64) -> io::Result<()> {
    to.set_len(len)?;
    let mut at = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while at < len {
        let Some(start) = seek_data(from, at, libc::SEEK_DATA)? else {
            break; // only a hole is left
        };
        let end = seek_data(from, start, libc::SEEK_HOLE)?
            .unwrap_or(len)
            .min(len);
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            from.read_exact_at(&mut buf[..n], pos)?;
            to.write_all_at(&buf[..n], pos)?;
            pos += n as u64;
        }
        at = end;
    }
    Ok(())
}

/// lseek(`whence`) from `offset`; None past the last data (ENXIO).
fn seek_data(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: lseek on a descriptor `file` owns; it only moves the file
    // position, which nothing relies on (every disk access is positional).
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if found < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(found as u64))
}

/// Where an overlay's unnamed file may go.
#[derive(Clone, Copy, Debug)]
pub enum OverlayPlace<'a> {
    /// This directory and no other (the user chose it).
    Only(&'a Path),
    /// The first of these directories that takes a new file, else memory
    /// (a memfd).
    FirstOf(&'a [PathBuf]),
}

/// Where [`unnamed_file_at`] puts memory's file, in messages.
pub(crate) const MEMORY: &str = "memory (memfd)";

/// A new unnamed file for an overlay, at `place`, and the directory it is
/// in ([`MEMORY`] for a memfd). The error names the directory that could not
/// take it.
pub(crate) fn unnamed_file_at(
    place: OverlayPlace<'_>,
) -> Result<(File, PathBuf), (PathBuf, io::Error)> {
    let dirs = match place {
        OverlayPlace::Only(dir) => {
            return match unnamed_file(dir) {
                Ok(file) => Ok((file, dir.to_owned())),
                Err(e) => Err((dir.to_owned(), e)),
            }
        }
        OverlayPlace::FirstOf(dirs) => dirs,
    };
    for dir in dirs {
        match unnamed_file(dir) {
            Ok(file) => return Ok((file, dir.clone())),
            Err(e) => log::info!("overlay: no file in {}: {e}", dir.display()),
        }
    }
    match memfd() {
        Ok(file) => Ok((file, PathBuf::from(MEMORY))),
        Err(e) => Err((PathBuf::from(MEMORY), e)),
    }
}

/// A new file in `dir` that has no name.
pub(crate) fn unnamed_file(dir: &Path) -> io::Result<File> {
    let opened = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir);
    match opened {
        // Kernels and file systems without O_TMPFILE say one of these.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
            ) =>
        {
            named_then_unlinked(dir)
        }
        other => other,
    }
}

/// A new file in `dir`, unlinked as soon as it is open.
pub(crate) fn named_then_unlinked(dir: &Path) -> io::Result<File> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    for attempt in 0..16 {
        let path = dir.join(format!(
            ".kiln-overlay-{}-{nanos:x}-{attempt}",
            std::process::id()
        ));
        let created = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path);
        match created {
            Ok(file) => return std::fs::remove_file(&path).map(|()| file),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free overlay file name",
    ))
}

/// An unnamed file in memory.
pub(crate) fn memfd() -> io::Result<File> {
    // SAFETY: memfd_create with a NUL-terminated name and flags; the result
    // is checked before use.
    let fd = unsafe { libc::memfd_create(c"kiln-overlay".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The path of the file behind `file`'s descriptor, as /proc shows it
/// (`DIR/#INODE (deleted)` for an unnamed file, `/memfd:...` for a memfd).
#[cfg(test)]
pub(crate) fn fd_path(file: &File) -> String {
    let link = format!("/proc/self/fd/{}", file.as_raw_fd());
    std::fs::read_link(link).unwrap().display().to_string()
}
