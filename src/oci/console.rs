//! A container's terminal (`process.terminal`): a host pty whose master
//! goes to the engine over `--console-socket` (one message: the pty's
//! name as data, the master as SCM_RIGHTS, as runc's `utils.SendFd`), and
//! whose slave the monitor copies to and from the guest's own terminal.
//!
//! The host pty is a raw byte pipe: the guest's terminal echoes, edits
//! lines and makes `\r\n`. Its size follows the master's, which the engine
//! sets (TIOCSWINSZ); the monitor re-reads it on the slave (see
//! [`follow_size`]) rather than catching SIGWINCH, which the kernel sends
//! only to the foreground process group of a terminal's session: the
//! monitor's session also holds its VM process, which a controlling
//! terminal's hangup (SIGHUP) would end, and a session has only one
//! controlling terminal, which `exec --tty`'s own terminals could not use.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::sandbox::Command;

/// A terminal's size before the engine sets one (docker's).
const DEFAULT_WINDOW: (u16, u16) = (24, 80);
/// How long a new terminal's first size is waited for.
const SIZE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// How often the size is re-read while the command runs.
const SIZE_POLL: Duration = Duration::from_millis(100);

/// The console socket a command on a terminal (`terminal`) sends its
/// master to: `socket`, which it needs (runc's rule; without a terminal a
/// socket is ignored, as runc does for a detached container).
pub fn socket_for(terminal: bool, socket: Option<&Path>) -> Result<Option<&Path>, String> {
    match (terminal, socket) {
        (true, None) => Err(
            "cannot allocate a terminal without --console-socket (process.terminal is true)".into(),
        ),
        (true, socket) => Ok(socket),
        (false, _) => Ok(None),
    }
}

/// Opens a host pty in raw mode, sends its master to `socket` and returns
/// the slave (the container's terminal on the host).
pub fn hand_over(socket: &Path) -> Result<File, String> {
    let (master, slave, name) = open_pty().map_err(|e| format!("opening a terminal: {e}"))?;
    let stream = UnixStream::connect(socket)
        .map_err(|e| format!("connecting to the console socket {}: {e}", socket.display()))?;
    stream
        .send_with_fds(&[name.to_bytes()], &[master.as_raw_fd()])
        .map_err(|e| {
            format!(
                "sending the terminal to the console socket {}: {e}",
                socket.display()
            )
        })?;
    Ok(slave)
}

/// A pty's master, its slave (raw, both close-on-exec) and the slave's name.
fn open_pty() -> std::io::Result<(OwnedFd, File, std::ffi::CString)> {
    let last = std::io::Error::last_os_error;
    // SAFETY: posix_openpt takes flags and returns a new descriptor or -1.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(last());
    }
    // SAFETY: posix_openpt just returned this descriptor, owned by nothing else.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: grantpt and unlockpt take the master's descriptor, open here.
    if unsafe { libc::grantpt(fd) } != 0 || unsafe { libc::unlockpt(fd) } != 0 {
        return Err(last());
    }
    let mut name = [0 as libc::c_char; 64];
    // SAFETY: ptsname_r writes at most `name.len()` bytes, NUL included.
    if unsafe { libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) } != 0 {
        return Err(last());
    }
    // SAFETY: ptsname_r succeeded: `name` holds a NUL-terminated string.
    let name = unsafe { CStr::from_ptr(name.as_ptr()) }.to_owned();
    // SAFETY: `name` is a NUL-terminated path; open returns a new
    // descriptor or -1.
    let fd = unsafe {
        libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(last());
    }
    // SAFETY: open just returned this descriptor, owned by nothing else.
    let slave = unsafe { File::from_raw_fd(fd) };
    // SAFETY: termios is plain data; tcgetattr fills it for the slave.
    let mut mode: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: the slave is an open terminal and `mode` a valid termios.
    if unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut mode) } != 0 {
        return Err(last());
    }
    // SAFETY: `mode` is a valid termios read from the slave.
    unsafe { libc::cfmakeraw(&mut mode) };
    // SAFETY: the slave is an open terminal and `mode` made from its own.
    if unsafe { libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &mode) } != 0 {
        return Err(last());
    }
    Ok((master, slave, name))
}

/// The terminal's size (rows, columns) when it has one.
fn size(terminal: &File) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into `size`, a valid one.
    let ok = unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCGWINSZ, &mut size) } == 0;
    (ok && size.ws_row > 0 && size.ws_col > 0).then_some((size.ws_row, size.ws_col))
}

/// `command` on a guest terminal of `terminal`'s size. A new terminal has
/// none until the engine sets one, which it does once it has the master:
/// up to [`SIZE_WAIT`] is waited for it (an exec's terminal is that new),
/// then 24x80.
pub fn on_terminal(command: Command, terminal: &File) -> Command {
    let deadline = std::time::Instant::now() + SIZE_WAIT;
    let (rows, cols) = loop {
        match size(terminal) {
            Some(size) => break size,
            None if std::time::Instant::now() >= deadline => break DEFAULT_WINDOW,
            None => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    };
    command.tty(rows, cols)
}

/// Passes each new size of `terminal` to the guest command through
/// `resize` until `ended` hangs up (the command has ended) or `resize`
/// fails (the VM is gone). The size is re-read every [`SIZE_POLL`]: a
/// resize of the master wakes nothing on the slave but SIGWINCH, which
/// this process cannot take (see the module's comment).
pub fn follow_size(terminal: File, ended: OwnedFd, resize: impl Fn(u16, u16) -> bool) {
    // Not the size now: it may have changed since the command was given
    // one. The first poll passes the current size on; the guest kernel
    // ignores a resize to the size it has (no SIGWINCH).
    let mut last = None;
    loop {
        let mut fd = libc::pollfd {
            fd: ended.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call; `ended`
        // stays open (owned here).
        let n = unsafe { libc::poll(&mut fd, 1, SIZE_POLL.as_millis() as i32) };
        if n > 0 {
            return;
        }
        let now = size(&terminal);
        if let Some((rows, cols)) = now.filter(|_| now != last) {
            if !resize(rows, cols) {
                return;
            }
            last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    #[test]
    fn the_master_reaches_the_console_socket_and_the_slave_is_raw() {
        let dir = std::env::temp_dir().join(format!("kiln-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let slave = hand_over(&path).unwrap();
        let (conn, _) = listener.accept().unwrap();
        let mut name = [0u8; 64];
        let mut fds = [-1; 1];
        let mut iov = [libc::iovec {
            iov_base: name.as_mut_ptr().cast(),
            iov_len: name.len(),
        }];
        // SAFETY: the iovec points into `name`, alive for the call; `fds`
        // has room for one descriptor.
        let (n, nfds) = unsafe { conn.recv_with_fds(&mut iov, &mut fds) }.unwrap();
        assert_eq!(nfds, 1);
        let name = std::str::from_utf8(&name[..n]).unwrap();
        assert!(name.starts_with("/dev/pts/"), "{name}");
        // SAFETY: the descriptor was just received, owned here alone.
        let mut master = unsafe { File::from_raw_fd(fds[0]) };
        // Raw: no echo, `\n` not made `\r\n`, bytes both ways untouched.
        (&slave).write_all(b"out\n").unwrap();
        let mut got = [0u8; 4];
        master.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"out\n");
        master.write_all(b"in\x03\n").unwrap();
        let mut got = [0u8; 4];
        (&slave).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"in\x03\n");
        // The size set on the master is the slave's.
        let size = libc::winsize {
            ws_row: 33,
            ws_col: 101,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a valid winsize; the master is open.
        assert_eq!(
            unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) },
            0
        );
        assert_eq!(super::size(&slave), Some((33, 101)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_absent_console_socket_is_one_line() {
        let e = hand_over(Path::new("/nonexistent/console.sock")).unwrap_err();
        assert!(
            e.starts_with("connecting to the console socket /nonexistent/console.sock: "),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1);
    }
}
