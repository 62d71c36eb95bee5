//! Errors that stop kiln before or while it runs a VM.
//!
//! Each message is one line that names the problem (and the path or value at
//! fault), because the CLI prints it as-is. A module's own error is carried
//! whole (`#[from]`), so a library user can `match` on the cause, e.g.
//! `Error::Disk(DiskError::NotFound(path))`.
//!
//! An [`Error`] means kiln could not build or run the VM; `kiln run` prints
//! it and exits 125 ([`STATUS_KILN_ERROR`](crate::outcome::STATUS_KILN_ERROR)).
//! A guest that ended badly (panic, triple fault, timeout) is not an error:
//! the run returns its [`VmOutcome`](crate::VmOutcome).

use std::path::PathBuf;

// The causes, re-exported so that a match needs no other crate.
pub use crate::boot::mptable::MptableError;
pub use crate::boot::BootError;
pub use crate::cpio::CpioError;
pub use crate::initramfs::InitramfsError;
pub use crate::rootfs::RootfsError;
pub use crate::seccomp::SeccompError;
pub use kiln_devices::bus::BusError;
pub use kiln_devices::tap::TapError;
pub use kiln_devices::virtio::block::DiskError;
pub use kiln_devices::virtio::vsock::VsockError;

/// Why kiln could not build or run a VM ([`run`](crate::run),
/// [`spawn`](crate::spawn), [`VmHandle::wait`](crate::VmHandle::wait),
/// [`kernel_cmdline`](crate::kernel_cmdline)). Nothing of the VM is left
/// behind when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` cannot be opened: KVM is not loaded, or this process may
    /// not read and write it (add the user to the `kvm` group).
    #[error("cannot open /dev/kvm: {0} (is KVM available and do you have access to it?)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// The host's KVM lacks a capability kiln's platform needs (named:
    /// `KVM_CAP_IRQCHIP`, `KVM_CAP_IRQFD`, ...).
    #[error("KVM lacks a required capability: {0}")]
    KvmCapability(&'static str),
    /// A KVM ioctl failed while the VM or a vCPU was set up.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The ioctl, e.g. `KVM_CREATE_VM`.
        what: &'static str,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The kernel or the initrd cannot be read.
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        /// `kernel` or `initrd`.
        what: &'static str,
        /// The file as configured.
        path: PathBuf,
        /// Why it cannot be read.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither an x86-64 ELF `vmlinux` nor a `bzImage`
    /// kiln can enter (e.g. a bzImage without the 64-bit entry).
    #[error("{path} is not a kernel kiln can boot (neither an x86_64 ELF vmlinux nor a bzImage): {reason}")]
    NotAKernel {
        /// The kernel as configured.
        path: PathBuf,
        /// The loader's reason.
        reason: String,
    },
    /// The kernel is valid but does not fit in guest memory (raise
    /// `mem_bytes`), or its image is cut short.
    #[error("kernel {path} does not fit in guest memory: {reason}")]
    KernelLoad {
        /// The kernel as configured.
        path: PathBuf,
        /// The loader's reason.
        reason: String,
    },
    /// A value out of range or inconsistent with another (--mem, --cpus, a
    /// TAP given twice, too many devices, an overlong command line, ...).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A shared directory (`--share`) cannot be served: the directory, the
    /// virtiofsd program, or its start and set-up.
    #[error("--share: {0}")]
    Share(String),
    /// The host cannot map guest memory of the configured size.
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::mmap::FromRangesError),
    /// kiln's initramfs cannot be built: a command kiln's init cannot take
    /// (e.g. a NUL byte in an argument), or a directory or tar root that
    /// cannot be read or does not fit in guest memory.
    #[error("initramfs: {0}")]
    Initramfs(#[from] InitramfsError),
    /// `rootfs` is not usable: unreadable, or of no kind kiln knows.
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    /// The image of an image `--rootfs` cannot be used as a disk (or its
    /// overlay cannot be made).
    #[error("invalid configuration: --rootfs: {0}")]
    RootfsImage(#[source] DiskError),
    /// The boot information cannot be put into guest memory (mostly: an
    /// initramfs too large for `mem_bytes`).
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The MP table (the guest's list of CPUs) cannot be written.
    #[error("boot setup: {0}")]
    Mptable(#[from] MptableError),
    /// A `disks` entry cannot be used: missing, unreadable, a directory,
    /// locked by another process, not a multiple of 512 bytes, an `id` over
    /// 20 bytes.
    #[error("invalid configuration: --disk: {0}")]
    Disk(#[from] DiskError),
    /// The `vsock` device cannot be set up: a reserved CID, or a socket
    /// path that cannot be bound.
    #[error("invalid configuration: --vsock: {0}")]
    Vsock(#[from] VsockError),
    /// A `nets` TAP interface cannot be opened or created: a bad name, no
    /// permission, busy, or not a TAP.
    #[error("device setup: {0}")]
    Tap(#[from] TapError),
    /// Two devices were placed on overlapping bus windows (a kiln bug).
    #[error("device setup: {0}")]
    Bus(#[from] BusError),
    /// A host resource a device needs (eventfd, IRQ line, ...).
    #[error("device setup: {what}: {source}")]
    DeviceIo {
        /// The resource, e.g. `virtio IRQ`.
        what: &'static str,
        /// Why the host refused it (often: out of file descriptors).
        #[source]
        source: std::io::Error,
    },
    /// The event loop (epoll) could not be created or failed while the VM
    /// ran; the VM was stopped.
    #[error("device setup: event loop: {0:?}")]
    EventLoop(event_manager::Error),
    /// A thread's seccomp filter could not be installed (see
    /// [`VmConfig::seccomp`](crate::VmConfig::seccomp)); the guest never ran.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// A snapshot could not be saved or restored (not a public feature yet).
    #[doc(hidden)]
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),

    /// [`VmHandle::pause`](crate::VmHandle::pause) or `resume` could not be done.
    #[error("pausing the VM: {0}")]
    Pause(#[from] crate::pause::PauseError),
    /// The thread [`spawn`](crate::spawn) started panicked (a kiln bug);
    /// its vCPUs were stopped and joined first. Returned by
    /// [`VmHandle::wait`](crate::VmHandle::wait).
    #[error("the VM thread panicked (a kiln bug); the VM was stopped")]
    VmThreadPanicked,

    /// A sandbox's VM in a kiln process of its own failed: the process's
    /// one-line message (its cause's type stays in that process).
    #[error("{0}")]
    VmProcess(String),
    /// Another host call failed: a thread, an eventfd, a pipe, the vCPU
    /// kick signal's handler.
    #[error("{what}: {source}")]
    Io {
        /// What kiln was doing, e.g. `spawning a vCPU thread`.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

/// `Result` with kiln's [`Error`].
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
