//! A small rtnetlink client: what the container network needs of the
//! kernel's routing netlink family (links, addresses, routes, the ingress
//! qdisc and a u32 filter with a mirred redirect) over a NETLINK_ROUTE
//! socket. The socket belongs to the network namespace of the thread that
//! opened it, whichever thread uses it later.
//!
//! The layouts and numbers are the kernel's UAPI (linux/netlink.h,
//! rtnetlink.h, if_link.h, pkt_sched.h, pkt_cls.h, tc_act/tc_mirred.h).
//! Replies are parsed defensively: a short or inconsistent message or
//! attribute ends the parse of that message, it never reads past the data.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_HDR_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
/// A dump part made while the list changed: the dump may be inconsistent.
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_GETADDR: u16 = 22;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const RTM_GETQDISC: u16 = 38;
const RTM_NEWTFILTER: u16 = 44;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_TABLE: u16 = 15;

const ARPHRD_ETHER: u16 = 1;
const IFF_UP: u32 = 0x1;
const IFF_LOOPBACK: u32 = 0x8;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_TABLE_MAIN: u32 = 254;
const RTN_UNICAST: u8 = 1;
const RTPROT_KERNEL: u8 = 2;

const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
/// The ingress qdisc's parent and handle (`ffff:`).
const TC_H_INGRESS: u32 = 0xffff_fff1;
const INGRESS_HANDLE: u32 = 0xffff_0000;
/// `tcm_info` of a filter: priority 0 (the kernel picks one) in the upper
/// half, the protocol ETH_P_ALL in network byte order in the lower.
const FILTER_INFO_ALL: u32 = (libc::ETH_P_ALL as u16).to_be() as u32;
const TCA_U32_SEL: u16 = 5;
const TCA_U32_ACT: u16 = 7;
/// A u32 node whose match ends the classification (runs its actions).
const TC_U32_TERMINAL: u8 = 1;
const TCA_ACT_KIND: u16 = 1;
const TCA_ACT_OPTIONS: u16 = 2;
const TCA_MIRRED_PARMS: u16 = 2;
/// The packet is consumed by the action (what `redirect` does).
const TC_ACT_STOLEN: i32 = 4;
const TCA_EGRESS_REDIR: i32 = 1;

/// The largest reply datagram read at once (the kernel sizes dump parts
/// to the reader's buffer, at most 32 KiB).
const RECV_BUF: usize = 64 << 10;

/// A link as RTM_GETLINK reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Link {
    pub index: u32,
    pub name: String,
    pub loopback: bool,
    /// An Ethernet link (ARPHRD_ETHER) with a 6-byte address.
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    /// IFLA_INFO_KIND (`veth`, `tun`, ...).
    pub kind: Option<String>,
}

/// An address as RTM_GETADDR reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Address {
    pub index: u32,
    pub addr: IpAddr,
    pub prefix: u8,
    /// Scope global (not host or link).
    pub global: bool,
}

/// A unicast route of the main table as RTM_GETROUTE reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Route {
    /// The output interface (None for a multipath route).
    pub oif: Option<u32>,
    /// The destination and its prefix length; None is the default route.
    pub dst: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    /// Made by the kernel (a connected subnet).
    pub kernel: bool,
}

/// A NETLINK_ROUTE socket, in the namespace of the thread that opened it.
#[derive(Debug)]
pub(super) struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> io::Result<Self> {
        // SAFETY: socket() takes no pointers; it returns a new fd or -1.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, seq: 0 })
    }

    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let replies = self.dump(RTM_GETLINK, &ifinfomsg(0, 0, 0))?;
        Ok(replies.iter().filter_map(|m| parse_link(m)).collect())
    }

    /// Every address of both families.
    pub fn addresses(&mut self) -> io::Result<Vec<Address>> {
        let replies = self.dump(RTM_GETADDR, &[libc::AF_UNSPEC as u8, 0, 0, 0, 0, 0, 0, 0])?;
        Ok(replies.iter().filter_map(|m| parse_address(m)).collect())
    }

    /// The main table's unicast routes of `family` (AF_INET or AF_INET6).
    pub fn routes(&mut self, family: i32) -> io::Result<Vec<Route>> {
        let mut rtmsg = [0u8; 12];
        rtmsg[0] = family as u8;
        let replies = self.dump(RTM_GETROUTE, &rtmsg)?;
        Ok(replies.iter().filter_map(|m| parse_route(m)).collect())
    }

    /// Sets link `index`'s MTU and brings it up.
    pub fn set_mtu_up(&mut self, index: u32, mtu: u32) -> io::Result<()> {
        let mut req = Request::new(&ifinfomsg(index, IFF_UP, IFF_UP));
        req.attr(IFLA_MTU, &mtu.to_ne_bytes());
        self.ack(RTM_NEWLINK, 0, req)
    }

    pub fn delete_link(&mut self, index: u32) -> io::Result<()> {
        self.ack(RTM_DELLINK, 0, Request::new(&ifinfomsg(index, 0, 0)))
    }

    /// The kinds of link `index`'s qdiscs (`noqueue`, `ingress`, ...).
    pub fn qdisc_kinds(&mut self, index: u32) -> io::Result<Vec<String>> {
        let replies = self.dump(RTM_GETQDISC, &tcmsg(0, 0, 0, 0))?;
        Ok(replies
            .iter()
            .filter(|m| m.len() >= 20 && u32_at(m, 4) == index)
            .filter_map(|m| {
                attrs(&m[20..])
                    .find(|(ty, _)| *ty == TCA_KIND)
                    .map(|(_, v)| c_string(v))
            })
            .collect())
    }

    /// `tc qdisc add dev INDEX ingress`.
    pub fn add_ingress_qdisc(&mut self, index: u32) -> io::Result<()> {
        let mut req = Request::new(&tcmsg(index, INGRESS_HANDLE, TC_H_INGRESS, 0));
        req.attr(TCA_KIND, b"ingress\0");
        req.nest(TCA_OPTIONS, |_| {});
        self.ack(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, req)
    }

    /// `tc qdisc del dev INDEX ingress` (its filters go with it).
    pub fn delete_ingress_qdisc(&mut self, index: u32) -> io::Result<()> {
        let req = Request::new(&tcmsg(index, INGRESS_HANDLE, TC_H_INGRESS, 0));
        self.ack(RTM_DELQDISC, 0, req)
    }

    /// `tc filter add dev FROM parent ffff: protocol all u32 match u32 0 0
    /// action mirred egress redirect dev TO`.
    pub fn add_redirect_filter(&mut self, from: u32, to: u32) -> io::Result<()> {
        self.ack(
            RTM_NEWTFILTER,
            NLM_F_CREATE | NLM_F_EXCL,
            redirect_filter(from, to),
        )
    }

    /// Sends a request that the kernel acknowledges.
    fn ack(&mut self, kind: u16, flags: u16, req: Request) -> io::Result<()> {
        self.transact(kind, NLM_F_REQUEST | NLM_F_ACK | flags, req)
            .map(drop)
    }

    /// A dump, made again (up to three times) while the kernel says the
    /// list changed under it.
    fn dump(&mut self, kind: u16, header: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.transact(kind, NLM_F_REQUEST | NLM_F_DUMP, Request::new(header)) {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) && attempts < 3 => continue,
                result => return result,
            }
        }
    }

    /// Sends one request and collects the payloads of its replies until
    /// the dump's end or the acknowledgement.
    fn transact(&mut self, kind: u16, flags: u16, req: Request) -> io::Result<Vec<Vec<u8>>> {
        self.seq = self.seq.wrapping_add(1);
        let msg = req.finish(kind, flags, self.seq);
        // SAFETY: `msg` is a live buffer of `msg.len()` bytes; an
        // unconnected netlink socket sends to the kernel.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; RECV_BUF];
        let mut payloads = Vec::new();
        let mut interrupted = false;
        loop {
            // SAFETY: `buf` is a live buffer of `buf.len()` writable bytes.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            let n = n as usize;
            if n > buf.len() {
                return Err(io::Error::other("netlink reply larger than 64 KiB"));
            }
            for (kind, flags, seq, payload) in messages(&buf[..n]) {
                if seq != self.seq {
                    continue;
                }
                interrupted |= flags & NLM_F_DUMP_INTR != 0;
                match kind {
                    NLMSG_DONE | NLMSG_ERROR => {
                        let code = payload.get(..4).map_or(0, |b| i32_at(b, 0));
                        return match code {
                            0 if interrupted => Err(io::Error::from_raw_os_error(libc::EINTR)),
                            0 => Ok(payloads),
                            _ => Err(io::Error::from_raw_os_error(code.saturating_neg())),
                        };
                    }
                    _ => payloads.push(payload.to_vec()),
                }
            }
        }
    }
}

/// The RTM_NEWTFILTER request of [`Rtnl::add_redirect_filter`].
fn redirect_filter(from: u32, to: u32) -> Request {
    let mut req = Request::new(&tcmsg(from, 0, INGRESS_HANDLE, FILTER_INFO_ALL));
    req.attr(TCA_KIND, b"u32\0");
    req.nest(TCA_OPTIONS, |opts| {
        // struct tc_u32_sel (flags, offshift, nkeys, pad, offmask, off,
        // offoff, hoff, hmask) and one tc_u32_key (mask, val, off,
        // offmask), all zero: "match u32 0 0", which every packet does.
        let mut sel = [0u8; 32];
        sel[0] = TC_U32_TERMINAL;
        sel[2] = 1;
        opts.attr(TCA_U32_SEL, &sel);
        opts.nest(TCA_U32_ACT, |acts| {
            acts.nest(1, |act| {
                act.attr(TCA_ACT_KIND, b"mirred\0");
                act.nest(TCA_ACT_OPTIONS, |mirred| {
                    // struct tc_mirred: index, capab, action, refcnt,
                    // bindcnt, eaction, ifindex.
                    let mut parms = Vec::with_capacity(28);
                    for word in [0, 0, TC_ACT_STOLEN, 0, 0, TCA_EGRESS_REDIR] {
                        parms.extend_from_slice(&word.to_ne_bytes());
                    }
                    parms.extend_from_slice(&to.to_ne_bytes());
                    mirred.attr(TCA_MIRRED_PARMS, &parms);
                });
            });
        });
    });
    req
}

/// A request being built: room for the netlink header, the family
/// header, then attributes.
struct Request {
    buf: Vec<u8>,
}

impl Request {
    fn new(header: &[u8]) -> Self {
        let mut buf = vec![0u8; NLMSG_HDR_LEN];
        buf.extend_from_slice(header);
        pad(&mut buf);
        Self { buf }
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = u16::try_from(4 + data.len()).expect("a small attribute");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        pad(&mut self.buf);
    }

    /// A nested attribute holding what `fill` adds.
    fn nest(&mut self, ty: u16, fill: impl FnOnce(&mut Self)) {
        let start = self.buf.len();
        self.attr(ty, &[]);
        fill(self);
        let len = u16::try_from(self.buf.len() - start).expect("a small attribute");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self, kind: u16, flags: u16, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        self.buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

fn pad(buf: &mut Vec<u8>) {
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// struct ifinfomsg: family, pad, type, index, flags, change.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m[8..12].copy_from_slice(&flags.to_ne_bytes());
    m[12..16].copy_from_slice(&change.to_ne_bytes());
    m
}

/// struct tcmsg: family, pads, ifindex, handle, parent, info.
fn tcmsg(index: u32, handle: u32, parent: u32, info: u32) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m[8..12].copy_from_slice(&handle.to_ne_bytes());
    m[12..16].copy_from_slice(&parent.to_ne_bytes());
    m[16..20].copy_from_slice(&info.to_ne_bytes());
    m
}

/// The netlink messages of one datagram: (type, flags, sequence, payload).
fn messages(mut buf: &[u8]) -> impl Iterator<Item = (u16, u16, u32, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < NLMSG_HDR_LEN {
            return None;
        }
        let len = u32_at(buf, 0) as usize;
        if len < NLMSG_HDR_LEN || len > buf.len() {
            return None;
        }
        let item = (
            u16_at(buf, 4),
            u16_at(buf, 6),
            u32_at(buf, 8),
            &buf[NLMSG_HDR_LEN..len],
        );
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some(item)
    })
}

/// The attributes in `buf`: (type without the nested/byte-order flags, data).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16_at(buf, 0));
        if len < 4 || len > buf.len() {
            return None;
        }
        let item = (u16_at(buf, 2) & 0x3fff, &buf[4..len]);
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some(item)
    })
}

fn parse_link(m: &[u8]) -> Option<Link> {
    let header = m.get(..16)?;
    let (arphrd, index, flags) = (u16_at(header, 2), u32_at(header, 4), u32_at(header, 8));
    let mut link = Link {
        index,
        name: String::new(),
        loopback: flags & IFF_LOOPBACK != 0,
        mac: None,
        mtu: 0,
        kind: None,
    };
    for (ty, data) in attrs(&m[16..]) {
        match ty {
            IFLA_IFNAME => link.name = c_string(data),
            IFLA_MTU if data.len() == 4 => link.mtu = u32_at(data, 0),
            IFLA_ADDRESS if arphrd == ARPHRD_ETHER => link.mac = data.try_into().ok(),
            IFLA_LINKINFO => {
                link.kind = attrs(data)
                    .find(|(ty, _)| *ty == IFLA_INFO_KIND)
                    .map(|(_, v)| c_string(v));
            }
            _ => {}
        }
    }
    (!link.name.is_empty()).then_some(link)
}

fn parse_address(m: &[u8]) -> Option<Address> {
    let header = m.get(..8)?;
    let (family, prefix, scope) = (i32::from(header[0]), header[1], header[3]);
    let index = u32_at(header, 4);
    let (mut local, mut address) = (None, None);
    for (ty, data) in attrs(&m[8..]) {
        match ty {
            IFA_LOCAL => local = ip_addr(family, data),
            IFA_ADDRESS => address = ip_addr(family, data),
            _ => {}
        }
    }
    // IPv4's own address is IFA_LOCAL (IFA_ADDRESS is the peer's on a
    // point-to-point link); IPv6 has only IFA_ADDRESS.
    Some(Address {
        index,
        addr: local.or(address)?,
        prefix,
        global: scope == RT_SCOPE_UNIVERSE,
    })
}

fn parse_route(m: &[u8]) -> Option<Route> {
    let header = m.get(..12)?;
    let (family, dst_len, protocol, kind) = (i32::from(header[0]), header[1], header[5], header[7]);
    let mut table = u32::from(header[4]);
    let mut route = Route {
        oif: None,
        dst: None,
        gateway: None,
        kernel: protocol == RTPROT_KERNEL,
    };
    for (ty, data) in attrs(&m[12..]) {
        match ty {
            RTA_TABLE if data.len() == 4 => table = u32_at(data, 0),
            RTA_OIF if data.len() == 4 => route.oif = Some(u32_at(data, 0)),
            RTA_DST => route.dst = ip_addr(family, data).map(|a| (a, dst_len)),
            RTA_GATEWAY => route.gateway = ip_addr(family, data),
            _ => {}
        }
    }
    if table != RT_TABLE_MAIN || kind != RTN_UNICAST {
        return None;
    }
    if dst_len != 0 && route.dst.is_none() {
        return None;
    }
    Some(route)
}

fn ip_addr(family: i32, data: &[u8]) -> Option<IpAddr> {
    match family {
        libc::AF_INET => <[u8; 4]>::try_from(data)
            .ok()
            .map(|b| Ipv4Addr::from(b).into()),
        libc::AF_INET6 => <[u8; 16]>::try_from(data)
            .ok()
            .map(|b| Ipv6Addr::from(b).into()),
        _ => None,
    }
}

/// A NUL-terminated (or not) attribute string.
fn c_string(data: &[u8]) -> String {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn i32_at(b: &[u8], at: usize) -> i32 {
    u32_at(b, at) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An attribute tree survives the round trip, nests carry their
    /// length, and everything stays 4-byte aligned.
    #[test]
    fn attributes_round_trip() {
        let mut req = Request::new(&[7, 0, 0]);
        req.attr(3, b"eth0\0");
        req.nest(2, |n| {
            n.attr(1, &[1, 2]);
            n.nest(4, |_| {});
        });
        let msg = req.finish(RTM_NEWLINK, NLM_F_REQUEST, 9);
        assert_eq!(msg.len() % 4, 0);
        let parsed: Vec<_> = messages(&msg).collect();
        assert_eq!(parsed.len(), 1);
        let (kind, flags, seq, payload) = parsed[0];
        assert_eq!(
            (kind, flags, seq, &payload[..4]),
            (RTM_NEWLINK, NLM_F_REQUEST, 9, &[7, 0, 0, 0][..])
        );
        let top: Vec<_> = attrs(&payload[4..]).collect();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0], (3, &b"eth0\0"[..]));
        let nested: Vec<_> = attrs(top[1].1).collect();
        assert_eq!(nested, vec![(1, &[1u8, 2][..]), (4, &[][..])]);
    }

    /// A length past the end or below the header stops the parse.
    #[test]
    fn malformed_replies_end_the_parse() {
        let mut attr = vec![200, 0, 1, 0, 1, 2, 3, 4];
        assert_eq!(attrs(&attr).count(), 0, "longer than the data");
        attr[0] = 2;
        assert_eq!(attrs(&attr).count(), 0, "shorter than its header");
        attr[0] = 8;
        assert_eq!(attrs(&attr).count(), 1);
        let mut msg = vec![0u8; 20];
        msg[0] = 40;
        assert_eq!(messages(&msg).count(), 0);
        msg[0] = 20;
        assert_eq!(messages(&msg).count(), 1);
        assert_eq!(parse_link(&[0; 10]), None);
        assert_eq!(parse_address(&[0; 7]), None);
        assert_eq!(parse_route(&[0; 11]), None);
    }

    /// The filter request is what `tc filter add dev 2 parent ffff:
    /// protocol all u32 match u32 0 0 action mirred egress redirect dev 5`
    /// means: u32 with one all-zero key, terminal, one mirred action that
    /// steals the packet to device 5's egress.
    #[test]
    fn the_redirect_filter_request() {
        let msg = redirect_filter(2, 5).finish(RTM_NEWTFILTER, 0, 1);
        let (_, _, _, payload) = messages(&msg).next().unwrap();
        assert_eq!(u32_at(payload, 4), 2, "ifindex");
        assert_eq!(u32_at(payload, 12), INGRESS_HANDLE, "parent ffff:");
        assert_eq!(u32_at(payload, 16), 0x0300, "protocol all, big-endian");
        let top: Vec<_> = attrs(&payload[20..]).collect();
        assert_eq!(top[0], (TCA_KIND, &b"u32\0"[..]));
        let opts: Vec<_> = attrs(top[1].1).collect();
        let sel = opts[0].1;
        assert_eq!((opts[0].0, sel.len()), (TCA_U32_SEL, 32));
        assert_eq!(&sel[..4], &[TC_U32_TERMINAL, 0, 1, 0]);
        assert!(sel[4..].iter().all(|&b| b == 0));
        let (ty, acts) = opts[1];
        assert_eq!(ty, TCA_U32_ACT);
        let (order, act) = attrs(acts).next().unwrap();
        assert_eq!(order, 1);
        let act: Vec<_> = attrs(act).collect();
        assert_eq!(act[0], (TCA_ACT_KIND, &b"mirred\0"[..]));
        let (ty, parms) = attrs(act[1].1).next().unwrap();
        assert_eq!((ty, parms.len()), (TCA_MIRRED_PARMS, 28));
        let words: Vec<u32> = (0..7).map(|i| u32_at(parms, i * 4)).collect();
        assert_eq!(words, vec![0, 0, TC_ACT_STOLEN as u32, 0, 0, 1, 5]);
    }

    /// A fresh network namespace (private to a thread) as the kernel
    /// reports it: lo only, loopback, with 127.0.0.1 once up, no routes in
    /// the main table; and an error comes back as the errno.
    #[test]
    fn a_fresh_namespace_through_the_kernel() {
        if !kiln_prereq::require(kiln_prereq::is_root(), "needs root (a network namespace)") {
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare only changes this thread's network namespace.
            let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "unshare: {}", io::Error::last_os_error());
            let mut rtnl = Rtnl::open().unwrap();
            let links = rtnl.links().unwrap();
            assert_eq!(links.len(), 1, "{links:?}");
            let lo = &links[0];
            assert_eq!((lo.name.as_str(), lo.loopback, lo.mac), ("lo", true, None));
            rtnl.set_mtu_up(lo.index, 65536).unwrap();
            let addrs = rtnl.addresses().unwrap();
            assert!(
                addrs.contains(&Address {
                    index: lo.index,
                    addr: Ipv4Addr::LOCALHOST.into(),
                    prefix: 8,
                    global: false,
                }),
                "{addrs:?}"
            );
            assert_eq!(rtnl.routes(libc::AF_INET).unwrap(), vec![]);
            assert_eq!(rtnl.qdisc_kinds(lo.index).unwrap(), vec!["noqueue"]);
            let err = rtnl.delete_ingress_qdisc(lo.index).unwrap_err();
            assert!(err.raw_os_error().is_some(), "{err}");
            let err = rtnl.delete_link(999).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ENODEV), "{err}");
        })
        .join()
        .unwrap();
    }
}
