//! Applies the `kiln.net=` words ([`kiln_init::net`]) in the guest before
//! anything runs: loopback up, then for each card (found by its MAC in
//! /sys/class/net) the MTU and up, its addresses (IPv6 without duplicate
//! address detection), then its routes (the default ones included, on-link
//! when the word says so).
//!
//! Three kinds of rtnetlink request on a NETLINK_ROUTE socket, each acknowledged:
//! RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE (the kernel's UAPI layouts, as
//! the monitor's own client in src/oci/network/rtnetlink.rs writes them).
//! Addresses and routes are created or replaced, so words that repeat what
//! `ip=` already did are harmless.

use kiln_init::net::{NetInterface, NetRoute};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_HDR_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x02;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const IFF_UP: u32 = 0x1;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const RTNH_F_ONLINK: u32 = 0x4;

/// Brings loopback up and configures every interface; the first failure
/// is a one-line error naming the card and the step.
pub fn apply(interfaces: &[NetInterface]) -> Result<(), String> {
    // A kernel built without IPv6 (kiln's test kernel) still gets its IPv4.
    let ipv6 = std::path::Path::new("/proc/net/if_inet6").exists();
    let mut rtnl = Rtnl::open().map_err(|e| format!("network: netlink socket: {e}"))?;
    let lo = index_of("lo").ok_or("network: no loopback interface")?;
    rtnl.set_link(lo, None)
        .map_err(|e| format!("network: bringing lo up: {e}"))?;
    for interface in interfaces {
        match ipv6 {
            true => configure(&mut rtnl, interface)?,
            false => configure(&mut rtnl, &without_ipv6(interface))?,
        }
    }
    Ok(())
}

/// `interface` without its IPv6 addresses and routes, with a warning
/// naming them when it had any.
fn without_ipv6(interface: &NetInterface) -> NetInterface {
    let mut v4 = interface.clone();
    v4.addresses.retain(|(a, _)| a.is_ipv4());
    v4.routes.retain(|r| r.destination.is_ipv4());
    if v4 != *interface {
        let skipped: Vec<String> = interface
            .addresses
            .iter()
            .filter(|(a, _)| a.is_ipv6())
            .map(|(a, p)| format!("{a}/{p}"))
            .collect();
        let mac = interface.mac.map(|b| format!("{b:02x}")).join(":");
        eprintln!(
            "kiln-init: network: {mac}: the kernel has no IPv6: {} and the IPv6 routes not applied",
            skipped.join(" ")
        );
    }
    v4
}

fn configure(rtnl: &mut Rtnl, interface: &NetInterface) -> Result<(), String> {
    let mac = interface.mac.map(|b| format!("{b:02x}")).join(":");
    let (name, index) = find_by_mac(&mac).ok_or_else(|| format!("network: no card {mac}"))?;
    let (name, mac) = (&name, &mac);
    let fail = |what: String| move |e: io::Error| format!("network: {name} ({mac}): {what}: {e}");
    rtnl.set_link(index, Some(interface.mtu))
        .map_err(fail(format!("setting MTU {} and up", interface.mtu)))?;
    for &(addr, prefix) in &interface.addresses {
        rtnl.add_address(index, addr, prefix)
            .map_err(fail(format!("adding {addr}/{prefix}")))?;
    }
    // Routes without a gateway first: a later gateway may sit in them.
    let mut routes: Vec<&NetRoute> = interface.routes.iter().collect();
    routes.sort_by_key(|r| r.gateway.is_some());
    for route in routes {
        let what = match route.gateway {
            Some(gw) => format!("{}/{} via {gw}", route.destination, route.prefix),
            None => format!("{}/{}", route.destination, route.prefix),
        };
        rtnl.add_route(index, route)
            .map_err(fail(format!("adding the route {what}")))?;
    }
    Ok(())
}

/// The name and index of the interface with this MAC (`aa:bb:...`).
fn find_by_mac(mac: &str) -> Option<(String, u32)> {
    std::fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let address = std::fs::read_to_string(entry.path().join("address")).ok()?;
            (address.trim() == mac).then_some(())?;
            Some((name.clone(), index_of(&name)?))
        })
}

fn index_of(name: &str) -> Option<u32> {
    let path = format!("/sys/class/net/{name}/ifindex");
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A NETLINK_ROUTE socket that sends acknowledged requests.
struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

impl Rtnl {
    fn open() -> io::Result<Self> {
        let kind = libc::SOCK_RAW | libc::SOCK_CLOEXEC;
        // SAFETY: plain socket(2) arguments.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, kind, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, seq: 0 })
    }

    /// Brings link `index` up, with `mtu` if given.
    fn set_link(&mut self, index: u32, mtu: Option<u32>) -> io::Result<()> {
        let mut header = [0u8; 16]; // ifinfomsg
        header[4..8].copy_from_slice(&index.to_ne_bytes());
        header[8..12].copy_from_slice(&IFF_UP.to_ne_bytes());
        header[12..16].copy_from_slice(&IFF_UP.to_ne_bytes());
        let mut req = header.to_vec();
        if let Some(mtu) = mtu {
            attr(&mut req, IFLA_MTU, &mtu.to_ne_bytes());
        }
        self.request(RTM_NEWLINK, 0, req)
    }

    fn add_address(&mut self, index: u32, addr: IpAddr, prefix: u8) -> io::Result<()> {
        let (family, flags) = match addr {
            IpAddr::V4(_) => (libc::AF_INET as u8, 0),
            IpAddr::V6(_) => (libc::AF_INET6 as u8, IFA_F_NODAD),
        };
        // ifaddrmsg: family, prefixlen, flags, scope, index.
        let mut req = vec![family, prefix, flags, RT_SCOPE_UNIVERSE];
        req.extend_from_slice(&index.to_ne_bytes());
        attr(&mut req, IFA_LOCAL, &octets(addr));
        attr(&mut req, IFA_ADDRESS, &octets(addr));
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, req)
    }

    fn add_route(&mut self, index: u32, route: &NetRoute) -> io::Result<()> {
        let family = match route.destination {
            IpAddr::V4(_) => libc::AF_INET as u8,
            IpAddr::V6(_) => libc::AF_INET6 as u8,
        };
        let scope = match route.gateway {
            Some(_) => RT_SCOPE_UNIVERSE,
            None => RT_SCOPE_LINK,
        };
        let flags: u32 = if route.onlink { RTNH_F_ONLINK } else { 0 };
        // rtmsg: family, dst_len, src_len, tos, table, protocol, scope,
        // type, flags.
        let mut req = vec![
            family,
            route.prefix,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            scope,
            RTN_UNICAST,
        ];
        req.extend_from_slice(&flags.to_ne_bytes());
        if !route.is_default() {
            attr(&mut req, RTA_DST, &octets(route.destination));
        }
        if let Some(gateway) = route.gateway {
            attr(&mut req, RTA_GATEWAY, &octets(gateway));
        }
        attr(&mut req, RTA_OIF, &index.to_ne_bytes());
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, req)
    }

    /// Sends one request (`body`: the family header and attributes) and
    /// waits for its acknowledgement: the kernel's error, if any.
    fn request(&mut self, kind: u16, flags: u16, body: Vec<u8>) -> io::Result<()> {
        self.seq += 1;
        let msg = message(kind, NLM_F_REQUEST | NLM_F_ACK | flags, self.seq, &body);
        // SAFETY: sends `msg.len()` bytes from a live buffer; an
        // unconnected netlink socket sends to the kernel.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: receives at most `buf.len()` bytes into a live buffer.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(e);
            }
            if let Some(result) = ack(&buf[..n as usize], self.seq) {
                return result;
            }
        }
    }
}

/// A netlink message: the header, then `body`.
fn message(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = (NLMSG_HDR_LEN + body.len()) as u32;
    let mut msg = Vec::with_capacity(len as usize);
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(body);
    msg
}

/// Appends an attribute, padded to 4 bytes.
fn attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = (4 + data.len()) as u16;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn octets(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The acknowledgement of request `seq` among the messages in `buf`, if
/// there: `Ok` or the kernel's error. Short or foreign messages are skipped.
fn ack(mut buf: &[u8], seq: u32) -> Option<io::Result<()>> {
    let u32_at = |b: &[u8], at: usize| u32::from_ne_bytes(b[at..at + 4].try_into().unwrap());
    while buf.len() >= NLMSG_HDR_LEN {
        let len = u32_at(buf, 0) as usize;
        if len < NLMSG_HDR_LEN || len > buf.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if kind == NLMSG_ERROR && u32_at(buf, 8) == seq && len >= NLMSG_HDR_LEN + 4 {
            let errno = (u32_at(buf, NLMSG_HDR_LEN) as i32).wrapping_neg();
            return Some(match errno {
                0 => Ok(()),
                e => Err(io::Error::from_raw_os_error(e)),
            });
        }
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_onlink_default_route_request() {
        let mut rtnl_body = Vec::new();
        let route = NetRoute {
            destination: "0.0.0.0".parse().unwrap(),
            prefix: 0,
            gateway: Some("169.254.1.1".parse().unwrap()),
            onlink: true,
        };
        // What add_route puts after the header, built by hand.
        rtnl_body.extend_from_slice(&[2, 0, 0, 0, 254, 3, 0, 1]);
        rtnl_body.extend_from_slice(&RTNH_F_ONLINK.to_ne_bytes());
        rtnl_body.extend_from_slice(&8u16.to_ne_bytes());
        rtnl_body.extend_from_slice(&RTA_GATEWAY.to_ne_bytes());
        rtnl_body.extend_from_slice(&[169, 254, 1, 1]);
        rtnl_body.extend_from_slice(&8u16.to_ne_bytes());
        rtnl_body.extend_from_slice(&RTA_OIF.to_ne_bytes());
        rtnl_body.extend_from_slice(&2u32.to_ne_bytes());
        let captured = capture(|rtnl| rtnl.add_route(2, &route));
        assert_eq!(captured.len(), NLMSG_HDR_LEN + rtnl_body.len());
        assert_eq!(&captured[4..6], &RTM_NEWROUTE.to_ne_bytes());
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        assert_eq!(&captured[6..8], &flags.to_ne_bytes());
        assert_eq!(&captured[NLMSG_HDR_LEN..], &rtnl_body[..]);
    }

    #[test]
    fn acks_are_found_by_sequence_number() {
        let error = |seq: u32, errno: i32| {
            let mut body = (-errno).to_ne_bytes().to_vec();
            body.extend_from_slice(&[0; 16]); // the request's header
            message(NLMSG_ERROR, 0, seq, &body)
        };
        let mut two = error(6, 0);
        two.extend(error(7, libc::EEXIST));
        assert_eq!(ack(&two, 9).map(|r| r.is_ok()), None);
        assert!(ack(&two, 6).unwrap().is_ok());
        let err = ack(&two, 7).unwrap().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        // Truncated or nonsense lengths end the search, without a panic.
        assert!(ack(&two[..20], 6).is_none());
        let mut bad = two.clone();
        bad[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(ack(&bad, 6).is_none());
        bad[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(ack(&bad, 6).is_none());
    }

    /// The message a request sends, read from the other end of a socket
    /// pair standing in for the kernel (which then acknowledges it).
    fn capture(send: impl FnOnce(&mut Rtnl) -> io::Result<()>) -> Vec<u8> {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into the array.
        let r =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        // SAFETY: fresh descriptors that nothing else owns.
        let (ours, kernel) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut rtnl = Rtnl { fd: ours, seq: 0 };
        std::thread::scope(|s| {
            let kernel = s.spawn(move || {
                let mut buf = [0u8; 4096];
                // SAFETY: receives into a live buffer.
                let n = unsafe {
                    libc::recv(kernel.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                assert!(n > 0);
                let request = buf[..n as usize].to_vec();
                let mut body = 0i32.to_ne_bytes().to_vec();
                body.extend_from_slice(&request[..NLMSG_HDR_LEN]);
                let seq = u32::from_ne_bytes(request[8..12].try_into().unwrap());
                let reply = message(NLMSG_ERROR, 0, seq, &body);
                // SAFETY: sends from a live buffer.
                let sent = unsafe {
                    libc::send(kernel.as_raw_fd(), reply.as_ptr().cast(), reply.len(), 0)
                };
                assert_eq!(sent, reply.len() as isize);
                request
            });
            send(&mut rtnl).unwrap();
            kernel.join().unwrap()
        })
    }
}
