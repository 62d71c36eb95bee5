//! virtio-blk tests against guest memory and a mock split queue: normal
//! requests, hostile chains, image checks, and a property test over random
//! descriptor tables.

use super::disk::{fallocate, PUNCH_HOLE_MODE};
use super::request::{parse_chain, CHAIN_SHAPE};
use super::*;
use crate::irq::IrqLine;
use crate::rate_limiter::test_clock::ManualClock;
use crate::rate_limiter::{RateLimit, RateLimiter, Throttle};
use crate::virtio::test_queue::DriverQueue;
use crate::virtio::{Activation, Interrupt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering as AtomicOrdering};
use std::time::Duration;
use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, Permissions};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const MEM_SIZE: u64 = 4 << 20;
const QSIZE: u16 = 16;

/// A scratch image file, removed on drop.
struct TempImage(PathBuf);

impl TempImage {
    fn new(name: &str, size: u64) -> Self {
        Self::new_in(&std::env::temp_dir(), name, size)
    }

    fn new_in(base: &Path, name: &str, size: u64) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = base.join(format!(
            "kiln-blk-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, AtomicOrdering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let data: Vec<u8> = (0..size).map(|i| (i / SECTOR_SIZE) as u8 ^ 0x5a).collect();
        std::fs::write(&path, data).unwrap();
        Self(path)
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

fn block(img: &TempImage, ro: bool) -> Block {
    Block::new(DiskImage::open(&img.0, ro, None).unwrap()).unwrap()
}

fn activate(blk: &mut Block, mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>) {
    let queue: Queue = q.create_queue().unwrap();
    blk.activate(Activation {
        mem: mem.clone(),
        queues: vec![queue],
        interrupt: Interrupt::new(IrqLine::new().unwrap()),
        features: blk.features(),
    })
    .unwrap();
}

/// Puts one chain (descriptors 0..n linked in order) on the queue.
fn push_chain(q: &MockSplitQueue<GuestMemoryMmap>, descs: &[(u64, u32, u16)]) {
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let next = if i + 1 < descs.len() { F_NEXT } else { 0 };
        let d = SplitDesc::new(addr, len, flags | next, i as u16 + 1);
        q.desc_table()
            .store(i as u16, RawDescriptor::from(d))
            .unwrap();
    }
    let idx = q.avail().idx().load();
    q.avail()
        .ring()
        .ref_at((idx % QSIZE) as usize)
        .unwrap()
        .store(0);
    q.avail().idx().store(idx.wrapping_add(1));
}

/// The used length of the most recent used element.
fn last_used_len(q: &MockSplitQueue<GuestMemoryMmap>) -> u32 {
    let idx = q.used().idx().load();
    assert!(idx > 0, "nothing was used");
    let e = q
        .used()
        .ring()
        .ref_at(((idx - 1) % QSIZE) as usize)
        .unwrap()
        .load();
    e.len()
}

const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x8000;

struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    q: MockSplitQueue<'a, GuestMemoryMmap>,
    blk: Block,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap, img: &TempImage, ro: bool) -> Self {
        Self::serving(mem, block(img, ro))
    }

    fn serving(mem: &'a GuestMemoryMmap, mut blk: Block) -> Self {
        let q = MockSplitQueue::new(mem, QSIZE);
        activate(&mut blk, mem, &q);
        Self { mem, q, blk }
    }

    /// Sends a request laid out the usual way (header, data, status) and
    /// returns (status, used length).
    fn request(&mut self, kind: u32, sector: u64, data: Option<(u32, bool)>) -> (u8, u32) {
        self.mem
            .write_slice(&header(kind, sector), GuestAddress(HDR))
            .unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut descs = vec![(HDR, 16, 0)];
        if let Some((len, writable)) = data {
            descs.push((DATA, len, if writable { F_WRITE } else { 0 }));
        }
        descs.push((STATUS, 1, F_WRITE));
        self.raw(&descs)
    }

    fn raw(&mut self, descs: &[(u64, u32, u16)]) -> (u8, u32) {
        let before = self.q.used().idx().load();
        push_chain(&self.q, descs);
        self.blk.process_queue();
        assert_eq!(self.q.used().idx().load(), before.wrapping_add(1));
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        (status, last_used_len(&self.q))
    }
}

#[test]
fn config_space_and_features() {
    let img = TempImage::new("disk.img", 64 << 10);
    let blk = block(&img, false);
    let mut cap = [0u8; 8];
    blk.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 128);
    let mut w = [0u8; 4];
    blk.read_config(12, &mut w);
    assert_eq!(u32::from_le_bytes(w), SEG_MAX);
    blk.read_config(8, &mut w);
    assert_eq!(u32::from_le_bytes(w), SIZE_MAX);
    blk.read_config(20, &mut w);
    assert_eq!(u32::from_le_bytes(w), 512);
    // Reads past the end, or at absurd offsets, give zeroes.
    let mut b = [0xffu8; 8];
    blk.read_config(58, &mut b);
    assert_eq!(b, [0; 8]);
    blk.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 8]);
    let f = blk.features();
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
    }
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(blk.device_type(), 2);

    drop(blk);
    let ro = block(&img, true);
    assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(ro.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(ro.features() & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
}

#[test]
fn image_checks_give_one_line_errors() {
    let missing = std::env::temp_dir().join("kiln-blk-test-definitely-missing.img");
    let e = DiskImage::open(&missing, false, None).unwrap_err();
    assert!(matches!(e, DiskError::NotFound(_)), "{e}");
    assert!(e.to_string().contains("does not exist"));

    let img = TempImage::new("odd.img", 1000);
    let e = DiskImage::open(&img.0, false, None).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "disk image {} is 1000 bytes, not a multiple of 512",
            img.0.display()
        )
    );

    let dir = img.0.parent().unwrap();
    let e = DiskImage::open(dir, true, None).unwrap_err();
    assert!(matches!(e, DiskError::Directory(_)), "{e}");

    let e = DiskImage::open(Path::new("/dev/null"), true, None).unwrap_err();
    assert!(matches!(e, DiskError::NotAFile(_)), "{e}");

    let ok = TempImage::new("ok.img", 4096);
    let e = DiskImage::open(&ok.0, false, Some("x".repeat(21).as_str())).unwrap_err();
    assert!(matches!(e, DiskError::IdTooLong(_)), "{e}");

    for e in [
        DiskError::NotFound(missing.clone()),
        DiskError::Directory(missing.clone()),
        DiskError::Locked(missing),
    ] {
        assert_eq!(e.to_string().lines().count(), 1);
    }
}

#[test]
fn writable_image_is_locked_against_a_second_user() {
    let img = TempImage::new("locked.img", 4096);
    let first = DiskImage::open(&img.0, false, None).unwrap();
    let e = DiskImage::open(&img.0, false, None).unwrap_err();
    assert!(matches!(e, DiskError::Locked(_)), "{e}");
    let e = DiskImage::open(&img.0, true, None).unwrap_err();
    assert!(matches!(e, DiskError::Locked(_)), "{e}");
    drop(first);
    // Read-only users share.
    let a = DiskImage::open(&img.0, true, None).unwrap();
    let _b = DiskImage::open(&img.0, true, None).unwrap();
    assert!(a.read_only());
}

#[test]
fn id_defaults_to_the_file_name() {
    let img = TempImage::new("a very long file name.img", 512);
    let d = DiskImage::open(&img.0, true, None).unwrap();
    assert_eq!(d.id(), b"a_very_long_file_nam");
    let d = DiskImage::open(&img.0, true, Some("serial1")).unwrap();
    assert_eq!(&d.id()[..8], b"serial1\0");
}

#[test]
fn write_then_read_round_trip() {
    let img = TempImage::new("rw.img", 64 << 10);
    let mem = memory();
    let mut rig = Rig::new(&mem, &img, false);
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, 3, Some((4096, false))),
        (0, 1)
    );
    let file = img.bytes();
    assert_eq!(&file[3 * 512..3 * 512 + 4096], &pattern[..]);
    // Neighbouring sectors untouched.
    assert!(file[2 * 512..3 * 512].iter().all(|&b| b == 2 ^ 0x5a));
    assert!(file[11 * 512..12 * 512].iter().all(|&b| b == 11 ^ 0x5a));

    mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 3, Some((4096, true))),
        (0, 4097)
    );
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);

    assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, None), (0, 1));
}

/// An overlay disk through the device: a write that straddles chunks, a
/// read over written and unwritten chunks, a write-zeroes over base bytes;
/// what the guest reads is what it wrote, the image is never written, the
/// device offers the image's size, writes, discard and write-zeroes.
#[test]
fn an_overlay_disk_serves_requests_and_never_writes_its_base() {
    let img = TempImage::new("overlay.img", 256 << 10);
    let before = img.bytes();
    let dir = img.0.parent().unwrap().to_path_buf();
    let disk = DiskImage::overlay(&img.0, OverlayPlace::Only(&dir), Some("cow")).unwrap();
    let mem = memory();
    let mut rig = Rig::serving(&mem, Block::new(disk).unwrap());
    let features = rig.blk.features();
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_ne!(features & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    let mut capacity = [0u8; 8];
    rig.blk.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), (256 << 10) / 512);

    let mut model = before.clone();
    // 8 KiB from 4 KiB before the first chunk boundary (64 KiB).
    let written: Vec<u8> = (0..8192u32).map(|i| (i * 13 + 1) as u8).collect();
    mem.write_slice(&written, GuestAddress(DATA)).unwrap();
    let sector = (60 << 10) / 512;
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, sector, Some((8192, false))),
        (0, 1)
    );
    model[60 << 10..68 << 10].copy_from_slice(&written);
    // Write-zeroes over 2 sectors of the never-written third chunk.
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&(((128 << 10) + 512) / 512u64).to_le_bytes());
    seg[8..12].copy_from_slice(&2u32.to_le_bytes());
    mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    assert_eq!(
        rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((16, false))),
        (0, 1)
    );
    model[(128 << 10) + 512..(128 << 10) + 1536].fill(0);
    assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, None), (0, 1));
    // All of it in one read (more than one chunk on each side).
    mem.write_slice(&vec![0xffu8; 256 << 10], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, Some((256 << 10, true))),
        (0, (256 << 10) + 1)
    );
    let mut back = vec![0u8; 256 << 10];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back == model, "the guest reads what it wrote over the base");
    assert!(img.bytes() == before, "the base image was written");
    rig.blk.disk().check_base().unwrap();
}

#[test]
fn large_requests_cross_the_bounce_buffer() {
    // 3 MiB in one request: more than one bounce-buffer round.
    let img = TempImage::new("big.img", 4 << 20);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let mut rig = Rig::new(&mem, &img, false);
    let len = 3 << 20;
    let pattern: Vec<u8> = (0..len).map(|i: u32| (i % 251) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 8, Some((len, false))), (0, 1));
    mem.write_slice(&vec![0u8; len as usize], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 8, Some((len, true))),
        (0, len + 1)
    );
    let mut back = vec![0u8; len as usize];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back == pattern);
}

#[test]
fn flexible_framing_is_accepted() {
    // Header split over two descriptors; data and status in one descriptor.
    let img = TempImage::new("frame.img", 64 << 10);
    let mem = memory();
    let mut rig = Rig::new(&mem, &img, false);
    let h = header(VIRTIO_BLK_T_IN, 1);
    mem.write_slice(&h[..5], GuestAddress(HDR)).unwrap();
    mem.write_slice(&h[5..], GuestAddress(HDR + 0x100)).unwrap();
    let (_, used) = rig.raw(&[
        (HDR, 5, 0),
        (HDR + 0x100, 11, 0),
        (STATUS - 512, 513, F_WRITE),
    ]);
    assert_eq!(used, 513);
    let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(status, 0);
    let mut data = [0u8; 512];
    mem.read_slice(&mut data, GuestAddress(STATUS - 512))
        .unwrap();
    assert!(data.iter().all(|&b| b == 1 ^ 0x5a));
}

#[test]
fn get_id_returns_the_serial() {
    let img = TempImage::new("serial-test.img", 4096);
    let mem = memory();
    let mut rig = Rig::new(&mem, &img, true);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_GET_ID, 0, Some((20, true))),
        (0, 21)
    );
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..16], b"serial-test.img\0");
    // A short buffer gets a prefix; a long one only 20 bytes.
    assert_eq!(rig.request(VIRTIO_BLK_T_GET_ID, 0, Some((4, true))), (0, 5));
    assert_eq!(
        rig.request(VIRTIO_BLK_T_GET_ID, 0, Some((4096, true))),
        (0, 21)
    );
    // GET_ID with a device-readable buffer is malformed.
    assert_eq!(rig.request(VIRTIO_BLK_T_GET_ID, 0, Some((20, false))).0, 1);
}

#[test]
fn unknown_types_are_unsupported() {
    let img = TempImage::new("u.img", 4096);
    let mem = memory();
    let mut rig = Rig::new(&mem, &img, false);
    for kind in [2, 3, 5, 14, 99, u32::MAX] {
        assert_eq!(rig.request(kind, 0, None), (2, 1), "type {kind}");
    }
}

#[test]
fn out_of_range_sectors_are_io_errors() {
    let img = TempImage::new("range.img", 8 * 512);
    let before = img.bytes();
    let mem = memory();
    let mut rig = Rig::new(&mem, &img, false);
    // The last sector is fine.
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, 7, Some((512, true))).0, 0);
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 7, Some((512, false))).0, 0);
    // One past the end, straddling it, and overflowing sector * 512 + len.
    for (sector, len) in [(8, 512), (7, 1024), (u64::MAX / 512, 512), (u64::MAX, 512)] {
        assert_eq!(
            rig.request(VIRTIO_BLK_T_IN, sector, Some((len, true))),
            (1, 1)
        );
        assert_eq!(
            rig.request(VIRTIO_BLK_T_OUT, sector, Some((len, false))),
            (1, 1)
        );
    }
    // Lengths that are not whole sectors.
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, 0, Some((100, true))).0, 1);
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 0, Some((513, false))).0, 1);
    let after = img.bytes();
    assert_eq!(before.len(), after.len());
    assert_eq!(before[..7 * 512], after[..7 * 512]);
}

#[test]
fn read_only_disks_refuse_writes() {
    let img = TempImage::new("ro.img", 64 << 10);
    let before = img.bytes();
    let mem = memory();
    let mut rig = Rig::new(&mem, &img, true);
    mem.write_slice(&[0xee; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, 0, Some((4096, false))),
        (1, 1)
    );
    let mut seg = [0u8; 16];
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    assert_eq!(rig.request(VIRTIO_BLK_T_DISCARD, 0, Some((16, false))).0, 1);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((16, false)))
            .0,
        1
    );
    assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, None).0, 0);
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, 0, Some((4096, true))).0, 0);
    assert_eq!(img.bytes(), before);
}

#[test]
fn malformed_chains() {
    let img = TempImage::new("bad.img", 64 << 10);
    let before = img.bytes();
    let mem = memory();
    let mut rig = Rig::new(&mem, &img, false);
    mem.write_slice(&header(VIRTIO_BLK_T_OUT, 0), GuestAddress(HDR))
        .unwrap();

    // No status byte: the last descriptor is device-readable -> used len 0,
    // and nothing was written anywhere.
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(rig.raw(&[(HDR, 16, 0), (DATA, 512, 0)]), (0xff, 0));
    // Status descriptor of length 0, or outside guest memory.
    assert_eq!(rig.raw(&[(HDR, 16, 0), (STATUS, 0, F_WRITE)]), (0xff, 0));
    assert_eq!(rig.raw(&[(HDR, 16, 0), (MEM_SIZE, 1, F_WRITE)]), (0xff, 0));
    assert_eq!(rig.raw(&[(HDR, 16, 0), (u64::MAX, 1, F_WRITE)]), (0xff, 0));
    // Only a status byte, and a header that is too short.
    assert_eq!(rig.raw(&[(STATUS, 1, F_WRITE)]), (1, 1));
    assert_eq!(rig.raw(&[(HDR, 8, 0), (STATUS, 1, F_WRITE)]), (1, 1));
    // A device-writable header.
    assert_eq!(rig.raw(&[(HDR, 16, F_WRITE), (STATUS, 1, F_WRITE)]), (1, 1));
    // Readable after writable.
    assert_eq!(
        rig.raw(&[
            (HDR, 16, 0),
            (DATA, 512, F_WRITE),
            (DATA, 512, 0),
            (STATUS, 1, F_WRITE)
        ]),
        (1, 1)
    );
    // Wrong data direction for IN and OUT.
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 0, Some((512, true))), (1, 1));
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, 0, Some((512, false))), (1, 1));
    // Data outside guest memory, or straddling its end.
    mem.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
        .unwrap();
    for addr in [MEM_SIZE, MEM_SIZE - 256, u64::MAX - 100] {
        assert_eq!(
            rig.raw(&[(HDR, 16, 0), (addr, 512, F_WRITE), (STATUS, 1, F_WRITE)]),
            (1, 1),
            "{addr:#x}"
        );
    }
    // Header outside guest memory.
    assert_eq!(
        rig.raw(&[(u64::MAX - 4, 16, 0), (STATUS, 1, F_WRITE)]),
        (1, 1)
    );
    // A huge writable descriptor: more than 4 GiB in the chain ends it there
    // (at the header), so there is no status byte.
    assert_eq!(
        rig.raw(&[(HDR, 16, 0), (0, u32::MAX, F_WRITE), (STATUS, 1, F_WRITE)])
            .1,
        0
    );
    assert_eq!(
        rig.raw(&[
            (HDR, 16, 0),
            (0, u32::MAX - 64, F_WRITE),
            (STATUS, 1, F_WRITE)
        ]),
        (1, 1)
    );
    assert_eq!(img.bytes(), before);
}

#[test]
fn descriptor_loops_and_overlong_chains_end() {
    let img = TempImage::new("loop.img", 64 << 10);
    let mem = memory();
    let mut rig = Rig::new(&mem, &img, false);
    mem.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
        .unwrap();
    // 0 -> 1 -> 0 -> ...: the iterator stops after the table size.
    let d0 = SplitDesc::new(HDR, 16, F_NEXT, 1);
    let d1 = SplitDesc::new(STATUS, 1, F_NEXT | F_WRITE, 0);
    rig.q
        .desc_table()
        .store(0, RawDescriptor::from(d0))
        .unwrap();
    rig.q
        .desc_table()
        .store(1, RawDescriptor::from(d1))
        .unwrap();
    let idx = rig.q.avail().idx().load();
    rig.q
        .avail()
        .ring()
        .ref_at((idx % QSIZE) as usize)
        .unwrap()
        .store(0);
    rig.q.avail().idx().store(idx + 1);
    rig.blk.process_queue();
    assert_eq!(rig.q.used().idx().load(), idx + 1);
    // Readable after writable in the loop -> IOERR.
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 1);

    // A next index past the table ends the chain.
    let d0 = SplitDesc::new(HDR, 16, F_NEXT, 999);
    rig.q
        .desc_table()
        .store(0, RawDescriptor::from(d0))
        .unwrap();
    let idx = rig.q.avail().idx().load();
    rig.q
        .avail()
        .ring()
        .ref_at((idx % QSIZE) as usize)
        .unwrap()
        .store(0);
    rig.q.avail().idx().store(idx + 1);
    rig.blk.process_queue();
    assert_eq!(last_used_len(&rig.q), 0);

    // An indirect table with 1000 writable descriptors: over the limit.
    let table = 0x100000u64;
    for i in 0..1000u16 {
        let flags = F_WRITE | if i < 999 { F_NEXT } else { 0 };
        let d = RawDescriptor::from(SplitDesc::new(STATUS, 1, flags, i + 1));
        mem.write_obj(d, GuestAddress(table + u64::from(i) * 16))
            .unwrap();
    }
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(rig.raw(&[(table, 1000 * 16, F_INDIRECT)]), (1, 1));
    // An indirect table outside guest memory, and one of odd length.
    assert_eq!(rig.raw(&[(MEM_SIZE, 64, F_INDIRECT)]).1, 0);
    assert_eq!(rig.raw(&[(table, 17, F_INDIRECT)]).1, 0);
}

#[test]
fn a_chain_of_the_most_descriptors_is_served_and_one_more_is_not() {
    let img = TempImage::new("limit.img", 4096);
    let mem = memory();
    let mut rig = Rig::new(&mem, &img, false);
    mem.write_slice(&header(VIRTIO_BLK_T_FLUSH, 0), GuestAddress(HDR))
        .unwrap();
    // A flush: the header, empty writable descriptors (they carry nothing
    // but count), the status byte; in an indirect table of `total` entries.
    let table = 0x100000u64;
    let most = CHAIN_SHAPE.1.max_descriptors;
    for (total, status) in [(most, 0), (most + 1, 1)] {
        let n = total as u16;
        for i in 0..n {
            let (addr, len, flags) = match i {
                0 => (HDR, 16, 0),
                i if i == n - 1 => (STATUS, 1, F_WRITE),
                _ => (DATA, 0, F_WRITE),
            };
            let next = if i + 1 < n { F_NEXT } else { 0 };
            let d = RawDescriptor::from(SplitDesc::new(addr, len, flags | next, i + 1));
            mem.write_obj(d, GuestAddress(table + u64::from(i) * 16))
                .unwrap();
        }
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let got = rig.raw(&[(table, u32::from(n) * 16, F_INDIRECT)]);
        assert_eq!(got, (status, 1), "{total} descriptors");
    }
}

#[test]
fn indirect_requests_work() {
    let img = TempImage::new("ind.img", 64 << 10);
    let mem = memory();
    let mut rig = Rig::new(&mem, &img, false);
    mem.write_slice(&header(VIRTIO_BLK_T_IN, 2), GuestAddress(HDR))
        .unwrap();
    let table = 0x100000u64;
    let descs = [
        (HDR, 16, F_NEXT),
        (DATA, 1024, F_WRITE | F_NEXT),
        (STATUS, 1, F_WRITE),
    ];
    for (i, &(a, l, f)) in descs.iter().enumerate() {
        let d = RawDescriptor::from(SplitDesc::new(a, l, f, i as u16 + 1));
        mem.write_obj(d, GuestAddress(table + i as u64 * 16))
            .unwrap();
    }
    assert_eq!(rig.raw(&[(table, 48, F_INDIRECT)]), (0, 1025));
    let mut data = [0u8; 1024];
    mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert!(data[..512].iter().all(|&b| b == 2 ^ 0x5a));
    assert!(data[512..].iter().all(|&b| b == 3 ^ 0x5a));
}

/// 512-byte units the file system has allocated for `img`.
fn allocated_sectors(img: &TempImage) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(&img.0).unwrap().blocks()
}

/// Whether punching a 4 KiB hole into a file under `dir` frees its blocks.
fn punches_holes(dir: &Path) -> bool {
    let probe = TempImage::new_in(dir, "probe.img", 64 << 10);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&probe.0)
        .unwrap();
    file.sync_all().unwrap();
    let before = allocated_sectors(&probe);
    fallocate(&file, PUNCH_HOLE_MODE, 4096, 4096).is_ok() && allocated_sectors(&probe) + 8 <= before
}

/// A directory whose file system punches holes: the temp directory, else
/// /dev/shm (tmpfs punches holes on every Linux since 3.5).
fn hole_punching_dir() -> Option<PathBuf> {
    [std::env::temp_dir(), PathBuf::from("/dev/shm")]
        .into_iter()
        .find(|dir| dir.is_dir() && punches_holes(dir))
}

#[test]
fn discard_without_hole_punching_is_unsupported() {
    let img = TempImage::new("no-discard.img", 64 << 10);
    let mem = memory();
    let mut disk = DiskImage::open(&img.0, false, None).unwrap();
    // As the disk of a file system that cannot punch holes.
    disk.punch_hole = false;
    let mut blk = Block::new(disk).unwrap();
    assert_eq!(blk.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(blk.features() & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    let q = MockSplitQueue::new(&mem, QSIZE);
    activate(&mut blk, &mem, &q);
    let mut rig = Rig { mem: &mem, q, blk };
    let mut seg = [0u8; 16];
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        assert_eq!(rig.request(kind, 0, Some((16, false))).0, 2);
    }
    assert_eq!(
        img.bytes(),
        TempImage::new("no-discard-ref.img", 64 << 10).bytes()
    );
}

#[test]
fn discard_and_write_zeroes() {
    let dir = hole_punching_dir();
    if !kiln_prereq::require(
        dir.is_some(),
        "a file system that punches holes (the temp directory or /dev/shm)",
    ) {
        return;
    }
    let img = TempImage::new_in(&dir.unwrap(), "discard.img", 64 << 10);
    let mem = memory();
    let mut rig = Rig::new(&mem, &img, false);
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        s
    };
    assert!(rig.blk.disk().supports_discard());
    assert_ne!(rig.blk.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_ne!(rig.blk.features() & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    std::fs::File::open(&img.0).unwrap().sync_all().unwrap();
    let allocated = allocated_sectors(&img);
    // Two segments in one request: sectors 8..16 discarded, 32..40 zeroed.
    mem.write_slice(&seg(8, 8, 0), GuestAddress(DATA)).unwrap();
    mem.write_slice(&seg(32, 8, 0), GuestAddress(DATA + 16))
        .unwrap();
    assert_eq!(
        rig.request(VIRTIO_BLK_T_DISCARD, 0, Some((32, false))),
        (0, 1)
    );
    // Holes: the file system freed both ranges (16 sectors).
    let after_discard = allocated_sectors(&img);
    assert!(
        after_discard + 16 <= allocated,
        "discard freed nothing: {allocated} -> {after_discard} sectors"
    );
    mem.write_slice(&seg(64, 8, 0), GuestAddress(DATA)).unwrap();
    assert_eq!(
        rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((16, false))),
        (0, 1)
    );
    let before_unmap = allocated_sectors(&img);
    mem.write_slice(&seg(80, 8, 1), GuestAddress(DATA)).unwrap();
    assert_eq!(
        rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((16, false))),
        (0, 1)
    );
    // Write-zeroes with "unmap" punches a hole too.
    let after_unmap = allocated_sectors(&img);
    assert!(
        after_unmap + 8 <= before_unmap,
        "write-zeroes with unmap freed nothing: {before_unmap} -> {after_unmap} sectors"
    );
    let file = img.bytes();
    assert_eq!(file.len(), 64 << 10);
    for (s, zero) in [
        (7, false),
        (8, true),
        (15, true),
        (16, false),
        (32, true),
        (64, true),
        (71, true),
        (72, false),
        (80, true),
        (88, false),
    ] {
        let range = &file[s * 512..(s + 1) * 512];
        assert_eq!(range.iter().all(|&b| b == 0), zero, "sector {s}");
    }
    // Out of range, too many sectors, unmap on discard, reserved flags, bad sizes.
    mem.write_slice(&seg(120, 16, 0), GuestAddress(DATA))
        .unwrap();
    assert_eq!(rig.request(VIRTIO_BLK_T_DISCARD, 0, Some((16, false))).0, 1);
    mem.write_slice(&seg(0, MAX_DISCARD_SECTORS + 1, 0), GuestAddress(DATA))
        .unwrap();
    assert_eq!(rig.request(VIRTIO_BLK_T_DISCARD, 0, Some((16, false))).0, 1);
    mem.write_slice(&seg(u64::MAX, 1, 0), GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((16, false)))
            .0,
        1
    );
    mem.write_slice(&seg(0, 8, 1), GuestAddress(DATA)).unwrap();
    assert_eq!(rig.request(VIRTIO_BLK_T_DISCARD, 0, Some((16, false))).0, 2);
    mem.write_slice(&seg(0, 8, 2), GuestAddress(DATA)).unwrap();
    assert_eq!(
        rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((16, false)))
            .0,
        2
    );
    assert_eq!(rig.request(VIRTIO_BLK_T_DISCARD, 0, Some((17, false))).0, 1);
    assert_eq!(rig.request(VIRTIO_BLK_T_DISCARD, 0, None).0, 1);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_DISCARD, 0, Some((16 * 33, false)))
            .0,
        1
    );
    assert_eq!(rig.request(VIRTIO_BLK_T_DISCARD, 0, Some((16, true))).0, 1);
    // Nothing outside the earlier ranges changed.
    assert_eq!(img.bytes(), file);
}

#[test]
fn kicks_before_driver_ok_and_after_reset_are_ignored() {
    let img = TempImage::new("k.img", 4096);
    let mem = memory();
    let q = MockSplitQueue::new(&mem, QSIZE);
    let mut blk = block(&img, false);
    mem.write_slice(&header(VIRTIO_BLK_T_FLUSH, 0), GuestAddress(HDR))
        .unwrap();
    push_chain(&q, &[(HDR, 16, 0), (STATUS, 1, F_WRITE)]);
    blk.process_queue();
    assert_eq!(q.used().idx().load(), 0);
    assert!(!blk.is_active());
    activate(&mut blk, &mem, &q);
    blk.reset();
    blk.process_queue();
    assert_eq!(q.used().idx().load(), 0);
    // Activation after reset serves what is pending.
    activate(&mut blk, &mem, &q);
    blk.process_queue();
    assert_eq!(q.used().idx().load(), 1);
}

#[test]
fn garbage_avail_index_does_not_spin() {
    let img = TempImage::new("g.img", 4096);
    let mem = memory();
    let mut rig = Rig::new(&mem, &img, false);
    rig.q.avail().idx().store(40000);
    rig.blk.process_queue();
    assert_eq!(rig.q.used().idx().load(), 0);
}

#[test]
fn many_chains_are_served_in_turns() {
    let img = TempImage::new("turns.img", 4096);
    let mem = memory();
    let q = MockSplitQueue::new(&mem, QSIZE);
    // The mock's used ring overlaps the end of its avail ring: use our own.
    let used_ring = 0x2000u64;
    let mut queue: Queue = q.create_queue().unwrap();
    queue.set_used_ring_address(Some(used_ring as u32), Some(0));
    let mut blk = block(&img, false);
    blk.activate(Activation {
        mem: mem.clone(),
        queues: vec![queue],
        interrupt: Interrupt::new(IrqLine::new().unwrap()),
        features: blk.features(),
    })
    .unwrap();
    let _ = blk.queue_events()[0].read();
    let used_idx = || mem.read_obj::<u16>(GuestAddress(used_ring + 2)).unwrap();
    mem.write_slice(&header(VIRTIO_BLK_T_FLUSH, 0), GuestAddress(HDR))
        .unwrap();
    let d0 = SplitDesc::new(HDR, 16, F_NEXT, 1);
    let d1 = SplitDesc::new(STATUS, 1, F_WRITE, 0);
    q.desc_table().store(0, RawDescriptor::from(d0)).unwrap();
    q.desc_table().store(1, RawDescriptor::from(d1)).unwrap();
    // The same chain offered a ring's worth at a time, 20 times (the ring wraps).
    for round in 1..=20u16 {
        let avail = used_idx().wrapping_add(QSIZE);
        for i in q.avail().idx().load()..avail {
            q.avail()
                .ring()
                .ref_at((i % QSIZE) as usize)
                .unwrap()
                .store(0);
        }
        q.avail().idx().store(avail);
        blk.process_queue();
        assert_eq!(used_idx(), round * QSIZE);
    }
}

/// Entries in a ring larger than one turn's budget.
const BIG: u16 = 512;
/// Where `big_ring` puts the used ring (the mock's overlaps its avail ring).
const BIG_USED_RING: u64 = 0x40000;

/// A running device on a `BIG`-entry queue, its activation kick taken.
fn big_ring<'a>(
    mem: &'a GuestMemoryMmap,
    img: &TempImage,
) -> (MockSplitQueue<'a, GuestMemoryMmap>, Block) {
    let q = MockSplitQueue::new(mem, BIG);
    let mut queue: Queue = q.create_queue().unwrap();
    queue.set_used_ring_address(Some(BIG_USED_RING as u32), Some(0));
    let mut blk = block(img, false);
    blk.activate(Activation {
        mem: mem.clone(),
        queues: vec![queue],
        interrupt: Interrupt::new(IrqLine::new().unwrap()),
        features: blk.features(),
    })
    .unwrap();
    let _ = blk.queue_events()[0].read();
    (q, blk)
}

#[test]
fn a_turn_has_a_budget_and_rearms_its_kick() {
    // 512 chains available at once: one turn serves CHAINS_PER_EVENT of them
    // and signals its own queue eventfd to come back for the rest.
    let img = TempImage::new("budget.img", 4096);
    let mem = memory();
    let (q, mut blk) = big_ring(&mem, &img);
    let used_idx = || {
        mem.read_obj::<u16>(GuestAddress(BIG_USED_RING + 2))
            .unwrap()
    };
    mem.write_slice(&header(VIRTIO_BLK_T_FLUSH, 0), GuestAddress(HDR))
        .unwrap();
    for i in 0..BIG / 2 {
        let d0 = SplitDesc::new(HDR, 16, F_NEXT, 2 * i + 1);
        let d1 = SplitDesc::new(STATUS, 1, F_WRITE, 0);
        q.desc_table()
            .store(2 * i, RawDescriptor::from(d0))
            .unwrap();
        q.desc_table()
            .store(2 * i + 1, RawDescriptor::from(d1))
            .unwrap();
    }
    for i in 0..BIG {
        q.avail()
            .ring()
            .ref_at(i as usize)
            .unwrap()
            .store(2 * (i % (BIG / 2)));
    }
    q.avail().idx().store(BIG);
    blk.process_queue();
    assert_eq!(usize::from(used_idx()), CHAINS_PER_EVENT);
    assert_eq!(blk.queue_events()[0].read().unwrap(), 1);
    blk.process_queue();
    assert_eq!(used_idx(), BIG);
    // At most one more (empty) turn, then quiet.
    if blk.queue_events()[0].read().is_ok() {
        blk.process_queue();
    }
    assert_eq!(used_idx(), BIG);
    assert!(blk.queue_events()[0].read().is_err());
}

#[test]
fn a_ring_of_bad_chains_is_served_a_budget_per_turn() {
    // A guest that keeps its avail index a whole (512-entry) ring ahead over
    // chains without a status byte: each call returns one budget of them,
    // re-kicks itself for the rest, and counts them.
    let img = TempImage::new("bad-budget.img", 4096);
    let mem = memory();
    let (q, mut blk) = big_ring(&mem, &img);
    let used_idx = || {
        mem.read_obj::<u16>(GuestAddress(BIG_USED_RING + 2))
            .unwrap()
    };
    // One device-readable descriptor: no status byte.
    let d = SplitDesc::new(HDR, 16, 0, 0);
    q.desc_table().store(0, RawDescriptor::from(d)).unwrap();
    for i in 0..BIG {
        q.avail().ring().ref_at(i as usize).unwrap().store(0);
    }
    q.avail().idx().store(BIG);
    blk.process_queue();
    assert_eq!(usize::from(used_idx()), CHAINS_PER_EVENT);
    assert_eq!(blk.queue_events()[0].read().unwrap(), 1, "re-kicked");
    blk.process_queue();
    assert_eq!(used_idx(), BIG);
    // Returned with length 0 (the first element's len field).
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(BIG_USED_RING + 8))
            .unwrap(),
        0
    );
    assert_eq!(blk.counters.bad_chains.get(), u64::from(BIG));
    assert_eq!(blk.counters.requests.get(), 0);
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    fn addr_strategy() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(HDR),
            Just(DATA),
            Just(STATUS),
            Just(0u64),
            Just(MEM_SIZE - 1),
            Just(MEM_SIZE),
            Just(u64::MAX),
            (0..MEM_SIZE),
            any::<u64>(),
        ]
    }

    fn len_strategy() -> impl Strategy<Value = u32> {
        prop_oneof![
            Just(0u32),
            Just(1),
            Just(16),
            Just(512),
            Just(4096),
            Just(u32::MAX),
            (0..70000u32),
        ]
    }

    prop_compose! {
        fn desc_strategy()(addr in addr_strategy(), len in len_strategy(),
                           flags in 0u16..8, next in 0u16..20) -> (u64, u32, u16, u16) {
            (addr, len, flags, next)
        }
    }

    fn kind_strategy() -> impl Strategy<Value = u32> {
        prop_oneof![
            Just(VIRTIO_BLK_T_IN),
            Just(VIRTIO_BLK_T_OUT),
            Just(VIRTIO_BLK_T_FLUSH),
            Just(VIRTIO_BLK_T_GET_ID),
            Just(VIRTIO_BLK_T_DISCARD),
            Just(VIRTIO_BLK_T_WRITE_ZEROES),
            any::<u32>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Random descriptor tables, heads and avail indices: the device never
        /// panics, never spins, never changes the image's size, and every
        /// parsed request only refers to guest memory.
        #[test]
        fn random_descriptor_tables(
            descs in proptest::collection::vec(desc_strategy(), 1..16),
            heads in proptest::collection::vec(0u16..20, 0..16),
            extra_avail in 0u16..3,
            kind in kind_strategy(),
            sector in prop_oneof![Just(0u64), Just(127), Just(128), any::<u64>()],
        ) {
            let img = TempImage::new("prop.img", 64 << 10);
            let mem = memory();
            mem.write_slice(&header(kind, sector), GuestAddress(HDR)).unwrap();
            // Discard segments at DATA.
            let mut seg = [0u8; 16];
            seg[0..8].copy_from_slice(&(sector % 256).to_le_bytes());
            seg[8..12].copy_from_slice(&8u32.to_le_bytes());
            mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
            let q = MockSplitQueue::new(&mem, QSIZE);
            for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
                let d = SplitDesc::new(addr, len, flags, next);
                q.desc_table().store(i as u16, RawDescriptor::from(d)).unwrap();
            }

            // The parser alone, on each head.
            for &h in &heads {
                let mut queue: Queue = q.create_queue().unwrap();
                q.avail().ring().ref_at(0).unwrap().store(h);
                q.avail().idx().store(1);
                if let Some(chain) = queue.pop_descriptor_chain(&mem) {
                    if let Parsed::WithStatus { status, request } = parse_chain(&mem, chain) {
                        prop_assert!(mem.check_range(status, 1, Permissions::Write));
                        if let Ok(req) = request {
                            for s in &req.data {
                                prop_assert!(s.len > 0);
                                prop_assert!(mem.check_range(s.addr, s.len as usize, Permissions::Read));
                            }
                        }
                    }
                }
                q.avail().idx().store(0);
            }

            // The whole device.
            let mut blk = block(&img, false);
            activate(&mut blk, &mem, &q);
            for (i, &h) in heads.iter().enumerate() {
                q.avail().ring().ref_at(i).unwrap().store(h);
            }
            let avail = heads.len() as u16 + extra_avail * 20;
            q.avail().idx().store(avail);
            // Two turns at most: a valid ring is drained, garbage is dropped.
            blk.process_queue();
            blk.process_queue();
            // Requests may overwrite the rings themselves, so only the
            // per-turn budget bounds the count.
            let used = q.used().idx().load();
            prop_assert!(usize::from(used) <= 2 * CHAINS_PER_EVENT);
            prop_assert_eq!(std::fs::metadata(&img.0).unwrap().len(), 64 << 10);
        }
    }
}

/// Host-side cost of serving requests (no guest): 1 MiB IN and OUT requests
/// with 256 4-KiB segments each, like a guest's O_DIRECT dd. Run with
/// `cargo test --release -p kiln-devices host_side_throughput -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark"]
fn host_side_throughput() {
    const SEGS: u64 = 254;
    let img = TempImage::new("bench.img", 64 << 20);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let q = MockSplitQueue::new(&mem, 512);
    let used_ring = 0x40000u64;
    let mut queue: Queue = q.create_queue().unwrap();
    queue.set_used_ring_address(Some(used_ring as u32), Some(0));
    let mut blk = block(&img, false);
    blk.activate(Activation {
        mem: mem.clone(),
        queues: vec![queue],
        interrupt: Interrupt::new(IrqLine::new().unwrap()),
        features: blk.features(),
    })
    .unwrap();
    for (kind, name) in [(VIRTIO_BLK_T_OUT, "write"), (VIRTIO_BLK_T_IN, "read")] {
        let flags = if kind == VIRTIO_BLK_T_IN { F_WRITE } else { 0 };
        let start = std::time::Instant::now();
        let mut bytes = 0u64;
        for round in 0..256u64 {
            let sector = (round % 64) * (SEGS * 4096 / 512);
            mem.write_slice(&header(kind, sector), GuestAddress(HDR))
                .unwrap();
            let mut descs = vec![(HDR, 16u32, 0u16)];
            for s in 0..SEGS {
                descs.push((0x100000 + s * 8192, 4096, flags));
            }
            descs.push((STATUS, 1, F_WRITE));
            for (i, &(addr, len, f)) in descs.iter().enumerate() {
                let next = if i + 1 < descs.len() { F_NEXT } else { 0 };
                let d = SplitDesc::new(addr, len, f | next, i as u16 + 1);
                q.desc_table()
                    .store(i as u16, RawDescriptor::from(d))
                    .unwrap();
            }
            let idx = q.avail().idx().load();
            q.avail()
                .ring()
                .ref_at((idx % 512) as usize)
                .unwrap()
                .store(0);
            q.avail().idx().store(idx.wrapping_add(1));
            blk.process_queue();
            assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
            bytes += SEGS * 4096;
        }
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "host side {name}: {} MiB in {secs:.3} s = {:.0} MB/s",
            bytes >> 20,
            bytes as f64 / secs / 1e6
        );
    }
}

#[test]
fn from_file_takes_an_open_file_without_locking_it() {
    let img = TempImage::new("scratch.img", 8192);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img.0)
        .unwrap();
    let d = DiskImage::from_file(file, &img.0, false, Some("kiln-rootfs")).unwrap();
    assert_eq!((d.size(), d.read_only()), (8192, false));
    assert_eq!(&d.id()[..12], b"kiln-rootfs\0");
    assert_eq!(d.path(), img.0.as_path());
    // Not locked: the caller owns the file, others may still open the path.
    let _other = DiskImage::open(&img.0, false, None).unwrap();

    let odd = TempImage::new("scratch-odd.img", 1000);
    let e =
        DiskImage::from_file(std::fs::File::open(&odd.0).unwrap(), &odd.0, true, None).unwrap_err();
    assert!(matches!(e, DiskError::BadSize { size: 1000, .. }), "{e}");
    let e = DiskImage::from_file(
        std::fs::File::open("/dev/null").unwrap(),
        &odd.0,
        true,
        None,
    )
    .unwrap_err();
    assert!(matches!(e, DiskError::NotAFile(_)), "{e}");
}

/// The queue of the rate-limit tests: a 256-entry ring (laid out by the
/// test driver, which returns every used entry) in leaked guest memory.
fn limited_ring(blk: &mut Block) -> (&'static GuestMemoryMmap, DriverQueue) {
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(memory()));
    let driver = DriverQueue::new(mem, 0x10_0000);
    blk.activate(Activation {
        mem: mem.clone(),
        queues: vec![driver.queue()],
        interrupt: Interrupt::new(IrqLine::new().unwrap()),
        features: blk.features(),
    })
    .unwrap();
    (mem, driver)
}

/// A block device with `limit` on the test's hand-driven clock, activated
/// (its activation kick drained).
fn limited_block(
    img: &TempImage,
    limit: &RateLimit,
    clock: &ManualClock,
) -> (&'static GuestMemoryMmap, DriverQueue, Block) {
    let limiter = RateLimiter::with_clock(limit, clock.clock());
    let mut blk = block(img, false).with_throttle(Throttle::with_limiter(limiter).unwrap());
    let (mem, driver) = limited_ring(&mut blk);
    let _ = blk.queue_events()[0].read();
    (mem, driver, blk)
}

/// Queues `n` reads of `len` bytes of sector 0 (each its own chain).
fn queue_reads(mem: &GuestMemoryMmap, driver: &mut DriverQueue, n: usize, len: u32) {
    mem.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
        .unwrap();
    let write = u32::from(F_WRITE);
    for _ in 0..n {
        driver.add(&[(HDR, 16, 0), (DATA, len, write), (STATUS, 1, write)]);
    }
}

#[test]
fn a_rate_limited_disk_serves_its_budget_then_waits_for_its_timer() {
    // 4 KiB/s, no burst: the bucket starts with one second's worth, so four
    // 1 KiB reads go at once and the rest wait, one more per 250 ms.
    let img = TempImage::new("limited.img", 64 << 10);
    let clock = ManualClock::default();
    let limit = RateLimit {
        bytes_per_sec: Some(4096),
        ..RateLimit::default()
    };
    let (mem, mut driver, mut blk) = limited_block(&img, &limit, &clock);
    queue_reads(mem, &mut driver, 10, 1024);
    let mut used = Vec::new();
    let mut served = |driver: &mut DriverQueue| {
        used.extend(driver.used());
        used.len()
    };
    blk.process_queue();
    assert_eq!(served(&mut driver), 4, "the bucket's worth");
    assert_eq!(blk.counters.rate_limited.get(), 1);
    assert!(blk.throttle.is_blocked() && blk.throttle.timer_armed());
    assert!(
        blk.queue_events()[0].read().is_err(),
        "a held queue does not re-kick itself (no busy loop)"
    );
    // The guest's kicks are ignored while the timer is armed, even once
    // tokens are back: only the timer resumes the queue.
    clock.advance(Duration::from_millis(250));
    blk.process_queue();
    assert_eq!(served(&mut driver), 4);
    // The timer fires with 1 KiB of tokens back: one more read.
    blk.rate_timer_fired();
    assert_eq!(served(&mut driver), 5);
    assert!(blk.throttle.timer_armed());
    // A second later, a full bucket: four more; then the last one.
    clock.advance(Duration::from_secs(1));
    blk.rate_timer_fired();
    assert_eq!(served(&mut driver), 9);
    clock.advance(Duration::from_secs(1));
    blk.rate_timer_fired();
    assert_eq!(served(&mut driver), 10);
    assert!(!blk.throttle.is_blocked(), "nothing waits");
    // Every request was served whole, once.
    assert!(used.iter().all(|&(_, len)| len == 1024 + 1), "{used:?}");
    let heads: std::collections::HashSet<u16> = used.iter().map(|&(head, _)| head).collect();
    assert_eq!(heads.len(), 10);
    assert_eq!(blk.counters.requests.get(), 10);
    assert_eq!(blk.counters.read_bytes.get(), 10 * 1024);
    assert_eq!(blk.counters.rate_limited.get(), 3);
}

#[test]
fn bad_chains_are_not_charged_and_flushes_cost_one_operation() {
    let img = TempImage::new("limited-ops.img", 64 << 10);
    let clock = ManualClock::default();
    let limit = RateLimit {
        bytes_per_sec: Some(1),
        ops_per_sec: Some(2),
        ..RateLimit::default()
    };
    let (mem, mut driver, mut blk) = limited_block(&img, &limit, &clock);
    // Chains without a status byte move nothing: returned, not charged.
    for _ in 0..5 {
        driver.add(&[(HDR, 16, 0)]);
    }
    mem.write_slice(&header(VIRTIO_BLK_T_FLUSH, 0), GuestAddress(HDR + 0x100))
        .unwrap();
    for _ in 0..3 {
        driver.add(&[(HDR + 0x100, 16, 0), (STATUS, 1, u32::from(F_WRITE))]);
    }
    blk.process_queue();
    assert_eq!(driver.used().len(), 5 + 2, "two operations per second");
    assert_eq!(blk.counters.bad_chains.get(), 5);
    assert_eq!(blk.counters.rate_limited.get(), 1);
    clock.advance(Duration::from_millis(500));
    blk.rate_timer_fired();
    assert_eq!(driver.used().len(), 1, "the flush that waited");
}

#[test]
fn the_event_loop_resumes_a_limited_disk_when_its_timer_fires() {
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::{Arc, Mutex};
    // 10 requests/s on the real clock: ten go at once, the eleventh when
    // the limit's timerfd wakes the event loop (about 100 ms later). The
    // test waits on the event loop, not on a clock.
    let img = TempImage::new("limited-loop.img", 64 << 10);
    let limit = RateLimit {
        ops_per_sec: Some(10),
        ..RateLimit::default()
    };
    let mut blk = block(&img, false).with_rate_limit(&limit).unwrap();
    let (mem, mut driver) = limited_ring(&mut blk);
    queue_reads(mem, &mut driver, 11, 512);
    let blk = Arc::new(Mutex::new(blk));
    let mut em = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
    em.add_subscriber(blk.clone());
    // The activation kick.
    assert_eq!(em.run_with_timeout(0).unwrap(), 1);
    assert_eq!(driver.used().len(), 10);
    assert!(blk.lock().unwrap().throttle.timer_armed());
    // The next event is the timer (nothing else is pending).
    assert_eq!(em.run_with_timeout(10_000).unwrap(), 1);
    assert_eq!(driver.used().len(), 1);
    assert!(!blk.lock().unwrap().throttle.is_blocked());
}
