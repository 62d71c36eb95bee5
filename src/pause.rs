//! Pausing a running VM at a safe point, without ending it: each vCPU
//! completes the exit it is in (KVM_RUN with `immediate_exit`, as KVM asks
//! before its state is read), then parks on its own thread, where work that
//! needs its file descriptor (reading its state) runs, until the VM is
//! resumed or stops.
//!
//! The event thread pauses too ([`LoopPause`]): it serves every device's
//! queues, so while it is parked no device touches guest memory or its
//! queues, and a snapshot reads a state with no request half-done.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet as EpollSet};
use vmm_sys_util::eventfd::EventFd;

use crate::lifecycle::Lifecycle;

/// Work for a parked vCPU's thread.
type VcpuWork = Box<dyn FnOnce(&VcpuFd) + Send>;

/// Why a pause, a resume or the work of a parked vCPU did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PauseError {
    /// The VM has ended (or is ending): there is nothing to pause.
    #[error("the VM has ended")]
    Ended,
    /// A resume (or a parked vCPU's work) of a VM that is not paused.
    #[error("the VM is not paused")]
    NotPaused,
    /// A pause of a VM its owner has already paused.
    #[error("the VM is already paused")]
    AlreadyPaused,
}

/// One VM's pause: shared by its vCPU threads and whoever pauses it.
pub(crate) struct Pause {
    /// Read by every vCPU before each KVM_RUN (cheaply, without the lock).
    requested: AtomicBool,
    state: Mutex<PauseState>,
    changed: Condvar,
}

struct PauseState {
    requested: bool,
    /// The VM is stopping: parked vCPUs leave and none parks again.
    released: bool,
    vcpus: Vec<VcpuSlot>,
}

#[derive(Default)]
struct VcpuSlot {
    /// The kernel thread id while the vCPU's loop runs (the kick's target).
    tid: Option<libc::pid_t>,
    parked: bool,
    work: Option<VcpuWork>,
}

impl Pause {
    pub(crate) fn new(vcpus: usize) -> Self {
        Self {
            requested: AtomicBool::new(false),
            state: Mutex::new(PauseState {
                requested: false,
                released: false,
                vcpus: (0..vcpus).map(|_| VcpuSlot::default()).collect(),
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the vCPU must complete its exit and park before running on.
    pub(crate) fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Called by vCPU `id`'s thread as its loop starts: it can be kicked
    /// until the returned guard is dropped.
    pub(crate) fn register(&self, id: usize) -> Registered<'_> {
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        self.lock().vcpus[id].tid = Some(tid);
        Registered { pause: self, id }
    }

    /// Parks vCPU `id` (its exit completed) until the VM is resumed or
    /// released, running the work handed to it meanwhile.
    pub(crate) fn park(&self, id: usize, vcpu: &VcpuFd) {
        let mut state = self.lock();
        state.vcpus[id].parked = true;
        self.changed.notify_all();
        while state.requested && !state.released {
            if let Some(work) = state.vcpus[id].work.take() {
                drop(state);
                work(vcpu);
                state = self.lock();
                continue;
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.vcpus[id].parked = false;
        self.changed.notify_all();
    }

    /// Pauses every vCPU: returns once each has completed its exit and
    /// parked. A vCPU that has not started yet parks before its first
    /// KVM_RUN. Kicks repeat every millisecond: a kick that lands just
    /// before a vCPU enters KVM_RUN is lost (as in `VcpuThread::stop_and_join`).
    pub(crate) fn pause(&self) -> Result<(), PauseError> {
        let mut state = self.lock();
        state.requested = true;
        self.requested.store(true, Ordering::SeqCst);
        loop {
            if state.released {
                return Err(PauseError::Ended);
            }
            if state.vcpus.iter().all(|v| v.parked) {
                return Ok(());
            }
            for vcpu in state.vcpus.iter().filter(|v| !v.parked) {
                if let Some(tid) = vcpu.tid {
                    kick(tid);
                }
            }
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets the parked vCPUs run the guest again.
    pub(crate) fn resume(&self) {
        let mut state = self.lock();
        state.requested = false;
        self.requested.store(false, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// The VM is stopping: wakes every parked vCPU (so that it can end)
    /// and fails every pause from now on.
    pub(crate) fn release(&self) {
        self.lock().released = true;
        self.changed.notify_all();
    }

    /// Runs `work` on paused vCPU `id`'s thread (with its file descriptor)
    /// and returns its result.
    pub(crate) fn on_vcpu<T: Send + 'static>(
        &self,
        id: usize,
        work: impl FnOnce(&VcpuFd) -> T + Send + 'static,
    ) -> Result<T, PauseError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        {
            let mut state = self.lock();
            if state.released {
                return Err(PauseError::Ended);
            }
            if !state.requested || !state.vcpus[id].parked {
                return Err(PauseError::NotPaused);
            }
            state.vcpus[id].work = Some(Box::new(move |fd| {
                let _ = tx.send(work(fd));
            }));
            self.changed.notify_all();
        }
        // The sender goes with the work: dropped unrun if the VM ends first.
        rx.recv().map_err(|_| PauseError::Ended)
    }

    /// The number of vCPUs.
    pub(crate) fn vcpus(&self) -> usize {
        self.lock().vcpus.len()
    }
}

/// A vCPU loop's registration for kicks ([`Pause::register`]).
pub(crate) struct Registered<'a> {
    pause: &'a Pause,
    id: usize,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut state = self.pause.lock();
        let slot = &mut state.vcpus[self.id];
        slot.tid = None;
        // Work handed over as the loop ended is dropped: its waiter sees the end.
        slot.work = None;
    }
}

/// Interrupts thread `tid` of this process in KVM_RUN (the vCPU kick
/// signal, whose handler does nothing).
fn kick(tid: libc::pid_t) {
    // SAFETY: tgkill takes plain integers; `tid` is a live thread of this
    // process (it is registered, and deregisters under the same lock).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            tid,
            crate::vcpu::kick_signal(),
        )
    };
    if rc != 0 {
        log::warn!(
            "cannot kick vCPU thread {tid}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Parks the event thread (the VM thread's event loop) between two events,
/// so that no device runs while a snapshot is taken. Its other half, a
/// [`LoopParker`], sits in the event loop.
pub(crate) struct LoopPause {
    request: EventFd,
    resume: EventFd,
    /// One message per park; closed when the event loop is gone.
    parked: Mutex<Receiver<()>>,
    paused: AtomicBool,
}

/// The event-loop subscriber that parks its thread when a [`LoopPause`]
/// asks.
pub(crate) struct LoopParker {
    request: EventFd,
    resume: EventFd,
    life: Arc<Lifecycle>,
    /// The resume eventfd and the VM's exit eventfd: a VM stopped while
    /// paused ends (epoll_wait: the event thread's seccomp list has it).
    wake: Epoll,
    parked: SyncSender<()>,
}

const WAKE_RESUME: u64 = 0;
const WAKE_EXIT: u64 = 1;

impl LoopPause {
    /// A pause for the event loop of the VM `life` belongs to, and the
    /// subscriber to add to that loop.
    pub(crate) fn new(life: Arc<Lifecycle>) -> std::io::Result<(Self, LoopParker)> {
        let request = kiln_devices::new_eventfd()?;
        let resume = kiln_devices::new_eventfd()?;
        let wake = Epoll::new()?;
        wake.ctl(
            ControlOperation::Add,
            resume.as_raw_fd(),
            EpollEvent::new(EpollSet::IN, WAKE_RESUME),
        )?;
        // Edge-triggered: the exit eventfd is read by the loop, not here,
        // and a level-triggered watch would spin until it is.
        wake.ctl(
            ControlOperation::Add,
            life.exit_evt().as_raw_fd(),
            EpollEvent::new(EpollSet::IN | EpollSet::EDGE_TRIGGERED, WAKE_EXIT),
        )?;
        let (parked, parked_rx) = std::sync::mpsc::sync_channel(1);
        let parker = LoopParker {
            request: request.try_clone()?,
            resume: resume.try_clone()?,
            life,
            wake,
            parked,
        };
        let pause = Self {
            request,
            resume,
            parked: Mutex::new(parked_rx),
            paused: AtomicBool::new(false),
        };
        Ok((pause, parker))
    }

    /// Returns once the event thread is parked (it finishes the event it
    /// is serving first).
    pub(crate) fn pause(&self) -> Result<(), PauseError> {
        let parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        if self.paused.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.request.write(1).map_err(|_| PauseError::Ended)?;
        // Closed once the event loop is gone: the VM has ended.
        parked.recv().map_err(|_| PauseError::Ended)?;
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Lets a parked event thread go on.
    pub(crate) fn resume(&self) {
        let _parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        if self.paused.swap(false, Ordering::SeqCst) {
            let _ = self.resume.write(1);
        }
    }
}

impl MutEventSubscriber for LoopParker {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.request, EventSet::IN)) {
            log::error!("event loop: cannot watch pause requests: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.request.read();
        if self.parked.try_send(()).is_err() {
            return;
        }
        let mut events = [EpollEvent::default(); 2];
        while !self.life.is_stopping() {
            let ready = match self.wake.wait(-1, &mut events) {
                Ok(n) => &events[..n],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("event loop: cannot wait for the end of a pause: {e}");
                    return;
                }
            };
            if ready.iter().any(|e| e.data() == WAKE_RESUME) {
                let _ = self.resume.read();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_of_an_ended_vm_fails_and_a_parked_vcpu_takes_no_work_after_the_end() {
        let pause = Pause::new(1);
        pause.release();
        assert_eq!(pause.pause(), Err(PauseError::Ended));
        assert_eq!(pause.on_vcpu(0, |_| ()).unwrap_err(), PauseError::Ended);
    }

    #[test]
    fn work_needs_a_parked_vcpu() {
        let pause = Pause::new(1);
        assert_eq!(pause.on_vcpu(0, |_| ()).unwrap_err(), PauseError::NotPaused);
    }

    /// Counts its eventfd's events, noting whether the test had resumed
    /// the loop by then.
    struct Counter {
        evt: EventFd,
        resumed: Arc<AtomicBool>,
        served: std::sync::mpsc::Sender<bool>,
    }

    impl MutEventSubscriber for Counter {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.evt.read();
            let _ = self.served.send(self.resumed.load(Ordering::SeqCst));
        }
    }

    /// While the event loop is paused it serves no event (one that arrives
    /// meanwhile is served after the resume), and a VM that stops while
    /// its loop is paused ends.
    #[test]
    fn a_paused_event_loop_serves_nothing_until_resumed_and_a_stop_ends_it() {
        let life = Arc::new(Lifecycle::new(std::time::Instant::now()).unwrap());
        let (pause, parker) = LoopPause::new(life.clone()).unwrap();
        let evt = kiln_devices::new_eventfd().unwrap();
        let resumed = Arc::new(AtomicBool::new(false));
        let (served, served_rx) = std::sync::mpsc::channel();
        let mut event_loop = crate::event_loop::EventLoop::new().unwrap();
        event_loop.add(Box::new(parker));
        event_loop.add(Box::new(Counter {
            evt: evt.try_clone().unwrap(),
            resumed: resumed.clone(),
            served,
        }));
        let loop_life = life.clone();
        let thread = std::thread::spawn(move || event_loop.run(&loop_life, None));

        pause.pause().unwrap();
        evt.write(1).unwrap();
        // Served now, the event would have been served before this store.
        resumed.store(true, Ordering::SeqCst);
        pause.resume();
        assert!(served_rx.recv().unwrap(), "served while paused");

        pause.pause().unwrap();
        life.finish(crate::outcome::VmOutcome::Stopped);
        thread.join().unwrap().unwrap();
        // The loop is gone: a pause fails instead of waiting forever.
        pause.resume();
        assert_eq!(pause.pause(), Err(PauseError::Ended));
    }
}
