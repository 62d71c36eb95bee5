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

use serde::{Deserialize, Serialize};

use crate::config::SeccompMode;
use crate::error::Error;
use crate::jail::JailConfig;
use crate::seccomp::{self, ThreadKind};
use crate::{VmConfig, VmOutcome, VmStopper};

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
        self.lifeline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    pub(crate) fn stopper(&self) -> VmStopper {
        let lifeline = self.lifeline.clone();
        VmStopper::from_fn(move || {
            lifeline.lock().unwrap_or_else(|e| e.into_inner()).take();
        })
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

    /// Waits for the child's end and returns how its VM ended.
    pub(crate) fn wait(mut self) -> crate::Result<VmOutcome> {
        let mut text = String::new();
        // Bounded: a report is one short line; a child that writes more is
        // not a kiln.
        let _ = (&self.report).take(64 << 10).read_to_string(&mut text);
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
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        self.stop();
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(child.try_wait(), Ok(None)) {
            // Stopped through its lifeline: it ends at once; never a zombie.
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
