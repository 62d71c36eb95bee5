//! Reading a fuzz input as a script of small fixed-width fields, and
//! writing seeds in the same format.
//!
//! Every read succeeds: past the end of the input, numbers read as zero and
//! byte strings as empty, so any byte string is a valid script and the
//! fuzzer never wastes inputs on a format error.

/// A fuzz input being read front to back.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// The rest of the input.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(usize::MAX)
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let head = self.take(N);
        out[..head.len()].copy_from_slice(head);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// A choice among `n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        usize::from(self.u8()) % n
    }

    /// A byte string with a u16 length in front.
    pub fn bytes(&mut self) -> &'a [u8] {
        let n = usize::from(self.u16());
        self.take(n)
    }

    /// A guest physical address: mostly inside the fuzz guest's 2 MiB (and
    /// its hole), one time in eight any 64-bit value.
    pub fn guest_addr(&mut self) -> u64 {
        match self.u8() % 8 {
            7 => self.u64(),
            _ => u64::from(self.u32()) & 0x1f_ffff,
        }
    }

    /// A buffer length: mostly up to 64 KiB, one time in eight any u32.
    pub fn buf_len(&mut self) -> u32 {
        match self.u8() % 8 {
            7 => self.u32(),
            _ => u32::from(self.u16()),
        }
    }
}

/// A seed under construction, in the format `Input` reads.
#[derive(Default)]
pub struct Script(pub Vec<u8>);

impl Script {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }

    /// A byte string as `Input::bytes` reads it (at most 64 KiB).
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        let n = u16::try_from(bytes.len()).expect("seed byte strings are under 64 KiB");
        self.u16(n).raw(bytes)
    }

    /// An address as `Input::guest_addr` reads it (inside the 2 MiB window).
    pub fn guest_addr(&mut self, addr: u64) -> &mut Self {
        assert!(addr <= 0x1f_ffff, "seed addresses stay in the fuzz guest");
        self.u8(0).u32(addr as u32)
    }

    /// A length as `Input::buf_len` reads it.
    pub fn buf_len(&mut self, len: u32) -> &mut Self {
        match u16::try_from(len) {
            Ok(short) => self.u8(0).u16(short),
            Err(_) => self.u8(7).u32(len),
        }
    }

    pub fn build(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_read_back_and_short_inputs_read_as_zero() {
        let seed = Script::new()
            .u8(3)
            .u16(0x1234)
            .bytes(b"abc")
            .guest_addr(0x1000)
            .buf_len(70_000)
            .build();
        let mut input = Input::new(&seed);
        assert_eq!(input.u8(), 3);
        assert_eq!(input.u16(), 0x1234);
        assert_eq!(input.bytes(), b"abc");
        assert_eq!(input.guest_addr(), 0x1000);
        assert_eq!(input.buf_len(), 70_000);
        assert!(input.is_empty());
        assert_eq!((input.u64(), input.bytes()), (0, &b""[..]));
        let mut short = Input::new(&[1, 2, 3]);
        assert_eq!(short.u32(), 0x0003_0201);
    }
}
