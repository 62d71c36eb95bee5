//! kiln's guest init, and what it shares with the monitor: the exec spec
//! format, the paths kiln puts in the initramfs and the exit codes init
//! reports on its own behalf.
//!
//! The crate builds two things:
//!
//! - the `kiln-init` binary, PID 1 in every guest kiln boots: the monitor's
//!   build script compiles it as a small static executable and embeds it
//!   into each initramfs at [`INIT_PATH`]. It mounts `/proc`, `/sys`, `/dev`
//!   and `/tmp`, switches root into an image root ([`ROOT_PARAM`]), then
//!   either runs the one command in [`SPEC_PATH`] or, when the initramfs asks
//!   for it ([`agent::AGENT_PATH`]), serves the sandbox protocol; it reports
//!   the status on kiln's [`control`] page and reboots;
//! - this library, which both ends share so they cannot disagree: the exec
//!   spec ([`spec`]), the sandbox protocol ([`protocol`]), the agent
//!   ([`agent`], also run on the host by kiln's tests) and the control-page
//!   ABI as the guest sees it.
//!
//! It depends on nothing of the monitor's (not even `kiln-devices`), so the
//! guest binary stays small.

#![warn(missing_docs)]

pub mod agent;
pub mod identity;
pub mod net;
pub mod protocol;
pub mod spawn;
pub mod spec;

/// Where kiln puts its init in the initramfs (`rdinit=` on the command line).
pub const INIT_PATH: &str = "/kiln/init";
/// Where init reads its `ExecSpec` from.
pub const SPEC_PATH: &str = "/kiln/exec";
/// Kernel command-line parameter naming a block device (an ext2/3/4 file
/// system) that init mounts and switches root into before it runs anything:
/// `kiln.root=/dev/vda`. The last one wins. (The dot makes the kernel treat
/// it as a module parameter: it is neither init's argument nor environment.)
pub const ROOT_PARAM: &str = "kiln.root";

/// The `kiln.root=` value prefix of a shared root: `virtiofs:TAG` (the
/// share is the root, writable) or `virtiofs:TAG,overlay` (the share,
/// read-only, under a tmpfs overlay that takes the guest's writes).
const SHARE_ROOT_PREFIX: &[u8] = b"virtiofs:";

/// What a `kiln.root=` value names.
#[derive(Debug, PartialEq, Eq)]
pub enum RootSource {
    /// A block device holding an ext2/3/4 file system.
    Device(Vec<u8>),
    /// A virtio-fs share.
    Share {
        /// The share's tag (the mount source).
        tag: Vec<u8>,
        /// Mounted read-only under a tmpfs overlay that takes the writes.
        overlay: bool,
    },
}

impl RootSource {
    /// Reads a `kiln.root=` value (not empty).
    pub fn parse(value: &[u8]) -> Self {
        let Some(share) = value.strip_prefix(SHARE_ROOT_PREFIX) else {
            return Self::Device(value.to_vec());
        };
        match share.strip_suffix(b",overlay") {
            Some(tag) => Self::Share {
                tag: tag.to_vec(),
                overlay: true,
            },
            None => Self::Share {
                tag: share.to_vec(),
                overlay: false,
            },
        }
    }
}

/// The command-line word for a shared root (the monitor writes it).
pub fn share_root_word(tag: &str, overlay: bool) -> String {
    let prefix = String::from_utf8_lossy(SHARE_ROOT_PREFIX);
    let overlay = if overlay { ",overlay" } else { "" };
    format!("{ROOT_PARAM}={prefix}{tag}{overlay}")
}

/// Kernel command-line parameter naming a shared directory (virtio-fs)
/// that init mounts before it runs anything, once per share:
/// `kiln.share=TAG,MODE,PATH` (MODE `ro` or `rw`; PATH absolute, the rest
/// of the word). See [`share_word`] and [`share_params`].
pub const SHARE_PARAM: &str = "kiln.share";

/// One virtio-fs mount as init reads it from the command line.
#[derive(Debug, PartialEq, Eq)]
pub struct ShareMount {
    /// The device's tag (the mount source).
    pub tag: Vec<u8>,
    /// Mounted read-only.
    pub read_only: bool,
    /// The mount point.
    pub path: Vec<u8>,
}

/// The command-line word for a share (the monitor writes it).
pub fn share_word(tag: &str, read_only: bool, path: &str) -> String {
    let mode = if read_only { "ro" } else { "rw" };
    format!("{SHARE_PARAM}={tag},{mode},{path}")
}

/// Every `kiln.share=` word of `cmdline`, in order; a malformed one is an
/// error naming it (init then runs nothing).
pub fn share_params(cmdline: &[u8]) -> Result<Vec<ShareMount>, String> {
    let prefix = format!("{SHARE_PARAM}=");
    cmdline
        .split(|b| b.is_ascii_whitespace())
        .filter_map(|word| word.strip_prefix(prefix.as_bytes()))
        .map(|value| {
            let mut parts = value.splitn(3, |&b| b == b',');
            let (tag, mode, path) = (parts.next(), parts.next(), parts.next());
            let bad = || {
                format!(
                    "{prefix}{}: expected TAG,ro|rw,PATH",
                    String::from_utf8_lossy(value)
                )
            };
            let (Some(tag), Some(mode), Some(path)) = (tag, mode, path) else {
                return Err(bad());
            };
            let read_only = match mode {
                b"ro" => true,
                b"rw" => false,
                _ => return Err(bad()),
            };
            if tag.is_empty() || !path.starts_with(b"/") {
                return Err(bad());
            }
            Ok(ShareMount {
                tag: tag.to_vec(),
                read_only,
                path: path.to_vec(),
            })
        })
        .collect()
}

/// Kernel command-line parameter asking init for a tmpfs at a path of the
/// final root, once per mount, mounted after the shares and before
/// anything runs: `kiln.tmpfs=SIZE,MODE,FLAGS,PATH`: SIZE in bytes and MODE
/// in octal (`-`: tmpfs's default), FLAGS a `+`-joined list of `ro`,
/// `nosuid`, `nodev`, `noexec`, `strictatime`, `noatime` (`-`: none), PATH absolute, the rest of the
/// word. See [`TmpfsMount`].
pub const TMPFS_PARAM: &str = "kiln.tmpfs";

/// One tmpfs init mounts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TmpfsMount {
    /// The mount point (absolute; created if missing).
    pub path: Vec<u8>,
    /// Its size limit in bytes (`None`: half the guest's memory).
    pub size: Option<u64>,
    /// The root directory's permission bits (`None`: 1777).
    pub mode: Option<u32>,
    /// MS_RDONLY.
    pub read_only: bool,
    /// MS_NOSUID.
    pub nosuid: bool,
    /// MS_NODEV.
    pub nodev: bool,
    /// MS_NOEXEC.
    pub noexec: bool,
    /// MS_STRICTATIME (else relatime, the kernel's default).
    pub strictatime: bool,
    /// MS_NOATIME.
    pub noatime: bool,
}

impl TmpfsMount {
    /// The flag names of the word, in its order, with whether each is set.
    fn flags(&self) -> [(&'static str, bool, libc::c_ulong); 6] {
        [
            ("ro", self.read_only, libc::MS_RDONLY),
            ("nosuid", self.nosuid, libc::MS_NOSUID),
            ("nodev", self.nodev, libc::MS_NODEV),
            ("noexec", self.noexec, libc::MS_NOEXEC),
            ("strictatime", self.strictatime, libc::MS_STRICTATIME),
            ("noatime", self.noatime, libc::MS_NOATIME),
        ]
    }

    /// The command-line word for this mount (the monitor writes it).
    pub fn word(&self) -> String {
        let size = self.size.map_or("-".into(), |s| s.to_string());
        let mode = self.mode.map_or("-".into(), |m| format!("{m:o}"));
        let flags: Vec<&str> = self.flags().iter().filter(|f| f.1).map(|f| f.0).collect();
        let flags = match flags.is_empty() {
            true => "-".into(),
            false => flags.join("+"),
        };
        let path = String::from_utf8_lossy(&self.path);
        format!("{TMPFS_PARAM}={size},{mode},{flags},{path}")
    }

    /// The mount(2) flags.
    pub fn mount_flags(&self) -> libc::c_ulong {
        self.flags()
            .iter()
            .filter(|f| f.1)
            .fold(0, |flags, f| flags | f.2)
    }

    /// The mount(2) data: `size=` and `mode=` when given.
    pub fn mount_data(&self) -> String {
        let mut data = Vec::new();
        if let Some(size) = self.size {
            data.push(format!("size={size}"));
        }
        if let Some(mode) = self.mode {
            data.push(format!("mode={mode:o}"));
        }
        data.join(",")
    }
}

/// Every `kiln.tmpfs=` word of `cmdline`, in order; a malformed one is an
/// error naming it (init then runs nothing).
pub fn tmpfs_params(cmdline: &[u8]) -> Result<Vec<TmpfsMount>, String> {
    let prefix = format!("{TMPFS_PARAM}=");
    cmdline
        .split(|b| b.is_ascii_whitespace())
        .filter_map(|word| word.strip_prefix(prefix.as_bytes()))
        .map(|value| {
            let bad = || {
                format!(
                    "{prefix}{}: expected SIZE,MODE,FLAGS,PATH",
                    String::from_utf8_lossy(value)
                )
            };
            let text = std::str::from_utf8(value).map_err(|_| bad())?;
            let mut parts = text.splitn(4, ',');
            let (Some(size), Some(mode), Some(flags), Some(path)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(bad());
            };
            let mut mount = TmpfsMount {
                path: path.as_bytes().to_vec(),
                ..TmpfsMount::default()
            };
            if !path.starts_with('/') {
                return Err(bad());
            }
            if size != "-" {
                mount.size = Some(size.parse().map_err(|_| bad())?);
            }
            if mode != "-" {
                let mode = u32::from_str_radix(mode, 8).map_err(|_| bad())?;
                mount.mode = Some(Some(mode).filter(|m| *m <= 0o7777).ok_or_else(bad)?);
            }
            for flag in flags.split('+').filter(|f| *f != "-") {
                match flag {
                    "ro" => mount.read_only = true,
                    "nosuid" => mount.nosuid = true,
                    "nodev" => mount.nodev = true,
                    "noexec" => mount.noexec = true,
                    "strictatime" => mount.strictatime = true,
                    "noatime" => mount.noatime = true,
                    _ => return Err(bad()),
                }
            }
            Ok(mount)
        })
        .collect()
}

/// Exit codes init reports itself, as GNU `env` and shells use them.
/// Init could not set up or read the spec (the command never ran).
pub const EXIT_INIT_FAILED: u32 = 125;
/// The command was found but could not be executed (e.g. permission denied).
pub const EXIT_CANNOT_EXECUTE: u32 = 126;
/// The command was not found.
pub const EXIT_NOT_FOUND: u32 = 127;

/// The control page ABI as the guest sees it. Mirrors `kiln_devices::control`
/// and the monitor's layout (a test in the monitor checks they agree); kept
/// here so the guest binary does not pull in the device crate.
pub mod control {
    /// Guest physical address of the page.
    pub const PAGE_ADDR: u64 = 0xd000_0000;
    /// Size of the page (what init maps).
    pub const PAGE_SIZE: usize = 0x1000;
    /// What `REG_MAGIC` reads: "kiln", little-endian.
    pub const MAGIC: u32 = u32::from_le_bytes(*b"kiln");
    /// Offset of the magic register (read).
    pub const REG_MAGIC: usize = 0x00;
    /// Offset of the boot-timer register (write the stage reached).
    pub const REG_BOOT_TIMER: usize = 0x04;
    /// Offset of the exit-report register (write `(kind << 8) | code`).
    pub const REG_EXIT: usize = 0x08;
    /// Boot-timer stage: user space (init) started.
    pub const STAGE_USERSPACE: u32 = 1;
    /// Exit kind: the command exited with `code`.
    pub const EXIT_KIND_CODE: u32 = 0;
    /// Exit kind: the command was killed by signal `code`.
    pub const EXIT_KIND_SIGNAL: u32 = 1;
}

#[cfg(test)]
mod share_tests {
    use super::*;

    #[test]
    fn root_words_name_a_device_or_a_share() {
        let value = |word: String| word.split_once('=').unwrap().1.as_bytes().to_vec();
        assert_eq!(
            RootSource::parse(&value(share_root_word("kiln-share2", true))),
            RootSource::Share {
                tag: b"kiln-share2".to_vec(),
                overlay: true
            }
        );
        assert_eq!(
            RootSource::parse(&value(share_root_word("kiln-share0", false))),
            RootSource::Share {
                tag: b"kiln-share0".to_vec(),
                overlay: false
            }
        );
        assert_eq!(
            RootSource::parse(b"/dev/vda"),
            RootSource::Device(b"/dev/vda".to_vec())
        );
    }

    #[test]
    fn share_words_round_trip() {
        let line = format!(
            "console=ttyS0 {} quiet {}",
            share_word("kiln-share0", true, "/mnt/a,b:c"),
            share_word("kiln-share1", false, "/work")
        );
        let mounts = share_params(line.as_bytes()).unwrap();
        assert_eq!(
            mounts,
            vec![
                ShareMount {
                    tag: b"kiln-share0".to_vec(),
                    read_only: true,
                    path: b"/mnt/a,b:c".to_vec()
                },
                ShareMount {
                    tag: b"kiln-share1".to_vec(),
                    read_only: false,
                    path: b"/work".to_vec()
                },
            ]
        );
        assert_eq!(share_params(b"console=ttyS0").unwrap(), vec![]);
    }

    #[test]
    fn tmpfs_words_round_trip() {
        let scratch = TmpfsMount {
            path: b"/scratch".to_vec(),
            size: Some(1 << 20),
            mode: Some(0o1777),
            read_only: false,
            nosuid: true,
            nodev: true,
            noexec: true,
            strictatime: true,
            noatime: false,
        };
        assert_eq!(
            scratch.word(),
            "kiln.tmpfs=1048576,1777,nosuid+nodev+noexec+strictatime,/scratch"
        );
        assert_eq!(scratch.mount_data(), "size=1048576,mode=1777");
        assert_eq!(
            scratch.mount_flags(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_STRICTATIME
        );
        let plain = TmpfsMount {
            path: b"/a,b".to_vec(),
            read_only: true,
            noatime: true,
            ..TmpfsMount::default()
        };
        assert_eq!(plain.word(), "kiln.tmpfs=-,-,ro+noatime,/a,b");
        assert_eq!(plain.mount_data(), "");
        let line = format!("quiet {} {} x", scratch.word(), plain.word());
        assert_eq!(tmpfs_params(line.as_bytes()).unwrap(), [scratch, plain]);
        for bad in [
            "kiln.tmpfs=1,2,-",
            "kiln.tmpfs=x,-,-,/a",
            "kiln.tmpfs=-,9,-,/a",
            "kiln.tmpfs=-,17777,-,/a",
            "kiln.tmpfs=-,-,rw,/a",
            "kiln.tmpfs=-,-,-,a",
        ] {
            let err = tmpfs_params(bad.as_bytes()).unwrap_err();
            assert!(
                err.contains("expected SIZE,MODE,FLAGS,PATH"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn malformed_share_words_are_errors() {
        for bad in [
            "kiln.share=t,ro",
            "kiln.share=t,rx,/a",
            "kiln.share=t,rw,a",
            "kiln.share=,rw,/a",
        ] {
            let err = share_params(bad.as_bytes()).unwrap_err();
            assert!(err.contains("expected TAG,ro|rw,PATH"), "{bad}: {err}");
        }
    }
}
