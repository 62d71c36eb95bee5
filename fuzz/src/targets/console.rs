//! virtio-console: output chains of any shape from a hostile driver while
//! the host's output stalls and resumes, and host input into receive
//! buffers of any shape. The device's output buffer must stay bounded
//! while the host output is stalled (the memory cap), and the device must
//! not spin waiting for room.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use kiln_devices::fuzzing::{
    CONSOLE_MAX_CHAIN_OUTPUT as MAX_CHAIN_OUTPUT, CONSOLE_OUTPUT_HIGH as OUTPUT_HIGH,
};
use kiln_devices::virtio::console::VirtioConsole;

use crate::input::{Input, Script};
use crate::virtio::{Harness, RingScript, BUFFERS, RING_OPS};
use crate::Target;

pub const TARGET: Target = Target {
    name: "console",
    run,
    // The output buffer (high-water mark plus the chain that crossed it),
    // the chain being copied, the writer thread's chunk, parsed chains and
    // the event loop.
    memory_cap: OUTPUT_HIGH + 3 * MAX_CHAIN_OUTPUT + (512 << 10),
    memory_per_input_byte: 0,
    seeds,
};

const OP_INPUT: u8 = RING_OPS;
const OP_CLOSE_INPUT: u8 = RING_OPS + 1;
const OP_STALL: u8 = RING_OPS + 2;
const OP_RESUME: u8 = RING_OPS + 3;
const OPS: u8 = RING_OPS + 4;
const RXQ: u8 = 0;
const TXQ: u8 = 1;

/// The host output: counts what it gets, and blocks while stalled (a full
/// terminal or pipe).
#[derive(Clone, Default)]
pub(crate) struct Output(Arc<(Mutex<bool>, Condvar, AtomicU64)>);

impl Output {
    fn stall(&self, stalled: bool) {
        *self.0 .0.lock().unwrap_or_else(|e| e.into_inner()) = stalled;
        self.0 .1.notify_all();
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut stalled = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        while *stalled {
            stalled = self.0 .1.wait(stalled).unwrap_or_else(|e| e.into_inner());
        }
        self.0 .2.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub(crate) fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-int array; the result is checked.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(r, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: both descriptors are new and owned by nobody else.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let output = Output::default();
    let (reader, writer) = pipe();
    let mut writer = Some(writer);
    let console = VirtioConsole::new(Box::new(output.clone()), Some(reader)).expect("eventfd");
    let mut h = Harness::new(console);
    while !input.is_empty() {
        match input.u8() % OPS {
            OP_INPUT => {
                let bytes = input.bytes();
                if let Some(w) = writer.as_mut() {
                    // A full pipe takes part of it, or nothing.
                    let _ = w.write(bytes);
                }
                h.pump();
            }
            OP_CLOSE_INPUT => {
                writer = None;
                h.pump();
            }
            OP_STALL => output.stall(true),
            OP_RESUME => {
                output.stall(false);
                h.pump();
            }
            op => h.ring_op(op, &mut input),
        }
    }
    // Teardown writes out what the guest handed over; let it.
    output.stall(false);
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let line = b"Linux version 6.1 (kiln@fuzz)\n";
    let hvc = Script::new()
        .activate(2, 64, u64::MAX)
        // hvc0's receive buffer, then typed input, then output.
        .chain(RXQ, &[(BUFFERS, 4096, true)])
        .kick(RXQ)
        .u8(OP_INPUT)
        .bytes(b"ls /\n")
        .mem(BUFFERS + 0x2000, line)
        .chain(TXQ, &[(BUFFERS + 0x2000, line.len() as u32, false)])
        .kick(TXQ)
        .u8(OP_CLOSE_INPUT)
        .build();

    let mut stalled = Script::new();
    stalled.activate(2, 64, 0).u8(OP_STALL);
    for i in 0..24u64 {
        stalled.chain(TXQ, &[(0x11_0000 + i * 0x8000, 0x8000, false)]);
    }
    stalled.kick(TXQ).u8(OP_RESUME);
    vec![("hvc0", hvc), ("stalled-output", stalled.build())]
}
