//! One vsock stream connection between a guest socket and a host Unix
//! stream: its state, its credit accounting in both directions, and the
//! bounded buffer of guest data waiting for the host to read it.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use event_manager::EventSet;

/// Receive buffer kiln advertises per connection (`buf_alloc`): the most guest
/// data it ever holds for one connection while the host is slow to read.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Longest `CONNECT <port>\n` line a host program may send.
pub const MAX_CONNECT_LINE: usize = 32;

/// Credit-based flow control (virtio spec 5.10.6.3), with wrapping counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Credit {
    /// Guest bytes forwarded to the host (our `fwd_cnt`).
    pub fwd_cnt: u32,
    /// Guest bytes accepted from the tx queue.
    pub rx_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    pub last_adv_fwd: u32,
    /// The guest's receive buffer and how much of what we sent it has consumed.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub tx_cnt: u32,
}

impl Credit {
    /// How many more bytes the guest can take now. A peer reporting more
    /// consumed than was ever sent gets no credit rather than a huge one.
    pub fn peer_credit(&self) -> u32 {
        // A peer reporting more consumed than was ever sent makes the
        // difference wrap to a huge value: no credit rather than a bogus one.
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes accepted from the guest and not yet forwarded.
    pub fn buffered(&self) -> u32 {
        self.rx_cnt.wrapping_sub(self.fwd_cnt)
    }

    /// Room left in the buffer we advertise.
    pub fn our_free(&self) -> u32 {
        CONN_BUF_ALLOC.saturating_sub(self.buffered())
    }

    /// Accounts `n` payload bytes from the guest; false if the guest sent
    /// more than its credit allowed (a protocol violation).
    pub fn accept_from_guest(&mut self, n: u32) -> bool {
        if n > self.our_free() {
            return false;
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(n);
        true
    }

    pub fn forwarded(&mut self, n: u32) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
    }

    pub fn sent_to_guest(&mut self, n: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    pub fn update_peer(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// Values for an outgoing header; remembers what the guest was told.
    pub fn advertise(&mut self) -> (u32, u32) {
        self.last_adv_fwd = self.fwd_cnt;
        (CONN_BUF_ALLOC, self.fwd_cnt)
    }

    /// True when the guest believes less than half our buffer is free while
    /// we have since forwarded data: tell it, or it may stall waiting.
    pub fn update_wanted(&self) -> bool {
        let believed_used = self.rx_cnt.wrapping_sub(self.last_adv_fwd);
        self.fwd_cnt != self.last_adv_fwd && believed_used > CONN_BUF_ALLOC / 2
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// A host program connected to the main socket; reading its `CONNECT` line.
    HostHandshake,
    /// We asked the guest to accept (REQUEST sent or queued).
    LocalInit,
    Established,
}

/// Control packets a connection owes the guest (bit set).
pub const PENDING_REQUEST: u8 = 1;
pub const PENDING_RESPONSE: u8 = 2;
pub const PENDING_SHUTDOWN: u8 = 4;
pub const PENDING_CREDIT_UPDATE: u8 = 8;

/// The result of reading a host program's `CONNECT <port>\n` line.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// No complete line yet.
    Pending,
    Port(u32),
    /// Malformed, overlong, or the host closed: drop the connection.
    Failed,
}

pub struct Conn {
    pub stream: UnixStream,
    pub state: ConnState,
    /// Port on the host side (CID 2) and on the guest side.
    pub local_port: u32,
    pub peer_port: u32,
    pub credit: Credit,
    pub pending: u8,
    line: Vec<u8>,
    /// Guest data the host has not read yet (bounded by `CONN_BUF_ALLOC`).
    to_host: VecDeque<u8>,
    /// The stream reported readable and we have not yet seen EAGAIN.
    pub host_readable: bool,
    /// The host shut its sending side (read returned 0).
    pub host_eof: bool,
    /// The host can no longer receive (hang-up, error): the stream is out of
    /// the poll set and only drained of what it still holds.
    pub host_gone: bool,
    pub guest_shut_send: bool,
    pub guest_shut_rcv: bool,
    /// Our write side of the stream is shut (after the guest's SHUTDOWN SEND).
    pub write_shut: bool,
    /// Interest currently registered with epoll (None: not registered).
    pub registered: Option<EventSet>,
    /// Listed in the muxer's rx work queue.
    pub queued_rx: bool,
}

impl Conn {
    pub fn new(stream: UnixStream, state: ConnState, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            state,
            local_port,
            peer_port,
            credit: Credit::default(),
            pending: 0,
            line: Vec::new(),
            to_host: VecDeque::new(),
            host_readable: false,
            host_eof: false,
            host_gone: false,
            guest_shut_send: false,
            guest_shut_rcv: false,
            write_shut: false,
            registered: None,
            queued_rx: false,
        }
    }

    pub fn key(&self) -> (u32, u32) {
        (self.local_port, self.peer_port)
    }

    /// Reads the handshake line byte by byte, so no data after it is consumed.
    pub fn read_handshake(&mut self) -> Handshake {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return Handshake::Failed,
                Ok(_) if byte[0] == b'\n' => return parse_connect(&self.line),
                Ok(_) => {
                    self.line.push(byte[0]);
                    if self.line.len() > MAX_CONNECT_LINE {
                        return Handshake::Failed;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Handshake::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Handshake::Failed,
            }
        }
    }

    // Only the tests ask.
    #[cfg(test)]
    pub fn to_host_len(&self) -> usize {
        self.to_host.len()
    }

    /// Queues guest payload for the host (credit already checked).
    pub fn push_to_host(&mut self, data: &[u8]) {
        self.to_host.extend(data);
    }

    /// Drops buffered guest data the host can no longer receive, counting it
    /// as forwarded so the guest's credit keeps moving.
    pub fn discard_to_host(&mut self) {
        let n = self.to_host.len() as u32;
        self.to_host.clear();
        self.credit.forwarded(n);
    }

    /// Writes buffered guest data to the host until it would block. Returns
    /// the bytes written; an error means the host is gone.
    pub fn flush_to_host(&mut self) -> io::Result<usize> {
        let mut total = 0;
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.credit.forwarded(n as u32);
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }

    /// Shuts our write side once the guest said it sends no more and all its
    /// data reached the host.
    pub fn maybe_shut_write(&mut self) {
        if self.guest_shut_send && self.to_host.is_empty() && !self.write_shut && !self.host_gone {
            let _ = self.stream.shutdown(Shutdown::Write);
            self.write_shut = true;
        }
    }

    /// Whether host data may be read for the guest now.
    pub fn can_send_data(&self) -> bool {
        self.state == ConnState::Established
            && self.host_readable
            && !self.host_eof
            && !self.guest_shut_rcv
            && self.credit.peer_credit() > 0
    }

    /// The guest closed both directions and every byte it sent reached the
    /// host (or the host is gone): the guest now waits for our RST.
    pub fn finished(&self) -> bool {
        self.state == ConnState::Established
            && self.guest_shut_send
            && self.guest_shut_rcv
            && (self.to_host.is_empty() || self.host_gone)
    }

    /// The epoll interest this connection needs; None: not in the poll set.
    pub fn desired_interest(&self) -> Option<EventSet> {
        if self.host_gone {
            return None;
        }
        Some(match self.state {
            ConnState::HostHandshake => EventSet::IN,
            // Only hang-ups matter until the guest accepts.
            ConnState::LocalInit => EventSet::empty(),
            ConnState::Established => {
                let mut set = EventSet::empty();
                let want_read = !self.host_readable
                    && !self.host_eof
                    && !self.guest_shut_rcv
                    && self.credit.peer_credit() > 0;
                if want_read {
                    set |= EventSet::IN;
                }
                if !self.to_host.is_empty() {
                    set |= EventSet::OUT;
                }
                set
            }
        })
    }
}

/// Parses `CONNECT <port>` (the newline already stripped; a trailing `\r`
/// or blanks are tolerated).
pub fn parse_connect(line: &[u8]) -> Handshake {
    let Ok(text) = std::str::from_utf8(line) else {
        return Handshake::Failed;
    };
    let mut words = text.split_ascii_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("CONNECT"), Some(port), None) => match port.parse::<u32>() {
            Ok(p) => Handshake::Port(p),
            Err(_) => Handshake::Failed,
        },
        _ => Handshake::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_accounting() {
        let mut c = Credit::default();
        c.update_peer(1000, 0);
        assert_eq!(c.peer_credit(), 1000);
        c.sent_to_guest(600);
        assert_eq!(c.peer_credit(), 400);
        c.update_peer(1000, 500);
        assert_eq!(c.peer_credit(), 900);
        // A peer claiming to have consumed more than it got earns nothing.
        c.update_peer(1000, 700);
        assert_eq!(c.peer_credit(), 0);
        // A peer shrinking its buffer below what is in flight: no credit.
        c.update_peer(50, 500);
        assert_eq!(c.peer_credit(), 0);

        // Our side: never accept more than advertised.
        assert_eq!(c.our_free(), CONN_BUF_ALLOC);
        assert!(c.accept_from_guest(CONN_BUF_ALLOC - 10));
        assert!(!c.accept_from_guest(11));
        assert!(c.accept_from_guest(10));
        assert_eq!(c.our_free(), 0);
        assert!(!c.accept_from_guest(1));
        assert!(c.update_wanted() == (c.fwd_cnt != c.last_adv_fwd));
        c.forwarded(CONN_BUF_ALLOC);
        assert!(c.update_wanted());
        assert_eq!(c.advertise(), (CONN_BUF_ALLOC, CONN_BUF_ALLOC));
        assert!(!c.update_wanted());
        assert_eq!(c.our_free(), CONN_BUF_ALLOC);
    }

    #[test]
    fn credit_counters_wrap() {
        let mut c = Credit {
            tx_cnt: u32::MAX - 10,
            peer_fwd_cnt: u32::MAX - 10,
            peer_buf_alloc: 100,
            rx_cnt: u32::MAX - 5,
            fwd_cnt: u32::MAX - 5,
            last_adv_fwd: u32::MAX - 5,
        };
        c.sent_to_guest(50);
        assert_eq!(c.peer_credit(), 50);
        c.update_peer(100, c.tx_cnt);
        assert_eq!(c.peer_credit(), 100);
        assert!(c.accept_from_guest(100));
        assert_eq!(c.buffered(), 100);
        c.forwarded(100);
        assert_eq!(c.buffered(), 0);
    }

    #[test]
    fn small_writes_do_not_trigger_updates() {
        let mut c = Credit::default();
        for _ in 0..100 {
            assert!(c.accept_from_guest(100));
            c.forwarded(100);
            assert!(!c.update_wanted());
        }
        assert!(c.accept_from_guest(CONN_BUF_ALLOC / 2));
        c.forwarded(CONN_BUF_ALLOC / 2);
        assert!(c.update_wanted());
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1234"), Handshake::Port(1234));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Handshake::Port(52));
        assert_eq!(parse_connect(b"CONNECT"), Handshake::Failed);
        assert_eq!(parse_connect(b"CONNECT -1"), Handshake::Failed);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), Handshake::Failed);
        assert_eq!(parse_connect(b"CONNECT 1 2"), Handshake::Failed);
        assert_eq!(parse_connect(b"connect 1"), Handshake::Failed);
        assert_eq!(parse_connect(b"\xff\xfe"), Handshake::Failed);
    }

    #[test]
    fn handshake_reads_only_the_line() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Conn::new(a, ConnState::HostHandshake, 0, 0);
        assert_eq!(c.read_handshake(), Handshake::Pending);
        b.write_all(b"CONN").unwrap();
        assert_eq!(c.read_handshake(), Handshake::Pending);
        b.write_all(b"ECT 77\nDATA").unwrap();
        assert_eq!(c.read_handshake(), Handshake::Port(77));
        let mut rest = [0u8; 4];
        c.stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"DATA");

        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Conn::new(a, ConnState::HostHandshake, 0, 0);
        b.write_all(&[b'x'; 100]).unwrap();
        assert_eq!(c.read_handshake(), Handshake::Failed);
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Conn::new(a, ConnState::HostHandshake, 0, 0);
        drop(b);
        assert_eq!(c.read_handshake(), Handshake::Failed);
    }
}
