//! `kiln`: the command-line front end of the kiln library.

use std::fs::File;
use std::io::IsTerminal;
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use kiln::cli::{Cli, Command};
use kiln::outcome::STATUS_KILN_ERROR;
use kiln::{ConsoleIo, VmOutcome};

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's first line, plus the next when it ends in ':'.
            let text = e.to_string();
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            let mut msg = lines.next().unwrap_or("invalid arguments").to_string();
            if msg.ends_with(':') {
                msg = format!("{msg} {}", lines.next().unwrap_or_default());
            }
            eprintln!("kiln: {}", msg.trim_start_matches("error: "));
            return ExitCode::from(STATUS_KILN_ERROR as u8);
        }
    };
    let Command::Run(args) = cli.command;
    init_logging(args.verbose);
    let code = match run(&args, started) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: {e}");
            STATUS_KILN_ERROR
        }
    };
    ExitCode::from(code as u8)
}

fn init_logging(verbose: bool) {
    let default = if verbose { "info" } else { "warn" };
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("KILN_LOG", default))
        .format_timestamp(None)
        .format_target(false)
        .init();
}

fn run(args: &kiln::cli::RunArgs, started: Instant) -> kiln::Result<i32> {
    let config = args.to_config();
    let _raw = RawTerminal::enter();
    let io = ConsoleIo {
        output: Box::new(dup_fd(std::io::stdout().as_fd())?),
        input: Some(dup_fd(std::io::stdin().as_fd())?),
    };
    // SIGINT/SIGTERM/SIGHUP stop the VM cleanly (threads joined, terminal
    // restored) instead of killing kiln mid-run. Blocked before any thread
    // starts so every thread inherits the mask and one thread takes them.
    let signals = block_stop_signals();
    let vm = kiln::spawn(config, io, started)?;
    let stopper = vm.stopper();
    std::thread::Builder::new()
        .name("kiln-signals".into())
        .spawn(move || {
            if let Some(sig) = wait_for_signal(&signals) {
                stopper.stop(VmOutcome::Interrupted(sig as u8));
            }
        })
        .map_err(|source| kiln::Error::Io {
            what: "spawning the signal thread",
            source,
        })?;
    let report = vm.wait()?;
    if !report.outcome.is_command_exit() {
        eprintln!("kiln: {}", report.outcome);
    } else if let VmOutcome::Signaled(_) = report.outcome {
        log::info!("{}", report.outcome);
    }
    Ok(report.outcome.exit_status())
}

fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the calls only modify it and this
    // thread's signal mask.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

fn wait_for_signal(set: &libc::sigset_t) -> Option<i32> {
    let mut sig = 0;
    // SAFETY: `set` is a valid, initialised signal set and `sig` a valid out pointer.
    (unsafe { libc::sigwait(set, &mut sig) } == 0).then_some(sig)
}

/// An owned duplicate of a standard stream, unbuffered (every guest byte is
/// written as it arrives).
fn dup_fd(fd: std::os::fd::BorrowedFd<'_>) -> kiln::Result<File> {
    let owned: OwnedFd = fd.try_clone_to_owned().map_err(|source| kiln::Error::Io {
        what: "duplicating a standard stream",
        source,
    })?;
    Ok(File::from(owned))
}

/// Puts an interactive terminal in raw mode (keys go to the guest as typed,
/// Ctrl-C still stops kiln) and restores it on drop.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> Option<Self> {
        if !std::io::stdin().is_terminal() {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal (checked above) and `saved` is valid.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios copied from the terminal's.
        unsafe { libc::cfmakeraw(&mut raw) };
        raw.c_lflag |= libc::ISIG;
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: fd 0 is a terminal and `raw` is a valid termios.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) };
        Some(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same terminal.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}
