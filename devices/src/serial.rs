//! 8250/16550 UART (the guest's ttyS0), built on vm-superio's model.
//!
//! Output bytes go straight to the host writer. Input from the host is queued
//! into the UART's receive FIFO; when the guest drains the FIFO the
//! `input_ready` eventfd fires so the event loop can feed more.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::irq::IrqLine;
use crate::virtio::persist::RestoreError;

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

/// The UART's registers and the input the guest has not read yet: what a
/// snapshot saves (vm-superio's `SerialState`, as serde data). Without the
/// interrupt enable register the guest's 8250 driver waits forever for a
/// transmit interrupt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low and high byte.
    pub baud_divisor: [u8; 2],
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// The receive FIFO.
    pub input: Vec<u8>,
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

    /// The UART's guest-visible state (see [`SerialSnapshot`]).
    pub fn save(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            input: s.in_buffer,
        }
    }

    /// Puts this (fresh) UART into `saved`'s state, raising its interrupt
    /// if one was pending. A receive FIFO larger than the UART's is refused
    /// (the state is a file on disk); any register byte is one the guest
    /// could have written. Keeps its IRQ line, input event and output.
    pub fn restore(&mut self, saved: &SerialSnapshot) -> Result<(), RestoreError> {
        let bad = |reason: String| RestoreError::BadValue {
            device_type: 0,
            reason: format!("serial: {reason}"),
        };
        let state = SerialState {
            baud_divisor_low: saved.baud_divisor[0],
            baud_divisor_high: saved.baud_divisor[1],
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.input.clone(),
        };
        let capacity = self.uart.fifo_capacity() + self.uart.state().in_buffer.len();
        if saved.input.len() > capacity {
            return Err(bad(format!(
                "{} bytes of input for a FIFO of {capacity}",
                saved.input.len()
            )));
        }
        // vm-superio builds a UART from a state only with its parts moved
        // in: take them out of the current one (a stand-in holds their
        // places meanwhile, on duplicates of the same eventfds).
        let irq = self
            .uart
            .interrupt_evt()
            .duplicate()
            .map_err(|e| bad(e.to_string()))?;
        let ready = self
            .uart
            .events()
            .0
            .try_clone()
            .map_err(|e| bad(e.to_string()))?;
        let stand_in = Serial::with_events(irq, InputReady(ready), Box::new(io::sink()) as _);
        let old = std::mem::replace(&mut self.uart, stand_in);
        let irq = old
            .interrupt_evt()
            .duplicate()
            .map_err(|e| bad(e.to_string()))?;
        let ready = InputReady(old.events().0.try_clone().map_err(|e| bad(e.to_string()))?);
        let out = old.into_writer();
        self.uart = Serial::from_state(&state, irq, ready, out)
            .map_err(|e| bad(format!("cannot rebuild the UART: {e:?}")))?;
        self.loopback = saved.modem_control & MCR_LOOP != 0;
        Ok(())
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

    #[test]
    fn a_saved_uart_restores_its_registers_and_unread_input() {
        let mut dev = SerialDevice::new(IrqLine::new().unwrap(), Box::new(io::sink())).unwrap();
        dev.write(3, &[0x80]); // DLAB: the divisor latch
        dev.write(0, &[0x0c]);
        dev.write(3, &[0x03]); // 8N1
        dev.write(1, &[0x03]); // IER: receive and transmit interrupts
        dev.write(7, &[0x5a]);
        dev.enqueue_input(b"ab");
        let saved = dev.save();
        assert_eq!(saved.interrupt_enable, 0x03);
        assert_eq!(saved.input, b"ab");

        let sink = Sink::default();
        let irq = IrqLine::new().unwrap();
        let probe = irq.try_clone().unwrap();
        let mut fresh = SerialDevice::new(irq, Box::new(sink.clone())).unwrap();
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.save(), saved);
        // Transmit empty and data available: raised for each.
        assert!(
            probe.eventfd().read().unwrap() >= 1,
            "the pending interrupt"
        );
        let mut b = [0u8; 1];
        fresh.read(0, &mut b);
        assert_eq!(b[0], b'a');
        fresh.read(1, &mut b);
        assert_eq!(b[0], 0x03, "IER survives");
        // Output still reaches the same writer, input is still taken.
        fresh.write(0, b"x");
        assert_eq!(&*sink.0.lock().unwrap(), b"x");
        fresh.read(0, &mut b);
        assert!(fresh.enqueue_input(b"c") == 1);
    }

    #[test]
    fn a_saved_fifo_larger_than_the_uart_is_refused() {
        let dev = SerialDevice::new(IrqLine::new().unwrap(), Box::new(io::sink())).unwrap();
        let mut saved = dev.save();
        saved.input = vec![b'a'; 65];
        let mut fresh = SerialDevice::new(IrqLine::new().unwrap(), Box::new(io::sink())).unwrap();
        let before = fresh.save();
        let e = fresh.restore(&saved).unwrap_err();
        assert!(matches!(e, RestoreError::BadValue { .. }), "{e:?}");
        assert_eq!(fresh.save(), before);
    }
}
