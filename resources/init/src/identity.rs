//! A guest's identity as the host's `FRESH` asks for it (see
//! `protocol::Identity`): its hostname, a new machine id for a restored
//! copy, and new MAC addresses for the interfaces whose device the host
//! moved to another address. The agent takes it before any command runs.

use crate::protocol::{Identity, MacChange};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// The machine id files a root may have; `var/lib/dbus/machine-id` is
/// often a link to the first (then only the first is written).
pub const MACHINE_ID_PATHS: [&str; 2] = ["etc/machine-id", "var/lib/dbus/machine-id"];
/// Where the guest lists its interfaces.
const INTERFACES: &str = "/sys/class/net";
/// `ARPHRD_ETHER`: the address family of an Ethernet hardware address.
const ARPHRD_ETHER: libc::sa_family_t = 1;

/// Takes `identity`; the error names the step that failed. Needs root's
/// capabilities (the agent is PID 1).
pub fn apply(identity: &Identity) -> Result<(), String> {
    if let Some(name) = &identity.hostname {
        // SAFETY: the pointer and length describe a live byte slice.
        if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
            return Err(format!("sethostname: {}", io::Error::last_os_error()));
        }
    }
    if identity.new_machine_id {
        renew_machine_id(Path::new("/"))?;
    }
    set_macs(&identity.macs)
}

/// Writes a new random machine id (drawn after the host's entropy went
/// into the pool: no other copy has it) to each machine id file under
/// `root` that is a regular file (all get the same id); a root without
/// one is left as it is.
fn renew_machine_id(root: &Path) -> Result<(), String> {
    let id = format_machine_id(random_bytes()?);
    for path in MACHINE_ID_PATHS.map(|p| root.join(p)) {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.file_type().is_file() {
            continue;
        }
        // Replaced whole (a reader never sees half an id), with its mode.
        let new = path.with_extension("kiln-new");
        std::fs::write(&new, &id)
            .and_then(|()| std::fs::set_permissions(&new, meta.permissions()))
            .and_then(|()| std::fs::rename(&new, &path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&new);
                format!("writing a new {}: {e}", path.display())
            })?;
    }
    Ok(())
}

/// 16 bytes from the guest kernel's CRNG.
fn random_bytes() -> Result<[u8; 16], String> {
    let mut bytes = [0u8; 16];
    fill_random(&mut bytes).map_err(|e| format!("getrandom: {e}"))?;
    Ok(bytes)
}

/// Fills `buf` from getrandom(2) (the kernel's CRNG; the host's entropy
/// for `FRESH` too).
pub fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, which getrandom fills.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match n {
            n if n > 0 => filled += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// A machine id as systemd writes one: a random (version 4) UUID as 32
/// lowercase hex digits and a newline.
fn format_machine_id(mut id: [u8; 16]) -> String {
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    let mut text: String = id.iter().map(|b| format!("{b:02x}")).collect();
    text.push('\n');
    text
}

/// Gives each interface whose address is a change's `from` the change's
/// `to` (SIOCSIFHWADDR; virtio-net takes it while up). An interface takes
/// one change at most; a change no interface matches is an error: the
/// guest would go on with the address of another copy.
fn set_macs(changes: &[MacChange]) -> Result<(), String> {
    if changes.is_empty() {
        return Ok(());
    }
    // SAFETY: creating a socket has no memory-safety preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", io::Error::last_os_error()));
    }
    // SAFETY: a new fd owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut names: Vec<String> = std::fs::read_dir(INTERFACES)
        .map_err(|e| format!("listing {INTERFACES}: {e}"))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.len() < libc::IFNAMSIZ)
        .collect();
    names.sort();
    for change in changes {
        let found = names
            .iter()
            .position(|name| hardware_address(&sock, name).ok() == Some(change.from));
        let Some(index) = found else {
            return Err(format!(
                "no interface has MAC {} (to become {})",
                mac_text(&change.from),
                mac_text(&change.to)
            ));
        };
        let name = names.remove(index);
        set_hardware_address(&sock, &name, &change.to)
            .map_err(|e| format!("setting the MAC of {name}: {e}"))?;
    }
    Ok(())
}

fn mac_text(mac: &[u8; 6]) -> String {
    let hex: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    hex.join(":")
}

/// A `struct ifreq` naming `name` (shorter than IFNAMSIZ).
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data (a name and a union of plain data);
    // zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

fn hardware_address(sock: &OwnedFd, name: &str) -> io::Result<[u8; 6]> {
    let mut req = ifreq(name);
    // SAFETY: SIOCGIFHWADDR fills the hwaddr member of a live ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR as _, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel wrote the hwaddr member (a sockaddr).
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    Ok(std::array::from_fn(|i| data[i] as u8))
}

fn set_hardware_address(sock: &OwnedFd, name: &str, mac: &[u8; 6]) -> io::Result<()> {
    let mut req = ifreq(name);
    // SAFETY: the union's hwaddr member is plain data; writing it whole.
    let hwaddr = unsafe { &mut req.ifr_ifru.ifru_hwaddr };
    hwaddr.sa_family = ARPHRD_ETHER;
    for (dst, src) in hwaddr.sa_data.iter_mut().zip(mac) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCSIFHWADDR reads a live ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFHWADDR as _, &req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine id is 32 lowercase hex digits and a newline, with the
    /// version 4 and variant bits systemd sets; no two draws are equal.
    #[test]
    fn machine_ids_are_random_v4_uuids_in_hex() {
        let id = format_machine_id([0xff; 16]);
        assert_eq!(id, "ffffffffffff4fffbfffffffffffffff\n");
        assert_eq!(
            format_machine_id([0; 16]),
            "00000000000040008000000000000000\n"
        );
        let a = format_machine_id(random_bytes().unwrap());
        let b = format_machine_id(random_bytes().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 33);
        assert!(a[..32]
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }

    /// A regular machine id file gets a new id and keeps its mode; one
    /// that links to the other is left a link (its target is renewed);
    /// a regular dbus copy gets the same new id; a root without any gets
    /// none.
    #[test]
    fn machine_id_files_are_replaced_where_the_root_has_them() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!("kiln-machine-id-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (etc, dbus) = (root.join("etc"), root.join("var/lib/dbus"));
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&dbus).unwrap();
        let old = "0123456789abcdef0123456789abcdef\n";
        std::fs::write(etc.join("machine-id"), old).unwrap();
        let read_only = std::fs::Permissions::from_mode(0o444);
        std::fs::set_permissions(etc.join("machine-id"), read_only).unwrap();
        // Absolute, as in a root: it is never followed.
        std::os::unix::fs::symlink("/etc/machine-id", dbus.join("machine-id")).unwrap();
        renew_machine_id(&root).unwrap();
        let new = std::fs::read_to_string(etc.join("machine-id")).unwrap();
        assert_ne!(new, old);
        assert_eq!(new.len(), 33);
        let mode = std::fs::metadata(etc.join("machine-id"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o444);
        assert!(std::fs::symlink_metadata(dbus.join("machine-id"))
            .unwrap()
            .file_type()
            .is_symlink());
        // A regular dbus copy is renewed too, to the same id.
        std::fs::remove_file(dbus.join("machine-id")).unwrap();
        std::fs::write(dbus.join("machine-id"), old).unwrap();
        renew_machine_id(&root).unwrap();
        let (a, b) = (
            std::fs::read_to_string(etc.join("machine-id")).unwrap(),
            std::fs::read_to_string(dbus.join("machine-id")).unwrap(),
        );
        assert_eq!(a, b);
        assert_ne!(a, new);
        // Nothing to renew: nothing made.
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::create_dir_all(&etc).unwrap();
        renew_machine_id(&root).unwrap();
        assert_eq!(std::fs::read_dir(&etc).unwrap().count(), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn macs_read_as_ip_prints_them() {
        assert_eq!(mac_text(&[2, 0x6b, 0, 0, 0xab, 1]), "02:6b:00:00:ab:01");
    }
}
