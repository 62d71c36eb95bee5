//! `Isolation::Process`: a sandbox's VM in a kiln process of its own.
//! - A real guest: commands run; the VM's threads are in a child `kiln`
//!   process, jailed (not the host's root, the jail's uid, no
//!   capabilities, filters on), none in the embedder; the sandbox's
//!   shutdown reports the VM's outcome and leaves no child, descriptor or
//!   directory behind.
//! - The VM process dies with the embedder: SIGKILL of a process that built
//!   a sandbox (a tiny guest that never starts an agent, so the build is
//!   still waiting) ends its VM process too (the lifeline).
//! - A missing kiln binary is one line naming the fixes.

mod common;

use std::fs;
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{guest_kernel, guest_rootfs, have_kvm, is_root, require, test_guest};
use kiln::sandbox::{Command as GuestCommand, Isolation, Sandbox, SandboxError};

fn kiln_binary() -> &'static str {
    env!("CARGO_BIN_EXE_kiln")
}

/// The pids of the processes whose parent is this process.
fn children() -> Vec<u32> {
    let mut pids = Vec::new();
    for task in fs::read_dir("/proc/self/task").unwrap() {
        let path = task.unwrap().path().join("children");
        let text = fs::read_to_string(path).unwrap_or_default();
        pids.extend(text.split_whitespace().map(|p| p.parse::<u32>().unwrap()));
    }
    pids
}

fn thread_names(pid: &str) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

fn status_field(pid: u32, key: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} in {status}"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn a_process_isolated_sandbox_runs_commands_in_a_jailed_child() {
    let kernel = guest_kernel("vmlinux");
    if !require(have_kvm(), "no read-write access to /dev/kvm")
        || !require(kernel.is_some(), "no guest kernel (run resources/setup.sh)")
    {
        return;
    }
    // Alone in a process of its own: exact child and descriptor counts.
    if !kiln_prereq::in_child() {
        kiln_prereq::run_in_child(
            concat!(
                module_path!(),
                "::a_process_isolated_sandbox_runs_commands_in_a_jailed_child"
            ),
            &[],
        );
        return;
    }
    let before = children();
    let fds_before = fs::read_dir("/proc/self/fd").unwrap().count();
    let sandbox = Sandbox::builder()
        .kernel(kernel.expect("checked"))
        .rootfs(guest_rootfs())
        .timeout(Duration::from_secs(900))
        .isolation(Isolation::Process)
        .kiln_binary(kiln_binary())
        .build()
        .expect("booting a process-isolated sandbox");
    let out = sandbox
        .exec(GuestCommand::new("sh").args(["-c", "echo hello from $(hostname); exit 7"]))
        .expect("a command");
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).as_ref()
        ),
        (Some(7), "hello from kiln\n")
    );

    // The VM is the new child's, not this process's.
    let new: Vec<u32> = children()
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(new.len(), 1, "one VM process: {new:?}");
    let vm_pid = new[0];
    let own = thread_names("self");
    assert!(
        !own.iter()
            .any(|n| n.starts_with("kiln-vcpu") || n == "kiln-vmm"),
        "VM threads in the embedder: {own:?}"
    );
    let vm_threads = thread_names(&vm_pid.to_string());
    assert!(
        vm_threads.iter().any(|n| n == "kiln-vcpu0"),
        "{vm_threads:?}"
    );
    let root = format!("/proc/{vm_pid}/root");
    let (a, b) = (fs::metadata(&root).unwrap(), fs::metadata("/").unwrap());
    use std::os::unix::fs::MetadataExt;
    assert_ne!(
        (a.dev(), a.ino()),
        (b.dev(), b.ino()),
        "the VM process is jailed"
    );
    assert_eq!(status_field(vm_pid, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(vm_pid, "Seccomp:"), "2");
    if is_root() {
        assert_eq!(status_field(vm_pid, "Uid:"), "65534 65534 65534 65534");
    }

    let outcome = sandbox.shutdown().expect("the VM's outcome");
    assert!(outcome.is_some(), "a VM outcome");
    assert_eq!(children(), before, "the VM process is reaped");
    assert!(
        !Path::new(&format!("/proc/{vm_pid}")).exists(),
        "the VM process is gone"
    );
    assert_eq!(
        fs::read_dir("/proc/self/fd").unwrap().count(),
        fds_before,
        "no descriptor left behind"
    );
}

/// In a child process: starts building a process-isolated sandbox of a
/// tiny guest that never connects (the build waits), after printing its
/// pid; the test kills it.
#[test]
fn the_vm_process_dies_with_its_embedder() {
    if kiln_prereq::in_child() {
        let result = Sandbox::builder()
            .kernel(std::env::var("KILN_TEST_GUEST").unwrap())
            .memory(32 << 20)
            .boot_timeout(Duration::from_secs(600))
            .isolation(Isolation::Process)
            .kiln_binary(kiln_binary())
            .build();
        panic!("the build ended: {:?}", result.err());
    }
    if !require(have_kvm(), "no read-write access to /dev/kvm") {
        return;
    }
    let name = "the_vm_process_dies_with_its_embedder";
    let mut embedder = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env("KILN_TEST_CHILD", name)
        .env("KILN_TEST_GUEST", test_guest("halt"))
        .env("KILN_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the embedder");
    // The VM process logs this once its guest runs.
    let stderr = std::io::BufReader::new(embedder.stderr.take().unwrap());
    let mut seen = String::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("guest started") {
            break;
        }
    }
    assert!(seen.contains("guest started"), "{seen}");
    let embedder_pid = embedder.id();
    let vm_pid = fs::read_to_string(format!("/proc/{embedder_pid}/task/{embedder_pid}/children"))
        .ok()
        .into_iter()
        .chain(
            fs::read_dir(format!("/proc/{embedder_pid}/task"))
                .unwrap()
                .filter_map(|t| fs::read_to_string(t.ok()?.path().join("children")).ok()),
        )
        .flat_map(|s| s.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .next()
        .expect("the embedder's VM process");
    embedder.kill().unwrap();
    embedder.wait().unwrap();
    // Its lifeline ends with the embedder: the VM process stops and exits.
    let vm_pid: i32 = vm_pid.parse().expect("a pid");
    assert!(
        common::process_ended(vm_pid),
        "VM process {vm_pid} outlived its embedder"
    );
}

#[test]
fn a_missing_kiln_binary_is_one_line() {
    let err = Sandbox::builder()
        .kernel(test_guest("hello"))
        .isolation(Isolation::Process)
        .kiln_binary("/nonexistent/kiln")
        .build()
        .err()
        .expect("no VM process");
    let text = err.to_string();
    assert!(
        matches!(err, SandboxError::Vm(_)) && text.contains("/nonexistent/kiln"),
        "{text}"
    );
    assert!(!text.contains('\n'), "{text}");
}

/// A VM process that neither reports nor exits when stopped (as one the
/// guest took over might) cannot hold the sandbox: it is killed, and the
/// build that gave up on its agent returns. The stand-in is a script that
/// ignores its lifeline and keeps its pipes open.
#[test]
fn a_vm_process_that_will_not_end_is_killed() {
    let scratch = common::Scratch::new("isolation-wedged");
    let fake = scratch.path("kiln");
    fs::write(&fake, "#!/bin/sh\nexec sleep 100000\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let (done_tx, done) = std::sync::mpsc::channel();
    let guest = test_guest("hello");
    std::thread::spawn(move || {
        let result = Sandbox::builder()
            .kernel(guest)
            .boot_timeout(Duration::from_millis(200))
            .isolation(Isolation::Process)
            .kiln_binary(fake)
            .build();
        let _ = done_tx.send(result.err().map(|e| e.to_string()));
    });
    let err = done
        .recv_timeout(common::HANG_LIMIT)
        .expect("the build returned: the stuck VM process was killed");
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("did not connect")),
        "{err:?}"
    );
    assert!(
        !children().iter().any(|&p| {
            fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep")
        }),
        "the stand-in still runs"
    );
}
