//! `--rootfs` with a real guest: a "distribution root" (Debian's
//! busybox-static from resources/guest/build-rootfs.sh plus /etc/os-release,
//! owners, a hard link, a fifo and a decoy /kiln/init) booted as a gzip tar
//! archive through `kiln run`, and as an ext4 image through the sandbox API
//! next to a user disk. Two boots in all (~60 s each on a PVM host); each
//! checks many things. Both check the original is byte-identical afterwards.
//! (A plain tar root boots in tests/linux_boot.rs.)

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    guest_kernel, have_kvm, have_program, is_root, kiln_cli, one_vm, require, run_checked, Scratch,
};
use kiln::config::DiskConfig;
use kiln::sandbox::{Command as SbCommand, ExitStatus, Sandbox, SandboxError};

const OS_RELEASE: &str =
    "PRETTY_NAME=\"Kiln Test Linux 1.0\"\nNAME=\"Kiln Test Linux\"\nID=kilntest\nVERSION_ID=1.0\n";
/// Owner of /etc/owned in the root (kept by tar and mkfs.ext4 -d).
const OWNER: (u32, u32) = (1234, 5678);

/// Whether the owner checks run: they need root (to chown). Without root
/// they are skipped with a message, and under KILN_NO_SKIP=1 (CI, which
/// runs as root) that fails the test instead.
fn owner_checks() -> bool {
    require(is_root(), "root (chown for the owner checks)")
}

/// The distribution root: busybox + applets, /etc/os-release, a file owned
/// by OWNER (with `owners`), a hard link, a fifo and a /kiln/init decoy
/// that kiln's own init must beat.
fn distribution_root(scratch: &Scratch, owners: bool) -> PathBuf {
    let root = scratch.path("root");
    common::build_busybox_root(&root);
    fs::write(root.join("etc/os-release"), OS_RELEASE).unwrap();
    fs::write(root.join("etc/owned"), "owned\n").unwrap();
    if owners {
        std::os::unix::fs::chown(root.join("etc/owned"), Some(OWNER.0), Some(OWNER.1)).unwrap();
    }
    fs::hard_link(root.join("bin/busybox"), root.join("bin/bb-link")).unwrap();
    run_checked(Command::new("mkfifo").arg(root.join("run/fifo")));
    fs::create_dir_all(root.join("kiln")).unwrap();
    fs::write(root.join("kiln/init"), "#!/bin/sh\necho DECOY-INIT\n").unwrap();
    root
}

fn prerequisites(tools: &[&str]) -> bool {
    require(have_kvm(), "/dev/kvm not accessible")
        && require(guest_kernel("vmlinux").is_some(), "guest kernel not built")
        && require(Path::new("/bin/busybox").is_file(), "no /bin/busybox")
        && tools
            .iter()
            .all(|t| require(have_program(t), &format!("no {t} on PATH")))
}

/// What both boots print about the root, one `key=value` per line.
const CHECK_SCRIPT: &str = r#"
cat /etc/os-release
echo "owner=$(stat -c %u:%g /etc/owned)"
set -- $(ls -i /bin/busybox /bin/bb-link)
[ "$1" = "$3" ] && echo hardlink=shared
[ -p /run/fifo ] && echo fifo=yes
echo "kiln_entries=$(ls /kiln 2>/dev/null | tr '\n' ' ')"
echo "root_fs=$(awk '$2 == "/" { print $1 " " $3 }' /proc/mounts)"
echo guest-wrote-this > /root/written && sync && echo "written=$(cat /root/written)"
"#;

fn assert_common(out: &str, is_image: bool, owners: bool) {
    assert!(out.starts_with(OS_RELEASE), "os-release first:\n{out}");
    assert!(!out.contains("DECOY"), "the root's /kiln/init ran:\n{out}");
    let has = |line: &str| out.lines().any(|l| l == line);
    if owners {
        assert!(has(&format!("owner={}:{}", OWNER.0, OWNER.1)), "{out}");
    }
    assert!(has("hardlink=shared"), "{out}");
    assert!(has("fifo=yes"), "{out}");
    assert!(has("written=guest-wrote-this"), "{out}");
    if is_image {
        assert!(has("root_fs=/dev/vda ext4"), "{out}");
        // Only the image's own /kiln (the decoy): the initramfs is out of sight.
        assert!(has("kiln_entries=init "), "{out}");
    } else {
        assert!(has("root_fs=rootfs rootfs"), "{out}");
        // kiln's own entries, not the decoy.
        assert!(has("kiln_entries=agent exec init "), "{out}");
    }
}

/// `kiln run --rootfs root.tar.gz` (a gzip tar with numeric owners, as
/// Alpine's minirootfs comes): output, status, and the archive unchanged;
/// `kiln.root=` words on the command line: the last (empty) one wins.
#[test]
fn tar_gz_root_through_kiln_run() {
    if !prerequisites(&["tar", "gzip", "mkfifo"]) {
        return;
    }
    let owners = owner_checks();
    let scratch = Scratch::new("rootfs-tar");
    let root = distribution_root(&scratch, owners);
    let tarball = scratch.path("root.tar.gz");
    run_checked(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["--numeric-owner", "-czf"])
            .arg(&tarball)
            .arg("."),
    );
    assert_eq!(
        fs::read(&tarball).unwrap()[..2],
        [0x1f, 0x8b],
        "a gzip archive"
    );
    let before = fs::read(&tarball).unwrap();
    let mtime = fs::metadata(&tarball).unwrap().mtime();

    let _vm = one_vm();
    let t = Instant::now();
    let out = kiln_cli()
        .arg("run")
        .arg("--kernel")
        .arg(guest_kernel("vmlinux").unwrap())
        .arg("--rootfs")
        .arg(&tarball)
        // The last kiln.root= wins, and an empty one switches nowhere: with
        // the first, kiln's init would look for a root device that is not
        // there and the command would never run.
        .args(["--cmdline", "kiln.root=/dev/vdz kiln.root="])
        // The check writes in /root, which is root's.
        .args(["--user", "0"])
        .args(["--timeout", "400s", "--", "sh", "-c"])
        .arg(format!("{CHECK_SCRIPT}\nexit 7"))
        .output()
        .expect("running kiln");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "MEASURE tar.gz root boot + command: {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        t.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(7), "the command's status");
    assert_common(&stdout, false, owners);
    assert!(fs::read(&tarball).unwrap() == before, "the archive changed");
    assert_eq!(fs::metadata(&tarball).unwrap().mtime(), mtime);
}

/// The ext4 sandbox's `.output_limit()`: the default of its execs.
const OUTPUT_LIMIT: usize = 1 << 20;

/// `Sandbox::builder().rootfs(root.ext4)` next to a read-only user disk:
/// several execs see the image (and each other's writes), the user disk is
/// vdb, and the image is unchanged and its overlay gone afterwards.
#[test]
fn ext4_root_through_the_sandbox_api() {
    if !prerequisites(&["mkfs.ext4", "mkfifo"]) {
        return;
    }
    let owners = owner_checks();
    let scratch = Scratch::new("rootfs-ext4");
    let root = distribution_root(&scratch, owners);
    let image = scratch.path("root.ext4");
    run_checked(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&root)
            .arg(&image)
            .arg("32M"),
    );
    let data = scratch.path("data.img");
    let marker: Vec<u8> = b"kiln-user-disk!!".repeat(256);
    fs::write(&data, &marker).unwrap();
    let before = fs::read(&image).unwrap();
    let mtime = fs::metadata(&image).unwrap().mtime();

    let _vm = one_vm();
    let t = Instant::now();
    let sandbox = Sandbox::builder()
        .kernel(guest_kernel("vmlinux").unwrap())
        .rootfs(&image)
        .disk(DiskConfig {
            path: data.clone(),
            read_only: true,
            id: Some("userdisk".into()),
            rate_limit: Default::default(),
        })
        .memory(256 << 20)
        .timeout(Duration::from_secs(600))
        .boot_timeout(Duration::from_secs(400))
        .output_limit(OUTPUT_LIMIT)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("MEASURE ext4 root boot to agent: {:?}", t.elapsed());
    let sh = |script: &str| {
        let t = Instant::now();
        let out = sandbox
            // Writes in /root and reads /dev/vdb: root's.
            .exec(SbCommand::new("sh").arg("-c").arg(script).uid(0))
            .unwrap_or_else(|e| panic!("{script}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!(
            "MEASURE exec {:?}: {:?}, {}\n{stdout}{}",
            script.trim().lines().next().unwrap_or_default(),
            t.elapsed(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, stdout)
    };

    let (status, out) = sh(&format!("{CHECK_SCRIPT}\nexit 3"));
    assert_eq!(status, ExitStatus::Code(3));
    assert_common(&out, true, owners);
    // A later exec sees the earlier one's write: one root for the VM.
    let (status, out) =
        sh("cat /root/written; echo again >> /root/written; grep -c . /root/written");
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(out, "guest-wrote-this\n2\n");
    // The image is vda, the user's disk vdb.
    let (status, out) = sh(
        "cat /sys/block/vda/serial; echo; cat /sys/block/vdb/serial; echo; \
         head -c 16 /dev/vdb; echo; cat /sys/block/vdb/ro",
    );
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(out, "kiln-rootfs\nuserdisk\nkiln-user-disk!!\n1\n");
    // exec's working directory and the hostname are as on any root.
    let (_, out) = sh("cd /etc && pwd; hostname");
    assert_eq!(out, "/etc\nkiln\n");
    // kiln's init moved its mounts into the image root: /dev, /proc, /sys
    // and a tmpfs /tmp.
    let (_, out) = sh(
        "for m in /dev /proc /sys /tmp; do awk -v m=$m '$2 == m { print m \" \" $3 }' /proc/mounts; done",
    );
    assert_eq!(out, "/dev devtmpfs\n/proc proc\n/sys sysfs\n/tmp tmpfs\n");

    // The builder's output limit is every exec's default.
    let at_limit = sandbox
        .exec(SbCommand::new("head").args(["-c", &OUTPUT_LIMIT.to_string(), "/dev/zero"]))
        .expect("output at the limit");
    assert_eq!(at_limit.stdout.len(), OUTPUT_LIMIT);
    let over = sandbox
        .exec(SbCommand::new("head").args(["-c", &(OUTPUT_LIMIT + 1).to_string(), "/dev/zero"]))
        .unwrap_err();
    assert!(
        matches!(
            over,
            SandboxError::OutputLimit {
                limit: OUTPUT_LIMIT,
                ..
            }
        ),
        "{over}"
    );

    let outcome = sandbox.shutdown().expect("shutdown");
    eprintln!("MEASURE ext4 root total: {:?} ({outcome:?})", t.elapsed());
    assert!(fs::read(&image).unwrap() == before, "the image changed");
    assert_eq!(fs::metadata(&image).unwrap().mtime(), mtime);
    assert_eq!(fs::read(&data).unwrap(), marker);
    // The overlay had no name and its descriptor is closed.
    let open_deleted: Vec<String> = fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .filter(|p| p.ends_with("(deleted)"))
        .collect();
    assert!(open_deleted.is_empty(), "still open: {open_deleted:?}");
}

/// A --rootfs that is none of the three kinds: one line, status 125, no
/// guest output (no VM is started: the kernel path does not even exist).
#[test]
fn bad_rootfs_is_one_line_and_status_125() {
    let scratch = Scratch::new("rootfs-bad");
    let random = scratch.path("random.bin");
    let bytes: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(&random, bytes).unwrap();
    let empty = scratch.path("empty");
    fs::write(&empty, b"").unwrap();
    let missing = scratch.path("missing.tar");
    for (path, expect) in [
        (
            &random,
            "not a directory, a tar archive (plain or gzip) or an ext2/3/4 image",
        ),
        (
            &empty,
            "not a directory, a tar archive (plain or gzip) or an ext2/3/4 image",
        ),
        (&missing, "No such file or directory"),
    ] {
        let out = kiln_cli()
            .args(["run", "--kernel", "/nonexistent/vmlinux", "--rootfs"])
            .arg(path)
            .args(["--", "true"])
            .output()
            .expect("running kiln");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&format!("rootfs {}: ", path.display())) && stderr.contains(expect),
            "{stderr}"
        );
        assert!(out.stdout.is_empty());
    }
}
