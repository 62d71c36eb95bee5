//! Device models for the kiln micro-VM monitor.
//!
//! Every model is plain Rust state behind the `BusDevice` trait, so it can be
//! tested without a VM; the monitor places them on its PIO and MMIO buses.

pub mod bus;
pub mod control;
pub mod i8042;
pub mod irq;
pub mod serial;
pub mod tap;
pub mod virtio;
