//! Loading the guest kernel image and choosing its entry point.
//!
//! An ELF vmlinux with a PVH note is entered through PVH (32-bit, no
//! decompressor: the cheapest path when guest kernel code is emulated). Other
//! ELF images, including kiln's tiny test guests, are entered in 64-bit mode;
//! a bzImage goes through its 64-bit boot-protocol entry.

use std::fs::File;
use std::path::Path;

use linux_loader::bootparam::setup_header;
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};
use crate::layout::HIMEM_START;

/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has the 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// 64-bit long mode at `rip`, `rsi` = zero page.
    Linux64 { rip: u64 },
    /// PVH: 32-bit protected mode at `rip`, `rbx` = `hvm_start_info`.
    Pvh { rip: u64 },
}

#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: BootEntry,
    /// First byte after the loaded image.
    pub end: u64,
    /// The bzImage setup header, which goes into the zero page.
    pub setup_header: Option<setup_header>,
}

pub fn load(mem: &GuestMemoryMmap, path: &Path, use_pvh: bool) -> Result<LoadedKernel> {
    let open = || {
        File::open(path).map_err(|source| Error::ReadFile {
            what: "kernel",
            path: path.to_owned(),
            source,
        })
    };
    let mut file = open()?;
    let himem = Some(GuestAddress(HIMEM_START));
    match Elf::load(mem, None, &mut file, himem) {
        Ok(res) => {
            let entry = match res.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) if use_pvh => {
                    BootEntry::Pvh { rip: addr.0 }
                }
                _ => BootEntry::Linux64 {
                    rip: res.kernel_load.0,
                },
            };
            return Ok(LoadedKernel {
                entry,
                end: res.kernel_end,
                setup_header: None,
            });
        }
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {}
        Err(e) => return Err(load_error(path, e)),
    }
    let mut file = open()?;
    let res = BzImage::load(mem, None, &mut file, himem).map_err(|e| load_error(path, e))?;
    let hdr = res.setup_header.ok_or_else(|| Error::NotAKernel {
        path: path.to_owned(),
        reason: "bzImage without a setup header".into(),
    })?;
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::NotAKernel {
            path: path.to_owned(),
            reason: "bzImage has no 64-bit entry point (xloadflags)".into(),
        });
    }
    Ok(LoadedKernel {
        entry: BootEntry::Linux64 {
            rip: res.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
        },
        end: res.kernel_end,
        setup_header: Some(hdr),
    })
}

/// Sorts loader failures into "not a kernel" and "does not fit".
fn load_error(path: &Path, e: loader::Error) -> Error {
    let reason = e.to_string();
    match e {
        loader::Error::MemoryOverflow
        | loader::Error::Elf(loader::elf::Error::ReadKernelImage)
        | loader::Error::Bzimage(loader::bzimage::Error::ReadBzImageCompressedKernel) => {
            Error::KernelLoad {
                path: path.to_owned(),
                reason,
            }
        }
        _ => Error::NotAKernel {
            path: path.to_owned(),
            reason,
        },
    }
}
