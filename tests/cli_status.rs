//! kiln's own exit statuses through the `kiln` binary, with tiny test guests
//! (resources/test-guests; no kernel boot, milliseconds each): a guest KVM
//! cannot run (123) and a triple fault (122). Each is one line on stderr
//! naming why, and nothing on stdout. The other statuses of README's table
//! go through the binary in tests/tiny_guests.rs (119, 120, 121, 124, 125) and
//! tests/linux_boot.rs (the command's own, 128+N).

mod common;

use std::process::Output;

use common::{have_kvm, kiln_cli, require, test_guest};

/// `kiln run --kernel GUEST.elf --mem 32M --timeout 10s`.
fn run_tiny(guest: &str) -> Output {
    kiln_cli()
        .arg("run")
        .arg("--kernel")
        .arg(test_guest(guest))
        .args(["--mem", "32M", "--timeout", "10s"])
        .output()
        .expect("running the kiln binary")
}

fn assert_status_and_one_line(guest: &str, status: i32, needle: &str) {
    let out = run_tiny(guest);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(status), "{guest}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{guest}: one stderr line: {lines:?}");
    assert!(
        lines[0].starts_with("kiln: ") && lines[0].contains(needle),
        "{guest}: {:?} does not say {needle:?}",
        lines[0]
    );
    assert!(out.stdout.is_empty(), "{guest}: stdout {:?}", out.stdout);
}

/// The guest jumps to an address with neither RAM nor a device: KVM cannot
/// fetch the instruction (emulation failure) and kiln exits with 123.
#[test]
fn a_guest_kvm_cannot_run_exits_123() {
    if !require(have_kvm(), "/dev/kvm not accessible") {
        return;
    }
    assert_status_and_one_line("mmio_exec", 123, "KVM stopped the guest");
}

/// A triple fault (KVM_EXIT_SHUTDOWN) through the binary: 122.
#[test]
fn a_triple_fault_exits_122() {
    if !require(have_kvm(), "/dev/kvm not accessible") {
        return;
    }
    assert_status_and_one_line("triple_fault", 122, "triple fault");
}
