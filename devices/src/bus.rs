//! Address buses that route guest port I/O and MMIO exits to device models.
//!
//! A vCPU thread that takes an I/O exit looks the address up here and calls the
//! device under its lock. Devices never see absolute addresses, only the
//! offset into their own window, so the same model can sit anywhere.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a bus window.
pub trait BusDevice: Send {
    /// Fills `data` with the bytes at `offset` in the device's window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset` in the device's window.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Why a device cannot be placed on a bus (a monitor bug: its layout is
/// fixed).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The window is empty or runs past the end of the address space.
    #[error("bus window {base:#x}+{len:#x} is empty or wraps around")]
    BadWindow {
        /// First address of the window.
        base: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// The window overlaps one already on the bus.
    #[error("bus window {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// First address of the window.
        base: u64,
        /// Its length in bytes.
        len: u64,
    },
}

/// Outcome of dispatching one access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A device handled it.
    Handled,
    /// No device covers the address: reads see all ones, writes are dropped.
    Unclaimed,
}

/// A map from address windows to devices (used for both PIO and MMIO).
#[derive(Default, Clone)]
pub struct Bus {
    // Keyed by window base; value is (length, device).
    windows: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus: every access is [`Access::Unclaimed`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadWindow { base, len })?;
        // The window before `end` is the only one that can overlap.
        if let Some((&b, &(l, _))) = self.windows.range(..end).next_back() {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.windows.insert(base, (len, device));
        Ok(())
    }

    /// Finds the device covering the whole access `[addr, addr + size)`.
    fn lookup(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, dev)) = self.windows.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= *len).then_some((offset, dev))
    }

    /// Reads `data.len()` bytes at `addr` from the device whose window
    /// holds the whole access, under that device's lock. An access no
    /// window holds reads all ones (`0xff` bytes).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Access {
        match self.lookup(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                Access::Handled
            }
            None => {
                data.fill(0xff);
                Access::Unclaimed
            }
        }
    }

    /// Writes `data` at `addr` to the device whose window holds the whole
    /// access, under that device's lock; an access no window holds is
    /// dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> Access {
        match self.lookup(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                Access::Handled
            }
            None => Access::Unclaimed,
        }
    }
}

/// Locks a device, recovering from poisoning: a panic in one access must not
/// wedge every later access (the state is plain data, still usable).
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_offset_and_rejects_overlap() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0xf8, 0x10),
            Err(BusError::Overlap {
                base: 0xf8,
                len: 0x10
            })
        );
        assert!(bus.insert(dev.clone(), 0, 0).is_err());
        assert!(bus.insert(dev.clone(), u64::MAX, 2).is_err());
        bus.insert(dev.clone(), 0x110, 0x10).unwrap();

        let mut b = [0u8; 2];
        assert_eq!(bus.read(0x104, &mut b), Access::Handled);
        assert_eq!(b, [4, 4]);
        assert_eq!(bus.write(0x112, &[7]), Access::Handled);
        assert_eq!(dev.lock().unwrap().writes, vec![(2, vec![7])]);
    }

    #[test]
    fn unclaimed_and_straddling_accesses() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x100, 0x10)
            .unwrap();
        let mut b = [0u8; 4];
        assert_eq!(bus.read(0x50, &mut b), Access::Unclaimed);
        assert_eq!(b, [0xff; 4]);
        // Straddles the end of the window: not handed to the device.
        assert_eq!(bus.read(0x10e, &mut b), Access::Unclaimed);
        assert_eq!(bus.write(u64::MAX, &[1, 2]), Access::Unclaimed);
    }
}
