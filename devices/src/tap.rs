//! A TAP network interface opened through /dev/net/tun, set up the way a
//! virtio-net backend needs it: Ethernet frames (IFF_TAP), no packet-info
//! prefix (IFF_NO_PI), a 12-byte virtio-net header in front of every frame
//! (IFF_VNET_HDR + TUNSETVNETHDRSZ), non-blocking.
//!
//! Opening a name that does not exist makes the kernel create a new,
//! non-persistent TAP with that name (this needs CAP_NET_ADMIN); it is down,
//! has no address and disappears when the file is closed.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// The size of `struct virtio_net_hdr_v1` (with `num_buffers`), which is
/// what the virtio 1.x header always is.
pub(crate) const VNET_HDR_LEN: usize = 12;

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub(crate) const MAX_IFNAME_LEN: usize = 15;

const TUN_PATH: &str = "/dev/net/tun";

/// `struct ifreq` as TUNSETIFF uses it: the name and the flags union member.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Why a TAP interface cannot be used. Each message is one line naming the
/// interface.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is not one the kernel accepts (see [`validate_ifname`]).
    #[error("invalid TAP interface name '{0}' (1 to 15 characters, no '/', ':' or whitespace)")]
    InvalidName(String),
    /// `/dev/net/tun` cannot be opened (no tun module, no device node).
    #[error("cannot open {TUN_PATH} for TAP interface '{name}': {source}")]
    OpenTun {
        /// The interface.
        name: String,
        /// Why the open failed.
        #[source]
        source: io::Error,
    },
    /// Creating the interface, or attaching to one this user does not own,
    /// needs CAP_NET_ADMIN.
    #[error("no permission to use TAP interface '{0}' (needs CAP_NET_ADMIN, or a persistent TAP owned by this user)")]
    Permission(String),
    /// Another process has the TAP open.
    #[error("TAP interface '{0}' is busy (another process has it open)")]
    Busy(String),
    /// An interface of that name exists but cannot be attached as a
    /// single-queue TAP with a virtio-net header.
    #[error("interface '{0}' exists but is not a TAP usable with these flags (a TUN, a multi-queue TAP or another kind of device)")]
    NotATap(String),
    /// A TAP to be created has a name already in use.
    #[error("cannot create TAP interface '{0}': an interface of that name exists")]
    Exists(String),
    /// Another TAP ioctl (or the device's eventfd) failed.
    #[error("TAP interface '{name}': {what} failed: {source}")]
    Ioctl {
        /// The interface.
        name: String,
        /// The call, e.g. `TUNSETIFF`.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

/// Checks an interface name the way the kernel's `dev_valid_name` does.
pub fn validate_ifname(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(TapError::InvalidName(name.to_string()))
    }
}

/// Whether a network interface with this name exists in the caller's
/// network namespace.
pub fn interface_exists(name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// An open TAP queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to (or, with CAP_NET_ADMIN, creates) the TAP interface `name`.
    pub(crate) fn open(name: &str) -> Result<Self, TapError> {
        validate_ifname(name)?;
        let existed = interface_exists(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;

        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and may update) a `struct ifreq`, which
        // `IfReq` lays out with the same size; the fd is a tun device.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match err.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission(name),
                Some(libc::EBUSY) => TapError::Busy(name),
                Some(libc::EINVAL) if existed => TapError::NotATap(name),
                _ => TapError::Ioctl {
                    name,
                    what: "TUNSETIFF",
                    source: err,
                },
            });
        }
        if !existed {
            log::info!(
                "TAP interface '{name}' did not exist: created it (down, no address; it disappears when kiln exits)"
            );
        }
        let tap = Self {
            file,
            name: name.to_string(),
        };
        tap.ioctl_int(
            "TUNSETVNETHDRSZ",
            libc::TUNSETVNETHDRSZ as _,
            VNET_HDR_LEN as _,
        )?;
        // virtio 1.x headers are little-endian; this is the default on
        // little-endian hosts, and kernels without the ioctl are LE-only.
        if let Err(e) = tap.ioctl_int("TUNSETVNETLE", libc::TUNSETVNETLE as _, 1) {
            log::debug!("{e}");
        }
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// Creates the TAP interface `name` with kiln's flags and makes it
    /// persistent (TUNSETPERSIST): it stays, down and without an address,
    /// after this returns, until someone deletes it (`ip link del`), so
    /// that it can be configured before a VM attaches to it with
    /// [`Tap::open`]'s flags. A name that already exists is refused
    /// ([`TapError::Exists`]): the caller owns what it creates.
    pub fn create_persistent(name: &str) -> Result<(), TapError> {
        validate_ifname(name)?;
        if interface_exists(name) {
            return Err(TapError::Exists(name.to_string()));
        }
        let tap = Self::open(name)?;
        tap.ioctl_val("TUNSETPERSIST", libc::TUNSETPERSIST as _, 1)
    }

    /// The interface's MTU (SIOCGIFMTU).
    pub(crate) fn mtu(&self) -> Result<u32, TapError> {
        // SAFETY: creating a socket has no memory-safety preconditions.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return self.check(-1, "socket for SIOCGIFMTU").map(|_| 0);
        }
        // SAFETY: `sock` is a new fd owned by nothing else.
        let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(sock) };
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..self.name.len()].copy_from_slice(self.name.as_bytes());
        // SAFETY: SIOCGIFMTU writes an int at the union's start (where
        // `flags` and the padding after it lie) of a live `struct ifreq`.
        let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU as _, &mut req) };
        self.check(ret, "SIOCGIFMTU")?;
        let flags = req.flags.to_ne_bytes();
        let mtu = [flags[0], flags[1], req._pad[0], req._pad[1]];
        Ok(u32::from_ne_bytes(mtu))
    }

    /// Tells the kernel which offloads the reader (the guest) accepts:
    /// `TUN_F_*` flags. Without TUN_F_CSUM the kernel hands over only frames
    /// with complete checksums; without TUN_F_TSO* no GSO frames.
    pub(crate) fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        self.ioctl_val(
            "TUNSETOFFLOAD",
            libc::TUNSETOFFLOAD as _,
            flags as libc::c_ulong,
        )
    }

    fn ioctl_int(
        &self,
        what: &'static str,
        req: libc::c_ulong,
        value: libc::c_int,
    ) -> Result<(), TapError> {
        // SAFETY: these TUN ioctls read one `int` through the pointer, which
        // points to a live local.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                req as _,
                &value as *const libc::c_int,
            )
        };
        self.check(ret, what)
    }

    fn ioctl_val(
        &self,
        what: &'static str,
        req: libc::c_ulong,
        value: libc::c_ulong,
    ) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD and TUNSETPERSIST take their argument by
        // value; no memory is accessed.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), req as _, value) };
        self.check(ret, what)
    }

    fn check(&self, ret: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if ret < 0 {
            Err(TapError::Ioctl {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            })
        } else {
            Ok(())
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Read for Tap {
    /// One frame (virtio-net header + Ethernet frame) per call.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for Tap {
    /// One frame (virtio-net header + Ethernet frame) per call.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        for good in ["tap0", "a", "kiln-tap.1", "123456789012345"] {
            assert!(validate_ifname(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "1234567890123456",
            "t\0",
        ] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
        let msg = Tap::open("bad/name").unwrap_err().to_string();
        assert!(msg.contains("'bad/name'"), "{msg}");
    }

    /// Real TAPs, in a network namespace private to the test thread (it
    /// disappears with the thread): creation, EBUSY, not-a-TAP, offloads.
    #[test]
    fn real_tap_errors_name_the_interface() {
        if !kiln_prereq::require(
            kiln_prereq::is_root() && std::path::Path::new(TUN_PATH).exists(),
            &format!("needs root and {TUN_PATH}"),
        ) {
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare only changes this thread's network namespace.
            let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "unshare: {}", io::Error::last_os_error());
            assert!(!interface_exists("kilntap0"));
            let tap = Tap::open("kilntap0").expect("creating a TAP as root");
            assert!(interface_exists("kilntap0"));
            tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
                .unwrap();
            assert_eq!(tap.mtu().unwrap(), 1500);
            let busy = Tap::open("kilntap0").unwrap_err();
            assert!(matches!(busy, TapError::Busy(_)), "{busy}");
            assert!(busy.to_string().contains("'kilntap0' is busy"), "{busy}");
            let lo = Tap::open("lo").unwrap_err();
            assert!(matches!(lo, TapError::NotATap(_)), "{lo}");
            assert!(lo.to_string().contains("'lo'"), "{lo}");
            drop(tap);
            assert!(
                !interface_exists("kilntap0"),
                "a created TAP is not persistent"
            );
            // A persistent one stays after its creator's fd is closed, a
            // VM can attach to it, and a second creation is refused.
            Tap::create_persistent("kilntap1").expect("creating a persistent TAP");
            assert!(interface_exists("kilntap1"));
            let attached = Tap::open("kilntap1").expect("attaching to the persistent TAP");
            let exists = Tap::create_persistent("kilntap1").unwrap_err();
            assert!(matches!(exists, TapError::Exists(_)), "{exists}");
            assert!(exists.to_string().contains("'kilntap1'"), "{exists}");
            drop(attached);
            assert!(interface_exists("kilntap1"), "persistent after detaching");
        })
        .join()
        .unwrap();
    }
}
