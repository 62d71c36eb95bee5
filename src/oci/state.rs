//! Container state under `--root`: one directory per container, holding
//! `state.json` (written atomically: a temporary file renamed over it) and
//! the monitor's control socket. Every change happens under an exclusive
//! flock(2) of the container's directory, so two engines (or two calls of
//! one) racing on an id see one consistent state; the directory's mkdir is
//! what makes an id taken.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::network::{self, ContainerNetwork, NetworkError};

/// The OCI runtime-spec version kiln-oci reports.
pub const OCI_VERSION: &str = "1.0.2";

/// What kiln-oci keeps of a container.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Saved {
    /// The container id.
    pub id: String,
    /// The bundle directory (absolute).
    pub bundle: PathBuf,
    /// The root directory on the host.
    pub rootfs: PathBuf,
    /// The monitor's pid (0 before it started).
    pub pid: i32,
    /// The monitor's start time (/proc/PID/stat field 22), against pid reuse.
    pub pid_start: u64,
    /// When it was created (RFC 3339).
    pub created: String,
    /// The spec's annotations.
    pub annotations: std::collections::BTreeMap<String, String>,
    /// `start` has run the command.
    pub started: bool,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// Guest memory in bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// `pause` has paused the VM (until `resume`).
    #[serde(default)]
    pub paused: bool,
    /// How the root reaches the guest (the settings' at create).
    #[serde(default)]
    pub container_root: super::settings::ContainerRoot,
}

/// A container's status (the OCI state's `status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Booted, the command held until `start`.
    Created,
    /// The command runs.
    Running,
    /// The command was started and its VM's vCPUs are paused (`pause`).
    Paused,
    /// The monitor has ended (the command and the VM with it).
    Stopped,
}

impl Status {
    /// The word of the OCI state.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
        }
    }
}

/// The OCI state JSON (`kiln-oci state ID`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OciState<'a> {
    oci_version: &'static str,
    id: &'a str,
    status: &'static str,
    pid: i32,
    bundle: &'a Path,
    rootfs: &'a Path,
    created: &'a str,
    owner: &'static str,
    annotations: &'a std::collections::BTreeMap<String, String>,
}

/// A container's state directory, locked while this is alive.
pub struct ContainerDir {
    path: PathBuf,
    /// Holds the flock; released when dropped.
    _lock: File,
}

/// Refuses ids that could leave the state root or confuse a listing.
pub fn check_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= 1024
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+-.".contains(&b));
    match ok {
        true => Ok(()),
        false => Err(format!(
            "invalid container id '{id}' (letters, digits, '_', '+', '-' and '.' only)"
        )),
    }
}

fn lock(dir: &Path) -> Result<File, String> {
    let file = File::open(dir).map_err(|e| format!("opening {}: {e}", dir.display()))?;
    // SAFETY: flock on a descriptor this function owns; no memory involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("locking {}: {e}", dir.display()));
    }
    Ok(file)
}

impl ContainerDir {
    /// Makes the directory of a new container (refused when the id is in use).
    pub fn create(root: &Path, id: &str) -> Result<Self, String> {
        check_id(id)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(root)
            .map_err(|e| format!("creating the state root {}: {e}", root.display()))?;
        let path = root.join(id);
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(format!("container with id exists: {id}"))
            }
            Err(e) => return Err(format!("creating {}: {e}", path.display())),
        }
        let lock = lock(&path)?;
        Ok(Self { path, _lock: lock })
    }

    /// Opens (and locks) an existing container's directory.
    pub fn open(root: &Path, id: &str) -> Result<Self, String> {
        check_id(id)?;
        let path = root.join(id);
        if !path.join("state.json").is_file() {
            // A directory without state is a `create` still running (its
            // lock held) or one that failed half-way: neither is a container.
            return Err(format!("container \"{id}\" does not exist"));
        }
        let lock = lock(&path)?;
        // Deleted while this waited for the lock.
        if !path.join("state.json").is_file() {
            return Err(format!("container \"{id}\" does not exist"));
        }
        Ok(Self { path, _lock: lock })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The monitor's control socket.
    pub fn socket(&self) -> PathBuf {
        socket_path(&self.path)
    }

    /// Reads state.json.
    pub fn read(&self) -> Result<Saved, String> {
        read_saved(&self.path)
    }

    /// Replaces state.json atomically.
    pub fn write(&self, saved: &Saved) -> Result<(), String> {
        let tmp = self.path.join("state.json.tmp");
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&tmp)?;
            file.write_all(&serde_json::to_vec(saved)?)?;
            file.sync_all()?;
            std::fs::rename(&tmp, self.path.join("state.json"))
        };
        write().map_err(|e| format!("writing {}: {e}", self.path.display()))
    }

    /// Removes the directory (and with it the id).
    pub fn remove(self) -> Result<(), String> {
        std::fs::remove_dir_all(&self.path)
            .map_err(|e| format!("removing {}: {e}", self.path.display()))
    }
}

/// The container's network as its monitor carried it into the VM (written
/// before the VM boots, removed once the monitor has disconnected it), so
/// that `delete` can remove the TAPs and filters of a monitor that died.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedNetwork {
    /// The container's network namespace (config.json's path).
    pub namespace: PathBuf,
    /// What was carried.
    pub network: ContainerNetwork,
}

/// Where a container directory keeps its [`SavedNetwork`].
fn network_path(dir: &Path) -> PathBuf {
    dir.join("network.json")
}

/// Saves `network` in container directory `dir` (atomically: the monitor
/// writes it while `create` holds the directory's lock, so not through
/// [`ContainerDir`]).
pub fn save_network(dir: &Path, network: &SavedNetwork) -> Result<(), String> {
    let path = network_path(dir);
    let tmp = dir.join("network.json.tmp");
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(network)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Forgets the saved network of `dir` (its monitor disconnected it).
pub fn forget_network(dir: &Path) {
    let _ = std::fs::remove_file(network_path(dir));
}

/// Removes what a monitor that did not end cleanly left of the
/// container's network (nothing when it disconnected it itself), inside
/// the container's namespace; a namespace the engine has already deleted
/// took the TAPs with it.
pub fn release_network(dir: &Path) -> Result<(), String> {
    let path = network_path(dir);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let saved: SavedNetwork = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is corrupt: {e}", path.display()))?;
    match network::in_namespace(&saved.namespace, || saved.network.disconnect()) {
        Ok(Ok(())) => {}
        // Gone (ENOENT), or its bind mount is (EINVAL: a plain file).
        Err(NetworkError::Namespace { source, .. })
            if matches!(source.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => {}
        Ok(Err(e)) | Err(e) => return Err(format!("removing the container's network: {e}")),
    }
    forget_network(dir);
    Ok(())
}

/// The control socket's path in a container directory.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("ctl.sock")
}

/// Reads a container directory's state.json without its lock (the file is
/// only ever replaced whole).
pub fn read_saved(dir: &Path) -> Result<Saved, String> {
    let path = dir.join("state.json");
    let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{} is corrupt: {e}", path.display()))
}

impl Saved {
    /// The status, from the monitor's liveness.
    pub fn status(&self) -> Status {
        match (monitor_alive(self.pid, self.pid_start), self.started) {
            (false, _) => Status::Stopped,
            (true, false) => Status::Created,
            (true, true) if self.paused => Status::Paused,
            (true, true) => Status::Running,
        }
    }

    /// The OCI state of this container.
    pub fn oci_state(&self) -> OciState<'_> {
        let status = self.status();
        OciState {
            oci_version: OCI_VERSION,
            id: &self.id,
            status: status.as_str(),
            pid: match status {
                Status::Stopped => 0,
                _ => self.pid,
            },
            bundle: &self.bundle,
            rootfs: &self.rootfs,
            created: &self.created,
            owner: "",
            annotations: &self.annotations,
        }
    }
}

/// The start time of process `pid` (field 22 of /proc/PID/stat) and
/// whether it is a zombie; `None` when there is no such process.
pub fn process_start(pid: i32) -> Option<(u64, bool)> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: the
    // fields after it start past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 is at index 19.
    let zombie = fields.first() == Some(&"Z") || fields.first() == Some(&"X");
    Some((fields.get(19)?.parse().ok()?, zombie))
}

/// Whether the monitor (`pid`, started at `start`) still runs: a process
/// with that pid and start time that is not a zombie.
pub fn monitor_alive(pid: i32, start: u64) -> bool {
    matches!(process_start(pid), Some((s, false)) if s == start)
}

/// Now, as RFC 3339 in UTC with nanoseconds (the OCI state's `created`).
pub fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_leave_the_root_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x", "a b", "x\n"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        for ok in ["abc", "a.b-c_d+e", &"f".repeat(64)] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn this_process_is_alive_with_its_start_time_only() {
        let pid = std::process::id() as i32;
        let (start, zombie) = process_start(pid).unwrap();
        assert!(!zombie);
        assert!(monitor_alive(pid, start));
        assert!(
            !monitor_alive(pid, start + 1),
            "a reused pid is not the monitor"
        );
        assert!(!monitor_alive(0, 0));
    }

    #[test]
    fn the_date_is_rfc3339() {
        let now = rfc3339_now();
        assert_eq!(now.len(), "2026-11-30T17:00:00.000000000Z".len(), "{now}");
        assert!(now.starts_with("20") && now.ends_with('Z'), "{now}");
        assert_eq!(&now[10..11], "T");
    }
}
