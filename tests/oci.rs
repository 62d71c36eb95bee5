//! kiln-oci, the OCI runtime: real podman with kiln-oci as its runtime,
//! each case compared with the same case under runc (the baseline), and
//! the command line's bad-input errors, which need no VM.
//!
//! Every `podman run` with kiln-oci boots a VM (30-60 s on the PVM hosts),
//! so the cases are few and each covers several claims. Podman runs with a
//! private --root, --runroot and --tmpdir under a scratch directory, so
//! nothing of the host's podman state is touched; kiln-oci keeps its state
//! in its default root (/run/kiln-oci): podman's clean-up process runs
//! `delete` without the runtime flags, so a `--runtime-flag root=` would
//! not reach it (see the README's "OCI runtime").

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::engine::{busybox_root_tar, read_published_port, seen, text, Runtime, Seen};
use common::{guest_kernel, is_root, require, Netns, Scratch};
use kiln::oci::state::{self, ContainerDir, Saved};

/// How long a guest may take to boot and run a command here.
const BOOT_LIMIT: Duration = Duration::from_secs(600);
/// Far above one step of a running container (a command, a resize).
const STEP_LIMIT: Duration = Duration::from_secs(300);
/// What podman's containers need on these hosts (../shared/ENVIRONMENT.md).
const RUN_OPTIONS: [&str; 4] = [
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=32768:32768",
];
/// The port the detached case publishes (`-p PUBLISHED_PORT:80`).
const PUBLISHED_PORT: u16 = 8080;
/// What the detached container serves on its port 80.
const SERVED: &str = "served-by-the-container";
const IMAGE: &str = "localhost/kiln-oci-busybox";

fn kiln_oci() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln-oci"));
    cmd.env_remove("KILN_OCI_CONFIG").stdin(Stdio::null());
    cmd
}

// ---- Bad input: one-line errors, non-zero status, no state left, JSON log.

/// A state root and bundle of the test's own.
struct Cli {
    scratch: Scratch,
}

impl Cli {
    fn new(tag: &str) -> Self {
        Self {
            scratch: Scratch::new(tag),
        }
    }

    fn root(&self) -> PathBuf {
        self.scratch.path("state")
    }

    fn log(&self) -> PathBuf {
        self.scratch.path("log.json")
    }

    /// kiln-oci with this test's root and a JSON log.
    fn run(&self, args: &[&str]) -> Output {
        kiln_oci()
            .arg("--root")
            .arg(self.root())
            .arg("--log")
            .arg(self.log())
            .args(["--log-format", "json"])
            .args(args)
            .output()
            .expect("running kiln-oci")
    }

    /// A bundle with `config` as its config.json and a root directory.
    fn bundle(&self, config: Option<&str>) -> PathBuf {
        let bundle = self.scratch.path("bundle");
        fs::create_dir_all(bundle.join("rootfs")).unwrap();
        if let Some(config) = config {
            fs::write(bundle.join("config.json"), config).unwrap();
        }
        bundle
    }

    /// `create c1` of `bundle` with `settings` as kiln-oci's configuration
    /// file (not /etc/kiln's).
    fn create_with_settings(&self, bundle: &Path, settings: &str) -> Output {
        let config = self.scratch.path("oci.toml");
        fs::write(&config, settings).unwrap();
        self.run(&[
            "--config",
            config.to_str().unwrap(),
            "create",
            "--bundle",
            bundle.to_str().unwrap(),
            "c1",
        ])
    }

    /// Asserts `out` failed with one line on stderr holding `expected`, that
    /// the JSON log's last entry is that error, and that no container
    /// state was left.
    fn assert_fails(&self, out: &Output, expected: &str) {
        let stderr = text(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.starts_with("kiln-oci: "), "{stderr}");
        assert!(stderr.contains(expected), "expected '{expected}': {stderr}");
        let log = fs::read_to_string(self.log()).expect("the --log file");
        let last = log.lines().last().expect("a log entry");
        let entry: serde_json::Value = serde_json::from_str(last).expect("a JSON log line");
        assert_eq!(entry["level"], "error", "{last}");
        assert!(entry["msg"].as_str().unwrap().contains(expected), "{last}");
        assert!(
            entry["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{last}"
        );
        let left: Vec<_> = fs::read_dir(self.root())
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "state left behind: {left:?}");
    }
}

/// A minimal valid config.json (process `sh`, root `rootfs`).
fn config_json(version: &str, terminal: bool) -> String {
    format!(
        r#"{{"ociVersion":"{version}","process":{{"terminal":{terminal},"user":{{"uid":0,"gid":0}},"args":["sh"],"cwd":"/"}},"root":{{"path":"rootfs"}}}}"#
    )
}

#[test]
fn create_refuses_a_bundle_without_config_json() {
    let cli = Cli::new("oci-noconfig");
    let bundle = cli.bundle(None);
    let out = cli.run(&["create", "--bundle", bundle.to_str().unwrap(), "c1"]);
    cli.assert_fails(&out, "config.json not found");
}

#[test]
fn create_refuses_a_malformed_config_json() {
    let cli = Cli::new("oci-malformed");
    let bundle = cli.bundle(Some("{\"ociVersion\": \"1.0.2\", \"process\": "));
    let out = cli.run(&["create", "--bundle", bundle.to_str().unwrap(), "c1"]);
    cli.assert_fails(&out, "is not a valid OCI config");
}

#[test]
fn create_refuses_another_oci_version() {
    let cli = Cli::new("oci-version");
    let bundle = cli.bundle(Some(&config_json("2.0.0", false)));
    let out = cli.run(&["create", "--bundle", bundle.to_str().unwrap(), "c1"]);
    cli.assert_fails(&out, "unsupported OCI version '2.0.0'");
}

#[test]
fn runc_commands_kiln_oci_lacks_are_one_line_errors() {
    let cli = Cli::new("oci-unsupported");
    for (args, expected) in [
        (
            &["update", "--memory", "1g", "c1"][..],
            "update: not supported",
        ),
        (
            &["checkpoint", "--image-path", "/x", "c1"],
            "checkpoint and restore: not supported",
        ),
        (
            &["restore", "-d", "c1"],
            "checkpoint and restore: not supported",
        ),
    ] {
        let out = cli.run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        cli.assert_fails(&out, expected);
    }
}

#[test]
fn create_without_a_kernel_says_how_to_configure_one() {
    let cli = Cli::new("oci-nokernel");
    let bundle = cli.bundle(Some(&config_json("1.0.2-dev", false)));
    // An empty configuration file: no kernel anywhere.
    let out = cli.create_with_settings(&bundle, "");
    cli.assert_fails(&out, "no guest kernel configured: pass --kernel PATH");
}

#[test]
fn a_packed_container_root_refuses_directory_volumes() {
    let cli = Cli::new("oci-packed");
    let volume = cli.scratch.path("volume");
    fs::create_dir_all(&volume).unwrap();
    let config = config_json("1.0.2", false).replace(
        r#""root":{"path":"rootfs"}"#,
        &format!(
            r#""root":{{"path":"rootfs"}},"mounts":[{{"destination":"/data","type":"bind","source":"{}","options":["rbind"]}}]"#,
            volume.display()
        ),
    );
    let bundle = cli.bundle(Some(&config));
    let kernel = cli.scratch.path("vmlinux");
    fs::write(&kernel, b"not booted").unwrap();
    let settings = format!(
        "kernel = \"{}\"\ncontainer_root = \"packed\"\n",
        kernel.display()
    );
    let out = cli.create_with_settings(&bundle, &settings);
    cli.assert_fails(&out, "volume /data needs a shared container root");
}

#[test]
fn create_of_a_terminal_without_a_console_socket_is_refused() {
    let cli = Cli::new("oci-terminal");
    let bundle = cli.bundle(Some(&config_json("1.1.0", true)));
    let out = cli.run(&["create", "--bundle", bundle.to_str().unwrap(), "c1"]);
    cli.assert_fails(
        &out,
        "cannot allocate a terminal without --console-socket (process.terminal is true)",
    );
}

#[test]
fn an_unknown_id_is_refused_by_every_command() {
    let cli = Cli::new("oci-unknown");
    for args in [
        &["start", "nosuch"][..],
        &["state", "nosuch"],
        &["kill", "nosuch", "TERM"],
        &["delete", "nosuch"],
        &["exec", "nosuch", "true"],
        &["ps", "nosuch"],
    ] {
        let out = cli.run(args);
        cli.assert_fails(&out, "container \"nosuch\" does not exist");
    }
    // runc: deleting what is gone succeeds with --force.
    assert!(cli.run(&["delete", "--force", "nosuch"]).status.success());
    let out = cli.run(&["state", "../escape"]);
    cli.assert_fails(&out, "invalid container id");
}

/// State made by the library's own types (no VM): a container whose
/// monitor is this test process (alive, with its start time) or a process
/// that has ended.
fn saved(id: &str, pid: i32, started: bool) -> Saved {
    let start = state::process_start(pid).map_or(1, |(s, _)| s);
    Saved {
        id: id.into(),
        bundle: "/nonexistent".into(),
        rootfs: "/nonexistent/rootfs".into(),
        pid,
        pid_start: start,
        created: state::rfc3339_now(),
        annotations: Default::default(),
        started,
        kernel: "/nonexistent/vmlinux".into(),
        mem_bytes: 256 << 20,
        vcpus: 1,
        paused: false,
        container_root: Default::default(),
    }
}

/// What a paused container (its state says so; the monitor here is this
/// test process) refuses and reports, and what `pause`/`resume` refuse by
/// state, all before any monitor is asked.
#[test]
fn pause_and_resume_follow_the_state_as_runc() {
    let cli = Cli::new("oci-paused");
    let me = std::process::id() as i32;
    let dir = ContainerDir::create(&cli.root(), "paused").unwrap();
    dir.write(&Saved {
        paused: true,
        ..saved("paused", me, true)
    })
    .unwrap();
    drop(dir);
    let state: serde_json::Value =
        serde_json::from_slice(&cli.run(&["state", "paused"]).stdout).unwrap();
    assert_eq!(state["status"], "paused");
    let refused = |args: &[&str], expected: &str| {
        let out = cli.run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(
            text(&out.stderr),
            format!("kiln-oci: {expected}\n"),
            "{args:?}"
        );
    };
    refused(&["pause", "paused"], "container already paused");
    refused(
        &["exec", "paused", "true"],
        "cannot exec in a paused container",
    );
    refused(
        &["start", "paused"],
        "cannot start an already running container",
    );
    refused(
        &["delete", "paused"],
        "cannot delete container paused that is not stopped: paused",
    );
    let dir = ContainerDir::create(&cli.root(), "running").unwrap();
    dir.write(&saved("running", me, true)).unwrap();
    drop(dir);
    refused(&["resume", "running"], "container not paused");
    let dir = ContainerDir::create(&cli.root(), "created").unwrap();
    dir.write(&saved("created", me, false)).unwrap();
    drop(dir);
    refused(&["pause", "created"], "container not running");
}

#[test]
fn start_twice_create_in_use_and_start_of_a_stopped_container_are_refused() {
    let cli = Cli::new("oci-states");
    let me = std::process::id() as i32;
    let dir = ContainerDir::create(&cli.root(), "running").unwrap();
    dir.write(&saved("running", me, true)).unwrap();
    drop(dir);
    let out = cli.run(&["start", "running"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "kiln-oci: cannot start an already running container\n"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&cli.run(&["state", "running"]).stdout).unwrap();
    assert_eq!(
        (state["status"].as_str(), state["pid"].as_i64()),
        (Some("running"), Some(me as i64))
    );

    // A monitor that has ended: a child reaped before its state is written.
    let mut child = Command::new("true").spawn().unwrap();
    let gone = child.id() as i32;
    child.wait().unwrap();
    let dir = ContainerDir::create(&cli.root(), "stopped").unwrap();
    dir.write(&saved("stopped", gone, false)).unwrap();
    drop(dir);
    let out = cli.run(&["start", "stopped"]);
    assert_eq!(
        text(&out.stderr),
        "kiln-oci: cannot start a container that has stopped\n"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&cli.run(&["state", "stopped"]).stdout).unwrap();
    assert_eq!(
        (state["status"].as_str(), state["pid"].as_i64()),
        (Some("stopped"), Some(0))
    );

    // An id in use, before anything of the bundle is looked at past its
    // config: the kernel is checked first, then the id.
    let bundle = cli.bundle(Some(&config_json("1.0.2", false)));
    let kernel = cli.scratch.path("vmlinux");
    fs::write(&kernel, b"not booted").unwrap();
    let out = cli.run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "create",
        "--bundle",
        bundle.to_str().unwrap(),
        "running",
    ]);
    assert_eq!(
        text(&out.stderr),
        "kiln-oci: container with id exists: running\n"
    );
    assert_ne!(out.status.code(), Some(0));
    // The existing container's state is untouched.
    let still = ContainerDir::open(&cli.root(), "running")
        .unwrap()
        .read()
        .unwrap();
    assert_eq!((still.pid, still.started), (me, true));
    // A running container is not deleted without --force; a stopped one is.
    let out = cli.run(&["delete", "running"]);
    assert!(
        text(&out.stderr).contains("that is not stopped: running"),
        "{out:?}"
    );
    assert!(cli.run(&["delete", "stopped"]).status.success());
    assert!(!cli.root().join("stopped").exists());
}

// ---- Real podman, kiln-oci against runc.

/// A private podman (its own storage, run and temporary directories) with
/// the busybox image imported. Its containers have no network
/// (`--network none`), or, with a network namespace of the test's own,
/// podman's default bridge network made inside that namespace (podman runs
/// there: its bridge, veths and iptables rules live and die with it).
struct Podman {
    scratch: Scratch,
    runtime: Runtime,
    /// Dropped after the containers (fields drop after `Drop::drop`).
    netns: Option<Netns>,
}

impl Podman {
    fn new(runtime: Runtime) -> Self {
        Self::new_with(runtime, None)
    }

    /// A podman that runs inside `netns`, its containers on its default
    /// network.
    fn in_netns(runtime: Runtime, netns: Netns) -> Self {
        Self::new_with(runtime, Some(netns))
    }

    fn new_with(runtime: Runtime, netns: Option<Netns>) -> Self {
        // Short paths: conmon's attach socket lives under --runroot.
        let scratch = Scratch::new_in(Path::new("/tmp"), "oci");
        let podman = Self {
            scratch,
            runtime,
            netns,
        };
        let tar = podman.scratch.path("root.tar");
        busybox_root_tar(&tar);
        let out = podman.cmd(&["import", tar.to_str().unwrap(), IMAGE]);
        assert!(out.status.success(), "podman import: {}", text(&out.stderr));
        podman
    }

    fn command(&self) -> Command {
        let mut cmd = match &self.netns {
            None => Command::new("podman"),
            Some(netns) => {
                // Only the network namespace: podman's mounts stay where
                // its other calls (and the host) see them.
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net=/run/netns/{}", netns.name()))
                    .arg("podman");
                cmd
            }
        };
        cmd.arg("--root")
            .arg(self.scratch.path("storage"))
            .arg("--runroot")
            .arg(self.scratch.path("run"))
            .arg("--tmpdir")
            .arg(self.scratch.path("tmp"))
            .args(["--cgroup-manager=cgroupfs", "--events-backend=file"]);
        match self.runtime {
            Runtime::Runc => cmd.args(["--runtime", "runc"]),
            Runtime::Kiln => {
                let kernel = guest_kernel("vmlinux").unwrap();
                let kernel = fs::canonicalize(kernel).unwrap();
                cmd.args(["--runtime", env!("CARGO_BIN_EXE_kiln-oci")])
                    .arg("--runtime-flag")
                    .arg(format!("kernel={}", kernel.display()))
            }
        };
        cmd
    }

    fn cmd(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running podman")
    }

    /// `podman run OPTIONS RUN_OPTIONS IMAGE ARGS`, with `stdin`.
    fn run(&self, options: &[&str], args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = self.command();
        cmd.arg("run").args(options).args(RUN_OPTIONS);
        if self.netns.is_none() {
            cmd.args(["--network", "none"]);
        }
        cmd.arg(IMAGE).args(args);
        let Some(input) = stdin else {
            return cmd.stdin(Stdio::null()).output().expect("podman run");
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("podman run");
        let mut pipe = child.stdin.take().unwrap();
        let input = input.to_vec();
        let feeder = std::thread::spawn(move || {
            use std::io::Write;
            let _ = pipe.write_all(&input);
        });
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap();
        out
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers a failed test left: removed (their VMs end with them),
        // and the storage unmounted before the scratch directory goes.
        let _ = self.cmd(&["rm", "-af", "-t", "0"]);
        let _ = self.cmd(&["system", "reset", "-f"]);
    }
}

fn podman_prerequisites() -> bool {
    common::real_kernel_prerequisites(&["podman", "runc", "conmon", "tar"])
        && require(
            kiln::share::find_virtiofsd(None).is_ok(),
            "virtiofsd not installed (run resources/setup.sh)",
        )
        && require(is_root(), "not root")
}

/// One `podman run --rm -i` per runtime: the command's output, its exit
/// status, the engine's stdin, `-e`, `-w`, `-u UID:GID`, `--group-add`, a
/// `--ulimit` beside the pinned ones, a `--tmpfs` with a size and mode
/// (its /proc/mounts line), and its stderr.
#[test]
fn podman_run_rm_interactive_with_env_workdir_user_and_the_command_status_as_with_runc() {
    if !podman_prerequisites() {
        return;
    }
    let _one = common::one_vm();
    let script = r#"echo hi; echo "$FOO $(pwd) $(id -u):$(id -g)"; id -G;
        echo "core $(ulimit -c) $(ulimit -Hc)"; grep -E 'core|open files|processes' /proc/self/limits;
        grep ' /scratch ' /proc/mounts; cat; echo to-stderr >&2; exit 3"#;
    let case = |runtime| {
        let podman = Podman::new(runtime);
        let options = [
            "--rm",
            "-i",
            "-e",
            "FOO=bar",
            "-w",
            "/tmp",
            "-u",
            "1000:1000",
            "--group-add",
            "4242",
            "--ulimit",
            "core=1234:5678",
            "--tmpfs",
            "/scratch:size=1m,mode=1770",
        ];
        let out = podman.run(&options, &["sh", "-c", script], Some(b"line1\nline2\n"));
        assert!(
            text(&out.stderr).contains("to-stderr\n"),
            "{runtime:?}: {out:?}"
        );
        seen(&out)
    };
    let runc = case(Runtime::Runc);
    let kiln = case(Runtime::Kiln);
    // busybox's ulimit counts 512-byte blocks; /proc/self/limits bytes.
    let limits = [
        "Max core file size        1234                 5678                 bytes     ",
        "Max processes             32768                32768                processes ",
        "Max open files            20000                20000                files     ",
    ];
    let mut runc_lines = runc.stdout.lines();
    let expected_start = ["hi", "bar /tmp 1000:1000", "1000 4242", "core 2 11"]
        .into_iter()
        .chain(limits);
    for line in expected_start {
        assert_eq!(runc_lines.next(), Some(line), "the runc baseline: {runc:?}");
    }
    let mount = runc_lines.next().unwrap_or_default();
    // podman's tmpfs default is rw,nosuid,nodev; the mode is not tmpfs's
    // default (1777), so it shows.
    assert!(
        mount.starts_with("tmpfs /scratch tmpfs rw,nosuid,nodev,")
            && mount.contains("size=1024k,mode=1770"),
        "the runc baseline: {runc:?}"
    );
    assert_eq!(
        runc_lines.collect::<Vec<_>>(),
        ["line1", "line2"],
        "the runc baseline"
    );
    assert_eq!(runc.status, Some(3), "the runc baseline");
    assert_eq!(kiln, runc, "kiln-oci against runc");
}

/// A pty of the test's own, as a person's terminal: its master read by
/// the test, its slave podman's stdin, stdout and stderr.
struct TestTerminal {
    master: fs::File,
    slave: fs::File,
}

impl TestTerminal {
    fn open(rows: u16, cols: u16) -> Self {
        use std::os::fd::FromRawFd;
        let (mut master, mut slave) = (-1, -1);
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes the two descriptors; the name pointer
        // and termios are null (not wanted), `size` a valid winsize.
        let r = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty just returned these descriptors, owned here alone.
        unsafe {
            Self {
                master: fs::File::from_raw_fd(master),
                slave: fs::File::from_raw_fd(slave),
            }
        }
    }

    /// Runs `cmd` on the terminal; returns everything it showed (until
    /// every holder of the slave has closed it) and its status. Fails
    /// past `BOOT_LIMIT`.
    fn run(self, mut cmd: Command) -> (String, Option<i32>) {
        use std::io::Read;
        let stdio = || Stdio::from(self.slave.try_clone().unwrap());
        let mut child = cmd
            .stdin(stdio())
            .stdout(stdio())
            .stderr(stdio())
            .spawn()
            .expect("spawning on the terminal");
        // The command holds its copies of the slave until dropped.
        drop(cmd);
        drop(self.slave);
        let (tx, rx) = std::sync::mpsc::channel();
        let mut master = self.master;
        std::thread::spawn(move || {
            let mut shown = Vec::new();
            let mut buf = [0u8; 4096];
            // EIO once the last slave descriptor is closed.
            while let Ok(n @ 1..) = master.read(&mut buf) {
                shown.extend_from_slice(&buf[..n]);
            }
            let _ = tx.send(shown);
        });
        let shown = match rx.recv_timeout(BOOT_LIMIT) {
            Ok(shown) => text(&shown),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the terminal was still open after {BOOT_LIMIT:?}");
            }
        };
        let status = child.wait().unwrap().code();
        eprintln!("status {status:?}, the terminal showed:\n{shown}");
        (shown, status)
    }
}

/// Whether `line` (what `tty` printed) is /dev/pts/N.
fn names_a_pty(line: &str) -> bool {
    line.strip_prefix("/dev/pts/")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// What `podman exec -it` showed on the test's terminal: whether `tty`
/// named a pty, the sizes `stty size` printed (at the start, then after
/// the test resized its terminal), and the exec's status.
#[derive(Debug, PartialEq, Eq)]
struct ExecTerminal {
    pts: bool,
    sizes: Vec<String>,
    status: Option<i32>,
}

/// `podman exec -it` in the running container `c1`, on a 41x99 terminal of
/// the test's own (podman's controlling terminal, so that a resize sends
/// it SIGWINCH): the shell prints `tty` and `stty size`, then, once the
/// test has resized the terminal to 50x132, the size its trap of SIGWINCH
/// reads, and exits 9 when that size has arrived.
fn exec_it_with_a_resize(podman: &Podman) -> ExecTerminal {
    let terminal = TestTerminal::open(41, 99);
    // Quotes split the markers, so that no echo of the command line matches.
    let script = r#"tty; echo "si""ze $(stty size)"; \
        trap 's=$(stty size); echo "si""ze $s"; [ "$s" = "50 132" ] && exit 9' WINCH; \
        echo "ar""med"; while :; do sleep 1; done"#;
    let mut cmd = podman.command();
    cmd.args(["exec", "-it", "c1", "sh", "-c", script]);
    let stdio = || Stdio::from(terminal.slave.try_clone().unwrap());
    cmd.stdin(stdio()).stdout(stdio()).stderr(stdio());
    // podman is the foreground group of the slave: it gets SIGWINCH.
    common::on_controlling_terminal(&mut cmd);
    let mut child = cmd.spawn().expect("podman exec -it");
    drop(cmd);
    let TestTerminal { master, slave } = terminal;
    drop(slave);
    let mut screen = common::Screen::new(master.try_clone().unwrap());
    let started = screen.until("armed", BOOT_LIMIT);
    common::set_size(&master, 50, 132);
    let resized = screen.until("size 50 132", STEP_LIMIT);
    let status = child.wait().unwrap().code();
    eprintln!(
        "exec -it: status {status:?}, the terminal showed:\n{}",
        screen.text()
    );
    let lines: Vec<&str> = started
        .lines()
        .chain(resized.lines())
        .map(str::trim)
        .collect();
    let pts = lines.iter().any(|l| names_a_pty(l));
    let mut sizes: Vec<String> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("size "))
        .map(String::from)
        .collect();
    // The engine may set the same size again once the shell runs: one
    // line per size the shell saw.
    sizes.dedup();
    ExecTerminal { pts, sizes, status }
}

/// `podman run -it` on a terminal of the test's own, with each runtime:
/// the command's stdio is a terminal in the container (`tty`), of the
/// size of the test's (`stty size`), and its status is podman's.
#[test]
fn podman_run_it_gives_a_terminal_of_the_engines_size_as_with_runc() {
    if !podman_prerequisites() {
        return;
    }
    let _one = common::one_vm();
    let (rows, cols) = (37, 111);
    let case = |runtime| {
        let podman = Podman::new(runtime);
        let mut cmd = podman.command();
        cmd.args(["run", "--rm", "-it"])
            .args(RUN_OPTIONS)
            .args(["--network", "none", IMAGE])
            .args(["sh", "-c", "tty; stty size; exit 7"]);
        let (shown, status) = TestTerminal::open(rows, cols).run(cmd);
        let lines: Vec<&str> = shown.lines().map(str::trim).collect();
        let tty = lines.iter().find(|l| l.starts_with("/dev/")).copied();
        let is_pts = tty.is_some_and(names_a_pty);
        let size = format!("{rows} {cols}");
        (
            is_pts,
            lines.contains(&size.as_str()),
            lines.contains(&"not a tty"),
            status,
        )
    };
    let expected = (true, true, false, Some(7));
    // runc's side once failed on a loaded host with busybox's "stty:
    // standard input: No child processes" (conmon's terminal, not kiln's
    // code): the baseline, a second long, gets one more try; kiln-oci's
    // case gets none.
    let mut runc = case(Runtime::Runc);
    if runc != expected {
        eprintln!("the runc baseline gave {runc:?}; once more");
        runc = case(Runtime::Runc);
    }
    assert_eq!(runc, expected, "the runc baseline");
    assert_eq!(case(Runtime::Kiln), expected, "kiln-oci");
}

/// Waits for `path` to exist (a file the container makes in a shared
/// directory), up to `BOOT_LIMIT`.
fn wait_for_file(path: &Path) -> bool {
    wait_until(|| path.exists())
}

/// Waits for `done` to hold, up to `BOOT_LIMIT`; returns whether it did.
fn wait_until(done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + BOOT_LIMIT;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Everything a detached container shows: what it serves on its published
/// port, exec (output and status), exec -it (a terminal, resized), a
/// directory volume, diff, SIGTERM sent to the container's pid (which the
/// command traps and survives), stop (SIGTERM reaching the command's trap,
/// which exits 42), logs, the exit code, rm.
#[derive(Debug, PartialEq, Eq)]
struct Detached {
    served: String,
    exec: Seen,
    exec_it: ExecTerminal,
    diff: Vec<String>,
    stop: Option<i32>,
    logs: String,
    exit_code: String,
    rm: Option<i32>,
}

fn detached_case(runtime: Runtime) -> Detached {
    let tag = format!("oci-{}", format!("{runtime:?}").to_lowercase());
    let podman = Podman::in_netns(runtime, Netns::create(&tag, &[]));
    let shared = podman.scratch.path("shared");
    fs::create_dir_all(&shared).unwrap();
    let volume = format!("{}:/shared", shared.display());
    let publish = format!("{PUBLISHED_PORT}:80");
    // The server answers one connection; the container says it is ready
    // once port 80 listens (0050, state 0A; tcp6 where the kernel has
    // IPv6: nc listens on both there).
    let script = format!(
        "trap 'n=$((n+1)); echo got TERM $n; touch /shared/term$n; [ $n = 2 ] && exit 42' TERM; \
         echo started; \
         echo {SERVED} | nc -l -p 80 >/dev/null & \
         while ! cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -q ':0050 0*:0000 0A'; \
         do :; done; \
         touch /shared/ready; while true; do sleep 1; done"
    );
    let out = podman.run(
        &["-d", "--name", "c1", "-v", &volume, "-p", &publish],
        &["sh", "-c", &script],
        None,
    );
    assert!(out.status.success(), "{runtime:?} run -d: {out:?}");
    let id = text(&out.stdout).trim().to_string();
    // The trap is set and the server listens once the file exists (made
    // through the volume).
    assert!(
        wait_for_file(&shared.join("ready")),
        "{runtime:?}: the container never started"
    );
    // The published port, from podman's own namespace (its port mapping's
    // DNAT to the container's address, then kiln's veth -> TAP redirect).
    let served = podman
        .netns
        .as_ref()
        .unwrap()
        .on_thread(|| read_published_port(PUBLISHED_PORT, BOOT_LIMIT));
    let monitor: i32 = text(
        &podman
            .cmd(&["inspect", "c1", "--format", "{{.State.Pid}}"])
            .stdout,
    )
    .trim()
    .parse()
    .unwrap();
    let exec = seen(&podman.cmd(&[
        "exec",
        "c1",
        "sh",
        "-c",
        "echo data > /root/written.txt; cat /root/written.txt; echo in-exec; exit 5",
    ]));
    let exec_it = exec_it_with_a_resize(&podman);
    let mut diff: Vec<String> = text(&podman.cmd(&["diff", "c1"]).stdout)
        .lines()
        .map(String::from)
        .collect();
    diff.sort();
    if runtime == Runtime::Kiln {
        kiln_oci_checks_on_a_running_container(&id);
    }
    // SIGTERM to the pid the engine holds (with runc the command itself):
    // the command's trap runs and it lives on.
    // SAFETY: kill sends a signal to the container's pid; no memory involved.
    assert_eq!(unsafe { libc::kill(monitor, libc::SIGTERM) }, 0);
    // The file, or the end of the pid (a monitor killed by the signal,
    // reaped by conmon).
    let term1 = shared.join("term1");
    let proc_dir = PathBuf::from(format!("/proc/{monitor}"));
    wait_until(|| term1.exists() || !proc_dir.exists());
    assert!(
        term1.exists(),
        "{runtime:?}: SIGTERM to the container's pid {monitor} did not reach the command's trap"
    );
    let stop = podman.cmd(&["stop", "-t", "300", "c1"]).status.code();
    let logs = text(&podman.cmd(&["logs", "c1"]).stdout);
    let exit_code = text(
        &podman
            .cmd(&["inspect", "c1", "--format", "{{.State.ExitCode}}"])
            .stdout,
    );
    if runtime == Runtime::Kiln {
        // The monitor (the pid podman knows) ended with the command, the
        // VM with it.
        assert!(
            common::process_ended(monitor),
            "the monitor {monitor} still runs"
        );
    }
    let rm = podman.cmd(&["rm", "c1"]).status.code();
    if runtime == Runtime::Kiln {
        let state = Path::new(kiln::oci::cli::DEFAULT_ROOT).join(&id);
        assert!(!state.exists(), "{} left behind", state.display());
    }
    Detached {
        served,
        exec,
        exec_it,
        diff,
        stop,
        logs,
        exit_code,
        rm,
    }
}

/// kiln-oci's own commands on a container podman runs: state, start twice,
/// create with the id in use.
fn kiln_oci_checks_on_a_running_container(id: &str) {
    let out = kiln_oci().args(["state", id]).output().unwrap();
    let state: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(state["status"], "running", "{state}");
    let out = kiln_oci().args(["start", id]).output().unwrap();
    assert_eq!(
        text(&out.stderr),
        "kiln-oci: cannot start an already running container\n"
    );
    // An exec whose stdin the caller holds open past the command's end
    // leaves no thread behind in the monitor (its stdin copy ends with it).
    let monitor = state["pid"].as_i64().unwrap();
    let threads = || {
        fs::read_dir(format!("/proc/{monitor}/task"))
            .unwrap()
            .count()
    };
    let before = threads();
    let (stdin, held_open) = common::pipe();
    let out = kiln_oci()
        .args(["exec", id, "true"])
        .stdin(Stdio::from(stdin))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while threads() != before {
        assert!(
            Instant::now() < deadline,
            "the monitor has {} threads, {before} before the exec",
            threads()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(held_open);
    let bundle = state["bundle"].as_str().unwrap();
    let kernel = guest_kernel("vmlinux").unwrap();
    let out = kiln_oci()
        .arg("--kernel")
        .arg(kernel)
        .args(["create", "--bundle", bundle, id])
        .output()
        .unwrap();
    assert_eq!(
        text(&out.stderr),
        format!("kiln-oci: container with id exists: {id}\n")
    );
}

#[test]
fn podman_detached_exec_diff_stop_logs_rm_as_with_runc() {
    if !podman_prerequisites() {
        return;
    }
    let _one = common::one_vm();
    if !require(
        common::have_program("nsenter") && common::have_program("iptables"),
        "nsenter or iptables not installed (run resources/setup.sh)",
    ) || !require(
        Path::new("/usr/lib/cni/bridge").is_file(),
        "CNI plugins not installed (containernetworking-plugins: run resources/setup.sh)",
    ) {
        return;
    }
    let runc = detached_case(Runtime::Runc);
    let kiln = detached_case(Runtime::Kiln);
    assert_eq!(runc.served, format!("{SERVED}\n"), "the runc baseline");
    assert_eq!(
        runc.exec,
        Seen {
            stdout: "data\nin-exec\n".into(),
            status: Some(5)
        },
        "the runc baseline"
    );
    assert!(
        runc.diff.contains(&"A /root/written.txt".to_string()),
        "{runc:?}"
    );
    assert_eq!(
        runc.exec_it,
        ExecTerminal {
            pts: true,
            sizes: vec!["41 99".into(), "50 132".into()],
            status: Some(9),
        },
        "the runc baseline"
    );
    assert_eq!(runc.logs, "started\ngot TERM 1\ngot TERM 2\n", "{runc:?}");
    assert_eq!(
        (runc.stop, runc.exit_code.trim(), runc.rm),
        (Some(0), "42", Some(0))
    );
    assert_eq!(kiln, runc, "kiln-oci against runc");
}

// ---- containerd: its runc shim with kiln-oci as the runc binary.

/// A containerd of the test's own (its root, state and socket in a
/// scratch directory), with `env` in its environment (its shims and their
/// runtime inherit it).
struct Containerd {
    scratch: Scratch,
    daemon: std::process::Child,
}

impl Containerd {
    fn start(env: &[(&str, &Path)]) -> Self {
        let scratch = Scratch::new_in(Path::new("/tmp"), "oci-ctrd");
        let config = scratch.path("config.toml");
        // The CRI plugin is not needed by `ctr` (and would start a CNI set-up).
        fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n",
                root = scratch.path("root").display(),
                state = scratch.path("state").display(),
                sock = scratch.path("c.sock").display(),
            ),
        )
        .unwrap();
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(scratch.path("containerd.log")).unwrap());
        for (key, value) in env {
            cmd.env(key, value);
        }
        let daemon = cmd.spawn().expect("starting containerd");
        let containerd = Self { scratch, daemon };
        // Ready when its socket accepts a connection.
        let deadline = Instant::now() + Duration::from_secs(60);
        let socket = containerd.scratch.path("c.sock");
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "containerd did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        containerd
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.scratch.path("c.sock"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running ctr")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // SAFETY: kill with the pid of a child this test owns and has not reaped.
        unsafe { libc::kill(self.daemon.id() as i32, libc::SIGTERM) };
        let _ = self.daemon.wait();
    }
}

#[test]
fn containerd_runs_a_container_with_kiln_oci_as_its_runc_binary_as_with_runc() {
    if !podman_prerequisites()
        || !require(
            common::have_program("containerd") && common::have_program("ctr"),
            "containerd not installed (run resources/setup.sh)",
        )
    {
        return;
    }
    let _one = common::one_vm();
    // The image: podman's busybox import, saved as an OCI archive.
    let podman = Podman::new(Runtime::Runc);
    let archive = podman.scratch.path("image.tar");
    let out = podman.cmd(&[
        "save",
        "--format",
        "oci-archive",
        "-o",
        archive.to_str().unwrap(),
        IMAGE,
    ]);
    assert!(out.status.success(), "podman save: {}", text(&out.stderr));
    // containerd's shim passes no kernel flag: kiln-oci's configuration
    // file names it, through the environment containerd hands down.
    let settings = podman.scratch.path("oci.toml");
    let kernel = fs::canonicalize(guest_kernel("vmlinux").unwrap()).unwrap();
    // And packs the container's root into the initramfs (the fallback for
    // hosts without virtiofsd): this case boots that way.
    fs::write(
        &settings,
        format!(
            "kernel = \"{}\"\ncontainer_root = \"packed\"\n",
            kernel.display()
        ),
    )
    .unwrap();
    let containerd = Containerd::start(&[("KILN_OCI_CONFIG", &settings)]);
    let out = containerd.ctr(&[
        "images",
        "import",
        "--base-name",
        IMAGE,
        archive.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "ctr images import: {}",
        text(&out.stderr)
    );
    let image = format!("{IMAGE}:latest");
    let case = |binary: &str, id: &str, limits: &[&str], script: &str| {
        let mut args = vec!["run", "--rm", "--runc-binary", binary];
        args.extend(limits);
        args.extend([image.as_str(), id, "sh", "-c", script]);
        seen(&containerd.ctr(&args))
    };
    let runc = case("runc", "with-runc", &[], "echo hi; exit 3");
    // kiln-oci's case also has a memory limit and a CPU quota, which size
    // its VM (src/oci/resources.rs): 320 MiB is more than the configured
    // 256 MiB VM could show, and 2 vCPUs more than its 1.
    let kiln = case(
        env!("CARGO_BIN_EXE_kiln-oci"),
        "with-kiln",
        &["--memory-limit", "335544320", "--cpus", "2"],
        "echo hi; echo nproc=$(nproc); echo mem_kib=$(grep MemTotal /proc/meminfo | tr -dc 0-9); \
         echo root=$(awk '$2 == \"/\" { t = $3 } END { print t }' /proc/mounts); exit 3",
    );
    let expected = Seen {
        stdout: "hi\n".into(),
        status: Some(3),
    };
    assert_eq!(runc, expected, "the runc baseline");
    let mut lines = kiln.stdout.lines();
    assert_eq!(lines.next(), Some("hi"), "kiln-oci: {kiln:?}");
    assert_eq!(kiln.status, Some(3), "kiln-oci: {kiln:?}");
    assert_eq!(
        lines.next(),
        Some("nproc=2"),
        "the CPU quota's vCPUs: {kiln:?}"
    );
    let mem_kib: u64 = lines
        .next()
        .and_then(|l| l.strip_prefix("mem_kib="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal: {kiln:?}"));
    // The packed root: no virtio-fs (a shared root is virtiofs or overlay).
    assert_eq!(
        lines.next(),
        Some("root=rootfs"),
        "the packed root: {kiln:?}"
    );
    // The guest sees the limit and at most the allowance above it.
    assert!(
        mem_kib > 320 << 10 && mem_kib <= (320 + 64) << 10,
        "guest MemTotal {mem_kib} KiB for a 320 MiB limit"
    );
    // The container is gone from containerd and from the shim's state root.
    let listed = text(&containerd.ctr(&["containers", "ls", "-q"]).stdout);
    assert!(!listed.contains("with-kiln"), "{listed}");
    assert!(!Path::new("/run/containerd/runc/default/with-kiln").exists());
}
