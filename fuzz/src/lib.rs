//! kiln's fuzz targets: guest-facing device models and parsers driven by
//! hostile input, each checked for more than "no panic".
//!
//! Every target is a plain function from bytes (`targets::*::run`), wrapped
//! by [`fuzz`], which holds each input to the target's bounds:
//! - termination: device targets pump their event loop until it goes idle
//!   and fail if it never does (a device that keeps waking itself up is
//!   spinning); libFuzzer's `-timeout` catches a call that never returns;
//! - bounded memory: the heap bytes live at once during the input (counted
//!   by this crate's global allocator, every thread included) stay under the
//!   target's cap, derived from the limits the code under test promises;
//! - no leaks of file descriptors (sockets, eventfds, memfds) past the input;
//! - what each target asserts about the code's output on top (e.g. frames
//!   a device sends out are well-formed, a disk image never grows).
//!
//! The libFuzzer binaries (`fuzz_targets/`, feature `libfuzzer`) and the
//! replay tests (`tests/replay.rs`, run by `cargo test`) both call [`fuzz`].

pub mod alloc;
pub mod input;
pub mod targets;
pub mod virtio;

use std::sync::Mutex;

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    /// The body: any input is valid; a violated bound panics.
    pub run: fn(&[u8]),
    /// Heap bytes one input may have live at once: a fixed part plus a
    /// part per input byte (what the target itself copies from the input).
    pub memory_cap: usize,
    pub memory_per_input_byte: usize,
    /// Small valid inputs to start from (committed under `fuzz/seeds/`).
    pub seeds: fn() -> Vec<(&'static str, Vec<u8>)>,
}

/// Every target, by name (the names of the libFuzzer binaries).
pub const TARGETS: &[Target] = &[
    targets::vsock::TARGET,
    targets::sandbox::TARGET,
    targets::protocol::TARGET,
    targets::net::TARGET,
    targets::block::TARGET,
    targets::mmio::TARGET,
    targets::console::TARGET,
    targets::tar::TARGET,
    targets::exec_spec::TARGET,
    targets::bus::TARGET,
    targets::rng::TARGET,
    targets::kernel::TARGET,
];

pub fn target(name: &str) -> &'static Target {
    TARGETS
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no fuzz target named {name}"))
}

/// Serializes inputs: the memory and file-descriptor counts are
/// process-wide, so two inputs must not run at once (the replay tests run
/// in parallel threads).
static EXCLUSIVE: Mutex<()> = Mutex::new(());

/// Holds off every other input while held.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs one input through target `name` and checks its bounds (see the
/// crate docs); panics on a violation.
pub fn fuzz(name: &str, data: &[u8]) {
    let target = target(name);
    let _only_one = exclusive();
    ignore_sigpipe();
    let fds = open_fds();
    let base = alloc::start();
    (target.run)(data);
    let used = alloc::peak().saturating_sub(base);
    let cap = target.memory_cap + target.memory_per_input_byte * data.len();
    assert!(
        used <= cap,
        "{name}: one input made the code allocate {used} bytes at once, more than the {cap} it may"
    );
    let left = open_fds();
    assert!(
        left == fds,
        "{name}: {} file descriptors open after the input, {} before (leaked)",
        left.len(),
        fds.len()
    );
}

/// A write to a closed socket must fail with EPIPE, as in the monitor (Rust
/// programs ignore SIGPIPE), not kill the process: libFuzzer's own `main`
/// does not set that up.
fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler.
    ONCE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
}

/// The process's open file descriptors.
fn open_fds() -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    // The listing includes read_dir's own handle, under the lowest free
    // number: the same in both listings unless something leaked.
    fds.sort();
    fds
}
