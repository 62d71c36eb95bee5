//! kiln: a KVM micro-VM monitor. It boots a real Linux guest in a fresh VM,
//! runs a command in it with kiln's own init and reports how it ended.
//!
//! The same code serves three uses:
//!
//! 1. **A VM from a [`VmConfig`]**: [`run`] boots it and returns when it has
//!    ended, [`spawn`] runs it on a thread of its own and returns a
//!    [`VmHandle`]. This is what `kiln run` does.
//! 2. **Integration tests that boot real kernels**, through either of the
//!    other two uses (kiln's own `tests/` do).
//! 3. **A sandbox**: [`sandbox::Sandbox`] boots one VM with kiln's guest
//!    agent and runs many commands in it, each with its own stdin, stdout,
//!    stderr, exit status, timeout and output limit.
//!
//! Every use needs Linux on x86-64, read-write access to `/dev/kvm` and a
//! guest kernel (an ELF `vmlinux` or a `bzImage`; `resources/setup.sh` builds
//! the recipe kernel into `target/guest/`).
//!
//! # Running a VM
//!
//! [`VmConfig`] is plain data (serde-serialisable); [`VmConfig::new`] gives
//! kiln's defaults (256 MiB, one vCPU, serial console, no devices). Without
//! the agent, kiln's init runs [`config::GuestCommand`] and the guest's
//! console carries its output:
//!
//! ```no_run
//! use std::time::{Duration, Instant};
//! use kiln::{ConsoleIo, VmConfig, VmOutcome};
//!
//! let mut config = VmConfig::new("target/guest/vmlinux");
//! config.rootfs = Some("target/guest/rootfs".into());
//! config.command.argv = vec!["sh".into(), "-c".into(), "echo hello; exit 3".into()];
//! config.timeout = Some(Duration::from_secs(60)); // then VmOutcome::Timeout
//!
//! let io = ConsoleIo { output: Box::new(std::io::stdout()), input: None };
//! let report = kiln::run(&config, io, Instant::now())?;
//! assert_eq!(report.outcome, VmOutcome::Exited(3));
//! // 3, or kiln's 120-125 for a guest that ended another way (see `outcome`).
//! std::process::exit(report.outcome.exit_status());
//! # Ok::<(), kiln::Error>(())
//! ```
//!
//! [`spawn`] returns at once; the handle stops the VM from any thread and
//! collects the same [`RunReport`]:
//!
//! ```no_run
//! # use std::time::Instant;
//! # use kiln::{ConsoleIo, VmConfig, VmOutcome};
//! # let config = VmConfig::new("target/guest/vmlinux");
//! # let io = ConsoleIo { output: Box::new(std::io::sink()), input: None };
//! let vm = kiln::spawn(config, io, Instant::now())?;
//! let stopper = vm.stopper(); // cheap to clone, e.g. into a signal thread
//! stopper.stop(VmOutcome::Interrupted(15));
//! let report = vm.wait()?;
//! assert_eq!(report.outcome, VmOutcome::Interrupted(15)); // unless the guest ended first
//! # Ok::<(), kiln::Error>(())
//! ```
//!
//! An `Err(`[`Error`]`)` means kiln could not build or start the VM (a bad
//! option, an unreadable kernel, no `/dev/kvm`, ...); the `kiln` command
//! exits 125 for it. However the guest ended, the run itself succeeded and
//! [`RunReport::outcome`] says how ([`VmOutcome`]).
//!
//! # An integration test that boots a real kernel
//!
//! kiln's own tests (`tests/`) boot the recipe kernel. A test checks its
//! prerequisites first and skips with a `SKIP:` line when one is missing,
//! unless `KILN_NO_SKIP` (set to anything but `0`, as CI does) makes that a failure; it captures the
//! console in memory and sets a VM timeout, so a guest that hangs fails the
//! test instead of hanging it:
//!
//! ```no_run
//! use std::io::Write;
//! use std::path::Path;
//! use std::sync::{Arc, Mutex};
//! use std::time::{Duration, Instant};
//! use kiln::{ConsoleIo, VmConfig, VmOutcome};
//!
//! /// The guest console, kept in memory.
//! #[derive(Clone, Default)]
//! struct Capture(Arc<Mutex<Vec<u8>>>);
//!
//! impl Write for Capture {
//!     fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
//!         self.0.lock().unwrap().extend_from_slice(buf);
//!         Ok(buf.len())
//!     }
//!     fn flush(&mut self) -> std::io::Result<()> {
//!         Ok(())
//!     }
//! }
//!
//! // `#[test]` in tests/*.rs.
//! fn the_guest_runs_a_command() {
//!     let kernel = Path::new("target/guest/vmlinux");
//!     let kvm = std::fs::File::options().read(true).write(true).open("/dev/kvm");
//!     if kvm.is_err() || !kernel.is_file() {
//!         let no_skip = std::env::var_os("KILN_NO_SKIP").is_some_and(|v| v != "0");
//!         assert!(!no_skip, "no /dev/kvm or no guest kernel (run resources/setup.sh)");
//!         eprintln!("SKIP: no /dev/kvm or no guest kernel");
//!         return;
//!     }
//!     let mut config = VmConfig::new(kernel);
//!     config.rootfs = Some("target/guest/rootfs".into());
//!     config.command.argv = vec!["sh".into(), "-c".into(), "echo ready; exit 7".into()];
//!     config.timeout = Some(Duration::from_secs(600));
//!     let console = Capture::default();
//!     let io = ConsoleIo { output: Box::new(console.clone()), input: None };
//!
//!     let report = kiln::run(&config, io, Instant::now()).expect("kiln::run");
//!
//!     assert_eq!(report.outcome, VmOutcome::Exited(7));
//!     let output = console.0.lock().unwrap();
//!     assert!(String::from_utf8_lossy(&output).contains("ready\n"));
//! }
//! # the_guest_runs_a_command();
//! ```
//!
//! Tests of the command line run the built binary instead
//! (`std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))`) and check its
//! exit status; tests of many commands share one [`sandbox::Sandbox`].
//!
//! # The sandbox
//!
//! Boot once, then run commands with [`exec`](sandbox::Sandbox::exec) (run
//! to the end, collect the output) or [`spawn`](sandbox::Sandbox::spawn)
//! (stream stdin, stdout and stderr):
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use std::time::Duration;
//! use kiln::sandbox::{Command, ExitStatus, Sandbox};
//!
//! let sandbox = Sandbox::builder()
//!     .kernel("target/guest/vmlinux")
//!     .rootfs("target/guest/rootfs")
//!     .memory(256 << 20)
//!     .timeout(Duration::from_secs(600)) // the whole VM
//!     .build()?; // boots and waits for the guest agent
//!
//! let out = sandbox.exec(Command::new("sh").arg("-c").arg("echo $X; exit 3").env("X", "1"))?;
//! assert_eq!((out.status, &out.stdout[..]), (ExitStatus::Code(3), &b"1\n"[..]));
//!
//! let mut cat = sandbox.spawn(Command::new("cat").stdin_piped().timeout(Duration::from_secs(30)))?;
//! let mut stdin = cat.stdin().expect("piped");
//! stdin.write_all(b"streamed\n")?;
//! drop(stdin); // end of input
//! let mut echoed = String::new();
//! cat.stdout().expect("taken once").read_to_string(&mut echoed)?;
//! assert_eq!((echoed.as_str(), cat.wait()?), ("streamed\n", ExitStatus::Code(0)));
//!
//! sandbox.shutdown()?; // or drop it
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Errors and exit statuses
//!
//! - [`Error`]: kiln could not build or run the VM; each variant says what
//!   caused it, and a module's own error is carried whole (`#[from]`) so it
//!   can be matched. Every message is one line.
//! - [`VmOutcome`]: how a VM that ran ended, and
//!   [`exit_status`](VmOutcome::exit_status) the status `kiln run` exits
//!   with for it; the [`outcome`] module lists them (the same table as the
//!   README's "Exit status").
//! - [`sandbox::SandboxError`]: why a sandbox call failed, with the VM's
//!   outcome and the tail of the guest console when the VM died.
//!
//! # Costs
//!
//! A VM is one host thread per vCPU plus one for the event loop (both
//! [`run`] and [`spawn`] start it; `run` waits for it), and guest memory
//! mapped up front (`mem_bytes`, touched as the guest uses it). kiln
//! installs an empty handler for `SIGRTMIN` once per process: it is the
//! signal that stops a vCPU thread blocked in `KVM_RUN`.
//!
//! Every thread kiln creates runs under a seccomp filter of its own (see
//! [`VmConfig::seccomp`] and the README's "Security"); the caller's threads
//! are never filtered. With filters on, kiln installs a `SIGSYS` handler
//! once per process (unless `SIGSYS` already has one): it prints the line
//! naming a denied call before the process dies.

#![warn(missing_docs)]

// The library's API: the VM configuration, running a VM, how it ended and
// why it failed, and the sandbox.
pub mod config;
pub mod error;
pub mod jail;
pub mod oci;
pub mod outcome;
pub mod sandbox;
#[doc(hidden)]
pub mod snapshot;

// The `kiln` binary (src/main.rs, a crate of its own) is the only user.
#[doc(hidden)]
pub mod cli;
// Public only for kiln's own integration tests: tests/linux_boot.rs builds an
// initrd of its own with `cpio::CpioBuilder`, tests/tiny_guests.rs loads
// kernels with `boot::kernel::load`. Not part of the API.
#[doc(hidden)]
pub mod boot;
#[doc(hidden)]
pub mod cpio;
// Public only for kiln's fuzz targets (fuzz/, the kiln-fuzz crate): the
// internals a guest or a root file system reaches. Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::boot::params::{load_initrd, write_boot_info};
    pub use crate::console::ConsoleOutput;
    pub use crate::event_loop::SerialInput;
    pub use crate::initramfs::kiln_initramfs_with;
    pub use crate::layout::{
        CONTROL_PAGE_START, DEBUG_PORT, I8042_COMMAND_PORT, I8042_DATA_PORT, SERIAL_PORT_BASE,
        SERIAL_PORT_SIZE, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
    };
    pub use crate::lifecycle::{ControlReports, Lifecycle};
    pub use crate::rootfs::Rootfs;
}

mod console;
mod device_manager;
mod event_loop;
mod host_profile;
mod initramfs;
mod layout;
mod lifecycle;
mod memory;
mod pause;
mod rootfs;
mod seccomp;
pub mod share;
#[cfg(test)]
mod test_log;
mod vcpu;
mod vm;
mod vmm;

pub use config::VmConfig;
pub use error::{Error, Result};
pub use outcome::VmOutcome;
pub use pause::PauseError;
pub use vcpu::ExitCounts;
pub use vmm::{kernel_cmdline, run, spawn, ConsoleIo, RunReport, VmHandle, VmStopper};

/// README.md's Rust examples, compiled as doc tests so they cannot go stale
/// (its shell examples are run by tests/readme.rs).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
