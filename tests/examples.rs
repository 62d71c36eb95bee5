//! The programs in examples/ run as README says and do what they print:
//! `examples/sandbox.rs` boots one real VM and runs its small test suite
//! through `exec` (one boot, tens of seconds on an emulating host).

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{guest_kernel, guest_rootfs, have_kvm, require};

/// An example's binary, which `cargo test` builds next to the test
/// binaries (target/PROFILE/examples/NAME).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/PROFILE/deps/TEST");
    profile_dir.join("examples").join(name)
}

#[test]
fn sandbox_example_runs_its_checks() {
    if !require(have_kvm(), "/dev/kvm not accessible")
        || !require(guest_kernel("vmlinux").is_some(), "guest kernel not built")
    {
        return;
    }
    let binary = example("sandbox");
    assert!(
        binary.is_file(),
        "{} not built (cargo test builds examples)",
        binary.display()
    );
    let _vm = common::one_vm();
    let out = Command::new(&binary)
        .arg(guest_kernel("vmlinux").unwrap())
        .arg(guest_rootfs())
        .output()
        .expect("running the example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the example failed: {}", out.status);
    assert!(stdout.starts_with("sandbox ready in "), "{stdout}");
    for check in ["echo", "status", "env", "cwd", "stdin", "signal"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("ok   {check} ("))),
            "check {check} did not pass: {stdout}"
        );
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
}
