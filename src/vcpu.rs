//! vCPU threads: one per vCPU, each running KVM_RUN and forwarding exits to the
//! PIO and MMIO buses. Device work that is not a direct register access
//! happens on the event-loop thread, never here.

use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;

use kiln_devices::bus::{Access, Bus};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::config::SeccompMode;
use crate::device_manager::Buses;
use crate::error::{Error, Result};
use crate::lifecycle::Lifecycle;
use crate::outcome::VmOutcome;
use crate::pause::Pause;
use crate::seccomp::{self, ThreadKind};

/// How often each kind of VM exit happened (per vCPU, summed over all of
/// them in [`RunReport::exits`](crate::RunReport::exits)). Each exit costs
/// a round trip through the host kernel, so these say where the guest
/// spends monitor time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// Port I/O exits (the UART, the i8042, port 0x80, ...).
    pub pio: u64,
    /// MMIO exits (virtio-mmio registers, kiln's control page).
    pub mmio: u64,
    /// Accesses no device claimed (reads saw all ones, writes were dropped).
    pub unclaimed: u64,
    /// Any other exit (halt, shutdown, a KVM failure, ...).
    pub other: u64,
}

impl std::ops::AddAssign for ExitCounts {
    fn add_assign(&mut self, o: Self) {
        self.pio += o.pio;
        self.mmio += o.mmio;
        self.unclaimed += o.unclaimed;
        self.other += o.other;
    }
}

/// The signal that interrupts a blocked KVM_RUN so a vCPU thread can stop.
pub(crate) fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process: its only job is to
/// make KVM_RUN return EINTR instead of killing the process.
pub fn install_kick_handler() -> Result<()> {
    static INSTALLED: std::sync::OnceLock<std::result::Result<(), i32>> =
        std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()))
        .map_err(|errno| Error::Io {
            what: "installing the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(errno),
        })
}

pub struct VcpuThread {
    handle: JoinHandle<ExitCounts>,
    /// Disconnects when the thread's loop has returned (or unwound).
    finished: std::sync::mpsc::Receiver<()>,
}

impl VcpuThread {
    /// Starts the thread of vCPU `id`, which installs its seccomp filter
    /// and then waits for `start`: a message runs the guest, a hang-up ends
    /// the thread without running it.
    pub fn spawn(
        id: u8,
        vcpu: VcpuFd,
        buses: &Buses,
        life: Arc<Lifecycle>,
        pause: Arc<Pause>,
        seccomp: SeccompMode,
        start: Receiver<()>,
    ) -> Result<Self> {
        let (finished_tx, finished) = std::sync::mpsc::channel::<()>();
        let (pio, mmio) = (buses.pio.clone(), buses.mmio.clone());
        let handle = seccomp::spawn(
            format!("kiln-vcpu{id}"),
            ThreadKind::Vcpu,
            seccomp,
            move || {
                let _finished = finished_tx; // dropped on return or unwind
                let _end_on_panic = EndOnPanic(&life, id);
                match start.recv() {
                    Ok(()) => run_loop(id, vcpu, &pio, &mmio, &life, &pause),
                    Err(_) => ExitCounts::default(),
                }
            },
        )
        .map_err(Error::io("spawning a vCPU thread"))?;
        Ok(Self { handle, finished })
    }

    /// Interrupts KVM_RUN until the thread has noticed `is_stopping()` and
    /// returned, then joins it. The thread is usually gone right after the
    /// first kick; kicking again every millisecond closes the race where the
    /// signal lands just before the thread re-enters KVM_RUN.
    pub fn stop_and_join(self) -> ExitCounts {
        use std::sync::mpsc::RecvTimeoutError;
        while !self.handle.is_finished() {
            if let Err(e) = self.handle.kill(kick_signal()) {
                log::warn!("cannot kick vCPU thread: {e}");
                break;
            }
            match self
                .finished
                .recv_timeout(std::time::Duration::from_millis(1))
            {
                Err(RecvTimeoutError::Timeout) => continue,
                Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.handle.join().unwrap_or_else(|_| {
            log::error!("a vCPU thread panicked");
            ExitCounts::default()
        })
    }
}

/// Ends the VM when a vCPU thread panics (a kiln bug): the other vCPUs
/// and the event loop must not go on with a vCPU missing.
struct EndOnPanic<'a>(&'a Lifecycle, u8);

impl Drop for EndOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let what = format!("vCPU {} thread panicked (a kiln bug)", self.1);
            self.0.finish(VmOutcome::KvmFailure(what));
        }
    }
}

fn run_loop(
    id: u8,
    mut vcpu: VcpuFd,
    pio: &Bus,
    mmio: &Bus,
    life: &Lifecycle,
    pause: &Pause,
) -> ExitCounts {
    let mut counts = ExitCounts::default();
    let _kickable = pause.register(usize::from(id));
    life.mark_first_run();
    #[cfg(test)]
    if id == 1 && life.panic_vcpu1.load(std::sync::atomic::Ordering::SeqCst) {
        panic!("fault injection: vCPU 1 panics");
    }
    while !life.is_stopping() {
        if pause.is_requested() {
            complete_exit(id, &mut vcpu, pio, mmio, life, &mut counts);
            pause.park(usize::from(id), &vcpu);
            continue;
        }
        match vcpu.run() {
            Ok(exit) => {
                if let Some(outcome) = handle_exit(exit, pio, mmio, &mut counts) {
                    life.finish(outcome);
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => life.finish(VmOutcome::KvmFailure(format!(
                "vCPU {id}: KVM_RUN failed: {e}"
            ))),
        }
    }
    if let Some(VmOutcome::KvmFailure(_)) | Some(VmOutcome::TripleFault) = life.outcome() {
        if let Ok(regs) = vcpu.get_regs() {
            log::debug!(
                "vCPU {id} stopped at rip={:#x} rsp={:#x}",
                regs.rip,
                regs.rsp
            );
        }
    }
    counts
}

/// Completes the exit the vCPU last returned without running the guest
/// further: KVM finishes an MMIO or port read (and the instruction) only at
/// the next KVM_RUN, which `immediate_exit` makes return at once. An exit
/// that needs another round (the next chunk of a string I/O) is served first.
fn complete_exit(
    id: u8,
    vcpu: &mut VcpuFd,
    pio: &Bus,
    mmio: &Bus,
    life: &Lifecycle,
    counts: &mut ExitCounts,
) {
    vcpu.set_kvm_immediate_exit(1);
    while !life.is_stopping() {
        match vcpu.run() {
            Ok(exit) => {
                if let Some(outcome) = handle_exit(exit, pio, mmio, counts) {
                    life.finish(outcome);
                }
            }
            Err(e) if e.errno() == libc::EINTR => break,
            Err(e) if e.errno() == libc::EAGAIN => {}
            Err(e) => life.finish(VmOutcome::KvmFailure(format!(
                "vCPU {id}: KVM_RUN (completing an exit) failed: {e}"
            ))),
        }
    }
    vcpu.set_kvm_immediate_exit(0);
}

/// Handles one exit; returns the VM's outcome if this exit ends it.
fn handle_exit(
    exit: VcpuExit<'_>,
    pio: &Bus,
    mmio: &Bus,
    counts: &mut ExitCounts,
) -> Option<VmOutcome> {
    let access = match exit {
        VcpuExit::IoOut(port, data) => {
            counts.pio += 1;
            pio.write(u64::from(port), data)
        }
        VcpuExit::IoIn(port, data) => {
            counts.pio += 1;
            pio.read(u64::from(port), data)
        }
        VcpuExit::MmioWrite(addr, data) => {
            counts.mmio += 1;
            mmio.write(addr, data)
        }
        VcpuExit::MmioRead(addr, data) => {
            counts.mmio += 1;
            mmio.read(addr, data)
        }
        other => {
            counts.other += 1;
            return non_io_exit(other);
        }
    };
    if access == Access::Unclaimed {
        counts.unclaimed += 1;
    }
    None
}

fn non_io_exit(exit: VcpuExit<'_>) -> Option<VmOutcome> {
    match exit {
        // Only seen without an in-kernel irqchip; kiln always has one, so a
        // halted vCPU simply waits (the timeout still applies).
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
        VcpuExit::Shutdown => Some(VmOutcome::TripleFault),
        VcpuExit::SystemEvent(kind, _) => {
            log::debug!("system event {kind}");
            Some(VmOutcome::GuestReset)
        }
        VcpuExit::InternalError => Some(VmOutcome::KvmFailure(
            "internal error (KVM could not emulate a guest instruction)".into(),
        )),
        VcpuExit::FailEntry(reason, cpu) => Some(VmOutcome::KvmFailure(format!(
            "VM entry failed on CPU {cpu} (hardware reason {reason:#x})"
        ))),
        other => Some(VmOutcome::KvmFailure(format!("unexpected exit {other:?}"))),
    }
}
