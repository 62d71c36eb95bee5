//! What a VM run is made of, and the parsing of human-friendly sizes and
//! durations shared by the CLI and the library.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// Default guest memory: 256 MiB.
pub const DEFAULT_MEM_BYTES: u64 = 256 << 20;

/// Everything needed to boot one VM and run one command in it.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// ELF vmlinux (PVH entry used when present) or bzImage.
    pub kernel: PathBuf,
    /// A user initramfs; kiln's init is appended to it as a second archive.
    pub initrd: Option<PathBuf>,
    /// The root file system (see `crate::rootfs`): a directory or tar
    /// archive packed into the initramfs next to kiln's init, or an ext2/3/4
    /// image attached (as a scratch copy) as the first disk and switched to.
    pub rootfs: Option<PathBuf>,
    /// Appended to kiln's default kernel command line.
    pub extra_cmdline: Option<String>,
    pub mem_bytes: u64,
    pub vcpus: u8,
    /// Wall-clock limit for the whole VM.
    pub timeout: Option<Duration>,
    /// Command for kiln's init; empty means `/bin/sh`.
    pub command: Vec<OsString>,
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
    /// virtio-net devices, in guest order (eth0 first).
    pub nets: Vec<NetConfig>,
    /// Run kiln's guest agent instead of `command`: it connects to this host
    /// vsock port (needs `vsock`) and serves the sandbox protocol.
    pub agent_port: Option<u32>,
}

/// One `--disk PATH[,ro][,id=NAME]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// A raw image file (or block device).
    pub path: PathBuf,
    pub read_only: bool,
    /// Serial number the guest sees (at most 20 bytes); default: the file name.
    pub id: Option<String>,
}

/// Longest disk id virtio-blk can report.
pub const DISK_ID_MAX: usize = 20;

/// Parses `PATH[,ro][,id=NAME]` (options in any order; PATH cannot contain ',').
pub fn parse_disk(text: &str) -> Result<DiskConfig, String> {
    let mut parts = text.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err("missing image path (PATH[,ro][,id=NAME])".to_string());
    }
    let mut disk = DiskConfig {
        path: PathBuf::from(path),
        read_only: false,
        id: None,
    };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => disk.read_only = true,
            Some(("id", id)) => {
                if id.is_empty() || id.len() > DISK_ID_MAX {
                    return Err("id must be 1 to 20 bytes".to_string());
                }
                if !id.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err("id must be printable ASCII without spaces".to_string());
                }
                disk.id = Some(id.to_string());
            }
            _ => return Err(format!("unknown option '{opt}' (expected ro or id=NAME)")),
        }
    }
    Ok(disk)
}

/// A virtio-net device on a host TAP interface: `tap=NAME[,mac=MAC]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The TAP interface (in kiln's network namespace). A name that does not
    /// exist is created (needs CAP_NET_ADMIN) and vanishes when kiln exits.
    pub tap: String,
    /// The guest's MAC address; None derives a stable, locally administered
    /// one from the TAP name.
    pub mac: Option<[u8; 6]>,
}

/// Parses `tap=NAME[,mac=MAC]`.
pub fn parse_net(text: &str) -> Result<NetConfig, String> {
    let mut tap = None;
    let mut mac = None;
    for part in text.split(',') {
        match part.split_once('=') {
            Some(("tap", name)) if tap.is_none() => {
                kiln_devices::tap::validate_ifname(name).map_err(|e| e.to_string())?;
                tap = Some(name.to_string());
            }
            Some(("mac", m)) if mac.is_none() => {
                mac = Some(kiln_devices::virtio::net::MacAddr::parse(m)?.0);
            }
            _ => {
                return Err(format!(
                    "'{text}': expected tap=NAME[,mac=MAC] (unknown or repeated '{part}')"
                ))
            }
        }
    }
    let tap = tap.ok_or_else(|| format!("'{text}': tap=NAME is required"))?;
    Ok(NetConfig { tap, mac })
}

impl VmConfig {
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            rootfs: None,
            extra_cmdline: None,
            mem_bytes: DEFAULT_MEM_BYTES,
            vcpus: 1,
            timeout: None,
            command: Vec::new(),
            verbose: false,
            use_pvh: true,
            console: ConsoleKind::Serial,
            vsock: None,
            disks: Vec::new(),
            rng: false,
            nets: Vec::new(),
            agent_port: None,
        }
    }

    /// The user's own init when the guest is a user initrd started by it
    /// (`--initrd` with `--cmdline rdinit=PATH`, no `--rootfs`): kiln's init
    /// and agent then never run, so kiln adds neither.
    pub fn own_init(&self) -> Option<&str> {
        if self.initrd.is_none() || self.rootfs.is_some() {
            return None;
        }
        crate::boot::cmdline::user_rdinit(self.extra_cmdline.as_deref())
    }
}

/// The guest's console (/dev/console): the UART (ttyS0) or a virtio console
/// (hvc0). The UART is present either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConsoleKind {
    #[default]
    Serial,
    Virtio,
}

/// Parses `serial` or `virtio`.
pub fn parse_console_kind(text: &str) -> Result<ConsoleKind, String> {
    match text.trim() {
        "serial" => Ok(ConsoleKind::Serial),
        "virtio" => Ok(ConsoleKind::Virtio),
        other => Err(format!("'{other}': the console is 'serial' or 'virtio'")),
    }
}

/// A virtio-vsock device: the guest's CID and the host Unix socket that host
/// programs connect to (guest connections to port P go to `socket_P`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    pub cid: u64,
    pub socket: PathBuf,
}

/// Parses `cid=N,socket=PATH` (either order; N from 3 to 4294967294).
pub fn parse_vsock(text: &str) -> Result<VsockConfig, String> {
    let (mut cid, mut socket) = (None, None);
    for part in text.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}': expected key=value (cid=N,socket=PATH)"))?;
        match key.trim() {
            "cid" if cid.is_none() => {
                let n: u64 = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("cid '{value}' is not a number"))?;
                if !(3..=u64::from(u32::MAX) - 1).contains(&n) {
                    return Err(format!(
                        "cid {n} is reserved or too large (use 3 to {})",
                        u32::MAX - 1
                    ));
                }
                cid = Some(n);
            }
            "socket" if socket.is_none() => {
                if value.is_empty() {
                    return Err("socket path is empty".into());
                }
                socket = Some(PathBuf::from(value));
            }
            "cid" | "socket" => return Err(format!("'{key}' given twice")),
            other => return Err(format!("unknown vsock option '{other}' (cid, socket)")),
        }
    }
    match (cid, socket) {
        (Some(cid), Some(socket)) => Ok(VsockConfig { cid, socket }),
        _ => Err("both cid=N and socket=PATH are required".into()),
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
        let twice = parse_net("tap=t,mac=02:00:00:00:00:01,mac=02:00:00:00:00:02").unwrap_err();
        assert!(
            twice.contains("repeated 'mac=02:00:00:00:00:02'"),
            "{twice}"
        );
        assert_eq!(
            parse_vsock("cid=3,socket=/a,socket=/b").unwrap_err(),
            "'socket' given twice"
        );
        assert_eq!(
            parse_vsock("cid=3,cid=4,socket=/a").unwrap_err(),
            "'cid' given twice"
        );
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
        let d = parse_disk("a.img").unwrap();
        assert_eq!((d.path, d.read_only, d.id), ("a.img".into(), false, None));
        let d = parse_disk("/x/b.img,ro,id=roserial").unwrap();
        assert!(d.read_only);
        assert_eq!(d.id.as_deref(), Some("roserial"));
        let d = parse_disk("c,id=s1,ro").unwrap();
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
            let e = parse_disk(bad).unwrap_err();
            assert_eq!(e.lines().count(), 1, "{bad}: {e}");
        }
        assert!(parse_disk("x,bogus=1").unwrap_err().contains("bogus=1"));
        assert!(parse_disk(&format!("x,id={}", "s".repeat(21))).is_err());
        assert!(parse_disk(&format!("x,id={}", "s".repeat(20))).is_ok());
    }

    #[test]
    fn net_options() {
        let n = parse_net("tap=tap0").unwrap();
        assert_eq!((n.tap.as_str(), n.mac), ("tap0", None));
        let n = parse_net("tap=kiln1,mac=02:00:00:00:00:07").unwrap();
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
            assert!(parse_net(bad).is_err(), "{bad}");
        }
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
        let v = parse_vsock("cid=3,socket=/tmp/v.sock").unwrap();
        assert_eq!((v.cid, v.socket), (3, PathBuf::from("/tmp/v.sock")));
        let v = parse_vsock("socket=/a/b,cid=4294967294").unwrap();
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
            assert!(parse_vsock(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_console_kind("virtio"), Ok(ConsoleKind::Virtio));
        assert_eq!(parse_console_kind("serial"), Ok(ConsoleKind::Serial));
        assert!(parse_console_kind("hvc").is_err());
    }
}
