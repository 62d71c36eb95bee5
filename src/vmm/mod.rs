//! Runs a VM built from a `VmConfig` to its end (vCPU threads, the event
//! loop, teardown, the report), on the caller's thread ([`run`]) or its own
//! ([`spawn`]). Building it is `builder.rs`'s.

mod builder;

pub use builder::kernel_cmdline;

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::VmConfig;
use crate::console::PanicWatch;
use crate::error::{Error, Result};
use crate::lifecycle::Lifecycle;
use crate::outcome::VmOutcome;
use crate::vcpu::{ExitCounts, VcpuThread};
use builder::BuiltVm;

/// Where the guest console goes and where its input comes from.
pub struct ConsoleIo {
    /// Receives every byte the guest writes to its serial console.
    pub output: Box<dyn Write + Send>,
    /// Forwarded to the guest's serial console (e.g. stdin); None for no input.
    pub input: Option<File>,
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub outcome: VmOutcome,
    /// Monitor start to first KVM_RUN.
    pub startup: Option<Duration>,
    /// (since monitor start, since first KVM_RUN) when guest user space began.
    pub userspace_started: Option<(Duration, Duration)>,
    pub exits: ExitCounts,
}

/// Boots the VM described by `config`, runs it until its command finishes
/// (or it fails or times out) and tears everything down.
///
/// `started` is when the caller began (the CLI passes process start) and is
/// the origin of the reported times.
pub fn run(config: &VmConfig, io: ConsoleIo, started: Instant) -> Result<RunReport> {
    let life = Arc::new(Lifecycle::new(started).map_err(Error::io("creating the exit eventfd"))?);
    run_with(config, io, life)
}

/// Starts the VM on its own thread and returns at once; the handle can stop
/// it from anywhere and collects the report.
pub fn spawn(config: VmConfig, io: ConsoleIo, started: Instant) -> Result<VmHandle> {
    let life = Arc::new(Lifecycle::new(started).map_err(Error::io("creating the exit eventfd"))?);
    let vm_life = life.clone();
    let (finished, finished_tx) = finished_pipe()?;
    let thread = std::thread::Builder::new()
        .name("kiln-vmm".into())
        .spawn(move || {
            let _finished = finished_tx; // closed when the thread ends
            run_with(&config, io, vm_life)
        })
        .map_err(Error::io("spawning the VM thread"))?;
    Ok(VmHandle {
        life,
        thread: Some(thread),
        finished,
    })
}

/// A pipe whose write end the VM thread holds: the read end reports hang-up
/// as soon as the thread has ended, so a waiter can poll(2) for it next to
/// other descriptors instead of checking on a timer.
fn finished_pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io("creating the VM thread's pipe")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: pipe2 succeeded: both descriptors are open and owned by no one else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A VM running on its own thread. Dropping the handle stops the VM and
/// waits for all of its threads.
pub struct VmHandle {
    life: Arc<Lifecycle>,
    thread: Option<std::thread::JoinHandle<Result<RunReport>>>,
    /// Read end of `finished_pipe`.
    finished: OwnedFd,
}

/// Stops a VM from any thread (cheap to clone).
#[derive(Clone)]
pub struct VmStopper(Arc<Lifecycle>);

impl VmStopper {
    /// Ends the VM with `outcome` unless it has already ended.
    pub fn stop(&self, outcome: VmOutcome) {
        self.0.finish(outcome);
    }
}

impl VmHandle {
    pub fn stopper(&self) -> VmStopper {
        VmStopper(self.life.clone())
    }

    /// Asks the VM to stop (outcome `Stopped`); `wait` collects the report.
    pub fn stop(&self) {
        self.life.finish(VmOutcome::Stopped);
    }

    /// Reports hang-up (POLLHUP) once the VM thread has ended: for waiting
    /// on the VM with poll(2) next to other descriptors.
    pub fn finished_fd(&self) -> BorrowedFd<'_> {
        self.finished.as_fd()
    }

    /// True once the VM has ended and its threads are gone.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for the VM to end.
    pub fn wait(mut self) -> Result<RunReport> {
        let thread = self.thread.take().expect("joined only here or in drop");
        thread.join().unwrap_or(Err(Error::VmThreadPanicked))
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.life.finish(VmOutcome::Stopped);
            let _ = thread.join();
        }
    }
}
fn run_with(config: &VmConfig, io: ConsoleIo, life: Arc<Lifecycle>) -> Result<RunReport> {
    let BuiltVm {
        vm,
        mem,
        vcpus,
        buses,
        mut event_loop,
        panic_watch,
    } = builder::build(config, io, &life)?;

    let deadline = config.timeout.map(|t| Instant::now() + t);
    let mut threads = Vec::with_capacity(vcpus.len());
    for (id, fd) in vcpus.into_iter().enumerate() {
        match VcpuThread::spawn(
            id as u8,
            fd,
            buses.pio.clone(),
            buses.mmio.clone(),
            life.clone(),
        ) {
            Ok(t) => threads.push(t),
            Err(e) => {
                life.finish(VmOutcome::KvmFailure(e.to_string()));
                break;
            }
        }
    }
    let loop_result = event_loop.run(&life, deadline);
    if loop_result.is_err() {
        life.finish(VmOutcome::KvmFailure("event loop failed".into()));
    }
    let mut exits = ExitCounts::default();
    for t in threads {
        exits += t.stop_and_join();
    }
    loop_result?;
    // Keep guest memory alive until every vCPU has stopped using it.
    drop(vm);
    drop(mem);

    let outcome = finalize_outcome(life.outcome(), &panic_watch);
    Ok(RunReport {
        outcome,
        startup: life.startup_time(),
        userspace_started: life.userspace_times(),
        exits,
    })
}

/// A reset right after a panic message is the panic itself.
fn finalize_outcome(outcome: Option<VmOutcome>, panic_watch: &PanicWatch) -> VmOutcome {
    match outcome {
        Some(VmOutcome::GuestReset) | Some(VmOutcome::TripleFault) | None => {
            match panic_watch.panic_message() {
                Some(msg) => VmOutcome::KernelPanic(Some(msg)),
                None => outcome.unwrap_or(VmOutcome::GuestReset),
            }
        }
        Some(other) => other,
    }
}
