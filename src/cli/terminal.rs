//! kiln's own terminal and standard streams while a guest runs.

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::ConsoleIo;

/// The guest console as kiln's stdin and stdout (the classic path).
pub fn stdio_console() -> crate::Result<ConsoleIo> {
    Ok(ConsoleIo {
        output: Box::new(dup_fd(io::stdout().as_fd())?),
        input: Some(dup_fd(io::stdin().as_fd())?),
    })
}

/// An owned duplicate of a standard stream, unbuffered (every guest byte is
/// written as it arrives).
fn dup_fd(fd: BorrowedFd<'_>) -> crate::Result<File> {
    let owned = fd
        .try_clone_to_owned()
        .map_err(crate::Error::io("duplicating a standard stream"))?;
    Ok(File::from(owned))
}

/// Puts an interactive terminal in raw mode (keys go to the guest as typed,
/// Ctrl-C still stops kiln) and restores it on drop.
pub struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// None when stdin is not a terminal.
    pub fn enter() -> Option<Self> {
        if !io::stdin().is_terminal() {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal (checked above) and `saved` is valid.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios copied from the terminal's.
        unsafe { libc::cfmakeraw(&mut raw) };
        raw.c_lflag |= libc::ISIG;
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: fd 0 is a terminal and `raw` is a valid termios.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) };
        Some(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same terminal.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// The guest console while kiln waits for its agent: copied to stdout as it
/// arrives (so a kernel that dies early is still seen), then dropped once
/// [`BootConsole::agent_up`] is called (the agent carries the command's
/// output from then on).
#[derive(Clone)]
pub struct BootConsole(Arc<AtomicBool>);

impl Default for BootConsole {
    /// Copying.
    fn default() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }
}

impl BootConsole {
    /// Stops the copying.
    pub fn agent_up(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Write for BootConsole {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0.load(Ordering::SeqCst) {
            let mut out = io::stdout().lock();
            out.write_all(buf)?;
            out.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
