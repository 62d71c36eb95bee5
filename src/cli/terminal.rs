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

/// Puts an interactive terminal (kiln's stdin) in raw mode and restores it
/// on drop.
pub struct RawTerminal {
    saved: libc::termios,
    /// Raw mode is on (the settings are restored on drop).
    raw: bool,
}

impl RawTerminal {
    /// The guest console's mode: keys go to the guest as typed, Ctrl-C
    /// still stops kiln, output newlines still return the carriage. None
    /// when stdin is not a terminal.
    pub fn enter() -> Option<Self> {
        let mut terminal = Self::read()?;
        let mut raw = terminal.saved;
        // SAFETY: `raw` is a valid termios copied from the terminal's.
        unsafe { libc::cfmakeraw(&mut raw) };
        raw.c_lflag |= libc::ISIG;
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        terminal.set(&raw);
        Some(terminal)
    }

    /// Reads stdin's settings (None when it is not a terminal), changing
    /// nothing yet: [`RawTerminal::pass_every_key`] then needs no more than
    /// to set them (a thread under kiln's seccomp filter may).
    pub fn read() -> Option<Self> {
        if !io::stdin().is_terminal() {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal (checked above) and `saved` is valid.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return None;
        }
        Some(Self { saved, raw: false })
    }

    /// Full raw mode, for a command on a guest terminal (`-it`): every key
    /// (Ctrl-C, Ctrl-Z, Ctrl-\\ included) goes to the guest, whose terminal
    /// echoes and edits lines, and output is written as it comes (the
    /// guest's terminal has made its newlines).
    pub fn pass_every_key(&mut self) {
        let mut raw = self.saved;
        // SAFETY: `raw` is a valid termios copied from the terminal's.
        unsafe { libc::cfmakeraw(&mut raw) };
        self.set(&raw);
    }

    fn set(&mut self, mode: &libc::termios) {
        // SAFETY: fd 0 is a terminal (`read` checked) and `mode` a valid
        // termios made from its own.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, mode) };
        self.raw = true;
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.raw {
            // SAFETY: restores the settings read from the same terminal.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
        }
    }
}

/// The size of kiln's terminal (its stdin's, else its stdout's), as (rows,
/// columns); None when neither is a terminal or it reports no size.
pub fn window_size() -> Option<(u16, u16)> {
    [0, 1].into_iter().find_map(|fd| {
        // SAFETY: winsize is plain data.
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes a winsize into `size`, a valid one; on
        // a descriptor that is not a terminal it fails (ENOTTY).
        let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) } == 0;
        (ok && size.ws_row > 0 && size.ws_col > 0).then_some((size.ws_row, size.ws_col))
    })
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
