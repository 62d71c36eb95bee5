//! The runtime's commands but `exec`: create, start, run, state, kill,
//! delete, pause, resume, ps, list, features.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use super::cli::{CreateArgs, DeleteArgs, GlobalArgs, KillArgs, ListArgs, PsArgs, RunArgs};
use super::control::{self, Reply, Request};
use super::log::Logger;
use super::settings::ContainerRoot;
use super::state::{self, ContainerDir, Saved, Status};
use super::{console, resources, settings, signal, spec};

/// How long `delete` waits for a monitor it asked to end before killing it.
const MONITOR_END_GRACE: Duration = Duration::from_secs(30);

/// `create`: checks the bundle, starts the monitor, waits until its VM is
/// up and writes the pid file. Leaves no state behind when it fails.
pub fn create(global: &GlobalArgs, logger: &Logger, args: &CreateArgs) -> Result<i32, String> {
    state::check_id(&args.id)?;
    let bundle = std::path::absolute(&args.bundle)
        .map_err(|e| format!("bundle {}: {e}", args.bundle.display()))?;
    let spec = spec::load(&bundle)?;
    let plan = spec.plan(&bundle)?;
    let process = spec.process()?;
    process.command()?;
    let console_socket = console::socket_for(process.terminal, args.console_socket.as_deref())?;
    let settings = settings::resolve(global)?;
    if let (ContainerRoot::Packed, Some(share)) = (settings.container_root, plan.shares.first()) {
        return Err(format!(
            "volume {} needs a shared container root (container_root = \"packed\" in kiln-oci's configuration)",
            share.guest_path
        ));
    }
    let limits = spec.linux.as_ref().and_then(|l| l.resources.as_ref());
    let (mem_bytes, vcpus) =
        resources::vm_size(&settings, limits, crate::memory::host_ram_bytes())?;
    let dir = ContainerDir::create(&global.root, &args.id)?;
    let mut saved = Saved {
        id: args.id.clone(),
        bundle,
        rootfs: plan.root,
        pid: 0,
        pid_start: 0,
        created: state::rfc3339_now(),
        annotations: spec.annotations,
        started: false,
        kernel: settings.kernel,
        mem_bytes,
        vcpus,
        paused: false,
        container_root: settings.container_root,
    };
    let result = dir.write(&saved).and_then(|()| {
        let terminal = console_socket.map(console::hand_over).transpose()?;
        let mut argv = global_argv(global);
        argv.push("monitor".into());
        if let Some(terminal) = &terminal {
            argv.extend([
                "--terminal-fd".into(),
                terminal.as_raw_fd().to_string().into(),
            ]);
        }
        argv.push("--ready-fd".into());
        let id = args.id.clone();
        let inherited = terminal.as_ref().map(|t| t.as_raw_fd());
        let (mut child, ready) =
            spawn_detached(argv, inherited, move |fd| vec![fd.into(), id.into()])?;
        // The monitor has its own copy.
        drop(terminal);
        let outcome = (|| {
            let pid = child.id() as i32;
            let (start, _) =
                state::process_start(pid).ok_or("the container monitor ended as it started")?;
            saved.pid = pid;
            saved.pid_start = start;
            dir.write(&saved)?;
            wait_ready(ready, &mut child, "the container monitor")?;
            if let Some(pid_file) = &args.pid_file {
                write_pid_file(pid_file, pid)?;
            }
            Ok(())
        })();
        if outcome.is_err() {
            let _ = child.kill();
            let _ = child.wait();
            if let Err(e) = state::release_network(dir.path()) {
                logger.warn(&e);
            }
        }
        outcome
    });
    match result {
        Ok(()) => {
            logger.debug(&format!("created {} (monitor {})", args.id, saved.pid));
            Ok(0)
        }
        Err(e) => {
            let _ = dir.remove();
            Err(e)
        }
    }
}

/// The global options a child of this call repeats (the monitor, a
/// detached exec's waiter), before its command.
pub(super) fn global_argv(global: &GlobalArgs) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec!["--root".into(), global.root.clone().into()];
    if let Some(log) = &global.log {
        argv.extend(["--log".into(), log.clone().into()]);
    }
    let format = match global.log_format {
        super::cli::LogFormat::Text => "text",
        super::cli::LogFormat::Json => "json",
    };
    argv.extend(["--log-format".into(), format.into()]);
    if global.debug {
        argv.push("--debug".into());
    }
    argv
}

/// Starts this program again with `argv` plus what `rest` makes of the
/// readiness pipe's descriptor number, in a session of its own (no
/// terminal signals from the engine's session), with this process's
/// stdio and `inherited` (a descriptor named in `argv`); returns it and
/// the pipe's read end. The child writes `ok` or its one-line error to
/// the pipe.
pub(super) fn spawn_detached(
    mut argv: Vec<OsString>,
    inherited: Option<RawFd>,
    rest: impl FnOnce(String) -> Vec<OsString>,
) -> Result<(Child, File), String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding kiln-oci itself: {e}"))?;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!(
            "making a pipe: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: pipe2 just returned these two descriptors, owned by nothing else.
    let (read, write) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let write_fd = write.as_raw_fd();
    argv.extend(rest(write_fd.to_string()));
    let mut command = std::process::Command::new(exe);
    command.args(argv);
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe calls (setsid, fcntl) on descriptors the
    // child inherited.
    unsafe {
        command.pre_exec(move || {
            libc::setsid();
            for fd in std::iter::once(write_fd).chain(inherited) {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(|e| format!("starting kiln-oci's child: {e}"))?;
    drop(write);
    Ok((child, read))
}

/// Reads the readiness line of `child` (`who`, for messages).
pub(super) fn wait_ready(ready: File, child: &mut Child, who: &str) -> Result<(), String> {
    let mut line = String::new();
    let _ = BufReader::new(ready).read_line(&mut line);
    match line.trim_end() {
        "ok" => Ok(()),
        "" => {
            let status = child
                .wait()
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            Err(format!("{who} ended before it was ready ({status})"))
        }
        error => Err(error.to_string()),
    }
}

/// Writes `pid` to `path` atomically (a temporary file renamed over it).
pub(super) fn write_pid_file(path: &Path, pid: i32) -> Result<(), String> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".kiln-oci.tmp");
    std::fs::write(&tmp, pid.to_string())
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("writing the pid file {}: {e}", path.display()))
}

/// `start`: the monitor runs the container's command.
pub fn start(global: &GlobalArgs, id: &str) -> Result<i32, String> {
    // Held until the state says started: a second `start` waits, then
    // finds the container running.
    let dir = ContainerDir::open(&global.root, id)?;
    let mut saved = dir.read()?;
    match saved.status() {
        Status::Created => {}
        Status::Running | Status::Paused => {
            return Err("cannot start an already running container".into())
        }
        Status::Stopped => return Err("cannot start a container that has stopped".into()),
    }
    match control::call(&dir.socket(), &Request::Start)? {
        Reply::Ok => {}
        Reply::Error(e) => return Err(e),
        other => return Err(format!("unexpected answer from the monitor: {other:?}")),
    }
    saved.started = true;
    dir.write(&saved)?;
    Ok(0)
}

/// `run`: create, start, and unless --detach wait for the command (as the
/// monitor's parent) and exit with its status after deleting the container.
pub fn run(global: &GlobalArgs, logger: &Logger, args: &RunArgs) -> Result<i32, String> {
    create(global, logger, &args.create)?;
    let id = &args.create.id;
    if let Err(e) = start(global, id) {
        let _ = delete(
            global,
            logger,
            &DeleteArgs {
                force: true,
                id: id.clone(),
            },
        );
        return Err(e);
    }
    if args.detach {
        return Ok(0);
    }
    let saved = ContainerDir::open(&global.root, id)?.read()?;
    let status = wait_child(saved.pid);
    delete(
        global,
        logger,
        &DeleteArgs {
            force: true,
            id: id.clone(),
        },
    )?;
    Ok(status)
}

/// Waits for child `pid` and returns its status as a shell reports it.
fn wait_child(pid: i32) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes only `status`.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return 255;
        }
    }
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }
}

/// `state`: the OCI state JSON.
pub fn state(global: &GlobalArgs, id: &str) -> Result<i32, String> {
    let saved = ContainerDir::open(&global.root, id)?.read()?;
    let json = serde_json::to_string_pretty(&saved.oci_state()).map_err(|e| e.to_string())?;
    println!("{json}");
    Ok(0)
}

/// `kill`: the signal goes to the command in the guest (to every command
/// with --all); before `start`, the container ends with 128+signal.
pub fn kill(global: &GlobalArgs, args: &KillArgs) -> Result<i32, String> {
    let signal = signal::parse(&args.signal)?;
    let saved = ContainerDir::open(&global.root, &args.id)?.read()?;
    if saved.status() == Status::Stopped {
        return Err("container not running".into());
    }
    let request = Request::Kill {
        signal,
        all: args.all,
    };
    let socket = state::socket_path(&global.root.join(&args.id));
    match control::call(&socket, &request) {
        Ok(Reply::Ok) => Ok(0),
        Ok(Reply::Error(e)) => Err(e),
        Ok(other) => Err(format!("unexpected answer from the monitor: {other:?}")),
        // It ended meanwhile.
        Err(_) if saved.status() == Status::Stopped => Err("container not running".into()),
        Err(e) => Err(e),
    }
}

/// `pause` (`resume`: false) and `resume`: the VM's vCPUs stop where they
/// are, so nothing of the container runs, and go on. The state says
/// "paused" in between; `kill` and `delete --force` work on a paused
/// container, `exec` does not (as runc's freezer).
pub fn pause_or_resume(global: &GlobalArgs, id: &str, resume: bool) -> Result<i32, String> {
    let dir = ContainerDir::open(&global.root, id)?;
    let mut saved = dir.read()?;
    match (saved.status(), resume) {
        (Status::Running, false) | (Status::Paused, true) => {}
        (Status::Paused, false) => return Err("container already paused".into()),
        (_, false) => return Err("container not running".into()),
        (_, true) => return Err("container not paused".into()),
    }
    let request = match resume {
        false => Request::Pause,
        true => Request::Resume,
    };
    match control::call(&dir.socket(), &request)? {
        Reply::Ok => {}
        Reply::Error(e) => return Err(e),
        other => return Err(format!("unexpected answer from the monitor: {other:?}")),
    }
    saved.paused = !resume;
    dir.write(&saved)?;
    Ok(0)
}

/// `delete`: ends the VM (a running container only with --force) and
/// removes the state.
pub fn delete(global: &GlobalArgs, logger: &Logger, args: &DeleteArgs) -> Result<i32, String> {
    let dir = match ContainerDir::open(&global.root, &args.id) {
        Ok(dir) => dir,
        // runc: deleting what is gone succeeds with --force.
        Err(_) if args.force => return Ok(0),
        Err(e) => return Err(e),
    };
    let saved = dir.read()?;
    match saved.status() {
        Status::Stopped => {}
        status @ (Status::Running | Status::Paused) if !args.force => {
            return Err(format!(
                "cannot delete container {} that is not stopped: {}",
                args.id,
                status.as_str()
            ))
        }
        Status::Created | Status::Running | Status::Paused => end_monitor(&dir, &saved),
    }
    // A monitor that was killed left the container's network connected.
    if let Err(e) = state::release_network(dir.path()) {
        logger.warn(&e);
    }
    dir.remove()?;
    Ok(0)
}

/// Asks the monitor to end its VM and waits for it to exit; kills it past
/// the grace period.
fn end_monitor(dir: &ContainerDir, saved: &Saved) {
    let _ = control::call(&dir.socket(), &Request::Shutdown);
    let deadline = Instant::now() + MONITOR_END_GRACE;
    if !wait_exit(saved.pid, saved.pid_start, deadline) {
        // SAFETY: kill(2) with the monitor's pid, checked against its start
        // time just before (pid reuse).
        if state::monitor_alive(saved.pid, saved.pid_start) {
            unsafe { libc::kill(saved.pid, libc::SIGKILL) };
        }
        wait_exit(
            saved.pid,
            saved.pid_start,
            Instant::now() + MONITOR_END_GRACE,
        );
    }
}

/// Waits until process `pid` (started at `start`) has exited (a zombie
/// counts), without being its parent: its pidfd becomes readable then.
/// False at the deadline.
fn wait_exit(pid: i32, start: u64, deadline: Instant) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return true; // gone already
    }
    // SAFETY: the descriptor was just returned to this process.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    if !state::monitor_alive(pid, start) {
        return true; // exited, or the pid was reused
    }
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut pfd = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, ms.max(1)) } > 0 {
            return true;
        }
    }
}

/// `ps`: the container's host process, its monitor (the command runs in
/// the guest).
pub fn ps(global: &GlobalArgs, args: &PsArgs) -> Result<i32, String> {
    let saved = ContainerDir::open(&global.root, &args.id)?.read()?;
    let pids: Vec<i32> = match saved.status() {
        Status::Stopped => vec![],
        _ => vec![saved.pid],
    };
    match args.format.as_str() {
        "json" => println!("{}", serde_json::to_string(&pids).unwrap_or_default()),
        "table" => {
            println!("PID");
            for pid in pids {
                println!("{pid}");
            }
        }
        other => return Err(format!("invalid format \"{other}\" (table or json)")),
    }
    Ok(0)
}

/// `list`: every container under --root.
pub fn list(global: &GlobalArgs, args: &ListArgs) -> Result<i32, String> {
    let mut all: Vec<Saved> = match std::fs::read_dir(&global.root) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| state::read_saved(&e.path()).ok())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => return Err(format!("reading {}: {e}", global.root.display())),
    };
    all.sort_by(|a, b| a.id.cmp(&b.id));
    if args.quiet {
        for saved in &all {
            println!("{}", saved.id);
        }
        return Ok(0);
    }
    match args.format.as_str() {
        "json" => {
            let states: Vec<_> = all.iter().map(Saved::oci_state).collect();
            println!("{}", serde_json::to_string(&states).unwrap_or_default());
        }
        "table" => {
            println!("ID\tPID\tSTATUS\tBUNDLE\tCREATED\tOWNER");
            for saved in &all {
                let status = saved.status();
                let pid = if status == Status::Stopped {
                    0
                } else {
                    saved.pid
                };
                println!(
                    "{}\t{pid}\t{}\t{}\t{}\troot",
                    saved.id,
                    status.as_str(),
                    saved.bundle.display(),
                    saved.created
                );
            }
        }
        other => return Err(format!("invalid format \"{other}\" (table or json)")),
    }
    Ok(0)
}

/// `features`: what this runtime takes (the runtime-spec's features JSON).
pub fn features() -> Result<i32, String> {
    let features = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.1.0",
        "hooks": [],
        "mountOptions": ["bind", "rbind", "ro", "rw"],
        "linux": {
            "namespaces": [],
            "capabilities": [],
            "cgroup": {"v1": false, "v2": false, "systemd": false, "systemdUser": false},
            "seccomp": {"enabled": false},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {
            "io.github.kiln.runtime": "micro-vm",
            "io.github.kiln.terminal": "process.terminal: a host pty (master sent to --console-socket) copied to a guest terminal, its size followed",
            "io.github.kiln.network": "the network namespace's interfaces are carried into the VM (TAP + tc mirred redirect)"
        }
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&features).unwrap_or_default()
    );
    Ok(0)
}
