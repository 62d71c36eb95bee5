//! Errors that stop kiln before or while it runs a VM.
//!
//! Each message is one line that names the problem (and the path or value at
//! fault), because the CLI prints it as-is. A module's own error is carried
//! whole (`#[from]`), so a library user can `match` on the cause, e.g.
//! `Error::Disk(DiskError::NotFound(path))`.

use std::path::PathBuf;

// The causes, re-exported so that a match needs no other crate.
pub use crate::boot::mptable::MptableError;
pub use crate::boot::BootError;
pub use crate::cpio::CpioError;
pub use crate::initramfs::InitramfsError;
pub use crate::rootfs::RootfsError;
pub use kiln_devices::bus::BusError;
pub use kiln_devices::tap::TapError;
pub use kiln_devices::virtio::block::DiskError;
pub use kiln_devices::virtio::vsock::VsockError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm: {0} (is KVM available and do you have access to it?)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("KVM lacks a required capability: {0}")]
    KvmCapability(&'static str),
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a kernel kiln can boot (neither an x86_64 ELF vmlinux nor a bzImage): {reason}")]
    NotAKernel { path: PathBuf, reason: String },
    #[error("kernel {path} does not fit in guest memory: {reason}")]
    KernelLoad { path: PathBuf, reason: String },
    /// A value out of range or inconsistent with another (--mem, --cpus, a
    /// TAP given twice, too many devices, an overlong command line, ...).
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::mmap::FromRangesError),
    #[error("initramfs: {0}")]
    Initramfs(#[from] InitramfsError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    /// The image of an image `--rootfs` cannot be used as a disk.
    #[error("invalid configuration: --rootfs: {0}")]
    RootfsImage(#[source] DiskError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("boot setup: {0}")]
    Mptable(#[from] MptableError),
    #[error("invalid configuration: --disk: {0}")]
    Disk(#[from] DiskError),
    #[error("invalid configuration: --vsock: {0}")]
    Vsock(#[from] VsockError),
    #[error("device setup: {0}")]
    Tap(#[from] TapError),
    #[error("device setup: {0}")]
    Bus(#[from] BusError),
    /// A host resource a device needs (eventfd, IRQ line, ...).
    #[error("device setup: {what}: {source}")]
    DeviceIo {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("device setup: event loop: {0:?}")]
    EventLoop(event_manager::Error),
    #[error("device setup: the VM thread panicked")]
    VmThreadPanicked,
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { what, source }
    }

    pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Io { what, source }
    }

    pub(crate) fn device_io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::DeviceIo { what, source }
    }
}
