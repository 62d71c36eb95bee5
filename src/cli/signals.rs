//! SIGINT, SIGTERM and SIGHUP stop the VM cleanly (threads joined, terminal
//! restored) instead of killing kiln mid-run.

use std::io;

use crate::config::SeccompMode;
use crate::seccomp::{self, ThreadKind};

/// The stop signals, blocked in every thread and taken by one.
pub struct StopSignals(libc::sigset_t);

impl StopSignals {
    /// Blocks the stop signals in the calling thread. Call it before any
    /// other thread starts: threads inherit the mask, so only the thread
    /// of [`StopSignals::on_signal`] ever takes them.
    pub fn block() -> Self {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; the calls only modify it and
        // this thread's signal mask.
        unsafe {
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        Self(set)
    }

    /// Starts the thread that waits for the first stop signal and calls
    /// `stop` with its number; it runs under its seccomp filter (`mode`)
    /// from before this returns.
    pub fn on_signal(
        self,
        mode: SeccompMode,
        stop: impl FnOnce(i32) + Send + 'static,
    ) -> io::Result<()> {
        let wait = move || {
            let mut sig = 0;
            // SAFETY: the set is valid and initialised, `sig` a valid out pointer.
            if unsafe { libc::sigwait(&self.0, &mut sig) } == 0 {
                stop(sig);
            }
        };
        seccomp::spawn("kiln-signals".into(), ThreadKind::CliSignals, mode, wait).map(drop)
    }
}
