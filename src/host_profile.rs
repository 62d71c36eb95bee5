//! Host profile: the one place where kiln adapts to the kind of KVM it runs on.
//!
//! On hardware KVM (VMX/SVM) kiln needs nothing special. On PVM (`kvm_pvm`,
//! KVM without hardware virtualisation, used in nested clouds) the guest
//! kernel runs under KVM's instruction emulator, which lacks some
//! instructions and never returns from some paravirt hypercalls. Each
//! workaround below names the symptom it avoids:
//!
//! - `clearcpuid=smap`: the kernel's `clac` in the timer interrupt entry is an
//!   emulation failure (KVM_EXIT_INTERNAL_ERROR).
//! - `clearcpuid=popcnt`: `popcnt` in the page allocator is an emulation failure.
//! - `noxsave`: `xrstor` is an emulation failure. Hiding SMAP/XSAVE through
//!   CPUID alone was measured not to take effect; the command line does.
//! - `nofsgsbase`: with FSGSBASE, an NMI taken in guest kernel mode enters
//!   `paranoid_entry`, whose `lsl` is an emulation failure: the VM dies. The
//!   NMIs come from the guest itself (RCU stall backtraces on a slow host).
//! - `rcupdate.rcu_cpu_stall_suppress=1`: emulated guest kernels are slow
//!   enough for RCU to report false stalls; each report prints pages of
//!   console output (one exit per byte) and sends those NMIs.
//! - `GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,...` (the price of `noxsave`):
//!   the guest kernel then saves and restores only x87/SSE state, but guest
//!   user mode runs natively with the host's XCR0. There CPUID and XGETBV
//!   are not intercepted and report AVX as usable, and the guest's own XCR0
//!   is not applied (measured: a tiny guest that sets CR4.OSXSAVE and
//!   XCR0 = x87|SSE still reads XCR0 = 7 in user mode and runs `vpxor ymm`).
//!   So glibc picks its AVX2 `memcpy`/`strlen`, and when the guest kernel
//!   switches tasks in the middle of one the upper halves of the YMM
//!   registers are lost: 16-byte runs of zeros (or another process's bytes)
//!   in data being copied. Bulk stdin into the sandbox arrived altered that
//!   way (kiln's agent and busybox are static glibc programs; the vsock
//!   path itself is byte-exact). The kernel hands this word to init as an
//!   environment variable, and init passes it to every command
//!   (`kiln_init::spec::PLATFORM_ENV`), so glibc in the guest uses its SSE
//!   code. Programs that choose AVX themselves, not through glibc, are not
//!   covered.
//! - Hidden KVM paravirt features PV_SEND_IPI, PV_UNHALT and PV_SCHED_YIELD
//!   (CPUID 0x4000_0001): with SMP the guest uses their hypercalls
//!   (`KVM_HC_SEND_IPI`, ...), which never return on PVM, so the vCPU hangs.
//!
//! On hardware KVM every accessor here returns a no-op value.

use std::path::Path;
use std::sync::OnceLock;

/// Environment variable that overrides detection: `pvm` or `hardware`.
pub const HOST_PROFILE_ENV: &str = "KILN_HOST_PROFILE";
/// Present when the host's /dev/kvm is provided by PVM.
const PVM_MODULE_PATH: &str = "/sys/module/kvm_pvm";

// KVM paravirt feature bits in CPUID 0x4000_0001 EAX (Linux uapi kvm_para.h;
// kvm-bindings does not export them).
const KVM_FEATURE_PV_UNHALT: u32 = 7;
const KVM_FEATURE_PV_SEND_IPI: u32 = 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 13;

/// Command line words a PVM host needs (see the module comment for each).
const PVM_CMDLINE: &str = concat!(
    "noxsave clearcpuid=smap,popcnt nofsgsbase rcupdate.rcu_cpu_stall_suppress=1 ",
    "GLIBC_TUNABLES=glibc.cpu.hwcaps=",
    "-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX_Fast_Unaligned_Load"
);

/// The kind of KVM kiln runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostProfile {
    /// KVM backed by VMX/SVM: no adaptations.
    HardwareKvm,
    /// KVM provided by the `kvm_pvm` module: the guest kernel is emulated.
    Pvm,
}

impl HostProfile {
    /// Detects the host profile: `KILN_HOST_PROFILE` if set to a known value,
    /// else PVM when `/sys/module/kvm_pvm` exists. Evaluated and logged on
    /// the first call; later calls return the same profile.
    pub fn detect() -> HostProfile {
        // Once per process: a jailed kiln no longer sees /sys (see `jail`).
        static PROFILE: OnceLock<HostProfile> = OnceLock::new();
        *PROFILE.get_or_init(|| {
            let env = std::env::var(HOST_PROFILE_ENV).ok();
            let (profile, why) = choose(env.as_deref(), Path::new(PVM_MODULE_PATH).exists());
            log::info!("host profile: {profile:?} ({why})");
            profile
        })
    }

    /// Extra guest kernel command line words this host needs (may be empty).
    pub fn kernel_cmdline_additions(self) -> &'static str {
        match self {
            HostProfile::HardwareKvm => "",
            HostProfile::Pvm => PVM_CMDLINE,
        }
    }

    /// Mask of KVM paravirt feature bits (CPUID 0x4000_0001 EAX) to hide.
    pub fn hidden_kvm_features(self) -> u32 {
        match self {
            HostProfile::HardwareKvm => 0,
            HostProfile::Pvm => {
                1 << KVM_FEATURE_PV_UNHALT
                    | 1 << KVM_FEATURE_PV_SEND_IPI
                    | 1 << KVM_FEATURE_PV_SCHED_YIELD
            }
        }
    }
}

/// Picks the profile from the override value and the module check, with the
/// reason for the log line.
fn choose(env: Option<&str>, pvm_loaded: bool) -> (HostProfile, &'static str) {
    match env.map(str::trim) {
        Some(v) if v.eq_ignore_ascii_case("pvm") => (HostProfile::Pvm, "KILN_HOST_PROFILE=pvm"),
        Some(v) if v.eq_ignore_ascii_case("hardware") => {
            (HostProfile::HardwareKvm, "KILN_HOST_PROFILE=hardware")
        }
        Some(_) if pvm_loaded => (
            HostProfile::Pvm,
            "unknown KILN_HOST_PROFILE ignored; /sys/module/kvm_pvm exists",
        ),
        Some(_) => (
            HostProfile::HardwareKvm,
            "unknown KILN_HOST_PROFILE ignored; no /sys/module/kvm_pvm",
        ),
        None if pvm_loaded => (HostProfile::Pvm, "/sys/module/kvm_pvm exists"),
        None => (HostProfile::HardwareKvm, "no /sys/module/kvm_pvm"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_wins_over_module_check() {
        assert_eq!(choose(Some("pvm"), false).0, HostProfile::Pvm);
        assert_eq!(choose(Some(" PVM "), false).0, HostProfile::Pvm);
        assert_eq!(choose(Some("hardware"), true).0, HostProfile::HardwareKvm);
    }

    #[test]
    fn module_check_without_or_with_bad_override() {
        assert_eq!(choose(None, true).0, HostProfile::Pvm);
        assert_eq!(choose(None, false).0, HostProfile::HardwareKvm);
        assert_eq!(choose(Some("bogus"), true).0, HostProfile::Pvm);
        assert_eq!(choose(Some(""), false).0, HostProfile::HardwareKvm);
    }

    #[test]
    fn hardware_changes_nothing() {
        let hw = HostProfile::HardwareKvm;
        assert_eq!(hw.kernel_cmdline_additions(), "");
        assert_eq!(hw.hidden_kvm_features(), 0);
    }

    #[test]
    fn pvm_needs() {
        let pvm = HostProfile::Pvm;
        let words: Vec<&str> = pvm.kernel_cmdline_additions().split(' ').collect();
        for needed in [
            "noxsave",
            "clearcpuid=smap,popcnt",
            "nofsgsbase",
            "rcupdate.rcu_cpu_stall_suppress=1",
            "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX_Fast_Unaligned_Load",
        ] {
            assert!(words.contains(&needed), "{needed} missing");
        }
        // The variable init passes on to every command.
        let tunables = format!("{}=", kiln_init::spec::PLATFORM_ENV);
        assert!(pvm
            .kernel_cmdline_additions()
            .split(' ')
            .any(|w| w.starts_with(&tunables)));
        assert_eq!(pvm.hidden_kvm_features(), (1 << 7) | (1 << 11) | (1 << 13));
    }

    /// `detect` reads the override and this host's module: each run in a
    /// child process of its own, so the environment is the test's alone.
    /// With and without an override that disagrees with the host, so a
    /// `detect` that ignored either input fails on any host.
    #[test]
    fn detect_follows_the_override_then_the_host() {
        if kiln_prereq::in_child() {
            let env = std::env::var(HOST_PROFILE_ENV).ok();
            let pvm_loaded = Path::new("/sys/module/kvm_pvm").exists();
            assert_eq!(HostProfile::detect(), choose(env.as_deref(), pvm_loaded).0);
            return;
        }
        for value in [None, Some("pvm"), Some("hardware"), Some("bogus")] {
            kiln_prereq::run_in_child(
                concat!(
                    module_path!(),
                    "::detect_follows_the_override_then_the_host"
                ),
                &[(HOST_PROFILE_ENV, value)],
            );
        }
    }

    /// README: the profile is logged once at start (at info), however often
    /// kiln asks for it. In a child process: its logger is this test's.
    #[test]
    fn the_profile_is_logged_once() {
        if !kiln_prereq::in_child() {
            kiln_prereq::run_in_child(
                concat!(module_path!(), "::the_profile_is_logged_once"),
                &[(HOST_PROFILE_ENV, Some("pvm"))],
            );
            return;
        }
        let records = crate::test_log::install();
        for _ in 0..3 {
            assert_eq!(HostProfile::detect(), HostProfile::Pvm);
        }
        assert_eq!(
            records.at(log::Level::Info),
            ["host profile: Pvm (KILN_HOST_PROFILE=pvm)"]
        );
        for level in [log::Level::Error, log::Level::Warn, log::Level::Debug] {
            assert!(records.at(level).is_empty(), "{level}");
        }
    }
}
