//! Root file systems: what `--rootfs PATH` is, and how kiln boots it.
//!
//! - a host **directory** or a **tar archive** (plain or gzip, as `docker
//!   export` writes it) is packed into the initramfs next to kiln's init;
//!   the archive is converted entry by entry in memory, never unpacked on
//!   the host;
//! - an **ext2/3/4 image** is attached as the first virtio-blk disk
//!   (`/dev/vda`, serial `kiln-rootfs`): a copy-on-write disk over the image,
//!   its writes in a private unnamed file (next to the image, or in
//!   `scratch_dir`) that disappears with the VM; kiln's init mounts it and
//!   switches root into it (`kiln.root=/dev/vda` on the kernel command line).
//!
//! The kind is told by content, not by the file name. The original is only
//! ever read.

mod scratch;
mod tar;

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::cpio::{CpioBuilder, CpioError};

pub use scratch::{root_disk, root_disk_restored};
pub use tar::append_tar;

/// The virtio-blk serial of an image root.
pub const IMAGE_DISK_ID: &str = "kiln-rootfs";
/// Where the guest finds an image root: it is always the first disk.
pub const IMAGE_DEVICE: &str = "/dev/vda";

/// From this much initramfs on (kiln's init and a directory or tar root),
/// kiln warns: the guest kernel unpacks every byte before anything runs. On
/// this project's PVM host (guest kernel code emulated) that took ~7 s per
/// MiB (32 MiB of random data added 236 s to an 80 s boot, the host shared
/// with other builds), so 16 MiB adds a minute or more there (the root
/// lives in guest RAM too), a fraction of a second on hardware.
pub const LARGE_PACKED_ROOT: usize = 16 << 20;

/// Where the ext2/3/4 superblock magic (0xEF53, little-endian) lies.
const EXT_MAGIC_OFFSET: usize = 1024 + 56;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const TAR_BLOCK: usize = 512;

/// A root file system and how kiln boots it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rootfs {
    /// A host directory, packed into the initramfs.
    Directory(PathBuf),
    /// A tar archive, converted into initramfs entries.
    Tar {
        /// The archive.
        path: PathBuf,
        /// Whether it is gzip-compressed.
        gzip: bool,
    },
    /// An ext2/3/4 file system image, attached as a copy-on-write disk.
    Image(PathBuf),
}

/// Why a `rootfs` cannot be used. Each message names the path.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The path cannot be opened or read (missing, no permission, ...).
    #[error("rootfs {}: {source}", path.display())]
    Read {
        /// The root as configured.
        path: PathBuf,
        /// Why it cannot be read.
        #[source]
        source: io::Error,
    },
    /// Neither a directory, a tar archive (plain or gzip) nor an ext2/3/4
    /// image, judged by its content.
    #[error(
        "rootfs {}: not a directory, a tar archive (plain or gzip) or an ext2/3/4 image",
        .0.display()
    )]
    Unknown(PathBuf),
    /// A shared root (`DIR,share`) that is not a directory.
    #[error(
        "rootfs {},share: not a directory (only a directory root is shared)",
        .0.display()
    )]
    NotShareable(PathBuf),
    /// Gzip-compressed, but what it holds is not a tar archive.
    #[error("rootfs {}: gzip data, but not a gzip-compressed tar archive", .0.display())]
    GzipNotTar(PathBuf),
}

/// The root kiln packs into the initramfs or attaches as a disk: none for
/// a shared root (`rootfs_share`, served by a virtiofsd like the shares),
/// which must be a directory.
pub(crate) fn packed_or_attached(
    config: &crate::config::VmConfig,
) -> Result<Option<Rootfs>, RootfsError> {
    let Some(path) = config.rootfs.as_deref() else {
        return Ok(None);
    };
    if config.rootfs_share.is_none() {
        return Rootfs::detect(path).map(Some);
    }
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(None),
        Ok(_) => Err(RootfsError::NotShareable(path.to_owned())),
        Err(source) => Err(RootfsError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

impl Rootfs {
    /// Tells what `path` is by looking at it (a directory) or at its first
    /// bytes (tar header, gzip magic, ext superblock magic).
    pub fn detect(path: &Path) -> Result<Self, RootfsError> {
        let read_err = |source| RootfsError::Read {
            path: path.to_owned(),
            source,
        };
        // Look before opening: opening a FIFO would block.
        let meta = std::fs::metadata(path).map_err(read_err)?;
        if meta.is_dir() {
            return Ok(Self::Directory(path.to_owned()));
        }
        if !meta.is_file() {
            return Err(RootfsError::Unknown(path.to_owned()));
        }
        let mut head = Vec::with_capacity(2048);
        File::open(path)
            .and_then(|f| f.take(2048).read_to_end(&mut head))
            .map_err(read_err)?;
        if head.starts_with(&GZIP_MAGIC) {
            let mut block = Vec::with_capacity(TAR_BLOCK);
            // A decoding error here means "not a gzip-compressed tar".
            let decoded = flate2::read::MultiGzDecoder::new(File::open(path).map_err(read_err)?)
                .take(TAR_BLOCK as u64)
                .read_to_end(&mut block);
            return match decoded.is_ok() && is_tar_header(&block) {
                true => Ok(Self::Tar {
                    path: path.to_owned(),
                    gzip: true,
                }),
                false => Err(RootfsError::GzipNotTar(path.to_owned())),
            };
        }
        if head.get(EXT_MAGIC_OFFSET..EXT_MAGIC_OFFSET + 2) == Some(&[0x53, 0xef]) {
            return Ok(Self::Image(path.to_owned()));
        }
        if is_tar_header(&head) {
            return Ok(Self::Tar {
                path: path.to_owned(),
                gzip: false,
            });
        }
        Err(RootfsError::Unknown(path.to_owned()))
    }

    /// Adds a directory or tar root to `cpio` (an image adds nothing: it
    /// is a disk). Names already in `cpio` are kiln's and win.
    pub fn pack(&self, cpio: &mut CpioBuilder) -> Result<(), CpioError> {
        match self {
            Self::Directory(dir) => cpio.tree(dir),
            Self::Tar { path, gzip } => {
                let file = File::open(path).map_err(|source| CpioError::Io {
                    path: path.clone(),
                    source,
                })?;
                let file = BufReader::with_capacity(256 << 10, file);
                let data: Box<dyn Read> = match gzip {
                    true => Box::new(flate2::bufread::MultiGzDecoder::new(file)),
                    false => Box::new(file),
                };
                let budget = archive_budget(cpio.limit());
                let stats = append_tar(cpio, Budget::new(data, budget), path)?;
                log::debug!("rootfs {}: {stats:?}", path.display());
                Ok(())
            }
            Self::Image(_) => Ok(()),
        }
    }

    /// The one-line warning for a directory or tar root that makes an
    /// initramfs of `packed` bytes, when that is [`LARGE_PACKED_ROOT`] or
    /// more.
    pub fn large_root_warning(&self, packed: usize) -> Option<String> {
        let path = match self {
            Self::Directory(path) | Self::Tar { path, .. } => path,
            Self::Image(_) => return None,
        };
        (packed >= LARGE_PACKED_ROOT).then(|| {
            format!(
                "rootfs {}: {} MiB of initramfs, which the guest kernel unpacks before anything runs (minutes where its code is emulated, as on PVM hosts); an ext4 image root needs no unpacking: mkfs.ext4 -d DIR root.img SIZE",
                path.display(),
                packed.div_ceil(1 << 20)
            )
        })
    }
}

/// How much (decompressed) archive kiln reads for an initramfs of at most
/// `limit` bytes: tar spends 512-byte headers and padding where newc spends
/// about 120 bytes, and refused entries take room too. It stops a gzip bomb
/// or a giant pax record from filling the host's memory.
fn archive_budget(limit: usize) -> u64 {
    (limit as u64).saturating_mul(2).saturating_add(64 << 20)
}

/// A reader that fails once it has given `budget` bytes.
struct Budget<R> {
    inner: R,
    left: u64,
    budget: u64,
}

impl<R> Budget<R> {
    fn new(inner: R, budget: u64) -> Self {
        Self {
            inner,
            left: budget,
            budget,
        }
    }
}

impl<R: Read> Read for Budget<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 && !buf.is_empty() {
            return Err(io::Error::other(format!(
                "the archive holds more than {} MiB, more than guest memory can take \
                 (raise --mem or use an ext4 image)",
                self.budget >> 20
            )));
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Whether `block` starts with a tar header: the ustar magic (POSIX
/// "ustar\0" or GNU "ustar ") or, for old v7 archives without one, a
/// header checksum that adds up.
fn is_tar_header(block: &[u8]) -> bool {
    let Some(block) = block.get(..TAR_BLOCK) else {
        return false;
    };
    if block.iter().all(|&b| b == 0) {
        return false;
    }
    let magic = &block[257..263];
    magic == b"ustar\0" || magic == b"ustar " || checksum_matches(block)
}

/// The header checksum: the sum of the header bytes with the checksum field
/// read as spaces, stored in octal. Some old tars summed signed bytes.
fn checksum_matches(block: &[u8]) -> bool {
    let field = &block[148..156];
    let digits: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|b| (b'0'..=b'7').contains(b))
        .collect();
    // Only ASCII octal digits were kept, so the text is valid UTF-8.
    let text = std::str::from_utf8(&digits).unwrap_or_default();
    let Ok(stored) = i64::from_str_radix(text, 8) else {
        return false;
    };
    let bytes = || block[..148].iter().chain(&block[156..]);
    let unsigned: i64 = bytes().map(|&b| i64::from(b)).sum::<i64>() + 8 * 32;
    let signed: i64 = bytes().map(|&b| i64::from(b as i8)).sum::<i64>() + 8 * 32;
    stored == unsigned || stored == signed
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A scratch directory for one test, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);
    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("kiln-rootfs-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// README: a directory or tar root of 16 MiB of initramfs or more gets
    /// a warning naming it, its size and the image root; an image never.
    #[test]
    fn a_large_packed_root_gets_one_warning_line() {
        let dir = Rootfs::Directory("/r/dir".into());
        let tar = Rootfs::Tar {
            path: "/r/root.tar.gz".into(),
            gzip: true,
        };
        assert_eq!(LARGE_PACKED_ROOT, 16 << 20);
        assert_eq!(dir.large_root_warning(LARGE_PACKED_ROOT - 1), None);
        let w = dir.large_root_warning(LARGE_PACKED_ROOT).unwrap();
        assert!(w.starts_with("rootfs /r/dir: 16 MiB of initramfs, "), "{w}");
        assert!(w.contains("ext4 image root") && !w.contains('\n'), "{w}");
        let w = tar.large_root_warning(259_000_000).unwrap();
        assert!(
            w.starts_with("rootfs /r/root.tar.gz: 248 MiB of initramfs, "),
            "{w}"
        );
        let image = Rootfs::Image("/r/root.img".into());
        assert_eq!(image.large_root_warning(usize::MAX), None);
    }

    /// A one-file tar archive written by the `tar` crate (ustar or GNU).
    fn small_tar(gnu: bool) -> Vec<u8> {
        let mut b = ::tar::Builder::new(Vec::new());
        let mut h = match gnu {
            true => ::tar::Header::new_gnu(),
            false => ::tar::Header::new_ustar(),
        };
        h.set_size(2);
        h.set_mode(0o644);
        b.append_data(&mut h, "etc/x", &b"hi"[..]).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn detects_each_kind_by_content() {
        let t = TempDir::new("detect");
        let p = |n: &str| t.0.join(n);
        assert_eq!(
            Rootfs::detect(&t.0).unwrap(),
            Rootfs::Directory(t.0.clone())
        );

        // The extension does not matter: a tar named .img is a tar.
        std::fs::write(p("root.img"), small_tar(false)).unwrap();
        std::fs::write(p("gnu"), small_tar(true)).unwrap();
        for name in ["root.img", "gnu"] {
            assert_eq!(
                Rootfs::detect(&p(name)).unwrap(),
                Rootfs::Tar {
                    path: p(name),
                    gzip: false
                }
            );
        }
        // A v7 header: no magic, valid checksum.
        let mut v7 = small_tar(false);
        v7[257..265].fill(0);
        let sum: u32 = v7[..512]
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(b)
                }
            })
            .sum();
        v7[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        std::fs::write(p("v7.tar"), &v7).unwrap();
        assert!(matches!(
            Rootfs::detect(&p("v7.tar")),
            Ok(Rootfs::Tar { gzip: false, .. })
        ));

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&small_tar(false)).unwrap();
        std::fs::write(p("root.tgz"), gz.finish().unwrap()).unwrap();
        assert_eq!(
            Rootfs::detect(&p("root.tgz")).unwrap(),
            Rootfs::Tar {
                path: p("root.tgz"),
                gzip: true
            }
        );

        let mut ext = vec![0u8; 4096];
        ext[1080..1082].copy_from_slice(&0xef53u16.to_le_bytes());
        std::fs::write(p("disk.tar"), &ext).unwrap();
        assert_eq!(
            Rootfs::detect(&p("disk.tar")).unwrap(),
            Rootfs::Image(p("disk.tar"))
        );
    }

    /// A shared root is a directory, never packed; anything else (an
    /// image or archive included) is refused in one line.
    #[test]
    fn a_shared_root_is_a_directory_and_is_not_packed() {
        let t = TempDir::new("shared-root");
        let mut config = crate::config::VmConfig::new("vmlinux");
        config.rootfs = Some(t.0.clone());
        assert_eq!(
            packed_or_attached(&config).unwrap(),
            Some(Rootfs::Directory(t.0.clone()))
        );
        config.rootfs_share = Some(crate::config::RootShare::Overlay);
        assert_eq!(packed_or_attached(&config).unwrap(), None);
        let tar = t.0.join("root.tar");
        std::fs::write(&tar, small_tar(false)).unwrap();
        config.rootfs = Some(tar.clone());
        let e = packed_or_attached(&config).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "rootfs {},share: not a directory (only a directory root is shared)",
                tar.display()
            )
        );
        config.rootfs = Some(t.0.join("missing"));
        let e = packed_or_attached(&config).unwrap_err().to_string();
        assert!(e.contains("No such file"), "{e}");
    }

    #[test]
    fn rejects_everything_else_in_one_line() {
        let t = TempDir::new("reject");
        let p = |n: &str| t.0.join(n);
        let mut random = vec![0u8; 4096];
        for (i, b) in random.iter_mut().enumerate() {
            *b = (i * 7919 % 251) as u8 + 1;
        }
        let mut bad_sum = small_tar(false);
        bad_sum[257..263].fill(b'x'); // no magic, and now the checksum is off
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"just some text, not a tar").unwrap();
        let cases: [(&str, Vec<u8>); 6] = [
            ("random", random),
            ("empty", Vec::new()),
            ("zeros.tar", vec![0; 10240]), // an empty archive holds no root
            ("short", b"ustar".to_vec()),
            ("badsum.tar", bad_sum),
            ("text.gz", gz.finish().unwrap()),
        ];
        for (name, data) in cases {
            std::fs::write(p(name), data).unwrap();
            let e = Rootfs::detect(&p(name)).unwrap_err().to_string();
            assert_eq!(e.lines().count(), 1, "{e}");
            assert!(
                e.starts_with(&format!("rootfs {}: ", p(name).display())),
                "{e}"
            );
        }
        std::fs::write(p("truncated.gz"), [0x1f, 0x8b, 8]).unwrap();
        assert!(matches!(
            Rootfs::detect(&p("truncated.gz")),
            Err(RootfsError::GzipNotTar(_))
        ));
        let e = Rootfs::detect(&p("missing")).unwrap_err().to_string();
        assert!(e.contains("missing") && e.contains("No such file"), "{e}");
        let fifo = std::ffi::CString::new(p("fifo").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        assert!(matches!(
            Rootfs::detect(&p("fifo")),
            Err(RootfsError::Unknown(_))
        ));
    }
}
