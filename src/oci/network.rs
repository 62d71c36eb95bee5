//! A container's network, carried into its VM (issue 13, item 5).
//!
//! The engine (podman, containerd through CNI) puts the container in a
//! network namespace with a veth (usually `eth0`) that holds the
//! container's address, and a default route. [`connect`], called on a
//! thread inside that namespace, carries every such interface into the VM
//! the way Kata Containers' `tcfilter` model does:
//!
//! - a persistent TAP (`kilntapN`, kiln's flags: `IFF_TAP | IFF_NO_PI |
//!   IFF_VNET_HDR`) in the same namespace, up, with the veth's MTU (which
//!   kiln's virtio-net offers the guest through `VIRTIO_NET_F_MTU`);
//! - an `ingress` qdisc on the veth and on the TAP, each with a u32
//!   match-everything filter whose action is `mirred egress redirect` to
//!   the other: every frame that arrives on one leaves by the other;
//! - the guest's card gets the veth's MAC, so the engine's ARP entries and
//!   port forwarding (`-p`) still point where they did; the guest gets the
//!   veth's addresses, gateways and routes ([`GuestInterface`]), as
//!   `kiln.net=` words on its kernel command line that kiln's init applies
//!   ([`ContainerNetwork::kernel_net_words`]: every interface, IPv4 and
//!   IPv6, extra routes, on-link gateways; what the OCI runtime uses), or
//!   the kernel's `ip=` for the first IPv4 interface
//!   ([`ContainerNetwork::kernel_ip_arg`], for guests without kiln's init).
//!
//! **The veth keeps its address.** The ingress hook runs before the
//! namespace's IP stack sees a frame and the redirect steals every frame,
//! so the namespace never answers ARP or anything else for the address the
//! guest now owns, and the engine finds the namespace as it left it when it
//! tears it down (Kata's tcfilter model leaves the addresses too). The cost:
//! a process in the namespace itself (kiln's) cannot talk to the guest over
//! the veth (the replies go to the guest); nothing of kiln's needs to.
//!
//! **rtnetlink, no iproute2.** Everything goes through a small hand-written
//! rtnetlink client (`rtnetlink.rs`: links, addresses, routes, the qdisc
//! and the filter) on a NETLINK_ROUTE socket, not through `ip`/`tc`: no
//! dependency on the host's tools or their output format, no process
//! started per step. The socket [`connect`] opens belongs to the
//! namespace it was called in, so the [`Connection`] acts there whichever
//! thread later drops it.
//!
//! [`Connection`] removes what it made (the TAPs, which takes their
//! filters along, and the veths' ingress qdiscs) when dropped, on an error
//! half way, or by [`Connection::disconnect`]; [`ContainerNetwork`] is the
//! plain data (serde) another process can [`ContainerNetwork::disconnect`]
//! from inside the namespace.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use kiln_devices::tap::{Tap, TapError};
use kiln_devices::virtio::net::MacAddr;
use serde::{Deserialize, Serialize};

use crate::config::NetConfig;
use kiln_init::net::{NetInterface, NetRoute};

mod rtnetlink;

use rtnetlink::{Address, Link, Route, Rtnl};

/// The TAPs [`connect`] creates are named this followed by the carried
/// interface's position (`kilntap0`, `kilntap1`, ...).
pub const TAP_PREFIX: &str = "kilntap";

/// Why the container's network cannot be carried into (or removed from
/// around) its VM. Each message is one line naming the interface.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A netlink request failed (`*` when it was about every interface).
    #[error("interface '{iface}': {what} failed: {source}")]
    Netlink {
        /// The interface.
        iface: String,
        /// What was asked, e.g. "adding the ingress qdisc".
        what: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The network namespace to join cannot be opened or joined.
    #[error("cannot join the network namespace {path}: {source}")]
    Namespace {
        /// The namespace's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The TAP cannot be created (its error names it).
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The veth already has an ingress (or clsact) qdisc: someone else
    /// filters its traffic, and kiln does not take that over.
    #[error("interface '{0}' already has an ingress qdisc: kiln does not share it")]
    IngressInUse(String),
    /// The interface's `kiln.net=` word would be over a bound (too many
    /// addresses or routes, or too long), or there are too many interfaces.
    #[error("interface '{iface}': the guest's kiln.net= word cannot say it: {reason}")]
    NetWord {
        /// The guest's interface.
        iface: String,
        /// What the bound is.
        reason: String,
    },
    /// The kernel's `ip=` only takes a gateway inside the interface's subnet.
    #[error("interface '{iface}': gateway {gateway} is outside {address}: the guest kernel's ip= cannot use it")]
    GatewayOffLink {
        /// The guest's interface.
        iface: String,
        /// The default route's gateway.
        gateway: Ipv4Addr,
        /// The interface's address.
        address: Ipv4Cidr,
    },
}

/// Wraps a netlink error with the interface and the request.
fn netlink<'a>(iface: &'a str, what: &'static str) -> impl FnOnce(io::Error) -> NetworkError + 'a {
    move |source| NetworkError::Netlink {
        iface: iface.to_string(),
        what,
        source,
    }
}

/// An IPv4 address with its prefix length (`10.88.0.2/24`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv4Cidr {
    /// The address.
    pub addr: Ipv4Addr,
    /// The prefix length (0 to 32).
    pub prefix: u8,
}

impl Ipv4Cidr {
    /// The prefix as a netmask (`/24` is `255.255.255.0`).
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }

    /// Whether `ip` is in this address's subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::from(self.netmask());
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An IPv6 address with its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv6Cidr {
    /// The address.
    pub addr: Ipv6Addr,
    /// The prefix length (0 to 128).
    pub prefix: u8,
}

impl Ipv6Cidr {
    /// Whether `ip` is in this address's subnet.
    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        let mask = u128::MAX
            .checked_shl(128 - u32::from(self.prefix))
            .unwrap_or(0);
        u128::from(ip) & mask == u128::from(self.addr) & mask
    }
}

/// A route of the container's besides the connected subnets and the
/// default route: `destination/prefix` (`10.89.0.0/16`) through `gateway`,
/// or on the link when there is none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRoute {
    /// The destination network.
    pub destination: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
    /// The next hop, if not on the link.
    pub gateway: Option<IpAddr>,
}

/// What the guest's card must look like: the container's interface as the
/// engine configured it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInterface {
    /// The guest's name for the card: `eth0`, `eth1`, ... in the order of
    /// [`ContainerNetwork::nets`] (kiln names cards in the order given).
    pub device: String,
    /// The veth's MAC, which the guest's card takes over.
    pub mac: [u8; 6],
    /// The veth's MTU (the TAP has it too, so the guest is offered it).
    pub mtu: u32,
    /// Global IPv4 addresses, the primary first.
    pub ipv4: Vec<Ipv4Cidr>,
    /// Global IPv6 addresses.
    pub ipv6: Vec<Ipv6Cidr>,
    /// The IPv4 default route's gateway, if it uses this interface.
    pub gateway4: Option<Ipv4Addr>,
    /// The IPv6 default route's gateway, if it uses this interface.
    pub gateway6: Option<Ipv6Addr>,
    /// Other routes through this interface (neither connected nor default).
    pub routes: Vec<GuestRoute>,
}

/// One interface of the container's namespace carried into the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedInterface {
    /// The engine's interface (the container's end of the veth).
    pub veth: String,
    /// The TAP kiln created next to it.
    pub tap: String,
    /// The VM's card on that TAP, with the veth's MAC.
    pub net: NetConfig,
    /// How the guest configures the card.
    pub guest: GuestInterface,
}

/// The container's network as carried into its VM: plain data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerNetwork {
    /// The carried interfaces, in card order (none with `--network none`).
    pub interfaces: Vec<CarriedInterface>,
}

impl ContainerNetwork {
    /// The VM's cards, in order ([`crate::VmConfig::nets`]).
    pub fn nets(&self) -> Vec<NetConfig> {
        self.interfaces.iter().map(|c| c.net.clone()).collect()
    }

    /// The kernel's `ip=` word that configures the guest's first IPv4
    /// interface (the one with the default route, else the first with an
    /// IPv4 address): its primary address, the gateway, and up to two
    /// IPv4 `nameservers` (the kernel shows them in /proc/net/pnp; the
    /// guest's /etc/resolv.conf is the bundle's). None without IPv4.
    ///
    /// `ip=` configures one interface, IPv4 only, and a default route
    /// through a gateway inside its subnet: the other interfaces, IPv6 and
    /// [`GuestInterface::routes`] are lost. It is for guests without
    /// kiln's init (`kiln run --cmdline`); kiln's own guests get
    /// [`Self::kernel_net_words`].
    pub fn kernel_ip_arg(&self, nameservers: &[IpAddr]) -> Result<Option<String>, NetworkError> {
        let guests = self.interfaces.iter().map(|c| &c.guest);
        let chosen = guests
            .clone()
            .find(|g| g.gateway4.is_some() && !g.ipv4.is_empty())
            .or_else(|| guests.clone().find(|g| !g.ipv4.is_empty()));
        chosen.map(|g| kernel_ip_arg(g, nameservers)).transpose()
    }

    /// The `kiln.net=` words (one per interface, in card order) with which
    /// kiln's guest init configures every interface before the command
    /// runs: MAC, MTU, IPv4 and IPv6 addresses, default gateways and the
    /// other routes, a gateway outside every subnet of its family marked
    /// on-link (Calico's /32 behind 169.254.1.1). This is what the OCI
    /// runtime puts on the command line, instead of [`Self::kernel_ip_arg`]
    /// (not both); name servers come with the container's root
    /// (/etc/resolv.conf). Format and bounds: [`kiln_init::net`].
    pub fn kernel_net_words(&self) -> Result<Vec<String>, NetworkError> {
        use kiln_init::net::MAX_INTERFACES;
        if let Some(extra) = self.interfaces.get(MAX_INTERFACES) {
            return Err(NetworkError::NetWord {
                iface: extra.guest.device.clone(),
                reason: format!("more than {MAX_INTERFACES} interfaces"),
            });
        }
        self.interfaces
            .iter()
            .map(|c| {
                net_interface(&c.guest)
                    .word()
                    .map_err(|reason| NetworkError::NetWord {
                        iface: c.guest.device.clone(),
                        reason,
                    })
            })
            .collect()
    }

    /// Removes what [`connect`] made for these interfaces (each TAP, which
    /// takes its qdisc and filter along, and each veth's ingress qdisc),
    /// in the calling thread's network namespace. What is already gone is
    /// skipped, so this may run twice. Keeps going after an error and
    /// returns the first.
    pub fn disconnect(&self) -> Result<(), NetworkError> {
        let mut rtnl = Rtnl::open().map_err(netlink("*", "opening a netlink socket"))?;
        disconnect_all(&mut rtnl, &self.interfaces)
    }
}

/// `guest` as init's [`NetInterface`]: the default routes first, each
/// gateway on-link when no address of its family holds it (an IPv6
/// link-local gateway is always on the link).
fn net_interface(guest: &GuestInterface) -> NetInterface {
    let onlink = |gateway: IpAddr| match gateway {
        IpAddr::V4(gw) => !guest.ipv4.iter().any(|a| a.contains(gw)),
        IpAddr::V6(gw) => !gw.is_unicast_link_local() && !guest.ipv6.iter().any(|a| a.contains(gw)),
    };
    let route = |destination: IpAddr, prefix, gateway: Option<IpAddr>| NetRoute {
        destination,
        prefix,
        gateway,
        onlink: gateway.is_some_and(onlink),
    };
    let defaults = [
        guest
            .gateway4
            .map(|g| route(Ipv4Addr::UNSPECIFIED.into(), 0, Some(g.into()))),
        guest
            .gateway6
            .map(|g| route(Ipv6Addr::UNSPECIFIED.into(), 0, Some(g.into()))),
    ];
    let others = guest
        .routes
        .iter()
        .map(|r| route(r.destination, r.prefix, r.gateway));
    NetInterface {
        mac: guest.mac,
        mtu: guest.mtu,
        addresses: (guest.ipv4.iter().map(|a| (IpAddr::V4(a.addr), a.prefix)))
            .chain(guest.ipv6.iter().map(|a| (IpAddr::V6(a.addr), a.prefix)))
            .collect(),
        routes: defaults.into_iter().flatten().chain(others).collect(),
    }
}

/// The kernel's `ip=` word for `guest` (see [`ContainerNetwork::kernel_ip_arg`]):
/// `ip=ADDR::GATEWAY:NETMASK::DEVICE:off[:DNS0[:DNS1]]`.
fn kernel_ip_arg(guest: &GuestInterface, nameservers: &[IpAddr]) -> Result<String, NetworkError> {
    let address = guest.ipv4[0];
    let gateway = match guest.gateway4 {
        Some(gw) if !address.contains(gw) => {
            return Err(NetworkError::GatewayOffLink {
                iface: guest.device.clone(),
                gateway: gw,
                address,
            })
        }
        Some(gw) => gw.to_string(),
        None => String::new(),
    };
    let mut word = format!(
        "ip={}::{gateway}:{}::{}:off",
        address.addr,
        address.netmask(),
        guest.device
    );
    let dns = nameservers.iter().filter_map(|n| match n {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    });
    for server in dns.take(2) {
        word.push_str(&format!(":{server}"));
    }
    Ok(word)
}

/// The `nameserver` addresses of a resolv.conf, in order.
pub fn parse_nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            // A scoped IPv6 address (fe80::1%eth0) is of no use in the guest.
            words.next()?.parse().ok()
        })
        .collect()
}

/// The container's network, carried into a VM: removed again when this is
/// dropped (or by [`Self::disconnect`]), in the namespace it was made in.
#[derive(Debug)]
pub struct Connection {
    network: ContainerNetwork,
    /// Bound to the namespace of [`connect`].
    rtnl: Rtnl,
    connected: bool,
}

impl Connection {
    /// What was carried: the cards for the VM and the guest's addresses.
    pub fn network(&self) -> &ContainerNetwork {
        &self.network
    }

    /// Removes the TAPs and filters now (see
    /// [`ContainerNetwork::disconnect`]), in the namespace of [`connect`].
    pub fn disconnect(mut self) -> Result<(), NetworkError> {
        self.connected = false;
        disconnect_all(&mut self.rtnl, &self.network.interfaces)
    }

    /// Keeps the TAPs and filters (for a process that hands the VM over to
    /// another) and returns the plain data that can remove them later.
    pub fn keep(mut self) -> ContainerNetwork {
        self.connected = false;
        std::mem::take(&mut self.network)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.connected {
            if let Err(e) = disconnect_all(&mut self.rtnl, &self.network.interfaces) {
                log::warn!("{e}");
            }
        }
    }
}

/// Carries every non-loopback Ethernet interface (veth, or a TAP) of the
/// calling thread's network namespace that has a global address into a VM: see the module
/// documentation. A namespace with none (`--network none`) gives an empty
/// network. On an error, what was made so far is removed again.
///
/// The VM must then be started in the same namespace (kiln opens the TAPs
/// by name where it runs; the sandbox's VM process inherits the calling
/// thread's namespace).
pub fn connect() -> Result<Connection, NetworkError> {
    let mut rtnl = Rtnl::open().map_err(netlink("*", "opening a netlink socket"))?;
    let links = rtnl.links().map_err(netlink("*", "listing the links"))?;
    let addresses = rtnl
        .addresses()
        .map_err(netlink("*", "listing the addresses"))?;
    let routes4 = rtnl
        .routes(libc::AF_INET)
        .map_err(netlink("*", "listing the IPv4 routes"))?;
    let routes6 = rtnl
        .routes(libc::AF_INET6)
        .map_err(netlink("*", "listing the IPv6 routes"))?;
    let planned = plan(&links, &addresses, &routes4, &routes6);

    let mut connection = Connection {
        network: ContainerNetwork::default(),
        rtnl,
        connected: true,
    };
    for (veth_index, carried) in planned {
        // The veth's own filters would be replaced: refuse before making
        // anything for it (and so never remove the engine's qdisc).
        if has_ingress_qdisc(&mut connection.rtnl, &carried.veth, veth_index)? {
            return Err(NetworkError::IngressInUse(carried.veth));
        }
        // The TAP must exist (persistent) for its qdisc and filters; kiln
        // attaches to it by name when the VM starts. Only one made here is
        // ever removed again.
        Tap::create_persistent(&carried.tap)?;
        connection.network.interfaces.push(carried.clone());
        connect_both_ways(&mut connection.rtnl, &carried, veth_index)?;
        log::info!(
            "network: {} carried into the VM through TAP '{}' (guest {} {})",
            carried.veth,
            carried.tap,
            carried.guest.device,
            MacAddr(carried.guest.mac)
        );
    }
    Ok(connection)
}

/// Runs `f` on a thread of its own that joined the network namespace at
/// `netns` (the path in the bundle's config.json, `/proc/PID/ns/net`,
/// `/run/netns/NAME`) and returns what it returns: call [`connect`] and
/// start the VM inside `f`, so that both happen in the container's
/// namespace (threads and processes `f` starts stay there). The calling
/// thread's own namespace is untouched; a panic in `f` is passed on.
pub fn in_namespace<T: Send>(
    netns: &Path,
    f: impl FnOnce() -> T + Send,
) -> Result<T, NetworkError> {
    let error = |source| NetworkError::Namespace {
        path: netns.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(netns).map_err(error)?;
    let joined = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on an open namespace fd changes only this
                // thread's network namespace (a thread of its own).
                match unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } {
                    0 => Ok(f()),
                    _ => Err(io::Error::last_os_error()),
                }
            })
            .join()
    });
    match joined {
        Ok(result) => result.map_err(error),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Brings `carried`'s TAP up and connects it and the veth both ways.
fn connect_both_ways(
    rtnl: &mut Rtnl,
    carried: &CarriedInterface,
    veth_index: u32,
) -> Result<(), NetworkError> {
    let (veth, tap) = (carried.veth.as_str(), carried.tap.as_str());
    let tap_index = index_of(rtnl, tap)?.ok_or_else(|| NetworkError::Netlink {
        iface: tap.to_string(),
        what: "finding the new TAP",
        source: io::Error::from_raw_os_error(libc::ENODEV),
    })?;
    rtnl.set_mtu_up(tap_index, carried.guest.mtu)
        .map_err(netlink(tap, "setting the MTU and bringing it up"))?;
    for (from, from_index, to_index) in
        [(tap, tap_index, veth_index), (veth, veth_index, tap_index)]
    {
        rtnl.add_ingress_qdisc(from_index)
            .map_err(netlink(from, "adding the ingress qdisc"))?;
        rtnl.add_redirect_filter(from_index, to_index)
            .map_err(netlink(from, "adding the mirred redirect filter"))?;
    }
    Ok(())
}

/// Removes each TAP and each veth's ingress qdisc that still exists.
fn disconnect_all(rtnl: &mut Rtnl, interfaces: &[CarriedInterface]) -> Result<(), NetworkError> {
    let links = rtnl.links().map_err(netlink("*", "listing the links"))?;
    let index = |name: &str| links.iter().find(|l| l.name == name).map(|l| l.index);
    let mut first_error = None;
    for carried in interfaces {
        let (veth, tap) = (carried.veth.as_str(), carried.tap.as_str());
        let mut steps: Vec<Result<(), NetworkError>> = Vec::new();
        if let Some(i) = index(veth) {
            steps.push(has_ingress_qdisc(rtnl, veth, i).and_then(|has| {
                match has {
                    true => rtnl
                        .delete_ingress_qdisc(i)
                        .map_err(netlink(veth, "removing the ingress qdisc")),
                    false => Ok(()),
                }
            }));
        }
        if let Some(i) = index(tap) {
            steps.push(
                rtnl.delete_link(i)
                    .map_err(netlink(tap, "deleting the TAP")),
            );
        }
        for e in steps.into_iter().filter_map(Result::err) {
            log::debug!("{e}");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn has_ingress_qdisc(rtnl: &mut Rtnl, iface: &str, index: u32) -> Result<bool, NetworkError> {
    let kinds = rtnl
        .qdisc_kinds(index)
        .map_err(netlink(iface, "listing the qdiscs"))?;
    Ok(kinds.iter().any(|k| k == "ingress" || k == "clsact"))
}

fn index_of(rtnl: &mut Rtnl, name: &str) -> Result<Option<u32>, NetworkError> {
    let links = rtnl.links().map_err(netlink(name, "listing the links"))?;
    Ok(links.iter().find(|l| l.name == name).map(|l| l.index))
}

/// Which interfaces to carry (with the veth's index) and how the guest
/// sees them (pure: what the kernel listed).
fn plan(
    links: &[Link],
    addresses: &[Address],
    routes4: &[Route],
    routes6: &[Route],
) -> Vec<(u32, CarriedInterface)> {
    let mut carried = Vec::new();
    for link in links {
        let name = link.name.as_str();
        let global: Vec<&Address> = addresses
            .iter()
            .filter(|a| a.index == link.index && a.global)
            .collect();
        // A TAP with an address is carried too (rootless podman's
        // slirp4netns or pasta give the container one instead of a veth);
        // kiln's own have none.
        if link.loopback || global.is_empty() {
            continue;
        }
        let Some(mac) = link.mac else {
            log::warn!("network: interface '{name}' is not Ethernet: not carried into the VM");
            continue;
        };
        let (mut ipv4, mut ipv6) = (Vec::new(), Vec::new());
        for a in &global {
            match a.addr {
                IpAddr::V4(addr) => ipv4.push(Ipv4Cidr {
                    addr,
                    prefix: a.prefix,
                }),
                IpAddr::V6(addr) => ipv6.push(Ipv6Cidr {
                    addr,
                    prefix: a.prefix,
                }),
            }
        }
        let (gateway4, routes_v4) = routes_of(link.index, routes4);
        let (gateway6, routes_v6) = routes_of(link.index, routes6);
        let index = carried.len();
        let tap = format!("{TAP_PREFIX}{index}");
        let interface = CarriedInterface {
            veth: name.to_string(),
            net: NetConfig {
                tap: tap.clone(),
                mac: Some(mac),
                rate_limit: Default::default(),
            },
            tap,
            guest: GuestInterface {
                device: format!("eth{index}"),
                mac,
                mtu: link.mtu,
                ipv4,
                ipv6,
                gateway4: gateway4.and_then(|g| match g {
                    IpAddr::V4(g) => Some(g),
                    IpAddr::V6(_) => None,
                }),
                gateway6: gateway6.and_then(|g| match g {
                    IpAddr::V6(g) => Some(g),
                    IpAddr::V4(_) => None,
                }),
                routes: routes_v4.into_iter().chain(routes_v6).collect(),
            },
        };
        carried.push((link.index, interface));
    }
    carried
}

/// The default route's gateway through link `index` (of one family) and
/// its other routes that the guest needs (not the kernel's connected ones).
fn routes_of(index: u32, routes: &[Route]) -> (Option<IpAddr>, Vec<GuestRoute>) {
    let mut default = None;
    let mut others = Vec::new();
    for r in routes.iter().filter(|r| r.oif == Some(index)) {
        match r.dst {
            None => default = default.or(r.gateway),
            Some(_) if r.kernel => {}
            Some((destination, prefix)) => others.push(GuestRoute {
                destination,
                prefix,
                gateway: r.gateway,
            }),
        }
    }
    (default, others)
}

#[cfg(test)]
mod tests;
