//! virtio-vsock and virtio-console with a real Linux guest, in one boot:
//! `--console virtio` makes hvc0 the guest's console (its output must reach
//! kiln's stdout), and `--vsock` carries streams both ways: the test connects
//! to a guest listener through the main socket (`CONNECT 1234`) and accepts
//! the guest's connection to host port 5678 on `PATH_5678`. Each stream
//! exchanges a few messages and a 1 MiB payload in each direction, checked
//! with FNV-1a checksums computed on both sides.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CID: u32 = 3;
const GUEST_PORT: u32 = 1234;
const HOST_PORT: u32 = 5678;
const PAYLOAD: usize = 1 << 20;
/// Whole-run limit (boot ~20 s on a PVM host, then the transfers).
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

fn static_busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A busybox root plus the static vsock helper. Uses the project's
/// `build-rootfs.sh` when present, else a minimal root of its own.
fn build_rootfs(dir: &Path) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("bin")).map_err(|e| e.to_string())?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/guest/build-rootfs.sh");
    if script.exists() {
        let st = Command::new(&script)
            .arg(dir)
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("{} failed", script.display()));
        }
    } else {
        let busybox = static_busybox().ok_or("no busybox")?;
        std::fs::copy(&busybox, dir.join("bin/busybox")).map_err(|e| e.to_string())?;
        for applet in ["sh", "cat", "echo", "sed", "sleep"] {
            std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet))
                .map_err(|e| e.to_string())?;
        }
        for d in ["dev", "proc", "sys", "tmp"] {
            std::fs::create_dir_all(dir.join(d)).map_err(|e| e.to_string())?;
        }
    }
    common::build_static_helper("vsock_helper", &dir.join("bin/vsock-helper"))?;
    Ok(())
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
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    assert!(rest.is_empty());
    Exchange {
        to_guest,
        from_guest,
    }
}

/// Connects through the main socket to the guest's listener, retrying
/// until the guest listens (the device closes the stream on a refusal).
fn connect_to_guest(path: &Path, deadline: Instant) -> (UnixStream, u32, usize) {
    let mut attempts = 0;
    loop {
        attempts += 1;
        assert!(
            Instant::now() < deadline,
            "guest never accepted on port {GUEST_PORT}"
        );
        let Ok(mut s) = UnixStream::connect(path) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        s.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        // Byte by byte: nothing after the line may be consumed here.
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.last() != Some(&b'\n') {
            match s.read(&mut b) {
                Ok(1) => line.push(b[0]),
                _ => break,
            }
        }
        if let Some(port) = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| l.strip_prefix("OK "))
            .and_then(|p| p.trim().parse().ok())
        {
            return (s, port, attempts);
        }
        assert!(line.is_empty(), "unexpected answer {line:?}");
        // Each refusal costs the (emulated) guest kernel work: do not hurry it.
        std::thread::sleep(Duration::from_secs(1));
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
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vsock-test");
    let rootfs = tmp.join("rootfs");
    if let Err(e) = build_rootfs(&rootfs) {
        common::require(false, &format!("guest rootfs: {e}"));
        return;
    }
    let sock_dir = std::env::temp_dir().join(format!("kiln-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&sock_dir).unwrap();
    let path = sock_dir.join("v.sock");
    let host_listener = UnixListener::bind(format!("{}_{HOST_PORT}", path.display())).unwrap();

    let script = format!(
        "echo \"active=$(cat /sys/class/tty/console/active)\"; \
         sed 's/^/consoles: /' /proc/consoles; \
         echo hvc-marker=$((6*7)); \
         vsock-helper listen {GUEST_PORT} > /tmp/listen.log 2>&1 & \
         vsock-helper connect 2 {HOST_PORT}; echo connect-status=$?; \
         wait $!; echo listen-status=$?; cat /tmp/listen.log"
    );
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["run", "--kernel"])
        .arg(&kernel)
        .arg("--rootfs")
        .arg(&rootfs)
        .args(["--console", "virtio", "--vsock"])
        .arg(format!("cid={CID},socket={}", path.display()))
        .args(["--timeout", &format!("{}s", RUN_TIMEOUT.as_secs())])
        .args(["--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kiln");
    let mut stdout = child.stdout.take().unwrap();
    let output = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = stdout.read_to_end(&mut all);
        all
    });
    let mut stderr = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all);
        all
    });
    let deadline = Instant::now() + RUN_TIMEOUT;

    // The guest connects to host port 5678.
    let from_guest = std::thread::spawn(move || {
        host_listener.set_nonblocking(true).unwrap();
        let s = loop {
            match host_listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the guest never connected");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        let accepted = started.elapsed();
        (accepted, exchange(s, 100))
    });
    // The host connects to guest port 1234.
    let to_guest = {
        let path = path.clone();
        std::thread::spawn(move || {
            let (s, port, attempts) = connect_to_guest(&path, deadline);
            assert!(port >= 1024, "host port {port}");
            (attempts, exchange(s, 200))
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
    let err = errors.join().unwrap();
    let _ = std::fs::remove_dir_all(&sock_dir);
    eprintln!("--- guest output ---\n{out}--- kiln stderr ---\n{err}---");
    let (accepted, guest_initiated) = from_guest.expect("guest-initiated stream");
    let (attempts, host_initiated) = to_guest.expect("host-initiated stream");
    eprintln!(
        "guest connection accepted after {accepted:?}; host connect attempts: {attempts}; \
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
    assert!(status.success(), "kiln exited with {status}");

    let value = |key: &str| {
        out.lines()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(key))
            .map(str::to_string)
    };
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
