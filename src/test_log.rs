//! Unit tests that read what kiln logs: a logger that keeps every record.
//! A process has one logger, so a test that installs it runs in a child
//! process of its own (`kiln_prereq::run_in_child`).

use std::sync::Mutex;

/// Every record logged since [`install`], as (level, text).
pub(crate) struct Records(Mutex<Vec<(log::Level, String)>>);

impl log::Log for Records {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let line = (record.level(), record.args().to_string());
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }
    fn flush(&self) {}
}

impl Records {
    /// The records so far at `level`.
    pub(crate) fn at(&self, level: log::Level) -> Vec<String> {
        let records = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let at_level = records.iter().filter(|(l, _)| *l == level);
        at_level.map(|(_, text)| text.clone()).collect()
    }
}

/// Makes this process log every level into the returned records.
pub(crate) fn install() -> &'static Records {
    let records: &'static Records = Box::leak(Box::new(Records(Mutex::default())));
    log::set_logger(records).expect("the only logger of this process");
    log::set_max_level(log::LevelFilter::Trace);
    records
}
