//! `kiln sandbox-vm`: the child side of a sandbox whose VM runs in a kiln
//! process of its own (`Isolation::Process`, src/sandbox/vm_process.rs).
//! Reads the spec (one JSON line) from stdin, enters the jail, runs the VM
//! with its console on stdout until the VM ends or stdin ends (the
//! sandbox's lifeline), and writes the report to descriptor 3.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::time::Instant;

use crate::outcome::STATUS_KILN_ERROR;
use crate::sandbox::vm_process::{VmProcessReport, VmProcessSpec, REPORT_FD};
use crate::seccomp::{self, ThreadKind};
use crate::{ConsoleIo, VmOutcome};

/// The longest spec line kiln reads (a config is a few KiB).
const SPEC_MAX: usize = 1 << 20;

/// Runs the child's VM; returns kiln's exit status (0 once it reported).
pub fn run(started: Instant) -> i32 {
    // The report descriptor, kept through the jail (which closes every
    // inherited descriptor without close-on-exec).
    // SAFETY: fcntl on a descriptor number; failure is checked.
    if unsafe { libc::fcntl(REPORT_FD, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        eprintln!("kiln: sandbox-vm is started by kiln's sandbox API (no descriptor 3)");
        return STATUS_KILN_ERROR;
    }
    // SAFETY: descriptor 3 is open (fcntl succeeded) and nothing else owns it.
    let mut report = unsafe { File::from_raw_fd(REPORT_FD) };
    // Not in the embedder's session: a terminal's Ctrl-C is the embedder's
    // to handle; it stops this VM through the lifeline.
    // SAFETY: setsid has no preconditions (it fails harmlessly for a leader).
    unsafe { libc::setsid() };
    let result = read_spec().and_then(|spec| {
        super::init_logging(spec.config.verbose);
        run_vm(spec, started)
    });
    let message = match result {
        Ok(outcome) => VmProcessReport::Ended(outcome),
        Err(e) => VmProcessReport::Failed(e),
    };
    let line = serde_json::to_string(&message).unwrap_or_default();
    match writeln!(report, "{line}") {
        Ok(()) => 0,
        Err(_) => STATUS_KILN_ERROR,
    }
}

/// The spec line from stdin, read a byte at a time so that nothing past it
/// is consumed: stdin stays the lifeline.
fn read_spec() -> Result<VmProcessSpec, String> {
    let mut stdin = io::stdin().lock();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stdin.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) if line.len() < SPEC_MAX => line.push(byte[0]),
            Ok(1) => return Err("sandbox-vm: the spec is too long".into()),
            Ok(_) => return Err("sandbox-vm: no spec on stdin".into()),
            Err(e) => return Err(format!("sandbox-vm: reading the spec: {e}")),
        }
    }
    serde_json::from_slice(&line).map_err(|e| format!("sandbox-vm: a bad spec: {e}"))
}

fn run_vm(spec: VmProcessSpec, started: Instant) -> Result<VmOutcome, String> {
    let mut config = spec.config;
    // Before the jail, which hides virtiofsd and the shared directories.
    crate::share::start_early(&mut config).map_err(|e| e.to_string())?;
    if let Some(jail) = spec.jail {
        super::run::enter_jail(jail, &mut config).map_err(|e| e.to_string())?;
    }
    // Unbuffered: the console's bytes reach the sandbox as they come.
    let stdout = io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("stdout: {e}"))?;
    let io = ConsoleIo {
        output: Box::new(File::from(stdout)),
        input: None,
    };
    let mode = config.seccomp;
    // SIGTERM, SIGINT or SIGHUP stop the VM, which then reports as `kiln
    // run`'s would (Interrupted); blocked before any thread starts.
    let signals = super::signals::StopSignals::block();
    let (vm, gate) = crate::vmm::spawn_gated(config, io, started).map_err(|e| e.to_string())?;
    let stopper = vm.stopper();
    let watching = signals.on_signal(mode, move |sig| {
        stopper.stop(VmOutcome::Interrupted(sig as u8))
    });
    if let Err(e) = watching {
        drop(gate);
        return Err(format!("spawning the signal thread: {e}"));
    }
    if let Err(e) = seccomp::install(ThreadKind::CliMain, mode) {
        drop(gate); // the VM ends without running the guest
        return Err(e.to_string());
    }
    gate.open();
    // Until the VM ends or the lifeline does.
    let mut fds = [io::stdin().as_raw_fd(), vm.finished_fd().as_raw_fd()].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: a valid array of two pollfds; both descriptors stay open.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            vm.stop();
            break;
        }
        if fds[1].revents != 0 {
            break;
        }
        if fds[0].revents != 0 {
            // Nothing is sent after the spec: any byte, or the end, stops it.
            vm.stop();
            break;
        }
    }
    vm.wait()
        .map(|report| report.outcome)
        .map_err(|e| e.to_string())
}
