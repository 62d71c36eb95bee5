//! Helpers shared by kiln's integration tests: building the tiny test guests,
//! skipping (or, in CI, failing) when a prerequisite is missing, and running a
//! VM through the library with captured console output.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use kiln::{ConsoleIo, RunReport, VmConfig};

pub mod engine;

/// A scratch directory for one test, removed on drop: `Scratch::new(tag)`
/// under the target directory, `Scratch::new_in(base, tag)` elsewhere.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        Self::new_in(Path::new(env!("CARGO_TARGET_TMPDIR")), tag)
    }

    /// `base/kiln-TAG-PID-N`: unique per process and per call.
    pub fn new_in(base: &Path, tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = base.join(format!("kiln-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating a scratch directory");
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Builds `tests/NAME.c` into a static binary at `out` (guest helpers that
/// run in a busybox root).
pub fn build_static_helper(name: &str, out: &Path) -> Result<(), String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/{name}.c"));
    let built = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(out)
        .arg(&src)
        .output()
        .map_err(|e| format!("gcc: {e}"))?;
    if !built.status.success() {
        return Err(format!(
            "gcc -static failed: {}",
            String::from_utf8_lossy(&built.stderr)
        ));
    }
    Ok(())
}

/// Guest memory for the tiny guests (they use a few pages).
pub const GUEST_MEM: u64 = 32 << 20;
/// Upper bound for any tiny-guest run, so a broken monitor cannot hang a test.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the tiny guests' sources live.
pub fn test_guest_source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("resources/test-guests")
        .join(format!("{name}.S"))
}

/// Assembles and links `resources/test-guests/NAME.S` with the host's gcc
/// into a static ELF entered at 0x200000, cached under the target directory
/// and rebuilt when the source, or a `.inc` file it may include, is newer
/// than the cached binary.
pub fn test_guest(name: &str) -> PathBuf {
    // One build at a time within a test binary; the rename below keeps a
    // concurrent reader (another test binary) from seeing a half-written file.
    static BUILD: Mutex<()> = Mutex::new(());
    let _serial = BUILD.lock().unwrap_or_else(|e| e.into_inner());

    let src = test_guest_source(name);
    let src_time =
        modified(&src).unwrap_or_else(|e| panic!("test guest source {}: {e}", src.display()));
    let includes = fs::read_dir(src.parent().expect("the guests' directory"))
        .expect("listing the test guests")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "inc"));
    let src_time = includes
        .filter_map(|path| modified(&path).ok())
        .fold(src_time, SystemTime::max);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-guests");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let out = dir.join(format!("{name}.elf"));
    if modified(&out).is_ok_and(|t| t >= src_time) {
        return out;
    }

    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = Command::new("gcc")
        .args([
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,-Ttext=0x200000",
            "-Wl,--build-id=none",
            "-Wa,--noexecstack",
            "-o",
        ])
        .arg(&tmp)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run gcc to build test guest {name}: {e}"));
    assert!(
        result.status.success(),
        "building test guest {name} failed ({}):\n{}",
        result.status,
        String::from_utf8_lossy(&result.stderr)
    );
    fs::rename(&tmp, &out).unwrap_or_else(|e| panic!("moving {} into place: {e}", tmp.display()));
    out
}

fn modified(path: &Path) -> io::Result<SystemTime> {
    fs::metadata(path)?.modified()
}

// The one skip-or-fail decision for every kiln test (KILN_NO_SKIP), with
// the prerequisite checks the integration tests share (each test binary
// uses its own subset).
#[allow(unused_imports)]
pub use kiln_prereq::{have_kvm, have_program, is_root, require};

/// The real-kernel tests' prerequisites: /dev/kvm, root, the recipe guest
/// kernel and each of `programs` on PATH (each missing one skips, or fails
/// under KILN_NO_SKIP).
pub fn real_kernel_prerequisites(programs: &[&str]) -> bool {
    require(have_kvm(), "/dev/kvm not accessible")
        && require(is_root(), "not root")
        && require(
            guest_kernel("vmlinux").is_some(),
            "guest kernel not built (run resources/setup.sh)",
        )
        && programs
            .iter()
            .all(|p| require(have_program(p), &format!("{p} not installed")))
}

/// Length of `seq_pattern()`.
pub const SEQ_PATTERN_LEN: usize = 1 << 20;

/// The bytes of `seq 1 200000 | head -c 1048576`: what guests write to
/// disks, so the host can check them without a copy in the guest.
pub fn seq_pattern() -> Vec<u8> {
    let mut text = String::new();
    let mut i = 1u32;
    while text.len() < SEQ_PATTERN_LEN {
        text.push_str(&format!("{i}\n"));
        i += 1;
    }
    text.truncate(SEQ_PATTERN_LEN);
    text.into_bytes()
}

/// A config for a tiny test guest: 32 MiB, 1 vCPU, 5 s timeout.
pub fn guest_config(name: &str) -> VmConfig {
    let mut config = VmConfig::new(test_guest(name));
    config.mem_bytes = GUEST_MEM;
    config.timeout = Some(GUEST_TIMEOUT);
    config
}

/// Console output captured in memory; tests can wait for text to appear.
#[derive(Clone, Default)]
pub struct Capture(Arc<(Mutex<CaptureState>, Condvar)>);

#[derive(Default)]
struct CaptureState {
    bytes: Vec<u8>,
    /// The run is over: nothing more will be written.
    closed: bool,
}

impl Capture {
    fn state(&self) -> std::sync::MutexGuard<'_, CaptureState> {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.state().bytes.clone()
    }

    /// Marks the output complete and wakes every waiter.
    pub fn close(&self) {
        self.state().closed = true;
        self.0 .1.notify_all();
    }

    /// Waits until the output contains `needle`; false on timeout or when
    /// the output is closed without it.
    pub fn wait_for(&self, needle: &[u8], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        loop {
            if state.bytes.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                return false;
            }
            state = self
                .0
                 .1
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.state().bytes.extend_from_slice(buf);
        self.0 .1.notify_all();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A pipe: (read end, write end), both close-on-exec.
pub fn pipe() -> (File, File) {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is an array of two ints for pipe2 to fill.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by no
    // one else; each File takes sole ownership of one.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

/// Runs `config` through the library. With `input`, the guest's serial
/// console reads those bytes (from a pipe that then reaches end-of-file).
/// Returns the report and everything the guest wrote to its console; panics
/// if kiln itself fails.
pub fn run_guest(config: &VmConfig, input: Option<&[u8]>) -> (RunReport, Vec<u8>) {
    let capture = Capture::default();
    let input = input.map(|bytes| {
        let (reader, mut writer) = pipe();
        // The tests' inputs are tiny: they fit in the pipe buffer at once.
        writer.write_all(bytes).expect("writing guest input");
        reader
    });
    let io = ConsoleIo {
        output: Box::new(capture.clone()),
        input,
    };
    let report = kiln::run(config, io, Instant::now())
        .unwrap_or_else(|e| panic!("kiln::run({}) failed: {e}", config.kernel.display()));
    (report, capture.bytes())
}

/// How long a run that should end by itself may go on before the test
/// stops it and fails. It only turns a hang into a failure: no test asserts
/// how fast anything is (timing goals belong to the benchmark).
pub const HANG_LIMIT: Duration = Duration::from_secs(120);

/// Waits until the VM of `vm` has ended (its finished pipe hangs up), at
/// most `HANG_LIMIT`; false if it is still running then.
pub fn wait_finished(vm: &kiln::VmHandle) -> bool {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: vm.finished_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let deadline = Instant::now() + HANG_LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as libc::c_int) };
        if n > 0 {
            return true;
        }
        if n == 0 || left.is_zero() {
            return false;
        }
    }
}

/// Runs `config` on its own thread and waits for it to end by itself:
/// a VM still running after `HANG_LIMIT` is stopped and fails the test.
/// Returns the report and the console output.
pub fn run_to_end(config: &VmConfig) -> (RunReport, Vec<u8>) {
    let capture = Capture::default();
    let io = ConsoleIo {
        output: Box::new(capture.clone()),
        input: None,
    };
    let vm = kiln::spawn(config.clone(), io, Instant::now())
        .unwrap_or_else(|e| panic!("kiln::spawn({}) failed: {e}", config.kernel.display()));
    if !wait_finished(&vm) {
        // Not dropped: stopping a VM that does not stop would hang the test.
        std::mem::forget(vm);
        panic!("the VM did not end by itself within {HANG_LIMIT:?}");
    }
    let report = vm.wait().expect("the VM's report");
    (report, capture.bytes())
}

/// Like `run_guest`, but `input` is written only after the guest has printed
/// `wait_for`, so the guest is already waiting when the bytes arrive.
pub fn run_guest_after(config: &VmConfig, wait_for: &[u8], input: &[u8]) -> (RunReport, Vec<u8>) {
    let capture = Capture::default();
    let (reader, mut writer) = pipe();
    let io = ConsoleIo {
        output: Box::new(capture.clone()),
        input: Some(reader),
    };
    std::thread::scope(|s| {
        let feeder = capture.clone();
        s.spawn(move || {
            if feeder.wait_for(wait_for, GUEST_TIMEOUT) {
                writer.write_all(input).expect("writing guest input");
            }
            // Dropping the writer ends the input.
        });
        let result = kiln::run(config, io, Instant::now());
        // Releases the feeder if the guest never printed `wait_for`.
        capture.close();
        let report =
            result.unwrap_or_else(|e| panic!("kiln::run({}) failed: {e}", config.kernel.display()));
        (report, capture.bytes())
    })
}

/// The `kiln` binary with a quiet, predictable environment and no stdin.
pub fn kiln_cli() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env_remove("KILN_LOG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

/// Path of the recipe guest kernel (`vmlinux` or `bzImage`): env
/// `KILN_TEST_KERNEL_DIR`, else target/guest/ as linked by resources/setup.sh,
/// else the cache entry `resources/guest/build-kernel.sh --cached-only` names.
pub fn guest_kernel(name: &str) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if let Some(dir) = std::env::var_os("KILN_TEST_KERNEL_DIR") {
        let p = Path::new(&dir).join(name);
        return p.is_file().then_some(p);
    }
    let linked = root.join("target/guest").join(name);
    if linked.is_file() {
        return Some(linked);
    }
    let out = Command::new(root.join("resources/guest/build-kernel.sh"))
        .arg("--cached-only")
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let key = if name == "vmlinux" {
        "vmlinux="
    } else {
        "bzimage="
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(PathBuf::from)
        .filter(|p| p.is_file())
}

/// A busybox root for real guests, built once per test binary with
/// resources/guest/build-rootfs.sh.
pub fn guest_rootfs() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("rootfs-{}", std::process::id()));
        let status = Command::new(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/guest/build-rootfs.sh"),
        )
        .arg(&dir)
        .stdout(Stdio::null())
        .status()
        .expect("running build-rootfs.sh");
        assert!(status.success(), "build-rootfs.sh failed");
        dir
    })
    .clone()
}

// ---- Helpers for the real-kernel tests (dev-claims): one network
// namespace type, one host-side sha256, one VM at a time per test binary.

/// A network namespace of the test's own, deleted on drop (also on panic).
/// Every TAP and peer a network test uses lives in it.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `kiln-TAG-PID` and runs each of `setup` (an `ip ...` command
    /// line, split on spaces) inside it; `lo` is brought up first.
    pub fn create(tag: &str, setup: &[&str]) -> Self {
        let name = format!("kiln-{tag}-{}", std::process::id());
        // A leftover from a crashed run with a recycled pid.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run_checked(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        for line in std::iter::once(&"ip link set lo up").chain(setup) {
            run_checked(&mut ns.exec(line.split(' ')));
        }
        ns
    }

    /// The namespace's name (for `ip link ... netns NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `args` run inside the namespace (`ip netns exec NAME ARGS...`).
    pub fn exec<'a>(&self, args: impl IntoIterator<Item = &'a str>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd
    }

    /// Runs `f` on a thread that joined this namespace: sockets, TAPs and
    /// threads it creates live in the namespace whoever uses them later.
    pub fn on_thread<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).expect("opening the namespace");
            // SAFETY: setns on a valid namespace fd; it changes only this
            // thread's network namespace, and the thread ends right after.
            let ret =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "setns: {}", io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs `cmd`, panicking with its stderr unless it succeeds.
pub fn run_checked(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// sha256 of `data` in hex, by the host's sha256sum (fed from a thread, so
/// any size works).
pub fn sha256_hex(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running sha256sum");
    let mut stdin = child.stdin.take().expect("piped");
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("sha256sum output");
    writer
        .join()
        .expect("sha256sum feeder")
        .expect("feeding sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Everything a reader of `dir` can see, one line per entry in path order:
/// type, mode, owner, size, mtime (ns), link target or content hash. Two
/// equal listings mean the tree was left as it was.
#[allow(dead_code)] // not every test binary compares trees
pub fn tree_listing(dir: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let mut lines = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta =
            fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let what = if meta.is_dir() {
            for entry in fs::read_dir(&path).unwrap() {
                pending.push(entry.unwrap().path());
            }
            String::new()
        } else if meta.file_type().is_symlink() {
            fs::read_link(&path).unwrap().display().to_string()
        } else if meta.is_file() {
            sha256_hex(&fs::read(&path).unwrap())
        } else {
            format!("rdev {}", meta.rdev())
        };
        lines.push(format!(
            "{} {:o} {}:{} {} {}.{} {what}",
            path.strip_prefix(dir).unwrap().display(),
            meta.mode(),
            meta.uid(),
            meta.gid(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec()
        ));
    }
    lines.sort();
    lines.join("\n")
}

/// One real VM at a time within a test binary: libtest runs tests in
/// parallel, and two emulated guest kernels on a small host only slow each
/// other down (and stretch every in-test timeout).
pub fn one_vm() -> std::sync::MutexGuard<'static, ()> {
    static ONE_VM: Mutex<()> = Mutex::new(());
    ONE_VM.lock().unwrap_or_else(|e| e.into_inner())
}

/// A busybox root built by resources/guest/build-rootfs.sh in `dir`.
pub fn build_busybox_root(dir: &Path) {
    run_checked(
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/guest/build-rootfs.sh"))
            .arg(dir)
            .stdout(Stdio::null()),
    );
}

/// Lets a jailed `kiln run` (which drops to uid and gid 65534 once its VM is
/// built, when started as root) use `path`: its `--vsock` socket directory,
/// where it creates and removes its socket, or a `_PORT` socket it connects
/// to. What a user of `--vsock` with the jail does (README, Security model).
pub fn hand_to_jail(path: &Path) {
    if is_root() {
        let id = kiln::jail::DEFAULT_JAIL_ID;
        std::os::unix::fs::chown(path, Some(id), Some(id))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

/// Stops `kiln` with SIGTERM and checks it ends as a stopped run does
/// (status 128 + 15).
pub fn terminate(mut kiln: std::process::Child) {
    // SAFETY: kill with the pid of a child this test owns and has not reaped.
    assert_eq!(unsafe { libc::kill(kiln.id() as i32, libc::SIGTERM) }, 0);
    let status = kiln.wait().expect("waiting for kiln");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
}

/// CPU time, in clock ticks, of the vCPU threads ("kiln-vcpuN") of process
/// `pid` (None: this one) and of its child processes (a sandbox's VM
/// process, `kiln sandbox-vm`).
pub fn vcpu_ticks(pid: Option<i32>) -> u64 {
    let root = pid.map_or("self".to_string(), |p| p.to_string());
    let mut pids = vec![root.clone()];
    for task in fs::read_dir(format!("/proc/{root}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
        pids.extend(children.split_whitespace().map(str::to_string));
    }
    let mut ticks = 0;
    for pid in pids {
        for task in fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if !comm.starts_with("kiln-vcpu") {
                continue;
            }
            let stat = fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // utime and stime: fields 14 and 15, the 12th and 13th after the name.
            let after_name = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
            let fields: Vec<&str> = after_name.split_whitespace().collect();
            ticks += fields
                .get(11)
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(0)
                + fields
                    .get(12)
                    .and_then(|t| t.parse::<u64>().ok())
                    .unwrap_or(0);
        }
    }
    ticks
}

/// Waits until the vCPUs of `pid` (as [`vcpu_ticks`]) have used more CPU
/// than `since`, polling; fails the test after `HANG_LIMIT`.
pub fn vcpus_run_after(pid: Option<i32>, since: u64, what: &str) -> u64 {
    let deadline = Instant::now() + HANG_LIMIT;
    loop {
        let now = vcpu_ticks(pid);
        if now > since {
            return now;
        }
        assert!(Instant::now() < deadline, "{what}: the vCPUs did not run");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until process `pid` has ended (its pidfd turns readable); false if
/// it still runs after `HANG_LIMIT`. A pid already gone is ended.
pub fn process_ended(pid: i32) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    }
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = HANG_LIMIT.as_millis() as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut pfd, 1, millis) };
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    ready == 1
}

/// What a guest script printed as `key=value` lines, after showing kiln's
/// status, stdout and stderr (for a failing test's log).
#[allow(dead_code)]
pub fn guest_report(out: &std::process::Output) -> std::collections::HashMap<String, String> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "kiln exited {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Sets a pty's window size through its master; the kernel sends SIGWINCH
/// to the foreground process group of its slave.
pub fn set_size(master: &File, rows: u16, cols: u16) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: a valid fd and a valid winsize the kernel only reads.
    assert_eq!(
        unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) },
        0
    );
}

/// The screen of a pty: what its programs wrote, read from the master by
/// a thread, waited on for markers.
pub struct Screen {
    chunks: mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
    /// Where the last `until` matched: later markers are looked for after it.
    mark: usize,
}

impl Screen {
    pub fn new(mut master: File) -> Self {
        let (tx, chunks) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the last holder of the slave has closed it.
            while let Ok(n @ 1..) = master.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Self {
            chunks,
            seen: Vec::new(),
            mark: 0,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    /// Waits for `marker` after the previous one; returns what came in
    /// between (the marker included).
    pub fn until(&mut self, marker: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.text();
            if let Some(at) = text[self.mark..].find(marker) {
                let from = self.mark;
                self.mark += at + marker.len();
                return text[from..self.mark].to_string();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => self.seen.extend(chunk),
                Err(e) => panic!("waiting for {marker:?} ({e}); the screen:\n{text}"),
            }
        }
    }
}

/// Starts `cmd` in a session of its own whose controlling terminal is its
/// stdin (a pty's slave): it is that terminal's foreground process group,
/// which the kernel sends SIGWINCH when the pty is resized.
pub fn on_controlling_terminal(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe system calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
