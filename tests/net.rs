//! virtio-net with a real Linux guest (ONE boot): the test makes its own
//! network namespace with a TAP in it, runs `kiln` inside that namespace,
//! and exchanges 16 MiB each way over TCP with a peer that also lives in
//! the namespace (threads of this test that joined it with setns). The same
//! boot has a second `--net` card on a TAP kiln creates itself, with the
//! default MAC. Nothing outside the namespace sees a packet; the namespace
//! is deleted on exit. `--net` errors (busy TAP, not a TAP) are checked with
//! tiny guests, no kernel boot.
//!
//! Needs root (namespaces, TAP), /dev/kvm and the recipe guest kernel.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    guest_kernel, have_kvm, have_program, is_root, require, sha256_hex, test_guest, Netns, Scratch,
};

const SIZE: usize = 16 << 20;
const HOST_IP: &str = "10.0.2.1";
const GUEST_IP: &str = "10.0.2.2";
const TO_GUEST_PORT: u16 = 5002;
const FROM_GUEST_PORT: u16 = 5001;
const TSO_TO_GUEST_PORT: u16 = 5004;
const TSO_FROM_GUEST_PORT: u16 = 5003;
/// The second exchange, at MTU 1500.
const TSO_SIZE: usize = 512 << 10;
/// The TAP's MTU, which the guest takes over.
const JUMBO_MTU: u32 = 65520;
const GUEST_MAC: &str = "02:6b:69:6c:6e:01";
/// The second card's TAP: it does not exist, so kiln creates it.
const SECOND_TAP: &str = "tap1";

/// Seeds of the two directions' data (the guest helper uses the second).
const SEED_TO_GUEST: u64 = 0x9e37_79b9_7f4a_7c15;
const SEED_FROM_GUEST: u64 = 0x0123_4567_89ab_cdef;

/// Incompressible, reproducible bytes (xorshift64*), as net_helper.c makes them.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A guest root in `scratch`: the host's static busybox with all its applet
/// links plus the static `net-helper` built from tests/net_helper.c.
fn rootfs(scratch: &Scratch) -> Result<PathBuf, String> {
    let busybox = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .ok_or("no static busybox (apt-get install busybox-static)")?;
    let dir = scratch.path("rootfs");
    fs::create_dir_all(dir.join("bin")).map_err(|e| e.to_string())?;
    fs::copy(busybox, dir.join("bin/busybox")).map_err(|e| e.to_string())?;
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| e.to_string())?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
        }
    }
    common::build_static_helper("net_helper", &dir.join("bin/net-helper"))?;
    Ok(dir)
}

struct Transfer {
    bytes: Vec<u8>,
    elapsed: Duration,
}

fn rate(t: &Transfer, n: usize) -> f64 {
    n as f64 / t.elapsed.as_secs_f64() / (1 << 20) as f64
}

type Pending = mpsc::Receiver<std::io::Result<Transfer>>;

/// Host -> guest: on the first connection, send `data`, half-close and wait
/// for the guest's close (the end of the transfer).
fn serve_send(listener: TcpListener, data: Vec<u8>) -> Pending {
    let (done, result) = mpsc::channel();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let start = Instant::now();
        let r = s
            .write_all(&data)
            .and_then(|_| s.shutdown(Shutdown::Write))
            .and_then(|_| s.read_to_end(&mut Vec::new()))
            .map(|_| Transfer {
                bytes: Vec::new(),
                elapsed: start.elapsed(),
            });
        let _ = done.send(r);
    });
    result
}

/// Guest -> host: read to EOF (the guest half-closes), then close.
fn serve_recv(listener: TcpListener) -> Pending {
    let (done, result) = mpsc::channel();
    thread::spawn(move || {
        let (mut s, _): (TcpStream, _) = listener.accept().unwrap();
        let start = Instant::now();
        let mut bytes = Vec::with_capacity(SIZE);
        let r = s.read_to_end(&mut bytes).map(|_| Transfer {
            bytes,
            elapsed: start.elapsed(),
        });
        let _ = done.send(r);
    });
    result
}

fn finished(pending: Pending, what: &str) -> Transfer {
    pending
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what}: transfer did not finish"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn key_value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim_end().strip_prefix(&format!("{key}=")))
        .map(str::to_string)
}

/// `kiln run` of a tiny test guest (resources/test-guests/GUEST.S) inside
/// `ns`: no kernel boot, quiet unless the caller sets KILN_LOG.
fn tiny_kiln(ns: &Netns, guest: &str, timeout: &str, extra: &[&str]) -> Command {
    let mut cmd = ns.exec([env!("CARGO_BIN_EXE_kiln"), "run", "--kernel"]);
    cmd.arg(test_guest(guest))
        .args(["--mem", "32M", "--timeout", timeout])
        .args(extra)
        .env_remove("KILN_LOG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

/// The MAC kiln logs (KILN_LOG=info: "net: ethN on TAP 'NAME', MAC M") for
/// the card on TAP `tap`.
fn logged_mac(stderr: &str, tap: &str) -> Option<String> {
    let needle = format!(" on TAP '{tap}', MAC ");
    stderr
        .lines()
        .find_map(|l| Some(l.split_once(&needle)?.1.trim().to_ascii_lowercase()))
}

/// The second card (`--net tap=tap1`, no `mac=`, a TAP that did not exist):
/// its MAC is unicast and locally administered and is the one kiln logs;
/// kiln created the TAP and it went away with kiln. The MAC is derived from
/// the name: another kiln process gives a card on tap1 (there eth0, not
/// eth1) the same MAC, and a card on another name a different one.
fn check_default_mac(ns: &Netns, guest_mac: &str, stderr: &str) {
    let octets: Vec<u8> = guest_mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap_or_else(|_| panic!("eth1 MAC {guest_mac:?}")))
        .collect();
    assert_eq!(octets.len(), 6, "eth1 MAC {guest_mac:?}");
    assert_eq!(
        octets[0] & 0b11,
        0b10,
        "unicast and locally administered: {guest_mac}"
    );
    assert_eq!(
        logged_mac(stderr, SECOND_TAP).as_deref(),
        Some(guest_mac),
        "kiln logs the MAC the guest sees"
    );
    let link = ns
        .exec(["ip", "link", "show", SECOND_TAP])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running ip");
    assert!(!link.success(), "the TAP kiln created outlived it");

    let again = tiny_kiln(
        ns,
        "hello",
        "10s",
        &[
            "--net",
            &format!("tap={SECOND_TAP}"),
            "--net",
            "tap=kilnother",
        ],
    )
    .env("KILN_LOG", "info")
    .output()
    .expect("running kiln");
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(42), "tiny guest's status: {err}");
    assert_eq!(
        logged_mac(&err, SECOND_TAP).as_deref(),
        Some(guest_mac),
        "same TAP name, another run and position: same MAC\n{err}"
    );
    let other = logged_mac(&err, "kilnother").unwrap_or_else(|| panic!("no MAC logged: {err}"));
    assert_ne!(other, guest_mac, "another TAP name, another MAC");
}

/// `--net` on a TAP another kiln holds (busy), on a veth and on a TUN (not
/// TAPs): kiln stops with one line naming the interface and status 125,
/// before the guest runs. The TAP the holder's kiln created is down and
/// has no address. Tiny guests only: no kernel boot.
#[test]
fn net_errors_are_one_line_naming_the_interface() {
    if !require(is_root(), "needs root (network namespace, TAP)")
        || !require(have_kvm(), "/dev/kvm not accessible")
        || !require(have_program("ip"), "iproute2 'ip' not installed")
        || !require(
            Path::new("/dev/net/tun").exists(),
            "/dev/net/tun does not exist",
        )
    {
        return;
    }
    let ns = Netns::create(
        "net-errors",
        &[
            "ip link add kilnveth type veth peer name kilnpeer",
            "ip tuntap add dev kilntun mode tun",
        ],
    );
    // The holder: a halted tiny guest on kilnbusy (kiln creates it). It
    // holds the TAP once it has logged the card.
    let mut holder = tiny_kiln(&ns, "halt", "300s", &["--net", "tap=kilnbusy"])
        .env("KILN_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the holder");
    let mut holder_log = std::io::BufReader::new(holder.stderr.take().expect("piped"));
    let mut seen = String::new();
    while !seen.contains("on TAP 'kilnbusy'") {
        let n = std::io::BufRead::read_line(&mut holder_log, &mut seen).expect("holder's log");
        if n == 0 {
            let _ = holder.kill();
            panic!("the holder ended before attaching kilnbusy: {seen}");
        }
    }

    // The TAP kiln created is down and has no address (kiln does not
    // configure the host side).
    let link = String::from_utf8_lossy(
        &common::run_checked(&mut ns.exec(["ip", "-o", "link", "show", "kilnbusy"])).stdout,
    )
    .into_owned();
    let flags = link
        .split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map(|(flags, _)| flags.split(',').collect::<Vec<_>>())
        .unwrap_or_else(|| panic!("no flags in {link:?}"));
    assert!(!flags.contains(&"UP"), "kilnbusy is up: {link}");
    let addrs = common::run_checked(&mut ns.exec(["ip", "-o", "addr", "show", "dev", "kilnbusy"]));
    assert!(
        !String::from_utf8_lossy(&addrs.stdout).contains("inet"),
        "kilnbusy has an address: {}",
        String::from_utf8_lossy(&addrs.stdout)
    );

    for (tap, reason) in [
        ("kilnbusy", "is busy"),
        ("kilnveth", "is not a TAP"),
        ("kilntun", "is not a TAP"),
    ] {
        let out = tiny_kiln(&ns, "hello", "10s", &["--net", &format!("tap={tap}")])
            .output()
            .expect("running kiln");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "--net tap={tap}: {err}");
        assert_eq!(err.lines().count(), 1, "--net tap={tap}: {err:?}");
        assert!(
            err.contains(&format!("'{tap}'")) && err.contains(reason),
            "--net tap={tap}: {err:?}"
        );
        assert!(out.stdout.is_empty(), "the guest ran: {:?}", out.stdout);
    }
    holder.kill().expect("stopping the holder");
    holder.wait().expect("reaping the holder");
}

#[test]
fn guest_exchanges_16_mib_each_way_over_a_tap() {
    if !require(is_root(), "needs root (network namespace, TAP)")
        || !require(have_kvm(), "/dev/kvm not accessible")
        || !require(have_program("ip"), "iproute2 'ip' not installed")
        || !require(have_program("sha256sum"), "sha256sum not installed")
        || !require(
            have_program("gcc"),
            "gcc not installed (builds the guest helper)",
        )
        || !require(
            Path::new("/dev/net/tun").exists(),
            "/dev/net/tun does not exist",
        )
    {
        return;
    }
    let Some(kernel) = guest_kernel("vmlinux") else {
        require(false, "guest kernel not built (run resources/setup.sh)");
        return;
    };
    let scratch = Scratch::new("net");
    let root = match rootfs(&scratch) {
        Ok(root) => root,
        Err(e) => {
            require(false, &format!("cannot build the guest root: {e}"));
            return;
        }
    };

    let ns = Netns::create(
        "net",
        &[
            "ip tuntap add dev tap0 mode tap",
            "ip addr add 10.0.2.1/24 dev tap0",
            "ip link set tap0 mtu 65520 up",
        ],
    );
    let listeners: Vec<TcpListener> = ns.on_thread(|| {
        [
            TO_GUEST_PORT,
            FROM_GUEST_PORT,
            TSO_TO_GUEST_PORT,
            TSO_FROM_GUEST_PORT,
        ]
        .into_iter()
        .map(|port| TcpListener::bind((HOST_IP, port)).expect("bind in the namespace"))
        .collect()
    });
    let [to_guest, from_guest, tso_to_guest, tso_from_guest]: [TcpListener; 4] =
        listeners.try_into().expect("four listeners");

    let payload = random_bytes(SIZE, SEED_TO_GUEST);
    let payload_sha = sha256_hex(&payload);
    let expected_back = random_bytes(SIZE, SEED_FROM_GUEST);
    let to_guest = serve_send(to_guest, payload.clone());
    let from_guest = serve_recv(from_guest);
    let tso_to_guest = serve_send(tso_to_guest, payload[..TSO_SIZE].to_vec());
    let tso_from_guest = serve_recv(tso_from_guest);

    // Phase 1 at the TAP's jumbo MTU (the guest gets it through
    // VIRTIO_NET_F_MTU): 16 MiB each way. Phase 2 at MTU 1500, so that both
    // sides' TCP segments through TSO/GSO: a smaller exchange.
    let script = format!(
        "echo mac=$(cat /sys/class/net/eth0/address)
echo mac1=$(cat /sys/class/net/eth1/address)
echo carrier=$(cat /sys/class/net/eth0/carrier)
echo mtu=$(cat /sys/class/net/eth0/mtu)
net-helper recv {HOST_IP} {TO_GUEST_PORT} | sed 's/^/rx_/'
net-helper send {HOST_IP} {FROM_GUEST_PORT} {SIZE} | sed 's/^/tx_/'
ip link set eth0 mtu 1500
net-helper recv {HOST_IP} {TSO_TO_GUEST_PORT} | sed 's/^/rx2_/'
net-helper send {HOST_IP} {TSO_FROM_GUEST_PORT} {TSO_SIZE} | sed 's/^/tx2_/'
echo done=1"
    );
    let started = Instant::now();
    let out = ns
        .exec([env!("CARGO_BIN_EXE_kiln"), "run"])
        .arg("--kernel")
        .arg(&kernel)
        .arg("--rootfs")
        .arg(&root)
        .args(["--timeout", "1200s", "--net"])
        .arg(format!("tap=tap0,mac={GUEST_MAC}"))
        .args(["--net", &format!("tap={SECOND_TAP}")])
        .arg("--cmdline")
        .arg(format!("ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off"))
        // `ip link set` is root's in the guest.
        .args(["--user", "0"])
        .args(["--", "sh", "-c", &script])
        .env("KILN_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("running kiln in the namespace");
    let wall = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "kiln exited {:?} after {wall:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status.code()
    );
    let value = |key: &str| key_value(&stdout, key).unwrap_or_default();
    assert_eq!(out.status.code(), Some(0), "guest script status");
    assert_eq!(value("mac"), GUEST_MAC);
    check_default_mac(&ns, &value("mac1"), &stderr);
    assert_eq!(value("carrier"), "1", "link is up");
    assert_eq!(value("mtu"), JUMBO_MTU.to_string(), "MTU from the TAP");

    let to_guest = finished(to_guest, "host -> guest");
    assert_eq!(value("rx_bytes"), SIZE.to_string());
    assert_eq!(
        value("rx_sha256"),
        payload_sha,
        "guest got what the host sent"
    );
    let from_guest = finished(from_guest, "guest -> host");
    assert_eq!(from_guest.bytes.len(), SIZE);
    assert_eq!(
        value("tx_sha256"),
        sha256_hex(&from_guest.bytes),
        "host got what the guest sent"
    );
    assert!(
        from_guest.bytes == expected_back,
        "guest data is its stream"
    );

    let tso_to_guest = finished(tso_to_guest, "host -> guest at MTU 1500");
    assert_eq!(value("rx2_sha256"), sha256_hex(&payload[..TSO_SIZE]));
    let tso_from_guest = finished(tso_from_guest, "guest -> host at MTU 1500");
    assert!(tso_from_guest.bytes == expected_back[..TSO_SIZE]);
    assert_eq!(value("tx2_sha256"), sha256_hex(&tso_from_guest.bytes));
    assert_eq!(value("done"), "1");

    // The device's counters, logged when kiln exits.
    let stats = stderr
        .lines()
        .find(|l| l.contains("net tap0: rx_frames="))
        .expect("device statistics on stderr");
    // Straight to stderr so the numbers show even when the test passes.
    let _ = std::io::stderr().write_all(
        format!(
            "net throughput (MTU {JUMBO_MTU}, 16 MiB): host -> guest {:.2} MiB/s ({:.1} s), \
             guest -> host {:.2} MiB/s ({:.1} s); at MTU 1500 with TSO ({} KiB): \
             host -> guest {:.2} MiB/s, guest -> host {:.2} MiB/s; boot + run {:.1} s\n\
             net counters: {stats}\n",
            rate(&to_guest, SIZE),
            to_guest.elapsed.as_secs_f64(),
            rate(&from_guest, SIZE),
            from_guest.elapsed.as_secs_f64(),
            TSO_SIZE >> 10,
            rate(&tso_to_guest, TSO_SIZE),
            rate(&tso_from_guest, TSO_SIZE),
            wall.as_secs_f64()
        )
        .as_bytes(),
    );
    let stat = |key: &str| -> u64 {
        stats
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} in {stats}"))
    };
    assert!(
        stat("rx_csum") > 0,
        "checksum offload host -> guest: {stats}"
    );
    assert!(
        stat("tx_csum") > 0,
        "checksum offload guest -> host: {stats}"
    );
    assert!(
        stat("rx_gso") > 0,
        "TSO host -> guest (GUEST_TSO4): {stats}"
    );
    assert!(stat("tx_gso") > 0, "TSO guest -> host (HOST_TSO4): {stats}");
    assert!(
        stat("rx_max_frame") > 1514,
        "big frames to the guest: {stats}"
    );
    assert!(
        stat("tx_max_frame") > 1514,
        "big frames from the guest: {stats}"
    );
    assert!(
        stat("rx_buffers") > stat("rx_frames"),
        "frames spanned mergeable buffers: {stats}"
    );
    for key in ["rx_dropped", "rx_bad_chains", "tx_malformed", "tx_errors"] {
        assert_eq!(stat(key), 0, "{key}: {stats}");
    }

    drop(ns);
}
