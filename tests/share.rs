//! Host directories shared with a real Linux guest (virtio-fs, the real
//! virtiofsd), in one boot: a host file read in the guest, a file the
//! guest writes seen on the host byte for byte, a read-only share that
//! refuses writes in the guest (even remounted read-write there: virtiofsd
//! enforces it) with its host files unchanged, two shares at once. The
//! sandbox API's `.share()`; virtiofsd killed under a running guest. Plus
//! the `--share` errors, which need no boot.

mod common;

use std::fs;
use std::path::Path;

use common::{guest_kernel, guest_rootfs, kiln_cli, require, sha256_hex, Scratch};

const TIMEOUT: &str = "1200s";

const GUEST_SCRIPT: &str = r#"
echo "host_file=$(cat /mnt/rw/from-host.txt)"
seq 1 200000 | head -c 1048576 > /mnt/rw/deep/dir/pattern.bin && sync && echo write_rw=ok
echo "guest_sha=$(sha256sum /mnt/rw/deep/dir/pattern.bin | cut -d' ' -f1)"
echo "ro_file=$(cat /srv/ro/keep.txt)"
grep -q ' /srv/ro virtiofs ro' /proc/mounts && echo ro_mount=ro
if echo new > /srv/ro/new.txt 2>/dev/null; then echo ro_create=succeeded; else echo ro_create=failed; fi
if echo more >> /srv/ro/keep.txt 2>/dev/null; then echo ro_append=succeeded; else echo ro_append=failed; fi
mount -o remount,rw /srv/ro && echo remount_rw=ok
if echo new > /srv/ro/new.txt 2>/dev/null; then echo rw_remount_create=succeeded; else echo rw_remount_create=failed; fi
echo through > /rw-file && echo rw_root_write=ok
grep -q '^kiln-share2 / virtiofs rw' /proc/mounts && echo rw_root_mount=rw
echo done=1
"#;

fn have_virtiofsd() -> bool {
    require(
        kiln::share::find_virtiofsd(None).is_ok(),
        "virtiofsd not installed (run resources/setup.sh)",
    )
}

/// One boot with a writable and a read-only share, on a read-write shared
/// root (`--rootfs DIR,share,rw`: `/` is the share itself, the guest's
/// write is on the host). The root's tag follows the two shares'.
#[test]
fn guest_reads_and_writes_shared_directories() {
    if !common::real_kernel_prerequisites(&[]) || !have_virtiofsd() {
        return;
    }
    let _one = common::one_vm();
    let scratch = Scratch::new("share-guest");
    let root = scratch.path("root");
    common::build_busybox_root(&root);
    let rw = scratch.path("rw");
    let ro = scratch.path("ro");
    fs::create_dir_all(rw.join("deep/dir")).unwrap();
    fs::create_dir_all(&ro).unwrap();
    fs::write(rw.join("from-host.txt"), "written-on-the-host\n").unwrap();
    fs::write(ro.join("keep.txt"), "read-only-content\n").unwrap();

    let out = kiln_cli()
        .arg("run")
        .arg("--kernel")
        .arg(guest_kernel("vmlinux").unwrap())
        .arg("--rootfs")
        .arg(format!("{},share,rw", root.display()))
        .args(["--timeout", TIMEOUT])
        .arg("--share")
        .arg(format!("{}:/mnt/rw", rw.display()))
        .arg("--share")
        .arg(format!("{}:/srv/ro,ro,cache=never", ro.display()))
        // Writing a root-owned directory, remounting: root in the guest.
        .args(["--user", "0"])
        .args(["--", "sh", "-c", GUEST_SCRIPT])
        .output()
        .expect("running kiln");
    let kv = common::guest_report(&out);
    let get = |k: &str| kv.get(k).map(String::as_str).unwrap_or("<missing>");
    assert_eq!(out.status.code(), Some(0), "guest script status");
    assert_eq!(get("done"), "1");

    // Host to guest, and guest to host byte for byte.
    assert_eq!(get("host_file"), "written-on-the-host");
    assert_eq!(get("write_rw"), "ok");
    let pattern = common::seq_pattern();
    assert_eq!(get("guest_sha"), sha256_hex(&pattern));
    let written = fs::read(rw.join("deep/dir/pattern.bin")).unwrap();
    assert!(
        written == pattern,
        "the host sees other bytes than the guest wrote"
    );

    // Read-only: readable, mounted ro, no write gets through, not even
    // after the guest remounts it read-write (virtiofsd --readonly).
    assert_eq!(get("ro_file"), "read-only-content");
    assert_eq!(get("ro_mount"), "ro");
    assert_eq!(get("ro_create"), "failed");
    assert_eq!(get("ro_append"), "failed");
    assert_eq!(get("remount_rw"), "ok");
    assert_eq!(get("rw_remount_create"), "failed");
    assert_eq!(
        fs::read_to_string(ro.join("keep.txt")).unwrap(),
        "read-only-content\n"
    );
    let names: Vec<_> = fs::read_dir(&ro)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["keep.txt"], "the read-only share changed");

    // The read-write shared root: `/` is the share, mounted rw, and the
    // guest's write is on the host.
    assert_eq!(get("rw_root_mount"), "rw", "/ is not the rw virtio-fs root");
    assert_eq!(
        get("rw_root_write"),
        "ok",
        "writing / of the rw shared root"
    );
    assert_eq!(
        fs::read_to_string(root.join("rw-file")).unwrap(),
        "through\n",
        "the rw shared root's write is not on the host"
    );
}

const SHARED_ROOT_SCRIPT: &str = r#"
echo "marker=$(cat /etc/kiln-marker)"
ls / | grep -qx big.bin && echo ls_root=ok
grep -q '^overlay / overlay ' /proc/mounts && echo root_mount=overlay
echo "big_sha=$(sha256sum /big.bin | cut -d' ' -f1)"
echo guest-wrote > /newfile && mkdir -p /root && echo in-root > /root/x && echo write=ok
echo "newfile=$(cat /newfile)"
echo "root_x=$(cat /root/x)"
echo done=1
"#;

/// 16 MiB that differ from block to block (xorshift), for a hash check:
/// well over one FUSE request's worth, and cheap enough on a host that
/// emulates the guest's FUSE path (64 MiB took ~3 minutes on PVM).
fn big_pattern() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..(16 << 20) / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// A root booted from a shared busybox directory (`--rootfs DIR,share`):
/// the command runs in it, reads a marker and a 16 MiB file (hash equal
/// to the host's) through the share; its writes are seen by later
/// commands in the VM (a RAM overlay) and the host directory is left as it
/// was. (`,share,rw` boots in `guest_reads_and_writes_shared_directories`.)
#[test]
fn a_shared_root_runs_commands_and_keeps_the_host_directory() {
    if !common::real_kernel_prerequisites(&[]) || !have_virtiofsd() {
        return;
    }
    let _one = common::one_vm();
    let scratch = Scratch::new("share-root");
    let root = scratch.path("root");
    common::build_busybox_root(&root);
    fs::write(root.join("etc/kiln-marker"), "shared-root-marker\n").unwrap();
    let big = big_pattern();
    fs::write(root.join("big.bin"), &big).unwrap();
    let before = common::tree_listing(&root);

    let out = kiln_cli()
        .arg("run")
        .arg("--kernel")
        .arg(guest_kernel("vmlinux").unwrap())
        .arg("--rootfs")
        .arg(format!("{},share", root.display()))
        .args(["--timeout", TIMEOUT])
        .args(["--user", "0"])
        .args(["--", "sh", "-c", SHARED_ROOT_SCRIPT])
        .output()
        .expect("running kiln");
    let kv = common::guest_report(&out);
    let get = |k: &str| kv.get(k).map(String::as_str).unwrap_or("<missing>");
    assert_eq!(out.status.code(), Some(0), "guest script status");
    assert_eq!(get("done"), "1");
    assert_eq!(
        common::tree_listing(&root),
        before,
        "the read-only shared root changed on the host"
    );
    assert_eq!(get("marker"), "shared-root-marker");
    assert_eq!(get("ls_root"), "ok");
    assert_eq!(get("root_mount"), "overlay");
    assert_eq!(get("big_sha"), sha256_hex(&big));
    assert_eq!(get("write"), "ok");
    assert_eq!(get("newfile"), "guest-wrote");
    assert_eq!(get("root_x"), "in-root");
}

/// The pids of the virtiofsd processes whose command line mentions `dir`.
fn virtiofsd_serving(dir: &Path) -> Vec<i32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "virtiofsd")
                && fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
        })
        .collect()
}

/// The sandbox builder's `.shared_rootfs()` and `.share()` in one sandbox
/// (the VM in its own jailed process, the default isolation): kiln's agent
/// runs from the initramfs after the switch into the shared root, commands
/// read the root's files and write to its RAM overlay, and the host
/// directory is left as it was; commands see the shares (a ro and a rw
/// one), the host sees what they write, and the shares' virtiofsd
/// processes end with the sandbox.
#[test]
fn sandbox_boots_a_shared_root_with_shares() {
    use kiln::config::{RootShare, ShareConfig};
    use kiln::sandbox::{Command, Sandbox};
    if !common::real_kernel_prerequisites(&[]) || !have_virtiofsd() {
        return;
    }
    let _one = common::one_vm();
    let scratch = Scratch::new("share-sandbox");
    let root = scratch.path("root");
    common::build_busybox_root(&root);
    fs::write(root.join("etc/kiln-marker"), "sandbox-root\n").unwrap();
    let before = common::tree_listing(&root);
    let (data, out) = (scratch.path("data"), scratch.path("out"));
    fs::create_dir_all(&data).unwrap();
    fs::create_dir_all(&out).unwrap();
    fs::write(data.join("in.txt"), "host-data\n").unwrap();
    let share = |dir: &Path, rest: &str| -> ShareConfig {
        format!("{}:{rest}", dir.display()).parse().unwrap()
    };
    let sandbox = Sandbox::builder()
        .kernel(guest_kernel("vmlinux").unwrap())
        .shared_rootfs(&root, RootShare::Overlay)
        .timeout(std::time::Duration::from_secs(1200))
        .boot_timeout(std::time::Duration::from_secs(600))
        .share(share(&data, "/data,ro"))
        .share(share(&out, "/out"))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    // virtiofsd's namespace sandbox is a parent and a child per share.
    let (data_daemon, out_daemon) = (virtiofsd_serving(&data), virtiofsd_serving(&out));
    assert!(
        !data_daemon.is_empty() && !out_daemon.is_empty(),
        "a virtiofsd per share"
    );
    let daemons = [data_daemon, out_daemon].concat();

    // The shared root, under its overlay.
    let result = sandbox
        .exec(
            Command::new("sh")
                .arg("-c")
                .arg("cat /etc/kiln-marker; echo written > /etc/new && cat /etc/new && grep -c '^overlay / overlay ' /proc/mounts")
                .uid(0),
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&result.stdout),
        "sandbox-root\nwritten\n1\n",
        "the sandbox's shared root"
    );

    // The shares.
    let result = sandbox
        .exec(
            Command::new("sh")
                .arg("-c")
                .arg("cat /data/in.txt; echo via-sandbox > /out/result.txt")
                .uid(0),
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&result.stdout),
        "host-data\n",
        "the sandbox's ro share"
    );
    assert_eq!(
        fs::read_to_string(out.join("result.txt")).unwrap(),
        "via-sandbox\n",
        "the sandbox's rw share"
    );

    // No snapshot of a VM with shares (the save refuses it; the VM runs
    // on). With shares and a shared root, the refusal names the shares.
    let err = sandbox
        .snapshot(scratch.path("snap"))
        .expect_err("a snapshot of a VM with shares was taken")
        .to_string();
    assert!(
        err.contains("a VM with shared directories (--share ")
            && err.contains("cannot be snapshotted"),
        "{err}"
    );
    sandbox.shutdown().unwrap();
    for pid in daemons {
        assert!(
            common::process_ended(pid),
            "virtiofsd {pid} outlived its sandbox"
        );
    }
    assert_eq!(
        common::tree_listing(&root),
        before,
        "the sandbox's shared root changed on the host"
    );
}

/// virtiofsd killed under a running guest: kiln logs it, the guest's
/// next accesses to the share fail (EIO) instead of hanging, the guest's
/// command goes on and kiln exits with its status.
#[test]
fn a_killed_virtiofsd_fails_the_guests_requests_without_a_hang() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    if !common::real_kernel_prerequisites(&[]) || !have_virtiofsd() {
        return;
    }
    let _one = common::one_vm();
    let scratch = Scratch::new("share-killed");
    let dir = scratch.path("dir");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("before.txt"), "before\n").unwrap();
    fs::write(dir.join("after.txt"), "after\n").unwrap();
    let script = "echo \"before=$(cat /mnt/s/before.txt)\"; echo ready; read go; \
                  if cat /mnt/s/after.txt; then echo after=read; else echo after=failed; fi; \
                  if ls /mnt/s/new-dir; then echo lookup=ok; else echo lookup=failed; fi; echo done=1";
    let mut kiln = kiln_cli()
        .arg("run")
        .arg("--kernel")
        .arg(guest_kernel("vmlinux").unwrap())
        .arg("--rootfs")
        .arg(guest_rootfs())
        .args(["--timeout", TIMEOUT, "-i"])
        .arg("--share")
        .arg(format!("{}:/mnt/s,cache=never", dir.display()))
        .env("KILN_LOG", "error")
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kiln");
    let mut stdout = BufReader::new(kiln.stdout.take().unwrap());
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            panic!("kiln's output ended before the guest was ready: {lines:?}");
        }
        lines.push(line.trim_end().to_string());
        if line.trim_end() == "ready" {
            break;
        }
    }
    let daemons = virtiofsd_serving(&dir);
    assert!(!daemons.is_empty(), "no virtiofsd for the share");
    for &pid in &daemons {
        // SAFETY: kill with a pid read from /proc just now (virtiofsd's).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert!(
            common::process_ended(pid),
            "virtiofsd {pid} survived SIGKILL"
        );
    }
    // kiln may have ended already if it did not survive: its stderr says why.
    let _ = kiln.stdin.take().unwrap().write_all(b"go\n");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut kiln.stderr.take().unwrap(), &mut stderr).unwrap();
    let status = kiln.wait().unwrap();
    eprintln!("kiln exited {status:?}\nstdout:\n{lines:?}\n{rest}\nstderr:\n{stderr}");
    assert_eq!(lines.first().map(String::as_str), Some("before=before"));
    assert!(rest.contains("after=failed"), "{rest}");
    assert!(rest.contains("lookup=failed"), "{rest}");
    assert!(rest.contains("done=1"), "{rest}");
    assert_eq!(status.code(), Some(0));
    let logged = stderr
        .lines()
        .filter(|l| l.contains("the vhost-user backend closed its connection"))
        .count();
    assert_eq!(logged, 1, "{stderr}");
}

/// Runs `kiln run` with `args` (no guest runs: each fails before boot) and
/// returns its status and stderr, which must be one line.
fn refused(args: &[&str], env: &[(&str, &Path)]) -> (Option<i32>, String) {
    let mut cmd = kiln_cli();
    cmd.args(["run", "--kernel", "/nonexistent/vmlinux"])
        .args(args)
        .env_remove("KILN_VIRTIOFSD");
    for (key, value) in env {
        cmd.env(key, value);
    }
    let out = cmd.output().expect("running kiln");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    (out.status.code(), stderr)
}

/// Bad `--share` input: one line naming the problem, status 125.
#[test]
fn share_errors_are_one_line() {
    let scratch = Scratch::new("share-errors");
    let dir = scratch.path("dir");
    fs::create_dir_all(&dir).unwrap();
    let file = scratch.path("file");
    fs::write(&file, "").unwrap();
    let share = |host: &Path, rest: &str| format!("{}:{rest}", host.display());

    let missing = scratch.path("missing");
    let (status, err) = refused(&["--share", &share(&missing, "/mnt")], &[]);
    assert_eq!(status, Some(125), "{err}");
    assert!(
        err.contains(&format!("--share: {}: No such file", missing.display())),
        "{err}"
    );

    let (status, err) = refused(&["--share", &share(&file, "/mnt")], &[]);
    assert_eq!(status, Some(125), "{err}");
    assert!(err.contains("is not a directory"), "{err}");

    for (bad, why) in [
        (share(&dir, "mnt"), "absolute path"),
        (dir.display().to_string(), "needs HOST_DIR:GUEST_PATH"),
        (
            share(&dir, "/mnt,cache=maybe"),
            "'auto', 'always' or 'never'",
        ),
    ] {
        let (status, err) = refused(&["--share", &bad], &[]);
        assert_eq!(status, Some(125), "{bad}: {err}");
        assert!(err.contains(why), "{bad}: {err}");
    }

    let (status, err) = refused(
        &[
            "--share",
            &share(&dir, "/a"),
            "--share",
            &share(&dir, "/a/"),
        ],
        &[],
    );
    assert_eq!(status, Some(125), "{err}");
    assert!(err.contains("guest path /a/ is given twice"), "{err}");

    // A shared root: a directory, and only the options it knows.
    let (status, err) = refused(&["--rootfs", &format!("{},share", file.display())], &[]);
    assert_eq!(status, Some(125), "{err}");
    assert!(
        err.contains(&format!(
            "rootfs {},share: not a directory (only a directory root is shared)",
            file.display()
        )),
        "{err}"
    );
    let (status, err) = refused(
        &["--rootfs", &format!("{},share,bogus", dir.display())],
        &[],
    );
    assert_eq!(status, Some(125), "{err}");
    assert!(
        err.contains("a shared root takes 'share' or 'share,rw'"),
        "{err}"
    );

    // No virtiofsd anywhere kiln looks: how to install it.
    let empty = scratch.path("empty");
    fs::create_dir_all(&empty).unwrap();
    let (status, err) = refused(
        &["--share", &share(&dir, "/mnt")],
        &[
            ("PATH", &empty),
            ("HOME", &empty),
            ("KILN_CACHE_DIR", &empty),
        ],
    );
    assert_eq!(status, Some(125), "{err}");
    assert!(
        err.contains("virtiofsd not found: install it with resources/setup.sh"),
        "{err}"
    );

    let (status, err) = refused(
        &[
            "--share",
            &share(&dir, "/mnt"),
            "--virtiofsd",
            "/nonexistent/virtiofsd",
        ],
        &[],
    );
    assert_eq!(status, Some(125), "{err}");
    assert!(
        err.contains("/nonexistent/virtiofsd is not an executable"),
        "{err}"
    );
}
