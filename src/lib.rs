//! kiln: a KVM micro-VM monitor.
//!
//! The library is what the `kiln` command line calls, so the same VM can be
//! built and run from Rust code.

pub mod boot;
pub mod error;
pub mod host_profile;
pub mod layout;
pub mod lifecycle;
pub mod memory;
pub mod outcome;
pub mod vcpu;
pub mod vm;

pub use error::{Error, Result};
pub use outcome::VmOutcome;
