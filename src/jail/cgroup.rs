//! A cgroup of kiln's own with CPU, memory and process limits
//! (`--cgroup cpus=N,mem=SIZE,pids=N`): cgroup v2 where it is the only
//! hierarchy, else the v1 `cpu`, `memory` and `pids` hierarchies (hybrid
//! hosts included). kiln moves itself in before it builds the VM, so the
//! guest's memory and every thread count against the limits.
//!
//! A jailed kiln can neither see nor remove the cgroup once it runs as the
//! jail's uid, so a small keeper process (forked while kiln has one thread,
//! holding nothing but one pipe end) waits for kiln's end, whatever it is,
//! SIGKILL included, and removes the cgroup.

use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::JailError;
use crate::config::option_parser::OptionSyntax;
use crate::config::parse_size;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The CFS period the CPU limit is a share of (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// `--cgroup cpus=N,mem=SIZE,pids=N`: each limit optional, at least one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CgroupLimits {
    /// CPU time, in CPUs (e.g. 1.5): a quota per 100 ms period.
    pub cpus: Option<f64>,
    /// Memory of the whole kiln process, guest memory included.
    pub mem_bytes: Option<u64>,
    /// Threads and processes.
    pub pids: Option<u64>,
}

static CGROUP_SYNTAX: OptionSyntax = OptionSyntax {
    usage: "[cpus=N][,mem=SIZE][,pids=N]",
    leading_value: false,
    values: &["cpus", "mem", "pids"],
    flags: &[],
};

impl FromStr for CgroupLimits {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let options = CGROUP_SYNTAX.parse(text)?;
        let cpus = match options.value("cpus") {
            None => None,
            Some(v) => match v.parse::<f64>() {
                Ok(c) if (0.01..=4096.0).contains(&c) => Some(c),
                _ => return Err(format!("cpus={v}: a number of CPUs from 0.01 to 4096")),
            },
        };
        let mem_bytes = match options.value("mem") {
            None => None,
            Some(v) => match parse_size(v) {
                Ok(m) if m >= 16 << 20 => Some(m),
                Ok(_) => return Err(format!("mem={v}: at least 16M")),
                Err(e) => return Err(format!("mem={v}: {e}")),
            },
        };
        let pids = match options.value("pids") {
            None => None,
            Some(v) => match v.parse::<u64>() {
                Ok(p) if p >= 8 => Some(p),
                _ => {
                    return Err(format!(
                        "pids={v}: a whole number, at least 8 (kiln's own threads)"
                    ))
                }
            },
        };
        if cpus.is_none() && mem_bytes.is_none() && pids.is_none() {
            return Err("give at least one of cpus=, mem=, pids=".into());
        }
        Ok(Self {
            cpus,
            mem_bytes,
            pids,
        })
    }
}

/// One controller's files: (file name, value).
type Settings = Vec<(&'static str, String)>;

/// Where each limit goes: (cgroup directory, its settings).
fn layout(limits: &CgroupLimits) -> Result<Vec<(PathBuf, Settings)>, JailError> {
    let root = Path::new(CGROUP_ROOT);
    let quota = limits
        .cpus
        .map(|c| ((c * CPU_PERIOD_US as f64) as u64).max(1000));
    if root.join("cgroup.controllers").exists() {
        // cgroup v2 only: one directory; the root must hand the controllers down.
        let enabled = std::fs::read_to_string(root.join("cgroup.subtree_control")).map_err(
            JailError::step("reading /sys/fs/cgroup/cgroup.subtree_control"),
        )?;
        let mut settings = Settings::new();
        let mut need = Vec::new();
        if let Some(q) = quota {
            settings.push(("cpu.max", format!("{q} {CPU_PERIOD_US}")));
            need.push("cpu");
        }
        if let Some(m) = limits.mem_bytes {
            settings.push(("memory.max", m.to_string()));
            settings.push(("memory.swap.max", "0".into()));
            need.push("memory");
        }
        if let Some(p) = limits.pids {
            settings.push(("pids.max", p.to_string()));
            need.push("pids");
        }
        if let Some(missing) = need
            .iter()
            .find(|c| !enabled.split_whitespace().any(|e| e == **c))
        {
            return Err(JailError::Unusable(format!(
                "--cgroup: the cgroup v2 root does not enable the {missing} controller for its children (cgroup.subtree_control)"
            )));
        }
        return Ok(vec![(root.to_path_buf(), settings)]);
    }
    let mut dirs = Vec::new();
    let mut v1 = |controller: &str, settings: Settings| -> Result<(), JailError> {
        let dir = root.join(controller);
        if !dir.join("cgroup.procs").exists() {
            return Err(JailError::Unusable(format!(
                "--cgroup: no cgroup v2 and no v1 {controller} hierarchy at {}",
                dir.display()
            )));
        }
        dirs.push((dir, settings));
        Ok(())
    };
    if let Some(q) = quota {
        v1(
            "cpu",
            vec![
                ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                ("cpu.cfs_quota_us", q.to_string()),
            ],
        )?;
    }
    if let Some(m) = limits.mem_bytes {
        let mut settings = vec![("memory.limit_in_bytes", m.to_string())];
        // With swap accounting, swap counts too: the guest cannot page out
        // past the limit.
        if root.join("memory/memory.memsw.limit_in_bytes").exists() {
            settings.push(("memory.memsw.limit_in_bytes", m.to_string()));
        }
        v1("memory", settings)?;
    }
    if let Some(p) = limits.pids {
        v1("pids", vec![("pids.max", p.to_string())])?;
    }
    Ok(dirs)
}

/// Creates kiln's cgroup (`kiln-PID` in each hierarchy), sets the limits,
/// moves kiln into it and starts the keeper that removes it at kiln's end.
/// Must be called while kiln has one thread (it forks).
pub(super) fn enter(limits: &CgroupLimits) -> Result<(), JailError> {
    let name = format!("kiln-{}", std::process::id());
    let mut created = Vec::new();
    let result = (|| {
        for (parent, settings) in layout(limits)? {
            let dir = parent.join(&name);
            std::fs::create_dir(&dir).map_err(JailError::step(format!(
                "--cgroup: creating {}",
                dir.display()
            )))?;
            created.push(dir.clone());
            for (file, value) in settings {
                std::fs::write(dir.join(file), &value).map_err(JailError::step(format!(
                    "--cgroup: writing {value} to {}",
                    dir.join(file).display()
                )))?;
            }
            std::fs::write(dir.join("cgroup.procs"), "0").map_err(JailError::step(format!(
                "--cgroup: moving kiln into {}",
                dir.display()
            )))?;
        }
        start_keeper(&created)
    })();
    if result.is_err() {
        // Back to where kiln was, and nothing left behind.
        for dir in created.iter().rev() {
            if let Some(parent) = dir.parent() {
                let _ = std::fs::write(parent.join("cgroup.procs"), "0");
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
    result
}

/// Forks the keeper: it closes everything but its end of a pipe whose other
/// end only kiln holds (close-on-exec, and no other process of kiln's has
/// it), waits for end of file (kiln has exited: every thread gone), and
/// removes `dirs`. It leaves kiln's cgroup first, so as not to count in it.
fn start_keeper(dirs: &[PathBuf]) -> Result<(), JailError> {
    let mut fds = [0; 2];
    // SAFETY: a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(JailError::step("--cgroup: creating the keeper's pipe")(
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: pipe2 succeeded: both descriptors are open and owned here.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: kiln has one thread (checked by the caller), so the child may
    // run any code; it only uses what it owns and ends with _exit.
    match unsafe { libc::fork() } {
        -1 => Err(JailError::step("--cgroup: starting the keeper")(
            io::Error::last_os_error(),
        )),
        0 => {
            drop(write_end);
            keep(read_end, dirs);
            // SAFETY: ends the keeper without running kiln's exit handlers.
            unsafe { libc::_exit(0) }
        }
        _ => {
            drop(read_end);
            // Held (leaked on purpose) until kiln exits: then the keeper wakes.
            std::mem::forget(write_end);
            Ok(())
        }
    }
}

/// The keeper's life: detached from kiln's terminal, signals and stdio,
/// out of kiln's cgroup, waiting for kiln's end.
fn keep(read_end: OwnedFd, dirs: &[PathBuf]) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain calls on the keeper's own process state.
    unsafe {
        libc::setsid();
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
        let keep_fd = read_end.as_raw_fd();
        for fd in 0..1024 {
            if fd != keep_fd {
                libc::close(fd);
            }
        }
    }
    for dir in dirs {
        if let Some(parent) = dir.parent() {
            let _ = std::fs::write(parent.join("cgroup.procs"), "0");
        }
    }
    let mut pipe = std::fs::File::from(read_end);
    let mut byte = [0u8; 1];
    while !matches!(pipe.read(&mut byte), Ok(0) | Err(_)) {}
    for dir in dirs {
        // A cgroup is busy for a moment after its last task exits.
        for _ in 0..100 {
            match std::fs::remove_dir(dir) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_with_one_line_errors() {
        let l: CgroupLimits = "cpus=1.5,mem=512M,pids=64".parse().unwrap();
        assert_eq!(
            l,
            CgroupLimits {
                cpus: Some(1.5),
                mem_bytes: Some(512 << 20),
                pids: Some(64)
            }
        );
        let only_mem: CgroupLimits = "mem=1G".parse().unwrap();
        assert_eq!((only_mem.cpus, only_mem.pids), (None, None));
        for (bad, why) in [
            ("", "empty option"),
            ("cpus=", "cpus="),
            ("cpus=0", "cpus=0: a number of CPUs"),
            ("cpus=nan", "cpus=nan"),
            ("mem=1M", "mem=1M: at least 16M"),
            ("mem=lots", "mem=lots"),
            ("pids=2", "pids=2: a whole number, at least 8"),
            ("disk=1", "disk"),
        ] {
            let e = bad.parse::<CgroupLimits>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains('\n'), "{bad}: {e}");
        }
    }
}
