//! The `kiln` command line: its arguments (here), `kiln run` ([`run`]) and
//! what the run needs of kiln's own process ([`signals`], [`terminal`]).

pub mod run;
pub mod sandbox_vm;
pub mod signals;
pub mod snapshot;
pub mod terminal;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{
    parse_duration, parse_hostname, parse_rng_rate_limit, parse_size, ConsoleKind, DiskConfig,
    GuestCommand, NetConfig, RateLimit, RootfsArg, SeccompMode, ShareConfig, TmpfsConfig, VmConfig,
    VsockConfig,
};
use crate::outcome::STATUS_KILN_ERROR;

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "A KVM micro-VM monitor: boot a Linux guest and run a command in it"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a fresh VM, run CMD in it with kiln's init, and exit with CMD's status.
    #[command(after_help = EXIT_STATUS_HELP)]
    Run(Box<RunArgs>),
    /// Save a ready VM to start copies of it with `kiln run --from DIR`.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Runs a sandbox's VM for the sandbox API (`Isolation::Process`): a spec
    /// on stdin, the console on stdout, a report on descriptor 3.
    #[command(name = "sandbox-vm", hide = true)]
    SandboxVm,
}

const EXIT_STATUS_HELP: &str = "\
Exit status: the command's own status (128+N if killed by signal N), or:
  120  the guest reset or powered off before the command reported a status
  121  the guest kernel panicked
  122  the guest triple-faulted
  123  KVM could not run the guest (e.g. an instruction its emulator lacks)
  119  the guest agent did not connect within --boot-timeout
  124  --timeout expired
  125  kiln itself failed (bad option, unreadable kernel or --rootfs, no /dev/kvm, ...)";

/// `kiln run`: the VM, the command, and what to do with them.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub command: CommandArgs,
    #[command(flatten)]
    pub jail: JailArgs,
    /// Print the guest kernel command line this run would give the guest,
    /// on one line, and exit without running the guest.
    #[arg(long)]
    pub print_cmdline: bool,
}

/// Where `kiln run` runs (see `kiln::jail`).
#[derive(Clone, Debug, clap::Args)]
pub struct JailArgs {
    /// The jail kiln enters before it builds the VM: `on` (default: private
    /// namespaces and root, no capabilities, an unprivileged uid) or `off`
    /// (for debugging only: a compromised device model then has kiln's
    /// whole view of the host, as root when kiln runs as root).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub jail: bool,
    /// The uid kiln runs as once the VM is built, when started as root
    /// (default 65534, nobody; not 0).
    #[arg(long, value_name = "UID")]
    pub jail_uid: Option<u32>,
    /// The gid kiln runs as once the VM is built, when started as root
    /// (default 65534; not 0).
    #[arg(long, value_name = "GID")]
    pub jail_gid: Option<u32>,
    /// Run kiln in a cgroup of its own with these limits: CPU time in CPUs,
    /// memory of the whole kiln process (guest memory included) and
    /// threads; removed when kiln ends.
    #[arg(long, value_name = "[cpus=N][,mem=SIZE][,pids=N]")]
    pub cgroup: Option<crate::jail::CgroupLimits>,
}

impl JailArgs {
    /// The jail's ids; `None` with `--jail off`.
    pub fn config(&self) -> Option<crate::jail::JailConfig> {
        let default = crate::jail::JailConfig::default();
        self.jail.then(|| crate::jail::JailConfig {
            uid: self.jail_uid.unwrap_or(default.uid),
            gid: self.jail_gid.unwrap_or(default.gid),
        })
    }
}

fn parse_on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("'{other}': the jail is 'on' or 'off'")),
    }
}

/// The VM options of `kiln run`: each becomes the [`VmConfig`] field of the
/// same name (see `From<VmArgs> for VmConfig`), whichever way the VM runs.
#[derive(Clone, Debug, clap::Args)]
pub struct VmArgs {
    /// Guest kernel: ELF vmlinux (booted through its PVH entry when present) or bzImage.
    #[arg(long, value_name = "PATH", required_unless_present = "restore_from")]
    pub kernel: Option<PathBuf>,
    /// Start from the snapshot in DIR (`kiln snapshot create`) instead of
    /// booting. The snapshot fixes what the guest sees (kernel, memory,
    /// vCPUs, devices, root, command line): those options are not given.
    /// DIR is only read; any number of runs may start from it at once, each
    /// with its own copy of the guest, fresh entropy, the host's clock and
    /// a new /etc/machine-id (where the root has one). --hostname names
    /// the copy (else it keeps the snapshot's); --net, once per network
    /// card of the snapshot and in order, moves the cards to other existing
    /// TAPs, and mac= gives a card a new address.
    #[arg(
        long = "from",
        value_name = "DIR",
        conflicts_with_all = ["kernel", "initrd", "rootfs", "extra_cmdline", "mem_bytes", "vcpus", "use_pvh", "console", "vsock", "disks", "rng", "shares", "tmpfs", "virtiofsd"]
    )]
    pub restore_from: Option<PathBuf>,
    /// The guest's hostname (default: kiln; with --from: the snapshot's):
    /// letters, digits, '-' and '.', at most 64.
    #[arg(long, value_name = "NAME", value_parser = parse_hostname)]
    pub hostname: Option<String>,
    /// Initramfs to boot; kiln's init is appended to it and runs CMD on top of it (with `--cmdline rdinit=PATH` your own init runs instead, and kiln adds nothing)
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// The guest's root file system, told apart by content: a directory or a
    /// tar archive (plain or gzip, e.g. from `docker export`) is packed into
    /// the initramfs; an ext2/3/4 image is attached as /dev/vda (copy-on-write:
    /// the original is only read, the guest's writes go to a private unnamed
    /// file; --disk images then start at /dev/vdb) and kiln's init switches
    /// root into it. DIR,share shares a directory instead (virtio-fs, no
    /// copy): read-only on the host, the guest's writes kept in a RAM
    /// overlay; DIR,share,rw writes through to the host directory.
    #[arg(long, value_name = "PATH|DIR,share[,rw]")]
    pub rootfs: Option<RootfsArg>,
    /// Where the guest's writes to an image --rootfs go, an unnamed file
    /// (default: next to the image, else $TMPDIR when its directory takes no
    /// new file).
    #[arg(long, value_name = "DIR")]
    pub scratch_dir: Option<PathBuf>,
    /// Extra kernel command-line words, appended after kiln's defaults.
    #[arg(long = "cmdline", value_name = "STR")]
    pub extra_cmdline: Option<String>,
    /// Guest memory (K/M/G suffixes).
    #[arg(long = "mem", value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub mem_bytes: u64,
    /// Number of vCPUs.
    #[arg(
        long = "cpus",
        value_name = "N",
        default_value_t = 1,
        allow_negative_numbers = true
    )]
    pub vcpus: u8,
    /// Stop the VM after this long (e.g. 30s, 2m, 500ms); exit status 124.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// How long to wait for kiln's guest agent to connect (same syntax as
    /// --timeout; default: no limit but --timeout); exit status 119 when
    /// it passes. Not with --vsock or an initrd's own init (no agent).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub boot_timeout: Option<Duration>,
    /// Show the guest kernel's log and kiln's own timing messages.
    #[arg(short, long)]
    pub verbose: bool,
    /// Enter a vmlinux through its 64-bit entry even when it has a PVH note
    /// (for comparing boot paths).
    #[arg(long = "no-pvh", action = clap::ArgAction::SetFalse)]
    pub use_pvh: bool,
    /// The guest console: `serial` (ttyS0) or `virtio` (hvc0, a virtio console:
    /// far fewer VM exits for bulk output). kiln's stdin and stdout are the
    /// console's input and output either way.
    #[arg(long, value_name = "serial|virtio", default_value = "serial")]
    pub console: ConsoleKind,
    /// Add a virtio-vsock device with guest CID N (3 or more). Host programs
    /// connect to the Unix socket PATH and send `CONNECT <port>\n` to reach a
    /// guest port (kiln answers `OK <host port>\n`); guest connections to host
    /// port P go to the Unix socket PATH_P.
    #[arg(long, value_name = "cid=N,socket=PATH")]
    pub vsock: Option<VsockConfig>,
    /// A raw disk image as a virtio-blk disk: `PATH[,ro][,id=NAME]`. Repeatable;
    /// the first is /dev/vda (/dev/vdb with an image --rootfs). ro opens the
    /// file read-only; id sets the serial (default: the file name, cut to 20
    /// bytes). bw limits the bytes read and written per second (K/M/G
    /// suffixes), iops the requests per second; bw_burst and iops_burst
    /// add a one-time allowance on top.
    #[arg(long = "disk", value_name = "PATH[,ro][,id=NAME][,bw=SIZE][,iops=N]")]
    pub disks: Vec<DiskConfig>,
    /// Attach a virtio-rng device (entropy from the host's getrandom);
    /// `--rng=bw=SIZE,ops=N` limits its bytes and requests per second
    /// (bw_burst, ops_burst: a one-time allowance on top).
    #[arg(
        long,
        value_name = "bw=SIZE,ops=N",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "",
        value_parser = parse_rng_rate_limit
    )]
    pub rng: Option<RateLimit>,
    /// A virtio-net device on host TAP interface NAME (repeatable; eth0, eth1,
    /// ... in order). An existing TAP is used as is; a NAME that does not
    /// exist is created (needs root/CAP_NET_ADMIN), comes up with no address
    /// and disappears when kiln exits. MAC defaults to a stable locally
    /// administered address derived from NAME. bw limits the frame bytes
    /// and pps the frames per second, each direction on its own (bw_burst,
    /// pps_burst: a one-time allowance on top). With --from: one per card
    /// of the snapshot, in order, each an existing TAP; the card keeps its
    /// MAC unless mac= is given.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC][,bw=SIZE][,pps=N]")]
    pub nets: Vec<NetConfig>,
    /// Share the host directory HOST_DIR with the guest at GUEST_PATH, live
    /// (virtio-fs; repeatable): kiln starts a virtiofsd for it and kiln's
    /// init mounts it before the command runs. ro makes it read-only (on the
    /// host side too); cache sets how long the guest may cache what it read
    /// (auto, always, never).
    #[arg(
        long = "share",
        value_name = "HOST_DIR:GUEST_PATH[,ro][,cache=auto|always|never]"
    )]
    pub shares: Vec<ShareConfig>,
    /// Mount a tmpfs at PATH in the guest before the command runs
    /// (repeatable), as `docker run --tmpfs`: OPTIONS are size=N[k|m|g],
    /// mode=OCTAL, ro, nosuid, nodev, noexec.
    #[arg(long = "tmpfs", value_name = "PATH[:OPTIONS]")]
    pub tmpfs: Vec<TmpfsConfig>,
    /// The virtiofsd program for --share (default: $KILN_VIRTIOFSD, else
    /// the one resources/setup.sh installed, else virtiofsd on PATH).
    #[arg(long, value_name = "PATH")]
    pub virtiofsd: Option<PathBuf>,
    /// The seccomp filters on kiln's threads: `on` (a system call outside a
    /// thread's list kills kiln with a line naming it), `log` (allowed, and
    /// logged by the host kernel: dmesg), or `off` (for debugging only).
    #[arg(long, value_name = "on|off|log", default_value = "on")]
    pub seccomp: SeccompMode,
}

impl From<VmArgs> for VmConfig {
    /// Field by field, without `..`: an option added to `VmArgs` does not
    /// compile until it reaches the config.
    fn from(args: VmArgs) -> Self {
        let VmArgs {
            kernel,
            initrd,
            rootfs,
            scratch_dir,
            extra_cmdline,
            mem_bytes,
            vcpus,
            timeout,
            boot_timeout,
            verbose,
            use_pvh,
            console,
            vsock,
            disks,
            rng,
            nets,
            shares,
            tmpfs,
            virtiofsd,
            seccomp,
            restore_from,
            hostname,
        } = args;
        VmConfig {
            kernel: kernel.unwrap_or_default(),
            restore_from,
            hostname,
            initrd,
            rootfs_share: rootfs.as_ref().and_then(|r| r.share),
            rootfs: rootfs.map(|r| r.path),
            scratch_dir,
            extra_cmdline,
            mem_bytes,
            vcpus,
            timeout,
            boot_timeout,
            verbose,
            use_pvh,
            console,
            vsock,
            disks,
            rng: rng.is_some(),
            rng_rate_limit: rng.unwrap_or_default(),
            nets,
            shares,
            tmpfs,
            virtiofsd,
            // Started by the front end (`kiln run`) or the VM.
            share_daemons: Default::default(),
            seccomp,
            // Not VM options: the command comes from `CommandArgs`, the
            // agent's port from the sandbox.
            command: GuestCommand::default(),
            agent_port: None,
            // The jail's (`JailArgs`), once it is entered.
            run_as: None,
        }
    }
}

/// What `kiln run` runs in the VM (not how the VM is built).
#[derive(Clone, Debug, clap::Args)]
pub struct CommandArgs {
    /// Set an environment variable for the command (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VAL", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The command's working directory in the guest.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// Forward kiln's stdin to the command (without -i its stdin is empty).
    #[arg(short = 'i', long = "interactive")]
    pub interactive: bool,
    /// Run the command on a terminal in the guest, of kiln's terminal's
    /// size (24x80 when kiln has none), followed on SIGWINCH; with -i,
    /// kiln's stdin must be a terminal, which is put in raw mode for the
    /// run (every key, Ctrl-C included, goes to the guest).
    #[arg(short = 't', long = "tty")]
    pub tty: bool,
    /// Run the command as this user and group (GID defaults to UID; without
    /// --user: 65534:65534, unprivileged; --user 0 for guest root).
    #[arg(long = "user", value_name = "UID[:GID]", value_parser = parse_user)]
    pub user: Option<(u32, Option<u32>)>,
    /// The command kiln's init runs in the guest (default: /bin/sh).
    #[arg(last = true, value_name = "CMD")]
    pub argv: Vec<OsString>,
}

/// Reports a command line clap refused, as kiln reports every error before
/// a run: one line, status 125. `--help` and `--version` print and give 0.
pub fn report_usage_error(e: &clap::Error) -> i32 {
    if !e.use_stderr() {
        let _ = e.print();
        return 0;
    }
    // clap's first line, plus the next when it ends in ':'.
    let text = e.to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut msg = lines.next().unwrap_or("invalid arguments").to_string();
    if msg.ends_with(':') {
        msg = format!("{msg} {}", lines.next().unwrap_or_default());
    }
    eprintln!("kiln: {}", msg.trim_start_matches("error: "));
    STATUS_KILN_ERROR
}

/// kiln's log on stderr: warnings, or with -v information too; `KILN_LOG`
/// overrides (env_logger syntax).
pub fn init_logging(verbose: bool) {
    let default = if verbose { "info" } else { "warn" };
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("KILN_LOG", default))
        .format_timestamp(None)
        .format_target(false)
        .init();
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("'{text}' is not KEY=VALUE")),
    }
}

fn parse_user(text: &str) -> Result<(u32, Option<u32>), String> {
    let num = |t: &str| {
        t.parse::<u32>()
            .map_err(|_| format!("'{text}' is not UID[:GID] (numbers)"))
    };
    match text.split_once(':') {
        Some((u, g)) => Ok((num(u)?, Some(num(g)?))),
        None => Ok((num(text)?, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::SandboxBuilder;

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let full = ["kiln", "run"].iter().chain(args).copied();
        Cli::try_parse_from(full).map(|c| match c.command {
            Command::Run(r) => *r,
            _ => panic!("not `kiln run`"),
        })
    }

    #[test]
    fn defaults_and_command_after_double_dash() {
        let r = parse(&["--kernel", "vmlinux", "--", "sh", "-c", "echo 'a b'"]).unwrap();
        assert_eq!(r.command.argv, ["sh", "-c", "echo 'a b'"]);
        assert!(!r.print_cmdline);
        let c = VmConfig::from(r.vm);
        // README: `--mem` defaults to 256M (a literal, not the code's constant).
        assert_eq!(c.mem_bytes, 256 << 20);
        assert_eq!(VmConfig::new("vmlinux").mem_bytes, 256 << 20);
        assert_eq!(
            (c.vcpus, c.timeout, c.use_pvh, c.verbose),
            (1, None, true, false)
        );
        assert_eq!(
            c,
            VmConfig::new("vmlinux"),
            "the CLI's defaults are the library's"
        );
    }

    /// Every VM option of `kiln run`, each away from its default.
    const EVERY_VM_OPTION: &[&str] = &[
        "--kernel=k",
        "--initrd=i",
        "--rootfs=r,share",
        "--scratch-dir=s",
        "--cmdline=ip=1",
        "--mem=1G",
        "--cpus=2",
        "--timeout=30s",
        "--boot-timeout=10m",
        "-v",
        "--no-pvh",
        "--console=virtio",
        "--vsock=cid=3,socket=/s",
        "--disk=d.img,bw=1M",
        "--rng=ops=10",
        "--net=tap=t0,pps=100",
        "--share=/srv:/mnt,ro",
        "--tmpfs=/scratch:size=1m",
        "--virtiofsd=/v",
        "--seccomp=off",
        "--hostname=h",
    ];

    /// A VM option reaches its own `VmConfig` field, and the sandbox path
    /// boots that config whole (adding only its agent device): a field
    /// that no option sets, or that the sandbox drops, fails here.
    #[test]
    fn every_vm_option_reaches_the_config_both_paths_boot() {
        let config = VmConfig::from(parse(EVERY_VM_OPTION).unwrap().vm);
        let json = |c: &VmConfig| serde_json::to_value(c).unwrap();
        let (set, default) = (json(&config), json(&VmConfig::default()));
        // What `kiln run` sets apart from its VM options (run_as: the jail);
        // --from excludes the guest's options (its own test below).
        let not_vm_options = ["command", "agent_port", "run_as", "restore_from"];
        for (field, value) in default.as_object().unwrap() {
            assert_eq!(
                set[field] != *value,
                !not_vm_options.contains(&field.as_str()),
                "VmConfig::{field}: give it a `kiln run` option (VmArgs) and set it in EVERY_VM_OPTION"
            );
        }
        // The sandbox path: `--vsock` is the user's device, which sends a
        // run down the classic path instead.
        let agent_config = VmConfig {
            vsock: None,
            ..config
        };
        let booted = SandboxBuilder::from(agent_config.clone())
            .vm_config("/dir/vsock.sock".into())
            .unwrap();
        assert!(booted.agent_port.is_some());
        assert_eq!(
            booted.vsock.as_ref().map(|v| v.socket.as_path()),
            Some(std::path::Path::new("/dir/vsock.sock"))
        );
        assert_eq!(
            VmConfig {
                vsock: None,
                agent_port: None,
                ..booted
            },
            agent_config
        );
    }

    /// `--from` reaches the config, takes the host-side options, and refuses
    /// every option the snapshot fixes, each with a line naming it.
    #[test]
    fn from_takes_the_host_side_options_only() {
        let r = parse(&[
            "--from",
            "snap",
            "--timeout=5s",
            "-v",
            "--seccomp=log",
            "--",
            "id",
        ])
        .unwrap();
        let c = VmConfig::from(r.vm);
        assert_eq!(
            c.restore_from.as_deref(),
            Some(std::path::Path::new("snap"))
        );
        assert_eq!(c.timeout, Some(Duration::from_secs(5)));
        assert!(c.kernel.as_os_str().is_empty());
        let guest_options = EVERY_VM_OPTION.iter().filter(|o| {
            let host_side = [
                "--timeout",
                "--boot-timeout",
                "-v",
                "--scratch-dir",
                "--seccomp",
                "--hostname",
                "--net",
            ];
            !host_side.iter().any(|h| o.starts_with(h))
        });
        for option in guest_options {
            let e = parse(&["--from=snap", option]).unwrap_err();
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{option}"
            );
        }
        let e = parse(&["--", "id"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        // A copy's own identity: its hostname, its cards' TAPs and MACs.
        let r = parse(&[
            "--from=snap",
            "--hostname=copy-1",
            "--net=tap=c0,mac=02:00:00:00:00:0a",
        ])
        .unwrap();
        let c = VmConfig::from(r.vm);
        assert_eq!(c.hostname.as_deref(), Some("copy-1"));
        assert_eq!(c.nets[0].mac, Some([2, 0, 0, 0, 0, 0x0a]));
        let e = parse(&["--from=snap", "--hostname=a b"]).unwrap_err();
        assert!(e.to_string().contains("'a b' is not a hostname"), "{e}");
    }

    #[test]
    fn options_parse() {
        let r = parse(&[
            "--kernel",
            "k",
            "--mem",
            "1G",
            "--cpus",
            "2",
            "--timeout",
            "30s",
            "--cmdline",
            "ip=1",
            "--initrd",
            "i",
            "--rootfs",
            "d",
            "-v",
            "--no-pvh",
        ])
        .unwrap();
        assert!(r.command.argv.is_empty());
        let c = VmConfig::from(r.vm);
        assert_eq!((c.mem_bytes, c.vcpus), (1 << 30, 2));
        assert_eq!(c.timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.extra_cmdline.as_deref(), Some("ip=1"));
        assert!(c.verbose && !c.use_pvh);
    }

    #[test]
    fn a_rootfs_directory_is_packed_or_shared() {
        use crate::config::RootShare;
        let root = |arg: &str| {
            let c = VmConfig::from(parse(&["--kernel", "k", "--rootfs", arg]).unwrap().vm);
            (c.rootfs.unwrap(), c.rootfs_share)
        };
        assert_eq!(
            root("/r,share"),
            (PathBuf::from("/r"), Some(RootShare::Overlay))
        );
        assert_eq!(
            root("/a,b,share,rw"),
            ("/a,b".into(), Some(RootShare::Writable))
        );
        // A comma alone does not make options: a plain path, packed as today.
        assert_eq!(root("/a,b"), ("/a,b".into(), None));
        assert_eq!(root("/r,shared"), ("/r,shared".into(), None));
        for (bad, why) in [
            (
                "/r,share,ro",
                "'share,ro': a shared root takes 'share' or 'share,rw'",
            ),
            ("/r,share,rw,x", "'share,rw,x'"),
            (",share", "empty directory"),
        ] {
            let err = parse(&["--kernel", "k", "--rootfs", bad])
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn tmpfs_mounts() {
        let c: VmConfig = parse(&[
            "--kernel",
            "k",
            "--tmpfs",
            "/scratch:size=1m,mode=1777,noexec,nosuid,nodev",
            "--tmpfs=/run",
        ])
        .unwrap()
        .vm
        .into();
        assert_eq!(
            c.tmpfs,
            [
                TmpfsConfig {
                    guest_path: "/scratch".into(),
                    size: Some(1 << 20),
                    mode: Some(0o1777),
                    read_only: false,
                    nosuid: true,
                    nodev: true,
                    noexec: true,
                    strictatime: false,
                    noatime: false,
                },
                TmpfsConfig {
                    guest_path: "/run".into(),
                    ..TmpfsConfig::default()
                }
            ]
        );
        for (bad, why) in [
            ("/a:size=1x", "tmpfs /a: option 'size=1x': a size in bytes"),
            ("/a:mode=9", "tmpfs /a: option 'mode=9': an octal mode"),
            ("/a:uid=1", "tmpfs /a: option 'uid=1': not a tmpfs option"),
            ("/a:nosymfollow", "option 'nosymfollow': not a tmpfs option"),
            ("a", "absolute path other than /"),
        ] {
            let err = parse(&["--kernel", "k", "--tmpfs", bad]).unwrap_err();
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn shares() {
        let c: VmConfig = parse(&[
            "--kernel",
            "k",
            "--share",
            "/srv/a:b:/mnt/a",
            "--share=/tmp:/out,ro,cache=never",
            "--virtiofsd",
            "/opt/virtiofsd",
        ])
        .unwrap()
        .vm
        .into();
        assert_eq!(c.shares.len(), 2);
        assert_eq!(c.shares[0].host_dir, PathBuf::from("/srv/a:b"));
        assert_eq!(c.shares[0].guest_path, "/mnt/a");
        assert!(!c.shares[0].read_only);
        assert_eq!(c.shares[0].cache, crate::config::ShareCache::Auto);
        assert!(c.shares[1].read_only);
        assert_eq!(c.shares[1].cache, crate::config::ShareCache::Never);
        assert_eq!(c.virtiofsd, Some(PathBuf::from("/opt/virtiofsd")));
        for (bad, why) in [
            ("/tmp", "needs HOST_DIR:GUEST_PATH"),
            (":/mnt", "empty host directory"),
            ("/tmp:mnt", "absolute path other than /"),
            ("/tmp:/", "absolute path other than /"),
            ("/tmp:/a b", "without spaces"),
            ("/tmp:/a/../b", "must not contain . or .."),
            ("/tmp:/a,rw", "unknown option 'rw'"),
            ("/tmp:/a,cache=sometimes", "'auto', 'always' or 'never'"),
            ("/tmp:/a,ro,ro", "given twice"),
        ] {
            let e = parse(&["--kernel", "k", "--share", bad]).unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn disks_and_rng() {
        let c: VmConfig = parse(&[
            "--kernel",
            "k",
            "--disk",
            "a.img",
            "--disk",
            "b.img,ro,id=x",
            "--rng",
        ])
        .unwrap()
        .vm
        .into();
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[0].path, PathBuf::from("a.img"));
        assert!(c.disks[1].read_only && c.rng);
        let c: VmConfig = parse(&["--kernel", "k"]).unwrap().vm.into();
        assert!(c.disks.is_empty() && !c.rng);
        let e = parse(&["--kernel", "k", "--disk", "x,bogus=1"]).unwrap_err();
        assert!(e.to_string().contains("unknown option 'bogus=1'"), "{e}");
    }

    #[test]
    fn rate_limits_on_disk_net_and_rng() {
        let c: VmConfig = parse(&[
            "--kernel",
            "k",
            "--disk",
            "a.img,bw=2M,iops=50",
            "--net",
            "tap=t0,bw=1M,pps=10,pps_burst=100",
            "--rng=bw=4K",
            "--",
            "cat",
        ])
        .unwrap()
        .vm
        .into();
        assert_eq!(c.disks[0].rate_limit.bytes_per_sec, Some(2 << 20));
        assert_eq!(c.disks[0].rate_limit.ops_per_sec, Some(50));
        assert_eq!(c.nets[0].rate_limit.ops_burst, 100);
        assert!(c.rng);
        assert_eq!(c.rng_rate_limit.bytes_per_sec, Some(4096));
        // A bare --rng takes no value: what follows is the next option.
        let r = parse(&["--kernel", "k", "--rng", "--cpus", "2"]).unwrap();
        assert_eq!(r.vm.rng, Some(RateLimit::default()));
        assert_eq!(r.vm.vcpus, 2);
        for bad in [
            ["--disk", "a.img,bw=0"],
            ["--net", "tap=t,pps=-1"],
            ["--rng=bw=lots", "--cpus=1"],
        ] {
            let e = parse(&["--kernel", "k", bad[0], bad[1]]).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains("bw must be at least 1")
                    || text.contains("pps: '-1' is not a whole number")
                    || text.contains("bw: 'lots' is not a size"),
                "{text}"
            );
        }
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(parse(&["--mem", "1G"]).is_err(), "kernel is required");
        assert!(parse(&["--kernel", "k", "--mem", "lots"]).is_err());
        assert!(parse(&["--kernel", "k", "--cpus", "-1"]).is_err());
        assert!(parse(&["--kernel", "k", "--cpus", "300"]).is_err());
        assert!(parse(&["--kernel", "k", "--timeout", "soon"]).is_err());
        assert!(parse(&["--kernel", "k", "--console", "tty"]).is_err());
        assert!(parse(&["--kernel", "k", "--vsock", "cid=2,socket=/s"]).is_err());
    }

    #[test]
    fn env_needs_a_name() {
        let e = parse(&["--kernel", "k", "-e", "=v"]).unwrap_err();
        assert!(e.to_string().contains("'=v' is not KEY=VALUE"), "{e}");
        assert!(parse(&["--kernel", "k", "-e", "novalue"]).is_err());
        let r = parse(&["--kernel", "k", "-e", "EMPTY="]).unwrap();
        assert_eq!(r.command.env, [("EMPTY".into(), String::new())]);
    }

    #[test]
    fn sandbox_options() {
        let r = parse(&[
            "--kernel", "k", "-e", "A=1", "-e", "B=x=y", "-w", "/tmp", "-i", "--user", "1000:5",
        ])
        .unwrap();
        assert_eq!(
            r.command.env,
            [("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        let c = &r.command;
        assert_eq!((c.workdir.as_deref(), c.interactive), (Some("/tmp"), true));
        assert_eq!(c.user, Some((1000, Some(5))));
        assert_eq!(
            parse(&["--kernel", "k", "--user", "7"])
                .unwrap()
                .command
                .user,
            Some((7, None))
        );
        assert!(parse(&["--kernel", "k", "-e", "NOVALUE"]).is_err());
        assert!(parse(&["--kernel", "k", "--user", "root"]).is_err());
    }

    /// Both paths run the command the options describe: the agent path as a
    /// sandbox command, the classic path through kiln's init's exec spec.
    #[test]
    fn command_options_reach_the_exec_spec() {
        let r = parse(&[
            "--kernel", "k", "-e", "A=1", "-e", "A=2", "-w", "/w", "--user", "7:8", "--", "id",
            "-u",
        ])
        .unwrap();
        let spec = r.command.guest_command().to_exec_spec();
        assert_eq!(spec.argv, [b"id".to_vec(), b"-u".to_vec()]);
        assert_eq!(
            spec.env,
            [(b"A".to_vec(), b"2".to_vec())],
            "the last -e wins"
        );
        assert_eq!(spec.cwd.as_deref(), Some(&b"/w"[..]));
        assert_eq!((spec.uid, spec.gid), (Some(7), Some(8)));
        let plain = parse(&["--kernel", "k"]).unwrap().command.guest_command();
        // README: without `-- CMD` kiln's init runs `/bin/sh` (a literal).
        assert_eq!(plain.to_exec_spec().argv, [b"/bin/sh".to_vec()]);
        let agent = crate::sandbox::Command::from(&plain);
        assert_eq!(agent.spec.argv, [b"/bin/sh".to_vec()], "the agent path too");
        assert!(!plain.has_options());
        let user_only = parse(&["--kernel", "k", "--user", "9"]).unwrap();
        let spec = user_only.command.guest_command().to_exec_spec();
        assert_eq!((spec.uid, spec.gid), (Some(9), None));
    }

    #[test]
    fn console_and_vsock_options() {
        let c: VmConfig = parse(&["--kernel", "k"]).unwrap().vm.into();
        assert_eq!((c.console, c.vsock), (ConsoleKind::Serial, None));
        let c: VmConfig = parse(&[
            "--kernel",
            "k",
            "--console",
            "virtio",
            "--vsock",
            "cid=7,socket=/tmp/k.sock",
        ])
        .unwrap()
        .vm
        .into();
        assert_eq!(c.console, ConsoleKind::Virtio);
        assert_eq!(
            c.vsock,
            Some(VsockConfig {
                cid: 7,
                socket: "/tmp/k.sock".into()
            })
        );
    }

    #[test]
    fn net_is_repeatable_and_validated() {
        let r = parse(&[
            "--kernel",
            "k",
            "--net",
            "tap=tap0",
            "--net",
            "tap=tap1,mac=02:00:00:00:00:01",
        ])
        .unwrap();
        let c = VmConfig::from(r.vm);
        assert_eq!(c.nets.len(), 2);
        assert_eq!((c.nets[0].tap.as_str(), c.nets[0].mac), ("tap0", None));
        assert_eq!(c.nets[1].mac, Some([2, 0, 0, 0, 0, 1]));
        assert!(parse(&["--kernel", "k", "--net", "tap0"]).is_err());
        assert!(parse(&["--kernel", "k", "--net", "tap=t,mac=bad"]).is_err());
    }
}
