//! Boot information the kernel reads at entry: the Linux zero page (`struct
//! boot_params`) or the PVH `hvm_start_info`, each with the memory map, the
//! command line and the initramfs location.

use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::kernel::{BootEntry, LoadedKernel};
use super::BootError;
use crate::layout::{CMDLINE_START, PVH_INFO_START, ZERO_PAGE_START};
use crate::memory::{e820_map, low_ram_end};

/// Boot protocol magic values (Documentation/x86/boot.rst, PVH spec).
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Linux refuses an initramfs above this unless the header says otherwise.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Where the initramfs went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// Copies the initramfs to the highest page-aligned spot of low RAM that the
/// kernel accepts, checking it does not run into the kernel image.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    mem_bytes: u64,
    data: &[u8],
) -> Result<InitrdPlacement, BootError> {
    let size = data.len() as u64;
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let top = low_ram_end(mem_bytes).min(addr_max + 1);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel.end)
        .ok_or(BootError::InitrdTooLarge { size })?;
    mem.write_slice(data, GuestAddress(addr))
        .map_err(BootError::WriteInitrd)?;
    Ok(InitrdPlacement { addr, size })
}

/// Writes the command line and the entry-specific boot structure.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<InitrdPlacement>,
    mem_bytes: u64,
) -> Result<(), BootError> {
    let cmdline = cmdline.as_cstring().map_err(BootError::Cmdline)?;
    let cmdline = cmdline.as_bytes_with_nul();
    mem.write_slice(cmdline, GuestAddress(CMDLINE_START))
        .map_err(BootError::WriteCmdline)?;
    match kernel.entry {
        BootEntry::Linux64 { .. } => {
            let zp = zero_page(kernel, cmdline.len() - 1, initrd, mem_bytes)?;
            mem.write_obj(zp, GuestAddress(ZERO_PAGE_START))
        }
        BootEntry::Pvh { .. } => write_pvh_info(mem, initrd, mem_bytes),
    }
    .map_err(BootError::WriteParams)
}

fn zero_page(
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    mem_bytes: u64,
) -> Result<boot_params, BootError> {
    let mut zp = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        zp.hdr = hdr;
    }
    zp.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    zp.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    zp.hdr.header = KERNEL_HDR_MAGIC;
    zp.hdr.cmd_line_ptr = CMDLINE_START as u32;
    zp.hdr.cmdline_size = cmdline_len as u32;
    if let Some(rd) = initrd {
        zp.hdr.ramdisk_image = rd.addr as u32;
        zp.hdr.ramdisk_size = rd.size as u32;
    }
    let map = e820_map(mem_bytes);
    if map.len() > zp.e820_table.len() {
        return Err(BootError::E820TooLong);
    }
    for (slot, &(addr, size, type_)) in zp.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    zp.e820_entries = map.len() as u8;
    Ok(zp)
}

/// PVH: `hvm_start_info`, then the module list (the initramfs), then the memory map.
fn write_pvh_info(
    mem: &GuestMemoryMmap,
    initrd: Option<InitrdPlacement>,
    mem_bytes: u64,
) -> std::result::Result<(), vm_memory::GuestMemoryError> {
    let start = GuestAddress(PVH_INFO_START);
    let modlist_addr = start.unchecked_add(std::mem::size_of::<hvm_start_info>() as u64);
    let memmap_addr = modlist_addr.unchecked_add(std::mem::size_of::<hvm_modlist_entry>() as u64);
    let map = e820_map(mem_bytes);
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: memmap_addr.0,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some(rd) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr.0;
        let module = hvm_modlist_entry {
            paddr: rd.addr,
            size: rd.size,
            ..Default::default()
        };
        mem.write_obj(module, modlist_addr)?;
    }
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        };
        let at = memmap_addr.unchecked_add((i * std::mem::size_of_val(&entry)) as u64);
        mem.write_obj(entry, at)?;
    }
    mem.write_obj(info, start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_memory, E820_RAM};

    fn kernel(entry: BootEntry, end: u64) -> LoadedKernel {
        LoadedKernel {
            entry,
            end,
            setup_header: None,
            is_linux: true,
        }
    }

    #[test]
    fn zero_page_has_cmdline_initrd_and_e820() {
        let mem_bytes = 64 << 20;
        let mem = create_guest_memory(mem_bytes).unwrap();
        let k = kernel(BootEntry::Linux64 { rip: 0x100_0000 }, 0x200_0000);
        let rd = load_initrd(&mem, &k, mem_bytes, &[7u8; 5000]).unwrap();
        assert_eq!(rd.addr % 4096, 0);
        assert!(rd.addr + rd.size <= mem_bytes && rd.addr >= k.end);
        let cl = Cmdline::try_from("console=ttyS0", 64).unwrap();
        write_boot_info(&mem, &k, &cl, Some(rd), mem_bytes).unwrap();

        let zp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ zp.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ zp.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ zp.hdr.cmdline_size }, 13);
        assert_eq!({ zp.hdr.ramdisk_image }, rd.addr as u32);
        assert_eq!({ zp.hdr.ramdisk_size }, 5000);
        assert_eq!(zp.e820_entries, 3);
        let last = zp.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (0x10_0000, mem_bytes - 0x10_0000, E820_RAM)
        );
        let mut text = [0u8; 14];
        mem.read_slice(&mut text, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&text, b"console=ttyS0\0");
    }

    #[test]
    fn pvh_info_lists_initrd_module_and_memory_map() {
        let mem_bytes = 32 << 20;
        let mem = create_guest_memory(mem_bytes).unwrap();
        let k = kernel(BootEntry::Pvh { rip: 0x100_0000 }, 0x110_0000);
        let rd = load_initrd(&mem, &k, mem_bytes, b"cpio").unwrap();
        let cl = Cmdline::try_from("x", 8).unwrap();
        write_boot_info(&mem, &k, &cl, Some(rd), mem_bytes).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (rd.addr, 4));
        assert_eq!(info.memmap_entries, 3);
        let e: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(info.memmap_paddr + 2 * 24))
            .unwrap();
        assert_eq!((e.addr, e.type_), (0x10_0000, E820_RAM));
    }

    #[test]
    fn initrd_that_would_overlap_the_kernel_is_refused() {
        let mem_bytes = 16 << 20;
        let mem = create_guest_memory(mem_bytes).unwrap();
        let k = kernel(BootEntry::Linux64 { rip: 0 }, 12 << 20);
        let err = load_initrd(&mem, &k, mem_bytes, &vec![0u8; 8 << 20]).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }
}
