//! Booting a sandbox VM.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::vm::{Isolation, SandboxVm};
use super::vm_process::{self, VmProcess, VmProcessSpec};
use super::{Result, Sandbox, SandboxError, DEFAULT_OUTPUT_LIMIT};
use crate::config::{
    ConsoleKind, Credentials, DiskConfig, NetConfig, RateLimit, RootShare, SeccompMode,
    ShareConfig, TmpfsConfig, VmConfig, VsockConfig,
};
use crate::jail::JailConfig;
use crate::{ConsoleIo, VmStopper};
use kiln_init::protocol::Identity;

/// The vsock port the agent connects to on the host.
const AGENT_PORT: u32 = 1024;
/// The guest's CID (any valid one: the device is private to the VM).
const GUEST_CID: u64 = 3;
/// Console bytes kept for error messages.
const CONSOLE_KEEP: usize = 64 << 10;
/// Without a boot or VM timeout, how long the agent may take to connect
/// (unless [`SandboxBuilder::without_default_boot_timeout`]).
const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// Builds a [`Sandbox`]: `Sandbox::builder().kernel(..).build()`, or from a
/// whole [`VmConfig`] (`SandboxBuilder::from(config)`). The VM options are the
/// config's; the builder adds only what a sandbox needs: the agent's vsock
/// device and port, the console copy, the
/// default output limit and a hook that gets the VM's stopper at start.
#[derive(Default)]
pub struct SandboxBuilder {
    config: VmConfig,
    /// No `DEFAULT_BOOT_TIMEOUT`: `kiln run` waits for the agent until a
    /// boot or VM timeout it was given, or the user, ends it.
    no_default_boot_timeout: bool,
    console: Option<Box<dyn Write + Send>>,
    output_limit: Option<usize>,
    on_vm_started: Option<Box<dyn FnOnce(VmStopper) + Send>>,
    before_guest: Option<BeforeGuest>,
    isolation: Isolation,
    kiln_binary: Option<PathBuf>,
    /// The VM process's jail (`None`: none); [`Isolation::Process`] only.
    jail: Option<JailConfig>,
    /// Whether `jail` was set (else the default jail).
    jail_set: bool,
}

/// Run by `build` on its own thread before the guest starts.
type BeforeGuest = Box<dyn FnOnce() -> crate::Result<()> + Send>;

impl From<VmConfig> for SandboxBuilder {
    fn from(config: VmConfig) -> Self {
        Self::default().config(config)
    }
}

impl SandboxBuilder {
    /// Takes every VM option from `config` (replacing those set so far). It
    /// must have no vsock device or agent port: the sandbox adds its own.
    pub fn config(mut self, config: VmConfig) -> Self {
        self.config = config;
        self
    }

    /// Calls `hook` as soon as the VM runs (before the agent answers) with a
    /// stopper that ends the VM from any thread: a VM stopped while `build`
    /// waits makes `build` fail at once with `BootFailed` and the stopper's
    /// outcome (the CLI stops it with `Interrupted` on a signal).
    pub fn on_vm_started(mut self, hook: impl FnOnce(VmStopper) + Send + 'static) -> Self {
        self.on_vm_started = Some(Box::new(hook));
        self
    }

    /// Adds a virtio-blk disk (the first is /dev/vda, or /dev/vdb after an
    /// image root).
    pub fn disk(mut self, disk: DiskConfig) -> Self {
        self.config.disks.push(disk);
        self
    }

    /// Adds a virtio-net card on a host TAP (network is off without one).
    pub fn net(mut self, net: NetConfig) -> Self {
        self.config.nets.push(net);
        self
    }

    /// Shares a host directory with the guest (virtio-fs, as `kiln run
    /// --share`): kiln starts a virtiofsd for it and the guest's init
    /// mounts it at its guest path before the agent runs.
    pub fn share(mut self, share: ShareConfig) -> Self {
        self.config.shares.push(share);
        self
    }

    /// Mounts a tmpfs in the guest (as `kiln run --tmpfs`): the guest's
    /// init mounts it at its guest path before the agent runs, after the
    /// shares. `TmpfsConfig::with_options` reads OCI options, `parse` the
    /// `PATH[:OPTIONS]` of `--tmpfs`.
    pub fn tmpfs(mut self, tmpfs: TmpfsConfig) -> Self {
        self.config.tmpfs.push(tmpfs);
        self
    }

    /// Adds a virtio-rng device.
    pub fn rng(mut self, on: bool) -> Self {
        self.config.rng = on;
        self
    }

    /// Limits the virtio-rng device's bytes and requests per second (see
    /// [`RateLimit`]; disks and cards carry their own, in [`DiskConfig`]
    /// and [`NetConfig`]).
    pub fn rng_rate_limit(mut self, limit: RateLimit) -> Self {
        self.config.rng_rate_limit = limit;
        self
    }

    /// The seccomp filters on the VM's threads and the sandbox's own
    /// (default [`SeccompMode::On`]; see [`VmConfig::seccomp`]).
    pub fn seccomp(mut self, mode: SeccompMode) -> Self {
        self.config.seccomp = mode;
        self
    }

    /// `build` runs `hook` on its calling thread once the VM's thread has
    /// started and before the guest does: `kiln run` installs its main
    /// thread's seccomp filter there (the VM's threads must not inherit it).
    pub(crate) fn before_guest_starts(
        mut self,
        hook: impl FnOnce() -> crate::Result<()> + Send + 'static,
    ) -> Self {
        self.before_guest = Some(Box::new(hook));
        self
    }

    /// Where the VM runs (default [`Isolation::Process`]; see
    /// [`Isolation`] for what each risks).
    pub fn isolation(mut self, isolation: Isolation) -> Self {
        self.isolation = isolation;
        self
    }

    /// The `kiln` binary that runs the VM with [`Isolation::Process`].
    /// Default: `$KILN_BINARY`, else a `kiln` next to the running program
    /// or one directory up (cargo's target directory), else `kiln` on
    /// `$PATH`.
    pub fn kiln_binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.kiln_binary = Some(path.into());
        self
    }

    /// The VM process's jail with [`Isolation::Process`] (default: on, with
    /// [`JailConfig::default`]'s ids when the embedder runs as root);
    /// `None` runs it unjailed, for debugging only.
    pub fn jail(mut self, jail: Option<JailConfig>) -> Self {
        self.jail = jail;
        self.jail_set = true;
        self
    }

    /// Which device is the guest's console (its output goes to the console ring).
    pub fn console_kind(mut self, kind: ConsoleKind) -> Self {
        self.config.console = kind;
        self
    }

    /// The guest kernel (vmlinux or bzImage); required, unless the
    /// sandbox starts [`from_snapshot`](Self::from_snapshot).
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.kernel = path.into();
        self
    }

    /// Start from the snapshot in `dir` (written by [`Sandbox::snapshot`]
    /// or `kiln snapshot create`) instead of booting: the sandbox is ready
    /// as soon as the restored guest's agent reconnects, in milliseconds.
    /// The snapshot fixes everything the guest sees (memory, vCPUs, devices,
    /// root); of this builder only the host side counts: timeouts,
    /// isolation, jail, seccomp, console output, and the copy's identity:
    /// [`hostname`](Self::hostname), and [`net`](Self::net) once per card
    /// of the snapshot, in order, to move the cards to other TAPs (an
    /// existing TAP each; a `mac` gives the card a new address, which the
    /// guest takes before the first command). `dir` is only read, and
    /// any number of sandboxes may start from it at once: each maps its
    /// memory copy-on-write, writes its own disk overlay, and gets fresh
    /// entropy, the host's clock and a new machine id before its first
    /// command (see the README's Snapshots section for what that does not
    /// cover).
    pub fn from_snapshot(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.restore_from = Some(dir.into());
        self
    }

    /// The guest's hostname (default `kiln`; see [`VmConfig::hostname`]):
    /// set before the first command, also on a sandbox started
    /// [`from_snapshot`](Self::from_snapshot) (without it, that one keeps
    /// its snapshot's).
    pub fn hostname(mut self, name: impl Into<String>) -> Self {
        self.config.hostname = Some(name.into());
        self
    }

    /// The guest's root file system: a host directory, a tar archive (plain
    /// or gzip, e.g. from `docker export`) or an ext2/3/4 image, told apart
    /// by content. Directories and archives are packed into the initramfs;
    /// an image is attached as /dev/vda copy-on-write (the original is only
    /// read; the guest's writes go to a private unnamed file that vanishes
    /// with the VM) and every
    /// command runs inside it. See [`VmConfig::rootfs`] and the README's
    /// "Root file systems".
    pub fn rootfs(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.rootfs = Some(path.into());
        self.config.rootfs_share = None;
        self
    }

    /// A host directory as the guest's root, shared (virtio-fs, a
    /// virtiofsd kiln starts) rather than packed: `RootShare::Overlay`
    /// keeps the directory unchanged (the guest's writes stay in RAM),
    /// `RootShare::Writable` writes through to it, as `kiln run --rootfs
    /// DIR,share[,rw]` does. See [`VmConfig::rootfs_share`].
    pub fn shared_rootfs(mut self, dir: impl Into<PathBuf>, mode: RootShare) -> Self {
        self.config.rootfs = Some(dir.into());
        self.config.rootfs_share = Some(mode);
        self
    }

    /// Where the overlay (the guest's writes) of an image root goes (see
    /// [`VmConfig::scratch_dir`]; default: next to the image).
    pub fn scratch_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.scratch_dir = Some(dir.into());
        self
    }

    /// A user initramfs under kiln's init.
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.initrd = Some(path.into());
        self
    }

    /// Guest memory in bytes (default 256 MiB).
    pub fn memory(mut self, bytes: u64) -> Self {
        self.config.mem_bytes = bytes;
        self
    }

    /// Number of vCPUs (default 1), each a host thread.
    pub fn vcpus(mut self, n: u8) -> Self {
        self.config.vcpus = n;
        self
    }

    /// Wall-clock limit for the whole VM (boot included): when it expires
    /// the VM is stopped and every call fails with the VM's outcome.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.config.timeout = Some(limit);
        self
    }

    /// How long to wait for the guest agent to connect (default: the VM
    /// timeout, else 300 s); `build` fails with
    /// [`SandboxError::BootTimeout`] naming it when it passes. Sets
    /// [`VmConfig::boot_timeout`].
    pub fn boot_timeout(mut self, limit: Duration) -> Self {
        self.config.boot_timeout = Some(limit);
        self
    }

    /// No 300 s default: without a boot or VM timeout, `build` waits for
    /// the agent until it connects or the VM ends (`kiln run`, whose user
    /// sees the boot and can stop it).
    pub(crate) fn without_default_boot_timeout(mut self) -> Self {
        self.no_default_boot_timeout = true;
        self
    }

    /// Extra kernel command-line words.
    pub fn cmdline(mut self, words: impl Into<String>) -> Self {
        self.config.extra_cmdline = Some(words.into());
        self
    }

    /// Enter a vmlinux through its PVH note when it has one (default true).
    pub fn use_pvh(mut self, on: bool) -> Self {
        self.config.use_pvh = on;
        self
    }

    /// Let the guest kernel log to the console.
    pub fn verbose(mut self, on: bool) -> Self {
        self.config.verbose = on;
        self
    }

    /// Also copy the guest console to `out` (it is always kept, bounded,
    /// for error messages).
    pub fn console_output(mut self, out: Box<dyn Write + Send>) -> Self {
        self.console = Some(out);
        self
    }

    /// Default output cap for `exec` (64 MiB).
    pub fn output_limit(mut self, bytes: usize) -> Self {
        self.output_limit = Some(bytes);
        self
    }

    /// The kernel command line `build` would give the guest (the agent's
    /// vsock device included), without booting anything. Fails as `build`
    /// would on the same configuration.
    pub fn kernel_cmdline(&self) -> Result<String> {
        if let Some(dir) = &self.config.restore_from {
            let saved = crate::snapshot::saved_config(dir).map_err(crate::Error::from)?;
            return Ok(crate::vmm::kernel_cmdline(&saved)?);
        }
        // The socket's path never reaches the guest.
        let config = self.vm_config(PathBuf::from("vsock.sock"))?;
        Ok(crate::vmm::kernel_cmdline(&config)?)
    }

    /// How long `build` waits for the agent (`None`: until it connects or
    /// the VM ends). With a VM timeout and no boot timeout, the VM's own
    /// timeout ends the wait (reported as the VM's outcome).
    fn agent_wait_limit(&self) -> Option<Duration> {
        match (self.config.boot_timeout, self.config.timeout) {
            (Some(b), _) => Some(b),
            (None, Some(t)) => Some(t + Duration::from_secs(5)),
            (None, None) if self.no_default_boot_timeout => None,
            (None, None) => Some(DEFAULT_BOOT_TIMEOUT),
        }
    }

    /// The VM a sandbox boots: the caller's config plus the agent's vsock
    /// device (on `socket`) and port.
    pub(crate) fn vm_config(&self, socket: PathBuf) -> Result<VmConfig> {
        self.vm_config_and_identity(socket)
            .map(|(config, _)| config)
    }

    /// [`vm_config`](Self::vm_config), and the identity the guest's agent
    /// takes before the first command (see `VmConfig::guest_identity`).
    fn vm_config_and_identity(&self, socket: PathBuf) -> Result<(VmConfig, Identity)> {
        if self.config.kernel.as_os_str().is_empty() && self.config.restore_from.is_none() {
            return Err(SandboxError::Config(
                "no kernel given (.kernel(path))".into(),
            ));
        }
        if self.config.vsock.is_some() || self.config.agent_port.is_some() {
            return Err(SandboxError::Config(
                "the sandbox adds its own vsock device and agent port; the config must have neither"
                    .into(),
            ));
        }
        let mut identity = self.config.guest_identity(None);
        if let Some(dir) = &self.config.restore_from {
            // Only the host side may be set: the rest is the snapshot's.
            let host_side = VmConfig {
                hostname: self.config.hostname.clone(),
                nets: self.config.nets.clone(),
                restore_from: self.config.restore_from.clone(),
                timeout: self.config.timeout,
                boot_timeout: self.config.boot_timeout,
                verbose: self.config.verbose,
                seccomp: self.config.seccomp,
                run_as: self.config.run_as,
                scratch_dir: self.config.scratch_dir.clone(),
                command: self.config.command.clone(),
                ..VmConfig::default()
            };
            if host_side != self.config {
                return Err(SandboxError::Config(
                    "from_snapshot: the snapshot fixes the kernel, memory, vCPUs, devices, root and command line; set only timeouts, seccomp, isolation, output, hostname and nets".into(),
                ));
            }
            let saved = crate::snapshot::saved_config(dir).map_err(crate::Error::from)?;
            let agent = saved.vsock.as_ref().map(|v| v.cid) == Some(GUEST_CID)
                && saved.agent_port == Some(AGENT_PORT);
            if !agent {
                return Err(SandboxError::Config(format!(
                    "snapshot {} has no kiln guest agent to run commands (take one with `kiln snapshot create` or Sandbox::snapshot)",
                    dir.display()
                )));
            }
            let restored = self
                .config
                .restored_from(&saved)
                .map_err(SandboxError::Config)?;
            identity = restored.guest_identity(Some(&saved));
        }
        let mut config = self.config.clone();
        config.vsock = Some(VsockConfig {
            cid: GUEST_CID,
            socket,
        });
        config.agent_port = Some(AGENT_PORT);
        Ok((config, identity))
    }

    /// Boots the VM and waits for its agent. Fails with
    /// [`SandboxError::Config`] for a builder that cannot make a sandbox,
    /// [`SandboxError::Vm`] when kiln cannot build or start the VM,
    /// [`SandboxError::BootFailed`] when the VM ended before the agent
    /// connected and [`SandboxError::BootTimeout`] when the agent took too
    /// long; the VM is stopped in every case.
    pub fn build(mut self) -> Result<Sandbox> {
        let started = Instant::now();
        self.config
            .make_host_paths_absolute()
            .map_err(SandboxError::io("the working directory"))?;
        let dir = TempDir::new()?;
        let socket = dir.path().join("vsock.sock");
        let (config, identity) = self.vm_config_and_identity(socket.clone())?;
        let mut agent_path = socket.into_os_string();
        agent_path.push(format!("_{AGENT_PORT}"));
        fits_a_socket_address(Path::new(&agent_path))
            .map_err(SandboxError::io("binding the agent socket"))?;
        // Listening before boot: the agent connects as soon as it starts.
        let listener = UnixListener::bind(&agent_path)
            .map_err(SandboxError::io("binding the agent socket"))?;
        listener
            .set_nonblocking(true)
            .map_err(SandboxError::io("agent socket"))?;
        let jail = match self.jail_set {
            true => self.jail,
            false => Some(JailConfig::default()),
        };
        // The ids the VM runs as once built: the VM connects to the agent
        // socket, and removes its own, as them.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let owner = match (&self.isolation, jail) {
            (Isolation::Process, Some(j)) if root => Some(Credentials {
                uid: j.uid,
                gid: j.gid,
            }),
            (Isolation::Process, _) => None,
            (Isolation::InProcess, _) => config.run_as,
        };
        if let Some(ids) = owner {
            for path in [dir.path(), Path::new(&agent_path)] {
                std::os::unix::fs::chown(path, Some(ids.uid), Some(ids.gid)).map_err(
                    SandboxError::io("handing the sandbox directory to the jail's ids"),
                )?;
            }
        }

        let limit = self.agent_wait_limit();
        let console = ConsoleRing::new(self.console);
        let io = ConsoleIo {
            output: Box::new(console.clone()),
            input: None,
        };
        let seccomp = config.seccomp;
        let vm = match self.isolation {
            Isolation::InProcess => {
                let (vm, gate) = crate::vmm::spawn_gated(config, io, started)?;
                if let Some(hook) = self.on_vm_started.take() {
                    hook(vm.stopper());
                }
                if let Some(hook) = self.before_guest.take() {
                    if let Err(e) = hook() {
                        drop(gate); // before the VM thread is joined: it waits for it
                        drop(vm);
                        return Err(e.into());
                    }
                }
                gate.open();
                SandboxVm::InProcess(vm)
            }
            Isolation::Process => {
                let binary = self
                    .kiln_binary
                    .take()
                    .or_else(vm_process::find_kiln_binary);
                let binary = binary.ok_or_else(|| {
                    SandboxError::Config(format!(
                        "no kiln binary to run the VM in (set ${}, .kiln_binary(PATH), or .isolation(Isolation::InProcess))",
                        vm_process::KILN_BINARY_ENV
                    ))
                })?;
                preflight(&config)?;
                let spec = VmProcessSpec { config, jail };
                let vm = VmProcess::spawn(&binary, &spec, io.output, seccomp, owner)?;
                if let Some(hook) = self.on_vm_started.take() {
                    hook(vm.stopper());
                }
                if let Some(hook) = self.before_guest.take() {
                    hook()?;
                }
                SandboxVm::Process(vm)
            }
        };
        // No deadline past what an Instant can hold.
        let deadline = limit.and_then(|l| started.checked_add(l));
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(SandboxError::io("accepting the agent")(e)),
            }
            if vm.is_finished() {
                return Err(vm_ended(vm, &console));
            }
            if let (Some(limit), Some(deadline)) = (limit, deadline) {
                if Instant::now() >= deadline {
                    drop(vm);
                    return Err(SandboxError::BootTimeout {
                        timeout: limit,
                        console: console.tail(),
                    });
                }
            }
            // The agent's connection and the VM's end (a stop included) wake
            // this at once; the timer only serves the deadline.
            wait_readable(
                &[listener.as_fd(), vm.finished_fd()],
                deadline.map(|d| d.saturating_duration_since(Instant::now())),
            );
        };
        drop(listener);
        stream
            .set_nonblocking(false)
            .map_err(SandboxError::io("agent socket"))?;
        // The agent greets as it connects: without a deadline, as long as
        // the default boot wait.
        let hello_timeout = deadline
            .map_or(DEFAULT_BOOT_TIMEOUT, |d| {
                d.saturating_duration_since(Instant::now())
            })
            .max(Duration::from_secs(5));
        let mut sandbox = Sandbox::start(
            stream,
            hello_timeout,
            console,
            Some(vm),
            Some(dir),
            seccomp,
            identity,
        )?;
        sandbox.set_output_limit(self.output_limit.unwrap_or(DEFAULT_OUTPUT_LIMIT));
        log::info!("sandbox ready in {:?}", started.elapsed());
        Ok(sandbox)
    }
}

/// Sleeps until one of `fds` is readable or hangs up (a connection
/// waiting on a listener, a VM's end) or `max` has passed (`None`: no
/// limit), and says whether one did: each is seen at once, no poll period.
pub(super) fn wait_readable(fds: &[BorrowedFd<'_>], max: Option<Duration>) -> bool {
    let mut fds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let millis = max.map_or(-1, |max| {
        // Rounded up: a deadline less than 1 ms away is not a busy loop.
        max.as_micros().div_ceil(1000).min(libc::c_int::MAX as u128) as libc::c_int
    });
    // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the
    // duration of the call, and every descriptor stays open (borrowed).
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) > 0 }
}

/// Finds here what the VM process would find wrong first (the
/// configuration, the root, the disks), so that the error keeps its type:
/// a VM process reports only a message ([`crate::Error::VmProcess`]).
fn preflight(config: &VmConfig) -> crate::Result<()> {
    if config.restore_from.is_some() {
        // The snapshot's state was read, and its errors typed, by
        // `vm_config_and_identity`, which made this config from it.
        return Ok(());
    }
    crate::vmm::kernel_cmdline(config)?;
    for disk in &config.disks {
        kiln_devices::virtio::block::DiskImage::open(
            &disk.path,
            disk.read_only,
            disk.id.as_deref(),
        )?;
    }
    Ok(())
}

fn vm_ended(vm: SandboxVm, console: &ConsoleRing) -> SandboxError {
    match vm.wait() {
        Ok(outcome) => SandboxError::BootFailed {
            outcome,
            console: console.tail(),
            output: console.raw(),
        },
        Err(e) => SandboxError::Vm(e),
    }
}

/// The guest console: the last `CONSOLE_KEEP` bytes, optionally copied on.
#[derive(Clone)]
pub(crate) struct ConsoleRing(Arc<Mutex<RingState>>);

/// The kept bytes and where else to copy them.
type RingState = (VecDeque<u8>, Option<Box<dyn Write + Send>>);

impl ConsoleRing {
    pub(crate) fn new(copy: Option<Box<dyn Write + Send>>) -> Self {
        Self(Arc::new(Mutex::new((VecDeque::new(), copy))))
    }

    /// Every byte kept.
    pub(crate) fn raw(&self) -> Vec<u8> {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.0.iter().copied().collect()
    }

    /// The last lines (at most ~2 KiB), for error messages.
    pub(crate) fn tail(&self) -> String {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let bytes: Vec<u8> = g.0.iter().copied().collect();
        let start = bytes.len().saturating_sub(2048);
        String::from_utf8_lossy(&bytes[start..]).replace('\r', "")
    }
}

impl Write for ConsoleRing {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.0.extend(buf);
        let excess = g.0.len().saturating_sub(CONSOLE_KEEP);
        g.0.drain(..excess);
        if let Some(out) = &mut g.1 {
            let _ = out.write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A Unix socket's path holds at most 107 bytes: a longer one is refused
/// naming the setting that makes it long, not with the kernel's bare EINVAL.
fn fits_a_socket_address(path: &Path) -> io::Result<()> {
    const SOCKET_PATH_MAX: usize = 107;
    let len = path.as_os_str().len();
    match len <= SOCKET_PATH_MAX {
        true => Ok(()),
        false => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is {len} bytes, over the {SOCKET_PATH_MAX} a Unix socket's path takes: \
                 set TMPDIR to a shorter directory",
                path.display()
            ),
        )),
    }
}

/// A private (0700) directory for the VM's sockets, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        // Short: the agent's socket path inside must fit a sockaddr_un.
        let path = std::env::temp_dir().join(format!("kiln-{}-{n}-{nanos:x}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(SandboxError::io("creating the sandbox directory"))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sandbox from a snapshot takes host-side options only: a guest
    /// option would be silently ignored otherwise.
    #[test]
    fn from_snapshot_refuses_guest_options() {
        let socket = PathBuf::from("/d/vsock.sock");
        let with = |b: SandboxBuilder| {
            b.from_snapshot("/no/such/snapshot")
                .vm_config(socket.clone())
        };
        for (i, builder) in [
            Sandbox::builder().memory(512 << 20),
            Sandbox::builder().vcpus(2),
            Sandbox::builder().kernel("vmlinux"),
            Sandbox::builder().rootfs("root"),
            Sandbox::builder().rng(true),
        ]
        .into_iter()
        .enumerate()
        {
            match with(builder) {
                Err(SandboxError::Config(m)) => assert!(m.contains("snapshot fixes"), "{m}"),
                other => panic!("builder {i}: {other:?}"),
            }
        }
        // Host-side options and the copy's identity pass this check (and
        // then find no snapshot).
        let host_side = Sandbox::builder()
            .timeout(Duration::from_secs(5))
            .seccomp(SeccompMode::Log)
            .verbose(true)
            .hostname("copy")
            .net("tap=c0,mac=02:00:00:00:00:0a".parse().unwrap());
        match with(host_side) {
            Err(SandboxError::Vm(crate::Error::Snapshot(e))) => {
                assert!(e.to_string().contains("/no/such/snapshot"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_socket_path_too_long_names_tmpdir() {
        let fits = PathBuf::from(format!("/{}", "a".repeat(106)));
        assert!(fits_a_socket_address(&fits).is_ok());
        let long = PathBuf::from(format!("/{}", "a".repeat(107)));
        let e = fits_a_socket_address(&long).unwrap_err().to_string();
        assert!(e.contains("108 bytes") && e.contains("set TMPDIR"), "{e}");
        let e = SandboxError::io("binding the agent socket")(io::Error::other(e)).to_string();
        assert_eq!(e.lines().count(), 1, "{e}");
    }

    /// A writer whose bytes the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// README: the console is kept in a bounded ring (64 KiB), whatever the
    /// guest prints; the copy (`.console_output(w)`) still gets every byte.
    #[test]
    fn the_console_ring_keeps_the_last_64_kib() {
        let copy = Shared::default();
        let mut ring = ConsoleRing::new(Some(Box::new(copy.clone())));
        // 200 KiB in writes of odd sizes, some larger than the ring.
        let all: Vec<u8> = (0..200u32 << 10).map(|i| b'!' + (i % 90) as u8).collect();
        let mut at = 0;
        for size in [1, 4095, 70_000, 3, 65_536, 1000].iter().cycle() {
            let end = (at + size).min(all.len());
            ring.write_all(&all[at..end]).unwrap();
            at = end;
            if at == all.len() {
                break;
            }
            assert!(ring.raw().len() <= 64 << 10, "the ring grew past 64 KiB");
        }
        assert_eq!(ring.raw(), &all[all.len() - (64 << 10)..]);
        assert_eq!(*copy.0.lock().unwrap(), all, "the copy gets every byte");
        assert_eq!(ring.tail().as_bytes(), &all[all.len() - 2048..]);
        // The console is shared: a clone sees the same bytes.
        assert_eq!(ring.clone().raw().len(), 64 << 10);
    }

    /// README: the wait for the agent is `.boot_timeout(d)`, else the VM's
    /// timeout (plus 5 s: the VM's end reports first), else 300 s; `kiln
    /// run` has no default (`None`: no limit).
    #[test]
    fn the_agent_wait_is_the_boot_timeout_else_the_vm_timeout_else_300_s() {
        let builder = || SandboxBuilder::default().kernel("vmlinux");
        let secs = Duration::from_secs;
        assert_eq!(builder().agent_wait_limit(), Some(secs(300)));
        assert_eq!(
            builder().timeout(secs(10)).agent_wait_limit(),
            Some(secs(15))
        );
        let both = builder().timeout(secs(10)).boot_timeout(secs(600));
        assert_eq!(both.agent_wait_limit(), Some(secs(600)));
        let cli = || builder().without_default_boot_timeout();
        assert_eq!(cli().agent_wait_limit(), None);
        assert_eq!(cli().timeout(secs(10)).agent_wait_limit(), Some(secs(15)));
        assert_eq!(
            cli().boot_timeout(secs(1)).agent_wait_limit(),
            Some(secs(1))
        );
    }

    /// README: `.console_kind(..)` on the builder picks the guest's console:
    /// with `Virtio` the VM gets one more virtio device and the kernel's
    /// console is hvc0 (no boot: the line `build` would use).
    #[test]
    fn console_kind_reaches_the_vm() {
        let line = |kind| {
            let builder = SandboxBuilder::default().kernel("vmlinux");
            builder.console_kind(kind).kernel_cmdline().unwrap()
        };
        let devices = |line: &str| line.matches(" virtio_mmio.device=").count();
        let (serial, virtio) = (line(ConsoleKind::Serial), line(ConsoleKind::Virtio));
        assert!(serial.starts_with("console=ttyS0 "), "{serial}");
        assert!(!serial.contains("console=hvc0"), "{serial}");
        assert!(virtio.ends_with(" console=hvc0"), "{virtio}");
        assert_eq!(devices(&virtio), devices(&serial) + 1, "{virtio}");
    }
}
