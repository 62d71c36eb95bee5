//! One module per fuzz target: `TARGET` (name, body, memory cap, seeds).

pub mod block;
pub mod bus;
pub mod console;
pub mod exec_spec;
pub mod kernel;
pub mod mmio;
pub mod net;
pub mod protocol;
pub mod rng;
pub mod sandbox;
pub mod tar;
pub mod vsock;
