//! The host side of virtio-vsock: guest stream connections multiplexed onto
//! Unix sockets.
//!
//! - A host program connects to the main socket `PATH` and writes
//!   `CONNECT <port>\n`; kiln asks the guest to accept on `<port>` and answers
//!   `OK <host port>\n` once it does (or closes the connection if the guest
//!   refuses).
//! - A guest connection to host port `P` is forwarded to the Unix socket
//!   `PATH_P`; if nobody listens there the guest gets a reset.
//!
//! Everything runs on the monitor's event thread and never blocks: streams are
//! non-blocking, a stream is polled for reading only while the guest has
//! credit for more data, for writing only while guest data is waiting, and
//! guest data kiln buffers per connection is bounded by the receive buffer it
//! advertises (a guest exceeding its credit is reset).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::EventSet;
use vm_memory::GuestMemoryMmap;

use super::conn::{
    Conn, ConnState, Handshake, PENDING_CREDIT_UPDATE, PENDING_REQUEST, PENDING_RESPONSE,
    PENDING_SHUTDOWN,
};
use super::packet::{
    checked_payload_len, read_header, Header, HDR_SIZE, HOST_CID, MAX_PKT_PAYLOAD,
    OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN,
    SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::VsockCounters;
use crate::virtio::chain::{Chain, Cursor};
use crate::virtio::queue::Served;

/// Most connections (in any state) at once.
pub const MAX_CONNS: usize = 128;
/// Control packets waiting for guest rx buffers before kiln stops taking tx
/// packets (which could each ask for another).
pub const MAX_CONTROL: usize = 256;
/// Event data of the listening socket; connection tokens start above.
pub const LISTENER_TOKEN: u32 = 8;
pub const FIRST_CONN_TOKEN: u32 = 16;
/// Host-side ports for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Room for `_4294967295` after the main socket path inside `sun_path`.
const PORT_SUFFIX_MAX: usize = 11;

/// The epoll operations the muxer needs (the event loop's `EventOps` in the
/// monitor, a recorder in tests).
pub trait Poller {
    fn add(&mut self, fd: RawFd, data: u32, set: EventSet) -> io::Result<()>;
    fn modify(&mut self, fd: RawFd, data: u32, set: EventSet) -> io::Result<()>;
    fn remove(&mut self, fd: RawFd);
}

enum RxWork {
    Control,
    Conn(u32),
}

enum Fill {
    /// Wrote a packet of this many bytes.
    Sent(u32),
    /// Nothing to send after all (state changed); try other work.
    Nothing,
}

pub struct Muxer {
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    listener_registered: bool,
    /// accept() failed (e.g. out of fds): stop polling until a connection closes.
    listener_paused: bool,
    conns: HashMap<u32, Conn>,
    /// (host port, guest port) -> token.
    by_key: HashMap<(u32, u32), u32>,
    /// Connections that may have something for the guest, served round-robin.
    rx_queue: VecDeque<u32>,
    /// Resets for packets that belong to no connection.
    control: VecDeque<Header>,
    /// Closed connections whose fds still have to leave the poll set.
    graveyard: Vec<Conn>,
    next_token: u32,
    next_local_port: u32,
    scratch: Vec<u8>,
    /// Shared with the device (which logs them at exit).
    pub(super) counters: Arc<VsockCounters>,
}

/// Binds the main socket, replacing a stale socket file but nothing else.
pub fn bind_listener(path: &Path) -> io::Result<UnixListener> {
    if path.as_os_str().len() + PORT_SUFFIX_MAX >= 108 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {} is too long (at most {} bytes, to leave room for _PORT)",
                path.display(),
                107 - PORT_SUFFIX_MAX
            ),
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the file exists and is not a socket",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Connects to a Unix stream socket without ever blocking: a listener with
/// a full backlog is a failure, not a wait.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created socket nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid, NUL-terminated sockaddr_un and the length
    // passed is its size.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

impl Muxer {
    pub fn new(cid: u64, path: &Path, counters: Arc<VsockCounters>) -> io::Result<Self> {
        let listener = bind_listener(path)?;
        Ok(Self {
            cid,
            path: path.to_path_buf(),
            listener,
            listener_registered: false,
            listener_paused: false,
            conns: HashMap::new(),
            by_key: HashMap::new(),
            rx_queue: VecDeque::new(),
            control: VecDeque::new(),
            graveyard: Vec::new(),
            next_token: FIRST_CONN_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            scratch: vec![0; MAX_PKT_PAYLOAD],
            counters,
        })
    }

    // Only the tests ask.
    #[cfg(test)]
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    #[cfg(test)]
    pub fn connections(&self) -> impl Iterator<Item = &Conn> {
        self.conns.values()
    }

    pub fn control_has_room(&self) -> bool {
        self.control.len() < MAX_CONTROL
    }

    /// Forgets every connection (device reset): host streams are closed.
    pub fn reset(&mut self) {
        self.graveyard.extend(self.conns.drain().map(|(_, c)| c));
        self.by_key.clear();
        self.rx_queue.clear();
        self.control.clear();
        self.listener_paused = false;
    }

    fn alloc_token(&mut self) -> u32 {
        loop {
            let t = self.next_token;
            self.next_token = self.next_token.checked_add(1).unwrap_or(FIRST_CONN_TOKEN);
            if !self.conns.contains_key(&t) {
                return t;
            }
        }
    }

    fn header_for(&self, conn: &Conn, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: conn.local_port,
            dst_port: conn.peer_port,
            type_: TYPE_STREAM,
            op,
            ..Default::default()
        }
    }

    /// A reset answering a guest packet that has no connection.
    fn reply_rst(&mut self, to: &Header) {
        if to.op == OP_RST {
            return;
        }
        self.counters.resets.inc();
        self.control.push_back(Header {
            src_cid: to.dst_cid,
            dst_cid: self.cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        });
    }

    fn mark_rx(&mut self, token: u32) {
        if let Some(c) = self.conns.get_mut(&token) {
            if !c.queued_rx {
                c.queued_rx = true;
                self.rx_queue.push_back(token);
            }
        }
    }

    /// Closes a connection without telling the guest.
    fn close_conn(&mut self, token: u32) {
        if let Some(conn) = self.conns.remove(&token) {
            if self.by_key.get(&conn.key()) == Some(&token) {
                self.by_key.remove(&conn.key());
            }
            self.graveyard.push(conn);
            self.listener_paused = false;
        }
    }

    /// Resets a connection: RST to the guest (if it knows the connection)
    /// and close the host stream.
    fn reset_conn(&mut self, token: u32) {
        let Some(conn) = self.conns.get(&token) else {
            return;
        };
        let guest_knows = match conn.state {
            ConnState::HostHandshake => false,
            ConnState::LocalInit => conn.pending & PENDING_REQUEST == 0,
            ConnState::Established => true,
        };
        if guest_knows {
            let h = self.header_for(conn, OP_RST);
            self.control.push_back(h);
            self.counters.resets.inc();
        }
        self.close_conn(token);
    }

    /// The host side can no longer receive: tell the guest (SHUTDOWN RCV,
    /// plus SEND once the stream's remaining data has been read).
    fn host_gone(&mut self, token: u32) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.state != ConnState::Established {
            self.reset_conn(token);
            return;
        }
        if !conn.host_gone {
            conn.host_gone = true;
            // Whatever the host wrote before closing still goes to the guest.
            conn.host_readable = true;
            conn.discard_to_host();
            conn.pending |= PENDING_SHUTDOWN;
        }
        self.after_change(token);
    }

    /// Re-evaluates a connection after its state changed.
    fn after_change(&mut self, token: u32) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.finished() {
            self.reset_conn(token);
            return;
        }
        conn.maybe_shut_write();
        if conn.state == ConnState::Established && conn.credit.update_wanted() {
            conn.pending |= PENDING_CREDIT_UPDATE;
        }
        if conn.pending != 0 || conn.can_send_data() {
            self.mark_rx(token);
        }
    }

    /// Accepts host programs on the main socket.
    pub fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= MAX_CONNS {
                        log::warn!("vsock: too many connections; refusing a host connection");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("vsock: host connection: {e}");
                        continue;
                    }
                    let token = self.alloc_token();
                    self.conns
                        .insert(token, Conn::new(stream, ConnState::HostHandshake, 0, 0));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("vsock: accept on {}: {e}", self.path.display());
                    self.listener_paused = true;
                    return;
                }
            }
        }
    }

    /// Handles readiness of a connection's host stream.
    pub fn conn_event(&mut self, token: u32, set: EventSet) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let hangup = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        match conn.state {
            ConnState::HostHandshake => match conn.read_handshake() {
                Handshake::Port(port) => self.start_local(token, port),
                Handshake::Pending if !hangup => {}
                Handshake::Pending | Handshake::Failed => self.close_conn(token),
            },
            ConnState::LocalInit => {
                if hangup {
                    self.reset_conn(token);
                }
            }
            ConnState::Established => {
                if set.contains(EventSet::IN) {
                    conn.host_readable = true;
                }
                if set.contains(EventSet::OUT) {
                    self.flush(token);
                }
                if hangup {
                    self.host_gone(token);
                }
                self.after_change(token);
            }
        }
    }

    /// Writes a connection's buffered guest data to its host stream.
    fn flush(&mut self, token: u32) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.host_gone {
            return;
        }
        if let Err(e) = conn.flush_to_host() {
            log::debug!("vsock: host stream of port {}: {e}", conn.local_port);
            self.host_gone(token);
        }
    }

    /// A host program asked for guest port `port`: ask the guest.
    fn start_local(&mut self, token: u32, port: u32) {
        let local = loop {
            let p = self.next_local_port;
            self.next_local_port = p.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.by_key.contains_key(&(p, port)) {
                break p;
            }
        };
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        conn.state = ConnState::LocalInit;
        conn.local_port = local;
        conn.peer_port = port;
        conn.pending |= PENDING_REQUEST;
        self.by_key.insert((local, port), token);
        self.mark_rx(token);
    }

    /// The guest connects to host port `hdr.dst_port`: forward to `PATH_<port>`.
    fn guest_connect(&mut self, hdr: &Header) {
        if self.conns.len() >= MAX_CONNS {
            // Per guest packet: at debug level, or the guest floods the log.
            log::debug!(
                "vsock: too many connections; refusing guest port {}",
                hdr.src_port
            );
            self.reply_rst(hdr);
            return;
        }
        let mut target = self.path.clone().into_os_string();
        target.push(format!("_{}", hdr.dst_port));
        let stream = match connect_nonblocking(Path::new(&target)) {
            Ok(s) => s,
            Err(e) => {
                log::debug!(
                    "vsock: guest connect to {}: {e}",
                    Path::new(&target).display()
                );
                // Said once: a jailed kiln (not root) may not reach a
                // socket its user made, and the guest sees only a reset.
                static DENIED: std::sync::Once = std::sync::Once::new();
                if e.kind() == io::ErrorKind::PermissionDenied {
                    DENIED.call_once(|| {
                        log::warn!(
                            "vsock: no permission to connect to {} (kiln's jail runs it as --jail-uid: make the socket connectable by that uid)",
                            Path::new(&target).display()
                        )
                    });
                }
                self.reply_rst(hdr);
                return;
            }
        };
        let mut conn = Conn::new(stream, ConnState::Established, hdr.dst_port, hdr.src_port);
        conn.credit.update_peer(hdr.buf_alloc, hdr.fwd_cnt);
        conn.pending |= PENDING_RESPONSE;
        let token = self.alloc_token();
        self.by_key.insert(conn.key(), token);
        self.conns.insert(token, conn);
        self.mark_rx(token);
    }

    /// Handles one packet from the guest's tx queue.
    fn handle_guest_packet(&mut self, mem: &GuestMemoryMmap, reader: &mut Cursor<'_>) {
        let hdr = match read_header(mem, reader) {
            Ok(h) => h,
            Err(e) => {
                log::debug!("vsock: tx packet dropped: {e}");
                self.counters.tx_dropped.inc();
                return;
            }
        };
        log::trace!(
            "vsock: guest op {} {}->{} len {} flags {} buf_alloc {} fwd_cnt {}",
            hdr.op,
            hdr.src_port,
            hdr.dst_port,
            hdr.len,
            hdr.flags,
            hdr.buf_alloc,
            hdr.fwd_cnt
        );
        if hdr.src_cid != self.cid {
            log::debug!("vsock: tx packet from CID {} dropped", hdr.src_cid);
            self.counters.tx_dropped.inc();
            return;
        }
        self.counters.tx_packets.inc();
        let key = (hdr.dst_port, hdr.src_port);
        let token = self.by_key.get(&key).copied();
        if hdr.type_ != TYPE_STREAM || hdr.dst_cid != HOST_CID {
            match token {
                Some(t) => self.reset_conn(t),
                None => self.reply_rst(&hdr),
            }
            return;
        }
        let avail = usize::try_from(reader.remaining()).unwrap_or(usize::MAX);
        let len = match checked_payload_len(&hdr, avail) {
            Ok(len) => len,
            Err(e) => {
                log::debug!("vsock: bad packet on port {}: {e}", hdr.dst_port);
                match token {
                    Some(t) => self.reset_conn(t),
                    None => self.reply_rst(&hdr),
                }
                return;
            }
        };
        let Some(token) = token else {
            match hdr.op {
                OP_REQUEST => self.guest_connect(&hdr),
                OP_RST => {}
                _ => self.reply_rst(&hdr),
            }
            return;
        };
        match hdr.op {
            // A second request for a live connection: the guest lost track.
            OP_REQUEST => self.reset_conn(token),
            OP_RST => self.close_conn(token),
            op => {
                if let Some(conn) = self.conns.get_mut(&token) {
                    conn.credit.update_peer(hdr.buf_alloc, hdr.fwd_cnt);
                }
                self.handle_conn_op(token, op, &hdr, len, (mem, reader));
            }
        }
    }

    fn handle_conn_op(
        &mut self,
        token: u32,
        op: u16,
        hdr: &Header,
        len: usize,
        (mem, reader): (&GuestMemoryMmap, &mut Cursor<'_>),
    ) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        match op {
            OP_RESPONSE => {
                if conn.state != ConnState::LocalInit || conn.pending & PENDING_REQUEST != 0 {
                    self.reset_conn(token);
                    return;
                }
                conn.state = ConnState::Established;
                // The stream is fresh and empty: this short line always fits.
                let line = format!("OK {}\n", conn.local_port);
                if conn.stream.write_all(line.as_bytes()).is_err() {
                    self.reset_conn(token);
                    return;
                }
            }
            OP_RW => {
                if conn.state != ConnState::Established || conn.guest_shut_send {
                    self.reset_conn(token);
                    return;
                }
                if !conn.credit.accept_from_guest(len as u32) {
                    log::debug!(
                        "vsock: guest port {} sent {len} bytes beyond its credit; reset",
                        conn.peer_port
                    );
                    self.reset_conn(token);
                    return;
                }
                let data = &mut self.scratch[..len];
                if reader.read_exact(mem, data).is_err() {
                    self.reset_conn(token);
                    return;
                }
                self.counters.tx_bytes.add(len as u64);
                if conn.host_gone {
                    conn.credit.forwarded(len as u32);
                } else {
                    conn.push_to_host(data);
                    self.flush(token);
                }
            }
            OP_SHUTDOWN => {
                if conn.state != ConnState::Established {
                    self.reset_conn(token);
                    return;
                }
                conn.guest_shut_rcv |= hdr.flags & SHUTDOWN_RCV != 0;
                conn.guest_shut_send |= hdr.flags & SHUTDOWN_SEND != 0;
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => conn.pending |= PENDING_CREDIT_UPDATE,
            _ => {
                self.reset_conn(token);
                return;
            }
        }
        self.after_change(token);
    }

    /// Takes one packet from the guest's tx queue; `Later` while too many
    /// control packets wait for rx buffers (each packet could add one).
    pub fn tx_chain(&mut self, mem: &GuestMemoryMmap, chain: &Chain) -> Served {
        if !self.control_has_room() {
            return Served::Later;
        }
        match chain.check() {
            Ok(()) => self.handle_guest_packet(mem, &mut chain.reader()),
            Err(e) => {
                log::debug!("vsock: unreadable tx chain: {e}");
                self.counters.bad_chains.inc();
            }
        }
        Served::Used(0)
    }

    fn next_rx_work(&mut self) -> Option<RxWork> {
        if !self.control.is_empty() {
            return Some(RxWork::Control);
        }
        while let Some(&token) = self.rx_queue.front() {
            match self.conns.get_mut(&token) {
                Some(c) if c.pending != 0 || c.can_send_data() => return Some(RxWork::Conn(token)),
                Some(c) => c.queued_rx = false,
                None => {}
            }
            self.rx_queue.pop_front();
        }
        None
    }

    /// Fills one of the guest's rx buffers with a control packet or host
    /// data; `Later` when nothing is waiting for the guest.
    pub fn rx_chain(&mut self, mem: &GuestMemoryMmap, chain: &Chain) -> Served {
        let Some(work) = self.next_rx_work() else {
            return Served::Later;
        };
        if chain.check().is_err() || chain.writable_len() < HDR_SIZE as u64 {
            // Unusable buffer (read-only, outside memory or too small): return it empty.
            self.counters.bad_chains.inc();
            return Served::Used(0);
        }
        let mut w = chain.writer();
        let fill = match work {
            RxWork::Control => {
                let h = self.control.pop_front().expect("control queue not empty");
                match w.write_all(mem, &h.to_bytes()) {
                    Ok(()) => Fill::Sent(HDR_SIZE as u32),
                    Err(_) => Fill::Sent(0),
                }
            }
            RxWork::Conn(token) => {
                self.rx_queue.pop_front();
                let fill = self.fill_from_conn(token, mem, &mut w);
                if let Some(c) = self.conns.get_mut(&token) {
                    c.queued_rx = false;
                }
                // Round-robin: back of the line if it has more.
                self.after_change(token);
                fill
            }
        };
        match fill {
            Fill::Sent(len) => {
                if len > 0 {
                    self.counters.rx_packets.inc();
                    self.counters
                        .rx_bytes
                        .add(u64::from(len).saturating_sub(HDR_SIZE as u64));
                }
                Served::Used(len)
            }
            // The state changed under the work item: the buffer may serve another.
            Fill::Nothing => Served::Again,
        }
    }

    /// Writes the next packet connection `token` owes the guest.
    fn fill_from_conn(&mut self, token: u32, mem: &GuestMemoryMmap, w: &mut Cursor<'_>) -> Fill {
        let Some(conn) = self.conns.get(&token) else {
            return Fill::Nothing;
        };
        let mut hdr = self.header_for(conn, 0);
        let conn = self.conns.get_mut(&token).expect("checked above");
        let mut payload = 0;
        if conn.pending & PENDING_REQUEST != 0 {
            conn.pending &= !PENDING_REQUEST;
            hdr.op = OP_REQUEST;
        } else if conn.pending & PENDING_RESPONSE != 0 {
            conn.pending &= !PENDING_RESPONSE;
            hdr.op = OP_RESPONSE;
        } else if conn.can_send_data() {
            let room = usize::try_from(w.remaining()).unwrap_or(usize::MAX) - HDR_SIZE;
            let max = room
                .min(conn.credit.peer_credit() as usize)
                .min(MAX_PKT_PAYLOAD);
            if max == 0 {
                // A buffer with no room for data: use it for a credit update.
                hdr.op = OP_CREDIT_UPDATE;
            } else {
                match conn.stream.read(&mut self.scratch[..max]) {
                    Ok(0) => {
                        conn.host_eof = true;
                        conn.pending |= PENDING_SHUTDOWN;
                        return Fill::Nothing;
                    }
                    Ok(n) => {
                        hdr.op = OP_RW;
                        hdr.len = n as u32;
                        conn.credit.sent_to_guest(n as u32);
                        payload = n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        conn.host_readable = false;
                        return Fill::Nothing;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => return Fill::Nothing,
                    Err(e) => {
                        log::debug!("vsock: host stream of port {}: {e}", conn.local_port);
                        self.reset_conn(token);
                        return Fill::Nothing;
                    }
                }
            }
        } else if conn.pending & PENDING_SHUTDOWN != 0 {
            conn.pending &= !PENDING_SHUTDOWN;
            hdr.op = OP_SHUTDOWN;
            if conn.host_eof {
                hdr.flags |= SHUTDOWN_SEND;
            }
            if conn.host_gone {
                hdr.flags |= SHUTDOWN_RCV;
            }
        } else if conn.pending & PENDING_CREDIT_UPDATE != 0 {
            hdr.op = OP_CREDIT_UPDATE;
        } else {
            return Fill::Nothing;
        }
        // Every packet carries our credit, so no separate update is owed.
        (hdr.buf_alloc, hdr.fwd_cnt) = conn.credit.advertise();
        log::trace!(
            "vsock: to guest op {} {}->{} len {} flags {} (peer credit left {})",
            hdr.op,
            hdr.src_port,
            hdr.dst_port,
            hdr.len,
            hdr.flags,
            conn.credit.peer_credit()
        );
        conn.pending &= !PENDING_CREDIT_UPDATE;
        let ok = w.write_all(mem, &hdr.to_bytes()).is_ok()
            && w.write_all(mem, &self.scratch[..payload]).is_ok();
        if !ok {
            // Cannot happen with the room checked above; never leave the
            // guest with a half-written packet on a live connection.
            self.reset_conn(token);
            return Fill::Sent(0);
        }
        Fill::Sent((HDR_SIZE + payload) as u32)
    }

    /// Brings the poll set in line with the connections' needs: closed
    /// streams leave it, each stream is polled only for what it can use.
    pub fn sync(&mut self, poller: &mut dyn Poller) {
        for conn in self.graveyard.drain(..) {
            if conn.registered.is_some() {
                poller.remove(conn.stream.as_raw_fd());
            }
        }
        let listener_fd = self.listener.as_raw_fd();
        let want_listener = !self.listener_paused;
        if want_listener != self.listener_registered {
            if want_listener {
                match poller.add(listener_fd, LISTENER_TOKEN, EventSet::IN) {
                    Ok(()) => self.listener_registered = true,
                    Err(e) => {
                        log::warn!("vsock: cannot poll {}: {e}", self.path.display());
                        self.listener_paused = true;
                    }
                }
            } else {
                poller.remove(listener_fd);
                self.listener_registered = false;
            }
        }
        let mut failed = Vec::new();
        for (&token, conn) in self.conns.iter_mut() {
            let want = conn.desired_interest();
            if want == conn.registered {
                continue;
            }
            let fd = conn.stream.as_raw_fd();
            let result = match (conn.registered, want) {
                (None, Some(set)) => poller.add(fd, token, set),
                (Some(_), Some(set)) => poller.modify(fd, token, set),
                (Some(_), None) => {
                    poller.remove(fd);
                    Ok(())
                }
                (None, None) => Ok(()),
            };
            match result {
                Ok(()) => conn.registered = want,
                Err(e) => {
                    log::warn!("vsock: cannot poll a host stream: {e}");
                    failed.push(token);
                }
            }
        }
        for token in failed {
            self.reset_conn(token);
        }
        // Resets above only add control packets; their streams were never
        // added, or are still registered and get removed now.
        for conn in self.graveyard.drain(..) {
            if conn.registered.is_some() {
                poller.remove(conn.stream.as_raw_fd());
            }
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
