//! Host directories shared with the guest (`--share`, virtio-fs): one
//! virtiofsd child per share, started with its own sandboxing on and
//! connected over vhost-user before kiln enters its jail (which would hide
//! the program and the directory, and take the capabilities virtiofsd's
//! sandbox needs). Each daemon goes away with its VM: it exits by itself
//! when its device closes the socket (virtiofsd serves one connection), it
//! is killed when the set-up fails before the VM runs, and a kiln that dies
//! takes it along (PR_SET_PDEATHSIG).

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use kiln_devices::virtio::fs::{self, virtio_fs};
use kiln_devices::virtio::vhost_user::{VhostUserConnection, VhostUserDevice};

use crate::config::{RootShare, ShareCache, ShareConfig, VmConfig};
use crate::error::{Error, Result};

/// The virtio-fs tag of share `index` (what init mounts).
pub(crate) fn tag(index: usize) -> String {
    format!("kiln-share{index}")
}

/// Every share of `config`, in device order: its `shares`, then a shared
/// root (`rootfs_share`), whose guest path `/` is never a `--share`'s.
pub(crate) fn all_shares(config: &VmConfig) -> Vec<ShareConfig> {
    let root = match (&config.rootfs, config.rootfs_share) {
        (Some(dir), Some(mode)) => Some(ShareConfig {
            host_dir: dir.clone(),
            guest_path: "/".into(),
            read_only: mode == RootShare::Overlay,
            cache: ShareCache::Auto,
        }),
        _ => None,
    };
    config.shares.iter().cloned().chain(root).collect()
}

/// The descriptor virtiofsd gets its listening socket on (`--fd`).
const LISTEN_FD: RawFd = 3;

/// The daemons a front end started for a config's shares, carried in the
/// config to the VM that uses them; equal whatever they hold (they are
/// host handles, not configuration).
#[derive(Clone, Default)]
pub(crate) struct StartedShares(Option<Arc<ShareDaemons>>);

impl std::fmt::Debug for StartedShares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "started" } else { "none" })
    }
}

impl PartialEq for StartedShares {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for StartedShares {}

/// Starts the daemons of `config`'s shares now (see the module docs), so
/// that the VM built from `config` later uses them. Nothing without shares.
pub(crate) fn start_early(config: &mut VmConfig) -> Result<()> {
    if all_shares(config).is_empty() || config.share_daemons.0.is_some() {
        return Ok(());
    }
    let daemons = ShareDaemons::start(config)?;
    config.share_daemons = StartedShares(Some(Arc::new(daemons)));
    Ok(())
}

/// The virtio-fs devices of `config`'s shares, in order, from the daemons
/// started early, or started now.
pub(crate) fn devices(config: &VmConfig) -> Result<Vec<VhostUserDevice>> {
    let started;
    let daemons = match &config.share_daemons.0 {
        Some(daemons) => daemons,
        None => {
            started = ShareDaemons::start(config)?;
            &started
        }
    };
    (0..all_shares(config).len())
        .map(|index| daemons.device(index))
        .collect()
}

/// One running virtiofsd, killed and reaped when dropped unused (an
/// error before the VM runs).
struct Daemon {
    child: Option<Child>,
}

/// Daemons left to their devices ([`Daemon::release`]) whose exit status
/// is not collected yet: collected, without waiting, each time daemons
/// are started in this process, so an embedder of in-process sandboxes
/// keeps at most the exited daemons of the VMs that ended since its last
/// start, not one zombie per share per VM for its whole life.
static RELEASED: Mutex<Vec<Child>> = Mutex::new(Vec::new());

/// Collects the exit status of every released daemon that has exited.
fn reap_released() {
    let mut released = RELEASED.lock().unwrap_or_else(|e| e.into_inner());
    released.retain_mut(|child| matches!(child.try_wait(), Ok(None)));
}

impl Daemon {
    /// Leaves the daemon to its connection, now a device's: it exits when
    /// the device (the VM) closes the socket. kiln does not signal or wait
    /// for it then: the VM's threads run under seccomp filters without
    /// kill(2) and wait4(2), and a kiln that dropped root (the jail) may
    /// not signal a daemon running as root. Its exit status is collected
    /// by the next start of daemons ([`RELEASED`]) or when kiln exits (or
    /// by PR_SET_PDEATHSIG's end of it).
    fn release(mut self) {
        if let Some(child) = self.child.take() {
            RELEASED
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(child);
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if child.kill().is_ok() {
                let _ = child.wait();
            }
        }
    }
}

/// The started daemons of a config's shares and their connections, each
/// taken once by the device that uses it.
pub(crate) struct ShareDaemons {
    backends: Mutex<Vec<Option<(VhostUserConnection, Daemon)>>>,
}

impl ShareDaemons {
    fn start(config: &VmConfig) -> Result<Self> {
        // A shared root must be a directory (virtiofsd would fail later).
        crate::rootfs::packed_or_attached(config)?;
        for (i, share) in config.shares.iter().enumerate() {
            check_share(share)?;
            if config.shares[..i]
                .iter()
                .any(|s| same_guest_path(&s.guest_path, &share.guest_path))
            {
                return Err(Error::Share(format!(
                    "guest path {} is given twice",
                    share.guest_path
                )));
            }
        }
        let program = find_virtiofsd(config.virtiofsd.as_deref())?;
        // This thread may wait (it starts processes): the time to collect
        // the daemons of VMs that have ended.
        reap_released();
        let mut backends = Vec::new();
        for (index, share) in all_shares(config).iter().enumerate() {
            backends.push(Some(start_one(&program, index, share)?));
        }
        Ok(Self {
            backends: Mutex::new(backends),
        })
    }

    fn device(&self, index: usize) -> Result<VhostUserDevice> {
        let mut backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        let Some((connection, daemon)) = backends.get_mut(index).and_then(Option::take) else {
            return Err(Error::Share(format!(
                "the daemon of share {index} is already in use by another VM"
            )));
        };
        let device = virtio_fs(&tag(index), connection)
            .map_err(|e| Error::Share(format!("share {index}: {e}")))?;
        daemon.release();
        Ok(device)
    }
}

/// The directory exists and is one (virtiofsd would fail later, with a
/// less clear message).
fn check_share(share: &ShareConfig) -> Result<()> {
    let dir = &share.host_dir;
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(Error::Share(format!(
            "{} is not a directory",
            dir.display()
        ))),
        Err(e) => Err(Error::Share(format!("{}: {e}", dir.display()))),
    }
}

fn same_guest_path(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// The virtiofsd to run: `explicit` (`--virtiofsd`), else
/// `$KILN_VIRTIOFSD`, else the one resources/setup.sh installed (the
/// `virtiofsd` link in kiln's cache directory), else `virtiofsd` on PATH.
pub fn find_virtiofsd(explicit: Option<&Path>) -> Result<PathBuf> {
    let given = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("KILN_VIRTIOFSD").map(PathBuf::from));
    if let Some(path) = given {
        return match is_executable(&path) {
            true => Ok(path),
            false => Err(Error::Share(format!(
                "virtiofsd {} is not an executable file",
                path.display()
            ))),
        };
    }
    let cached = cache_dir().map(|dir| dir.join("virtiofsd"));
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("virtiofsd"));
    cached.into_iter().chain(on_path).find(|p| is_executable(p)).ok_or_else(|| {
        Error::Share(
            "virtiofsd not found: install it with resources/setup.sh (or `cargo install --locked virtiofsd`), or name it with --virtiofsd PATH or $KILN_VIRTIOFSD".into(),
        )
    })
}

/// kiln's cache directory, as resources/setup.sh computes it.
fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KILN_CACHE_DIR") {
        return Some(dir.into());
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))?;
    Some(cache.join("kiln"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Starts virtiofsd for `share` on a listening socket kiln made (so there
/// is nothing to wait for: kiln's connection queues until the daemon
/// accepts it), connects and sets the backend up.
fn start_one(
    program: &Path,
    index: usize,
    share: &ShareConfig,
) -> Result<(VhostUserConnection, Daemon)> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        Error::Share(format!("{}: {what}: {e}", share.host_dir.display()))
    };
    // A private directory for the socket: only root (kiln) can reach it,
    // and it is gone once kiln is connected.
    let dir = std::env::temp_dir().join(format!("kiln-share-{}-{index}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| fail("creating the socket directory", &e))?;
    let socket = dir.join("socket");
    let connected = (|| {
        let listener = UnixListener::bind(&socket).map_err(|e| fail("binding the socket", &e))?;
        let child = spawn_virtiofsd(program, share, &listener)
            .map_err(|e| fail(&format!("starting {}", program.display()), &e))?;
        let daemon = Daemon { child: Some(child) };
        let stream = UnixStream::connect(&socket).map_err(|e| fail("connecting", &e))?;
        Ok::<_, Error>((stream, daemon))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let (stream, daemon) = connected?;
    let connection = VhostUserConnection::new(stream, fs::QUEUES)
        .map_err(|e| fail("virtiofsd did not set up (see its message above)", &e))?;
    log::info!(
        "share {}: {} at {}{} (virtiofsd pid {})",
        tag(index),
        share.host_dir.display(),
        share.guest_path,
        if share.read_only { ", read-only" } else { "" },
        daemon.pid()
    );
    Ok((connection, daemon))
}

/// virtiofsd serving `share` on `listener` (its descriptor 3), in its own
/// sandbox (`--sandbox=namespace`: new mount, pid and network namespaces,
/// the directory as its root, and its seccomp filter on), read-only on the
/// host side for a read-only share.
fn spawn_virtiofsd(
    program: &Path,
    share: &ShareConfig,
    listener: &UnixListener,
) -> std::io::Result<Child> {
    let mut command = Command::new(program);
    command
        .arg(format!("--fd={LISTEN_FD}"))
        .arg("--shared-dir")
        .arg(&share.host_dir)
        .arg(format!("--cache={}", share.cache.as_str()))
        .arg("--sandbox=namespace")
        .arg("--log-level=error")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if share.read_only {
        command.arg("--readonly");
    }
    let fd = listener.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec and makes
    // only async-signal-safe calls (dup2, fcntl, prctl) on integers.
    unsafe {
        command.pre_exec(move || {
            if fd == LISTEN_FD {
                // dup2 onto itself would keep close-on-exec.
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, LISTEN_FD) != LISTEN_FD {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_virtiofsd_must_be_executable() {
        let err = find_virtiofsd(Some(Path::new("/nonexistent/virtiofsd")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/virtiofsd is not an executable"),
            "{err}"
        );
        assert_eq!(
            find_virtiofsd(Some(Path::new("/bin/sh"))).unwrap(),
            Path::new("/bin/sh")
        );
    }

    /// A daemon left to its device is collected once it has exited, at
    /// the next start: no zombie stays behind.
    #[test]
    fn released_daemons_are_collected_at_the_next_start() {
        let child = Command::new("true").spawn().unwrap();
        let proc_entry = PathBuf::from(format!("/proc/{}", child.id()));
        Daemon { child: Some(child) }.release();
        // Bounded: `true` exits at once; a daemon never collected stays a
        // zombie, its /proc entry there for good.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while proc_entry.exists() && std::time::Instant::now() < deadline {
            reap_released();
            std::thread::yield_now();
        }
        assert!(
            !proc_entry.exists(),
            "{} was never collected",
            proc_entry.display()
        );
    }

    #[test]
    fn shares_need_an_existing_directory_and_distinct_guest_paths() {
        let mut config = VmConfig::new("vmlinux");
        config.shares.push("/nonexistent/dir:/mnt".parse().unwrap());
        let err = ShareDaemons::start(&config).err().unwrap().to_string();
        assert!(err.starts_with("--share: /nonexistent/dir: "), "{err}");
        config.shares = vec!["/etc/passwd:/mnt".parse().unwrap()];
        let err = ShareDaemons::start(&config).err().unwrap().to_string();
        assert!(err.contains("not a directory"), "{err}");
        config.shares = vec!["/tmp:/mnt/a".parse().unwrap(), "/:/mnt/a/".parse().unwrap()];
        let err = ShareDaemons::start(&config).err().unwrap().to_string();
        assert!(err.contains("/mnt/a/ is given twice"), "{err}");
    }
}
