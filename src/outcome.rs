//! How a VM run ended, and the process exit status kiln maps it to.
//!
//! The guest command's own status passes through unchanged; the statuses kiln
//! adds for other endings are in the documented 120-125 range, each with a
//! one-line reason on stderr.

use std::fmt;

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmOutcome {
    /// The command exited with this status.
    Exited(u8),
    /// The command was killed by this signal.
    Signaled(u8),
    /// The guest reset or powered off without a report from kiln's init.
    GuestReset,
    /// The guest kernel panicked; the panic message when it was seen.
    KernelPanic(Option<String>),
    /// A triple fault: KVM_EXIT_SHUTDOWN.
    TripleFault,
    /// KVM could not continue the guest (e.g. its instruction emulator failed).
    KvmFailure(String),
    /// The wall-clock limit expired.
    Timeout,
    /// The host stopped the VM (a library caller, or kiln got this signal).
    Stopped,
    /// kiln was interrupted by this signal and stopped the VM.
    Interrupted(u8),
}

impl VmOutcome {
    /// The process exit status for this outcome (shell conventions for signals).
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

    /// True when the guest command itself produced the outcome.
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
            VmOutcome::GuestReset.exit_status(),
            VmOutcome::KernelPanic(None).exit_status(),
            VmOutcome::TripleFault.exit_status(),
            VmOutcome::KvmFailure(String::new()).exit_status(),
            VmOutcome::Timeout.exit_status(),
            STATUS_KILN_ERROR,
        ];
        assert_eq!(kiln_statuses, [120, 121, 122, 123, 124, 125]);
    }
}
