//! Real Linux guests booted through the `kiln run` command line: the recipe
//! kernel (resources/guest) as PVH vmlinux and as bzImage, kiln's own init,
//! exit statuses, exact argument passing, SMP and memory size.
//!
//! Each boot costs tens of seconds on an emulating host, so every test
//! checks several things in one boot.

mod common;

use std::process::Output;

use common::{guest_kernel, guest_rootfs, have_kvm, kiln_cli, require};

const BOOT_TIMEOUT: &str = "600s";

fn prerequisites() -> bool {
    require(have_kvm(), "/dev/kvm not accessible")
        && require(
            guest_kernel("vmlinux").is_some(),
            "guest kernel not built (run resources/setup.sh)",
        )
}

fn kiln_run(kernel: &str, extra: &[&str], command: &[&str]) -> Output {
    let kernel = guest_kernel(kernel).expect("checked by prerequisites");
    let rootfs = guest_rootfs();
    let out = kiln_cli()
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .arg("--rootfs")
        .arg(rootfs)
        .args(["--timeout", BOOT_TIMEOUT])
        .args(extra)
        .arg("--")
        .args(command)
        .output()
        .expect("running kiln");
    eprintln!(
        "kiln exited {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// PVH vmlinux: output arrives, an awkward argument arrives byte-exact,
/// kiln's init set up the guest, and the command's status 3 is kiln's.
#[test]
fn vmlinux_runs_command_with_exact_arguments_and_status() {
    if !prerequisites() {
        return;
    }
    let awkward = "a  b \"c\" 'd' $HOME \\n tab\there; end";
    let script = r#"echo "arg=[$1]"; echo "host=$(hostname)"; grep -c ' /proc proc' /proc/mounts | sed 's/^/proc=/'; echo "pid1=$(cat /proc/1/comm)"; exit 3"#;
    let out = kiln_run("vmlinux", &[], &["/bin/sh", "-c", script, "sh", awkward]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "status of the guest command");
    assert!(
        stdout.contains(&format!("arg=[{awkward}]\n")),
        "argument arrives intact: {stdout:?}"
    );
    assert!(stdout.contains("host=kiln\n"), "{stdout:?}");
    assert!(stdout.contains("proc=1\n"), "/proc is mounted: {stdout:?}");
    assert!(
        !stdout.contains('\r'),
        "console output is raw (no CR added): {stdout:?}"
    );
    assert!(out.stderr.is_empty(), "no kiln message for a command exit");
}

/// bzImage through the 64-bit boot protocol; status 0. On a PVM host the
/// guest kernel took the host profile's words: it does not use FSGSBASE
/// (an NMI in kernel mode would otherwise kill the VM) and is not SMAP-aware.
#[test]
fn bzimage_boots_and_exits_zero() {
    if !prerequisites() || !require(guest_kernel("bzImage").is_some(), "bzImage not built") {
        return;
    }
    let script = "echo bzimage-ok; grep -m1 '^flags' /proc/cpuinfo; cat /proc/cmdline";
    let out = kiln_run("bzImage", &[], &["sh", "-c", script]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("bzimage-ok\n"));
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        let flags = stdout
            .lines()
            .find(|l| l.starts_with("flags"))
            .expect("flags");
        let flags: Vec<&str> = flags.split_whitespace().collect();
        assert!(flags.contains(&"fpu"), "{flags:?}");
        for hidden in ["fsgsbase", "smap", "popcnt", "xsave"] {
            assert!(!flags.contains(&hidden), "{hidden} still on: {flags:?}");
        }
    }
}

/// --cpus 2 brings up two CPUs (MP table, per-vCPU CPUID); --mem 1G is
/// what the guest sees.
#[test]
fn two_cpus_and_one_gib() {
    if !prerequisites() {
        return;
    }
    let out = kiln_run(
        "vmlinux",
        &["--cpus", "2", "--mem", "1G"],
        &[
            "sh",
            "-c",
            "echo cpus=$(nproc); grep MemTotal /proc/meminfo",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout.contains("cpus=2\n"), "{stdout:?}");
    let kib: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("MemTotal line");
    // The kernel keeps some memory for itself; 1 GiB minus a few percent.
    assert!(
        (900 * 1024..=1024 * 1024).contains(&kib),
        "MemTotal {kib} kB"
    );
}

/// A user's own initramfs and init (`--initrd`, `--cmdline rdinit=/init`):
/// it runs as PID 1 instead of kiln's init, which kiln does not even add;
/// its console output is kiln's stdout; it ends with a reset, which kiln
/// reports as "no status" (120) in one line.
#[test]
fn own_init_from_an_initrd_runs_instead_of_kilns() {
    if !prerequisites() {
        return;
    }
    let scratch = common::Scratch::new("own-init");
    let mut cpio = kiln::cpio::CpioBuilder::new();
    cpio.dir("bin", 0o755);
    cpio.dir("dev", 0o755);
    cpio.file(
        "bin/busybox",
        0o755,
        &std::fs::read("/bin/busybox").expect("/bin/busybox"),
    );
    cpio.char_dev("dev/console", 0o600, 5, 1);
    let init = "#!/bin/busybox sh\n\
                echo \"own-init pid=$$\"\n\
                if [ -e /kiln ]; then echo kiln-init-present; else echo kiln-init-absent; fi\n\
                /bin/busybox reboot -f\n";
    cpio.file("init", 0o755, init.as_bytes());
    let initrd = scratch.path("own.cpio");
    std::fs::write(&initrd, cpio.finish()).unwrap();

    let out = kiln_cli()
        .arg("run")
        .arg("--kernel")
        .arg(guest_kernel("vmlinux").expect("checked by prerequisites"))
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", "rdinit=/init", "--timeout", BOOT_TIMEOUT])
        .output()
        .expect("running kiln");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!("stdout: {stdout}\nstderr: {stderr}");
    // The guest's tty turns \n into \r\n (kiln's init would make it raw).
    let stdout = stdout.replace("\r\n", "\n");
    assert!(stdout.contains("own-init pid=1\n"), "{stdout:?}");
    assert!(stdout.contains("kiln-init-absent\n"), "{stdout:?}");
    assert_eq!(out.status.code(), Some(120));
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
}
