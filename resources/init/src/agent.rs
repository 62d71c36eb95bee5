//! kiln's guest agent: serves the sandbox protocol (see `protocol`) on one
//! connection, running many commands at once.
//!
//! Agent mode is asked for by the initramfs: when `/kiln/agent` exists it
//! holds the host vsock port (decimal text) and kiln's init connects to
//! CID 2 (the host) at that port instead of running `/kiln/exec`.
//!
//! One thread, one poll(2) loop over the connection, every child's stdin,
//! stdout and stderr pipe and a pidfd per child (all non-blocking). Each
//! command runs in its own session (setsid), so its whole process group can
//! be signalled, and only ever writes to pipes the agent reads and frames:
//! nothing a command prints can forge a frame. When a command's main process
//! exits, the rest of its process group is killed, its pipes are drained and
//! `EXITED` follows its last output.
//!
//! A command run on a terminal (`ExecOptions::terminal`) has one output,
//! the terminal's master, framed as stdout; the host's stdin is written to
//! the master and `RESIZE` sets its window size. Its output ends when every
//! holder of the slave side has closed it (the master then reads EIO, the
//! normal end).
//!
//! [`serve`] works on any connected stream socket, so host tests drive it
//! over a Unix socket pair without a VM.

use crate::protocol::{
    encode_data, Decoder, ExecOptions, ExitReason, ExitStatus, Msg, ProtocolError, Stream,
    FRESH_ENTROPY, K_STDERR, K_STDOUT, MAX_DATA, MAX_EXECS, OUTPUT_WINDOW, STDIN_WINDOW, VERSION,
};
use crate::spawn::{Spawner, Stdio};
use crate::spec::ExecSpec;
use crate::{EXIT_CANNOT_EXECUTE, EXIT_INIT_FAILED, EXIT_NOT_FOUND};
use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

/// Where the initramfs asks for agent mode (content: the host vsock port).
pub const AGENT_PATH: &str = "/kiln/agent";
/// The host's vsock CID.
pub const HOST_CID: u32 = 2;
/// Outgoing bytes buffered before the agent stops reading child pipes.
const OUT_HIGH: usize = 256 << 10;
/// Poll period when a child's exit cannot be waited for with a pidfd.
const TICK: Duration = Duration::from_millis(50);
/// After a command exits and its group is killed, how long its pipes may
/// stay open (held by a process that left the group) before being closed.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// How the agent runs.
#[derive(Clone, Debug, Default)]
pub struct AgentConfig {
    /// Reap every child of the process (the agent is PID 1), not only the
    /// commands it started.
    pub reap_orphans: bool,
    /// The uid and gid of a command whose spec names none (`None`: the
    /// agent's own); see `ExecSpec::ids`.
    pub default_ids: Option<(u32, u32)>,
    /// Apply the host's `FRESH` (entropy into the guest's random pool, the
    /// wall clock, the identity): the guest agent does; a host test's
    /// agent, which may not touch its host's clock, only accepts the frame.
    pub apply_fresh: bool,
}

/// Why `serve` returned normally.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The host sent SHUTDOWN.
    Shutdown,
    /// The host closed the connection.
    HostClosed,
}

/// Why `serve` gave up on the connection (every command was still killed
/// and reaped).
#[derive(Debug)]
pub enum AgentError {
    /// Reading or writing the connection failed.
    Io(io::Error),
    /// The host sent a frame that breaks the protocol.
    Protocol(ProtocolError),
    /// The host broke the flow-control rules.
    Violation(&'static str),
    /// The host's entropy or clock could not be applied: no command may
    /// run with the random state or clock of another copy of this guest.
    Fresh(io::Error),
    /// The identity the host asked for (hostname, machine id, MACs) could
    /// not be taken: no command may run as another copy of this guest.
    Identity(String),
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "connection: {e}"),
            Self::Protocol(e) => write!(f, "protocol error: {e}"),
            Self::Violation(what) => write!(f, "protocol violation: {what}"),
            Self::Fresh(e) => write!(f, "cannot apply the host's entropy and clock: {e}"),
            Self::Identity(e) => write!(f, "cannot take the identity the host asked for: {e}"),
        }
    }
}

impl std::error::Error for AgentError {}

impl From<io::Error> for AgentError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

struct Exec {
    pid: libc::pid_t,
    pidfd: Option<OwnedFd>,
    stdin: Option<OwnedFd>,
    stdin_buf: VecDeque<u8>,
    stdin_eof: bool,
    /// Stdin bytes written (or dropped) and not yet credited back.
    stdin_done: u32,
    out: [Option<OwnedFd>; 2],
    credit: [u32; 2],
    status: Option<ExitStatus>,
    timed_out: bool,
    deadline: Option<Instant>,
    exited_at: Option<Instant>,
    /// The command runs on a terminal: `out[0]` is its master.
    terminal: bool,
}

impl Exec {
    fn kill_group(&self, sig: libc::c_int) {
        // SAFETY: plain syscall; the group id is our child's pid (setsid).
        unsafe { libc::kill(-self.pid, sig) };
    }
}

struct Agent {
    conn: OwnedFd,
    cfg: AgentConfig,
    decoder: Decoder,
    out: Vec<u8>,
    out_pos: usize,
    execs: HashMap<u32, Exec>,
    spawner: Spawner,
}

/// Serves the protocol on `conn` (a connected stream socket) until the host
/// sends SHUTDOWN or closes the connection. Every command still running when
/// it returns (by any path) is killed and reaped.
pub fn serve(conn: OwnedFd, cfg: AgentConfig) -> Result<Ended, AgentError> {
    set_nonblocking(conn.as_raw_fd())?;
    let mut agent = Agent {
        conn,
        cfg,
        decoder: Decoder::new(),
        out: Vec::new(),
        out_pos: 0,
        execs: HashMap::new(),
        spawner: Spawner::default(),
    };
    let result = agent.run();
    agent.kill_all();
    result
}

impl Agent {
    fn send(&mut self, msg: &Msg) {
        // Only the agent's own messages, which always encode.
        if let Err(e) = msg.encode(&mut self.out) {
            eprintln!("kiln-agent: cannot encode {msg:?}: {e}");
        }
    }

    fn run(&mut self) -> Result<Ended, AgentError> {
        self.send(&Msg::Hello { version: VERSION });
        loop {
            self.flush()?;
            let mut fds: Vec<libc::pollfd> = Vec::new();
            // (exec id, what) for each pollfd after the first.
            let mut owners: Vec<(u32, u8)> = Vec::new();
            let mut events = libc::POLLIN;
            if self.out_pos < self.out.len() {
                events |= libc::POLLOUT;
            }
            fds.push(pollfd(self.conn.as_raw_fd(), events));
            let room = self.out.len() - self.out_pos < OUT_HIGH;
            let now = Instant::now();
            let mut timeout: Option<Duration> = None;
            let mut wake = |d: Duration| timeout = Some(timeout.map_or(d, |t| t.min(d)));
            for (&id, e) in &self.execs {
                if let Some(fd) = &e.stdin {
                    if !e.stdin_buf.is_empty() {
                        fds.push(pollfd(fd.as_raw_fd(), libc::POLLOUT));
                        owners.push((id, 0));
                    }
                }
                for s in 0..2 {
                    if let Some(fd) = &e.out[s] {
                        if e.credit[s] > 0 && room {
                            fds.push(pollfd(fd.as_raw_fd(), libc::POLLIN));
                            owners.push((id, 1 + s as u8));
                        }
                    }
                }
                if e.status.is_none() {
                    match &e.pidfd {
                        Some(fd) => {
                            fds.push(pollfd(fd.as_raw_fd(), libc::POLLIN));
                            owners.push((id, 3));
                        }
                        None => wake(TICK),
                    }
                    if let Some(d) = e.deadline {
                        wake(d.saturating_duration_since(now));
                    }
                }
                if let Some(t) = e.exited_at {
                    wake((t + DRAIN_GRACE).saturating_duration_since(now));
                }
            }
            if self.cfg.reap_orphans {
                // Orphans have no pidfd; reap them now and then.
                wake(Duration::from_secs(1));
            }
            let ms = timeout.map_or(-1, |t| t.as_millis().min(60_000) as libc::c_int);
            // SAFETY: `fds` is a valid array of pollfd of the given length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e.into());
                }
                continue;
            }
            if fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                if let Some(ended) = self.read_conn()? {
                    return Ok(ended);
                }
            }
            for (pfd, &(id, what)) in fds[1..].iter().zip(&owners) {
                if pfd.revents == 0 {
                    continue;
                }
                match what {
                    0 => self.write_stdin(id),
                    1 | 2 => self.read_output(id, what as usize - 1),
                    _ => {}
                }
            }
            self.reap();
            self.check_deadlines();
            self.finish_execs();
        }
    }

    /// Writes buffered frames; returns when the socket would block.
    fn flush(&mut self) -> Result<(), AgentError> {
        while self.out_pos < self.out.len() {
            // SAFETY: the pointer and length describe initialized bytes of `out`.
            let n = unsafe {
                libc::send(
                    self.conn.as_raw_fd(),
                    self.out[self.out_pos..].as_ptr().cast(),
                    self.out.len() - self.out_pos,
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e.into()),
                }
            }
            self.out_pos += n as usize;
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        } else if self.out_pos > OUT_HIGH {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        Ok(())
    }

    fn read_conn(&mut self) -> Result<Option<Ended>, AgentError> {
        let mut buf = [0u8; 64 << 10];
        loop {
            match read_fd(self.conn.as_raw_fd(), &mut buf) {
                Ok(0) => {
                    return match self.decoder.finish() {
                        Ok(()) => Ok(Some(Ended::HostClosed)),
                        Err(e) => Err(AgentError::Protocol(e)),
                    }
                }
                Ok(n) => {
                    self.decoder.feed(&buf[..n]);
                    while let Some(msg) = self.decoder.next_msg().map_err(AgentError::Protocol)? {
                        if self.handle(msg)? {
                            return Ok(Some(Ended::Shutdown));
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Handles one host message; true for SHUTDOWN.
    fn handle(&mut self, msg: Msg) -> Result<bool, AgentError> {
        match msg {
            Msg::Exec { id, opts, spec } => self.start(id, &opts, &spec),
            Msg::Stdin { id, data } => {
                // Unknown ids: the exec has just ended; its input is moot.
                if let Some(e) = self.execs.get_mut(&id) {
                    if e.stdin_eof {
                        return Err(AgentError::Violation("stdin after STDIN_EOF"));
                    }
                    if e.stdin_buf.len() + data.len() > STDIN_WINDOW as usize {
                        return Err(AgentError::Violation("stdin beyond the credit window"));
                    }
                    if e.stdin.is_some() {
                        e.stdin_buf.extend(&data);
                    } else {
                        e.stdin_done += data.len() as u32;
                    }
                    if e.stdin.is_some() {
                        self.write_stdin(id);
                    }
                    self.send_stdin_credit(id);
                }
            }
            Msg::StdinEof { id } => {
                if let Some(e) = self.execs.get_mut(&id) {
                    e.stdin_eof = true;
                    if e.stdin_buf.is_empty() {
                        e.stdin = None;
                    }
                }
            }
            Msg::Resize { id, size } => {
                // A command without a terminal (or whose terminal is
                // drained) has no size to set: ignored, like a signal for
                // a command that has ended.
                if let Some(Exec {
                    terminal: true,
                    out: [Some(master), _],
                    ..
                }) = self.execs.get(&id)
                {
                    let winsize = libc::winsize {
                        ws_row: size.rows,
                        ws_col: size.cols,
                        ws_xpixel: 0,
                        ws_ypixel: 0,
                    };
                    // SAFETY: `winsize` is a valid struct the kernel only
                    // reads; the master is an fd the exec owns. The kernel
                    // sends the terminal's foreground group SIGWINCH.
                    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &winsize) };
                }
            }
            Msg::Signal { id, signal } => {
                if let Some(e) = self.execs.get(&id) {
                    if e.status.is_none() && (1..=64).contains(&signal) {
                        e.kill_group(signal);
                    }
                }
            }
            Msg::Credit { id, stream, bytes } => {
                if let Some(e) = self.execs.get_mut(&id) {
                    let s = match stream {
                        Stream::Stdout => 0,
                        Stream::Stderr => 1,
                    };
                    e.credit[s] = e.credit[s].saturating_add(bytes).min(OUTPUT_WINDOW);
                }
            }
            Msg::Shutdown => return Ok(true),
            Msg::Fresh {
                realtime_ns,
                entropy,
                identity,
            } => {
                if self.cfg.apply_fresh {
                    apply_fresh(realtime_ns, &entropy).map_err(AgentError::Fresh)?;
                    // After the reseed: a new machine id is drawn from it.
                    crate::identity::apply(&identity).map_err(AgentError::Identity)?;
                }
            }
            _ => {
                return Err(AgentError::Violation(
                    "a guest-to-host message from the host",
                ))
            }
        }
        Ok(false)
    }

    fn start(&mut self, id: u32, opts: &ExecOptions, spec: &ExecSpec) {
        let fail = |code: u32, message: String| Msg::ExecFailed {
            id,
            code: code as i32,
            message,
        };
        if self.execs.contains_key(&id) {
            let m = fail(EXIT_INIT_FAILED, format!("exec id {id} is already running"));
            return self.send(&m);
        }
        if self.execs.len() >= MAX_EXECS {
            let m = fail(
                EXIT_INIT_FAILED,
                format!("too many commands at once ({MAX_EXECS})"),
            );
            return self.send(&m);
        }
        let name = String::from_utf8_lossy(&spec.argv[0]).into_owned();
        if let Some(cwd) = &spec.cwd {
            let cwd_ok = std::fs::metadata(OsStr::from_bytes(cwd)).and_then(|m| match m.is_dir() {
                true => Ok(()),
                false => Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
            });
            if let Err(e) = cwd_ok {
                let cwd = String::from_utf8_lossy(cwd);
                let m = fail(EXIT_INIT_FAILED, format!("cd: {cwd}: {}", describe(&e)));
                return self.send(&m);
            }
        }
        let stdio = match opts.terminal {
            Some(size) => Stdio::Terminal(size),
            None => Stdio::Pipes { stdin: opts.stdin },
        };
        let child = match self.spawner.spawn(spec, self.cfg.default_ids, stdio) {
            Ok(c) => c,
            Err(e) => {
                let (code, what) = match e.raw_os_error() {
                    Some(libc::ENOENT | libc::ENOTDIR) => (EXIT_NOT_FOUND, "not found".into()),
                    _ => (EXIT_CANNOT_EXECUTE, describe(&e)),
                };
                return self.send(&fail(code, format!("{name}: {what}")));
            }
        };
        let pid = child.pid;
        let take = |fd: OwnedFd| {
            let _ = set_nonblocking(fd.as_raw_fd());
            fd
        };
        let stdout = take(child.stdout);
        let stdin = match (opts.terminal, opts.stdin) {
            // The host types into the terminal: its master, on an fd of its
            // own so that the end of stdin does not end the output.
            (Some(_), true) => match stdout.try_clone() {
                Ok(fd) => Some(fd),
                Err(e) => {
                    let m = fail(EXIT_INIT_FAILED, format!("{name}: {}", describe(&e)));
                    // SAFETY: plain syscalls on our own child: it is killed
                    // and reaped before anyone hears of it.
                    unsafe {
                        libc::kill(-pid, libc::SIGKILL);
                        libc::waitpid(pid, std::ptr::null_mut(), 0);
                    }
                    return self.send(&m);
                }
            },
            _ => child.stdin.map(take),
        };
        let stdout = Some(stdout);
        let stderr = child.stderr.map(take);
        // SAFETY: plain syscall; on success it returns a new fd we own.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        // SAFETY: a fresh fd returned by pidfd_open, owned by no one else.
        let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) });
        let deadline =
            (opts.timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(opts.timeout_ms));
        self.execs.insert(
            id,
            Exec {
                pid,
                pidfd,
                stdin,
                stdin_buf: VecDeque::new(),
                stdin_eof: false,
                stdin_done: 0,
                out: [stdout, stderr],
                credit: [OUTPUT_WINDOW; 2],
                status: None,
                timed_out: false,
                deadline,
                exited_at: None,
                terminal: opts.terminal.is_some(),
            },
        );
        self.send(&Msg::Started {
            id,
            pid: pid as u32,
        });
    }

    fn write_stdin(&mut self, id: u32) {
        let Some(e) = self.execs.get_mut(&id) else {
            return;
        };
        while let Some(fd) = &e.stdin {
            let (a, _) = e.stdin_buf.as_slices();
            if a.is_empty() {
                break;
            }
            // SAFETY: the pointer and length describe initialized bytes.
            let n = unsafe { libc::write(fd.as_raw_fd(), a.as_ptr().cast(), a.len()) };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        // EPIPE: the command does not read; drop its input.
                        e.stdin_done += e.stdin_buf.len() as u32;
                        e.stdin_buf.clear();
                        e.stdin = None;
                        break;
                    }
                }
            }
            e.stdin_buf.drain(..n as usize);
            e.stdin_done += n as u32;
        }
        if e.stdin_eof && e.stdin_buf.is_empty() {
            e.stdin = None;
        }
        self.send_stdin_credit(id);
    }

    fn send_stdin_credit(&mut self, id: u32) {
        if let Some(e) = self.execs.get_mut(&id) {
            let bytes = std::mem::take(&mut e.stdin_done);
            if bytes > 0 {
                self.send(&Msg::StdinCredit { id, bytes });
            }
        }
    }

    fn read_output(&mut self, id: u32, s: usize) {
        let Some(e) = self.execs.get_mut(&id) else {
            return;
        };
        let Some(fd) = &e.out[s] else {
            return;
        };
        let mut buf = [0u8; MAX_DATA];
        let want = (e.credit[s] as usize).min(MAX_DATA);
        match read_fd(fd.as_raw_fd(), &mut buf[..want]) {
            Ok(0) => e.out[s] = None,
            Ok(n) => {
                e.credit[s] -= n as u32;
                let kind = if s == 0 { K_STDOUT } else { K_STDERR };
                encode_data(&mut self.out, kind, id, &buf[..n]);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => e.out[s] = None,
        }
    }

    fn reap(&mut self) {
        for e in self.execs.values_mut() {
            if e.status.is_some() {
                continue;
            }
            let mut st = 0;
            // SAFETY: `st` is a valid out pointer.
            if unsafe { libc::waitpid(e.pid, &mut st, libc::WNOHANG) } == e.pid {
                exited(e, st);
            }
        }
        if self.cfg.reap_orphans {
            loop {
                let mut st = 0;
                // SAFETY: `st` is a valid out pointer.
                let pid = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                if let Some(e) = self.execs.values_mut().find(|e| e.pid == pid) {
                    exited(e, st);
                }
            }
        }
    }

    fn check_deadlines(&mut self) {
        let now = Instant::now();
        for e in self.execs.values_mut() {
            if e.status.is_none() && e.deadline.is_some_and(|d| d <= now) {
                e.kill_group(libc::SIGKILL);
                e.timed_out = true;
                e.deadline = None;
            }
            // Pipes still open long after the group was killed are held by
            // a process that left it (setsid): stop waiting for them unless
            // the host is simply slow to take the output.
            if e.exited_at.is_some_and(|t| now >= t + DRAIN_GRACE) {
                for s in 0..2 {
                    if e.credit[s] > 0 {
                        e.out[s] = None;
                    }
                }
            }
        }
    }

    fn finish_execs(&mut self) {
        let done: Vec<u32> = self
            .execs
            .iter()
            .filter(|(_, e)| e.status.is_some() && e.out.iter().all(Option::is_none))
            .map(|(&id, _)| id)
            .collect();
        for id in done {
            let e = self.execs.remove(&id).expect("listed above");
            let reason = match e.timed_out {
                true => ExitReason::TimedOut,
                false => ExitReason::Normal,
            };
            let status = e.status.expect("filtered");
            self.send(&Msg::Exited { id, status, reason });
        }
    }

    fn kill_all(&mut self) {
        for (_, e) in self.execs.drain() {
            e.kill_group(libc::SIGKILL);
            if e.status.is_none() {
                let mut st = 0;
                // SAFETY: `st` is a valid out pointer; the child was killed.
                unsafe { libc::waitpid(e.pid, &mut st, 0) };
            }
        }
    }
}

fn exited(e: &mut Exec, st: libc::c_int) {
    e.status = Some(if libc::WIFSIGNALED(st) {
        ExitStatus::Signal(libc::WTERMSIG(st))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(st))
    });
    e.exited_at = Some(Instant::now());
    e.pidfd = None;
    // The rest of the command's session goes with it, so its pipes close.
    e.kill_group(libc::SIGKILL);
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length describe a writable buffer.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        n => Ok(n as usize),
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd the caller owns, with integer arguments.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    match ok {
        true => Ok(()),
        false => Err(io::Error::last_os_error()),
    }
}

/// strerror text, as a shell prints it.
fn describe(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// `RNDADDENTROPY` (`_IOW('R', 0x03, int[2])`): add bytes and credit them.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` (`_IO('R', 0x07)`): reseed the CRNG from the pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// `struct rand_pool_info` with its buffer.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; FRESH_ENTROPY],
}

/// Mixes `entropy` into the guest kernel's pool and reseeds its CRNG, so
/// that from here on this guest's random numbers differ from those of any
/// other copy of the same snapshot; then sets the wall clock, which stood
/// still while the snapshot waited. Needs CAP_SYS_ADMIN and CAP_SYS_TIME
/// (the agent is PID 1, root).
fn apply_fresh(realtime_ns: u64, entropy: &[u8; FRESH_ENTROPY]) -> io::Result<()> {
    let random = std::fs::File::open("/dev/urandom")?;
    let info = RandPoolInfo {
        entropy_count: (FRESH_ENTROPY * 8) as libc::c_int,
        buf_size: FRESH_ENTROPY as libc::c_int,
        buf: *entropy,
    };
    // SAFETY: `info` is a valid rand_pool_info whose buf_size bytes follow
    // the two ints; the kernel only reads it.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, &info) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: an ioctl without an argument on an open descriptor.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let now = libc::timespec {
        tv_sec: (realtime_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (realtime_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `now` is a valid timespec, only read.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &now) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `e` (from `serve`) is the vsock transport's reset: the guest was
/// restored from a snapshot and every connection from before is gone (the
/// kernel sets ECONNRESET on them; reads then fail with ENOTCONN). A host
/// that closes the connection gives end of file instead.
fn is_transport_reset(e: &AgentError) -> bool {
    let AgentError::Io(e) = e else {
        return false;
    };
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNRESET) | Some(libc::ENOTCONN)
    )
}

/// The port in `/kiln/agent`, if the initramfs asks for agent mode.
pub fn requested_port() -> Option<Result<u32, String>> {
    let text = std::fs::read_to_string(AGENT_PATH).ok()?;
    Some(
        text.trim()
            .parse()
            .map_err(|_| format!("{AGENT_PATH}: '{}' is not a port", text.trim())),
    )
}

/// Connects to the host over vsock, retrying for a few seconds (the host
/// listens before boot, but the device may still be settling).
pub fn connect_vsock(port: u32) -> io::Result<OwnedFd> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: plain socket syscall; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd owned by no one else.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain data; zeroed is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = HOST_CID;
        addr.svm_port = port;
        // SAFETY: `addr` is a valid sockaddr_vm and the length is its size.
        let rc = unsafe {
            libc::connect(
                fd,
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(sock);
        }
        let e = io::Error::last_os_error();
        if Instant::now() >= deadline {
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Agent mode as PID 1: connect to the host at `port`, serve until
/// SHUTDOWN, then end every process. Returns the exit report for init
/// (0 after an orderly shutdown), which then syncs and reboots.
///
/// When the vsock transport is reset (this guest was restored from a
/// snapshot by a new kiln), the agent connects again and serves the new
/// host, whose first frame (`FRESH`) gives this copy its own entropy and
/// clock; commands of before the snapshot were killed with the connection.
pub fn guest_main(port: u32) -> u32 {
    // SAFETY: setting a signal disposition; no handler code involved.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    // SAFETY: the pointer and length describe a static byte string.
    unsafe { libc::sethostname(c"kiln".as_ptr(), 4) };
    let config = AgentConfig {
        reap_orphans: true,
        default_ids: Some(crate::spec::DEFAULT_IDS),
        apply_fresh: true,
    };
    let code = loop {
        let conn = match connect_vsock(port) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("kiln-agent: cannot connect to the host (vsock port {port}): {e}");
                break EXIT_INIT_FAILED;
            }
        };
        match serve(conn, config.clone()) {
            Ok(_) => break 0,
            Err(e) if is_transport_reset(&e) => continue,
            Err(e) => {
                eprintln!("kiln-agent: {e}");
                break EXIT_INIT_FAILED;
            }
        }
    };
    // SAFETY: PID 1 signalling every other process; plain syscalls.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        while libc::waitpid(-1, std::ptr::null_mut(), 0) > 0 {}
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a reset connection (what a restored guest's kernel reports for
    /// every vsock socket of before) makes the guest agent connect again;
    /// anything else ends it as before.
    #[test]
    fn only_a_transport_reset_reconnects() {
        let os = |n| AgentError::Io(io::Error::from_raw_os_error(n));
        assert!(is_transport_reset(&os(libc::ECONNRESET)));
        assert!(is_transport_reset(&os(libc::ENOTCONN)));
        assert!(!is_transport_reset(&os(libc::EPIPE)));
        assert!(!is_transport_reset(&os(libc::EIO)));
        assert!(!is_transport_reset(&AgentError::Violation("x")));
        let fresh = AgentError::Fresh(io::Error::from_raw_os_error(libc::EPERM));
        assert!(!is_transport_reset(&fresh));
    }
}
