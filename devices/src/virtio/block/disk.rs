//! The host side of a virtio-blk device: a raw disk image file, checked
//! and locked when opened, read and written at explicit offsets (never the
//! file position), synced with `fdatasync`, and holes punched or ranges
//! zeroed with `fallocate` where the host file system has them.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

use super::overlay::{
    copy_sparse, unnamed_file_at, BaseStamp, Overlay, OverlayPlace, OverlayState,
};

/// virtio-blk's sector: every offset and length the guest gives is in these.
pub(crate) const SECTOR_SIZE: u64 = 512;
/// Length of the id string GET_ID returns (not NUL-terminated at 20 bytes).
pub(crate) const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Why a disk image cannot be used; each message is one line naming the path.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Nothing at the path.
    #[error("disk image {0} does not exist")]
    NotFound(PathBuf),
    /// The image cannot be opened or examined (e.g. no permission to write
    /// it when it is not read-only).
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why it cannot be opened.
        #[source]
        source: std::io::Error,
    },
    /// The path is a directory.
    #[error("disk image {0} is a directory, not a file")]
    Directory(PathBuf),
    /// The path is a FIFO, socket or character device.
    #[error("disk image {0} is neither a regular file nor a block device")]
    NotAFile(PathBuf),
    /// The size is not a whole number of 512-byte sectors.
    #[error("disk image {path} is {size} bytes, not a multiple of 512")]
    BadSize {
        /// The image.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// Another process holds a conflicting lock (`flock`): a writer
    /// excludes everyone, a reader excludes writers.
    #[error("disk image {0} is in use by another process (locked)")]
    Locked(PathBuf),
    /// The base of an overlay disk changed (size or modification time)
    /// since it was opened.
    #[error("disk image {0} changed while it was in use as a base")]
    BaseChanged(PathBuf),
    /// The unnamed file of an overlay disk cannot be made in this directory
    /// (missing, read-only, not the user's).
    #[error("cannot make an overlay file in {}: {source}", dir.display())]
    OverlayFile {
        /// The directory (`memory (memfd)` for memory).
        dir: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The serial is longer than virtio-blk can report.
    #[error("disk id '{0}' is longer than 20 bytes")]
    IdTooLong(String),
}

/// Where a disk's bytes are.
#[derive(Debug)]
enum Backing {
    /// A raw image file, read and written in place.
    Raw(File),
    /// A base image only read, under an overlay that takes the writes.
    Overlay(Overlay),
}

/// An open disk (a raw image, or a copy-on-write overlay over one) and what
/// the host file system allows on it.
#[derive(Debug)]
pub struct DiskImage {
    backing: Backing,
    path: PathBuf,
    size: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    /// fallocate(PUNCH_HOLE) works on this file.
    pub(super) punch_hole: bool,
}

impl DiskImage {
    /// Opens `path` (read-write unless `read_only`) and checks it is a usable
    /// raw image. `id` is the serial GET_ID reports; by default it is derived
    /// from the file name.
    pub fn open(path: &Path, read_only: bool, id: Option<&str>) -> Result<Self, DiskError> {
        let id = checked_id(id, path)?;
        let (file, is_file) = open_locked(path, read_only)?;
        Self::with_backing(Backing::Raw(file), path, read_only, id, is_file)
    }

    /// A copy-on-write disk over the image at `path`: the image is opened
    /// read-only and locked shared (a kiln that writes it, `--disk`, makes
    /// this fail, and none can open it for writing meanwhile), and every
    /// write the guest makes goes to a private unnamed file at `place`
    /// (sparse: it costs only what the guest writes, up to the image's size).
    /// An image that changed while the disk was set up is refused.
    pub fn overlay(
        path: &Path,
        place: OverlayPlace<'_>,
        id: Option<&str>,
    ) -> Result<Self, DiskError> {
        let id = checked_id(id, path)?;
        let (base, _) = open_locked(path, true)?;
        let stamp = BaseStamp::of(&base).map_err(|source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let (upper, dir) = unnamed_file_at(place)
            .map_err(|(dir, source)| DiskError::OverlayFile { dir, source })?;
        log::info!(
            "disk {}: copy-on-write, its writes in an unnamed file in {}",
            path.display(),
            dir.display()
        );
        Self::over(base, stamp, upper, path, id)
    }

    /// A copy-on-write disk over the open `base` (only ever read) whose
    /// writes go to `overlay`, an empty file nobody else writes (e.g. a
    /// memfd). Neither is locked. `path` names the disk in messages.
    pub fn overlay_on(
        base: File,
        overlay: File,
        path: &Path,
        id: Option<&str>,
    ) -> Result<Self, DiskError> {
        let id = checked_id(id, path)?;
        let stamp = BaseStamp::of(&base).map_err(|source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::over(base, stamp, overlay, path, id)
    }

    fn over(
        base: File,
        stamp: BaseStamp,
        upper: File,
        path: &Path,
        id: [u8; ID_BYTES],
    ) -> Result<Self, DiskError> {
        let overlay = Overlay::new(base, stamp, upper).map_err(|source| match source.kind() {
            std::io::ErrorKind::InvalidData => DiskError::BaseChanged(path.to_path_buf()),
            _ => DiskError::Open {
                path: path.to_path_buf(),
                source,
            },
        })?;
        // The overlay's own file system decides about hole punching.
        Self::with_backing(Backing::Overlay(overlay), path, false, id, false)
    }

    /// A copy-on-write disk over the image at `path` (opened and locked as
    /// by [`DiskImage::overlay`]) that starts with the guest's writes of a
    /// snapshot: `saved`'s data (only read: copied, sparse, into a new
    /// unnamed file at `place`) and `state`'s chunk map. A base whose size
    /// or modification time is not the saved one is
    /// [`DiskError::BaseChanged`]; a chunk map that does not fit the disk,
    /// [`DiskError::Open`] with [`std::io::ErrorKind::InvalidInput`].
    pub fn overlay_restored(
        path: &Path,
        place: OverlayPlace<'_>,
        id: Option<&str>,
        saved: &File,
        state: &OverlayState,
    ) -> Result<Self, DiskError> {
        let id = checked_id(id, path)?;
        let open_error = |source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        };
        let (base, _) = open_locked(path, true)?;
        let stamp = BaseStamp::of(&base).map_err(open_error)?;
        if stamp != state.base {
            return Err(DiskError::BaseChanged(path.to_path_buf()));
        }
        let (upper, dir) = unnamed_file_at(place)
            .map_err(|(dir, source)| DiskError::OverlayFile { dir, source })?;
        copy_sparse(saved, &upper, stamp.size()).map_err(|source| DiskError::OverlayFile {
            dir: dir.clone(),
            source,
        })?;
        log::info!(
            "disk {}: copy-on-write from a snapshot's writes, in an unnamed file in {}",
            path.display(),
            dir.display()
        );
        let overlay = Overlay::with_chunks(base, stamp, upper, &state.chunks).map_err(
            |source| match source.kind() {
                std::io::ErrorKind::InvalidData => DiskError::BaseChanged(path.to_path_buf()),
                _ => open_error(source),
            },
        )?;
        Self::with_backing(Backing::Overlay(overlay), path, false, id, false)
    }

    /// What a snapshot of an overlay disk keeps: the base's stamp and the
    /// chunk map (with a copy of [`DiskImage::overlay_file`]). None for a
    /// raw disk.
    pub fn overlay_state(&self) -> Option<OverlayState> {
        match &self.backing {
            Backing::Raw(_) => None,
            Backing::Overlay(o) => Some(o.saved()),
        }
    }

    /// Fails with [`DiskError::BaseChanged`] if the base of an overlay disk
    /// is no longer the size or has no longer the modification time it had
    /// when it was opened (a raw disk always passes).
    pub fn check_base(&self) -> Result<(), DiskError> {
        match &self.backing {
            Backing::Raw(_) => Ok(()),
            Backing::Overlay(o) => o.check_base().map_err(|source| match source.kind() {
                std::io::ErrorKind::InvalidData => DiskError::BaseChanged(self.path.clone()),
                _ => DiskError::Open {
                    path: self.path.clone(),
                    source,
                },
            }),
        }
    }

    /// The unnamed file an overlay disk writes to (none for a raw disk).
    pub fn overlay_file(&self) -> Option<&File> {
        match &self.backing {
            Backing::Raw(_) => None,
            Backing::Overlay(o) => Some(o.overlay_file()),
        }
    }

    /// A disk on a file the caller opened (read-write unless `read_only`),
    /// e.g. a private copy nobody else can see: it is not locked.
    /// `path` names the disk in messages.
    pub fn from_file(
        file: File,
        path: &Path,
        read_only: bool,
        id: Option<&str>,
    ) -> Result<Self, DiskError> {
        let id = checked_id(id, path)?;
        let meta = file.metadata().map_err(|source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(DiskError::NotAFile(path.to_path_buf()));
        }
        Self::with_backing(Backing::Raw(file), path, read_only, id, meta.is_file())
    }

    fn with_backing(
        backing: Backing,
        path: &Path,
        read_only: bool,
        id: [u8; ID_BYTES],
        is_file: bool,
    ) -> Result<Self, DiskError> {
        let size = match &backing {
            // A block device has no length in its metadata: seek to its end.
            Backing::Raw(file) => (&mut &*file).seek(SeekFrom::End(0)),
            Backing::Overlay(o) => Ok(o.size()),
        }
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
        let punch_hole = !read_only
            && match &backing {
                Backing::Raw(file) => {
                    is_file && fallocate(file, PUNCH_HOLE_MODE, size, SECTOR_SIZE).is_ok()
                }
                Backing::Overlay(o) => o.can_punch_holes(),
            };
        Ok(Self {
            backing,
            path: path.to_path_buf(),
            size,
            read_only,
            id,
            punch_hole,
        })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn read_only(&self) -> bool {
        self.read_only
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The GET_ID string (zero-padded).
    pub(crate) fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// DISCARD and WRITE_ZEROES are offered (writable image, hole punching works).
    pub(crate) fn supports_discard(&self) -> bool {
        self.punch_hole
    }

    /// The byte offset of `[sector * 512, + len)`, if that range is inside
    /// the image.
    pub(crate) fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len)?;
        (end <= self.size).then_some(offset)
    }

    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match &self.backing {
            Backing::Raw(file) => file.read_exact_at(buf, offset),
            Backing::Overlay(o) => o.read_at(buf, offset),
        }
    }

    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        match &self.backing {
            Backing::Raw(file) => file.write_all_at(buf, offset),
            Backing::Overlay(o) => o.write_at(buf, offset),
        }
    }

    /// Makes written data durable (`fdatasync`).
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        match &self.backing {
            Backing::Raw(file) => file.sync_data(),
            Backing::Overlay(o) => o.sync(),
        }
    }

    /// Deallocates a range: it reads back as zeroes.
    pub(crate) fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        match &self.backing {
            Backing::Raw(file) => fallocate(file, PUNCH_HOLE_MODE, offset, len),
            Backing::Overlay(o) => o.zero(offset, len),
        }
    }

    /// Zeroes a range in place where the file system can; elsewhere punches
    /// a hole, which reads back as zeroes too (an overlay always punches).
    pub(crate) fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let Backing::Raw(file) = &self.backing else {
            return self.punch_hole(offset, len);
        };
        match fallocate(file, ZERO_RANGE_MODE, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.punch_hole(offset, len),
            other => other,
        }
    }
}

/// Opens the image at `path` (read-write unless `read_only`) after checking
/// what it is, and locks it (shared when read-only). Also tells whether it is
/// a regular file (else a block device).
fn open_locked(path: &Path, read_only: bool) -> Result<(File, bool), DiskError> {
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
    Ok((file, meta.is_file()))
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

pub(super) const PUNCH_HOLE_MODE: libc::c_int =
    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE_MODE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

pub(super) fn fallocate(
    file: &File,
    mode: libc::c_int,
    offset: u64,
    len: u64,
) -> std::io::Result<()> {
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

/// The GET_ID bytes: `id` if given (at most 20 bytes), else from the path.
fn checked_id(id: Option<&str>, path: &Path) -> Result<[u8; ID_BYTES], DiskError> {
    match id {
        Some(id) if id.len() > ID_BYTES => Err(DiskError::IdTooLong(id.to_string())),
        Some(id) => Ok(id_bytes(id.as_bytes())),
        None => Ok(default_id(path)),
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
