//! The sandbox protocol's frame decoder (`kiln_init::protocol::Decoder`),
//! fed in chunks of any size as a socket delivers them. Beyond the bounds
//! every target has: it holds at most one frame within its kind's limit
//! plus one chunk, every frame it accepts encodes back to the same bytes
//! (nothing is misread), and it stops at the first error.

use kiln_init::protocol::{Decoder, Msg, HEADER_LEN, MAX_MESSAGE, MAX_PAYLOAD};

use crate::input::{Input, Script};
use crate::Target;

pub const TARGET: Target = Target {
    name: "protocol",
    run,
    // The decoder's buffer (a largest frame plus a chunk, kept until half
    // of it is consumed), one decoded message and its re-encoding.
    memory_cap: 6 * MAX_PAYLOAD + (1 << 20),
    memory_per_input_byte: 4,
    seeds,
};

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut decoder = Decoder::new();
    let mut fed: Vec<u8> = Vec::new();
    let mut consumed = 0usize;
    while !input.is_empty() {
        // A chunk length, then the chunk.
        let len = usize::from(input.u8()) * 16 + 1;
        let chunk = input.take(len);
        decoder.feed(chunk);
        fed.extend_from_slice(chunk);
        loop {
            match decoder.next_msg() {
                Ok(Some(msg)) => {
                    let mut again = Vec::new();
                    let len = frame_len(&fed[consumed..]);
                    let original = &fed[consumed..consumed + len];
                    consumed += len;
                    if msg.encode(&mut again).is_ok() {
                        check_round_trip(&msg, original, &again);
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        let pending = decoder.pending();
        assert_eq!(
            pending,
            fed.len() - consumed,
            "the decoder lost or made up bytes"
        );
        // What is left is less than one frame: whole ones were taken.
        assert!(
            pending < HEADER_LEN + MAX_PAYLOAD,
            "the decoder holds {pending} bytes"
        );
    }
}

fn frame_len(bytes: &[u8]) -> usize {
    let len = u32::from_le_bytes(bytes[..4].try_into().expect("a header was decoded"));
    HEADER_LEN + len as usize
}

/// A decoded frame encodes back to its bytes; the exceptions are where
/// decoding is lossy by design: HELLO and SHUTDOWN carry no exec id (the
/// field is ignored), EXEC_FAILED messages are decoded lossily as UTF-8
/// (and cut to `MAX_MESSAGE` when encoded), and an EXEC spec is re-encoded
/// canonically.
fn check_round_trip(msg: &Msg, original: &[u8], again: &[u8]) {
    match msg {
        Msg::Hello { .. } | Msg::Shutdown | Msg::Fresh { .. } => {
            assert_eq!(original[..5], again[..5]);
            assert_eq!(original[9..], again[9..]);
        }
        Msg::ExecFailed { message, .. } => {
            assert_eq!(
                original[..HEADER_LEN + 4][4..],
                again[..HEADER_LEN + 4][4..]
            );
            assert!(message.len() <= 3 * MAX_MESSAGE + 3 * 4);
        }
        Msg::Exec { .. } => assert_eq!(original[4..9], again[4..9]),
        _ => assert_eq!(original, again, "{msg:?} does not encode back to its frame"),
    }
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use kiln_init::protocol::{
        ExecOptions, ExitReason, ExitStatus, Identity, MacChange, Stream, WindowSize,
    };
    use kiln_init::spec::ExecSpec;
    let msgs = [
        Msg::Hello { version: 1 },
        Msg::Fresh {
            realtime_ns: 1_700_000_000_000_000_000,
            entropy: [7; kiln_init::protocol::FRESH_ENTROPY],
            identity: Identity {
                hostname: Some(b"copy-1".to_vec()),
                new_machine_id: true,
                macs: vec![MacChange {
                    from: [2, 0, 0, 0, 0, 1],
                    to: [2, 0, 0, 0, 0, 2],
                }],
            },
        },
        Msg::Exec {
            id: 1,
            opts: ExecOptions {
                stdin: true,
                timeout_ms: 5000,
                terminal: None,
            },
            spec: ExecSpec {
                groups: vec![4242],
                rlimits: vec![kiln_init::spec::Rlimit {
                    resource: kiln_init::spec::Resource::Nofile,
                    soft: 1024,
                    hard: 4096,
                }],
                ..ExecSpec::new(["sh", "-c", "echo hi"])
            },
        },
        Msg::Exec {
            id: 2,
            opts: ExecOptions {
                stdin: true,
                timeout_ms: 0,
                terminal: Some(WindowSize { rows: 24, cols: 80 }),
            },
            spec: ExecSpec::new(["sh"]),
        },
        Msg::Resize {
            id: 2,
            size: WindowSize {
                rows: 50,
                cols: 132,
            },
        },
        Msg::Started { id: 1, pid: 42 },
        Msg::Stdout {
            id: 1,
            data: b"hi\n".to_vec(),
        },
        Msg::Credit {
            id: 1,
            stream: Stream::Stdout,
            bytes: 3,
        },
        Msg::StdinCredit { id: 1, bytes: 10 },
        Msg::Exited {
            id: 1,
            status: ExitStatus::Signal(9),
            reason: ExitReason::TimedOut,
        },
        Msg::ExecFailed {
            id: 2,
            code: 127,
            message: "nope: not found".into(),
        },
        Msg::Shutdown,
    ];
    let mut stream = Vec::new();
    for m in &msgs {
        m.encode(&mut stream).expect("seed messages encode");
    }
    // Fed 17 bytes at a time (chunk byte 1).
    let mut s = Script::new();
    for chunk in stream.chunks(17) {
        s.u8(1).raw(chunk);
    }
    let session = s.build();
    // One frame claiming the largest payload, then more than that.
    let mut s = Script::new();
    s.u8(0).raw(&[0]);
    s.u8(255).raw(&[0xff; 4096]);
    vec![("session", session), ("oversize", s.build())]
}
