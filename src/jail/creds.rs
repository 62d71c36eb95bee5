//! The jail's process limits and privileges.

use std::io;

use super::JailError;
use crate::config::Credentials;

/// Descriptors kiln may keep open: the VM's files, sockets, eventfds and
/// vsock connections, with room to spare.
const MAX_OPEN_FILES: u64 = 4096;

fn last_error(what: &str) -> JailError {
    JailError::step(what.to_string())(io::Error::last_os_error())
}

/// Closes every descriptor above stderr that lacks close-on-exec: only an
/// inherited one can (kiln opens everything close-on-exec; so does a
/// preloaded library that behaves), so nothing kiln's parent left open
/// reaches the jail.
pub(super) fn close_inherited_fds() -> Result<(), JailError> {
    let entries =
        std::fs::read_dir("/proc/self/fd").map_err(JailError::step("listing descriptors"))?;
    let fds: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: F_GETFD only reads the flags; a descriptor that is gone
        // (the directory's own) answers -1 and is skipped.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            // SAFETY: an inherited descriptor no Rust object owns.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// No core dumps (they would hold guest memory), not dumpable (no ptrace or
/// /proc/PID/mem by other processes of kiln's uid), bounded descriptors, no
/// new privileges, an empty capability bounding set and no ambient ones.
pub(super) fn limit_process() -> Result<(), JailError> {
    set_rlimit(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")?;
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) } != 0 {
        return Err(last_error("reading RLIMIT_NOFILE"));
    }
    set_rlimit(
        libc::RLIMIT_NOFILE,
        current.rlim_max.min(MAX_OPEN_FILES),
        "RLIMIT_NOFILE",
    )?;
    // SAFETY: prctl with integer arguments only.
    unsafe {
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(last_error("PR_SET_DUMPABLE"));
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(last_error("PR_SET_NO_NEW_PRIVS"));
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ) != 0
        {
            return Err(last_error("clearing ambient capabilities"));
        }
        for cap in 0..=last_capability() {
            // EINVAL: a capability this kernel does not know.
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
            {
                return Err(last_error("emptying the capability bounding set"));
            }
        }
    }
    Ok(())
}

fn last_capability() -> libc::c_ulong {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

fn set_rlimit(
    resource: libc::__rlimit_resource_t,
    value: u64,
    name: &str,
) -> Result<(), JailError> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: a valid rlimit value.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(last_error(&format!("setting {name}")));
    }
    Ok(())
}

/// Clears the calling thread's capabilities (effective, permitted and
/// inheritable); threads started afterwards start without any.
pub(super) fn drop_all_capabilities() -> Result<(), JailError> {
    let mut header = libc_cap_header();
    let data = [CapData::default(); 2];
    // SAFETY: a valid header and two data structs (capability version 3).
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(last_error("dropping capabilities"));
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn libc_cap_header() -> CapHeader {
    CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    }
}

/// The calling thread's effective capabilities (64 bits).
pub fn effective_capabilities() -> io::Result<u64> {
    let mut header = libc_cap_header();
    let mut data = [CapData::default(); 2];
    // SAFETY: a valid header and room for two data structs (version 3).
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(data[0].effective) | u64::from(data[1].effective) << 32)
}

/// Makes every thread of the process `ids` (no supplementary groups): a
/// root process so loses all its capabilities. glibc applies each change
/// to every thread (each thread's seccomp list allows these calls, with
/// ids other than root's only). Fails if a capability survives.
pub fn drop_privileges(ids: Credentials) -> io::Result<()> {
    if ids.uid == 0 || ids.gid == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cannot drop privileges to uid or gid 0",
        ));
    }
    // SAFETY: setgroups with an empty list, then setresgid/setresuid with
    // plain ids; glibc runs each on every thread of the process.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(ids.gid, ids.gid, ids.gid) != 0
            || libc::setresuid(ids.uid, ids.uid, ids.uid) != 0
        {
            return Err(io::Error::last_os_error());
        }
        // setuid made the process dumpable again.
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    match effective_capabilities()? {
        0 => Ok(()),
        caps => Err(io::Error::other(format!(
            "capabilities {caps:#x} survived the change to uid {}",
            ids.uid
        ))),
    }
}
