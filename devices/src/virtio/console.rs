//! virtio-console (device ID 3) with a single port (no multiport): the
//! guest's hvc0. Port 0's receive queue carries host input (kiln's stdin) to
//! the guest, its transmit queue the guest's output to kiln's stdout.
//!
//! Output never blocks the event loop: bytes go to a bounded buffer that a
//! writer thread empties into the (possibly blocking) host output. While the
//! buffer is full the device takes no more transmit buffers, so a stalled
//! stdout stalls the guest's console writes, not the monitor; the writer
//! thread signals an eventfd when there is room again. Input is read only
//! while the guest has posted receive buffers.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::chain::{Layout, Limits};
use super::common::VirtioCommon;
use super::counters::device_counters;
use super::queue::{Served, Stop};
use super::{VirtioDevice, VIRTIO_F_VERSION_1};

pub(crate) const VIRTIO_ID_CONSOLE: u32 = 3;

const RXQ: usize = 0;
const TXQ: usize = 1;
const QUEUE_SIZES: [u16; 2] = [64, 64];
/// Event data: queue kicks use their index; then these.
const TOKEN_INPUT: u32 = 2;
const TOKEN_DRAINED: u32 = 3;
/// Output queued for the host above which no more tx buffers are taken.
pub(crate) const OUTPUT_HIGH: usize = 64 * 1024;
/// Most bytes taken from one tx chain (Linux sends at most a page); the
/// rest of a larger, hostile chain is dropped.
pub(crate) const MAX_CHAIN_OUTPUT: usize = 64 * 1024;
/// Largest piece the writer thread takes out of the buffer at once.
const WRITE_CHUNK: usize = 64 * 1024;
/// How long teardown waits for a host output that makes no progress.
const DRAIN_STALL_LIMIT: Duration = Duration::from_secs(5);
/// Input bytes per receive buffer.
const INPUT_CHUNK: usize = 4096;
/// Chains served per event, each way, before yielding to other devices.
const CHAINS_PER_EVENT: usize = 64;
/// Buffers in either direction (a transmit chain's writable ones and a
/// receive chain's readable ones are ignored), at most a ring long.
const CHAIN_SHAPE: (Layout, Limits) = (
    Layout::ReadThenWrite,
    Limits::descriptors(QUEUE_SIZES[0] as usize),
);

device_counters! {
    /// virtio-console counters.
    pub(crate) struct ConsoleCounters {
        /// Receive buffers filled with host input.
        rx_requests,
        /// Input bytes given to the guest.
        rx_bytes,
        /// Transmit chains taken.
        tx_requests,
        /// Output bytes taken from the guest.
        tx_bytes,
        /// Output bytes dropped: past `MAX_CHAIN_OUTPUT` in one chain.
        tx_dropped_bytes,
        /// Chains that broke a rule (returned unused).
        bad_chains,
        /// Writes to the host output that failed (their bytes are lost).
        output_errors,
    }
}

/// A writer several devices can share (the serial and the virtio console
/// both print to kiln's stdout).
#[derive(Clone)]
pub struct SharedWriter(Arc<Mutex<Box<dyn Write + Send>>>);

impl SharedWriter {
    /// Shares `out`; each write holds its lock, so writes from two devices
    /// never interleave within one call.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self(Arc::new(Mutex::new(out)))
    }

    fn lock(&self) -> MutexGuard<'_, Box<dyn Write + Send>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.lock().write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.lock().write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.lock().flush()
    }
}

#[derive(Default)]
struct OutState {
    buf: VecDeque<u8>,
    /// The device stopped taking tx buffers; wake it when there is room.
    device_waiting: bool,
    closing: bool,
    /// The writer thread has exited.
    done: bool,
    /// Bytes written to the host so far (teardown watches it for progress).
    written: u64,
}

/// Run first by a thread the device starts, before it does its work.
pub type ThreadStart = Box<dyn FnOnce() -> io::Result<()> + Send>;

/// The bounded output buffer and the thread that writes it out.
struct Output {
    shared: Arc<(Mutex<OutState>, Condvar)>,
    /// Signalled by the writer thread when room appears for a waiting device.
    room: EventFd,
    thread: Option<JoinHandle<()>>,
}

fn lock_state(m: &Mutex<OutState>) -> MutexGuard<'_, OutState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Output {
    #[cfg(test)]
    fn new(out: Box<dyn Write + Send>, counters: Arc<ConsoleCounters>) -> io::Result<Self> {
        Self::with_thread_start(out, counters, Box::new(|| Ok(())))
    }

    /// The writer thread runs `start` first and writes nothing if it fails;
    /// this returns once `start` has run, with its error.
    fn with_thread_start(
        mut out: Box<dyn Write + Send>,
        counters: Arc<ConsoleCounters>,
        start: ThreadStart,
    ) -> io::Result<Self> {
        let shared = Arc::new((Mutex::new(OutState::default()), Condvar::new()));
        let room = crate::new_eventfd()?;
        let thread_shared = shared.clone();
        let thread_room = room.try_clone()?;
        let (started_tx, started) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("kiln-console-out".into())
            .spawn(move || {
                let result = start();
                let ok = result.is_ok();
                let _ = started_tx.send(result);
                if !ok {
                    return;
                }
                let (lock, cond) = &*thread_shared;
                loop {
                    let chunk: Vec<u8> = {
                        let mut st = lock_state(lock);
                        while st.buf.is_empty() && !st.closing {
                            st = cond.wait(st).unwrap_or_else(|e| e.into_inner());
                        }
                        if st.buf.is_empty() {
                            st.done = true;
                            cond.notify_all();
                            return;
                        }
                        let n = st.buf.len().min(WRITE_CHUNK);
                        st.buf.drain(..n).collect()
                    };
                    // A closed or failing output drops the bytes; the guest goes on.
                    if let Err(e) = out.write_all(&chunk).and_then(|()| out.flush()) {
                        log::debug!("virtio-console: output dropped: {e}");
                        counters.output_errors.inc();
                    }
                    let mut st = lock_state(lock);
                    st.written += chunk.len() as u64;
                    if st.device_waiting && st.buf.len() < OUTPUT_HIGH / 2 {
                        st.device_waiting = false;
                        let _ = thread_room.write(1);
                    }
                    cond.notify_all();
                }
            })?;
        let started = started
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the writer thread ended at its start")));
        if let Err(e) = started {
            let _ = thread.join();
            return Err(e);
        }
        Ok(Self {
            shared,
            room,
            thread: Some(thread),
        })
    }

    /// True if more output may be queued now; otherwise the device is
    /// recorded as waiting and `room` fires later.
    fn has_room(&self) -> bool {
        let mut st = lock_state(&self.shared.0);
        if st.buf.len() >= OUTPUT_HIGH {
            st.device_waiting = true;
            return false;
        }
        true
    }

    fn push(&self, data: &[u8]) {
        lock_state(&self.shared.0).buf.extend(data);
        self.shared.1.notify_all();
    }

    #[cfg(test)]
    fn queued(&self) -> usize {
        lock_state(&self.shared.0).buf.len()
    }
}

impl Drop for Output {
    /// Writes out what the guest already handed over, as long as the host
    /// output keeps making progress.
    fn drop(&mut self) {
        let (lock, cond) = &*self.shared;
        let mut st = lock_state(lock);
        st.closing = true;
        cond.notify_all();
        let mut last = st.written;
        while !st.done {
            let (next, timeout) = cond
                .wait_timeout(st, DRAIN_STALL_LIMIT)
                .unwrap_or_else(|e| e.into_inner());
            st = next;
            if timeout.timed_out() && st.written == last && !st.done {
                log::warn!(
                    "virtio-console: host output blocked; dropping {} bytes",
                    st.buf.len()
                );
                return;
            }
            last = st.written;
        }
        drop(st);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The virtio console device (the guest's hvc0). Its output goes through
/// a 64 KiB buffer and a writer thread of its own (`kiln-console-out`), so a
/// slow host output stalls the guest's console, never the event loop.
pub struct VirtioConsole {
    /// Features, the queues while running, counters.
    virtio: VirtioCommon,
    counters: Arc<ConsoleCounters>,
    /// The host side: kiln's input and output.
    input: Option<File>,
    /// The input is in the poll set.
    input_polled: bool,
    /// Input ended (EOF, error, or not pollable).
    input_closed: bool,
    output: Output,
}

impl VirtioConsole {
    /// `output` receives the guest's console output; `input` (e.g. stdin)
    /// feeds the guest's console input (a file that cannot be polled gives
    /// no input). Fails when the writer thread or an eventfd cannot be made.
    pub fn new(output: Box<dyn Write + Send>, input: Option<File>) -> io::Result<Self> {
        Self::with_writer_start(output, input, Box::new(|| Ok(())))
    }

    /// As [`new`](Self::new); the writer thread runs `start` before it
    /// writes anything (the monitor installs the thread's seccomp filter
    /// there), and its error is this call's.
    pub fn with_writer_start(
        output: Box<dyn Write + Send>,
        input: Option<File>,
        start: ThreadStart,
    ) -> io::Result<Self> {
        let counters = Arc::new(ConsoleCounters::default());
        Ok(Self {
            virtio: VirtioCommon::new(
                "console".into(),
                VIRTIO_ID_CONSOLE,
                &QUEUE_SIZES,
                // No F_SIZE, no MULTIPORT, no EMERG_WRITE: the config space is unused.
                VIRTIO_F_VERSION_1,
                Vec::new(),
                counters.clone(),
            )?,
            output: Output::with_thread_start(output, counters.clone(), start)?,
            counters,
            input_closed: input.is_none(),
            input,
            input_polled: false,
        })
    }

    /// Moves guest output into the host output buffer while it has room.
    fn process_tx(&mut self) {
        let (output, counters) = (&self.output, &*self.counters);
        let mut data = Vec::new();
        self.virtio
            .serve(TXQ, CHAINS_PER_EVENT, CHAIN_SHAPE, |mem, chain| {
                if !output.has_room() {
                    return Served::Later;
                }
                if let Err(e) = chain.check() {
                    log::debug!("virtio-console: bad tx chain: {e}");
                    counters.bad_chains.inc();
                    return Served::Used(0);
                }
                let len = chain.readable_len();
                let n = len.min(MAX_CHAIN_OUTPUT as u64) as usize;
                data.resize(n, 0);
                if chain.reader().read_exact(mem, &mut data).is_ok() {
                    output.push(&data);
                    counters.tx_requests.inc();
                    counters.tx_bytes.add(n as u64);
                    counters.tx_dropped_bytes.add(len - n as u64);
                }
                Served::Used(0)
            });
    }

    fn set_input_polled(&mut self, ops: &mut EventOps, want: bool) {
        let want = want && !self.input_closed;
        if want == self.input_polled {
            return;
        }
        let Some(input) = &self.input else {
            return;
        };
        if want {
            if let Err(e) = ops.add(Events::with_data(input, TOKEN_INPUT, EventSet::IN)) {
                // Regular files cannot be polled: then there is simply no input.
                log::debug!("virtio-console: input not pollable ({e:?}); no guest input");
                self.input_closed = true;
                return;
            }
        } else {
            let _ = ops.remove(Events::new(input, EventSet::IN));
        }
        self.input_polled = want;
    }

    /// Host input is readable: move one chunk into a receive buffer (the
    /// input may be a blocking fd: one read per readiness), or stop polling
    /// the input until the guest posts buffers.
    fn process_input(&mut self, ops: &mut EventOps) {
        let Some(input) = self.input.as_mut() else {
            return;
        };
        let counters = &*self.counters;
        let (mut ended, mut read) = (false, false);
        let turn = self
            .virtio
            .serve(RXQ, CHAINS_PER_EVENT, CHAIN_SHAPE, |mem, chain| {
                if read {
                    return Served::Later;
                }
                let room = chain.writable_len().min(INPUT_CHUNK as u64) as usize;
                if chain.check().is_err() || room == 0 {
                    // Unusable buffer: return it empty.
                    counters.bad_chains.inc();
                    return Served::Used(0);
                }
                let mut buf = [0u8; INPUT_CHUNK];
                read = true;
                match input.read(&mut buf[..room]) {
                    Ok(0) => {
                        ended = true;
                        Served::Later
                    }
                    Ok(n) => {
                        let written = chain.writer().write(mem, &buf[..n]);
                        counters.rx_requests.inc();
                        counters.rx_bytes.add(written as u64);
                        Served::Used(written as u32)
                    }
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::Interrupted =>
                    {
                        Served::Later
                    }
                    Err(e) => {
                        log::debug!("virtio-console: input closed: {e}");
                        ended = true;
                        Served::Later
                    }
                }
            });
        if ended {
            self.set_input_polled(ops, false);
            self.input_closed = true;
        } else if turn.is_none_or(|t| t.stop == Stop::Empty) {
            // No receive buffers (or not running): wait for the guest's kick.
            self.set_input_polled(ops, false);
        }
    }
}

impl VirtioDevice for VirtioConsole {
    fn virtio(&self) -> &VirtioCommon {
        &self.virtio
    }

    fn virtio_mut(&mut self) -> &mut VirtioCommon {
        &mut self.virtio
    }
}

impl MutEventSubscriber for VirtioConsole {
    fn init(&mut self, ops: &mut EventOps) {
        self.virtio.watch_kicks(ops);
        if let Err(e) = ops.add(Events::with_data(
            &self.output.room,
            TOKEN_DRAINED,
            EventSet::IN,
        )) {
            log::error!("virtio-console: cannot watch the output: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.virtio.take_kick(&events) {
            Some(RXQ) => {
                // New receive buffers: input may flow again.
                let active = self.virtio.is_active();
                self.set_input_polled(ops, active);
            }
            Some(_) => self.process_tx(),
            None if events.data() == TOKEN_DRAINED => {
                let _ = self.output.room.read();
                self.process_tx();
            }
            None if events.data() == TOKEN_INPUT => self.process_input(ops),
            None => log::debug!("virtio-console: unexpected event {}", events.data()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqLine;
    use crate::virtio::test_queue::{self, DriverQueue};
    use crate::virtio::{Activation, Interrupt};
    use event_manager::{EventManager, SubscriberOps};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};

    const MEM_SIZE: usize = 16 << 20;
    const RX_RING: u64 = 0x1_0000;
    const TX_RING: u64 = 0x2_0000;
    const BUFS: u64 = 0x10_0000;

    /// (blocked, bytes written so far), and a condvar for unblocking.
    type Gate = (Mutex<(bool, Vec<u8>)>, Condvar);

    /// Output that can be blocked (like a full pipe) and inspected.
    #[derive(Clone, Default)]
    struct GatedOut(Arc<Gate>);

    impl GatedOut {
        fn set_blocked(&self, blocked: bool) {
            self.0 .0.lock().unwrap().0 = blocked;
            self.0 .1.notify_all();
        }
        fn bytes(&self) -> Vec<u8> {
            self.0 .0.lock().unwrap().1.clone()
        }
        fn wait_len(&self, n: usize) -> bool {
            let mut g = self.0 .0.lock().unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while g.1.len() < n {
                let now = std::time::Instant::now();
                if now >= deadline {
                    return false;
                }
                g = self.0 .1.wait_timeout(g, deadline - now).unwrap().0;
            }
            true
        }
    }

    impl Write for GatedOut {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut g = self.0 .0.lock().unwrap();
            while g.0 {
                g = self.0 .1.wait(g).unwrap();
            }
            g.1.extend_from_slice(buf);
            self.0 .1.notify_all();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Harness {
        mem: &'static GuestMemoryMmap,
        dev: Arc<Mutex<VirtioConsole>>,
        em: EventManager<Arc<Mutex<VirtioConsole>>>,
        rx: DriverQueue,
        tx: DriverQueue,
        out: GatedOut,
        next_buf: u64,
    }

    impl Harness {
        fn new(input: Option<File>) -> Self {
            let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
            ));
            let out = GatedOut::default();
            let dev = Arc::new(Mutex::new(
                VirtioConsole::new(Box::new(out.clone()), input).unwrap(),
            ));
            let mut em = EventManager::new().unwrap();
            em.add_subscriber(dev.clone());
            Self {
                mem,
                dev,
                em,
                rx: DriverQueue::new(mem, RX_RING),
                tx: DriverQueue::new(mem, TX_RING),
                out,
                next_buf: BUFS,
            }
        }

        fn activate(&mut self) {
            let queues = vec![self.rx.queue(), self.tx.queue()];
            self.dev
                .lock()
                .unwrap()
                .activate(Activation {
                    mem: self.mem.clone(),
                    queues,
                    interrupt: Interrupt::new(IrqLine::new().unwrap()),
                    features: VIRTIO_F_VERSION_1,
                })
                .unwrap();
            self.pump();
        }

        fn pump(&mut self) {
            test_queue::pump(&mut self.em);
        }

        fn assert_idle(&mut self) {
            test_queue::assert_idle(&mut self.em);
        }

        fn alloc(&mut self, len: u64) -> u64 {
            let at = self.next_buf;
            self.next_buf += len.next_multiple_of(0x1000);
            at
        }

        /// Queues guest output split over two descriptors.
        fn write_guest(&mut self, data: &[u8]) {
            let at = self.alloc(data.len() as u64 + 1);
            self.mem.write_slice(data, GuestAddress(at)).unwrap();
            let half = data.len() as u32 / 2;
            self.tx.add(&[
                (at, half, 0),
                (at + u64::from(half), data.len() as u32 - half, 0),
            ]);
        }

        fn kick(&self, q: usize) {
            self.dev.lock().unwrap().queue_events()[q].write(1).unwrap();
        }

        fn post_rx(&mut self, n: usize) -> Vec<u64> {
            (0..n)
                .map(|_| {
                    let at = self.alloc(64);
                    self.rx.add(&[(at, 64, VRING_DESC_F_WRITE)]);
                    at
                })
                .collect()
        }
    }

    #[test]
    fn identity() {
        let h = Harness::new(None);
        let dev = h.dev.lock().unwrap();
        assert_eq!(dev.device_type(), 3);
        assert_eq!(dev.features(), VIRTIO_F_VERSION_1);
        assert_eq!(dev.queue_max_sizes().len(), 2);
        let mut cfg = [0xffu8; 12];
        dev.read_config(0, &mut cfg);
        assert_eq!(cfg, [0; 12]);
    }

    #[test]
    fn guest_output_reaches_the_host_in_order() {
        let mut h = Harness::new(None);
        // Kicks before activation are ignored (and the chain stays queued).
        h.write_guest(b"early ");
        h.kick(TXQ);
        h.pump();
        assert!(h.tx.used().is_empty());
        h.activate();
        h.write_guest(b"hello from hvc0\n");
        h.kick(TXQ);
        h.pump();
        assert!(h.out.wait_len(22));
        assert_eq!(h.out.bytes(), b"early hello from hvc0\n");
        assert_eq!(h.tx.used().len(), 2);
        h.assert_idle();
    }

    #[test]
    fn blocked_output_stops_taking_buffers_without_spinning() {
        let mut h = Harness::new(None);
        h.activate();
        h.out.set_blocked(true);
        let piece: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let pieces = 60; // 240 KiB: more than the writer's chunk plus the buffer
        for _ in 0..pieces {
            h.write_guest(&piece);
        }
        h.kick(TXQ);
        h.pump();
        let taken = h.tx.used().len();
        assert!(
            taken < pieces,
            "all {taken} buffers taken while the host is blocked"
        );
        assert!(h.dev.lock().unwrap().output.queued() <= OUTPUT_HIGH + 4096);
        h.assert_idle();
        // The host drains: the device resumes by itself.
        h.out.set_blocked(false);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut used = taken;
        while used < pieces && std::time::Instant::now() < deadline {
            h.em.run_with_timeout(100).unwrap();
            used += h.tx.used().len();
        }
        assert_eq!(used, pieces);
        assert!(h.out.wait_len(pieces * 4096));
        assert_eq!(h.out.bytes(), piece.repeat(pieces));
    }

    #[test]
    fn hostile_tx_chains_are_returned() {
        let mut h = Harness::new(None);
        h.activate();
        // Device-writable only, outside memory, and huge (truncated).
        h.tx.add(&[(BUFS, 64, VRING_DESC_F_WRITE)]);
        h.tx.add(&[(MEM_SIZE as u64 - 8, 4096, 0)]);
        h.tx.add(&[(0x20_0000, 1 << 23, 0)]);
        h.kick(TXQ);
        h.pump();
        assert_eq!(h.tx.used().len(), 3);
        assert!(h.out.wait_len(MAX_CHAIN_OUTPUT));
        // A last, well-formed chain: output is written in order, so once its
        // bytes are out, everything the hostile chains produced is too. (It
        // is taken once the host has drained the queued output; the bound
        // only turns a hang into a failure.)
        h.write_guest(b"done");
        h.kick(TXQ);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while h.tx.used().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never taken");
            h.em.run_with_timeout(100).unwrap();
        }
        assert!(h.out.wait_len(MAX_CHAIN_OUTPUT + 4));
        let out = h.out.bytes();
        assert_eq!(out.len(), MAX_CHAIN_OUTPUT + 4, "the huge chain is cut");
        assert!(out.ends_with(b"done"));
        h.assert_idle();
    }

    #[test]
    fn rings_of_bad_chains_are_served_a_budget_per_event() {
        // A guest that keeps its avail indices a whole ring ahead over bad
        // chains: each event returns one budget of them and re-kicks the
        // queue for the rest.
        let (reader, mut writer) = pipe();
        let mut h = Harness::new(Some(reader));
        h.activate();
        let ring = usize::from(test_queue::RING_SIZE);
        for _ in 0..ring {
            h.tx.add(&[(MEM_SIZE as u64 - 8, 4096, 0)]);
        }
        h.kick(TXQ);
        assert_eq!(h.em.run_with_timeout(0).unwrap(), 1);
        assert_eq!(h.tx.used().len(), CHAINS_PER_EVENT);
        h.pump();
        assert_eq!(h.tx.used().len(), ring - CHAINS_PER_EVENT);
        // Device-readable receive buffers while input waits.
        for _ in 0..ring {
            h.rx.add(&[(BUFS, 64, 0)]);
        }
        // The input has been polled since activation: it becomes readable.
        writer.write_all(b"x").unwrap();
        assert_eq!(h.em.run_with_timeout(0).unwrap(), 1);
        let used = h.rx.used();
        assert_eq!(used.len(), CHAINS_PER_EVENT);
        h.pump();
        let rest = h.rx.used();
        assert_eq!(used.len() + rest.len(), ring);
        assert!(used.iter().chain(&rest).all(|&(_, len)| len == 0));
        let c = &h.dev.lock().unwrap().counters;
        assert_eq!(c.bad_chains.get(), 2 * ring as u64);
        assert_eq!((c.rx_bytes.get(), c.tx_bytes.get()), (0, 0));
    }

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-int array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        use std::os::fd::FromRawFd;
        // SAFETY: both fds are new and owned by nobody else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn input_flows_only_into_posted_buffers() {
        let (reader, mut writer) = pipe();
        let mut h = Harness::new(Some(reader));
        writer.write_all(b"typed").unwrap();
        // Not active: input waits, no spinning.
        h.assert_idle();
        h.activate();
        // Active but no receive buffers: still waiting, not spinning.
        h.assert_idle();
        let bufs = h.post_rx(2);
        h.kick(RXQ);
        h.pump();
        let used = h.rx.used();
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].1, 5);
        let mut got = [0u8; 5];
        h.mem.read_slice(&mut got, GuestAddress(bufs[0])).unwrap();
        assert_eq!(&got, b"typed");
        // More input goes into the second buffer; then none are left.
        writer.write_all(&[b'x'; 100]).unwrap();
        h.pump();
        assert_eq!(h.rx.used(), vec![(1, 64)]);
        h.assert_idle();
        // EOF is noticed once buffers are there, and then input stops.
        drop(writer);
        h.post_rx(1);
        h.kick(RXQ);
        h.pump();
        assert_eq!(h.rx.used().iter().map(|u| u.1).sum::<u32>(), 36);
        h.post_rx(1);
        h.kick(RXQ);
        h.assert_idle();
        assert!(h.dev.lock().unwrap().input_closed);
        assert!(h.rx.used().is_empty());
    }

    #[test]
    fn teardown_writes_out_pending_output() {
        let out = GatedOut::default();
        let output = Output::new(Box::new(out.clone()), Arc::default()).unwrap();
        out.set_blocked(true);
        output.push(b"pending bytes");
        let unblock = out.clone();
        // The output unblocks only once drop has begun (it marks the state
        // closing), so drop must wait for the pending bytes.
        let shared = output.shared.clone();
        let t = std::thread::spawn(move || {
            let (lock, cond) = &*shared;
            let mut st = lock_state(lock);
            while !st.closing {
                st = cond.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            drop(st);
            unblock.set_blocked(false);
        });
        drop(output);
        assert_eq!(out.bytes(), b"pending bytes");
        t.join().unwrap();
    }

    #[test]
    fn shared_writer_interleaves_whole_writes() {
        let out = GatedOut::default();
        let mut a = SharedWriter::new(Box::new(out.clone()));
        let mut b = a.clone();
        a.write_all(b"one ").unwrap();
        b.write_all(b"two").unwrap();
        a.flush().unwrap();
        assert_eq!(out.bytes(), b"one two");
    }
}
