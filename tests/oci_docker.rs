//! kiln-oci under Docker: a dockerd of the test's own with kiln-oci
//! registered as the runtime `kiln` by the README's `daemon.json`
//! (`runtimeArgs` carrying `--kernel`), each case compared with the same
//! case under runc (Docker's default runtime).
//!
//! Everything of that dockerd is private: its --data-root, --exec-root,
//! pid file and socket live in a scratch directory, it starts its own
//! containerd there, uses the cgroupfs driver, and runs inside a network
//! namespace the test creates, so its bridge and iptables rules never
//! touch the host's. Each kiln container boots a VM (30-100 s on the PVM
//! hosts): two boots in all.

mod common;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::engine::{busybox_root_tar, read_published_port, seen, text, Runtime, Seen};
use common::{guest_kernel, is_root, require, Netns, Scratch};

const IMAGE: &str = "kiln-oci-busybox";
/// The port the detached case publishes (`-p PUBLISHED_PORT:80`).
const PUBLISHED_PORT: u16 = 8080;
/// What the detached container serves on its port 80.
const SERVED: &str = "served-by-the-container";
/// Where the README's Docker snippet installs kiln-oci and the kernel.
const README_BINARY: &str = "/usr/local/bin/kiln-oci";
const README_KERNEL: &str = "/usr/local/share/kiln/vmlinux";

/// The `daemon.json` of README's "OCI runtime" section (the JSON block
/// after the line that starts with "Docker"), with kiln-oci and the guest
/// kernel of this build in place of the installed paths.
fn readme_daemon_json(kiln_oci: &Path, kernel: &Path) -> serde_json::Value {
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("reading README.md");
    let section = readme
        .split("\n## OCI runtime")
        .nth(1)
        .expect("README has an \"OCI runtime\" section");
    let after = section
        .split("\nDocker (")
        .nth(1)
        .expect("the OCI runtime section has a Docker paragraph");
    let block = after
        .split("```json\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a json block after the Docker paragraph");
    let block = block
        .replace(README_BINARY, kiln_oci.to_str().unwrap())
        .replace(README_KERNEL, kernel.to_str().unwrap());
    let config: serde_json::Value =
        serde_json::from_str(&block).expect("README's daemon.json is valid JSON");
    assert_eq!(
        config["runtimes"]["kiln"]["path"].as_str(),
        kiln_oci.to_str(),
        "README's daemon.json registers {README_BINARY} as the runtime kiln: {config}"
    );
    config
}

/// The Docker client packaged with dockerd (docker.io puts both in /usr);
/// another `docker` on PATH would talk to it through API negotiation too,
/// but the test pins the pair it installs.
fn docker_client() -> PathBuf {
    let packaged = Path::new("/usr/bin/docker");
    if packaged.is_file() {
        packaged.into()
    } else {
        "docker".into()
    }
}

/// A dockerd of the test's own (see the module docs). Dropping it removes
/// its containers, stops it and its containerd, ends any process left
/// that names its directory (shims, kiln-oci monitors), and unmounts what
/// is left mounted under that directory.
struct Docker {
    scratch: Scratch,
    daemon: Option<Child>,
    /// Dropped after the daemon (fields drop after `Drop::drop`).
    netns: Netns,
}

impl Docker {
    fn start(config: &serde_json::Value) -> Self {
        // Short paths: containerd's socket lives under --exec-root.
        let scratch = Scratch::new_in(Path::new("/tmp"), "dkr");
        let netns = Netns::create("docker", &[]);
        let config_file = scratch.path("daemon.json");
        fs::write(&config_file, config.to_string()).unwrap();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", netns.name()))
            .arg("dockerd")
            .arg("--config-file")
            .arg(&config_file)
            .arg("--data-root")
            .arg(scratch.path("data"))
            .arg("--exec-root")
            .arg(scratch.path("exec"))
            .arg("--pidfile")
            .arg(scratch.path("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", scratch.path("docker.sock").display()))
            .args(["--exec-opt", "native.cgroupdriver=cgroupfs"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(scratch.path("dockerd.log")).unwrap());
        let daemon = cmd.spawn().expect("starting dockerd");
        let mut docker = Self {
            scratch,
            daemon: Some(daemon),
            netns,
        };
        // Ready once it answers on its socket (or failed: its log says why).
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if docker.cmd(&["version"]).status.success() {
                break;
            }
            let exited = docker.daemon.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "dockerd did not come up ({exited:?}): {}",
                docker.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        docker
    }

    fn log(&self) -> String {
        fs::read_to_string(self.scratch.path("dockerd.log")).unwrap_or_default()
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(docker_client());
        cmd.env("DOCKER_CONFIG", self.scratch.path("client"))
            .arg("-H")
            .arg(format!(
                "unix://{}",
                self.scratch.path("docker.sock").display()
            ))
            .stdin(Stdio::null());
        cmd
    }

    fn cmd(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("running docker")
    }

    /// kiln-oci's state root under this dockerd: Docker 20.10 gives every
    /// runtime runc's (`--root EXEC_ROOT/runtime-runc/moby`, the `moby`
    /// namespace of its containerd).
    fn kiln_root(&self) -> PathBuf {
        self.scratch.path("exec").join("runtime-runc").join("moby")
    }

    /// The mount points under the scratch directory, deepest first.
    fn mounts(&self) -> Vec<PathBuf> {
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mut points: Vec<PathBuf> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(unescape_mount_point)
            .filter(|p| p.starts_with(&self.scratch.0))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        points
    }
}

/// A mount point of /proc/self/mountinfo (space, tab, newline and
/// backslash are written as octal escapes there).
fn unescape_mount_point(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|o| {
            std::str::from_utf8(o)
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// The pids of processes whose command line names `dir` (shims started
/// with its containerd socket, kiln-oci monitors with its state root).
fn processes_naming(dir: &Path) -> Vec<i32> {
    let needle = dir.as_os_str().as_bytes();
    let me = std::process::id() as i32;
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
        })
        .collect()
}

impl Drop for Docker {
    fn drop(&mut self) {
        // Containers a failed test left: removed (their VMs end with them).
        let left = text(&self.cmd(&["ps", "-aq"]).stdout);
        for id in left.split_whitespace() {
            let _ = self.cmd(&["rm", "-f", id]);
        }
        if std::thread::panicking() {
            eprintln!("dockerd's log:\n{}", self.log());
        }
        // dockerd stops the containerd it started.
        if let Some(mut daemon) = self.daemon.take() {
            // SAFETY: kill with the pid of a child this test owns and has not reaped.
            unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
            let _ = daemon.wait();
        }
        // Whatever survived (a shim, a monitor, a containerd): ended.
        for pid in processes_naming(&self.scratch.0) {
            eprintln!(
                "ending process {pid} left under {}",
                self.scratch.0.display()
            );
            // SAFETY: kill takes a pid and a signal; these processes name
            // this test's own scratch directory.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            common::process_ended(pid);
        }
        for point in self.mounts() {
            eprintln!("unmounting {} (left by dockerd)", point.display());
            let c = std::ffi::CString::new(point.as_os_str().as_bytes()).unwrap();
            // SAFETY: umount2 with a valid C string; MNT_DETACH so a busy
            // mount goes too.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn docker_prerequisites() -> bool {
    common::real_kernel_prerequisites(&[
        "dockerd",
        "containerd",
        "containerd-shim-runc-v2",
        "runc",
        "nsenter",
        "iptables",
        "tar",
    ]) && require(
        docker_client().is_absolute() || common::have_program("docker"),
        "docker not installed (docker.io: run resources/setup.sh)",
    ) && require(
        kiln::share::find_virtiofsd(None).is_ok(),
        "virtiofsd not installed (run resources/setup.sh)",
    ) && require(is_root(), "not root")
}

impl Runtime {
    /// `docker run`'s options for this runtime (runc is the default).
    fn options(self) -> &'static [&'static str] {
        match self {
            Runtime::Kiln => &["--runtime", "kiln"],
            Runtime::Runc => &[],
        }
    }
}

/// Everything a detached container shows: exec (output and status),
/// pause and unpause (statuses and the states between), stop (SIGTERM
/// reaching the command's trap), logs, the exit code, rm.
#[derive(Debug, PartialEq, Eq)]
struct Detached {
    served: String,
    exec: Seen,
    pause: (Option<i32>, String, Option<i32>, String),
    stop: Option<i32>,
    logs: String,
    exit_code: String,
    rm: Option<i32>,
}

fn detached_case(docker: &Docker, runtime: Runtime) -> Detached {
    let name = format!("detached-{runtime:?}").to_lowercase();
    // The trap is set and the server listens before /tmp/ready exists
    // (`: >` is the shell's own, no fork); the exec waits for it, so
    // `stop` finds the trap in place and the port answers. Docker's
    // default network: its bridge in the test's namespace, the container's
    // namespace filled by Docker's prestart hook, port 80 published.
    let script = format!(
        "trap 'echo got TERM; exit 0' TERM; echo started; \
         echo {SERVED} | nc -l -p 80 >/dev/null & \
         while ! cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -q ':0050 0*:0000 0A'; \
         do :; done; : > /tmp/ready; while true; do sleep 1; done"
    );
    let publish = format!("{PUBLISHED_PORT}:80");
    let out = docker
        .command()
        .args(["run", "-d", "-p", &publish, "--name", &name])
        .args(runtime.options())
        .args([IMAGE, "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(out.status.success(), "{runtime:?} run -d: {out:?}");
    let id = text(&out.stdout).trim().to_string();
    let pid: i32 = text(
        &docker
            .cmd(&["inspect", &name, "--format", "{{.State.Pid}}"])
            .stdout,
    )
    .trim()
    .parse()
    .unwrap();
    let exec = seen(&docker.cmd(&[
        "exec",
        &name,
        "sh",
        "-c",
        "until [ -e /tmp/ready ]; do :; done; echo in-exec; exit 5",
    ]));
    let served = docker
        .netns
        .on_thread(|| read_published_port(PUBLISHED_PORT, Duration::from_secs(120)));
    let status = || {
        let out = docker.cmd(&["inspect", &name, "--format", "{{.State.Status}}"]);
        text(&out.stdout).trim().to_string()
    };
    // A command spinning on the CPU while the container is paused: under
    // kiln-oci its VM's vCPUs use none until unpause.
    let spin = docker.cmd(&["exec", "-d", &name, "sh", "-c", "while :; do :; done"]);
    assert!(spin.status.success(), "exec -d: {spin:?}");
    if runtime == Runtime::Kiln {
        common::vcpus_run_after(Some(pid), common::vcpu_ticks(Some(pid)), "spinning");
    }
    let paused = docker.cmd(&["pause", &name]).status.code();
    let paused_status = status();
    if runtime == Runtime::Kiln {
        let still = common::vcpu_ticks(Some(pid));
        // An absence over a window: the spinning guest used ~100 ticks a second.
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(common::vcpu_ticks(Some(pid)), still, "a paused vCPU ran");
    }
    let unpaused = docker.cmd(&["unpause", &name]).status.code();
    let pause = (paused, paused_status, unpaused, status());
    if runtime == Runtime::Kiln {
        common::vcpus_run_after(Some(pid), common::vcpu_ticks(Some(pid)), "unpaused");
    }
    if runtime == Runtime::Kiln {
        // kiln-oci's own view through the root dockerd gave it.
        let out = Command::new(env!("CARGO_BIN_EXE_kiln-oci"))
            .arg("--root")
            .arg(docker.kiln_root())
            .args(["state", &id])
            .output()
            .unwrap();
        let state: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("kiln-oci state {id}: {e}: {out:?}"));
        assert_eq!(
            (state["status"].as_str(), state["pid"].as_i64()),
            (Some("running"), Some(pid as i64)),
            "{state}"
        );
    }
    let stop = docker.cmd(&["stop", "-t", "300", &name]).status.code();
    let logs = text(&docker.cmd(&["logs", &name]).stdout);
    let exit_code = text(
        &docker
            .cmd(&["inspect", &name, "--format", "{{.State.ExitCode}}"])
            .stdout,
    )
    .trim()
    .to_string();
    if runtime == Runtime::Kiln {
        // The monitor (the pid docker knows) ended with the command, the
        // VM with it.
        assert!(common::process_ended(pid), "the monitor {pid} still runs");
    }
    let rm = docker.cmd(&["rm", &name]).status.code();
    Detached {
        served,
        exec,
        pause,
        stop,
        logs,
        exit_code,
        rm,
    }
}

/// The entries of `dir` (none when it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Docker with kiln-oci registered by the README's daemon.json: `docker
/// run --rm` (output, exit status), and a detached container (`exec`,
/// `pause` and `unpause` (a spinning command's vCPUs idle between them),
/// `stop`, `logs`, `rm`), each as with runc; no kiln-oci state is left.
#[test]
fn docker_runs_containers_with_kiln_oci_as_with_runc() {
    if !docker_prerequisites() {
        return;
    }
    let _one = common::one_vm();
    let kernel = fs::canonicalize(guest_kernel("vmlinux").unwrap()).unwrap();
    let config = readme_daemon_json(Path::new(env!("CARGO_BIN_EXE_kiln-oci")), &kernel);
    let docker = Docker::start(&config);

    // The image: the recipe's busybox root, imported.
    let tar = docker.scratch.path("root.tar");
    busybox_root_tar(&tar);
    let out = docker.cmd(&["import", tar.to_str().unwrap(), IMAGE]);
    assert!(out.status.success(), "docker import: {}", text(&out.stderr));

    let run_rm = |runtime: Runtime| {
        seen(
            &docker
                .command()
                .args(["run", "--rm", "--network", "none"])
                .args(runtime.options())
                .args([IMAGE, "sh", "-c", "echo hi; exit 3"])
                .output()
                .unwrap(),
        )
    };
    let expected = Seen {
        stdout: "hi\n".into(),
        status: Some(3),
    };
    assert_eq!(run_rm(Runtime::Runc), expected, "the runc baseline");
    assert_eq!(run_rm(Runtime::Kiln), expected, "kiln-oci");

    let runc = detached_case(&docker, Runtime::Runc);
    assert_eq!(
        runc,
        Detached {
            served: format!("{SERVED}\n"),
            exec: Seen {
                stdout: "in-exec\n".into(),
                status: Some(5),
            },
            pause: (Some(0), "paused".into(), Some(0), "running".into()),
            stop: Some(0),
            logs: "started\ngot TERM\n".into(),
            exit_code: "0".into(),
            rm: Some(0),
        },
        "the runc baseline"
    );
    let kiln = detached_case(&docker, Runtime::Kiln);
    assert_eq!(kiln, runc, "kiln-oci against runc");

    // Nothing of either kiln container is left in kiln-oci's state root,
    // nor in docker.
    let left = entries(&docker.kiln_root());
    assert!(left.is_empty(), "kiln-oci state left: {left:?}");
    let listed = text(&docker.cmd(&["ps", "-aq"]).stdout);
    assert!(listed.trim().is_empty(), "containers left: {listed}");
}
