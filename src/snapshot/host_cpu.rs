//! The host CPU a snapshot was taken on: its vendor (a restore on another
//! vendor's CPU is refused) and model (recorded for people, not checked).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HostCpu {
    /// CPUID leaf 0's vendor string, e.g. `GenuineIntel`.
    pub vendor: String,
    /// The brand string of leaves 0x8000_0002-4.
    pub model: String,
}

impl HostCpu {
    pub(crate) fn detect() -> Self {
        use std::arch::x86_64::__cpuid;
        let text = |regs: &[u32]| {
            let bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_le_bytes()).collect();
            String::from_utf8_lossy(&bytes)
                .trim_matches(|c: char| c == '\0' || c.is_whitespace())
                .to_string()
        };
        let leaf0 = __cpuid(0);
        let vendor = text(&[leaf0.ebx, leaf0.edx, leaf0.ecx]);
        let model = match __cpuid(0x8000_0000).eax >= 0x8000_0004 {
            true => {
                let regs: Vec<u32> = (0x8000_0002..=0x8000_0004)
                    .map(__cpuid)
                    .flat_map(|r| [r.eax, r.ebx, r.ecx, r.edx])
                    .collect();
                text(&regs)
            }
            false => String::new(),
        };
        Self { vendor, model }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_vendor_is_a_known_one() {
        let cpu = HostCpu::detect();
        assert!(
            ["GenuineIntel", "AuthenticAMD", "HygonGenuine"].contains(&cpu.vendor.as_str()),
            "{cpu:?}"
        );
    }
}
