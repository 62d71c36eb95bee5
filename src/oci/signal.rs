//! Signals as `kill` takes them (a name: TERM, SIGTERM, sigterm; or a
//! number), and the ones the container monitor passes on to the command.

/// The names runc knows, without the SIG prefix.
const NAMES: [(&str, i32); 31] = [
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("IOT", libc::SIGIOT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("PWR", libc::SIGPWR),
];

/// The signal number of `text`; one line naming it when it is none.
pub fn parse(text: &str) -> Result<i32, String> {
    if let Ok(n) = text.parse::<i32>() {
        return match (0..=64).contains(&n) {
            true => Ok(n),
            false => Err(format!("invalid signal number {n}")),
        };
    }
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, number)| *number)
        .ok_or_else(|| format!("unknown signal \"{text}\""))
}

/// The signals the container monitor passes on to the container's command
/// when they are sent to its own pid (the one the engine holds: with runc
/// that pid is the command, so `kill PID`, conmon and shims that signal it
/// reach the command). Each one the monitor would otherwise die of or be
/// stopped by, and does not need itself: the terminating ones (HUP, INT,
/// QUIT, USR1, USR2, ALRM, TERM, STKFLT, VTALRM, PROF, IO, PWR, XCPU,
/// XFSZ, and the real-time ones glibc leaves to programs), the job-control
/// stops (TSTP, TTIN, TTOU) and CONT, and WINCH (the monitor follows a
/// terminal's size by reading it, not by SIGWINCH: see `console.rs`).
///
/// Left to their default: KILL and STOP (they cannot be caught), CHLD (the
/// monitor's VM process is its child), PIPE (ignored; a write to a closed
/// pipe raises it in the writing thread), SEGV, BUS, ILL, FPE, TRAP, ABRT
/// and SYS (the monitor's own faults; SYS reports a seccomp violation),
/// and URG (ignored by default; Go programs such as runc and the engines
/// send it to their own threads).
fn forwarded() -> impl Iterator<Item = i32> {
    const CLASSIC: [i32; 19] = [
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGTERM,
        libc::SIGSTKFLT,
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGIO,
        libc::SIGPWR,
        libc::SIGXCPU,
        libc::SIGXFSZ,
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
        libc::SIGCONT,
        libc::SIGWINCH,
    ];
    CLASSIC
        .into_iter()
        .chain(libc::SIGRTMIN()..=libc::SIGRTMAX())
}

/// Whether `signal` ends a container whose command has not started yet,
/// as it ends runc's waiting init: each forwarded one but those whose
/// default action is to stop, continue or nothing.
pub fn ends_unstarted(signal: i32) -> bool {
    ![
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
        libc::SIGCONT,
        libc::SIGWINCH,
    ]
    .contains(&signal)
}

/// The [`forwarded`] signals, blocked in every thread of the process and
/// taken by one, which passes them on.
pub struct Forwarded(libc::sigset_t);

impl Forwarded {
    /// Blocks the forwarded signals in the calling thread. Call it before
    /// any other thread starts: threads inherit the mask, so only the
    /// thread calling [`Forwarded::next`] ever takes them. Child
    /// processes started with `std::process::Command` begin with an empty
    /// mask (std resets it).
    pub fn block() -> Self {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; the calls only modify it and
        // this thread's signal mask.
        unsafe {
            libc::sigemptyset(&mut set);
            for signal in forwarded() {
                libc::sigaddset(&mut set, signal);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        Self(set)
    }

    /// Waits for the next of the signals sent to this process; None if
    /// the wait fails (only for an invalid set: glibc retries an
    /// interrupted wait).
    pub fn next(&self) -> Option<i32> {
        let mut signal = 0;
        // SAFETY: the set is valid and initialised, `signal` a valid out pointer.
        let waited = unsafe { libc::sigwait(&self.0, &mut signal) };
        (waited == 0).then_some(signal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(parse("TERM"), Ok(15));
        assert_eq!(parse("SIGKILL"), Ok(9));
        assert_eq!(parse("sigint"), Ok(2));
        assert_eq!(parse("9"), Ok(9));
        assert_eq!(parse("0"), Ok(0));
        assert!(parse("SIGNOPE").unwrap_err().contains("unknown signal"));
        assert!(parse("99").unwrap_err().contains("invalid signal"));
    }

    #[test]
    fn the_monitor_keeps_the_signals_it_needs() {
        let forwarded: Vec<i32> = forwarded().collect();
        for kept in [
            libc::SIGKILL,
            libc::SIGSTOP,
            libc::SIGCHLD,
            libc::SIGPIPE,
            libc::SIGSEGV,
            libc::SIGSYS,
            libc::SIGABRT,
        ] {
            assert!(!forwarded.contains(&kept), "{kept} is forwarded");
        }
        assert!(forwarded.contains(&libc::SIGTERM) && forwarded.contains(&libc::SIGRTMAX()));
        assert!(ends_unstarted(libc::SIGTERM) && ends_unstarted(libc::SIGUSR1));
        assert!(!ends_unstarted(libc::SIGWINCH) && !ends_unstarted(libc::SIGCONT));
    }

    #[test]
    fn a_blocked_signal_waits_for_next() {
        // In a thread of its own: the mask is the thread's (the test
        // harness's other threads keep theirs, and SIGUSR2 is sent to
        // this thread alone).
        std::thread::spawn(|| {
            let signals = Forwarded::block();
            // SAFETY: raise sends a signal to the calling thread; SIGUSR2
            // is blocked here, so it stays pending until `next` takes it.
            assert_eq!(unsafe { libc::raise(libc::SIGUSR2) }, 0);
            assert_eq!(signals.next(), Some(libc::SIGUSR2));
        })
        .join()
        .unwrap();
    }
}
