//! Why a snapshot could not be saved or restored: one variant per cause a
//! library user may want to tell apart, each message one line.

use std::path::PathBuf;

/// Why kiln could not save a VM into a snapshot directory or restore one
/// from it. A snapshot directory is never changed by a restore.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// A file of the snapshot is not there.
    #[error("snapshot file {0} is missing")]
    Missing(PathBuf),
    /// The file ends before what its header says it holds.
    #[error("snapshot file {0} is truncated")]
    Truncated(PathBuf),
    /// The file does not start as a kiln snapshot does.
    #[error("{0} is not a kiln snapshot (bad magic)")]
    BadMagic(PathBuf),
    /// The snapshot was written in another format version.
    #[error("snapshot {path} has format version {found}; this kiln reads version {expected}")]
    FormatVersion {
        path: PathBuf,
        found: u64,
        expected: u32,
    },
    /// The saved state does not match the checksum its header holds.
    #[error("snapshot {0}: the saved state does not match its checksum (the file is damaged)")]
    Checksum(PathBuf),
    /// The header or the state cannot be decoded (a damaged file).
    #[error("snapshot {path} is damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// The snapshot was taken on a CPU of another vendor.
    #[error("snapshot was taken on a {saved} CPU; this host's CPU is {host}")]
    IncompatibleCpu { saved: String, host: String },
    /// The memory file's size is not the guest memory size saved.
    #[error("snapshot memory file {path} holds {found} bytes; the snapshot saved {expected}")]
    MemorySize {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    /// The guest's TSC frequency differs from this host's and KVM cannot
    /// scale it (no KVM_CAP_TSC_CONTROL, e.g. on PVM, or KVM refused it).
    #[error("snapshot guest TSC ran at {saved} kHz, this host's runs at {host} kHz: {reason}")]
    TscFrequency {
        saved: u32,
        host: u32,
        reason: String,
    },
    /// The VM to save is not running (not built yet, or ended).
    #[error("cannot save the VM: it is not running")]
    NotRunning,
    /// A KVM ioctl failed while state was saved or restored.
    #[error("snapshot: KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM did not take every saved value (e.g. an MSR).
    #[error("snapshot: KVM {0}")]
    Rejected(String),
    /// The VM has a writable `--disk`: the user's file is written in place,
    /// so a clone of the VM would write it too, under the other's feet.
    #[error("cannot snapshot: --disk {0} is writable (a restored copy would write the same file); give it read-only")]
    WritableDisk(PathBuf),
    /// The saved devices do not fit the devices the configuration builds
    /// (another configuration, or an altered state file).
    #[error("snapshot devices do not match: {0}")]
    Devices(String),
    /// What this kiln cannot snapshot yet (virtio devices, AMX state, a
    /// KVM without KVM_CAP_IMMEDIATE_EXIT).
    #[error("cannot snapshot: {0}")]
    Unsupported(String),
    /// Reading or writing a snapshot file failed.
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl SnapshotError {
    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| Self::Kvm { what, source }
    }

    pub(crate) fn io<'a>(
        what: &'static str,
        path: &'a std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| match source.kind() {
            std::io::ErrorKind::NotFound => Self::Missing(path.to_owned()),
            _ => Self::Io {
                what,
                path: path.to_owned(),
                source,
            },
        }
    }
}
