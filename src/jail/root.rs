//! The jail's namespaces and private root.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{Bind, JailError};

/// Where the private root's tmpfs is mounted before kiln pivots into it:
/// the first existing directory (the mount is private to the jail's mount
/// namespace and hides nothing outside it).
const NEW_ROOT_CANDIDATES: [&str; 3] = ["/mnt", "/tmp", "/run"];

/// The tmpfs root: small (it holds directories, mount points and the
/// sandbox's sockets, no data), no set-uid, devices or executables.
const ROOT_TMPFS_OPTIONS: &str = "size=1m,nr_inodes=4096,mode=0755";

pub(super) fn ensure_single_threaded() -> Result<(), JailError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(JailError::step("reading /proc/self/status"))?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .map(str::trim);
    match threads {
        Some("1") => Ok(()),
        other => Err(JailError::Unusable(format!(
            "entered with {} threads: namespaces and the root are per thread until one starts",
            other.unwrap_or("?")
        ))),
    }
}

/// A host path held open for its bind mount.
pub(super) struct Source {
    fd: OwnedFd,
    is_dir: bool,
    /// Neither a regular file nor a directory: a device, FIFO or socket.
    special: bool,
}

/// Opens every source as an O_PATH descriptor, in the host's view. A path
/// that cannot be opened is left out: inside, kiln finds it missing and
/// says so as it would outside.
pub(super) fn open_sources(binds: &[Bind]) -> Vec<Option<Source>> {
    binds
        .iter()
        .map(|bind| {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
                .open(&bind.source)
                .ok()?;
            let kind = file.metadata().ok()?.file_type();
            Some(Source {
                is_dir: kind.is_dir(),
                special: !kind.is_dir() && !kind.is_file(),
                fd: OwnedFd::from(file),
            })
        })
        .collect()
}

/// New mount, IPC and UTS namespaces (and user, network where asked).
pub(super) fn unshare(user: bool, network: bool) -> Result<(), JailError> {
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if user {
        flags |= libc::CLONE_NEWUSER;
    }
    if network {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare takes flags only; the process has one thread.
    if unsafe { libc::unshare(flags) } != 0 {
        let e = io::Error::last_os_error();
        let what = match user {
            true => "creating namespaces (user namespaces may be disabled on this host)",
            false => "creating namespaces",
        };
        return Err(JailError::step(what)(e));
    }
    if user {
        // Only kiln's own user and group exist inside; setgroups is refused
        // there, as an unprivileged user's map requires.
        write_proc("/proc/self/setgroups", "deny")?;
        write_proc("/proc/self/uid_map", &format!("{uid} {uid} 1"))?;
        write_proc("/proc/self/gid_map", &format!("{gid} {gid} 1"))?;
    }
    let name = b"kiln";
    // SAFETY: the pointer and length describe `name`.
    unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    Ok(())
}

fn write_proc(path: &str, text: &str) -> Result<(), JailError> {
    std::fs::write(path, text).map_err(JailError::step(format!("writing {path}")))
}

/// Builds the private root and makes it the process's root.
pub(super) fn build_and_pivot(
    binds: &[Bind],
    sources: &[Option<Source>],
    scratch_dirs: &[PathBuf],
    cwd: &Path,
) -> Result<(), JailError> {
    // Nothing mounted from here on reaches the host's namespace.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let new_root = NEW_ROOT_CANDIDATES
        .iter()
        .map(Path::new)
        .find(|p| p.is_dir())
        .ok_or_else(|| JailError::Unusable("none of /mnt, /tmp, /run exists".into()))?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        new_root,
        Some("tmpfs"),
        flags,
        Some(ROOT_TMPFS_OPTIONS),
    )?;
    let inside = |p: &Path| new_root.join(p.strip_prefix("/").unwrap_or(p));
    for (bind, source) in binds.iter().zip(sources) {
        let Some(source) = source else { continue };
        let target = inside(&bind.path);
        make_mount_point(&target, source.is_dir)?;
        let from = format!("/proc/self/fd/{}", source.fd.as_raw_fd());
        mount(Some(&from), &target, None, libc::MS_BIND, None)?;
        // Read-only where it can be, never set-uid or executable; the
        // flags the source mount has locked (in a user namespace) are kept.
        // A device (or another special file) keeps its use: /dev/kvm, a
        // block device as a disk; kiln refuses any other where it opens it.
        let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NOEXEC;
        flags |= locked_flags(&target)?;
        if !bind.writable {
            flags |= libc::MS_RDONLY;
        }
        if !bind.device && !source.special {
            flags |= libc::MS_NODEV;
        }
        mount(None, &target, None, flags, None)?;
    }
    for dir in scratch_dirs {
        let target = inside(dir);
        if !target.exists() {
            make_dirs(&target)?;
            // Anyone may create there, only owners remove: as /tmp.
            std::fs::set_permissions(
                &target,
                std::os::unix::fs::PermissionsExt::from_mode(0o1777),
            )
            .map_err(JailError::step(format!("making {}", dir.display())))?;
        }
    }
    let cwd_inside = inside(cwd);
    if !cwd_inside.exists() {
        make_dirs(&cwd_inside)?;
    }
    pivot(new_root)?;
    std::env::set_current_dir(cwd).map_err(JailError::step("entering the directory"))?;
    Ok(())
}

/// chdir into `new_root`, stack the old root under it and detach it.
fn pivot(new_root: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(new_root).map_err(JailError::step("entering the new root"))?;
    let dot = CString::new(".").expect("no NUL");
    // SAFETY: both arguments are valid NUL-terminated strings; pivot_root(".", ".")
    // puts the old root on top of the new one at the same place.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        return Err(JailError::step("pivot_root")(io::Error::last_os_error()));
    }
    // SAFETY: a valid string; detaching the old root leaves only the new one.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(JailError::step("detaching the host's root")(
            io::Error::last_os_error(),
        ));
    }
    std::env::set_current_dir("/").map_err(JailError::step("entering the new root"))
}

fn make_dirs(path: &Path) -> Result<(), JailError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(JailError::step(format!("creating {}", path.display())))
}

/// An empty directory or file at `target` to bind over (one there already,
/// seen through a directory bound before, is used as it is).
fn make_mount_point(target: &Path, dir: bool) -> Result<(), JailError> {
    if target.symlink_metadata().is_ok() {
        return Ok(());
    }
    if let Some(parent) = target.parent() {
        make_dirs(parent)?;
    }
    match dir {
        true => make_dirs(target),
        false => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(target)
            .map(drop)
            .map_err(JailError::step(format!("creating {}", target.display()))),
    }
}

/// The mount flags of the mount holding `path` that a remount must keep.
fn locked_flags(path: &Path) -> Result<libc::c_ulong, JailError> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| JailError::Unusable(format!("{} has a NUL byte", path.display())))?;
    // SAFETY: statvfs is plain data, filled by statvfs(3) below.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid path string and a valid out pointer.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(JailError::step(format!("reading {}", path.display()))(
            io::Error::last_os_error(),
        ));
    }
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    Ok(flags)
}

fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let what = || format!("mounting {}", target.display());
    let c = |s: &str| CString::new(s).map_err(|_| JailError::Unusable(what()));
    let source = source.map(c).transpose()?;
    let fstype = fstype.map(c).transpose()?;
    let data = data.map(c).transpose()?;
    let target_c =
        CString::new(target.as_os_str().as_bytes()).map_err(|_| JailError::Unusable(what()))?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a valid NUL-terminated string that
    // outlives the call.
    let ret = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    match ret {
        0 => Ok(()),
        _ => Err(JailError::step(what())(io::Error::last_os_error())),
    }
}
