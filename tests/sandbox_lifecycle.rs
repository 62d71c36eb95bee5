//! Sandbox lifecycle with real VMs: the builder boots tiny test guests that
//! never start kiln's agent, 50 times, and every thread and file descriptor
//! it made (vCPU and event threads, /dev/kvm objects, eventfds, the vsock
//! device's sockets, the temporary directory) is gone afterwards. The agent
//! side of the same lifecycle (exec, spawn, drop) is covered against a
//! host-run agent in tests/sandbox_host.rs; a real kernel's shutdown is in
//! tests/sandbox.rs.
//!
//! One test in its own binary, so the process's counts are its alone.

mod common;

use std::time::Duration;

use common::{have_kvm, require, test_guest};
use kiln::sandbox::{Sandbox, SandboxError};
use kiln::VmOutcome;

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[test]
fn fifty_sandboxes_leave_no_threads_or_fds_behind() {
    if !require(have_kvm(), "/dev/kvm not accessible") {
        return;
    }
    // `hello` reports status 42 at once; `halt` sleeps in KVM_RUN forever.
    let (hello, halt) = (test_guest("hello"), test_guest("halt"));
    let boot = |kernel: &std::path::Path, boot_timeout_ms: u64| {
        Sandbox::builder()
            .kernel(kernel)
            .memory(32 << 20)
            .boot_timeout(Duration::from_millis(boot_timeout_ms))
            .build()
    };
    let round = || {
        // A guest that ends before any agent: BootFailed with its outcome.
        match boot(&hello, 10_000) {
            Err(SandboxError::BootFailed { outcome, .. }) => {
                assert_eq!(outcome, VmOutcome::Exited(42))
            }
            other => panic!("hello guest: {:?}", other.err()),
        }
        // A guest that never answers: BootTimeout naming the limit, the
        // VM is stopped.
        match boot(&halt, 100) {
            Err(e @ SandboxError::BootTimeout { timeout, .. }) => {
                assert_eq!(timeout, Duration::from_millis(100));
                let text = e.to_string();
                assert!(
                    text.starts_with("the guest agent did not connect within 100ms"),
                    "{text}"
                );
            }
            other => panic!("halt guest: {:?}", other.err()),
        }
    };
    // Warm up process-wide state (logger, lazily opened files).
    round();
    let (fds, threads) = (count("/proc/self/fd"), count("/proc/self/task"));
    for _ in 0..25 {
        round();
    }
    assert_eq!(count("/proc/self/fd"), fds, "file descriptors leaked");
    assert_eq!(count("/proc/self/task"), threads, "threads leaked");
    // The socket directories (kiln-PID-...) are removed too.
    let mine = format!("kiln-{}-", std::process::id());
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&mine))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
