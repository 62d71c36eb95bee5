//! Guest RAM: how much, where it sits around the MMIO hole, and the e820 map
//! the guest is told about.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};
use crate::layout::{EBDA_END, FOUR_GIB, HIMEM_START, MMIO_HOLE_START, MPTABLE_START};

/// Smallest guest kiln accepts: room for the boot structures, a kernel and an initramfs.
pub const MIN_MEM_BYTES: u64 = 16 << 20;

/// The RAM ranges `(start, length)` for `mem_bytes` of guest memory: one range
/// below the 32-bit MMIO hole, and the remainder above 4 GiB.
fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (FOUR_GIB, mem_bytes - MMIO_HOLE_START),
        ]
    }
}

/// Checks the requested size against kiln's minimum and the host's RAM.
pub fn validate_size(mem_bytes: u64, host_ram_bytes: Option<u64>) -> Result<()> {
    if mem_bytes < MIN_MEM_BYTES {
        return Err(Error::Config(format!(
            "--mem {mem_bytes} bytes is too small: kiln needs at least {} MiB",
            MIN_MEM_BYTES >> 20
        )));
    }
    if mem_bytes % 4096 != 0 {
        return Err(Error::Config(format!(
            "--mem {mem_bytes} bytes is not a multiple of 4 KiB"
        )));
    }
    if let Some(host) = host_ram_bytes {
        if mem_bytes > host {
            return Err(Error::Config(format!(
                "--mem {} MiB is more than this host's {} MiB of RAM",
                mem_bytes >> 20,
                host >> 20
            )));
        }
    }
    Ok(())
}

/// Total RAM of the host, from /proc/meminfo.
/// Read once per process: a jailed kiln no longer sees /proc (see `jail`).
pub fn host_ram_bytes() -> Option<u64> {
    static RAM: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *RAM.get_or_init(|| {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    })
}

/// Maps anonymous guest memory (lazily backed: untouched pages cost nothing).
pub fn create_guest_memory(mem_bytes: u64) -> Result<GuestMemoryMmap> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_bytes)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    Ok(GuestMemoryMmap::from_ranges(&ranges)?)
}

/// Maps guest memory in a memfd (shared, lazily backed as anonymous memory
/// is), so that a vhost-user backend can map it too: its descriptor is
/// what kiln hands the backend.
pub fn create_shared_guest_memory(mem_bytes: u64) -> Result<GuestMemoryMmap> {
    use std::os::fd::FromRawFd;
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestRegionMmap};
    let failed = |e: std::io::Error| Error::Io {
        what: "creating shared guest memory (memfd)",
        source: e,
    };
    // SAFETY: a NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"kiln-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let ranges = ram_ranges(mem_bytes);
    let total: u64 = ranges.iter().map(|(_, len)| len).sum();
    file.set_len(total).map_err(failed)?;
    let mut regions = Vec::new();
    let mut offset = 0;
    for (start, len) in ranges {
        let mapping = MmapRegionBuilder::new(len as usize)
            .with_file_offset(FileOffset::new(file.try_clone().map_err(failed)?, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| failed(std::io::Error::other(e)))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| failed(std::io::Error::other("guest memory overflows")))?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| failed(std::io::Error::other(e)))
}

/// Maps guest memory of `mem_bytes` from `file` (the regions one after
/// another, as [`write_guest_memory`] writes them) privately: pages are
/// read lazily and a guest write copies its page, so `file` (opened
/// read-only) is never written.
pub fn map_guest_memory_file(
    mem_bytes: u64,
    file: &std::fs::File,
) -> std::io::Result<GuestMemoryMmap> {
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestRegionMmap};
    let mut regions = Vec::new();
    let mut offset = 0;
    for (start, len) in ram_ranges(mem_bytes) {
        let mapping = MmapRegionBuilder::new(len as usize)
            .with_file_offset(FileOffset::new(file.try_clone()?, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(std::io::Error::other)?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| std::io::Error::other("guest memory overflows"))?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(std::io::Error::other)
}

/// Writes every region of `mem` to `file` (new and empty), one after
/// another. Chunks of zeros are skipped: they stay holes, which read back as
/// zeros, so the file takes only the disk space of the memory in use.
pub fn write_guest_memory(mem: &GuestMemoryMmap, file: &mut std::fs::File) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};
    const CHUNK: usize = 64 << 10;
    // Compared whole (memcmp): a byte loop is slow in debug builds.
    static ZEROS: [u8; CHUNK] = [0; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let mut end = 0;
    for region in mem.iter() {
        let len = region.len();
        let mut done = 0;
        while done < len {
            let n = CHUNK.min((len - done) as usize);
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, region.start_addr().unchecked_add(done))
                .map_err(std::io::Error::other)?;
            match *chunk == ZEROS[..n] {
                true => {
                    file.seek(SeekFrom::Current(n as i64))?;
                }
                false => file.write_all(chunk)?,
            }
            done += n as u64;
        }
        end += len;
    }
    // A hole at the end still counts in the file's size.
    file.set_len(end)
}

// The MP table sits in the reserved EBDA area below the legacy hole.
const _: () = assert!(MPTABLE_START < EBDA_END);

/// e820 entry types.
pub const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// The memory map handed to the guest: low RAM below the MP table, the
/// conventional BIOS hole reserved, then RAM from 1 MiB (and above 4 GiB).
pub fn e820_map(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, MPTABLE_START, E820_RAM),
        (MPTABLE_START, HIMEM_START - MPTABLE_START, E820_RESERVED),
    ];
    for (start, len) in ram_ranges(mem_bytes) {
        let start = start.max(HIMEM_START);
        let end = if start == HIMEM_START {
            len
        } else {
            start + len
        };
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// Highest address (exclusive) of RAM below the MMIO hole.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_HOLE_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_below_the_hole_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_ranges(MMIO_HOLE_START), vec![(0, MMIO_HOLE_START)]);
    }

    #[test]
    fn memory_past_the_hole_continues_at_4g() {
        let four_g = 4u64 << 30;
        assert_eq!(
            ram_ranges(four_g),
            vec![(0, MMIO_HOLE_START), (FOUR_GIB, four_g - MMIO_HOLE_START)]
        );
        let e820 = e820_map(four_g);
        let ram: u64 = e820.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        // Everything but the reserved BIOS area is usable RAM.
        assert_eq!(ram, four_g - (HIMEM_START - MPTABLE_START));
        assert_eq!(e820.last().unwrap().0, FOUR_GIB);
    }

    #[test]
    fn e820_is_sorted_and_disjoint() {
        for mem in [16u64 << 20, 1 << 30, 3 << 30, 5 << 30] {
            let e820 = e820_map(mem);
            for w in e820.windows(2) {
                assert!(w[0].0 + w[0].1 <= w[1].0, "{e820:x?}");
            }
            let end = e820.last().map(|e| e.0 + e.1).unwrap();
            assert!(end <= FOUR_GIB.max(mem + (FOUR_GIB - MMIO_HOLE_START)));
        }
    }

    /// Guest memory written to a file and mapped back privately reads the
    /// same; zeros take no disk space; guest writes never reach the file.
    #[test]
    fn a_memory_file_maps_back_privately() {
        use std::os::unix::fs::MetadataExt;
        use vm_memory::Bytes;
        const SIZE: u64 = 4 << 20;
        let dir = crate::rootfs::tests::TempDir::new("memory-file");
        let path = dir.0.join("memory");
        let mem = create_guest_memory(SIZE).unwrap();
        mem.write_obj(0x1234_5678_u32, GuestAddress(0x10)).unwrap();
        mem.write_obj(0xabcd_u16, GuestAddress(SIZE - 2)).unwrap();
        let mut file = std::fs::File::create_new(&path).unwrap();
        write_guest_memory(&mem, &mut file).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), SIZE);
        assert!(meta.blocks() * 512 < SIZE / 2, "{} blocks", meta.blocks());
        let written = std::fs::read(&path).unwrap();

        let file = std::fs::File::open(&path).unwrap();
        let mapped = map_guest_memory_file(SIZE, &file).unwrap();
        assert_eq!(
            mapped.read_obj::<u32>(GuestAddress(0x10)).unwrap(),
            0x1234_5678
        );
        assert_eq!(
            mapped.read_obj::<u16>(GuestAddress(SIZE - 2)).unwrap(),
            0xabcd
        );
        assert_eq!(mapped.read_obj::<u64>(GuestAddress(SIZE / 2)).unwrap(), 0);
        mapped.write_obj(0xffu8, GuestAddress(0x10)).unwrap();
        mapped.write_obj(0xffu8, GuestAddress(SIZE / 2)).unwrap();
        assert_eq!(mapped.read_obj::<u8>(GuestAddress(SIZE / 2)).unwrap(), 0xff);
        drop(mapped);
        assert!(std::fs::read(&path).unwrap() == written, "the file changed");
    }

    #[test]
    fn sizes_are_validated() {
        assert!(validate_size(0, None).is_err());
        assert!(validate_size(MIN_MEM_BYTES - 4096, None).is_err());
        assert!(validate_size(MIN_MEM_BYTES + 1, None).is_err());
        assert!(validate_size(MIN_MEM_BYTES, Some(1 << 30)).is_ok());
        let err = validate_size(2 << 30, Some(1 << 30))
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than this host"), "{err}");
    }
}
