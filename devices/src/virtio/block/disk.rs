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
    /// The serial is longer than virtio-blk can report.
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
    pub(super) punch_hole: bool,
}

impl DiskImage {
    /// Opens `path` (read-write unless `read_only`) and checks it is a usable
    /// raw image. `id` is the serial GET_ID reports; by default it is derived
    /// from the file name.
    pub fn open(path: &Path, read_only: bool, id: Option<&str>) -> Result<Self, DiskError> {
        let id = checked_id(id, path)?;
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
        let id = checked_id(id, path)?;
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
        self.file.read_exact_at(buf, offset)
    }

    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Makes written data durable (`fdatasync`).
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates a range: it reads back as zeroes.
    pub(crate) fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        fallocate(&self.file, PUNCH_HOLE_MODE, offset, len)
    }

    /// Zeroes a range in place where the file system can; elsewhere punches
    /// a hole, which reads back as zeroes too.
    pub(crate) fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        match fallocate(&self.file, ZERO_RANGE_MODE, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.punch_hole(offset, len),
            other => other,
        }
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
