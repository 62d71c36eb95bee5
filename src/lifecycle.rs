//! The shared "how is this VM doing" state: the first component that decides
//! the VM is over (a vCPU exit, a device, the timeout) records the outcome and
//! wakes the event loop; everyone else sees `is_stopping()` and winds down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kiln_devices::control::{ControlEvents, GuestExit, STAGE_USERSPACE};
use vmm_sys_util::eventfd::EventFd;

use crate::outcome::VmOutcome;

/// How the VM is doing: whether it is stopping, and why.
pub struct Lifecycle {
    stopping: AtomicBool,
    outcome: Mutex<Option<VmOutcome>>,
    /// Written once the outcome is set; the event loop watches it.
    exit_evt: EventFd,
    /// When the monitor started (process start for the CLI).
    started: Instant,
    first_run: OnceLock<Instant>,
    userspace_at: OnceLock<Instant>,
    /// Fault injection for tests: the event loop panics at its next wake-up.
    #[cfg(test)]
    pub(crate) panic_event_loop: AtomicBool,
    /// Fault injection for tests: vCPU 1 panics as it starts.
    #[cfg(test)]
    pub(crate) panic_vcpu1: AtomicBool,
}

impl Lifecycle {
    /// A running VM's state; `started` is when the monitor started.
    pub fn new(started: Instant) -> std::io::Result<Self> {
        Ok(Self {
            stopping: AtomicBool::new(false),
            outcome: Mutex::new(None),
            exit_evt: kiln_devices::new_eventfd()?,
            started,
            first_run: OnceLock::new(),
            userspace_at: OnceLock::new(),
            #[cfg(test)]
            panic_event_loop: AtomicBool::new(false),
            #[cfg(test)]
            panic_vcpu1: AtomicBool::new(false),
        })
    }

    /// Records `outcome` unless one is already set, and starts the shutdown.
    pub fn finish(&self, outcome: VmOutcome) {
        let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            log::debug!("VM finishing: {outcome}");
            *slot = Some(outcome);
        }
        drop(slot);
        self.stopping.store(true, Ordering::SeqCst);
        // Saturation only means the loop has already been woken.
        let _ = self.exit_evt.write(1);
    }

    /// Whether an outcome is recorded and everyone should wind down.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// How the VM ended, once it has.
    pub fn outcome(&self) -> Option<VmOutcome> {
        self.outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Written once the outcome is set.
    pub fn exit_evt(&self) -> &EventFd {
        &self.exit_evt
    }

    /// Called by each vCPU before its first KVM_RUN; the first call counts.
    pub fn mark_first_run(&self) {
        self.first_run.get_or_init(Instant::now);
    }

    /// (since monitor start, since first KVM_RUN) when user space started.
    pub fn userspace_times(&self) -> Option<(Duration, Duration)> {
        let at = *self.userspace_at.get()?;
        let first = self.first_run.get().copied().unwrap_or(self.started);
        Some((at - self.started, at.saturating_duration_since(first)))
    }

    /// Time from monitor start to the first KVM_RUN.
    pub fn startup_time(&self) -> Option<Duration> {
        self.first_run.get().map(|t| *t - self.started)
    }
}

/// Connects the control page to the lifecycle.
pub struct ControlReports(pub Arc<Lifecycle>);

impl ControlEvents for ControlReports {
    fn boot_stage(&self, stage: u32) {
        if stage == STAGE_USERSPACE && self.0.userspace_at.set(Instant::now()).is_ok() {
            if let Some((since_start, since_run)) = self.0.userspace_times() {
                log::info!(
                    "guest user space started {:.1} ms after monitor start ({:.1} ms after first KVM_RUN)",
                    since_start.as_secs_f64() * 1e3,
                    since_run.as_secs_f64() * 1e3
                );
            }
        }
    }

    fn exit_reported(&self, exit: GuestExit) {
        self.0.finish(match exit {
            GuestExit::Code(c) => VmOutcome::Exited(c),
            GuestExit::Signal(s) => VmOutcome::Signaled(s),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_outcome_wins_and_wakes_the_loop() {
        let lc = Arc::new(Lifecycle::new(Instant::now()).unwrap());
        assert!(!lc.is_stopping());
        ControlReports(lc.clone()).exit_reported(GuestExit::Code(3));
        lc.finish(VmOutcome::Timeout);
        assert!(lc.is_stopping());
        assert_eq!(lc.outcome(), Some(VmOutcome::Exited(3)));
        assert!(lc.exit_evt().read().unwrap() >= 1);
    }

    #[test]
    fn boot_timer_records_userspace_once() {
        let lc = Arc::new(Lifecycle::new(Instant::now()).unwrap());
        assert!(lc.userspace_times().is_none());
        lc.mark_first_run();
        let reports = ControlReports(lc.clone());
        reports.boot_stage(STAGE_USERSPACE);
        let (a, b) = lc.userspace_times().unwrap();
        assert!(a >= b);
        reports.boot_stage(STAGE_USERSPACE);
        assert_eq!(lc.userspace_times().unwrap().0, a);
    }
}
