//! The guest console as the host sees it: output bytes pass through to the
//! caller's writer unchanged, while a small matcher notices a kernel panic
//! message so a VM that resets afterwards is reported as a panic.
//!
//! The panic text only labels an ending that the control page did not
//! explain; it never overrides a status the guest's init reported.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing: ";
/// Longest panic message kept (the rest of the line is dropped).
const PANIC_MESSAGE_MAX: usize = 200;

#[derive(Default)]
struct PanicScan {
    matched: usize,
    /// Some while capturing the message after the marker.
    message: Option<Vec<u8>>,
    done: Option<String>,
}

impl PanicScan {
    fn feed(&mut self, byte: u8) {
        if let Some(msg) = &mut self.message {
            if byte == b'\n' || byte == b'\r' || msg.len() >= PANIC_MESSAGE_MAX {
                let text = String::from_utf8_lossy(msg).trim().to_string();
                self.done.get_or_insert(text);
                self.message = None;
            } else {
                msg.push(byte);
            }
            return;
        }
        if byte == PANIC_MARKER[self.matched] {
            self.matched += 1;
            if self.matched == PANIC_MARKER.len() {
                self.matched = 0;
                self.message = Some(Vec::new());
            }
        } else {
            // The marker has no repeated prefix, so restart (this byte may begin it).
            self.matched = usize::from(byte == PANIC_MARKER[0]);
        }
    }

    fn panic_message(&self) -> Option<String> {
        self.done.clone().or_else(|| {
            self.message
                .as_ref()
                .map(|m| String::from_utf8_lossy(m).trim().to_string())
        })
    }
}

/// A handle to ask, after the run, whether the guest printed a panic.
#[derive(Clone, Default)]
pub struct PanicWatch(Arc<Mutex<PanicScan>>);

impl PanicWatch {
    pub fn panic_message(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .panic_message()
    }
}

/// Writer given to the UART: forwards every byte and feeds the panic matcher.
pub struct ConsoleOutput {
    out: Box<dyn Write + Send>,
    watch: PanicWatch,
}

impl ConsoleOutput {
    /// Forwards to `out`; the watch reports a kernel panic seen in it.
    pub fn new(out: Box<dyn Write + Send>) -> (Self, PanicWatch) {
        let watch = PanicWatch::default();
        (
            Self {
                out,
                watch: watch.clone(),
            },
            watch,
        )
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        {
            let mut scan = self.watch.0.lock().unwrap_or_else(|e| e.into_inner());
            buf.iter().for_each(|&b| scan.feed(b));
        }
        // A closed stdout must not stop the guest: drop the bytes instead.
        if let Err(e) = self.out.write_all(buf) {
            log::debug!("console output dropped: {e}");
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(text: &[u8]) -> Option<String> {
        let (mut out, watch) = ConsoleOutput::new(Box::new(io::sink()));
        for chunk in text.chunks(3) {
            out.write_all(chunk).unwrap();
        }
        watch.panic_message()
    }

    #[test]
    fn finds_panic_message_across_writes() {
        assert_eq!(
            scan(b"hello\r\n[ 1.0] KKernel panic - not syncing: Attempted to kill init!\r\nmore"),
            Some("Attempted to kill init!".into())
        );
        assert_eq!(scan(b"Kernel panic - not syncing: VFS"), Some("VFS".into()));
        assert_eq!(scan(b"Kernel panic - not sync"), None);
        assert_eq!(scan(b"plain output\n"), None);
    }
}
