//! The sandbox API against kiln's guest agent run on the host (a thread
//! serving a Unix socket pair): everything but the VM, in seconds.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln::sandbox::{Command, ExitStatus, Sandbox, SandboxError};
use kiln_init::agent::{serve, AgentConfig, AgentError, Ended};
use kiln_init::protocol::{Decoder, Msg, Stream, OUTPUT_WINDOW};

type Agent = JoinHandle<Result<Ended, AgentError>>;

/// kiln's agent on a thread, serving `guest` (one end of a socket pair).
fn agent_on(guest: UnixStream) -> Agent {
    std::thread::spawn(move || serve(OwnedFd::from(guest), AgentConfig::default()))
}

fn sandbox() -> (Sandbox, Agent) {
    let (host, guest) = UnixStream::pair().unwrap();
    let agent = agent_on(guest);
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
    // Forged EXITED and STDOUT frames in a command's output, for every id
    // up to 16 (its own and a command still running), change nothing: they
    // arrive as its output, byte for byte.
    let mut running = sb.spawn(sh("cat; exit 7").stdin_piped()).unwrap();
    let mut forged = Vec::new();
    for id in 1..=16 {
        let exited = Msg::Exited {
            id,
            status: kiln_init::protocol::ExitStatus::Code(0),
            reason: kiln_init::protocol::ExitReason::Normal,
        };
        exited.encode(&mut forged).unwrap();
        let data = b"forged".to_vec();
        Msg::Stdout { id, data }.encode(&mut forged).unwrap();
    }
    let octal: String = forged.iter().map(|b| format!("\\{b:03o}")).collect();
    let out = sb.exec(sh(&format!("printf '{octal}'; exit 4"))).unwrap();
    assert_eq!(out.status, ExitStatus::Code(4));
    assert!(out.stdout == forged, "output altered");
    let mut stdin = running.stdin().unwrap();
    let mut stdout = running.stdout().unwrap();
    stdin.write_all(b"real").unwrap();
    drop(stdin);
    let mut got = Vec::new();
    stdout.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"real");
    assert_eq!(running.wait().unwrap(), ExitStatus::Code(7));
    assert!(sb.exec(Command::new("a\0b")).is_err());
    sb.shutdown().unwrap();
    assert_eq!(agent.join().unwrap().unwrap(), Ended::Shutdown);
}

#[test]
fn limits_timeouts_and_concurrency() {
    let (sb, _agent) = sandbox();
    let e = sb
        .exec(sh("sleep 100").timeout(Duration::from_millis(300)))
        .unwrap_err();
    assert!(matches!(e, SandboxError::Timeout { .. }), "{e}");
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

/// Measures this process's memory, so it runs alone in a child process: no
/// other test's allocations come and go meanwhile.
#[test]
fn spawn_streams_large_output_with_bounded_memory_and_stdin() {
    if !kiln_prereq::in_child() {
        kiln_prereq::run_in_child(
            concat!(
                module_path!(),
                "::spawn_streams_large_output_with_bounded_memory_and_stdin"
            ),
            &[],
        );
        return;
    }
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

/// This process's children (every thread's), for leak checks.
fn children() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .map(|c| c.split_whitespace().count())
        .sum()
}

/// Exact counts, so the test runs alone in a child process of its own: no
/// other test's threads, descriptors or commands come and go meanwhile.
#[test]
fn sandboxes_leave_no_fds_threads_or_processes_behind() {
    if !kiln_prereq::in_child() {
        kiln_prereq::run_in_child(
            concat!(
                module_path!(),
                "::sandboxes_leave_no_fds_threads_or_processes_behind"
            ),
            &[],
        );
        return;
    }
    // Warm up lazily created process-wide state (and wait for that agent
    // thread to end, as the rounds below do).
    let (sb, agent) = sandbox();
    drop(sb);
    agent.join().unwrap().unwrap();
    let before = (count("/proc/self/fd"), count("/proc/self/task"), children());
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
    let after = (count("/proc/self/fd"), count("/proc/self/task"), children());
    assert_eq!(after, before, "(fds, threads, child processes)");
}

/// An agent that stops reading (hung or hostile): once a frame cannot go
/// out within the send timeout, the connection is given up, and every call
/// returns, a wait for a command that never reported its end included. The
/// timeout (seconds) is shortened on the test's own handle of the socket.
#[test]
fn an_agent_that_stops_reading_ends_the_connection() {
    let (host, mut agent) = UnixStream::pair().unwrap();
    let mut hello = Vec::new();
    let version = kiln_init::protocol::VERSION;
    kiln_init::protocol::Msg::Hello { version }
        .encode(&mut hello)
        .unwrap();
    agent.write_all(&hello).unwrap();
    let knob = host.try_clone().unwrap();
    let sb = Sandbox::connect(host, Duration::from_secs(10)).unwrap();
    assert!(
        knob.write_timeout().unwrap().is_some(),
        "sends have no timeout"
    );
    knob.set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut p = sb.spawn(Command::new("cat").stdin_piped()).unwrap();
    let mut stdin = p.stdin().unwrap();
    // One-byte frames fill the socket long before the stdin window is used.
    while stdin.write(b"x").is_ok() {}
    match p.wait() {
        Err(SandboxError::Disconnected { reason, .. }) => {
            assert!(reason.contains("stopped reading"), "{reason}")
        }
        other => panic!("wait gave {other:?}"),
    }
    drop(stdin);
    drop(p);
    sb.shutdown().unwrap();
    drop(agent);
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
fn chunked_sandbox() -> (Sandbox, Agent) {
    let (host, relay_host) = UnixStream::pair().unwrap();
    let (relay_guest, guest) = UnixStream::pair().unwrap();
    relay(
        relay_host.try_clone().unwrap(),
        relay_guest.try_clone().unwrap(),
        0x1234_5678,
    );
    relay(relay_guest, relay_host, 0x9abc_def0);
    let agent = agent_on(guest);
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
    let scratch = common::Scratch::new("slow-stdin");
    let tmp = scratch.path("copy");
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

/// What crossed between a sandbox and its agent, per exec id: the argv[0]
/// of each EXEC, the stdout bytes the agent sent and the stdout credit the
/// host granted.
#[derive(Default)]
struct Tally {
    argv0: HashMap<u32, Vec<u8>>,
    stdout: HashMap<u32, usize>,
    credit: HashMap<u32, usize>,
}

impl Tally {
    fn count(&mut self, msg: Msg) {
        match msg {
            Msg::Exec { id, spec, .. } => {
                self.argv0.insert(id, spec.argv[0].clone());
            }
            Msg::Stdout { id, data } => *self.stdout.entry(id).or_default() += data.len(),
            Msg::Credit {
                id,
                stream: Stream::Stdout,
                bytes,
            } => *self.credit.entry(id).or_default() += bytes as usize,
            _ => {}
        }
    }

    /// The id of the exec whose argv[0] is `name`.
    fn id_of(&self, name: &str) -> Option<u32> {
        let found = self
            .argv0
            .iter()
            .find(|(_, a)| a.as_slice() == name.as_bytes());
        found.map(|(&id, _)| id)
    }

    fn stdout(&self, id: u32) -> usize {
        self.stdout.get(&id).copied().unwrap_or(0)
    }

    fn credit(&self, id: u32) -> usize {
        self.credit.get(&id).copied().unwrap_or(0)
    }
}

/// A protocol tap between a sandbox and its agent: forwards every byte both
/// ways unchanged and tallies each frame before forwarding its last byte.
#[derive(Clone, Default)]
struct Tap(Arc<(Mutex<Tally>, Condvar)>);

impl Tap {
    fn tally(&self) -> MutexGuard<'_, Tally> {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn relay(&self, mut from: UnixStream, mut to: UnixStream) {
        let tap = self.clone();
        std::thread::spawn(move || {
            let (mut decoder, mut buf) = (Decoder::new(), vec![0u8; 64 << 10]);
            while let Ok(n @ 1..) = from.read(&mut buf) {
                decoder.feed(&buf[..n]);
                let mut tally = tap.tally();
                while let Some(msg) = decoder.next_msg().expect("well-formed frames") {
                    tally.count(msg);
                }
                drop(tally);
                tap.0 .1.notify_all();
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    }

    /// Waits until the command `name` has sent a full output window, and
    /// returns its exec id.
    fn full_window_of(&self, name: &str) -> u32 {
        self.wait_until(&format!("EXEC of {name}"), |t| t.id_of(name).is_some());
        let id = self.tally().id_of(name).unwrap();
        let window = OUTPUT_WINDOW as usize;
        self.wait_until("a full window of output", |t| t.stdout(id) >= window);
        id
    }

    /// Waits until `cond` holds for the tally. The bound only turns a hang
    /// into a failure; it is no timing goal.
    fn wait_until(&self, what: &str, cond: impl Fn(&Tally) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut tally = self.tally();
        while !cond(&tally) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "never happened: {what}");
            tally = self.0 .1.wait_timeout(tally, left).unwrap().0;
        }
    }
}

/// A sandbox whose connection to its agent runs through a [`Tap`].
fn tapped_sandbox() -> (Sandbox, Tap, Agent) {
    let (host, tap_host) = UnixStream::pair().unwrap();
    let (tap_guest, guest) = UnixStream::pair().unwrap();
    let tap = Tap::default();
    tap.relay(
        tap_host.try_clone().unwrap(),
        tap_guest.try_clone().unwrap(),
    );
    tap.relay(tap_guest, tap_host);
    let agent = agent_on(guest);
    let sb = Sandbox::connect(host, Duration::from_secs(10)).unwrap();
    (sb, tap, agent)
}

/// Once this returns, every frame the agent sent before it and every frame
/// the host sent in answer has crossed the tap: the agent's frames are
/// dispatched in order before the first exec's EXITED (so any credit the
/// host sends for them is written before the second EXEC), and the second
/// EXEC reaches the agent only after the tap has counted that credit.
fn settle(sb: &Sandbox) {
    for _ in 0..2 {
        assert!(sb.exec(Command::new("true")).unwrap().status.success());
    }
}

/// `seq 1 N` as it prints it.
fn seq_output(n: u32) -> Vec<u8> {
    (1..=n)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect()
}

/// README: the host returns output credit only as the consumer reads, so a
/// stopped reader holds the command back after one window, and the host
/// buffers no more than that window for it.
#[test]
fn credit_is_returned_only_for_what_the_reader_read() {
    let (sb, tap, agent) = tapped_sandbox();
    let want = seq_output(500_000);
    let mut p = sb.spawn(Command::new("seq").args(["1", "500000"])).unwrap();
    let mut out = p.stdout().unwrap();
    let id = tap.full_window_of("seq");
    let window = OUTPUT_WINDOW as usize;
    settle(&sb);
    {
        let t = tap.tally();
        assert_eq!(t.credit(id), 0, "credit granted before anything was read");
        assert_eq!(t.stdout(id), window, "output beyond the window");
    }
    // Read a part: credit follows what was read, never more.
    let mut part = vec![0u8; 100_000];
    out.read_exact(&mut part).unwrap();
    settle(&sb);
    {
        let t = tap.tally();
        assert!(
            (1..=part.len()).contains(&t.credit(id)),
            "credit {} after reading {}",
            t.credit(id),
            part.len()
        );
        assert!(
            t.stdout(id) <= window + t.credit(id),
            "agent beyond its window"
        );
    }
    // The rest arrives whole and in order: nothing was dropped on the way.
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).unwrap();
    part.extend(rest);
    assert!(
        part == want,
        "{} bytes of {} arrived intact",
        part.len(),
        want.len()
    );
    assert!(p.wait().unwrap().success());
    settle(&sb);
    assert!(tap.tally().credit(id) <= want.len());
    sb.shutdown().unwrap();
    assert_eq!(agent.join().unwrap().unwrap(), Ended::Shutdown);
}

/// Credit goes back in batches, not per read: a command that prints a few
/// lines costs the agent no CREDIT frame (in a VM each frame is a receive
/// and a credit update of the guest kernel's own), whether its output is
/// collected by `exec` or read from a spawned process's stdout.
#[test]
fn a_few_lines_of_output_cost_no_credit_frame() {
    let (sb, tap, agent) = tapped_sandbox();
    let out = sb.exec(sh("echo hello; sleep 0.1; echo there")).unwrap();
    assert_eq!(out.stdout, b"hello\nthere\n");
    let mut p = sb.spawn(Command::new("seq").args(["1", "1000"])).unwrap();
    let mut text = Vec::new();
    p.stdout().unwrap().read_to_end(&mut text).unwrap();
    assert_eq!(text, seq_output(1000));
    assert!(p.wait().unwrap().success());
    settle(&sb);
    let t = tap.tally();
    for name in ["sh", "seq"] {
        let id = t.id_of(name).unwrap();
        assert!(t.stdout(id) > 0);
        assert_eq!(t.credit(id), 0, "credit frames for {name}'s output");
    }
    drop(t);
    sb.shutdown().unwrap();
    assert_eq!(agent.join().unwrap().unwrap(), Ended::Shutdown);
}

/// README: "memory stays bounded whatever commands print, and a slow reader
/// of one command never stalls another". A command that prints without end
/// to a reader that has stopped holds one window on the host, while other
/// commands stream megabytes and take stdin.
#[test]
fn a_stopped_reader_bounds_memory_and_stalls_no_other_command() {
    let (sb, tap, agent) = tapped_sandbox();
    let mut endless = sb.spawn(Command::new("yes")).unwrap();
    let mut endless_out = endless.stdout().unwrap();
    let id = tap.full_window_of("yes");
    let window = OUTPUT_WINDOW as usize;
    // Others run meanwhile: each bounded by a timeout, so a stall fails the
    // test instead of hanging it.
    let limit = Duration::from_secs(120);
    let big = sb
        .exec(
            Command::new("head")
                .args(["-c", "8388608", "/dev/zero"])
                .timeout(limit),
        )
        .unwrap();
    assert_eq!(big.stdout.len(), 8 << 20);
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 31 + i / 4093) as u8).collect();
    let sum = sb
        .exec(
            Command::new("sha256sum")
                .stdin_bytes(data.clone())
                .timeout(limit),
        )
        .unwrap();
    assert_eq!(sum.stdout, host_sha256(&data));
    std::thread::scope(|s| {
        for n in 0..3 {
            let sb = &sb;
            s.spawn(move || {
                let cmd = sh(&format!("seq 1 {}", 100_000 * (n + 1))).timeout(limit);
                let out = sb.exec(cmd).unwrap();
                assert!(out.stdout == seq_output(100_000 * (n + 1)), "seq {n}");
            });
        }
    });
    settle(&sb);
    {
        // All the while, the stopped command's output held on the host
        // (sent, never read) stayed one window.
        let t = tap.tally();
        assert_eq!((t.stdout(id), t.credit(id)), (window, 0));
    }
    // The stopped command is still intact: its first bytes are `yes` lines.
    let mut head = [0u8; 8];
    endless_out.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"y\ny\ny\ny\n");
    drop(endless_out);
    drop(endless);
    sb.shutdown().unwrap();
    assert_eq!(agent.join().unwrap().unwrap(), Ended::Shutdown);
}

/// Guest input is hostile: an agent that ignores credit and floods one
/// command's stdout gets no more than one window of host memory for it.
#[test]
fn an_agent_that_ignores_credit_cannot_grow_host_memory() {
    use kiln_init::protocol::{encode_data, ExitReason, K_STDOUT, MAX_DATA, VERSION};
    let (host, mut guest) = UnixStream::pair().unwrap();
    let flood = 4usize << 20;
    let mut from_host = guest.try_clone().unwrap();
    let fake = std::thread::spawn(move || {
        let (mut decoder, mut buf) = (Decoder::new(), vec![0u8; 64 << 10]);
        let mut frames = Vec::new();
        Msg::Hello { version: VERSION }.encode(&mut frames).unwrap();
        guest.write_all(&frames).unwrap();
        let mut next_exec = || loop {
            if let Some(msg) = decoder.next_msg().unwrap() {
                if let Msg::Exec { id, .. } = msg {
                    return Some(id);
                }
                continue;
            }
            match from_host.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => decoder.feed(&buf[..n]),
            }
        };
        let exited = |id| Msg::Exited {
            id,
            status: kiln_init::protocol::ExitStatus::Code(0),
            reason: ExitReason::Normal,
        };
        let mut frames = Vec::new();
        let flooded = next_exec().unwrap();
        for _ in 0..flood / MAX_DATA {
            encode_data(&mut frames, K_STDOUT, flooded, &[b'x'; MAX_DATA]);
        }
        exited(flooded).encode(&mut frames).unwrap();
        // Every later exec just ends.
        while let Some(id) = next_exec() {
            exited(id).encode(&mut frames).unwrap();
            if guest.write_all(&frames).is_err() {
                break;
            }
            frames.clear();
        }
    });
    let sb = Sandbox::connect(host, Duration::from_secs(10)).unwrap();
    let mut p = sb.spawn(Command::new("flood")).unwrap();
    let mut out = p.stdout().unwrap();
    // The flood and its EXITED are written before the second exec's EXITED,
    // so once that exec returns the host has taken in every frame.
    assert!(sb.exec(Command::new("barrier")).unwrap().status.success());
    let mut got = Vec::new();
    out.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), OUTPUT_WINDOW as usize, "of {flood} bytes sent");
    drop(out);
    drop(p);
    drop(sb);
    fake.join().unwrap();
}

/// README: `exec` collects at most 64 MiB by default (stdout plus stderr);
/// one byte more kills the command with `SandboxError::OutputLimit`.
#[test]
fn exec_keeps_64_mib_by_default() {
    let (sb, agent) = sandbox();
    let out = sb
        .exec(Command::new("head").args(["-c", "67108864", "/dev/zero"]))
        .unwrap();
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(out.stdout.len(), 64 << 20);
    let e = sb
        .exec(Command::new("head").args(["-c", "67108865", "/dev/zero"]))
        .unwrap_err();
    assert!(
        matches!(e, SandboxError::OutputLimit { limit, .. } if limit == 64 << 20),
        "{e}"
    );
    sb.shutdown().unwrap();
    assert_eq!(agent.join().unwrap().unwrap(), Ended::Shutdown);
}

/// README: `stdin()`, `stdout()` and `stderr()` are taken once: a second
/// call is `None`, and so is `stdin()` of a command without `stdin_piped`.
#[test]
fn stdio_handles_are_taken_once() {
    let (sb, agent) = sandbox();
    let mut p = sb.spawn(sh("cat; echo err >&2").stdin_piped()).unwrap();
    let mut stdin = p.stdin().expect("first take");
    let mut stdout = p.stdout().expect("first take");
    let mut stderr = p.stderr().expect("first take");
    assert!(p.stdin().is_none(), "stdin taken twice");
    assert!(p.stdout().is_none(), "stdout taken twice");
    assert!(p.stderr().is_none(), "stderr taken twice");
    // The handles taken first are the command's.
    stdin.write_all(b"in").unwrap();
    drop(stdin);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    stdout.read_to_end(&mut out).unwrap();
    stderr.read_to_end(&mut err).unwrap();
    assert_eq!((&out[..], &err[..]), (&b"in"[..], &b"err\n"[..]));
    assert_eq!(p.wait().unwrap(), ExitStatus::Code(0));
    for cmd in [sh("true"), sh("cat").stdin_bytes(&b"x"[..])] {
        let mut p = sb.spawn(cmd).unwrap();
        assert!(p.stdin().is_none(), "no stdin unless piped");
        assert!(p.wait().unwrap().success());
    }
    sb.shutdown().unwrap();
    assert_eq!(agent.join().unwrap().unwrap(), Ended::Shutdown);
}

/// A fake agent on `guest`: says HELLO with `version`, then hands every
/// frame the host sends to `serve` (with the guest's end to answer on)
/// until `serve` returns false or the host hangs up.
fn fake_agent(
    mut guest: UnixStream,
    version: u32,
    mut serve: impl FnMut(Msg, &mut UnixStream) -> bool + Send + 'static,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut hello = Vec::new();
        Msg::Hello { version }.encode(&mut hello).unwrap();
        if guest.write_all(&hello).is_err() {
            return;
        }
        let mut from_host = guest.try_clone().unwrap();
        let (mut decoder, mut buf) = (Decoder::new(), vec![0u8; 64 << 10]);
        loop {
            while let Some(msg) = decoder.next_msg().expect("well-formed frames") {
                if !serve(msg, &mut guest) {
                    return;
                }
            }
            match from_host.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => decoder.feed(&buf[..n]),
            }
        }
    })
}

fn send(to: &mut UnixStream, msg: Msg) {
    let mut frame = Vec::new();
    msg.encode(&mut frame).unwrap();
    let _ = to.write_all(&frame);
}

/// README: the version is in HELLO; a host refuses an agent of another
/// protocol version with `SandboxError::Version` (one line, both numbers).
#[test]
fn an_agent_of_another_protocol_version_is_refused() {
    use kiln_init::protocol::VERSION;
    for version in [VERSION + 1, VERSION - 1, u32::MAX] {
        let (host, guest) = UnixStream::pair().unwrap();
        let fake = fake_agent(guest, version, |_, _| false);
        let e = Sandbox::connect(host, Duration::from_secs(10))
            .err()
            .expect("another version is refused");
        assert!(
            matches!(e, SandboxError::Version(v, ours) if v == version && ours == VERSION),
            "{e:?}"
        );
        let text = e.to_string();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains(&format!("version {version}, this kiln speaks {VERSION}")),
            "{text}"
        );
        fake.join().unwrap();
    }
}

/// README: stdin has a credit window too. A fake agent that grants no
/// credit of its own until the host has sent the whole window, then grants
/// 1000 bytes, then ends the command: the host's writes stop at the window
/// plus the credit (the write after them waits for credit and fails when
/// the command ends), and the agent receives exactly that many bytes.
#[test]
fn the_host_keeps_within_the_stdin_credit_window() {
    use kiln_init::protocol::{ExitReason, STDIN_WINDOW, VERSION};
    let window = STDIN_WINDOW as usize;
    let (host, guest) = UnixStream::pair().unwrap();
    let (count_tx, counted) = std::sync::mpsc::channel();
    let (mut exec, mut received, mut granted, mut exited) = (None, 0usize, 0usize, false);
    let fake = fake_agent(guest, VERSION, move |msg, to| {
        match msg {
            Msg::Exec { id, opts, .. } => {
                assert!(opts.stdin, "a piped stdin");
                exec = Some(id);
            }
            Msg::Stdin { id, data } => {
                assert_eq!(Some(id), exec);
                received += data.len();
                if received == window && granted == 0 {
                    granted = 1000;
                    send(to, Msg::StdinCredit { id, bytes: 1000 });
                } else if received >= window + granted && !exited {
                    // Ends the command: the host's next write fails.
                    exited = true;
                    let status = kiln_init::protocol::ExitStatus::Code(0);
                    let reason = ExitReason::Normal;
                    send(to, Msg::Exited { id, status, reason });
                }
            }
            Msg::StdinEof { .. } => {
                count_tx.send(received).unwrap();
                return false;
            }
            _ => {}
        }
        true
    });
    let sb = Sandbox::connect(host, Duration::from_secs(10)).unwrap();
    let mut p = sb.spawn(Command::new("sink").stdin_piped()).unwrap();
    let mut stdin = p.stdin().unwrap();
    // Writes until the host refuses: 4 windows offered, a few bytes each
    // time so that a host sending past its credit shows at once.
    let data = vec![b'x'; 4 * window];
    let mut written = 0;
    while written < data.len() {
        let end = (written + 3000).min(data.len());
        match stdin.write(&data[written..end]) {
            Ok(n) => written += n,
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
                break;
            }
        }
    }
    drop(stdin); // STDIN_EOF: the agent reports what it received
    let received = counted
        .recv_timeout(common::HANG_LIMIT)
        .expect("the fake agent's count");
    assert_eq!(written, window + 1000, "bytes the host took");
    assert_eq!(received, window + 1000, "bytes the agent received");
    assert_eq!(p.wait().unwrap(), ExitStatus::Code(0));
    drop(p);
    drop(sb);
    fake.join().unwrap();
}

/// README: a command that cannot be executed is 126, with the reason on its
/// stderr, as a shell reports it (and 127 for one that is not found).
#[test]
fn a_file_that_cannot_be_executed_is_status_126() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = common::Scratch::new("not-executable");
    let script = scratch.path("script");
    std::fs::write(&script, "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (sb, agent) = sandbox();
    let out = sb.exec(Command::new(&script)).unwrap();
    assert_eq!(out.status, ExitStatus::Code(126));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("kiln: ") && stderr.contains(script.to_str().unwrap()),
        "{stderr}"
    );
    assert!(stderr.contains("ermission denied"), "{stderr}");
    // The same file made executable runs.
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = sb.exec(Command::new(&script)).unwrap();
    assert_eq!(
        (out.status, &out.stdout[..]),
        (ExitStatus::Code(0), &b"ran\n"[..])
    );
    sb.shutdown().unwrap();
    assert_eq!(agent.join().unwrap().unwrap(), Ended::Shutdown);
}

/// README: exceeding `output_limit` kills the command: its process group
/// is gone, a background process of it included, not only its output.
#[test]
fn exceeding_the_output_limit_kills_the_command_and_its_group() {
    let scratch = common::Scratch::new("output-limit-kill");
    let pids = scratch.path("pids");
    let (sb, agent) = sandbox();
    let script = "yes > /dev/null & echo $$ $! > \"$P\"; exec yes";
    let e = sb
        .exec(
            sh(script)
                .env("P", pids.to_str().unwrap())
                .output_limit(1 << 20),
        )
        .unwrap_err();
    assert!(matches!(e, SandboxError::OutputLimit { .. }), "{e}");
    // Written before the first byte of output, so before the limit.
    let text = std::fs::read_to_string(&pids).unwrap();
    let pids: Vec<i32> = text
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{text:?}");
    for pid in pids {
        assert!(
            common::process_ended(pid),
            "process {pid} of the command still runs"
        );
    }
    sb.shutdown().unwrap();
    assert_eq!(agent.join().unwrap().unwrap(), Ended::Shutdown);
}

/// The host's first frame is FRESH: the host's wall clock and entropy of
/// its own for every connection (after a snapshot restore, each copy of the
/// guest seeds its random pool and sets its clock from it).
#[test]
fn the_first_host_frame_gives_the_agent_entropy_and_the_clock() {
    use kiln_init::protocol::{FRESH_ENTROPY, VERSION};
    let first_host_frame = || {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let mut hello = Vec::new();
        Msg::Hello { version: VERSION }.encode(&mut hello).unwrap();
        guest.write_all(&hello).unwrap();
        let before = std::time::SystemTime::now();
        let sb = Sandbox::connect(host, Duration::from_secs(10)).unwrap();
        let (mut decoder, mut buf) = (Decoder::new(), [0u8; 256]);
        let msg = loop {
            if let Some(msg) = decoder.next_msg().unwrap() {
                break msg;
            }
            let n = guest.read(&mut buf).unwrap();
            assert!(n > 0, "the host sent nothing");
            decoder.feed(&buf[..n]);
        };
        let after = std::time::SystemTime::now();
        drop(sb);
        let Msg::Fresh {
            realtime_ns,
            entropy,
            identity,
        } = msg
        else {
            panic!("the host's first frame is {msg:?}");
        };
        // A sandbox over a connection asks for no identity of its own.
        assert_eq!(identity, kiln_init::protocol::Identity::default());
        let ns = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        };
        assert!((ns(before)..=ns(after)).contains(&realtime_ns));
        assert_eq!(entropy.len(), FRESH_ENTROPY);
        entropy
    };
    let (a, b) = (first_host_frame(), first_host_frame());
    assert_ne!(a, b, "two connections got the same entropy");
    assert!(a.iter().any(|&x| x != 0));
}

/// Reads `stdout` on a thread of its own; `until` then waits (20 s at
/// most) for a marker in what arrived.
struct TerminalOutput {
    chunks: std::sync::mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

impl TerminalOutput {
    fn new(mut stdout: impl Read + Send + 'static) -> Self {
        let (tx, chunks) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Self {
            chunks,
            seen: Vec::new(),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    fn until(&mut self, marker: &str) {
        while !self.text().contains(marker) {
            match self.chunks.recv_timeout(Duration::from_secs(20)) {
                Ok(chunk) => self.seen.extend(chunk),
                Err(e) => panic!("waiting for {marker:?} in {:?}: {e}", self.text()),
            }
        }
    }
}

/// `Command::tty`: the command runs on a terminal of the size asked for
/// (`TERM=xterm` unless set), stderr included, typed input is echoed and
/// read as lines, `Process::resize` changes the size (SIGWINCH), Ctrl-C
/// interrupts the foreground program; the status is the command's.
/// Refused: a size of 0, a resize of a command without a terminal.
#[test]
fn tty_commands_get_a_terminal_that_resizes() {
    // A test started in the background by a shell starts with SIGINT
    // ignored, and commands inherit ignored signals (as with std's
    // Command); the guest's agent (PID 1) ignores none.
    // SAFETY: setting a disposition to the default; no handler involved.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
    let (sb, agent) = sandbox();
    let out = sb
        .exec(sh("tty; stty size; echo \"TERM=$TERM\"; echo err >&2").tty(24, 80))
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.split("\r\n").collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{text:?}");
    assert_eq!(lines[1..], ["24 80", "TERM=xterm", "err", ""], "{text:?}");
    assert!(out.stderr.is_empty());
    assert_eq!(out.status, ExitStatus::Code(0));
    // TERM set by the caller, before or after tty().
    for cmd in [
        sh("echo $TERM").env("TERM", "vt100").tty(5, 5),
        sh("echo $TERM").tty(5, 5).env("TERM", "vt100"),
    ] {
        assert_eq!(sb.exec(cmd).unwrap().stdout, b"vt100\r\n");
    }

    let script = "trap 'echo winch-$(stty size | tr \" \" x)' WINCH; \
                  trap 'echo got-int' INT; echo ready; \
                  until [ -n \"$line\" ]; do read line; done; echo \"line=$line\"; \
                  sh -c 'echo sleeping; exec sleep 100'; echo \"after=$?\"; exit 7";
    let mut process = sb.spawn(sh(script).tty(24, 80).stdin_piped()).unwrap();
    let mut stdin = process.stdin().unwrap();
    let mut out = TerminalOutput::new(process.stdout().unwrap());
    out.until("ready\r\n");
    process.resize(40, 100).unwrap();
    out.until("winch-40x100\r\n");
    stdin.write_all(b"typed\r").unwrap();
    out.until("line=typed\r\n");
    out.until("sleeping\r\n");
    stdin.write_all(&[0x03]).unwrap();
    // The sleep died of SIGINT (130), the shell trapped it and went on.
    out.until("after=130\r\n");
    assert!(
        out.text().contains("typed\r\n"),
        "no echo: {:?}",
        out.text()
    );
    assert!(out.text().contains("got-int"), "{:?}", out.text());
    assert_eq!(process.wait().unwrap(), ExitStatus::Code(7));
    // A command that has ended: not an error.
    process.resize(10, 10).unwrap();

    let bad_size = sb.spawn(sh("true").tty(0, 80)).err().unwrap();
    assert!(matches!(bad_size, SandboxError::Terminal(_)), "{bad_size}");
    assert_eq!(
        bad_size.to_string(),
        "terminal: a window of 0 rows and 80 columns (each must be at least 1)"
    );
    let piped = sb.spawn(sh("read x; exit 3").stdin_piped()).unwrap();
    let e = piped.resize(24, 80).unwrap_err();
    assert_eq!(
        e.to_string(),
        "terminal: sh does not run on a terminal (Command::tty)"
    );
    let on_tty = sb.spawn(sh("sleep 100").tty(24, 80)).unwrap();
    assert!(matches!(
        on_tty.resize(24, 0),
        Err(SandboxError::Terminal(_))
    ));
    drop((piped, on_tty));
    sb.shutdown().unwrap();
    assert_eq!(agent.join().unwrap().unwrap(), Ended::Shutdown);
}
