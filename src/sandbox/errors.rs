//! Errors of the sandbox API.

use std::time::Duration;

use kiln_init::protocol::ProtocolError;
use kiln_init::spec::SpecError;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox configuration: {0}")]
    Config(String),
    #[error("cannot start the VM: {0}")]
    Vm(#[from] crate::Error),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the VM ended before its guest agent connected: {outcome}{}",
        tail(console)
    )]
    BootFailed {
        outcome: crate::VmOutcome,
        console: String,
        /// The raw console bytes kept (the last 64 KiB).
        output: Vec<u8>,
    },
    #[error("the guest agent did not connect within {timeout:?}{}", tail(console))]
    BootTimeout { timeout: Duration, console: String },
    #[error("the guest agent speaks protocol version {0}, this kiln speaks {1}")]
    Version(u32, u32),
    #[error("protocol error from the guest agent: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("connection to the guest agent lost: {reason}{}", tail(console))]
    Disconnected { reason: String, console: String },
    #[error("command '{command}' timed out after {timeout:?}; its process group was killed")]
    Timeout { command: String, timeout: Duration },
    #[error("command '{command}' wrote more than {limit} bytes of output; it was killed")]
    OutputLimit { command: String, limit: usize },
    #[error("invalid command: {0}")]
    Command(#[from] SpecError),
    #[error("the sandbox has been shut down")]
    ShutDown,
}

fn tail(console: &str) -> String {
    match console.trim() {
        "" => String::new(),
        t => format!("\n--- guest console (last lines) ---\n{t}"),
    }
}

pub type Result<T> = std::result::Result<T, SandboxError>;

impl SandboxError {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> SandboxError {
        move |source| SandboxError::Io { what, source }
    }
}
