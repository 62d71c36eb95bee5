//! Guest physical address map for x86_64.
//!
//! One place for every fixed address kiln hands the guest, so the boot code, the
//! device wiring and the tiny test guests agree. Low addresses follow the
//! conventional PC/Linux boot layout; devices live in the 32-bit MMIO hole.

/// Global descriptor table used for both the 64-bit and the PVH (32-bit) entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// Interrupt descriptor table (empty: the guest installs its own before `sti`).
pub const BOOT_IDT_START: u64 = 0x540;
/// PVH `hvm_start_info` structure, followed by its memory map table.
pub const PVH_INFO_START: u64 = 0x6000;
/// Linux zero page (`struct boot_params`) for the 64-bit and bzImage entries.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page tables for the 64-bit entry: PML4, one PDPT, four PDs (2 MiB pages),
/// identity-mapping the first 4 GiB so the MMIO hole is reachable too.
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Number of page directories after `PD_START` (each maps 1 GiB).
pub const PD_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Linux on x86 reads at most this many bytes of command line (COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Intel MP table, placed in the EBDA where Linux scans for it.
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of conventional low memory (start of the legacy VGA/BIOS hole).
pub const EBDA_END: u64 = 0xa0000;
/// Kernels are loaded at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole: guest RAM above this moves past 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit address space.
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// kiln's control page (boot timer and exit status), see `kiln_devices::control`.
pub const CONTROL_PAGE_START: u64 = 0xd000_0000;
/// First virtio-mmio device window; each device takes `VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_START: u64 = 0xd000_1000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC and local APIC windows (served by KVM's in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the real-mode TSS and one for the identity map,
/// placed just below the BIOS area at the top of 4 GiB.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Legacy port I/O.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// Ports the UART decodes from `SERIAL_PORT_BASE`.
pub const SERIAL_PORT_SIZE: u16 = 8;
pub const SERIAL_IRQ: u32 = 4;
/// i8042 keyboard controller data and command ports (reset goes through 0x64).
pub const I8042_DATA_PORT: u16 = 0x60;
/// See `I8042_DATA_PORT`.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// POST/debug port: Linux's `outb_p` delays hit it; kiln serves it as a no-op.
pub const DEBUG_PORT: u16 = 0x80;
/// First IRQ line handed to virtio-mmio devices (after the legacy ISA lines).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IOAPIC pins available to devices.
pub const IRQ_MAX: u32 = 23;

#[cfg(test)]
mod tests {
    /// kiln's init (in the guest) and the control page device (in the
    /// monitor) agree on where the page is and what it holds.
    #[test]
    fn control_page_abi_matches_the_monitor() {
        use kiln_devices::control as dev;
        use kiln_init::control as guest;
        assert_eq!(guest::PAGE_ADDR, crate::layout::CONTROL_PAGE_START);
        assert_eq!(guest::PAGE_SIZE as u64, dev::CONTROL_PAGE_SIZE);
        assert_eq!(guest::MAGIC, dev::MAGIC);
        assert_eq!(guest::REG_MAGIC as u64, dev::REG_MAGIC);
        assert_eq!(guest::REG_BOOT_TIMER as u64, dev::REG_BOOT_TIMER);
        assert_eq!(guest::REG_EXIT as u64, dev::REG_EXIT);
        assert_eq!(guest::STAGE_USERSPACE, dev::STAGE_USERSPACE);
        assert_eq!(guest::EXIT_KIND_CODE, dev::EXIT_KIND_CODE);
        assert_eq!(guest::EXIT_KIND_SIGNAL, dev::EXIT_KIND_SIGNAL);
    }
}
