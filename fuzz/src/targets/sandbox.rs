//! The sandbox host (`kiln::sandbox`) against a hostile guest agent that
//! never reads: frames of any kind, id and length (well-formed or not, one
//! at a time or in floods) arrive on the agent connection while the host
//! spawns commands, reads their output, writes their stdin, kills, waits
//! and tears down. Everything the host sends goes into a socket nobody
//! reads. Beyond the bounds every target has:
//! - the host's buffers stay within the protocol's windows (the memory cap:
//!   a misbehaving agent cannot make the host hold more than two output
//!   windows per command);
//! - no call blocks for good: each input ends with every process dropped
//!   and the sandbox torn down, with the agent still not reading (a hang is
//!   caught by libFuzzer's -timeout, or the replay tests' watchdog).
//!
//! The harness only makes calls that cannot legitimately wait for the
//! agent forever: it reads output and waits for commands it has seen end
//! (a mirror of the host's decoder tells it what the host saw), and syncs
//! with a sentinel command whose end it sends itself.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use kiln::sandbox::{Command, Process, ProcessStdin, Sandbox};
use kiln_init::protocol::{
    Decoder, Msg, HEADER_LEN, K_EXEC_FAILED, K_EXITED, K_HELLO, K_STARTED, K_STDERR,
    K_STDIN_CREDIT, K_STDOUT, MAX_DATA, MAX_PAYLOAD, OUTPUT_WINDOW, STDIN_WINDOW, VERSION,
};

use crate::input::{Input, Script};
use crate::Target;

pub const TARGET: Target = Target {
    name: "sandbox",
    run,
    // Two output windows per command the harness holds (and the sentinel),
    // the host's frame decoder and read buffer and the harness's mirror of
    // it (each at most a largest frame plus a read), one decoded message.
    memory_cap: (MAX_PROCS + 1) * 2 * OUTPUT_WINDOW as usize + 4 * MAX_PAYLOAD + (1 << 20),
    memory_per_input_byte: 0,
    seeds,
};

const MAX_PROCS: usize = 6;
/// The most one flood writes: more than the target's memory cap, so data
/// the host keeps without bound shows; more only costs time.
const FLOOD_BYTES: usize = 16 << 20;
/// The host's send timeout while fuzzing (see `run`).
const HOST_SEND_TIMEOUT: Duration = Duration::from_millis(20);
/// How long the fake agent waits for room before it gives up writing (the
/// host stopped reading: its reader thread is blocked sending to us).
const AGENT_WRITE_TIMEOUT: Duration = Duration::from_millis(20);

const OP_SPAWN: u8 = 0;
const OP_FRAME: u8 = 1;
const OP_RAW: u8 = 2;
const OP_FLOOD: u8 = 3;
const OP_SYNC: u8 = 4;
const OP_READ: u8 = 5;
const OP_WAIT: u8 = 6;
const OP_KILL: u8 = 7;
const OP_STDIN: u8 = 8;
const OP_CLOSE_STDIN: u8 = 9;
const OP_DROP: u8 = 10;
const OPS: u8 = 11;

/// Guest-to-host kinds a fuzzed frame picks from (or any byte).
const KINDS: [u8; 7] = [
    K_HELLO,
    K_STARTED,
    K_STDOUT,
    K_STDERR,
    K_EXITED,
    K_EXEC_FAILED,
    K_STDIN_CREDIT,
];

fn frame(kind: u8, id: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER_LEN + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.push(kind);
    f.extend_from_slice(&id.to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// The fake agent: writes whole frames or gives up (and then writes
/// nothing more), and decodes what it wrote as the host would.
struct Agent {
    stream: UnixStream,
    /// A write timed out, maybe inside a frame: the stream is given up.
    stuck: bool,
    mirror: Decoder,
    /// The host's decoder fails on what was written: its reader is gone.
    broken: bool,
    /// Commands whose end was written, in decoded order.
    ended: Vec<u32>,
}

impl Agent {
    fn write(&mut self, bytes: &[u8]) -> bool {
        if self.stuck || bytes.is_empty() {
            return !self.stuck;
        }
        if self.stream.write_all(bytes).is_err() {
            self.stuck = true;
            return false;
        }
        self.mirror.feed(bytes);
        while !self.broken {
            match self.mirror.next_msg() {
                Ok(Some(Msg::Exited { id, .. } | Msg::ExecFailed { id, .. })) => {
                    self.ended.push(id)
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => self.broken = true,
            }
        }
        true
    }

    /// The host will have decoded everything written once it decodes a
    /// frame written now.
    fn aligned(&self) -> bool {
        !self.stuck && !self.broken && self.mirror.pending() == 0
    }
}

struct Proc {
    id: u32,
    process: Process,
    stdin: Option<ProcessStdin>,
    stdin_sent: usize,
}

struct Rig {
    sandbox: Sandbox,
    agent: Agent,
    procs: Vec<Proc>,
    next_id: u32,
    /// Commands the host has seen end (ended and synced since).
    seen_ended: HashSet<u32>,
    /// The host reported the connection lost.
    dead: bool,
}

impl Rig {
    fn spawn(&mut self, flags: u8) -> Option<Proc> {
        let mut cmd = Command::new("fuzz");
        if flags & 1 != 0 {
            cmd = cmd.stdin_piped();
        }
        // Ids are handed out in order from 1, whether the spawn works or not.
        self.next_id += 1;
        let id = self.next_id;
        let mut process = self.sandbox.spawn(cmd).ok()?;
        // Dropping a handle discards that stream (and credits the agent).
        if flags & 2 != 0 {
            drop(process.stdout());
        }
        if flags & 4 != 0 {
            drop(process.stderr());
        }
        let stdin = process.stdin();
        Some(Proc {
            id,
            process,
            stdin,
            stdin_sent: 0,
        })
    }

    /// Waits until the host has dispatched everything written so far: a
    /// sentinel command, whose end is written now, is waited for.
    fn sync(&mut self) {
        if !self.agent.aligned() {
            return;
        }
        let Some(mut sentinel) = self.spawn(0) else {
            self.dead = true;
            return;
        };
        let exited = frame(K_EXITED, sentinel.id, &[0, 0, 0, 0, 0, 0]);
        if !self.agent.write(&exited) {
            return;
        }
        if sentinel.process.wait().is_err() {
            self.dead = true;
        }
        self.seen_ended.extend(self.agent.ended.iter().copied());
    }

    /// A command whose calls cannot wait for the agent forever.
    fn settled(&mut self, input: &mut Input) -> Option<usize> {
        let n = self.procs.len();
        let i = usize::from(input.u8()) % n.max(1);
        (n > 0 && (self.dead || self.seen_ended.contains(&self.procs[i].id))).then_some(i)
    }
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let (host, agent) = UnixStream::pair().expect("socketpair");
    agent
        .set_write_timeout(Some(AGENT_WRITE_TIMEOUT))
        .expect("timeout");
    let mut agent = Agent {
        stream: agent,
        stuck: false,
        mirror: Decoder::new(),
        broken: false,
        ended: Vec::new(),
    };
    if input.bool() {
        // Whatever the input starts with, then the agent hangs up.
        agent.write(input.bytes());
        let _ = agent.stream.shutdown(Shutdown::Write);
    } else {
        agent.write(&frame(K_HELLO, 0, &VERSION.to_le_bytes()));
    }
    // The host must give up on an agent that takes nothing for a while
    // (its send timeout, seconds). The option belongs to the socket, so a
    // handle of our own checks it is set and shortens it: such an input
    // then takes milliseconds.
    let knob = host.try_clone().expect("dup");
    let Ok(sandbox) = Sandbox::connect(host, Duration::from_secs(5)) else {
        return;
    };
    let timeout = knob.write_timeout().expect("SO_SNDTIMEO");
    assert!(
        timeout.is_some_and(|t| t <= Duration::from_secs(60)),
        "the sandbox sends to its agent without a timeout ({timeout:?})"
    );
    knob.set_write_timeout(Some(HOST_SEND_TIMEOUT))
        .expect("timeout");
    drop(knob);
    let mut rig = Rig {
        sandbox,
        agent,
        procs: Vec::new(),
        next_id: 0,
        seen_ended: HashSet::new(),
        dead: false,
    };
    let mut buf = vec![0u8; 64 << 10];
    while !input.is_empty() {
        match input.u8() % OPS {
            OP_SPAWN => {
                let flags = input.u8();
                if rig.procs.len() < MAX_PROCS {
                    if let Some(p) = rig.spawn(flags) {
                        rig.procs.push(p);
                    }
                }
            }
            OP_FRAME => {
                let kind = pick_kind(&mut input);
                let id = pick_id(&mut input, &rig);
                let payload = input.bytes();
                rig.agent.write(&frame(kind, id, payload));
            }
            OP_RAW => {
                let bytes = input.bytes();
                rig.agent.write(bytes);
            }
            OP_FLOOD => {
                let kind = pick_kind(&mut input);
                let id = pick_id(&mut input, &rig);
                let count = input.u16();
                let len = usize::from(input.u16()) % (MAX_DATA + 16);
                let fill = input.u8();
                let one = frame(kind, id, &vec![fill; len]);
                let count = usize::from(count).min(FLOOD_BYTES / one.len());
                for _ in 0..count {
                    if !rig.agent.write(&one) {
                        break;
                    }
                }
            }
            OP_SYNC => rig.sync(),
            OP_READ => {
                let stderr = input.bool();
                if let Some(i) = rig.settled(&mut input) {
                    let p = &mut rig.procs[i].process;
                    let reader: Option<Box<dyn Read>> = match stderr {
                        false => p.stdout().map(|r| Box::new(r) as _),
                        true => p.stderr().map(|r| Box::new(r) as _),
                    };
                    if let Some(mut r) = reader {
                        while let Ok(1..) = r.read(&mut buf) {}
                    }
                }
            }
            OP_WAIT => {
                if let Some(i) = rig.settled(&mut input) {
                    let _ = rig.procs[i].process.wait();
                }
            }
            OP_KILL => {
                let n = rig.procs.len();
                let i = input.u8();
                if n > 0 {
                    let _ = rig.procs[usize::from(i) % n].process.kill();
                }
            }
            OP_STDIN => {
                let bytes = input.bytes();
                let n = rig.procs.len();
                let i = input.u8();
                if n > 0 {
                    let p = &mut rig.procs[usize::from(i) % n];
                    // Within the window the host starts with, a write never
                    // waits for the agent's STDIN_CREDIT.
                    if p.stdin_sent + bytes.len() <= STDIN_WINDOW as usize {
                        if let Some(stdin) = p.stdin.as_mut() {
                            p.stdin_sent += bytes.len();
                            let _ = stdin.write_all(bytes);
                        }
                    }
                }
            }
            OP_CLOSE_STDIN => {
                let n = rig.procs.len();
                let i = input.u8();
                if n > 0 {
                    rig.procs[usize::from(i) % n].stdin = None;
                }
            }
            OP_DROP => {
                let n = rig.procs.len();
                let i = input.u8();
                if n > 0 {
                    rig.procs.swap_remove(usize::from(i) % n);
                }
            }
            _ => unreachable!(),
        }
    }
    if crate::virtio::debug() {
        eprintln!(
            "sandbox: procs {} ended {:?} dead {} stuck {} broken {}",
            rig.procs.len(),
            rig.seen_ended,
            rig.dead,
            rig.agent.stuck,
            rig.agent.broken
        );
    }
    // Teardown with the agent still connected and still not reading.
    drop(rig.procs);
    drop(rig.sandbox);
}

fn pick_kind(input: &mut Input) -> u8 {
    let b = input.u8();
    KINDS.get(usize::from(b)).copied().unwrap_or(b)
}

/// The id of a command the harness spawned (or the next ones), or any.
fn pick_id(input: &mut Input, rig: &Rig) -> u32 {
    match input.u8() {
        255 => input.u32(),
        b => 1 + u32::from(b) % (rig.next_id + 2),
    }
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    // A command that prints, reads stdin and exits, as the agent reports it.
    let mut s = Script::new();
    s.u8(0);
    s.u8(OP_SPAWN).u8(1);
    s.u8(OP_FRAME).u8(1).u8(0).bytes(&4242u32.to_le_bytes());
    s.u8(OP_STDIN).bytes(b"input\n").u8(0);
    s.u8(OP_FRAME).u8(6).u8(0).bytes(&6u32.to_le_bytes());
    s.u8(OP_FRAME).u8(2).u8(0).bytes(b"hello\n");
    s.u8(OP_FRAME).u8(3).u8(0).bytes(b"warning\n");
    s.u8(OP_FRAME).u8(4).u8(0).bytes(&[0, 3, 0, 0, 0, 0]);
    s.u8(OP_SYNC);
    s.u8(OP_READ).u8(0).u8(0).u8(OP_READ).u8(1).u8(0);
    s.u8(OP_WAIT).u8(0);
    let exec = s.build();

    // Output for a discarded stream (each frame answered with credit),
    // a command that fails to start, an unknown id, then garbage.
    let mut s = Script::new();
    s.u8(0);
    s.u8(OP_SPAWN).u8(2).u8(OP_SPAWN).u8(0);
    s.u8(OP_FLOOD).u8(2).u8(0).u16(40).u16(100).u8(b'x');
    let mut failed = 127u32.to_le_bytes().to_vec();
    failed.extend_from_slice(b"fuzz: not found");
    s.u8(OP_FRAME).u8(5).u8(1).bytes(&failed);
    s.u8(OP_FRAME).u8(2).u8(255).u32(99).bytes(b"nobody");
    s.u8(OP_SYNC);
    s.u8(OP_KILL).u8(0);
    s.u8(OP_RAW)
        .bytes(&[0xff, 0xff, 0xff, 0x7f, 0x83, 1, 0, 0, 0]);
    s.u8(OP_DROP).u8(0);
    let hostile = s.build();

    // A wrong version in HELLO.
    let mut s = Script::new();
    s.u8(1)
        .bytes(&frame(K_HELLO, 0, &(VERSION + 1).to_le_bytes()));
    let version = s.build();
    vec![
        ("exec", exec),
        ("discard-and-garbage", hostile),
        ("bad-hello", version),
    ]
}
