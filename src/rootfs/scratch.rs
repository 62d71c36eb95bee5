//! A private scratch copy of a disk image: the guest writes to its root file
//! system while the original stays byte for byte as it was.
//!
//! The copy never has a name (O_TMPFILE), or loses it right after it is
//! created where O_TMPFILE is missing, so it disappears with its last file
//! descriptor: when the VM ends, on every error path, and even if kiln is
//! killed. It goes into the directory the user named, else next to the
//! original (else the temporary directory): a reflink (FICLONE: instant,
//! blocks shared until written) where the file system can, otherwise a copy
//! that keeps the image's holes (SEEK_DATA/SEEK_HOLE with copy_file_range),
//! so a mostly empty image costs only its data until the guest writes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Largest piece one copy_file_range moves: `stop` is asked between pieces,
/// so a stop request waits for at most this much copying.
const CHUNK: u64 = 64 << 20;
/// Buffer of the read/write fallback.
const BUFFER: usize = 1 << 20;

/// Copies `original` into a new unnamed file in `dir` (default: see
/// [`scratch_dirs`]) and returns it (open for reading and writing). The
/// original is locked shared while it is copied, so a kiln that has it open
/// for writing (`--disk`) makes this fail. `stop` is asked between pieces of
/// the copy: once it answers true, the copy ends with an
/// [`io::ErrorKind::Interrupted`] error (and the unnamed file with it), so
/// that a big image does not hold up a stop request.
///
/// The copy never grows past the image: the virtio-blk device refuses every
/// request beyond the size the disk had when it was opened.
pub fn scratch_copy(
    original: &Path,
    dir: Option<&Path>,
    stop: &dyn Fn() -> bool,
) -> io::Result<File> {
    let src = File::open(original)?;
    lock_shared(&src)?;
    let len = src.metadata()?.len();
    let mut candidates = scratch_dirs(original, dir)?.into_iter().peekable();
    let (dst, dir) = loop {
        let dir = candidates.next().expect("at least one directory");
        match unnamed_file(&dir) {
            Ok(file) => break (file, dir),
            Err(e) if candidates.peek().is_some() => {
                log::info!("rootfs: no scratch file in {}: {e}", dir.display());
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
        }
    };
    if clone(&src, &dst).is_ok() {
        log::debug!(
            "rootfs: {} reflinked in {}",
            original.display(),
            dir.display()
        );
        return Ok(dst);
    }
    log::info!(
        "rootfs: copying {} ({} MiB) into {}",
        original.display(),
        len >> 20,
        dir.display()
    );
    copy_sparse(&src, &dst, len, stop)?;
    Ok(dst)
}

/// Where the scratch copy of `original` may go, in order: `dir` alone when
/// given; else the image's own directory (a disk that already holds the
/// image, where a reflink can share its blocks, rather than `$TMPDIR`,
/// often RAM), then the temporary directory for an image whose directory
/// takes no new file (read-only, not the user's).
fn scratch_dirs(original: &Path, dir: Option<&Path>) -> io::Result<Vec<std::path::PathBuf>> {
    if let Some(dir) = dir {
        return Ok(vec![dir.to_owned()]);
    }
    let mut dirs = Vec::with_capacity(2);
    dirs.extend(
        std::fs::canonicalize(original)?
            .parent()
            .map(Path::to_path_buf),
    );
    dirs.push(std::env::temp_dir());
    Ok(dirs)
}

fn lock_shared(file: &File) -> io::Result<()> {
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "in use by another process (locked)",
        )),
        _ => Err(e),
    }
}

/// A new file in `dir` that has no name.
fn unnamed_file(dir: &Path) -> io::Result<File> {
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
fn named_then_unlinked(dir: &Path) -> io::Result<File> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    for attempt in 0..16 {
        let path = dir.join(format!(
            ".kiln-scratch-{}-{nanos:x}-{attempt}",
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
        "no free scratch file name",
    ))
}

/// Makes `dst` share `src`'s blocks (btrfs, XFS, bcachefs...).
fn clone(src: &File, dst: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its argument; both
    // descriptors are ours and open.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    match r {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Copies the data regions of `src` (its first `len` bytes) to the same
/// offsets in `dst` and gives `dst` the length `len`: holes stay holes.
fn copy_sparse(src: &File, dst: &File, len: u64, stop: &dyn Fn() -> bool) -> io::Result<()> {
    let mut pos = 0;
    while pos < len {
        let (start, end) = match seek(src, pos, libc::SEEK_DATA) {
            Ok(start) => (start, seek(src, start, libc::SEEK_HOLE)?.min(len)),
            // No data after `pos`.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            // No hole support: all of it is data.
            Err(_) => (pos, len),
        };
        if start >= len {
            break;
        }
        copy_range(src, dst, start, end - start, stop)?;
        pos = end;
    }
    dst.set_len(len)
}

fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    u64::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// Copies `len` bytes at `offset` from `src` to the same offset in `dst`,
/// in the kernel when it can (copy_file_range), else through a buffer.
fn copy_range(
    src: &File,
    dst: &File,
    offset: u64,
    len: u64,
    stop: &dyn Fn() -> bool,
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        if stop() {
            return Err(stopped());
        }
        let at = libc::loff_t::try_from(offset + done).map_err(|_| io::ErrorKind::InvalidInput)?;
        let (mut off_in, mut off_out) = (at, at);
        let want = (len - done).min(CHUNK) as usize;
        // SAFETY: both descriptors are ours; the offsets are valid pointers
        // to locals the call updates.
        let r = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        match r {
            r if r > 0 => done += r as u64,
            0 => return Err(shrank()),
            _ => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP) => {
                        return copy_buffered(src, dst, offset + done, len - done, stop);
                    }
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// The fallback of `copy_range`: pread/pwrite through a buffer.
fn copy_buffered(
    src: &File,
    dst: &File,
    offset: u64,
    len: u64,
    stop: &dyn Fn() -> bool,
) -> io::Result<()> {
    let mut buf = vec![0u8; BUFFER.min(len as usize)];
    let mut done = 0;
    while done < len {
        if stop() {
            return Err(stopped());
        }
        let want = (len - done).min(buf.len() as u64) as usize;
        let n = src.read_at(&mut buf[..want], offset + done)?;
        if n == 0 {
            return Err(shrank());
        }
        dst.write_all_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "stopped while copying")
}

fn shrank() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the image shrank while it was being copied",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::tests::TempDir;
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1 << 20;

    fn never() -> bool {
        false
    }

    /// A 64 MiB file with data at 0, 32 MiB and its last byte; holes between.
    fn sparse_image(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("root.img");
        let f = File::create(&path).unwrap();
        f.set_len(64 * MIB).unwrap();
        f.write_all_at(&[0xaa; 4096], 0).unwrap();
        f.write_all_at(b"middle", 32 * MIB).unwrap();
        f.write_all_at(b"z", 64 * MIB - 1).unwrap();
        path
    }

    fn contents(f: &File) -> Vec<u8> {
        let mut buf = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn copy_is_private_equal_sparse_and_writable() {
        let t = TempDir::new("scratch");
        let path = sparse_image(&t.0);
        let before = std::fs::read(&path).unwrap();
        let copy = scratch_copy(&path, None, &never).unwrap();
        let meta = copy.metadata().unwrap();
        assert_eq!(meta.nlink(), 0, "the copy has no name");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(contents(&copy), before);
        let original_blocks = std::fs::metadata(&path).unwrap().blocks();
        if original_blocks * 512 < 8 * MIB {
            // The original is sparse here: so is the copy (or it shares blocks).
            assert!(meta.blocks() * 512 < 8 * MIB, "{} blocks", meta.blocks());
        }
        copy.write_all_at(b"guest wrote this", 32 * MIB).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), before, "original untouched");
        // Only the image is left in the directory.
        let names: Vec<_> = std::fs::read_dir(&t.0).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn fallbacks_copy_the_same_bytes() {
        let t = TempDir::new("scratch-fallback");
        let path = sparse_image(&t.0);
        let src = File::open(&path).unwrap();
        let dst = named_then_unlinked(&t.0).unwrap();
        assert_eq!(dst.metadata().unwrap().nlink(), 0);
        copy_buffered(&src, &dst, 0, 64 * MIB, &never).unwrap();
        assert_eq!(contents(&dst), std::fs::read(&path).unwrap());
        // Past the end of the source: reported, not looped on.
        let e = copy_buffered(&src, &dst, 64 * MIB - 1, 2, &never).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = copy_range(&src, &dst, 64 * MIB - 1, 2, &never).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let empty = t.0.join("empty.img");
        File::create(&empty).unwrap();
        let copy = scratch_copy(&empty, None, &never).unwrap();
        assert_eq!(copy.metadata().unwrap().len(), 0);
    }

    #[test]
    fn a_locked_image_is_refused() {
        let t = TempDir::new("scratch-locked");
        let path = sparse_image(&t.0);
        let holder = OpenOptions::new().write(true).open(&path).unwrap();
        // SAFETY: flock on a descriptor we own.
        assert_eq!(
            unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
            0
        );
        let e = scratch_copy(&path, None, &never).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(e.to_string().contains("locked"), "{e}");
        drop(holder);
        scratch_copy(&path, None, &never).unwrap();
    }

    /// A stop request ends a copy between two pieces: the copy that was
    /// asked to stop after its first piece has copied no more than that.
    #[test]
    fn a_stop_ends_the_copy_between_pieces() {
        let t = TempDir::new("scratch-stop");
        let path = t.0.join("full.img");
        let f = File::create(&path).unwrap();
        // All data, no holes: three pieces of CHUNK.
        for piece in 0..3 {
            f.write_all_at(&vec![0x5a; CHUNK as usize], piece * CHUNK)
                .unwrap();
        }
        let src = File::open(&path).unwrap();
        for fallback in [false, true] {
            let asked = std::cell::Cell::new(0);
            let stop = || {
                asked.set(asked.get() + 1);
                asked.get() > 1
            };
            let dst = named_then_unlinked(&t.0).unwrap();
            let e = match fallback {
                false => copy_sparse(&src, &dst, 3 * CHUNK, &stop),
                true => copy_buffered(&src, &dst, 0, 3 * CHUNK, &stop),
            }
            .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::Interrupted, "{e}");
            assert_eq!(asked.get(), 2, "fallback {fallback}");
            let copied = dst.metadata().unwrap().blocks() * 512;
            assert!(copied <= CHUNK, "{copied} bytes copied after the stop");
        }
    }

    /// The path of the file behind `file`'s descriptor, as /proc shows it
    /// (`DIR/#INODE (deleted)` for an unnamed file).
    fn fd_path(file: &File) -> String {
        let link = format!("/proc/self/fd/{}", file.as_raw_fd());
        std::fs::read_link(link).unwrap().display().to_string()
    }

    /// The copy goes into the directory given, else next to the image
    /// (then the temporary directory, for an image whose directory takes
    /// no new file); a directory that cannot take it is named in the error.
    #[test]
    fn the_copy_goes_where_it_is_told_else_next_to_the_image() {
        let t = TempDir::new("scratch-where");
        let images = t.0.join("images");
        let elsewhere = t.0.join("elsewhere");
        std::fs::create_dir(&images).unwrap();
        std::fs::create_dir(&elsewhere).unwrap();
        let path = images.join("root.img");
        std::fs::write(&path, vec![7u8; 64 << 10]).unwrap();
        let images = std::fs::canonicalize(&images).unwrap();
        let elsewhere = std::fs::canonicalize(&elsewhere).unwrap();

        let copy = scratch_copy(&path, None, &never).unwrap();
        assert!(fd_path(&copy).starts_with(&format!("{}/", images.display())));
        let copy = scratch_copy(&path, Some(&elsewhere), &never).unwrap();
        assert!(fd_path(&copy).starts_with(&format!("{}/", elsewhere.display())));
        assert_eq!(contents(&copy), std::fs::read(&path).unwrap());
        // Only the image is in its directory, nothing in the other.
        assert_eq!(std::fs::read_dir(&images).unwrap().count(), 1);
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);

        assert_eq!(
            scratch_dirs(&path, None).unwrap(),
            [images, std::env::temp_dir()]
        );
        let missing = t.0.join("missing");
        let e = scratch_copy(&path, Some(&missing), &never).unwrap_err();
        assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );
    }
}
