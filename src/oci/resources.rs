//! The container's resource limits (`linux.resources`) as the size of its
//! VM. A VM has no cgroup around its container: what bounds the command is
//! the guest's RAM and vCPUs, so a memory limit and a CPU quota size the VM
//! (as Kata Containers does) instead of being written to host cgroups.
//!
//! - `memory.limit` N > 0: the guest gets N plus `GUEST_ALLOWANCE` (what the
//!   guest kernel and kiln's init keep for themselves), so the command can
//!   use about N, as under runc; without a limit, the configured memory.
//! - `cpu.quota` Q > 0 with `cpu.period` P > 0: ceil(Q / P) vCPUs (`--cpus
//!   1.5` is 2); without a quota, the configured vCPUs. Shares, cpusets and
//!   the other controllers are not applied (nothing to apply them to).

use serde::Deserialize;

use super::settings::Settings;

/// Guest RAM kept by the guest kernel and kiln's init on top of a
/// container's memory limit (the recipe kernel boots and serves commands
/// in well under this).
pub const GUEST_ALLOWANCE: u64 = 64 << 20;

/// `linux.resources`, the part kiln-oci applies.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ResourcesSpec {
    /// `memory`.
    pub memory: Option<MemorySpec>,
    /// `cpu`.
    pub cpu: Option<CpuSpec>,
}

/// `linux.resources.memory`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct MemorySpec {
    /// Bytes; 0 or negative: no limit (runc reads -1 as unlimited).
    pub limit: Option<i64>,
}

/// `linux.resources.cpu`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CpuSpec {
    /// CFS quota in microseconds per period; 0 or negative: no quota.
    pub quota: Option<i64>,
    /// CFS period in microseconds.
    pub period: Option<u64>,
}

/// The VM's memory in bytes and its vCPUs for a container with
/// `resources`: the limits where the spec sets them, else `settings`.
/// Fails with one line when a limit cannot be a VM's size (more than
/// `host_ram` bytes with the allowance, or over 255 vCPUs).
pub fn vm_size(
    settings: &Settings,
    resources: Option<&ResourcesSpec>,
    host_ram: Option<u64>,
) -> Result<(u64, u8), String> {
    let mut mem_bytes = settings.mem_bytes;
    let mut vcpus = settings.vcpus;
    let Some(resources) = resources else {
        return Ok((mem_bytes, vcpus));
    };
    if let Some(limit) = resources.memory.as_ref().and_then(|m| m.limit) {
        if limit > 0 {
            // A whole number of pages, as guest RAM must be.
            let pages = (limit as u64).div_ceil(4096);
            mem_bytes = pages
                .checked_mul(4096)
                .and_then(|bytes| bytes.checked_add(GUEST_ALLOWANCE))
                .filter(|&bytes| host_ram.is_none_or(|host| bytes <= host))
                .ok_or_else(|| {
                    format!(
                        "memory limit {} MiB plus the guest kernel's {} MiB is more than \
                         this host's {} MiB of RAM",
                        limit >> 20,
                        GUEST_ALLOWANCE >> 20,
                        host_ram.unwrap_or(u64::MAX) >> 20
                    )
                })?;
        }
    }
    if let Some(cpu) = &resources.cpu {
        if let (Some(quota), Some(period)) = (cpu.quota, cpu.period) {
            if quota > 0 && period > 0 {
                let wanted = (quota as u64).div_ceil(period);
                vcpus = u8::try_from(wanted).map_err(|_| {
                    format!(
                        "cpu quota {quota}/{period} asks for {wanted} vCPUs; a VM has at most 255"
                    )
                })?;
            }
        }
    }
    Ok((mem_bytes, vcpus))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            kernel: "/k".into(),
            mem_bytes: 256 << 20,
            vcpus: 1,
            container_root: Default::default(),
        }
    }

    /// A host with 64 GiB of RAM.
    const HOST: Option<u64> = Some(64 << 30);

    fn resources(json: &str) -> ResourcesSpec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn no_limits_keep_the_configured_size() {
        assert_eq!(vm_size(&settings(), None, HOST), Ok((256 << 20, 1)));
        let unlimited = resources(
            r#"{"memory":{"limit":-1,"swap":-1},"cpu":{"shares":1024,"quota":-1,"period":100000}}"#,
        );
        assert_eq!(
            vm_size(&settings(), Some(&unlimited), HOST),
            Ok((256 << 20, 1))
        );
        assert_eq!(
            vm_size(&settings(), Some(&resources("{}")), HOST),
            Ok((256 << 20, 1))
        );
    }

    #[test]
    fn a_memory_limit_is_the_guests_ram_above_the_allowance() {
        let r = resources(r#"{"memory":{"limit":335544320}}"#);
        assert_eq!(
            vm_size(&settings(), Some(&r), HOST),
            Ok(((320 << 20) + GUEST_ALLOWANCE, 1))
        );
        // Rounded up to a page: podman passes whatever the user typed.
        let r = resources(r#"{"memory":{"limit":6291457}}"#);
        assert_eq!(
            vm_size(&settings(), Some(&r), HOST).unwrap().0,
            (6 << 20) + 4096 + GUEST_ALLOWANCE
        );
        let r = resources(r#"{"memory":{"limit":8589934592}}"#);
        let err = vm_size(&settings(), Some(&r), Some(4 << 30)).unwrap_err();
        assert_eq!(
            err,
            "memory limit 8192 MiB plus the guest kernel's 64 MiB is more than this host's 4096 MiB of RAM"
        );
        let r = resources(&format!(r#"{{"memory":{{"limit":{}}}}}"#, i64::MAX));
        assert!(vm_size(&settings(), Some(&r), HOST).is_err());
    }

    #[test]
    fn a_cpu_quota_is_rounded_up_to_whole_vcpus() {
        let quota = |q: i64, p: u64| {
            let r = resources(&format!(r#"{{"cpu":{{"quota":{q},"period":{p}}}}}"#));
            vm_size(&settings(), Some(&r), HOST).map(|(_, vcpus)| vcpus)
        };
        assert_eq!(quota(200_000, 100_000), Ok(2));
        assert_eq!(quota(150_000, 100_000), Ok(2));
        assert_eq!(quota(50_000, 100_000), Ok(1));
        assert_eq!(quota(0, 100_000), Ok(1));
        let err = quota(1_000_000_000, 1000).unwrap_err();
        assert!(err.contains("at most 255"), "{err}");
        // A quota without a period is no quota.
        let r = resources(r#"{"cpu":{"quota":200000}}"#);
        assert_eq!(vm_size(&settings(), Some(&r), HOST), Ok((256 << 20, 1)));
    }
}
