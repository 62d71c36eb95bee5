//! The guest agent driven on the host, over a Unix socket pair (no VM):
//! the protocol as a host would speak it, and hostile hosts.

use kiln_init::agent::{serve, AgentConfig, AgentError, Ended};
use kiln_init::protocol::*;
use kiln_init::spec::ExecSpec;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::Duration;

struct Host {
    sock: UnixStream,
    dec: Decoder,
    agent: Option<JoinHandle<Result<Ended, AgentError>>>,
}

impl Host {
    fn start() -> Self {
        let (a, b) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || serve(OwnedFd::from(b), AgentConfig::default()));
        a.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut h = Host {
            sock: a,
            dec: Decoder::new(),
            agent: Some(agent),
        };
        assert_eq!(h.recv(), Some(Msg::Hello { version: VERSION }));
        h
    }

    fn send(&mut self, m: Msg) {
        let mut b = Vec::new();
        m.encode(&mut b).unwrap();
        self.sock.write_all(&b).unwrap();
    }

    fn recv(&mut self) -> Option<Msg> {
        self.recv_or(|e| panic!("agent answers in time: {e}"))
    }

    /// As `recv`, calling `timed_out` when the agent does not answer in time.
    fn recv_or(&mut self, timed_out: impl Fn(std::io::Error)) -> Option<Msg> {
        loop {
            if let Some(m) = self.dec.next_msg().unwrap() {
                return Some(m);
            }
            let mut buf = [0u8; 65536];
            let n = match self.sock.read(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    timed_out(e);
                    return None;
                }
            };
            if n == 0 {
                return None;
            }
            self.dec.feed(&buf[..n]);
        }
    }

    fn exec(&mut self, id: u32, argv: &[&str], stdin: bool, timeout_ms: u64) {
        self.send(Msg::Exec {
            id,
            opts: ExecOptions {
                stdin,
                timeout_ms,
                terminal: None,
            },
            spec: ExecSpec::new(argv.iter().copied()),
        });
    }

    /// Collects (stdout, stderr, end) of one exec, granting credit as it reads.
    fn collect(&mut self, id: u32) -> (Vec<u8>, Vec<u8>, Msg) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            let m = self.recv().expect("connection open");
            match m {
                Msg::Started { id: i, .. } if i == id => {}
                Msg::Stdout { id: i, data } if i == id => self.take(id, &mut out, data),
                Msg::Stderr { id: i, data } if i == id => {
                    self.send(Msg::Credit {
                        id,
                        stream: Stream::Stderr,
                        bytes: data.len() as u32,
                    });
                    err.extend(data);
                }
                Msg::StdinCredit { .. } => {}
                m @ (Msg::Exited { .. } | Msg::ExecFailed { .. }) => return (out, err, m),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Keeps exec `id`'s stdout `data` and gives its credit back.
    fn take(&mut self, id: u32, out: &mut Vec<u8>, data: Vec<u8>) {
        self.send(Msg::Credit {
            id,
            stream: Stream::Stdout,
            bytes: data.len() as u32,
        });
        out.extend(data);
    }

    /// Starts `script` under `sh -c` on a terminal of `rows` x `cols`, with
    /// stdin.
    fn exec_on_terminal(&mut self, id: u32, script: &str, rows: u16, cols: u16) {
        self.send(Msg::Exec {
            id,
            opts: ExecOptions {
                stdin: true,
                timeout_ms: 0,
                terminal: Some(WindowSize { rows, cols }),
            },
            spec: ExecSpec::new(["sh", "-c", script]),
        });
    }

    /// Reads exec `id`'s terminal output (granting credit) until `marker`
    /// has appeared in it; returns all of it so far. There are no STDERR
    /// frames on a terminal: one fails the test.
    fn read_until(&mut self, id: u32, out: &mut Vec<u8>, marker: &str) {
        while !String::from_utf8_lossy(out).contains(marker) {
            let text = String::from_utf8_lossy(out).into_owned();
            let timed_out = |e| panic!("waiting for {marker:?} in {text:?}: {e}");
            match self.recv_or(timed_out).expect("connection open") {
                Msg::Started { id: i, .. } if i == id => {}
                Msg::StdinCredit { .. } => {}
                Msg::Stdout { id: i, data } if i == id => self.take(id, out, data),
                other => panic!(
                    "waiting for {marker:?} in {:?}: unexpected {other:?}",
                    String::from_utf8_lossy(out)
                ),
            }
        }
    }

    fn shutdown(mut self) -> Result<Ended, AgentError> {
        self.send(Msg::Shutdown);
        self.agent.take().unwrap().join().unwrap()
    }
}

fn exited(id: u32, code: i32) -> Msg {
    Msg::Exited {
        id,
        status: ExitStatus::Code(code),
        reason: ExitReason::Normal,
    }
}

#[test]
fn runs_commands_with_separate_streams_and_statuses() {
    let mut h = Host::start();
    h.exec(
        1,
        &["sh", "-c", "printf out; printf err >&2; exit 7"],
        false,
        0,
    );
    let (o, e, end) = h.collect(1);
    assert_eq!(
        (o.as_slice(), e.as_slice(), end),
        (&b"out"[..], &b"err"[..], exited(1, 7))
    );
    // All 256 byte values, and a forged frame header in the output.
    let mut forged = Vec::new();
    exited(2, 0).encode(&mut forged).unwrap();
    let octal: String = forged.iter().map(|b| format!("\\{b:03o}")).collect();
    let script = format!("printf '{octal}'; exit 3");
    h.exec(2, &["sh", "-c", &script], false, 0);
    let (o, _, end) = h.collect(2);
    assert_eq!(o, forged);
    assert_eq!(end, exited(2, 3));
    let all = "i=0; while [ $i -lt 256 ]; do printf \"\\\\$(printf %o $i)\"; i=$((i+1)); done";
    h.exec(3, &["bash", "-c", all], false, 0);
    let (o, _, end) = h.collect(3);
    assert_eq!(end, exited(3, 0));
    assert_eq!(o, (0..=255u8).collect::<Vec<_>>());
    assert_eq!(h.shutdown().unwrap(), Ended::Shutdown);
}

#[test]
fn missing_commands_fail_like_a_shell() {
    let mut h = Host::start();
    h.exec(1, &["/no/such/program"], false, 0);
    match h.collect(1).2 {
        Msg::ExecFailed { code, message, .. } => {
            assert_eq!(code, 127);
            assert!(message.contains("not found"), "{message}");
        }
        m => panic!("{m:?}"),
    }
    h.exec(2, &["/etc/passwd"], false, 0);
    assert!(matches!(h.collect(2).2, Msg::ExecFailed { code: 126, .. }));
    // An id that does not exist: ignored, not fatal.
    h.send(Msg::Stdin {
        id: 99,
        data: b"x".to_vec(),
    });
    h.send(Msg::Signal { id: 99, signal: 9 });
    h.send(Msg::Credit {
        id: 99,
        stream: Stream::Stdout,
        bytes: 5,
    });
    h.exec(3, &["true"], false, 0);
    assert_eq!(h.collect(3).2, exited(3, 0));
    h.shutdown().unwrap();
}

/// Groups and limits reach the command; a limit the kernel refuses is an
/// `EXEC_FAILED` naming the reason, and the agent goes on.
#[test]
fn groups_and_limits_reach_the_command_or_fail_its_start() {
    use kiln_init::spec::{Resource, Rlimit};
    // SAFETY: plain syscall without arguments.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: setgroups needs root, as the agent in a guest has");
        return;
    }
    let mut h = Host::start();
    let mut spec = ExecSpec::new([
        "sh",
        "-c",
        "grep ^Groups: /proc/self/status; grep 'core file' /proc/self/limits",
    ]);
    spec.groups = vec![4242];
    spec.rlimits = vec![Rlimit {
        resource: Resource::Core,
        soft: 1234,
        hard: 5678,
    }];
    let exec = |id, spec: &ExecSpec| Msg::Exec {
        id,
        opts: ExecOptions::default(),
        spec: spec.clone(),
    };
    h.send(exec(1, &spec));
    let (out, err, end) = h.collect(1);
    assert_eq!(end, exited(1, 0), "{}", String::from_utf8_lossy(&err));
    let out = String::from_utf8(out).unwrap();
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(words[..2], ["Groups:", "4242"], "{out}");
    assert_eq!(words[6..9], ["1234", "5678", "bytes"], "{out}");
    spec.rlimits[0] = Rlimit {
        resource: Resource::Nofile,
        soft: u64::MAX - 1,
        hard: u64::MAX - 1,
    };
    h.send(exec(2, &spec));
    match h.collect(2).2 {
        Msg::ExecFailed { code, message, .. } => {
            assert_eq!(code, 126);
            assert!(message.starts_with("sh: "), "{message}");
            assert!(message.contains("not permitted"), "{message}");
        }
        m => panic!("{m:?}"),
    }
    h.exec(3, &["true"], false, 0);
    assert_eq!(h.collect(3).2, exited(3, 0));
    h.shutdown().unwrap();
}

#[test]
fn stdin_flows_with_credit_and_signals_and_timeouts_end_commands() {
    let mut h = Host::start();
    h.exec(1, &["sha256sum"], true, 0);
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut sent = 0usize;
    let mut window = STDIN_WINDOW as usize;
    let mut out = Vec::new();
    loop {
        while sent < data.len() && window > 0 {
            let n = (data.len() - sent).min(MAX_DATA).min(window);
            h.send(Msg::Stdin {
                id: 1,
                data: data[sent..sent + n].to_vec(),
            });
            sent += n;
            window -= n;
        }
        if sent == data.len() {
            h.send(Msg::StdinEof { id: 1 });
            sent += 1;
        }
        match h.recv().unwrap() {
            Msg::StdinCredit { bytes, .. } => window += bytes as usize,
            Msg::Started { .. } => {}
            Msg::Stdout { data, .. } => out.extend(data),
            Msg::Exited { status, .. } => {
                assert_eq!(status, ExitStatus::Code(0));
                break;
            }
            m => panic!("{m:?}"),
        }
    }
    let mut want = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    want.stdin.take().unwrap().write_all(&data).unwrap();
    assert_eq!(out, want.wait_with_output().unwrap().stdout);

    h.exec(2, &["sleep", "100"], false, 0);
    assert!(matches!(h.recv(), Some(Msg::Started { .. })));
    h.send(Msg::Signal { id: 2, signal: 15 });
    assert!(matches!(
        h.collect(2).2,
        Msg::Exited {
            status: ExitStatus::Signal(15),
            ..
        }
    ));
    h.exec(3, &["sh", "-c", "sleep 100 & sleep 100"], false, 300);
    let end = h.collect(3).2;
    assert_eq!(
        end,
        Msg::Exited {
            id: 3,
            status: ExitStatus::Signal(9),
            reason: ExitReason::TimedOut
        }
    );
    h.shutdown().unwrap();
}

#[test]
fn output_never_exceeds_the_window_without_credit() {
    let mut h = Host::start();
    h.exec(1, &["sh", "-c", "yes"], false, 0);
    // Read without granting credit: the agent sends exactly one window.
    let mut got = 0usize;
    while got < OUTPUT_WINDOW as usize {
        match h.recv().expect("connection open") {
            Msg::Started { id: 1, .. } => {}
            Msg::Stdout { id: 1, data } => got += data.len(),
            m => panic!("unexpected {m:?}"),
        }
    }
    assert_eq!(got, OUTPUT_WINDOW as usize);
    // Then nothing more of it: another exec runs start to end meanwhile, and
    // `collect` fails on any frame of exec 1 arriving in between. (`yes`
    // never stops, so an agent that ignored the window would keep sending.)
    h.exec(2, &["echo", "hi"], false, 0);
    let (o, _, end) = h.collect(2);
    assert_eq!((o, end), (b"hi\n".to_vec(), exited(2, 0)));
    // Credit for 1000 bytes brings exactly 1000 more, and again no more.
    h.send(Msg::Credit {
        id: 1,
        stream: Stream::Stdout,
        bytes: 1000,
    });
    let mut more = 0usize;
    while more < 1000 {
        match h.recv().expect("connection open") {
            Msg::Stdout { id: 1, data } => more += data.len(),
            m => panic!("unexpected {m:?}"),
        }
    }
    assert_eq!(more, 1000);
    h.exec(3, &["true"], false, 0);
    assert_eq!(h.collect(3).2, exited(3, 0));
    h.shutdown().unwrap();
}

#[test]
fn hostile_hosts_get_an_error_not_a_panic() {
    let cases: Vec<Vec<u8>> = vec![
        vec![0, 0, 0, 0, 0x42, 0, 0, 0, 0],             // unknown kind
        vec![0xff, 0xff, 0xff, 0xff, 0x02, 1, 0, 0, 0], // huge stdin
        vec![4, 0, 0, 0, 0x81, 0, 0, 0, 0, 1, 0, 0, 0], // guest-only kind
        vec![1, 0, 0],                                  // truncated, then EOF
    ];
    for bytes in cases {
        let mut h = Host::start();
        h.sock.write_all(&bytes).unwrap();
        h.sock.shutdown(std::net::Shutdown::Write).unwrap();
        let r = h.agent.take().unwrap().join().unwrap();
        assert!(r.is_err(), "{bytes:?}: {r:?}");
    }
    // Stdin beyond the window is a violation.
    let mut h = Host::start();
    h.exec(1, &["sleep", "5"], true, 0);
    // (The pipe absorbs up to 64 KiB, so send two windows' worth.)
    for _ in 0..(2 * STDIN_WINDOW as usize / MAX_DATA) {
        let mut b = Vec::new();
        encode_data(&mut b, K_STDIN, 1, &[0; MAX_DATA]);
        let _ = h.sock.write_all(&b);
    }
    let r = h.agent.take().unwrap().join().unwrap();
    assert!(matches!(r, Err(AgentError::Violation(_))), "{r:?}");
}

/// A reader that hands out one byte per call, as the worst vsock chunking.
struct OneByte<'a>(&'a [u8]);

impl Read for OneByte<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match (self.0.split_first(), buf.is_empty()) {
            (Some((b, rest)), false) => {
                buf[0] = *b;
                self.0 = rest;
                Ok(1)
            }
            _ => Ok(0),
        }
    }
}

#[test]
fn frames_reassemble_from_one_byte_reads() {
    // Well past the decoder's 64 KiB compaction point, with full-size and
    // odd-size STDIN frames between other kinds, as a host sends them.
    let mut msgs = Vec::new();
    let mut x: u32 = 0x2545_f491;
    for i in 0..40u32 {
        let len = match i % 3 {
            0 => MAX_DATA,
            1 => 1 + (i as usize * 977) % MAX_DATA,
            _ => 7,
        };
        let data = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        msgs.push(Msg::Stdin {
            id: 1 + i % 2,
            data,
        });
        if i % 5 == 0 {
            msgs.push(Msg::Credit {
                id: 1,
                stream: Stream::Stdout,
                bytes: i,
            });
        }
    }
    msgs.push(Msg::StdinEof { id: 1 });
    let mut bytes = Vec::new();
    for m in &msgs {
        m.encode(&mut bytes).unwrap();
    }
    let mut r = OneByte(&bytes);
    let mut d = Decoder::new();
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        let n = r.read(&mut b).unwrap();
        if n == 0 {
            break;
        }
        d.feed(&b[..n]);
        while let Some(m) = d.next_msg().unwrap() {
            got.push(m);
        }
    }
    d.finish().unwrap();
    assert_eq!(got, msgs);
}

/// A command on a terminal: `tty` names a pseudo-terminal, the size asked
/// for is the terminal's, a `RESIZE` changes it and sends the command
/// SIGWINCH, typed input arrives as from a keyboard (a line, and Ctrl-C as
/// SIGINT to its foreground group), stderr is the terminal too (no STDERR
/// frame), and the status comes after the last output.
#[test]
fn a_command_on_a_terminal_gets_its_size_resizes_and_keys() {
    // A test started in the background by a shell starts with SIGINT
    // ignored, and commands inherit ignored signals (as with std's
    // Command); the guest's agent (PID 1) ignores none.
    // SAFETY: setting a disposition to the default; no handler involved.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
    let mut h = Host::start();
    let script = "trap 'echo winch-$(stty size | tr \\  x)' WINCH; \
                  trap 'echo got-int; exit 7' INT; \
                  tty; stty size; echo err >&2; echo ready; \
                  until [ -n \"$line\" ]; do read line; done; echo \"line=$line\"; \
                  sh -c 'echo sleeping; exec sleep 100'; \
                  echo not-interrupted; exit 1";
    h.exec_on_terminal(1, script, 24, 80);
    let mut out = Vec::new();
    h.read_until(1, &mut out, "ready\r\n");
    let text = String::from_utf8_lossy(&out).into_owned();
    let lines: Vec<&str> = text.split("\r\n").collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{text:?}");
    assert_eq!(lines[1], "24 80", "{text:?}");
    // stderr on the terminal, with the terminal's newline translation.
    assert_eq!(lines[2], "err", "{text:?}");
    h.send(Msg::Resize {
        id: 1,
        size: WindowSize {
            rows: 50,
            cols: 132,
        },
    });
    h.read_until(1, &mut out, "winch-50x132\r\n");
    // The terminal echoes what is typed; the command reads the line (the
    // loop: SIGWINCH's trap may interrupt a `read`).
    h.send(Msg::Stdin {
        id: 1,
        data: b"hello\r".to_vec(),
    });
    h.read_until(1, &mut out, "line=hello\r\n");
    // Ctrl-C: SIGINT to the foreground group (the sleep, and the shell,
    // whose trap exits 7). The marker comes from the process that becomes
    // the sleep, which has SIGINT at its default from its start: a shell
    // that has not yet started its child would take the signal and wait.
    h.read_until(1, &mut out, "sleeping\r\n");
    h.send(Msg::Stdin {
        id: 1,
        data: vec![0x03],
    });
    h.read_until(1, &mut out, "got-int\r\n");
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(!text.contains("not-interrupted"), "{text:?}");
    match h.recv().expect("connection open") {
        Msg::StdinCredit { .. } => assert_eq!(h.recv(), Some(exited(1, 7))),
        m => assert_eq!(m, exited(1, 7)),
    }
    h.shutdown().unwrap();
}

/// Everything a command prints on its terminal reaches the host before its
/// status (the master is drained to its end, EIO), within the credit
/// window: the command prints a little more than a window ("y\n" 88 048
/// times, sent as "y\r\n": 264 144 bytes, 2000 past the window: little
/// enough for the terminal's buffers to hold) and exits while the agent,
/// out of credit, still has the rest in the terminal; only then does the
/// host give credit.
#[test]
fn a_terminal_is_drained_before_the_status() {
    let mut h = Host::start();
    h.exec_on_terminal(1, "yes | head -c 176096; exit 4", 24, 80);
    let mut out = Vec::new();
    let mut pid = 0;
    while out.len() < OUTPUT_WINDOW as usize {
        match h.recv().expect("connection open") {
            Msg::Started { id: 1, pid: p } => pid = p as i32,
            Msg::Stdout { id: 1, data } => out.extend(data),
            m => panic!("unexpected {m:?} after {} bytes", out.len()),
        }
    }
    assert_eq!(out.len(), OUTPUT_WINDOW as usize);
    // The command (the agent's child, so this process's) has exited: its
    // pidfd turns readable (or it is gone already: reaped by the agent).
    // SAFETY: plain syscall; the fd is owned at once.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd >= 0 {
        // SAFETY: a fresh fd owned by no one else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
        let mut pfd = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 20_000) };
        assert_eq!(ready, 1, "the command did not exit");
    } else {
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ESRCH),
            "pidfd_open({pid}): {e}"
        );
    }
    h.send(Msg::Credit {
        id: 1,
        stream: Stream::Stdout,
        bytes: OUTPUT_WINDOW,
    });
    let (rest, err, end) = h.collect(1);
    out.extend(rest);
    assert!(err.is_empty());
    assert_eq!(end, exited(1, 4));
    assert_eq!(out.len(), 264_144);
    assert!(out == b"y\r\n".repeat(88_048), "the output differs");
    h.shutdown().unwrap();
}

/// Hostile or mistaken terminal frames: a `RESIZE` for a command without a
/// terminal (or for no command) is ignored; a size of 0, or a `RESIZE` of
/// the wrong length, is a protocol error; stdin after its end is a
/// violation on a terminal as on a pipe.
#[test]
fn bad_terminal_frames_are_refused_or_ignored() {
    let mut h = Host::start();
    h.exec(1, &["sh", "-c", "read x; echo \"$x\"; exit 2"], true, 0);
    h.send(Msg::Resize {
        id: 1,
        size: WindowSize { rows: 5, cols: 5 },
    });
    h.send(Msg::Resize {
        id: 99,
        size: WindowSize { rows: 5, cols: 5 },
    });
    h.send(Msg::Stdin {
        id: 1,
        data: b"piped\n".to_vec(),
    });
    let (out, _, end) = h.collect(1);
    assert_eq!((out, end), (b"piped\n".to_vec(), exited(1, 2)));
    h.shutdown().unwrap();

    let resize = |payload: &[u8]| {
        [
            &(payload.len() as u32).to_le_bytes()[..],
            &[K_RESIZE, 1, 0, 0, 0],
            payload,
        ]
        .concat()
    };
    let exec_zero_rows = {
        let spec = ExecSpec::new(["true"]).encode().unwrap();
        let p = [&[2u8][..], &[0; 8], &[0, 0, 80, 0], &spec].concat();
        [&(p.len() as u32).to_le_bytes()[..], &[0x01, 1, 0, 0, 0], &p].concat()
    };
    for (what, bytes, error) in [
        ("0 rows", resize(&[0, 0, 80, 0]), "RESIZE"),
        ("0 columns", resize(&[24, 0, 0, 0]), "RESIZE"),
        ("3 bytes", resize(&[24, 0, 80]), "RESIZE"),
        ("an EXEC of 0 rows", exec_zero_rows, "EXEC"),
    ] {
        let mut h = Host::start();
        h.sock.write_all(&bytes).unwrap();
        // An agent that took the frame ends at end of file, not an error.
        h.sock.shutdown(std::net::Shutdown::Write).unwrap();
        let r = h.agent.take().unwrap().join().unwrap();
        assert!(
            matches!(r, Err(AgentError::Protocol(ProtocolError::BadPayload(e))) if e == error),
            "{what}: {r:?}"
        );
    }
    // A RESIZE longer than its kind allows is refused from its header.
    let mut h = Host::start();
    h.sock.write_all(&resize(&[0; 5])).unwrap();
    h.sock.shutdown(std::net::Shutdown::Write).unwrap();
    let r = h.agent.take().unwrap().join().unwrap();
    assert!(
        matches!(
            r,
            Err(AgentError::Protocol(ProtocolError::Oversize {
                kind: K_RESIZE,
                len: 5
            }))
        ),
        "{r:?}"
    );

    let mut h = Host::start();
    h.exec_on_terminal(1, "sleep 5", 24, 80);
    h.send(Msg::StdinEof { id: 1 });
    h.send(Msg::Stdin {
        id: 1,
        data: b"late".to_vec(),
    });
    h.sock.shutdown(std::net::Shutdown::Write).unwrap();
    let r = h.agent.take().unwrap().join().unwrap();
    assert!(
        matches!(r, Err(AgentError::Violation("stdin after STDIN_EOF"))),
        "{r:?}"
    );
}
