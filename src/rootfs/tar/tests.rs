use super::*;
use crate::cpio::tests::{find, parse, Entry};
use crate::initramfs::{kiln_initramfs_with, INIT_BINARY};
use crate::rootfs::tests::TempDir;
use crate::rootfs::{Budget, Rootfs};
use kiln_init::spec::ExecSpec;
use std::io::Write;

/// One raw ustar header block; `size` and `mtime` are written in octal
/// unless given as raw field bytes by the caller afterwards.
fn header(name: &[u8], typeflag: u8, size: u64, link: &[u8]) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0001750\0"); // uid 1000
    h[116..124].copy_from_slice(b"0001751\0"); // gid 1001
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"14000000000\0");
    h[156] = typeflag;
    h[157..157 + link.len().min(100)].copy_from_slice(&link[..link.len().min(100)]);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    seal(&mut h);
    h
}

/// Writes the header checksum.
fn seal(h: &mut [u8; 512]) {
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// An archive under construction, block by block.
#[derive(Default)]
struct Raw(Vec<u8>);

impl Raw {
    fn entry(mut self, name: &[u8], typeflag: u8, data: &[u8], link: &[u8]) -> Self {
        self.0
            .extend_from_slice(&header(name, typeflag, data.len() as u64, link));
        self.data(data)
    }
    fn file(self, name: &str, data: &[u8]) -> Self {
        self.entry(name.as_bytes(), b'0', data, b"")
    }
    fn dir(self, name: &str) -> Self {
        self.entry(name.as_bytes(), b'5', b"", b"")
    }
    fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(name.as_bytes(), b'2', b"", target.as_bytes())
    }
    fn hardlink(self, name: &str, target: &str) -> Self {
        self.entry(name.as_bytes(), b'1', b"", target.as_bytes())
    }
    /// A pax extended header with these records, for the next entry.
    fn pax(self, records: &[(&str, &[u8])]) -> Self {
        let mut body = Vec::new();
        for (key, value) in records {
            let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
            let mut len = rest + 1;
            while len != rest + len.to_string().len() {
                len = rest + len.to_string().len();
            }
            body.extend_from_slice(format!("{len} {key}=").as_bytes());
            body.extend_from_slice(value);
            body.push(b'\n');
        }
        self.entry(b"././@PaxHeader", b'x', &body, b"")
    }
    fn data(mut self, data: &[u8]) -> Self {
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(512), 0);
        self
    }
    fn end(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0; 1024]);
        self.0
    }
}

/// Converts `archive` after kiln-like entries (a "dev" and "tmp"
/// directory, a "kiln" directory with "init" in it).
fn convert(archive: &[u8]) -> (Result<TarStats, CpioError>, Vec<Entry>) {
    convert_with(archive, usize::MAX)
}

fn convert_with(archive: &[u8], limit: usize) -> (Result<TarStats, CpioError>, Vec<Entry>) {
    let mut cpio = CpioBuilder::with_limit(limit);
    cpio.dir("dev", 0o755);
    cpio.dir("tmp", 0o1777);
    cpio.file("kiln/init", 0o755, b"kiln's init");
    let result = append_tar(&mut cpio, archive, Path::new("root.tar"));
    (result, parse(&cpio.finish()))
}

fn names(entries: &[Entry]) -> Vec<&str> {
    entries.iter().map(|e| e.name.as_str()).collect()
}

fn count(entries: &[Entry], name: &str) -> usize {
    entries.iter().filter(|e| e.name == name).count()
}

#[test]
fn converts_every_entry_kind_with_its_metadata() {
    let mut b = ::tar::Builder::new(Vec::new());
    let mut h = ::tar::Header::new_gnu();
    h.set_entry_type(::tar::EntryType::Directory);
    h.set_mode(0o750);
    h.set_uid(100);
    h.set_gid(101);
    h.set_mtime(1_700_000_000);
    h.set_size(0);
    b.append_data(&mut h.clone(), "etc/", &b""[..]).unwrap();
    let mut f = h.clone();
    f.set_entry_type(::tar::EntryType::Regular);
    f.set_mode(0o4755);
    f.set_size(6);
    b.append_data(&mut f.clone(), "bin/busybox", &b"BUSYBX"[..])
        .unwrap();
    f.set_size(15);
    f.set_mode(0o644);
    b.append_data(
        &mut f.clone(),
        "./etc/os-release",
        &b"ID=kiln-test\n\n\n"[..],
    )
    .unwrap();
    // A long name: the crate writes a GNU 'L' record for it.
    let long = format!("usr/share/{}/file", "d".repeat(150));
    f.set_size(4);
    b.append_data(&mut f.clone(), &long, &b"long"[..]).unwrap();
    let mut l = h.clone();
    l.set_entry_type(::tar::EntryType::Symlink);
    l.set_mode(0o777);
    b.append_link(&mut l.clone(), "bin/sh", "busybox").unwrap();
    l.set_entry_type(::tar::EntryType::Link);
    b.append_link(&mut l.clone(), "bin/ls", "bin/busybox")
        .unwrap();
    b.append_link(&mut l.clone(), "sbin/init", "bin/busybox")
        .unwrap();
    for (name, kind, mode, dev) in [
        ("dev/null", ::tar::EntryType::Char, 0o666, (1, 3)),
        ("dev/vda", ::tar::EntryType::Block, 0o660, (254, 0)),
        ("run/fifo", ::tar::EntryType::Fifo, 0o600, (0, 0)),
    ] {
        let mut d = h.clone();
        d.set_entry_type(kind);
        d.set_mode(mode);
        d.set_device_major(dev.0).unwrap();
        d.set_device_minor(dev.1).unwrap();
        b.append_data(&mut d, name, &b""[..]).unwrap();
    }
    let archive = b.into_inner().unwrap();
    let (stats, entries) = convert(&archive);
    assert_eq!(
        stats.unwrap(),
        TarStats {
            added: 10,
            shadowed: 0,
            skipped: 0
        }
    );

    let etc = find(&entries, "etc");
    assert_eq!(
        (etc.mode, etc.uid, etc.gid, etc.mtime),
        (0o40750, 100, 101, 1_700_000_000)
    );
    let os = find(&entries, "etc/os-release");
    assert_eq!(
        (os.mode, &os.data[..]),
        (0o100644, &b"ID=kiln-test\n\n\n"[..])
    );
    assert_eq!(find(&entries, &long).data, b"long");
    let busybox = find(&entries, "bin/busybox");
    assert_eq!((busybox.mode, busybox.nlink), (0o104755, 2));
    assert_eq!(find(&entries, "bin/sh").data, b"busybox");
    assert_eq!(find(&entries, "bin/sh").mode, 0o120777);
    for link in ["bin/ls", "sbin/init"] {
        let l = find(&entries, link);
        assert_eq!(
            (l.ino, l.mode, l.data.len(), l.nlink >= 2),
            (busybox.ino, busybox.mode, 0, true),
            "{link} shares the inode"
        );
    }
    let null = find(&entries, "dev/null");
    assert_eq!((null.mode, null.rdev), (0o20666, (1, 3)));
    assert_eq!(find(&entries, "dev/vda").rdev, (254, 0));
    assert_eq!(find(&entries, "run/fifo").mode, 0o10600);
    // kiln's /dev stays kiln's: 0755, root, one entry.
    assert_eq!(count(&entries, "dev"), 1);
    assert_eq!(find(&entries, "dev").mode, 0o40755);
    // Parents come first; implicit ones are root's 0755.
    let pos = |n: &str| entries.iter().position(|e| e.name == n).unwrap();
    assert!(pos("bin") < pos("bin/busybox") && pos("sbin") < pos("sbin/init"));
    assert_eq!(find(&entries, "usr/share").mode, 0o40755);
}

#[test]
fn kiln_entries_win_over_the_archive() {
    let archive = Raw::default()
        .file("kiln/init", b"evil init")
        .symlink("tmp", "/evil")
        .dir("dev/")
        .file("dev/extra", b"kept")
        .file("dev", b"a file where kiln has a directory")
        .file("kiln/init/below", b"x")
        .hardlink("kiln/other", "kiln/init")
        .file("kiln/mine", b"kept too")
        .end();
    let (stats, entries) = convert(&archive);
    let stats = stats.unwrap();
    assert_eq!((stats.added, stats.shadowed, stats.skipped), (2, 4, 2));
    assert_eq!(find(&entries, "kiln/init").data, b"kiln's init");
    assert_eq!(count(&entries, "kiln/init"), 1);
    assert_eq!(find(&entries, "tmp").mode, 0o41777);
    assert_eq!(count(&entries, "dev"), 1);
    assert_eq!(find(&entries, "dev/extra").data, b"kept");
    assert_eq!(find(&entries, "kiln/mine").data, b"kept too");
    assert!(!names(&entries).contains(&"kiln/other"));
    assert!(!names(&entries).contains(&"kiln/init/below"));
}

#[test]
fn the_real_initramfs_keeps_kilns_init() {
    let t = TempDir::new("tar-initramfs");
    let path = t.0.join("root.tgz");
    let archive = Raw::default()
        .file("kiln/init", b"evil")
        .file("/kiln/exec", b"evil")
        .dir("kiln/agent/")
        .file("kiln/agent/x", b"a directory where kiln has a file")
        .file("etc/hostname", b"box\n")
        .end();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&archive).unwrap();
    std::fs::write(&path, gz.finish().unwrap()).unwrap();
    let root = Rootfs::detect(&path).unwrap();
    assert_eq!(
        root,
        Rootfs::Tar {
            path: path.clone(),
            gzip: true
        }
    );
    let spec = ExecSpec::new(["true"]);
    let entries =
        parse(&kiln_initramfs_with(&spec, Some(1024), Some(&root), 64 << 20, None).unwrap());
    assert_eq!(find(&entries, "kiln/init").data, INIT_BINARY);
    // The agent request is kiln's too: a root cannot shadow or replace it.
    assert_eq!(find(&entries, "kiln/agent").data, b"1024");
    assert_eq!(count(&entries, "kiln/agent"), 1);
    assert_eq!(count(&entries, "kiln/init"), 1);
    assert_eq!(count(&entries, "kiln/exec"), 1);
    assert_eq!(find(&entries, "etc/hostname").data, b"box\n");
    assert_eq!((find(&entries, "etc/hostname").uid), 1000);
}

#[test]
fn unsafe_names_are_skipped_not_followed() {
    let archive = Raw::default()
        .file("../escape", b"x")
        .file("a/../../b", b"x")
        .file("/abs/ok", b"absolute names are taken from the root")
        .symlink("x", "kiln")
        .file("x/init", b"through a symlink")
        .symlink("up", "../../..")
        .file("up/etc/passwd", b"x")
        .file("plain", b"file")
        .file("plain/below", b"x")
        .symlink("empty-target", "")
        .hardlink("dangling", "nowhere")
        .entry(b"odd-type", b'V', b"", b"")
        .file("./", b"")
        .end();
    let (stats, entries) = convert(&archive);
    let stats = stats.unwrap();
    assert_eq!(
        (stats.added, stats.skipped),
        (4, 8),
        "{:?}",
        names(&entries)
    );
    assert_eq!(
        find(&entries, "abs/ok").data,
        b"absolute names are taken from the root"
    );
    assert_eq!(find(&entries, "x").data, b"kiln");
    assert_eq!(find(&entries, "up").data, b"../../..");
    for gone in [
        "escape",
        "b",
        "x/init",
        "up/etc",
        "up/etc/passwd",
        "plain/below",
        "empty-target",
        "dangling",
        "odd-type",
    ] {
        assert!(!names(&entries).contains(&gone), "{gone}");
    }
    assert_eq!(find(&entries, "kiln/init").data, b"kiln's init");
}

#[test]
fn long_and_odd_names_from_gnu_and_pax_records() {
    let long = format!("deep/{}/name", "n".repeat(300));
    let archive = Raw::default()
        // GNU long name for the next entry.
        .entry(b"././@LongLink", b'L', format!("{long}\0").as_bytes(), b"")
        .file("short-instead", b"gnu")
        // pax path, linkpath, uid and gid for the next entries.
        .pax(&[("path", b"pax/name"), ("uid", b"4000000"), ("gid", b"7")])
        .file("ignored", b"pax")
        .pax(&[("path", b"pax/link"), ("linkpath", b"pax/target/far")])
        .symlink("ignored2", "short")
        .pax(&[("path", b"pax/../../escape")])
        .file("ignored3", b"x")
        .pax(&[("path", b"nul\0inside")])
        .file("ignored4", b"x")
        // Non-UTF-8 bytes are kept as they are.
        .entry(b"caf\xe9", b'0', b"latin-1", b"")
        .end();
    let (stats, entries) = convert(&archive);
    let stats = stats.unwrap();
    assert_eq!((stats.added, stats.skipped), (4, 2));
    assert_eq!(find(&entries, &long).data, b"gnu");
    let pax = find(&entries, "pax/name");
    assert_eq!(
        (&pax.data[..], pax.uid, pax.gid),
        (&b"pax"[..], 4_000_000, 7)
    );
    assert_eq!(find(&entries, "pax/link").data, b"pax/target/far");
    let cafe = entries
        .iter()
        .find(|e| e.raw_name == b"caf\xe9")
        .expect("non-UTF-8 name kept");
    assert_eq!(cafe.data, b"latin-1");
}

#[test]
fn broken_archives_fail_with_one_line_naming_the_archive() {
    let good = Raw::default().file("etc/a", b"aaaa").end();
    let mut bad_sum = good.clone();
    bad_sum[0] = b'X'; // the name changes, the checksum does not
    let mut second_bad = Raw::default()
        .file("etc/a", b"aaaa")
        .file("etc/b", b"b")
        .end();
    second_bad[1024 + 100] = b'7';
    // The header promises 4096 bytes; the file ends after 512.
    let mut cut = Raw::default().entry(b"big", b'0', &[7; 512], b"").0;
    cut[124..136].copy_from_slice(b"00000010000\0");
    let mut h: [u8; 512] = cut[..512].try_into().unwrap();
    seal(&mut h);
    cut[..512].copy_from_slice(&h);
    // 8 GiB promised, nothing there.
    let mut huge = header(b"huge", b'0', 0, b"").to_vec();
    huge[124..136].copy_from_slice(b"77777777777\0");
    let mut h: [u8; 512] = huge[..512].try_into().unwrap();
    seal(&mut h);
    huge = h.to_vec();
    let mut bad_mode = header(b"m", b'0', 0, b"");
    bad_mode[100..108].copy_from_slice(b"zzzzzzz\0");
    seal(&mut bad_mode);
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("checksum", bad_sum, "checksum"),
        ("second checksum", second_bad, "after 'etc/a'"),
        ("cut short", cut, "'big' is cut short (512 of 4096 bytes)"),
        ("huge", huge, "'huge' is cut short (0 of 8589934591 bytes)"),
        ("bad mode", Raw(bad_mode.to_vec()).end(), "'m'"),
    ];
    for (what, archive, expect) in cases {
        let (result, _) = convert(&archive);
        let e = result.expect_err(what).to_string();
        assert_eq!(e.lines().count(), 1, "{what}: {e}");
        assert!(e.starts_with("root.tar: "), "{what}: {e}");
        assert!(e.contains(expect), "{what}: {e}");
    }
    // The good one converts.
    assert_eq!(convert(&good).0.unwrap().added, 1);
}

#[test]
fn limits_stop_archives_that_cannot_fit() {
    // Past the initramfs limit: an error, not a host-sized allocation.
    let big = Raw::default().file("big", &vec![1; 300 << 10]).end();
    let (result, _) = convert_with(&big, 256 << 10);
    let e = result.unwrap_err();
    assert!(
        matches!(e, CpioError::OverLimit { limit, .. } if limit == 256 << 10),
        "{e}"
    );
    assert!(e.to_string().contains("root.tar: big: "), "{e}");
    // Empty directories only: their headers and names count too (one tar
    // entry with a deep name makes thousands of parents).
    let mut dirs = Raw::default();
    for i in 0..1000 {
        dirs = dirs.dir(&format!("{i:04}/{}", "d".repeat(90)));
    }
    let (result, _) = convert_with(&dirs.end(), 64 << 10);
    let e = result.unwrap_err();
    assert!(matches!(e, CpioError::OverLimit { .. }), "{e}");
    // A GNU long name record that never ends (a "bomb"): the read budget
    // stops it.
    let mut bomb = header(b"././@LongLink", b'L', 0, b"").to_vec();
    bomb[124..136].copy_from_slice(b"77777777777\0");
    let mut h: [u8; 512] = bomb[..512].try_into().unwrap();
    seal(&mut h);
    let endless = std::io::Read::chain(&h[..], std::io::repeat(b'a'));
    let mut cpio = CpioBuilder::new();
    let e = append_tar(
        &mut cpio,
        Budget::new(endless, 4 << 20),
        Path::new("bomb.tar"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("bomb.tar: the archive holds more than 4 MiB"),
        "{e}"
    );
}

#[test]
fn the_system_tar_reads_like_docker_export() {
    if !kiln_prereq::require(
        kiln_prereq::have_program("tar"),
        "the tar tool (Debian package tar)",
    ) {
        return;
    }
    // `tar --numeric-owner` of a small tree, like `docker export`.
    let t = TempDir::new("tar-system");
    let root = t.0.join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(root.join("etc/os-release"), b"ID=kiln\n").unwrap();
    std::fs::write(root.join("bin/busybox"), b"\x7fELF...").unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    std::fs::hard_link(root.join("bin/busybox"), root.join("bin/ls")).unwrap();
    let fifo =
        std::ffi::CString::new(root.join("fifo").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    let tarball = t.0.join("root.tar");
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["--numeric-owner", "-cf"])
        .arg(&tarball)
        .arg(".")
        .status()
        .expect("running tar");
    assert!(status.success());
    let spec = ExecSpec::new(["true"]);
    let rootfs = Rootfs::detect(&tarball).unwrap();
    let entries = parse(&kiln_initramfs_with(&spec, None, Some(&rootfs), 64 << 20, None).unwrap());
    assert_eq!(find(&entries, "etc/os-release").data, b"ID=kiln\n");
    assert_eq!(find(&entries, "bin/sh").data, b"busybox");
    let (a, b) = (find(&entries, "bin/busybox"), find(&entries, "bin/ls"));
    assert_eq!(a.ino, b.ino);
    assert_eq!(a.data.len() + b.data.len(), 7, "data once");
    // GNU tar leaves a fifo's device fields blank.
    assert_eq!(find(&entries, "fifo").mode, 0o10640);
    assert!(!names(&entries).contains(&""));
}

/// README: skipped entries give one warning with their count and the first
/// of them (and no warning when nothing is skipped). In a child process:
/// its logger is this test's.
#[test]
fn skipped_entries_give_one_warning_naming_the_first() {
    if !kiln_prereq::in_child() {
        kiln_prereq::run_in_child(
            concat!(
                module_path!(),
                "::skipped_entries_give_one_warning_naming_the_first"
            ),
            &[],
        );
        return;
    }
    let records = crate::test_log::install();
    let clean = Raw::default().dir("etc").file("etc/ok", b"fine").end();
    assert_eq!(convert(&clean).0.unwrap().skipped, 0);
    assert!(records.at(log::Level::Warn).is_empty());
    let archive = Raw::default()
        .dir("etc")
        .file("etc/ok", b"fine")
        .file("../escape", b"out")
        .hardlink("etc/link", "no/such/file")
        .file("etc/../../up", b"up")
        .end();
    let (result, entries) = convert(&archive);
    assert_eq!(result.unwrap().skipped, 3);
    assert_eq!(
        records.at(log::Level::Warn),
        ["rootfs root.tar: skipped 3 unsafe or unsupported entries \
          (first '../escape': '..' in the name)"]
    );
    assert_eq!(find(&entries, "etc/ok").data, b"fine");
}
