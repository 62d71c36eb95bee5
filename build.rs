//! Builds kiln's guest init (crate kiln-init) as a small static binary and
//! hands its path to `src/initramfs.rs` as `KILN_INIT_PATH` for embedding.
//!
//! A nested `cargo build` with its own target (and build) dir under OUT_DIR:
//! the outer cargo keeps its own target dir locked while this runs, so
//! sharing it would deadlock, and the init needs its own profile and flags.

use std::env;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{exit, Command};

const TARGET: &str = "x86_64-unknown-linux-gnu";
const PROFILE: &str = "guest-init";

fn main() {
    let root =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    for input in ["resources/init", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(input).display());
    }
    let target_dir =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("guest-init");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root)
        .args([
            "build",
            "-p",
            "kiln-init",
            "--bin",
            "kiln-init",
            "--profile",
            PROFILE,
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    // Nothing the outer build was configured with (flags, wrappers such as
    // clippy-driver, target or build dirs) may leak into the guest binary.
    for (key, _) in env::vars_os() {
        if inherited_setting(&key) {
            cmd.env_remove(key);
        }
    }
    cmd.env("CARGO_BUILD_BUILD_DIR", &target_dir)
        // Static, so the init runs without any library in the initramfs.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Ctarget-feature=+crt-static\x1f-Crelocation-model=static",
        );

    // Captured: a child's stdout line starting with "cargo:" would be taken
    // as an instruction to the outer cargo.
    let output = cmd.output().unwrap_or_else(|e| {
        eprintln!("error: cannot run {cargo:?} to build kiln's guest init: {e}");
        exit(1)
    });
    if !output.status.success() {
        for text in [&output.stdout, &output.stderr] {
            eprint!("{}", String::from_utf8_lossy(text));
        }
        eprintln!(
            "error: building kiln's guest init failed: `cargo build -p kiln-init --profile {PROFILE} --target {TARGET}` {}",
            output.status
        );
        exit(1);
    }
    let binary = target_dir.join(TARGET).join(PROFILE).join("kiln-init");
    if !binary.is_file() {
        eprintln!(
            "error: kiln's guest init was built but {} is missing",
            binary.display()
        );
        exit(1);
    }
    println!("cargo:rustc-env=KILN_INIT_PATH={}", binary.display());
}

/// Environment variables through which the outer build's configuration
/// would reach the nested one.
fn inherited_setting(key: &OsString) -> bool {
    let Some(key) = key.to_str() else {
        return false;
    };
    matches!(
        key,
        "RUSTFLAGS"
            | "RUSTDOCFLAGS"
            | "CARGO_ENCODED_RUSTFLAGS"
            | "CARGO_BUILD_RUSTFLAGS"
            | "CARGO_TARGET_DIR"
            | "CARGO_BUILD_TARGET_DIR"
            | "CARGO_BUILD_BUILD_DIR"
            | "CARGO_BUILD_TARGET"
            | "RUSTC_WORKSPACE_WRAPPER"
            | "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER"
            | "CLIPPY_ARGS"
    ) || key.starts_with("CARGO_PROFILE_")
        || (key.starts_with("CARGO_TARGET_") && key.ends_with("_RUSTFLAGS"))
        || key.starts_with("__CARGO")
}
