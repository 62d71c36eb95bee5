//! Everything that happens between "here is a kernel" and the first KVM_RUN:
//! loading the image, boot parameters, the command line, the CPU tables
//! and the initial vCPU state.

pub mod cmdline;
pub mod cpu_state;
pub mod cpuid;
pub mod kernel;
pub mod mptable;
pub mod params;

pub use kernel::{BootEntry, LoadedKernel};
