//! End-to-end tests of the monitor with tiny hand-written guests
//! (`resources/test-guests/*.S`): each boots in milliseconds and exercises one
//! path: port I/O, MMIO, interrupts, reset, timeout, triple fault, PVH entry,
//! panic detection, control-page misuse, CLI error handling, exit cost.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{
    guest_config, have_kvm, require, run_guest, run_guest_after, run_to_end, test_guest, Scratch,
};
use kiln::outcome::{STATUS_BOOT_TIMEOUT, STATUS_KILN_ERROR, STATUS_NO_REPORT, STATUS_TIMEOUT};
use kiln::VmOutcome;

macro_rules! require_kvm {
    () => {
        if !require(have_kvm(), "/dev/kvm not accessible") {
            return;
        }
    };
}

/// Runs `kiln run ARGS` and returns its output.
fn kiln(args: &[&str]) -> Output {
    common::kiln_cli()
        .arg("run")
        .args(args)
        .output()
        .expect("running the kiln binary")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// kiln's contract for every ending it reports itself: exactly one line on
/// stderr, containing `needle`, and nothing that looks like a Rust panic.
fn assert_one_line(out: &Output, needle: &str) {
    let err = stderr_of(out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one stderr line, got {lines:?}");
    assert!(
        lines[0].contains(needle),
        "stderr {:?} does not mention {needle:?}",
        lines[0]
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic text on stderr: {err:?}"
    );
}

/// kiln refused `args` before the guest ran: status 125, one stderr line
/// holding `needle`, nothing on stdout.
fn assert_refused(out: &Output, args: &[&str], needle: &str) {
    assert_kiln_ended(out, STATUS_KILN_ERROR, args, needle);
}

/// kiln ended the run of `args` itself, with `status` and one stderr line
/// holding `needle`; nothing on stdout.
fn assert_kiln_ended(out: &Output, status: i32, args: &[&str], needle: &str) {
    assert_eq!(
        out.status.code(),
        Some(status),
        "{args:?}: stderr {}",
        stderr_of(out)
    );
    assert_one_line(out, needle);
    assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
}

// 1. Port I/O output and the MMIO exit report.
#[test]
fn serial_output_is_byte_exact_and_exit_status_arrives_over_mmio() {
    require_kvm!();
    const MSG: &[u8] = b"hello from a tiny kiln guest\n";
    let (report, out) = run_guest(&guest_config("hello"), None);
    assert_eq!(
        out,
        MSG,
        "console output: {:?}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(report.outcome, VmOutcome::Exited(42));
    // The guest makes exactly one `outb` per byte and one MMIO write.
    assert!(report.exits.pio >= MSG.len() as u64, "{:?}", report.exits);
    assert!(report.exits.mmio >= 1, "{:?}", report.exits);
    assert_eq!(report.exits.unclaimed, 0, "{:?}", report.exits);
    assert!(report.startup.is_some(), "the vCPU never ran");
}

#[test]
fn cli_passes_guest_output_and_status_through() {
    require_kvm!();
    let guest = test_guest("hello");
    let out = kiln(&[
        "--kernel",
        path_str(&guest),
        "--mem",
        "32M",
        "--timeout",
        "5s",
    ]);
    assert_eq!(out.status.code(), Some(42), "stderr: {}", stderr_of(&out));
    assert_eq!(out.stdout, b"hello from a tiny kiln guest\n");
    assert!(out.stderr.is_empty(), "stderr: {}", stderr_of(&out));
}

#[test]
fn idle_secondary_vcpus_do_not_hold_up_the_exit() {
    require_kvm!();
    // vCPU 1 never gets a startup IPI: it waits inside KVM_RUN until kiln
    // stops it.
    // No VM timeout: a run held up by vCPU 1 would not end by itself.
    let mut config = guest_config("hello");
    config.vcpus = 2;
    config.timeout = None;
    let (report, out) = run_to_end(&config);
    assert_eq!(report.outcome, VmOutcome::Exited(42));
    assert_eq!(out, b"hello from a tiny kiln guest\n");
}

/// README: one host thread per vCPU (crate docs: plus the event loop, on a
/// thread of its own for `spawn`). `ap_start` has vCPU 0 start vCPU 1,
/// which prints "ap": once that line is out, both vCPU threads run and the
/// VM has every thread it will have. Exact counts, so in a child process.
#[test]
fn each_vcpu_is_one_host_thread_next_to_the_event_loop() {
    require_kvm!();
    if !kiln_prereq::in_child() {
        kiln_prereq::run_in_child(
            concat!(
                module_path!(),
                "::each_vcpu_is_one_host_thread_next_to_the_event_loop"
            ),
            &[],
        );
        return;
    }
    // KVM's own worker (`kvm-nx-lpage-recovery`, a kernel task that newer
    // kernels list among the VM owner's tasks) is no host thread of kiln's.
    let threads = || -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|c| c.trim_end().to_string())
            .filter(|name| !name.starts_with("kvm-"))
            .collect();
        names.sort();
        names
    };
    let before = threads();
    let mut config = guest_config("ap_start");
    config.vcpus = 2;
    config.timeout = None;
    let capture = common::Capture::default();
    let io = kiln::ConsoleIo {
        output: Box::new(capture.clone()),
        input: None,
    };
    let vm = kiln::spawn(config, io, Instant::now()).unwrap();
    let started = capture.wait_for(b"ap\n", common::HANG_LIMIT);
    let during = threads();
    vm.stop();
    let report = vm.wait().unwrap();
    assert!(
        started,
        "vCPU 1 never ran: {:?}",
        String::from_utf8_lossy(&capture.bytes())
    );
    assert_eq!(report.outcome, VmOutcome::Stopped);
    let kiln: Vec<&str> = during
        .iter()
        .map(String::as_str)
        .filter(|n| n.starts_with("kiln-"))
        .collect();
    assert_eq!(kiln, ["kiln-vcpu0", "kiln-vcpu1", "kiln-vmm"]);
    assert_eq!(during.len(), before.len() + 3, "{before:?} -> {during:?}");
    assert_eq!(threads(), before, "the VM's threads are gone");
}

// 1a. The loader tells a Linux kernel (its ELF "Linux" note) from other ELF
// guests, which get no initramfs from kiln. Loading needs no KVM.
#[test]
fn kernel_loader_tells_linux_from_a_tiny_guest() {
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 256 << 20)]).unwrap();
    let tiny = kiln::boot::kernel::load(&mem, &test_guest("hello"), true).unwrap();
    assert!(!tiny.is_linux, "a tiny test guest is not Linux");
    let vmlinux = common::guest_kernel("vmlinux");
    if !require(
        vmlinux.is_some(),
        "the recipe guest kernel (run resources/setup.sh)",
    ) {
        return;
    }
    let vmlinux = vmlinux.unwrap();
    let linux = kiln::boot::kernel::load(&mem, &vmlinux, true).unwrap();
    assert!(linux.is_linux, "the recipe vmlinux carries a Linux note");
    // README: "PVH entry preferred": the recipe kernel carries the PVH note
    // and kiln enters it there, unless told not to.
    assert!(
        matches!(linux.entry, kiln::boot::kernel::BootEntry::Pvh { .. }),
        "{:?}",
        linux.entry
    );
    let no_pvh = kiln::boot::kernel::load(&mem, &vmlinux, false).unwrap();
    assert!(
        matches!(no_pvh.entry, kiln::boot::kernel::BootEntry::Linux64 { .. }),
        "{:?}",
        no_pvh.entry
    );
}

// 1b. String port I/O (`rep outsb`) may reach the monitor as one exit that
// carries several bytes: none of them may be lost.
#[test]
fn string_port_output_keeps_every_byte() {
    require_kvm!();
    let (report, out) = run_guest(&guest_config("rep_outs"), None);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "string I/O: all of these bytes must arrive\n"
    );
    assert_eq!(report.outcome, VmOutcome::Exited(0));
}

// 2. Reads: the control page magic, and unclaimed PIO/MMIO addresses.
#[test]
fn control_magic_reads_kiln_and_unclaimed_reads_are_all_ones() {
    require_kvm!();
    let (report, out) = run_guest(&guest_config("probe"), None);
    // 100 = every check passed; 1..=7 name the failed check (see probe.S).
    assert_eq!(report.outcome, VmOutcome::Exited(100));
    assert!(out.is_empty());
    // inb/inw/inl/outb to port 0x1234, two reads and a write at 0xe0000000.
    assert_eq!(report.exits.unclaimed, 7, "{:?}", report.exits);
    assert!(
        report.exits.pio >= 4 && report.exits.mmio >= 6,
        "{:?}",
        report.exits
    );
}

// 3. Host input -> UART -> irqfd -> 8259 -> IDT -> guest handler.
#[test]
fn serial_input_raises_an_interrupt_through_the_pic() {
    require_kvm!();
    let (report, out) = run_guest(&guest_config("serial_irq"), Some(b"Z"));
    // 98: IIR did not say "data received"; 99: an unexpected vector.
    assert_eq!(report.outcome, VmOutcome::Exited(b'Z'));
    assert_eq!(out, b"ready\n");
}

#[test]
fn serial_input_wakes_a_halted_guest() {
    require_kvm!();
    // The byte is sent only once the guest has set everything up, so it
    // arrives while the vCPU is blocked in `hlt`.
    let (report, out) = run_guest_after(&guest_config("serial_irq"), b"ready\n", b"K");
    assert_eq!(report.outcome, VmOutcome::Exited(b'K'));
    assert_eq!(out, b"ready\n");
}

// 4. i8042 reset.
#[test]
fn i8042_reset_ends_the_vm_as_guest_reset() {
    require_kvm!();
    let (report, console) = run_guest(&guest_config("reset"), None);
    assert_eq!(report.outcome, VmOutcome::GuestReset);
    assert_eq!(report.outcome.exit_status(), STATUS_NO_REPORT);
    assert!(report.exits.pio >= 1);
    assert_eq!(console, b"own init says bye\n");

    let guest = test_guest("reset");
    let out = kiln(&[
        "--kernel",
        path_str(&guest),
        "--mem",
        "32M",
        "--timeout",
        "5s",
    ]);
    assert_eq!(out.status.code(), Some(120));
    assert_one_line(&out, "reset");
    // No agent ever came up: the guest console was the output.
    assert_eq!(out.stdout, b"own init says bye\n");
}

// 5. Timeout.
#[test]
fn timeout_stops_a_spinning_guest() {
    require_kvm!();
    let mut config = guest_config("spin");
    config.timeout = Some(Duration::from_millis(300));
    let t0 = Instant::now();
    let (report, _) = run_to_end(&config);
    assert_eq!(report.outcome, VmOutcome::Timeout);
    // Not a speed goal: a timeout must never end the VM before it is due.
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "stopped early: {took:?}"
    );

    // Through the CLI; a longer --boot-timeout changes nothing: a
    // --timeout that ends the boot first is still 124.
    let guest = test_guest("spin");
    for extra in [vec![], vec!["--boot-timeout", "60s"]] {
        let mut args = vec!["--kernel", path_str(&guest), "--mem", "32M"];
        args.extend(["--timeout", "300ms"]);
        args.extend(&extra);
        let out = kiln(&args);
        assert_kiln_ended(
            &out,
            STATUS_TIMEOUT,
            &args,
            "kiln: timeout expired, VM stopped",
        );
    }
}

/// README: `--boot-timeout` bounds the wait for kiln's guest agent (a tiny
/// guest never runs it) with its own status, 119, and one line naming the
/// limit, whether or not a longer `--timeout` is given; nothing on stdout.
#[test]
fn boot_timeout_ends_the_wait_for_the_agent_with_its_own_status() {
    require_kvm!();
    let guest = test_guest("spin");
    for extra in [vec![], vec!["--timeout", "60s"]] {
        let mut args = vec!["--kernel", path_str(&guest), "--mem", "32M"];
        args.extend(["--boot-timeout", "1s"]);
        args.extend(&extra);
        let out = kiln(&args);
        assert_kiln_ended(
            &out,
            STATUS_BOOT_TIMEOUT,
            &args,
            "kiln: the guest agent did not connect within 1s (--boot-timeout), VM stopped: ",
        );
        assert!(stderr_of(&out).contains("try an image root or a longer --boot-timeout"));
    }
}

/// `--boot-timeout` where no agent runs (`--vsock`: the device is the
/// user's; an initrd's own init) is refused with one line, status 125.
#[test]
fn boot_timeout_without_the_agent_is_refused() {
    require_kvm!();
    let scratch = Scratch::new("boot-timeout-refused");
    common::hand_to_jail(&scratch.0);
    let initrd = scratch.path("initrd.cpio");
    fs::write(&initrd, b"not read").unwrap();
    let vsock = format!("cid=3,socket={}", path_str(&scratch.path("v.sock")));
    let guest = test_guest("hello");
    for no_agent in [
        vec!["--vsock", vsock.as_str()],
        vec!["--initrd", path_str(&initrd), "--cmdline", "rdinit=/init"],
    ] {
        let mut args = vec!["--kernel", path_str(&guest), "--mem", "32M"];
        args.extend(&no_agent);
        args.extend(["--boot-timeout", "1s"]);
        assert_refused(
            &kiln(&args),
            &args,
            "--boot-timeout is the wait for kiln's guest agent, which does not run with --vsock or an initrd's own init (rdinit=)",
        );
    }
}

/// README: a directory root that makes an initramfs of 16 MiB or more gets
/// one warning line with its size and the image-root advice; the run goes
/// on. A small root gets none.
#[test]
fn a_large_directory_root_gets_a_warning() {
    require_kvm!();
    let scratch = Scratch::new("large-root");
    let (small, large) = (scratch.path("small"), scratch.path("large"));
    fs::create_dir(&small).unwrap();
    fs::create_dir(&large).unwrap();
    // 16 MiB of zeros (a hole: nothing on disk), plus kiln's init.
    let file = fs::File::create(large.join("blob")).unwrap();
    file.set_len(16 << 20).unwrap();
    common::hand_to_jail(&scratch.0);
    let guest = test_guest("hello");
    let run = |root: &Path| {
        kiln(&[
            "--kernel",
            path_str(&guest),
            "--mem",
            "64M",
            "--timeout",
            "30s",
            "--rootfs",
            path_str(root),
        ])
    };
    let out = run(&large);
    assert_eq!(out.status.code(), Some(42), "{}", stderr_of(&out));
    assert_eq!(out.stdout, b"hello from a tiny kiln guest\n");
    let warned = format!("rootfs {}: ", path_str(&large));
    assert_one_line(&out, &warned);
    // The whole initramfs: the 16 MiB and kiln's init.
    let err = stderr_of(&out);
    let mib = err
        .split(&warned)
        .nth(1)
        .and_then(|t| t.split_once(" MiB of initramfs, "));
    let mib: u64 = mib.and_then(|(n, _)| n.parse().ok()).expect(&err);
    assert!(mib > 16, "{err}");
    assert!(
        stderr_of(&out).contains("which the guest kernel unpacks before anything runs")
            && stderr_of(&out).contains("an ext4 image root needs no unpacking"),
        "{}",
        stderr_of(&out)
    );
    let out = run(&small);
    assert_eq!(out.status.code(), Some(42), "{}", stderr_of(&out));
    assert!(out.stderr.is_empty(), "{}", stderr_of(&out));
}

#[test]
fn timeout_stops_a_guest_halted_with_interrupts_off() {
    require_kvm!();
    // `cli; hlt`: the vCPU sleeps inside KVM_RUN, which only a signal ends.
    let mut config = guest_config("halt");
    config.timeout = Some(Duration::from_millis(300));
    let (report, _) = run_to_end(&config);
    assert_eq!(report.outcome, VmOutcome::Timeout);
}

// 6. Triple fault.
#[test]
fn triple_fault_is_reported() {
    require_kvm!();
    let (report, _) = run_guest(&guest_config("triple_fault"), None);
    // The guest uses `ud2`, which PVM's emulator handles (unlike `int3`), so
    // the fault cascade runs to KVM_EXIT_SHUTDOWN here as on hardware KVM.
    assert_eq!(report.outcome, VmOutcome::TripleFault);
    assert_eq!(report.outcome.exit_status(), 122);
}

#[test]
fn boot_gdt_in_memory_matches_the_loaded_selectors() {
    require_kvm!();
    let (report, _) = run_guest(&guest_config("boot_gdt"), None);
    // 10 + slot: that descriptor is not present; 20: the IDT overlaps the GDT.
    assert_eq!(report.outcome, VmOutcome::Exited(0));
}

// 7. PVH entry, and the 64-bit entry of the same ELF without it.
#[test]
fn pvh_note_selects_the_32bit_entry_unless_disabled() {
    require_kvm!();
    let mut config = guest_config("pvh");
    let (report, out) = run_guest(&config, None);
    // 1..=3 would name a violated PVH entry condition (see pvh.S).
    assert_eq!(report.outcome, VmOutcome::Exited(32));
    assert_eq!(out, b"PVH entry\n");

    config.use_pvh = false;
    let (report, out) = run_guest(&config, None);
    assert_eq!(report.outcome, VmOutcome::Exited(64));
    assert_eq!(out, b"64-bit entry\n");

    let guest = test_guest("pvh");
    let out = kiln(&["--kernel", path_str(&guest), "--mem", "32M", "--no-pvh"]);
    assert_eq!(out.status.code(), Some(64), "stderr: {}", stderr_of(&out));
    assert_eq!(out.stdout, b"64-bit entry\n");
}

// 8. Panic text followed by a reset is a kernel panic.
#[test]
fn panic_message_then_reset_is_a_kernel_panic() {
    require_kvm!();
    let (report, out) = run_guest(&guest_config("panic"), None);
    assert_eq!(
        report.outcome,
        VmOutcome::KernelPanic(Some("tiny test panic".into()))
    );
    assert_eq!(report.outcome.exit_status(), 121);
    assert_eq!(out, b"Kernel panic - not syncing: tiny test panic\n");

    let guest = test_guest("panic");
    let out = kiln(&[
        "--kernel",
        path_str(&guest),
        "--mem",
        "32M",
        "--timeout",
        "5s",
    ]);
    assert_eq!(out.status.code(), Some(121));
    assert_one_line(&out, "tiny test panic");
}

// 9. Malformed and repeated exit reports.
#[test]
fn only_the_first_valid_exit_report_counts() {
    require_kvm!();
    let (report, _) = run_guest(&guest_config("hostile_exit"), None);
    // Six malformed reports must neither end the VM nor set a status, then
    // "exited 33" counts. The later reports (44, signal 9) must not replace
    // it; kiln stops the vCPU at the first valid report, so they may not even
    // execute, but no ordering of them may change the outcome.
    assert_eq!(report.outcome, VmOutcome::Exited(33));
    assert!(report.exits.mmio >= 7, "{:?}", report.exits);
}

// 10. CLI errors: status 125, one line on stderr naming the problem.
#[test]
fn cli_rejects_bad_options_with_one_line() {
    // These are refused before KVM is touched: no /dev/kvm needed.
    let guest = test_guest("hello");
    let guest = path_str(&guest);
    for (args, needle) in [
        (vec!["--mem", "0"], "--mem"),
        (vec!["--mem", "1000T"], "--mem"),
        (vec!["--cpus", "0"], "--cpus"),
        (vec!["--mem", "lots"], "--mem"),
        (vec!["--cpus=-1"], "--cpus"),
        (vec!["--boot-timeout", "0"], "--boot-timeout"),
        (vec!["--boot-timeout", "soon"], "--boot-timeout"),
        (vec!["--boot-timeout=-1s"], "--boot-timeout"),
    ] {
        let mut all = vec!["--kernel", guest];
        all.extend(&args);
        assert_refused(&kiln(&all), &args, needle);
    }
}

/// A kernel or initrd that is not a regular file, or an initrd larger than
/// guest memory: status 125, one line naming it, before anything is read
/// (a FIFO used to block the open forever, and `--initrd /dev/zero` was
/// read until the host ran out of memory). Runs under `timeout -s KILL` so
/// that a regression fails instead of hanging the suite.
#[test]
fn cli_rejects_kernel_and_initrd_that_are_not_files() {
    if !require(common::have_program("timeout"), "timeout (coreutils)") {
        return;
    }
    let scratch = Scratch::new("bad-inputs");
    let fifo = scratch.0.join("fifo");
    let fifo_c = std::ffi::CString::new(path_str(&fifo)).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo_c.as_ptr(), 0o600) }, 0, "mkfifo");
    let big = scratch.0.join("big.cpio");
    fs::File::create(&big).unwrap().set_len(64 << 20).unwrap();
    let guest = test_guest("hello");
    let guest = path_str(&guest);
    let fifo = path_str(&fifo);
    for (args, needle) in [
        (vec!["--kernel", fifo], "not a regular file"),
        (vec!["--kernel", "/dev/zero"], "not a regular file"),
        (
            vec!["--kernel", guest, "--initrd", fifo],
            "not a regular file",
        ),
        (
            vec!["--kernel", guest, "--initrd", "/dev/zero"],
            "not a regular file",
        ),
        (
            vec!["--kernel", guest, "--initrd", path_str(&big)],
            "more than the guest's 32 MiB",
        ),
    ] {
        let out = std::process::Command::new("timeout")
            .args(["-s", "KILL", "60", env!("CARGO_BIN_EXE_kiln"), "run"])
            .args(&args)
            .args(["--mem", "32M"])
            .output()
            .expect("running kiln under timeout");
        assert_refused(&out, &args, needle);
        assert!(
            stderr_of(&out).contains(args[args.len() - 1]),
            "{args:?}: the path is named"
        );
    }
}

#[test]
fn cli_rejects_bad_kernel_files_with_one_line() {
    // kiln opens /dev/kvm before it reads the kernel.
    require_kvm!();
    let scratch = Scratch::new("bad-kernels");
    let missing = scratch.0.join("no-such-kernel");
    let short_text = scratch.0.join("short.txt");
    fs::write(&short_text, "not a kernel\n").unwrap();
    // Long enough to get past the ELF check to the bzImage check.
    let long_text = scratch.0.join("long.txt");
    fs::write(
        &long_text,
        "this is a text file, not a kernel\n".repeat(100),
    )
    .unwrap();
    // A host executable: an x86_64 ELF, but a user program.
    let host_elf = if Path::new("/bin/true").exists() {
        PathBuf::from("/bin/true")
    } else {
        std::env::current_exe().unwrap()
    };
    for path in [&missing, &short_text, &long_text, &host_elf, &scratch.0] {
        let out = kiln(&[
            "--kernel",
            path_str(path),
            "--mem",
            "32M",
            "--timeout",
            "5s",
        ]);
        assert_eq!(
            out.status.code(),
            Some(STATUS_KILN_ERROR),
            "{}: stderr {}",
            path.display(),
            stderr_of(&out)
        );
        assert_one_line(&out, path_str(path));
    }
}

#[test]
fn cli_without_kvm_access_fails_with_one_line() {
    if !require(common::is_root(), "needs root to run kiln as another user")
        || !require(
            common::have_program("setpriv"),
            "setpriv (util-linux) not found",
        )
        || !require(Path::new("/dev/kvm").exists(), "no /dev/kvm to be denied")
    {
        return;
    }
    // Everything the unprivileged run needs sits in a world-readable place.
    let scratch = Scratch::new_in(&std::env::temp_dir(), "nokvm");
    fs::set_permissions(&scratch.0, fs::Permissions::from_mode(0o755)).unwrap();
    let guest = scratch.0.join("hello.elf");
    fs::copy(test_guest("hello"), &guest).unwrap();
    fs::set_permissions(&guest, fs::Permissions::from_mode(0o644)).unwrap();
    let exe = scratch.0.join("kiln");
    if fs::hard_link(env!("CARGO_BIN_EXE_kiln"), &exe).is_err() {
        fs::copy(env!("CARGO_BIN_EXE_kiln"), &exe).unwrap();
    }
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();

    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&exe)
        .args(["run", "--kernel", path_str(&guest), "--mem", "32M"])
        .env_remove("KILN_LOG")
        .env_remove("RUST_LOG")
        .current_dir(&scratch.0)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running setpriv");
    assert_eq!(
        out.status.code(),
        Some(STATUS_KILN_ERROR),
        "stderr: {}",
        stderr_of(&out)
    );
    assert_one_line(&out, "/dev/kvm");
}

// 11. Exit cost.
#[test]
fn exit_loop_counts_every_exit_and_measures_its_cost() {
    require_kvm!();
    const N: u64 = 20_000;
    let run = |pio: u64, mmio: u64| {
        let mut config = guest_config("exit_loop");
        config.timeout = Some(Duration::from_secs(20));
        config.extra_cmdline = Some(format!("exit_loop.pio={pio} exit_loop.mmio={mmio}"));
        let t0 = Instant::now();
        let (report, _) = run_guest(&config, None);
        let took = t0.elapsed();
        assert_eq!(
            report.outcome,
            VmOutcome::Exited(0),
            "pio={pio} mmio={mmio}"
        );
        // The loops exit exactly P and M times; the exit report is one more MMIO write.
        assert_eq!(report.exits.pio, pio, "{:?}", report.exits);
        assert_eq!(report.exits.mmio, mmio + 1, "{:?}", report.exits);
        took
    };
    let base = run(0, 0);
    let pio = run(N, 0);
    let mmio = run(0, N);
    let per_exit = |t: Duration| t.saturating_sub(base).as_nanos() as f64 / N as f64;
    eprintln!(
        "exit cost: {:.0} ns per PIO exit, {:.0} ns per MMIO exit \
         (N = {N}; baseline run {:.1} ms; debug build: {})",
        per_exit(pio),
        per_exit(mmio),
        base.as_secs_f64() * 1e3,
        cfg!(debug_assertions)
    );
}

/// A library caller can stop a running VM from another thread; dropping the
/// handle of a running VM stops it and joins its threads.
#[test]
fn spawned_vm_stops_on_request_and_on_drop() {
    require_kvm!();
    // `serial_irq` prints "ready" and then waits in `hlt` for input that
    // never comes: running guest code, it would never end by itself.
    let mut config = guest_config("serial_irq");
    config.timeout = None;
    let running = |capture: &common::Capture| {
        let io = kiln::ConsoleIo {
            output: Box::new(capture.clone()),
            input: None,
        };
        let vm = kiln::spawn(config.clone(), io, Instant::now()).unwrap();
        assert!(
            capture.wait_for(b"ready\n", common::HANG_LIMIT),
            "the guest never ran"
        );
        vm
    };
    let vm = running(&common::Capture::default());
    assert!(!vm.is_finished(), "a waiting guest keeps running");
    vm.stop();
    if !common::wait_finished(&vm) {
        std::mem::forget(vm);
        panic!("stop() did not end the VM");
    }
    let report = vm.wait().unwrap();
    assert_eq!(report.outcome, VmOutcome::Stopped);

    // Dropped on another thread, which reports back when the drop returned.
    let vm = running(&common::Capture::default());
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(vm);
        let _ = done_tx.send(());
    });
    assert!(
        done.recv_timeout(common::HANG_LIMIT).is_ok(),
        "dropping the handle did not stop the VM"
    );
}

/// Starts `kiln run` with the `serial_irq` guest (plus `extra` options),
/// its stdio piped, and reads the guest's first line, "ready": from then on
/// the guest waits for input in `hlt`. Returns the child and its stdout.
fn serial_irq_through_kiln(extra: &[&str]) -> (std::process::Child, std::process::ChildStdout) {
    use std::process::Stdio;
    let guest = test_guest("serial_irq");
    let mut child = common::kiln_cli()
        .args(["run", "--kernel", path_str(&guest), "--mem", "32M"])
        .args(["--timeout", "120s"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut ready = [0u8; 6];
    stdout
        .read_exact(&mut ready)
        .expect("the guest's first line");
    assert_eq!(&ready, b"ready\n");
    (child, stdout)
}

/// SIGTERM to the CLI stops the VM cleanly: status 143 and one line on stderr.
#[test]
fn cli_stops_the_vm_on_sigterm() {
    require_kvm!();
    // `serial_irq` prints "ready" once it runs, then waits for input that
    // never comes: the signal arrives while the guest is running.
    let (child, mut stdout) = serial_irq_through_kiln(&[]);
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let mut out = child.wait_with_output().unwrap();
    stdout.read_to_end(&mut out.stdout).unwrap();
    assert_eq!(out.stdout, b"", "nothing after the guest's line");
    assert_eq!(out.status.code(), Some(143));
    assert_one_line(&out, "interrupted by signal 15");
}

/// README: on the classic path (`--vsock`: no agent) kiln's stdin is the
/// guest console, and `-i` changes nothing. `serial_irq` prints "ready",
/// then exits with the first byte it receives on its UART.
#[test]
fn classic_path_stdin_is_the_guest_console_with_or_without_i() {
    use std::io::Write;
    require_kvm!();
    let scratch = Scratch::new("classic-stdin");
    common::hand_to_jail(&scratch.0);
    let socket = scratch.path("v.sock");
    let vsock = format!("cid=3,socket={}", socket.display());
    for (byte, interactive) in [(b'A', false), (b'Z', true)] {
        let mut args = vec!["--vsock", &vsock];
        if interactive {
            args.push("-i");
        }
        let (mut child, mut stdout) = serial_irq_through_kiln(&args);
        // The byte, then end of input.
        child.stdin.take().unwrap().write_all(&[byte]).unwrap();
        let mut out = child.wait_with_output().unwrap();
        stdout.read_to_end(&mut out.stdout).unwrap();
        assert_eq!(
            out.status.code(),
            Some(i32::from(byte)),
            "-i {interactive}: {}",
            stderr_of(&out)
        );
        assert_eq!(out.stdout, b"", "nothing after the guest's line");
        assert!(out.stderr.is_empty(), "{}", stderr_of(&out));
        let _ = fs::remove_file(&socket);
    }
}

/// README: with `KILN_LOG=info` every virtio device logs one line of
/// counters (`name=value` words) when kiln exits: block (named by its
/// file), rng, the console and the agent path's vsock device. A tiny guest
/// drives none of them, so the values are zeros here.
#[test]
fn every_virtio_device_logs_its_counters_at_exit() {
    require_kvm!();
    let scratch = Scratch::new("device-counters");
    let disk = scratch.path("data.img");
    fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let guest = test_guest("hello");
    let out = common::kiln_cli()
        .args(["run", "--kernel", path_str(&guest), "--mem", "32M"])
        .args(["--disk", path_str(&disk), "--rng", "--console", "virtio"])
        .env("KILN_LOG", "info")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(42), "{}", stderr_of(&out));
    let stderr = stderr_of(&out);
    for device in ["block data.img", "rng", "vsock cid 3", "console"] {
        let lines: Vec<&str> = stderr
            .lines()
            .filter_map(|l| l.split_once(&format!("] {device}: ")).map(|(_, c)| c))
            .collect();
        assert_eq!(lines.len(), 1, "{device}: {stderr}");
        let words: Vec<&str> = lines[0].split(' ').collect();
        assert!(words.len() >= 3, "{device}: {}", lines[0]);
        for word in words {
            let value = word.split_once('=').map(|(_, v)| v.parse::<u64>());
            assert!(matches!(value, Some(Ok(0))), "{device}: {word}");
        }
    }
}

/// README: the sandbox builder's `.memory()`, `.vcpus()` and `.timeout()`
/// reach the VM (not only a whole `VmConfig`). Tiny guests never start the
/// agent, so each build ends in the error that shows the setting.
#[test]
fn sandbox_builder_memory_vcpus_and_timeout_reach_the_vm() {
    use kiln::sandbox::{Sandbox, SandboxError};
    require_kvm!();
    // .memory(): 15 MiB is refused as `--mem` is (a default 256 MiB would boot).
    let e = Sandbox::builder()
        .kernel(test_guest("hello"))
        .memory(15 << 20)
        .build()
        .err()
        .expect("15 MiB is refused");
    assert!(
        matches!(&e, SandboxError::Vm(kiln::Error::Config(m)) if m.contains("15728640 bytes is too small")),
        "{e}"
    );
    // .timeout(): a spinning guest ends with the VM's Timeout, not the
    // (longer) boot timeout.
    let e = Sandbox::builder()
        .kernel(test_guest("spin"))
        .memory(32 << 20)
        .timeout(Duration::from_millis(300))
        .boot_timeout(common::HANG_LIMIT)
        .build()
        .err()
        .expect("the VM times out");
    assert!(
        matches!(
            e,
            SandboxError::BootFailed {
                outcome: VmOutcome::Timeout,
                ..
            }
        ),
        "{e}"
    );
    // .vcpus(2): vCPU 1 exists and prints (with one vCPU `ap_start` would
    // wait for it for ever); then the test stops the VM.
    let capture = common::Capture::default();
    let (stopper_tx, stopper) = std::sync::mpsc::channel();
    let builder = Sandbox::builder()
        .kernel(test_guest("ap_start"))
        .memory(32 << 20)
        .vcpus(2)
        .boot_timeout(common::HANG_LIMIT)
        .console_output(Box::new(capture.clone()))
        .on_vm_started(move |s| stopper_tx.send(s).unwrap());
    let booting = std::thread::spawn(move || builder.build().err());
    let stopper = stopper.recv().expect("the VM starts");
    let started = capture.wait_for(b"ap\n", common::HANG_LIMIT);
    stopper.stop(VmOutcome::Stopped);
    let e = booting.join().unwrap().expect("no agent in a tiny guest");
    assert!(started, "vCPU 1 never ran: {e}");
    match e {
        SandboxError::BootFailed {
            outcome: VmOutcome::Stopped,
            output,
            ..
        } => assert!(output.windows(3).any(|w| w == b"ap\n"), "{output:?}"),
        other => panic!("{other}"),
    }
}

/// What a program started now inherits besides stdin, stdout and stderr:
/// (descriptor, what it is), as `ls -l /proc/self/fd` in it shows them
/// (after its exec, so close-on-exec descriptors are gone).
fn inherited_fds() -> Vec<(String, String)> {
    let out = std::process::Command::new("ls")
        .args(["-l", "/proc/self/fd/"])
        .output()
        .expect("running ls");
    assert!(out.status.success(), "ls: {}", stderr_of(&out));
    let mut fds: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let (left, target) = line.split_once(" -> ")?;
            let fd = left.rsplit(' ').next()?;
            Some((fd.to_string(), target.to_string()))
        })
        // stdio, and the directory ls reads.
        .filter(|(fd, target)| !["0", "1", "2"].contains(&fd.as_str()) && !target.ends_with("/fd"))
        .collect();
    fds.sort();
    fds
}

/// Every descriptor kiln opens for a VM (/dev/kvm, the VM and vCPUs, the
/// eventfds of interrupts, queues and the VM's end, the epoll, disks, the
/// vsock listener, pipes) is close-on-exec: a program the embedding process
/// starts while a VM runs inherits none of them.
#[test]
fn a_program_started_while_a_vm_runs_inherits_none_of_its_descriptors() {
    require_kvm!();
    use kiln::config::{ConsoleKind, DiskConfig, VsockConfig};
    let scratch = Scratch::new("cloexec");
    let disk = scratch.path("data.img");
    fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut config = guest_config("serial_irq");
    config.timeout = None;
    config.rng = true;
    config.console = ConsoleKind::Virtio;
    config.disks.push(DiskConfig {
        path: disk,
        read_only: false,
        id: None,
        rate_limit: Default::default(),
    });
    config.vsock = Some(VsockConfig {
        cid: 3,
        socket: scratch.path("vsock.sock"),
    });
    let before = inherited_fds();
    let capture = common::Capture::default();
    let (input, _input_writer) = common::pipe();
    let io = kiln::ConsoleIo {
        output: Box::new(capture.clone()),
        input: Some(input),
    };
    let vm = kiln::spawn(config, io, Instant::now()).unwrap();
    // The guest prints once every device exists and its vCPU runs.
    let ready = capture.wait_for(b"ready\n", common::HANG_LIMIT);
    let during = inherited_fds();
    vm.stop();
    let report = vm.wait().unwrap();
    assert!(ready, "the guest never printed: {:?}", report.outcome);
    assert_eq!(
        during, before,
        "descriptors a program inherits from a running VM"
    );
}

/// An "image root" of `mib` MiB of data (no hole to skip) with an ext
/// superblock magic: what kiln takes for an ext4 image; never booted here.
fn data_image(path: &Path, mib: u64) {
    use std::os::unix::fs::FileExt;
    let file = fs::File::create(path).unwrap();
    let data = vec![1u8; 1 << 20];
    for i in 0..mib {
        file.write_all_at(&data, i << 20).unwrap();
    }
    file.write_all_at(&[0x53, 0xef], 1080).unwrap();
}

/// README: SIGINT and SIGTERM stop kiln in every phase, set-up included.
/// A signal once kiln has made an image root's disk (a big image: nothing
/// of it is copied) ends it with 128+N on both of `kiln run`'s paths, and
/// nothing is left behind: the overlay had no name.
#[test]
fn a_signal_after_the_image_root_is_attached_stops_kiln() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    require_kvm!();
    let scratch = Scratch::new("setup-signal");
    // The --vsock case's socket directory: the jailed kiln's uid writes there.
    common::hand_to_jail(&scratch.0);
    let image = scratch.path("root.img");
    data_image(&image, 512);
    // Never ends by itself: only the signal stops it.
    let guest = test_guest("spin");
    let vsock = format!("cid=3,socket={}", path_str(&scratch.path("v.sock")));
    for (signal, path_args) in [
        (libc::SIGTERM, vec![]),
        (libc::SIGINT, vec!["--vsock", vsock.as_str()]),
    ] {
        let tmp = scratch.path(&format!("tmp-{signal}"));
        fs::create_dir(&tmp).unwrap();
        let mut kiln = common::kiln_cli()
            .args(["run", "--kernel", path_str(&guest), "--mem", "32M"])
            .args(["--rootfs", path_str(&image)])
            .args(&path_args)
            .env("KILN_LOG", "info")
            .env("TMPDIR", &tmp)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(kiln.stderr.take().unwrap());
        let mut log = String::new();
        while !log.contains("copy-on-write, its writes in an unnamed file") {
            if stderr.read_line(&mut log).unwrap() == 0 {
                panic!("kiln ended without attaching the image: {log}");
            }
        }
        // SAFETY: kill(2) on our own child, which has not been waited for.
        assert_eq!(unsafe { libc::kill(kiln.id() as libc::pid_t, signal) }, 0);
        stderr.read_to_string(&mut log).unwrap();
        let status = kiln.wait().unwrap();
        assert_eq!(status.code(), Some(128 + signal), "{path_args:?}: {log}");
        assert!(
            log.contains(&format!("interrupted by signal {signal}")),
            "{path_args:?}: {log}"
        );
        assert!(!log.contains("rootfs: copying"), "{path_args:?}: {log}");
        // The overlay went next to the image (unnamed); the agent path's
        // socket directory went into $TMPDIR: nothing of either is left.
        let left: Vec<_> = fs::read_dir(&tmp).unwrap().collect();
        assert!(left.is_empty(), "{path_args:?} left {left:?}");
        let mut names: Vec<String> = fs::read_dir(&scratch.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| !name.starts_with("tmp-"))
            .collect();
        names.sort();
        assert_eq!(names, ["root.img"], "{path_args:?}");
    }
}

/// README: `--scratch-dir DIR` puts an image root's overlay (the guest's
/// writes) in DIR (default: next to the image); a DIR that cannot take it
/// stops kiln with one line naming it.
#[test]
fn the_overlay_goes_into_scratch_dir() {
    require_kvm!();
    let scratch = Scratch::new("scratch-dir");
    let image = scratch.path("root.img");
    data_image(&image, 1);
    let dir = scratch.path("copies");
    fs::create_dir(&dir).unwrap();
    let guest = test_guest("hello");
    let run = |dir: &Path| {
        common::kiln_cli()
            .args(["run", "--kernel", path_str(&guest), "--mem", "32M"])
            .args(["--rootfs", path_str(&image), "--scratch-dir", path_str(dir)])
            .env("KILN_LOG", "info")
            .output()
            .unwrap()
    };
    let out = run(&dir);
    assert_eq!(out.status.code(), Some(42), "{}", stderr_of(&out));
    let placed = format!(
        "disk {}: copy-on-write, its writes in an unnamed file in {}",
        path_str(&image),
        path_str(&dir)
    );
    assert!(stderr_of(&out).contains(&placed), "{}", stderr_of(&out));
    assert_eq!(
        fs::read_dir(&dir).unwrap().count(),
        0,
        "the overlay has no name"
    );

    let missing = scratch.path("missing");
    let args = ["--scratch-dir", path_str(&missing)];
    let out = common::kiln_cli()
        .args([
            "run",
            "--kernel",
            path_str(&guest),
            "--rootfs",
            path_str(&image),
        ])
        .args(args)
        .output()
        .unwrap();
    assert_refused(
        &out,
        &args,
        &format!("cannot make an overlay file in {}", path_str(&missing)),
    );
}
