//! The jail `kiln run` enters before it builds the VM, so that a device
//! model taken over by the guest finds almost nothing around it:
//!
//! - new mount, IPC and UTS namespaces (and a network namespace when the
//!   VM has no TAP: a TAP is created in the namespace kiln runs in);
//! - a private root (`pivot_root` into a small tmpfs) holding only what
//!   the run names: the kernel, initrd and root (read-only), the disks
//!   (read-only unless writable), the vsock socket's directory, /dev/kvm
//!   (and /dev/net/tun with a TAP), each at its own path so the rest of
//!   kiln opens the paths it was given; an empty $TMPDIR (the host's with
//!   an image root, for its overlay);
//! - no inherited descriptors but stdio, no core dumps (guest memory),
//!   not dumpable (no ptrace by other processes of the same uid), no new
//!   privileges, an empty capability bounding set, bounded descriptors;
//! - an unprivileged uid and gid: run as root, kiln builds the VM as root
//!   (TAPs need CAP_NET_ADMIN, /dev/kvm is often root's) and then, before
//!   the guest's first instruction, every thread becomes
//!   [`JailConfig::uid`]/[`JailConfig::gid`] and so holds no capability
//!   (`VmConfig::run_as`, done by the VM thread). Run by another user,
//!   kiln enters a user namespace that maps only that user and drops every
//!   capability at once.
//!
//! Namespaces and the root are per thread until a thread starts, so the
//! jail is entered while kiln has a single thread: first thing in a run.

mod cgroup;
mod creds;
mod root;

use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::config::{Credentials, VmConfig};
use crate::rootfs::Rootfs;

pub use cgroup::CgroupLimits;
pub use creds::drop_privileges;

/// Moves kiln into a cgroup of its own with `limits` (see `cgroup.rs`),
/// removed when kiln ends. Must be called while the process has one
/// thread, before [`JailPlan::enter`] (which hides /sys/fs/cgroup).
pub fn enter_cgroup(limits: &CgroupLimits) -> Result<(), JailError> {
    root::ensure_single_threaded()?;
    cgroup::enter(limits)
}

/// The uid and gid of `nobody` on most distributions: the default ids a
/// root-started `kiln run` drops to.
pub const DEFAULT_JAIL_ID: u32 = 65534;

/// How a `kiln run` is jailed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JailConfig {
    /// The uid kiln drops to when started as root (never 0).
    pub uid: u32,
    /// The gid kiln drops to when started as root (never 0).
    pub gid: u32,
}

impl Default for JailConfig {
    fn default() -> Self {
        Self {
            uid: DEFAULT_JAIL_ID,
            gid: DEFAULT_JAIL_ID,
        }
    }
}

/// The jail could not be entered; nothing of the VM exists yet.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A step of entering the jail failed.
    #[error("jail: {what}: {source} (`--jail off` runs without the jail)")]
    Step {
        /// What kiln was doing.
        what: String,
        /// Why it failed.
        source: io::Error,
    },
    /// The jail cannot hold what the run needs.
    #[error("jail: {0}")]
    Unusable(String),
}

impl JailError {
    fn step(what: impl Into<String>) -> impl FnOnce(io::Error) -> JailError {
        let what = what.into();
        move |source| JailError::Step { what, source }
    }
}

/// One host path the jail shows at the same path.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Bind {
    /// Absolute, as the run names it (symbolic links not resolved): where
    /// the jail shows it.
    path: PathBuf,
    /// The host path shown there (`path` but for the image root's scratch
    /// directory, which kiln finds by resolving the image's path).
    source: PathBuf,
    writable: bool,
    /// A device node kiln needs (/dev/kvm).
    device: bool,
}

/// What a run's jail holds, computed from its configuration.
#[derive(Debug)]
pub struct JailPlan {
    binds: Vec<Bind>,
    /// Directories created empty (and writable by anyone, sticky), e.g. $TMPDIR.
    scratch_dirs: Vec<PathBuf>,
    /// The directory to be in once inside (the run's relative paths start there).
    cwd: PathBuf,
    /// Whether the jail gets its own network namespace (no TAP).
    new_network: bool,
    /// The vsock socket's directory on the host.
    vsock_dir: Option<PathBuf>,
    /// The vsock socket's path inside the jail.
    vsock_socket: Option<PathBuf>,
    /// An image root's scratch directory inside the jail.
    scratch_dir: Option<PathBuf>,
}

/// Where the jail shows the vsock socket's directory.
const VSOCK_DIR: &str = "/.kiln/vsock";
/// Where the jail shows an image root's scratch directory.
const SCRATCH_DIR: &str = "/.kiln/scratch";
/// Where the jail shows the directory `kiln snapshot create` writes.
const OUTPUT_DIR: &str = "/.kiln/output";

/// Whether `dir` takes a new (unnamed, at once gone) file.
fn takes_a_new_file(dir: &Path) -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .is_ok()
}

impl JailPlan {
    /// The jail `config`'s run needs. `config` is the run's final
    /// configuration, before the sandbox (if any) adds its own vsock device.
    pub fn for_vm(config: &VmConfig) -> Result<JailPlan, JailError> {
        let cwd = std::env::current_dir().map_err(JailError::step("reading the directory"))?;
        let absolute = |p: &Path| lexically_normal(&cwd.join(p));
        let mut binds = Vec::new();
        // A restored VM opens what its snapshot names (its disks, its image
        // root): the plan is that of the restored configuration; a snapshot
        // that cannot be read (or a `--net` count that does not fit it) is
        // left for the restore to report, as other unreadable paths are.
        // The snapshot's directory is shown read-only at its own path
        // (messages name it): it holds only kiln's files.
        let restored;
        let config = match &config.restore_from {
            Some(dir) => {
                binds.push(Bind::file(absolute(dir), false));
                let saved = crate::snapshot::saved_config(dir).ok();
                match saved.and_then(|saved| config.restored_from(&saved).ok()) {
                    Some(copy) => {
                        restored = VmConfig {
                            vsock: config.vsock.clone(),
                            ..copy
                        };
                        &restored
                    }
                    None => config,
                }
            }
            None => config,
        };
        let mut read_only = |p: &Path| binds.push(Bind::file(absolute(p), false));
        // (No kernel: a restore whose snapshot cannot be read.)
        if !config.kernel.as_os_str().is_empty() {
            read_only(&config.kernel);
        }
        config.initrd.as_deref().map(&mut read_only);
        config.rootfs.as_deref().map(&mut read_only);
        for disk in &config.disks {
            binds.push(Bind::file(absolute(&disk.path), !disk.read_only));
        }
        // Directories are shown at kiln's own places, not at their paths: a
        // host directory shown at its path would bring its symbolic links
        // into the jail, where they resolve against the jail's root, and
        // would shadow the files shown under it. The run is told the new
        // places (`apply`).
        let (mut vsock_dir, mut vsock_socket) = (None, None);
        if let Some(vsock) = &config.vsock {
            // kiln creates its socket there and connects to the _PORT ones.
            let socket = absolute(&vsock.socket);
            let dir = socket.parent().unwrap_or(Path::new("/")).to_path_buf();
            binds.push(Bind::shown_at(VSOCK_DIR, dir.clone()));
            vsock_dir = Some(dir);
            vsock_socket = socket
                .file_name()
                .map(|name| Path::new(VSOCK_DIR).join(name));
        }
        binds.push(Bind::device("/dev/kvm"));
        if !config.nets.is_empty() {
            binds.push(Bind::device("/dev/net/tun"));
        }
        // An empty $TMPDIR of the jail's own (the sandbox's socket directory).
        let scratch_dirs = vec![absolute(&std::env::temp_dir())];
        // An image root's overlay file (see rootfs::root_disk), made before
        // kiln drops its privileges: --scratch-dir, else the image's
        // own directory if it takes a new file, else the host's $TMPDIR.
        let image_root = match &config.rootfs {
            Some(path) => matches!(Rootfs::detect(path), Ok(Rootfs::Image(_))),
            None => false,
        };
        let mut scratch_dir = None;
        if let (true, Some(image)) = (image_root, &config.rootfs) {
            let next_to_image = std::fs::canonicalize(image)
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .filter(|dir| takes_a_new_file(dir));
            match (&config.scratch_dir, next_to_image) {
                // The user's own choice, at its own path (messages name it).
                (Some(dir), _) => binds.push(Bind::file(absolute(dir), true)),
                (None, dir) => {
                    let dir = dir.unwrap_or_else(std::env::temp_dir);
                    binds.push(Bind::shown_at(SCRATCH_DIR, dir));
                    scratch_dir = Some(PathBuf::from(SCRATCH_DIR));
                }
            }
        }
        // Shorter paths first: a file inside a bound directory is bound over
        // the directory's view of it, never created through it.
        binds.sort_by_key(|b| b.path.components().count());
        binds.dedup_by(|later, earlier| {
            let same = later.path == earlier.path;
            if same {
                earlier.writable |= later.writable;
            }
            same
        });
        Ok(JailPlan {
            binds,
            scratch_dirs,
            cwd,
            new_network: config.nets.is_empty(),
            vsock_dir,
            vsock_socket,
            scratch_dir,
        })
    }

    /// Adds the directory `kiln snapshot create` writes (writable); returns
    /// its path inside the jail.
    pub fn add_output_dir(&mut self, dir: &Path) -> PathBuf {
        let dir = lexically_normal(&self.cwd.join(dir));
        self.binds.push(Bind::shown_at(OUTPUT_DIR, dir));
        PathBuf::from(OUTPUT_DIR)
    }

    /// Points `config` at the jail's own places for the directories it shows
    /// (the vsock socket's, an image root's scratch directory). For the
    /// configuration the plan was made from, once the jail is entered.
    pub fn apply(&self, config: &mut VmConfig) {
        if let (Some(vsock), Some(socket)) = (config.vsock.as_mut(), &self.vsock_socket) {
            vsock.socket = socket.clone();
        }
        if self.scratch_dir.is_some() {
            config.scratch_dir = self.scratch_dir.clone();
        }
    }

    /// Checks what only the jail's ids can tell: kiln, once it is `ids`,
    /// must still create and remove its vsock socket in its directory.
    pub fn check_access(&self, ids: Credentials) -> Result<(), JailError> {
        let Some(dir) = &self.vsock_dir else {
            return Ok(());
        };
        let meta = std::fs::metadata(dir).map_err(JailError::step(format!(
            "--vsock: reading {}",
            dir.display()
        )))?;
        use std::os::unix::fs::MetadataExt;
        let mode = meta.mode();
        let writable = (meta.uid() == ids.uid && mode & 0o300 == 0o300)
            || (meta.gid() == ids.gid && mode & 0o030 == 0o030)
            || mode & 0o003 == 0o003;
        match writable {
            true => Ok(()),
            false => Err(JailError::Unusable(format!(
                "--vsock: kiln runs as uid {} gid {} once jailed and cannot create its socket in {} \
                 (make the directory writable by that uid, or give --jail-uid/--jail-gid, or --jail off)",
                ids.uid,
                ids.gid,
                dir.display()
            ))),
        }
    }

    /// Enters the jail. Must be called while the process has one thread.
    /// Returns the ids the VM must drop to before its guest runs (`Some`
    /// when kiln runs as root), for [`VmConfig::run_as`].
    pub fn enter(&self, jail: JailConfig) -> Result<Option<Credentials>, JailError> {
        root::ensure_single_threaded()?;
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if root && (jail.uid == 0 || jail.gid == 0) {
            return Err(JailError::Unusable(
                "--jail-uid and --jail-gid must not be 0 (root): `--jail off` runs as root".into(),
            ));
        }
        // What kiln reads from /sys and /proc, read while they are there.
        crate::host_profile::HostProfile::detect();
        crate::memory::host_ram_bytes();
        creds::close_inherited_fds()?;
        root::unshare(!root, self.new_network)?;
        // The host's paths, held open (in the new mount namespace, where a
        // bind mount's source must be) before the private root hides them.
        let sources = root::open_sources(&self.binds);
        root::build_and_pivot(&self.binds, &sources, &self.scratch_dirs, &self.cwd)?;
        drop(sources);
        creds::limit_process()?;
        match root {
            true => Ok(Some(Credentials {
                uid: jail.uid,
                gid: jail.gid,
            })),
            false => {
                creds::drop_all_capabilities()?;
                Ok(None)
            }
        }
    }
}

impl Bind {
    fn file(path: PathBuf, writable: bool) -> Self {
        Self {
            source: path.clone(),
            path,
            writable,
            device: false,
        }
    }

    /// The host directory `source`, shown at `path`, writable.
    fn shown_at(path: &str, source: PathBuf) -> Self {
        Self {
            path: PathBuf::from(path),
            source,
            writable: true,
            device: false,
        }
    }

    fn device(path: &str) -> Self {
        Self {
            path: PathBuf::from(path),
            source: PathBuf::from(path),
            writable: true,
            device: true,
        }
    }
}

/// `path` without `.` and `..` components (resolved by name, as they will
/// be inside the jail, where every directory on the way is a real one).
fn lexically_normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VsockConfig;

    #[test]
    fn paths_are_made_absolute_without_resolving_links() {
        assert_eq!(
            lexically_normal(Path::new("/a/./b/../c//d")),
            Path::new("/a/c/d")
        );
        assert_eq!(lexically_normal(Path::new("/../x")), Path::new("/x"));
    }

    #[test]
    fn the_plan_holds_what_the_run_names_and_nothing_else() {
        let mut config = VmConfig::new("/k/vmlinux");
        config.initrd = Some("/k/initrd".into());
        config.disks.push("/d/data.img".parse().unwrap());
        config.disks.push("/d/base.img,ro".parse().unwrap());
        config.vsock = Some(VsockConfig {
            cid: 3,
            socket: "/run/v/vsock.sock".into(),
        });
        let plan = JailPlan::for_vm(&config).unwrap();
        let binds: Vec<_> = plan
            .binds
            .iter()
            .map(|b| (b.path.to_str().unwrap(), b.writable, b.device))
            .collect();
        for expected in [
            ("/k/vmlinux", false, false),
            ("/k/initrd", false, false),
            ("/d/data.img", true, false),
            ("/d/base.img", false, false),
            ("/.kiln/vsock", true, false),
            ("/dev/kvm", true, true),
        ] {
            assert!(binds.contains(&expected), "{expected:?} in {binds:?}");
        }
        assert_eq!(binds.len(), 6, "{binds:?}");
        assert!(plan.new_network, "no TAP: a network namespace of its own");
        let vsock_dir = plan
            .binds
            .iter()
            .find(|b| b.path == Path::new("/.kiln/vsock"));
        assert_eq!(
            vsock_dir.map(|b| b.source.as_path()),
            Some(Path::new("/run/v"))
        );
        let mut applied = config.clone();
        plan.apply(&mut applied);
        assert_eq!(
            applied.vsock.map(|v| v.socket),
            Some(PathBuf::from("/.kiln/vsock/vsock.sock"))
        );
        assert_eq!(plan.scratch_dirs, [std::env::temp_dir()]);

        config.nets.push("tap=tap0".parse().unwrap());
        let plan = JailPlan::for_vm(&config).unwrap();
        assert!(!plan.new_network, "the TAP is created where kiln runs");
        assert!(plan
            .binds
            .iter()
            .any(|b| b.path == Path::new("/dev/net/tun")));
    }

    /// A restore shows its snapshot read-only at its own path; a snapshot
    /// that cannot be read leaves the rest of the plan to the caller's
    /// config (the restore then reports it); `kiln snapshot create`'s
    /// output is writable at kiln's own place.
    #[test]
    fn a_restore_shows_its_snapshot_and_a_create_its_output() {
        let config = VmConfig {
            restore_from: Some("/snap/ready".into()),
            ..VmConfig::default()
        };
        let mut plan = JailPlan::for_vm(&config).unwrap();
        let output = plan.add_output_dir(Path::new("/out/next"));
        assert_eq!(output, Path::new("/.kiln/output"));
        let binds: Vec<_> = plan
            .binds
            .iter()
            .map(|b| {
                (
                    b.path.to_str().unwrap(),
                    b.source.to_str().unwrap(),
                    b.writable,
                )
            })
            .collect();
        assert!(
            binds.contains(&("/snap/ready", "/snap/ready", false)),
            "{binds:?}"
        );
        assert!(
            binds.contains(&("/.kiln/output", "/out/next", true)),
            "{binds:?}"
        );
        let mut applied = config.clone();
        plan.apply(&mut applied);
        assert_eq!(
            applied.restore_from, config.restore_from,
            "messages name the user's path"
        );
        // Nothing else of the host (/dev/kvm aside): no kernel was given, so
        // no kernel path (the working directory) is shown.
        assert_eq!(binds.len(), 3, "{binds:?}");
    }
}
