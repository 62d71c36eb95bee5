//! tar root file systems to initramfs (newc) entries, the way `kiln run
//! --rootfs ARCHIVE` builds its initramfs (`kiln_initramfs_with`, plain or
//! gzip tar). The archive is hostile; what comes out is unpacked by the
//! guest kernel, which follows symlinks in parent directories. Beyond the
//! bounds every target has (the archive limit holds, whatever sizes,
//! sparse maps or pax records the archive claims), the initramfs:
//! - is well-formed newc from start to trailer;
//! - has only relative names without `..`, `.`, empty components or NULs;
//! - has no entry below a symlink or a non-directory;
//! - keeps each of kiln's own entries once, as kiln wrote it;
//! - shares inode numbers only between regular files (hard links).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;

use kiln::fuzzing::{kiln_initramfs_with, Rootfs};
use kiln_init::spec::ExecSpec;

use crate::input::Input;
use crate::Target;

/// The most the initramfs may hold (the guest's memory, in `kiln run`).
const LIMIT: usize = 4 << 20;

/// The most one tar entry can add to the initramfs besides its data: a
/// name of up to PATH_MAX (4096) bytes makes up to 2047 parent directories
/// whose names add up to PATH_MAX²/4, each with a header.
const ENTRY_MAX: usize = 4096 * 4096 / 4 + 2048 * 128;

pub const TARGET: Target = Target {
    name: "tar",
    run,
    // The archive, up to the limit plus the entry that crosses it (three
    // times that while its vector grows), and the names it holds (as much
    // again); the tar reader's buffers and the gzip decoder's window.
    memory_cap: 4 * (LIMIT + ENTRY_MAX) + (1 << 20),
    memory_per_input_byte: 32,
    seeds,
};

/// kiln's own entries and their file types.
const KILN_ENTRIES: [(&str, u32); 8] = [
    ("dev", libc::S_IFDIR),
    ("dev/console", libc::S_IFCHR),
    ("proc", libc::S_IFDIR),
    ("sys", libc::S_IFDIR),
    ("tmp", libc::S_IFDIR),
    ("kiln", libc::S_IFDIR),
    ("kiln/init", libc::S_IFREG),
    ("kiln/exec", libc::S_IFREG),
];

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let gzip = input.bool();
    // SAFETY: memfd_create with a NUL-terminated name and flags; the result
    // is checked before use.
    let fd = unsafe { libc::memfd_create(c"kiln-fuzz-rootfs".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(input.rest()).expect("memfd write");
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let rootfs = Rootfs::Tar { path, gzip };
    let spec = ExecSpec::new(["sh"]);
    let Ok(initramfs) = kiln_initramfs_with(&spec, None, Some(&rootfs), LIMIT, None) else {
        return;
    };
    check_initramfs(&initramfs);
}

struct Entry<'a> {
    name: &'a [u8],
    ino: u32,
    mode: u32,
}

fn hex(field: &[u8]) -> u32 {
    let text = std::str::from_utf8(field).expect("newc fields are ASCII");
    u32::from_str_radix(text, 16).expect("newc fields are hex")
}

/// Parses a newc archive completely (to its trailer, with nothing after).
fn parse(archive: &[u8]) -> Vec<Entry<'_>> {
    let mut entries = Vec::new();
    let mut at = 0;
    loop {
        let h = &archive[at..at + 110];
        assert_eq!(&h[..6], b"070701", "bad newc magic at {at}");
        let field = |i: usize| hex(&h[6 + 8 * i..14 + 8 * i]);
        let (ino, mode, size, namesize) = (field(0), field(1), field(6) as usize, field(11));
        let name_end = at + 110 + namesize as usize;
        assert_eq!(archive[name_end - 1], 0, "newc name without its NUL");
        let name = &archive[at + 110..name_end - 1];
        let data = name_end.next_multiple_of(4);
        at = (data + size).next_multiple_of(4);
        if name == b"TRAILER!!!" {
            assert_eq!(at, archive.len(), "bytes after the newc trailer");
            return entries;
        }
        entries.push(Entry { name, ino, mode });
    }
}

fn check_initramfs(archive: &[u8]) {
    // Headers and names count too: they take guest memory as data does.
    assert!(
        archive.len() <= LIMIT + 128,
        "an initramfs of {} bytes, over the {LIMIT} byte limit",
        archive.len()
    );
    let entries = parse(archive);
    let mut kind: HashMap<&[u8], u32> = HashMap::new();
    let mut inodes: HashMap<u32, u32> = HashMap::new();
    let mut kiln = HashMap::new();
    for e in &entries {
        let fmt = e.mode & libc::S_IFMT;
        let shown = e.name.escape_ascii();
        assert!(!e.name.contains(&0), "NUL in '{shown}'");
        for part in e.name.split(|&b| b == b'/') {
            assert!(!matches!(part, b"" | b"." | b".."), "name '{shown}'");
        }
        for (i, _) in e.name.iter().enumerate().filter(|&(_, &b)| b == b'/') {
            let parent = &e.name[..i];
            let parent_kind = kind.get(parent).copied();
            assert_eq!(
                parent_kind,
                Some(libc::S_IFDIR),
                "'{shown}' is below '{}', which is not a directory made before it",
                parent.escape_ascii()
            );
        }
        if let Some(&(_, want)) = KILN_ENTRIES.iter().find(|(n, _)| n.as_bytes() == e.name) {
            assert_eq!(fmt, want, "kiln's /{shown} has another type");
            assert!(
                kiln.insert(e.name, ()).is_none(),
                "kiln's /{shown} written twice"
            );
        }
        if let Some(&other) = inodes.get(&e.ino) {
            assert!(
                other == libc::S_IFREG && fmt == libc::S_IFREG,
                "inode {} shared by '{shown}' and another entry that are not both files",
                e.ino
            );
        }
        inodes.insert(e.ino, fmt);
        kind.insert(e.name, fmt);
    }
    assert_eq!(kiln.len(), KILN_ENTRIES.len(), "kiln's entries are missing");
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let tree = tiny_tree();
    let hostile = hostile_archive();
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&tree).expect("in memory");
    let gzip = gzip.finish().expect("in memory");
    let with_flag = |flag: u8, archive: &[u8]| [&[flag][..], archive].concat();
    vec![
        ("tiny-tree", with_flag(0, &tree)),
        ("tiny-tree-gzip", with_flag(1, &gzip)),
        ("hostile-names", with_flag(0, &hostile)),
    ]
}

/// A scratch directory, removed on drop.
struct TempTree(PathBuf);

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn header(kind: ::tar::EntryType, size: u64, mode: u32) -> ::tar::Header {
    let mut h = ::tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h
}

/// A tiny root made on disk (files, a symlink, a hard link, a long name),
/// archived as `tar` archives it, plus a fifo and a pax `path` record.
fn tiny_tree() -> Vec<u8> {
    use std::os::unix::fs::symlink;
    let root =
        TempTree(std::env::temp_dir().join(format!("kiln-fuzz-tree-{}", std::process::id())));
    let at = |p: &str| root.0.join(p);
    let long = "usr/share/doc/a-package-with-a-rather-long-name/and-a-deeply-nested-file-whose-path-is-over-100-bytes.txt";
    for dir in [
        "etc",
        "bin",
        "usr/share/doc/a-package-with-a-rather-long-name",
    ] {
        std::fs::create_dir_all(at(dir)).expect("temp tree");
    }
    std::fs::write(at("etc/hostname"), "kiln\n").expect("temp tree");
    std::fs::write(at("bin/busybox"), b"\x7fELF not really").expect("temp tree");
    std::fs::write(at(long), "long\n").expect("temp tree");
    symlink("busybox", at("bin/sh")).expect("temp tree");
    let mut b = ::tar::Builder::new(Vec::new());
    b.mode(::tar::HeaderMode::Deterministic);
    b.follow_symlinks(false);
    for p in [
        "etc",
        "etc/hostname",
        "bin",
        "bin/busybox",
        "bin/sh",
        "usr",
        "usr/share",
        "usr/share/doc",
        "usr/share/doc/a-package-with-a-rather-long-name",
        long,
    ] {
        b.append_path_with_name(at(p), p).expect("tar");
    }
    let mut link = header(::tar::EntryType::Link, 0, 0o755);
    b.append_link(&mut link, "bin/ls", "bin/busybox")
        .expect("tar");
    let mut fifo = header(::tar::EntryType::Fifo, 0, 0o600);
    b.append_data(&mut fifo, "run/initctl", std::io::empty())
        .expect("tar");
    b.append_pax_extensions([("path", &b"etc/motd"[..])])
        .expect("tar");
    let mut motd = header(::tar::EntryType::Regular, 6, 0o644);
    b.append_data(&mut motd, "placeholder", &b"hello\n"[..])
        .expect("tar");
    b.into_inner().expect("tar")
}

/// Names an archive must not get into the initramfs as they are.
fn hostile_archive() -> Vec<u8> {
    let mut b = ::tar::Builder::new(Vec::new());
    let file = |b: &mut ::tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
        let mut h = header(::tar::EntryType::Regular, data.len() as u64, 0o644);
        // Raw name bytes: set_path would refuse some of these.
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, data).expect("tar");
    };
    file(&mut b, "../escape", b"x");
    file(&mut b, "/abs/olute", b"x");
    file(&mut b, "kiln/init", b"not kiln's init");
    let mut dev = header(::tar::EntryType::Directory, 0, 0o700);
    b.append_data(&mut dev, "dev", std::io::empty())
        .expect("tar");
    let mut link = header(::tar::EntryType::Symlink, 0, 0o777);
    b.append_link(&mut link, "lib", "/").expect("tar");
    file(&mut b, "lib/below-a-symlink", b"x");
    file(&mut b, "plain", b"x");
    file(&mut b, "plain/below-a-file", b"x");
    let mut hard = header(::tar::EntryType::Link, 0, 0o644);
    b.append_link(&mut hard, "dangling", "missing")
        .expect("tar");
    b.into_inner().expect("tar")
}
