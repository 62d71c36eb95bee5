//! Runs a VM built from a `VmConfig` to its end (vCPU threads, the event
//! loop, teardown, the report), on the caller's thread ([`run`]) or its own
//! ([`spawn`]). Building it is `builder.rs`'s.

mod builder;

pub use builder::kernel_cmdline;
pub(crate) use builder::{build_restored, BuiltVm};

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::VmConfig;
use crate::console::PanicWatch;
use crate::device_manager::DeviceHandles;
use crate::error::{Error, Result};
use crate::lifecycle::Lifecycle;
use crate::outcome::VmOutcome;
use crate::pause::{LoopPause, Pause, PauseError};
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::Snapshot;
use crate::vcpu::{ExitCounts, VcpuThread};
use crate::vm::Vm;

/// Where the guest console goes and where its input comes from.
pub struct ConsoleIo {
    /// Receives every byte the guest writes to its console (the UART, and
    /// the virtio console when there is one). Written from the VM's threads
    /// while they serve the guest: a writer that blocks holds the guest up.
    pub output: Box<dyn Write + Send>,
    /// Forwarded to the guest's console input (e.g. kiln's stdin), no faster
    /// than the guest reads it; `None` for no input. It must be pollable (a
    /// pipe, a terminal, a socket): a regular file gives the guest no input.
    pub input: Option<File>,
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// How the VM ended (and with [`VmOutcome::exit_status`], the status
    /// `kiln run` exits with).
    pub outcome: VmOutcome,
    /// Monitor start (the `started` given to [`run`] or [`spawn`]) to the
    /// first KVM_RUN; `None` if no vCPU ran.
    pub startup: Option<Duration>,
    /// When kiln's init reported that guest user space started, measured
    /// (since monitor start, since the first KVM_RUN); `None` without the
    /// report (a guest without kiln's init, or one that died first).
    pub userspace_started: Option<(Duration, Duration)>,
    /// VM exits of every vCPU, by kind.
    pub exits: ExitCounts,
}

/// Boots the VM described by `config`, runs it until its command finishes
/// (or it fails or times out) and tears everything down.
///
/// `started` is when the caller began (the CLI passes process start) and is
/// the origin of the reported times.
///
/// Blocks the calling thread until the VM has ended; the VM runs on threads
/// of its own, as with [`spawn`] (so that each runs under its seccomp
/// filter, and the caller's thread under none). A guest that ends in any
/// way, including a panic or the timeout, is `Ok` with its
/// [`RunReport::outcome`]; an [`Error`] means the VM could not be built or
/// run (nothing is left running). Without a
/// [`timeout`](VmConfig::timeout), a guest that never ends keeps this call
/// waiting: use [`spawn`] to stop it from elsewhere.
pub fn run(config: &VmConfig, io: ConsoleIo, started: Instant) -> Result<RunReport> {
    spawn(config.clone(), io, started)?.wait()
}

/// Starts the VM on its own thread and returns at once; the handle can stop
/// it from anywhere and collects the report.
///
/// As [`run`], on one more thread (`kiln-vmm`). Errors found while the VM
/// is built (a bad kernel, no `/dev/kvm`, ...) come from
/// [`VmHandle::wait`]; this call fails only if the thread cannot start.
pub fn spawn(config: VmConfig, io: ConsoleIo, started: Instant) -> Result<VmHandle> {
    let (vm, gate) = spawn_gated(config, io, started)?;
    gate.open();
    Ok(vm)
}

/// As [`spawn`], but the guest does not start before [`GuestGate::open`]:
/// the caller can first install its own seccomp filter (which a thread
/// started after it would inherit). The VM is built meanwhile. A config
/// with [`restore_from`](VmConfig::restore_from) has its snapshot's files
/// checked here, before any thread starts.
pub(crate) fn spawn_gated(
    config: VmConfig,
    io: ConsoleIo,
    started: Instant,
) -> Result<(VmHandle, GuestGate)> {
    if let Some(dir) = &config.restore_from {
        let snapshot = Snapshot::open(dir)?;
        let config = config
            .restored_from(&snapshot.saved.config)
            .map_err(Error::Config)?;
        let build_config = config.clone();
        return spawn_built(config, started, move |life| {
            builder::build_restored(&snapshot, &build_config, io, life)
        });
    }
    let build_config = config.clone();
    spawn_built(config, started, move |life| {
        builder::build(&build_config, io, life)
    })
}

/// As [`spawn_gated`], with the VM that `build` makes (booted from
/// `config`, or restored from a snapshot whose saved config is `config`).
pub(crate) fn spawn_built(
    config: VmConfig,
    started: Instant,
    build: impl FnOnce(&Arc<Lifecycle>) -> Result<BuiltVm> + Send + 'static,
) -> Result<(VmHandle, GuestGate)> {
    let life = Arc::new(Lifecycle::new(started).map_err(Error::io("creating the exit eventfd"))?);
    let vm_life = life.clone();
    let running = Arc::new(Mutex::new(None));
    let vm_running = running.clone();
    let (finished, finished_tx) = finished_pipe()?;
    let (gate, gate_rx) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("kiln-vmm".into())
        .spawn(move || {
            let _finished = finished_tx; // closed when the thread ends
            run_with(&config, build, vm_life, gate_rx, &vm_running)
        })
        .map_err(Error::io("spawning the VM thread"))?;
    let vm = VmHandle {
        life,
        thread: Some(thread),
        finished,
        running,
    };
    Ok((vm, GuestGate(gate)))
}

/// What a running VM shares with its handle for pausing and saving it.
#[derive(Clone)]
pub(crate) struct RunningVm {
    pub pause: Arc<Pause>,
    pub vm: Arc<Vm>,
    pub mem: vm_memory::GuestMemoryMmap,
    /// The configuration the VM was built from (a restored VM: the saved one).
    pub config: Arc<VmConfig>,
    /// Parks the event thread, so that no device runs during a save.
    pub loop_pause: Arc<LoopPause>,
    /// The devices whose state a snapshot saves.
    pub devices: DeviceHandles,
    /// Set while the VM's owner holds it paused ([`VmHandle::pause`]): a
    /// snapshot taken meanwhile leaves the vCPUs parked.
    pub held: Arc<AtomicBool>,
}

impl RunningVm {
    /// Whether KVM honours `immediate_exit`: without it a vCPU could not
    /// complete its exit without running the guest on (see
    /// `vcpu::complete_exit`), so it cannot park at a safe point for a
    /// pause or a snapshot.
    pub(crate) fn vcpus_can_park(&self) -> bool {
        self.vm
            .kvm()
            .check_extension(kvm_ioctls::Cap::ImmediateExit)
    }
}

/// Set while the VM's vCPU threads exist.
type RunningSlot = Arc<Mutex<Option<RunningVm>>>;

/// Lets a VM from [`spawn_gated`] start its guest; dropped unopened, the
/// VM ends (outcome [`VmOutcome::Stopped`]) without running it.
pub(crate) struct GuestGate(SyncSender<()>);

impl GuestGate {
    pub(crate) fn open(self) {
        let _ = self.0.send(());
    }
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

/// A VM running on its own thread ([`spawn`]). Dropping the handle stops
/// the VM (outcome [`VmOutcome::Stopped`]) and waits for all of its threads.
pub struct VmHandle {
    life: Arc<Lifecycle>,
    thread: Option<std::thread::JoinHandle<Result<RunReport>>>,
    /// Read end of `finished_pipe`.
    finished: OwnedFd,
    running: RunningSlot,
}

/// Stops a VM from any thread (cheap to clone), e.g. from a signal
/// thread; it keeps nothing of the VM alive but its shared state.
#[derive(Clone)]
pub struct VmStopper(StopTarget);

/// What a [`VmStopper`] stops.
#[derive(Clone)]
enum StopTarget {
    /// A VM in this process.
    Vm(Arc<Lifecycle>),
    /// A sandbox's VM in a kiln process of its own: closing its lifeline
    /// (the child's stdin) stops it.
    Process(Arc<dyn Fn() + Send + Sync>),
}

impl VmStopper {
    /// Ends the VM with `outcome` unless it has already ended (the first
    /// outcome wins). Returns at once; the VM's threads wind down and the
    /// run returns. A sandbox's VM in a process of its own ends with
    /// [`VmOutcome::Stopped`] whatever `outcome` says.
    pub fn stop(&self, outcome: VmOutcome) {
        match &self.0 {
            StopTarget::Vm(life) => life.finish(outcome),
            StopTarget::Process(stop) => stop(),
        }
    }

    /// A stopper that calls `stop` (for a VM kiln runs in another process).
    pub(crate) fn from_fn(stop: impl Fn() + Send + Sync + 'static) -> Self {
        Self(StopTarget::Process(Arc::new(stop)))
    }
}

impl VmHandle {
    /// A [`VmStopper`] for this VM, to stop it from another thread.
    pub fn stopper(&self) -> VmStopper {
        VmStopper(StopTarget::Vm(self.life.clone()))
    }

    /// The running VM's shared parts; `None` before it is built or once
    /// its vCPUs are gone.
    pub(crate) fn running(&self) -> Option<RunningVm> {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Pauses the guest: returns once every vCPU has completed the exit it
    /// was in and parked, so no guest instruction runs until
    /// [`resume`](Self::resume). Devices finish requests already taken;
    /// the guest's clock, read from the host's on resume, jumps over the
    /// pause. Stopping a paused VM works as ever.
    ///
    /// Fails with [`PauseError::AlreadyPaused`] when paused already,
    /// [`PauseError::Ended`] when the VM is not running, and
    /// [`Error::KvmCapability`] when KVM lacks `KVM_CAP_IMMEDIATE_EXIT`
    /// (a vCPU could not leave KVM_RUN at a safe point). Not meant to race
    /// a snapshot of the same VM from another thread (a sandbox orders them).
    pub fn pause(&self) -> Result<()> {
        let running = self.running().ok_or(PauseError::Ended)?;
        if !running.vcpus_can_park() {
            return Err(Error::KvmCapability(
                "KVM_CAP_IMMEDIATE_EXIT (to pause a VM)",
            ));
        }
        if running.held.swap(true, Ordering::SeqCst) {
            return Err(PauseError::AlreadyPaused.into());
        }
        running.pause.pause().inspect_err(|_| {
            running.held.store(false, Ordering::SeqCst);
        })?;
        Ok(())
    }

    /// Lets a VM paused by [`pause`](Self::pause) run on. Fails with
    /// [`PauseError::NotPaused`] when it is not (or [`PauseError::Ended`]).
    pub fn resume(&self) -> Result<()> {
        let running = self.running().ok_or(PauseError::Ended)?;
        if !running.held.swap(false, Ordering::SeqCst) {
            return Err(PauseError::NotPaused.into());
        }
        running.pause.resume();
        Ok(())
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

    /// Waits for the VM to end and returns its report, or the [`Error`]
    /// that kept it from running ([`Error::VmThreadPanicked`] if its
    /// thread panicked).
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
fn run_with(
    config: &VmConfig,
    build: impl FnOnce(&Arc<Lifecycle>) -> Result<BuiltVm>,
    life: Arc<Lifecycle>,
    gate: Receiver<()>,
    running: &RunningSlot,
) -> Result<RunReport> {
    let BuiltVm {
        vm,
        mem,
        vcpus,
        buses,
        devices,
        mut event_loop,
        panic_watch,
    } = match build(&life) {
        Ok(built) => built,
        // Asked to stop while it was set up (a signal during a long scratch
        // copy): the VM ended before it ran, as the stop says.
        Err(e) => match life.outcome() {
            Some(outcome) => {
                log::debug!("set-up stopped: {e}");
                return Ok(RunReport {
                    outcome,
                    startup: None,
                    userspace_started: None,
                    exits: ExitCounts::default(),
                });
            }
            None => return Err(e),
        },
    };
    // Everything is open: kiln needs no privilege from here on.
    if let Some(ids) = config.run_as {
        crate::jail::drop_privileges(ids).map_err(Error::io("dropping privileges (the jail)"))?;
        log::info!("jail: running as uid {} gid {}", ids.uid, ids.gid);
    }

    // Every thread filters itself before the guest's first instruction: the
    // vCPU threads wait for their start until this one has its filter too.
    let (loop_pause, parker) =
        LoopPause::new(life.clone()).map_err(Error::io("creating the event loop's pause"))?;
    event_loop.add(Box::new(parker));
    let vm = Arc::new(vm);
    let pause = Arc::new(Pause::new(vcpus.len()));
    let mut threads = VcpuThreads {
        threads: Vec::with_capacity(vcpus.len()),
        life: life.clone(),
        pause: pause.clone(),
        running: running.clone(),
    };
    *running.lock().unwrap_or_else(|e| e.into_inner()) = Some(RunningVm {
        pause: pause.clone(),
        vm: vm.clone(),
        mem: mem.clone(),
        config: Arc::new(config.clone()),
        loop_pause: Arc::new(loop_pause),
        devices,
        held: Arc::new(AtomicBool::new(false)),
    });
    let mut starts = Vec::with_capacity(vcpus.len());
    let mut filtered = Ok(());
    for (id, fd) in vcpus.into_iter().enumerate() {
        let (start, start_rx) = std::sync::mpsc::channel();
        let (life, pause) = (life.clone(), pause.clone());
        match VcpuThread::spawn(id as u8, fd, &buses, life, pause, config.seccomp, start_rx) {
            Ok(t) => {
                threads.threads.push(t);
                starts.push(start);
            }
            Err(e) => {
                filtered = Err(e);
                break;
            }
        }
    }
    let filtered = filtered.and_then(|()| Ok(seccomp::install(ThreadKind::Vmm, config.seccomp)?));
    if let Err(e) = filtered {
        drop(starts); // the vCPU threads end without running the guest
        threads.stop_and_join();
        return Err(e);
    }
    match gate.recv() {
        Ok(()) => {
            // Logged before the vCPUs run, so that the line never lands in
            // the middle of the guest's console output on stderr.
            log::info!("guest started (seccomp {})", config.seccomp);
            for start in starts {
                let _ = start.send(());
            }
        }
        Err(_) => life.finish(VmOutcome::Stopped),
    }

    let deadline = config.timeout.map(|t| Instant::now() + t);
    let loop_result = event_loop.run(&life, deadline);
    if loop_result.is_err() {
        life.finish(VmOutcome::KvmFailure("event loop failed".into()));
    }
    let exits = threads.stop_and_join();
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

/// The VM's vCPU threads. However the VM thread leaves `run_with`, a panic
/// in the event loop or a device included, they are stopped and joined
/// before guest memory goes: dropping this stops the VM first.
struct VcpuThreads {
    threads: Vec<VcpuThread>,
    life: Arc<Lifecycle>,
    /// Released as the VM stops, so that paused vCPUs can end.
    pause: Arc<Pause>,
    /// Emptied once the vCPUs are gone: nothing pauses or saves the VM after.
    running: RunningSlot,
}

impl VcpuThreads {
    /// Stops the VM (if nothing else has) and joins every vCPU thread.
    fn stop_and_join(&mut self) -> ExitCounts {
        let mut exits = ExitCounts::default();
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if self.threads.is_empty() {
            return exits;
        }
        self.life.finish(match std::thread::panicking() {
            true => VmOutcome::KvmFailure("the VM thread panicked (a kiln bug)".into()),
            false => VmOutcome::Stopped,
        });
        self.pause.release();
        for t in self.threads.drain(..) {
            exits += t.stop_and_join();
        }
        exits
    }
}

impl Drop for VcpuThreads {
    fn drop(&mut self) {
        self.stop_and_join();
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// A guest that never exits to the monitor: a static ELF whose one
    /// segment, at 2 MiB, is `jmp .` (entered in 64-bit mode).
    fn spinning_guest(path: &std::path::Path) {
        const BASE: u64 = 0x20_0000;
        const CODE: usize = 64 + 56;
        let mut elf = vec![0u8; CODE];
        elf[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\0");
        let mut put = |at: usize, bytes: &[u8]| elf[at..at + bytes.len()].copy_from_slice(bytes);
        put(0x10, &2u16.to_le_bytes()); // ET_EXEC
        put(0x12, &0x3eu16.to_le_bytes()); // x86-64
        put(0x14, &1u32.to_le_bytes());
        put(0x18, &(BASE + CODE as u64).to_le_bytes()); // entry
        put(0x20, &64u64.to_le_bytes()); // program headers
        put(0x34, &64u16.to_le_bytes());
        put(0x36, &56u16.to_le_bytes());
        put(0x38, &1u16.to_le_bytes());
        let size = (CODE + 2) as u64;
        put(64, &1u32.to_le_bytes()); // PT_LOAD
        put(68, &5u32.to_le_bytes()); // R+X
        for (at, value) in [(72, 0), (80, BASE), (88, BASE), (96, size), (104, size)] {
            put(at, &value.to_le_bytes());
        }
        put(112, &0x1000u64.to_le_bytes());
        elf.extend_from_slice(&[0xeb, 0xfe]);
        std::fs::write(path, elf).unwrap();
    }

    /// A VM of `vcpus` vCPUs spinning in the guest until stopped (or
    /// `timeout`), not started yet.
    fn spinning_vm(
        dir: &crate::rootfs::tests::TempDir,
        vcpus: u8,
        timeout: Option<Duration>,
    ) -> (VmHandle, GuestGate) {
        let kernel = dir.0.join("spin.elf");
        spinning_guest(&kernel);
        let mut config = VmConfig::new(&kernel);
        config.mem_bytes = 32 << 20;
        config.vcpus = vcpus;
        config.timeout = timeout;
        let io = ConsoleIo {
            output: Box::new(std::io::sink()),
            input: None,
        };
        spawn_gated(config, io, Instant::now()).unwrap()
    }

    /// A panic in a vCPU thread ends the VM (here: vCPU 1 of 2, through
    /// a fault injected by the test): vCPU 0 and the event loop do not go
    /// on without it.
    #[test]
    fn a_panic_in_a_vcpu_thread_ends_the_vm() {
        if !kiln_prereq::require(kiln_prereq::have_kvm(), "/dev/kvm not accessible") {
            return;
        }
        let dir = crate::rootfs::tests::TempDir::new("vcpu-panic");
        // The timeout ends the run when the panic goes unseen (outcome Timeout).
        let (vm, gate) = spinning_vm(&dir, 2, Some(Duration::from_secs(60)));
        vm.life.panic_vcpu1.store(true, Ordering::SeqCst);
        gate.open();
        let outcome = vm.wait().unwrap().outcome;
        assert!(
            matches!(&outcome, VmOutcome::KvmFailure(m) if m.contains("vCPU 1 thread panicked")),
            "{outcome:?}"
        );
    }

    /// A panic in the VM thread (here: its event loop, through a fault
    /// injected by the test) stops the VM: the vCPU threads, which would
    /// run the guest forever, are stopped and joined before the panic
    /// leaves the thread, and `wait` reports it as an error.
    #[test]
    fn a_panic_in_the_event_loop_stops_and_joins_the_vcpus() {
        if !kiln_prereq::require(kiln_prereq::have_kvm(), "/dev/kvm not accessible") {
            return;
        }
        let dir = crate::rootfs::tests::TempDir::new("vmm-panic");
        let (vm, gate) = spinning_vm(&dir, 2, None);
        // Seen once the guest runs: the event loop starts after the vCPUs.
        vm.life.panic_event_loop.store(true, Ordering::SeqCst);
        vm.life.exit_evt().write(1).unwrap();
        gate.open();
        let life = vm.life.clone();
        let result = vm.wait();
        assert!(matches!(result, Err(Error::VmThreadPanicked)), "{result:?}");
        assert!(life.startup_time().is_some(), "the guest never ran");
        assert_eq!(
            Arc::strong_count(&life),
            1,
            "a vCPU thread still holds the VM after its VM thread panicked"
        );
        assert!(
            matches!(life.outcome(), Some(VmOutcome::KvmFailure(m)) if m.contains("panicked")),
            "{:?}",
            life.outcome()
        );
    }
}
