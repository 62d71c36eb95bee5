//! Device models for the kiln micro-VM monitor.

pub mod control;
