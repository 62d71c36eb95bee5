//! The container monitor: the host process whose life is the container's.
//! Started by `create` (detached), it boots the VM, reports ready, serves
//! the control socket, runs the command on `start` with its own stdio and
//! exits with the command's status once the VM has ended. Signals sent to
//! its pid (the container's, to the engine) go to the command as `kill`'s
//! do (see `signal::forwarded` for which).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::cli::{GlobalArgs, MonitorArgs};
use super::console;
use super::control::{self, Reply, Request};
use super::log::Logger;
use super::network::{self, Connection};
use super::settings::ContainerRoot;
use super::signal::{self, Forwarded};
use super::spec::{self, ProcessSpec};
use super::state;
use crate::config::{parse_hostname, RootShare, VmConfig};
use crate::sandbox::{
    Command, ExitStatus, Process, ProcessHandle, ProcessStdin, Sandbox, SandboxBuilder,
    SandboxError,
};

/// What the main loop hears from the control socket and the command.
enum Event {
    Start(Sender<Reply>),
    Kill {
        signal: i32,
        all: bool,
        reply: Sender<Reply>,
    },
    Shutdown(Sender<Reply>),
    /// A signal sent to the monitor's pid, for the command.
    Forward(i32),
    /// The container's command ended with this status.
    Exited(i32),
}

/// What the connection threads share with the main loop.
struct Shared {
    /// Taken when the VM ends.
    sandbox: Mutex<Option<Sandbox>>,
    /// The running exec'd commands (for `kill --all`).
    execs: Mutex<Vec<(u64, ProcessHandle)>>,
    logger: Logger,
}

/// Runs the monitor of container `args.id`; returns its exit status.
pub fn run(global: &GlobalArgs, logger: &Logger, args: &MonitorArgs) -> i32 {
    // Before any thread starts, so that every one inherits the mask.
    let signals = Forwarded::block();
    // SAFETY: `create` left this descriptor open for this process alone.
    let mut ready = unsafe { File::from_raw_fd(args.ready_fd) };
    // The VM's own processes must not hold the pipe: `create` reads to
    // the end of the line, and a leaked write end would hide our end.
    // SAFETY: fcntl on a descriptor this process owns.
    unsafe { libc::fcntl(ready.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    // The same for the container's terminal, when it has one.
    let terminal = args.terminal_fd.map(|fd| {
        // SAFETY: `create` left this descriptor open for this process alone.
        let terminal = unsafe { File::from_raw_fd(fd) };
        // SAFETY: fcntl on a descriptor this process owns.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        terminal
    });
    let dir = global.root.join(&args.id);
    let (sandbox, connection, command, listener) = match boot(&dir, logger) {
        Ok(booted) => booted,
        Err(e) => {
            logger.error(&e);
            let line = e.lines().next().unwrap_or_default();
            let _ = writeln!(ready, "{line}");
            return 1;
        }
    };
    let shared = Arc::new(Shared {
        sandbox: Mutex::new(Some(sandbox)),
        execs: Mutex::new(Vec::new()),
        logger: logger.clone(),
    });
    let (tx, rx) = mpsc::channel();
    let accept_shared = shared.clone();
    let accept_tx = tx.clone();
    std::thread::spawn(move || accept_loop(listener, accept_tx, accept_shared));
    let signals_tx = tx.clone();
    std::thread::spawn(move || forward_signals(signals, signals_tx));
    let _ = ready.write_all(b"ok\n");
    drop(ready);
    logger.debug(&format!("{}: VM up, waiting for start", args.id));
    let status = main_loop(&shared, command, terminal, tx, rx);
    logger.debug(&format!("{}: ending with status {status}", args.id));
    let sandbox = shared
        .sandbox
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(sandbox) = sandbox {
        if let Err(e) = sandbox.shutdown() {
            logger.warn(&format!("ending the VM: {e}"));
        }
    }
    // After the VM: its TAPs are free to go. A failure leaves the saved
    // network for `delete` to try again.
    if let Some(connection) = connection {
        match connection.disconnect() {
            Ok(()) => state::forget_network(&dir),
            Err(e) => logger.warn(&format!("removing the container's network: {e}")),
        }
    }
    let _ = std::fs::remove_file(state::socket_path(&dir));
    status
}

/// The container's VM and, when the engine gave it a network, that network
/// carried into it (disconnected when dropped).
type Booted = (Sandbox, Option<Connection>, Command, UnixListener);

/// Boots the container's VM: one `VmConfig` from the saved settings and
/// the bundle, through the sandbox builder; with a network namespace, in
/// that namespace, with its interfaces carried in.
fn boot(dir: &std::path::Path, logger: &Logger) -> Result<Booted, String> {
    let saved = state::read_saved(dir)?;
    let spec = spec::load(&saved.bundle)?;
    let mut plan = spec.plan(&saved.bundle)?;
    let command = spec.process()?.command()?;
    super::files::copy_into_root(&plan.root, &plan.files)?;
    // The new network namespace the spec asks for is this process's own
    // (its pid is the container's), made before the hooks that fill it.
    let runtime_netns = match plan.new_network_namespace {
        true => Some(enter_new_network_namespace()?),
        false => None,
    };
    run_create_hooks(&spec, &saved, runtime_netns.as_ref(), logger)?;
    let netns_is_ours = runtime_netns.is_some();
    if netns_is_ours {
        plan.network_namespace = Some(format!("/proc/{}/ns/net", std::process::id()).into());
    }
    for mount in &plan.skipped_mounts {
        logger.debug(&format!("mount {mount} left out"));
    }
    let mut config = VmConfig::new(&saved.kernel);
    config.mem_bytes = saved.mem_bytes;
    config.vcpus = saved.vcpus;
    config.rootfs = Some(plan.root);
    config.rootfs_share = match (saved.container_root, plan.readonly) {
        (ContainerRoot::Packed, _) => None,
        (ContainerRoot::Shared, true) => Some(RootShare::Overlay),
        (ContainerRoot::Shared, false) => Some(RootShare::Writable),
    };
    config.shares = plan.shares;
    config.tmpfs = plan.tmpfs;
    config.hostname = plan
        .hostname
        .as_deref()
        .map(parse_hostname)
        .transpose()
        .map_err(|e| format!("hostname: {e}"))?;
    let listener = control::bind(&state::socket_path(dir))?;
    let (sandbox, connection) = match plan.network_namespace {
        None => (build(config)?, None),
        Some(namespace) => network::in_namespace(&namespace, || {
            boot_in_namespace(dir, &namespace, config, !netns_is_ours)
        })
        .map_err(|e| e.to_string())??,
    };
    Ok((sandbox, connection, command, listener))
}

/// Moves this thread (the main one, whose namespace is the process's in
/// /proc/PID/ns) into a new network namespace; returns the one it leaves,
/// where hooks run.
fn enter_new_network_namespace() -> Result<File, String> {
    let runtime = File::open("/proc/thread-self/ns/net")
        .map_err(|e| format!("opening the runtime's network namespace: {e}"))?;
    // SAFETY: unshare with one flag changes only this thread's namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("making the container's network namespace: {e}"));
    }
    Ok(runtime)
}

/// Runs the spec's `prestart` and `createRuntime` hooks, in order, with the
/// container's state (status "creating", this process's pid) on stdin; in
/// `runtime_netns` when the container's namespace is this process's.
fn run_create_hooks(
    spec: &spec::Spec,
    saved: &state::Saved,
    runtime_netns: Option<&File>,
    logger: &Logger,
) -> Result<(), String> {
    for (kind, count) in spec.hooks.left_out() {
        logger.debug(&format!("{count} {kind} hook(s) left out"));
    }
    let state = serde_json::json!({
        "ociVersion": spec.oci_version,
        "id": saved.id,
        "status": "creating",
        "pid": std::process::id(),
        "bundle": saved.bundle,
        "annotations": saved.annotations,
    });
    let state = serde_json::to_vec(&state).map_err(|e| e.to_string())?;
    for (kind, hook) in spec.hooks.at_create() {
        logger.debug(&format!("running the {kind} hook {}", hook.path.display()));
        super::hooks::run(kind, hook, &state, runtime_netns)?;
    }
    Ok(())
}

/// Runs on a thread inside the container's network namespace: carries its
/// interfaces into the VM and boots it there (the sandbox's VM process,
/// which opens the TAPs by name, inherits this thread's namespace). The
/// guest's init configures every interface from the `kiln.net=` words;
/// name servers are the root's /etc/resolv.conf (the engine's, copied in).
/// `record`: write network.json for `delete` (not for a namespace of the
/// monitor's own, which is gone with it or the engine's to remove).
fn boot_in_namespace(
    dir: &std::path::Path,
    namespace: &std::path::Path,
    mut config: VmConfig,
    record: bool,
) -> Result<(Sandbox, Option<Connection>), String> {
    let connection = network::connect().map_err(|e| format!("network: {e}"))?;
    let carried = connection.network().clone();
    if carried.interfaces.is_empty() {
        return Ok((build(config)?, None));
    }
    config.nets = carried.nets();
    let words = carried
        .kernel_net_words()
        .map_err(|e| format!("network: {e}"))?;
    config.extra_cmdline = Some(words.join(" "));
    let saved = state::SavedNetwork {
        namespace: namespace.to_path_buf(),
        network: carried,
    };
    if record {
        state::save_network(dir, &saved)?;
    }
    match build(config) {
        Ok(sandbox) => Ok((sandbox, Some(connection))),
        Err(e) => {
            // The connection goes with its drop; the record with it.
            drop(connection);
            state::forget_network(dir);
            Err(e)
        }
    }
}

/// Builds the VM of `config` with the `kiln` beside kiln-oci.
fn build(config: VmConfig) -> Result<Sandbox, String> {
    let mut builder = SandboxBuilder::from(config);
    if let Some(kiln) = kiln_beside_us() {
        builder = builder.kiln_binary(kiln);
    }
    builder.build().map_err(|e| boot_error(&e))
}

fn boot_error(e: &SandboxError) -> String {
    format!("booting the container's VM: {e}")
}

/// The `kiln` binary next to kiln-oci (it runs the VM, `kiln sandbox-vm`).
fn kiln_beside_us() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let kiln = exe.parent()?.join("kiln");
    kiln.is_file().then_some(kiln)
}

/// Hands each signal sent to the monitor to the main loop, until it ends.
fn forward_signals(signals: Forwarded, tx: Sender<Event>) {
    while let Some(signal) = signals.next() {
        if tx.send(Event::Forward(signal)).is_err() {
            return;
        }
    }
}

fn accept_loop(listener: UnixListener, tx: Sender<Event>, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let (tx, shared) = (tx.clone(), shared.clone());
        std::thread::spawn(move || serve(conn, tx, shared));
    }
}

/// One connection: one request, its reply (an exec's two).
fn serve(mut conn: UnixStream, tx: Sender<Event>, shared: Arc<Shared>) {
    let (request, fds) = match control::recv_with_fds::<Request>(&mut conn) {
        Ok(Some(got)) => got,
        Ok(None) => return,
        Err(e) => {
            let _ = control::send(&mut conn, &Reply::Error(format!("bad request: {e}")));
            return;
        }
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    let event = match request {
        Request::Exec(process) => return exec(conn, process, fds, &shared),
        Request::Start => Event::Start(reply_tx),
        Request::Kill { signal, all } => Event::Kill {
            signal,
            all,
            reply: reply_tx,
        },
        Request::Shutdown => Event::Shutdown(reply_tx),
        Request::Pause | Request::Resume => {
            let reply = pause_or_resume(&shared, matches!(request, Request::Resume));
            let _ = control::send(&mut conn, &reply);
            return;
        }
    };
    let reply = match tx.send(event) {
        Ok(()) => reply_rx
            .recv()
            .unwrap_or(Reply::Error("the container is ending".into())),
        Err(_) => Reply::Error("the container is ending".into()),
    };
    let _ = control::send(&mut conn, &reply);
}

/// Pauses the VM's vCPUs (`resume`: false) or lets them run on.
fn pause_or_resume(shared: &Shared, resume: bool) -> Reply {
    let sandbox = shared.sandbox.lock().unwrap_or_else(|e| e.into_inner());
    let Some(sandbox) = sandbox.as_ref() else {
        return Reply::Error("the container is ending".into());
    };
    let done = match resume {
        false => sandbox.pause(),
        true => sandbox.resume(),
    };
    match done {
        Ok(()) => Reply::Ok,
        Err(e) => Reply::Error(e.to_string()),
    }
}

/// The main loop: start, kill and shutdown requests, and the command's end.
/// The command runs with the monitor's stdio, or on `terminal`.
fn main_loop(
    shared: &Arc<Shared>,
    command: Command,
    terminal: Option<File>,
    tx: Sender<Event>,
    rx: Receiver<Event>,
) -> i32 {
    let mut command = Some(command);
    let mut terminal = terminal;
    let mut main: Option<ProcessHandle> = None;
    while let Ok(event) = rx.recv() {
        match event {
            Event::Start(reply) => {
                let Some(command) = command.take() else {
                    let _ = reply.send(Reply::Error("the container has already started".into()));
                    continue;
                };
                // The terminal's size now: the engine sets it after `create`.
                let command = match &terminal {
                    Some(terminal) => console::on_terminal(command, terminal),
                    None => command,
                };
                match spawn(shared, command) {
                    Ok(process) => {
                        main = Some(process.handle());
                        let tx = tx.clone();
                        let terminal = terminal.take();
                        std::thread::spawn(move || {
                            let status = run_main(process, terminal);
                            let _ = tx.send(Event::Exited(status));
                        });
                        let _ = reply.send(Reply::Ok);
                    }
                    Err(e) => {
                        let _ = reply.send(Reply::Error(e));
                        return 127;
                    }
                }
            }
            Event::Kill { signal, all, reply } => {
                if signal == 0 {
                    let _ = reply.send(Reply::Ok);
                    continue;
                }
                let Some(main) = &main else {
                    // Before `start`: the container ends as runc's init
                    // would, killed by the signal.
                    let _ = reply.send(Reply::Ok);
                    return 128 + signal;
                };
                let result = main.signal(signal);
                if all {
                    let execs = shared.execs.lock().unwrap_or_else(|e| e.into_inner());
                    for (_, exec) in execs.iter() {
                        let _ = exec.signal(signal);
                    }
                }
                match result {
                    Ok(()) => {
                        let _ = reply.send(Reply::Ok);
                    }
                    Err(_) if signal == libc::SIGKILL => {
                        // The agent is gone: SIGKILL ends the container anyway.
                        let _ = reply.send(Reply::Ok);
                        return 128 + signal;
                    }
                    Err(e) => {
                        let _ = reply.send(Reply::Error(format!("signalling the command: {e}")));
                    }
                }
            }
            Event::Forward(signal) => match &main {
                Some(main) => {
                    if let Err(e) = main.signal(signal) {
                        shared
                            .logger
                            .warn(&format!("passing signal {signal} to the command: {e}"));
                    }
                }
                // Before `start`, as a `kill` then.
                None if signal::ends_unstarted(signal) => return 128 + signal,
                None => {}
            },
            Event::Shutdown(reply) => {
                let _ = reply.send(Reply::Ok);
                return 128 + libc::SIGKILL;
            }
            Event::Exited(status) => return status,
        }
    }
    255
}

fn spawn(shared: &Shared, command: Command) -> Result<Process, String> {
    let sandbox = shared.sandbox.lock().unwrap_or_else(|e| e.into_inner());
    let sandbox = sandbox.as_ref().ok_or("the container is ending")?;
    sandbox.spawn(command).map_err(|e| e.to_string())
}

/// The container's command with the monitor's own stdio, or on `terminal`.
fn run_main(process: Process, terminal: Option<File>) -> i32 {
    let fds = match &terminal {
        Some(terminal) => [terminal.as_raw_fd(); 3],
        None => [0, 1, 2],
    };
    // SAFETY: dup of descriptors open in this process (the standard ones,
    // or the terminal, held above); each new one is owned by the File
    // made from it.
    let stdio = unsafe { fds.map(|fd| libc::dup(fd)) };
    if stdio.iter().any(|&fd| fd < 0) {
        return 255;
    }
    // SAFETY: each descriptor was just duplicated for this File alone.
    let files = unsafe { stdio.map(|fd| File::from_raw_fd(fd)) };
    pump_and_wait(process, files, terminal)
}

/// Copies `stdio[0]` to the command's stdin and its stdout and stderr to
/// `stdio[1]` and `stdio[2]`; returns its status once both outputs ended.
/// On a `terminal` (the command's is a guest terminal), its size is
/// followed meanwhile.
fn pump_and_wait(mut process: Process, stdio: [File; 3], terminal: Option<File>) -> i32 {
    let [stdin, stdout, stderr] = stdio;
    // The engine may hold its end of stdin open past the command's end:
    // the copy also stops when `ended` hangs up, after the command ended.
    let (ended, ended_tx) = match pipe() {
        Ok(pipe) => pipe,
        Err(e) => {
            eprintln!("kiln-oci: making a pipe: {e}");
            return 255;
        }
    };
    let resizes = terminal.and_then(|terminal| {
        let ended = ended.try_clone().ok()?;
        let resizer = process.handle();
        let resize = move |rows, cols| resizer.resize(rows, cols).is_ok();
        Some(std::thread::spawn(move || {
            console::follow_size(terminal, ended, resize)
        }))
    });
    let input = process
        .stdin()
        .map(|input| std::thread::spawn(move || copy_stdin(stdin, input, ended)));
    let outputs: Vec<JoinHandle<()>> = [
        process.stdout().map(|o| spawn_copy(o, stdout)),
        process.stderr().map(|e| spawn_copy(e, stderr)),
    ]
    .into_iter()
    .flatten()
    .collect();
    // Every byte is out before the end is collected: `wait` forgets the
    // command's queued output.
    for output in outputs {
        let _ = output.join();
    }
    let status = match process.wait() {
        Ok(ExitStatus::Code(c)) => c & 0xff,
        Ok(ExitStatus::Signal(s)) => 128 + s,
        Err(e) => {
            eprintln!("kiln-oci: {e}");
            255
        }
    };
    drop(ended_tx);
    for thread in [input, resizes].into_iter().flatten() {
        let _ = thread.join();
    }
    status
}

/// A pipe's read and write ends.
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these descriptors, owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Copies the engine's stdin to the command until the input ends, the
/// command stops taking it, or `ended` hangs up (the command has ended),
/// so neither this thread nor the descriptor outlives the command.
fn copy_stdin(stdin: File, mut input: ProcessStdin, ended: OwnedFd) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let mut fds = [stdin.as_raw_fd(), ended.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: two valid pollfds for the duration of the call; both
        // descriptors stay open (owned here).
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        match (&stdin).read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if input.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn spawn_copy(from: impl Read + Send + 'static, to: File) -> JoinHandle<()> {
    std::thread::spawn(move || copy(from, to))
}

fn copy(mut from: impl Read, mut to: impl Write) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// `exec`: runs `process` with the three descriptors the client sent and
/// answers `Started`, then `Exited(status)`.
fn exec(mut conn: UnixStream, process: ProcessSpec, fds: Vec<File>, shared: &Shared) {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let result = (|| {
        let fds: [File; 3] = fds
            .try_into()
            .map_err(|_| "exec needs stdin, stdout and stderr".to_string())?;
        let mut command = process.command()?;
        // The terminal is the three descriptors' one.
        let terminal = match process.terminal {
            true => Some(
                fds[0]
                    .try_clone()
                    .map_err(|e| format!("the terminal: {e}"))?,
            ),
            false => None,
        };
        if let Some(terminal) = &terminal {
            command = console::on_terminal(command, terminal);
        }
        Ok((spawn(shared, command)?, fds, terminal))
    })();
    let (process, fds, terminal) = match result {
        Ok(got) => got,
        Err(e) => {
            shared.logger.error(&format!("exec: {e}"));
            let _ = control::send(&mut conn, &Reply::Error(e));
            return;
        }
    };
    let key = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    shared
        .execs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((key, process.handle()));
    let _ = control::send(&mut conn, &Reply::Started);
    let status = pump_and_wait(process, fds, terminal);
    shared
        .execs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|(k, _)| *k != key);
    let _ = control::send(&mut conn, &Reply::Exited(status));
}
