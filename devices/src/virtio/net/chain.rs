//! Descriptor chains as virtio-net sees them: a list of guest memory
//! segments, all device-readable (a TX chain) or all device-writable (an RX
//! chain), every byte inside guest memory, the chain properly terminated and
//! its total length bounded.
//!
//! Anything else is a malformed chain: the caller completes it without
//! touching its buffers.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// One descriptor's buffer, checked to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("empty descriptor chain")]
    Empty,
    #[error("descriptor chain does not end (a loop, more descriptors than the queue, or a bad next index)")]
    Unterminated,
    #[error("descriptor with the wrong direction (device-readable vs device-writable)")]
    WrongDirection,
    #[error("descriptor buffer outside guest memory")]
    OutsideMemory,
    #[error("chain longer than {0} bytes")]
    TooLong(usize),
}

/// What the chain must be made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Device-readable buffers only (TX: the driver's frame).
    Readable,
    /// Device-writable buffers only (RX: room for a received frame).
    Writable,
}

/// Walks `descriptors` (a chain's descriptors in order, as
/// `virtio_queue::DescriptorChain` yields them) into `out`; returns the total
/// byte length. `out` is cleared first.
///
/// `DescriptorChain` stops silently on a loop, a bad `next` index or a chain
/// longer than the queue; such a chain ends with a descriptor that still has
/// its NEXT flag, which is how truncation is detected here.
pub fn parse<I>(
    mem: &GuestMemoryMmap,
    descriptors: I,
    direction: Direction,
    max_len: usize,
    out: &mut Vec<Segment>,
) -> Result<usize, ChainError>
where
    I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
{
    out.clear();
    let mut total = 0usize;
    let mut seen = false;
    let mut last_has_next = false;
    for desc in descriptors {
        seen = true;
        last_has_next = desc.has_next();
        let writable = desc.is_write_only();
        if writable != (direction == Direction::Writable) {
            return Err(ChainError::WrongDirection);
        }
        let len = desc.len() as usize;
        total = total
            .checked_add(len)
            .filter(|&t| t <= max_len)
            .ok_or(ChainError::TooLong(max_len))?;
        if len == 0 {
            continue;
        }
        if !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
            return Err(ChainError::OutsideMemory);
        }
        out.push(Segment {
            addr: desc.addr(),
            len,
        });
    }
    if !seen {
        return Err(ChainError::Empty);
    }
    if last_has_next {
        return Err(ChainError::Unterminated);
    }
    Ok(total)
}

/// Copies the segments' bytes, in order, to the start of `buf` (which must
/// hold their total length); returns the number of bytes copied.
pub fn gather(mem: &GuestMemoryMmap, segments: &[Segment], buf: &mut [u8]) -> Option<usize> {
    let mut off = 0usize;
    for s in segments {
        let dst = buf.get_mut(off..off.checked_add(s.len)?)?;
        mem.read_slice(dst, s.addr).ok()?;
        off += s.len;
    }
    Some(off)
}

/// Writes `data` into the segments in order, starting `skip` bytes into
/// them; returns how many bytes of `data` fit.
pub fn scatter(mem: &GuestMemoryMmap, segments: &[Segment], mut skip: usize, data: &[u8]) -> usize {
    let mut written = 0usize;
    for s in segments {
        if written == data.len() {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let room = s.len - skip;
        let n = room.min(data.len() - written);
        // The segment was checked against guest memory when parsed.
        let Some(addr) = s.addr.0.checked_add(skip as u64) else {
            break;
        };
        if mem
            .write_slice(&data[written..written + n], GuestAddress(addr))
            .is_err()
        {
            break;
        }
        written += n;
        skip = 0;
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};

    const MEM: u64 = 0x10_0000;
    const QSIZE: u16 = 16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    /// Puts `descs` at the start of a queue's descriptor table, makes index
    /// 0 the only available head and parses that chain.
    fn parse_table(
        mem: &GuestMemoryMmap,
        descs: &[Descriptor],
        dir: Direction,
        max: usize,
    ) -> Result<(usize, Vec<Segment>), ChainError> {
        let vq = MockSplitQueue::new(mem, QSIZE);
        for (i, d) in descs.iter().enumerate() {
            vq.desc_table()
                .store(i as u16, RawDescriptor::from(*d))
                .unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(mem).unwrap().next().unwrap();
        let mut out = Vec::new();
        parse(mem, chain, dir, max, &mut out).map(|n| (n, out))
    }

    fn d(addr: u64, len: u32, flags: u32, next: u16) -> Descriptor {
        Descriptor::new(addr, len, flags as u16, next)
    }

    const N: u32 = VRING_DESC_F_NEXT;
    const W: u32 = VRING_DESC_F_WRITE;

    #[test]
    fn well_formed_chains() {
        let m = mem();
        let (n, segs) = parse_table(
            &m,
            &[d(0x8000, 10, N, 1), d(0x9000, 0, N, 2), d(0xa000, 20, 0, 0)],
            Direction::Readable,
            100,
        )
        .unwrap();
        assert_eq!(n, 30);
        assert_eq!(segs.len(), 2, "zero-length descriptors are skipped");
        let (n, _) =
            parse_table(&m, &[d(0x8000, 4096, W, 0)], Direction::Writable, 1 << 20).unwrap();
        assert_eq!(n, 4096);
    }

    #[test]
    fn hostile_chains() {
        let m = mem();
        let r = Direction::Readable;
        // A loop: 0 -> 1 -> 0.
        let e = parse_table(&m, &[d(0x8000, 1, N, 1), d(0x8000, 1, N, 0)], r, 100);
        assert_eq!(e.unwrap_err(), ChainError::Unterminated);
        // A self loop.
        let e = parse_table(&m, &[d(0x8000, 1, N, 0)], r, 1 << 20);
        assert_eq!(e.unwrap_err(), ChainError::Unterminated);
        // next beyond the queue size.
        let e = parse_table(&m, &[d(0x8000, 1, N, 999)], r, 100);
        assert_eq!(e.unwrap_err(), ChainError::Unterminated);
        // Outside guest memory, straddling its end, and address overflow.
        let e = parse_table(&m, &[d(MEM, 1, 0, 0)], r, 100);
        assert_eq!(e.unwrap_err(), ChainError::OutsideMemory);
        let e = parse_table(&m, &[d(MEM - 4, 8, 0, 0)], r, 100);
        assert_eq!(e.unwrap_err(), ChainError::OutsideMemory);
        let e = parse_table(&m, &[d(u64::MAX - 2, 8, 0, 0)], r, 100);
        assert_eq!(e.unwrap_err(), ChainError::OutsideMemory);
        // Huge lengths.
        let e = parse_table(&m, &[d(0x8000, u32::MAX, 0, 0)], r, 65536);
        assert_eq!(e.unwrap_err(), ChainError::TooLong(65536));
        // Writable where readable is needed, and the reverse.
        let e = parse_table(&m, &[d(0x8000, 8, N, 1), d(0x9000, 8, W, 0)], r, 100);
        assert_eq!(e.unwrap_err(), ChainError::WrongDirection);
        let e = parse_table(&m, &[d(0x8000, 8, 0, 0)], Direction::Writable, 100);
        assert_eq!(e.unwrap_err(), ChainError::WrongDirection);
    }

    #[test]
    fn gather_and_scatter_round_trip() {
        let m = mem();
        let segs = [
            Segment {
                addr: GuestAddress(0x8000),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x9000),
                len: 5,
            },
        ];
        assert_eq!(scatter(&m, &segs, 2, b"abcdefgh"), 6);
        let mut buf = [0u8; 8];
        assert_eq!(gather(&m, &segs, &mut buf), Some(8));
        assert_eq!(&buf[2..], b"abcdef");
        // A buffer too small for the segments is refused, not overrun.
        assert_eq!(gather(&m, &segs, &mut [0u8; 7]), None);
    }

    proptest! {
        /// Any descriptor table, any head: parsing never panics, and when it
        /// succeeds the segments are inside memory, in the right direction,
        /// within the bound, and gathering them yields exactly their bytes.
        #[test]
        fn random_tables(
            raw in proptest::collection::vec(
                (0u64..MEM + 0x1000, 0u32..0x3000, 0u16..8, 0u16..(QSIZE + 4)),
                1..(QSIZE as usize),
            ),
            head in 0u16..QSIZE,
            writable in any::<bool>(),
            max in 0usize..0x8000,
        ) {
            let m = mem();
            // Fill guest memory with a pattern so gathered bytes can be checked.
            let pattern: Vec<u8> = (0..MEM).map(|i| (i % 251) as u8).collect();
            m.write_slice(&pattern, GuestAddress(0)).unwrap();
            let vq = MockSplitQueue::create(&m, GuestAddress(0xf0000), QSIZE);
            for (i, &(addr, len, flags, next)) in raw.iter().enumerate() {
                let desc = Descriptor::new(addr, len, flags & 7, next);
                vq.desc_table().store(i as u16, RawDescriptor::from(desc)).unwrap();
            }
            vq.avail().ring().ref_at(0).unwrap().store(head);
            vq.avail().idx().store(1);
            let mut q: Queue = vq.create_queue().unwrap();
            // What memory holds now: the queue's own rings sit inside it,
            // and a buffer may overlap them.
            let mut pattern = vec![0u8; MEM as usize];
            m.read_slice(&mut pattern, GuestAddress(0)).unwrap();
            let chain = q.iter(&m).unwrap().next().unwrap();
            let dir = if writable { Direction::Writable } else { Direction::Readable };
            let mut segs = Vec::new();
            if let Ok(total) = parse(&m, chain, dir, max, &mut segs) {
                prop_assert!(total <= max);
                prop_assert_eq!(segs.iter().map(|s| s.len).sum::<usize>(), total);
                let mut buf = vec![0u8; total];
                prop_assert_eq!(gather(&m, &segs, &mut buf), Some(total));
                let mut off = 0;
                for s in &segs {
                    prop_assert!(s.addr.0 + s.len as u64 <= MEM);
                    prop_assert_eq!(&buf[off..off + s.len], &pattern[s.addr.0 as usize..s.addr.0 as usize + s.len]);
                    off += s.len;
                }
            }
        }
    }
}
