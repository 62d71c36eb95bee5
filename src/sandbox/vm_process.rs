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

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::SeccompMode;
use crate::error::Error;
use crate::jail::JailConfig;
use crate::seccomp::{self, ThreadKind};
use crate::{VmConfig, VmOutcome, VmStopper};

/// How long a stopped VM process may take to end before it is killed.
const END_GRACE: Duration = Duration::from_secs(10);

/// The child's descriptor for its report.
pub(crate) const REPORT_FD: i32 = 3;

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
    console: Option<JoinHandle<()>>,
}

impl VmProcess {
    /// Starts `binary sandbox-vm` with `spec`; the guest console goes to
    /// `console` (from a thread under `seccomp`'s filter).
    pub(crate) fn spawn(
        binary: &Path,
        spec: &VmProcessSpec,
        mut console: Box<dyn Write + Send>,
        seccomp: SeccompMode,
    ) -> crate::Result<Self> {
        let line = serde_json::to_string(spec)
            .map_err(|e| Error::Config(format!("the sandbox's VM spec: {e}")))?;
        let (report_read, report_write) = pipe()?;
        let target = report_write.as_raw_fd();
        let mut command = std::process::Command::new(binary);
        command
            .arg(SUBCOMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: dup2 and fcntl are async-signal-safe and touch only the
        // child's descriptor table: the report pipe's write end becomes its
        // descriptor 3, open across exec (and nothing else of ours is).
        unsafe {
            command.pre_exec(move || {
                let ok = match target {
                    REPORT_FD => libc::fcntl(REPORT_FD, libc::F_SETFD, 0) == 0,
                    _ => libc::dup2(target, REPORT_FD) == REPORT_FD,
                };
                match ok {
                    true => Ok(()),
                    false => Err(io::Error::last_os_error()),
                }
            });
        }
        let mut child = command.spawn().map_err(|e| {
            Error::Config(format!(
                "cannot start the sandbox's VM process {}: {e}",
                binary.display()
            ))
        })?;
        drop(report_write);
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
            console,
        };
        sent.map_err(Error::io("sending the sandbox's VM its spec"))?;
        Ok(process)
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
