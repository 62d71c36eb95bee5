//! Test support for every kiln crate (unit and integration tests alike).
//!
//! Prerequisites: one place decides whether a missing prerequisite (KVM,
//! root, a host tool, a file system feature) skips a test or fails it.
//!
//! A developer's machine may lack some of them, so by default the test prints
//! `SKIP: <test>: <what>` and passes. CI sets `KILN_NO_SKIP` (any value but
//! `0`), and then a missing prerequisite fails the test: a green CI run
//! means every test really ran.

use std::io::Write;
use std::path::Path;
use std::process::Command;

/// The environment variable that forbids skipping.
pub const NO_SKIP_ENV: &str = "KILN_NO_SKIP";

/// True when skipping is forbidden: `KILN_NO_SKIP` is set to anything but `0`.
pub fn no_skip() -> bool {
    no_skip_value(std::env::var_os(NO_SKIP_ENV).as_deref())
}

fn no_skip_value(value: Option<&std::ffi::OsStr>) -> bool {
    value.is_some_and(|v| v != "0")
}

/// Whether a test may go on: true when `cond` holds. Otherwise prints
/// `SKIP: <test>: <what>` and returns false, or panics when skipping is
/// forbidden ([`no_skip`]). `what` names the missing prerequisite.
#[track_caller]
pub fn require(cond: bool, what: &str) -> bool {
    decide(cond, what, no_skip())
}

#[track_caller]
fn decide(cond: bool, what: &str, forbid_skip: bool) -> bool {
    if cond {
        return true;
    }
    // libtest names each test's thread after the test; a single-threaded run
    // uses the main thread, so fall back to the caller's location.
    let thread = std::thread::current();
    let test = match thread.name() {
        Some(name) if name != "main" => name.to_string(),
        _ => std::panic::Location::caller().to_string(),
    };
    if forbid_skip {
        panic!("{test}: prerequisite missing: {what} ({NO_SKIP_ENV} forbids skipping)");
    }
    // Straight to stderr, not eprintln!: libtest would capture (and hide)
    // the line for a test that passes.
    let _ = std::io::stderr().write_all(format!("SKIP: {test}: {what}\n").as_bytes());
    false
}

/// True when this process can open /dev/kvm for reading and writing.
pub fn have_kvm() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// True when this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// True when `program` is found on PATH as an executable file.
pub fn have_program(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| is_executable(&dir.join(program)))
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Marks a child process started by [`run_in_child`]: the test it runs.
const CHILD_ENV: &str = "KILN_TEST_CHILD";

/// True in a child process started by [`run_in_child`]: the test body that
/// needs a process of its own (exact fd/thread counts, its own environment)
/// runs there.
pub fn in_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Runs one test of the current test binary again, alone, in a child process
/// with `env` changed (`None` removes a variable), and panics with the
/// child's output unless that test ran and passed. `test` is the test's
/// path as `module_path!()` gives it (the crate name first is dropped), e.g.
/// `concat!(module_path!(), "::name")`.
pub fn run_in_child(test: &str, env: &[(&str, Option<&str>)]) {
    let name = test.split_once("::").map_or(test, |(_crate, rest)| rest);
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cmd = Command::new(exe);
    cmd.args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD_ENV, name);
    for (key, value) in env {
        match value {
            Some(v) => cmd.env(key, v),
            None => cmd.env_remove(key),
        };
    }
    let out = cmd.output().expect("running the test binary again");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{name} in a child process with {env:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn no_skip_means_set_and_not_zero() {
        assert!(!no_skip_value(None));
        assert!(!no_skip_value(Some(OsStr::new("0"))));
        for set in ["1", "", "yes", "00", "true"] {
            assert!(no_skip_value(Some(OsStr::new(set))), "{set:?}");
        }
    }

    #[test]
    fn a_missing_prerequisite_skips_or_fails() {
        assert!(decide(true, "nothing", true));
        assert!(decide(true, "nothing", false));
        assert!(!decide(false, "nothing (self-test)", false), "skips");
        let failed = std::panic::catch_unwind(|| decide(false, "a thing", true)).unwrap_err();
        let message = failed.downcast_ref::<String>().expect("a formatted panic");
        assert!(
            message.contains("prerequisite missing: a thing (KILN_NO_SKIP forbids skipping)"),
            "{message}"
        );
    }

    #[test]
    fn a_child_runs_the_named_test_with_its_environment() {
        if in_child() {
            assert_eq!(std::env::var("KILN_PREREQ_PROBE").as_deref(), Ok("set"));
            assert!(std::env::var_os("KILN_PREREQ_GONE").is_none());
            return;
        }
        run_in_child(
            concat!(
                module_path!(),
                "::a_child_runs_the_named_test_with_its_environment"
            ),
            &[
                ("KILN_PREREQ_PROBE", Some("set")),
                ("KILN_PREREQ_GONE", None),
            ],
        );
        // A name that matches no test is a failure, not an empty pass.
        let missing = std::panic::catch_unwind(|| {
            run_in_child(concat!(module_path!(), "::no_such_test"), &[])
        });
        assert!(missing.is_err());
    }

    #[test]
    fn programs_are_found_on_path_only_when_executable() {
        assert!(have_program("sh"), "every Linux host has sh on PATH");
        assert!(!have_program("kiln-no-such-program"));
        // A directory on PATH is not a program.
        assert!(!is_executable(Path::new("/")));
        assert!(!is_executable(Path::new("/etc/hostname-kiln-missing")));
    }
}
