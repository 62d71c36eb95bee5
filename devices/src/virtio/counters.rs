//! Per-device counters, one shape for every device: a fixed list of named
//! `u64` values (requests, bytes, errors, bad or dropped chains, and what a
//! device adds), kept in atomics so that whoever holds the device's
//! `Arc<dyn Counters>` (the exit log, later a metrics endpoint) reads them
//! while the event thread counts, without taking the device's lock.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// One counter. Relaxed ordering: each value is a statistic on its own.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(&self) {
        self.add(1);
    }

    /// Raises the value to `n` if it is lower (a high-water mark).
    pub fn raise_to(&self, n: u64) {
        self.0.fetch_max(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A device's counters, readable from outside the device.
pub trait Counters: Send + Sync {
    /// Calls `f` with each counter's name and value, always in the same order.
    fn visit(&self, f: &mut dyn FnMut(&'static str, u64));

    /// The counters as (name, value) pairs.
    fn values(&self) -> Vec<(&'static str, u64)> {
        let mut out = Vec::new();
        self.visit(&mut |name, value| out.push((name, value)));
        out
    }
}

impl fmt::Display for dyn Counters + '_ {
    /// `name=value` pairs, one space apart.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut result = Ok(());
        let mut first = true;
        self.visit(&mut |name, value| {
            let sep = if first { "" } else { " " };
            first = false;
            result = result.and_then(|()| write!(f, "{sep}{name}={value}"));
        });
        result
    }
}

/// Declares a device's counter struct: one `Counter` per field, named as
/// the field in `Counters::visit` (and so in the exit log).
macro_rules! device_counters {
    ($(#[$meta:meta])* $vis:vis struct $name:ident {
        $($(#[$field_meta:meta])* $field:ident,)+
    }) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        $vis struct $name {
            $($(#[$field_meta])* pub $field: $crate::virtio::counters::Counter,)+
        }

        impl $crate::virtio::counters::Counters for $name {
            fn visit(&self, f: &mut dyn FnMut(&'static str, u64)) {
                $(f(stringify!($field), self.$field.get());)+
            }
        }
    };
}
pub(crate) use device_counters;

/// A device without counters of its own (test doubles).
#[cfg(test)]
pub(crate) struct NoCounters;

#[cfg(test)]
impl Counters for NoCounters {
    fn visit(&self, _f: &mut dyn FnMut(&'static str, u64)) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    device_counters! {
        struct Sample {
            requests,
            max_len,
        }
    }

    #[test]
    fn counters_count_and_print_in_declaration_order() {
        let c = Sample::default();
        c.requests.inc();
        c.requests.add(2);
        c.max_len.raise_to(7);
        c.max_len.raise_to(3);
        assert_eq!(c.values(), vec![("requests", 3), ("max_len", 7)]);
        let shown = (&c as &dyn Counters).to_string();
        assert_eq!(shown, "requests=3 max_len=7");
        assert_eq!((&NoCounters as &dyn Counters).to_string(), "");
    }
}
