//! Files the engine bind-mounts into a container (/etc/hosts,
//! /etc/hostname, /etc/resolv.conf, /run/.containerenv): virtio-fs shares
//! directories, so their contents are copied into the container's root
//! on the host before the VM boots. Each destination is resolved inside
//! the root (openat2 RESOLVE_IN_ROOT): a symbolic link in the image cannot
//! make the copy land outside it. The container then sees a copy: its own
//! writes to the file do not reach the engine's (runc's bind mount would
//! pass them through); podman regenerates the sources and kiln-oci copies
//! them again at each create.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A file bind mount of the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMount {
    /// The engine's file on the host.
    pub source: PathBuf,
    /// Where it goes in the container (absolute).
    pub destination: String,
}

/// Copies each of `files` into `root`. A destination whose directory the
/// image lacks is created (as runc creates a mount point).
pub fn copy_into_root(root: &Path, files: &[FileMount]) -> Result<(), String> {
    let root_dir = File::open(root).map_err(|e| format!("opening root {}: {e}", root.display()))?;
    for file in files {
        let contents = std::fs::read(&file.source)
            .map_err(|e| format!("reading {}: {e}", file.source.display()))?;
        let relative = file.destination.trim_start_matches('/');
        if let Some(parent) = Path::new(relative).parent() {
            make_dirs_in_root(&root_dir, parent)
                .map_err(|e| format!("creating {} in the root: {e}", parent.display()))?;
        }
        let mut out = open_in_root(
            &root_dir,
            Path::new(relative),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
        )
        .map_err(|e| format!("opening {} in the root: {e}", file.destination))?;
        out.write_all(&contents)
            .map_err(|e| format!("writing {} in the root: {e}", file.destination))?;
    }
    Ok(())
}

/// Opens `path` below `root` with every component (symbolic links
/// included) resolved as if `root` were `/`.
fn open_in_root(root: &File, path: &Path, flags: i32) -> std::io::Result<File> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain data; zeroed is its "no options" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    // openat2 refuses a mode without O_CREAT.
    if flags & libc::O_CREAT != 0 {
        how.mode = 0o644;
    }
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads the NUL-terminated path and `how` (of the size
    // passed) for the duration of the call and returns a new descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c_path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat2 just returned this descriptor to this process.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

/// Creates each directory of `path` below `root` that is missing,
/// resolving each step inside the root.
fn make_dirs_in_root(root: &File, path: &Path) -> std::io::Result<()> {
    let mut at = PathBuf::new();
    for part in path.components() {
        at.push(part);
        if open_in_root(root, &at, libc::O_PATH | libc::O_DIRECTORY).is_ok() {
            continue;
        }
        let parent = match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => {
                open_in_root(root, p, libc::O_PATH | libc::O_DIRECTORY)?
            }
            _ => root.try_clone()?,
        };
        let name = std::ffi::CString::new(part.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: mkdirat with a directory descriptor this function holds
        // and a NUL-terminated single component (no '/').
        if unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o755) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(e);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-oci-files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn files_are_copied_into_the_root_and_stay_inside_it() {
        let dir = scratch("copy");
        let (root, outside) = (dir.join("root"), dir.join("outside"));
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(dir.join("hosts"), "127.0.0.1 c1\n").unwrap();
        let copy = |destination: &str| {
            let file = FileMount {
                source: dir.join("hosts"),
                destination: destination.into(),
            };
            copy_into_root(&root, &[file])
        };
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        copy("/etc/hosts").unwrap();
        copy("/run/deep/.containerenv").unwrap();
        assert_eq!(read(&root.join("etc/hosts")), "127.0.0.1 c1\n");
        assert_eq!(read(&root.join("run/deep/.containerenv")), "127.0.0.1 c1\n");
        // An image's link that climbs out of the root lands inside it.
        std::os::unix::fs::symlink("../../../../etc/target", root.join("etc/hostname")).unwrap();
        copy("/etc/hostname").unwrap();
        assert_eq!(read(&root.join("etc/target")), "127.0.0.1 c1\n");
        // One that names a host path is resolved in the root too: its
        // directory is not there, so the copy fails, and the host file
        // stays as it was.
        let victim = outside.join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        std::os::unix::fs::symlink(&victim, root.join("etc/resolv.conf")).unwrap();
        let e = copy("/etc/resolv.conf").unwrap_err();
        assert!(e.starts_with("opening /etc/resolv.conf in the root"), "{e}");
        assert_eq!(read(&victim), "untouched", "the copy left the root");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
