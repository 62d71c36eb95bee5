//! One vCPU's guest-visible KVM state, read and written in Firecracker's
//! documented order.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// What KVM holds of one vCPU that the guest can see.
#[derive(Serialize, Deserialize)]
pub(crate) struct VcpuState {
    /// The CPUID the vCPU was given (its own APIC id included).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
}

/// IA32_TSC_DEADLINE: armed relative to IA32_TSC, so restored after it.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// The MSRs to save: KVM's list plus what Firecracker adds (MTRRs, PAT,
/// the machine-check registers), which KVM emulates but does not list.
/// Those this host cannot read are left out when they are read.
pub(crate) fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>, SnapshotError> {
    let listed = kvm
        .get_msr_index_list()
        .map_err(SnapshotError::kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mtrr = (0x200..=0x20f)
        .chain([0x250, 0x258, 0x259])
        .chain(0x268..=0x26f);
    let pat_and_mtrr_default = [0x277, 0x2ff];
    let mce = [0x17a, 0x17b].into_iter().chain(0x400..0x480);
    let mut indices: Vec<u32> = listed.as_slice().to_vec();
    for index in mtrr.chain(pat_and_mtrr_default).chain(mce) {
        if !indices.contains(&index) {
            indices.push(index);
        }
    }
    // Stable sort: everything else keeps KVM's order.
    indices.sort_by_key(|&index| index == MSR_IA32_TSC_DEADLINE);
    Ok(indices)
}

impl VcpuState {
    /// Reads the state of a vCPU that is out of KVM_RUN with its last exit
    /// completed. The order is Firecracker's: MP_STATE first (reading it
    /// lets the LAPIC accept pending events), VCPU_EVENTS last (the other
    /// reads may change what is pending).
    pub(crate) fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<Self, SnapshotError> {
        let mp_state = vcpu
            .get_mp_state()
            .map_err(SnapshotError::kvm("KVM_GET_MP_STATE"))?;
        let regs = vcpu
            .get_regs()
            .map_err(SnapshotError::kvm("KVM_GET_REGS"))?;
        let sregs = vcpu
            .get_sregs()
            .map_err(SnapshotError::kvm("KVM_GET_SREGS"))?;
        let xsave = vcpu
            .get_xsave()
            .map_err(SnapshotError::kvm("KVM_GET_XSAVE"))?;
        let xcrs = vcpu
            .get_xcrs()
            .map_err(SnapshotError::kvm("KVM_GET_XCRS"))?;
        let debug_regs = vcpu
            .get_debug_regs()
            .map_err(SnapshotError::kvm("KVM_GET_DEBUGREGS"))?;
        let lapic = vcpu
            .get_lapic()
            .map_err(SnapshotError::kvm("KVM_GET_LAPIC"))?;
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(SnapshotError::kvm("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let msrs = read_msrs(vcpu, msr_indices)?;
        let vcpu_events = vcpu
            .get_vcpu_events()
            .map_err(SnapshotError::kvm("KVM_GET_VCPU_EVENTS"))?;
        Ok(Self {
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            vcpu_events,
        })
    }

    /// Writes the state into a fresh vCPU whose guest TSC runs at the
    /// saved frequency, in the order it was read (CPUID first: KVM checks
    /// the rest against it).
    pub(crate) fn restore(&self, vcpu: &VcpuFd) -> Result<(), SnapshotError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|e| {
            SnapshotError::Unsupported(format!("{} CPUID entries: {e:?}", self.cpuid.len()))
        })?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(SnapshotError::kvm("KVM_SET_CPUID2"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(SnapshotError::kvm("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs)
            .map_err(SnapshotError::kvm("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(SnapshotError::kvm("KVM_SET_SREGS"))?;
        // SAFETY: a kvm_xsave is the legacy 4 KiB area KVM_SET_XSAVE reads
        // (KVM_CAP_XSAVE2 larger areas are refused at save).
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(SnapshotError::kvm("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs)
            .map_err(SnapshotError::kvm("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(SnapshotError::kvm("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(SnapshotError::kvm("KVM_SET_LAPIC"))?;
        for chunk in self.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = msr_list(chunk)?;
            let written = vcpu
                .set_msrs(&msrs)
                .map_err(SnapshotError::kvm("KVM_SET_MSRS"))?;
            if written != chunk.len() {
                return Err(SnapshotError::Rejected(format!(
                    "KVM_SET_MSRS refused MSR {:#x}",
                    chunk[written].index
                )));
            }
        }
        vcpu.set_vcpu_events(&self.vcpu_events)
            .map_err(SnapshotError::kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Gives a fresh vCPU the saved guest TSC frequency: nothing to do when the
/// host's is the same; otherwise KVM_SET_TSC_KHZ, only where KVM can scale
/// the TSC (KVM_CAP_TSC_CONTROL). Without it KVM refuses a lower rate and
/// fakes a higher one by catching up at each entry, and on PVM the guest
/// TSC is the host's whatever is set: refused either way.
pub(crate) fn match_tsc_khz(kvm: &Kvm, vcpu: &VcpuFd, saved: u32) -> Result<(), SnapshotError> {
    let host = tsc_khz(vcpu)?;
    if host == saved {
        return Ok(());
    }
    let refused = |reason: String| SnapshotError::TscFrequency {
        saved,
        host,
        reason,
    };
    if !kvm.check_extension(Cap::TscControl) {
        return Err(refused("KVM cannot scale the TSC on this host".into()));
    }
    vcpu.set_tsc_khz(saved)
        .map_err(|e| refused(format!("KVM_SET_TSC_KHZ failed: {e}")))
}

/// The guest TSC frequency of a vCPU.
pub(crate) fn tsc_khz(vcpu: &VcpuFd) -> Result<u32, SnapshotError> {
    vcpu.get_tsc_khz()
        .map_err(SnapshotError::kvm("KVM_GET_TSC_KHZ"))
}

/// Refuses a host whose XSAVE area is larger than the legacy 4 KiB one
/// (AMX): that needs KVM_GET_XSAVE2, not done yet.
pub(crate) fn check_xsave_size(kvm_vm: &kvm_ioctls::VmFd) -> Result<(), SnapshotError> {
    let size = kvm_vm.check_extension_int(Cap::Xsave2);
    if size > std::mem::size_of::<kvm_xsave>() as i32 {
        return Err(SnapshotError::Unsupported(format!(
            "an XSAVE area of {size} bytes (larger than 4 KiB: AMX)"
        )));
    }
    Ok(())
}

fn msr_list(entries: &[kvm_msr_entry]) -> Result<Msrs, SnapshotError> {
    Msrs::from_entries(entries).map_err(|e| {
        SnapshotError::Unsupported(format!("an MSR list of {} entries: {e:?}", entries.len()))
    })
}

/// Reads the MSRs of `indices` that this vCPU has. KVM_GET_MSRS stops at
/// the first MSR it cannot read: that one is skipped and the read goes on.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msr_list(&entries)?;
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(SnapshotError::kvm("KVM_GET_MSRS"))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        let skip = match read < chunk.len() {
            true => {
                log::debug!("snapshot: MSR {:#x} not readable, not saved", chunk[read]);
                read + 1
            }
            false => read,
        };
        rest = &rest[skip..];
    }
    Ok(saved)
}
