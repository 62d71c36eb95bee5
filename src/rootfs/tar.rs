//! A tar archive converted into initramfs (newc) entries, in one pass and
//! in memory: nothing is unpacked on the host, and the archive is only read.
//!
//! Every entry keeps its mode, owner and mtime: regular files, directories,
//! symlinks, hard links (newc links entries that share an inode number),
//! character and block devices and fifos. GNU long names and pax `path`,
//! `linkpath`, `size`, `uid` and `gid` records and GNU sparse files are
//! decoded by the `tar` crate.
//!
//! The archive is untrusted. Names are made relative (a leading `/` is
//! dropped, as GNU tar does); names with a `..` component or a NUL byte, and
//! entries below a symlink or a non-directory the archive made, are skipped
//! (the kernel's unpacker follows symlinks in parent directories, so such an
//! entry could land anywhere, kiln's init included). Names kiln's own
//! entries already use win, as for a directory root: a directory there only
//! contributes its children.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use ::tar::EntryType;

use crate::cpio::{CpioBuilder, CpioError, Meta};

/// The kernel's PATH_MAX: the unpacker ignores longer names.
const PATH_MAX: usize = 4096;
/// The owner given to ids that do not fit in 32 bits ("nobody").
const NOBODY: u32 = 65534;

/// What a conversion did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TarStats {
    /// Entries added to the initramfs.
    pub added: usize,
    /// Entries left out because kiln's own entries have their names.
    pub shadowed: usize,
    /// Entries refused (unsafe names, unsupported types, dangling links).
    pub skipped: usize,
}

/// An entry a later hard link may point to.
enum Linkable {
    /// A regular file: the link shares its inode.
    File { offset: usize, ino: u32, meta: Meta },
    /// A symlink, device or fifo: the link becomes a copy.
    Copy { meta: Meta, target: Vec<u8> },
}

/// Appends the entries of the tar archive read from `archive` (already
/// decompressed) to `cpio`; `path` names the archive in messages. Names the
/// archive already holds when this starts are kiln's and win.
pub fn append_tar(
    cpio: &mut CpioBuilder,
    archive: impl Read,
    path: &Path,
) -> Result<TarStats, CpioError> {
    let reserved: HashSet<Vec<u8>> = cpio.names().map(<[u8]>::to_vec).collect();
    let mut linkable: HashMap<Vec<u8>, Linkable> = HashMap::new();
    let mut stats = TarStats::default();
    // The first refused entry and why, for the warning.
    let mut first_skipped: Option<String> = None;
    let mut last_name = Vec::new();
    let bad = |reason: String| CpioError::BadArchive {
        path: path.to_owned(),
        reason,
    };
    let mut archive = ::tar::Archive::new(archive);
    let entries = archive.entries().map_err(|e| bad(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| match last_name.is_empty() {
            true => bad(e.to_string()),
            false => bad(format!("{e} (after '{}')", last_name.escape_ascii())),
        })?;
        let kind = entry.header().entry_type();
        if kind == EntryType::XGlobalHeader {
            continue;
        }
        let raw = entry.path_bytes().into_owned();
        let mut skip = |why: &str| {
            stats.skipped += 1;
            first_skipped.get_or_insert_with(|| format!("'{}': {why}", raw.escape_ascii()));
        };
        let name = match clean_name(&raw) {
            Ok(name) if name.is_empty() => continue, // the root itself
            Ok(name) => name,
            Err(why) => {
                skip(why);
                continue;
            }
        };
        last_name.clone_from(&name);
        let what = |e: io::Error| bad(format!("'{}': {e}", name.escape_ascii()));
        let header = entry.header();
        let perm = header.mode().map_err(what)? & 0o7777;
        let meta = Meta {
            mode: perm,
            uid: u32::try_from(header.uid().map_err(what)?).unwrap_or(NOBODY),
            gid: u32::try_from(header.gid().map_err(what)?).unwrap_or(NOBODY),
            mtime: u32::try_from(header.mtime().map_err(what)?).unwrap_or(0),
            rdev: (0, 0),
        };
        let is_dir = kind == EntryType::Directory;
        if let Some(why) = parent_problem(cpio, &reserved, &name) {
            skip(why);
            continue;
        }
        if reserved.contains(&name) {
            if !(is_dir && cpio.file_type(&name) == Some(libc::S_IFDIR)) {
                log::debug!(
                    "rootfs: {} is shadowed by kiln's /{}",
                    path.display(),
                    name.escape_ascii()
                );
            }
            stats.shadowed += 1;
            continue;
        }
        let origin = PathBuf::from(format!("{}: {}", path.display(), name.escape_ascii()));
        let ino = cpio.new_ino();
        let added = match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let meta = Meta {
                    mode: libc::S_IFREG | perm,
                    ..meta
                };
                let expected = entry.size();
                let mut counted = Counted {
                    inner: &mut entry,
                    n: 0,
                };
                let offset = cpio.entry_from_reader(&name, ino, meta, 1, &mut counted, &origin)?;
                if counted.n != expected {
                    let (n, expected) = (counted.n, expected);
                    return Err(bad(format!(
                        "'{}' is cut short ({n} of {expected} bytes)",
                        name.escape_ascii()
                    )));
                }
                offset.map(|offset| Linkable::File { offset, ino, meta })
            }
            EntryType::Directory => {
                let meta = Meta {
                    mode: libc::S_IFDIR | perm,
                    ..meta
                };
                cpio.entry_from_reader(&name, ino, meta, 2, &mut io::empty(), &origin)?;
                linkable.remove(&name);
                stats.added += 1;
                continue;
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                if target.is_empty() || target.contains(&0) || target.len() >= PATH_MAX {
                    skip("symlink target empty, too long or with a NUL byte");
                    continue;
                }
                let meta = Meta {
                    mode: libc::S_IFLNK | 0o777,
                    ..meta
                };
                cpio.entry_from_reader(&name, ino, meta, 1, &mut &target[..], &origin)?;
                Some(Linkable::Copy { meta, target })
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let fmt = match kind {
                    EntryType::Char => libc::S_IFCHR,
                    EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                // GNU tar leaves the device fields of a fifo blank.
                let (major, minor) = match kind {
                    EntryType::Fifo => (0, 0),
                    _ => (
                        header.device_major().map_err(what)?.unwrap_or(0),
                        header.device_minor().map_err(what)?.unwrap_or(0),
                    ),
                };
                let meta = Meta {
                    mode: fmt | perm,
                    rdev: (major, minor),
                    ..meta
                };
                cpio.entry_from_reader(&name, ino, meta, 1, &mut io::empty(), &origin)?;
                Some(Linkable::Copy {
                    meta,
                    target: Vec::new(),
                })
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().unwrap_or_default();
                let target = clean_name(&target).ok();
                match target.as_ref().and_then(|t| linkable.get(t)) {
                    Some(&Linkable::File { offset, ino, meta }) => {
                        cpio.mark_linked(offset);
                        cpio.entry_from_reader(&name, ino, meta, 2, &mut io::empty(), &origin)?;
                        Some(Linkable::File { offset, ino, meta })
                    }
                    Some(Linkable::Copy { meta, target }) => {
                        let (meta, target) = (*meta, target.clone());
                        cpio.entry_from_reader(&name, ino, meta, 1, &mut &target[..], &origin)?;
                        Some(Linkable::Copy { meta, target })
                    }
                    None => {
                        skip("hard link to an entry the archive did not add before it");
                        continue;
                    }
                }
            }
            other => {
                let kind = other.as_byte().escape_ascii();
                skip(&format!("unsupported entry type '{kind}'"));
                continue;
            }
        };
        stats.added += 1;
        match added {
            Some(l) => linkable.insert(name, l),
            None => linkable.remove(&name),
        };
    }
    if let Some(first) = first_skipped {
        log::warn!(
            "rootfs {}: skipped {} unsafe or unsupported entries (first {first})",
            path.display(),
            stats.skipped
        );
    }
    Ok(stats)
}

/// Why an entry named `name` cannot go into the archive because of one of
/// its parents: a symlink (the kernel would follow it), anything else that is
/// not a directory, or a name of kiln's that is not a directory.
fn parent_problem(
    cpio: &CpioBuilder,
    reserved: &HashSet<Vec<u8>>,
    name: &[u8],
) -> Option<&'static str> {
    for (i, _) in name.iter().enumerate().filter(|&(_, &b)| b == b'/') {
        let parent = &name[..i];
        match cpio.file_type(parent) {
            None | Some(libc::S_IFDIR) => {}
            Some(libc::S_IFLNK) => return Some("below a symlink"),
            Some(_) if reserved.contains(parent) => return Some("below a file of kiln's"),
            Some(_) => return Some("below a file that is not a directory"),
        }
    }
    None
}

/// The archive name as a path relative to the root: empty and `.`
/// components dropped, so a leading `/` goes too (as GNU tar does). Names
/// with a `..` component or a NUL byte, or too long for the kernel, are
/// refused.
fn clean_name(raw: &[u8]) -> Result<Vec<u8>, &'static str> {
    if raw.contains(&0) {
        return Err("NUL byte in the name");
    }
    let mut out = Vec::with_capacity(raw.len());
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("'..' in the name"),
            _ => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(part);
            }
        }
    }
    if out.len() >= PATH_MAX {
        return Err("name longer than the kernel's PATH_MAX");
    }
    Ok(out)
}

/// Counts the bytes read through it.
struct Counted<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
