//! The guest agent driven on the host, over a Unix socket pair (no VM):
//! the protocol as a host would speak it, and hostile hosts.

use kiln_init::agent::{serve, AgentConfig, AgentError, Ended};
use kiln_init::protocol::*;
use kiln_init::spec::ExecSpec;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
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
        loop {
            if let Some(m) = self.dec.next_msg().unwrap() {
                return Some(m);
            }
            let mut buf = [0u8; 65536];
            let n = self.sock.read(&mut buf).expect("agent answers in time");
            if n == 0 {
                return None;
            }
            self.dec.feed(&buf[..n]);
        }
    }

    fn exec(&mut self, id: u32, argv: &[&str], stdin: bool, timeout_ms: u64) {
        self.send(Msg::Exec {
            id,
            opts: ExecOptions { stdin, timeout_ms },
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
                Msg::Stdout { id: i, data } if i == id => {
                    self.send(Msg::Credit {
                        id,
                        stream: Stream::Stdout,
                        bytes: data.len() as u32,
                    });
                    out.extend(data);
                }
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
