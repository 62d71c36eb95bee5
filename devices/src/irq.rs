//! Interrupt lines from device models to the guest.

use std::io;
use vmm_sys_util::eventfd::EventFd;

/// An interrupt line backed by an eventfd that the monitor registers with KVM as
/// an irqfd: raising it injects the IRQ without a round trip through user space.
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl IrqLine {
    /// A new line (a non-blocking eventfd); fails only when the host is out
    /// of file descriptors.
    pub fn new() -> io::Result<Self> {
        Ok(Self(crate::new_eventfd()?))
    }

    /// The eventfd to register with KVM (`register_irqfd`).
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }

    /// Another handle on the same line (the tests watch it).
    #[cfg(test)]
    pub(crate) fn try_clone(&self) -> io::Result<Self> {
        self.duplicate()
    }

    /// Another handle on the same line (a UART rebuilt from a snapshot).
    pub(crate) fn duplicate(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }

    /// Injects the interrupt (edge): one eventfd write.
    pub(crate) fn raise(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.raise()
    }
}
