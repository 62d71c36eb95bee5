//! What the OCI runtime tests (tests/oci.rs, tests/oci_docker.rs) share:
//! the runtime a case runs with, what a case showed, and the image's root.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

/// The runtime of one case: kiln-oci, or runc (the baseline).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Kiln,
    Runc,
}

/// Bytes as text (lossy: a test shows what it got).
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What a case printed and how it ended (the engine's status).
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    pub stdout: String,
    pub status: Option<i32>,
}

/// `out` as a [`Seen`], after showing all of it (for a failing test's log).
pub fn seen(out: &Output) -> Seen {
    eprintln!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    Seen {
        stdout: text(&out.stdout),
        status: out.status.code(),
    }
}

/// The recipe's busybox root as a tar at `tar`, for an engine's `import`.
pub fn busybox_root_tar(tar: &Path) {
    let status = Command::new("tar")
        .arg("-C")
        .arg(super::guest_rootfs())
        .arg("-cf")
        .arg(tar)
        .arg(".")
        .status()
        .expect("running tar");
    assert!(status.success(), "tar of the busybox root failed");
}

/// What the server behind `127.0.0.1:PORT` (a port the engine published,
/// in the caller's network namespace) sends, or the error, which then
/// differs from the runc baseline; `limit` bounds the connect and the read.
pub fn read_published_port(port: u16, limit: Duration) -> String {
    let address = (std::net::Ipv4Addr::LOCALHOST, port).into();
    let mut stream = match std::net::TcpStream::connect_timeout(&address, limit) {
        Ok(stream) => stream,
        Err(e) => return format!("connecting to the published port: {e}"),
    };
    let _ = stream.set_read_timeout(Some(limit));
    let mut served = String::new();
    match stream.read_to_string(&mut served) {
        Ok(_) => served,
        Err(e) => format!("reading the published port: {e} (after {served:?})"),
    }
}
