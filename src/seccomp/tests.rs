//! The filters on real threads. A filter cannot be removed and a denied
//! call kills the whole process, so each case runs in a child: this test
//! binary again, running only [`child_case`] with the case in
//! `KILN_SECCOMP_CHILD`; the parent checks how the child ended.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};
use std::sync::mpsc;

use super::*;

const CASE_ENV: &str = "KILN_SECCOMP_CHILD";

fn run_case(case: &str) -> Output {
    let exe = std::env::current_exe().expect("the test binary");
    Command::new(exe)
        .args(["--exact", "seccomp::tests::child_case", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CASE_ENV, case)
        .output()
        .expect("running the test binary again")
}

/// The child died by SIGSYS after printing exactly `line` for the thread.
fn assert_denied(case: &str, line: &str) {
    let out = run_case(case);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "case {case}: {:?}, stderr:\n{stderr}",
        out.status
    );
    assert!(
        stderr.lines().any(|l| l == line),
        "case {case}: no line {line:?} in stderr:\n{stderr}"
    );
}

fn assert_succeeds(case: &str) {
    let out = run_case(case);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "case {case}: {:?}, stderr:\n{stderr}",
        out.status
    );
    // The child ran the case, not an empty filter of the test list.
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "case {case}: child_case did not run:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_vcpu_thread_cannot_open_a_socket() {
    assert_denied(
        "socket",
        "kiln: seccomp: thread kiln-test made a forbidden system call 41 (socket)",
    );
}

#[test]
fn a_vcpu_thread_gets_only_its_own_ioctls() {
    assert_denied(
        "ioctl",
        "kiln: seccomp: thread kiln-test made a forbidden system call 16 (ioctl)",
    );
}

#[test]
fn no_thread_maps_executable_memory() {
    assert_denied(
        "exec-memory",
        "kiln: seccomp: thread kiln-test made a forbidden system call 9 (mmap)",
    );
}

#[test]
fn the_main_thread_starts_threads_but_no_process() {
    assert_denied(
        "fork",
        "kiln: seccomp: thread kiln-test made a forbidden system call 56 (clone)",
    );
}

#[test]
fn threads_signal_their_own_process_only() {
    // The event thread's vCPU kick, aimed at another process of the same
    // uid (here the parent test process): a taken-over kiln must not
    // reach other kilns of its jail uid.
    assert_denied(
        "signal-other",
        "kiln: seccomp: thread kiln-test made a forbidden system call 234 (tgkill)",
    );
}

#[test]
fn opening_a_file_is_refused_not_trapped() {
    assert_succeeds("open");
}

#[test]
fn filtered_threads_run_and_start_filtered_threads() {
    assert_succeeds("allowed");
}

#[test]
fn log_mode_lets_a_forbidden_call_through() {
    assert_succeeds("log");
}

#[test]
fn every_list_compiles() {
    for kind in ThreadKind::ALL {
        for log_only in [false, true] {
            let programs = compile(kind, log_only, std::process::id()).unwrap();
            assert_eq!(programs.len(), 2 + usize::from(kind.starts_threads()));
            // Far below the kernel's 4096 instructions per filter.
            assert!(programs.iter().all(|p| p.len() < 1024), "{kind:?}");
        }
    }
}

/// The child side: does the case named in `KILN_SECCOMP_CHILD` (nothing in
/// a normal test run, where the variable is unset).
#[test]
fn child_case() {
    let Ok(case) = std::env::var(CASE_ENV) else {
        return;
    };
    // A child that dies by SIGSYS leaves no core file behind.
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: sets this process's core size limit from a valid struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) }, 0);
    match case.as_str() {
        // SAFETY (these three): plain system calls with valid arguments.
        "socket" => in_thread(ThreadKind::Vcpu, SeccompMode::On, || unsafe {
            libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        }),
        "ioctl" => in_thread(ThreadKind::Vcpu, SeccompMode::On, || unsafe {
            libc::ioctl(-1, 0xae01); // KVM_CREATE_VM
        }),
        "exec-memory" => in_thread(ThreadKind::Vcpu, SeccompMode::On, || unsafe {
            let prot = libc::PROT_READ | libc::PROT_EXEC;
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
            libc::mmap(std::ptr::null_mut(), 4096, prot, flags, -1, 0);
        }),
        "fork" => in_thread(ThreadKind::CliMain, SeccompMode::On, || {
            // SAFETY: the child, if there were one, would only exit.
            if unsafe { libc::fork() } == 0 {
                unsafe { libc::_exit(0) };
            }
        }),
        "signal-other" => {
            let parent = parent_pid();
            let kick = vmm_sys_util::signal::SIGRTMIN();
            // SAFETY: a plain system call; the filter stops it.
            in_thread(ThreadKind::Vmm, SeccompMode::On, move || unsafe {
                libc::syscall(libc::SYS_tgkill, parent, parent, kick);
            })
        }
        "allowed" => allowed(),
        // glibc's malloc opens /proc/sys/vm/overcommit_memory on whatever
        // thread first shrinks a heap: refused, not fatal. kiln run's main
        // thread opens directories (to remove its socket directory) only.
        "open" => {
            for kind in ThreadKind::ALL {
                in_thread(kind, SeccompMode::On, move || {
                    let file = std::fs::File::open("/proc/sys/vm/overcommit_memory");
                    let err = file.expect_err("a filtered thread opened a file");
                    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{kind:?}");
                    let dir = std::fs::read_dir("/proc/self");
                    match kind {
                        ThreadKind::CliMain | ThreadKind::CliSnapshot | ThreadKind::SandboxVm => {
                            assert!(dir.is_ok(), "{dir:?}")
                        }
                        _ => assert_eq!(
                            dir.err().and_then(|e| e.raw_os_error()),
                            Some(libc::EACCES),
                            "{kind:?}"
                        ),
                    }
                });
            }
            // `kiln snapshot create`'s and `kiln sandbox-vm`'s main threads
            // create new files only.
            let dir = std::env::temp_dir().join(format!("kiln-seccomp-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let existing = dir.join("existing");
            std::fs::write(&existing, b"x").unwrap();
            for kind in [ThreadKind::CliSnapshot, ThreadKind::SandboxVm] {
                let (n, e) = (dir.join(format!("new-{kind:?}")), existing.clone());
                in_thread(kind, SeccompMode::On, move || {
                    let created = std::fs::File::options()
                        .write(true)
                        .create_new(true)
                        .open(&n);
                    assert!(created.is_ok(), "{kind:?}: {created:?}");
                    for open in [
                        std::fs::File::options()
                            .write(true)
                            .create(true)
                            .truncate(false)
                            .open(&e),
                        std::fs::File::options().write(true).open(&e),
                        std::fs::File::open(&e),
                    ] {
                        let err = open.expect_err("an existing file was opened");
                        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{kind:?}");
                    }
                });
            }
            // `kiln sandbox-vm`'s saves where the sandbox's descriptor says:
            // it takes the directory over its control socket and creates
            // (and removes) a snapshot's file in it.
            let (sandbox, child) = std::os::unix::net::UnixStream::pair().unwrap();
            let opened = std::fs::File::open(&dir).unwrap();
            use std::os::fd::AsRawFd;
            use vmm_sys_util::sock_ctrl_msg::ScmSocket;
            sandbox.send_with_fd(&b"x"[..], opened.as_raw_fd()).unwrap();
            let shown = dir.clone();
            in_thread(ThreadKind::SandboxVm, SeccompMode::On, move || {
                let (n, fd) = child.recv_with_fd(&mut [0u8; 1]).unwrap();
                assert_eq!(n, 1);
                let received = crate::snapshot::SnapshotDir::from_fd(fd.unwrap().into(), shown);
                let received = received.unwrap();
                let file = received.create_file("memory");
                assert!(file.is_ok(), "{file:?}");
                received.remove_file("memory");
            });
            assert!(!dir.join("memory").exists());
            let _ = std::fs::remove_dir_all(&dir);
            println!("opens refused");
        }
        "log" => {
            let parent = parent_pid();
            in_thread(ThreadKind::Vcpu, SeccompMode::Log, move || {
                // A filter is on (not mode Off) ...
                let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
                assert!(status.contains("Seccomp:\t2\n"), "{status}");
                // ... and a call off the vCPU list is logged by the host
                // kernel, and done.
                assert_eq!(parent_pid(), parent);
            })
        }
        other => panic!("unknown case {other}"),
    }
    if !["allowed", "log", "open"].contains(&case.as_str()) {
        panic!("case {case}: the forbidden call returned");
    }
}

/// Runs `body` in a thread named `kiln-test` under the filter of `kind`.
fn in_thread(kind: ThreadKind, mode: SeccompMode, body: impl FnOnce() + Send + 'static) {
    spawn("kiln-test".into(), kind, mode, body)
        .expect("spawning a filtered thread")
        .join()
        .expect("the thread's body");
}

/// Every kind of thread, filtered, does what such a thread does (a lock,
/// a channel, a write, memory, a thread of its own for `kiln run`'s main
/// thread) and ends normally; its /proc status says filter mode.
fn allowed() {
    for kind in ThreadKind::ALL {
        let (tid_tx, tid) = mpsc::channel();
        let (end_tx, end) = mpsc::channel::<()>();
        let thread = spawn("kiln-test".into(), kind, SeccompMode::On, move || {
            // SAFETY: gettid has no arguments.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let data = vec![7u8; 1 << 20]; // mmap'd by malloc
            std::io::Write::write_all(&mut std::io::stderr(), &data[..0]).unwrap();
            if kind.starts_threads() {
                let inner = std::thread::spawn(|| std::sync::Mutex::new(1).into_inner());
                assert_eq!(inner.join().unwrap().unwrap(), 1);
            }
            end.recv().unwrap();
        })
        .unwrap();
        let tid = tid.recv().unwrap();
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        assert!(status.contains("Seccomp:\t2\n"), "{kind:?}: {status}");
        end_tx.send(()).unwrap();
        thread.join().unwrap();
    }
    println!("every kind ran filtered");
}

fn parent_pid() -> libc::pid_t {
    // SAFETY: getppid has no arguments.
    unsafe { libc::getppid() }
}
