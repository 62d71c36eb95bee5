//! seccomp on a running `kiln run` (issue 10's check, `grep Seccomp
//! /proc/PID/task/*/status`): every thread of the process is in filter
//! mode once the guest runs, on both of `kiln run`'s paths and with every
//! kind of thread kiln creates; with `--seccomp off`, none is. That the
//! filters allow everything a run needs is shown by the rest of the suite,
//! which runs with them on; the line a denied call prints is tested in
//! src/seccomp/tests.rs.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;

use common::{guest_kernel, guest_rootfs, have_kvm, kiln_cli, require, test_guest, Scratch};

/// One thread of a process, as /proc shows it.
#[derive(Debug)]
struct Task {
    name: String,
    /// `Seccomp:` 0 (none), 1 (strict) or 2 (filter).
    mode: u32,
    /// `Seccomp_filters:`, on kernels that show it.
    filters: Option<u32>,
}

/// Every thread of `pid` (a thread that ends meanwhile is left out).
fn tasks(pid: u32) -> Vec<Task> {
    let dir = format!("/proc/{pid}/task");
    let mut tasks = Vec::new();
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let path = entry.expect("a task entry").path();
        let Ok(status) = fs::read_to_string(path.join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
        };
        tasks.push(Task {
            name: field("Name:").expect("Name: in every status"),
            mode: field("Seccomp:")
                .expect("a kernel with seccomp (Seccomp: in /proc/PID/status)")
                .parse()
                .expect("a number"),
            filters: field("Seccomp_filters:").map(|v| v.parse().expect("a number")),
        });
    }
    tasks
}

/// The threads of every `kiln run` once the guest runs (`kiln` is the main
/// thread).
const EVERY_RUN: [&str; 4] = ["kiln", "kiln-signals", "kiln-vmm", "kiln-vcpu0"];

/// Every thread is filtered (mode 2, at least one filter where shown), and
/// each of `names` is among them.
fn assert_all_filtered(tasks: &[Task], names: &[&str]) {
    for task in tasks {
        assert_eq!(
            task.mode, 2,
            "thread not in filter mode: {task:?} (all: {tasks:?})"
        );
        assert_ne!(task.filters, Some(0), "{task:?}");
    }
    for name in names {
        assert!(
            tasks.iter().any(|t| t.name == *name),
            "no thread {name} in {tasks:?}"
        );
    }
}

/// Reads lines until one contains `marker`; panics with what was read if
/// the stream ends first.
fn read_until(from: &mut impl BufRead, marker: &str) -> String {
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if from.read_line(&mut line).expect("reading kiln's output") == 0 {
            panic!("kiln's output ended before {marker:?}:\n{seen}");
        }
        seen.push_str(&line);
        if line.contains(marker) {
            return seen;
        }
    }
}

/// A tiny guest that halts for good, on both paths of `kiln run` (through
/// the agent, and classic with `--vsock`), two vCPUs and a virtio console
/// (whose writer is a thread of its own). `-v` logs the line the run waits
/// for: every VM thread and the main thread are filtered before it.
#[test]
fn every_thread_of_kiln_run_is_filtered_and_none_with_seccomp_off() {
    if !require(have_kvm(), "no read-write access to /dev/kvm") {
        return;
    }
    let guest = test_guest("halt");
    let scratch = Scratch::new("seccomp-threads");
    common::hand_to_jail(&scratch.0);
    let socket = scratch.path("v.sock");
    let classic = [
        "--vsock".to_string(),
        format!("cid=3,socket={}", socket.display()),
    ];
    for (path, extra) in [("agent", &[][..]), ("classic", &classic[..])] {
        for mode in ["on", "off"] {
            let mut kiln = kiln_cli()
                .arg("run")
                .arg("--kernel")
                .arg(&guest)
                .args(["--mem", "32M", "--cpus", "2", "--console", "virtio"])
                .args(["--timeout", "600s", "-v", "--seccomp", mode])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("starting kiln");
            let mut stderr = BufReader::new(kiln.stderr.take().expect("piped"));
            read_until(&mut stderr, &format!("guest started (seccomp {mode})"));
            let tasks = tasks(kiln.id());
            // "kiln-console-out", cut to 15 bytes.
            let names = [&EVERY_RUN[..], &["kiln-vcpu1", "kiln-console-ou"]].concat();
            match mode {
                "on" => assert_all_filtered(&tasks, &names),
                _ => assert!(tasks.iter().all(|t| t.mode == 0), "{path}: {tasks:?}"),
            }
            common::terminate(kiln);
        }
    }
}

/// A real guest running a command with `-i`: the sandbox's reader and the
/// stdin, stdout and stderr copiers exist only once the agent is up, and
/// are filtered too; the command then still gets its input and ends.
#[test]
fn the_agent_paths_threads_are_filtered_while_a_command_runs() {
    let kernel = guest_kernel("vmlinux");
    if !require(have_kvm(), "no read-write access to /dev/kvm")
        || !require(kernel.is_some(), "no guest kernel (run resources/setup.sh)")
    {
        return;
    }
    let mut kiln = kiln_cli()
        .arg("run")
        .arg("--kernel")
        .arg(kernel.expect("checked"))
        .arg("--rootfs")
        .arg(guest_rootfs())
        .args(["--timeout", "600s", "-i", "--"])
        .args(["sh", "-c", "echo ready; read line; echo \"got $line\""])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kiln");
    let mut stdout = BufReader::new(kiln.stdout.take().expect("piped"));
    read_until(&mut stdout, "ready");
    let tasks = tasks(kiln.id());
    let agent = ["kiln-sandbox", "kiln-stdin", "kiln-stdout", "kiln-stderr"];
    assert_all_filtered(&tasks, &[&EVERY_RUN[..], &agent].concat());

    let mut stdin = kiln.stdin.take().expect("piped");
    stdin
        .write_all(b"x\n")
        .expect("writing the command's input");
    drop(stdin);
    let mut rest = String::new();
    stdout
        .read_to_string(&mut rest)
        .expect("the command's output");
    let out = kiln.wait_with_output().expect("waiting for kiln");
    assert_eq!(
        (rest.as_str(), out.status.code()),
        ("got x\n", Some(0)),
        "{:?}, stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds tests/seccomp_shim.c into a shared object for LD_PRELOAD.
fn build_shim(scratch: &Scratch) -> std::path::PathBuf {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seccomp_shim.c");
    let out = scratch.path("seccomp_shim.so");
    let built = std::process::Command::new("gcc")
        .args(["-O2", "-Wall", "-shared", "-fPIC", "-o"])
        .arg(&out)
        .arg(&src)
        .arg("-ldl")
        .output()
        .expect("running gcc");
    assert!(
        built.status.success(),
        "building the shim: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    out
}

/// A vCPU thread and the VM thread each make a call off their lists (an
/// AF_INET socket, through an LD_PRELOAD shim, as a compromised device
/// model or exit handler would): kiln dies by SIGSYS with the one line
/// naming the thread and the call, and the run's own end never comes. In
/// `log` mode and with `--seccomp off` the same call goes through and the
/// run ends as it would without the shim: `hello` with its status 42 at
/// the vCPU's first KVM_RUN; `halt`, which never ends by itself, at its
/// timeout (124), so that the VM thread's event loop surely waits.
#[test]
fn a_forbidden_call_kills_kiln_with_a_line_naming_thread_and_call() {
    if !require(have_kvm(), "no read-write access to /dev/kvm") {
        return;
    }
    let scratch = Scratch::new("seccomp-shim");
    let shim = build_shim(&scratch);
    let cases = [
        ("vcpu", "kiln-vcpu0", "hello", "600s", 42),
        ("vmm", "kiln-vmm", "halt", "1s", 124),
    ];
    for (at, thread, guest, timeout, status) in cases {
        for mode in ["on", "log", "off"] {
            let out = kiln_cli()
                .arg("run")
                .arg("--kernel")
                .arg(test_guest(guest))
                .args(["--mem", "32M", "--timeout", timeout, "--seccomp", mode])
                .env("LD_PRELOAD", &shim)
                .env("SECCOMP_SHIM_AT", at)
                .output()
                .expect("running kiln");
            let stderr = String::from_utf8_lossy(&out.stderr);
            let context = format!(
                "{at}, --seccomp {mode}: {:?}, stderr:\n{stderr}",
                out.status
            );
            let shim_line = |l: &str| l.starts_with("seccomp-shim: socket returned ");
            match mode {
                "on" => {
                    use std::os::unix::process::ExitStatusExt;
                    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{context}");
                    let line = format!(
                        "kiln: seccomp: thread {thread} made a forbidden system call 41 (socket)"
                    );
                    assert_eq!(
                        stderr.lines().collect::<Vec<_>>(),
                        [line.as_str()],
                        "{context}"
                    );
                }
                _ => {
                    assert_eq!(out.status.code(), Some(status), "{context}");
                    let returned: Vec<_> = stderr.lines().filter(|l| shim_line(l)).collect();
                    assert_eq!(returned.len(), 1, "{context}");
                    assert!(
                        !returned[0].ends_with(" -1"),
                        "the socket was made: {context}"
                    );
                }
            }
        }
    }
}
