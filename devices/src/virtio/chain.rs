//! Descriptor chains as every kiln device sees them: the guest buffers of
//! one chain, split into its device-readable and device-writable segments,
//! each checked to lie inside guest memory, and a cursor that copies bytes
//! in and out of them in order.
//!
//! Walking is bounded: `virtio_queue::DescriptorChain` stops after a ring's
//! (or an indirect table's) worth of descriptors and at 4 GiB, and `Limits`
//! cuts the descriptor count and byte total lower. A chain that breaks a rule
//! keeps the segments before the fault and names the fault; the device
//! decides what a faulty chain gets (most return it unused).
//!
//! Why not virtio-queue's `Reader`/`Writer`: they drop the readable-then-
//! writable order (a `Reader` skips writable descriptors, a `Writer`
//! readable ones), so block cannot refuse a misordered request; they cannot
//! tell a chain cut short by a loop or a bad `next` index from a complete
//! one, and have no length or descriptor limit; they fail as a whole on one
//! bad descriptor, where virtio-rng fills the good ones; and they borrow
//! guest memory, so virtio-net cannot keep receive chains across events.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// One descriptor's buffer, checked to lie inside guest memory when the
/// chain was parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// The order of buffers a device expects in its chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Device-readable buffers only (a transmit chain).
    ReadOnly,
    /// Device-writable buffers only (a receive chain).
    WriteOnly,
    /// Device-readable buffers, then device-writable ones (a request and
    /// room for its answer).
    ReadThenWrite,
}

/// Bounds on one chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Descriptors, zero-length ones included.
    pub max_descriptors: usize,
    /// Bytes in all buffers together.
    pub max_bytes: u64,
}

impl Limits {
    /// At most `max_descriptors` descriptors and no byte bound beyond the
    /// ring's own 4 GiB.
    pub const fn descriptors(max_descriptors: usize) -> Self {
        Self {
            max_descriptors,
            max_bytes: u64::MAX,
        }
    }

    pub const fn with_max_bytes(self, max_bytes: u64) -> Self {
        Self { max_bytes, ..self }
    }
}

/// The first rule a chain broke.
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
    TooLong(u64),
    #[error("chain of more than {0} descriptors")]
    TooManyDescriptors(usize),
}

/// A descriptor as the ring gave it (not checked); `Chain::last` is the
/// chain's last one, whose rules may not have been checked (the chain broke
/// one before).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastDescriptor {
    pub addr: GuestAddress,
    pub len: u32,
    pub writable: bool,
}

/// A parsed descriptor chain. Reused from chain to chain by the queue loop,
/// so parsing does not allocate once the vectors have grown.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    head: u16,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    readable_len: u64,
    writable_len: u64,
    last: Option<LastDescriptor>,
    fault: Option<ChainError>,
}

impl Chain {
    /// Parses `descriptors` (a chain from the ring) against `layout` and
    /// `limits`.
    pub fn parsed<M>(
        mem: &GuestMemoryMmap,
        descriptors: DescriptorChain<M>,
        layout: Layout,
        limits: Limits,
    ) -> Self
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let mut chain = Self::default();
        chain.parse(mem, descriptors, layout, limits);
        chain
    }

    /// Parses into `self`, replacing what it held.
    pub fn parse<M>(
        &mut self,
        mem: &GuestMemoryMmap,
        descriptors: DescriptorChain<M>,
        layout: Layout,
        limits: Limits,
    ) where
        M: Deref,
        M::Target: GuestMemory,
    {
        self.head = descriptors.head_index();
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
        self.last = None;
        self.fault = None;
        let mut count = 0usize;
        let mut last_has_next = false;
        // Every descriptor is walked, even past a fault: the last one is
        // where block's status byte lives.
        for desc in descriptors {
            count += 1;
            last_has_next = desc.has_next();
            let this = LastDescriptor {
                addr: desc.addr(),
                len: desc.len(),
                writable: desc.is_write_only(),
            };
            self.last = Some(this);
            if self.fault.is_none() {
                self.fault = self.take(mem, this, count, layout, limits);
            }
        }
        if self.fault.is_none() {
            if count == 0 {
                self.fault = Some(ChainError::Empty);
            } else if last_has_next {
                // DescriptorChain stops silently on a loop, a bad next index
                // or 4 GiB; the descriptor it stopped at still says NEXT.
                self.fault = Some(ChainError::Unterminated);
            }
        }
    }

    /// Checks the `count`th descriptor and records its segment; returns the
    /// rule it breaks.
    fn take(
        &mut self,
        mem: &GuestMemoryMmap,
        desc: LastDescriptor,
        count: usize,
        layout: Layout,
        limits: Limits,
    ) -> Option<ChainError> {
        let LastDescriptor {
            addr,
            len,
            writable,
        } = desc;
        if count > limits.max_descriptors {
            return Some(ChainError::TooManyDescriptors(limits.max_descriptors));
        }
        if len == 0 {
            // Carries nothing: its address and direction are never used.
            return None;
        }
        let allowed = match layout {
            Layout::ReadOnly => !writable,
            Layout::WriteOnly => writable,
            Layout::ReadThenWrite => writable || self.writable.is_empty(),
        };
        if !allowed {
            return Some(ChainError::WrongDirection);
        }
        let total = self.readable_len + self.writable_len + u64::from(len);
        if total > limits.max_bytes {
            return Some(ChainError::TooLong(limits.max_bytes));
        }
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(addr, len as usize, access) {
            return Some(ChainError::OutsideMemory);
        }
        let segment = Segment { addr, len };
        if writable {
            self.writable.push(segment);
            self.writable_len += u64::from(len);
        } else {
            self.readable.push(segment);
            self.readable_len += u64::from(len);
        }
        None
    }

    /// The head index, under which the chain goes back to the driver.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Device-readable segments (zero-length descriptors left out).
    #[cfg(test)] // only the tests look at the segments themselves
    pub fn readable(&self) -> &[Segment] {
        &self.readable
    }

    /// Device-writable segments (zero-length descriptors left out).
    pub fn writable(&self) -> &[Segment] {
        &self.writable
    }

    pub fn readable_len(&self) -> u64 {
        self.readable_len
    }

    pub fn writable_len(&self) -> u64 {
        self.writable_len
    }

    pub fn last(&self) -> Option<LastDescriptor> {
        self.last
    }

    /// The first rule the chain broke; the segments are those before it.
    pub fn fault(&self) -> Option<ChainError> {
        self.fault
    }

    /// Ok when the chain broke no rule.
    pub fn check(&self) -> Result<(), ChainError> {
        self.fault.map_or(Ok(()), Err)
    }

    /// A cursor over the device-readable bytes.
    pub fn reader(&self) -> Cursor<'_> {
        Cursor::new(&self.readable)
    }

    /// A cursor over the device-writable bytes.
    pub fn writer(&self) -> Cursor<'_> {
        Cursor::new(&self.writable)
    }
}

/// The segments ended before the data did (or, for segments not made by
/// `Chain`, guest memory did).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the chain's buffers end before the data")]
pub struct ShortChain;

/// A position in a list of guest segments, for copying in and out in order.
#[derive(Clone, Debug)]
pub struct Cursor<'a> {
    segs: &'a [Segment],
    index: usize,
    offset: u32,
}

impl<'a> Cursor<'a> {
    pub fn new(segs: &'a [Segment]) -> Self {
        Self {
            segs,
            index: 0,
            offset: 0,
        }
    }

    /// Bytes left after the position.
    pub fn remaining(&self) -> u64 {
        let total: u64 = self.segs[self.index.min(self.segs.len())..]
            .iter()
            .map(|s| u64::from(s.len))
            .sum();
        total - u64::from(self.offset)
    }

    /// The current segment's unconsumed part.
    fn current(&self) -> Option<(GuestAddress, u32)> {
        let s = self.segs.get(self.index)?;
        let addr = s.addr.checked_add(u64::from(self.offset))?;
        Some((addr, s.len - self.offset))
    }

    fn advance(&mut self, n: u32) {
        self.offset += n;
        if let Some(s) = self.segs.get(self.index) {
            if self.offset >= s.len {
                self.index += 1;
                self.offset = 0;
            }
        }
    }

    /// Copies guest bytes into `buf` until it is full or the segments end;
    /// returns how many were copied.
    pub fn read(&mut self, mem: &GuestMemoryMmap, buf: &mut [u8]) -> usize {
        let mut done = 0;
        while done < buf.len() {
            let Some((addr, avail)) = self.current() else {
                break;
            };
            let n = (avail as usize).min(buf.len() - done);
            if mem.read_slice(&mut buf[done..done + n], addr).is_err() {
                break;
            }
            self.advance(n as u32);
            done += n;
        }
        done
    }

    /// Fills `buf` from guest memory; fails if the segments run out.
    pub fn read_exact(&mut self, mem: &GuestMemoryMmap, buf: &mut [u8]) -> Result<(), ShortChain> {
        if self.read(mem, buf) == buf.len() {
            Ok(())
        } else {
            Err(ShortChain)
        }
    }

    /// Copies `data` into guest memory until it is written or the segments
    /// end; returns how many bytes were written.
    pub fn write(&mut self, mem: &GuestMemoryMmap, data: &[u8]) -> usize {
        let mut done = 0;
        while done < data.len() {
            let Some((addr, avail)) = self.current() else {
                break;
            };
            let n = (avail as usize).min(data.len() - done);
            if mem.write_slice(&data[done..done + n], addr).is_err() {
                break;
            }
            self.advance(n as u32);
            done += n;
        }
        done
    }

    /// Copies all of `data` into guest memory; fails if the segments run out.
    pub fn write_all(&mut self, mem: &GuestMemoryMmap, data: &[u8]) -> Result<(), ShortChain> {
        if self.write(mem, data) == data.len() {
            Ok(())
        } else {
            Err(ShortChain)
        }
    }

    /// What is left, as segments.
    pub fn rest(&self) -> Vec<Segment> {
        let mut out = Vec::new();
        if let Some((addr, len)) = self.current() {
            if len > 0 {
                out.push(Segment { addr, len });
            }
            out.extend_from_slice(&self.segs[self.index + 1..]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};

    const MEM: u64 = 0x10_0000;
    const QSIZE: u16 = 16;
    const ANY: Limits = Limits::descriptors(usize::MAX);

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    /// Puts `descs` at the start of a queue's descriptor table, makes index
    /// 0 the only available head and parses that chain.
    fn parse_table(
        mem: &GuestMemoryMmap,
        descs: &[Descriptor],
        layout: Layout,
        limits: Limits,
    ) -> Chain {
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
        Chain::parsed(mem, chain, layout, limits)
    }

    /// The total length, or the fault.
    fn parse_len(
        mem: &GuestMemoryMmap,
        descs: &[Descriptor],
        layout: Layout,
        max_bytes: u64,
    ) -> Result<u64, ChainError> {
        let c = parse_table(mem, descs, layout, ANY.with_max_bytes(max_bytes));
        c.check().map(|()| c.readable_len() + c.writable_len())
    }

    fn d(addr: u64, len: u32, flags: u32, next: u16) -> Descriptor {
        Descriptor::new(addr, len, flags as u16, next)
    }

    const N: u32 = VRING_DESC_F_NEXT;
    const W: u32 = VRING_DESC_F_WRITE;

    #[test]
    fn well_formed_chains() {
        let m = mem();
        let c = parse_table(
            &m,
            &[d(0x8000, 10, N, 1), d(0x9000, 0, N, 2), d(0xa000, 20, 0, 0)],
            Layout::ReadOnly,
            ANY.with_max_bytes(100),
        );
        assert_eq!(c.check(), Ok(()));
        assert_eq!(c.readable_len(), 30);
        assert_eq!(c.readable().len(), 2, "zero-length descriptors are skipped");
        assert_eq!(c.head(), 0);
        let n = parse_len(&m, &[d(0x8000, 4096, W, 0)], Layout::WriteOnly, 1 << 20);
        assert_eq!(n, Ok(4096));
        // A request: readable header, writable data and status.
        let c = parse_table(
            &m,
            &[
                d(0x8000, 16, N, 1),
                d(0x9000, 512, W | N, 2),
                d(0xa000, 1, W, 0),
            ],
            Layout::ReadThenWrite,
            ANY,
        );
        assert_eq!(c.check(), Ok(()));
        assert_eq!((c.readable_len(), c.writable_len()), (16, 513));
        let last = c.last().unwrap();
        assert_eq!(
            (last.addr, last.len, last.writable),
            (GuestAddress(0xa000), 1, true)
        );
    }

    #[test]
    fn hostile_chains() {
        let m = mem();
        let r = Layout::ReadOnly;
        // A loop: 0 -> 1 -> 0.
        let e = parse_len(&m, &[d(0x8000, 1, N, 1), d(0x8000, 1, N, 0)], r, 100);
        assert_eq!(e.unwrap_err(), ChainError::Unterminated);
        // A self loop.
        let e = parse_len(&m, &[d(0x8000, 1, N, 0)], r, 1 << 20);
        assert_eq!(e.unwrap_err(), ChainError::Unterminated);
        // next beyond the queue size.
        let e = parse_len(&m, &[d(0x8000, 1, N, 999)], r, 100);
        assert_eq!(e.unwrap_err(), ChainError::Unterminated);
        // Outside guest memory, straddling its end, and address overflow.
        let e = parse_len(&m, &[d(MEM, 1, 0, 0)], r, 100);
        assert_eq!(e.unwrap_err(), ChainError::OutsideMemory);
        let e = parse_len(&m, &[d(MEM - 4, 8, 0, 0)], r, 100);
        assert_eq!(e.unwrap_err(), ChainError::OutsideMemory);
        let e = parse_len(&m, &[d(u64::MAX - 2, 8, 0, 0)], r, 100);
        assert_eq!(e.unwrap_err(), ChainError::OutsideMemory);
        // Huge lengths.
        let e = parse_len(&m, &[d(0x8000, u32::MAX, 0, 0)], r, 65536);
        assert_eq!(e.unwrap_err(), ChainError::TooLong(65536));
        // Writable where readable is needed, and the reverse.
        let e = parse_len(&m, &[d(0x8000, 8, N, 1), d(0x9000, 8, W, 0)], r, 100);
        assert_eq!(e.unwrap_err(), ChainError::WrongDirection);
        let e = parse_len(&m, &[d(0x8000, 8, 0, 0)], Layout::WriteOnly, 100);
        assert_eq!(e.unwrap_err(), ChainError::WrongDirection);
        // Readable after writable in a request.
        let e = parse_len(
            &m,
            &[d(0x8000, 8, W | N, 1), d(0x9000, 8, 0, 0)],
            Layout::ReadThenWrite,
            100,
        );
        assert_eq!(e.unwrap_err(), ChainError::WrongDirection);
        // More descriptors than allowed; the walk still finds the last one.
        let c = parse_table(
            &m,
            &[d(0x8000, 8, N, 1), d(0x8000, 8, N, 2), d(0x9000, 1, W, 0)],
            Layout::ReadThenWrite,
            Limits::descriptors(2),
        );
        assert_eq!(c.fault(), Some(ChainError::TooManyDescriptors(2)));
        assert_eq!(c.readable().len(), 2, "segments before the fault are kept");
        assert_eq!(c.last().unwrap().addr, GuestAddress(0x9000));
        // An indirect table of odd length yields nothing.
        let e = parse_len(&m, &[d(0x8000, 17, VRING_DESC_F_INDIRECT, 0)], r, 100);
        assert_eq!(e.unwrap_err(), ChainError::Empty);
    }

    #[test]
    fn cursor_reads_and_writes_across_segments() {
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
        let mut w = Cursor::new(&segs);
        assert_eq!(w.write(&m, b"ab"), 2);
        assert_eq!(w.remaining(), 6);
        assert_eq!(
            w.rest(),
            vec![
                Segment {
                    addr: GuestAddress(0x8002),
                    len: 1
                },
                segs[1]
            ]
        );
        assert_eq!(w.write(&m, b"cdefghij"), 6, "only what fits");
        assert_eq!(w.write_all(&m, b"x"), Err(ShortChain));
        let mut buf = [0u8; 8];
        assert_eq!(Cursor::new(&segs).read_exact(&m, &mut buf), Ok(()));
        assert_eq!(&buf, b"abcdefgh");
        // A buffer larger than the segments is refused, not overrun.
        let mut r = Cursor::new(&segs);
        assert_eq!(r.read_exact(&m, &mut [0u8; 9]), Err(ShortChain));
        assert_eq!(r.remaining(), 0);
        assert!(r.rest().is_empty());
    }

    fn layout_strategy() -> impl Strategy<Value = Layout> {
        prop_oneof![
            Just(Layout::ReadOnly),
            Just(Layout::WriteOnly),
            Just(Layout::ReadThenWrite)
        ]
    }

    proptest! {
        /// Any descriptor table, any head, any layout and limits: parsing
        /// never panics; every segment (faulty chain or not) is inside
        /// memory, non-empty, in a direction the layout allows,
        /// within the limits; a chain without a fault is not empty; and the
        /// cursors read back exactly the segments' bytes.
        #[test]
        fn random_tables(
            raw in proptest::collection::vec(
                (0u64..MEM + 0x1000, 0u32..0x3000, 0u16..8, 0u16..(QSIZE + 4)),
                1..(QSIZE as usize),
            ),
            head in 0u16..QSIZE,
            layout in layout_strategy(),
            max_bytes in 0u64..0x8000,
            max_descriptors in 1usize..20,
        ) {
            let m = mem();
            // Fill guest memory with a pattern so read bytes can be checked.
            let pattern: Vec<u8> = (0..MEM).map(|i| (i % 251) as u8).collect();
            m.write_slice(&pattern, GuestAddress(0)).unwrap();
            let vq = MockSplitQueue::create(&m, GuestAddress(0xf0000), QSIZE);
            for (i, &(addr, len, flags, next)) in raw.iter().enumerate() {
                let desc = Descriptor::new(addr, len, flags & 7, next);
                vq.desc_table().store(i as u16, RawDescriptor::from(desc)).unwrap();
            }
            vq.avail().ring().ref_at(0).unwrap().store(head);
            vq.avail().idx().store(1);
            // Buffers may cover the rings too: compare with memory as it is now.
            let mut pattern = vec![0u8; MEM as usize];
            m.read_slice(&mut pattern, GuestAddress(0)).unwrap();
            let mut q: Queue = vq.create_queue().unwrap();
            let chain = q.iter(&m).unwrap().next().unwrap();
            let limits = Limits { max_descriptors, max_bytes };
            let c = Chain::parsed(&m, chain, layout, limits);
            prop_assert_eq!(c.head(), head);
            let total = c.readable_len() + c.writable_len();
            prop_assert!(total <= max_bytes);
            prop_assert!(c.readable().len() + c.writable().len() <= max_descriptors);
            match layout {
                Layout::ReadOnly => prop_assert!(c.writable().is_empty()),
                Layout::WriteOnly => prop_assert!(c.readable().is_empty()),
                Layout::ReadThenWrite => {}
            }
            if c.check().is_ok() {
                prop_assert!(c.last().is_some());
            }
            for (segs, len) in [(c.readable(), c.readable_len()), (c.writable(), c.writable_len())] {
                prop_assert_eq!(segs.iter().map(|s| u64::from(s.len)).sum::<u64>(), len);
                let mut buf = vec![0u8; len as usize];
                prop_assert_eq!(Cursor::new(segs).read_exact(&m, &mut buf), Ok(()));
                let mut off = 0;
                for s in segs {
                    let (a, n) = (s.addr.0 as usize, s.len as usize);
                    prop_assert!(n > 0);
                    prop_assert!((a + n) as u64 <= MEM);
                    prop_assert_eq!(&buf[off..off + n], &pattern[a..a + n]);
                    off += n;
                }
            }
        }
    }
}
