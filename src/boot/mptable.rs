//! Intel MultiProcessor Specification 1.4 table.
//!
//! A guest kernel without ACPI (CONFIG_X86_MPPARSE) finds its CPUs, IOAPIC
//! and interrupt routing here. Linux scans the last KiB of base memory for the
//! floating pointer, so the whole table lives in `[MPTABLE_START, EBDA_END)`.
//!
//! The table routes the 16 ISA IRQs and, above them, only the IOAPIC pins up
//! to the highest one a device of this VM uses: Linux allocates an IRQ
//! descriptor (and its sysfs directory) at boot for every pin the table
//! lists, so each unused pin is guest work for nothing (eight of them cost
//! about 100 ms of a boot where the guest kernel is emulated, on PVM). QEMU's
//! microvm firmware lists the ISA IRQs alone.

use std::mem::size_of;

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::layout::{APIC_START, EBDA_END, IOAPIC_START, IRQ_MAX, MPTABLE_START};

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// No vCPU, or more than the table holds.
    #[error("unsupported vCPU count {0} for the MP table (1..={MAX_CPUS})")]
    CpuCount(u8),
    /// A device IRQ beyond the IOAPIC's pins.
    #[error("IRQ {0} is beyond the IOAPIC's pins (0..={IRQ_MAX})")]
    Irq(u32),
    /// Writing the table into guest memory failed.
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(#[source] GuestMemoryError),
}

const SPEC_REV: u8 = 4; // MP spec 1.4
const LAPIC_VERSION: u8 = 0x14; // KVM's local APIC
const IOAPIC_VERSION: u8 = 0x11;
const ISA_BUS_ID: u8 = 0;
const IOAPIC_PINS: u8 = IRQ_MAX as u8 + 1;
/// IRQs 0-15: always routed (the legacy devices' lines, which Linux sets up
/// whatever the table says).
const ISA_IRQS: u8 = 16;

// Entry types.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

// Interrupt types.
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const CPU_FLAG_ENABLED: u8 = 1;
const CPU_FLAG_BSP: u8 = 2;
const IOAPIC_FLAG_ENABLED: u8 = 1;
/// Family 6 signature and FPU | APIC feature flags, as a real BIOS reports.
const CPU_SIGNATURE: u32 = 6 << 8;
const CPU_FEATURES: u32 = 1 | 1 << 9;
/// Destination "all local APICs" for local interrupt entries.
const ALL_LAPICS: u8 = 0xff;

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct FloatingPointer {
    signature: [u8; 4],
    config_table: u32,
    length: u8, // in 16-byte units
    spec_rev: u8,
    checksum: u8,
    features: [u8; 5], // all 0: a config table follows, virtual wire mode
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct ConfigHeader {
    signature: [u8; 4],
    base_table_length: u16,
    spec_rev: u8,
    checksum: u8,
    oem_id: [u8; 8],
    product_id: [u8; 12],
    oem_table: u32,
    oem_table_size: u16,
    entry_count: u16,
    lapic_address: u32,
    ext_table_length: u16,
    ext_table_checksum: u8,
    reserved: u8,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct ProcessorEntry {
    entry_type: u8,
    lapic_id: u8,
    lapic_version: u8,
    flags: u8,
    signature: u32,
    features: u32,
    reserved: [u32; 2],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct BusEntry {
    entry_type: u8,
    bus_id: u8,
    bus_type: [u8; 6],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct IoapicEntry {
    entry_type: u8,
    ioapic_id: u8,
    version: u8,
    flags: u8,
    address: u32,
}

/// Layout shared by I/O (type 3) and local (type 4) interrupt entries.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct InterruptEntry {
    entry_type: u8,
    int_type: u8,
    flags: u16, // 0: polarity and trigger conform to the bus
    src_bus: u8,
    src_irq: u8,
    dst_apic: u8,
    dst_pin: u8,
}

// SAFETY: all are packed structs of plain integers and byte arrays: no
// padding, and any bit pattern is a valid value.
unsafe impl ByteValued for FloatingPointer {}
// SAFETY: as above.
unsafe impl ByteValued for ConfigHeader {}
// SAFETY: as above.
unsafe impl ByteValued for ProcessorEntry {}
// SAFETY: as above.
unsafe impl ByteValued for BusEntry {}
// SAFETY: as above.
unsafe impl ByteValued for IoapicEntry {}
// SAFETY: as above.
unsafe impl ByteValued for InterruptEntry {}

/// Largest table size without processor entries: pointer, header, bus,
/// IOAPIC, one I/O interrupt per IOAPIC pin, LINT0 and LINT1.
const FIXED_SIZE: usize = size_of::<FloatingPointer>()
    + size_of::<ConfigHeader>()
    + size_of::<BusEntry>()
    + size_of::<IoapicEntry>()
    + (IOAPIC_PINS as usize + 2) * size_of::<InterruptEntry>();

/// Most vCPUs whose processor entries fit below `EBDA_END`.
pub const MAX_CPUS: u8 = {
    let n = ((EBDA_END - MPTABLE_START) as usize - FIXED_SIZE) / size_of::<ProcessorEntry>();
    // The IOAPIC takes APIC id `num_cpus`, so ids must stay below 0xff.
    if n > 254 {
        254
    } else {
        n as u8
    }
};

/// Byte that makes `bytes` sum to zero (mod 256).
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)))
}

/// Writes the MP table for `num_cpus` vCPUs (APIC ids 0..num_cpus, vCPU 0
/// the boot CPU) at `MPTABLE_START`, routing the ISA IRQs and the pins up to
/// `highest_irq`, the highest IRQ a device of the VM uses.
pub fn setup_mptable(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    highest_irq: u32,
) -> Result<(), MptableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MptableError::CpuCount(num_cpus));
    }
    if highest_irq > IRQ_MAX {
        return Err(MptableError::Irq(highest_irq));
    }
    let routed_pins = ISA_IRQS.max(highest_irq as u8 + 1);
    let ioapic_id = num_cpus;

    // Entries first, so the header can count and checksum them.
    let mut entries =
        Vec::with_capacity(FIXED_SIZE + usize::from(num_cpus) * size_of::<ProcessorEntry>());
    for id in 0..num_cpus {
        let bsp = if id == 0 { CPU_FLAG_BSP } else { 0 };
        let cpu = ProcessorEntry {
            entry_type: ENTRY_PROCESSOR,
            lapic_id: id,
            lapic_version: LAPIC_VERSION,
            flags: CPU_FLAG_ENABLED | bsp,
            signature: CPU_SIGNATURE,
            features: CPU_FEATURES,
            reserved: [0; 2],
        };
        entries.extend_from_slice(cpu.as_slice());
    }
    let bus = BusEntry {
        entry_type: ENTRY_BUS,
        bus_id: ISA_BUS_ID,
        bus_type: *b"ISA   ",
    };
    entries.extend_from_slice(bus.as_slice());
    let ioapic = IoapicEntry {
        entry_type: ENTRY_IOAPIC,
        ioapic_id,
        version: IOAPIC_VERSION,
        flags: IOAPIC_FLAG_ENABLED,
        address: IOAPIC_START as u32,
    };
    entries.extend_from_slice(ioapic.as_slice());
    for pin in 0..routed_pins {
        let irq = InterruptEntry {
            entry_type: ENTRY_IO_INTERRUPT,
            int_type: INT_TYPE_INT,
            flags: 0,
            src_bus: ISA_BUS_ID,
            src_irq: pin,
            dst_apic: ioapic_id,
            dst_pin: pin,
        };
        entries.extend_from_slice(irq.as_slice());
    }
    for (lint, int_type) in [(0, INT_TYPE_EXTINT), (1, INT_TYPE_NMI)] {
        let local = InterruptEntry {
            entry_type: ENTRY_LOCAL_INTERRUPT,
            int_type,
            flags: 0,
            src_bus: ISA_BUS_ID,
            src_irq: 0,
            dst_apic: ALL_LAPICS,
            dst_pin: lint,
        };
        entries.extend_from_slice(local.as_slice());
    }
    let entry_count = u16::from(num_cpus) + 1 + 1 + u16::from(routed_pins) + 2;

    let config_addr = MPTABLE_START + size_of::<FloatingPointer>() as u64;
    let mut header = ConfigHeader {
        signature: *b"PCMP",
        base_table_length: (size_of::<ConfigHeader>() + entries.len()) as u16,
        spec_rev: SPEC_REV,
        oem_id: *b"KILN    ",
        product_id: *b"MICROVM     ",
        entry_count,
        lapic_address: APIC_START as u32,
        ..Default::default()
    };
    let mut sum = header.as_slice().to_vec();
    sum.extend_from_slice(&entries);
    header.checksum = checksum(&sum);

    let mut fp = FloatingPointer {
        signature: *b"_MP_",
        config_table: config_addr as u32,
        length: 1,
        spec_rev: SPEC_REV,
        ..Default::default()
    };
    fp.checksum = checksum(fp.as_slice());

    let mut table = Vec::with_capacity(FIXED_SIZE + entries.len());
    table.extend_from_slice(fp.as_slice());
    table.extend_from_slice(header.as_slice());
    table.extend_from_slice(&entries);
    debug_assert!(MPTABLE_START + table.len() as u64 <= EBDA_END);
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn sum(mem: &GuestMemoryMmap, addr: u64, len: usize) -> u8 {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_are_zero() {
        let mem = guest_mem();
        setup_mptable(&mem, 2, IRQ_MAX).unwrap();
        assert_eq!(sum(&mem, MPTABLE_START, size_of::<FloatingPointer>()), 0);
        let fp: FloatingPointer = mem.read_obj(GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(&fp.signature, b"_MP_");
        let addr = u64::from(fp.config_table);
        let header: ConfigHeader = mem.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!(&header.signature, b"PCMP");
        assert_eq!(sum(&mem, addr, header.base_table_length.into()), 0);
    }

    /// Walks the entries by type, as the guest does, checking each; returns
    /// the count of each entry type and the IOAPIC pins routed, in order.
    fn walk(mem: &GuestMemoryMmap, cpus: u8) -> ([u32; 5], Vec<u8>) {
        let fp: FloatingPointer = mem.read_obj(GuestAddress(MPTABLE_START)).unwrap();
        let header_addr = u64::from(fp.config_table);
        let header: ConfigHeader = mem.read_obj(GuestAddress(header_addr)).unwrap();
        let end = header_addr + u64::from(header.base_table_length);
        assert!(end <= EBDA_END);
        let mut addr = header_addr + size_of::<ConfigHeader>() as u64;
        let mut seen = [0u32; 5];
        let mut pins = Vec::new();
        for _ in 0..header.entry_count {
            let kind: u8 = mem.read_obj(GuestAddress(addr)).unwrap();
            seen[kind as usize] += 1;
            addr += match kind {
                ENTRY_PROCESSOR => {
                    let cpu: ProcessorEntry = mem.read_obj(GuestAddress(addr)).unwrap();
                    let id = u32::from(cpu.lapic_id);
                    assert_eq!(id + 1, seen[0]);
                    let bsp = if id == 0 { CPU_FLAG_BSP } else { 0 };
                    assert_eq!(cpu.flags, CPU_FLAG_ENABLED | bsp);
                    size_of::<ProcessorEntry>() as u64
                }
                ENTRY_IOAPIC => {
                    let io: IoapicEntry = mem.read_obj(GuestAddress(addr)).unwrap();
                    assert_eq!((io.ioapic_id, io.version), (cpus, IOAPIC_VERSION));
                    assert_eq!({ io.address }, IOAPIC_START as u32);
                    8
                }
                ENTRY_IO_INTERRUPT => {
                    let irq: InterruptEntry = mem.read_obj(GuestAddress(addr)).unwrap();
                    assert_eq!(irq.src_irq, irq.dst_pin);
                    assert_eq!(irq.dst_apic, cpus);
                    pins.push(irq.dst_pin);
                    8
                }
                _ => 8,
            };
        }
        assert_eq!(addr, end);
        (seen, pins)
    }

    #[test]
    fn entries_match_cpus() {
        for cpus in [1, 2, 7, MAX_CPUS] {
            let mem = guest_mem();
            setup_mptable(&mem, cpus, IRQ_MAX).unwrap();
            let (seen, _) = walk(&mem, cpus);
            assert_eq!(seen, [u32::from(cpus), 1, 1, 24, 2]);
        }
    }

    /// The ISA IRQs are always routed; above them, the pins up to the
    /// highest device IRQ and no more (the guest sets up each listed pin).
    #[test]
    fn routed_pins_follow_the_highest_device_irq() {
        for (highest_irq, routed) in [(4, 16u8), (15, 16), (16, 17), (20, 21), (IRQ_MAX, 24)] {
            let mem = guest_mem();
            setup_mptable(&mem, 1, highest_irq).unwrap();
            let (seen, pins) = walk(&mem, 1);
            assert_eq!(seen, [1, 1, 1, u32::from(routed), 2], "IRQ {highest_irq}");
            assert_eq!(pins, (0..routed).collect::<Vec<_>>(), "IRQ {highest_irq}");
        }
        let mem = guest_mem();
        assert!(matches!(
            setup_mptable(&mem, 1, IRQ_MAX + 1),
            Err(MptableError::Irq(irq)) if irq == IRQ_MAX + 1
        ));
    }

    #[test]
    fn bad_cpu_counts_are_rejected() {
        let mem = guest_mem();
        assert!(matches!(
            setup_mptable(&mem, 0, IRQ_MAX),
            Err(MptableError::CpuCount(0))
        ));
        let too_many = MAX_CPUS + 1;
        assert!(matches!(
            setup_mptable(&mem, too_many, IRQ_MAX),
            Err(MptableError::CpuCount(n)) if n == too_many
        ));
    }

    #[test]
    fn write_outside_memory_fails() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(
            setup_mptable(&mem, 1, IRQ_MAX),
            Err(MptableError::Write(_))
        ));
    }
}
