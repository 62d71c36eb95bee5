//! `kiln run`: boot a fresh VM, run one command in it, exit with its status.
//!
//! The command runs through kiln's guest agent (the sandbox API) unless the
//! agent cannot be used; then it runs the classic way, with the guest
//! console as its stdio (see `uses_agent`).

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::signals::{self, StopSignals};
use super::terminal::{stdio_console, window_size, BootConsole, RawTerminal};
use super::{CommandArgs, JailArgs, RunArgs};
use crate::config::{Credentials, GuestCommand, SeccompMode};
use crate::jail::{JailConfig, JailError, JailPlan};
use crate::outcome::{STATUS_BOOT_TIMEOUT, STATUS_KILN_ERROR};
use crate::sandbox::{self, ExitStatus, Isolation, Sandbox, SandboxBuilder, SandboxError};
use crate::seccomp::{self, ThreadKind};
use crate::{VmConfig, VmOutcome, VmStopper};

/// Runs `kiln run` and returns kiln's exit status. `started` is when kiln
/// started (the origin of the times it logs).
pub fn run(args: RunArgs, started: Instant) -> i32 {
    super::init_logging(args.vm.verbose);
    let mut config = VmConfig::from(args.vm);
    let agent = uses_agent(&config);
    if args.print_cmdline {
        return print_cmdline(config, agent);
    }
    // Before the jail, which hides virtiofsd and the shared directories.
    if let Err(e) = crate::share::start_early(&mut config) {
        eprintln!("kiln: {e}");
        return STATUS_KILN_ERROR;
    }
    if let Err(e) = confine(&args.jail, &mut config, |_| {}) {
        eprintln!("kiln: {e}");
        return STATUS_KILN_ERROR;
    }
    if agent {
        return run_with_agent(config, &args.command, started);
    }
    if args.command.tty {
        eprintln!("kiln: -t needs kiln's guest agent, which does not run with --vsock or an initrd's own init (rdinit=)");
        return STATUS_KILN_ERROR;
    }
    // Classic: kiln's stdin is the guest console, so -i changes nothing.
    config.command = args.command.guest_command();
    if let Some(init) = config.own_init() {
        let command = &config.command;
        if !command.argv.is_empty() || command.has_options() {
            eprintln!(
                "kiln: a command, -e, -w or --user needs kiln's init, which the initrd's own init {init} (rdinit=) replaces"
            );
            return STATUS_KILN_ERROR;
        }
    }
    run_classic(config, started).unwrap_or_else(|e| {
        eprintln!("kiln: {e}");
        STATUS_KILN_ERROR
    })
}

/// Enters the jail `config`'s run needs; the VM drops to the jail's ids
/// (`run_as`) once it is built.
pub(super) fn enter_jail(jail: JailConfig, config: &mut VmConfig) -> Result<(), JailError> {
    let plan = JailPlan::for_vm(config)?;
    enter_jail_with(jail, config, plan)
}

/// Makes `config`'s host paths absolute, enters `--cgroup`'s cgroup, then
/// the jail (`add` may add to its plan), as every command that runs a VM
/// does first thing, while kiln has one thread. Returns the one-line error.
pub(super) fn confine(
    args: &JailArgs,
    config: &mut VmConfig,
    add: impl FnOnce(&mut JailPlan),
) -> Result<(), String> {
    config
        .make_host_paths_absolute()
        .map_err(|e| format!("the working directory: {e}"))?;
    if let Some(limits) = &args.cgroup {
        // Before the jail, which hides /sys/fs/cgroup.
        crate::jail::enter_cgroup(limits).map_err(|e| e.to_string())?;
    }
    if let Some(jail) = args.config() {
        let mut plan = JailPlan::for_vm(config).map_err(|e| e.to_string())?;
        add(&mut plan);
        enter_jail_with(jail, config, plan).map_err(|e| e.to_string())?;
        log::info!("jail: entered");
    }
    Ok(())
}

/// As [`enter_jail`], with the plan made (and added to) by the caller.
fn enter_jail_with(
    jail: JailConfig,
    config: &mut VmConfig,
    plan: JailPlan,
) -> Result<(), JailError> {
    let ids = Credentials {
        uid: jail.uid,
        gid: jail.gid,
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        plan.check_access(ids)?;
    }
    config.run_as = plan.enter(jail)?;
    plan.apply(config);
    Ok(())
}

/// Whether the command runs through kiln's agent. It cannot with --vsock
/// (the device is the user's) or with an initrd started by its own init
/// (`rdinit=`: kiln's init never runs, so the guest gets no vsock device it
/// would only probe).
fn uses_agent(config: &VmConfig) -> bool {
    config.vsock.is_none() && config.own_init().is_none()
}

/// Prints the kernel command line the run would give the guest, computed by
/// the run's own code for the path it would take.
fn print_cmdline(config: VmConfig, agent: bool) -> i32 {
    let line = match agent {
        true => SandboxBuilder::from(config)
            .kernel_cmdline()
            .map_err(|e| e.to_string()),
        false => crate::vmm::kernel_cmdline(&config).map_err(|e| e.to_string()),
    };
    match line {
        Ok(line) => {
            println!("{line}");
            0
        }
        Err(e) => {
            eprintln!("kiln: {e}");
            STATUS_KILN_ERROR
        }
    }
}

/// The classic path: the guest console is kiln's stdin and stdout (a
/// terminal in raw mode), the guest's own report is the status.
fn run_classic(config: VmConfig, started: Instant) -> crate::Result<i32> {
    let _raw = RawTerminal::enter();
    let io = stdio_console()?;
    let mode = config.seccomp;
    // Before any thread starts, so that every thread inherits the mask.
    let signals = StopSignals::block();
    let (vm, gate) = crate::vmm::spawn_gated(config, io, started)?;
    let stopper = vm.stopper();
    // The guest starts once this thread is filtered too, after the threads
    // that must not inherit its filter have started.
    let filtered = signals
        .on_signal(mode, move |sig| {
            stopper.stop(VmOutcome::Interrupted(sig as u8))
        })
        .map_err(crate::Error::io("spawning the signal thread"))
        .and_then(|()| Ok(seccomp::install(ThreadKind::CliMain, mode)?));
    if let Err(e) = filtered {
        drop(gate); // the VM ends without running the guest
        return Err(e);
    }
    gate.open();
    let report = vm.wait()?;
    if !report.outcome.is_command_exit() {
        eprintln!("kiln: {}", report.outcome);
    } else if let VmOutcome::Signaled(_) = report.outcome {
        log::info!("{}", report.outcome);
    }
    Ok(report.outcome.exit_status())
}

/// The agent path: the command's stdout and stderr are kiln's, its stdin is
/// kiln's with -i (else empty). The guest console goes to stderr with -v;
/// without -v it goes to stdout until the agent is up, and is dropped after.
fn run_with_agent(config: VmConfig, command: &CommandArgs, started: Instant) -> i32 {
    // Read before the VM starts (this thread is filtered then); the raw
    // mode is set once the agent is up (so the boot console is still
    // written in the terminal's own mode) and restored when `terminal` is
    // dropped, on every way out of this function.
    let mut terminal = None;
    let mut size = None;
    if command.tty {
        terminal = RawTerminal::read();
        size = window_size();
        // As docker run: -i with -t needs a terminal to read keys from;
        // -t alone runs with whatever stdin is (the command reads none).
        if command.interactive && terminal.is_none() {
            eprintln!("kiln: the input device is not a TTY (-it needs kiln's stdin to be a terminal; use -i without -t)");
            return STATUS_KILN_ERROR;
        }
    }
    let vm = match AgentVm::start(config, ThreadKind::CliMain) {
        Ok(vm) => vm,
        Err(status) => return status,
    };
    // From kiln's start, the jail and the VM's set-up included (the
    // benchmark's restore row).
    log::info!(
        "agent ready {:.1} ms after kiln started",
        started.elapsed().as_secs_f64() * 1e3
    );
    if command.interactive {
        if let Some(terminal) = terminal.as_mut() {
            terminal.pass_every_key();
        }
    }
    let result = vm.run(command, size);
    let status = vm.finish(result);
    drop(terminal);
    status
}

/// A VM whose guest agent is up, started as `kiln run` starts it (in this
/// process, which the jail holds as a whole), with a signal stopping it.
pub(super) struct AgentVm {
    pub(super) sandbox: Sandbox,
    interrupted: Arc<AtomicI32>,
    mode: SeccompMode,
}

impl AgentVm {
    /// Boots (or restores) the VM of `config` and waits for its agent; on
    /// failure, the error is reported and the exit status returned. This
    /// thread takes the seccomp filter of `main` before the guest starts.
    pub(super) fn start(config: VmConfig, main: ThreadKind) -> Result<AgentVm, i32> {
        let mode = config.seccomp;
        let signals = StopSignals::block();
        // A signal stops the VM through its stopper, which the builder hands
        // over as soon as the VM runs; one that came earlier is seen then.
        let interrupted = Arc::new(AtomicI32::new(0));
        let stopper: Arc<Mutex<Option<VmStopper>>> = Arc::default();
        let (flag, slot) = (interrupted.clone(), stopper.clone());
        let watching = signals.on_signal(mode, move |sig| {
            flag.store(sig, Ordering::SeqCst);
            if let Some(s) = slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                s.stop(VmOutcome::Interrupted(sig as u8));
            }
        });
        if let Err(e) = watching {
            eprintln!("kiln: spawning the signal thread: {e}");
            return Err(STATUS_KILN_ERROR);
        }

        let boot_console = BootConsole::default();
        let console: Box<dyn Write + Send> = match config.verbose {
            true => Box::new(io::stderr()),
            false => Box::new(boot_console.clone()),
        };
        let (flag, slot) = (interrupted.clone(), stopper.clone());
        // kiln run is jailed as a whole: its VM runs on its own threads. Its
        // user sees the boot: no wait for the agent unless asked (--boot-timeout,
        // --timeout).
        let builder = SandboxBuilder::from(config)
            .without_default_boot_timeout()
            .isolation(Isolation::InProcess)
            .console_output(console)
            .on_vm_started(move |vm| {
                let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
                let sig = flag.load(Ordering::SeqCst);
                if sig != 0 {
                    vm.stop(VmOutcome::Interrupted(sig as u8));
                }
                *slot = Some(vm);
            })
            // This thread is filtered once the VM's thread has started (so that it
            // does not inherit the filter) and before the guest starts.
            .before_guest_starts(move || Ok(seccomp::install(main, mode)?));
        let sandbox = match builder.build() {
            Ok(sandbox) => sandbox,
            Err(SandboxError::BootFailed { outcome, .. }) => {
                // The console has already gone to stdout (or stderr with -v).
                if !outcome.is_command_exit() {
                    eprintln!("kiln: {outcome}");
                }
                return Err(outcome.exit_status());
            }
            // One line: the console has gone to stdout (or stderr with -v).
            Err(SandboxError::BootTimeout { timeout, .. }) => {
                eprintln!(
                    "kiln: the guest agent did not connect within {timeout:?} (--boot-timeout), VM stopped: the guest kernel may still be unpacking a directory or tar root (try an image root or a longer --boot-timeout)"
                );
                return Err(STATUS_BOOT_TIMEOUT);
            }
            Err(e) => {
                eprintln!("kiln: {e}");
                return Err(STATUS_KILN_ERROR);
            }
        };
        boot_console.agent_up();
        Ok(AgentVm {
            sandbox,
            interrupted,
            mode,
        })
    }

    /// Runs `command` with kiln's stdio until it ends (on a guest terminal
    /// with -t, of `size` at first, then following the size of kiln's
    /// terminal).
    pub(super) fn run(
        &self,
        command: &CommandArgs,
        size: Option<(u16, u16)>,
    ) -> sandbox::Result<ExitStatus> {
        let mut cmd = command.to_sandbox_command();
        if command.tty {
            let (rows, cols) = size.unwrap_or(DEFAULT_WINDOW);
            cmd = cmd.tty(rows, cols);
        }
        let process = self.sandbox.spawn(cmd)?;
        let resizes = match command.tty {
            true => Some(follow_window_size(&process, size, self.mode)?),
            false => None,
        };
        let status = forward_stdio(process, self.mode);
        if let Some(thread) = resizes {
            // Dropping the sender ends the thread.
            signals::on_window_change(None);
            let _ = thread.join();
        }
        status
    }

    /// Shuts the VM down; kiln's exit status for a command that ended with
    /// `result`.
    pub(super) fn finish(self, result: sandbox::Result<ExitStatus>) -> i32 {
        let outcome = self.sandbox.shutdown();
        let sig = self.interrupted.load(Ordering::SeqCst);
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
            // The command's end was not reported: the VM's outcome says why.
            Err(e) => match outcome {
                Ok(Some(o)) if !o.is_command_exit() || o == VmOutcome::Exited(0) => {
                    let o = match o {
                        VmOutcome::Exited(0) => VmOutcome::GuestReset,
                        o => o,
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
}

/// The window of a guest terminal when kiln's own has no size (docker's).
const DEFAULT_WINDOW: (u16, u16) = (24, 80);

/// Starts the thread that passes each new size of kiln's terminal to
/// `process`'s (on SIGWINCH, and once at its start for a change during the
/// boot); it ends once [`signals::on_window_change`] drops its sender.
fn follow_window_size(
    process: &sandbox::Process,
    mut last: Option<(u16, u16)>,
    mode: SeccompMode,
) -> sandbox::Result<std::thread::JoinHandle<()>> {
    let (changed, changes) = std::sync::mpsc::channel();
    let resizer = process.handle();
    let follow = move || loop {
        let size = window_size();
        if let Some((rows, cols)) = size.filter(|_| size != last) {
            if resizer.resize(rows, cols).is_err() {
                break;
            }
            last = size;
        }
        if changes.recv().is_err() {
            break;
        }
    };
    // Before the thread's first look: no SIGWINCH is missed in between.
    signals::on_window_change(Some(changed));
    let thread = seccomp::spawn("kiln-winch".into(), ThreadKind::CliStdio, mode, follow);
    if thread.is_err() {
        signals::on_window_change(None);
    }
    thread.map_err(SandboxError::io("spawning the window size thread"))
}

/// Copies kiln's stdin to the command (with -i) and its stdout and stderr
/// to kiln's, until it ends; each copier runs under its seccomp filter.
fn forward_stdio(mut process: sandbox::Process, mode: SeccompMode) -> sandbox::Result<ExitStatus> {
    let copier = |name: &str, body: Box<dyn FnOnce() + Send>| {
        seccomp::spawn(name.into(), ThreadKind::CliStdio, mode, body)
            .map_err(SandboxError::io("spawning a stdio thread"))
    };
    if let Some(mut stdin) = process.stdin() {
        // Not joined: it may sit in read(0) after the command ended.
        copier(
            "kiln-stdin",
            Box::new(move || copy(&mut io::stdin().lock(), &mut stdin)),
        )?;
    }
    let mut out = process.stdout().expect("taken once");
    let mut err = process.stderr().expect("taken once");
    let stdout = copier(
        "kiln-stdout",
        Box::new(move || copy(&mut out, &mut io::stdout())),
    )?;
    let stderr = copier(
        "kiln-stderr",
        Box::new(move || copy(&mut err, &mut io::stderr())),
    )?;
    let status = process.wait();
    let _ = (stdout.join(), stderr.join());
    status
}

/// Copies until end of file or an error on either side, flushing each piece.
fn copy(from: &mut impl Read, to: &mut impl Write) {
    let mut buf = vec![0u8; 32 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
            break;
        }
    }
}

impl CommandArgs {
    /// The command, the same on both paths.
    pub fn guest_command(&self) -> GuestCommand {
        let (uid, gid) = match self.user {
            Some((uid, gid)) => (Some(uid), gid),
            None => (None, None),
        };
        GuestCommand {
            argv: self.argv.clone(),
            env: self.env.clone(),
            workdir: self.workdir.clone(),
            uid,
            gid,
        }
    }

    /// The command as the sandbox runs it.
    fn to_sandbox_command(&self) -> sandbox::Command {
        let cmd = sandbox::Command::from(&self.guest_command());
        match self.interactive {
            true => cmd.stdin_piped(),
            false => cmd,
        }
    }
}
