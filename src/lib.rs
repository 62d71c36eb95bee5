//! kiln: a KVM micro-VM monitor.
//!
//! The library is what the `kiln` command line calls, so the same VM can be
//! built and run from Rust code.

pub mod boot;
pub mod cli;
pub mod config;
pub mod console;
pub mod cpio;
pub mod device_manager;
pub mod error;
pub mod event_loop;
pub mod host_profile;
pub mod initramfs;
pub mod layout;
pub mod lifecycle;
pub mod memory;
pub mod outcome;
pub mod rootfs;
pub mod sandbox;
pub mod vcpu;
pub mod vm;
pub mod vmm;

pub use config::VmConfig;
pub use error::{Error, Result};
pub use outcome::VmOutcome;
pub use vmm::{run, spawn, ConsoleIo, RunReport, VmHandle, VmStopper};

/// README.md's Rust examples, compiled as doc tests so they cannot go stale
/// (its shell examples are run by tests/readme.rs).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
