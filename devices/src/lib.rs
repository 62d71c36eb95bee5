//! Device models for the kiln micro-VM monitor.
//!
//! Every model is plain Rust state behind the [`bus::BusDevice`] trait, so it
//! can be tested without a VM; the monitor places them on its PIO and MMIO
//! buses. The crate holds:
//!
//! - [`bus`]: the address buses a vCPU exit is dispatched through;
//! - [`serial`] (the 16550 UART, ttyS0), [`i8042`] (just the reset line)
//!   and [`control`] (kiln's control page: the boot timer and the guest
//!   command's exit report, the only way a status reaches the monitor);
//! - [`virtio`]: the virtio-mmio transport and the block, net, console, rng
//!   and vsock devices, with what they share (one descriptor-chain cursor,
//!   one queue loop with a budget and one interrupt policy, one config-space
//!   helper, per-device counters);
//! - [`irq`] (interrupt lines, KVM irqfds) and [`tap`] (the TAP backend of
//!   virtio-net);
//! - [`rate_limiter`]: token buckets of bytes and operations per second
//!   that hold a block, net or rng queue until a timer says tokens are back.
//!
//! How the monitor (the `kiln` crate) uses it: its device manager puts the
//! UART, the i8042 and the control page on the buses, wraps each virtio
//! device in an [`virtio::mmio::MmioTransport`] on the MMIO bus, registers
//! the device's queue eventfds as KVM ioeventfds and its [`irq::IrqLine`] as
//! a KVM irqfd, and adds the device to its event loop (each device is an
//! `event_manager` subscriber). vCPU threads only touch registers; queues
//! are served on the event thread.
//!
//! Devices never import the monitor: what they need from it comes in as
//! values (guest memory, an interrupt, an eventfd, a writer, a
//! [`control::ControlEvents`] implementation). Everything here treats the
//! guest as hostile: a malformed chain or an out-of-range address is refused
//! and counted, and must never panic the monitor, make it touch memory
//! outside the guest's or allocate without bound.
//!
//! The monitor is this crate's only user: what it does not use is private.

#![warn(missing_docs)]

pub mod bus;
pub mod control;
pub mod i8042;
pub mod irq;
pub mod rate_limiter;
pub mod serial;
pub mod tap;
pub mod virtio;

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// A new non-blocking eventfd, closed on exec: every eventfd kiln creates
/// comes from here, so none is inherited by a program the embedding process
/// (or a program it spawns while a VM runs) executes.
pub fn new_eventfd() -> std::io::Result<EventFd> {
    EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
}

// Public only for kiln's fuzz targets (fuzz/); not part of the API.
#[doc(hidden)]
pub mod fuzzing;
