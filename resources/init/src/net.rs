//! The guest's network configuration on the kernel command line: one
//! `kiln.net=` word per interface, written by the monitor
//! (`ContainerNetwork::kernel_net_words`) and applied by init over
//! rtnetlink before anything runs. Both ends use this module, so they
//! cannot disagree about the format.
//!
//! ```text
//! kiln.net=MAC,mtu=MTU[,addr=IP/LEN]...[,gw=IP[/onlink]]...[,route=IP/LEN[/GW][/onlink]]...
//! kiln.net=02:42:0a:58:00:02,mtu=1400,addr=10.88.0.2/32,addr=fd00::2/64,gw=169.254.1.1/onlink,gw=fd00::1,route=10.89.0.0/16/169.254.1.1/onlink
//! ```
//!
//! - `MAC` finds the card (kiln gives it the container's MAC; the guest's
//!   name for it does not matter);
//! - `addr=` an IPv4 or IPv6 address with its prefix length (IPv6 is added
//!   without duplicate address detection, usable at once);
//! - `gw=` a default route of the address's family through that gateway;
//! - `route=` any other route: destination/length, then the gateway if it
//!   is not on the link;
//! - `/onlink`: the gateway is reachable on the link although no address
//!   covers it (Calico's `/32` with gateway 169.254.1.1).
//!
//! The kernel's `ip=` cannot say any of IPv6, more than one interface,
//! extra routes or an on-link gateway. Name servers are not here: the
//! container's /etc/resolv.conf comes with its root (the engine's file).
//!
//! Bounds keep a word well inside the kernel's 2048-byte command line:
//! [`MAX_INTERFACES`] words, [`MAX_ITEMS`] items and [`MAX_WORD_LEN`]
//! bytes per word. A word over a bound or malformed is a one-line error
//! naming it (init then runs nothing).

use std::net::IpAddr;

/// The kernel command-line parameter, one word per interface.
pub const NET_PARAM: &str = "kiln.net";
/// At most this many `kiln.net=` words.
pub const MAX_INTERFACES: usize = 8;
/// At most this many addresses, gateways and routes in one word.
pub const MAX_ITEMS: usize = 24;
/// At most this many bytes in one word (`kiln.net=` included).
pub const MAX_WORD_LEN: usize = 768;

/// A route as init adds it: the default route has destination
/// `0.0.0.0/0` (or `::/0`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetRoute {
    /// The destination network.
    pub destination: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
    /// The next hop, if not on the link (same family as the destination).
    pub gateway: Option<IpAddr>,
    /// The gateway is on the link although no address's subnet holds it.
    pub onlink: bool,
}

impl NetRoute {
    /// Whether this is a default route (`/0`).
    pub fn is_default(&self) -> bool {
        self.prefix == 0
    }
}

/// One interface as a `kiln.net=` word says it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetInterface {
    /// The card's MAC, which finds it.
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u32,
    /// Addresses with prefix lengths (IPv4 and IPv6).
    pub addresses: Vec<(IpAddr, u8)>,
    /// Routes through the card, default routes included.
    pub routes: Vec<NetRoute>,
}

impl NetInterface {
    /// The `kiln.net=` word, or why it cannot be one (over a bound, or an
    /// item [`net_params`] would refuse).
    pub fn word(&self) -> Result<String, String> {
        let mac = self.mac.map(|b| format!("{b:02x}")).join(":");
        let mut word = format!("{NET_PARAM}={mac},mtu={}", self.mtu);
        for (addr, prefix) in &self.addresses {
            word.push_str(&format!(",addr={addr}/{prefix}"));
        }
        for route in &self.routes {
            let onlink = if route.onlink { "/onlink" } else { "" };
            match (route.is_default(), route.gateway) {
                (true, Some(gateway)) => word.push_str(&format!(",gw={gateway}{onlink}")),
                (_, gateway) => {
                    let via = gateway.map(|g| format!("/{g}")).unwrap_or_default();
                    let (dst, len) = (route.destination, route.prefix);
                    word.push_str(&format!(",route={dst}/{len}{via}{onlink}"));
                }
            }
        }
        // The parser is the one judge of what a word may hold.
        parse_word(&word)?;
        Ok(word)
    }
}

/// Every `kiln.net=` word of `cmdline`, in order.
pub fn net_params(cmdline: &[u8]) -> Result<Vec<NetInterface>, String> {
    let prefix = format!("{NET_PARAM}=");
    let words: Vec<&[u8]> = cmdline
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| w.starts_with(prefix.as_bytes()))
        .collect();
    if words.len() > MAX_INTERFACES {
        return Err(format!(
            "{} {NET_PARAM}= words: at most {MAX_INTERFACES}",
            words.len()
        ));
    }
    words
        .into_iter()
        .map(|w| match std::str::from_utf8(w) {
            Ok(w) if w.is_ascii() => parse_word(w),
            _ => Err(format!("{}: not ASCII", String::from_utf8_lossy(w))),
        })
        .collect()
}

/// Reads one `kiln.net=...` word; errors name it.
fn parse_word(word: &str) -> Result<NetInterface, String> {
    let shown = || match word.chars().nth(80) {
        Some(_) => format!("{}...", word.chars().take(80).collect::<String>()),
        None => word.to_string(),
    };
    let bad = |why: String| format!("{}: {why}", shown());
    if word.len() > MAX_WORD_LEN {
        return Err(bad(format!("longer than {MAX_WORD_LEN} bytes")));
    }
    let value = word
        .strip_prefix(NET_PARAM)
        .and_then(|w| w.strip_prefix('='))
        .ok_or_else(|| bad(format!("not a {NET_PARAM}= word")))?;
    let mut items = value.split(',');
    let mac = items.next().unwrap_or_default();
    let mac = parse_mac(mac).ok_or_else(|| bad(format!("'{mac}' is not a MAC address")))?;
    let mtu = items
        .next()
        .and_then(|i| i.strip_prefix("mtu="))
        .and_then(|m| m.parse::<u32>().ok())
        .filter(|m| (68..=65535).contains(m))
        .ok_or_else(|| bad("expected mtu=68..65535 after the MAC".into()))?;
    let mut interface = NetInterface {
        mac,
        mtu,
        addresses: Vec::new(),
        routes: Vec::new(),
    };
    for (count, item) in items.enumerate() {
        if count == MAX_ITEMS {
            return Err(bad(format!("more than {MAX_ITEMS} items")));
        }
        let unknown = || bad(format!("'{item}': expected addr=, gw= or route="));
        let (key, value) = item.split_once('=').ok_or_else(unknown)?;
        let invalid = |what: &str| bad(format!("'{item}': {what}"));
        match key {
            "addr" => {
                let (ip, len) = value.split_once('/').ok_or_else(|| invalid("no /LEN"))?;
                let ip: IpAddr = ip.parse().map_err(|_| invalid("not an address"))?;
                let len = prefix_len(ip, len).ok_or_else(|| invalid("bad prefix length"))?;
                interface.addresses.push((ip, len));
            }
            "gw" => {
                let (ip, onlink) = onlink_suffix(value);
                let gateway: IpAddr = ip.parse().map_err(|_| invalid("not an address"))?;
                let destination = match gateway {
                    IpAddr::V4(_) => IpAddr::from([0u8; 4]),
                    IpAddr::V6(_) => IpAddr::from([0u8; 16]),
                };
                interface.routes.push(NetRoute {
                    destination,
                    prefix: 0,
                    gateway: Some(gateway),
                    onlink,
                });
            }
            "route" => {
                let (value, onlink) = onlink_suffix(value);
                let mut parts = value.splitn(3, '/');
                let (dst, len, gw) = (parts.next(), parts.next(), parts.next());
                let dst: IpAddr = dst
                    .and_then(|d| d.parse().ok())
                    .ok_or_else(|| invalid("not a destination"))?;
                let prefix = len
                    .and_then(|l| prefix_len(dst, l))
                    .ok_or_else(|| invalid("bad prefix length"))?;
                let gateway = match gw {
                    None => None,
                    Some(gw) => Some(
                        gw.parse::<IpAddr>()
                            .ok()
                            .filter(|g| g.is_ipv4() == dst.is_ipv4())
                            .ok_or_else(|| invalid("bad gateway"))?,
                    ),
                };
                if onlink && gateway.is_none() {
                    return Err(invalid("onlink without a gateway"));
                }
                interface.routes.push(NetRoute {
                    destination: dst,
                    prefix,
                    gateway,
                    onlink,
                });
            }
            _ => return Err(unknown()),
        }
    }
    Ok(interface)
}

/// Splits a trailing `/onlink` off.
fn onlink_suffix(value: &str) -> (&str, bool) {
    match value.strip_suffix("/onlink") {
        Some(rest) => (rest, true),
        None => (value, false),
    }
}

/// A prefix length valid for `ip`'s family.
fn prefix_len(ip: IpAddr, text: &str) -> Option<u8> {
    let len: u8 = text.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some(len)
}

/// `aa:bb:cc:dd:ee:ff` (hex digits, either case).
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2)?;
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calico_like() -> NetInterface {
        NetInterface {
            mac: [0x02, 0x42, 0x0a, 0x58, 0x00, 0x02],
            mtu: 1400,
            addresses: vec![
                ("10.88.0.2".parse().unwrap(), 32),
                ("fd00::2".parse().unwrap(), 64),
            ],
            routes: vec![
                NetRoute {
                    destination: "0.0.0.0".parse().unwrap(),
                    prefix: 0,
                    gateway: Some("169.254.1.1".parse().unwrap()),
                    onlink: true,
                },
                NetRoute {
                    destination: "::".parse().unwrap(),
                    prefix: 0,
                    gateway: Some("fd00::1".parse().unwrap()),
                    onlink: false,
                },
                NetRoute {
                    destination: "10.89.0.0".parse().unwrap(),
                    prefix: 16,
                    gateway: Some("169.254.1.1".parse().unwrap()),
                    onlink: true,
                },
                NetRoute {
                    destination: "fd01::".parse().unwrap(),
                    prefix: 48,
                    gateway: None,
                    onlink: false,
                },
            ],
        }
    }

    #[test]
    fn words_round_trip() {
        let first = calico_like();
        let word = first.word().unwrap();
        assert_eq!(
            word,
            "kiln.net=02:42:0a:58:00:02,mtu=1400,addr=10.88.0.2/32,addr=fd00::2/64,\
             gw=169.254.1.1/onlink,gw=fd00::1,route=10.89.0.0/16/169.254.1.1/onlink,\
             route=fd01::/48"
        );
        let second = NetInterface {
            mac: [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff],
            mtu: 1500,
            addresses: vec![("172.16.0.2".parse().unwrap(), 20)],
            routes: vec![],
        };
        let line = format!(
            "console=ttyS0 {word} quiet {} kiln.root=/dev/vda",
            second.word().unwrap()
        );
        assert_eq!(net_params(line.as_bytes()).unwrap(), vec![first, second]);
        assert_eq!(net_params(b"console=ttyS0 ip=1.2.3.4").unwrap(), vec![]);
    }

    #[test]
    fn bounds_are_errors_on_both_ends() {
        let mut big = calico_like();
        big.addresses = (0..=MAX_ITEMS as u8)
            .map(|i| (IpAddr::from([10, 0, 0, i]), 32))
            .collect();
        let err = big.word().unwrap_err();
        assert!(
            err.ends_with(&format!("more than {MAX_ITEMS} items")),
            "{err}"
        );
        big.addresses = (0..40u16)
            .map(|i| (IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0x1234, i]), 128))
            .collect();
        let err = big.word().unwrap_err();
        assert!(
            err.ends_with(&format!("longer than {MAX_WORD_LEN} bytes")),
            "{err}"
        );
        assert!(err.starts_with("kiln.net=02:42:0a:58:00:02,mtu=1400,addr=") && err.len() < 160);

        let word = calico_like().word().unwrap();
        let line = vec![word; MAX_INTERFACES + 1].join(" ");
        let err = net_params(line.as_bytes()).unwrap_err();
        assert_eq!(err, "9 kiln.net= words: at most 8");
        let line = vec![calico_like().word().unwrap(); MAX_INTERFACES].join(" ");
        assert_eq!(net_params(line.as_bytes()).unwrap().len(), MAX_INTERFACES);
    }

    #[test]
    fn malformed_words_are_one_line_errors() {
        let mac = "kiln.net=02:42:0a:58:00:02";
        for (word, why) in [
            ("kiln.net=", "'' is not a MAC address"),
            (
                "kiln.net=02:42:0a:58:00",
                "'02:42:0a:58:00' is not a MAC address",
            ),
            (
                "kiln.net=02:42:0a:58:00:zz,mtu=1500",
                "is not a MAC address",
            ),
            (
                "kiln.net=02:42:0a:58:00:02:03,mtu=1500",
                "is not a MAC address",
            ),
            (mac, "expected mtu=68..65535 after the MAC"),
            (&format!("{mac},mtu=67"), "expected mtu=68..65535"),
            (
                &format!("{mac},mtu=1500,mtu=1500"),
                "'mtu=1500': expected addr=, gw= or route=",
            ),
            (
                &format!("{mac},mtu=1500,"),
                "'': expected addr=, gw= or route=",
            ),
            (
                &format!("{mac},mtu=1500,addr=10.0.0.1"),
                "'addr=10.0.0.1': no /LEN",
            ),
            (
                &format!("{mac},mtu=1500,addr=10.0.0.1/33"),
                "bad prefix length",
            ),
            (
                &format!("{mac},mtu=1500,addr=fd00::1/129"),
                "bad prefix length",
            ),
            (&format!("{mac},mtu=1500,addr=10.0.0/8"), "not an address"),
            (
                &format!("{mac},mtu=1500,gw=10.0.0.1/onlnk"),
                "not an address",
            ),
            (
                &format!("{mac},mtu=1500,route=10.0.0.0/8/fd00::1"),
                "bad gateway",
            ),
            (
                &format!("{mac},mtu=1500,route=10.0.0.0"),
                "bad prefix length",
            ),
            (
                &format!("{mac},mtu=1500,route=10.0.0.0/8/onlink"),
                "onlink without a gateway",
            ),
            (
                &format!("{mac},mtu=1500,route=10.0.0.0/8/1.2.3.4/x"),
                "bad gateway",
            ),
        ] {
            let err = net_params(word.as_bytes()).unwrap_err();
            assert!(err.contains(why), "{word}: {err}");
            assert!(
                err.starts_with(word) && !err.contains('\n'),
                "{word}: {err}"
            );
        }
        let err = net_params(b"kiln.net=\xff").unwrap_err();
        assert_eq!(err, "kiln.net=\u{fffd}: not ASCII");
    }
}
