use super::*;

/// A container namespace as podman leaves it, as the kernel lists it: lo,
/// the veth eth0 (two IPv4 addresses, IPv6, a link-local address), a TAP
/// with an address (as rootless podman's slirp4netns makes) and a veth
/// without an address.
fn links() -> Vec<Link> {
    let link = |index, name: &str, mac, mtu, kind: Option<&str>| Link {
        index,
        name: name.into(),
        loopback: index == 1,
        mac,
        mtu,
        kind: kind.map(Into::into),
    };
    vec![
        link(1, "lo", None, 65536, None),
        link(2, "eth0", Some(MAC), 1400, Some("veth")),
        link(4, "tp0", Some([2, 0, 0, 0, 0, 4]), 1500, Some("tun")),
        link(5, "v1", Some([2, 0, 0, 0, 0, 5]), 1500, Some("veth")),
    ]
}

const MAC: [u8; 6] = [0x32, 0x4d, 0xaa, 0x6e, 0x4d, 0xf2];

fn addresses() -> Vec<Address> {
    let addr = |index, text: &str, prefix, global| Address {
        index,
        addr: text.parse().unwrap(),
        prefix,
        global,
    };
    vec![
        addr(1, "127.0.0.1", 8, false),
        addr(2, "10.88.0.2", 24, true),
        addr(2, "10.88.0.9", 24, true),
        addr(2, "fd00::2", 64, true),
        addr(2, "fe80::304d:aaff:fe6e:4df2", 64, false),
        addr(4, "10.0.9.1", 24, true),
    ]
}

fn route(oif: u32, dst: Option<(&str, u8)>, gateway: Option<&str>, kernel: bool) -> Route {
    Route {
        oif: Some(oif),
        dst: dst.map(|(a, p)| (a.parse().unwrap(), p)),
        gateway: gateway.map(|g| g.parse().unwrap()),
        kernel,
    }
}

fn routes4() -> Vec<Route> {
    vec![
        route(2, None, Some("10.88.0.1"), false),
        route(2, Some(("10.88.0.0", 24)), None, true),
        route(2, Some(("10.89.0.0", 16)), Some("10.88.0.254"), false),
        route(4, Some(("10.0.9.0", 24)), None, true),
    ]
}

fn routes6() -> Vec<Route> {
    vec![
        route(2, Some(("fd00::", 64)), None, true),
        route(2, Some(("fd01::", 64)), None, false),
        route(2, Some(("fe80::", 64)), None, true),
        route(2, None, Some("fd00::1"), false),
    ]
}

fn planned() -> Vec<CarriedInterface> {
    let planned = plan(&links(), &addresses(), &routes4(), &routes6());
    let indexes: Vec<u32> = planned.iter().map(|(index, _)| *index).collect();
    assert_eq!(indexes, vec![2, 4], "the carried links' indexes");
    planned.into_iter().map(|(_, carried)| carried).collect()
}

fn v4(text: &str) -> Ipv4Addr {
    text.parse().unwrap()
}

#[test]
fn the_veth_is_carried_with_its_mac_mtu_addresses_and_routes() {
    let carried = planned();
    assert_eq!(carried.len(), 2, "lo and the bare veth stay: {carried:?}");
    let eth0 = &carried[0];
    let mac = MAC;
    assert_eq!(
        (eth0.veth.as_str(), eth0.tap.as_str()),
        ("eth0", "kilntap0")
    );
    assert_eq!(
        eth0.net,
        NetConfig {
            tap: "kilntap0".into(),
            mac: Some(mac),
            rate_limit: Default::default(),
        }
    );
    assert_eq!(
        eth0.guest,
        GuestInterface {
            device: "eth0".into(),
            mac,
            mtu: 1400,
            ipv4: vec![
                Ipv4Cidr {
                    addr: v4("10.88.0.2"),
                    prefix: 24
                },
                Ipv4Cidr {
                    addr: v4("10.88.0.9"),
                    prefix: 24
                }
            ],
            ipv6: vec![Ipv6Cidr {
                addr: "fd00::2".parse().unwrap(),
                prefix: 64
            }],
            gateway4: Some(v4("10.88.0.1")),
            gateway6: Some("fd00::1".parse().unwrap()),
            routes: vec![
                GuestRoute {
                    destination: "10.89.0.0".parse().unwrap(),
                    prefix: 16,
                    gateway: Some("10.88.0.254".parse().unwrap()),
                },
                GuestRoute {
                    destination: "fd01::".parse().unwrap(),
                    prefix: 64,
                    gateway: None,
                },
            ],
        }
    );
    let network = ContainerNetwork {
        interfaces: carried.clone(),
    };
    // The TAP with an address: the second card, IPv4 only, no gateway,
    // its connected route left to the guest's kernel.
    let tp0 = &carried[1];
    assert_eq!((tp0.veth.as_str(), tp0.tap.as_str()), ("tp0", "kilntap1"));
    assert_eq!(
        tp0.guest,
        GuestInterface {
            device: "eth1".into(),
            mac: [2, 0, 0, 0, 0, 4],
            mtu: 1500,
            ipv4: vec![Ipv4Cidr {
                addr: v4("10.0.9.1"),
                prefix: 24
            }],
            ipv6: vec![],
            gateway4: None,
            gateway6: None,
            routes: vec![],
        }
    );
    assert_eq!(network.nets(), vec![eth0.net.clone(), tp0.net.clone()]);
    // Plain data: it survives a trip through JSON (another process can
    // disconnect it).
    let json = serde_json::to_string(&network).unwrap();
    assert_eq!(
        serde_json::from_str::<ContainerNetwork>(&json).unwrap(),
        network
    );
}

#[test]
fn a_namespace_without_addresses_carries_nothing() {
    // `--network none`: lo only. A veth with only a link-local address, or
    // an interface that is not Ethernet, is not carried either.
    let mut links = links();
    links[3].mac = None;
    let addresses = vec![
        Address {
            index: 2,
            addr: "fe80::1".parse().unwrap(),
            prefix: 64,
            global: false,
        },
        Address {
            index: 5,
            addr: "10.1.1.1".parse().unwrap(),
            prefix: 24,
            global: true,
        },
    ];
    let planned = plan(&links, &addresses, &routes4(), &routes6());
    assert!(planned.is_empty(), "{planned:?}");
    let network = ContainerNetwork::default();
    assert_eq!(network.kernel_ip_arg(&[]).unwrap(), None);
}

#[test]
fn the_ip_word_configures_address_gateway_and_dns() {
    let network = ContainerNetwork {
        interfaces: planned(),
    };
    assert_eq!(
        network.kernel_ip_arg(&[]).unwrap().as_deref(),
        Some("ip=10.88.0.2::10.88.0.1:255.255.255.0::eth0:off")
    );
    // IPv4 name servers only (the kernel parses no others), at most two.
    let servers = ["fd00::53", "10.88.0.1", "1.1.1.1", "8.8.8.8"].map(|s| s.parse().unwrap());
    assert_eq!(
        network.kernel_ip_arg(&servers).unwrap().as_deref(),
        Some("ip=10.88.0.2::10.88.0.1:255.255.255.0::eth0:off:10.88.0.1:1.1.1.1")
    );
}

#[test]
fn the_ip_word_goes_to_the_interface_with_the_default_route() {
    let mut eth0 = planned().remove(0);
    eth0.guest.gateway4 = None;
    let mut eth1 = eth0.clone();
    eth1.guest.device = "eth1".into();
    eth1.guest.ipv4 = vec![Ipv4Cidr {
        addr: v4("172.16.5.10"),
        prefix: 20,
    }];
    eth1.guest.gateway4 = Some(v4("172.16.0.1"));
    let network = ContainerNetwork {
        interfaces: vec![eth0.clone(), eth1],
    };
    assert_eq!(
        network.kernel_ip_arg(&[]).unwrap().as_deref(),
        Some("ip=172.16.5.10::172.16.0.1:255.255.240.0::eth1:off")
    );
    // No default route anywhere: the first IPv4 interface, no gateway.
    let network = ContainerNetwork {
        interfaces: vec![eth0.clone()],
    };
    assert_eq!(
        network.kernel_ip_arg(&[]).unwrap().as_deref(),
        Some("ip=10.88.0.2:::255.255.255.0::eth0:off")
    );
    // IPv6 only: no ip= word.
    eth0.guest.ipv4.clear();
    let network = ContainerNetwork {
        interfaces: vec![eth0],
    };
    assert_eq!(network.kernel_ip_arg(&[]).unwrap(), None);
}

#[test]
fn a_gateway_outside_the_subnet_is_refused_naming_the_interface() {
    let mut eth0 = planned().remove(0);
    eth0.guest.ipv4 = vec![Ipv4Cidr {
        addr: v4("10.88.0.2"),
        prefix: 32,
    }];
    let network = ContainerNetwork {
        interfaces: vec![eth0],
    };
    let err = network.kernel_ip_arg(&[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "interface 'eth0': gateway 10.88.0.1 is outside 10.88.0.2/32: the guest kernel's ip= cannot use it"
    );
}

#[test]
fn netmasks() {
    let mask = |prefix| {
        Ipv4Cidr {
            addr: v4("10.1.2.3"),
            prefix,
        }
        .netmask()
    };
    assert_eq!(mask(0), v4("0.0.0.0"));
    assert_eq!(mask(1), v4("128.0.0.0"));
    assert_eq!(mask(20), v4("255.255.240.0"));
    assert_eq!(mask(32), v4("255.255.255.255"));
    let net = Ipv4Cidr {
        addr: v4("10.88.0.2"),
        prefix: 24,
    };
    assert!(net.contains(v4("10.88.0.1")) && !net.contains(v4("10.88.1.1")));
}

#[test]
fn nameservers_of_a_resolv_conf() {
    let text = "# podman\nsearch dns.podman\nnameserver 10.88.0.1\n  nameserver   fd00::1 \n\
                nameserver fe80::1%eth0\nnameserver\noptions ndots:1\nnameserverx 1.2.3.4\n";
    assert_eq!(
        parse_nameservers(text),
        vec![
            "10.88.0.1".parse::<IpAddr>().unwrap(),
            "fd00::1".parse().unwrap()
        ]
    );
}

#[test]
fn a_netlink_error_is_one_line_naming_the_interface() {
    let err =
        netlink("eth0", "adding the ingress qdisc")(io::Error::from_raw_os_error(libc::EEXIST));
    assert_eq!(
        err.to_string(),
        "interface 'eth0': adding the ingress qdisc failed: File exists (os error 17)"
    );
}

#[test]
fn net_words_say_every_interface_with_its_routes() {
    let network = ContainerNetwork {
        interfaces: planned(),
    };
    let words = network.kernel_net_words().unwrap();
    assert_eq!(
        words,
        [
            "kiln.net=32:4d:aa:6e:4d:f2,mtu=1400,addr=10.88.0.2/24,addr=10.88.0.9/24,\
             addr=fd00::2/64,gw=10.88.0.1,gw=fd00::1,route=10.89.0.0/16/10.88.0.254,\
             route=fd01::/64",
            "kiln.net=02:00:00:00:00:04,mtu=1500,addr=10.0.9.1/24",
        ]
    );
    // What init reads back is what the host meant.
    let read = kiln_init::net::net_params(words.join(" ").as_bytes()).unwrap();
    let meant: Vec<NetInterface> = network
        .interfaces
        .iter()
        .map(|c| net_interface(&c.guest))
        .collect();
    assert_eq!(read, meant);
    assert_eq!(
        ContainerNetwork::default().kernel_net_words().unwrap(),
        Vec::<String>::new()
    );
}

#[test]
fn net_words_mark_gateways_outside_every_subnet_on_link() {
    // Calico: a /32 with the default route and others through 169.254.1.1;
    // IPv6 through a gateway outside the /128, and a link-local one.
    let mut eth0 = planned().remove(0);
    eth0.guest.ipv4 = vec![Ipv4Cidr {
        addr: v4("10.88.0.2"),
        prefix: 32,
    }];
    eth0.guest.ipv6 = vec![Ipv6Cidr {
        addr: "fd00::2".parse().unwrap(),
        prefix: 128,
    }];
    eth0.guest.gateway4 = Some(v4("169.254.1.1"));
    eth0.guest.gateway6 = Some("fe80::1".parse().unwrap());
    eth0.guest.routes = vec![
        GuestRoute {
            destination: "10.89.0.0".parse().unwrap(),
            prefix: 16,
            gateway: Some("169.254.1.1".parse().unwrap()),
        },
        GuestRoute {
            destination: "fd02::".parse().unwrap(),
            prefix: 64,
            gateway: Some("fd00::1".parse().unwrap()),
        },
    ];
    let network = ContainerNetwork {
        interfaces: vec![eth0],
    };
    assert_eq!(
        network.kernel_net_words().unwrap(),
        [
            "kiln.net=32:4d:aa:6e:4d:f2,mtu=1400,addr=10.88.0.2/32,addr=fd00::2/128,\
          gw=169.254.1.1/onlink,gw=fe80::1,route=10.89.0.0/16/169.254.1.1/onlink,\
          route=fd02::/64/fd00::1/onlink"
        ]
    );
    // The same gateway inside a /24 is not on-link.
    let v6 = Ipv6Cidr {
        addr: "fd00::2".parse().unwrap(),
        prefix: 64,
    };
    assert!(v6.contains("fd00::1".parse().unwrap()) && !v6.contains("fd01::1".parse().unwrap()));
}

#[test]
fn net_words_over_a_bound_are_refused_naming_the_interface() {
    let eth0 = planned().remove(0);
    let mut big = eth0.clone();
    big.guest.routes = (0..30)
        .map(|i| GuestRoute {
            destination: IpAddr::from([10, 100, i, 0]),
            prefix: 24,
            gateway: None,
        })
        .collect();
    let network = ContainerNetwork {
        interfaces: vec![big],
    };
    let err = network.kernel_net_words().unwrap_err().to_string();
    assert!(
        err.starts_with("interface 'eth0': the guest's kiln.net= word cannot say it: kiln.net=")
            && err.ends_with("more than 24 items")
            && !err.contains('\n'),
        "{err}"
    );
    let network = ContainerNetwork {
        interfaces: vec![eth0; 9],
    };
    assert_eq!(
        network.kernel_net_words().unwrap_err().to_string(),
        "interface 'eth0': the guest's kiln.net= word cannot say it: more than 8 interfaces"
    );
}
