//! Fault tests: what kiln and its guest see when something around the VM
//! fails. Three real-kernel boots and one tiny-guest loop:
//!
//! - `kill_9_after_the_guests_sync_loses_nothing`: `kiln run` is SIGKILLed
//!   right after the guest's `sync` returned; the ext4 image is consistent
//!   and holds the file, and the guest's flushes reached `fdatasync` on
//!   the image before `sync` returned (strace on the monitor).
//! - `full_host_disk_oom_kill_and_removed_tap_leave_the_sandbox_working`: one
//!   sandbox (40 MiB) whose disk is a sparse image on a tiny tmpfs (in a
//!   mount namespace of the test's own) and whose card is on a TAP in a
//!   network namespace of the test's own. A command the guest's OOM killer
//!   kills is `Signal(9)`; a write past the host's free space is an I/O
//!   error in the guest; the TAP deleted under a running command neither
//!   stops nor spins the monitor; after each, the next command works.
//! - `vsock_host_peer_killed_mid_stream`: the `--vsock` path, the host peer
//!   of a guest connection (a child process) SIGKILLed while the guest
//!   streams to it: the guest gets an error, its next connection works, and
//!   `kiln run` ends with the guest's status.
//! - `a_thousand_vms_leave_no_fds_threads_or_memory_behind`: tiny guests
//!   created and stopped 1000 times in this process.
//!
//! Every test holds `one_vm()` for its whole body, checks included, so the
//! cycle test's fd and thread counts are not disturbed by another test of
//! this binary starting or ending.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{
    guest_kernel, guest_rootfs, have_kvm, kiln_cli, require, run_checked, sha256_hex, Netns,
    Scratch,
};
use kiln::config::{DiskConfig, NetConfig};
use kiln::sandbox::{Command as GuestCommand, ExitStatus, Sandbox};
use kiln::{ConsoleIo, VmOutcome};

/// `--timeout` of each real-kernel run (and the sandbox's boot timeout): it
/// only turns a hang into a failure (a boot took over 400 s on a loaded host).
const RUN_TIMEOUT: Duration = Duration::from_secs(1200);

/// The lines of `source` (a pipe), as they arrive: a thread forwards each
/// one; the channel ends at end of file.
struct Lines {
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn new(source: impl Read + Send + 'static) -> Self {
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(source).split(b'\n') {
                let Ok(line) = line else { break };
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
        Self {
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `needle`; false at end of file.
    fn wait_for(&mut self, needle: &str) -> bool {
        while let Ok(line) = self.lines.recv() {
            let found = line.contains(needle);
            self.seen.push(line);
            if found {
                return true;
            }
        }
        false
    }

    /// Everything up to end of file.
    fn rest(&mut self) -> &[String] {
        while let Ok(line) = self.lines.recv() {
            self.seen.push(line);
        }
        &self.seen
    }
}

/// (a) A 1 MiB file written on an ext4 `--disk` and `sync`ed; the guest
/// prints a marker once `sync` has returned and then sleeps; the test
/// SIGKILLs the monitor at the marker. The image must then be consistent
/// (its journal replays, nothing else to repair) and hold the file. kiln
/// runs under strace (only `fdatasync` traced), whose lines share the pipe
/// with the guest's output: an `fdatasync` of the image that returned 0 comes
/// before the marker (the guest's flushes reach `fdatasync` before they
/// complete; which flush it was, the mount's or `sync`'s, strace cannot tell).
#[test]
fn kill_9_after_the_guests_sync_loses_nothing() {
    let _vm = common::one_vm();
    if !common::real_kernel_prerequisites(&["mkfs.ext4", "debugfs", "e2fsck", "strace"]) {
        return;
    }
    let scratch = Scratch::new("faults-kill9");
    let image = scratch.path("kill9.img");
    fs::File::create(&image).unwrap().set_len(64 << 20).unwrap();
    run_checked(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
    let image = fs::canonicalize(&image).unwrap();

    const MARKER: &str = "kiln-fault-synced";
    let script = format!(
        "mount -t ext4 /dev/vda /mnt && seq 1 200000 | head -c 1048576 > /mnt/data.bin && sync \
         && echo {MARKER}; sleep 1000"
    );
    let (reader, writer) = common::pipe();
    let mut strace = Command::new("strace")
        .args(["--seccomp-bpf", "-f", "-qq", "-y", "-e", "trace=fdatasync"])
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(["run", "--kernel"])
        .arg(guest_kernel("vmlinux").unwrap())
        .arg("--rootfs")
        .arg(guest_rootfs())
        .args(["--user", "0:0", "--timeout"])
        .arg(format!("{}s", RUN_TIMEOUT.as_secs()))
        .arg("--disk")
        .arg(&image)
        .args(["--", "sh", "-c", &script])
        .env_remove("KILN_LOG")
        .stdin(Stdio::null())
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .spawn()
        .expect("running strace kiln run");
    let mut output = Lines::new(reader);
    let synced = output.wait_for(MARKER);
    // strace's only child is kiln.
    let kiln_pid = fs::read_to_string(format!("/proc/{0}/task/{0}/children", strace.id()))
        .unwrap_or_default()
        .trim()
        .to_string();
    if synced {
        let pid: libc::pid_t = kiln_pid.parse().expect("kiln's pid");
        // SAFETY: kill(2) with a pid and a signal number; no memory is passed.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    } else {
        let _ = strace.kill();
    }
    let status = strace.wait().unwrap();
    let seen = output.rest().to_vec();
    eprintln!("strace kiln run: {status}\n{}", seen.join("\n"));
    assert!(synced, "the guest never printed {MARKER}");

    let marker_at = seen.iter().position(|l| l.contains(MARKER)).unwrap();
    let flushed = format!("<{}>) = 0", image.display());
    assert!(
        seen[..marker_at]
            .iter()
            .any(|l| l.contains("fdatasync(") && l.contains(&flushed)),
        "no fdatasync of {} returned before the guest's sync did",
        image.display()
    );

    // The image as the dead monitor left it: its journal is replayed (and
    // nothing else repaired), then a full read-only check finds nothing.
    let replay = Command::new("e2fsck")
        .args(["-E", "journal_only", "-y"])
        .arg(&image)
        .output()
        .unwrap();
    let replay_out = String::from_utf8_lossy(&replay.stdout);
    eprintln!("e2fsck -E journal_only: {}\n{replay_out}", replay.status);
    assert!(
        matches!(replay.status.code(), Some(0 | 1)),
        "e2fsck -E journal_only: {}\n{replay_out}",
        replay.status
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn after the replay: {}\n{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout)
    );
    let data = run_checked(
        Command::new("debugfs")
            .args(["-R", "cat /data.bin"])
            .arg(&image)
            .stderr(Stdio::null()),
    );
    assert_eq!(
        data.stdout.len(),
        common::SEQ_PATTERN_LEN,
        "the file's length on the host"
    );
    assert_eq!(
        sha256_hex(&data.stdout),
        sha256_hex(&common::seq_pattern()),
        "the file's bytes on the host"
    );
}

/// The network of the TAP check (inside the test's own namespace).
const HOST_IP: &str = "10.0.4.1";
const GUEST_IP: &str = "10.0.4.2";
/// The sandbox's memory: about the least kiln's initramfs fits in, so
/// that the OOM check has little to fill (21 MiB free after boot). Every
/// page a guest process touches is cleared by emulated guest-kernel code on
/// a PVM host: 20 MiB took 2 min 47 s on a loaded one, 110 MiB (a 128 MiB
/// guest) did not fill in 4 min.
const GUEST_MEM: u64 = 40 << 20;
/// The disk of the full-host-disk check: a sparse image far larger than
/// the tmpfs it lives on.
const TMPFS_SIZE: &str = "1m";
const SPARSE_IMAGE: u64 = 16 << 20;

/// On the calling thread only (libtest runs each test on a thread of its
/// own, and `Netns::on_thread` runs this on a fresh one): a private mount
/// namespace, a tmpfs of `TMPFS_SIZE` on `dir` in it, and a sparse image
/// of `SPARSE_IMAGE` bytes there. The mount lives as long as a file on it is
/// open (the VM's disk) and is never seen outside this thread's namespace.
fn sparse_image_on_a_tiny_tmpfs(dir: &Path) -> PathBuf {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: unshare(2) with a flag; it changes only this thread's mount
    // namespace (and file system info), no memory is passed.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
    assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
    let root = CString::new("/").unwrap();
    // SAFETY: mount(2) with valid NUL-terminated strings and null pointers
    // where none is needed: makes every mount of the new namespace private,
    // so nothing mounted below propagates to the host's namespace.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    assert_eq!(
        rc,
        0,
        "mount --make-rprivate /: {}",
        std::io::Error::last_os_error()
    );
    let target = CString::new(dir.as_os_str().as_bytes()).unwrap();
    let fstype = CString::new("tmpfs").unwrap();
    let options = CString::new(format!("size={TMPFS_SIZE}")).unwrap();
    // SAFETY: as above; `options` is tmpfs's NUL-terminated option string.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
    let image = dir.join("full.img");
    fs::File::create(&image)
        .unwrap()
        .set_len(SPARSE_IMAGE)
        .unwrap();
    image
}

/// The CPU time (user + system, in clock ticks) the thread named `name` of
/// the sandbox's VM has used so far: a thread of this process, or of its
/// VM process (`Isolation::Process`, a child of this process).
fn thread_cpu_ticks(name: &str) -> u64 {
    let mut children = Vec::new();
    for task in fs::read_dir("/proc/self/task").unwrap().flatten() {
        let text = fs::read_to_string(task.path().join("children")).unwrap_or_default();
        children.extend(text.split_whitespace().map(|p| format!("/proc/{p}/task")));
    }
    let dirs = std::iter::once("/proc/self/task".to_string()).chain(children);
    let tasks = dirs.flat_map(|d| fs::read_dir(d).into_iter().flatten().flatten());
    for task in tasks {
        let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = fs::read_to_string(task.path().join("stat")).unwrap();
        // Fields after the command name (which ends at the last ')'):
        // state is field 3, utime 14 and stime 15.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        return fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    panic!("no thread named {name}");
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf with a valid name; no memory is passed.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(n > 0, "sysconf(_SC_CLK_TCK)");
    n as u64
}

fn sh(script: &str) -> GuestCommand {
    // Root in the guest: dd on /dev/vda, dmesg and ping need it.
    GuestCommand::new("sh")
        .arg("-c")
        .arg(script)
        .uid(0)
        .gid(0)
        .timeout(Duration::from_secs(600))
}

/// (b), (c), (e) in one sandbox boot; after each fault the next command
/// runs, and the VM ends as the agent ends it.
#[test]
fn full_host_disk_oom_kill_and_removed_tap_leave_the_sandbox_working() {
    let _vm = common::one_vm();
    if !common::real_kernel_prerequisites(&["ip"])
        || !require(
            Path::new("/dev/net/tun").exists(),
            "/dev/net/tun does not exist",
        )
    {
        return;
    }
    let ns = Netns::create(
        "faults",
        &[
            "ip tuntap add dev tap0 mode tap",
            &format!("ip addr add {HOST_IP}/24 dev tap0"),
            "ip link set tap0 up",
        ],
    );
    let scratch = Scratch::new("faults-sandbox");
    let mount_dir = scratch.path("tmpfs");
    fs::create_dir(&mount_dir).unwrap();
    let builder = Sandbox::builder()
        .kernel(guest_kernel("vmlinux").unwrap())
        .rootfs(guest_rootfs())
        .memory(GUEST_MEM)
        .timeout(RUN_TIMEOUT)
        .boot_timeout(RUN_TIMEOUT)
        .net(NetConfig {
            tap: "tap0".into(),
            mac: None,
            rate_limit: Default::default(),
        })
        .cmdline(format!("ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off"));
    // Built on a thread inside the network namespace (where kiln opens the
    // TAP) that made the tmpfs in its own mount namespace.
    let sb = ns.on_thread(move || {
        let image = sparse_image_on_a_tiny_tmpfs(&mount_dir);
        builder
            .disk(DiskConfig {
                path: image,
                read_only: false,
                id: None,
                rate_limit: Default::default(),
            })
            .build()
    });
    let sb = sb.unwrap_or_else(|e| panic!("{e}"));
    let alive = |after: &str| {
        let out = sb
            .exec(sh("echo alive"))
            .unwrap_or_else(|e| panic!("a command after {after}: {e}"));
        assert_eq!(
            (out.status, &out.stdout[..]),
            (ExitStatus::Code(0), &b"alive\n"[..]),
            "a command after {after}"
        );
    };

    // (e) A command that allocates until the guest kernel's OOM killer
    // kills it: its status is SIGKILL, the guest kernel says why.
    let started = Instant::now();
    let out = sb
        .exec(sh(
            "exec awk 'BEGIN { while (1) a[n++] = sprintf(\"%01000d\", n) }'",
        ))
        .unwrap();
    eprintln!("OOM command: {:?} in {:?}", out.status, started.elapsed());
    assert_eq!(
        out.status,
        ExitStatus::Signal(9),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = sb.exec(sh("dmesg")).unwrap();
    let log = String::from_utf8_lossy(&log.stdout);
    assert!(
        log.lines()
            .any(|l| l.contains("Out of memory: Killed process") && l.contains("(awk)")),
        "no OOM kill of awk in the guest's log:\n{log}"
    );
    alive("the OOM kill");

    // (b) Writes past what the host's tmpfs holds: the guest's dd fails
    // with an I/O error (the device answered IOERR), nothing else happens.
    let started = Instant::now();
    let out = sb
        .exec(sh(
            "dd if=/dev/vda of=/dev/vda bs=64k count=64 seek=64 iflag=direct oflag=direct; \
             echo dd=$?; dmesg | grep 'I/O error, dev vda'",
        ))
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!(
        "disk full: {:?} in {:?}\n{stdout}{stderr}",
        out.status,
        started.elapsed()
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("dd=") && l != "dd=0"),
        "dd succeeded on a full host disk: {stdout}"
    );
    assert!(
        stderr.contains("error writing") || stderr.contains("write error"),
        "dd's message: {stderr}"
    );
    assert!(
        stdout.contains("I/O error, dev vda") && stdout.contains("(WRITE)"),
        "the guest kernel saw no write error on vda: {stdout}"
    );
    alive("a full host disk");

    // (c) The TAP deleted while a command uses the network: the command
    // goes on (its ping fails), the monitor's event thread does not spin
    // (it spends under 5% of the time after the deletion on the CPU: 0
    // ticks measured; with the dead TAP's error event left watched, the
    // loop took 21% on a loaded host, where it gets only a share of a
    // core), and the next command runs.
    let mut p = sb
        .spawn(
            sh(&format!(
                "ping -c 1 -W 60 {HOST_IP} >/dev/null && echo up; read go; \
                 sleep 5; ping -c 2 -W 2 {HOST_IP} >/dev/null; echo ping-after=$?"
            ))
            .stdin_piped(),
        )
        .unwrap();
    let mut lines = Lines::new(p.stdout().unwrap());
    assert!(lines.wait_for("up"), "no network before the TAP went away");
    run_checked(&mut ns.exec(["ip", "link", "del", "tap0"]));
    let (ticks_before, deleted) = (thread_cpu_ticks("kiln-vmm"), Instant::now());
    let mut stdin = p.stdin().unwrap();
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    let status = p.wait().unwrap();
    let (ticks, wall) = (
        thread_cpu_ticks("kiln-vmm") - ticks_before,
        deleted.elapsed(),
    );
    let rest = lines.rest().join("\n");
    eprintln!("TAP removed: {status:?}, {rest:?}; the event thread used {ticks} ticks in {wall:?}");
    assert_eq!(status, ExitStatus::Code(0));
    assert!(rest.contains("ping-after=1"), "{rest:?}");
    assert!(
        (ticks as f64 / ticks_per_second() as f64) < wall.as_secs_f64() / 20.0,
        "the event thread used {ticks} clock ticks in {wall:?} after the TAP went away"
    );
    alive("the TAP's removal");

    let outcome = sb.shutdown().unwrap();
    eprintln!("shutdown: {outcome:?}");
    assert_eq!(
        outcome,
        Some(VmOutcome::Exited(0)),
        "the agent ends the VM when asked to"
    );
}

const VSOCK_CID: u32 = 3;
const VSOCK_HOST_PORT: u32 = 5678;

/// Waits until `listener` has a connection (poll) and accepts it; None
/// when `deadline` passes first.
fn accept_by(listener: &UnixListener, deadline: Instant) -> Option<std::os::unix::net::UnixStream> {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd for the duration of the call; the
        // listener stays open (borrowed).
        if unsafe { libc::poll(&mut pfd, 1, ms) } > 0 {
            return Some(listener.accept().expect("accepting the guest").0);
        }
    }
}

/// What the host peers of the vsock test saw.
struct PeerReport {
    /// Bytes of the guest's stream the first peer passed on before it died.
    streamed: usize,
    /// The second connection's answer to a PING.
    pong: String,
}

/// (d) The guest (tests/vsock_helper.c) connects to host port 5678 and is
/// asked to stream 1 GiB; the host peer is a `cat` child process holding
/// the connection, SIGKILLed once 256 KiB have passed through it. The guest
/// gets an error on its stream, connects again (a live peer answers a PING)
/// and the command ends with its own status, which `kiln run` returns.
#[test]
fn vsock_host_peer_killed_mid_stream() {
    let _vm = common::one_vm();
    if !common::real_kernel_prerequisites(&["gcc", "cat"]) {
        return;
    }
    let scratch = Scratch::new("faults-vsock");
    let rootfs = scratch.path("rootfs");
    common::build_busybox_root(&rootfs);
    if let Err(e) = common::build_static_helper("vsock_helper", &rootfs.join("bin/vsock-helper")) {
        require(false, &format!("guest vsock helper: {e}"));
        return;
    }
    // Socket paths stay short (108 bytes): the system temp directory.
    let sockets = Scratch::new_in(&std::env::temp_dir(), "faults-vsock");
    let socket = sockets.path("v.sock");
    let port_socket = format!("{}_{VSOCK_HOST_PORT}", socket.display());
    let listener = UnixListener::bind(&port_socket).unwrap();
    // Jailed, kiln runs as an unprivileged uid: it creates and removes its
    // socket there and connects to this one.
    common::hand_to_jail(&sockets.0);
    common::hand_to_jail(Path::new(&port_socket));

    // Also: on this classic path (--vsock), kiln's init runs a command
    // without --user unprivileged, as 65534:65534.
    let script = format!(
        "echo ids=$(id -u):$(id -g); \
         vsock-helper connect 2 {VSOCK_HOST_PORT}; echo first=$?; \
         vsock-helper connect 2 {VSOCK_HOST_PORT}; echo second=$?; exit 7"
    );
    let mut kiln = kiln_cli()
        .args(["run", "--kernel"])
        .arg(guest_kernel("vmlinux").unwrap())
        .arg("--rootfs")
        .arg(&rootfs)
        .arg("--vsock")
        .arg(format!("cid={VSOCK_CID},socket={}", socket.display()))
        .args(["--timeout", "600s", "--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kiln");
    let mut output = Lines::new(kiln.stdout.take().unwrap());
    let mut errors = kiln.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = errors.read_to_string(&mut all);
        all
    });

    let deadline = Instant::now() + Duration::from_secs(600);
    let peers = std::thread::spawn(move || {
        let mut stream = accept_by(&listener, deadline).expect("the guest never connected");
        stream.write_all(b"SEND 1073741824 1\n").unwrap();
        // The peer: a child process that owns the connection (the test
        // keeps no copy of it) and copies what it gets to a pipe.
        let mut peer = Command::new("cat")
            .stdin(Stdio::from(OwnedFd::from(stream)))
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting cat");
        let mut got = vec![0u8; 256 << 10];
        peer.stdout
            .take()
            .unwrap()
            .read_exact(&mut got)
            .expect("the guest's stream through the peer");
        peer.kill().unwrap();
        peer.wait().unwrap();
        let mut stream = accept_by(&listener, deadline).expect("no second connection");
        stream.write_all(b"PING again\n").unwrap();
        let mut pong = String::new();
        BufReader::new(stream.try_clone().unwrap())
            .read_line(&mut pong)
            .unwrap();
        stream.write_all(b"BYE\n").unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        PeerReport {
            streamed: got.len(),
            pong,
        }
    });
    let status = kiln.wait().unwrap();
    let seen = output.rest().join("\n");
    let errors = errors.join().unwrap();
    eprintln!("kiln run: {status}\n--- stdout\n{seen}\n--- stderr\n{errors}");
    let peers = peers.join().expect("the host peers");
    assert_eq!(peers.streamed, 256 << 10);
    assert_eq!(peers.pong, "PONG again\n", "the second connection");
    assert!(
        seen.contains("vsock-helper: write: "),
        "the guest's stream did not fail: {seen}"
    );
    assert!(seen.contains("ids=65534:65534"), "{seen}");
    assert!(seen.contains("first=1"), "{seen}");
    assert!(seen.contains("second=0"), "{seen}");
    assert_eq!(status.code(), Some(7), "kiln run's status: {errors}");
}

/// Tiny-guest VMs created and stopped in this process.
const CYCLES: usize = 1000;
/// What the process's resident memory may grow by over `CYCLES` VMs:
/// room for allocator caches and lazily touched pages (measured: 4 KiB of
/// growth), while a leak of one 4 KiB page per VM (4 MiB) fails it.
const RSS_ALLOWANCE_KIB: u64 = 2 << 10;
/// What its address space may grow by: a leaked guest memory mapping
/// (32 MiB) per VM would pass it within a few VMs.
const VM_SIZE_ALLOWANCE_KIB: u64 = 256 << 10;

/// `VmRSS` and `VmSize` of this process, in KiB.
fn memory_kib() -> (u64, u64) {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/self/status"))
    };
    (field("VmRSS:"), field("VmSize:"))
}

fn count(dir: &str) -> usize {
    fs::read_dir(dir).unwrap().count()
}

/// (f) 1000 VMs, each built, run and torn down: half run `hello` to its end
/// (status 42), half run `serial_irq` until it waits for input and are then
/// stopped. After a warm-up, the process's descriptors and threads are the
/// same in number at the end, and its memory within the allowances above.
#[test]
fn a_thousand_vms_leave_no_fds_threads_or_memory_behind() {
    let _vm = common::one_vm();
    if !require(have_kvm(), "/dev/kvm not accessible") {
        return;
    }
    let hello = common::guest_config("hello");
    let mut waiting = common::guest_config("serial_irq");
    waiting.timeout = None;
    let cycle = |i: usize| {
        if i % 2 == 0 {
            let (report, _) = common::run_guest(&hello, None);
            assert_eq!(report.outcome, VmOutcome::Exited(42), "VM {i}");
        } else {
            let capture = common::Capture::default();
            let io = ConsoleIo {
                output: Box::new(capture.clone()),
                input: None,
            };
            let vm = kiln::spawn(waiting.clone(), io, Instant::now()).unwrap();
            assert!(
                capture.wait_for(b"ready\n", common::HANG_LIMIT),
                "VM {i} never ran"
            );
            vm.stop();
            assert_eq!(vm.wait().unwrap().outcome, VmOutcome::Stopped, "VM {i}");
        }
    };
    // Warm-up: the logger, lazily opened files, the allocator's arenas.
    for i in 0..20 {
        cycle(i);
    }
    let (fds, threads) = (count("/proc/self/fd"), count("/proc/self/task"));
    let (rss, size) = memory_kib();
    let started = Instant::now();
    for i in 0..CYCLES {
        cycle(i);
    }
    let took = started.elapsed();
    let (rss_after, size_after) = memory_kib();
    eprintln!(
        "{CYCLES} VMs in {took:?}: fds {fds} -> {}, threads {threads} -> {}, \
         VmRSS {rss} -> {rss_after} KiB, VmSize {size} -> {size_after} KiB",
        count("/proc/self/fd"),
        count("/proc/self/task")
    );
    assert_eq!(count("/proc/self/fd"), fds, "file descriptors leaked");
    assert_eq!(count("/proc/self/task"), threads, "threads leaked");
    assert!(
        rss_after <= rss + RSS_ALLOWANCE_KIB,
        "VmRSS grew from {rss} to {rss_after} KiB over {CYCLES} VMs"
    );
    assert!(
        size_after <= size + VM_SIZE_ALLOWANCE_KIB,
        "VmSize grew from {size} to {size_after} KiB over {CYCLES} VMs"
    );
}
