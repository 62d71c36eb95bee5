//! README.md's shell examples, run as written (its Rust example is a doc
//! test: see `ReadmeDoctests` in src/lib.rs).
//!
//! Every ```sh block of the README must have an entry in `EXAMPLES`: either
//! what running it must print and return, or why it is not run here (it needs
//! a TAP, Docker, or a program of the reader's own). A new, changed or
//! removed block without a matching entry fails `every_example_has_a_check`.
//!
//! The quick start runs first in its own test: `resources/setup.sh` (cached
//! here), `cargo install --locked --path .` (into a scratch install root with
//! its own target directory, so the outer `cargo test` is not disturbed) and
//! the boot. The other examples run with `kiln` on PATH the way the quick
//! start leaves it, each in a scratch directory where `target/` is this
//! repository's (so `target/guest/` resolves) and the files they create
//! (images, archives) stay behind only until the test ends.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::{guest_kernel, have_kvm, have_program, require, Scratch};

/// What a README example must do when run.
enum Check {
    /// Exit status and text that must appear on stdout, line by line.
    Runs {
        status: i32,
        stdout: &'static [&'static str],
    },
    /// Not run here, and why.
    NotRun(&'static str),
}

/// Each example is found by the start of its first line.
const EXAMPLES: &[(&str, Check)] = &[
    (
        "resources/setup.sh && cargo install --locked --path . && kiln run",
        Check::Runs {
            status: 3,
            stdout: &["hello from kiln, 1 CPU"],
        },
    ),
    (
        "resources/setup.sh && cargo test --workspace",
        Check::NotRun("the test command itself: this test runs inside it"),
    ),
    (
        "# a container image's root, as Docker exports it (needs a Docker engine)",
        Check::NotRun("needs a Docker engine and a registry"),
    ),
    (
        "# boot once, warm up, save; then start copies of the ready VM",
        Check::Runs {
            status: 0,
            stdout: &["warmed up", "a copy of its own"],
        },
    ),
    (
        "# the guest reads your work tree and writes its results back (guest root: the directory is root's)",
        Check::NotRun("a boot with the same options (a ro and a writable share) is tests/share.rs's"),
    ),
    (
        "# a shared root: nothing copied into the initramfs; the write stays in the guest's RAM overlay",
        Check::NotRun("a boot with the same options (a read-only shared root the guest writes to) is tests/share.rs's a_shared_root_runs_commands_and_keeps_the_host_directory"),
    ),
    (
        "# kiln-oci for podman: install both binaries, then a container in a micro-VM",
        Check::NotRun("installs into /usr/local and names the reader's IMAGE; tests/oci.rs runs podman with kiln-oci and these options"),
    ),
    (
        "# a gzip tar archive",
        Check::Runs {
            status: 0,
            stdout: &["programs in /bin"],
        },
    ),
    (
        "# an ext4 image root and a data disk: root.img is left as it was, data.img keeps the file",
        Check::Runs {
            status: 0,
            stdout: &["kept"],
        },
    ),
    (
        "# an ext4 disk the guest writes, and a read-only second disk with a serial",
        Check::Runs {
            status: 0,
            stdout: &["vdb: serial base, ro 1"],
        },
    ),
    (
        "# entropy, and the console on a virtio console instead of the UART",
        Check::Runs {
            status: 0,
            stdout: &[],
        },
    ),
    (
        "# vsock: your program in your root listens on port 1234; the host talks to it through /tmp/v.sock",
        Check::NotRun("my-root and my-guest-server stand for the reader's own root and program"),
    ),
    (
        "# without --user the command is nobody; --user 0 makes it guest root",
        Check::Runs {
            status: 0,
            stdout: &["uid=65534 gid=65534", "uid=0 gid=0"],
        },
    ),
    (
        "# network inside a namespace of your own (root): see below",
        Check::NotRun("needs a TAP: tests/net.rs covers the device inside its own namespace"),
    ),
    (
        "resources/bench/run.sh            # everything, ~35-60 min on a 2-CPU PVM host",
        Check::NotRun("the benchmark: tests/bench_smoke.rs runs its quick mode"),
    ),
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The ```sh blocks of README.md, in order.
fn shell_blocks() -> Vec<String> {
    let readme = fs::read_to_string(root().join("README.md")).expect("reading README.md");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match &mut current {
            None if line.trim_end() == "```sh" => current = Some(String::new()),
            None => {}
            Some(_) if line.trim_end() == "```" => blocks.extend(current.take()),
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    assert!(current.is_none(), "README.md: a ```sh block is not closed");
    blocks
}

/// The README block whose first line starts with `first`.
fn example(first: &str) -> String {
    let matches: Vec<String> = shell_blocks()
        .into_iter()
        .filter(|b| b.lines().next().is_some_and(|l| l.starts_with(first)))
        .collect();
    assert_eq!(
        matches.len(),
        1,
        "README.md: one ```sh block starts with {first:?}"
    );
    matches.into_iter().next().unwrap()
}

#[test]
fn every_example_has_a_check() {
    let blocks = shell_blocks();
    assert!(!blocks.is_empty(), "README.md has no ```sh blocks");
    for block in &blocks {
        let first = block.lines().next().unwrap_or_default();
        assert!(
            EXAMPLES.iter().any(|(f, _)| first.starts_with(f)),
            "README.md example starting {first:?} has no entry in tests/readme.rs EXAMPLES"
        );
    }
    for (first, check) in EXAMPLES {
        example(first);
        if let Check::NotRun(why) = check {
            assert!(!why.is_empty(), "{first:?}: say why it is not run");
            eprintln!("not run here: {first:?}: {why}");
        }
    }
}

fn prerequisites() -> bool {
    require(have_kvm(), "/dev/kvm not accessible")
        && require(guest_kernel("vmlinux").is_some(), "guest kernel not built")
        && ["mkfs.ext4", "debugfs", "tar", "od"]
            .iter()
            .all(|t| require(have_program(t), &format!("no {t} on PATH")))
}

/// A scratch directory that looks like the top of the repository to an
/// example: `target`, `resources` and the sources are links into it.
fn example_dir(tag: &str) -> Scratch {
    let scratch = Scratch::new(&format!("readme-{tag}"));
    for entry in fs::read_dir(root()).expect("listing the repository") {
        let entry = entry.expect("listing the repository");
        let name = entry.file_name();
        if name == ".git" {
            continue;
        }
        std::os::unix::fs::symlink(entry.path(), scratch.0.join(&name))
            .unwrap_or_else(|e| panic!("linking {}: {e}", entry.path().display()));
    }
    scratch
}

/// Where the quick start's `cargo install` puts `kiln` (and builds it: a
/// target directory of its own, kept between runs so a rerun is quick).
fn install_root() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("readme-install")
}

/// Runs `script` with bash in `dir`, `kiln` found through PATH.
fn run_example(dir: &Path, script: &str, path_first: &Path) -> Output {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![path_first.to_path_buf()];
    dirs.extend(std::env::split_paths(&path));
    Command::new("bash")
        .args(["-e", "-o", "pipefail", "-c", script])
        .current_dir(dir)
        .env("PATH", std::env::join_paths(dirs).unwrap())
        .env("CARGO_INSTALL_ROOT", install_root())
        .env(
            "CARGO_TARGET_DIR",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("readme-install-target"),
        )
        .env_remove("KILN_LOG")
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("running bash: {e}"))
}

fn check(first: &str, out: &Output) {
    let Some((_, check)) = EXAMPLES.iter().find(|(f, _)| *f == first) else {
        panic!("no entry for {first:?}");
    };
    let Check::Runs { status, stdout } = check else {
        panic!("{first:?} is not meant to run");
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let context = || {
        format!(
            "README example {first:?}: status {:?}\nstdout:\n{text}\nstderr:\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    assert_eq!(out.status.code(), Some(*status), "{}", context());
    for want in *stdout {
        assert!(
            text.lines().any(|l| l.contains(want)),
            "missing {want:?}: {}",
            context()
        );
    }
}

/// The quick start, once per test binary: other examples use the `kiln` it
/// installs.
fn quick_start() -> &'static Path {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let first = EXAMPLES[0].0;
        let dir = example_dir("quick-start");
        let out = run_example(&dir.0, &example(first), &install_root().join("bin"));
        check(first, &out);
    });
    let bin = install_root().join("bin");
    assert!(
        bin.join("kiln").is_file(),
        "the quick start did not install {}",
        bin.join("kiln").display()
    );
    Box::leak(bin.into_boxed_path())
}

fn run_and_check(tag: &str, first: &str) -> (Scratch, String) {
    let bin = quick_start();
    let dir = example_dir(tag);
    let out = run_example(&dir.0, &example(first), bin);
    check(first, &out);
    (dir, String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn quick_start_installs_kiln_and_runs_a_command() {
    if !prerequisites() {
        return;
    }
    quick_start();
}

#[test]
fn gzip_tar_root() {
    if !prerequisites() {
        return;
    }
    let (_dir, stdout) = run_and_check("tar", "# a gzip tar archive");
    let count: u32 = stdout
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {stdout:?}"));
    let host = fs::read_dir(root().join("target/guest/rootfs/bin"))
        .expect("target/guest/rootfs/bin")
        .count() as u32;
    assert_eq!(
        count, host,
        "every /bin entry of the archive reached the guest"
    );
}

#[test]
fn ext4_root_and_data_disk() {
    if !prerequisites() {
        return;
    }
    let (dir, _) = run_and_check(
        "ext4",
        "# an ext4 image root and a data disk: root.img is left as it was, data.img keeps the file",
    );
    // The guest wrote /etc/motd in its overlay of root.img only.
    let motd = Command::new("debugfs")
        .args(["-R", "cat /etc/motd"])
        .arg(dir.path("root.img"))
        .output()
        .expect("running debugfs");
    assert!(
        !String::from_utf8_lossy(&motd.stdout).contains("changed"),
        "root.img was modified"
    );
}

#[test]
fn disks_by_example() {
    if !prerequisites() {
        return;
    }
    let (dir, stdout) = run_and_check(
        "disks",
        "# an ext4 disk the guest writes, and a read-only second disk with a serial",
    );
    assert_eq!(stdout, "vdb: serial base, ro 1\n");
    // The guest's file reached data.img.
    let f = Command::new("debugfs")
        .args(["-R", "cat /f"])
        .arg(dir.path("data.img"))
        .output()
        .expect("running debugfs");
    assert_eq!(String::from_utf8_lossy(&f.stdout), "hi\n");
}

/// The snapshot example: the warm-up's file is in every copy, and what one
/// copy writes is not in the next.
#[test]
fn snapshot_by_example() {
    if !prerequisites() {
        return;
    }
    let (_dir, stdout) = run_and_check(
        "snapshot",
        "# boot once, warm up, save; then start copies of the ready VM",
    );
    assert_eq!(stdout, "warmed up\na copy of its own\nwarmed up\n");
}

#[test]
fn guest_users_by_example() {
    if !prerequisites() {
        return;
    }
    let (_dir, stdout) = run_and_check(
        "users",
        "# without --user the command is nobody; --user 0 makes it guest root",
    );
    // busybox's `id`: no `groups=` when there are no supplementary groups.
    assert_eq!(stdout, "uid=65534 gid=65534\nuid=0 gid=0\n");
}

#[test]
fn rng_and_virtio_console() {
    if !prerequisites() {
        return;
    }
    let (_dir, stdout) = run_and_check(
        "rng",
        "# entropy, and the console on a virtio console instead of the UART",
    );
    let bytes: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(
        bytes.len(),
        16,
        "16 hex bytes on the first od line: {stdout:?}"
    );
    assert!(
        bytes
            .iter()
            .all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit())),
        "{stdout:?}"
    );
    assert!(bytes.iter().any(|b| *b != "00"), "entropy is not all zeros");
}
