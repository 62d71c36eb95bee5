//! Everything that happens between "here is a kernel" and the first KVM_RUN:
//! loading the image, boot parameters, the command line, the CPU tables
//! and the initial vCPU state.

pub(crate) mod cmdline;
pub(crate) mod cpu_state;
pub(crate) mod cpuid;
pub mod kernel;
pub(crate) mod mptable;
pub(crate) mod params;

pub use kernel::{BootEntry, LoadedKernel};

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use vm_memory::GuestMemoryError;

use crate::error::{Error, Result};

/// Opens `path` for reading, only if it is a regular file: opening a FIFO
/// waits for a writer and a device such as /dev/zero never ends.
pub(crate) fn open_regular_file(path: &Path) -> io::Result<File> {
    // O_NONBLOCK: a FIFO opens at once (and is then refused); reads of a
    // regular file ignore the flag.
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Opens the kernel or initrd file the user named (`what` says which), a
/// regular file only ([`open_regular_file`]), and at most `max_len` bytes
/// when given, so that nothing larger than guest memory is read into the
/// host's.
pub(crate) fn open_input(what: &'static str, path: &Path, max_len: Option<u64>) -> Result<File> {
    let error = |source| Error::ReadFile {
        what,
        path: path.to_owned(),
        source,
    };
    let file = open_regular_file(path).map_err(error)?;
    let meta = file.metadata().map_err(error)?;
    match max_len {
        Some(max) if meta.len() > max => Err(error(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} MiB, more than the guest's {} MiB of memory",
                meta.len() >> 20,
                max >> 20
            ),
        ))),
        _ => Ok(file),
    }
}

/// Why the boot information could not be put into guest memory. Each
/// message is one line and says which part failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The initramfs (kiln's init, a directory or tar root, a user initrd)
    /// does not fit in guest memory above the kernel: raise the memory or
    /// use an image root.
    #[error(
        "initramfs: initramfs of {} KiB does not fit in guest memory above the kernel (raise --mem)",
        size >> 10
    )]
    InitrdTooLarge {
        /// The initramfs size in bytes.
        size: u64,
    },
    /// Copying the initramfs into guest memory failed.
    #[error("initramfs: cannot copy into guest memory: {0}")]
    WriteInitrd(#[source] GuestMemoryError),
    /// The kernel command line cannot be put into the boot parameters.
    #[error("boot setup: kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line into guest memory failed.
    #[error("boot setup: writing the command line: {0}")]
    WriteCmdline(#[source] GuestMemoryError),
    /// The memory map has more entries than the zero page holds.
    #[error("boot setup: e820 map too long")]
    E820TooLong,
    /// Writing the zero page or the PVH start info failed.
    #[error("boot setup: writing boot parameters: {0}")]
    WriteParams(#[source] GuestMemoryError),
    /// Writing the boot GDT, IDT or page tables failed.
    #[error("boot setup: writing boot tables: {0}")]
    WriteTables(#[source] GuestMemoryError),
    /// The vCPU's initial MSR list cannot be built.
    #[error("boot setup: MSR list: {0:?}")]
    MsrList(vmm_sys_util::fam::Error),
}
