//! 8250/16550 UART (the guest's ttyS0), built on vm-superio's model.
//!
//! Output bytes go straight to the host writer. Input from the host is queued
//! into the UART's receive FIFO; when the guest drains the FIFO the
//! `input_ready` eventfd fires so the event loop can feed more.

use std::io::{self, Write};

use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::irq::IrqLine;

/// The modem control register and its loopback bit: in loopback the UART's
/// receiver hears only its own transmitter, nothing from outside.
const MCR_OFFSET: u8 = 4;
const MCR_LOOP: u8 = 0x10;

/// Signals the event loop when the receive FIFO has room again.
pub(crate) struct InputReady(EventFd);

impl SerialEvents for InputReady {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {
        log::debug!("serial: lost an output byte");
    }
    fn in_buffer_empty(&self) {
        // A failed write means the counter is saturated: already signalled.
        let _ = self.0.write(1);
    }
}

/// The guest's ttyS0 on the PIO bus (8 ports at 0x3f8 in the monitor's
/// layout). Every register access is a VM exit, so bulk output is slow; the
/// virtio console is the fast alternative.
pub struct SerialDevice {
    uart: Serial<IrqLine, InputReady, Box<dyn Write + Send>>,
    /// The guest put the UART in loopback: host input waits until it leaves
    /// (the model would take it and drop it, as fast as the host sends).
    loopback: bool,
}

impl SerialDevice {
    /// A UART that raises `irq` and writes the guest's output to `out` (on
    /// the vCPU thread that made the access: a slow writer holds the guest
    /// up). Fails only when the host is out of file descriptors.
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>) -> io::Result<Self> {
        let ready = InputReady(crate::new_eventfd()?);
        Ok(Self {
            uart: Serial::with_events(irq, ready, out),
            loopback: false,
        })
    }

    /// Fires when the guest has emptied the receive FIFO, or left loopback.
    pub fn input_ready_eventfd(&self) -> &EventFd {
        &self.uart.events().0
    }

    /// Free room in the receive FIFO (none in loopback).
    pub fn input_room(&self) -> usize {
        match self.loopback {
            true => 0,
            false => self.uart.fifo_capacity(),
        }
    }

    /// Queues host input for the guest; returns how many bytes were taken.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.uart.fifo_capacity());
        match self.uart.enqueue_raw_bytes(&bytes[..n]) {
            Ok(taken) => taken,
            Err(e) => {
                log::debug!("serial: input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte-wide registers; wider accesses read the first one.
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, value) {
                log::debug!("serial: write failed: {e:?}");
            }
            if offset as u8 == MCR_OFFSET {
                let loopback = value & MCR_LOOP != 0;
                if self.loopback && !loopback {
                    // Host input waited for this: ask for it again.
                    let _ = self.input_ready_eventfd().write(1);
                }
                self.loopback = loopback;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_the_writer_and_input_raises_irq() {
        let sink = Sink::default();
        let irq = IrqLine::new().unwrap();
        let irq_probe = irq.try_clone().unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(sink.clone())).unwrap();
        for &b in b"hi" {
            dev.write(0, &[b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");

        // Enable the "received data available" interrupt, then feed input.
        dev.write(1, &[0x01]);
        assert_eq!(dev.enqueue_input(b"x"), 1);
        assert_eq!(irq_probe.eventfd().read().unwrap(), 1);
        let mut b = [0u8; 1];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'x');
        // The FIFO is empty again: the event loop is told to feed more.
        assert_eq!(dev.input_ready_eventfd().read().unwrap(), 1);
    }

    #[test]
    fn loopback_takes_no_host_input_and_asks_again_when_it_ends() {
        let mut dev = SerialDevice::new(IrqLine::new().unwrap(), Box::new(io::sink())).unwrap();
        dev.write(u64::from(MCR_OFFSET), &[MCR_LOOP]);
        assert_eq!(dev.input_room(), 0, "no host input in loopback");
        // The guest talks to itself.
        dev.write(0, b"l");
        let mut b = [0u8; 1];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'l');
        let _ = dev.input_ready_eventfd().read();
        dev.write(u64::from(MCR_OFFSET), &[0]);
        assert_eq!(dev.input_ready_eventfd().read().unwrap(), 1);
        assert!(dev.input_room() > 0);
        assert_eq!(dev.enqueue_input(b"x"), 1);
    }

    #[test]
    fn input_beyond_fifo_capacity_is_not_taken() {
        let mut dev = SerialDevice::new(IrqLine::new().unwrap(), Box::new(io::sink())).unwrap();
        let room = dev.input_room();
        assert_eq!(dev.enqueue_input(&vec![b'a'; room + 10]), room);
        assert_eq!(dev.enqueue_input(b"more"), 0);
    }
}
