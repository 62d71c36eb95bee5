//! The sandbox API against kiln's guest agent run on the host (a thread
//! serving a Unix socket pair): everything but the VM, in seconds.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln::sandbox::{Command, ExitStatus, Sandbox, SandboxError};
use kiln_init::agent::{serve, AgentConfig, AgentError, Ended};

fn sandbox() -> (Sandbox, JoinHandle<Result<Ended, AgentError>>) {
    let (host, guest) = UnixStream::pair().unwrap();
    let agent = std::thread::spawn(move || serve(OwnedFd::from(guest), AgentConfig::default()));
    (
        Sandbox::connect(host, Duration::from_secs(10)).unwrap(),
        agent,
    )
}

fn sh(script: &str) -> Command {
    Command::new("sh").arg("-c").arg(script)
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn exec_statuses_streams_env_cwd_and_failures() {
    let (sb, agent) = sandbox();
    let out = sb
        .exec(
            sh("printf out; printf err >&2; echo \"$FOO:$(pwd)\"; exit 3")
                .env("FOO", "bar")
                .current_dir("/tmp"),
        )
        .unwrap();
    assert_eq!(out.status, ExitStatus::Code(3));
    assert_eq!(out.stdout, b"outbar:/tmp\n");
    assert_eq!(out.stderr, b"err");
    let out = sb.exec(Command::new("/no/such")).unwrap();
    assert_eq!(out.status, ExitStatus::Code(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    let out = sb.exec(sh("kill -9 $$")).unwrap();
    assert_eq!(out.status, ExitStatus::Signal(9));
    let out = sb
        .exec(Command::new("cat").stdin_bytes(&b"hello"[..]))
        .unwrap();
    assert_eq!(out.stdout, b"hello");
    // A forged EXITED frame in the output changes nothing.
    let out = sb.exec(sh("printf '\\006\\000\\000\\000\\205\\001\\000\\000\\000\\000\\000\\000\\000\\000\\000'; exit 4")).unwrap();
    assert_eq!((out.status, out.stdout.len()), (ExitStatus::Code(4), 15));
    assert!(sb.exec(Command::new("a\0b")).is_err());
    sb.shutdown().unwrap();
    assert_eq!(agent.join().unwrap().unwrap(), Ended::Shutdown);
}

#[test]
fn limits_timeouts_and_concurrency() {
    let (sb, _agent) = sandbox();
    let t = Instant::now();
    let e = sb
        .exec(sh("sleep 100").timeout(Duration::from_millis(300)))
        .unwrap_err();
    assert!(matches!(e, SandboxError::Timeout { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5));
    let e = sb
        .exec(Command::new("yes").output_limit(1 << 20))
        .unwrap_err();
    assert!(matches!(e, SandboxError::OutputLimit { .. }), "{e}");
    assert!(e.to_string().contains("1048576"), "{e}");
    // 20 commands, 4 at a time, each with its own status.
    std::thread::scope(|s| {
        for t in 0..4 {
            let sb = &sb;
            s.spawn(move || {
                for i in 0..5 {
                    let n = t * 5 + i;
                    let out = sb.exec(sh(&format!("echo {n}; exit {n}"))).unwrap();
                    assert_eq!(out.status, ExitStatus::Code(n));
                    assert_eq!(out.stdout, format!("{n}\n").as_bytes());
                }
            });
        }
    });
    // Still usable.
    assert!(sb.exec(Command::new("true")).unwrap().status.success());
}

#[test]
fn spawn_streams_large_output_with_bounded_memory_and_stdin() {
    let (sb, _agent) = sandbox();
    let mut p = sb
        .spawn(Command::new("head").args(["-c", "67108864", "/dev/zero"]))
        .unwrap();
    let mut out = p.stdout().unwrap();
    let before = rss_kib();
    let (mut total, mut buf) = (0usize, vec![0u8; 65536]);
    let mut peak = before;
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
        if total % (8 << 20) < n {
            peak = peak.max(rss_kib());
        }
    }
    assert_eq!(total, 64 << 20);
    assert!(p.wait().unwrap().success());
    let growth = peak.saturating_sub(before);
    eprintln!("RSS before {before} KiB, peak {peak} KiB");
    assert!(growth < 16 * 1024, "RSS grew {growth} KiB");

    let mut p = sb.spawn(Command::new("sha256sum").stdin_piped()).unwrap();
    let mut stdin = p.stdin().unwrap();
    let mut stdout = p.stdout().unwrap();
    let data: Vec<u8> = (0..16u32 << 20).map(|i| (i ^ (i >> 9)) as u8).collect();
    let writer = {
        let data = data.clone();
        std::thread::spawn(move || {
            stdin.write_all(&data).unwrap();
        })
    };
    let mut got = String::new();
    stdout.read_to_string(&mut got).unwrap();
    writer.join().unwrap();
    assert!(p.wait().unwrap().success());
    let mut want = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    want.stdin.take().unwrap().write_all(&data).unwrap();
    assert_eq!(got.as_bytes(), want.wait_with_output().unwrap().stdout);
}

#[test]
fn sandboxes_leave_no_fds_or_threads_behind() {
    // Warm up lazily created process-wide state.
    drop(sandbox());
    let (fds, threads) = (count("/proc/self/fd"), count("/proc/self/task"));
    for _ in 0..20 {
        let (sb, agent) = sandbox();
        let mut p = sb.spawn(sh("echo hi; sleep 100")).unwrap();
        let mut line = [0u8; 3];
        p.stdout().unwrap().read_exact(&mut line).unwrap();
        assert_eq!(&line, b"hi\n");
        sb.exec(Command::new("true")).unwrap();
        drop(p);
        drop(sb);
        agent.join().unwrap().unwrap();
    }
    // Other tests run in parallel threads: allow for them, but not 20x leaks.
    let (fds2, threads2) = (count("/proc/self/fd"), count("/proc/self/task"));
    assert!(fds2 <= fds + 12, "fds {fds} -> {fds2}");
    assert!(threads2 <= threads + 8, "threads {threads} -> {threads2}");
}

/// Forwards `from` to `to` in small, varying chunks (1..=4096 bytes, now and
/// then 1-7 bytes, with short sleeps), as the VM's vsock device delivers.
fn relay(mut from: UnixStream, mut to: UnixStream, seed: u32) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let mut buf = vec![0u8; 4096];
        loop {
            let r = next();
            let want = match r % 8 {
                0 => 1 + (r >> 8) as usize % 7,
                _ => 1 + (r >> 8) as usize % 4096,
            };
            let n = match from.read(&mut buf[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            // Let the peer see each chunk on its own, as separate packets.
            std::thread::sleep(Duration::from_micros(if r % 64 == 1 { 500 } else { 20 }));
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    })
}

/// A sandbox whose agent sees the connection through chunking relays.
fn chunked_sandbox() -> (Sandbox, JoinHandle<Result<Ended, AgentError>>) {
    let (host, relay_host) = UnixStream::pair().unwrap();
    let (relay_guest, guest) = UnixStream::pair().unwrap();
    relay(
        relay_host.try_clone().unwrap(),
        relay_guest.try_clone().unwrap(),
        0x1234_5678,
    );
    relay(relay_guest, relay_host, 0x9abc_def0);
    let agent = std::thread::spawn(move || serve(OwnedFd::from(guest), AgentConfig::default()));
    (
        Sandbox::connect(host, Duration::from_secs(10)).unwrap(),
        agent,
    )
}

fn host_sha256(data: &[u8]) -> Vec<u8> {
    let mut p = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(data).unwrap();
    p.wait_with_output().unwrap().stdout
}

#[test]
fn stdin_survives_short_reads_and_a_slow_consumer() {
    let (sb, agent) = chunked_sandbox();
    let data: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let want = host_sha256(&data);
    // A consumer that starts late and then reads in small, slow bites, so
    // the agent's writes to the stdin pipe are partial and hit EAGAIN.
    let slow = "sleep 0.3; while :; do \
                n=$(dd bs=4096 count=1 2>/dev/null | tee -a \"$T\" | wc -c); \
                [ \"$n\" -gt 0 ] || break; done; sha256sum < \"$T\"; rm -f \"$T\"";
    let tmp = std::env::temp_dir().join(format!("kiln-slow-stdin-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let out = sb
        .exec(
            sh(slow)
                .env("T", tmp.to_str().unwrap())
                .stdin_bytes(data.clone()),
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, want, "slow consumer");
    // And plain sha256sum, with the sandbox's own stdin handle.
    let mut p = sb.spawn(Command::new("sha256sum").stdin_piped()).unwrap();
    let mut stdin = p.stdin().unwrap();
    let mut stdout = p.stdout().unwrap();
    let writer = {
        let data = data.clone();
        std::thread::spawn(move || stdin.write_all(&data).unwrap())
    };
    let mut got = Vec::new();
    stdout.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert!(p.wait().unwrap().success());
    assert_eq!(got, want, "sha256sum");
    // Output through the relay is intact too.
    let out = sb
        .exec(Command::new("head").args(["-c", "4194304", "/dev/zero"]))
        .unwrap();
    assert_eq!(out.stdout.len(), 4 << 20);
    assert!(out.stdout.iter().all(|&b| b == 0));
    sb.shutdown().unwrap();
    assert_eq!(agent.join().unwrap().unwrap(), Ended::Shutdown);
}
