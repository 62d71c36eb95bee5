//! An image root's disk: the image is the read-only base of a copy-on-write
//! disk, and the guest's writes go to a private unnamed file in the scratch
//! directory, so the original stays byte for byte as it was and start-up
//! copies nothing.
//!
//! The unnamed file (O_TMPFILE, or unlinked right after it is created where
//! O_TMPFILE is missing) disappears with its last file descriptor: when the
//! VM ends, on every error path, and even if kiln is killed. It goes into the
//! directory the user named, else next to the original (a disk that already
//! holds the image rather than `$TMPDIR`, often RAM), else the temporary
//! directory, else memory (a memfd). It is sparse: it costs only what the
//! guest writes, and never grows past the image's size.

use std::path::{Path, PathBuf};

use kiln_devices::virtio::block::{DiskError, DiskImage, OverlayPlace, OverlayState};

use super::IMAGE_DISK_ID;

/// The disk of the image root `original` (serial `kiln-rootfs`): the image
/// read-only and locked shared (so a kiln that has it open for writing,
/// `--disk`, makes this fail), its writes in an unnamed file in `dir`
/// (default: see [`scratch_dirs`]).
pub fn root_disk(original: &Path, dir: Option<&Path>) -> Result<DiskImage, DiskError> {
    in_place(original, dir, |place| {
        DiskImage::overlay(original, place, Some(IMAGE_DISK_ID))
    })
}

/// As [`root_disk`], with the guest's writes of a snapshot (`saved`, only
/// read, and its chunk map `state`) copied into the new overlay.
pub fn root_disk_restored(
    original: &Path,
    dir: Option<&Path>,
    saved: &std::fs::File,
    state: &OverlayState,
) -> Result<DiskImage, DiskError> {
    in_place(original, dir, |place| {
        DiskImage::overlay_restored(original, place, Some(IMAGE_DISK_ID), saved, state)
    })
}

/// Calls `make` with where the overlay of `original` goes: `dir`, or by
/// default [`scratch_dirs`].
fn in_place<T>(original: &Path, dir: Option<&Path>, make: impl FnOnce(OverlayPlace<'_>) -> T) -> T {
    match dir {
        Some(dir) => make(OverlayPlace::Only(dir)),
        None => make(OverlayPlace::FirstOf(&scratch_dirs(original))),
    }
}

/// Where the overlay of `original` may go when no directory is given, in
/// order: the image's own directory, then the temporary directory for an
/// image whose directory takes no new file (read-only, not the user's).
fn scratch_dirs(original: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::with_capacity(2);
    dirs.extend(
        std::fs::canonicalize(original)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf)),
    );
    dirs.push(std::env::temp_dir());
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::tests::TempDir;
    use std::fs::{File, OpenOptions};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;

    /// The path of the file behind `file`'s descriptor, as /proc shows it
    /// (`DIR/#INODE (deleted)` for an unnamed file).
    fn fd_path(file: &File) -> String {
        let link = format!("/proc/self/fd/{}", file.as_raw_fd());
        std::fs::read_link(link).unwrap().display().to_string()
    }

    /// The overlay goes into the directory given, else next to the image
    /// (then the temporary directory); it has no name, and a directory that
    /// cannot take it is named in the error. The image is never written and
    /// is locked against writers meanwhile.
    #[test]
    fn the_overlay_goes_where_it_is_told_else_next_to_the_image() {
        let t = TempDir::new("scratch-where");
        let images = t.0.join("images");
        let elsewhere = t.0.join("elsewhere");
        std::fs::create_dir(&images).unwrap();
        std::fs::create_dir(&elsewhere).unwrap();
        let path = images.join("root.img");
        std::fs::write(&path, vec![7u8; 64 << 10]).unwrap();
        let images = std::fs::canonicalize(&images).unwrap();
        let elsewhere = std::fs::canonicalize(&elsewhere).unwrap();

        let disk = root_disk(&path, None).unwrap();
        let overlay = disk.overlay_file().unwrap();
        assert!(fd_path(overlay).starts_with(&format!("{}/", images.display())));
        assert_eq!(overlay.metadata().unwrap().nlink(), 0, "it has no name");
        assert_eq!(overlay.metadata().unwrap().blocks(), 0, "nothing copied");
        let e = DiskImage::open(&path, false, None).unwrap_err();
        assert!(matches!(e, DiskError::Locked(_)), "{e}");
        let disk = root_disk(&path, Some(&elsewhere)).unwrap();
        let overlay = disk.overlay_file().unwrap();
        assert!(fd_path(overlay).starts_with(&format!("{}/", elsewhere.display())));
        // Only the image is in its directory, nothing in the other.
        assert_eq!(std::fs::read_dir(&images).unwrap().count(), 1);
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 64 << 10]);

        assert_eq!(scratch_dirs(&path), [images, std::env::temp_dir()]);
        let missing = t.0.join("missing");
        let e = root_disk(&path, Some(&missing)).unwrap_err();
        assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn a_locked_image_is_refused() {
        let t = TempDir::new("scratch-locked");
        let path = t.0.join("root.img");
        std::fs::write(&path, vec![1u8; 64 << 10]).unwrap();
        let holder = OpenOptions::new().write(true).open(&path).unwrap();
        // SAFETY: flock on a descriptor we own.
        assert_eq!(
            unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
            0
        );
        let e = root_disk(&path, None).unwrap_err();
        assert!(matches!(e, DiskError::Locked(_)), "{e}");
        assert!(e.to_string().contains("locked"), "{e}");
        drop(holder);
        root_disk(&path, None).unwrap();
    }
}
