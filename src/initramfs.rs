//! The initramfs kiln boots with: its init, the exec spec (or the agent's
//! port) and the device nodes init needs, plus a directory or tar root,
//! written as one cpio archive (see [`crate::cpio`]).

use kiln_init::spec::{ExecSpec, SpecError};

use crate::cpio::{CpioBuilder, CpioError};
use crate::rootfs::Rootfs;

/// kiln's guest init, a static x86-64 ELF binary built by build.rs.
pub(crate) static INIT_BINARY: &[u8] = include_bytes!(env!("KILN_INIT_PATH"));

/// Why kiln's initramfs cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// The command cannot be written for kiln's init: an empty program, a
    /// NUL byte in an argument, variable or directory, a variable name that
    /// is empty or holds `=`.
    #[error("invalid exec spec: {0}")]
    Spec(#[from] SpecError),
    /// A directory or tar root cannot be read, is broken, or does not fit
    /// in guest memory.
    #[error(transparent)]
    Cpio(#[from] CpioError),
}

/// kiln's own entries: mount points, /dev/console (the kernel opens it for
/// init before devtmpfs is mounted), init and its spec. Each entry costs
/// emulated kernel time on PVM hosts, so nothing else.
fn add_kiln_entries(cpio: &mut CpioBuilder, spec: &ExecSpec) -> Result<(), InitramfsError> {
    let spec = spec.encode()?;
    cpio.dir("dev", 0o755);
    cpio.char_dev("dev/console", 0o600, 5, 1);
    cpio.dir("proc", 0o555);
    cpio.dir("sys", 0o555);
    cpio.dir("tmp", 0o1777);
    cpio.dir("kiln", 0o755);
    cpio.file(kiln_init::INIT_PATH, 0o755, INIT_BINARY);
    // Root-only: the environment may carry secrets.
    cpio.file(kiln_init::SPEC_PATH, 0o400, &spec);
    Ok(())
}

/// kiln's entries (with `/kiln/agent` asking init for agent mode when
/// `agent_port` is given) plus a directory or tar root (an image root adds
/// nothing: it is a disk); kiln's entries win on name collisions. The root
/// may add at most `limit` bytes (the guest's memory), so one that cannot
/// fit fails before it fills the host's.
///
/// `stop`, when given, is asked before each entry of the root: once it
/// answers true, packing ends with [`CpioError::Stopped`].
pub fn kiln_initramfs_with(
    spec: &ExecSpec,
    agent_port: Option<u32>,
    rootfs: Option<&Rootfs>,
    limit: usize,
    stop: Option<Box<dyn Fn() -> bool + Send>>,
) -> Result<Vec<u8>, InitramfsError> {
    let mut cpio = CpioBuilder::with_limit(limit);
    if let Some(stop) = stop {
        cpio.stop_when(stop);
    }
    add_kiln_entries(&mut cpio, spec)?;
    if let Some(port) = agent_port {
        let port = port.to_string();
        cpio.file(kiln_init::agent::AGENT_PATH, 0o400, port.as_bytes());
    }
    if let Some(rootfs) = rootfs {
        rootfs.pack(&mut cpio)?;
    }
    Ok(cpio.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::tests::{find, parse, sample_tree, TempDir};
    use std::fs;
    use std::io;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;
    use std::process::{Command, Stdio};

    /// kiln's initramfs with a directory root, as `kiln run --rootfs DIR` builds it.
    fn kiln_initramfs(spec: &ExecSpec, root: Option<&Path>) -> Result<Vec<u8>, InitramfsError> {
        let root = root.map(|dir| Rootfs::Directory(dir.to_owned()));
        kiln_initramfs_with(spec, None, root.as_ref(), usize::MAX, None)
    }

    #[test]
    fn kiln_initramfs_has_init_spec_and_devices() {
        let mut spec = ExecSpec::new(["sh", "-c", "echo 'hi there'\n"]);
        spec.env.push((b"K".to_vec(), vec![0xff]));
        let entries = parse(&kiln_initramfs(&spec, None).unwrap());
        let summary: Vec<_> = entries.iter().map(|e| (e.name.as_str(), e.mode)).collect();
        assert_eq!(
            summary,
            [
                ("dev", 0o40755),
                ("dev/console", 0o20600),
                ("proc", 0o40555),
                ("sys", 0o40555),
                ("tmp", 0o41777),
                ("kiln", 0o40755),
                ("kiln/init", 0o100755),
                ("kiln/exec", 0o100400),
            ]
        );
        assert_eq!(find(&entries, "dev/console").rdev, (5, 1));
        assert!(
            entries.iter().all(|e| (e.uid, e.gid) == (0, 0)),
            "root-owned"
        );
        assert_eq!(find(&entries, "kiln/init").data, INIT_BINARY);
        assert_eq!(
            ExecSpec::decode(&find(&entries, "kiln/exec").data).unwrap(),
            spec
        );
        // A static ELF executable, not a placeholder.
        let init = INIT_BINARY;
        assert_eq!(&init[..4], b"\x7fELF");
        assert_eq!(
            u16::from_le_bytes([init[16], init[17]]),
            2,
            "ET_EXEC: static, non-PIE"
        );

        let bad = ExecSpec::new([&b"a\0b"[..]]);
        assert!(matches!(
            kiln_initramfs(&bad, None),
            Err(InitramfsError::Spec(_))
        ));
    }

    #[test]
    fn copies_a_rootfs_under_kiln_entries() {
        let tree = sample_tree("rootfs");
        let spec = ExecSpec::new(["true"]);
        let entries = parse(&kiln_initramfs(&spec, Some(&tree.0)).unwrap());
        assert!(
            entries.iter().all(|e| (e.uid, e.gid) == (0, 0)),
            "root-owned"
        );
        let count = |n: &str| entries.iter().filter(|e| e.name == n).count();
        for name in ["dev", "kiln/init", "tmp", "kiln"] {
            assert_eq!(count(name), 1, "{name} must appear once");
        }
        assert_eq!(
            find(&entries, "dev").mode,
            0o40755,
            "kiln's /dev beats the host symlink"
        );
        assert_eq!(find(&entries, "kiln/init").data, INIT_BINARY);
        assert_eq!(find(&entries, "kiln/extra").data, b"kept");
        assert_eq!(find(&entries, "tmp/sub/a b").data, b"x");
        assert_eq!(find(&entries, "empty").data, b"");
        assert_eq!(find(&entries, "bin").data, b"usr/bin");
        assert!(!entries.iter().any(|e| e.name == "fifo"));
        let tool = find(&entries, "usr/bin/tool");
        assert_eq!((tool.mode, tool.nlink), (0o104755, 2));
        assert!(tool.mtime > 0);
        let tool2 = find(&entries, "usr/bin/tool2");
        assert_eq!(
            (tool2.ino, tool2.data.len()),
            (tool.ino, 0),
            "hard link shares the inode"
        );
        // Parents come before children.
        let pos = |n: &str| entries.iter().position(|e| e.name == n).unwrap();
        assert!(pos("usr") < pos("usr/bin") && pos("usr/bin") < pos("usr/bin/tool"));
    }

    #[test]
    fn host_times_and_device_numbers_are_kept() {
        if !kiln_prereq::require(kiln_prereq::is_root(), "root, to make a device node") {
            return;
        }
        let tree = sample_tree("times");
        // A character device like /dev/null (1:3).
        let node = tree.0.join("null");
        let path = std::ffi::CString::new(node.clone().into_os_string().into_encoded_bytes());
        let path = path.unwrap();
        // SAFETY: a valid NUL-terminated path; mknod only creates the node.
        let made =
            unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o640, libc::makedev(1, 3)) };
        assert_eq!(made, 0, "mknod: {}", io::Error::last_os_error());
        let entries = parse(&kiln_initramfs(&ExecSpec::new(["true"]), Some(&tree.0)).unwrap());
        for name in [
            "usr",
            "usr/bin",
            "usr/bin/tool",
            "usr/bin/tool2",
            "bin",
            "null",
        ] {
            let host = fs::symlink_metadata(tree.0.join(name)).unwrap();
            let e = find(&entries, name);
            assert_eq!(
                (e.mtime, host.mtime() > 0),
                (host.mtime() as u32, true),
                "{name}"
            );
        }
        let null = find(&entries, "null");
        assert_eq!(null.rdev, (1, 3));
        assert_eq!(
            null.mode,
            0o20000 | (fs::metadata(&node).unwrap().mode() & 0o7777)
        );
    }

    #[test]
    fn io_errors_name_the_path() {
        let missing = Path::new("/nonexistent/kiln-rootfs");
        let err = kiln_initramfs(&ExecSpec::new(["true"]), Some(missing)).unwrap_err();
        assert!(
            err.to_string().starts_with("/nonexistent/kiln-rootfs: "),
            "{err}"
        );
    }

    fn cpio_tool() -> bool {
        kiln_prereq::require(
            kiln_prereq::have_program("cpio"),
            "the cpio tool (Debian package cpio)",
        )
    }

    fn run_cpio(args: &[&str], dir: &Path, input: &[u8]) -> String {
        use std::io::Write;
        let mut child = Command::new("cpio")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "cpio {args:?} failed: {stderr}");
        assert!(!stderr.contains("cpio: "), "cpio complained: {stderr}");
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn host_cpio_lists_and_extracts_the_archive() {
        if !cpio_tool() {
            return;
        }
        let tree = sample_tree("cpio-src");
        let archive = kiln_initramfs(&ExecSpec::new(["true"]), Some(&tree.0)).unwrap();
        let out = TempDir::new("cpio-out");
        let listed: Vec<String> = run_cpio(&["-t", "--quiet"], &out.0, &archive)
            .lines()
            .map(String::from)
            .collect();
        let ours: Vec<String> = parse(&archive).into_iter().map(|e| e.name).collect();
        assert_eq!(listed, ours);

        // Extract a tree without device nodes (mknod may need privileges).
        let mut cpio = CpioBuilder::new();
        cpio.tree(&tree.0.join("usr")).unwrap();
        cpio.tree(&tree.0.join("tmp")).unwrap();
        cpio.symlink("lnk", "bin/tool");
        let archive = cpio.finish();
        run_cpio(
            &["-idm", "--quiet", "--no-absolute-filenames"],
            &out.0,
            &archive,
        );
        let o = |s: &str| out.0.join(s);
        assert_eq!(fs::read(o("bin/tool")).unwrap(), b"#!/bin/sh\necho tool\n");
        assert_eq!(fs::read(o("bin/tool2")).unwrap(), b"#!/bin/sh\necho tool\n");
        let (m1, m2) = (
            fs::metadata(o("bin/tool")).unwrap(),
            fs::metadata(o("bin/tool2")).unwrap(),
        );
        assert_eq!(m1.ino(), m2.ino(), "hard link restored");
        assert_eq!(m1.mode() & 0o7777, 0o4755);
        assert_eq!(fs::read(o("sub/a b")).unwrap(), b"x");
        assert_eq!(fs::read_link(o("lnk")).unwrap(), Path::new("bin/tool"));
    }
}
