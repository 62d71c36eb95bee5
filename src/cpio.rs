//! A newc ("070701") cpio archive writer, the format of a Linux initramfs.
//!
//! Archives are uncompressed: on hosts where the guest kernel is emulated,
//! decompressing costs far more than copying.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

const S_IFDIR: u32 = libc::S_IFDIR;
const S_IFREG: u32 = libc::S_IFREG;
const S_IFLNK: u32 = libc::S_IFLNK;
const S_IFCHR: u32 = libc::S_IFCHR;
const S_IFBLK: u32 = libc::S_IFBLK;
const S_IFMT: u32 = libc::S_IFMT;
/// Offsets of the header fields kiln patches after writing a header.
const NLINK_FIELD: usize = 6 + 8 * 4;
const FILESIZE_FIELD: usize = 6 + 8 * 6;

#[derive(Debug, thiserror::Error)]
/// Why an entry cannot go into the archive; each message names the host
/// file or archive at fault.
pub enum CpioError {
    /// A host file, directory or archive cannot be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// Why it cannot be read.
        source: io::Error,
    },
    /// A file of 4 GiB or more, which newc cannot describe.
    #[error("{}: too large for a cpio archive (4 GiB per file)", .0.display())]
    TooLarge(PathBuf),
    /// The root would make the initramfs larger than its limit (the
    /// guest's memory).
    #[error(
        "{}: the root file system does not fit in guest memory ({} MiB; raise --mem or use an ext4 image)",
        path.display(),
        limit >> 20
    )]
    OverLimit {
        /// The root being packed.
        path: PathBuf,
        /// The limit in bytes.
        limit: usize,
    },
    /// A broken tar archive: a bad header checksum, data cut short, a bad
    /// numeric field, or more data than kiln reads for the limit (twice it
    /// plus 64 MiB: e.g. a gzip bomb).
    #[error("{}: {reason}", path.display())]
    BadArchive {
        /// The archive.
        path: PathBuf,
        /// What is wrong, naming the entry.
        reason: String,
    },
    /// The VM was asked to stop while its root was being packed (see
    /// [`CpioBuilder::stop_when`]).
    #[error("{}: stopped while it was being packed", .0.display())]
    Stopped(PathBuf),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CpioError + '_ {
    move |source| CpioError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What an entry is besides its name and data: file type and permission
/// bits (`st_mode`), owner, modification time and, for a device, its number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// File type and permission bits, as `st_mode`.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: u32,
    /// Device number (major, minor) of a device node.
    pub rdev: (u32, u32),
}

impl Meta {
    /// Owned by root, mtime 0.
    fn root(mode: u32) -> Self {
        Self {
            mode,
            ..Self::default()
        }
    }
}

/// An in-memory newc cpio archive. Names are relative ("dev/console"; a
/// leading '/' is dropped); missing parent directories are added (0755)
/// before their children. Entries are owned by root unless a caller gives
/// a [`Meta`] of its own.
pub struct CpioBuilder {
    out: Vec<u8>,
    next_ino: u32,
    /// Names written so far, and the file type (`S_IFMT` bits) of each.
    names: HashMap<Vec<u8>, u32>,
    /// Host (dev, ino) of hard-linked files already written -> cpio inode.
    links: HashMap<(u64, u64), u32>,
    /// Host entries (data, headers and names) stop being added once the
    /// archive reaches this size.
    limit: usize,
    /// Asked before each host entry: true ends packing (a stop request).
    stop: Option<Box<dyn Fn() -> bool + Send>>,
}

impl std::fmt::Debug for CpioBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpioBuilder")
            .field("len", &self.out.len())
            .field("entries", &self.names.len())
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl Default for CpioBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl CpioBuilder {
    /// An empty archive without a size limit.
    pub fn new() -> Self {
        Self {
            out: Vec::new(),
            next_ino: 1,
            names: HashMap::new(),
            links: HashMap::new(),
            limit: usize::MAX,
            stop: None,
        }
    }

    /// Asks `stop` before each host entry (`tree`, tar entries) and fails
    /// with [`CpioError::Stopped`] once it answers true: packing a big root
    /// does not hold up a stop request.
    pub fn stop_when(&mut self, stop: Box<dyn Fn() -> bool + Send>) {
        self.stop = Some(stop);
    }

    fn check_stop(&self, origin: &Path) -> Result<(), CpioError> {
        match self.stop.as_ref().is_some_and(|stop| stop()) {
            true => Err(CpioError::Stopped(origin.to_owned())),
            false => Ok(()),
        }
    }

    /// An archive that refuses host entries (`tree`, tar entries: data,
    /// headers and names) past `limit` bytes in total, so a root that cannot
    /// fit in guest memory fails early instead of filling the host's.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            limit,
            ..Self::new()
        }
    }

    /// Whether `name` is already in the archive.
    fn contains(&self, name: impl AsRef<[u8]>) -> bool {
        self.names.contains_key(normalize(name.as_ref()))
    }

    /// The file type (`S_IFMT` bits) of `name`, if it is in the archive.
    pub fn file_type(&self, name: impl AsRef<[u8]>) -> Option<u32> {
        self.names.get(normalize(name.as_ref())).copied()
    }

    /// The most host data the archive takes (see [`CpioBuilder::with_limit`]).
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Every name in the archive so far (normalized), in no order.
    pub fn names(&self) -> impl Iterator<Item = &[u8]> {
        self.names.keys().map(Vec::as_slice)
    }

    /// A fresh inode number, for [`CpioBuilder::entry_from_reader`].
    pub fn new_ino(&mut self) -> u32 {
        self.ino()
    }

    /// Adds an entry whose data is read from `data` until its end (for a
    /// directory, symlink target or device: whatever `data` yields, usually
    /// nothing). `origin` names the data in errors. Returns the offset of the
    /// entry's header, for [`CpioBuilder::mark_linked`] (None for the root,
    /// which gets no entry).
    pub fn entry_from_reader(
        &mut self,
        name: &[u8],
        ino: u32,
        meta: Meta,
        nlink: u32,
        data: &mut dyn io::Read,
        origin: &Path,
    ) -> Result<Option<usize>, CpioError> {
        self.check_stop(origin)?;
        let Some(offset) = self.entry_start(name, ino, meta, nlink, 0) else {
            return Ok(None);
        };
        let start = self.out.len();
        // One byte more than may be kept, to tell "exactly at" from "past".
        let room = self.limit.saturating_sub(start).min(u32::MAX as usize);
        let read = io::Read::take(&mut *data, room as u64 + 1)
            .read_to_end(&mut self.out)
            .map_err(io_error(origin));
        let size = self.out.len() - start;
        // Past the limit with the header alone counts too: an archive of
        // empty entries with long names must not grow without bound.
        if read.is_err() || size > room || start > self.limit {
            self.out.truncate(offset);
            self.names.remove(normalize(name));
            read?;
            return Err(match start + size > self.limit {
                true => CpioError::OverLimit {
                    path: origin.to_owned(),
                    limit: self.limit,
                },
                false => CpioError::TooLarge(origin.to_owned()),
            });
        }
        let field = offset + FILESIZE_FIELD;
        self.out[field..field + 8].copy_from_slice(format!("{size:08x}").as_bytes());
        self.pad();
        Ok(Some(offset))
    }

    /// Raises the link count of the entry whose header is at `offset` (a
    /// regular file) to at least 2, so the kernel links later entries with
    /// the same inode number to it.
    pub fn mark_linked(&mut self, offset: usize) {
        let field = offset + NLINK_FIELD;
        if let Some(f) = self.out.get_mut(field..field + 8) {
            if f == b"00000001" {
                f.copy_from_slice(b"00000002");
            }
        }
    }

    /// Adds a directory; a no-op if it already exists.
    pub fn dir(&mut self, name: impl AsRef<[u8]>, mode: u32) {
        self.dir_at(name.as_ref(), mode, 0);
    }

    /// Adds a regular file (a later file of the same name replaces it when
    /// the kernel unpacks the archive). Panics if `data` is 4 GiB or more.
    pub fn file(&mut self, name: impl AsRef<[u8]>, mode: u32, data: &[u8]) {
        let ino = self.ino();
        let meta = Meta::root(S_IFREG | (mode & 0o7777));
        self.entry(name.as_ref(), ino, meta, 1, data);
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) {
        let ino = self.ino();
        let meta = Meta::root(S_IFLNK | 0o777);
        self.entry(name.as_ref(), ino, meta, 1, target.as_ref());
    }

    /// Adds a character device node `major:minor`.
    pub fn char_dev(&mut self, name: impl AsRef<[u8]>, mode: u32, major: u32, minor: u32) {
        let ino = self.ino();
        let meta = Meta {
            rdev: (major, minor),
            ..Meta::root(S_IFCHR | (mode & 0o7777))
        };
        self.entry(name.as_ref(), ino, meta, 1, &[]);
    }

    /// Copies a host directory tree into the archive root: directories,
    /// regular files (hard links kept), symlinks and device nodes, with their
    /// permission bits and mtimes. Sockets and fifos are skipped. Names the
    /// archive already has win: host entries colliding with them are skipped
    /// (a host directory still contributes its children if the existing
    /// entry is a directory too).
    pub fn tree(&mut self, host_dir: &Path) -> Result<(), CpioError> {
        self.walk(host_dir, &[])
    }

    /// Appends the trailer and returns the archive (its length is a multiple of 4).
    pub fn finish(mut self) -> Vec<u8> {
        self.header(b"TRAILER!!!", 0, Meta::default(), 1, 0);
        self.out
    }

    fn walk(&mut self, dir: &Path, prefix: &[u8]) -> Result<(), CpioError> {
        let mut entries = fs::read_dir(dir)
            .and_then(|d| d.collect::<io::Result<Vec<_>>>())
            .map_err(io_error(dir))?;
        // Sorted, so the same tree always gives the same archive.
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            self.check_stop(&path)?;
            // Headers and names count: a tree of empty entries has a size too.
            if self.out.len() > self.limit {
                return Err(CpioError::OverLimit {
                    path,
                    limit: self.limit,
                });
            }
            let mut name = prefix.to_vec();
            if !name.is_empty() {
                name.push(b'/');
            }
            name.extend_from_slice(entry.file_name().as_bytes());
            let meta = fs::symlink_metadata(&path).map_err(io_error(&path))?;
            let (kind, perm) = (meta.file_type(), meta.mode() & 0o7777);
            let mtime = u32::try_from(meta.mtime()).unwrap_or(0);
            match self.names.get(&name) {
                Some(&S_IFDIR) if kind.is_dir() => {
                    self.walk(&path, &name)?;
                    continue;
                }
                Some(_) => {
                    log::debug!(
                        "initramfs: {} is shadowed by kiln's /{}",
                        path.display(),
                        name.escape_ascii()
                    );
                    continue;
                }
                None => {}
            }
            if kind.is_dir() {
                self.dir_at(&name, perm, mtime);
                self.walk(&path, &name)?;
            } else if kind.is_file() {
                let size =
                    u32::try_from(meta.len()).map_err(|_| CpioError::TooLarge(path.clone()))?;
                if self.out.len().saturating_add(size as usize) > self.limit {
                    return Err(CpioError::OverLimit {
                        path,
                        limit: self.limit,
                    });
                }
                let key = (meta.dev(), meta.ino());
                let nlink = if meta.nlink() > 1 {
                    meta.nlink() as u32
                } else {
                    1
                };
                // Later names of a hard-linked file carry no data: the kernel
                // links them to the first one (same inode number, nlink > 1).
                if let Some(&ino) = self.links.get(&key).filter(|_| nlink > 1) {
                    let meta = Meta {
                        mtime,
                        ..Meta::root(S_IFREG | perm)
                    };
                    self.entry(&name, ino, meta, nlink, &[]);
                    continue;
                }
                let data = fs::read(&path).map_err(io_error(&path))?;
                if data.len() != size as usize {
                    let e = io::Error::other("file changed size while being read");
                    return Err(io_error(&path)(e));
                }
                let ino = self.ino();
                if nlink > 1 {
                    self.links.insert(key, ino);
                }
                let meta = Meta {
                    mtime,
                    ..Meta::root(S_IFREG | perm)
                };
                self.entry(&name, ino, meta, nlink, &data);
            } else if kind.is_symlink() {
                let target = fs::read_link(&path).map_err(io_error(&path))?;
                let ino = self.ino();
                let meta = Meta {
                    mtime,
                    ..Meta::root(S_IFLNK | 0o777)
                };
                self.entry(&name, ino, meta, 1, target.as_os_str().as_bytes());
            } else if kind.is_char_device() || kind.is_block_device() {
                let fmt = if kind.is_char_device() {
                    S_IFCHR
                } else {
                    S_IFBLK
                };
                let rdev = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
                let ino = self.ino();
                let meta = Meta {
                    mtime,
                    rdev,
                    ..Meta::root(fmt | perm)
                };
                self.entry(&name, ino, meta, 1, &[]);
            } else {
                log::debug!("initramfs: skipping {} (socket or fifo)", path.display());
            }
        }
        Ok(())
    }

    fn ino(&mut self) -> u32 {
        self.next_ino += 1;
        self.next_ino - 1
    }

    fn dir_at(&mut self, name: &[u8], mode: u32, mtime: u32) {
        if !self.contains(name) {
            let ino = self.ino();
            let meta = Meta {
                mtime,
                ..Meta::root(S_IFDIR | (mode & 0o7777))
            };
            self.entry(name, ino, meta, 2, &[]);
        }
    }

    fn entry(&mut self, name: &[u8], ino: u32, meta: Meta, nlink: u32, data: &[u8]) {
        // Callers check sizes of host files; kiln's own entries are small.
        let size = u32::try_from(data.len()).expect("cpio entry over 4 GiB");
        if self.entry_start(name, ino, meta, nlink, size).is_some() {
            self.out.extend_from_slice(data);
            self.pad();
        }
    }

    /// Writes the parents, the header and the name of an entry; its data
    /// follows. Returns the header's offset, or None for the root (which
    /// always exists and gets no entry).
    fn entry_start(
        &mut self,
        name: &[u8],
        ino: u32,
        meta: Meta,
        nlink: u32,
        size: u32,
    ) -> Option<usize> {
        let name = normalize(name);
        if name.is_empty() {
            return None;
        }
        // Parents first: the kernel does not create missing directories.
        // Shortest first, so a missing one's own parents are in by then: its
        // entry is written directly, not by walking them again (which costs
        // the cube of the depth: seconds for one 4 KiB name).
        for (i, _) in name.iter().enumerate().filter(|&(_, &b)| b == b'/') {
            let parent = normalize(&name[..i]);
            if !parent.is_empty() && !self.names.contains_key(parent) {
                let ino = self.ino();
                self.names.insert(parent.to_vec(), S_IFDIR);
                self.header(parent, ino, Meta::root(S_IFDIR | 0o755), 2, 0);
            }
        }
        self.names.insert(name.to_vec(), meta.mode & S_IFMT);
        let offset = self.out.len();
        self.header(name, ino, meta, nlink, size);
        Some(offset)
    }

    /// Writes a newc header and the name; the data follows 4-byte aligned.
    fn header(&mut self, name: &[u8], ino: u32, meta: Meta, nlink: u32, size: u32) {
        let namesize = name.len() as u32 + 1;
        let (rmajor, rminor) = meta.rdev;
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let fields = [
            ino, meta.mode, meta.uid, meta.gid, nlink, meta.mtime, size, 0, 0, rmajor, rminor,
            namesize, 0,
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name);
        self.out.push(0);
        self.pad();
    }

    /// The header (110 bytes) plus name, and the data, each end on a 4-byte
    /// boundary counted from the start of the archive.
    fn pad(&mut self) {
        self.out.resize(self.out.len().next_multiple_of(4), 0);
    }
}

fn normalize(name: &[u8]) -> &[u8] {
    let start = name.iter().position(|&b| b != b'/').unwrap_or(name.len());
    let end = name
        .iter()
        .rposition(|&b| b != b'/')
        .map_or(start, |i| i + 1);
    &name[start..end]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[derive(Debug, Clone, PartialEq)]
    pub(crate) struct Entry {
        /// Lossy UTF-8; `raw_name` has the bytes.
        pub name: String,
        pub raw_name: Vec<u8>,
        pub ino: u32,
        pub mode: u32,
        pub uid: u32,
        pub gid: u32,
        pub nlink: u32,
        pub mtime: u32,
        pub rdev: (u32, u32),
        pub data: Vec<u8>,
    }

    /// A strict newc reader: checks magic, alignment, zero padding, NUL
    /// terminators and that the trailer ends the archive.
    pub(crate) fn parse(buf: &[u8]) -> Vec<Entry> {
        let mut entries = Vec::new();
        let mut pos = 0;
        let pad = |p: usize| p.next_multiple_of(4);
        loop {
            assert_eq!(pos % 4, 0, "header at unaligned offset {pos}");
            let h = &buf[pos..pos + 110];
            assert_eq!(&h[..6], b"070701", "bad magic at {pos}");
            let f = |i: usize| {
                let s = std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let (size, namesize) = (f(6) as usize, f(11) as usize);
            assert_eq!((f(7), f(8), f(12)), (0, 0, 0), "devmajor, devminor, check");
            let name = &buf[pos + 110..pos + 110 + namesize];
            assert_eq!(name.last(), Some(&0), "name not NUL-terminated");
            let raw_name = name[..namesize - 1].to_vec();
            assert!(!raw_name.contains(&0), "NUL inside a name");
            let name = String::from_utf8_lossy(&raw_name).into_owned();
            let data_start = pad(pos + 110 + namesize);
            assert!(buf[pos + 110 + namesize..data_start]
                .iter()
                .all(|&b| b == 0));
            let data = buf[data_start..data_start + size].to_vec();
            let next = pad(data_start + size);
            assert!(buf[data_start + size..next].iter().all(|&b| b == 0));
            pos = next;
            if name == "TRAILER!!!" {
                assert_eq!(pos, buf.len(), "bytes after the trailer");
                return entries;
            }
            let e = Entry {
                name,
                raw_name,
                ino: f(0),
                mode: f(1),
                uid: f(2),
                gid: f(3),
                nlink: f(4),
                mtime: f(5),
                rdev: (f(9), f(10)),
                data,
            };
            entries.push(e);
        }
    }

    pub(crate) fn find<'a>(entries: &'a [Entry], name: &str) -> &'a Entry {
        entries
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name} missing"))
    }

    /// A scratch directory removed on drop.
    pub(crate) struct TempDir(pub(crate) PathBuf);
    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("kiln-cpio-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A host tree with the awkward cases: nesting, modes, links, a fifo
    /// and names that collide with kiln's.
    pub(crate) fn sample_tree(tag: &str) -> TempDir {
        let t = TempDir::new(tag);
        let p = |s: &str| t.0.join(s);
        fs::create_dir_all(p("usr/bin")).unwrap();
        fs::create_dir_all(p("tmp/sub")).unwrap();
        fs::create_dir(p("kiln")).unwrap();
        fs::write(p("usr/bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
        fs::set_permissions(p("usr/bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::write(p("tmp/sub/a b"), b"x").unwrap();
        fs::write(p("empty"), b"").unwrap();
        fs::hard_link(p("usr/bin/tool"), p("usr/bin/tool2")).unwrap();
        symlink("usr/bin", p("bin")).unwrap();
        symlink("/nowhere", p("dev")).unwrap(); // kiln's /dev must win
        fs::write(p("kiln/init"), b"not kiln's init").unwrap();
        fs::write(p("kiln/extra"), b"kept").unwrap();
        let fifo = std::ffi::CString::new(p("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        t
    }

    #[test]
    fn writes_aligned_entries_with_parents_first() {
        let mut cpio = CpioBuilder::new();
        // Every name and data length mod 4, to exercise each padding case.
        for n in 1..=8 {
            cpio.file(format!("d/{}", "n".repeat(n)), 0o644, &vec![b'x'; n - 1]);
        }
        cpio.symlink("/a/b/link", "../target");
        cpio.char_dev("dev/null", 0o666, 1, 3);
        cpio.dir("/a/", 0o700); // already created as a parent: ignored
        let archive = cpio.finish();
        assert_eq!(archive.len() % 4, 0);
        let entries = parse(&archive);
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(&names[..2], ["d", "d/n"]);
        assert_eq!(&names[9..], ["a", "a/b", "a/b/link", "dev", "dev/null"]);
        let mut inos: Vec<_> = entries.iter().map(|e| e.ino).collect();
        inos.dedup();
        assert_eq!(inos.len(), entries.len(), "inode numbers must be unique");
        assert_eq!(find(&entries, "d/nnnnn").data, b"xxxx");
        assert_eq!(find(&entries, "a").mode, 0o40755);
        let link = find(&entries, "a/b/link");
        assert_eq!(
            (link.mode, link.data.as_slice()),
            (0o120777, &b"../target"[..])
        );
        let null = find(&entries, "dev/null");
        assert_eq!(
            (null.mode, null.rdev, null.data.len()),
            (0o20666, (1, 3), 0)
        );
    }

    #[test]
    fn a_stop_request_ends_packing_at_the_next_entry() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let tree = sample_tree("stop");
        // Answers "stop" from its third question on.
        let asking = |asked: &Arc<AtomicUsize>| {
            let asked = asked.clone();
            Box::new(move || asked.fetch_add(1, Ordering::SeqCst) >= 2)
        };
        let asked = Arc::new(AtomicUsize::new(0));
        let mut cpio = CpioBuilder::new();
        cpio.stop_when(asking(&asked));
        let err = cpio.tree(&tree.0).unwrap_err();
        assert!(matches!(err, CpioError::Stopped(_)), "{err}");
        assert_eq!(asked.load(Ordering::SeqCst), 3, "one question per entry");
        assert_eq!(err.to_string().lines().count(), 1);
        // Entries added one by one (as from a tar archive) ask too.
        let asked = Arc::new(AtomicUsize::new(0));
        let mut cpio = CpioBuilder::new();
        cpio.stop_when(asking(&asked));
        let origin = Path::new("root.tar");
        let mut add = |name: &[u8]| {
            let ino = cpio.new_ino();
            let meta = Meta::root(S_IFREG | 0o644);
            cpio.entry_from_reader(name, ino, meta, 1, &mut &b"data"[..], origin)
        };
        assert!(add(b"a").is_ok() && add(b"b").is_ok());
        assert!(matches!(add(b"c"), Err(CpioError::Stopped(_))));
        let names: Vec<&[u8]> = cpio.names().collect();
        assert!(!names.contains(&&b"c"[..]), "{names:?}");
    }

    #[test]
    fn a_tree_past_the_limit_is_refused() {
        let tree = sample_tree("limit");
        fs::write(tree.0.join("usr/big"), vec![0u8; 64 << 10]).unwrap();
        let mut cpio = CpioBuilder::with_limit(32 << 10);
        let err = cpio.tree(&tree.0).unwrap_err();
        assert!(
            matches!(&err, CpioError::OverLimit { path, .. } if path.ends_with("usr/big")),
            "{err}"
        );
        assert_eq!(err.to_string().lines().count(), 1);
        let mut cpio = CpioBuilder::with_limit(1 << 20);
        cpio.tree(&tree.0).unwrap();
        // No data at all, only names: they count too.
        let dirs = TempDir::new("limit-dirs");
        for i in 0..100 {
            fs::create_dir(dirs.0.join(format!("{i:03}{}", "d".repeat(200)))).unwrap();
        }
        let mut cpio = CpioBuilder::with_limit(8 << 10);
        let err = cpio.tree(&dirs.0).unwrap_err();
        assert!(matches!(err, CpioError::OverLimit { .. }), "{err}");
    }

    #[test]
    fn reader_data_exactly_at_the_limit_fits() {
        let meta = Meta {
            mode: 0o100644,
            uid: 0,
            gid: 0,
            mtime: 0,
            rdev: (0, 0),
        };
        let origin = Path::new("data");
        // Where the data starts: the newc header (110 bytes) and the name
        // "f\0", padded to 4.
        let start = 112;
        for (size, fits) in [(100, true), (101, false)] {
            let mut cpio = CpioBuilder::with_limit(start + 100);
            let ino = cpio.new_ino();
            let data = vec![b'x'; size];
            let added = cpio.entry_from_reader(b"f", ino, meta, 1, &mut &data[..], origin);
            match fits {
                true => assert!(added.is_ok(), "{size} bytes: {:?}", added.err()),
                false => assert!(
                    matches!(added, Err(CpioError::OverLimit { .. })),
                    "{size} bytes: {:?}",
                    added
                ),
            }
        }
    }
}
