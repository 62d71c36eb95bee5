//! Just enough of the i8042 keyboard controller for the guest to reset the
//! machine (`reboot=k`: command 0xfe on port 0x64), via vm-superio's model.

use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Fires an eventfd when the guest asks for a CPU reset.
pub(crate) struct ResetSignal(pub EventFd);

impl vm_superio::Trigger for ResetSignal {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Covers ports 0x60..=0x64 (data at offset 0, command/status at offset 4).
pub struct I8042 {
    inner: I8042Device<ResetSignal>,
}

impl I8042 {
    /// A controller that writes to `reset` when the guest asks for a CPU
    /// reset (the monitor then ends the VM).
    pub fn new(reset: EventFd) -> Self {
        Self {
            inner: I8042Device::new(ResetSignal(reset)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = self.inner.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            if let Err(e) = self.inner.write(offset as u8, value) {
                log::warn!("i8042: cannot signal reset: {e}");
            }
        }
    }
}

/// A port that accepts and ignores everything (Linux's `outb_p` delay port).
pub struct NullDevice;

impl BusDevice for NullDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn reset_command_fires_event_other_writes_do_not() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xaa]);
        assert!(evt.read().is_err(), "no reset yet");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
        let mut b = [0xffu8; 1];
        dev.read(4, &mut b);
        assert_eq!(b[0], 0, "status: input buffer empty so the guest may write");
    }
}
