//! The sandbox host's state against a fake agent written frame by frame.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use kiln_init::protocol::{self, encode_data, ExitReason, Msg, K_STDERR, K_STDOUT, MAX_DATA};

use super::{Command, Sandbox, OUTPUT_WINDOW, STDIN_WINDOW};
use kiln_init::protocol::MAX_EXECS;

/// A sandbox over a fake agent that has sent HELLO and never reads.
fn sandbox() -> (Sandbox, UnixStream) {
    let (host, mut agent) = UnixStream::pair().unwrap();
    let mut hello = Vec::new();
    Msg::Hello {
        version: protocol::VERSION,
    }
    .encode(&mut hello)
    .unwrap();
    agent.write_all(&hello).unwrap();
    (
        Sandbox::connect(host, Duration::from_secs(10)).unwrap(),
        agent,
    )
}

fn exited(id: u32) -> Vec<u8> {
    let mut frame = Vec::new();
    Msg::Exited {
        id,
        status: protocol::ExitStatus::Code(0),
        reason: ExitReason::Normal,
    }
    .encode(&mut frame)
    .unwrap();
    frame
}

/// Writes `frames` as the agent and returns once the host has dispatched
/// them: frames are dispatched in order, so once the end of a command
/// spawned after them (the host's exec `barrier_id`) is seen, they are.
fn deliver(sb: &Sandbox, agent: &mut UnixStream, frames: &[u8], barrier_id: u32) {
    agent.write_all(frames).unwrap();
    let mut barrier = sb.spawn(Command::new("barrier")).unwrap();
    agent.write_all(&exited(barrier_id)).unwrap();
    barrier.wait().unwrap();
}

/// Guest input is hostile: an agent that fills a command's windows and
/// never reports its end must not make the host keep those bytes once the
/// command's `Process` is dropped, however many commands that happens to.
#[test]
fn a_dropped_process_holds_no_output_while_its_end_is_unreported() {
    let (sb, mut agent) = sandbox();
    let window = [b'x'; MAX_DATA];
    let mut dropped = Vec::new();
    // The host numbers commands 1, 2, ... in the order they are spawned.
    for id in (1..=8).step_by(2) {
        let p = sb.spawn(Command::new("print")).unwrap();
        for kind in [K_STDOUT, K_STDERR] {
            let mut frames = Vec::new();
            for _ in 0..OUTPUT_WINDOW as usize / MAX_DATA {
                encode_data(&mut frames, kind, id, &window);
            }
            agent.write_all(&frames).unwrap();
        }
        // Frames are dispatched in order: once a later command's end is
        // seen, both windows are on the host.
        let mut barrier = sb.spawn(Command::new("barrier")).unwrap();
        agent.write_all(&exited(id + 1)).unwrap();
        barrier.wait().unwrap();
        {
            let st = sb.shared.lock();
            let held: Vec<usize> = st.execs[&id].out.iter().map(|q| q.len()).collect();
            assert_eq!(held, [OUTPUT_WINDOW as usize; 2], "command {id}");
        }
        drop(p);
        dropped.push(id);
    }
    let st = sb.shared.lock();
    for id in dropped {
        let e = &st.execs[&id];
        assert!(e.orphaned && e.end.is_none(), "command {id} is still known");
        let kept: Vec<usize> = e.out.iter().map(|q| q.capacity()).collect();
        assert_eq!(kept, [0, 0], "bytes kept for dropped command {id}");
    }
}

/// Guest input is hostile: an agent that reports a command's failure to
/// start again and again gets the reason kept once, not once per report.
#[test]
fn a_repeated_exec_failed_is_kept_once() {
    let (sb, mut agent) = sandbox();
    let mut p = sb.spawn(Command::new("missing")).unwrap();
    let mut frames = Vec::new();
    for _ in 0..3000 {
        Msg::ExecFailed {
            id: 1,
            code: 127,
            message: "missing: not found".into(),
        }
        .encode(&mut frames)
        .unwrap();
    }
    deliver(&sb, &mut agent, &frames, 2);
    let mut stderr = String::new();
    p.stderr().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(stderr, "kiln: missing: not found\n");
    assert_eq!(p.wait().unwrap(), super::ExitStatus::Code(127));
}

/// A command's output queue holds at most one window however the agent
/// sizes its frames (doubling a queue grown by 32760-byte frames, then a
/// small one, made it twice the window).
#[test]
fn output_queues_stay_within_the_window() {
    let (sb, mut agent) = sandbox();
    let p = sb.spawn(Command::new("print")).unwrap();
    let mut frames = Vec::new();
    for kind in [K_STDOUT, K_STDERR] {
        let big = MAX_DATA - 8;
        for _ in 0..OUTPUT_WINDOW as usize / big {
            encode_data(&mut frames, kind, 1, &vec![b'x'; big]);
        }
        encode_data(&mut frames, kind, 1, &[b'y'; 64]);
    }
    deliver(&sb, &mut agent, &frames, 2);
    {
        let st = sb.shared.lock();
        for q in &st.execs[&1].out {
            assert!(q.len() > OUTPUT_WINDOW as usize - 64, "{} queued", q.len());
            assert!(
                q.capacity() <= OUTPUT_WINDOW as usize,
                "{} bytes held for a window of {OUTPUT_WINDOW}",
                q.capacity()
            );
        }
    }
    drop(p);
}

/// Guest input is hostile: stdin credit an agent grants beyond the window
/// (here: u32::MAX, twice, and one more byte) leaves the host with at most
/// one window to send without hearing from the agent.
#[test]
fn stdin_credit_never_exceeds_the_window() {
    let (sb, mut agent) = sandbox();
    let p = sb.spawn(Command::new("cat").stdin_piped()).unwrap();
    let mut frames = Vec::new();
    for bytes in [u32::MAX, u32::MAX, 1] {
        Msg::StdinCredit { id: 1, bytes }
            .encode(&mut frames)
            .unwrap();
    }
    deliver(&sb, &mut agent, &frames, 2);
    assert_eq!(sb.shared.lock().execs[&1].stdin_credit, STDIN_WINDOW);
    drop(p);
}

/// Guest input is hostile: an agent that never reports the end of the
/// commands whose `Process` was dropped leaves the host's command table
/// bounded (at most `MAX_EXECS` such commands, as many as an honest agent
/// can run at once), however many are spawned and dropped.
#[test]
fn dropped_processes_whose_end_is_never_reported_stay_bounded() {
    let (sb, agent) = sandbox();
    // Reads (and ignores) what the host sends, so no send waits.
    let mut drain = agent.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let _ = std::io::copy(&mut drain, &mut std::io::sink());
    });
    for _ in 0..4 * MAX_EXECS {
        drop(sb.spawn(Command::new("never-ends")).unwrap());
    }
    let known = sb.shared.lock().execs.len();
    assert!(known <= MAX_EXECS, "{known} dropped commands kept");
    drop(sb);
    drop(agent);
    reader.join().unwrap();
}

/// A panic in the sandbox's reader thread (a kiln bug; here a test-only
/// fault: a SHUTDOWN frame from the agent) ends the connection: a caller
/// waiting for a command gets `Disconnected` at once, not a wait for frames
/// nobody reads.
#[test]
fn a_panic_in_the_reader_thread_ends_the_connection() {
    let (sb, mut agent) = sandbox();
    // Its timeout only bounds the wait when the fault goes unseen (the
    // host's backstop: 20 s later, a `Timeout`).
    let waits = Command::new("waits").timeout(Duration::from_millis(1));
    let mut p = sb.spawn(waits).unwrap();
    let mut frame = Vec::new();
    Msg::Shutdown.encode(&mut frame).unwrap();
    agent.write_all(&frame).unwrap();
    let e = p.wait().unwrap_err();
    assert!(
        matches!(&e, super::SandboxError::Disconnected { reason, .. } if reason.contains("panicked")),
        "{e}"
    );
}
