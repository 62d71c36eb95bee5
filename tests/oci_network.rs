//! The OCI runtime's networking (src/oci/network.rs) against real network
//! namespaces, as podman/CNI leave them: namespace "container" holds eth0
//! (one end of a veth, 10.88.0.2/24, MTU 1400) and a default route via
//! 10.88.0.1, the veth's other end in namespace "host" (10.88.0.1/24).
//! Every interface is in a namespace the test creates and deletes (also on
//! failure); nothing touches the host's own.
//!
//! `a_container_veth_is_carried_into_the_guest` boots ONE real guest on
//! what `connect` returns, in a network as Kubernetes' Calico leaves it
//! (eth0 10.88.0.2/32 and fd00::2/64, default route through 169.254.1.1
//! on-link, an extra route; the peer owns 169.254.1.1 and fd00::1), with
//! the `kiln.net=` words kiln's init applies, and checks that the guest
//! owns both addresses and has the routes; the other tests need no VM. Needs root, iproute2 (`ip`, `tc`) and
//! /dev/net/tun; the guest test also /dev/kvm, the recipe kernel and the
//! static /bin/busybox (the guest's root, and the peer's ping).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{guest_kernel, have_kvm, have_program, is_root, require, run_checked, Netns, Scratch};
use kiln::oci::network::{self, NetworkError};
use kiln::oci::state::{self, ContainerDir, Saved, SavedNetwork};
use kiln::sandbox::{Command, ExitStatus, Sandbox};
use kiln_devices::tap::TapError;

const CONTAINER_IP: &str = "10.88.0.2";
const PEER_IP: &str = "10.88.0.1";
const MTU: u32 = 1400;
const PEER: &str = "veth-host";
/// The port the guest serves its marker on (what `-p 8080:8080` forwards to).
const PORT: u16 = 8080;

fn network_prerequisites() -> bool {
    require(is_root(), "needs root (network namespaces, TAP, tc)")
        && require(have_program("ip"), "iproute2 'ip' not installed")
        && require(have_program("tc"), "iproute2 'tc' not installed")
        && require(
            Path::new("/dev/net/tun").exists(),
            "/dev/net/tun does not exist",
        )
}

/// The two namespaces of a podman-style container network: (host, container).
fn podman_style_network(tag: &str) -> (Netns, Netns) {
    veth_network(
        tag,
        &[format!("ip addr add {CONTAINER_IP}/24 dev eth0")],
        &[format!("ip addr add {PEER_IP}/24 dev {PEER}")],
        &[format!("ip route add default via {PEER_IP}")],
    )
}

/// Calico's gateway: no subnet of the container holds it.
const CALICO_GATEWAY: &str = "169.254.1.1";
const CONTAINER_IP6: &str = "fd00::2";
const PEER_IP6: &str = "fd00::1";

/// The two namespaces of a Calico-style (Kubernetes) container network:
/// eth0 holds CONTAINER_IP/32 and CONTAINER_IP6/64; the default route
/// and 10.89.0.0/16 go through CALICO_GATEWAY "onlink" (Calico's own
/// route to it), the IPv6 default through PEER_IP6. The peer owns the
/// gateway (it answers ARP for it, as Calico's proxy ARP does) and
/// PEER_IP6, and routes the /32 to its veth.
fn calico_style_network(tag: &str) -> (Netns, Netns) {
    veth_network(
        tag,
        &[
            format!("ip addr add {CONTAINER_IP}/32 dev eth0"),
            format!("ip -6 addr add {CONTAINER_IP6}/64 dev eth0 nodad"),
        ],
        &[
            format!("ip addr add {CALICO_GATEWAY}/32 dev {PEER}"),
            format!("ip -6 addr add {PEER_IP6}/64 dev {PEER} nodad"),
            format!("ip route add {CONTAINER_IP}/32 dev {PEER}"),
        ],
        &[
            format!("ip route add default via {CALICO_GATEWAY} dev eth0 onlink"),
            format!("ip route add 10.89.0.0/16 via {CALICO_GATEWAY} dev eth0 onlink"),
            format!("ip -6 route add default via {PEER_IP6} dev eth0"),
        ],
    )
}

/// (host, container) joined by a veth (eth0 in the container, PEER in
/// the host, both with MTU and up), with the addresses of each end (the
/// peer's lines run once it is up) and then the container's routes (after
/// both ends are up: a route needs its link up).
fn veth_network(tag: &str, eth0: &[String], peer: &[String], routes: &[String]) -> (Netns, Netns) {
    let host = Netns::create(&format!("{tag}-host"), &[]);
    let veth = format!(
        "ip link add eth0 type veth peer name {PEER} netns {}",
        host.name()
    );
    let up = format!("ip link set eth0 mtu {MTU} up");
    let mut setup = vec![veth.as_str()];
    setup.extend(eth0.iter().map(String::as_str));
    setup.push(&up);
    let container = Netns::create(&format!("{tag}-ctr"), &setup);
    let peer_up = format!("ip link set {PEER} mtu {MTU} up");
    for line in [&peer_up].into_iter().chain(peer) {
        run_checked(&mut host.exec(line.split(' ')));
    }
    for line in routes {
        run_checked(&mut container.exec(line.split(' ')));
    }
    (host, container)
}

fn output(ns: &Netns, args: &[&str]) -> String {
    String::from_utf8_lossy(&run_checked(&mut ns.exec(args.iter().copied())).stdout).into_owned()
}

/// eth0 as the engine left it: the link with its IPv4 addresses, the IPv4
/// routes and the qdiscs (IPv6 left out: its link-local address may still
/// be in duplicate address detection when the first copy is taken).
fn eth0_state(ns: &Netns) -> String {
    [
        output(ns, &["ip", "-j", "-4", "addr", "show", "dev", "eth0"]),
        output(ns, &["ip", "-j", "-4", "route", "show"]),
        output(ns, &["tc", "-j", "qdisc", "show", "dev", "eth0"]),
    ]
    .join("\n")
}

fn eth0_mac(ns: &Netns) -> String {
    let link = output(ns, &["cat", "/sys/class/net/eth0/address"]);
    link.trim().to_string()
}

fn link_exists(ns: &Netns, name: &str) -> bool {
    ns.exec(["ip", "link", "show", "dev", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running ip")
        .success()
}

/// A counter of /proc/net/snmp (`Icmp InEchos`, ...) as `text` shows it.
fn snmp(text: &str, group: &str, field: &str) -> u64 {
    let mut rows = text
        .lines()
        .filter_map(|l| l.strip_prefix(group)?.strip_prefix(": "));
    let (names, values) = (rows.next(), rows.next());
    let (Some(names), Some(values)) = (names, values) else {
        panic!("no {group} in {text}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == field)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {group} {field} in {text}"))
}

/// The average of busybox ping's summary (`round-trip min/avg/max = ...`),
/// for the log.
fn average_rtt(ping: &str) -> Option<String> {
    let line = ping.lines().find(|l| l.contains("min/avg/max"))?;
    let values = line.split(" = ").nth(1)?;
    Some(format!("{} ms", values.split('/').nth(1)?))
}

#[test]
fn a_container_veth_is_carried_into_the_guest() {
    if !network_prerequisites()
        || !require(have_kvm(), "/dev/kvm not accessible")
        || !require(Path::new("/bin/busybox").is_file(), "no /bin/busybox")
    {
        return;
    }
    let Some(kernel) = guest_kernel("vmlinux") else {
        require(false, "guest kernel not built (run resources/setup.sh)");
        return;
    };
    let _one = common::one_vm();
    let scratch = Scratch::new("oci-network");
    let root = scratch.path("rootfs");
    common::build_busybox_root(&root);

    let (host, container) = calico_style_network("ocinet");
    let engine_left = eth0_state(&container);
    let mac = eth0_mac(&container);
    let mac_in_words = mac.clone();

    // What the OCI runtime does in the container's namespace (it has its
    // path): connect, then boot the VM there (the sandbox's VM process
    // inherits the thread's namespace), the network said in kiln.net=.
    let path = Path::new("/run/netns").join(container.name());
    let in_container = network::in_namespace(&path, move || {
        let connection = network::connect().unwrap_or_else(|e| panic!("{e}"));
        let network = connection.network();
        // The kernel's ip= cannot say this network.
        let err = network.kernel_ip_arg(&[]).unwrap_err();
        assert!(matches!(err, NetworkError::GatewayOffLink { .. }), "{err}");
        let words = network.kernel_net_words().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            words,
            [format!(
                "kiln.net={mac_in_words},mtu={MTU},addr={CONTAINER_IP}/32,addr={CONTAINER_IP6}/64,\
                 gw={CALICO_GATEWAY}/onlink,gw={PEER_IP6},\
                 route=10.89.0.0/16/{CALICO_GATEWAY}/onlink"
            )]
        );
        let mut builder = Sandbox::builder()
            .kernel(kernel)
            .rootfs(root)
            .memory(256 << 20)
            .vcpus(1)
            .timeout(Duration::from_secs(1200))
            .boot_timeout(Duration::from_secs(400))
            .cmdline(words.join(" "));
        for net in network.nets() {
            builder = builder.net(net);
        }
        let sandbox = builder.build().unwrap_or_else(|e| panic!("{e}"));
        (connection, sandbox)
    });
    let (connection, sandbox) = in_container.unwrap_or_else(|e| panic!("{e}"));

    let carried = &connection.network().interfaces;
    assert_eq!(carried.len(), 1, "{carried:?}");
    let eth0 = &carried[0];
    assert_eq!(
        (eth0.veth.as_str(), eth0.tap.as_str()),
        ("eth0", "kilntap0")
    );
    let mac_text = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
    assert_eq!(eth0.net.mac.map(mac_text).as_deref(), Some(mac.as_str()));
    assert_eq!(eth0.guest.mtu, MTU);
    // Both directions' filters are in place.
    for (from, to) in [("eth0", "kilntap0"), ("kilntap0", "eth0")] {
        let filters = output(
            &container,
            &["tc", "-j", "filter", "show", "dev", from, "parent", "ffff:"],
        );
        assert!(
            filters.contains(&format!("\"to_dev\":\"{to}\"")) && filters.contains("\"redirect\""),
            "{from} -> {to}: {filters}"
        );
    }

    // The guest has the veth's MAC and MTU and reaches the peer.
    let out = sandbox
        .exec(
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu; ping -c 3 -W 60 {CALICO_GATEWAY}"
                ))
                .uid(0)
                .timeout(Duration::from_secs(300)),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("guest: {text}");
    assert_eq!(out.status, ExitStatus::Code(0), "guest ping: {text}");
    assert!(
        text.starts_with(&format!("{mac}\n{MTU}\n")),
        "guest eth0: {text}"
    );
    assert!(text.contains("3 packets received"), "{text}");
    eprintln!(
        "MEASURE ping guest -> peer: {}",
        average_rtt(&text).unwrap_or_default()
    );

    // Init added the routes: the default and the extra one through the
    // on-link gateway (/proc/net/route: little-endian hex, flags
    // UP|GATEWAY), and the IPv6 address.
    let out = sandbox
        .exec(
            Command::new("sh")
                .arg("-c")
                .arg("ip route; ip -6 addr show dev eth0; ip -6 route; cat /proc/net/route"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let routes = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("guest routes: {routes}");
    assert_eq!(out.status, ExitStatus::Code(0), "{routes}");
    let table: Vec<Vec<&str>> = routes
        .lines()
        .filter(|l| l.starts_with("eth0\t"))
        .map(|l| l.split_whitespace().take(8).collect())
        .collect();
    // Iface Destination Gateway Flags RefCnt Use Metric Mask
    let gateway_hex = "0101FEA9"; // 169.254.1.1
    for (destination, mask) in [("00000000", "00000000"), ("0000590A", "0000FFFF")] {
        assert!(
            table.iter().any(|r| r[1] == destination
                && r[2] == gateway_hex
                && r[3] == "0003"
                && r[7] == mask),
            "no route to {destination}/{mask} through {CALICO_GATEWAY}: {routes}"
        );
    }
    assert!(
        routes.contains(&format!("inet6 {CONTAINER_IP6}/64 scope global")),
        "{routes}"
    );

    // The guest serves a marker on PORT; the peer reads it (what a
    // published port does). The guest says when it listens (nc listens
    // on IPv6's dual-stack `::` when the kernel has IPv6: /proc/net/tcp6).
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let marker = format!("served-by-the-guest-{nanos}");
    let mut server = sandbox
        .spawn(
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "echo {marker} | nc -l -p {PORT} & \
                     while ! grep -sqE ':{PORT:04X} 0+:0000 0A' /proc/net/tcp /proc/net/tcp6; do :; done; \
                     echo listening; wait"
                ))
                .timeout(Duration::from_secs(300)),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let mut lines = BufReader::new(server.stdout().expect("stdout"));
    let mut line = String::new();
    lines
        .read_line(&mut line)
        .expect("the guest server's stdout");
    assert_eq!(line, "listening\n");
    let served = host.on_thread(move || {
        let mut stream = TcpStream::connect_timeout(
            &(CONTAINER_IP.parse::<std::net::IpAddr>().unwrap(), PORT).into(),
            Duration::from_secs(60),
        )
        .expect("connecting to the guest from the peer");
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut served = String::new();
        stream
            .read_to_string(&mut served)
            .expect("reading the marker");
        served
    });
    assert_eq!(served, format!("{marker}\n"));
    assert_eq!(server.wait().unwrap(), ExitStatus::Code(0));

    // The peer's pings are answered by the guest, not by the container's
    // namespace (whose stack never sees a frame: the redirect takes them at
    // ingress), and the peer's neighbour entry for the address is the MAC.
    let guest_snmp = |sandbox: &Sandbox| {
        let out = sandbox
            .exec(Command::new("cat").arg("/proc/net/snmp"))
            .unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let echoes_before = snmp(&guest_snmp(&sandbox), "Icmp", "InEchos");
    let ping = host
        .exec(["/bin/busybox", "ping", "-c", "3", "-W", "60", CONTAINER_IP])
        .output()
        .expect("running ping");
    let ping_text = String::from_utf8_lossy(&ping.stdout).into_owned();
    assert!(ping.status.success(), "peer -> guest ping: {ping_text}");
    eprintln!(
        "MEASURE ping peer -> guest: {}",
        average_rtt(&ping_text).unwrap_or_default()
    );
    let echoes_after = snmp(&guest_snmp(&sandbox), "Icmp", "InEchos");
    assert_eq!(echoes_after - echoes_before, 3, "the guest answered");
    let ping6 = host
        .exec([
            "/bin/busybox",
            "ping",
            "-6",
            "-c",
            "3",
            "-W",
            "60",
            CONTAINER_IP6,
        ])
        .output()
        .expect("running ping");
    let ping6_text = String::from_utf8_lossy(&ping6.stdout).into_owned();
    assert!(
        ping6.status.success(),
        "peer -> guest IPv6 ping: {ping6_text}"
    );
    assert!(ping6_text.contains("3 packets received"), "{ping6_text}");
    let snmp6 = sandbox
        .exec(Command::new("cat").arg("/proc/net/snmp6"))
        .unwrap_or_else(|e| panic!("{e}"));
    let snmp6 = String::from_utf8_lossy(&snmp6.stdout).into_owned();
    let echo_replies = snmp6
        .lines()
        .find_map(|l| l.strip_prefix("Icmp6OutEchoReplies"))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert_eq!(
        echo_replies,
        Some(3),
        "the guest answered over IPv6: {snmp6}"
    );
    let namespace_snmp = output(&container, &["cat", "/proc/net/snmp"]);
    assert_eq!(snmp(&namespace_snmp, "Icmp", "InEchos"), 0);
    assert_eq!(snmp(&namespace_snmp, "Ip", "InReceives"), 0);
    let neigh = output(
        &host,
        &["ip", "-j", "neigh", "show", CONTAINER_IP, "dev", PEER],
    );
    assert!(
        neigh.contains(&format!("\"lladdr\":\"{mac}\"")),
        "peer's neighbour entry: {neigh}"
    );

    // The VM ends, then the network is removed: no TAP, no filter, eth0 as
    // the engine left it, and the engine can delete it.
    sandbox.shutdown().unwrap_or_else(|e| panic!("{e}"));
    connection.disconnect().unwrap_or_else(|e| panic!("{e}"));
    assert!(!link_exists(&container, "kilntap0"), "the TAP is left");
    assert_eq!(eth0_state(&container), engine_left);
    run_checked(&mut container.exec(["ip", "link", "del", "eth0"]));
}

/// `connect` in a namespace with nothing to carry (`--network none`): an
/// empty network, no TAP.
#[test]
fn a_namespace_without_a_network_carries_nothing() {
    if !network_prerequisites() {
        return;
    }
    let none = Netns::create("ocinet-none", &[]);
    let network = none.on_thread(|| network::connect().map(|c| c.keep()));
    let network = network.unwrap_or_else(|e| panic!("{e}"));
    assert!(network.interfaces.is_empty(), "{network:?}");
    assert_eq!(network.kernel_ip_arg(&[]).unwrap(), None);
    assert!(!link_exists(&none, "kilntap0"));
}

/// Dropping the connection on another thread (here: in the test's own
/// namespace) removes the TAP and filters in the container's namespace,
/// where they were made; the plain data disconnects again harmlessly.
#[test]
fn a_dropped_connection_cleans_up_in_its_own_namespace() {
    if !network_prerequisites() {
        return;
    }
    let (_host, container) = podman_style_network("ocinet-drop");
    let engine_left = eth0_state(&container);
    // What the OCI runtime has is the namespace's path.
    let path = Path::new("/run/netns").join(container.name());
    let (connection, took) = network::in_namespace(&path, || {
        let started = Instant::now();
        let connection = network::connect().unwrap_or_else(|e| panic!("{e}"));
        (connection, started.elapsed())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("MEASURE connect (one veth): {took:?}");
    let plain = connection.network().clone();
    assert!(link_exists(&container, "kilntap0"));
    assert_ne!(eth0_state(&container), engine_left, "eth0 has its filter");
    let started = Instant::now();
    drop(connection);
    eprintln!("MEASURE disconnect (drop): {:?}", started.elapsed());
    assert!(!link_exists(&container, "kilntap0"));
    assert_eq!(eth0_state(&container), engine_left);
    container
        .on_thread(move || plain.disconnect())
        .unwrap_or_else(|e| panic!("{e}"));
}

/// What `connect` reads from the kernel: a dual-stack eth0 with an extra
/// route, and a second veth (eth1, no default route): two TAPs, two
/// cards in order, each with its veth's MAC; both removed again.
#[test]
fn connect_reads_every_interface_with_its_addresses_and_routes() {
    if !network_prerequisites() {
        return;
    }
    let (host, container) = podman_style_network("ocinet-two");
    for line in [
        "ip -6 addr add fd00::2/64 dev eth0 nodad",
        "ip -6 route add default via fd00::1 dev eth0",
        "ip route add 10.89.0.0/16 via 10.88.0.254",
        &format!(
            "ip link add eth1 type veth peer name peer1 netns {}",
            host.name()
        ),
        "ip addr add 172.16.0.2/20 dev eth1",
        "ip link set eth1 up",
    ] {
        run_checked(&mut container.exec(line.split(' ')));
    }
    let engine_left = eth0_state(&container);
    let eth1_mac = output(&container, &["cat", "/sys/class/net/eth1/address"]);
    let connection = container.on_thread(|| network::connect().unwrap_or_else(|e| panic!("{e}")));
    let network = connection.network().clone();
    let summary: Vec<String> = network
        .interfaces
        .iter()
        .map(|c| {
            let g = &c.guest;
            let mac = g.mac.map(|b| format!("{b:02x}")).join(":");
            let ipv4: Vec<String> = g.ipv4.iter().map(ToString::to_string).collect();
            let ipv6: Vec<String> = g
                .ipv6
                .iter()
                .map(|a| format!("{}/{}", a.addr, a.prefix))
                .collect();
            let routes: Vec<String> = g
                .routes
                .iter()
                .map(|r| format!("{}/{} via {:?}", r.destination, r.prefix, r.gateway))
                .collect();
            format!(
                "{} {} {} {mac} mtu={} v4={ipv4:?} v6={ipv6:?} gw4={:?} gw6={:?} {routes:?}",
                c.veth, c.tap, g.device, g.mtu, g.gateway4, g.gateway6
            )
        })
        .collect();
    let mac = eth0_mac(&container);
    let eth1_mac = eth1_mac.trim();
    assert_eq!(
        summary,
        vec![
            format!(
                "eth0 kilntap0 eth0 {mac} mtu=1400 v4=[\"10.88.0.2/24\"] v6=[\"fd00::2/64\"] \
                 gw4=Some(10.88.0.1) gw6=Some(fd00::1) [\"10.89.0.0/16 via Some(10.88.0.254)\"]"
            ),
            format!(
                "eth1 kilntap1 eth1 {eth1_mac} mtu=1500 v4=[\"172.16.0.2/20\"] v6=[] \
                 gw4=None gw6=None []"
            ),
        ]
    );
    assert!(link_exists(&container, "kilntap0") && link_exists(&container, "kilntap1"));
    assert_eq!(
        network
            .nets()
            .iter()
            .map(|n| n.tap.as_str())
            .collect::<Vec<_>>(),
        ["kilntap0", "kilntap1"]
    );
    connection.disconnect().unwrap_or_else(|e| panic!("{e}"));
    assert!(!link_exists(&container, "kilntap0") && !link_exists(&container, "kilntap1"));
    assert_eq!(eth0_state(&container), engine_left);
    let eth1_qdiscs = output(&container, &["tc", "-j", "qdisc", "show", "dev", "eth1"]);
    assert!(!eth1_qdiscs.contains("ingress"), "{eth1_qdiscs}");
}

/// A namespace that does not exist: one line naming it, `f` not run.
#[test]
fn joining_a_missing_namespace_names_it() {
    let err = network::in_namespace(Path::new("/run/netns/kiln-no-such-ns"), || {
        panic!("ran outside the namespace")
    })
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot join the network namespace /run/netns/kiln-no-such-ns: No such file or directory (os error 2)"
    );
}

/// Errors name the interface and leave nothing behind: a veth whose
/// ingress qdisc someone else uses (kept as it was), a TAP name in use.
#[test]
fn connect_errors_name_the_interface_and_leave_nothing() {
    if !network_prerequisites() {
        return;
    }
    let (_host, container) = podman_style_network("ocinet-err");
    run_checked(&mut container.exec(["tc", "qdisc", "add", "dev", "eth0", "ingress"]));
    let engine_left = eth0_state(&container);
    let err = container
        .on_thread(|| network::connect().map(|c| c.keep()))
        .unwrap_err();
    assert!(matches!(err, NetworkError::IngressInUse(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "interface 'eth0' already has an ingress qdisc: kiln does not share it"
    );
    assert!(!link_exists(&container, "kilntap0"));
    assert_eq!(eth0_state(&container), engine_left, "the qdisc is kept");

    run_checked(&mut container.exec(["tc", "qdisc", "del", "dev", "eth0", "ingress"]));
    run_checked(&mut container.exec(["ip", "tuntap", "add", "dev", "kilntap0", "mode", "tun"]));
    let engine_left = eth0_state(&container);
    let err = container
        .on_thread(|| network::connect().map(|c| c.keep()))
        .unwrap_err();
    assert!(
        matches!(err, NetworkError::Tap(TapError::Exists(_))),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "cannot create TAP interface 'kilntap0': an interface of that name exists"
    );
    assert_eq!(eth0_state(&container), engine_left, "nothing left on eth0");
    assert!(link_exists(&container, "kilntap0"), "not ours: kept");
}

/// A container monitor that was killed (SIGKILL: no clean-up of its own)
/// leaves its network connected and the record it saved: `kiln-oci delete`
/// removes the TAP and the veth's filter inside the container's namespace,
/// leaving eth0 as the engine made it; a record whose namespace the engine
/// has already deleted is nothing to remove.
#[test]
fn delete_removes_the_network_a_killed_monitor_left() {
    if !network_prerequisites() {
        return;
    }
    let (_host, container) = podman_style_network("ocinet-del");
    let engine_left = eth0_state(&container);
    let path = Path::new("/run/netns").join(container.name());
    let carried = network::in_namespace(&path, || network::connect().map(|c| c.keep()))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(link_exists(&container, "kilntap0"));
    let scratch = Scratch::new("oci-delete-network");
    let root = scratch.path("state");
    let delete = |id: &str, namespace: &Path| {
        let dir = ContainerDir::create(&root, id).unwrap_or_else(|e| panic!("{e}"));
        // Its monitor has ended (pid 0: no such process).
        let saved = Saved {
            id: id.into(),
            bundle: "/nonexistent".into(),
            rootfs: "/nonexistent/rootfs".into(),
            pid: 0,
            pid_start: 0,
            created: state::rfc3339_now(),
            annotations: Default::default(),
            started: true,
            kernel: "/nonexistent/vmlinux".into(),
            mem_bytes: 256 << 20,
            vcpus: 1,
            paused: false,
            container_root: Default::default(),
        };
        dir.write(&saved).unwrap_or_else(|e| panic!("{e}"));
        let record = SavedNetwork {
            namespace: namespace.to_path_buf(),
            network: carried.clone(),
        };
        state::save_network(dir.path(), &record).unwrap_or_else(|e| panic!("{e}"));
        drop(dir);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln-oci"))
            .arg("--root")
            .arg(&root)
            .args(["delete", id])
            .output()
            .expect("running kiln-oci");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success() && stderr.is_empty(),
            "delete: {stderr}"
        );
        assert!(!root.join(id).exists(), "the state of {id} is left");
    };
    delete("killed", &path);
    assert!(!link_exists(&container, "kilntap0"), "the TAP is left");
    assert_eq!(eth0_state(&container), engine_left);
    delete("namespace-gone", &scratch.path("no-such-namespace"));
}
