use super::*;

/// `ip -j -d addr show` of a container namespace as podman leaves it
/// (trimmed): lo, the veth eth0 (IPv4, IPv6 and a link-local address), a
/// TAP (never carried) and a down veth without an address.
const LINKS: &str = r#"[
 {"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"mtu":65536,"link_type":"loopback",
  "address":"00:00:00:00:00:00","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
 {"ifindex":2,"link":null,"ifname":"eth0","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1400,
  "link_type":"ether","address":"32:4d:aa:6e:4d:f2","linkinfo":{"info_kind":"veth"},
  "addr_info":[{"family":"inet","local":"10.88.0.2","prefixlen":24,"scope":"global","label":"eth0"},
               {"family":"inet","local":"10.88.0.9","prefixlen":24,"scope":"global","secondary":true},
               {"family":"inet6","local":"fd00::2","prefixlen":64,"scope":"global"},
               {"family":"inet6","local":"fe80::304d:aaff:fe6e:4df2","prefixlen":64,"scope":"link"}]},
 {"ifindex":4,"ifname":"tp0","flags":["BROADCAST","MULTICAST"],"mtu":1500,"link_type":"ether",
  "address":"1e:74:08:e0:7b:22","linkinfo":{"info_kind":"tun","info_data":{"type":"tap"}},
  "addr_info":[{"family":"inet","local":"10.0.9.1","prefixlen":24,"scope":"global"}]},
 {"ifindex":5,"ifname":"v1","flags":["BROADCAST","MULTICAST"],"mtu":1500,"link_type":"ether",
  "address":"ea:4e:a9:87:a6:27","addr_info":[]}
]"#;

const ROUTES4: &str = r#"[
 {"dst":"default","gateway":"10.88.0.1","dev":"eth0","flags":[]},
 {"dst":"10.88.0.0/24","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.88.0.2","flags":[]},
 {"dst":"10.89.0.0/16","gateway":"10.88.0.254","dev":"eth0","protocol":"static","flags":[]},
 {"dst":"10.0.9.0/24","dev":"tp0","protocol":"kernel","scope":"link","flags":[]}
]"#;

const ROUTES6: &str = r#"[
 {"dst":"fd00::/64","dev":"eth0","protocol":"kernel","metric":256,"flags":[],"pref":"medium"},
 {"dst":"fd01::/64","dev":"eth0","metric":1024,"flags":[],"pref":"medium"},
 {"dst":"fe80::/64","dev":"eth0","protocol":"kernel","metric":256,"flags":[],"pref":"medium"},
 {"dst":"default","gateway":"fd00::1","dev":"eth0","metric":1024,"flags":[],"pref":"medium"}
]"#;

fn parsed<T: serde::de::DeserializeOwned>(text: &str) -> Vec<T> {
    parse_json(text, "*", "ip", &["-j"]).unwrap()
}

fn planned() -> Vec<CarriedInterface> {
    plan(&parsed(LINKS), &parsed(ROUTES4), &parsed(ROUTES6)).unwrap()
}

fn v4(text: &str) -> Ipv4Addr {
    text.parse().unwrap()
}

#[test]
fn the_veth_is_carried_with_its_mac_mtu_addresses_and_routes() {
    let carried = planned();
    assert_eq!(
        carried.len(),
        1,
        "lo, the TAP and the bare veth stay: {carried:?}"
    );
    let eth0 = &carried[0];
    let mac = [0x32, 0x4d, 0xaa, 0x6e, 0x4d, 0xf2];
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
                    destination: "10.89.0.0/16".into(),
                    gateway: Some("10.88.0.254".parse().unwrap()),
                },
                GuestRoute {
                    destination: "fd01::/64".into(),
                    gateway: None,
                },
            ],
        }
    );
    let network = ContainerNetwork {
        interfaces: carried.clone(),
    };
    assert_eq!(network.nets(), vec![eth0.net.clone()]);
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
    // `--network none`: lo only. A veth with only a link-local address is
    // not carried either.
    let links: Vec<IpLink> = parsed(
        r#"[{"ifname":"lo","flags":["LOOPBACK","UP"],"mtu":65536,"link_type":"loopback",
             "addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
            {"ifname":"eth0","flags":["UP"],"mtu":1500,"link_type":"ether","address":"32:4d:aa:6e:4d:f2",
             "addr_info":[{"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]}]"#,
    );
    let network = ContainerNetwork {
        interfaces: plan(&links, &parsed(ROUTES4), &parsed(ROUTES6)).unwrap(),
    };
    assert!(network.interfaces.is_empty(), "{network:?}");
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
fn bad_ip_output_is_one_line_naming_the_interface() {
    let mut links: Vec<IpLink> = parsed(LINKS);
    links[1].address = Some("zz".into());
    let err = plan(&links, &[], &[]).unwrap_err().to_string();
    assert!(
        err.starts_with("interface 'eth0': unexpected output of `ip -j -d addr show`"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    let routes: Vec<IpRoute> = parsed(r#"[{"dst":"default","gateway":"10.88.0.x","dev":"eth0"}]"#);
    let err = plan(&parsed(LINKS), &routes, &[]).unwrap_err().to_string();
    assert!(
        err.contains("'eth0'") && err.contains("gateway '10.88.0.x'"),
        "{err}"
    );

    let err = parse_json::<IpLink>("[{", "eth0", "tc", &["-j", "qdisc"]).unwrap_err();
    assert!(err
        .to_string()
        .starts_with("interface 'eth0': unexpected output of `tc -j qdisc`"));
    assert!(parse_json::<IpLink>("\n", "*", "tc", &[])
        .unwrap()
        .is_empty());
}

#[test]
fn a_failed_command_is_one_line() {
    let out = std::process::Command::new("sh")
        .args(["-c", "exit 2"])
        .status()
        .unwrap();
    assert_eq!(one_line("Error: a\n\n  b \n", out), "Error: a; b");
    assert_eq!(one_line("", out), "exit status: 2");
    // Errors of real commands (neither touches the network).
    let here = current_netns().unwrap();
    let err = run(&here, "nope0", "false", &["link", "del", "nope0"]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "interface 'nope0': `false link del nope0` failed: exit status: 1"
    );
    let err = run(&here, "nope0", "kiln-no-such-tool", &[]).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(
            "interface 'nope0': cannot run 'kiln-no-such-tool' (iproute2 installed?): "
        ),
        "{text}"
    );
    assert_eq!(text.lines().count(), 1, "{text}");
}
