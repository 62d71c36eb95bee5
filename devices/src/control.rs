//! kiln's control page: the guest-to-monitor channel for events that must not be
//! inferred from console text.
//!
//! A 4 KiB MMIO page (at `CONTROL_PAGE_START` in the monitor's layout). kiln's
//! guest init maps it through `/dev/mem` and writes 32-bit registers:
//!
//! | offset | access | meaning |
//! |---|---|---|
//! | 0x00 | read  | `MAGIC` ("kiln"), so init can check it talks to kiln |
//! | 0x04 | write | boot timer: the guest reached the stage written (1 = user space started) |
//! | 0x08 | write | exit report: `(kind << 8) \| code`; kind 0 = exited with `code`, 1 = killed by signal `code` |
//! | 0x0c | write | scratch: accepted and ignored (exit-cost benchmarks) |
//!
//! Only the first exit report counts; later writes are ignored, so a guest
//! cannot change a status after the monitor has acted on it.

/// Value read at `REG_MAGIC`: "kiln" in little-endian ASCII.
pub const MAGIC: u32 = u32::from_le_bytes(*b"kiln");
/// Offset of the magic register (read-only).
pub const REG_MAGIC: u64 = 0x00;
/// Offset of the boot-timer register: the guest writes the stage it reached.
pub const REG_BOOT_TIMER: u64 = 0x04;
/// Offset of the exit-report register: the guest writes how its command ended.
pub const REG_EXIT: u64 = 0x08;
/// Offset of the scratch register: writes are accepted and ignored (the
/// exit-cost benchmarks time them).
pub const REG_SCRATCH: u64 = 0x0c;
/// Size of the MMIO window.
pub const CONTROL_PAGE_SIZE: u64 = 0x1000;
/// Boot-timer stage written by init once user space runs.
pub const STAGE_USERSPACE: u32 = 1;

/// Exit kind (bits 8..16 of the exit report): exited with the code in bits 0..8.
pub const EXIT_KIND_CODE: u32 = 0;
/// Exit kind: killed by the signal in bits 0..8.
pub const EXIT_KIND_SIGNAL: u32 = 1;

use crate::bus::BusDevice;

/// How the guest's command ended, as reported through `REG_EXIT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// Exited with this status code.
    Code(u8),
    /// Killed by this signal.
    Signal(u8),
}

impl GuestExit {
    /// Decodes a register write; unknown kinds are rejected.
    pub fn decode(value: u32) -> Option<Self> {
        let code = (value & 0xff) as u8;
        match value >> 8 {
            EXIT_KIND_CODE => Some(Self::Code(code)),
            EXIT_KIND_SIGNAL => Some(Self::Signal(code)),
            _ => None,
        }
    }

    /// The register value that reports `self` (what kiln's init writes).
    pub fn encode(self) -> u32 {
        match self {
            Self::Code(c) => (EXIT_KIND_CODE << 8) | u32::from(c),
            Self::Signal(s) => (EXIT_KIND_SIGNAL << 8) | u32::from(s),
        }
    }
}

/// What the monitor does with control-page events.
pub trait ControlEvents: Send {
    /// The guest reached a boot stage (see `STAGE_USERSPACE`).
    fn boot_stage(&self, stage: u32);
    /// The guest's command finished; called at most once.
    fn exit_reported(&self, exit: GuestExit);
}

/// The control page device.
pub struct ControlPage<E: ControlEvents> {
    events: E,
    exit_latched: bool,
}

impl<E: ControlEvents> ControlPage<E> {
    /// A page that reports to `events`; no exit reported yet.
    pub fn new(events: E) -> Self {
        Self {
            events,
            exit_latched: false,
        }
    }
}

impl<E: ControlEvents> BusDevice for ControlPage<E> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == REG_MAGIC && data.len() == 4 {
            data.copy_from_slice(&MAGIC.to_le_bytes());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Registers are 32-bit; anything else is ignored.
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            REG_BOOT_TIMER => self.events.boot_stage(value),
            REG_EXIT if !self.exit_latched => match GuestExit::decode(value) {
                Some(exit) => {
                    self.exit_latched = true;
                    self.events.exit_reported(exit);
                }
                None => log::debug!("control page: malformed exit report {value:#x} ignored"),
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<String>>>);
    impl ControlEvents for Log {
        fn boot_stage(&self, stage: u32) {
            self.0.lock().unwrap().push(format!("stage {stage}"));
        }
        fn exit_reported(&self, exit: GuestExit) {
            self.0.lock().unwrap().push(format!("{exit:?}"));
        }
    }

    #[test]
    fn magic_boot_stage_and_first_exit_only() {
        let log = Log::default();
        let mut page = ControlPage::new(log.clone());
        let mut b = [0u8; 4];
        page.read(REG_MAGIC, &mut b);
        assert_eq!(&b, b"kiln");
        page.write(REG_BOOT_TIMER, &STAGE_USERSPACE.to_le_bytes());
        page.write(REG_EXIT, &0x7700u32.to_le_bytes()); // unknown kind: ignored
        page.write(REG_EXIT, &[3]); // wrong width: ignored
        page.write(REG_EXIT, &GuestExit::Signal(9).encode().to_le_bytes());
        page.write(REG_EXIT, &GuestExit::Code(0).encode().to_le_bytes());
        page.write(REG_SCRATCH, &[0; 4]);
        assert_eq!(*log.0.lock().unwrap(), vec!["stage 1", "Signal(9)"]);
    }

    #[test]
    fn exit_codes_round_trip() {
        for e in [
            GuestExit::Code(0),
            GuestExit::Code(255),
            GuestExit::Signal(15),
        ] {
            assert_eq!(GuestExit::decode(e.encode()), Some(e));
        }
    }
}
