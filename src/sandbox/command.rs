//! A command to run in the sandbox, built like `std::process::Command`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use kiln_init::protocol::WindowSize;
use kiln_init::spec::{ExecSpec, Resource, Rlimit};

/// What the command's stdin is.
#[derive(Clone, Debug, Default)]
pub(crate) enum StdinMode {
    /// Empty (/dev/null in the guest).
    #[default]
    Null,
    /// These bytes, then end of file.
    Bytes(Vec<u8>),
    /// Written through `Process::stdin()`.
    Piped,
}

/// A command for [`Sandbox::exec`](super::Sandbox::exec) or
/// [`Sandbox::spawn`](super::Sandbox::spawn): program, arguments,
/// environment, working directory, user and groups, resource limits, stdin,
/// terminal, timeout and output limit. Arguments and variables reach the guest byte for byte (no
/// shell).
#[derive(Clone, Debug)]
pub struct Command {
    pub(crate) spec: ExecSpec,
    pub(crate) stdin: StdinMode,
    pub(crate) terminal: Option<WindowSize>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) output_limit: Option<usize>,
}

impl From<&crate::config::GuestCommand> for Command {
    /// The command `kiln run` would give kiln's init (program, environment,
    /// working directory, user), with no stdin, timeout or output limit.
    fn from(command: &crate::config::GuestCommand) -> Self {
        Self {
            spec: command.to_exec_spec(),
            stdin: StdinMode::Null,
            terminal: None,
            timeout: None,
            output_limit: None,
        }
    }
}

impl Command {
    /// Runs `program` (searched in the guest's `PATH` unless it has a `/`)
    /// with an empty environment apart from a default `PATH`.
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            spec: ExecSpec::new([program.as_ref().as_bytes()]),
            stdin: StdinMode::Null,
            terminal: None,
            timeout: None,
            output_limit: None,
        }
    }

    /// Adds an argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.spec.argv.push(arg.as_ref().as_bytes().to_vec());
        self
    }

    /// Adds arguments, in order.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    /// Sets an environment variable (the last value given wins). The
    /// environment is otherwise empty, apart from a default `PATH`.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        let key = key.as_ref().as_bytes().to_vec();
        self.spec.env.retain(|(k, _)| *k != key);
        self.spec
            .env
            .push((key, value.as_ref().as_bytes().to_vec()));
        self
    }

    /// The working directory in the guest; one that is not a directory
    /// there makes the command fail to start (status 125, the reason on
    /// stderr).
    pub fn current_dir(mut self, dir: impl AsRef<OsStr>) -> Self {
        self.spec.cwd = Some(dir.as_ref().as_bytes().to_vec());
        self
    }

    /// Runs the command as this user id; `uid(0)` is guest root. Default:
    /// 65534 (`nobody`), which cannot reach kiln's agent or its control
    /// page (see README, Security model).
    pub fn uid(mut self, uid: u32) -> Self {
        self.spec.uid = Some(uid);
        self
    }

    /// Runs the command with this group id (default: the number given to
    /// `uid`, else 65534).
    pub fn gid(mut self, gid: u32) -> Self {
        self.spec.gid = Some(gid);
        self
    }

    /// Runs the command with these supplementary groups (as `docker run
    /// --group-add`), replacing any given before. Default: none (the
    /// agent's own are dropped when the command runs as another user).
    /// More than 65536 make the run fail with `SandboxError::Command`.
    pub fn groups(mut self, gids: impl IntoIterator<Item = u32>) -> Self {
        self.spec.groups = gids.into_iter().collect();
        self
    }

    /// Sets a resource limit of the command (setrlimit(2); `u64::MAX` is
    /// unlimited), replacing one given before for the same resource. It is
    /// set before the command's ids change, so a hard limit may be raised
    /// above the agent's. A soft limit above the hard one makes the run fail
    /// with `SandboxError::Command`; one the guest kernel refuses
    /// (e.g. `Nofile` above `fs.nr_open`) fails to start (status 126, the
    /// reason on stderr).
    pub fn rlimit(mut self, resource: Resource, soft: u64, hard: u64) -> Self {
        self.spec.rlimits.retain(|l| l.resource != resource);
        self.spec.rlimits.push(Rlimit {
            resource,
            soft,
            hard,
        });
        self
    }

    /// The command reads these bytes on its stdin, then end of file.
    pub fn stdin_bytes(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = StdinMode::Bytes(bytes.into());
        self
    }

    /// The command's stdin is written through `Process::stdin()` (spawn).
    pub fn stdin_piped(mut self) -> Self {
        self.stdin = StdinMode::Piped;
        self
    }

    /// Runs the command on a new pseudo-terminal in the guest, of `rows`
    /// lines and `cols` columns (as `docker run -t`): the terminal is its
    /// stdin, stdout, stderr and controlling terminal, in a session of its
    /// own. Everything it prints, stderr included, arrives on
    /// `Process::stdout()` as the terminal shows it (`\n` as `\r\n`;
    /// `stderr()` reads nothing); what `Process::stdin()` writes (with
    /// [`stdin_piped`](Self::stdin_piped) or
    /// [`stdin_bytes`](Self::stdin_bytes)) is typed into it, so the
    /// terminal echoes it and a Ctrl-C byte (`0x03`) sends SIGINT to the
    /// foreground process group. `Process::resize` changes the size
    /// later (the command gets SIGWINCH). `TERM` is `xterm` unless
    /// [`env`](Self::env) sets it. A size of 0 rows or columns makes
    /// `spawn` fail with `SandboxError::Terminal`.
    pub fn tty(mut self, rows: u16, cols: u16) -> Self {
        self.terminal = Some(WindowSize { rows, cols });
        if !self.spec.env.iter().any(|(k, _)| k == b"TERM") {
            self.spec.env.push((b"TERM".to_vec(), b"xterm".to_vec()));
        }
        self
    }

    /// Kill the command's process group after `timeout`; the run then
    /// fails with `SandboxError::Timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// For `exec`: the most stdout plus stderr bytes kept (default: the
    /// sandbox's limit, 64 MiB); more kills the command with
    /// `SandboxError::OutputLimit`.
    pub fn output_limit(mut self, bytes: usize) -> Self {
        self.output_limit = Some(bytes);
        self
    }

    /// The program name, for messages.
    pub(crate) fn name(&self) -> String {
        String::from_utf8_lossy(&self.spec.argv[0]).into_owned()
    }
}
