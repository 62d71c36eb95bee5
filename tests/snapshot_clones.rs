//! Snapshots of real Linux guests, through the front ends users have:
//! `kiln snapshot create` and `kiln run --from DIR`, and the sandbox API's
//! `from_snapshot` and `snapshot`. A copy must run commands at once, as
//! its own copy: its own exit status, random state, UUIDs, files and
//! machine id, the host's clock, however old the snapshot, and the
//! hostname, TAPs and MACs asked for it.
//!
//! One boot (`kiln snapshot create`) serves most tests here; each boot
//! costs tens of seconds on an emulating host, a restore a few seconds.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    guest_kernel, guest_rootfs, have_kvm, kiln_cli, one_vm, require, sha256_hex, Scratch,
};
use kiln::sandbox::{Command, Isolation, Sandbox};

/// The guest of every snapshot here waits this long for its agent at most.
const BOOT_TIMEOUT: &str = "600s";
/// How old the snapshot is when a copy's clock is checked (the issue's
/// figure): a copy that kept the snapshot's clock would be this far behind.
const SNAPSHOT_AGE: Duration = Duration::from_secs(60);

fn prerequisites() -> bool {
    require(have_kvm(), "/dev/kvm not accessible")
        && require(
            guest_kernel("vmlinux").is_some(),
            "guest kernel not built (run resources/setup.sh)",
        )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The machine id the shared snapshot's root holds (the busybox root has
/// none: the warm-up writes it, as a distribution's image would carry one).
const SNAPSHOT_MACHINE_ID: &str = "0123456789abcdef0123456789abcdef";
/// The shared snapshot's hostname (`--hostname` at boot).
const SNAPSHOT_HOSTNAME: &str = "snap-host";

/// A snapshot taken by `kiln snapshot create --hostname snap-host` once per
/// test binary: the busybox root, booted to the agent, after a warm-up
/// command that reports its hostname and whether the boot made a machine
/// id (it must not), then leaves a file and a machine id behind. Returns
/// its directory and when it was written.
fn shared_snapshot() -> &'static (PathBuf, Instant) {
    static SNAPSHOT: OnceLock<(PathBuf, Instant)> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("snapshot-{}", std::process::id()))
            .join("ready");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.parent().unwrap()).unwrap();
        let _vm = one_vm();
        let t = Instant::now();
        let warmup = format!(
            "echo warmed > /root/warm; read -r h < /proc/sys/kernel/hostname; \
             if [ -e /etc/machine-id ]; then echo 'the boot made a machine id'; fi; \
             echo {SNAPSHOT_MACHINE_ID} > /etc/machine-id; echo \"warm-up ran on $h\""
        );
        let out = create(
            &dir,
            &["--hostname", SNAPSHOT_HOSTNAME],
            &["--user", "0", "--", "sh", "-c", &warmup],
        );
        eprintln!(
            "MEASURE kiln snapshot create (boot + warm-up + save): {:?}",
            t.elapsed()
        );
        assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
        assert_eq!(
            text(&out.stdout).lines().last(),
            Some(format!("warm-up ran on {SNAPSHOT_HOSTNAME}").as_str()),
            "{}",
            text(&out.stdout)
        );
        assert!(
            !text(&out.stdout).contains("machine id"),
            "{}",
            text(&out.stdout)
        );
        (dir, Instant::now())
    })
}

/// `kiln snapshot create --kernel vmlinux --rootfs busybox EXTRA --output
/// DIR [--warmup WARMUP...]`. The root is given relative to kiln's working
/// directory (its parent), as a user in that directory would: the copies,
/// started elsewhere, find it only if the snapshot names it absolutely.
fn create(dir: &Path, extra: &[&str], warmup: &[&str]) -> Output {
    let rootfs = guest_rootfs();
    let mut cmd = kiln_cli();
    cmd.current_dir(rootfs.parent().unwrap())
        .args(["snapshot", "create", "--kernel"])
        .arg(guest_kernel("vmlinux").unwrap())
        .arg("--rootfs")
        .arg(rootfs.file_name().unwrap())
        .args(["--boot-timeout", BOOT_TIMEOUT])
        .args(extra)
        .arg("--output")
        .arg(dir);
    if !warmup.is_empty() {
        cmd.arg("--warmup").args(warmup);
    }
    cmd.output().expect("running kiln snapshot create")
}

/// `kiln run --from DIR ARGS...`, with `stdin` on kiln's stdin.
fn run_from(dir: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = kiln_cli()
        .arg("run")
        .arg("--from")
        .arg(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kiln run --from");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("waiting for kiln");
    writer.join().unwrap();
    out
}

/// Name, size, mode and content hash of every file in `dir`: a snapshot
/// directory must read the same after any number of restores.
fn listing(dir: &Path) -> Vec<(String, u64, u32, String)> {
    use std::os::unix::fs::MetadataExt;
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            let hash = sha256_hex(&fs::read(e.path()).unwrap());
            (
                e.file_name().to_string_lossy().into_owned(),
                meta.len(),
                meta.mode(),
                hash,
            )
        })
        .collect();
    files.sort();
    files
}

/// What one copy reports about itself, with one program besides the shell
/// (each exec costs a restored guest on an emulating host a second or
/// more): the warm-up's file, 16 random bytes, a UUID, its hostname and
/// machine id, a file of its own in the root, and its own exit status.
const REPORT: &str = "read -r warm < /root/warm; echo \"$warm\"; \
    if [ -e /root/mine ]; then echo 'another copy wrote here'; fi; \
    echo mine > /root/mine; \
    od -An -N16 -tx1 /dev/urandom; \
    read -r uuid < /proc/sys/kernel/random/uuid; echo \"$uuid\"; \
    read -r host < /proc/sys/kernel/hostname; echo \"$host\"; \
    read -r id < /etc/machine-id; echo \"$id\"; \
    exit $COPY";

/// Four copies at once from one snapshot: each runs at once with its own
/// status, sees the warm-up's file but not the other copies' files, draws
/// its own random bytes and UUID, and has a machine id of its own (not the
/// snapshot's); two are given a hostname each (`--hostname`), the other two
/// keep the snapshot's. The snapshot directory is left as it was. Then,
/// with the snapshot a minute old, a copy's clock is the host's, and a
/// copy's stdin reaches its command (`-i`).
#[test]
fn copies_of_one_snapshot_are_independent() {
    if !prerequisites() {
        return;
    }
    let (dir, written) = shared_snapshot();
    let before = listing(dir);
    let names: Vec<_> = before.iter().map(|f| f.0.as_str()).collect();
    assert!(
        names.contains(&"memory") && names.contains(&"vmstate"),
        "{names:?}"
    );
    for (name, _, mode, _) in &before {
        assert_eq!(mode & 0o077, 0, "{name} is readable by others");
    }

    let _vm = one_vm();
    let t = Instant::now();
    let copies: Vec<_> = (0..4)
        .map(|i| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let copy = format!("COPY={i}");
                let hostname = format!("--hostname=copy-{i}");
                let mut args = vec!["--user", "0", "-e", &copy];
                if i < 2 {
                    args.push(&hostname);
                }
                args.extend(["--", "sh", "-c", REPORT]);
                let t = Instant::now();
                let out = run_from(&dir, &args, b"");
                eprintln!(
                    "MEASURE copy {i}: kiln run --from to exit: {:?}",
                    t.elapsed()
                );
                out
            })
        })
        .collect();
    let outputs: Vec<Output> = copies.into_iter().map(|c| c.join().unwrap()).collect();
    eprintln!("MEASURE 4 copies at once: {:?}", t.elapsed());
    let mut randoms = Vec::new();
    let mut uuids = Vec::new();
    let mut machine_ids = Vec::new();
    for (i, out) in outputs.iter().enumerate() {
        let stdout = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(i as i32),
            "copy {i}: {stdout} {}",
            text(&out.stderr)
        );
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 5, "copy {i}: {stdout:?} {}", text(&out.stderr));
        assert_eq!(lines[0], "warmed", "copy {i}");
        let random: String = lines[1].split_whitespace().collect();
        assert_eq!(random.len(), 32, "copy {i}: {stdout:?}");
        assert_eq!(lines[2].len(), 36, "copy {i}: {stdout:?}");
        let hostname = match i {
            0 | 1 => format!("copy-{i}"),
            _ => SNAPSHOT_HOSTNAME.to_string(),
        };
        assert_eq!(lines[3], hostname, "copy {i}'s hostname");
        let id = lines[4];
        assert!(
            id.len() == 32 && id.bytes().all(|c| c.is_ascii_hexdigit()),
            "copy {i}'s machine id {id:?}"
        );
        assert_ne!(
            id, SNAPSHOT_MACHINE_ID,
            "copy {i} kept the snapshot's machine id"
        );
        randoms.push(random);
        uuids.push(lines[2].to_string());
        machine_ids.push(id.to_string());
    }
    for list in [&randoms, &uuids, &machine_ids] {
        let mut unique = list.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            list.len(),
            "copies drew the same values: {list:?}"
        );
    }

    // The clock: a copy started a minute after the snapshot must not be a
    // minute behind (the snapshot's guest clock stood still meanwhile).
    if let Some(rest) = SNAPSHOT_AGE.checked_sub(written.elapsed()) {
        std::thread::sleep(rest); // ageing the snapshot, not waiting for an event
    }
    let host_s = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let host_before = host_s();
    let out = run_from(
        dir,
        &["-i", "--", "sh", "-c", "date +%s; cat"],
        b"stdin reaches the copy\n",
    );
    let host_after = host_s();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout} {}", text(&out.stderr));
    let mut lines = stdout.lines();
    let guest_s: f64 = lines.next().unwrap().parse().unwrap();
    assert!(
        guest_s >= host_before.floor() - 1.0 && guest_s <= host_after + 1.0,
        "guest clock {guest_s}, host {host_before}..{host_after} (snapshot {:?} old)",
        written.elapsed()
    );
    assert_eq!(lines.next(), Some("stdin reaches the copy"));
    assert_eq!(
        listing(dir),
        before,
        "a restore changed the snapshot directory"
    );
}

/// `cat` started with `spawn` gets `line` on its stdin and gives it back.
fn cat_through_spawn(sandbox: &Sandbox, line: &str) {
    let mut cat = sandbox.spawn(Command::new("cat").stdin_piped()).unwrap();
    let mut stdin = cat.stdin().unwrap();
    stdin.write_all(line.as_bytes()).unwrap();
    drop(stdin);
    let mut got = String::new();
    std::io::Read::read_to_string(&mut cat.stdout().unwrap(), &mut got).unwrap();
    assert_eq!(got, line);
    assert!(cat.wait().unwrap().success());
}

/// `sandbox.pause()` with a command spinning in the guest: the vCPUs stop
/// using the CPU (no tick over a second, after `check_paused` ran),
/// a second pause is refused, and after `resume` they run again.
fn pause_stops_the_guest(sandbox: &Sandbox, check_paused: impl FnOnce()) {
    let spin = sandbox
        .spawn(Command::new("sh").args(["-c", "while :; do :; done"]))
        .unwrap();
    common::vcpus_run_after(None, common::vcpu_ticks(None), "spinning");
    sandbox.pause().unwrap_or_else(|e| panic!("{e}"));
    let e = sandbox.pause().unwrap_err().to_string();
    assert!(e.contains("the VM is already paused"), "{e}");
    check_paused();
    let paused = common::vcpu_ticks(None);
    // An absence over a window: the spinning guest used ~100 ticks a second.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(common::vcpu_ticks(None), paused, "a paused vCPU ran");
    sandbox.resume().unwrap_or_else(|e| panic!("{e}"));
    let e = sandbox.resume().unwrap_err().to_string();
    assert!(e.contains("the VM is not paused"), "{e}");
    common::vcpus_run_after(None, paused, "resumed");
    spin.kill().unwrap();
}

/// The sandbox API: a sandbox restored from the snapshot (in a kiln
/// process of its own, the default, jailed) with a hostname of its own
/// (`.hostname(..)`) serves `exec` and `spawn` with
/// stdin, is snapshotted live while idle with `Sandbox::snapshot` (its
/// jailed process saves into the directory the sandbox opened), still
/// serves `exec` after that pause, refuses a second snapshot into the same
/// directory, and that snapshot restores in a process of its own, with
/// `kiln run --from` and in this process. An in-process sandbox is snapshotted too, runs on, and a
/// sandbox restored from that snapshot holds what it had written before.
/// A sandbox whose VM process has ended gets an error from `snapshot`,
/// not a wait. Both kinds pause and resume (`Sandbox::pause`): a command
/// spinning in the guest stops using the CPU, and a snapshot of the paused
/// in-process one leaves it paused.
#[test]
fn sandboxes_start_from_snapshots_and_take_them() {
    if !prerequisites() {
        return;
    }
    let (dir, _) = shared_snapshot();
    let _vm = one_vm();
    let scratch = Scratch::new("snapshot-live");
    let t = Instant::now();
    let sandbox = Sandbox::builder()
        .from_snapshot(dir)
        .hostname("sandbox-copy")
        .kiln_binary(env!("CARGO_BIN_EXE_kiln"))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "MEASURE Sandbox::builder().from_snapshot(..).build(): {:?}",
        t.elapsed()
    );
    let out = sandbox
        .exec(Command::new("cat").args(["/root/warm", "/proc/sys/kernel/hostname"]))
        .unwrap();
    assert_eq!(
        (out.status.code(), text(&out.stdout).as_str()),
        (Some(0), "warmed\nsandbox-copy\n")
    );
    cat_through_spawn(&sandbox, "through spawn\n");

    // Snapshotted while idle, in its own (jailed) process.
    // Bounded: a VM left paused fails the test instead of hanging it.
    let write = |line: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("echo {line} >> /tmp/live; cat /tmp/live"))
            .uid(0)
            .timeout(Duration::from_secs(120))
    };
    assert!(sandbox.exec(write("process")).unwrap().status.success());
    let from_process = scratch.path("from-process");
    let report = sandbox
        .snapshot(&from_process)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "MEASURE Sandbox::snapshot, VM in its own process: paused in {:?}, saved in {:?}, state {} bytes",
        report.pause, report.total, report.state_bytes
    );
    assert_eq!(
        report.memory_bytes,
        fs::metadata(from_process.join("memory")).unwrap().len()
    );
    let saved = listing(&from_process);
    let names: Vec<_> = saved.iter().map(|f| f.0.as_str()).collect();
    assert_eq!(names, ["memory", "vmstate"]);
    assert_eq!(
        saved[1].1, report.state_bytes,
        "the report's state size is the file's"
    );
    for (name, _, mode, _) in &saved {
        assert_eq!(mode & 0o077, 0, "{name} is readable by others");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(&from_process).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "the snapshot directory is its owner's");
    // The saved configuration names the host's paths, not the jail's.
    let state = text(&fs::read(from_process.join("vmstate")).unwrap());
    assert!(!state.contains("/.kiln/"), "the jail's paths were saved");
    // The pause did not break it; it runs on, and what it does now is
    // not in the snapshot.
    let out = sandbox.exec(write("after")).unwrap();
    assert_eq!(text(&out.stdout), "process\nafter\n");
    // A snapshot already there is refused, as for a VM in this process, and
    // left as it was; the sandbox runs on.
    let e = sandbox.snapshot(&from_process).unwrap_err().to_string();
    assert!(
        e.contains(&format!("{}", from_process.join("memory").display()))
            && e.contains("File exists"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    assert_eq!(listing(&from_process), saved, "a refused save changed it");
    let out = sandbox.exec(Command::new("cat").arg("/tmp/live")).unwrap();
    assert_eq!(text(&out.stdout), "process\nafter\n");
    pause_stops_the_guest(&sandbox, || {});
    assert_eq!(
        text(
            &sandbox
                .exec(Command::new("cat").arg("/tmp/live"))
                .unwrap()
                .stdout
        ),
        "process\nafter\n"
    );
    sandbox.shutdown().unwrap();

    // It restores in a process of its own (exec, spawn with stdin) ...
    let copy = Sandbox::builder()
        .from_snapshot(&from_process)
        .kiln_binary(env!("CARGO_BIN_EXE_kiln"))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let out = copy.exec(Command::new("cat").arg("/tmp/live")).unwrap();
    assert_eq!(text(&out.stdout), "process\n");
    cat_through_spawn(&copy, "into the copy\n");
    // ... and once its VM process has ended, a snapshot fails at once
    // (the process's end of the control channel is closed) and leaves
    // nothing behind.
    copy.stopper()
        .expect("a VM")
        .stop(kiln::VmOutcome::Interrupted(15));
    let gone = scratch.path("gone");
    let e = copy.snapshot(&gone).unwrap_err().to_string();
    assert!(e.contains("VM process ended"), "{e}");
    assert!(!gone.exists(), "a failed snapshot left {}", gone.display());
    let _ = copy.shutdown();

    // ... with `kiln run --from` ...
    let out = run_from(&from_process, &["--", "cat", "/tmp/live"], b"");
    assert_eq!(
        (out.status.code(), text(&out.stdout).as_str()),
        (Some(0), "process\n"),
        "{}",
        text(&out.stderr)
    );
    // ... and in this process.
    let copy = Sandbox::builder()
        .from_snapshot(&from_process)
        .isolation(Isolation::InProcess)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let out = copy.exec(Command::new("cat").arg("/tmp/live")).unwrap();
    assert_eq!(text(&out.stdout), "process\n");

    // A VM in this process is snapshotted the same way; one taken while
    // the sandbox is paused leaves it paused.
    let second = scratch.path("second");
    let mut report = None;
    pause_stops_the_guest(&copy, || {
        report = Some(copy.snapshot(&second).unwrap_or_else(|e| panic!("{e}")));
    });
    let report = report.unwrap();
    eprintln!(
        "MEASURE Sandbox::snapshot, VM in this process: paused in {:?}, saved in {:?}, state {} bytes",
        report.pause, report.total, report.state_bytes
    );
    let out = copy.exec(write("in-process")).unwrap();
    assert_eq!(text(&out.stdout), "process\nin-process\n");
    copy.shutdown().unwrap();

    let restored = Sandbox::builder()
        .from_snapshot(&second)
        .isolation(Isolation::InProcess)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let out = restored.exec(Command::new("cat").arg("/tmp/live")).unwrap();
    assert_eq!(text(&out.stdout), "process\n");
    restored.shutdown().unwrap();
}

/// What `kiln snapshot create` and `kiln run --from` refuse: one line
/// naming the problem, status 125, and a snapshot directory left as it was.
#[test]
fn bad_snapshot_input_is_one_line_and_125() {
    let scratch = Scratch::new("snapshot-bad");
    let one_line = |out: &Output, needle: &str| {
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "expected {needle:?} in {stderr:?}");
    };
    let missing = scratch.path("missing");
    one_line(&run_from(&missing, &["--", "true"], b""), "missing");
    one_line(
        &run_from(&missing, &["--mem", "1G", "--", "true"], b""),
        "--mem",
    );
    one_line(
        &run_from(&missing, &["--kernel", "k", "--", "true"], b""),
        "--kernel",
    );

    let full = scratch.path("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("keep"), b"mine").unwrap();
    let mut cmd = kiln_cli();
    cmd.args(["snapshot", "create", "--kernel", "k", "--output"])
        .arg(&full);
    one_line(&cmd.output().unwrap(), "not empty");
    assert_eq!(fs::read(full.join("keep")).unwrap(), b"mine");

    let disk = scratch.path("disk.img");
    fs::write(&disk, [0u8; 4096]).unwrap();
    let mut cmd = kiln_cli();
    cmd.args(["snapshot", "create", "--kernel", "k", "--disk"])
        .arg(&disk)
        .arg("--output")
        .arg(scratch.path("out"));
    one_line(&cmd.output().unwrap(), "ro");

    let mut cmd = kiln_cli();
    cmd.args(["snapshot", "create", "--kernel", "k", "--output"])
        .arg(scratch.path("out2"))
        .args(["--", "true"]);
    one_line(&cmd.output().unwrap(), "--warmup");

    // Shared directories: refused before anything starts (no
    // virtiofsd, no boot, no output directory).
    let shared = scratch.path("shared");
    fs::create_dir(&shared).unwrap();
    for (option, value, needle) in [
        (
            "--share",
            format!("{}:/mnt", shared.display()),
            format!(
                "a VM with shared directories (--share {}) cannot be snapshotted",
                shared.display()
            ),
        ),
        (
            "--rootfs",
            format!("{},share", shared.display()),
            format!(
                "a VM with a shared root (--rootfs {},share) cannot be snapshotted",
                shared.display()
            ),
        ),
    ] {
        let out = scratch.path("out-shared");
        let mut cmd = kiln_cli();
        cmd.args([
            "snapshot", "create", "--kernel", "k", option, &value, "--output",
        ])
        .arg(&out);
        one_line(&cmd.output().unwrap(), &needle);
        assert!(!out.exists(), "{option}: the output directory was made");
    }
}

/// A snapshot of two vCPUs with an ext4 image root and a read-only data
/// disk, through the CLI with the jail and seccomp on: the warm-up's write
/// to the image root (its copy-on-write overlay, saved in the snapshot) is
/// in every copy, a copy's own writes are not in the next, both vCPUs run,
/// the data disk reads back, and the image and the snapshot stay as they were.
#[test]
fn image_root_disk_and_two_cpus() {
    if !prerequisites() || !require(common::have_program("mkfs.ext4"), "mkfs.ext4 missing") {
        return;
    }
    let scratch = Scratch::new("snapshot-image");
    let image = scratch.path("root.ext4");
    common::run_checked(
        std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(guest_rootfs())
            .arg(&image)
            .arg("64M"),
    );
    let data = scratch.path("data.img");
    fs::write(&data, b"kiln-data-disk!!".repeat(256)).unwrap();
    let image_before = sha256_hex(&fs::read(&image).unwrap());
    let dir = scratch.path("snap");

    let _vm = one_vm();
    let t = Instant::now();
    let mut cmd = kiln_cli();
    cmd.args(["snapshot", "create", "--kernel"])
        .arg(guest_kernel("vmlinux").unwrap())
        .arg("--rootfs")
        .arg(&image)
        .arg("--disk")
        .arg(format!("{},ro", data.display()))
        .args(["--cpus", "2", "--boot-timeout", BOOT_TIMEOUT, "--output"])
        .arg(&dir)
        .args([
            "--warmup",
            "--user",
            "0",
            "--",
            "sh",
            "-c",
            "echo warm > /root/warm; sync",
        ]);
    let out = cmd.output().unwrap();
    eprintln!(
        "MEASURE snapshot create, image root, 2 vCPUs: {:?}",
        t.elapsed()
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let names: Vec<_> = listing(&dir).into_iter().map(|f| f.0).collect();
    assert!(names.iter().any(|n| n.ends_with(".overlay")), "{names:?}");
    let before = listing(&dir);

    let script = "read -r w < /root/warm; echo \"$w\"; \
        if [ -e /root/mine ]; then echo 'another copy wrote here'; fi; \
        echo mine > /root/mine; sync; \
        grep -c ^processor /proc/cpuinfo; \
        head -c 16 /dev/vdb";
    for copy in 0..2 {
        let out = run_from(&dir, &["--user", "0", "--", "sh", "-c", script], b"");
        assert_eq!(
            (out.status.code(), text(&out.stdout).as_str()),
            (Some(0), "warm\n2\nkiln-data-disk!!"),
            "copy {copy}: {}",
            text(&out.stderr)
        );
    }
    assert_eq!(
        sha256_hex(&fs::read(&image).unwrap()),
        image_before,
        "the image changed"
    );
    assert_eq!(
        listing(&dir),
        before,
        "a restore changed the snapshot directory"
    );
}

/// The snapshot's TAP and its guest's address, in the test's namespace.
const SNAP_TAP: &str = "snap0";
/// The TAPs the two copies move to; each has a network of its own.
const COPY_TAPS: [&str; 2] = ["copya", "copyb"];
/// The new MAC the first copy takes (the second keeps the snapshot's).
const COPY_A_MAC: &str = "02:6b:69:6c:6e:0a";

/// `kiln ARGS...` inside `ns`, quiet, stdio piped.
fn kiln_in(ns: &common::Netns, args: &[&str]) -> std::process::Command {
    let mut cmd = ns.exec([env!("CARGO_BIN_EXE_kiln")]);
    cmd.args(args)
        .env_remove("KILN_LOG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// The MAC the namespace has learnt for `ip` on `tap` (from the guest's
/// own frames: its ARP request).
fn neighbour_mac(ns: &common::Netns, ip: &str, tap: &str) -> Option<String> {
    let out = common::run_checked(&mut ns.exec(["ip", "neigh", "show", ip, "dev", tap]));
    let text = text(&out.stdout);
    let mut words = text.split_whitespace();
    words.find(|w| *w == "lladdr")?;
    words.next().map(str::to_string)
}

/// A snapshot with a read-only disk and a TAP, in a network namespace of
/// the test's own (every TAP and peer in it): the guest pings its peer
/// before the snapshot. Two copies then run at once, each moved to a TAP
/// of its own (`--net tap=...`), the first with a new MAC, the second
/// keeping the snapshot's: each takes an address on its TAP's network,
/// pings its peer there and reads the disk, and the MAC the guest shows is
/// the one the namespace learnt from its frames while the copy ran (the
/// new one, or the snapshot's). A `--net` count that does not fit the
/// snapshot and a TAP that does not exist are one line and status 125.
#[test]
fn a_snapshot_with_a_disk_and_a_tap_restores_on_other_taps() {
    if !prerequisites()
        || !require(common::is_root(), "needs root (network namespace, TAP)")
        || !require(common::have_program("ip"), "iproute2 'ip' not installed")
        || !require(
            Path::new("/dev/net/tun").exists(),
            "/dev/net/tun does not exist",
        )
    {
        return;
    }
    let ns = common::Netns::create(
        "snap-net",
        &[
            "ip tuntap add dev snap0 mode tap",
            "ip addr add 10.0.3.1/24 dev snap0",
            "ip link set snap0 up",
            "ip tuntap add dev copya mode tap",
            "ip addr add 10.0.4.1/24 dev copya",
            "ip link set copya up",
            "ip tuntap add dev copyb mode tap",
            "ip addr add 10.0.5.1/24 dev copyb",
            "ip link set copyb up",
        ],
    );
    let scratch = Scratch::new("snapshot-net");
    let data = scratch.path("data.img");
    fs::write(&data, b"kiln-data-disk!!".repeat(256)).unwrap();
    let dir = scratch.path("snap");
    let kernel = guest_kernel("vmlinux").unwrap();
    let root = guest_rootfs();

    let _vm = one_vm();
    let t = Instant::now();
    let warmup = "ping -c 1 -W 30 10.0.3.1 > /dev/null && echo ping-ok; \
        cat /sys/class/net/eth0/address";
    let create = kiln_in(&ns, &["snapshot", "create", "--kernel"])
        .arg(&kernel)
        .arg("--rootfs")
        .arg(&root)
        .arg("--disk")
        .arg(format!("{},ro", data.display()))
        .args(["--net", &format!("tap={SNAP_TAP}")])
        .args(["--cmdline", "ip=10.0.3.2::10.0.3.1:255.255.255.0::eth0:off"])
        .args(["--boot-timeout", BOOT_TIMEOUT, "--output"])
        .arg(&dir)
        .args(["--warmup", "--user", "0", "--", "sh", "-c", warmup])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    eprintln!(
        "MEASURE snapshot create with a TAP and a disk: {:?}",
        t.elapsed()
    );
    let stdout = text(&create.stdout);
    assert_eq!(
        create.status.code(),
        Some(0),
        "{stdout} {}",
        text(&create.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let ping_at = lines.iter().position(|l| *l == "ping-ok");
    let snapshot_mac = ping_at
        .and_then(|i| lines.get(i + 1))
        .unwrap_or_else(|| panic!("the warm-up did not reach its peer: {stdout}"))
        .to_string();
    assert_ne!(snapshot_mac, COPY_A_MAC);

    // Both copies at once: each pings its peer, then waits (on its stdin)
    // while the test reads what the namespace learnt of its MAC.
    let script = |net: u8| {
        format!(
            "ip addr flush dev eth0 && ip addr add 10.0.{net}.2/24 dev eth0 && \
             ping -c 1 -W 30 10.0.{net}.1 > /dev/null && echo ping-ok; \
             read -r go; cat /sys/class/net/eth0/address; head -c 16 /dev/vda"
        )
    };
    let t = Instant::now();
    let copies: Vec<(std::process::Child, u8, &str, String)> = [
        (
            4,
            COPY_TAPS[0],
            format!("tap={},mac={COPY_A_MAC}", COPY_TAPS[0]),
            COPY_A_MAC.to_string(),
        ),
        (
            5,
            COPY_TAPS[1],
            format!("tap={}", COPY_TAPS[1]),
            snapshot_mac.clone(),
        ),
    ]
    .into_iter()
    .map(|(net, tap, option, mac)| {
        let child = kiln_in(&ns, &["run", "--from"])
            .arg(&dir)
            .args([
                "--net",
                &option,
                "-i",
                "--user",
                "0",
                "--",
                "sh",
                "-c",
                &script(net),
            ])
            .spawn()
            .unwrap();
        (child, net, tap, mac)
    })
    .collect();
    for (mut child, net, tap, mac) in copies {
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        // (Anything the guest console printed before the agent was up
        // comes first.)
        let mut first = String::new();
        while first != "ping-ok\n" {
            first.clear();
            if std::io::BufRead::read_line(&mut stdout, &mut first).unwrap() == 0 {
                break;
            }
        }
        let ip = format!("10.0.{net}.2");
        let learnt = neighbour_mac(&ns, &ip, tap);
        drop(child.stdin.take()); // the copy goes on
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            (out.status.code(), first.as_str(), rest.as_str()),
            (
                Some(0),
                "ping-ok\n",
                format!("{mac}\nkiln-data-disk!!").as_str()
            ),
            "the copy on {tap}: {}",
            text(&out.stderr)
        );
        assert_eq!(
            learnt.as_deref(),
            Some(mac.as_str()),
            "the MAC on {tap}'s wire"
        );
    }
    eprintln!("MEASURE 2 copies on other TAPs: {:?}", t.elapsed());

    let before = listing(&dir);
    for (args, needle) in [
        (
            vec!["--net", "tap=copya", "--net", "tap=copyb"],
            "the snapshot has 1 network card(s), 2 given",
        ),
        (vec!["--net", "tap=nosuch0"], "'nosuch0' does not exist"),
    ] {
        let out = kiln_in(&ns, &["run", "--from"])
            .arg(&dir)
            .args(&args)
            .args(["--", "true"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr:?}");
        assert!(out.stdout.is_empty(), "{args:?}: the guest ran");
    }
    assert_eq!(
        listing(&dir),
        before,
        "a restore changed the snapshot directory"
    );
    drop(ns);
}
