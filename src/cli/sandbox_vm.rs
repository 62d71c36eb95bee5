//! `kiln sandbox-vm`: the child side of a sandbox whose VM runs in a kiln
//! process of its own (`Isolation::Process`, src/sandbox/vm_process.rs).
//! Reads the spec (one JSON line) from stdin, enters the jail, runs the VM
//! with its console on stdout until the VM ends or stdin ends (the
//! sandbox's lifeline), and writes the report to descriptor 3. Meanwhile
//! it serves the sandbox's requests on descriptor 4 (a snapshot).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Instant;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::outcome::STATUS_KILN_ERROR;
use crate::sandbox::vm_process::{
    ControlReply, ControlRequest, VmProcessReport, VmProcessSpec, CONTROL_FD, CONTROL_LINE_MAX,
    REPORT_FD,
};
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::SnapshotDir;
use crate::{ConsoleIo, VmConfig, VmHandle, VmOutcome};

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
    // The control channel, kept through the jail as the report is.
    // SAFETY: fcntl on a descriptor number; failure is checked.
    if unsafe { libc::fcntl(CONTROL_FD, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        eprintln!("kiln: sandbox-vm is started by kiln's sandbox API (no descriptor 4)");
        return STATUS_KILN_ERROR;
    }
    // SAFETY: descriptor 4 is open (fcntl succeeded) and nothing else owns it.
    let control = unsafe { UnixStream::from_raw_fd(CONTROL_FD) };
    // Not in the embedder's session: a terminal's Ctrl-C is the embedder's
    // to handle; it stops this VM through the lifeline.
    // SAFETY: setsid has no preconditions (it fails harmlessly for a leader).
    unsafe { libc::setsid() };
    let result = read_spec().and_then(|spec| {
        super::init_logging(spec.config.verbose);
        run_vm(spec, &control, started)
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

fn run_vm(
    spec: VmProcessSpec,
    control: &UnixStream,
    started: Instant,
) -> Result<VmOutcome, String> {
    let mut config = spec.config;
    // The sandbox's view: a snapshot saves its host-side paths, not the jail's.
    let host_side = config.clone();
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
    // This thread also saves the VM when the sandbox asks: its filter allows that.
    if let Err(e) = seccomp::install(ThreadKind::SandboxVm, mode) {
        drop(gate); // the VM ends without running the guest
        return Err(e.to_string());
    }
    gate.open();
    // Until the VM ends or the lifeline does, serving the sandbox's requests.
    let mut fds = [
        io::stdin().as_raw_fd(),
        vm.finished_fd().as_raw_fd(),
        control.as_raw_fd(),
    ]
    .map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: a valid array of three pollfds; the descriptors stay open
        // (a negative one is skipped).
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
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
        if fds[2].revents != 0 && !serve_request(&vm, control, &host_side) {
            fds[2].fd = -1; // the sandbox closed it: the lifeline tells the rest
        }
    }
    vm.wait()
        .map(|report| report.outcome)
        .map_err(|e| e.to_string())
}

/// Serves one request of the control channel and answers it; false once
/// the channel has ended. A request that cannot be read or decoded is
/// answered with why.
fn serve_request(vm: &VmHandle, control: &UnixStream, host_side: &VmConfig) -> bool {
    let reply = match read_request(control) {
        Ok(None) => return false,
        Ok(Some((ControlRequest::Snapshot { shown }, dir))) => snapshot(vm, dir, shown, host_side),
        Ok(Some((ControlRequest::Pause, _))) => done(vm.pause()),
        Ok(Some((ControlRequest::Resume, _))) => done(vm.resume()),
        Err(message) => ControlReply::Failed(format!("sandbox-vm: {message}")),
    };
    let mut line = serde_json::to_vec(&reply).unwrap_or_default();
    line.push(b'\n');
    // A sandbox that has gone no longer needs the answer.
    let _ = (&*control).write_all(&line);
    true
}

/// The answer to a pause or a resume.
fn done(result: crate::Result<()>) -> ControlReply {
    match result {
        Ok(()) => ControlReply::Done,
        Err(e) => ControlReply::Failed(e.to_string()),
    }
}

/// Saves the VM into the directory `dir` (named `shown` in messages) and
/// lets it run on.
fn snapshot(
    vm: &VmHandle,
    dir: Option<OwnedFd>,
    shown: PathBuf,
    host_side: &VmConfig,
) -> ControlReply {
    let Some(dir) = dir else {
        return ControlReply::Failed("sandbox-vm: a snapshot request without its directory".into());
    };
    let saved = SnapshotDir::from_fd(dir, shown)
        .and_then(|dir| crate::snapshot::save_live(vm, &dir, Some(host_side)));
    match saved {
        Ok(report) => ControlReply::Saved(report),
        Err(e) => ControlReply::Failed(e.to_string()),
    }
}

/// One request line and the descriptor that came with it; `None` when the
/// channel has ended. At most [`CONTROL_LINE_MAX`] bytes are read.
fn read_request(control: &UnixStream) -> Result<Option<(ControlRequest, Option<OwnedFd>)>, String> {
    let mut line = Vec::new();
    let mut dir = None;
    let mut byte = [0u8; 1];
    // A byte at a time: nothing past the line is taken (the next request's
    // descriptor comes with its own first byte).
    loop {
        let (n, fd) = match control.recv_with_fd(&mut byte) {
            Ok(got) => got,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) if line.is_empty() => {
                log::warn!("sandbox-vm: the control channel failed: {e}");
                return Ok(None);
            }
            Err(e) => return Err(format!("reading a request: {e}")),
        };
        if let Some(fd) = fd {
            dir.get_or_insert(OwnedFd::from(fd));
        }
        match n {
            0 if line.is_empty() => return Ok(None),
            0 => return Err("a request cut short".into()),
            _ if byte[0] == b'\n' => break,
            _ if line.len() < CONTROL_LINE_MAX => line.push(byte[0]),
            _ => return Err("a request too long".into()),
        }
    }
    serde_json::from_slice(&line)
        .map(|request| Some((request, dir)))
        .map_err(|e| format!("a bad request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The VM process reads each request whole with its descriptor, tells
    /// a malformed one by its message (no panic), and sees the end.
    #[test]
    fn control_requests_are_read_whole_or_refused() {
        let (sandbox, child) = UnixStream::pair().unwrap();
        let request = |line: &[u8], fd: Option<i32>| match fd {
            Some(fd) => assert_eq!(sandbox.send_with_fd(line, fd).unwrap(), line.len()),
            None => (&sandbox).write_all(line).unwrap(),
        };
        let dir = File::open("/").unwrap();
        request(
            b"{\"Snapshot\":{\"shown\":\"/x/snap\"}}\n",
            Some(dir.as_raw_fd()),
        );
        match read_request(&child) {
            Ok(Some((ControlRequest::Snapshot { shown }, Some(_)))) => {
                assert_eq!(shown, PathBuf::from("/x/snap"))
            }
            other => panic!("{other:?}"),
        }
        request(b"{\"Snapshot\":{\"shown\":\"/y\"}}\n", None);
        assert!(matches!(read_request(&child), Ok(Some((_, None)))));
        request(b"\x00garbage\n", None);
        let e = read_request(&child).unwrap_err();
        assert!(e.contains("a bad request"), "{e}");
        request(
            &[vec![b'x'; CONTROL_LINE_MAX + 1], vec![b'\n']].concat(),
            None,
        );
        let e = read_request(&child).unwrap_err();
        assert!(e.contains("too long"), "{e}");
        drop(sandbox);
        // The rest of the long line, then the end.
        while let Ok(Some(_)) | Err(_) = read_request(&child) {}
        assert!(matches!(read_request(&child), Ok(None)));
    }
}
