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
    /// A host directory packed into the initramfs next to kiln's init.
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
    /// Run kiln's guest agent instead of `command`: it connects to this host
    /// vsock port (needs `vsock`) and serves the sandbox protocol.
    pub agent_port: Option<u32>,
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
            agent_port: None,
        }
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
