//! virtio-blk: request chains from a hostile driver, parsed and executed
//! against a disk image in a memfd, or a copy-on-write overlay disk over one
//! (its overlay another memfd). Beyond the bounds every target has, the image
//! never grows (no access past its end), a read-only image never changes,
//! and an overlay's base is never written.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use kiln_devices::fuzzing::{BLOCK_SECTOR_SIZE as SECTOR_SIZE, BLOCK_SIZE_MAX as SIZE_MAX};
use kiln_devices::virtio::block::{Block, DiskImage};
use virtio_bindings::virtio_blk::*;

use crate::input::{Input, Script};
use crate::virtio::{Harness, RingScript, BUFFERS, RING_OPS};
use crate::Target;

pub const TARGET: Target = Target {
    name: "block",
    run,
    // The bounce buffer (at most one SIZE_MAX piece), parsed chains and
    // requests (a ring of segments), the discard ranges and the event loop,
    // and an overlay's copy-up of one chunk.
    memory_cap: SIZE_MAX as usize + (512 << 10) + (64 << 10),
    memory_per_input_byte: 0,
    seeds,
};

const OP_REQUEST: u8 = RING_OPS;
const OPS: u8 = RING_OPS + 1;
/// Where OP_REQUEST puts its header, data and status byte.
const HEADER_AT: u64 = BUFFERS;
const DATA_AT: u64 = 0x11_0000;
const STATUS_AT: u64 = 0x1f_f000;

/// The request types OP_REQUEST picks from (the last one is any u32).
const KINDS: [u32; 6] = [
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_WRITE_ZEROES,
];

pub(crate) fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name and flags; the result
    // is checked before use.
    let fd = unsafe { libc::memfd_create(c"kiln-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).expect("memfd size");
    file
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let sectors = u64::from(input.u8());
    // Bit 0: read-only; else bit 1: an overlay disk.
    let mode = input.u8();
    let read_only = mode & 1 == 1;
    let overlay = !read_only && mode & 2 == 2;
    let size = sectors * SECTOR_SIZE;
    let file = memfd(size);
    let pattern: Vec<u8> = (0..size).map(|i| (i * 7 + i / 512) as u8).collect();
    file.write_all_at(&pattern, 0).expect("memfd write");
    let check = file.try_clone().expect("dup");
    let path = Path::new("fuzz.img");
    let disk = match overlay {
        true => DiskImage::overlay_on(file, memfd(0), path, Some("fuzz-disk")),
        false => DiskImage::from_file(file, path, read_only, Some("fuzz-disk")),
    }
    .expect("a memfd of whole sectors is a disk");
    let mut h = Harness::new(Block::new(disk).expect("eventfd"));
    while !input.is_empty() {
        match input.u8() % OPS {
            OP_REQUEST => request(&mut h, &mut input),
            op => h.ring_op(op, &mut input),
        }
    }
    drop(h);
    let now = check.metadata().expect("fstat").len();
    assert_eq!(now, size, "the guest changed the size of its disk image");
    if read_only || overlay {
        let mut after = vec![0u8; size as usize];
        check.read_exact_at(&mut after, 0).expect("memfd read");
        assert!(
            after == pattern,
            "the guest wrote to a read-only disk or a base"
        );
    }
}

/// A request chain as a driver builds it, with fields from the input:
/// header, up to four data buffers (direction by type, or flipped), status.
fn request(h: &mut Harness<Block>, input: &mut Input) {
    let pick = input.u8();
    let kind = KINDS
        .get(usize::from(pick) % (KINDS.len() + 1))
        .copied()
        .unwrap_or_else(|| input.u32());
    let sector = match input.u8() % 4 {
        3 => input.u64(),
        _ => u64::from(input.u8()),
    };
    let flip = input.bool();
    let segments = input.below(5);
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&kind.to_le_bytes());
    header[8..16].copy_from_slice(&sector.to_le_bytes());
    let mem = &h.mem;
    let _ = vm_memory::Bytes::write_slice(mem, &header, vm_memory::GuestAddress(HEADER_AT));
    let device_writes = matches!(kind, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID) != flip;
    let mut bufs = vec![(HEADER_AT, 16, false)];
    let mut at = DATA_AT;
    for _ in 0..segments {
        let len = input.buf_len();
        bufs.push((at, len, device_writes));
        at = at.saturating_add(u64::from(len));
    }
    // What the data buffers hold (written data, or a discard segment list).
    let payload = input.bytes();
    let _ = vm_memory::Bytes::write_slice(mem, payload, vm_memory::GuestAddress(DATA_AT));
    bufs.push((STATUS_AT, 1, true));
    // A chain longer than the harness's 8: the data buffers are merged.
    bufs.truncate(8);
    let ring = &mut h.rings[0];
    ring.add_chain(&h.mem, &bufs);
    h.kick(0);
}

/// A request as `request` reads it.
fn script_request<'a>(
    s: &'a mut Script,
    kind: usize,
    sector: u8,
    segments: &[u32],
    payload: &[u8],
) -> &'a mut Script {
    s.u8(OP_REQUEST).u8(kind as u8).u8(0).u8(sector).u8(0);
    s.u8(segments.len() as u8);
    for &len in segments {
        s.buf_len(len);
    }
    s.bytes(payload)
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let features = u64::MAX;
    let mut s = Script::new();
    s.u8(16).u8(0).activate(1, 16, features);
    // A write, a read of it back, a flush and GET_ID, as Linux sends them.
    script_request(&mut s, 1, 2, &[1024], &[0xab; 1024]);
    script_request(&mut s, 0, 2, &[512, 512], &[]);
    script_request(&mut s, 2, 0, &[], &[]);
    script_request(&mut s, 3, 0, &[20], &[]);
    let rw = s.build();

    let mut segment = Vec::new();
    segment.extend_from_slice(&1u64.to_le_bytes()); // sector
    segment.extend_from_slice(&4u32.to_le_bytes()); // sectors
    segment.extend_from_slice(&0u32.to_le_bytes()); // flags
    let mut s = Script::new();
    s.u8(16).u8(0).activate(1, 16, features);
    script_request(&mut s, 4, 0, &[16], &segment);
    script_request(&mut s, 5, 0, &[16], &segment);
    let discard = s.build();

    // A read-only disk asked to write, and a read past its end.
    let mut s = Script::new();
    s.u8(4).u8(1).activate(1, 8, features);
    script_request(&mut s, 1, 0, &[512], &[1; 512]);
    script_request(&mut s, 0, 3, &[1024], &[]);
    let read_only = s.build();

    // The same writes, reads and discards on an overlay disk, across its
    // first 64 KiB chunk boundary (sector 128).
    let mut s = Script::new();
    s.u8(200).u8(2).activate(1, 16, features);
    script_request(&mut s, 1, 126, &[2048], &[0xcd; 2048]);
    script_request(&mut s, 0, 120, &[8192], &[]);
    script_request(&mut s, 4, 0, &[16], &segment);
    script_request(&mut s, 5, 0, &[16], &segment);
    script_request(&mut s, 2, 0, &[], &[]);
    let overlay = s.build();

    // The raw chain Linux builds for one 4 KiB read, through the ring ops.
    let raw = Script::new()
        .u8(64)
        .u8(0)
        .activate(1, 128, features)
        .mem(HEADER_AT, &{
            let mut h = [0u8; 16];
            h[8..16].copy_from_slice(&8u64.to_le_bytes());
            h
        })
        .chain(
            0,
            &[
                (HEADER_AT, 16, false),
                (DATA_AT, 4096, true),
                (STATUS_AT, 1, true),
            ],
        )
        .kick(0)
        .build();
    vec![
        ("write-read-flush-id", rw),
        ("discard-write-zeroes", discard),
        ("read-only", read_only),
        ("overlay", overlay),
        ("raw-read-chain", raw),
    ]
}
