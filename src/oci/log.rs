//! `--log FILE` and `--log-format text|json`, as runc writes them: one
//! entry a line, appended (engines read the last error from it).

use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;

use super::cli::{GlobalArgs, LogFormat};
use super::state::rfc3339_now;

/// Where this call's errors (and with --debug, progress) go.
#[derive(Clone, Debug)]
pub struct Logger {
    file: Option<PathBuf>,
    format: LogFormat,
    debug: bool,
}

#[derive(Serialize)]
struct Entry<'a> {
    level: &'a str,
    msg: &'a str,
    time: &'a str,
}

impl Logger {
    /// The logger of `global`'s options.
    pub fn new(global: &GlobalArgs) -> Self {
        Self {
            file: global.log.clone(),
            format: global.log_format,
            debug: global.debug,
        }
    }

    /// Logs an error (always).
    pub fn error(&self, msg: &str) {
        self.write("error", msg);
    }

    /// Logs a warning (always).
    pub fn warn(&self, msg: &str) {
        self.write("warning", msg);
    }

    /// Logs progress (with --debug).
    pub fn debug(&self, msg: &str) {
        if self.debug {
            self.write("debug", msg);
        }
    }

    fn write(&self, level: &str, msg: &str) {
        let Some(path) = &self.file else {
            return;
        };
        let time = rfc3339_now();
        let line = match self.format {
            LogFormat::Json => serde_json::to_string(&Entry {
                level,
                msg,
                time: &time,
            })
            .unwrap_or_default(),
            LogFormat::Text => format!("time={time:?} level={level} msg={msg:?}"),
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path);
        if let Ok(mut file) = file {
            // One write: lines of concurrent callers do not interleave.
            let _ = file.write_all(format!("{line}\n").as_bytes());
        }
    }
}
