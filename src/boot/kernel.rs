//! Loading the guest kernel image and choosing its entry point.
//!
//! An ELF vmlinux with a PVH note is entered through PVH (32-bit, no
//! decompressor: the cheapest path when guest kernel code is emulated). Other
//! ELF images, including kiln's tiny test guests, are entered in 64-bit mode;
//! a bzImage goes through its 64-bit boot-protocol entry.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
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
    Linux64 {
        /// The entry address.
        rip: u64,
    },
    /// PVH: 32-bit protected mode at `rip`, `rbx` = `hvm_start_info`.
    Pvh {
        /// The entry address.
        rip: u64,
    },
}

/// A kernel loaded into guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Where and how the boot vCPU enters it.
    pub entry: BootEntry,
    /// First byte after the loaded image.
    pub end: u64,
    /// The bzImage setup header, which goes into the zero page.
    pub setup_header: Option<setup_header>,
    /// A Linux kernel (bzImage, or an ELF with a "Linux" note). Other
    /// kernels, such as kiln's tiny test guests, get no initramfs from kiln.
    pub is_linux: bool,
}

/// Loads the kernel at `path` into `mem` (above 1 MiB) and picks its entry:
/// PVH when `use_pvh` and the ELF has a PVH note. Fails with
/// [`Error::ReadFile`], [`Error::NotAKernel`] or [`Error::KernelLoad`].
pub fn load(mem: &GuestMemoryMmap, path: &Path, use_pvh: bool) -> Result<LoadedKernel> {
    let open = || super::open_input("kernel", path, None);
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
                is_linux: has_linux_note(&mut file),
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
        is_linux: true,
    })
}

/// Whether an ELF file (already accepted by the loader) carries a note owned
/// by "Linux": every vmlinux since 4.18 has one (the build salt, in
/// init/version.c). Any read problem answers "no".
fn has_linux_note(file: &mut File) -> bool {
    const PT_NOTE: u32 = 4;
    const MAX_NOTES: usize = 64 << 10;
    let mut read_at = |offset: u64, len: usize| -> Option<Vec<u8>> {
        let mut buf = vec![0; len];
        file.seek(SeekFrom::Start(offset)).ok()?;
        file.read_exact(&mut buf).ok()?;
        Some(buf)
    };
    let Some(eh) = read_at(0, 64) else {
        return false;
    };
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let (phoff, phentsize, phnum) = (
        u64::from_le_bytes(eh[0x20..0x28].try_into().unwrap()),
        usize::from(u16_at(&eh, 0x36)),
        usize::from(u16_at(&eh, 0x38)),
    );
    if phentsize < 56 {
        return false;
    }
    let Some(phdrs) = read_at(phoff, phentsize * phnum) else {
        return false;
    };
    phdrs.chunks_exact(phentsize).any(|ph| {
        let p_type = u32::from_le_bytes(ph[0..4].try_into().unwrap());
        let offset = u64::from_le_bytes(ph[8..16].try_into().unwrap());
        let size = u64::from_le_bytes(ph[32..40].try_into().unwrap());
        p_type == PT_NOTE
            && usize::try_from(size).is_ok_and(|n| n <= MAX_NOTES)
            && read_at(offset, size as usize).is_some_and(|notes| notes_name_linux(&notes))
    })
}

/// Walks one note segment: `namesz, descsz, type` (u32 each), then the name
/// and the descriptor, each padded to 4 bytes.
fn notes_name_linux(mut notes: &[u8]) -> bool {
    let pad4 = |n: usize| n.checked_add(3).map(|n| n & !3);
    while notes.len() >= 12 {
        let word = |o: usize| u32::from_le_bytes(notes[o..o + 4].try_into().unwrap()) as usize;
        let (namesz, descsz) = (word(0), word(4));
        let (Some(name_len), Some(desc_len)) = (pad4(namesz), pad4(descsz)) else {
            return false;
        };
        let Some(rest) = notes.get(12..) else {
            return false;
        };
        if rest.get(..namesz) == Some(b"Linux\0".as_slice()) {
            return true;
        }
        match name_len.checked_add(desc_len).and_then(|n| rest.get(n..)) {
            Some(next) => notes = next,
            None => return false,
        }
    }
    false
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

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&1u32.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    #[test]
    fn finds_a_linux_note_after_others() {
        let mut notes = note(b"Xen\0", &[0, 0, 0x20, 0]);
        notes.extend(note(b"GNU\0", &[7; 20]));
        assert!(!notes_name_linux(&notes));
        notes.extend(note(b"Linux\0", &[1, 2, 3]));
        assert!(notes_name_linux(&notes));
    }

    #[test]
    fn hostile_note_sizes_end_the_walk() {
        let mut huge = note(b"Xen\0", &[]);
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        huge.extend(note(b"Linux\0", &[]));
        assert!(!notes_name_linux(&huge));
        let mut short = note(b"Linux\0", &[]);
        short[0..4].copy_from_slice(&100u32.to_le_bytes());
        assert!(!notes_name_linux(&short));
        assert!(!notes_name_linux(&[1, 2, 3]));
        assert!(!notes_name_linux(b"Linux\0"));
    }
}
