//! The `kiln` command line.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{
    parse_console_kind, parse_disk, parse_duration, parse_net, parse_size, parse_vsock,
    ConsoleKind, DiskConfig, NetConfig, VmConfig, VsockConfig,
};

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
    Run(RunArgs),
}

const EXIT_STATUS_HELP: &str = "\
Exit status: the command's own status (128+N if killed by signal N), or:
  120  the guest reset or powered off before the command reported a status
  121  the guest kernel panicked
  122  the guest triple-faulted
  123  KVM could not run the guest (e.g. an instruction its emulator lacks)
  124  --timeout expired
  125  kiln itself failed (bad option, unreadable kernel or --rootfs, no /dev/kvm, ...)";

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Guest kernel: ELF vmlinux (booted through its PVH entry when present) or bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initramfs to boot; kiln's init is appended to it and runs CMD on top of it (with `--cmdline rdinit=PATH` your own init runs instead, and kiln adds nothing)
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// The guest's root file system, told apart by content: a directory or a
    /// tar archive (plain or gzip, e.g. from `docker export`) is packed into
    /// the initramfs; an ext2/3/4 image is attached as /dev/vda (a private
    /// scratch copy: the original is never written; --disk images then start
    /// at /dev/vdb) and kiln's init switches root into it.
    #[arg(long, value_name = "PATH")]
    pub rootfs: Option<PathBuf>,
    /// Extra kernel command-line words, appended after kiln's defaults.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Guest memory (K/M/G suffixes).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// Number of vCPUs.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        allow_negative_numbers = true
    )]
    pub cpus: u8,
    /// Stop the VM after this long (e.g. 30s, 2m, 500ms); exit status 124.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Show the guest kernel's log and kiln's own timing messages.
    #[arg(short, long)]
    pub verbose: bool,
    /// Enter a vmlinux through its 64-bit entry even when it has a PVH note
    /// (for comparing boot paths).
    #[arg(long)]
    pub no_pvh: bool,
    /// The guest console: `serial` (ttyS0) or `virtio` (hvc0, a virtio console:
    /// far fewer VM exits for bulk output). kiln's stdin and stdout are the
    /// console's input and output either way.
    #[arg(long, value_name = "serial|virtio", default_value = "serial", value_parser = parse_console_kind)]
    pub console: ConsoleKind,
    /// Add a virtio-vsock device with guest CID N (3 or more). Host programs
    /// connect to the Unix socket PATH and send `CONNECT <port>\n` to reach a
    /// guest port (kiln answers `OK <host port>\n`); guest connections to host
    /// port P go to the Unix socket PATH_P.
    #[arg(long, value_name = "cid=N,socket=PATH", value_parser = parse_vsock)]
    pub vsock: Option<VsockConfig>,
    /// A raw disk image as a virtio-blk disk: PATH[,ro][,id=NAME]. Repeatable;
    /// the first is /dev/vda (/dev/vdb with an image --rootfs). ro opens the
    /// file read-only; id sets the serial (default: the file name, cut to 20
    /// bytes).
    #[arg(long = "disk", value_name = "PATH[,ro][,id=NAME]", value_parser = parse_disk)]
    pub disks: Vec<DiskConfig>,
    /// Attach a virtio-rng device (entropy from the host's getrandom).
    #[arg(long)]
    pub rng: bool,
    /// A virtio-net device on host TAP interface NAME (repeatable; eth0, eth1,
    /// ... in order). An existing TAP is used as is; a NAME that does not
    /// exist is created (needs root/CAP_NET_ADMIN), comes up with no address
    /// and disappears when kiln exits. MAC defaults to a stable locally
    /// administered address derived from NAME.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net)]
    pub nets: Vec<NetConfig>,
    /// Set an environment variable for the command (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VAL", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The command's working directory in the guest.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// Forward kiln's stdin to the command (without -i its stdin is empty).
    #[arg(short = 'i', long = "interactive")]
    pub interactive: bool,
    /// Run the command as this user (and group).
    #[arg(long = "user", value_name = "UID[:GID]", value_parser = parse_user)]
    pub user: Option<(u32, Option<u32>)>,
    /// The command kiln's init runs in the guest (default: /bin/sh).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

impl RunArgs {
    pub fn to_config(&self) -> VmConfig {
        VmConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            rootfs: self.rootfs.clone(),
            extra_cmdline: self.cmdline.clone(),
            mem_bytes: self.mem,
            vcpus: self.cpus,
            timeout: self.timeout,
            command: self.command.clone(),
            verbose: self.verbose,
            use_pvh: !self.no_pvh,
            console: self.console,
            vsock: self.vsock.clone(),
            disks: self.disks.clone(),
            rng: self.rng,
            nets: self.nets.clone(),
            agent_port: None,
        }
    }
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
    use crate::config::DEFAULT_MEM_BYTES;

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let full = ["kiln", "run"].iter().chain(args).copied();
        Cli::try_parse_from(full).map(|c| match c.command {
            Command::Run(r) => r,
        })
    }

    #[test]
    fn defaults_and_command_after_double_dash() {
        let r = parse(&["--kernel", "vmlinux", "--", "sh", "-c", "echo 'a b'"]).unwrap();
        let c = r.to_config();
        assert_eq!(c.mem_bytes, DEFAULT_MEM_BYTES);
        assert_eq!(
            (c.vcpus, c.timeout, c.use_pvh, c.verbose),
            (1, None, true, false)
        );
        assert_eq!(c.command, ["sh", "-c", "echo 'a b'"]);
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
        let c = r.to_config();
        assert_eq!((c.mem_bytes, c.vcpus), (1 << 30, 2));
        assert_eq!(c.timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.extra_cmdline.as_deref(), Some("ip=1"));
        assert!(c.verbose && !c.use_pvh && c.command.is_empty());
    }

    #[test]
    fn disks_and_rng() {
        let c = parse(&[
            "--kernel",
            "k",
            "--disk",
            "a.img",
            "--disk",
            "b.img,ro,id=x",
            "--rng",
        ])
        .unwrap()
        .to_config();
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[0].path, PathBuf::from("a.img"));
        assert!(c.disks[1].read_only && c.rng);
        let c = parse(&["--kernel", "k"]).unwrap().to_config();
        assert!(c.disks.is_empty() && !c.rng);
        let e = parse(&["--kernel", "k", "--disk", "x,bogus=1"]).unwrap_err();
        assert!(e.to_string().contains("unknown option 'bogus=1'"), "{e}");
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
        assert_eq!(r.env, [("EMPTY".into(), String::new())]);
    }

    #[test]
    fn sandbox_options() {
        let r = parse(&[
            "--kernel", "k", "-e", "A=1", "-e", "B=x=y", "-w", "/tmp", "-i", "--user", "1000:5",
        ])
        .unwrap();
        assert_eq!(
            r.env,
            [("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!((r.workdir.as_deref(), r.interactive), (Some("/tmp"), true));
        assert_eq!(r.user, Some((1000, Some(5))));
        assert_eq!(
            parse(&["--kernel", "k", "--user", "7"]).unwrap().user,
            Some((7, None))
        );
        assert!(parse(&["--kernel", "k", "-e", "NOVALUE"]).is_err());
        assert!(parse(&["--kernel", "k", "--user", "root"]).is_err());
    }

    #[test]
    fn console_and_vsock_options() {
        let c = parse(&["--kernel", "k"]).unwrap().to_config();
        assert_eq!((c.console, c.vsock), (ConsoleKind::Serial, None));
        let c = parse(&[
            "--kernel",
            "k",
            "--console",
            "virtio",
            "--vsock",
            "cid=7,socket=/tmp/k.sock",
        ])
        .unwrap()
        .to_config();
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
        let c = r.to_config();
        assert_eq!(c.nets.len(), 2);
        assert_eq!((c.nets[0].tap.as_str(), c.nets[0].mac), ("tap0", None));
        assert_eq!(c.nets[1].mac, Some([2, 0, 0, 0, 0, 1]));
        assert!(parse(&["--kernel", "k", "--net", "tap0"]).is_err());
        assert!(parse(&["--kernel", "k", "--net", "tap=t,mac=bad"]).is_err());
    }
}
