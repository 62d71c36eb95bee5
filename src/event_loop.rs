//! The monitor's event thread: one epoll loop (event-manager) that serves
//! host-side I/O for devices and notices when the VM is over. vCPU threads
//! never block on host I/O; they only handle register accesses.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kiln_devices::serial::SerialDevice;
use vmm_sys_util::eventfd::EventFd;

use crate::console::PanicWatch;
use crate::error::{Error, Result};
use crate::lifecycle::Lifecycle;
use crate::outcome::VmOutcome;

pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

pub struct EventLoop {
    manager: EventManager<Subscriber>,
}

impl EventLoop {
    pub fn new() -> Result<Self> {
        let manager = EventManager::new().map_err(Error::EventLoop)?;
        Ok(Self { manager })
    }

    pub fn add(&mut self, subscriber: Subscriber) {
        self.manager.add_subscriber(subscriber);
    }

    /// Serves events until the lifecycle says stop, or the deadline passes.
    pub fn run(&mut self, life: &Lifecycle, deadline: Option<Instant>) -> Result<()> {
        while !life.is_stopping() {
            let timeout_ms = match deadline {
                None => -1,
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        life.finish(VmOutcome::Timeout);
                        break;
                    }
                    // Round up so a wake-up never lands just before the deadline.
                    ((d - now).as_micros().div_ceil(1000)).min(i32::MAX as u128) as i32
                }
            };
            self.manager
                .run_with_timeout(timeout_ms)
                .map_err(Error::EventLoop)?;
        }
        Ok(())
    }
}

/// Watches VM-level events: the lifecycle's exit eventfd and the i8042 reset.
pub struct VmEvents {
    pub life: Arc<Lifecycle>,
    pub reset_evt: EventFd,
    pub panic_watch: PanicWatch,
}

impl MutEventSubscriber for VmEvents {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.life.exit_evt(), &self.reset_evt] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                log::error!("event loop: cannot watch VM events: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            // A reset that follows a panic message is the panic (panic=-1 reboots).
            self.life.finish(match self.panic_watch.panic_message() {
                Some(msg) => VmOutcome::KernelPanic(Some(msg)),
                None => VmOutcome::GuestReset,
            });
        } else {
            let _ = self.life.exit_evt().read();
            #[cfg(test)]
            if self
                .life
                .panic_event_loop
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                panic!("fault injection: the event loop panics");
            }
        }
    }
}

/// Feeds host input (stdin) into the UART, never faster than the guest
/// drains it: when the receive FIFO is full, stop reading the input and wait
/// for the UART's "FIFO empty" event instead.
pub struct SerialInput {
    input: File,
    serial: Arc<Mutex<SerialDevice>>,
    /// Duplicate of the UART's input-ready eventfd.
    ready: EventFd,
    /// Input is not being watched because the FIFO is full.
    waiting_for_room: bool,
    /// Input ended (EOF or error); nothing more to forward.
    closed: bool,
}

impl SerialInput {
    /// Forwards `input` into `serial` (stops watching at EOF).
    pub fn new(input: File, serial: Arc<Mutex<SerialDevice>>) -> Result<Self> {
        let ready = serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .input_ready_eventfd()
            .try_clone()
            .map_err(Error::io("duplicating the UART input eventfd"))?;
        Ok(Self {
            input,
            serial,
            ready,
            waiting_for_room: false,
            closed: false,
        })
    }

    fn stop_watching_input(&mut self, ops: &mut EventOps) {
        let _ = ops.remove(Events::new(&self.input, EventSet::IN));
    }

    fn pump(&mut self, ops: &mut EventOps) {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let room = serial.input_room();
        if room == 0 {
            drop(serial);
            self.stop_watching_input(ops);
            self.waiting_for_room = true;
            return;
        }
        let mut buf = [0u8; 64];
        match self.input.read(&mut buf[..room.min(64)]) {
            Ok(0) => {
                drop(serial);
                self.stop_watching_input(ops);
                self.closed = true;
            }
            Ok(n) => {
                serial.enqueue_input(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                drop(serial);
                log::debug!("console input closed: {e}");
                self.stop_watching_input(ops);
                self.closed = true;
            }
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.input, EventSet::IN)) {
            // Regular files cannot be polled: then there is simply no input.
            log::debug!("console input not pollable ({e:?}); the guest gets no input");
            self.closed = true;
            return;
        }
        let _ = ops.add(Events::new(&self.ready, EventSet::IN));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.ready.as_raw_fd() {
            let _ = self.ready.read();
            if self.waiting_for_room && !self.closed {
                self.waiting_for_room = false;
                let _ = ops.add(Events::new(&self.input, EventSet::IN));
            }
            return;
        }
        self.pump(ops);
    }
}
