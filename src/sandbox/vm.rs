//! A sandbox's VM, in the embedding process or in a kiln process of its own
//! ([`Isolation`]): the one handle the sandbox stops, waits on and collects.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use super::vm_process::VmProcess;
use crate::snapshot::{SaveReport, SnapshotDir};
use crate::{VmHandle, VmOutcome, VmStopper};

/// Where a sandbox's VM runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Isolation {
    /// In a `kiln` process of its own (`kiln sandbox-vm`), jailed as `kiln
    /// run` is (see the README's Security model): a device model the guest
    /// takes over finds that process's empty jail, not the embedding
    /// program. The `kiln` binary is found as
    /// [`SandboxBuilder::kiln_binary`](super::SandboxBuilder::kiln_binary)
    /// says. The default.
    #[default]
    Process,
    /// In the embedding program's own process, on threads of its own (each
    /// under its seccomp filter): a device model taken over by the guest
    /// can then reach the embedder's memory, files and other sandboxes.
    /// `kiln run` uses it: it is jailed as a whole already.
    InProcess,
}

pub(crate) enum SandboxVm {
    InProcess(VmHandle),
    Process(VmProcess),
}

impl SandboxVm {
    pub(crate) fn stopper(&self) -> VmStopper {
        match self {
            Self::InProcess(vm) => vm.stopper(),
            Self::Process(vm) => vm.stopper(),
        }
    }

    pub(crate) fn stop(&self) {
        match self {
            Self::InProcess(vm) => vm.stop(),
            Self::Process(vm) => vm.stop(),
        }
    }

    /// Hangs up (or turns readable) once the VM has ended.
    pub(crate) fn finished_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::InProcess(vm) => vm.finished_fd(),
            Self::Process(vm) => vm.finished_fd(),
        }
    }

    pub(crate) fn is_finished(&self) -> bool {
        match self {
            Self::InProcess(vm) => vm.is_finished(),
            Self::Process(vm) => vm.is_finished(),
        }
    }

    /// Saves the VM into `dir` and lets it run on.
    /// Pauses the VM's vCPUs (`resume`: false) or lets them run on.
    pub(crate) fn pause_or_resume(&self, resume: bool) -> crate::Result<()> {
        match (self, resume) {
            (Self::InProcess(vm), false) => vm.pause(),
            (Self::InProcess(vm), true) => vm.resume(),
            (Self::Process(vm), resume) => vm.pause_or_resume(resume),
        }
    }

    pub(crate) fn snapshot(&self, dir: &SnapshotDir) -> crate::Result<SaveReport> {
        match self {
            Self::InProcess(vm) => Ok(crate::snapshot::save_live(vm, dir, None)?),
            Self::Process(vm) => vm.snapshot(dir),
        }
    }

    /// Returns once the VM has ended (seen at once) or `max` has passed.
    pub(crate) fn wait_finished(&self, max: Duration) {
        let deadline = Instant::now() + max;
        while !self.is_finished() {
            let left = deadline.saturating_duration_since(Instant::now());
            // Ready means ended (or, for a VM process, reported and about to
            // exit: `wait` collects it).
            if left.is_zero() || super::builder::wait_readable(&[self.finished_fd()], Some(left)) {
                return;
            }
        }
    }

    /// Waits for the VM's end: its outcome, or why it could not run.
    pub(crate) fn wait(self) -> crate::Result<VmOutcome> {
        match self {
            Self::InProcess(vm) => vm.wait().map(|report| report.outcome),
            Self::Process(vm) => vm.wait(),
        }
    }
}
