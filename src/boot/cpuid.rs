//! Per-vCPU CPUID fixups on top of what KVM reports as supported.
//!
//! KVM's supported CPUID describes the host CPU; each vCPU needs its own APIC
//! ids and a topology that matches the VM (one package, one thread per core,
//! `num_vcpus` cores), and the host profile may hide KVM paravirt features.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use crate::host_profile::HostProfile;

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE: u32 = 4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_LINE_SIZE: u32 = 8;

// Extended topology level types (ECX[15:8] of leaves 0xB and 0x1F).
const LEVEL_INVALID: u32 = 0;
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Applies the fixups for vCPU `vcpu_id` (also its APIC id) of `num_vcpus`.
pub fn configure_vcpu_cpuid(cpuid: &mut CpuId, vcpu_id: u8, num_vcpus: u8, profile: HostProfile) {
    let hidden = profile.hidden_kvm_features();
    let mut topology_leaves = Vec::new();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => fix_features(entry, vcpu_id, num_vcpus),
            LEAF_CACHE => fix_cache(entry, num_vcpus),
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => topology_leaves.push(entry.function),
            LEAF_KVM_FEATURES => entry.eax &= !hidden,
            LEAF_AMD_SIZES => fix_amd_core_count(entry, num_vcpus),
            _ => {}
        }
    }
    topology_leaves.dedup();
    for leaf in topology_leaves {
        set_topology(cpuid, leaf, vcpu_id, num_vcpus);
    }
}

fn fix_features(entry: &mut kvm_cpuid_entry2, vcpu_id: u8, num_vcpus: u8) {
    // Keep the brand index in EBX[7:0]; TSC-deadline (ECX bit 24) stays as KVM reports it.
    entry.ebx = (entry.ebx & 0xff)
        | u32::from(vcpu_id) << 24
        | u32::from(num_vcpus) << 16
        | CLFLUSH_LINE_SIZE << 8;
    entry.ecx |= LEAF1_ECX_HYPERVISOR;
    if num_vcpus > 1 {
        entry.edx |= LEAF1_EDX_HTT;
    } else {
        entry.edx &= !LEAF1_EDX_HTT;
    }
}

fn fix_cache(entry: &mut kvm_cpuid_entry2, num_vcpus: u8) {
    if entry.eax & 0x1f == 0 {
        return; // no more caches
    }
    let cores = u32::from(num_vcpus.max(1)) - 1;
    // Levels 1 and 2 are private to a core (one thread each); level 3 and up are
    // shared by the whole package.
    let level = (entry.eax >> 5) & 0x7;
    let sharing = if level >= 3 { cores } else { 0 };
    entry.eax = (entry.eax & 0x3fff) | cores.min(0x3f) << 26 | sharing.min(0xfff) << 14;
}

/// AMD's core count (ECX[7:0], cores - 1) and APIC id core bits (ECX[15:12])
/// must describe the VM: KVM passes the host's (a 1-vCPU guest was told of
/// the host's two threads). Zero core bits means "use the count" (AMD APM).
fn fix_amd_core_count(entry: &mut kvm_cpuid_entry2, num_vcpus: u8) {
    let cores = u32::from(num_vcpus.max(1));
    let core_bits = cores.next_power_of_two().trailing_zeros();
    entry.ecx = (entry.ecx & !0xf0ff) | core_bits << 12 | (cores - 1);
}

/// Replaces every subleaf of `leaf` with SMT (1 thread per core), Core
/// (`num_vcpus`) and a terminating invalid level.
fn set_topology(cpuid: &mut CpuId, leaf: u32, vcpu_id: u8, num_vcpus: u8) {
    // APIC id bits to shift right to reach the package id.
    let core_shift = u32::from(num_vcpus.max(1))
        .next_power_of_two()
        .trailing_zeros();
    let level = |index: u32, shift: u32, count: u32, kind: u32| kvm_cpuid_entry2 {
        function: leaf,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax: shift,
        ebx: count,
        ecx: kind << 8 | index,
        edx: u32::from(vcpu_id),
        ..Default::default()
    };
    let levels = [
        level(0, 0, 1, LEVEL_SMT),
        level(1, core_shift, num_vcpus.into(), LEVEL_CORE),
        level(2, 0, 0, LEVEL_INVALID),
    ];
    cpuid.retain(|e| e.function != leaf);
    for entry in levels {
        // Only fails when the table already holds KVM_MAX_CPUID_ENTRIES entries.
        if let Err(e) = cpuid.push(entry) {
            log::warn!(
                "CPUID leaf {leaf:#x} subleaf {} dropped: {e:?}",
                entry.index
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// A host-like table: 2-thread SMT cores, L1d/L1i/L2/L3 caches, KVM leaves.
    fn synthetic() -> CpuId {
        let cache = |index: u32, level: u32, kind: u32| {
            entry(4, index, [0x1c00_4000 | level << 5 | kind, 0, 0, 0])
        };
        CpuId::from_entries(&[
            entry(0, 0, [0x1f, 0, 0, 0]),
            entry(1, 0, [0x806f8, 0x0510_0805, 0x0100_0000, 0x1 << 28]),
            cache(0, 1, 1),
            cache(1, 1, 2),
            cache(2, 2, 3),
            cache(3, 3, 3),
            entry(4, 4, [0; 4]),
            entry(0xb, 0, [1, 2, 0x100, 5]),
            entry(0xb, 1, [6, 32, 0x201, 5]),
            entry(0xb, 2, [0, 0, 0x2, 5]),
            entry(0x1f, 0, [1, 2, 0x100, 5]),
            entry(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            entry(0x4000_0001, 0, [0xffff_ffff, 0, 0, 0]),
            entry(0x8000_0008, 0, [0x3030, 0, 0x0003_7001, 0]),
        ])
        .unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("no leaf {function:#x}.{index}"))
    }

    fn leaves(cpuid: &CpuId, function: u32) -> Vec<kvm_cpuid_entry2> {
        let all = cpuid.as_slice().iter();
        all.filter(|e| e.function == function).copied().collect()
    }

    #[test]
    fn leaf1_ids_and_flags() {
        let mut cpuid = synthetic();
        configure_vcpu_cpuid(&mut cpuid, 3, 4, HostProfile::HardwareKvm);
        let l1 = find(&cpuid, 1, 0);
        assert_eq!(l1.ebx, 0x0304_0805);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & (1 << 24), 0, "TSC-deadline kept");
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);

        let mut cpuid = synthetic();
        configure_vcpu_cpuid(&mut cpuid, 0, 1, HostProfile::HardwareKvm);
        let l1 = find(&cpuid, 1, 0);
        assert_eq!(l1.ebx >> 16, 0x0001);
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn cache_topology() {
        let host = synthetic();
        let mut cpuid = synthetic();
        configure_vcpu_cpuid(&mut cpuid, 1, 4, HostProfile::HardwareKvm);
        for (index, sharing) in [(0, 0), (1, 0), (2, 0), (3, 3)] {
            let eax = find(&cpuid, 4, index).eax;
            assert_eq!(eax >> 26, 3, "cores - 1");
            assert_eq!((eax >> 14) & 0xfff, sharing);
            assert_eq!(eax & 0x3fff, find(&host, 4, index).eax & 0x3fff);
        }
        assert_eq!(find(&cpuid, 4, 4).eax, 0);
    }

    #[test]
    fn extended_topology() {
        for (vcpus, shift) in [(1u8, 0u32), (2, 1), (3, 2), (4, 2), (5, 3)] {
            let vcpu = vcpus - 1;
            let mut cpuid = synthetic();
            configure_vcpu_cpuid(&mut cpuid, vcpu, vcpus, HostProfile::HardwareKvm);
            for leaf in [0xb, 0x1f] {
                let levels = leaves(&cpuid, leaf);
                assert_eq!(levels.len(), 3);
                let regs: Vec<_> = levels.iter().map(|e| (e.eax, e.ebx, e.ecx)).collect();
                let want = [(0, 1, 0x100), (shift, vcpus.into(), 0x201), (0, 0, 2)];
                assert_eq!(regs, want, "leaf {leaf:#x} for {vcpus} vCPUs");
                for e in &levels {
                    assert_eq!(e.edx, u32::from(vcpu));
                    assert_eq!(e.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
                }
            }
        }
    }

    #[test]
    fn amd_core_count_describes_the_vm() {
        for (vcpus, ecx) in [
            (1u8, 0x0003_0000),
            (2, 0x0003_1001),
            (3, 0x0003_2002),
            (4, 0x0003_2003),
        ] {
            let mut cpuid = synthetic();
            configure_vcpu_cpuid(&mut cpuid, 0, vcpus, HostProfile::HardwareKvm);
            let leaf = find(&cpuid, 0x8000_0008, 0);
            assert_eq!(leaf.ecx, ecx, "{vcpus} vCPUs");
            assert_eq!(leaf.eax, 0x3030, "address sizes kept");
        }
    }

    #[test]
    fn absent_topology_leaf_is_not_added() {
        let mut cpuid = synthetic();
        cpuid.retain(|e| e.function != 0x1f);
        configure_vcpu_cpuid(&mut cpuid, 0, 2, HostProfile::HardwareKvm);
        assert!(leaves(&cpuid, 0x1f).is_empty());
        assert_eq!(leaves(&cpuid, 0xb).len(), 3);
    }

    #[test]
    fn kvm_features_follow_host_profile() {
        let mut cpuid = synthetic();
        configure_vcpu_cpuid(&mut cpuid, 0, 2, HostProfile::HardwareKvm);
        assert_eq!(find(&cpuid, 0x4000_0001, 0).eax, 0xffff_ffff);

        let mut cpuid = synthetic();
        configure_vcpu_cpuid(&mut cpuid, 0, 2, HostProfile::Pvm);
        let eax = find(&cpuid, 0x4000_0001, 0).eax;
        assert_eq!(eax, !HostProfile::Pvm.hidden_kvm_features());
        assert_eq!(eax & (1 << 7 | 1 << 11 | 1 << 13), 0);
        // The signature leaf is left as KVM supplies it.
        assert_eq!(find(&cpuid, 0x4000_0000, 0).ebx, 0x4b4d_564b);
    }

    /// The fixups on the CPUID this host's KVM really reports (needs /dev/kvm).
    #[test]
    fn real_kvm_supported_cpuid() {
        if !kiln_prereq::require(kiln_prereq::have_kvm(), "/dev/kvm not accessible") {
            return;
        }
        let kvm = kvm_ioctls::Kvm::new().expect("opening /dev/kvm");
        let mut cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID");
        configure_vcpu_cpuid(&mut cpuid, 1, 2, HostProfile::detect());
        if let Some(l1) = leaves(&cpuid, 1).first() {
            assert_eq!(l1.ebx >> 24, 1);
        }
        if let Some(l0xb) = leaves(&cpuid, 0xb).first() {
            assert_eq!(l0xb.edx, 1);
        }
    }
}
