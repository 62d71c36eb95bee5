//! A command running in the sandbox and its stdio handles.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_init::protocol::{ExitReason, Msg, WindowSize, MAX_DATA, OUTPUT_WINDOW};

use super::command::{Command, StdinMode};
use super::{End, ExitStatus, Output, Result, SandboxError, Shared, State, HOST_TIMEOUT_SLACK};

/// Credit is returned in batches of this size, not per read: each frame to
/// the agent costs the guest kernel a receive and a credit update of its
/// own, and a command that printed a line needs none. The agent stalls
/// only with a whole window unacknowledged, which by then is read and
/// credited (the window is 8 batches).
const CREDIT_BATCH: usize = 32 << 10;
const _: () = assert!(CREDIT_BATCH < OUTPUT_WINDOW as usize);
/// How long a killed command may take to report its end.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// A running command. Dropping it kills the command's process group.
pub struct Process {
    shared: Arc<Shared>,
    id: u32,
    name: String,
    /// It runs on a terminal (`Command::tty`).
    terminal: bool,
    timeout: Option<Duration>,
    started: Instant,
    stdin: Option<ProcessStdin>,
    stdout: Option<ProcessStdout>,
    stderr: Option<ProcessStderr>,
    pub(crate) feeder: Option<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Process {
    pub(crate) fn new(shared: Arc<Shared>, id: u32, cmd: &Command) -> Self {
        let reader = |stream| OutputReader {
            shared: shared.clone(),
            id,
            stream,
            uncredited: 0,
        };
        let stdin = match cmd.stdin {
            StdinMode::Null => None,
            _ => Some(ProcessStdin {
                shared: shared.clone(),
                id,
                closed: false,
            }),
        };
        Self {
            id,
            name: cmd.name(),
            terminal: cmd.terminal.is_some(),
            timeout: cmd.timeout,
            started: Instant::now(),
            stdin,
            stdout: Some(ProcessStdout(reader(0))),
            stderr: Some(ProcessStderr(reader(1))),
            feeder: None,
            status: None,
            shared,
        }
    }

    /// The command's stdin (once; `None` unless `Command::stdin_piped`).
    /// Dropping it sends end of file.
    pub fn stdin(&mut self) -> Option<ProcessStdin> {
        self.stdin.take()
    }

    /// The command's stdout (once). Unread output holds the command back
    /// once the flow-control window is full; dropping the handle discards
    /// the rest.
    pub fn stdout(&mut self) -> Option<ProcessStdout> {
        self.stdout.take()
    }

    /// The command's stderr (once); as `stdout`.
    pub fn stderr(&mut self) -> Option<ProcessStderr> {
        self.stderr.take()
    }

    /// Sends `signal` to the command's process group. Fails with
    /// [`SandboxError::Disconnected`] when the VM is gone; a command that
    /// has already ended is not an error.
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.shared.signal(self.id, signal)
    }

    /// Sets the size of the command's terminal (see `Command::tty`) to
    /// `rows` lines and `cols` columns; the kernel sends its foreground
    /// process group SIGWINCH. Fails with [`SandboxError::Terminal`] for a
    /// command without a terminal or a size of 0, and with
    /// [`SandboxError::Disconnected`] when the VM is gone; a command that
    /// has already ended is not an error.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        self.handle().resize(rows, cols)
    }

    /// A handle that signals or resizes this command from another thread
    /// while this one waits for it (the OCI runtime's container monitor:
    /// `kill` arrives while its waiter is in [`wait`](Self::wait); `kiln run
    /// -t` and the OCI terminal follow the host terminal's size).
    pub(crate) fn handle(&self) -> ProcessHandle {
        ProcessHandle {
            shared: self.shared.clone(),
            id: self.id,
            name: self.name.clone(),
            terminal: self.terminal,
        }
    }

    /// SIGKILL to the command's process group.
    pub fn kill(&self) -> Result<()> {
        self.signal(libc::SIGKILL)
    }

    /// Waits for the command to end. Closes its stdin if still held here
    /// and discards output whose handle was not taken. Fails with
    /// [`SandboxError::Timeout`] when its timeout expired and
    /// [`SandboxError::Disconnected`] when the VM is gone.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        self.stdin = None;
        self.stdout = None;
        self.stderr = None;
        let result = self.wait_end(|_| Ok(()));
        self.finish(result.as_ref().ok().copied());
        result
    }

    /// `exec`: reads both streams until the end, within `limit` bytes.
    pub(crate) fn collect(&mut self, limit: usize) -> Result<Output> {
        if self.feeder.is_none() {
            self.stdin = None;
        }
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let (id, shared, name) = (self.id, self.shared.clone(), self.name.clone());
        let mut uncredited = [0usize; 2];
        let result = self.wait_end(|st| {
            let e = st.execs.get_mut(&id).expect("present until finished");
            for (s, buf) in [&mut stdout, &mut stderr].into_iter().enumerate() {
                uncredited[s] += e.out[s].len();
                buf.extend(e.out[s].drain(..));
            }
            let over = stdout.len() + stderr.len() > limit;
            for (s, n) in uncredited.iter_mut().enumerate() {
                // Small frames, sent under the state lock (the reader
                // thread only writes for discarded streams, without it).
                // An ended command takes no more output: nothing is owed.
                if e.end.is_none() && (over || *n >= CREDIT_BATCH) {
                    shared.credit(id, s, std::mem::take(n));
                }
            }
            if over {
                e.discard = [true; 2];
                return Err(SandboxError::OutputLimit {
                    command: name.clone(),
                    limit,
                });
            }
            Ok(())
        });
        self.stdout = None;
        self.stderr = None;
        match result {
            Err(e @ SandboxError::OutputLimit { .. }) => {
                let _ = self.kill();
                let _ = self.wait_end(|_| Ok(()));
                self.finish(None);
                Err(e)
            }
            r => {
                self.finish(r.as_ref().ok().copied());
                r.map(|status| Output {
                    status,
                    stdout,
                    stderr,
                })
            }
        }
    }

    /// Waits for the end, calling `each` (under the state lock) whenever
    /// something changed; enforces the host-side timeout backstop.
    fn wait_end(&mut self, mut each: impl FnMut(&mut State) -> Result<()>) -> Result<ExitStatus> {
        let deadline = self.timeout.map(|t| self.started + t + HOST_TIMEOUT_SLACK);
        let mut killed_at: Option<Instant> = None;
        let mut st = self.shared.lock();
        loop {
            each(&mut st)?;
            let e = st.execs.get(&self.id).expect("present until finished");
            if let Some(End::Exited(status, reason)) = &e.end {
                if *reason == ExitReason::TimedOut || killed_at.is_some() && self.timeout.is_some()
                {
                    return Err(self.timeout_error());
                }
                return Ok(*status);
            }
            if st.dead.is_some() {
                return Err(self.shared.dead_error(&st));
            }
            let now = Instant::now();
            if let Some(k) = killed_at {
                if now >= k + KILL_GRACE {
                    return Err(self.timeout_error());
                }
            } else if deadline.is_some_and(|d| now >= d) {
                drop(st);
                let _ = self.kill();
                killed_at = Some(now);
                st = self.shared.lock();
                continue;
            }
            let wait = match (killed_at, deadline) {
                (Some(k), _) => k + KILL_GRACE - now,
                (None, Some(d)) => d - now,
                (None, None) => Duration::from_secs(3600),
            };
            st = self
                .shared
                .cond
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn timeout_error(&self) -> SandboxError {
        SandboxError::Timeout {
            command: self.name.clone(),
            timeout: self.timeout.unwrap_or_default(),
        }
    }

    /// Records the end, forgets the exec (when it has ended) and joins the
    /// stdin feeder.
    fn finish(&mut self, status: Option<ExitStatus>) {
        let mut st = self.shared.lock();
        let ended = st.execs.get(&self.id).is_none_or(|e| e.end.is_some());
        if ended {
            st.execs.remove(&self.id);
        } else {
            st.orphan(self.id);
        }
        drop(st);
        self.shared.cond.notify_all();
        if let Some(f) = self.feeder.take() {
            let _ = f.join();
        }
        if status.is_some() {
            self.status = status;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_none() {
            let running = self
                .shared
                .lock()
                .execs
                .get(&self.id)
                .is_some_and(|e| e.end.is_none());
            if running {
                let _ = self.kill();
            }
            self.stdin = None;
            self.stdout = None;
            self.stderr = None;
            self.finish(None);
        }
    }
}

/// Signals or resizes one command from another thread: see
/// [`Process::handle`].
#[derive(Clone)]
pub(crate) struct ProcessHandle {
    shared: Arc<Shared>,
    id: u32,
    name: String,
    terminal: bool,
}

impl ProcessHandle {
    /// As [`Process::signal`].
    pub(crate) fn signal(&self, signal: i32) -> Result<()> {
        self.shared.signal(self.id, signal)
    }

    /// As [`Process::resize`].
    pub(crate) fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        if !self.terminal {
            return Err(SandboxError::Terminal(format!(
                "{} does not run on a terminal (Command::tty)",
                self.name
            )));
        }
        super::check_window_size(rows, cols)?;
        let size = WindowSize { rows, cols };
        self.shared.send(&Msg::Resize { id: self.id, size })
    }
}

/// Writes to a command's stdin (flow-controlled). Drop sends end of file.
pub struct ProcessStdin {
    shared: Arc<Shared>,
    id: u32,
    closed: bool,
}

impl Write for ProcessStdin {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = {
            let mut st = self.shared.lock();
            loop {
                if st.dead.is_some() {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        self.shared.dead_error(&st),
                    ));
                }
                let Some(e) = st.execs.get_mut(&self.id) else {
                    return Err(io::ErrorKind::BrokenPipe.into());
                };
                if e.end.is_some() {
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
                if e.stdin_credit > 0 {
                    let n = buf.len().min(MAX_DATA).min(e.stdin_credit as usize);
                    e.stdin_credit -= n as u32;
                    break n;
                }
                st = self.shared.cond.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        let msg = Msg::Stdin {
            id: self.id,
            data: buf[..n].to_vec(),
        };
        self.shared
            .send(&msg)
            .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ProcessStdin {
    /// Sends end of file (as dropping does).
    pub fn close(mut self) {
        self.eof();
    }

    fn eof(&mut self) {
        if !self.closed {
            self.closed = true;
            let _ = self.shared.send(&Msg::StdinEof { id: self.id });
        }
    }
}

impl Drop for ProcessStdin {
    fn drop(&mut self) {
        self.eof();
    }
}

struct OutputReader {
    shared: Arc<Shared>,
    id: u32,
    stream: usize,
    uncredited: usize,
}

impl OutputReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut st = self.shared.lock();
        loop {
            let Some(e) = st.execs.get_mut(&self.id) else {
                return Ok(0);
            };
            let q = &mut e.out[self.stream];
            if !q.is_empty() {
                let n = q.len().min(buf.len());
                for (dst, src) in buf.iter_mut().zip(q.drain(..n)) {
                    *dst = src;
                }
                self.uncredited += n;
                drop(st);
                if self.uncredited >= CREDIT_BATCH {
                    self.shared.credit(self.id, self.stream, self.uncredited);
                    self.uncredited = 0;
                }
                return Ok(n);
            }
            if e.end.is_some() {
                return Ok(0);
            }
            if st.dead.is_some() {
                return Err(io::Error::other(self.shared.dead_error(&st)));
            }
            st = self.shared.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for OutputReader {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        let mut n = self.uncredited;
        // A command that has ended (or is forgotten) takes no more output.
        let mut running = false;
        if let Some(e) = st.execs.get_mut(&self.id) {
            e.discard[self.stream] = true;
            n += e.out[self.stream].len();
            // Freed, not only emptied: a dropped process can stay known
            // for as long as the agent does not report its end.
            e.out[self.stream] = VecDeque::new();
            running = e.end.is_none();
        }
        drop(st);
        if running {
            self.shared.credit(self.id, self.stream, n);
        }
    }
}

/// Reads a command's stdout.
pub struct ProcessStdout(OutputReader);
/// Reads a command's stderr.
pub struct ProcessStderr(OutputReader);

impl Read for ProcessStdout {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Read for ProcessStderr {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}
