//! Errors of the sandbox API.
//!
//! A command's own failure is not an error: it has an exit status (127 when
//! it is not found, 126 when it cannot be executed, as a shell reports it;
//! 125 when the agent refused it).
//! A [`SandboxError`] means the sandbox could not do what was asked; when
//! the VM died, the error carries its outcome or the tail of the guest
//! console.

use std::time::Duration;

use kiln_init::protocol::ProtocolError;
use kiln_init::spec::SpecError;

/// Why a sandbox call failed. Messages are one line, except that errors of
/// a dead VM append the last lines of the guest console.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The builder's configuration cannot make a sandbox: no kernel, or a
    /// [`VmConfig`](crate::VmConfig) that brings its own vsock device or
    /// agent port (the sandbox adds its own).
    #[error("sandbox configuration: {0}")]
    Config(String),
    /// kiln could not build or run the VM (see [`crate::Error`]): a bad
    /// option, an unreadable kernel or root, no `/dev/kvm`, ...
    #[error("cannot start the VM: {0}")]
    Vm(#[from] crate::Error),
    /// A host call failed: the sandbox's private directory, the agent's
    /// socket, a thread.
    #[error("{what}: {source}")]
    Io {
        /// What the sandbox was doing.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The VM ended before kiln's guest agent connected: the kernel
    /// panicked, the root has no usable init, the VM timeout expired, or
    /// the VM was stopped through the stopper `on_vm_started` handed out.
    #[error(
        "the VM ended before its guest agent connected: {outcome}{}",
        tail(console)
    )]
    BootFailed {
        /// How the VM ended.
        outcome: crate::VmOutcome,
        /// The last lines of the guest console (kernel messages).
        console: String,
        /// The raw console bytes kept (the last 64 KiB).
        output: Vec<u8>,
    },
    /// The agent did not connect within the boot timeout
    /// ([`SandboxBuilder::boot_timeout`](super::SandboxBuilder::boot_timeout));
    /// the VM was stopped.
    #[error("the guest agent did not connect within {timeout:?}{}", tail(console))]
    BootTimeout {
        /// The limit that expired.
        timeout: Duration,
        /// The last lines of the guest console.
        console: String,
    },
    /// The agent in the guest speaks another protocol version (the first
    /// number) than this kiln (the second): an initramfs built by another
    /// kiln.
    #[error("the guest agent speaks protocol version {0}, this kiln speaks {1}")]
    Version(u32, u32),
    /// The agent sent a frame that breaks the protocol (hostile or broken
    /// guest), or a message for it cannot be encoded.
    #[error("protocol error from the guest agent: {0}")]
    Protocol(#[from] ProtocolError),
    /// The connection to the agent is gone, mostly because the VM ended
    /// (its timeout, a panic, a shutdown); every later call fails the same
    /// way.
    #[error("connection to the guest agent lost: {reason}{}", tail(console))]
    Disconnected {
        /// What ended the connection.
        reason: String,
        /// The last lines of the guest console.
        console: String,
    },
    /// The command ran past its [`Command::timeout`](super::Command::timeout);
    /// its process group was killed.
    #[error("command '{command}' timed out after {timeout:?}; its process group was killed")]
    Timeout {
        /// The program.
        command: String,
        /// Its timeout.
        timeout: Duration,
    },
    /// `exec` collected more stdout plus stderr than its output limit
    /// ([`Command::output_limit`](super::Command::output_limit)); the
    /// command was killed.
    #[error("command '{command}' wrote more than {limit} bytes of output; it was killed")]
    OutputLimit {
        /// The program.
        command: String,
        /// The limit in bytes.
        limit: usize,
    },
    /// The command cannot be sent to the agent: a NUL byte in an argument,
    /// variable or directory, a variable name that is empty or holds `=`,
    /// an empty working directory.
    #[error("invalid command: {0}")]
    Command(#[from] SpecError),
    /// A terminal that cannot be had: a window size of 0 rows or columns
    /// ([`Command::tty`](super::Command::tty),
    /// [`Process::resize`](super::Process::resize)), or a resize of a
    /// command that does not run on a terminal.
    #[error("terminal: {0}")]
    Terminal(String),
}

fn tail(console: &str) -> String {
    match console.trim() {
        "" => String::new(),
        t => format!("\n--- guest console (last lines) ---\n{t}"),
    }
}

/// `Result` with a [`SandboxError`].
pub type Result<T> = std::result::Result<T, SandboxError>;

impl SandboxError {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> SandboxError {
        move |source| SandboxError::Io { what, source }
    }
}
