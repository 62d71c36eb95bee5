//! Real Linux guests booted through the `kiln run` command line: the recipe
//! kernel (resources/guest) as PVH vmlinux and as bzImage, kiln's own init,
//! exit statuses (the command's, 128+N for a signal), exact argument
//! passing, `-e`/`-w`/`--user`/`-i`, `-v`, SMP, memory size and a plain tar
//! root.
//!
//! Each boot costs tens of seconds on an emulating host, so every test
//! checks several things in one boot.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Output, Stdio};

use common::{guest_kernel, guest_rootfs, have_kvm, kiln_cli, require, sha256_hex, Scratch};

const BOOT_TIMEOUT: &str = "600s";

fn prerequisites() -> bool {
    require(have_kvm(), "/dev/kvm not accessible")
        && require(
            guest_kernel("vmlinux").is_some(),
            "guest kernel not built (run resources/setup.sh)",
        )
}

/// `kiln run --kernel KERNEL --rootfs ROOT EXTRA -- COMMAND` with `stdin`
/// on kiln's stdin (written by a thread, then closed).
fn kiln_run(kernel: &str, root: &Path, extra: &[&str], command: &[&str], stdin: &[u8]) -> Output {
    kiln_run_with(kernel, "--rootfs", root, extra, command, stdin)
}

/// As [`kiln_run`], with the root given by `root_flag` (`--rootfs` or
/// `--initrd`).
fn kiln_run_with(
    kernel: &str,
    root_flag: &str,
    root: &Path,
    extra: &[&str],
    command: &[&str],
    stdin: &[u8],
) -> Output {
    let kernel = guest_kernel(kernel).expect("checked by prerequisites");
    let mut child = kiln_cli()
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .arg(root_flag)
        .arg(root)
        .args(["--timeout", BOOT_TIMEOUT])
        .args(extra)
        .arg("--")
        .args(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kiln");
    let mut input = child.stdin.take().expect("piped");
    let data = stdin.to_vec();
    // kiln may never read it (without -i): a write error is not the test's.
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("waiting for kiln");
    feeder.join().expect("stdin feeder");
    eprintln!(
        "kiln exited {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// PVH vmlinux: output arrives, an awkward argument arrives byte-exact,
/// kiln's init (PID 1) set up the guest, and the command's status 3 is
/// kiln's. `-e` (values with spaces, `=` and empty), `-w`, `--user UID:GID`
/// reach the command, `-i` forwards kiln's stdin byte for byte (every byte
/// value), the command's stderr is kiln's (and kiln adds nothing to it),
/// the command sees GLIBC_TUNABLES exactly when the host profile is PVM,
/// and without `--net` the guest has no network card.
#[test]
fn vmlinux_runs_command_with_exact_arguments_and_status() {
    if !prerequisites() {
        return;
    }
    let awkward = "a  b \"c\" 'd' $HOME \\n tab\there; end";
    let script = r#"echo "arg=[$1]"; echo "host=$(hostname)"; grep -c ' /proc proc' /proc/mounts | sed 's/^/proc=/'; echo "pid1=$(cat /proc/1/comm)"; echo "self=$$"; echo "env=[$SPACED|$EQUALS|${EMPTY-unset}]"; echo "cwd=$(pwd)"; echo "ids=$(id -u):$(id -g)"; echo "nics=$(ls /sys/class/net | tr '\n' ' ')"; echo "stdin=$(sha256sum | cut -c1-64)"; echo "tunables=${GLIBC_TUNABLES-unset}"; echo to-stderr >&2; exit 3"#;
    // 64 KiB: every byte value, \r, \n, ^C, ^D and NUL included, in a
    // pattern that is not periodic on a power of two.
    let input: Vec<u8> = (0..64u32 << 10)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8 ^ (i % 251) as u8)
        .collect();
    assert!((0..=255u8).all(|b| input.contains(&b)));
    let flags = [
        "-e",
        "SPACED=x  y",
        "-e",
        "EQUALS=a=b",
        "-e",
        "EMPTY=",
        "-w",
        "/tmp",
        "--user",
        "1000:1001",
        "-i",
    ];
    let out = kiln_run(
        "vmlinux",
        &guest_rootfs(),
        &flags,
        &["/bin/sh", "-c", script, "sh", awkward],
        &input,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let has = |line: &str| stdout.lines().any(|l| l == line);
    // On a PVM host the guest kernel cannot keep AVX state: the command
    // gets kiln's GLIBC_TUNABLES; on hardware KVM it gets none.
    let tunables_ok = if on_pvm() {
        stdout
            .lines()
            .any(|l| l.starts_with("tunables=glibc.cpu.hwcaps=-AVX,-AVX2"))
    } else {
        has("tunables=unset")
    };
    assert_all(
        &[
            ("status 3", out.status.code() == Some(3)),
            ("argument intact", has(&format!("arg=[{awkward}]"))),
            ("hostname", has("host=kiln")),
            ("/proc mounted", has("proc=1")),
            ("kiln's init is PID 1", has("pid1=init")),
            ("the command is not PID 1", !has("self=1")),
            ("-e", has("env=[x  y|a=b|]")),
            ("-w", has("cwd=/tmp")),
            ("--user", has("ids=1000:1001")),
            ("no card without --net", has("nics=lo ")),
            (
                "-i: stdin byte for byte",
                has(&format!("stdin={}", sha256_hex(&input))),
            ),
            ("raw console (no CR added)", !stdout.contains('\r')),
            ("GLIBC_TUNABLES as the host profile says", tunables_ok),
            (
                "the command's stderr is kiln's, and kiln adds nothing",
                out.stderr == b"to-stderr\n",
            ),
        ],
        &out,
    );
}

/// Whether this host's KVM is PVM (kiln's host profile then applies).
fn on_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The boot loader type the guest kernel recorded (`type_of_loader`, byte
/// 0x210 of its boot parameters), as `/sys/kernel/boot_params/data` shows
/// it: Linux's PVH entry records 0xb0 when not under Xen (0x90 under Xen;
/// arch/x86/platform/pvh/enlighten.c), kiln's 64-bit entry 0xff.
const LOADER_TYPE: &str =
    "echo loader=$(od -A n -t x1 -j 528 -N 1 /sys/kernel/boot_params/data | tr -d ' ')";

/// A kernel message the two-CPU boot's command logs.
const CONSOLE_MARKER: &str = "kiln-console-after-agent";

/// Fails listing every check that does not hold, so that one boot (and
/// one local break) shows all that went wrong.
fn assert_all(checks: &[(&str, bool)], out: &Output) {
    let failed: Vec<&str> = checks
        .iter()
        .filter(|(_, holds)| !holds)
        .map(|(what, _)| *what)
        .collect();
    assert!(
        failed.is_empty(),
        "failed: {failed:?}\nstatus {:?}\nstdout: {:?}\nstderr: {:?}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// bzImage through the 64-bit boot protocol; status 0. The root is the
/// user's own `--initrd` (the busybox root and a marker, two archives made
/// by the host's cpio, no `rdinit=`): kiln appends its init and the command
/// runs on top of that root, with kiln's init as PID 1. On a PVM host the
/// guest kernel took the host profile's words: it does not use FSGSBASE
/// (an NMI in kernel mode would otherwise kill the VM) and is not SMAP-aware.
/// `-v` puts the guest kernel's log and kiln's boot-timer line on stderr
/// (stdout keeps only the command's output); without `-i` the command's
/// stdin is empty although kiln's is not.
#[test]
fn bzimage_boots_and_exits_zero() {
    if !prerequisites()
        || !require(guest_kernel("bzImage").is_some(), "bzImage not built")
        || !require(common::have_program("cpio"), "cpio not installed")
    {
        return;
    }
    let scratch = Scratch::new("linux-boot-initrd");
    let marker = scratch.path("marker");
    std::fs::create_dir_all(marker.join("etc")).unwrap();
    std::fs::write(marker.join("etc/user-initrd"), "from the user's initrd\n").unwrap();
    let initrd = scratch.path("user.cpio");
    common::run_checked(
        std::process::Command::new("sh")
            .args([
                "-c",
                "(cd \"$1\" && find . | cpio -o -H newc -R 0:0 --quiet) > \"$3\" && \
                 (cd \"$2\" && find . | cpio -o -H newc -R 0:0 --quiet) >> \"$3\"",
                "sh",
            ])
            .arg(guest_rootfs())
            .arg(&marker)
            .arg(&initrd),
    );
    let script = format!("echo bzimage-ok; echo stdin_bytes=$(wc -c); grep -m1 '^flags' /proc/cpuinfo; cat /proc/cmdline; {LOADER_TYPE}; cat /etc/user-initrd; echo \"pid1=$(cat /proc/1/comm)\"; echo \"ids=$(id -u):$(id -g)\"; head -c 1 /dev/mem >/dev/null 2>&1 || echo no-dev-mem");
    let out = kiln_run_with(
        "bzImage",
        "--initrd",
        &initrd,
        &["-v"],
        &["sh", "-c", &script],
        b"not for the command\n",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let timer = stderr
        .lines()
        .find(|l| l.contains("guest user space started "))
        .unwrap_or_default();
    assert_all(
        &[
            ("status 0", out.status.code() == Some(0)),
            ("output", stdout.contains("bzimage-ok\n")),
            ("empty stdin without -i", stdout.contains("stdin_bytes=0\n")),
            ("64-bit boot protocol entry", stdout.contains("loader=ff\n")),
            (
                "the command runs on the user's initrd",
                stdout.contains("from the user's initrd\n"),
            ),
            ("kiln's init is PID 1", stdout.contains("pid1=init\n")),
            (
                "without --user: unprivileged, no /dev/mem",
                stdout.contains("ids=65534:65534\nno-dev-mem\n"),
            ),
            (
                "-v: kernel log on stderr",
                stderr.contains("Linux version "),
            ),
            (
                "-v: kernel log not on stdout",
                !stdout.contains("Linux version "),
            ),
            (
                "-v: boot-timer line",
                timer.contains(" ms after monitor start"),
            ),
        ],
        &out,
    );
    if on_pvm() {
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

/// The recipe vmlinux is entered through its PVH note (the guest kernel
/// records the PVH entry's loader type). --cpus 2 brings up two CPUs (MP table,
/// per-vCPU CPUID); --mem 1G is
/// what the guest sees. The root is a plain tar archive (named without a
/// tar suffix: kiln tells roots apart by content). The command kills itself
/// with SIGUSR1: kiln exits with 128+10 and says nothing. A kernel message
/// logged by the command (as root: /dev/kmsg is root's) reaches neither
/// stdout nor stderr (no `-v`).
#[test]
fn two_cpus_and_one_gib() {
    if !prerequisites() || !require(common::have_program("tar"), "tar not installed") {
        return;
    }
    let scratch = Scratch::new("linux-boot-tar");
    let archive = scratch.path("root.img");
    common::run_checked(
        std::process::Command::new("tar")
            .arg("-C")
            .arg(guest_rootfs())
            .args(["--numeric-owner", "-cf"])
            .arg(&archive)
            .arg("."),
    );
    let out = kiln_run(
        "vmlinux",
        &archive,
        &["--cpus", "2", "--mem", "1G", "--user", "0"],
        &[
            "sh",
            "-c",
            &format!(
                "echo cpus=$(nproc); grep MemTotal /proc/meminfo; \
                 echo root=$(awk '$2 == \"/\" {{ print $3 }}' /proc/mounts); {LOADER_TYPE}; \
                 echo '<0>{CONSOLE_MARKER}' > /dev/kmsg && echo logged; kill -USR1 $$"
            ),
        ],
        b"",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(128 + 10), "killed by SIGUSR1");
    assert!(
        out.stderr.is_empty(),
        "no kiln message for a command's signal"
    );
    assert!(
        stdout.contains("root=rootfs\n"),
        "the tar root is the initramfs: {stdout:?}"
    );
    assert!(stdout.contains("cpus=2\n"), "{stdout:?}");
    assert!(
        stdout.contains("logged\n"),
        "the marker was logged: {stdout:?}"
    );
    // Without -v the console is dropped once the agent is up: a kernel
    // message at emergency level (which passes `quiet`) is seen nowhere.
    assert!(
        !stdout.contains(CONSOLE_MARKER)
            && !String::from_utf8_lossy(&out.stderr).contains(CONSOLE_MARKER),
        "the console after the agent is up reached kiln's output"
    );
    assert!(
        stdout.contains("loader=b0\n"),
        "the recipe vmlinux is entered through its PVH note: {stdout:?}"
    );
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
