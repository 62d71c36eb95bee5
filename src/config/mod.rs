//! What a VM run is made of: [`VmConfig`], plain data that every front end
//! (`kiln run`, the sandbox API, later a JSON file or a snapshot) produces
//! and the VM assembly reads; the device option strings; and the parsing of
//! human-friendly sizes and durations shared by the CLI and the library.

pub(crate) mod option_parser;

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use kiln_init::protocol::{Identity, MacChange};
use kiln_init::spec::ExecSpec;
use serde::{Deserialize, Serialize};

use option_parser::{OptionSyntax, Options};

pub use kiln_devices::rate_limiter::RateLimit;

/// The command kiln's init runs when none is given.
pub const DEFAULT_COMMAND: &str = "/bin/sh";

/// Default guest memory: 256 MiB.
pub const DEFAULT_MEM_BYTES: u64 = 256 << 20;

/// Everything needed to boot one VM and run one command in it.
///
/// Plain data: build it with [`VmConfig::new`] and set fields, or read it
/// with serde (unknown fields are refused, missing ones take the
/// [`Default`]). Nothing is checked until it is used:
/// [`run`](crate::run), [`spawn`](crate::spawn) and
/// [`kernel_cmdline`](crate::kernel_cmdline) refuse a bad value with
/// [`Error::Config`](crate::Error::Config) or the error of the part at
/// fault, before the guest starts.
///
/// ```
/// use kiln::config::{DiskConfig, VmConfig};
///
/// let mut config = VmConfig::new("target/guest/vmlinux");
/// config.mem_bytes = 512 << 20;
/// config.disks.push("data.img,ro,id=data".parse::<DiskConfig>()?); // as `--disk` takes it
///
/// // The same value as JSON (e.g. serde_json), fields left out take the defaults.
/// let json = r#"{"kernel": "target/guest/vmlinux", "mem_bytes": 536870912,
///                "disks": [{"path": "data.img", "read_only": true, "id": "data"}]}"#;
/// assert_eq!(serde_json::from_str::<VmConfig>(json)?, config);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmConfig {
    /// ELF vmlinux (PVH entry used when present) or bzImage.
    pub kernel: PathBuf,
    /// A user initramfs; kiln's init is appended to it as a second archive.
    pub initrd: Option<PathBuf>,
    /// The root file system, told apart by content (the README's "Root file
    /// systems"): a directory or tar archive (plain or gzip) packed into the
    /// initramfs next to kiln's init, or an ext2/3/4 image attached (copy-on-
    /// write: the original is only read) as the first disk and switched to. A directory or archive root lives in guest RAM and is
    /// refused if it does not fit.
    pub rootfs: Option<PathBuf>,
    /// Share the directory `rootfs` with the guest (virtio-fs, a virtiofsd
    /// kiln starts) instead of packing it: kiln's init mounts the share and
    /// switches root into it, so nothing is copied and start-up does not
    /// grow with the root's size (`--rootfs DIR,share[,rw]`).
    pub rootfs_share: Option<RootShare>,
    /// Where the overlay of an image `rootfs` goes: an unnamed sparse file
    /// holding what the guest writes, as large as the image at most.
    /// Default: the image's own directory (a disk that already holds the
    /// image), else the temporary directory (`$TMPDIR`, else `/tmp`, often
    /// RAM) when the image's directory takes no new file, else memory.
    pub scratch_dir: Option<PathBuf>,
    /// Appended to kiln's default kernel command line.
    pub extra_cmdline: Option<String>,
    /// Guest RAM in bytes (default 256 MiB): at least 16 MiB, a multiple of
    /// 4 KiB and at most the host's RAM. Mapped up front, backed by host
    /// memory only as the guest touches it.
    pub mem_bytes: u64,
    /// Number of vCPUs (default 1), each a host thread: at least 1, at most
    /// what kiln's MP table holds and the host's KVM allows.
    pub vcpus: u8,
    /// Wall-clock limit for the whole VM.
    pub timeout: Option<Duration>,
    /// How long a sandbox (and `kiln run`'s agent path) waits for kiln's
    /// guest agent to connect; it stops the VM when the limit passes. Only
    /// for a VM with the agent (`agent_port`): a VM without it refuses the
    /// setting. Default: see
    /// [`SandboxBuilder::boot_timeout`](crate::sandbox::SandboxBuilder::boot_timeout).
    pub boot_timeout: Option<Duration>,
    /// What kiln's init runs when there is no agent (`agent_port` unset).
    pub command: GuestCommand,
    /// Show the guest kernel's log on the console.
    pub verbose: bool,
    /// Enter a vmlinux through its PVH note when it has one (the fast path).
    pub use_pvh: bool,
    /// Which device is the guest's console.
    pub console: ConsoleKind,
    /// A virtio-vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// virtio-blk disks, in guest order (the first is vda, or vdb after an
    /// image root).
    pub disks: Vec<DiskConfig>,
    /// Attach a virtio-rng device.
    pub rng: bool,
    /// The virtio-rng device's rate limit (default: none).
    pub rng_rate_limit: RateLimit,
    /// virtio-net devices, in guest order (eth0 first).
    pub nets: Vec<NetConfig>,
    /// Host directories the guest sees live (virtio-fs, each served by a
    /// virtiofsd that kiln starts), mounted by kiln's init before the
    /// command runs.
    pub shares: Vec<ShareConfig>,
    /// tmpfs mounts in the guest, made by kiln's init after the shares
    /// before the command runs.
    #[serde(default)]
    pub tmpfs: Vec<TmpfsConfig>,
    /// The virtiofsd program for `shares`; default: `$KILN_VIRTIOFSD`, else
    /// the one `resources/setup.sh` installed, else `virtiofsd` on PATH.
    pub virtiofsd: Option<PathBuf>,
    /// The shares' daemons, when a front end started them before it
    /// entered its jail (`kiln run`); otherwise the VM starts them itself.
    #[serde(skip)]
    pub(crate) share_daemons: crate::share::StartedShares,
    /// Run kiln's guest agent instead of `command`: it connects to this host
    /// vsock port (needs `vsock`) and serves the sandbox protocol.
    pub agent_port: Option<u32>,
    /// The seccomp filters on the threads kiln creates for this VM (on by
    /// default; see [`SeccompMode`]).
    pub seccomp: SeccompMode,
    /// Once the VM is built (its files, devices and sockets open) and before
    /// the guest runs, the whole process takes these ids, every thread
    /// included, and so loses root and its capabilities. For a process that
    /// runs one VM and nothing else: `kiln run`'s jail sets it (see
    /// `kiln::jail`); an embedder's own threads would change too.
    pub run_as: Option<Credentials>,
    /// The guest's hostname (see `kiln_init::spec::valid_hostname`);
    /// default: `kiln`. Set by kiln's init before the command runs, and
    /// after a restore by its agent: a copy given none keeps its
    /// snapshot's.
    pub hostname: Option<String>,
    /// Start from the snapshot in this directory (`kiln snapshot create`)
    /// instead of booting. The snapshot gives everything the guest sees:
    /// memory size, vCPUs, devices, kernel command line, root; this config
    /// gives only the host side (see `restored_from`): the vsock socket,
    /// seccomp, jail ids, timeouts, log level, and the copy's own identity:
    /// `hostname`, and `nets` to move the snapshot's network cards to other
    /// TAPs (one each, in order), with new MACs where given. The directory
    /// is only read.
    pub restore_from: Option<PathBuf>,
}

/// How a shared root directory (`VmConfig::rootfs_share`) takes the
/// guest's writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RootShare {
    /// The host directory is shared read-only (virtiofsd `--readonly`);
    /// the guest writes to a RAM overlay (overlayfs on tmpfs) that ends
    /// with the VM, as with a packed root (`--rootfs DIR,share`).
    Overlay,
    /// The guest's writes go to the host directory (`--rootfs DIR,share,rw`).
    Writable,
}

/// `--rootfs`: `PATH`, or a directory to share, `DIR,share[,rw]`. A path
/// holding a comma is a plain path unless one of its comma-separated
/// parts is `share`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootfsArg {
    /// The root (a directory, tar archive or ext2/3/4 image).
    pub path: PathBuf,
    /// Shared rather than packed.
    pub share: Option<RootShare>,
}

impl FromStr for RootfsArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let Some((path, options)) = text
            .match_indices(",share")
            .map(|(i, _)| (&text[..i], &text[i + 1..]))
            .find(|(_, rest)| rest.split(',').next() == Some("share"))
        else {
            return Ok(RootfsArg {
                path: text.into(),
                share: None,
            });
        };
        if path.is_empty() {
            return Err("empty directory (expected DIR,share[,rw])".into());
        }
        let share = match options {
            "share" => RootShare::Overlay,
            "share,rw" => RootShare::Writable,
            _ => {
                return Err(format!(
                "'{options}': a shared root takes 'share' or 'share,rw' (expected DIR,share[,rw])"
            ))
            }
        };
        Ok(RootfsArg {
            path: path.into(),
            share: Some(share),
        })
    }
}

/// A uid and gid to run as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// The user id (never 0).
    pub uid: u32,
    /// The group id (never 0); supplementary groups are dropped.
    pub gid: u32,
}

impl Default for VmConfig {
    /// No kernel yet; 256 MiB, one vCPU, serial console, no devices.
    fn default() -> Self {
        Self {
            kernel: PathBuf::new(),
            initrd: None,
            rootfs: None,
            rootfs_share: None,
            scratch_dir: None,
            extra_cmdline: None,
            mem_bytes: DEFAULT_MEM_BYTES,
            vcpus: 1,
            timeout: None,
            boot_timeout: None,
            command: GuestCommand::default(),
            verbose: false,
            use_pvh: true,
            console: ConsoleKind::Serial,
            vsock: None,
            disks: Vec::new(),
            rng: false,
            rng_rate_limit: RateLimit::default(),
            nets: Vec::new(),
            shares: Vec::new(),
            tmpfs: Vec::new(),
            virtiofsd: None,
            share_daemons: Default::default(),
            agent_port: None,
            seccomp: SeccompMode::On,
            run_as: None,
            hostname: None,
            restore_from: None,
        }
    }
}

impl VmConfig {
    /// Makes the host files this config names absolute (against the
    /// working directory): a snapshot saves the config and is restored from
    /// anywhere, and the jail shows each file at its own path. The vsock
    /// socket is left as given (its length is limited, and it is never
    /// saved for another run), and so is `virtiofsd` (a bare name is looked
    /// up on PATH).
    pub(crate) fn make_host_paths_absolute(&mut self) -> std::io::Result<()> {
        let absolute = |path: &mut PathBuf| -> std::io::Result<()> {
            if !path.as_os_str().is_empty() {
                *path = std::path::absolute(&*path)?;
            }
            Ok(())
        };
        absolute(&mut self.kernel)?;
        for path in [
            &mut self.initrd,
            &mut self.rootfs,
            &mut self.scratch_dir,
            &mut self.restore_from,
        ]
        .into_iter()
        .flatten()
        {
            absolute(path)?;
        }
        for disk in &mut self.disks {
            absolute(&mut disk.path)?;
        }
        for share in &mut self.shares {
            absolute(&mut share.host_dir)?;
        }
        Ok(())
    }

    /// The defaults with this kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            ..Self::default()
        }
    }

    /// The configuration of a VM restored from a snapshot saved with
    /// `saved`, asked for with `self`: the guest-visible options are the
    /// snapshot's (they are in its memory), the host-side ones are `self`'s:
    /// the vsock device's socket (its CID stays), seccomp, jail ids, timeouts
    /// and log level; `self`'s hostname, else the snapshot's. Disks are
    /// reopened by the names in `saved`, TAPs too unless `self` has `nets`:
    /// then card i moves to `self`'s TAP i (and its rate limit), with
    /// `self`'s MAC when it gives one. Every card's MAC is written out
    /// (`mac` set): the config says what the guest's driver has. Fails with
    /// a one-line reason when `self` has another number of cards.
    pub(crate) fn restored_from(&self, saved: &VmConfig) -> Result<VmConfig, String> {
        let mut config = saved.clone();
        if !self.nets.is_empty() && self.nets.len() != saved.nets.len() {
            return Err(format!(
                "--net: the snapshot has {} network card(s), {} given (with --from, one --net per card, in order)",
                saved.nets.len(),
                self.nets.len()
            ));
        }
        for (i, net) in config.nets.iter_mut().enumerate() {
            let mac = net.guest_mac();
            if let Some(ours) = self.nets.get(i) {
                *net = ours.clone();
            }
            net.mac = Some(net.mac.unwrap_or(mac));
        }
        if self.hostname.is_some() {
            config.hostname = self.hostname.clone();
        }
        if let (Some(vsock), Some(ours)) = (config.vsock.as_mut(), self.vsock.as_ref()) {
            vsock.socket = ours.socket.clone();
        }
        config.timeout = self.timeout;
        config.boot_timeout = self.boot_timeout;
        config.verbose = self.verbose;
        config.seccomp = self.seccomp;
        config.run_as = self.run_as;
        config.scratch_dir = self.scratch_dir.clone();
        config.command = self.command.clone();
        config.restore_from = self.restore_from.clone();
        Ok(config)
    }

    /// What the guest agent of this VM takes as the guest's own before any
    /// command runs (the `FRESH` frame): the hostname, and for a VM
    /// restored from a snapshot saved with `saved` (its config as
    /// `restored_from` made it) a new machine id and the MACs of the cards
    /// that changed.
    pub(crate) fn guest_identity(&self, saved: Option<&VmConfig>) -> Identity {
        let macs = saved.map_or_else(Vec::new, |saved| {
            saved
                .nets
                .iter()
                .zip(&self.nets)
                .map(|(before, now)| MacChange {
                    from: before.guest_mac(),
                    to: now.guest_mac(),
                })
                .filter(|change| change.from != change.to)
                .collect()
        });
        Identity {
            hostname: self.hostname.as_ref().map(|h| h.as_bytes().to_vec()),
            new_machine_id: saved.is_some(),
            macs,
        }
    }

    /// The user's own init when the guest is a user initrd started by it
    /// (`--initrd` with `--cmdline rdinit=PATH`, no `--rootfs`): kiln's init
    /// and agent then never run, so kiln adds neither.
    pub(crate) fn own_init(&self) -> Option<&str> {
        if self.initrd.is_none() || self.rootfs.is_some() {
            return None;
        }
        crate::boot::cmdline::user_rdinit(self.extra_cmdline.as_deref())
    }
}

/// The command kiln's init runs in a VM without the agent, and how.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuestCommand {
    /// Program and arguments, byte for byte; empty means [`DEFAULT_COMMAND`].
    pub argv: Vec<OsString>,
    /// Environment variables set for it (on top of init's defaults).
    pub env: Vec<(String, String)>,
    /// Its working directory in the guest.
    pub workdir: Option<String>,
    /// The user it runs as (0 is root); default: unprivileged, 65534
    /// (`kiln_init::spec::DEFAULT_IDS`).
    pub uid: Option<u32>,
    /// The group it runs as; default: the uid's number when `uid` is
    /// given, else 65534.
    pub gid: Option<u32>,
}

impl GuestCommand {
    /// The argv kiln's init runs: `argv`, or [`DEFAULT_COMMAND`].
    pub fn argv_or_default(&self) -> Vec<OsString> {
        match self.argv.is_empty() {
            true => vec![DEFAULT_COMMAND.into()],
            false => self.argv.clone(),
        }
    }

    /// Whether anything besides the program was asked for.
    pub(crate) fn has_options(&self) -> bool {
        !self.env.is_empty() || self.workdir.is_some() || self.uid.is_some() || self.gid.is_some()
    }

    /// The exec spec kiln's init (or its agent) runs; a variable given twice
    /// keeps its last value.
    pub(crate) fn to_exec_spec(&self) -> ExecSpec {
        let mut spec = ExecSpec::new(self.argv_or_default().iter().map(|a| a.as_bytes()));
        for (key, value) in &self.env {
            spec.env.retain(|(k, _)| k != key.as_bytes());
            spec.env
                .push((key.as_bytes().to_vec(), value.as_bytes().to_vec()));
        }
        spec.cwd = self.workdir.as_ref().map(|w| w.as_bytes().to_vec());
        spec.uid = self.uid;
        spec.gid = self.gid;
        spec
    }
}

/// One `--disk PATH[,ro][,id=NAME][,bw=SIZE][,iops=N]...`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// A raw image file (or block device), at most one writer at a time:
    /// kiln locks it (shared when read-only, exclusive otherwise).
    pub path: PathBuf,
    /// Open the image read-only; the guest sees a read-only disk.
    pub read_only: bool,
    /// Serial number the guest sees (at most 20 bytes); default: the file name.
    pub id: Option<String>,
    /// Bytes read or written and requests per second (default: no limit).
    #[serde(default)]
    pub rate_limit: RateLimit,
}

/// Longest disk id virtio-blk can report.
pub const DISK_ID_MAX: usize = 20;

static DISK_SYNTAX: OptionSyntax = OptionSyntax {
    usage: "PATH[,ro][,id=NAME][,bw=SIZE][,bw_burst=SIZE][,iops=N][,iops_burst=N]",
    leading_value: true,
    values: &["id", "bw", "bw_burst", "iops", "iops_burst"],
    flags: &["ro"],
};

/// The option keys of a rate limit: bytes per second and its one-time
/// burst (sizes, K/M/G suffixes), operations per second and its burst.
struct RateKeys {
    bytes: &'static str,
    bytes_burst: &'static str,
    ops: &'static str,
    ops_burst: &'static str,
}

const DISK_RATE_KEYS: RateKeys = RateKeys {
    bytes: "bw",
    bytes_burst: "bw_burst",
    ops: "iops",
    ops_burst: "iops_burst",
};

/// Reads a rate limit from `options`: every value a positive number, a
/// burst only with its rate.
fn parse_rate_limit(options: &Options<'_>, keys: &RateKeys) -> Result<RateLimit, String> {
    let size = |key: &str| -> Result<Option<u64>, String> {
        let Some(text) = options.value(key) else {
            return Ok(None);
        };
        match parse_size(text).map_err(|e| format!("{key}: {e}"))? {
            0 => Err(format!(
                "{key} must be at least 1 (leave it out for no limit)"
            )),
            n => Ok(Some(n)),
        }
    };
    let count = |key: &str| -> Result<Option<u64>, String> {
        let Some(text) = options.value(key) else {
            return Ok(None);
        };
        match text.trim().parse::<u64>() {
            Ok(0) => Err(format!(
                "{key} must be at least 1 (leave it out for no limit)"
            )),
            Ok(n) => Ok(Some(n)),
            Err(_) => Err(format!("{key}: '{text}' is not a whole number")),
        }
    };
    let limit = RateLimit {
        bytes_per_sec: size(keys.bytes)?,
        ops_per_sec: count(keys.ops)?,
        bytes_burst: size(keys.bytes_burst)?.unwrap_or(0),
        ops_burst: count(keys.ops_burst)?.unwrap_or(0),
    };
    for (burst, rate, set) in [
        (keys.bytes_burst, keys.bytes, limit.bytes_per_sec.is_some()),
        (keys.ops_burst, keys.ops, limit.ops_per_sec.is_some()),
    ] {
        if options.value(burst).is_some() && !set {
            return Err(format!(
                "{burst} needs {rate} (a burst is on top of a rate)"
            ));
        }
    }
    Ok(limit)
}

static RNG_SYNTAX: OptionSyntax = OptionSyntax {
    usage: "[bw=SIZE][,bw_burst=SIZE][,ops=N][,ops_burst=N]",
    leading_value: false,
    values: &["bw", "bw_burst", "ops", "ops_burst"],
    flags: &[],
};

/// Parses the virtio-rng options of `--rng[=bw=SIZE,ops=N,...]`: empty for
/// no limit.
pub fn parse_rng_rate_limit(text: &str) -> Result<RateLimit, String> {
    if text.trim().is_empty() {
        return Ok(RateLimit::default());
    }
    let keys = RateKeys {
        bytes: "bw",
        bytes_burst: "bw_burst",
        ops: "ops",
        ops_burst: "ops_burst",
    };
    parse_rate_limit(&RNG_SYNTAX.parse(text)?, &keys)
}

/// Parses `PATH[,ro][,id=NAME][,bw=SIZE][,iops=N]...` (options in any order;
/// PATH cannot contain ',').
impl FromStr for DiskConfig {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let options = DISK_SYNTAX.parse(text)?;
        let id = match options.value("id") {
            None => None,
            Some(id) if id.is_empty() || id.len() > DISK_ID_MAX => {
                return Err("id must be 1 to 20 bytes".to_string())
            }
            Some(id) if !id.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err("id must be printable ASCII without spaces".to_string())
            }
            Some(id) => Some(id.to_string()),
        };
        Ok(DiskConfig {
            path: PathBuf::from(options.leading()),
            read_only: options.flag("ro"),
            id,
            rate_limit: parse_rate_limit(&options, &DISK_RATE_KEYS)?,
        })
    }
}

/// A virtio-net device on a host TAP interface: `tap=NAME[,mac=MAC][,bw=SIZE][,pps=N]...`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The TAP interface (in kiln's network namespace). A name that does not
    /// exist is created (needs CAP_NET_ADMIN) and vanishes when kiln exits.
    pub tap: String,
    /// The guest's MAC address; None derives a stable, locally administered
    /// one from the TAP name.
    pub mac: Option<[u8; 6]>,
    /// Frame bytes and frames per second, each direction on its own
    /// (default: no limit).
    #[serde(default)]
    pub rate_limit: RateLimit,
}

static NET_SYNTAX: OptionSyntax = OptionSyntax {
    usage: "tap=NAME[,mac=MAC][,bw=SIZE][,bw_burst=SIZE][,pps=N][,pps_burst=N]",
    leading_value: false,
    values: &["tap", "mac", "bw", "bw_burst", "pps", "pps_burst"],
    flags: &[],
};

const NET_RATE_KEYS: RateKeys = RateKeys {
    bytes: "bw",
    bytes_burst: "bw_burst",
    ops: "pps",
    ops_burst: "pps_burst",
};

impl NetConfig {
    /// The MAC address the guest's card has: `mac`, else the one derived
    /// from the TAP's name.
    pub fn guest_mac(&self) -> [u8; 6] {
        self.mac
            .unwrap_or_else(|| kiln_devices::virtio::net::MacAddr::derived(&self.tap).0)
    }
}

/// Checks a `--hostname` (see `kiln_init::spec::valid_hostname`).
pub fn parse_hostname(text: &str) -> Result<String, String> {
    match kiln_init::spec::valid_hostname(text.as_bytes()) {
        true => Ok(text.to_string()),
        false => Err(format!(
            "'{text}' is not a hostname (1 to {} letters, digits, '-' or '.', not first)",
            kiln_init::spec::HOSTNAME_MAX
        )),
    }
}

/// Parses `tap=NAME[,mac=MAC][,bw=SIZE][,pps=N]...`.
impl FromStr for NetConfig {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let options = NET_SYNTAX.parse(text)?;
        let tap = options.required("tap")?;
        kiln_devices::tap::validate_ifname(tap).map_err(|e| e.to_string())?;
        let mac = options
            .value("mac")
            .map(|m| kiln_devices::virtio::net::MacAddr::parse(m).map(|m| m.0))
            .transpose()?;
        Ok(NetConfig {
            tap: tap.to_string(),
            mac,
            rate_limit: parse_rate_limit(&options, &NET_RATE_KEYS)?,
        })
    }
}

/// A host directory shared with the guest:
/// `HOST_DIR:GUEST_PATH[,ro][,cache=auto|always|never]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareConfig {
    /// The host directory (it must exist).
    pub host_dir: PathBuf,
    /// Where the guest sees it: an absolute path other than `/`, printable
    /// ASCII without spaces (it travels on the kernel command line).
    pub guest_path: String,
    /// Read-only for the guest, enforced on the host side too (virtiofsd
    /// `--readonly`), not only by the guest's mount flag.
    #[serde(default)]
    pub read_only: bool,
    /// How long the guest may cache what it read (virtiofsd `--cache`).
    #[serde(default)]
    pub cache: ShareCache,
}

/// virtiofsd's caching policy for a share.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShareCache {
    /// Cache for a short time (virtiofsd's default).
    #[default]
    Auto,
    /// Cache as long as the guest likes: for directories only the guest changes.
    Always,
    /// No caching: every access asks the host (changes on the host show at once).
    Never,
}

impl ShareCache {
    /// virtiofsd's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            ShareCache::Auto => "auto",
            ShareCache::Always => "always",
            ShareCache::Never => "never",
        }
    }
}

static SHARE_SYNTAX: OptionSyntax = OptionSyntax {
    usage: "HOST_DIR:GUEST_PATH[,ro][,cache=auto|always|never]",
    leading_value: true,
    values: &["cache"],
    flags: &["ro"],
};

/// Parses `HOST_DIR:GUEST_PATH[,ro][,cache=auto|always|never]` (the last
/// ':' splits the two paths; neither can contain ',').
impl FromStr for ShareConfig {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let options = SHARE_SYNTAX.parse(text)?;
        let Some((host_dir, guest_path)) = options.leading().rsplit_once(':') else {
            return Err(format!(
                "'{}' needs HOST_DIR:GUEST_PATH (expected {})",
                options.leading(),
                SHARE_SYNTAX.usage
            ));
        };
        if host_dir.is_empty() {
            return Err(format!(
                "empty host directory (expected {})",
                SHARE_SYNTAX.usage
            ));
        }
        validate_guest_path(guest_path)?;
        let cache = match options.value("cache") {
            None | Some("auto") => ShareCache::Auto,
            Some("always") => ShareCache::Always,
            Some("never") => ShareCache::Never,
            Some(other) => {
                return Err(format!(
                    "cache '{other}': the cache is 'auto', 'always' or 'never'"
                ))
            }
        };
        Ok(ShareConfig {
            host_dir: PathBuf::from(host_dir),
            guest_path: guest_path.to_string(),
            read_only: options.flag("ro"),
            cache,
        })
    }
}

/// A tmpfs in the guest, mounted by kiln's init before the command runs
/// (after the shares): `PATH[:OPTIONS]` as `docker run --tmpfs`, OPTIONS
/// the OCI ones, comma-separated: `size=N[k|m|g]`, `mode=OCTAL`, `ro`/`rw`,
/// `nosuid`/`suid`, `nodev`/`dev`, `noexec`/`exec`,
/// `relatime`/`strictatime`/`noatime` (later ones win).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TmpfsConfig {
    /// Where: absolute, printable ASCII without spaces (as a share's).
    pub guest_path: String,
    /// Size limit in bytes (default: half the guest's memory).
    #[serde(default)]
    pub size: Option<u64>,
    /// Permission bits of its root (default 1777).
    #[serde(default)]
    pub mode: Option<u32>,
    /// Mounted read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Set-uid bits ignored.
    #[serde(default)]
    pub nosuid: bool,
    /// Device files not opened.
    #[serde(default)]
    pub nodev: bool,
    /// Programs not run from it.
    #[serde(default)]
    pub noexec: bool,
    /// Access times always updated (else relatime, the kernel's default).
    #[serde(default)]
    pub strictatime: bool,
    /// Access times never updated.
    #[serde(default)]
    pub noatime: bool,
}

impl TmpfsConfig {
    /// A tmpfs at `guest_path` with OCI mount `options`. Mount propagation
    /// options (`rprivate`, ...) mean nothing in a VM of its own and are
    /// accepted; any other unknown option is an error naming it.
    pub fn with_options<S: AsRef<str>>(guest_path: &str, options: &[S]) -> Result<Self, String> {
        validate_guest_path(guest_path)?;
        let mut tmpfs = TmpfsConfig {
            guest_path: guest_path.to_string(),
            ..TmpfsConfig::default()
        };
        for option in options.iter().map(AsRef::as_ref) {
            let bad = |why: &str| format!("tmpfs {guest_path}: option '{option}': {why}");
            match option.split_once('=') {
                Some(("size", size)) => tmpfs.size = Some(parse_tmpfs_size(size).map_err(bad)?),
                Some(("mode", mode)) => {
                    let mode = u32::from_str_radix(mode, 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .ok_or_else(|| bad("an octal mode up to 7777"))?;
                    tmpfs.mode = Some(mode);
                }
                Some(_) => return Err(bad("not a tmpfs option kiln knows")),
                None => match option {
                    "ro" | "rw" => tmpfs.read_only = option == "ro",
                    "nosuid" | "suid" => tmpfs.nosuid = option == "nosuid",
                    "nodev" | "dev" => tmpfs.nodev = option == "nodev",
                    "noexec" | "exec" => tmpfs.noexec = option == "noexec",
                    "strictatime" | "noatime" | "relatime" => {
                        tmpfs.strictatime = option == "strictatime";
                        tmpfs.noatime = option == "noatime";
                    }
                    "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave"
                    | "unbindable" | "runbindable" => {}
                    _ => return Err(bad("not a tmpfs option kiln knows")),
                },
            }
        }
        Ok(tmpfs)
    }

    /// What kiln's init reads from the kernel command line.
    pub(crate) fn cmdline_word(&self) -> String {
        kiln_init::TmpfsMount {
            path: self.guest_path.as_bytes().to_vec(),
            size: self.size,
            mode: self.mode,
            read_only: self.read_only,
            nosuid: self.nosuid,
            nodev: self.nodev,
            noexec: self.noexec,
            strictatime: self.strictatime,
            noatime: self.noatime,
        }
        .word()
    }
}

/// `N`, `Nk`, `Nm` or `Ng` (binary multiples, as tmpfs reads them).
fn parse_tmpfs_size(text: &str) -> Result<u64, &'static str> {
    let why = "a size in bytes, or with k, m or g";
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'k' | 'K')) => (&text[..i], 10),
        Some((i, 'm' | 'M')) => (&text[..i], 20),
        Some((i, 'g' | 'G')) => (&text[..i], 30),
        _ => (text, 0),
    };
    let n: u64 = digits.parse().map_err(|_| why)?;
    n.checked_mul(1 << shift).filter(|n| *n > 0).ok_or(why)
}

/// `PATH[:OPTIONS]` (as `docker run --tmpfs`).
impl FromStr for TmpfsConfig {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (path, options) = text.split_once(':').unwrap_or((text, ""));
        let options: Vec<&str> = options.split(',').filter(|o| !o.is_empty()).collect();
        Self::with_options(path, &options)
    }
}

/// A share's guest path: absolute, not `/`, no `.` or `..` parts,
/// printable ASCII without spaces (it travels on the kernel command line).
pub(crate) fn validate_guest_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.trim_end_matches('/').is_empty() {
        return Err(format!(
            "guest path '{path}' must be an absolute path other than /"
        ));
    }
    if !path.bytes().all(|b| b.is_ascii_graphic() && b != b'"') {
        return Err(format!(
            "guest path '{path}' must be printable ASCII without spaces or quotes"
        ));
    }
    if path.split('/').any(|part| part == "." || part == "..") {
        return Err(format!("guest path '{path}' must not contain . or .."));
    }
    Ok(())
}

/// The guest's console (/dev/console): the UART (ttyS0) or a virtio console
/// (hvc0). The UART is present either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleKind {
    /// The 16550 UART, `ttyS0` (the default): one VM exit per byte.
    #[default]
    Serial,
    /// A virtio console, `hvc0`: far fewer exits for bulk output.
    Virtio,
}

/// Parses `serial` or `virtio`.
impl FromStr for ConsoleKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "serial" => Ok(ConsoleKind::Serial),
            "virtio" => Ok(ConsoleKind::Virtio),
            other => Err(format!("'{other}': the console is 'serial' or 'virtio'")),
        }
    }
}

/// Whether the threads kiln creates run under their seccomp filters (one
/// allow-list of system calls per kind of thread: vCPU, VM thread, console
/// writer, the sandbox's host side, `kiln run`'s own; see the README's
/// "Security").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeccompMode {
    /// Filters on (the default): a system call outside its thread's list
    /// stops kiln at once with a line naming the thread and the call, and
    /// the process dies by SIGSYS.
    #[default]
    On,
    /// Filters on, but a call outside the list is allowed and logged by the
    /// host kernel (`dmesg`: an audit line with the thread's name and the
    /// call's number): for finding what a list lacks.
    Log,
    /// No filters (for debugging): a compromised device model can then make
    /// any system call kiln's process may.
    Off,
}

/// Parses `on`, `off` or `log`.
impl FromStr for SeccompMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "on" => Ok(SeccompMode::On),
            "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            other => Err(format!("'{other}': seccomp is 'on', 'off' or 'log'")),
        }
    }
}

impl std::fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SeccompMode::On => "on",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        })
    }
}

/// A virtio-vsock device: the guest's CID and the host Unix socket that host
/// programs connect to (guest connections to port P go to `socket_P`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context id: 3 to 4294967294 (0-2 are reserved).
    pub cid: u64,
    /// The host Unix socket kiln listens on. A socket already there is
    /// replaced, any other file is refused; the path must leave room for a
    /// `_PORT` suffix within the 107 bytes a socket path may have.
    pub socket: PathBuf,
}

static VSOCK_SYNTAX: OptionSyntax = OptionSyntax {
    usage: "cid=N,socket=PATH",
    leading_value: false,
    values: &["cid", "socket"],
    flags: &[],
};

/// Parses `cid=N,socket=PATH` (either order; N from 3 to 4294967294).
impl FromStr for VsockConfig {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let options = VSOCK_SYNTAX.parse(text)?;
        let (cid, socket) = (options.required("cid")?, options.required("socket")?);
        let cid: u64 = cid
            .trim()
            .parse()
            .map_err(|_| format!("cid '{cid}' is not a number"))?;
        if !(3..=u64::from(u32::MAX) - 1).contains(&cid) {
            return Err(format!(
                "cid {cid} is reserved or too large (use 3 to {})",
                u32::MAX - 1
            ));
        }
        if socket.is_empty() {
            return Err("socket path is empty".into());
        }
        Ok(VsockConfig {
            cid,
            socket: PathBuf::from(socket),
        })
    }
}

/// Parses `256M`, `1G`, `512K`, `1048576` (bytes), case-insensitive, with an
/// optional `iB`/`B` suffix.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 10),
        Some('m') => (&stripped[..stripped.len() - 1], 20),
        Some('g') => (&stripped[..stripped.len() - 1], 30),
        Some('t') => (&stripped[..stripped.len() - 1], 40),
        _ => (stripped, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("'{t}' is not a size (examples: 256M, 1G, 1048576)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{t}' is too large"))
}

/// Parses `30s`, `500ms`, `2m`, `1h`, or plain seconds (`10`, `1.5`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{t}' is not a duration (examples: 30s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("'{t}': unknown unit '{unit}' (use ms, s, m or h)")),
    };
    if !secs.is_finite() || secs <= 0.0 || secs > 1e9 {
        return Err(format!("'{t}' must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Host files become absolute against the working directory; empty
    /// paths (a restore's kernel) and the vsock socket stay as given.
    #[test]
    fn host_paths_become_absolute() {
        let cwd = std::env::current_dir().unwrap();
        let mut c = VmConfig {
            rootfs: Some("root".into()),
            initrd: Some("/abs/initrd".into()),
            restore_from: Some("snap".into()),
            disks: vec!["d.img,ro".parse().unwrap()],
            shares: vec!["srv:/mnt".parse().unwrap()],
            vsock: Some("cid=3,socket=v.sock".parse().unwrap()),
            ..VmConfig::default()
        };
        c.make_host_paths_absolute().unwrap();
        assert_eq!(c.kernel, PathBuf::new());
        assert_eq!(c.rootfs, Some(cwd.join("root")));
        assert_eq!(c.initrd, Some(PathBuf::from("/abs/initrd")));
        assert_eq!(c.restore_from, Some(cwd.join("snap")));
        assert_eq!(c.disks[0].path, cwd.join("d.img"));
        assert_eq!(c.shares[0].host_dir, cwd.join("srv"));
        assert_eq!(c.vsock.unwrap().socket, PathBuf::from("v.sock"));
    }
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn own_init_needs_an_initrd_its_rdinit_and_no_rootfs() {
        let mut c = VmConfig::new("k");
        c.extra_cmdline = Some("rdinit=/init".into());
        assert_eq!(c.own_init(), None, "no initrd: kiln's initramfs");
        c.initrd = Some("i.cpio".into());
        assert_eq!(c.own_init(), Some("/init"));
        c.rootfs = Some("root".into());
        assert_eq!(c.own_init(), None, "a rootfs is packed with kiln's init");
        c.rootfs = None;
        c.extra_cmdline = Some("quiet".into());
        assert_eq!(c.own_init(), None);
    }

    /// The same value can be written out (a snapshot, a JSON file) and read
    /// back whole.
    #[test]
    fn a_config_round_trips_through_json() {
        let mut c = VmConfig::new("/k/vmlinux");
        c.initrd = Some("i.cpio".into());
        c.rootfs = Some("root.tar".into());
        c.extra_cmdline = Some("ip=dhcp".into());
        c.mem_bytes = 1 << 30;
        c.vcpus = 2;
        c.timeout = Some(Duration::from_millis(1500));
        c.boot_timeout = Some(Duration::from_secs(600));
        c.command = GuestCommand {
            argv: vec![
                "sh".into(),
                OsString::from(std::ffi::OsStr::from_bytes(b"\xff")),
            ],
            env: vec![("A".into(), "1=2".into())],
            workdir: Some("/tmp".into()),
            uid: Some(1000),
            gid: Some(5),
        };
        c.verbose = true;
        c.use_pvh = false;
        c.console = ConsoleKind::Virtio;
        c.vsock = Some("cid=9,socket=/tmp/v".parse().unwrap());
        c.disks = vec![
            "a.img,ro,id=x".parse().unwrap(),
            "b.img,bw=1M,iops=100,bw_burst=4M".parse().unwrap(),
        ];
        c.rng = true;
        c.rng_rate_limit = parse_rng_rate_limit("bw=64K,ops=10,ops_burst=5").unwrap();
        c.nets = vec!["tap=t0,mac=02:00:00:00:00:01,pps=1000".parse().unwrap()];
        c.agent_port = Some(1024);
        let json = serde_json::to_string(&c).unwrap();
        let back: VmConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c, "{json}");
        assert_ne!(back, VmConfig::new("/k/vmlinux"));

        // A file names only what differs from the defaults; typos are refused.
        let c: VmConfig = serde_json::from_str(r#"{"kernel": "k", "vcpus": 2}"#).unwrap();
        assert_eq!(
            c,
            VmConfig {
                vcpus: 2,
                ..VmConfig::new("k")
            }
        );
        let e = serde_json::from_str::<VmConfig>(r#"{"kernel": "k", "vcpu": 2}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `vcpu`"), "{e}");
    }

    /// --disk, --net and --vsock share one parser: the same mistake reads
    /// the same way for each.
    #[test]
    fn device_options_fail_in_one_style() {
        let unknown = [
            DiskConfig::from_str("x,speed=1").unwrap_err(),
            NetConfig::from_str("tap=t,speed=1").unwrap_err(),
            VsockConfig::from_str("cid=3,socket=/s,speed=1").unwrap_err(),
        ];
        for (e, usage) in unknown.iter().zip([
            "PATH[,ro][,id=NAME][,bw=SIZE][,bw_burst=SIZE][,iops=N][,iops_burst=N]",
            "tap=NAME[,mac=MAC][,bw=SIZE][,bw_burst=SIZE][,pps=N][,pps_burst=N]",
            "cid=N,socket=PATH",
        ]) {
            assert_eq!(e, &format!("unknown option 'speed=1' (expected {usage})"));
        }
        assert_eq!(
            NetConfig::from_str("tap=t,tap=u").unwrap_err(),
            "option 'tap' given twice (expected tap=NAME[,mac=MAC][,bw=SIZE][,bw_burst=SIZE][,pps=N][,pps_burst=N])"
        );
        assert_eq!(
            VsockConfig::from_str("cid=3").unwrap_err(),
            "missing socket= (expected cid=N,socket=PATH)"
        );
    }

    /// A restored copy takes the caller's hostname (else the snapshot's)
    /// and, with `nets`, one TAP per saved card, in order: its MAC is the
    /// caller's, else the one the guest has (even when it was derived from
    /// the snapshot's TAP name). What the agent is told follows: a new
    /// machine id for every copy, a MAC change only for a card that moved
    /// to another address; a boot gets only its hostname.
    #[test]
    fn a_copy_takes_its_own_hostname_taps_and_macs() {
        let net = |text: &str| text.parse::<NetConfig>().unwrap();
        let mut saved = VmConfig::new("k");
        saved.hostname = Some("snap".into());
        saved.nets = vec![net("tap=s0"), net("tap=s1,mac=02:00:00:00:00:01")];
        let derived = saved.nets[0].guest_mac();
        assert_eq!(derived, kiln_devices::virtio::net::MacAddr::derived("s0").0);

        let plain = VmConfig::default().restored_from(&saved).unwrap();
        assert_eq!(plain.hostname.as_deref(), Some("snap"));
        assert_eq!(plain.nets[0].tap, "s0");
        assert_eq!(plain.nets[0].mac, Some(derived), "the MAC is written out");
        let identity = plain.guest_identity(Some(&saved));
        assert_eq!(identity.hostname.as_deref(), Some(&b"snap"[..]));
        assert!(identity.new_machine_id && identity.macs.is_empty());

        let ours = VmConfig {
            hostname: Some("copy-1".into()),
            nets: vec![net("tap=c0,pps=10"), net("tap=c1,mac=02:00:00:00:00:0a")],
            ..VmConfig::default()
        };
        let copy = ours.restored_from(&saved).unwrap();
        assert_eq!(copy.hostname.as_deref(), Some("copy-1"));
        assert_eq!(
            (copy.nets[0].tap.as_str(), copy.nets[0].mac),
            ("c0", Some(derived))
        );
        assert_eq!(copy.nets[0].rate_limit.ops_per_sec, Some(10));
        assert_eq!(copy.nets[1].mac, Some([2, 0, 0, 0, 0, 0x0a]));
        let identity = copy.guest_identity(Some(&saved));
        assert_eq!(
            identity.macs,
            [MacChange {
                from: [2, 0, 0, 0, 0, 1],
                to: [2, 0, 0, 0, 0, 0x0a]
            }]
        );

        let short = VmConfig {
            nets: vec![net("tap=c0")],
            ..VmConfig::default()
        };
        let e = short.restored_from(&saved).unwrap_err();
        assert_eq!(
            e,
            "--net: the snapshot has 2 network card(s), 1 given (with --from, one --net per card, in order)"
        );

        let boot = saved.guest_identity(None);
        assert!(!boot.new_machine_id && boot.macs.is_empty());
        assert_eq!(boot.hostname.as_deref(), Some(&b"snap"[..]));
        assert_eq!(
            VmConfig::default().guest_identity(None),
            Identity::default()
        );
    }

    #[test]
    fn hostnames() {
        assert_eq!(parse_hostname("copy-1.test"), Ok("copy-1.test".into()));
        for bad in ["", "-x", "a b", "a/b", &"h".repeat(65)] {
            let e = parse_hostname(bad).unwrap_err();
            assert!(e.contains("is not a hostname"), "{bad}: {e}");
        }
    }

    #[test]
    fn every_unit_and_the_duration_bound() {
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("3tib"), Ok(3 << 40));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        // At most 10^9 seconds.
        assert_eq!(
            parse_duration("1000000000"),
            Ok(Duration::from_secs(1_000_000_000))
        );
        assert!(parse_duration("1000000001").is_err());
    }

    #[test]
    fn repeated_net_and_vsock_keys_are_refused() {
        let twice = "tap=t,mac=02:00:00:00:00:01,mac=02:00:00:00:00:02"
            .parse::<NetConfig>()
            .unwrap_err();
        assert_eq!(
            twice,
            "option 'mac' given twice (expected tap=NAME[,mac=MAC][,bw=SIZE][,bw_burst=SIZE][,pps=N][,pps_burst=N])"
        );
        for (text, key) in [
            ("cid=3,socket=/a,socket=/b", "socket"),
            ("cid=3,cid=4,socket=/a", "cid"),
        ] {
            assert_eq!(
                text.parse::<VsockConfig>().unwrap_err(),
                format!("option '{key}' given twice (expected cid=N,socket=PATH)")
            );
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn disks() {
        let d = DiskConfig::from_str("a.img").unwrap();
        assert_eq!((d.path, d.read_only, d.id), ("a.img".into(), false, None));
        let d = DiskConfig::from_str("/x/b.img,ro,id=roserial").unwrap();
        assert!(d.read_only);
        assert_eq!(d.id.as_deref(), Some("roserial"));
        let d = DiskConfig::from_str("c,id=s1,ro").unwrap();
        assert!(d.read_only && d.id.as_deref() == Some("s1"));
        for bad in [
            "",
            ",ro",
            "x,bogus=1",
            "x,rw",
            "x,ro=1",
            "x,id=",
            "x,",
            "x,id=a b",
        ] {
            let e = DiskConfig::from_str(bad).unwrap_err();
            assert_eq!(e.lines().count(), 1, "{bad}: {e}");
        }
        assert!(DiskConfig::from_str("x,bogus=1")
            .unwrap_err()
            .contains("bogus=1"));
        assert!(DiskConfig::from_str(&format!("x,id={}", "s".repeat(21))).is_err());
        assert!(DiskConfig::from_str(&format!("x,id={}", "s".repeat(20))).is_ok());
    }

    #[test]
    fn net_options() {
        let n = NetConfig::from_str("tap=tap0").unwrap();
        assert_eq!((n.tap.as_str(), n.mac), ("tap0", None));
        let n = NetConfig::from_str("tap=kiln1,mac=02:00:00:00:00:07").unwrap();
        assert_eq!(n.mac, Some([2, 0, 0, 0, 0, 7]));
        for bad in [
            "",
            "tap0",
            "mac=02:00:00:00:00:07",
            "tap=",
            "tap=a/b",
            "tap=waytoolonginterfacename",
            "tap=t,mac=zz",
            "tap=t,mac=01:00:00:00:00:01",
            "tap=t,tap=u",
            "tap=t,speed=10",
        ] {
            assert!(NetConfig::from_str(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rate_limit_options() {
        let d = DiskConfig::from_str("a.img,bw=10M,iops=200,bw_burst=1G,iops_burst=50").unwrap();
        assert_eq!(
            d.rate_limit,
            RateLimit {
                bytes_per_sec: Some(10 << 20),
                ops_per_sec: Some(200),
                bytes_burst: 1 << 30,
                ops_burst: 50,
            }
        );
        assert!(!DiskConfig::from_str("a.img")
            .unwrap()
            .rate_limit
            .is_limited());
        let n = NetConfig::from_str("tap=t,bw=512K,pps=10000").unwrap();
        assert_eq!(
            (n.rate_limit.bytes_per_sec, n.rate_limit.ops_per_sec),
            (Some(512 << 10), Some(10000))
        );
        assert_eq!(parse_rng_rate_limit(""), Ok(RateLimit::default()));
        let r = parse_rng_rate_limit("bw=1k").unwrap();
        assert_eq!((r.bytes_per_sec, r.ops_per_sec), (Some(1024), None));
        for (text, error) in [
            (
                "a,bw=0",
                "bw must be at least 1 (leave it out for no limit)",
            ),
            (
                "a,iops=0",
                "iops must be at least 1 (leave it out for no limit)",
            ),
            (
                "a,bw=-1M",
                "bw: '-1M' is not a size (examples: 256M, 1G, 1048576)",
            ),
            ("a,iops=-5", "iops: '-5' is not a whole number"),
            ("a,iops=1k", "iops: '1k' is not a whole number"),
            (
                "a,bw=fast",
                "bw: 'fast' is not a size (examples: 256M, 1G, 1048576)",
            ),
            (
                "a,bw_burst=1M",
                "bw_burst needs bw (a burst is on top of a rate)",
            ),
            (
                "a,bw=1M,iops_burst=3",
                "iops_burst needs iops (a burst is on top of a rate)",
            ),
            ("a,bw=99999999999T", "bw: '99999999999T' is too large"),
        ] {
            assert_eq!(DiskConfig::from_str(text).unwrap_err(), error, "{text}");
        }
        assert_eq!(
            NetConfig::from_str("tap=t,pps=0").unwrap_err(),
            "pps must be at least 1 (leave it out for no limit)"
        );
        assert_eq!(
            parse_rng_rate_limit("ops=x").unwrap_err(),
            "ops: 'x' is not a whole number"
        );
        assert!(parse_rng_rate_limit("iops=1")
            .unwrap_err()
            .starts_with("unknown option 'iops=1'"));
        // JSON names only what it limits.
        let d: DiskConfig = serde_json::from_str(
            r#"{"path": "a", "read_only": false, "id": null,
                "rate_limit": {"bytes_per_sec": 1000}}"#,
        )
        .unwrap();
        assert_eq!(d.rate_limit.bytes_per_sec, Some(1000));
        assert_eq!(d.rate_limit.ops_burst, 0);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("NaNs").is_err());
    }

    #[test]
    fn vsock_and_console_options() {
        let v = VsockConfig::from_str("cid=3,socket=/tmp/v.sock").unwrap();
        assert_eq!((v.cid, v.socket), (3, PathBuf::from("/tmp/v.sock")));
        let v = VsockConfig::from_str("socket=/a/b,cid=4294967294").unwrap();
        assert_eq!(v.cid, 4294967294);
        for bad in [
            "cid=2,socket=/s",
            "cid=0,socket=/s",
            "cid=4294967295,socket=/s",
            "cid=x,socket=/s",
            "cid=3",
            "socket=/s",
            "cid=3,socket=",
            "cid=3,cid=4,socket=/s",
            "cid=3,socket=/s,port=1",
            "3,/s",
        ] {
            assert!(VsockConfig::from_str(bad).is_err(), "{bad}");
        }
        assert_eq!(ConsoleKind::from_str("virtio"), Ok(ConsoleKind::Virtio));
        assert_eq!(ConsoleKind::from_str("serial"), Ok(ConsoleKind::Serial));
        assert!(ConsoleKind::from_str("hvc").is_err());
    }
}
