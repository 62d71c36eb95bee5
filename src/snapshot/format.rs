//! The snapshot's state file: a magic line, a header (one line of JSON) and
//! the saved state (JSON, serde_json: already one of kiln's dependencies,
//! maintained, and the state is a few kilobytes per vCPU), with a CRC-32
//! of the state in the header. Guest memory is a file of its own, next to it.

use std::io::Write;
use std::path::Path;

use kiln_devices::serial::SerialSnapshot;
use kiln_devices::virtio::block::OverlayState;
use kiln_devices::virtio::persist::TransportState;
use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

use super::dir::SnapshotDir;
use super::host_cpu::HostCpu;
use super::vcpu_state::VcpuState;
use super::vm_state::VmState;
use super::SnapshotError;
use crate::config::VmConfig;

/// The state file's name in a snapshot directory.
pub(crate) const STATE_FILE: &str = "vmstate";
/// The guest memory file's name in a snapshot directory.
pub(crate) const MEMORY_FILE: &str = "memory";

/// How every state file starts.
const MAGIC: &[u8] = b"kiln-snapshot\n";
/// Changed whenever a kiln could misread an older state file.
pub(crate) const FORMAT_VERSION: u32 = 2;
/// Far above any real state file (tens of kilobytes per vCPU): a larger
/// file is refused before it is read into memory.
const MAX_STATE_FILE: u64 = 64 << 20;

/// What a restore checks before it reads the state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Header {
    /// First: a reader checks it before it decodes the rest.
    pub format_version: u32,
    pub kiln_version: String,
    pub host_cpu: HostCpu,
    /// The guest TSC frequency (kHz).
    pub tsc_khz: u32,
    /// The CPUID vCPU 0 saw.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The size of the memory file.
    pub memory_bytes: u64,
    pub state_bytes: u64,
    pub state_crc32: u32,
}

/// Everything saved but guest memory.
#[derive(Serialize, Deserialize)]
pub(crate) struct SavedVm {
    /// The configuration the VM was built from.
    pub config: VmConfig,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub devices: DevicesState,
}

/// The devices' guest-visible state (version 2 on).
#[derive(Serialize, Deserialize)]
pub(crate) struct DevicesState {
    pub serial: SerialSnapshot,
    /// One per virtio device, in slot order (the order a boot of the saved
    /// configuration attaches them).
    pub virtio: Vec<TransportState>,
    /// The overlay disks (an image root): what the guest wrote.
    pub disks: Vec<SavedDisk>,
}

/// An overlay disk of a snapshot: its writes are in the file
/// [`disk_file`]`(slot)` of the snapshot directory.
#[derive(Serialize, Deserialize)]
pub(crate) struct SavedDisk {
    /// The virtio slot of its device.
    pub slot: usize,
    pub overlay: OverlayState,
}

/// The name of the file that holds the overlay of the disk in `slot`.
pub(crate) fn disk_file(slot: usize) -> String {
    format!("disk{slot}.overlay")
}

/// Writes a new state file into `dir` (an existing one is refused) and
/// returns its size. `header`'s state fields are filled in here.
pub(crate) fn write_state(
    dir: &SnapshotDir,
    mut header: Header,
    saved: &SavedVm,
) -> Result<u64, SnapshotError> {
    let path = dir.shown(STATE_FILE);
    let state = serde_json::to_vec(saved).map_err(|e| SnapshotError::Corrupt {
        path: path.clone(),
        reason: format!("cannot encode the state: {e}"),
    })?;
    header.state_bytes = state.len() as u64;
    header.state_crc32 = crc32fast::hash(&state);
    let header = serde_json::to_vec(&header).map_err(|e| SnapshotError::Corrupt {
        path: path.clone(),
        reason: format!("cannot encode the header: {e}"),
    })?;
    // The owner's only, as the memory file.
    let mut file = dir.create_file(STATE_FILE)?;
    let written = [MAGIC, &header, b"\n", &state]
        .iter()
        .try_for_each(|part| file.write_all(part));
    if let Err(e) = written {
        dir.remove_file(STATE_FILE); // created above: no one else's
        return Err(SnapshotError::io("write", &path)(e));
    }
    Ok((MAGIC.len() + header.len() + 1 + state.len()) as u64)
}

/// Reads and checks a state file: magic, complete, format version,
/// checksum, then decodes it.
pub(crate) fn read_state(path: &Path) -> Result<(Header, SavedVm), SnapshotError> {
    let corrupt = |reason: String| SnapshotError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let file = crate::boot::open_regular_file(path).map_err(SnapshotError::io("open", path))?;
    let size = file
        .metadata()
        .map_err(SnapshotError::io("read the size of", path))?
        .len();
    let mut bytes = Vec::new();
    if size <= MAX_STATE_FILE {
        // Bounded even if the file grows meanwhile.
        let mut bounded = std::io::Read::take(file, MAX_STATE_FILE + 1);
        std::io::Read::read_to_end(&mut bounded, &mut bytes)
            .map_err(SnapshotError::io("read", path))?;
    }
    if size > MAX_STATE_FILE || bytes.len() as u64 > MAX_STATE_FILE {
        return Err(corrupt(format!("larger than {} MiB", MAX_STATE_FILE >> 20)));
    }
    let Some(rest) = bytes.strip_prefix(MAGIC) else {
        return Err(match MAGIC.starts_with(&bytes) {
            true => SnapshotError::Truncated(path.to_owned()),
            false => SnapshotError::BadMagic(path.to_owned()),
        });
    };
    let Some(end) = rest.iter().position(|&b| b == b'\n') else {
        return Err(SnapshotError::Truncated(path.to_owned()));
    };
    let (header, state) = (&rest[..end], &rest[end + 1..]);
    let header: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| corrupt(format!("header: {e}")))?;
    let found = header
        .get("format_version")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| corrupt("header: no format_version".into()))?;
    if found != u64::from(FORMAT_VERSION) {
        return Err(SnapshotError::FormatVersion {
            path: path.to_owned(),
            found,
            expected: FORMAT_VERSION,
        });
    }
    let header: Header =
        serde_json::from_value(header).map_err(|e| corrupt(format!("header: {e}")))?;
    match (state.len() as u64).cmp(&header.state_bytes) {
        std::cmp::Ordering::Less => return Err(SnapshotError::Truncated(path.to_owned())),
        std::cmp::Ordering::Greater => return Err(corrupt("bytes after the state".into())),
        std::cmp::Ordering::Equal => {}
    }
    if crc32fast::hash(state) != header.state_crc32 {
        return Err(SnapshotError::Checksum(path.to_owned()));
    }
    let saved: SavedVm =
        serde_json::from_slice(state).map_err(|e| corrupt(format!("state: {e}")))?;
    Ok((header, saved))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::tests::TempDir;

    fn header() -> Header {
        Header {
            format_version: FORMAT_VERSION,
            kiln_version: "0.0.0".into(),
            host_cpu: HostCpu {
                vendor: "GenuineIntel".into(),
                model: "a test CPU".into(),
            },
            tsc_khz: 1_000_000,
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0x1234,
                ..Default::default()
            }],
            memory_bytes: 32 << 20,
            state_bytes: 0,
            state_crc32: 0,
        }
    }

    fn saved() -> SavedVm {
        let mut vcpu = VcpuState {
            cpuid: Vec::new(),
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debug_regs: Default::default(),
            lapic: Default::default(),
            msrs: vec![Default::default(); 3],
            vcpu_events: Default::default(),
        };
        vcpu.regs.rip = 0x20_1234;
        vcpu.xsave.region[100] = 0xdead_beef;
        vcpu.lapic.regs[0x350] = 7;
        vcpu.msrs[2].index = 0x6e0;
        vcpu.msrs[2].data = u64::MAX;
        SavedVm {
            config: VmConfig::new("guest.elf"),
            vcpus: vec![vcpu],
            vm: VmState {
                pit: Default::default(),
                clock: Default::default(),
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
            },
            devices: DevicesState {
                serial: SerialSnapshot {
                    baud_divisor: [12, 0],
                    interrupt_enable: 3,
                    interrupt_identification: 1,
                    line_control: 3,
                    line_status: 0x60,
                    modem_control: 8,
                    modem_status: 0xb0,
                    scratch: 0,
                    input: b"in".to_vec(),
                },
                virtio: vec![TransportState {
                    device_type: 19,
                    status: 15,
                    driver_features: 1 << 32,
                    config: 3u64.to_le_bytes().to_vec(),
                    queues: vec![Default::default(); 3],
                    ..Default::default()
                }],
                disks: Vec::new(),
            },
        }
    }

    #[test]
    fn a_state_file_reads_back_as_written() {
        let dir = TempDir::new("snapshot-format");
        let path = dir.0.join(STATE_FILE);
        let open = SnapshotDir::create(&dir.0).unwrap();
        let size = write_state(&open, header(), &saved()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
        let (read, state) = read_state(&path).unwrap();
        assert_eq!(read.host_cpu, header().host_cpu);
        assert_eq!(read.cpuid[0].eax, 0x1234);
        assert_eq!(read.tsc_khz, 1_000_000);
        assert_eq!(state.config, VmConfig::new("guest.elf"));
        let vcpu = &state.vcpus[0];
        assert_eq!(vcpu.regs.rip, 0x20_1234);
        assert_eq!(vcpu.xsave.region[100], 0xdead_beef);
        assert_eq!(vcpu.lapic.regs[0x350], 7);
        assert_eq!((vcpu.msrs[2].index, vcpu.msrs[2].data), (0x6e0, u64::MAX));
        assert_eq!(state.devices.serial, saved().devices.serial);
        assert_eq!(state.devices.virtio, saved().devices.virtio);
        // An existing snapshot is never overwritten.
        let again = write_state(&open, header(), &saved()).unwrap_err();
        assert!(matches!(again, SnapshotError::Io { .. }), "{again:?}");
    }

    #[test]
    fn damaged_state_files_are_told_apart() {
        let dir = TempDir::new("snapshot-damage");
        let path = dir.0.join(STATE_FILE);
        write_state(&SnapshotDir::create(&dir.0).unwrap(), header(), &saved()).unwrap();
        let good = std::fs::read(&path).unwrap();
        let read_back = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            read_state(&path).err().expect("a damaged file")
        };
        let e = read_back(&good[..5]);
        assert!(matches!(e, SnapshotError::Truncated(_)), "{e:?}");
        let e = read_back(b"");
        assert!(matches!(e, SnapshotError::Truncated(_)), "{e:?}");
        let e = read_back(b"not a snapshot at all\n");
        assert!(matches!(e, SnapshotError::BadMagic(_)), "{e:?}");
        // A later format is named as such, whatever its header holds.
        let e = read_back(b"kiln-snapshot\n{\"format_version\":7,\"other\":[]}\n");
        assert!(
            matches!(
                e,
                SnapshotError::FormatVersion {
                    found: 7,
                    expected: 2,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = read_back(&[&good[..], b" "].concat());
        assert!(matches!(e, SnapshotError::Corrupt { .. }), "{e:?}");
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x20;
        let e = read_back(&flipped);
        assert!(matches!(e, SnapshotError::Checksum(_)), "{e:?}");
        // Refused without reading it: a file too large, a FIFO (whose open
        // would wait for a writer).
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_len(MAX_STATE_FILE + 1).unwrap();
        let e = read_state(&path).err().expect("a file too large");
        assert!(
            matches!(&e, SnapshotError::Corrupt { reason, .. } if reason.contains("larger")),
            "{e:?}"
        );
        std::fs::remove_file(&path).unwrap();
        let e = read_state(&path).err().expect("no file");
        assert!(matches!(e, SnapshotError::Missing(_)), "{e:?}");
        let fifo = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let e = read_state(&path).err().expect("a FIFO");
        assert!(matches!(e, SnapshotError::Io { .. }), "{e:?}");
    }
}
