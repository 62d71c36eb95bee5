//! How a VM run ended, and the process exit status kiln maps it to.
//!
//! The guest command's own status passes through unchanged; the statuses kiln
//! adds for other endings are in the documented 119-125 range, each with a
//! one-line reason on stderr. This is the README's "Exit status" table, as
//! [`VmOutcome::exit_status`] computes it:
//!
//! | status | [`VmOutcome`] | meaning |
//! |---|---|---|
//! | 0-255 | [`Exited`](VmOutcome::Exited) | the command's own exit status |
//! | 128+N | [`Signaled`](VmOutcome::Signaled) | the command was killed by signal N |
//! | 119 | none: the sandbox's [`BootTimeout`](crate::sandbox::SandboxError::BootTimeout) | `kiln run`'s `--boot-timeout` passed before kiln's guest agent connected (the VM was stopped) |
//! | 120 | [`GuestReset`](VmOutcome::GuestReset) | the guest reset or powered off before the command reported its status |
//! | 121 | [`KernelPanic`](VmOutcome::KernelPanic) | the guest kernel panicked |
//! | 122 | [`TripleFault`](VmOutcome::TripleFault) | the guest triple-faulted |
//! | 123 | [`KvmFailure`](VmOutcome::KvmFailure) | KVM could not run the guest (e.g. an instruction its emulator lacks) |
//! | 124 | [`Timeout`](VmOutcome::Timeout) | the VM's timeout (`--timeout`) expired |
//! | 125 | none: an [`Error`](crate::Error) | kiln itself failed: bad option, unreadable or invalid kernel, unusable root, no access to /dev/kvm |
//! | 128+N | [`Interrupted`](VmOutcome::Interrupted), [`Stopped`](VmOutcome::Stopped) (N = 15) | the host stopped the VM: kiln got signal N, or a library caller stopped it |
//!
//! The status travels from kiln's init to the monitor through the control
//! page (an MMIO register), never through console text, so nothing the
//! command prints can change it.
//!
//! ```
//! use kiln::outcome::{STATUS_KERNEL_PANIC, STATUS_TIMEOUT};
//! use kiln::VmOutcome;
//!
//! assert_eq!(VmOutcome::Exited(3).exit_status(), 3);
//! assert_eq!(VmOutcome::Signaled(9).exit_status(), 128 + 9);
//! assert_eq!(VmOutcome::KernelPanic(None).exit_status(), STATUS_KERNEL_PANIC);
//! assert_eq!(VmOutcome::Timeout.exit_status(), STATUS_TIMEOUT);
//! assert_eq!(VmOutcome::Timeout.to_string(), "timeout expired, VM stopped");
//! ```

use std::fmt;

/// Exit status for: kiln's guest agent did not connect within `kiln run`'s
/// `--boot-timeout` (not a [`VmOutcome`]: the VM was still booting).
pub const STATUS_BOOT_TIMEOUT: i32 = 119;
/// Exit status for: the guest reset or halted before the command reported.
pub const STATUS_NO_REPORT: i32 = 120;
/// Exit status for: the guest kernel panicked.
pub const STATUS_KERNEL_PANIC: i32 = 121;
/// Exit status for: the guest triple-faulted (KVM_EXIT_SHUTDOWN).
pub const STATUS_TRIPLE_FAULT: i32 = 122;
/// Exit status for: KVM could not run the guest (emulation failure, entry failure).
pub const STATUS_KVM_FAILURE: i32 = 123;
/// Exit status for: the `--timeout` expired (as GNU `timeout` uses).
pub const STATUS_TIMEOUT: i32 = 124;
/// Exit status for: kiln itself failed (bad input, setup error).
pub const STATUS_KILN_ERROR: i32 = 125;

/// How a VM ended: the first thing that ended it wins (a report from kiln's
/// init, a guest reset, a fault, the timeout, the host). `Display` gives the
/// one line `kiln run` prints for it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VmOutcome {
    /// The command exited with this status (exit status: the same).
    Exited(u8),
    /// The command was killed by this signal (exit status 128 + signal).
    Signaled(u8),
    /// The guest reset or powered off without a report from kiln's init,
    /// e.g. an own init (`rdinit=`) that rebooted (exit status 120).
    GuestReset,
    /// The guest kernel panicked; the panic message when it was seen on the
    /// console (exit status 121).
    KernelPanic(Option<String>),
    /// A triple fault: KVM_EXIT_SHUTDOWN (exit status 122).
    TripleFault,
    /// KVM could not continue the guest: its instruction emulator failed, VM
    /// entry failed, an unexpected exit; the reason (exit status 123).
    KvmFailure(String),
    /// The VM's [`timeout`](crate::VmConfig::timeout) expired (exit status 124).
    Timeout,
    /// The host stopped the VM: [`VmHandle::stop`](crate::VmHandle::stop),
    /// dropping the handle, or [`Sandbox::shutdown`](crate::sandbox::Sandbox::shutdown)
    /// when the guest did not end by itself (exit status 143, as for SIGTERM).
    Stopped,
    /// Stopped because the host process got this signal: `kiln run` on
    /// SIGINT, SIGTERM or SIGHUP, or a caller's
    /// [`VmStopper::stop`](crate::VmStopper::stop) (exit status 128 + signal).
    Interrupted(u8),
}

impl VmOutcome {
    /// The process exit status for this outcome (shell conventions for
    /// signals); the module's table lists them.
    pub fn exit_status(&self) -> i32 {
        match self {
            Self::Exited(code) => i32::from(*code),
            Self::Signaled(sig) => 128 + i32::from(*sig),
            Self::GuestReset => STATUS_NO_REPORT,
            Self::KernelPanic(_) => STATUS_KERNEL_PANIC,
            Self::TripleFault => STATUS_TRIPLE_FAULT,
            Self::KvmFailure(_) => STATUS_KVM_FAILURE,
            Self::Timeout => STATUS_TIMEOUT,
            Self::Stopped => 128 + libc::SIGTERM,
            Self::Interrupted(sig) => 128 + i32::from(*sig),
        }
    }

    /// True when the guest command itself produced the outcome
    /// ([`Exited`](Self::Exited) or [`Signaled`](Self::Signaled)): kiln has
    /// nothing to add to its status.
    pub fn is_command_exit(&self) -> bool {
        matches!(self, Self::Exited(_) | Self::Signaled(_))
    }
}

impl fmt::Display for VmOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited(code) => write!(f, "command exited with status {code}"),
            Self::Signaled(sig) => write!(f, "command killed by signal {sig}"),
            Self::GuestReset => write!(f, "guest reset before the command reported its status"),
            Self::KernelPanic(Some(msg)) => write!(f, "guest kernel panic: {msg}"),
            Self::KernelPanic(None) => write!(f, "guest kernel panic"),
            Self::TripleFault => write!(f, "guest triple fault (KVM shutdown exit)"),
            Self::KvmFailure(why) => write!(f, "KVM stopped the guest: {why}"),
            Self::Timeout => write!(f, "timeout expired, VM stopped"),
            Self::Stopped => write!(f, "VM stopped by the host"),
            Self::Interrupted(sig) => write!(f, "interrupted by signal {sig}, VM stopped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_distinct_and_documented() {
        assert_eq!(VmOutcome::Exited(3).exit_status(), 3);
        assert_eq!(VmOutcome::Signaled(9).exit_status(), 137);
        let kiln_statuses = [
            STATUS_BOOT_TIMEOUT,
            VmOutcome::GuestReset.exit_status(),
            VmOutcome::KernelPanic(None).exit_status(),
            VmOutcome::TripleFault.exit_status(),
            VmOutcome::KvmFailure(String::new()).exit_status(),
            VmOutcome::Timeout.exit_status(),
            STATUS_KILN_ERROR,
        ];
        assert_eq!(kiln_statuses, [119, 120, 121, 122, 123, 124, 125]);
    }
}
