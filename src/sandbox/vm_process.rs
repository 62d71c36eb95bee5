//! A sandbox's VM in a kiln process of its own (`kiln sandbox-vm`), so that
//! a device model the guest takes over finds an empty jail, not the
//! embedding program's memory and files.
//!
//! The child gets one line on its stdin, the [`VmProcessSpec`] as JSON; it
//! then keeps stdin open as its lifeline: end of file (the sandbox stopped
//! it, or the embedding process died, whatever way) stops the VM. The guest
//! console comes on its stdout; when the VM has ended it writes one
//! [`VmProcessReport`] line to descriptor 3 and exits. Its stderr is the
//! embedder's (kiln's warnings). The agent's socket is the sandbox's, in its
//! private directory, as for a VM in the embedder's process.
//!
//! Descriptor 4 is the control channel, one end of a Unix socket pair: the
//! sandbox sends a [`ControlRequest`] line (a snapshot, with the open
//! directory to save into as the message's descriptor), the child answers
//! with one [`ControlReply`] line. The child's end closes when it exits, so
//! a sandbox waiting for an answer gets an error, not a hang.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::config::{Credentials, SeccompMode};
use crate::error::Error;
use crate::jail::JailConfig;
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::{SaveReport, SnapshotDir};
use crate::{VmConfig, VmOutcome, VmStopper};

/// How long a stopped VM process may take to end before it is killed.
const END_GRACE: Duration = Duration::from_secs(10);

/// The child's descriptor for its report.
pub(crate) const REPORT_FD: i32 = 3;

/// The child's descriptor for the control channel.
pub(crate) const CONTROL_FD: i32 = 4;

/// The longest line either side of the control channel reads (a request
/// or an answer is a few hundred bytes).
pub(crate) const CONTROL_LINE_MAX: usize = 64 << 10;

/// The name of the hidden `kiln` subcommand that runs a sandbox's VM.
pub(crate) const SUBCOMMAND: &str = "sandbox-vm";

/// The environment variable naming the `kiln` binary to run VMs with.
pub const KILN_BINARY_ENV: &str = "KILN_BINARY";

/// What the child runs: the sandbox's VM, jailed unless `jail` is `None`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct VmProcessSpec {
    pub config: VmConfig,
    pub jail: Option<JailConfig>,
}

/// How the child's VM ended.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum VmProcessReport {
    /// The VM ran and ended so.
    Ended(VmOutcome),
    /// The VM could not be built or run: kiln's one-line message.
    Failed(String),
}

/// What the sandbox asks of its VM process, one JSON line.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ControlRequest {
    /// Save the VM into the directory sent with this line (its descriptor)
    /// and let it run on; `shown` names the directory in messages.
    Snapshot { shown: PathBuf },
    /// Pause the VM's vCPUs ([`crate::VmHandle::pause`]).
    Pause,
    /// Let them run on ([`crate::VmHandle::resume`]).
    Resume,
}

/// The VM process's answer to a [`ControlRequest`], one JSON line.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ControlReply {
    Saved(SaveReport),
    /// Done (a pause or a resume).
    Done,
    /// kiln's one-line message.
    Failed(String),
}

/// The `kiln` binary a sandbox runs its VM with: `$KILN_BINARY`, else a
/// `kiln` next to the running program or one directory up (a test or an
/// example in cargo's target directory), else the first on `$PATH`.
pub(crate) fn find_kiln_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(KILN_BINARY_ENV) {
        return Some(PathBuf::from(path));
    }
    let exe = std::env::current_exe().ok();
    let beside = exe.iter().flat_map(|e| e.ancestors().skip(1).take(2));
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    beside
        .map(Path::to_path_buf)
        .chain(on_path)
        .map(|dir| dir.join("kiln"))
        .find(|candidate| candidate.is_file())
}

/// A running VM process and the ends of its pipes.
pub(crate) struct VmProcess {
    child: Mutex<Child>,
    lifeline: Arc<Mutex<Option<ChildStdin>>>,
    /// The read end of the report pipe: hangs up when the child has exited.
    report: File,
    /// The sandbox's end of the control channel (one request at a time).
    control: Mutex<UnixStream>,
    /// The ids the child's VM runs as (a jailed child started by root).
    owner: Option<Credentials>,
    console: Option<JoinHandle<()>>,
}

impl VmProcess {
    /// Starts `binary sandbox-vm` with `spec`; the guest console goes to
    /// `console` (from a thread under `seccomp`'s filter). `owner`: the ids
    /// the child's VM runs as, when it drops to others.
    pub(crate) fn spawn(
        binary: &Path,
        spec: &VmProcessSpec,
        mut console: Box<dyn Write + Send>,
        seccomp: SeccompMode,
        owner: Option<Credentials>,
    ) -> crate::Result<Self> {
        let line = serde_json::to_string(spec)
            .map_err(|e| Error::Config(format!("the sandbox's VM spec: {e}")))?;
        let (report_read, report_write) = pipe()?;
        let (control, child_control) =
            UnixStream::pair().map_err(Error::io("creating the sandbox's control socket"))?;
        let targets = [
            (report_write.as_raw_fd(), REPORT_FD),
            (child_control.as_raw_fd(), CONTROL_FD),
        ];
        let mut command = std::process::Command::new(binary);
        command
            .arg(SUBCOMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: fcntl and dup2 are async-signal-safe and touch only the
        // child's descriptor table: the report pipe's write end becomes its
        // descriptor 3 and the control socket's end its 4, open across exec
        // (and nothing else of ours is). Each is first copied above both
        // (close-on-exec), so that placing one cannot close the other.
        unsafe {
            command.pre_exec(move || {
                let mut copies = [0; 2];
                for (copy, (from, _)) in copies.iter_mut().zip(targets) {
                    *copy = libc::fcntl(from, libc::F_DUPFD_CLOEXEC, CONTROL_FD + 1);
                    if *copy < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                for (copy, (_, to)) in copies.into_iter().zip(targets) {
                    if libc::dup2(copy, to) != to {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| {
            Error::Config(format!(
                "cannot start the sandbox's VM process {}: {e}",
                binary.display()
            ))
        })?;
        // The child's ends are its own: its exit closes them.
        drop(report_write);
        drop(child_control);
        let mut stdin = child.stdin.take().expect("piped");
        let mut stdout = child.stdout.take().expect("piped");
        let sent = stdin
            .write_all(line.as_bytes())
            .and_then(|()| stdin.write_all(b"\n"));
        let copier = seccomp::spawn(
            "kiln-console".into(),
            ThreadKind::SandboxHost,
            seccomp,
            move || {
                let mut buf = vec![0u8; 16 << 10];
                while let Ok(n @ 1..) = stdout.read(&mut buf) {
                    let _ = console.write_all(&buf[..n]);
                }
            },
        );
        let console = match copier {
            Ok(thread) => Some(thread),
            Err(e) => {
                drop(stdin); // the child stops at once
                let _ = child.wait();
                return Err(Error::io("starting the sandbox's console thread")(e));
            }
        };
        // From here, dropping the process stops and reaps the child.
        let process = Self {
            child: Mutex::new(child),
            lifeline: Arc::new(Mutex::new(Some(stdin))),
            report: File::from(report_read),
            control: Mutex::new(control),
            owner,
            console,
        };
        sent.map_err(Error::io("sending the sandbox's VM its spec"))?;
        Ok(process)
    }

    /// Has the child save its VM into `dir` and let it run on: the
    /// directory goes over the control channel as a descriptor. Returns
    /// the child's report, its one-line error, or an error once the child
    /// has ended (its end of the channel is closed).
    pub(crate) fn snapshot(&self, dir: &SnapshotDir) -> crate::Result<SaveReport> {
        // The child writes as the ids its VM runs as.
        if let Some(ids) = self.owner {
            std::os::unix::fs::fchown(dir, Some(ids.uid), Some(ids.gid)).map_err(Error::io(
                "handing the snapshot directory to the jail's ids",
            ))?;
        }
        let request = ControlRequest::Snapshot {
            shown: dir.shown_path().to_owned(),
        };
        match self.call(&request, Some(dir.as_fd()), "saved the VM")? {
            ControlReply::Saved(report) => Ok(report),
            other => Err(Error::VmProcess(format!(
                "the sandbox's VM process answered the snapshot request with {other:?}"
            ))),
        }
    }

    /// Has the child pause its VM's vCPUs (`resume`: false) or let them run
    /// on (true).
    pub(crate) fn pause_or_resume(&self, resume: bool) -> crate::Result<()> {
        let (request, done) = match resume {
            false => (ControlRequest::Pause, "paused the VM"),
            true => (ControlRequest::Resume, "resumed the VM"),
        };
        match self.call(&request, None, done)? {
            ControlReply::Done => Ok(()),
            other => Err(Error::VmProcess(format!(
                "the sandbox's VM process answered {request:?} with {other:?}"
            ))),
        }
    }

    /// Sends `request` (with `fd`) and reads the answer: the child's
    /// one-line error is [`Error::VmProcess`], and so is its end before it
    /// answered (`done` says what it had not: "saved the VM").
    fn call(
        &self,
        request: &ControlRequest,
        fd: Option<BorrowedFd<'_>>,
        done: &str,
    ) -> crate::Result<ControlReply> {
        let mut line = serde_json::to_vec(request)
            .map_err(|e| Error::VmProcess(format!("the request {request:?}: {e}")))?;
        line.push(b'\n');
        let control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        // Whether it ended before or after taking the request, the same words.
        let ended = |why: String| {
            Error::VmProcess(format!(
                "the sandbox's VM process ended before it {done} ({why})"
            ))
        };
        let sent = match fd {
            Some(fd) => control
                .send_with_fd(&line[..], fd.as_raw_fd())
                .map_err(|e| ended(io::Error::from_raw_os_error(e.errno()).to_string()))?,
            None => 0,
        };
        // The rest of a line cut short (a descriptor goes with its start).
        (&*control)
            .write_all(&line[sent..])
            .map_err(|e| ended(e.to_string()))?;
        let answer = read_line(&control).map_err(|e| ended(e.to_string()))?;
        if answer.is_empty() {
            return Err(ended("its control channel closed".into()));
        }
        match serde_json::from_slice::<ControlReply>(&answer) {
            Ok(ControlReply::Failed(message)) => Err(Error::VmProcess(message)),
            Ok(reply) => Ok(reply),
            Err(e) => Err(Error::VmProcess(format!(
                "the sandbox's VM process answered {request:?} with no reply it knows: {e}"
            ))),
        }
    }

    /// Stops the VM (closes its lifeline); [`wait`](Self::wait) collects it.
    pub(crate) fn stop(&self) {
        cut(&self.lifeline);
    }

    pub(crate) fn stopper(&self) -> VmStopper {
        let lifeline = self.lifeline.clone();
        VmStopper::from_fn(move || cut(&lifeline))
    }

    /// Hangs up (POLLHUP) once the child has exited, or is readable once it
    /// has reported.
    pub(crate) fn finished_fd(&self) -> BorrowedFd<'_> {
        self.report.as_fd()
    }

    pub(crate) fn is_finished(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        matches!(child.try_wait(), Ok(Some(_)))
    }

    /// Waits for the child's end and returns how its VM ended. A child
    /// that neither reports nor exits within [`END_GRACE`] of its lifeline's
    /// end is killed: a VM process the guest took over cannot hold the
    /// sandbox's shutdown.
    pub(crate) fn wait(mut self) -> crate::Result<VmOutcome> {
        self.stop();
        let text = self.end();
        let status = {
            let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            child.wait()
        };
        if let Some(thread) = self.console.take() {
            let _ = thread.join();
        }
        match serde_json::from_str::<VmProcessReport>(text.trim()) {
            Ok(VmProcessReport::Ended(outcome)) => Ok(outcome),
            Ok(VmProcessReport::Failed(message)) => Err(Error::VmProcess(message)),
            Err(_) => Err(Error::VmProcess(format!(
                "the VM process ended without a report ({})",
                match status {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                }
            ))),
        }
    }

    /// Reads the report until the child closes it (it exits right after),
    /// and kills the child if that takes past [`END_GRACE`]. At most 64 KiB
    /// is kept: a report is one short line.
    fn end(&self) -> String {
        let deadline = Instant::now() + END_GRACE;
        let fd = self.report.as_raw_fd();
        // SAFETY: fcntl on a descriptor this process owns.
        unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        let ended = loop {
            match (&self.report).read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => {
                    let room = (64usize << 10).saturating_sub(text.len());
                    text.extend_from_slice(&buf[..n.min(room)]);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break false,
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break false;
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
        };
        if !ended {
            let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            log::warn!("sandbox: the VM process did not end when stopped; killing it");
            let _ = child.kill();
        }
        String::from_utf8_lossy(&text).into_owned()
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        self.stop();
        let running = {
            let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            matches!(child.try_wait(), Ok(None))
        };
        if running {
            // Stopped through its lifeline it ends at once (else it is
            // killed after END_GRACE); never a zombie.
            self.end();
            let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            let _ = child.wait();
        }
        if let Some(thread) = self.console.take() {
            let _ = thread.join();
        }
    }
}

/// One line from `stream`, without its newline: empty at once when the
/// stream has ended; at most [`CONTROL_LINE_MAX`] bytes are kept.
pub(crate) fn read_line(mut stream: &UnixStream) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(line),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let end = buf[..n].iter().position(|&b| b == b'\n');
        let room = CONTROL_LINE_MAX.saturating_sub(line.len());
        line.extend_from_slice(&buf[..end.unwrap_or(n).min(room)]);
        if end.is_some() {
            return Ok(line);
        }
    }
}

fn pipe() -> crate::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io("creating the sandbox's report pipe")(
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: pipe2 succeeded: both descriptors are open and owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Closes a VM process's lifeline (its stdin): the process stops its VM.
fn cut(lifeline: &Mutex<Option<ChildStdin>>) {
    lifeline.lock().unwrap_or_else(|e| e.into_inner()).take();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::tests::TempDir;
    use std::os::unix::fs::PermissionsExt;

    /// A VM process that is a shell script: it takes the spec, then runs `body`.
    fn fake_vm_process(dir: &Path, name: &str, body: &str) -> VmProcess {
        let script = dir.join(name);
        std::fs::write(&script, format!("#!/bin/sh\nread -r spec\n{body}\n")).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let spec = VmProcessSpec {
            config: VmConfig::new("vmlinux"),
            jail: None,
        };
        VmProcess::spawn(&script, &spec, Box::new(io::sink()), SeccompMode::Off, None).unwrap()
    }

    /// A snapshot asked of a VM process that has ended (or ends before it
    /// answers) fails with one line and leaves no directory: the ended
    /// process's end of the control channel is closed, so nothing waits.
    #[test]
    fn a_snapshot_of_an_ended_vm_process_fails_at_once() {
        let tmp = TempDir::new("vm-process-ended");
        let vm = fake_vm_process(&tmp.0, "ends", "exit 0");
        let snap = tmp.0.join("snap");
        let e = SnapshotDir::save_new(&snap, |dir| vm.snapshot(dir)).unwrap_err();
        let message = e.to_string();
        assert!(
            matches!(e, Error::VmProcess(_)) && message.contains("ended before it saved"),
            "{message}"
        );
        assert_eq!(message.lines().count(), 1, "{message}");
        assert!(!snap.exists(), "a failed save left {}", snap.display());
    }

    /// An answer that is not a report (a VM process the guest took over)
    /// is an error, not a panic or a wait.
    #[test]
    fn a_bad_answer_to_a_snapshot_is_an_error() {
        let tmp = TempDir::new("vm-process-garbage");
        // Answers nonsense, then lives on until its lifeline ends.
        let vm = fake_vm_process(
            &tmp.0,
            "garbage",
            "echo '{\"Saved\": 12}' >&4; read -r rest",
        );
        let e = SnapshotDir::save_new(&tmp.0.join("snap"), |dir| vm.snapshot(dir)).unwrap_err();
        assert!(e.to_string().contains("with no reply it knows"), "{e}");
        // A reply of another request's kind is refused as well.
        let vm_done = fake_vm_process(&tmp.0, "done", "echo '\"Done\"' >&4; read -r rest");
        let e =
            SnapshotDir::save_new(&tmp.0.join("snap"), |dir| vm_done.snapshot(dir)).unwrap_err();
        assert!(
            e.to_string().contains("the snapshot request with Done"),
            "{e}"
        );
        let vm_failed = fake_vm_process(
            &tmp.0,
            "failed",
            "echo '{\"Failed\": \"no room\"}' >&4; read -r rest",
        );
        let e =
            SnapshotDir::save_new(&tmp.0.join("snap"), |dir| vm_failed.snapshot(dir)).unwrap_err();
        assert!(matches!(&e, Error::VmProcess(m) if m == "no room"), "{e}");
    }
}
