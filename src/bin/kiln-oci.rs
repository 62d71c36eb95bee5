//! `kiln-oci`: an OCI runtime (runc's command line) that runs each
//! container in a kiln micro-VM; `kiln::oci` does the work.

use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::from(kiln::oci::main() as u8)
}
