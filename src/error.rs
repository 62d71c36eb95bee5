//! Errors that stop kiln before or while it runs a VM.
//!
//! Each message is one line that names the problem (and the path or value at
//! fault), because the CLI prints it as-is.

use std::path::PathBuf;

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
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("initramfs: {0}")]
    Initramfs(String),
    #[error(transparent)]
    Rootfs(#[from] crate::rootfs::RootfsError),
    #[error("boot setup: {0}")]
    Boot(String),
    #[error("device setup: {0}")]
    Device(String),
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
}
