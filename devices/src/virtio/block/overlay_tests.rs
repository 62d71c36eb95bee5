//! The copy-on-write overlay against a reference model (a plain copy of the
//! base that takes the same operations), where its file goes, and its checks
//! of the base.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::overlay::{fd_path, memfd, named_then_unlinked, CHUNK};
use super::{DiskError, DiskImage, OverlayPlace};

/// Not a multiple of the chunk: the last chunk is short.
const SIZE: u64 = 5 * CHUNK + 3 * 512;

fn pattern(size: u64) -> Vec<u8> {
    (0..size).map(|i| (i * 7 + i / 512) as u8 | 1).collect()
}

/// A memfd base holding `pattern`, and an overlay disk over it (the base's
/// second descriptor is kept to look at it).
fn memfd_overlay(size: u64) -> (DiskImage, File) {
    let base = memfd().unwrap();
    base.write_all_at(&pattern(size), 0).unwrap();
    let look = base.try_clone().unwrap();
    let disk = DiskImage::overlay_on(base, memfd().unwrap(), Path::new("base.img"), None).unwrap();
    (disk, look)
}

fn contents(file: &File, size: u64) -> Vec<u8> {
    let mut buf = vec![0u8; size as usize];
    file.read_exact_at(&mut buf, 0).unwrap();
    buf
}

fn read(disk: &DiskImage, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    disk.read_at(&mut buf, offset).unwrap();
    buf
}

/// xorshift64*: a fixed, reproducible stream of operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random reads, writes, discards, write-zeroes and flushes, at sector
/// offsets and lengths as the device passes them, half of them near chunk
/// boundaries: every read equals the model's bytes, the base never changes
/// and the disk keeps the base's size.
#[test]
fn random_operations_match_a_plain_copy() {
    for seed in 1..=8u64 {
        let (disk, base) = memfd_overlay(SIZE);
        assert_eq!(disk.size(), SIZE);
        assert!(disk.supports_discard(), "a memfd overlay punches holes");
        let mut model = pattern(SIZE);
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let sectors = SIZE / 512;
        for step in 0..400 {
            // Half the requests start within two sectors of a chunk boundary.
            let start = match rng.below(2) {
                0 => rng.below(sectors),
                _ => {
                    let boundary = rng.below(SIZE / CHUNK + 1) * CHUNK / 512;
                    (boundary + rng.below(4)).saturating_sub(2).min(sectors - 1)
                }
            };
            let len = 1 + rng.below(3 * CHUNK / 512);
            // Reads and writes three times as often as the others.
            let kind = [0, 0, 0, 1, 1, 1, 2, 3, 4][rng.below(9) as usize] + 5 * rng.below(50) as u8;
            if let Err(e) = apply(&disk, &mut model, (kind, start, len)) {
                panic!("seed {seed} step {step}: {e}");
            }
        }
        assert!(read(&disk, 0, SIZE) == model, "seed {seed}: final contents");
        assert!(contents(&base, SIZE) == pattern(SIZE), "seed {seed}: base");
        assert_eq!(base.metadata().unwrap().len(), SIZE);
        let overlay = disk.overlay_file().unwrap().metadata().unwrap();
        assert_eq!(overlay.len(), SIZE, "seed {seed}: the overlay's size");
    }
}

/// Requests that straddle chunk boundaries, each side in a different state:
/// a partial write copies up the rest of its chunks from the base, a read
/// over written and unwritten chunks takes each from its own side, zeroes
/// over part of a chunk keep the rest of it.
#[test]
fn straddling_requests_take_each_chunk_from_its_side() {
    let (disk, base) = memfd_overlay(SIZE);
    let mut model = pattern(SIZE);
    // From the middle of chunk 0 to the middle of chunk 2.
    let (at, len) = (CHUNK / 2, 2 * CHUNK);
    disk.write_at(&vec![0xee; len as usize], at).unwrap();
    model[at as usize..(at + len) as usize].fill(0xee);
    // Chunks 0-2 are in the overlay now, 3-5 not: one read over all.
    assert!(read(&disk, 0, SIZE) == model);
    // The copied-up halves of chunks 0 and 2 came from the base.
    assert_eq!(read(&disk, 0, 16), pattern(16));
    // Zeroes from inside chunk 2 (written) into chunk 3 (not): the rest of
    // chunk 3 keeps the base's bytes, the zeroed part is not the base's.
    let (at, len) = (2 * CHUNK + CHUNK / 4, CHUNK);
    disk.write_zeroes(at, len).unwrap();
    model[at as usize..(at + len) as usize].fill(0);
    assert!(read(&disk, 0, SIZE) == model);
    // A discard of a whole chunk never written: zeroes, not the base.
    disk.punch_hole(4 * CHUNK, CHUNK).unwrap();
    model[(4 * CHUNK) as usize..(5 * CHUNK) as usize].fill(0);
    // A write into the short last chunk, up to the end of the disk.
    disk.write_at(&[0x11; 512], SIZE - 512).unwrap();
    model[(SIZE - 512) as usize..].fill(0x11);
    assert!(read(&disk, 0, SIZE) == model);
    assert!(contents(&base, SIZE) == pattern(SIZE), "the base changed");
}

/// The overlay is sparse: a disk nobody wrote costs no blocks, and a small
/// write costs about a chunk, not the image.
#[test]
fn the_overlay_holds_only_what_was_written() {
    let (disk, _base) = memfd_overlay(64 * CHUNK);
    let overlay = disk.overlay_file().unwrap();
    assert_eq!(overlay.metadata().unwrap().blocks(), 0);
    disk.write_at(&[1; 512], 10 * CHUNK + 512).unwrap();
    let bytes = overlay.metadata().unwrap().blocks() * 512;
    assert!(bytes <= 2 * CHUNK, "{bytes} bytes for a 512-byte write");
}

/// A directory of one test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kiln-overlay-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(std::fs::canonicalize(&dir).unwrap())
    }

    fn image(&self, size: u64) -> PathBuf {
        let path = self.0.join("base.img");
        std::fs::write(&path, pattern(size)).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The unnamed file goes into the directory named, else into the first of
/// the candidates that takes a file, else into memory; it has no name, and
/// a directory that cannot take it is named in the error.
#[test]
fn the_overlay_file_goes_where_it_is_told() {
    let t = TempDir::new("where");
    let path = t.image(4 * CHUNK);
    let elsewhere = t.0.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let disk = DiskImage::overlay(&path, OverlayPlace::Only(&elsewhere), None).unwrap();
    let file = disk.overlay_file().unwrap();
    assert!(fd_path(file).starts_with(&format!("{}/", elsewhere.display())));
    assert_eq!(
        file.metadata().unwrap().nlink(),
        0,
        "the overlay has no name"
    );
    assert_eq!(file.metadata().unwrap().mode() & 0o777, 0o600);
    disk.write_at(&[9; 4096], 0).unwrap();
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    drop(disk);

    let missing = t.0.join("missing");
    let candidates = [missing.clone(), elsewhere.clone()];
    let disk = DiskImage::overlay(&path, OverlayPlace::FirstOf(&candidates), None).unwrap();
    assert!(fd_path(disk.overlay_file().unwrap()).starts_with(&format!("{}/", elsewhere.display())));
    let disk = DiskImage::overlay(
        &path,
        OverlayPlace::FirstOf(std::slice::from_ref(&missing)),
        None,
    )
    .unwrap();
    assert!(fd_path(disk.overlay_file().unwrap()).starts_with("/memfd:kiln-overlay"));

    let e = DiskImage::overlay(&path, OverlayPlace::Only(&missing), None).unwrap_err();
    assert!(matches!(e, DiskError::OverlayFile { .. }), "{e:?}");
    assert!(
        e.to_string().contains(&missing.display().to_string()),
        "{e}"
    );
    assert!(
        std::fs::read(&path).unwrap() == pattern(4 * CHUNK),
        "the base changed"
    );
    // Where O_TMPFILE is missing: a named file, unlinked at once.
    let file = named_then_unlinked(&elsewhere).unwrap();
    assert_eq!(file.metadata().unwrap().nlink(), 0);
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}

/// The base is locked shared: a kiln that writes the image (`--disk`, an
/// exclusive lock) excludes the overlay and the overlay excludes it, while
/// readers share it.
#[test]
fn the_base_is_locked_shared() {
    let t = TempDir::new("lock");
    let path = t.image(2 * CHUNK);
    let place = OverlayPlace::Only(&t.0);
    let writer = DiskImage::open(&path, false, None).unwrap();
    let e = DiskImage::overlay(&path, place, None).unwrap_err();
    assert!(matches!(e, DiskError::Locked(_)), "{e:?}");
    drop(writer);
    let overlay = DiskImage::overlay(&path, place, None).unwrap();
    let e = DiskImage::open(&path, false, None).unwrap_err();
    assert!(matches!(e, DiskError::Locked(_)), "{e:?}");
    let _reader = DiskImage::open(&path, true, None).unwrap();
    let _second = DiskImage::overlay(&path, place, None).unwrap();
    drop(overlay);
    // Bad bases get the checks of every image.
    let e = DiskImage::overlay(&t.0, place, None).unwrap_err();
    assert!(matches!(e, DiskError::Directory(_)), "{e:?}");
    let odd = t.0.join("odd.img");
    std::fs::write(&odd, [0u8; 1000]).unwrap();
    let e = DiskImage::overlay(&odd, place, None).unwrap_err();
    assert!(matches!(e, DiskError::BadSize { .. }), "{e:?}");
}

/// A base whose size or modification time is not what it was when it was
/// opened is refused, when the disk is built and when asked later.
#[test]
fn a_changed_base_is_refused() {
    let t = TempDir::new("changed");
    let path = t.image(2 * CHUNK);
    let disk = DiskImage::overlay(&path, OverlayPlace::Only(&t.0), None).unwrap();
    disk.check_base().unwrap();
    // Someone who ignores the lock rewrites the image, same size, and its
    // modification time moves (set explicitly: the clock is coarse).
    let other = OpenOptions::new().write(true).open(&path).unwrap();
    other.write_all_at(b"changed", 0).unwrap();
    other
        .set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1))
        .unwrap();
    let e = disk.check_base().unwrap_err();
    assert!(matches!(e, DiskError::BaseChanged(_)), "{e:?}");
    assert!(e.to_string().contains("base.img"), "{e}");

    // While the disk is built: the stamp is taken when the base is opened,
    // checked once the overlay is made. A base that grows in between:
    let base = memfd().unwrap();
    base.set_len(CHUNK).unwrap();
    let stamp = super::overlay::BaseStamp::of(&base).unwrap();
    base.set_len(2 * CHUNK).unwrap();
    let e = super::overlay::Overlay::new(base, stamp, memfd().unwrap()).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    // An unchanged one is taken.
    let base = memfd().unwrap();
    base.set_len(CHUNK).unwrap();
    let stamp = super::overlay::BaseStamp::of(&base).unwrap();
    super::overlay::Overlay::new(base, stamp, memfd().unwrap()).unwrap();
}

/// One operation of [`any_operations_match_a_plain_copy`]: kind, first
/// sector, sectors.
type Op = (u8, u64, u64);

/// Applies `op` to the disk and the model; a read compares them.
fn apply(disk: &DiskImage, model: &mut [u8], (kind, sector, sectors): Op) -> Result<(), String> {
    let total = model.len() as u64 / 512;
    let start = sector % total;
    let len = sectors.clamp(1, total - start) * 512;
    let (offset, end) = ((start * 512) as usize, (start * 512 + len) as usize);
    match kind % 5 {
        0 => {
            if read(disk, offset as u64, len) != model[offset..end] {
                return Err(format!("read of {len} at {offset} differs"));
            }
        }
        1 => {
            let data: Vec<u8> = (0..len).map(|i| (i as u8) ^ kind ^ 0xa5).collect();
            disk.write_at(&data, offset as u64).unwrap();
            model[offset..end].copy_from_slice(&data);
        }
        2 => {
            disk.punch_hole(offset as u64, len).unwrap();
            model[offset..end].fill(0);
        }
        3 => {
            disk.write_zeroes(offset as u64, len).unwrap();
            model[offset..end].fill(0);
        }
        _ => disk.sync().unwrap(),
    }
    Ok(())
}

proptest::proptest! {
    /// Any sequence of operations (shrunk to a shortest failing one when it
    /// breaks): the disk reads as a plain copy that took the same operations.
    #[test]
    fn any_operations_match_a_plain_copy(
        ops in proptest::collection::vec(
            (proptest::prelude::any::<u8>(), 0..SIZE / 512, 1..3 * CHUNK / 512),
            1..40,
        ),
    ) {
        let (disk, base) = memfd_overlay(SIZE);
        let mut model = pattern(SIZE);
        for op in ops {
            if let Err(e) = apply(&disk, &mut model, op) {
                proptest::prop_assert!(false, "{:?}: {}", op, e);
            }
        }
        proptest::prop_assert!(read(&disk, 0, SIZE) == model, "final contents");
        proptest::prop_assert!(contents(&base, SIZE) == pattern(SIZE), "the base changed");
    }
}

/// A snapshot's overlay disk: the overlay copied sparse with its chunk map
/// starts a new disk that reads exactly what the old one did (written
/// chunks, zeroed ranges, the base elsewhere), writes only its own new
/// overlay (the saved copy is never written), and is refused over a base
/// that changed or with a chunk map that does not fit.
#[test]
fn a_saved_overlay_starts_a_new_disk_that_reads_the_same() {
    let t = TempDir::new("saved");
    let path = t.image(SIZE);
    let place = OverlayPlace::Only(&t.0);
    let disk = DiskImage::overlay(&path, place, None).unwrap();
    disk.write_at(&[0xaa; 4096], CHUNK + 512).unwrap();
    disk.write_zeroes(3 * CHUNK, CHUNK).unwrap();
    disk.write_at(&[0xbb; 512], SIZE - 512).unwrap();
    let state = disk.overlay_state().unwrap();
    let saved = super::overlay::unnamed_file(&t.0).unwrap();
    super::copy_sparse(disk.overlay_file().unwrap(), &saved, SIZE).unwrap();
    assert!(
        saved.metadata().unwrap().blocks() * 512 < SIZE,
        "the copy is not sparse"
    );
    let saved_bytes = contents(&saved, SIZE);

    let restored = DiskImage::overlay_restored(&path, place, None, &saved, &state).unwrap();
    assert_eq!(read(&restored, 0, SIZE), read(&disk, 0, SIZE));
    restored.write_at(&[0xcc; 512], 0).unwrap();
    assert_eq!(read(&restored, 0, 512), vec![0xcc; 512]);
    assert_eq!(
        contents(&saved, SIZE),
        saved_bytes,
        "the saved copy was written"
    );
    assert_eq!(
        read(&disk, 0, 512),
        pattern(512),
        "the first disk saw the write"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        pattern(SIZE),
        "the base changed"
    );

    // A chunk map of another size, or with a chunk past the disk's end.
    let mut bad = state.clone();
    bad.chunks.push(0);
    let e = DiskImage::overlay_restored(&path, place, None, &saved, &bad).unwrap_err();
    assert!(
        matches!(&e, DiskError::Open { source, .. } if source.kind() == std::io::ErrorKind::InvalidInput),
        "{e:?}"
    );
    let mut bad = state.clone();
    bad.chunks[0] |= 1 << 63; // the disk has 6 chunks
    let e = DiskImage::overlay_restored(&path, place, None, &saved, &bad).unwrap_err();
    assert!(matches!(e, DiskError::Open { .. }), "{e:?}");

    // The base changed since the save.
    drop((disk, restored));
    let other = OpenOptions::new().write(true).open(&path).unwrap();
    other
        .set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1))
        .unwrap();
    let e = DiskImage::overlay_restored(&path, place, None, &saved, &state).unwrap_err();
    assert!(matches!(e, DiskError::BaseChanged(_)), "{e:?}");
}
