//! `kiln-oci`'s command line: runc's, so that engines (podman, conmon,
//! containerd's runc shim) drive it as they drive runc. Options runc takes
//! that mean nothing for a VM are accepted and ignored.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The state directory when `--root` is not given (runc's is /run/runc).
pub const DEFAULT_ROOT: &str = "/run/kiln-oci";

/// kiln-oci: an OCI runtime that runs each container in a kiln micro-VM.
#[derive(Debug, Parser)]
#[command(name = "kiln-oci", version, about)]
pub struct OciCli {
    /// The options before the command.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// The command.
    #[command(subcommand)]
    pub command: OciCommand,
}

/// Options before the command, as runc takes them.
#[derive(Clone, Debug, Args)]
pub struct GlobalArgs {
    /// Where container state lives (default: `root` of the configuration
    /// file, else /run/kiln-oci).
    #[arg(long = "root", global = true)]
    pub root_arg: Option<PathBuf>,
    /// The state root in effect (resolved by `oci::main`).
    #[arg(skip)]
    pub root: PathBuf,
    /// Write errors (and with --debug, progress) to this file.
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// The format of --log.
    #[arg(long = "log-format", global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log progress too.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Accepted for runc compatibility (the VM has no host cgroup of its own yet).
    #[arg(long = "systemd-cgroup", global = true)]
    pub systemd_cgroup: bool,
    /// Accepted for runc compatibility.
    #[arg(long, global = true, num_args = 0..=1, default_missing_value = "true")]
    pub rootless: Option<String>,
    /// The guest kernel (podman: `--runtime-flag kernel=PATH`); default:
    /// `kernel` of the configuration file.
    #[arg(long, global = true)]
    pub kernel: Option<PathBuf>,
    /// The configuration file (default $KILN_OCI_CONFIG, else /etc/kiln/oci.toml).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `time="..." level=error msg="..."`, as runc writes.
    Text,
    /// One JSON object a line: `{"level":..,"msg":..,"time":..}`.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum OciCommand {
    /// Create a container: boot its VM and hold its command until `start`.
    Create(CreateArgs),
    /// Start the command of a created container.
    Start(IdArg),
    /// `create` then `start`; waits for the command unless --detach.
    Run(RunArgs),
    /// Print a container's OCI state (JSON).
    State(IdArg),
    /// Send a signal to a container's command.
    Kill(KillArgs),
    /// End a container's VM and remove its state.
    Delete(DeleteArgs),
    /// Run another command in a running container.
    Exec(ExecArgs),
    /// List the processes of a container (its monitor, on the host).
    Ps(PsArgs),
    /// List containers.
    List(ListArgs),
    /// Print what this runtime supports (JSON).
    Features,
    /// Not supported yet: a VM keeps the memory and vCPUs it was created with.
    Update(UnsupportedArgs),
    /// Pause a running container: its VM's vCPUs stop until `resume`.
    Pause(IdArg),
    /// Let a paused container run on.
    Resume(IdArg),
    /// Not supported: kiln's snapshots are `kiln snapshot`, not the OCI runtime's yet.
    Checkpoint(UnsupportedArgs),
    /// Not supported (see `checkpoint`).
    Restore(UnsupportedArgs),
    /// The container monitor (internal: started by `create`).
    #[command(hide = true)]
    Monitor(MonitorArgs),
}

/// The arguments of a runc command kiln-oci does not support: taken as
/// they come, so the answer is that one line rather than a usage error.
#[derive(Debug, Args)]
pub struct UnsupportedArgs {
    /// Whatever the engine passed.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub args: Vec<String>,
}

/// A container id.
#[derive(Debug, Args)]
pub struct IdArg {
    /// The container id.
    pub id: String,
}

/// `create`'s options.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The bundle directory (holds config.json).
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Write the pid of the container's monitor process here.
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    /// The Unix socket the terminal's master is sent to (process.terminal).
    #[arg(long = "console-socket")]
    pub console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility.
    #[arg(long = "no-pivot")]
    pub no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long = "no-new-keyring")]
    pub no_new_keyring: bool,
    /// Accepted for runc compatibility (no descriptors reach a VM).
    #[arg(long = "preserve-fds", default_value_t = 0)]
    pub preserve_fds: u32,
    /// Accepted for runc compatibility.
    #[arg(long = "pidfd-socket")]
    pub pidfd_socket: Option<PathBuf>,
    /// The container id.
    pub id: String,
}

/// `run`'s options: `create`'s, and --detach.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// `create`'s options.
    #[command(flatten)]
    pub create: CreateArgs,
    /// Return once the command started (else wait and exit with its status).
    #[arg(short, long)]
    pub detach: bool,
    /// Accepted for runc compatibility (the state is always kept until `delete` unless not detached).
    #[arg(long)]
    pub keep: bool,
}

/// `kill`'s options.
#[derive(Debug, Args)]
pub struct KillArgs {
    /// Signal every command of the container (the exec'd ones too).
    #[arg(short, long)]
    pub all: bool,
    /// The container id.
    pub id: String,
    /// The signal: a name (TERM, SIGTERM) or a number.
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

/// `delete`'s options.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Also delete a running container (its VM is ended).
    #[arg(short, long)]
    pub force: bool,
    /// The container id.
    pub id: String,
}

/// `exec`'s options.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The process to run (a JSON file: the `process` of config.json).
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// Return once the command started; its status is the exit status of
    /// the process written to --pid-file.
    #[arg(short, long)]
    pub detach: bool,
    /// Write the pid of the process that waits for the command here.
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    /// The Unix socket the terminal's master is sent to (with --tty).
    #[arg(long = "console-socket")]
    pub console_socket: Option<PathBuf>,
    /// Run the command on a terminal (its master goes to --console-socket).
    #[arg(short, long)]
    pub tty: bool,
    /// The working directory in the container.
    #[arg(long)]
    pub cwd: Option<String>,
    /// A variable for the command, KEY=VALUE (repeatable).
    #[arg(short, long)]
    pub env: Vec<String>,
    /// The user: `UID[:GID]`.
    #[arg(short, long)]
    pub user: Option<String>,
    /// Accepted for runc compatibility (supplementary groups are not applied yet).
    #[arg(short = 'g', long = "additional-gids")]
    pub additional_gids: Vec<String>,
    /// Accepted for runc compatibility.
    #[arg(long = "preserve-fds", default_value_t = 0)]
    pub preserve_fds: u32,
    /// Accepted for runc compatibility.
    #[arg(long = "process-label")]
    pub process_label: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub apparmor: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long = "no-new-privs")]
    pub no_new_privs: bool,
    /// Accepted for runc compatibility.
    #[arg(short, long)]
    pub cap: Vec<String>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub cgroup: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long = "ignore-paused")]
    pub ignore_paused: bool,
    /// Internal: the detached waiter's readiness pipe.
    #[arg(long = "ready-fd", hide = true)]
    pub ready_fd: Option<i32>,
    /// The container id.
    pub id: String,
    /// The command and its arguments (without --process).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// `ps`'s options.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// table or json.
    #[arg(short, long, default_value = "table")]
    pub format: String,
    /// The container id.
    pub id: String,
    /// Accepted for runc compatibility (ps options).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

/// `list`'s options.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// table or json.
    #[arg(short, long, default_value = "table")]
    pub format: String,
    /// Ids only.
    #[arg(short, long)]
    pub quiet: bool,
}

/// The monitor's options (internal).
#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// The write end of `create`'s readiness pipe.
    #[arg(long = "ready-fd")]
    pub ready_fd: i32,
    /// The container's terminal (the slave of the pty whose master went
    /// to the engine), when process.terminal is true.
    #[arg(long = "terminal-fd")]
    pub terminal_fd: Option<i32>,
    /// The container id.
    pub id: String,
}
