//! The monitor's control socket: what `start`, `kill`, `exec`, `pause`, `resume` and
//! `delete` ask a container's monitor, and its replies. A frame is a
//! little-endian u32 length and that many bytes of JSON; `exec`'s request
//! carries its stdin, stdout and stderr (SCM_RIGHTS) with its first byte.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::spec::ProcessSpec;

/// The largest frame either side takes.
const MAX_FRAME: usize = 1 << 20;

/// A request to the monitor.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Run the container's command.
    Start,
    /// Signal the command (with `all`, every exec'd command too).
    Kill {
        /// The signal number.
        signal: i32,
        /// Every command.
        all: bool,
    },
    /// Run another command with the three descriptors sent along.
    Exec(ProcessSpec),
    /// End the VM now (`delete --force`).
    Shutdown,
    /// Pause the VM's vCPUs (`pause`).
    Pause,
    /// Let them run on (`resume`).
    Resume,
}

/// The monitor's answer.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Reply {
    /// Done.
    Ok,
    /// Refused or failed, with the one-line reason.
    Error(String),
    /// (exec) The command runs; `Exited` follows.
    Started,
    /// (exec) The command ended with this status (128+N for signal N).
    Exited(i32),
}

/// Writes one frame.
pub fn send<T: Serialize>(stream: &mut UnixStream, msg: &T) -> std::io::Result<()> {
    let frame = encode(msg)?;
    stream.write_all(&frame)
}

fn encode<T: Serialize>(msg: &T) -> std::io::Result<Vec<u8>> {
    let body = serde_json::to_vec(msg)?;
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend(body);
    Ok(frame)
}

/// Writes one frame with `fds` attached.
pub fn send_with_fds<T: Serialize>(
    stream: &mut UnixStream,
    msg: &T,
    fds: &[RawFd],
) -> std::io::Result<()> {
    let frame = encode(msg)?;
    let sent = stream
        .send_with_fds(&[&frame[..]], fds)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    stream.write_all(&frame[sent..])
}

/// Reads one frame; `None` at end of stream.
pub fn recv<T: for<'de> Deserialize<'de>>(stream: &mut UnixStream) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    read_body(stream, len).map(Some)
}

fn read_body<T: for<'de> Deserialize<'de>>(
    stream: &mut UnixStream,
    len: [u8; 4],
) -> std::io::Result<T> {
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "control frame of {len} bytes (at most {MAX_FRAME})"
        )));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    serde_json::from_slice(&body).map_err(std::io::Error::other)
}

/// Reads one frame and the descriptors sent with it (up to 3).
pub fn recv_with_fds<T: for<'de> Deserialize<'de>>(
    stream: &mut UnixStream,
) -> std::io::Result<Option<(T, Vec<File>)>> {
    // The length only: the body is read apart, so nothing of a frame
    // that follows is taken.
    let mut first = vec![0u8; 4];
    let mut fds = [-1 as RawFd; 3];
    let mut iov = [libc::iovec {
        iov_base: first.as_mut_ptr().cast(),
        iov_len: first.len(),
    }];
    // SAFETY: the iovec points into `first`, alive and unaliased for the
    // call; `fds` has room for the 3 descriptors asked for.
    let (n, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    let files: Vec<File> = fds[..nfds]
        .iter()
        // SAFETY: each descriptor was just received: this process owns it
        // and nothing else refers to it.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    first.truncate(n);
    while first.len() < 4 {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte)?;
        first.push(byte[0]);
    }
    let len = [first[0], first[1], first[2], first[3]];
    read_body(stream, len).map(|msg| Some((msg, files)))
}

/// Connects to a monitor's socket, sends `request` and reads one reply.
pub fn call(socket: &Path, request: &Request) -> Result<Reply, String> {
    let mut stream = connect(socket)?;
    send(&mut stream, request).map_err(|e| format!("talking to the container monitor: {e}"))?;
    match recv(&mut stream) {
        Ok(Some(reply)) => Ok(reply),
        Ok(None) => Err("the container monitor ended without answering".into()),
        Err(e) => Err(format!("reading the container monitor's answer: {e}")),
    }
}

/// Connects to a monitor's socket.
pub fn connect(socket: &Path) -> Result<UnixStream, String> {
    by_short_path(socket, UnixStream::connect).map_err(|e| {
        format!(
            "connecting to the container monitor ({}): {e}",
            socket.display()
        )
    })
}

/// Binds a monitor's socket (any path an old one left is removed first).
pub fn bind(socket: &Path) -> Result<UnixListener, String> {
    let _ = std::fs::remove_file(socket);
    by_short_path(socket, UnixListener::bind)
        .map_err(|e| format!("binding the control socket {}: {e}", socket.display()))
}

/// Runs `f` (bind or connect) on `socket` named through its directory's
/// descriptor, `/proc/self/fd/N/NAME`: a socket address holds at most 107
/// bytes, and a state root as deep as a private Docker's (`--exec-root
/// DIR`, then `runtime-runc/moby/<64-hex id>/ctl.sock`) makes the real path
/// longer.
fn by_short_path<T>(
    socket: &Path,
    f: impl FnOnce(PathBuf) -> std::io::Result<T>,
) -> std::io::Result<T> {
    let (Some(dir), Some(name)) = (socket.parent(), socket.file_name()) else {
        return f(socket.into());
    };
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })?;
    f(Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn frames_and_descriptors_cross_the_socket() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let (mut r, w) = UnixStream::pair().unwrap();
        let process: ProcessSpec = serde_json::from_str(r#"{"args":["true"]}"#).unwrap();
        send_with_fds(&mut a, &Request::Exec(process), &[w.as_raw_fd()]).unwrap();
        send(
            &mut a,
            &Request::Kill {
                signal: 9,
                all: true,
            },
        )
        .unwrap();
        let (msg, files) = recv_with_fds::<Request>(&mut b).unwrap().unwrap();
        assert!(
            matches!(msg, Request::Exec(ref p) if p.args == ["true"]),
            "{msg:?}"
        );
        assert_eq!(files.len(), 1);
        // The received descriptor is the same socket: a write through it arrives.
        (&files[0]).write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        r.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
        let next = recv::<Request>(&mut b).unwrap().unwrap();
        assert!(matches!(
            next,
            Request::Kill {
                signal: 9,
                all: true
            }
        ));
        drop(a);
        assert!(recv::<Request>(&mut b).unwrap().is_none());
    }

    #[test]
    fn a_socket_deeper_than_an_address_holds_is_bound_and_reached() {
        // Docker's layout under a private --exec-root: past 107 bytes.
        let base = std::env::temp_dir().join(format!("kiln-ctl-{}", std::process::id()));
        let dir = base
            .join("exec/runtime-runc/moby")
            .join("0123456789abcdef".repeat(4));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("ctl.sock");
        assert!(socket.as_os_str().len() > 107, "{}", socket.display());
        assert!(UnixListener::bind(&socket).is_err(), "the plain path fits");
        let listener = bind(&socket).unwrap();
        assert!(socket.exists(), "bound where the state root says");
        let mut client = connect(&socket).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        send(&mut client, &Request::Start).unwrap();
        let got = recv::<Request>(&mut server).unwrap().unwrap();
        assert!(matches!(got, Request::Start), "{got:?}");
        // A second bind replaces what the first left.
        drop(listener);
        bind(&socket).unwrap();
        let e = connect(&dir.join("nosuch.sock")).unwrap_err();
        assert!(e.contains("nosuch.sock"), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn an_oversized_frame_is_refused() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&(MAX_FRAME as u32 + 1).to_le_bytes()).unwrap();
        let e = recv::<Reply>(&mut b).unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
    }
}
