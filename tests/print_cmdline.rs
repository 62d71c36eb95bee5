//! `kiln run --print-cmdline` prints exactly the kernel command line the
//! same run gives the guest: the tiny guest `cmdline.S` prints the line it
//! finds through its zero page, and the two are compared for each run path
//! (kiln's agent, the classic console path, a user's own init) and the
//! options that add command-line words.

mod common;

use std::fs;
use std::process::Output;

use common::{have_kvm, kiln_cli, require, test_guest, Scratch};

fn kiln(args: &[String], profile: &str) -> Output {
    kiln_cli()
        .arg("run")
        .args(args)
        .env("KILN_HOST_PROFILE", profile)
        .output()
        .expect("running the kiln binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The line `--print-cmdline` prints for `args`, checked to be one line
/// with status 0 and, without -v, nothing on stderr.
fn printed(args: &[String], profile: &str) -> String {
    let mut all = args.to_vec();
    all.push("--print-cmdline".into());
    let out = kiln(&all, profile);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        text(&out.stderr)
    );
    if !args.iter().any(|a| a == "-v") {
        assert!(out.stderr.is_empty(), "{args:?}: {}", text(&out.stderr));
    }
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    assert!(stdout.ends_with('\n'));
    stdout.trim_end_matches('\n').to_string()
}

#[test]
fn printed_cmdline_is_what_the_guest_gets() {
    if !require(have_kvm(), "/dev/kvm not accessible") {
        return;
    }
    let scratch = Scratch::new("print-cmdline");
    let guest = test_guest("cmdline").display().to_string();
    let disk = scratch.path("disk.img");
    fs::write(&disk, vec![0u8; 4096]).unwrap();
    // An "ext4 image" as far as kiln's detection goes: its magic at 1080.
    let image = scratch.path("root.img");
    let mut bytes = vec![0u8; 8192];
    bytes[1080..1082].copy_from_slice(&0xef53u16.to_le_bytes());
    fs::write(&image, bytes).unwrap();
    let initrd = scratch.path("own.cpio");
    fs::write(&initrd, b"not unpacked by a tiny guest").unwrap();
    let socket = scratch.path("v.sock");

    let base = |extra: &[&str]| -> Vec<String> {
        ["--kernel", &guest, "--mem", "32M", "--timeout", "20s"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let disk_arg = format!("{},ro,id=d1", disk.display());
    common::hand_to_jail(socket.parent().expect("in the scratch directory"));
    let vsock_arg = format!("cid=3,socket={}", socket.display());
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("agent path, defaults", base(&[])),
        (
            "agent path, devices and user words",
            base(&[
                "--rng",
                "--console",
                "virtio",
                "--disk",
                &disk_arg,
                "--cmdline",
                "x=1 y",
            ]),
        ),
        (
            "agent path, image root",
            base(&["--rootfs", image.to_str().unwrap(), "--disk", &disk_arg]),
        ),
        (
            "classic path (--vsock)",
            base(&["--vsock", &vsock_arg, "--rng", "--cmdline", "z=2"]),
        ),
        (
            "classic path (own init)",
            base(&[
                "--initrd",
                initrd.to_str().unwrap(),
                "--cmdline",
                "rdinit=/init",
            ]),
        ),
    ];
    for profile in ["pvm", "hardware"] {
        for (what, args) in &cases {
            let line = printed(args, profile);
            let out = kiln(args, profile);
            assert_eq!(out.status.code(), Some(0), "{what}: {}", text(&out.stderr));
            assert_eq!(
                text(&out.stdout),
                format!("{line}\n"),
                "{what} ({profile}): the guest got another command line"
            );
            let pvm_words = line.contains(" noxsave ");
            assert_eq!(pvm_words, profile == "pvm", "{what}: {line}");
            let _ = fs::remove_file(&socket);
        }
    }
    // The agent path's vsock device is in the line (kiln's agent needs it).
    let agent = printed(&cases[0].1, "hardware");
    assert!(
        agent.ends_with(" virtio_mmio.device=4K@0xd0001000:5"),
        "{agent}"
    );
    let root = printed(&cases[2].1, "hardware");
    assert!(root.contains(":5 kiln.root=/dev/vda virtio_mmio"), "{root}");
}

/// With -v the run also logs the line it hands the guest.
#[test]
fn verbose_run_logs_the_printed_line() {
    if !require(have_kvm(), "/dev/kvm not accessible") {
        return;
    }
    let guest = test_guest("cmdline").display().to_string();
    let args: Vec<String> = ["--kernel", &guest, "--mem", "32M", "--timeout", "20s", "-v"]
        .map(String::from)
        .to_vec();
    let line = printed(&args, "hardware");
    assert!(!line.contains(" quiet "), "-v keeps the kernel log: {line}");
    let out = kiln(&args, "hardware");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let logged: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.split_once("kernel command line: ").map(|(_, l)| l))
        .collect();
    assert_eq!(logged, [line.as_str()], "{stderr}");
    // With -v the guest console goes to stderr: the guest's own copy.
    assert!(stderr.contains(&format!("\n{line}\n")), "{stderr}");
}

/// The line is printed without running the guest, and an option the run
/// would refuse is refused the same way (one line, status 125).
#[test]
fn print_cmdline_runs_nothing_and_refuses_what_the_run_refuses() {
    let guest = test_guest("hello").display().to_string();
    let args: Vec<String> = ["--kernel", &guest, "--mem", "32M"]
        .map(String::from)
        .to_vec();
    let line = printed(&args, "hardware");
    assert!(line.starts_with("console=ttyS0 "), "{line}");
    let mut bad = args.clone();
    bad.extend(["--mem", "1M", "--print-cmdline"].map(String::from));
    let out = kiln(&bad, "hardware");
    assert_eq!(out.status.code(), Some(125));
    assert!(out.stdout.is_empty());
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("kiln: ") && stderr.contains("--mem"),
        "{stderr}"
    );
}

/// README: only the agent path adds a vsock device for kiln's agent; with
/// `--vsock` the only vsock device is the user's, and an initrd started by
/// its own init (`rdinit=`) gets none. One `virtio_mmio.device=` word per
/// device (what the guest gets: `printed_cmdline_is_what_the_guest_gets`).
/// Printing reads no kernel and needs no KVM.
#[test]
fn only_the_agent_path_adds_a_vsock_device() {
    let scratch = Scratch::new("print-cmdline-devices");
    let guest = test_guest("hello").display().to_string();
    let initrd = scratch.path("own.cpio");
    fs::write(&initrd, b"a user's own initramfs").unwrap();
    let initrd = initrd.display().to_string();
    let vsock = format!("cid=3,socket={}", scratch.path("v.sock").display());
    let devices = |extra: &[&str]| -> usize {
        let args: Vec<String> = ["--kernel", &guest, "--mem", "32M"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        let line = printed(&args, "hardware");
        line.split(' ')
            .filter(|w| w.starts_with("virtio_mmio.device="))
            .count()
    };
    assert_eq!(devices(&[]), 1, "the agent's vsock device");
    assert_eq!(devices(&["--rng"]), 2, "rng and the agent's vsock");
    assert_eq!(devices(&["--vsock", &vsock]), 1, "the user's vsock only");
    assert_eq!(devices(&["--vsock", &vsock, "--rng"]), 2, "no agent device");
    let own_init = ["--initrd", initrd.as_str(), "--cmdline", "rdinit=/init"];
    assert_eq!(devices(&own_init), 0, "an own init gets no agent device");
    let mut own_init_rng = own_init.to_vec();
    own_init_rng.push("--rng");
    assert_eq!(devices(&own_init_rng), 1, "only the rng");
    // An initrd without rdinit= runs kiln's init on top: the agent path.
    assert_eq!(devices(&["--initrd", &initrd]), 1, "kiln's agent");
}
