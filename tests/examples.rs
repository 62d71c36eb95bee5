//! The programs in examples/ run as README says and do what they print:
//! `examples/sandbox.rs` boots one real VM and runs its small test suite
//! through `exec` (one boot, tens of seconds on an emulating host);
//! `examples/exec_bench.rs` (resources/bench/run.sh's exec section) prints
//! its rows (the figures are the benchmark's, not checked here).

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

/// Runs example `name` on the guest kernel and root with `args`: its
/// stdout, once it exited 0; `None` where the test skips (no KVM, no kernel).
fn run_example(name: &str, args: &[&str]) -> Option<String> {
    if !require(have_kvm(), "/dev/kvm not accessible")
        || !require(guest_kernel("vmlinux").is_some(), "guest kernel not built")
    {
        return None;
    }
    let binary = example(name);
    assert!(
        binary.is_file(),
        "{} not built (cargo test builds examples)",
        binary.display()
    );
    let _vm = common::one_vm();
    let out = Command::new(&binary)
        .arg(guest_kernel("vmlinux").unwrap())
        .arg(guest_rootfs())
        .args(args)
        .output()
        .expect("running the example");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the example failed: {}", out.status);
    Some(stdout)
}

#[test]
fn sandbox_example_runs_its_checks() {
    let Some(stdout) = run_example("sandbox", &[]) else {
        return;
    };
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

#[test]
fn exec_bench_prints_a_row_per_repetition_and_a_summary() {
    let Some(stdout) = run_example("exec_bench", &["2", "1"]) else {
        return;
    };
    // Every figure is a positive number (the parsing run.sh does).
    let figure = |line: &str, key: &str| -> f64 {
        let word = line.split_whitespace().find_map(|w| w.strip_prefix(key));
        let value = word.and_then(|w| w.parse().ok());
        value.unwrap_or_else(|| panic!("no {key} number in {line:?}"))
    };
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("exec-bench rep="))
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    let summary = stdout.lines().last().unwrap_or_default();
    for line in rows.iter().chain([&summary]) {
        for key in ["exec_s=", "guest_s=", "ratio="] {
            assert!(figure(line, key) > 0.0, "{line}");
        }
    }
    assert!(summary.contains("2 reps of 1 pairs"), "{summary}");
}
