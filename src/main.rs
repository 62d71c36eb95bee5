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
    init_logging(args.vm.verbose);
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

/// Runs the command through kiln's guest agent (the sandbox API): its
/// stdout and stderr reach kiln's stdout and stderr separately, its stdin is
/// kiln's with -i (else empty). The guest console goes to stderr with -v;
/// without -v it goes to stdout until kiln's agent takes over (so a kernel
/// that dies early is still seen), and is dropped after that.
fn run_sandboxed(config: kiln::VmConfig, args: &kiln::cli::CommandArgs) -> i32 {
    use kiln::sandbox::{Command as SbCommand, ExitStatus, Sandbox, SandboxError};
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicI32, Ordering};
    use std::sync::Arc;

    let signals = block_stop_signals();
    let verbose = config.verbose;
    let mut builder = Sandbox::builder().config(config);
    let booting = Arc::new(std::sync::atomic::AtomicBool::new(true));
    if verbose {
        builder = builder.console_output(Box::new(std::io::stderr()));
    } else {
        builder = builder.console_output(Box::new(BootConsole(booting.clone())));
    }
    let argv: Vec<std::ffi::OsString> = match args.argv.is_empty() {
        true => vec!["/bin/sh".into()],
        false => args.argv.clone(),
    };
    let mut cmd = SbCommand::new(&argv[0]).args(&argv[1..]);
    for (k, v) in &args.env {
        cmd = cmd.env(k, v);
    }
    if let Some(w) = &args.workdir {
        cmd = cmd.current_dir(w);
    }
    if let Some((uid, gid)) = args.user {
        cmd = cmd.uid(uid);
        if let Some(gid) = gid {
            cmd = cmd.gid(gid);
        }
    }
    if args.interactive {
        cmd = cmd.stdin_piped();
    }
    // Signals stop the VM, during boot (through the flag) and after (through
    // the stopper, once there is one).
    let interrupted = Arc::new(AtomicI32::new(0));
    let stopper_slot: Arc<std::sync::Mutex<Option<kiln::VmStopper>>> = Arc::default();
    {
        let (flag, slot) = (interrupted.clone(), stopper_slot.clone());
        let _ = std::thread::Builder::new()
            .name("kiln-signals".into())
            .spawn(move || {
                if let Some(sig) = wait_for_signal(&signals) {
                    flag.store(sig, Ordering::SeqCst);
                    if let Some(s) = slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                        s.stop(VmOutcome::Interrupted(sig as u8));
                    }
                }
            });
    }
    builder = builder.interrupt_flag(interrupted.clone());
    let sandbox = match builder.build() {
        Ok(sb) => sb,
        Err(SandboxError::BootFailed { outcome, .. }) => {
            // The console has already gone to stdout (or stderr with -v).
            if !outcome.is_command_exit() {
                eprintln!("kiln: {outcome}");
            }
            return outcome.exit_status();
        }
        Err(e) => {
            eprintln!("kiln: {e}");
            return match e {
                SandboxError::BootTimeout { .. } => kiln::outcome::STATUS_TIMEOUT,
                _ => STATUS_KILN_ERROR,
            };
        }
    };
    booting.store(false, Ordering::SeqCst);
    *stopper_slot.lock().unwrap_or_else(|e| e.into_inner()) = sandbox.stopper();
    if interrupted.load(Ordering::SeqCst) != 0 {
        if let Some(s) = sandbox.stopper() {
            s.stop(VmOutcome::Interrupted(
                interrupted.load(Ordering::SeqCst) as u8
            ));
        }
    }
    let result = sandbox.spawn(cmd).and_then(|mut p| {
        if let Some(mut stdin) = p.stdin() {
            // Not joined: it may sit in read(0) after the command ended.
            let _ = std::thread::Builder::new()
                .name("kiln-stdin".into())
                .spawn(move || {
                    let mut buf = vec![0u8; 32 << 10];
                    let mut input = std::io::stdin().lock();
                    while let Ok(n) = input.read(&mut buf) {
                        if n == 0 || stdin.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
        }
        let copy = |mut from: Box<dyn Read + Send>, mut to: Box<dyn Write + Send>| {
            move || {
                let mut buf = vec![0u8; 32 << 10];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 || to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
                        break;
                    }
                }
            }
        };
        let out = p.stdout().expect("first take");
        let err = p.stderr().expect("first take");
        let t1 = std::thread::spawn(copy(Box::new(out), Box::new(std::io::stdout())));
        let t2 = std::thread::spawn(copy(Box::new(err), Box::new(std::io::stderr())));
        let status = p.wait();
        let _ = (t1.join(), t2.join());
        status
    });
    let outcome = sandbox.shutdown();
    let sig = interrupted.load(Ordering::SeqCst);
    match result {
        _ if sig != 0 => {
            eprintln!("kiln: {}", VmOutcome::Interrupted(sig as u8));
            128 + sig
        }
        Ok(ExitStatus::Code(c)) => c & 0xff,
        Ok(ExitStatus::Signal(s)) => {
            log::info!("command killed by signal {s}");
            128 + s
        }
        Err(e) => match outcome {
            Ok(Some(o)) if !o.is_command_exit() || o == VmOutcome::Exited(0) => {
                let o = if o == VmOutcome::Exited(0) {
                    VmOutcome::GuestReset
                } else {
                    o
                };
                eprintln!("kiln: {o}");
                o.exit_status()
            }
            _ => {
                eprintln!("kiln: {e}");
                STATUS_KILN_ERROR
            }
        },
    }
}

fn run(args: &kiln::cli::RunArgs, started: Instant) -> kiln::Result<i32> {
    // The command runs the classic way, with the guest console as its stdio,
    // when kiln's agent cannot be used: with --vsock the device is the
    // user's, and an initrd started by its own init (`rdinit=`) never runs
    // kiln's init (so the guest gets no vsock device it would only probe).
    let mut config = kiln::VmConfig::from(args.vm.clone());
    let agent = config.vsock.is_none() && config.own_init().is_none();
    if args.print_cmdline {
        // The run's own computation, for the path the run would take.
        let line = match agent {
            true => kiln::sandbox::SandboxBuilder::from(config)
                .kernel_cmdline()
                .map_err(|e| e.to_string()),
            false => kiln::vmm::kernel_cmdline(&config).map_err(|e| e.to_string()),
        };
        return Ok(match line {
            Ok(line) => {
                println!("{line}");
                0
            }
            Err(e) => {
                eprintln!("kiln: {e}");
                STATUS_KILN_ERROR
            }
        });
    }
    if agent {
        return Ok(run_sandboxed(config, &args.command));
    }
    config.command = args.command.argv.clone();
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

/// The guest console while kiln waits for its agent: copied to stdout as it
/// arrives, then dropped once the flag is cleared (the agent carries the
/// command's output from then on).
struct BootConsole(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl std::io::Write for BootConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.load(std::sync::atomic::Ordering::SeqCst) {
            let mut out = std::io::stdout().lock();
            out.write_all(buf)?;
            out.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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
