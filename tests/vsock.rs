//! virtio-vsock and virtio-console with a real Linux guest. One boot
//! through `kiln run`: `--console virtio` makes hvc0 the guest's console
//! (its output must reach kiln's stdout), and `--vsock` carries streams both
//! ways: the test connects to a guest listener through the main socket
//! (`CONNECT 1234`) and accepts the guest's connection to host port 5678 on
//! `PATH_5678`. Each stream exchanges a few messages and a 1 MiB payload in
//! each direction, checked with FNV-1a checksums computed on both sides.
//! A second boot, through the library (whose run report counts VM exits):
//! bulk output through the virtio console costs far fewer exits than bytes.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::Scratch;
use kiln::config::ConsoleKind;
use kiln::{VmConfig, VmOutcome};

const CID: u32 = 3;
const GUEST_PORT: u32 = 1234;
const HOST_PORT: u32 = 5678;
const PAYLOAD: usize = 1 << 20;
/// Whole-run limit (boot ~20 s on a PVM host, then the transfers).
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// A busybox root (resources/guest/build-rootfs.sh) plus the static vsock
/// helper.
fn build_rootfs(dir: &Path) -> Result<(), String> {
    common::build_busybox_root(dir);
    common::build_static_helper("vsock_helper", &dir.join("bin/vsock-helper"))
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The helper's xorshift64 byte stream.
fn generate(seed: u64, n: usize) -> Vec<u8> {
    let mut x = if seed == 0 { 1 } else { seed };
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What one stream's exchange measured.
#[derive(Debug)]
struct Exchange {
    to_guest: Duration,
    from_guest: Duration,
}

fn read_line(r: &mut BufReader<UnixStream>) -> String {
    let mut line = String::new();
    r.read_line(&mut line).expect("reading a line");
    line
}

/// Everything `from` yields until end of file; a read error fails the test.
fn read_all(mut from: impl Read, what: &str) -> Vec<u8> {
    let mut all = Vec::new();
    from.read_to_end(&mut all)
        .unwrap_or_else(|e| panic!("reading {what}: {e}"));
    all
}

/// Drives the guest helper over `stream`: pings, 1 MiB each way, bye.
fn exchange(stream: UnixStream, seed: u64) -> Exchange {
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    for i in 0..3 {
        w.write_all(format!("PING {seed}-{i}\n").as_bytes())
            .unwrap();
        assert_eq!(read_line(&mut r), format!("PONG {seed}-{i}\n"));
    }

    let data = generate(seed, PAYLOAD);
    let start = Instant::now();
    w.write_all(format!("RECV {PAYLOAD}\n").as_bytes()).unwrap();
    w.write_all(&data).unwrap();
    let line = read_line(&mut r);
    let to_guest = start.elapsed();
    assert_eq!(
        line,
        format!("SUM {:016x}\n", fnv(&data)),
        "host->guest payload"
    );

    let start = Instant::now();
    w.write_all(format!("SEND {PAYLOAD} {}\n", seed + 1).as_bytes())
        .unwrap();
    let mut got = vec![0u8; PAYLOAD];
    r.read_exact(&mut got).unwrap();
    let from_guest = start.elapsed();
    let line = read_line(&mut r);
    assert_eq!(
        line,
        format!("SUM {:016x}\n", fnv(&got)),
        "guest's own checksum"
    );
    assert!(
        got == generate(seed + 1, PAYLOAD),
        "guest->host payload differs"
    );

    w.write_all(b"BYE\n").unwrap();
    // The guest closes its end after BYE: a clean end of file, nothing more.
    let rest = read_all(r, "the stream after BYE");
    assert!(rest.is_empty(), "bytes after BYE: {rest:?}");
    Exchange {
        to_guest,
        from_guest,
    }
}

/// Connects through the main socket to the guest's listener (which is
/// listening: the guest connects out only after it is) and returns the
/// stream and the host port kiln answered with.
fn connect_to_guest(path: &Path) -> (UnixStream, u32) {
    let mut s = UnixStream::connect(path).expect("connecting to kiln's vsock socket");
    s.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // Byte by byte: nothing after the line may be consumed here. A refusal
    // closes the stream (end of file).
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) => line.push(b[0]),
            Err(e) => panic!("reading the answer to CONNECT {GUEST_PORT}: {e}"),
        }
    }
    let port = std::str::from_utf8(&line)
        .ok()
        .and_then(|l| l.strip_prefix("OK "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("answer to CONNECT {GUEST_PORT}: {line:?}"));
    (s, port)
}

/// Waits until `fd` is readable (a listener: a connection is waiting);
/// false when `deadline` passes first.
fn wait_readable(fd: &impl AsRawFd, deadline: Instant) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `pfd` is one valid pollfd for the duration of the call and
        // the descriptor stays open (borrowed from `fd`).
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            n if n > 0 => return true,
            0 => return false,
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => panic!("poll: {}", std::io::Error::last_os_error()),
        }
    }
}

#[test]
fn vsock_and_virtio_console_with_a_linux_guest() {
    if !common::require(common::have_kvm(), "/dev/kvm")
        || !common::require(common::is_root(), "root (for the rootfs device nodes)")
        || !common::require(common::have_program("gcc"), "gcc (static guest helper)")
    {
        return;
    }
    let Some(kernel) = common::guest_kernel("vmlinux") else {
        common::require(false, "guest kernel (resources/guest/build-kernel.sh)");
        return;
    };
    let scratch = Scratch::new("vsock");
    let rootfs = scratch.path("rootfs");
    if let Err(e) = build_rootfs(&rootfs) {
        common::require(false, &format!("guest rootfs: {e}"));
        return;
    }
    // Socket paths must stay short (108 bytes): a directory of this run's
    // own in the system temp directory, removed on drop.
    let sockets = Scratch::new_in(&std::env::temp_dir(), "vsock-sockets");
    let path = sockets.path("v.sock");
    let _vm = common::one_vm();
    let host_port_path = format!("{}_{HOST_PORT}", path.display());
    let host_listener = UnixListener::bind(&host_port_path).unwrap();
    // Jailed, kiln runs as an unprivileged uid: it must be able to create
    // and remove its socket there and to connect to this one.
    common::hand_to_jail(&sockets.0);
    common::hand_to_jail(std::path::Path::new(&host_port_path));

    // The guest connects out only once its listener listens, and the host
    // connects in only once the guest's connection has arrived: no retries.
    // The classic path still runs the command with -e, -w, --user and
    // --hostname (init sets it from the exec spec).
    let script = format!(
        "echo \"command-env=$KILN_CLASSIC cwd=$(pwd) ids=$(id -u):$(id -g) host=$(hostname)\"; \
         echo \"active=$(cat /sys/class/tty/console/active)\"; \
         sed 's/^/consoles: /' /proc/consoles; \
         echo hvc-marker=$((6*7)); \
         echo 'Kernel panic - not syncing: printed by the command'; \
         vsock-helper listen {GUEST_PORT} > /tmp/listen.log 2>&1 & \
         until grep -q listening /tmp/listen.log; do :; done; \
         vsock-helper connect 2 {HOST_PORT}; echo connect-status=$?; \
         wait $!; echo listen-status=$?; cat /tmp/listen.log"
    );
    let started = Instant::now();
    let mut child = common::kiln_cli()
        .args(["run", "--kernel"])
        .arg(&kernel)
        .arg("--rootfs")
        .arg(&rootfs)
        .args(["--console", "virtio", "--vsock"])
        .arg(format!("cid={CID},socket={}", path.display()))
        .args(["--timeout", &format!("{}s", RUN_TIMEOUT.as_secs())])
        .args([
            "-e",
            "KILN_CLASSIC=set by -e",
            "-w",
            "/tmp",
            "--user",
            "1000:1001",
            "--hostname",
            "classic-host",
        ])
        .args(["--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kiln");
    let stdout = child.stdout.take().unwrap();
    let output = std::thread::spawn(move || read_all(stdout, "kiln's stdout"));
    let stderr = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || read_all(stderr, "kiln's stderr"));
    let deadline = Instant::now() + RUN_TIMEOUT;

    // The guest connects to host port 5678.
    let (guest_listens, listening) = std::sync::mpsc::channel();
    let from_guest = std::thread::spawn(move || {
        let connected = wait_readable(&host_listener, deadline);
        let _ = guest_listens.send(connected);
        assert!(connected, "the guest never connected");
        let (s, _) = host_listener.accept().expect("accepting the guest");
        let accepted = started.elapsed();
        (accepted, exchange(s, 100))
    });
    // The host connects to guest port 1234, whose listener is up by then.
    let to_guest = {
        let path = path.clone();
        std::thread::spawn(move || {
            if !listening.recv().unwrap_or(false) {
                panic!("no guest connection: not connecting to the guest either");
            }
            let (s, port) = connect_to_guest(&path);
            assert!(port >= 1024, "host port {port}");
            exchange(s, 200)
        })
    };
    let from_guest = from_guest.join();
    let to_guest = to_guest.join();
    if from_guest.is_err() || to_guest.is_err() {
        // Stop the guest so its output can be shown.
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let total = started.elapsed();
    let out = String::from_utf8_lossy(&output.join().unwrap()).to_string();
    let err = String::from_utf8_lossy(&errors.join().unwrap()).into_owned();
    eprintln!("--- guest output ---\n{out}--- kiln stderr ---\n{err}---");
    let (accepted, guest_initiated) = from_guest.expect("guest-initiated stream");
    let host_initiated = to_guest.expect("host-initiated stream");
    eprintln!(
        "guest connection accepted after {accepted:?}; \
         guest-initiated {guest_initiated:?}; host-initiated {host_initiated:?}; run {total:?}"
    );
    for (name, x) in [
        ("guest-initiated", &guest_initiated),
        ("host-initiated", &host_initiated),
    ] {
        let mib_s = |d: Duration| PAYLOAD as f64 / (1 << 20) as f64 / d.as_secs_f64();
        eprintln!(
            "{name}: host->guest {:.2} MiB/s, guest->host {:.2} MiB/s",
            mib_s(x.to_guest),
            mib_s(x.from_guest)
        );
    }
    // The command printed a kernel panic line on the console kiln scans:
    // the status still comes from the control page.
    assert!(status.success(), "kiln exited with {status}");

    let value = |key: &str| {
        out.lines()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(key))
            .map(str::to_string)
    };
    assert_eq!(
        value("command-env=").as_deref(),
        Some("set by -e cwd=/tmp ids=1000:1001 host=classic-host"),
        "-e, -w, --user and --hostname on the --vsock path"
    );
    // hvc0 is /dev/console and what the command printed came through it.
    let active = value("active=").expect("console list");
    assert!(active.split_whitespace().any(|c| c == "hvc0"), "{active}");
    let hvc_line = out
        .lines()
        .find(|l| l.starts_with("consoles: hvc0"))
        .expect("hvc0 in /proc/consoles");
    assert!(
        hvc_line.contains('C'),
        "hvc0 is not the preferred console: {hvc_line}"
    );
    assert_eq!(value("hvc-marker=").as_deref(), Some("42"));
    assert_eq!(value("connect-status=").as_deref(), Some("0"));
    assert_eq!(value("listen-status=").as_deref(), Some("0"));
    assert!(out.contains(&format!("vsock-helper: listening on {GUEST_PORT}")));
}

/// Bytes the command writes to the virtio console in the exit-count test.
const CONSOLE_BULK: usize = 256 << 10;

/// `--console virtio` is "far fewer exits for bulk output": through the
/// library (its run report counts the VM's PIO and MMIO exits, boot
/// included), `cat` writes 256 KiB to hvc0, which must arrive intact in
/// fewer than one exit per 256 bytes (measured on PVM: 153 exits, 79 of
/// them the boot's). The serial console costs at
/// least one exit per byte (an `outb` each), so a console that fell back to
/// the UART fails here. (The file is written first so that `cat` writes
/// big chunks, as bulk output does; `yes | head` writes a line at a time.)
#[test]
fn virtio_console_carries_bulk_output_in_few_exits() {
    if !common::require(common::have_kvm(), "/dev/kvm") {
        return;
    }
    let Some(kernel) = common::guest_kernel("vmlinux") else {
        common::require(false, "guest kernel (resources/guest/build-kernel.sh)");
        return;
    };
    let scratch = Scratch::new("console-exits");
    let root = scratch.path("rootfs");
    common::build_busybox_root(&root);
    const LINE: &str = "kiln virtio console bulk line 0123456789abcdefghijklmnopqrstuvwxyz";
    let mut config = VmConfig::new(kernel);
    config.rootfs = Some(root);
    config.console = ConsoleKind::Virtio;
    config.timeout = Some(RUN_TIMEOUT);
    let script = format!("yes '{LINE}' | head -c {CONSOLE_BULK} > /tmp/bulk && cat /tmp/bulk");
    config.command.argv = ["sh", "-c", &script].map(Into::into).to_vec();

    let _vm = common::one_vm();
    let started = Instant::now();
    let (report, output) = common::run_guest(&config, None);
    let exits = report.exits.pio + report.exits.mmio;
    eprintln!(
        "{CONSOLE_BULK} bytes through hvc0: {:?}, exits {:?} ({exits} PIO+MMIO), run {:?}",
        report.outcome,
        report.exits,
        started.elapsed()
    );
    assert_eq!(report.outcome, VmOutcome::Exited(0));
    let expected: Vec<u8> = format!("{LINE}\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(CONSOLE_BULK)
        .collect();
    let start = output
        .windows(LINE.len())
        .position(|w| w == LINE.as_bytes())
        .expect("the bulk output on the console");
    assert!(
        output[start..].starts_with(&expected),
        "the console output differs from what the command wrote"
    );
    assert!(
        exits * 256 < CONSOLE_BULK as u64,
        "{exits} exits for {CONSOLE_BULK} bytes of console output"
    );
}
