//! Initial CPU state for the boot vCPU: descriptor tables, page tables,
//! registers, FPU, MSRs, and the local APIC interrupt pins of every vCPU.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::kernel::BootEntry;
use super::BootError;
use crate::error::{Error, Result};
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDPT_START, PD_COUNT, PD_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};

// The empty boot IDT must not overlap the GDT.
const _: () = assert!(BOOT_GDT_START + (GDT_ENTRIES as u64) * 8 <= BOOT_IDT_START);

// GDT slots. Linux's 64-bit boot protocol wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
const GDT_CODE64: usize = 2;
const GDT_DATA: usize = 3;
const GDT_TSS: usize = 4;
const GDT_CODE32: usize = 5;
const GDT_ENTRIES: usize = 6;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Packs a segment descriptor from its access/flags word, base and limit.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The KVM view of a GDT descriptor in `slot`.
fn segment(table: &[u64; GDT_ENTRIES], slot: usize) -> kvm_segment {
    let e = table[slot];
    let base = ((e >> 16) & 0xff_ffff) | ((e >> 32) & 0xff00_0000);
    let limit_raw = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    let g = ((e >> 55) & 1) as u8;
    kvm_segment {
        base,
        // With 4 KiB granularity the limit counts pages.
        limit: if g == 1 {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector: (slot * 8) as u16,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn gdt_table() -> [u64; GDT_ENTRIES] {
    let mut t = [0u64; GDT_ENTRIES];
    t[GDT_CODE64] = gdt_entry(0xa09b, 0, 0xfffff);
    t[GDT_DATA] = gdt_entry(0xc093, 0, 0xfffff);
    t[GDT_TSS] = gdt_entry(0x808b, 0, 0xfffff);
    t[GDT_CODE32] = gdt_entry(0xc09b, 0, 0xfffff);
    t
}

/// Writes the GDT, an empty IDT and (for the 64-bit entry) identity page tables.
pub fn write_boot_tables(
    mem: &GuestMemoryMmap,
    entry: BootEntry,
) -> std::result::Result<(), BootError> {
    let err = BootError::WriteTables;
    for (i, e) in gdt_table().iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(err)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(err)?;
    if let BootEntry::Linux64 { .. } = entry {
        // PML4[0] -> PDPT; PDPT[0..4] -> four PDs of 2 MiB pages: 4 GiB identity map.
        mem.write_obj(PDPT_START | 0x3, GuestAddress(PML4_START))
            .map_err(err)?;
        for pd in 0..PD_COUNT {
            let pd_addr = PD_START + pd * 0x1000;
            mem.write_obj(pd_addr | 0x3, GuestAddress(PDPT_START + pd * 8))
                .map_err(err)?;
            for i in 0..512u64 {
                let page = ((pd * 512 + i) << 21) | 0x83; // present, writable, 2 MiB
                mem.write_obj(page, GuestAddress(pd_addr + i * 8))
                    .map_err(err)?;
            }
        }
    }
    Ok(())
}

/// Registers and segment state for the boot vCPU.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: BootEntry) -> Result<()> {
    let gdt = gdt_table();
    let mut sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let data = segment(&gdt, GDT_DATA);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(&gdt, GDT_TSS);
    let mut regs = kvm_regs {
        rflags: 0x2,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        ..Default::default()
    };
    match entry {
        BootEntry::Linux64 { rip } => {
            sregs.cs = segment(&gdt, GDT_CODE64);
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = rip;
            regs.rsi = ZERO_PAGE_START;
        }
        BootEntry::Pvh { rip } => {
            // PVH: flat 32-bit protected mode, paging off, ebx -> start info.
            sregs.cs = segment(&gdt, GDT_CODE32);
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = rip;
            regs.rbx = PVH_INFO_START;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(Error::kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))
}

/// State every vCPU needs before it runs: FPU control words, boot MSRs and
/// the LAPIC's LINT0 (ExtINT, for the legacy PIC) and LINT1 (NMI).
pub fn setup_common_vcpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU"))?;
    set_boot_msrs(vcpu)?;
    let mut lapic = vcpu.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?;
    set_lvt_delivery_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_delivery_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(Error::kvm("KVM_SET_LAPIC"))
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back.
const MTRR_DEF_ENABLE_WB: u64 = (1 << 11) | 6;

fn set_boot_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(BootError::MsrList)?;
    let set = vcpu.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        // KVM stops at the first MSR it rejects; say which one.
        log::debug!(
            "KVM accepted {set} of {} boot MSRs; rejected {:#x}",
            entries.len(),
            entries[set].index
        );
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_lvt_delivery_mode(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[reg + i] = b as _;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn descriptors_decode_to_flat_segments() {
        let gdt = gdt_table();
        let cs = segment(&gdt, GDT_CODE64);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.type_, cs.present),
            (0x10, 1, 0, 0xb, 1)
        );
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
        let ds = segment(&gdt, GDT_DATA);
        assert_eq!((ds.selector, ds.db, ds.type_, ds.s), (0x18, 1, 0x3, 1));
        let cs32 = segment(&gdt, GDT_CODE32);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let mem = create_guest_memory(16 << 20).unwrap();
        write_boot_tables(&mem, BootEntry::Linux64 { rip: 0 }).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_START);
        // The PD entry that maps the MMIO hole at 0xd000_0000 points at it.
        let addr = 0xd000_0000u64;
        let pdpte: u64 = mem
            .read_obj(GuestAddress(PDPT_START + (addr >> 30) * 8))
            .unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + ((addr >> 21) & 511) * 8))
            .unwrap();
        assert_eq!(pde & !0xfff, addr);
        assert_eq!(pde & 0x80, 0x80);
    }

    #[test]
    fn lvt_mode_changes_only_delivery_bits() {
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[APIC_LVT0] = 0x30; // vector
        lapic.regs[APIC_LVT0 + 2] = 0x1; // mask bit 16
        set_lvt_delivery_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(lapic.regs[APIC_LVT0] as u8, 0x30);
        assert_eq!(lapic.regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(lapic.regs[APIC_LVT0 + 2] as u8, 0x1);
    }
}
