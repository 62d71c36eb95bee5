//! SIGINT, SIGTERM and SIGHUP stop the VM cleanly (threads joined, terminal
//! restored) instead of killing kiln mid-run; SIGWINCH (kiln's terminal
//! changed size) is passed on to whoever asked with [`on_window_change`].

use std::io;
use std::sync::mpsc::Sender;
use std::sync::Mutex;

use crate::config::SeccompMode;
use crate::seccomp::{self, ThreadKind};

/// The stop signals, blocked in every thread and taken by one.
pub struct StopSignals(libc::sigset_t);

impl StopSignals {
    /// Blocks the stop signals (and SIGWINCH) in the calling thread. Call
    /// it before any other thread starts: threads inherit the mask, so
    /// only the thread of [`StopSignals::on_signal`] ever takes them.
    pub fn block() -> Self {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; the calls only modify it and
        // this thread's signal mask.
        unsafe {
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGWINCH] {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        Self(set)
    }

    /// Starts the thread that waits for the first stop signal and calls
    /// `stop` with its number (passing each SIGWINCH on meanwhile); it
    /// runs under its seccomp filter (`mode`) from before this returns.
    pub fn on_signal(
        self,
        mode: SeccompMode,
        stop: impl FnOnce(i32) + Send + 'static,
    ) -> io::Result<()> {
        let wait = move || {
            let mut sig = 0;
            // SAFETY: the set is valid and initialised, `sig` a valid out pointer.
            while unsafe { libc::sigwait(&self.0, &mut sig) } == 0 {
                if sig != libc::SIGWINCH {
                    stop(sig);
                    break;
                }
                let listener = WINDOW_CHANGES.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(listener) = listener.as_ref() {
                    let _ = listener.send(());
                }
            }
        };
        seccomp::spawn("kiln-signals".into(), ThreadKind::CliSignals, mode, wait).map(drop)
    }
}

/// Where SIGWINCH is passed on (one `()` per signal).
static WINDOW_CHANGES: Mutex<Option<Sender<()>>> = Mutex::new(None);

/// Passes each SIGWINCH to `listener` from now on (`None`: to no one, which
/// drops the previous listener's sender).
pub fn on_window_change(listener: Option<Sender<()>>) {
    *WINDOW_CHANGES.lock().unwrap_or_else(|e| e.into_inner()) = listener;
}
