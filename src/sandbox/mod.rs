//! kiln as a sandbox: boot one VM with kiln's guest agent, then run many
//! commands in it, concurrently, with their own stdin/stdout/stderr, status,
//! timeout and output limit.
//!
//! ```no_run
//! use kiln::sandbox::{Command, Sandbox};
//! let sandbox = Sandbox::builder()
//!     .kernel("vmlinux")
//!     .rootfs("rootfs")
//!     .memory(256 << 20)
//!     .build()?;
//! let out = sandbox.exec(Command::new("sh").arg("-c").arg("echo hi; exit 3"))?;
//! assert_eq!((out.status.code(), &out.stdout[..]), (Some(3), &b"hi\n"[..]));
//! sandbox.shutdown()?;
//! # Ok::<(), kiln::sandbox::SandboxError>(())
//! ```
//!
//! The host and the agent speak `kiln_init::protocol` over virtio-vsock: the
//! host listens on the Unix socket `<private dir>/vsock.sock_<port>` before
//! boot and the agent connects to it. One reader thread per sandbox
//! demultiplexes frames into per-command queues bounded by the protocol's
//! credit windows, so memory stays bounded whatever the commands print.

mod builder;
mod command;
mod errors;
mod process;
#[cfg(test)]
mod tests;
mod vm;
pub(crate) mod vm_process;

pub use builder::SandboxBuilder;
pub use command::Command;
pub use errors::{Result, SandboxError};
pub use kiln_init::spec::Resource;
pub(crate) use process::ProcessHandle;
pub use process::{Process, ProcessStderr, ProcessStdin, ProcessStdout};
pub use vm::Isolation;
pub use vm_process::KILN_BINARY_ENV;

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kiln_init::protocol::{
    self, Decoder, ExecOptions, ExitReason, Identity, Msg, Stream, MAX_EXECS, OUTPUT_WINDOW,
    STDIN_WINDOW,
};

use crate::config::SeccompMode;
use crate::seccomp::{self, ThreadKind};
use builder::{ConsoleRing, TempDir};
use command::StdinMode;
use vm::SandboxVm;

/// Default cap on what `exec` collects (stdout plus stderr).
pub const DEFAULT_OUTPUT_LIMIT: usize = 64 << 20;
/// How long the host waits past a command's own timeout (enforced by the
/// agent) before killing it itself.
const HOST_TIMEOUT_SLACK: Duration = Duration::from_secs(10);
/// How long `shutdown` lets the guest end by itself before stopping the VM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long one frame to the agent may take to go out. The agent reads its
/// connection all the time; one that has taken nothing for this long has
/// stopped (hung or hostile), and the connection is given up, so no call
/// that sends (exec, stdin, kill, credit, shutdown, drop) waits forever.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// True for exit code 0.
    pub fn success(&self) -> bool {
        *self == Self::Code(0)
    }
    /// The exit code, or `None` if a signal killed the command.
    pub fn code(&self) -> Option<i32> {
        match self {
            Self::Code(c) => Some(*c),
            Self::Signal(_) => None,
        }
    }
    /// The signal that killed the command, or `None` if it exited.
    pub fn signal(&self) -> Option<i32> {
        match self {
            Self::Signal(s) => Some(*s),
            Self::Code(_) => None,
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Code(c) => write!(f, "exit status {c}"),
            Self::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// What [`Sandbox::exec`] returns: a command that ran to its end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// How it ended: 127 (not found), 126 (cannot execute) or 125 (a bad
    /// working directory, too many commands at once) when it could not be
    /// started.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr (with kiln's reason when it could not
    /// be started).
    pub stderr: Vec<u8>,
}

#[derive(Debug)]
pub(crate) enum End {
    Exited(ExitStatus, ExitReason),
}

#[derive(Default)]
pub(crate) struct ExecState {
    pub(crate) out: [VecDeque<u8>; 2],
    /// Output of a stream nobody will read: dropped and credited at once.
    pub(crate) discard: [bool; 2],
    pub(crate) stdin_credit: u32,
    pub(crate) end: Option<End>,
    /// The `Process` is gone: forget the exec when it ends.
    pub(crate) orphaned: bool,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) execs: HashMap<u32, ExecState>,
    /// The orphaned execs, oldest first (see [`State::orphan`]).
    orphans: VecDeque<u32>,
    next_id: u32,
    /// Why the connection ended, once it has.
    pub(crate) dead: Option<String>,
}

impl State {
    /// Marks exec `id` orphaned: its `Process` is gone but the agent has
    /// not reported its end, so its entry waits for that report. An honest
    /// agent runs at most `MAX_EXECS` commands at once, so orphans past
    /// that many are commands it will never report (a hostile or broken
    /// agent): the oldest are forgotten, and the table stays bounded
    /// however many processes are dropped.
    pub(crate) fn orphan(&mut self, id: u32) {
        let Some(e) = self.execs.get_mut(&id) else {
            return;
        };
        e.orphaned = true;
        e.discard = [true; 2];
        let execs = &self.execs;
        self.orphans
            .retain(|o| execs.get(o).is_some_and(|e| e.orphaned));
        self.orphans.push_back(id);
        while self.orphans.len() > MAX_EXECS {
            if let Some(oldest) = self.orphans.pop_front() {
                self.execs.remove(&oldest);
            }
        }
    }
}

/// What the reader thread, the sandbox and every process share.
pub(crate) struct Shared {
    state: Mutex<State>,
    pub(crate) cond: Condvar,
    writer: Mutex<UnixStream>,
    /// Set when the agent stopped reading and the connection was shut
    /// down: the reader thread reports it as the end of the connection.
    send_failure: Mutex<Option<String>>,
    console: ConsoleRing,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn send(&self, msg: &Msg) -> Result<()> {
        let mut buf = Vec::new();
        msg.encode(&mut buf)?;
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let Err(e) = w.write_all(&buf) else {
            return Ok(());
        };
        // The frame may be cut short: nothing more can go out on this
        // connection. Shutting it down ends the reader thread, which marks
        // the sandbox dead (with this reason if the agent stopped reading)
        // and wakes every waiter.
        let stopped = matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        );
        let reason = match stopped {
            true => format!(
                "the guest agent stopped reading (a frame could not be sent in {SEND_TIMEOUT:?})"
            ),
            false => e.to_string(),
        };
        if stopped {
            let mut failure = self.send_failure.lock().unwrap_or_else(|e| e.into_inner());
            failure.get_or_insert_with(|| reason.clone());
        }
        let _ = w.shutdown(Shutdown::Both);
        Err(self.disconnected(reason))
    }

    /// The error for a lost connection (with the console tail).
    pub(crate) fn disconnected(&self, reason: String) -> SandboxError {
        SandboxError::Disconnected {
            reason,
            console: self.console.tail(),
        }
    }

    pub(crate) fn dead_error(&self, state: &State) -> SandboxError {
        self.disconnected(state.dead.clone().unwrap_or_default())
    }

    pub(crate) fn credit(&self, id: u32, stream: usize, bytes: usize) {
        if bytes > 0 {
            let stream = [Stream::Stdout, Stream::Stderr][stream];
            let bytes = bytes as u32;
            let _ = self.send(&Msg::Credit { id, stream, bytes });
        }
    }

    pub(crate) fn signal(&self, id: u32, signal: i32) -> Result<()> {
        self.send(&Msg::Signal { id, signal })
    }
}

/// A window size the agent takes: at least one row and one column.
pub(crate) fn check_window_size(rows: u16, cols: u16) -> Result<()> {
    match rows == 0 || cols == 0 {
        true => Err(SandboxError::Terminal(format!(
            "a window of {rows} rows and {cols} columns (each must be at least 1)"
        ))),
        false => Ok(()),
    }
}

/// A booted VM running kiln's guest agent. `Sync`: commands can be started
/// from several threads at once.
///
/// Besides the VM's own threads, a sandbox has one reader thread and a
/// private directory for the agent's socket (under `$TMPDIR`), both gone
/// when it is shut down or dropped. Dropping it is
/// [`shutdown`](Self::shutdown) without the outcome.
pub struct Sandbox {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    stream: UnixStream,
    vm: Mutex<Option<SandboxVm>>,
    output_limit: usize,
    /// The filters of the sandbox's own threads.
    seccomp: SeccompMode,
    _dir: Option<TempDir>,
}

impl Sandbox {
    /// A builder with kiln's defaults (256 MiB, one vCPU, no devices);
    /// set at least [`kernel`](SandboxBuilder::kernel), then
    /// [`build`](SandboxBuilder::build).
    pub fn builder() -> SandboxBuilder {
        SandboxBuilder::default()
    }

    /// A sandbox over an already connected agent stream (no VM): used with
    /// an agent run on the host, e.g. in tests. Waits up to `hello_timeout`
    /// for the agent's HELLO: fails with [`SandboxError::Disconnected`]
    /// without it, [`SandboxError::Version`] for another protocol version.
    /// Its threads run under their seccomp filters ([`SeccompMode::On`]).
    pub fn connect(stream: UnixStream, hello_timeout: Duration) -> Result<Self> {
        let console = ConsoleRing::new(None);
        let identity = Identity::default();
        Self::start(
            stream,
            hello_timeout,
            console,
            None,
            None,
            SeccompMode::On,
            identity,
        )
    }

    /// Greets the agent on `stream` and sends it `FRESH` with `identity`.
    pub(crate) fn start(
        stream: UnixStream,
        hello_timeout: Duration,
        console: ConsoleRing,
        vm: Option<SandboxVm>,
        dir: Option<TempDir>,
        seccomp: SeccompMode,
        identity: Identity,
    ) -> Result<Self> {
        let mut read = stream
            .try_clone()
            .map_err(SandboxError::io("cloning the socket"))?;
        read.set_read_timeout(Some(hello_timeout))
            .map_err(SandboxError::io("socket timeout"))?;
        let mut decoder = Decoder::new();
        let mut buf = [0u8; 64];
        let hello = loop {
            if let Some(m) = decoder.next_msg()? {
                break m;
            }
            let n = match read.read(&mut buf) {
                Ok(0) => {
                    return Err(SandboxError::Disconnected {
                        reason: "the agent closed the connection before HELLO".into(),
                        console: console.tail(),
                    })
                }
                Ok(n) => n,
                Err(e) => {
                    return Err(SandboxError::Disconnected {
                        reason: format!("waiting for the agent's HELLO: {e}"),
                        console: console.tail(),
                    })
                }
            };
            decoder.feed(&buf[..n]);
        };
        match hello {
            Msg::Hello { version } if version == protocol::VERSION => {}
            Msg::Hello { version } => {
                return Err(SandboxError::Version(version, protocol::VERSION))
            }
            other => {
                return Err(SandboxError::Disconnected {
                    reason: format!("expected HELLO from the agent, got {other:?}"),
                    console: console.tail(),
                })
            }
        }
        read.set_read_timeout(None)
            .map_err(SandboxError::io("socket timeout"))?;
        let mut writer = stream
            .try_clone()
            .map_err(SandboxError::io("cloning the socket"))?;
        writer
            .set_write_timeout(Some(SEND_TIMEOUT))
            .map_err(SandboxError::io("socket timeout"))?;
        // Before any command: this copy of the guest gets its own entropy,
        // today's time and its identity (see `fresh`).
        let mut frame = Vec::new();
        fresh(identity)?.encode(&mut frame)?;
        writer
            .write_all(&frame)
            .map_err(|e| SandboxError::Disconnected {
                reason: format!("sending the agent its entropy, clock and identity: {e}"),
                console: console.tail(),
            })?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
            writer: Mutex::new(writer),
            send_failure: Mutex::new(None),
            console,
        });
        let reader_shared = shared.clone();
        let reader = seccomp::spawn(
            "kiln-sandbox".into(),
            ThreadKind::SandboxHost,
            seccomp,
            move || reader_loop(read, decoder, &reader_shared),
        )
        .map_err(SandboxError::io("spawning the sandbox reader thread"))?;
        Ok(Self {
            shared,
            reader: Some(reader),
            stream,
            vm: Mutex::new(vm),
            output_limit: DEFAULT_OUTPUT_LIMIT,
            seccomp,
            _dir: dir,
        })
    }

    pub(crate) fn set_output_limit(&mut self, limit: usize) {
        self.output_limit = limit;
    }

    /// Stops the VM from any thread (for signal handling); None without a VM.
    pub fn stopper(&self) -> Option<crate::VmStopper> {
        let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        vm.as_ref().map(SandboxVm::stopper)
    }

    /// Pauses the guest: every vCPU parks after the exit it is in, so none
    /// of the guest's code runs (its commands included) until
    /// [`resume`](Self::resume); devices finish what they have taken.
    /// Host calls that need the guest (an exec, a command's output) wait
    /// meanwhile, and their timeouts keep counting; [`shutdown`](Self::shutdown),
    /// a [`stopper`](Self::stopper) and drop end a paused sandbox as any other. A snapshot of a paused
    /// sandbox leaves it paused. With either [`Isolation`].
    ///
    /// Fails with [`SandboxError::Vm`] holding
    /// [`crate::Error::Pause`]`(`[`crate::PauseError::AlreadyPaused`]`)`
    /// in this process, or the VM process's one-line message
    /// ([`crate::Error::VmProcess`]).
    pub fn pause(&self) -> Result<()> {
        self.pause_or_resume(false)
    }

    /// Lets a sandbox paused by [`pause`](Self::pause) run on; fails as
    /// `pause` does, with [`crate::PauseError::NotPaused`] when it is not
    /// paused.
    pub fn resume(&self) -> Result<()> {
        self.pause_or_resume(true)
    }

    fn pause_or_resume(&self, resume: bool) -> Result<()> {
        let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        let Some(vm) = vm.as_ref() else {
            return Err(SandboxError::Config(
                "this sandbox has no VM (Sandbox::connect)".into(),
            ));
        };
        Ok(vm.pause_or_resume(resume)?)
    }

    /// Saves this sandbox's VM into `dir` and lets it run on: every vCPU and
    /// the device loop pause, the VM's state and memory are written (`dir`
    /// is created, owner-only; a snapshot already there is refused), and
    /// the VM resumes. Commands running meanwhile only see a pause.
    /// Sandboxes started [`from_snapshot`](SandboxBuilder::from_snapshot)`(dir)`
    /// begin at this moment, without the commands that were running (their
    /// host side is not in the copy).
    ///
    /// With either [`Isolation`]. A VM in a process of its own gets `dir`
    /// opened (a descriptor, so its jail needs no view of the path) and
    /// writes the files as its jail's user when the sandbox runs as root
    /// (`dir` is handed to that user, as `kiln snapshot create` does).
    ///
    /// Fails with [`SandboxError::Vm`]: holding a
    /// [`crate::snapshot::SnapshotError`] when `dir` cannot be created or
    /// the VM in this process cannot be saved, or the VM process's one-line
    /// message ([`crate::Error::VmProcess`]) when it cannot save its VM or
    /// has ended. A failed save leaves no directory it created.
    pub fn snapshot(
        &self,
        dir: impl AsRef<std::path::Path>,
    ) -> Result<crate::snapshot::SaveReport> {
        let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        let Some(vm) = vm.as_ref() else {
            return Err(SandboxError::Config(
                "this sandbox has no VM (Sandbox::connect)".into(),
            ));
        };
        Ok(crate::snapshot::SnapshotDir::save_new(
            dir.as_ref(),
            |dir| vm.snapshot(dir),
        )?)
    }

    /// The last lines the guest printed on its console (kernel messages).
    pub fn console_tail(&self) -> String {
        self.shared.console.tail()
    }

    /// Starts `cmd`; its stdout and stderr must be read (or the handles
    /// dropped) for it to make progress past the flow-control windows
    /// (256 KiB per stream). Returns once the agent has the command, before
    /// it runs. Fails with [`SandboxError::Command`] for a command the agent
    /// cannot take and [`SandboxError::Disconnected`] when the VM is gone.
    pub fn spawn(&self, cmd: Command) -> Result<Process> {
        cmd.spec.validate()?;
        if let Some(size) = cmd.terminal {
            check_window_size(size.rows, size.cols)?;
        }
        let (id, stdin_bytes) = self.start_exec(&cmd)?;
        let mut process = Process::new(self.shared.clone(), id, &cmd);
        if let Some(bytes) = stdin_bytes {
            // Written by a helper thread so the caller can read meanwhile.
            let mut stdin = process.stdin().expect("piped");
            let feed = move || {
                let _ = stdin.write_all(&bytes);
            };
            process.feeder = Some(
                seccomp::spawn(
                    "kiln-stdin".into(),
                    ThreadKind::SandboxHost,
                    self.seccomp,
                    feed,
                )
                .map_err(SandboxError::io("spawning a stdin thread"))?,
            );
        }
        Ok(process)
    }

    /// Runs `cmd` to its end and collects its output (up to the output
    /// limit). A command that cannot be started is reported like a shell
    /// does: status 127 (not found) or 126, with the reason on stderr (125
    /// when the agent refused it: a bad working directory, too many
    /// commands at once).
    ///
    /// Fails as [`spawn`](Self::spawn) does, and with
    /// [`SandboxError::Timeout`] or [`SandboxError::OutputLimit`] when the
    /// command ran past its timeout or output limit (it was killed).
    pub fn exec(&self, cmd: Command) -> Result<Output> {
        let limit = cmd.output_limit.unwrap_or(self.output_limit);
        let mut process = self.spawn(cmd)?;
        process.collect(limit)
    }

    fn start_exec(&self, cmd: &Command) -> Result<(u32, Option<Vec<u8>>)> {
        let (stdin, bytes) = match &cmd.stdin {
            StdinMode::Null => (false, None),
            StdinMode::Bytes(b) => (true, Some(b.clone())),
            StdinMode::Piped => (true, None),
        };
        let id = {
            let mut st = self.shared.lock();
            if st.dead.is_some() {
                return Err(self.shared.dead_error(&st));
            }
            st.next_id = st.next_id.wrapping_add(1);
            let id = st.next_id;
            st.execs.insert(
                id,
                ExecState {
                    stdin_credit: STDIN_WINDOW,
                    ..ExecState::default()
                },
            );
            id
        };
        let opts = ExecOptions {
            stdin,
            timeout_ms: cmd.timeout.map_or(0, |t| t.as_millis().max(1) as u64),
            terminal: cmd.terminal,
        };
        let msg = Msg::Exec {
            id,
            opts,
            spec: cmd.spec.clone(),
        };
        if let Err(e) = self.shared.send(&msg) {
            self.shared.lock().execs.remove(&id);
            return Err(e);
        }
        Ok((id, bytes))
    }

    /// Ends the VM: asks the agent to shut down (it kills every command and
    /// reboots; a paused VM is resumed for it), stops the VM if it has not ended after a grace period
    /// (10 s), and joins every thread. Returns the VM's outcome when there
    /// is a VM (`None` for [`connect`](Self::connect)), or
    /// [`SandboxError::Vm`] if the VM failed.
    pub fn shutdown(mut self) -> Result<Option<crate::VmOutcome>> {
        self.close()
    }

    fn close(&mut self) -> Result<Option<crate::VmOutcome>> {
        let _ = self.shared.send(&Msg::Shutdown);
        let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut outcome = None;
        let mut result = Ok(());
        if let Some(vm) = vm {
            // A paused guest could not shut down: it runs on to do so.
            let _ = vm.pause_or_resume(true);
            vm.wait_finished(SHUTDOWN_GRACE);
            vm.stop();
            match vm.wait() {
                Ok(end) => outcome = Some(end),
                Err(e) => result = Err(SandboxError::Vm(e)),
            }
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        result.map(|()| outcome)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.reader.is_some() {
            let _ = self.close();
        }
    }
}

/// Marks the connection dead if the reader thread panics (a kiln bug), so
/// that no caller waits for frames nobody will read.
struct DeadOnPanic<'a>(&'a Shared);

impl Drop for DeadOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let reason = "the sandbox's reader thread panicked (a kiln bug)";
            self.0.lock().dead.get_or_insert_with(|| reason.into());
            self.0.cond.notify_all();
        }
    }
}

fn reader_loop(mut read: UnixStream, mut decoder: Decoder, shared: &Shared) {
    let _dead_on_panic = DeadOnPanic(shared);
    let mut buf = vec![0u8; 64 << 10];
    let reason = 'outer: loop {
        loop {
            match decoder.next_msg() {
                Ok(Some(msg)) => dispatch(shared, msg),
                Ok(None) => break,
                Err(e) => break 'outer format!("protocol error from the guest agent: {e}"),
            }
        }
        match read.read(&mut buf) {
            Ok(0) => break "the guest agent closed the connection (VM ended?)".to_string(),
            Ok(n) => decoder.feed(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break format!("reading from the guest agent: {e}"),
        }
    };
    let failure = shared
        .send_failure
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let reason = failure.clone().unwrap_or(reason);
    drop(failure);
    let mut st = shared.lock();
    st.dead = Some(reason);
    drop(st);
    shared.cond.notify_all();
}

fn dispatch(shared: &Shared, msg: Msg) {
    let mut st = shared.lock();
    let mut credit = None;
    match msg {
        Msg::Stdout { id, data } => push(&mut st, id, 0, data, &mut credit),
        Msg::Stderr { id, data } => push(&mut st, id, 1, data, &mut credit),
        Msg::StdinCredit { id, bytes } => {
            if let Some(e) = st.execs.get_mut(&id) {
                // An agent returns credit for bytes it was sent, so the
                // host never holds more than the window; a grant past it
                // (hostile or broken) would let the host send stdin
                // without flow control.
                e.stdin_credit = e.stdin_credit.saturating_add(bytes).min(STDIN_WINDOW);
            }
        }
        Msg::Exited { id, status, reason } => {
            let status = match status {
                protocol::ExitStatus::Code(c) => ExitStatus::Code(c),
                protocol::ExitStatus::Signal(s) => ExitStatus::Signal(s),
            };
            end(&mut st, id, End::Exited(status, reason));
        }
        Msg::ExecFailed { id, code, message } => {
            if let Some(e) = st.execs.get_mut(&id) {
                // As a shell reports it: the reason on stderr, 127 or 126.
                // Once, and within the output window: an agent repeating
                // it must not grow the host's memory.
                let line = format!("kiln: {message}\n");
                if e.end.is_none() && e.out[1].len() + line.len() <= OUTPUT_WINDOW as usize {
                    e.out[1].extend(line.as_bytes());
                }
            }
            end(
                &mut st,
                id,
                End::Exited(ExitStatus::Code(code), ExitReason::Normal),
            );
        }
        // Fault injection for tests: the reader thread panics.
        #[cfg(test)]
        Msg::Shutdown => panic!("fault injection: the sandbox reader panics"),
        // STARTED needs nothing; host-to-guest kinds from the guest are
        // ignored rather than trusted.
        _ => {}
    }
    drop(st);
    shared.cond.notify_all();
    if let Some((id, stream, n)) = credit {
        shared.credit(id, stream, n);
    }
}

fn push(
    st: &mut State,
    id: u32,
    stream: usize,
    data: Vec<u8>,
    credit: &mut Option<(u32, usize, usize)>,
) {
    let Some(e) = st.execs.get_mut(&id) else {
        return;
    };
    let window = OUTPUT_WINDOW as usize;
    let queue = &mut e.out[stream];
    if e.discard[stream] {
        *credit = Some((id, stream, data.len()));
    } else if queue.len() + data.len() <= window {
        // Grown by doubling, as `extend` would, but never past the window:
        // doubling alone can reach twice the window for some frame sizes.
        let want = (queue.capacity() * 2).clamp(queue.len() + data.len(), window);
        queue.reserve_exact(want - queue.len());
        queue.extend(data);
    }
    // Beyond the window: a misbehaving agent; the bytes are dropped.
}

fn end(st: &mut State, id: u32, end: End) {
    match st.execs.get_mut(&id) {
        Some(e) if e.orphaned => {
            st.execs.remove(&id);
        }
        Some(e) => e.end = Some(end),
        None => {}
    }
}

/// The `FRESH` frame: the host's wall clock and entropy from getrandom(2),
/// which the agent applies before any command runs (after a snapshot
/// restore, each copy's only source of its own random state), then
/// `identity`.
fn fresh(identity: Identity) -> Result<Msg> {
    let mut entropy = [0u8; protocol::FRESH_ENTROPY];
    kiln_init::identity::fill_random(&mut entropy)
        .map_err(SandboxError::io("reading entropy for the guest"))?;
    let realtime_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    Ok(Msg::Fresh {
        realtime_ns,
        entropy,
        identity,
    })
}
