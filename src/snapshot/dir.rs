//! A snapshot's directory, held open: a save creates every file of the
//! snapshot relative to it (openat), so that a VM in a jailed process of
//! its own writes where its embedder opened the directory (the descriptor
//! is passed to it) without any view of the host's path.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::SnapshotError;

/// An open snapshot directory and the path messages name it by.
pub(crate) struct SnapshotDir {
    dir: File,
    /// As the caller named it: in messages only, never opened.
    shown: PathBuf,
    /// Created by [`create`](Self::create), so removed again when the save
    /// into it fails.
    created: bool,
}

impl SnapshotDir {
    /// Creates `path` (owner-only; its parents as needed) or takes it when
    /// it exists, and opens it. A snapshot already there is refused by the
    /// save (its files are only ever created new).
    pub(crate) fn create(path: &Path) -> Result<Self, SnapshotError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(SnapshotError::io("create directory", parent))?;
        }
        let created = match std::fs::DirBuilder::new().mode(0o700).create(path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(SnapshotError::io("create directory", path)(e)),
        };
        let dir = File::options()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(path)
            .map_err(SnapshotError::io("open directory", path))?;
        Ok(Self {
            dir,
            shown: path.to_owned(),
            created,
        })
    }

    /// The directory open at `fd` (received from the process that opened
    /// it), named `shown` in messages.
    pub(crate) fn from_fd(fd: OwnedFd, shown: PathBuf) -> Result<Self, SnapshotError> {
        let dir = File::from(fd);
        let meta = dir
            .metadata()
            .map_err(SnapshotError::io("read the type of", &shown))?;
        if !meta.is_dir() {
            return Err(SnapshotError::io("use", &shown)(
                std::io::Error::from_raw_os_error(libc::ENOTDIR),
            ));
        }
        Ok(Self {
            dir,
            shown,
            created: false,
        })
    }

    /// Runs `save` into the directory at `path` (see
    /// [`create`](Self::create)), and removes the directory again when the
    /// save fails and this call created it: a refused save leaves nothing.
    pub(crate) fn save_new<T, E: From<SnapshotError>>(
        path: &Path,
        save: impl FnOnce(&SnapshotDir) -> Result<T, E>,
    ) -> Result<T, E> {
        let dir = Self::create(path)?;
        let saved = save(&dir);
        if saved.is_err() && dir.created {
            // Empty again: a failed save removes what it created.
            let _ = std::fs::remove_dir(path);
        }
        saved
    }

    /// The path messages name `name` in this directory by.
    pub(crate) fn shown(&self, name: &str) -> PathBuf {
        self.shown.join(name)
    }

    /// The path messages name this directory by.
    pub(crate) fn shown_path(&self) -> &Path {
        &self.shown
    }

    /// Creates the new file `name` here (an existing one is refused, never
    /// touched), readable and writable by its owner only.
    pub(crate) fn create_file(&self, name: &str) -> Result<File, SnapshotError> {
        let shown = self.shown(name);
        let name = c_name(name, &shown)?;
        let flags =
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC | libc::O_NOFOLLOW;
        // SAFETY: a valid directory descriptor and NUL-terminated name; the
        // result is checked and owned below.
        let fd = unsafe { libc::openat(self.dir.as_raw_fd(), name.as_ptr(), flags, 0o600) };
        if fd < 0 {
            return Err(SnapshotError::io("create", &shown)(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: openat succeeded: `fd` is open and owned by nothing else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Removes the file `name` (one this save created).
    pub(crate) fn remove_file(&self, name: &str) {
        if let Ok(name) = c_name(name, Path::new(name)) {
            // SAFETY: a valid directory descriptor and NUL-terminated name.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), name.as_ptr(), 0) };
        }
    }
}

impl AsFd for SnapshotDir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }
}

fn c_name(name: &str, shown: &Path) -> Result<CString, SnapshotError> {
    CString::new(name)
        .map_err(|_| SnapshotError::io("create", shown)(std::io::ErrorKind::InvalidInput.into()))
}
