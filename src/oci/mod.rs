//! kiln as an OCI runtime (issue 13).

pub mod network;
