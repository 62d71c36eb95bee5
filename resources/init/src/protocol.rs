//! The sandbox protocol between the host (`kiln::sandbox`) and kiln's guest
//! agent, carried over one vsock stream (or any byte stream in tests).
//!
//! Every message is a frame:
//!
//! ```text
//! payload length u32 LE | kind u8 | exec id u32 LE | payload[length]
//! ```
//!
//! The length is checked against [`MAX_PAYLOAD`] (and per kind, e.g.
//! [`MAX_DATA`] for output and input chunks) before anything is allocated,
//! so a peer can never make the other side allocate what it claims. Unknown
//! kinds, malformed payloads and oversize frames are protocol errors: the
//! receiver reports and drops the connection, it never panics.
//!
//! Flow control: per exec, the host may send at most [`STDIN_WINDOW`] bytes
//! of stdin that the agent has not yet written to the child's pipe (the
//! agent returns credit with `STDIN_CREDIT` as it writes), and the agent may
//! send at most [`OUTPUT_WINDOW`] bytes of stdout (and, separately, of
//! stderr) that the host consumer has not read (the host returns credit with
//! `CREDIT`). So neither side buffers more than its windows per exec, and a
//! slow consumer of one exec never blocks another.
//!
//! The first frame is the agent's `HELLO` carrying [`VERSION`]; the host
//! refuses other versions. The host's first frame is `FRESH`: the wall
//! clock and host entropy, and the guest's [`Identity`] (hostname, a new
//! machine id, new MACs), which the agent applies before any command runs
//! (on every connection: after a snapshot restore the agent reconnects, and
//! each copy of the guest must get its own random state, today's time and
//! the identity asked for it).
//!
//! Terminal mode: an `EXEC` may ask for a pseudo-terminal (with its first
//! window size). The command then has the terminal's slave as its stdin,
//! stdout and stderr and as its controlling terminal; `STDOUT` frames carry
//! everything it prints (no `STDERR`), `STDIN` frames are typed into the
//! terminal, and `RESIZE` sets the window size (the kernel sends the
//! command's foreground process group SIGWINCH).

use crate::spec::{valid_hostname, ExecSpec, SpecError, HOSTNAME_MAX};
use std::fmt;

/// Protocol version in `HELLO` (3: `FRESH` carries an [`Identity`]; 4:
/// `EXEC` may ask for a terminal, and `RESIZE` exists; 5: `EXEC`'s spec
/// may carry supplementary groups and resource limits).
pub const VERSION: u32 = 5;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 9;
/// Largest payload of any frame (an `EXEC` with its whole spec).
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Largest payload of a data frame (`STDIN`, `STDOUT`, `STDERR`).
pub const MAX_DATA: usize = 32 << 10;
/// Largest `EXEC_FAILED` message.
pub const MAX_MESSAGE: usize = 4096;
/// Stdin bytes the host may have in flight per exec.
pub const STDIN_WINDOW: u32 = 256 << 10;
/// Stdout (and stderr) bytes the agent may have in flight per exec.
pub const OUTPUT_WINDOW: u32 = 256 << 10;
/// Most execs an agent runs at once; more are refused with `EXEC_FAILED`.
pub const MAX_EXECS: usize = 256;
/// Bytes of host entropy in `FRESH` (512 bits: the guest's pool is 256).
pub const FRESH_ENTROPY: usize = 64;
/// Most MAC changes one `FRESH` carries (more than kiln's virtio slots).
pub const MAX_MAC_CHANGES: usize = 16;
/// `FRESH` flag: write a new machine id.
const FRESH_NEW_MACHINE_ID: u8 = 1;
/// Largest `FRESH` payload: clock, entropy, flags, hostname length and
/// bytes, MAC count and changes.
const MAX_FRESH: usize = 8 + FRESH_ENTROPY + 2 + HOSTNAME_MAX + 1 + MAX_MAC_CHANGES * 12;

// Frame kinds (the `kind` byte), host to guest; each is a `Msg` variant.
/// Frame kind of [`Msg::Exec`].
pub const K_EXEC: u8 = 0x01;
/// Frame kind of [`Msg::Stdin`].
pub const K_STDIN: u8 = 0x02;
/// Frame kind of [`Msg::StdinEof`].
pub const K_STDIN_EOF: u8 = 0x03;
/// Frame kind of [`Msg::Signal`].
pub const K_SIGNAL: u8 = 0x04;
/// Frame kind of [`Msg::Shutdown`].
pub const K_SHUTDOWN: u8 = 0x05;
/// Frame kind of [`Msg::Credit`].
pub const K_CREDIT: u8 = 0x06;
/// Frame kind of [`Msg::Fresh`].
pub const K_FRESH: u8 = 0x07;
/// Frame kind of [`Msg::Resize`].
pub const K_RESIZE: u8 = 0x08;
// Guest to host: the high bit is set.
/// Frame kind of [`Msg::Hello`].
pub const K_HELLO: u8 = 0x81;
/// Frame kind of [`Msg::Started`].
pub const K_STARTED: u8 = 0x82;
/// Frame kind of [`Msg::Stdout`].
pub const K_STDOUT: u8 = 0x83;
/// Frame kind of [`Msg::Stderr`].
pub const K_STDERR: u8 = 0x84;
/// Frame kind of [`Msg::Exited`].
pub const K_EXITED: u8 = 0x85;
/// Frame kind of [`Msg::ExecFailed`].
pub const K_EXEC_FAILED: u8 = 0x86;
/// Frame kind of [`Msg::StdinCredit`].
pub const K_STDIN_CREDIT: u8 = 0x87;

/// What a copy of the guest takes as its own, in `FRESH`: the agent sets
/// it before any command runs. On the wire, after the clock and entropy:
/// `flags u8 (1: new machine id) | hostname length u8 (0: keep) | hostname |
/// count u8 | count x (MAC it has [6], MAC to set [6])`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// The hostname to set (see [`valid_hostname`]); `None` keeps the
    /// guest's.
    pub hostname: Option<Vec<u8>>,
    /// Write a new random machine id to `/etc/machine-id` (and a regular
    /// `/var/lib/dbus/machine-id`) where the root has one: a restored copy
    /// never keeps its snapshot's.
    pub new_machine_id: bool,
    /// Interfaces that take a new MAC address, at most [`MAX_MAC_CHANGES`].
    pub macs: Vec<MacChange>,
}

/// The interface whose MAC address is `from` takes `to` (a unicast,
/// non-zero address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacChange {
    /// The address the guest's driver read at boot.
    pub from: [u8; 6],
    /// The address the device has now.
    pub to: [u8; 6],
}

impl Identity {
    fn encode(&self, p: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let bad = || ProtocolError::BadPayload("FRESH");
        p.push(match self.new_machine_id {
            true => FRESH_NEW_MACHINE_ID,
            false => 0,
        });
        let hostname = self.hostname.as_deref().unwrap_or_default();
        if self.hostname.is_some() && !valid_hostname(hostname) {
            return Err(bad());
        }
        p.push(hostname.len() as u8);
        p.extend_from_slice(hostname);
        if self.macs.len() > MAX_MAC_CHANGES || !self.macs.iter().all(|m| unicast(&m.to)) {
            return Err(bad());
        }
        p.push(self.macs.len() as u8);
        for change in &self.macs {
            p.extend_from_slice(&change.from);
            p.extend_from_slice(&change.to);
        }
        Ok(())
    }

    /// Parses exactly `p`; every length is checked before it is used.
    fn decode(p: &[u8]) -> Result<Self, ProtocolError> {
        let bad = || ProtocolError::BadPayload("FRESH");
        let (&flags, rest) = p.split_first().ok_or_else(bad)?;
        if flags & !FRESH_NEW_MACHINE_ID != 0 {
            return Err(bad());
        }
        let (&len, rest) = rest.split_first().ok_or_else(bad)?;
        let (hostname, rest) = rest.split_at_checked(usize::from(len)).ok_or_else(bad)?;
        let hostname = match len {
            0 => None,
            _ if valid_hostname(hostname) => Some(hostname.to_vec()),
            _ => return Err(bad()),
        };
        let (&count, rest) = rest.split_first().ok_or_else(bad)?;
        let count = usize::from(count);
        if count > MAX_MAC_CHANGES || rest.len() != count * 12 {
            return Err(bad());
        }
        let macs: Vec<MacChange> = rest
            .chunks_exact(12)
            .map(|c| MacChange {
                from: c[..6].try_into().expect("6 bytes"),
                to: c[6..].try_into().expect("6 bytes"),
            })
            .collect();
        if !macs.iter().all(|m| unicast(&m.to)) {
            return Err(bad());
        }
        Ok(Self {
            hostname,
            new_machine_id: flags & FRESH_NEW_MACHINE_ID != 0,
            macs,
        })
    }
}

/// A MAC address an interface can take: unicast, not all zeros.
fn unicast(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 0 && *mac != [0; 6]
}

/// Which output stream a `CREDIT` is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// The command's stdout (byte 1 on the wire).
    Stdout,
    /// The command's stderr (byte 2 on the wire).
    Stderr,
}

/// `EXEC` flag: the host sends stdin.
const EXEC_STDIN: u8 = 1;
/// `EXEC` flag: the command runs on a terminal; its window size follows
/// the timeout.
const EXEC_TERMINAL: u8 = 2;

/// Per-exec options beside the spec. On the wire: `flags u8 (1: stdin, 2:
/// terminal) | timeout ms u64 LE | (with a terminal) rows u16 LE | cols u16
/// LE`, then the spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// The host feeds the command's stdin with `STDIN` frames: a pipe, or
    /// the terminal's input in terminal mode (else /dev/null, or a terminal
    /// nobody types into).
    pub stdin: bool,
    /// The agent kills the exec's process group after this many ms (0: never).
    pub timeout_ms: u64,
    /// Run the command on a pseudo-terminal of this first size (else on
    /// pipes).
    pub terminal: Option<WindowSize>,
}

/// A terminal's window size, in characters. Both are at least 1: a size
/// of 0 (which the kernel takes as "unknown") is refused on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowSize {
    /// Lines.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

impl WindowSize {
    fn encode(&self, p: &mut Vec<u8>, what: &'static str) -> Result<(), ProtocolError> {
        if self.rows == 0 || self.cols == 0 {
            return Err(ProtocolError::BadPayload(what));
        }
        p.extend_from_slice(&self.rows.to_le_bytes());
        p.extend_from_slice(&self.cols.to_le_bytes());
        Ok(())
    }

    /// Parses exactly 4 bytes, neither field 0.
    fn decode(p: &[u8], what: &'static str) -> Result<Self, ProtocolError> {
        let bad = || ProtocolError::BadPayload(what);
        let b: [u8; 4] = p.try_into().map_err(|_| bad())?;
        let rows = u16::from_le_bytes([b[0], b[1]]);
        let cols = u16::from_le_bytes([b[2], b[3]]);
        if rows == 0 || cols == 0 {
            return Err(bad());
        }
        Ok(Self { rows, cols })
    }
}

/// How an exec ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal with this number killed it.
    Signal(i32),
}

/// Why the agent ended an exec on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The command ended by itself (or by a host `SIGNAL`).
    Normal,
    /// The agent killed it when its timeout expired.
    TimedOut,
}

/// One decoded message, either direction. `id` names the exec a message is
/// about: the host picks it in `EXEC` and every later frame of that command
/// carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Host: start a command. Answered with `STARTED` or `EXEC_FAILED`.
    Exec {
        /// The new exec's id (not in use).
        id: u32,
        /// Stdin and timeout.
        opts: ExecOptions,
        /// What to run.
        spec: ExecSpec,
    },
    /// Host: bytes for the command's stdin, within its [`STDIN_WINDOW`].
    Stdin {
        /// The exec.
        id: u32,
        /// At most [`MAX_DATA`] bytes.
        data: Vec<u8>,
    },
    /// Host: end of the command's stdin (its pipe is closed once drained).
    StdinEof {
        /// The exec.
        id: u32,
    },
    /// Host: the terminal of a command run in terminal mode has this
    /// size now (ignored for a command without a terminal).
    Resize {
        /// The exec.
        id: u32,
        /// The new size.
        size: WindowSize,
    },
    /// Host: send this signal to the command's process group.
    Signal {
        /// The exec.
        id: u32,
        /// The signal number.
        signal: i32,
    },
    /// Host: kill every command and end the session (the agent's init then
    /// reboots the guest).
    Shutdown,
    /// Host: it consumed this many output bytes; the agent may send that
    /// many more of the stream.
    Credit {
        /// The exec.
        id: u32,
        /// Which output stream.
        stream: Stream,
        /// Bytes returned to the window.
        bytes: u32,
    },
    /// Host, first frame: the host's wall clock, fresh entropy and the
    /// guest's identity. The agent mixes the entropy into the guest's pool
    /// and reseeds its CRNG, sets the guest's clock, then takes the
    /// identity, before it handles the next frame.
    Fresh {
        /// CLOCK_REALTIME on the host, in nanoseconds since the epoch.
        realtime_ns: u64,
        /// [`FRESH_ENTROPY`] bytes from the host's getrandom(2).
        entropy: [u8; FRESH_ENTROPY],
        /// Hostname, machine id and MACs to take.
        identity: Identity,
    },
    /// Agent, first frame: the protocol version it speaks.
    Hello {
        /// [`VERSION`] of the agent's build.
        version: u32,
    },
    /// Agent: the command is running.
    Started {
        /// The exec.
        id: u32,
        /// Its process id in the guest.
        pid: u32,
    },
    /// Agent: bytes the command wrote to stdout (in terminal mode:
    /// everything the terminal shows), within [`OUTPUT_WINDOW`].
    Stdout {
        /// The exec.
        id: u32,
        /// At most [`MAX_DATA`] bytes.
        data: Vec<u8>,
    },
    /// Agent: bytes the command wrote to stderr, within [`OUTPUT_WINDOW`].
    Stderr {
        /// The exec.
        id: u32,
        /// At most [`MAX_DATA`] bytes.
        data: Vec<u8>,
    },
    /// Agent: the command ended; sent after its last output.
    Exited {
        /// The exec.
        id: u32,
        /// Its exit code or signal.
        status: ExitStatus,
        /// Whether the agent's timeout killed it.
        reason: ExitReason,
    },
    /// Agent: the command could not be started (not found, not executable,
    /// too many execs at once).
    ExecFailed {
        /// The exec.
        id: u32,
        /// The status a shell would give: 127 not found, 126 cannot execute;
        /// 125 when the agent refused it (a bad working directory, too many
        /// execs, an id in use).
        code: i32,
        /// Why, as a shell prints it (at most [`MAX_MESSAGE`] bytes).
        message: String,
    },
    /// Agent: it wrote (or dropped) this many stdin bytes; the host may send
    /// that many more.
    StdinCredit {
        /// The exec.
        id: u32,
        /// Bytes returned to the window.
        bytes: u32,
    },
}

/// A frame that breaks the protocol. The receiver drops the connection; it
/// never panics or allocates what a bad frame claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// The peer claims a payload longer than the kind allows.
    Oversize {
        /// The frame's kind byte.
        kind: u8,
        /// The length it claims.
        len: usize,
    },
    /// A kind byte no message has.
    UnknownKind(u8),
    /// A payload that does not parse for its kind.
    BadPayload(&'static str),
    /// An `EXEC` whose spec does not decode, or (when encoding) a spec that
    /// cannot be encoded.
    BadSpec(SpecError),
    /// The stream ended inside a frame.
    Truncated,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Oversize { kind, len } => {
                write!(
                    f,
                    "frame of kind {kind:#04x} claims {len} bytes (over the limit)"
                )
            }
            Self::UnknownKind(k) => write!(f, "unknown frame kind {k:#04x}"),
            Self::BadPayload(what) => write!(f, "malformed {what} frame"),
            Self::BadSpec(e) => write!(f, "bad exec spec: {e}"),
            Self::Truncated => write!(f, "connection ended inside a frame"),
        }
    }
}

impl std::error::Error for ProtocolError {}

fn max_payload(kind: u8) -> Result<usize, ProtocolError> {
    Ok(match kind {
        K_EXEC => MAX_PAYLOAD,
        K_STDIN | K_STDOUT | K_STDERR => MAX_DATA,
        K_EXEC_FAILED => 4 + MAX_MESSAGE,
        K_STDIN_EOF | K_SHUTDOWN => 0,
        K_SIGNAL | K_HELLO | K_STARTED | K_STDIN_CREDIT | K_RESIZE => 4,
        K_CREDIT => 5,
        K_FRESH => MAX_FRESH,
        K_EXITED => 6,
        k => return Err(ProtocolError::UnknownKind(k)),
    })
}

fn header(out: &mut Vec<u8>, kind: u8, id: u32, len: usize) {
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&id.to_le_bytes());
}

/// Appends a data frame without building a `Msg` (no copy of `data`).
/// Panics if `data` is longer than [`MAX_DATA`] (a caller bug).
pub fn encode_data(out: &mut Vec<u8>, kind: u8, id: u32, data: &[u8]) {
    assert!(data.len() <= MAX_DATA, "data frame too long");
    header(out, kind, id, data.len());
    out.extend_from_slice(data);
}

impl Msg {
    /// Appends the frame for this message to `out`. Data payloads must be at
    /// most [`MAX_DATA`] and messages are cut to [`MAX_MESSAGE`]; an exec spec
    /// must encode (validate it first) and fit in [`MAX_PAYLOAD`].
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let u32b = |v: u32| v.to_le_bytes().to_vec();
        let (kind, id, payload): (u8, u32, Vec<u8>) = match self {
            Msg::Exec { id, opts, spec } => {
                let mut flags = 0;
                if opts.stdin {
                    flags |= EXEC_STDIN;
                }
                if opts.terminal.is_some() {
                    flags |= EXEC_TERMINAL;
                }
                let mut p = vec![flags];
                p.extend_from_slice(&opts.timeout_ms.to_le_bytes());
                if let Some(size) = &opts.terminal {
                    size.encode(&mut p, "EXEC")?;
                }
                p.extend(spec.encode().map_err(ProtocolError::BadSpec)?);
                (K_EXEC, *id, p)
            }
            Msg::Stdin { id, data } => (K_STDIN, *id, data.clone()),
            Msg::StdinEof { id } => (K_STDIN_EOF, *id, Vec::new()),
            Msg::Signal { id, signal } => (K_SIGNAL, *id, u32b(*signal as u32)),
            Msg::Resize { id, size } => {
                let mut p = Vec::new();
                size.encode(&mut p, "RESIZE")?;
                (K_RESIZE, *id, p)
            }
            Msg::Shutdown => (K_SHUTDOWN, 0, Vec::new()),
            Msg::Credit { id, stream, bytes } => {
                let mut p = vec![match stream {
                    Stream::Stdout => 1,
                    Stream::Stderr => 2,
                }];
                p.extend_from_slice(&bytes.to_le_bytes());
                (K_CREDIT, *id, p)
            }
            Msg::Fresh {
                realtime_ns,
                entropy,
                identity,
            } => {
                let mut p = realtime_ns.to_le_bytes().to_vec();
                p.extend_from_slice(entropy);
                identity.encode(&mut p)?;
                (K_FRESH, 0, p)
            }
            Msg::Hello { version } => (K_HELLO, 0, u32b(*version)),
            Msg::Started { id, pid } => (K_STARTED, *id, u32b(*pid)),
            Msg::Stdout { id, data } => (K_STDOUT, *id, data.clone()),
            Msg::Stderr { id, data } => (K_STDERR, *id, data.clone()),
            Msg::Exited { id, status, reason } => {
                let (k, v) = match status {
                    ExitStatus::Code(c) => (0u8, *c),
                    ExitStatus::Signal(s) => (1u8, *s),
                };
                let mut p = vec![k];
                p.extend_from_slice(&(v as u32).to_le_bytes());
                p.push(match reason {
                    ExitReason::Normal => 0,
                    ExitReason::TimedOut => 1,
                });
                (K_EXITED, *id, p)
            }
            Msg::ExecFailed { id, code, message } => {
                let mut p = (*code as u32).to_le_bytes().to_vec();
                let mut end = message.len().min(MAX_MESSAGE);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                p.extend_from_slice(&message.as_bytes()[..end]);
                (K_EXEC_FAILED, *id, p)
            }
            Msg::StdinCredit { id, bytes } => (K_STDIN_CREDIT, *id, u32b(*bytes)),
        };
        if payload.len() > max_payload(kind)? {
            return Err(ProtocolError::Oversize {
                kind,
                len: payload.len(),
            });
        }
        header(out, kind, id, payload.len());
        out.extend_from_slice(&payload);
        Ok(())
    }

    /// Parses one frame's payload.
    pub fn decode(kind: u8, id: u32, p: &[u8]) -> Result<Msg, ProtocolError> {
        if p.len() > max_payload(kind)? {
            return Err(ProtocolError::Oversize { kind, len: p.len() });
        }
        let u32_of = |p: &[u8], what| -> Result<u32, ProtocolError> {
            let b: [u8; 4] = p.try_into().map_err(|_| ProtocolError::BadPayload(what))?;
            Ok(u32::from_le_bytes(b))
        };
        let empty = |what| match p.is_empty() {
            true => Ok(()),
            false => Err(ProtocolError::BadPayload(what)),
        };
        Ok(match kind {
            K_EXEC => {
                let bad = || ProtocolError::BadPayload("EXEC");
                let (&flags, rest) = p.split_first().ok_or_else(bad)?;
                if flags & !(EXEC_STDIN | EXEC_TERMINAL) != 0 {
                    return Err(bad());
                }
                let (timeout, rest) = rest.split_at_checked(8).ok_or_else(bad)?;
                let timeout_ms = u64::from_le_bytes(timeout.try_into().expect("8 bytes"));
                let (terminal, rest) = match flags & EXEC_TERMINAL {
                    0 => (None, rest),
                    _ => {
                        let (size, rest) = rest.split_at_checked(4).ok_or_else(bad)?;
                        (Some(WindowSize::decode(size, "EXEC")?), rest)
                    }
                };
                let spec = ExecSpec::decode(rest).map_err(ProtocolError::BadSpec)?;
                let opts = ExecOptions {
                    stdin: flags & EXEC_STDIN != 0,
                    timeout_ms,
                    terminal,
                };
                Msg::Exec { id, opts, spec }
            }
            K_STDIN => Msg::Stdin {
                id,
                data: p.to_vec(),
            },
            K_STDIN_EOF => {
                empty("STDIN_EOF")?;
                Msg::StdinEof { id }
            }
            K_SIGNAL => Msg::Signal {
                id,
                signal: u32_of(p, "SIGNAL")? as i32,
            },
            K_RESIZE => Msg::Resize {
                id,
                size: WindowSize::decode(p, "RESIZE")?,
            },
            K_SHUTDOWN => {
                empty("SHUTDOWN")?;
                Msg::Shutdown
            }
            K_CREDIT => {
                let stream = match p.first() {
                    Some(1) => Stream::Stdout,
                    Some(2) => Stream::Stderr,
                    _ => return Err(ProtocolError::BadPayload("CREDIT")),
                };
                Msg::Credit {
                    id,
                    stream,
                    bytes: u32_of(&p[1..], "CREDIT")?,
                }
            }
            K_FRESH => {
                if p.len() < 8 + FRESH_ENTROPY {
                    return Err(ProtocolError::BadPayload("FRESH"));
                }
                let (fixed, identity) = p.split_at(8 + FRESH_ENTROPY);
                Msg::Fresh {
                    realtime_ns: u64::from_le_bytes(fixed[..8].try_into().expect("8 bytes")),
                    entropy: fixed[8..].try_into().expect("FRESH_ENTROPY bytes"),
                    identity: Identity::decode(identity)?,
                }
            }
            K_HELLO => Msg::Hello {
                version: u32_of(p, "HELLO")?,
            },
            K_STARTED => Msg::Started {
                id,
                pid: u32_of(p, "STARTED")?,
            },
            K_STDOUT => Msg::Stdout {
                id,
                data: p.to_vec(),
            },
            K_STDERR => Msg::Stderr {
                id,
                data: p.to_vec(),
            },
            K_EXITED => {
                if p.len() != 6 {
                    return Err(ProtocolError::BadPayload("EXITED"));
                }
                let v = u32_of(&p[1..5], "EXITED")? as i32;
                let status = match p[0] {
                    0 => ExitStatus::Code(v),
                    1 => ExitStatus::Signal(v),
                    _ => return Err(ProtocolError::BadPayload("EXITED")),
                };
                let reason = match p[5] {
                    0 => ExitReason::Normal,
                    1 => ExitReason::TimedOut,
                    _ => return Err(ProtocolError::BadPayload("EXITED")),
                };
                Msg::Exited { id, status, reason }
            }
            K_EXEC_FAILED => {
                if p.len() < 4 {
                    return Err(ProtocolError::BadPayload("EXEC_FAILED"));
                }
                Msg::ExecFailed {
                    id,
                    code: u32_of(&p[..4], "EXEC_FAILED")? as i32,
                    message: String::from_utf8_lossy(&p[4..]).into_owned(),
                }
            }
            K_STDIN_CREDIT => Msg::StdinCredit {
                id,
                bytes: u32_of(p, "STDIN_CREDIT")?,
            },
            k => return Err(ProtocolError::UnknownKind(k)),
        })
    }
}

/// Incremental frame reader: feed it bytes as they arrive and take whole
/// messages out. Holds at most one frame (header plus a payload within its
/// kind's limit) plus what one `feed` adds.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Consumed prefix of `buf`, dropped lazily.
    start: usize,
}

impl Decoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream; [`next_msg`](Self::next_msg)
    /// takes the messages out.
    pub fn feed(&mut self, data: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes fed but not yet returned as messages.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete message, `Ok(None)` if more bytes are needed. The
    /// header is validated (kind known, length within the kind's limit) as
    /// soon as it is complete, before its payload arrives.
    pub fn next_msg(&mut self) -> Result<Option<Msg>, ProtocolError> {
        let avail = &self.buf[self.start..];
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_le_bytes(avail[..4].try_into().expect("4 bytes")) as usize;
        let kind = avail[4];
        let id = u32::from_le_bytes(avail[5..9].try_into().expect("4 bytes"));
        if len > max_payload(kind)? {
            return Err(ProtocolError::Oversize { kind, len });
        }
        if avail.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let msg = Msg::decode(kind, id, &avail[HEADER_LEN..HEADER_LEN + len])?;
        self.start += HEADER_LEN + len;
        if self.start > 64 << 10 && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(Some(msg))
    }

    /// Call at end of stream: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        match self.pending() {
            0 => Ok(()),
            _ => Err(ProtocolError::Truncated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_messages() -> Vec<Msg> {
        let mut spec = ExecSpec::new(["sh", "-c", "echo hi"]);
        spec.env.push((b"K".to_vec(), vec![0xff, b'=']));
        spec.cwd = Some(b"/tmp".to_vec());
        spec.uid = Some(1000);
        spec.groups = vec![4242, 0];
        spec.rlimits = vec![crate::spec::Rlimit {
            resource: crate::spec::Resource::Nofile,
            soft: 1024,
            hard: crate::spec::RLIM_INFINITY,
        }];
        vec![
            Msg::Exec {
                id: 7,
                opts: ExecOptions {
                    stdin: true,
                    timeout_ms: 1234,
                    terminal: None,
                },
                spec,
            },
            Msg::Exec {
                id: 8,
                opts: ExecOptions {
                    stdin: false,
                    timeout_ms: 0,
                    terminal: Some(WindowSize {
                        rows: u16::MAX,
                        cols: 1,
                    }),
                },
                spec: ExecSpec::new(["sh"]),
            },
            Msg::Resize {
                id: 8,
                size: WindowSize { rows: 1, cols: 500 },
            },
            Msg::Stdin {
                id: 1,
                data: (0..=255).collect(),
            },
            Msg::StdinEof { id: 1 },
            Msg::Signal { id: 2, signal: 9 },
            Msg::Shutdown,
            Msg::Credit {
                id: 3,
                stream: Stream::Stderr,
                bytes: 77,
            },
            Msg::Fresh {
                realtime_ns: u64::MAX - 1,
                entropy: std::array::from_fn(|i| i as u8),
                identity: Identity::default(),
            },
            Msg::Fresh {
                realtime_ns: 1,
                entropy: [0; FRESH_ENTROPY],
                identity: Identity {
                    hostname: Some(vec![b'h'; HOSTNAME_MAX]),
                    new_machine_id: true,
                    macs: vec![
                        MacChange {
                            from: [2, 0, 0, 0, 0, 1],
                            to: [2, 0, 0, 0, 0, 2],
                        };
                        MAX_MAC_CHANGES
                    ],
                },
            },
            Msg::Hello { version: VERSION },
            Msg::Started { id: 4, pid: 99 },
            Msg::Stdout {
                id: u32::MAX,
                data: vec![0; MAX_DATA],
            },
            Msg::Stderr {
                id: 0,
                data: Vec::new(),
            },
            Msg::Exited {
                id: 5,
                status: ExitStatus::Signal(9),
                reason: ExitReason::TimedOut,
            },
            Msg::Exited {
                id: 5,
                status: ExitStatus::Code(-1),
                reason: ExitReason::Normal,
            },
            Msg::ExecFailed {
                id: 6,
                code: 127,
                message: "sh: nope: not found ✓".into(),
            },
            Msg::StdinCredit { id: 8, bytes: 5 },
        ]
    }

    fn stream() -> Vec<u8> {
        let mut out = Vec::new();
        for m in all_messages() {
            m.encode(&mut out).unwrap();
        }
        out
    }

    /// The wire format README documents, pinned byte by byte: every frame
    /// is `len u32 LE | kind u8 | exec id u32 LE | payload`, and each kind's
    /// code and payload layout is fixed (host and guest are built apart).
    #[test]
    fn frames_have_the_documented_byte_layout() {
        let mut spec = ExecSpec::new(["ls"]);
        spec.uid = Some(0x0102_0304);
        let frames: Vec<(Msg, Vec<u8>)> = vec![
            (
                Msg::Exec {
                    id: 0x0a0b_0c0d,
                    opts: ExecOptions {
                        stdin: true,
                        timeout_ms: 0x1122_3344_5566_7788,
                        terminal: None,
                    },
                    spec: spec.clone(),
                },
                [
                    &[30, 0, 0, 0, 0x01, 0x0d, 0x0c, 0x0b, 0x0a][..],
                    // stdin flag, timeout in ms u64 LE
                    &[1, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11],
                    // the exec spec: "KXSP", version 1, then tag u8 | len u32 LE | bytes
                    b"KXSP\x01",
                    &[1, 2, 0, 0, 0, b'l', b's'],
                    &[4, 4, 0, 0, 0, 4, 3, 2, 1],
                ]
                .concat(),
            ),
            (
                Msg::Exec {
                    id: 2,
                    opts: ExecOptions {
                        stdin: true,
                        timeout_ms: 0,
                        terminal: Some(WindowSize {
                            rows: 0x0102,
                            cols: 80,
                        }),
                    },
                    spec,
                },
                [
                    &[34, 0, 0, 0, 0x01, 2, 0, 0, 0][..],
                    // flags: stdin | terminal; no timeout; rows, cols u16 LE
                    &[3, 0, 0, 0, 0, 0, 0, 0, 0],
                    &[0x02, 0x01, 80, 0],
                    b"KXSP\x01",
                    &[1, 2, 0, 0, 0, b'l', b's'],
                    &[4, 4, 0, 0, 0, 4, 3, 2, 1],
                ]
                .concat(),
            ),
            (
                Msg::Resize {
                    id: 3,
                    size: WindowSize {
                        rows: 24,
                        cols: 0x0150,
                    },
                },
                vec![4, 0, 0, 0, 0x08, 3, 0, 0, 0, 24, 0, 0x50, 0x01],
            ),
            (
                Msg::Stdin {
                    id: 1,
                    data: b"abc".to_vec(),
                },
                vec![3, 0, 0, 0, 0x02, 1, 0, 0, 0, b'a', b'b', b'c'],
            ),
            (Msg::StdinEof { id: 2 }, vec![0, 0, 0, 0, 0x03, 2, 0, 0, 0]),
            (
                Msg::Signal { id: 3, signal: 15 },
                vec![4, 0, 0, 0, 0x04, 3, 0, 0, 0, 15, 0, 0, 0],
            ),
            (Msg::Shutdown, vec![0, 0, 0, 0, 0x05, 0, 0, 0, 0]),
            (
                Msg::Credit {
                    id: 4,
                    stream: Stream::Stdout,
                    bytes: 0x0001_0000,
                },
                vec![5, 0, 0, 0, 0x06, 4, 0, 0, 0, 1, 0, 0, 1, 0],
            ),
            (
                Msg::Credit {
                    id: 4,
                    stream: Stream::Stderr,
                    bytes: 7,
                },
                vec![5, 0, 0, 0, 0x06, 4, 0, 0, 0, 2, 7, 0, 0, 0],
            ),
            (
                Msg::Hello { version: 1 },
                vec![4, 0, 0, 0, 0x81, 0, 0, 0, 0, 1, 0, 0, 0],
            ),
            (
                Msg::Started { id: 5, pid: 0x1234 },
                vec![4, 0, 0, 0, 0x82, 5, 0, 0, 0, 0x34, 0x12, 0, 0],
            ),
            (
                Msg::Stdout {
                    id: 0x0100_0000,
                    data: b"hi\n".to_vec(),
                },
                vec![3, 0, 0, 0, 0x83, 0, 0, 0, 1, b'h', b'i', b'\n'],
            ),
            (
                Msg::Stderr {
                    id: 6,
                    data: b"e".to_vec(),
                },
                vec![1, 0, 0, 0, 0x84, 6, 0, 0, 0, b'e'],
            ),
            (
                Msg::Exited {
                    id: 7,
                    status: ExitStatus::Code(3),
                    reason: ExitReason::Normal,
                },
                vec![6, 0, 0, 0, 0x85, 7, 0, 0, 0, 0, 3, 0, 0, 0, 0],
            ),
            (
                Msg::Exited {
                    id: 7,
                    status: ExitStatus::Signal(9),
                    reason: ExitReason::TimedOut,
                },
                vec![6, 0, 0, 0, 0x85, 7, 0, 0, 0, 1, 9, 0, 0, 0, 1],
            ),
            (
                Msg::ExecFailed {
                    id: 8,
                    code: 127,
                    message: "no".into(),
                },
                vec![6, 0, 0, 0, 0x86, 8, 0, 0, 0, 127, 0, 0, 0, b'n', b'o'],
            ),
            (
                Msg::StdinCredit { id: 9, bytes: 300 },
                vec![4, 0, 0, 0, 0x87, 9, 0, 0, 0, 0x2c, 0x01, 0, 0],
            ),
            (
                Msg::Fresh {
                    realtime_ns: 0x0102_0304_0506_0708,
                    entropy: [0xee; FRESH_ENTROPY],
                    identity: Identity::default(),
                },
                [
                    vec![75, 0, 0, 0, 0x07, 0, 0, 0, 0],
                    vec![8, 7, 6, 5, 4, 3, 2, 1],
                    vec![0xee; FRESH_ENTROPY],
                    // no new machine id, no hostname, no MAC change
                    vec![0, 0, 0],
                ]
                .concat(),
            ),
            (
                Msg::Fresh {
                    realtime_ns: 0,
                    entropy: [0xee; FRESH_ENTROPY],
                    identity: Identity {
                        hostname: Some(b"c1".to_vec()),
                        new_machine_id: true,
                        macs: vec![MacChange {
                            from: [2, 0, 0, 0, 0, 1],
                            to: [2, 0, 0, 0, 0, 2],
                        }],
                    },
                },
                [
                    vec![89, 0, 0, 0, 0x07, 0, 0, 0, 0],
                    vec![0; 8],
                    vec![0xee; FRESH_ENTROPY],
                    // new machine id; hostname "c1"; one change: from, to
                    vec![1, 2, b'c', b'1', 1],
                    vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2],
                ]
                .concat(),
            ),
        ];
        for (msg, bytes) in frames {
            let mut out = Vec::new();
            msg.encode(&mut out).unwrap();
            assert_eq!(out, bytes, "encoding {msg:?}");
            let mut d = Decoder::new();
            d.feed(&bytes);
            assert_eq!(d.next_msg(), Ok(Some(msg.clone())), "decoding {bytes:?}");
            assert_eq!(d.pending(), 0);
            if let Msg::Stdout { id, data } = &msg {
                let mut raw = Vec::new();
                encode_data(&mut raw, K_STDOUT, *id, data);
                assert_eq!(raw, bytes, "encode_data");
            }
        }
        assert_eq!(HEADER_LEN, 9);
        assert_eq!(VERSION, 5);
    }

    #[test]
    fn windows_and_limits_are_the_documented_ones() {
        // README: 256 KiB output windows per stream; the stdin window too.
        assert_eq!(OUTPUT_WINDOW, 262_144);
        assert_eq!(STDIN_WINDOW, 262_144);
        assert_eq!(MAX_DATA, 32_768);
        // EXEC_FAILED: a u32 code and at most MAX_MESSAGE bytes of text.
        let failed = |len| Msg::decode(K_EXEC_FAILED, 1, &vec![b'x'; len]);
        assert!(failed(4 + MAX_MESSAGE).is_ok());
        assert_eq!(
            failed(4 + MAX_MESSAGE + 1),
            Err(ProtocolError::Oversize {
                kind: K_EXEC_FAILED,
                len: 4 + MAX_MESSAGE + 1
            })
        );
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        // Three-byte characters, so the cut at MAX_MESSAGE falls inside one.
        let message = "✓".repeat(MAX_MESSAGE);
        let mut out = Vec::new();
        Msg::ExecFailed {
            id: 1,
            code: 126,
            message,
        }
        .encode(&mut out)
        .unwrap();
        let text = &out[HEADER_LEN + 4..];
        let keep = MAX_MESSAGE / 3 * 3;
        assert_eq!(text.len(), keep);
        assert_eq!(std::str::from_utf8(text).unwrap(), "✓".repeat(keep / 3));
    }

    #[test]
    fn exec_options_come_before_the_spec() {
        // Options present, spec missing: the spec is what is wrong.
        assert_eq!(
            Msg::decode(K_EXEC, 1, &[0; 9]),
            Err(ProtocolError::BadSpec(SpecError::BadMagic))
        );
        assert_eq!(
            Msg::decode(K_EXEC, 1, &[0; 8]),
            Err(ProtocolError::BadPayload("EXEC"))
        );
    }

    /// An `EXEC` whose groups or limits a hostile host got wrong is a
    /// protocol error naming the field, never a panic or an allocation of
    /// what it claims.
    #[test]
    fn exec_groups_and_limits_are_checked() {
        let exec_with = |record: &[u8]| {
            let mut p = vec![0u8; 9];
            p.extend(ExecSpec::new(["true"]).encode().unwrap());
            p.extend_from_slice(record);
            Msg::decode(K_EXEC, 1, &p)
        };
        let record = |tag: u8, body: &[u8]| {
            let mut r = vec![tag];
            r.extend_from_slice(&(body.len() as u32).to_le_bytes());
            r.extend_from_slice(body);
            r
        };
        let limit = |n: u32, soft: u64, hard: u64| {
            record(
                8,
                &[
                    &n.to_le_bytes()[..],
                    &soft.to_le_bytes(),
                    &hard.to_le_bytes(),
                ]
                .concat(),
            )
        };
        let spec_error = |e| Err(ProtocolError::BadSpec(e));
        assert_eq!(
            exec_with(&limit(99, 0, 0)),
            spec_error(SpecError::UnknownResource(99))
        );
        assert_eq!(
            exec_with(&limit(7, 2, 1)),
            spec_error(SpecError::SoftAboveHard("RLIMIT_NOFILE"))
        );
        let twice = [limit(7, 1, 1), limit(7, 1, 1)].concat();
        assert_eq!(
            exec_with(&twice),
            spec_error(SpecError::Duplicate("RLIMIT_NOFILE"))
        );
        assert_eq!(
            exec_with(&record(7, &[1, 2, 3])),
            spec_error(SpecError::BadLength("groups"))
        );
        // A group count beyond the limit, within one frame.
        let many = record(7, &vec![0; 4 * (crate::spec::MAX_GROUPS + 1)]);
        assert_eq!(exec_with(&many), spec_error(SpecError::TooManyGroups));
        // A record claiming more bytes than the frame holds.
        let mut claims = vec![7u8];
        claims.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(exec_with(&claims), spec_error(SpecError::Truncated));
        let Ok(Msg::Exec { spec, .. }) = exec_with(&limit(4, 1234, 5678)) else {
            panic!("a good limit decodes");
        };
        assert_eq!(spec.rlimits[0].resource, crate::spec::Resource::Core);
        assert_eq!((spec.rlimits[0].soft, spec.rlimits[0].hard), (1234, 5678));
    }

    #[test]
    fn edge_payloads_round_trip() {
        for msg in [
            Msg::Exec {
                id: 1,
                opts: ExecOptions::default(),
                spec: ExecSpec::new(["true"]),
            },
            Msg::ExecFailed {
                id: 2,
                code: 127,
                message: String::new(),
            },
        ] {
            let mut out = Vec::new();
            msg.encode(&mut out).unwrap();
            let mut d = Decoder::new();
            d.feed(&out);
            assert_eq!(d.next_msg(), Ok(Some(msg)));
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        for (e, text) in [
            (
                ProtocolError::Oversize { kind: 0x83, len: 5 },
                "frame of kind 0x83 claims 5 bytes (over the limit)",
            ),
            (ProtocolError::UnknownKind(0x42), "unknown frame kind 0x42"),
            (
                ProtocolError::BadPayload("CREDIT"),
                "malformed CREDIT frame",
            ),
            (
                ProtocolError::BadSpec(SpecError::EmptyArgv),
                "bad exec spec: no command given",
            ),
            (ProtocolError::Truncated, "connection ended inside a frame"),
        ] {
            assert_eq!(e.to_string(), text);
        }
    }

    #[test]
    fn pending_counts_bytes_of_an_unfinished_frame() {
        let bytes = stream();
        let mut d = Decoder::new();
        d.feed(&bytes[..HEADER_LEN + 3]);
        assert_eq!(d.next_msg(), Ok(None));
        assert_eq!(d.pending(), HEADER_LEN + 3);
        assert_eq!(d.finish(), Err(ProtocolError::Truncated));
    }

    /// The decoder keeps only what it has not returned yet: a long stream
    /// fed in pieces that cut frames anywhere never piles up in it.
    #[test]
    fn the_decoder_holds_at_most_a_frame_and_a_feed() {
        let mut bytes = Vec::new();
        for i in 0..20_000u32 {
            Msg::Stdout {
                id: i,
                data: vec![i as u8; 1 + i as usize % 200],
            }
            .encode(&mut bytes)
            .unwrap();
        }
        for piece in [1000, 4096, 109] {
            let mut d = Decoder::new();
            let mut got = 0;
            for chunk in bytes.chunks(piece) {
                d.feed(chunk);
                while let Some(_msg) = d.next_msg().unwrap() {
                    got += 1;
                }
                assert!(
                    d.buf.len() <= (64 << 10) + 2 * (piece + HEADER_LEN + 200),
                    "{} bytes held (pieces of {piece})",
                    d.buf.len()
                );
            }
            assert_eq!(got, 20_000);
            // Frames fed whole, one at a time: nothing at all is left over.
            let mut d = Decoder::new();
            let mut one = Vec::new();
            for i in 0..1000 {
                one.clear();
                Msg::StdinEof { id: i }.encode(&mut one).unwrap();
                d.feed(&one);
                assert!(d.next_msg().unwrap().is_some());
                assert!(d.buf.len() <= HEADER_LEN, "{} bytes held", d.buf.len());
            }
        }
    }

    #[test]
    fn round_trips_every_message_in_any_chunking() {
        let bytes = stream();
        for chunk in [1, 2, 3, 9, 10, 1000, bytes.len()] {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for c in bytes.chunks(chunk) {
                d.feed(c);
                while let Some(m) = d.next_msg().unwrap() {
                    got.push(m);
                }
            }
            d.finish().unwrap();
            assert_eq!(got, all_messages(), "chunk {chunk}");
        }
    }

    #[test]
    fn truncated_frames_wait_then_fail_at_end() {
        let bytes = stream();
        for n in 0..bytes.len() {
            let mut d = Decoder::new();
            d.feed(&bytes[..n]);
            while let Ok(Some(_)) = d.next_msg() {}
            let complete = d.pending() == 0;
            assert_eq!(d.finish().is_ok(), complete, "prefix {n}");
        }
    }

    #[test]
    fn huge_lengths_are_rejected_from_the_header_alone() {
        for kind in [K_EXEC, K_STDIN, K_STDOUT, K_HELLO, K_SHUTDOWN, K_EXITED] {
            let mut d = Decoder::new();
            let mut h = Vec::new();
            header(&mut h, kind, 1, u32::MAX as usize);
            d.feed(&h);
            assert!(matches!(d.next_msg(), Err(ProtocolError::Oversize { .. })));
        }
        let mut h = Vec::new();
        header(&mut h, K_STDOUT, 1, MAX_DATA + 1);
        let mut d = Decoder::new();
        d.feed(&h);
        assert!(d.next_msg().is_err());
        // Encoding refuses oversize data too.
        let big = Msg::Stdin {
            id: 1,
            data: vec![0; MAX_DATA + 1],
        };
        assert!(big.encode(&mut Vec::new()).is_err());
    }

    /// A `FRESH` identity is parsed exactly: every length within the
    /// payload and its limit, a hostname of valid characters, only known
    /// flags, unicast MACs to set, no byte left over.
    #[test]
    fn fresh_identities_are_checked() {
        let fresh = |identity: &[u8]| {
            let mut p = vec![0; 8 + FRESH_ENTROPY];
            p.extend_from_slice(identity);
            Msg::decode(K_FRESH, 0, &p)
        };
        let mac = |from: u8, to: [u8; 6]| [&[2, 0, 0, 0, 0, from][..], &to].concat();
        let ok = fresh(
            &[
                &[1, 3, b'a', b'-', b'1', 1][..],
                &mac(1, [2, 0, 0, 0, 0, 9]),
            ]
            .concat(),
        );
        let Ok(Msg::Fresh { identity, .. }) = ok else {
            panic!("{ok:?}")
        };
        assert_eq!(identity.hostname.as_deref(), Some(&b"a-1"[..]));
        assert!(identity.new_machine_id);
        assert_eq!(identity.macs[0].to, [2, 0, 0, 0, 0, 9]);
        let too_many = [
            &[0, 0, (MAX_MAC_CHANGES + 1) as u8][..],
            &mac(1, [2; 6]).repeat(MAX_MAC_CHANGES + 1),
        ]
        .concat();
        let bad: Vec<(&str, Vec<u8>)> = vec![
            ("unknown flag", vec![2, 0, 0]),
            ("hostname past the end", vec![0, 5, b'a', 0]),
            (
                "hostname too long",
                [&[0, 65][..], &[b'a'; 65], &[0]].concat(),
            ),
            ("hostname with a space", vec![0, 3, b'a', b' ', b'b', 0]),
            ("hostname with a slash", vec![0, 3, b'a', b'/', b'b', 0]),
            ("hostname starting with '-'", vec![0, 2, b'-', b'a', 0]),
            ("no count", vec![0, 0]),
            (
                "count past the end",
                [&[0, 0, 2][..], &mac(1, [2; 6])].concat(),
            ),
            (
                "a byte left over",
                [&[0, 0, 1][..], &mac(1, [2; 6]), &[0]].concat(),
            ),
            ("too many changes", too_many),
            (
                "multicast MAC",
                [&[0, 0, 1][..], &mac(1, [3, 0, 0, 0, 0, 1])].concat(),
            ),
            ("zero MAC", [&[0, 0, 1][..], &mac(1, [0; 6])].concat()),
        ];
        for (what, identity) in bad {
            assert_eq!(
                fresh(&identity),
                Err(ProtocolError::BadPayload("FRESH")),
                "{what}"
            );
        }
        // The host cannot send what the agent would refuse.
        let refused = |identity: Identity| {
            Msg::Fresh {
                realtime_ns: 0,
                entropy: [0; FRESH_ENTROPY],
                identity,
            }
            .encode(&mut Vec::new())
        };
        assert!(refused(Identity {
            hostname: Some(b"a b".to_vec()),
            ..Identity::default()
        })
        .is_err());
        assert!(refused(Identity {
            macs: vec![MacChange {
                from: [2; 6],
                to: [1; 6]
            }],
            ..Identity::default()
        })
        .is_err());
    }

    /// A window size of 0 rows or 0 columns is refused in `RESIZE` and in a
    /// terminal `EXEC`, both ways; a terminal `EXEC` too short for its size
    /// is malformed; the largest size (65535) is accepted.
    #[test]
    fn window_sizes_are_checked() {
        let resize = |rows: u16, cols: u16| {
            let p = [rows.to_le_bytes(), cols.to_le_bytes()].concat();
            Msg::decode(K_RESIZE, 1, &p)
        };
        let bad_resize = Err(ProtocolError::BadPayload("RESIZE"));
        assert_eq!(resize(0, 80), bad_resize);
        assert_eq!(resize(24, 0), bad_resize);
        assert_eq!(resize(0, 0), bad_resize);
        let max = WindowSize {
            rows: u16::MAX,
            cols: u16::MAX,
        };
        assert_eq!(
            resize(u16::MAX, u16::MAX),
            Ok(Msg::Resize { id: 1, size: max })
        );
        let spec = ExecSpec::new(["sh"]).encode().unwrap();
        let exec = |size: &[u8]| {
            let p = [&[EXEC_TERMINAL][..], &[0; 8], size, &spec].concat();
            Msg::decode(K_EXEC, 1, &p)
        };
        let bad_exec = Err(ProtocolError::BadPayload("EXEC"));
        assert_eq!(exec(&[0, 0, 80, 0]), bad_exec);
        assert_eq!(exec(&[24, 0, 0, 0]), bad_exec);
        assert!(exec(&[24, 0, 80, 0]).is_ok());
        // The size missing: the spec's magic is read as the size, then the
        // rest is no spec.
        assert!(exec(&[]).is_err());
        let short = [&[EXEC_TERMINAL][..], &[0; 8], &[24, 0]].concat();
        assert_eq!(Msg::decode(K_EXEC, 1, &short), bad_exec);
        // The host cannot send what the agent would refuse.
        for size in [
            WindowSize { rows: 0, cols: 80 },
            WindowSize { rows: 24, cols: 0 },
        ] {
            let resize = Msg::Resize { id: 1, size };
            assert_eq!(resize.encode(&mut Vec::new()), bad_resize.clone().map(drop));
            let exec = Msg::Exec {
                id: 1,
                opts: ExecOptions {
                    terminal: Some(size),
                    ..ExecOptions::default()
                },
                spec: ExecSpec::new(["sh"]),
            };
            assert_eq!(exec.encode(&mut Vec::new()), bad_exec.clone().map(drop));
        }
    }

    #[test]
    fn unknown_kinds_and_bad_payloads_are_errors() {
        for kind in [0u8, 0x09, 0x80, 0x88, 0xff] {
            let mut h = Vec::new();
            header(&mut h, kind, 1, 0);
            let mut d = Decoder::new();
            d.feed(&h);
            assert_eq!(d.next_msg(), Err(ProtocolError::UnknownKind(kind)));
        }
        let bad: &[(u8, &[u8])] = &[
            (K_HELLO, &[1, 2, 3]),
            (K_SIGNAL, &[]),
            (K_STDIN_EOF, &[1]),
            (K_SHUTDOWN, &[0]),
            (K_CREDIT, &[3, 0, 0, 0, 0]),
            (K_CREDIT, &[1, 0]),
            (K_EXITED, &[2, 0, 0, 0, 0, 0]),
            (K_EXITED, &[0, 0, 0, 0, 0, 9]),
            (K_EXITED, &[0, 0, 0, 0, 0]),
            (K_EXEC_FAILED, &[1]),
            (K_FRESH, &[0; 8]),
            (K_FRESH, &[0; 8 + FRESH_ENTROPY - 1]),
            (K_FRESH, &[0; 8 + FRESH_ENTROPY]),
            (K_EXEC, &[0, 1, 2]),
            (K_EXEC, &[2, 0, 0, 0, 0, 0, 0, 0, 0]),
            (K_EXEC, &[0, 0, 0, 0, 0, 0, 0, 0, 0, b'K', b'X']),
            (K_EXEC, &[4, 0, 0, 0, 0, 0, 0, 0, 0]),
            (K_RESIZE, &[]),
            (K_RESIZE, &[24, 0, 80]),
            (K_RESIZE, &[24, 0, 80, 0, 0]),
        ];
        for (kind, p) in bad {
            assert!(Msg::decode(*kind, 1, p).is_err(), "{kind:#x} {p:?}");
        }
        // Random garbage never panics.
        let mut x: u32 = 12345;
        for _ in 0..2000 {
            let mut d = Decoder::new();
            let junk: Vec<u8> = (0..64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            d.feed(&junk);
            while let Ok(Some(_)) = d.next_msg() {}
        }
    }
}
