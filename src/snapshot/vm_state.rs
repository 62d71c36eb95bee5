//! The VM-wide KVM state the guest can see: the in-kernel PIT, the KVM
//! clock and the three interrupt controllers (kiln's VM creates the PIT
//! with KVM_CREATE_PIT2 and the PICs and IOAPIC with KVM_CREATE_IRQCHIP).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::SnapshotError;

#[derive(Serialize, Deserialize)]
pub(crate) struct VmState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl VmState {
    /// Reads the state of a VM whose vCPUs are paused.
    pub(crate) fn save(vm: &VmFd) -> Result<Self, SnapshotError> {
        let pit = vm.get_pit2().map_err(SnapshotError::kvm("KVM_GET_PIT2"))?;
        let mut clock = vm
            .get_clock()
            .map_err(SnapshotError::kvm("KVM_GET_CLOCK"))?;
        // A property of the host's clock now, not state to carry (as
        // Firecracker does).
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        let [pic_master, pic_slave, ioapic] = CHIPS.map(|chip_id| {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip).map(|()| chip)
        });
        let chip = |r: Result<kvm_irqchip, kvm_ioctls::Error>| {
            r.map_err(SnapshotError::kvm("KVM_GET_IRQCHIP"))
        };
        Ok(Self {
            pit,
            clock,
            pic_master: chip(pic_master)?,
            pic_slave: chip(pic_slave)?,
            ioapic: chip(ioapic)?,
        })
    }

    /// Writes the state into a fresh VM (after its vCPUs' state).
    pub(crate) fn restore(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        vm.set_pit2(&self.pit)
            .map_err(SnapshotError::kvm("KVM_SET_PIT2"))?;
        vm.set_clock(&self.clock)
            .map_err(SnapshotError::kvm("KVM_SET_CLOCK"))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip)
                .map_err(SnapshotError::kvm("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}
