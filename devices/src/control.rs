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
pub const REG_MAGIC: u64 = 0x00;
pub const REG_BOOT_TIMER: u64 = 0x04;
pub const REG_EXIT: u64 = 0x08;
pub const REG_SCRATCH: u64 = 0x0c;
/// Size of the MMIO window.
pub const CONTROL_PAGE_SIZE: u64 = 0x1000;
/// Boot-timer stage written by init once user space runs.
pub const STAGE_USERSPACE: u32 = 1;

/// Exit kinds carried in bits 8..16 of the exit report.
pub const EXIT_KIND_CODE: u32 = 0;
pub const EXIT_KIND_SIGNAL: u32 = 1;
