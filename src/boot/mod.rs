//! Everything that happens between "here is a kernel" and the first KVM_RUN:
//! loading the image, boot parameters, the command line, the CPU tables
//! and the initial vCPU state.

pub mod cmdline;
pub mod cpu_state;
pub mod cpuid;
pub mod kernel;
pub mod mptable;
pub mod params;

pub use kernel::{BootEntry, LoadedKernel};

use vm_memory::GuestMemoryError;

/// Why the boot information could not be put into guest memory. Each
/// message is one line and says which part failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(
        "initramfs: initramfs of {} KiB does not fit in guest memory above the kernel (raise --mem)",
        size >> 10
    )]
    InitrdTooLarge { size: u64 },
    #[error("initramfs: cannot copy into guest memory: {0}")]
    WriteInitrd(#[source] GuestMemoryError),
    #[error("boot setup: kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("boot setup: writing the command line: {0}")]
    WriteCmdline(#[source] GuestMemoryError),
    #[error("boot setup: e820 map too long")]
    E820TooLong,
    #[error("boot setup: writing boot parameters: {0}")]
    WriteParams(#[source] GuestMemoryError),
    #[error("boot setup: writing boot tables: {0}")]
    WriteTables(#[source] GuestMemoryError),
    #[error("boot setup: MSR list: {0:?}")]
    MsrList(vmm_sys_util::fam::Error),
}
