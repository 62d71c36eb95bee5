//! `exec`: another command in a running container. The monitor runs it
//! with this call's stdin, stdout and stderr (sent over the control
//! socket) and reports its status, which this call exits with. With
//! --detach a child of this call (its pid in --pid-file) does that, and
//! this call returns once the command runs.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

use super::cli::{ExecArgs, GlobalArgs};
use super::commands::{spawn_detached, wait_ready, write_pid_file};
use super::console;
use super::control::{self, Reply, Request};
use super::spec::{self, ProcessSpec};
use super::state::{ContainerDir, Status};

/// Runs `kiln-oci exec`.
pub fn exec(global: &GlobalArgs, args: &ExecArgs) -> Result<i32, String> {
    let saved = ContainerDir::open(&global.root, &args.id)?.read()?;
    match saved.status() {
        Status::Stopped => return Err("cannot exec in a stopped container".into()),
        Status::Paused => return Err("cannot exec in a paused container".into()),
        Status::Created | Status::Running => {}
    }
    let mut process = match &args.process {
        Some(path) => {
            let text = std::fs::read(path)
                .map_err(|e| format!("reading the process file {}: {e}", path.display()))?;
            serde_json::from_slice::<ProcessSpec>(&text)
                .map_err(|e| format!("{} is not a valid process: {e}", path.display()))?
        }
        None => from_arguments(&saved.bundle, args)?,
    };
    process.terminal |= args.tty;
    // Refused here, with one line, rather than by the monitor.
    process.command()?;
    let console_socket = console::socket_for(process.terminal, args.console_socket.as_deref())?;
    if args.detach && args.ready_fd.is_none() {
        return detach(args);
    }
    // SAFETY: the waiter's readiness descriptor, left open by its parent
    // for this process alone.
    let mut ready = args.ready_fd.map(|fd| unsafe { File::from_raw_fd(fd) });
    let result = run(
        &global.root.join(&args.id),
        process,
        console_socket,
        &mut ready,
    );
    if let (Err(e), Some(ready)) = (&result, ready.as_mut()) {
        let _ = writeln!(ready, "{e}");
    }
    result
}

/// The process of `exec ID COMMAND...`: the container's own environment,
/// working directory and user, changed by --env, --cwd and --user.
fn from_arguments(bundle: &std::path::Path, args: &ExecArgs) -> Result<ProcessSpec, String> {
    if args.command.is_empty() {
        return Err("exec needs a command (or --process FILE)".into());
    }
    let mut process = spec::load(bundle)?.process()?.clone();
    process.args = args.command.clone();
    process.terminal = false; // --tty says
    for entry in &args.env {
        let key = entry.split('=').next().unwrap_or_default();
        process
            .env
            .retain(|e| e.split('=').next().unwrap_or_default() != key);
        process.env.push(entry.clone());
    }
    if let Some(cwd) = &args.cwd {
        process.cwd = cwd.clone();
    }
    if let Some(user) = &args.user {
        let (uid, gid) = user.split_once(':').unwrap_or((user, ""));
        let number = |s: &str| {
            s.parse::<u32>()
                .map_err(|_| format!("--user {user}: UID[:GID] with numbers"))
        };
        process.user.uid = number(uid)?;
        process.user.gid = match gid {
            "" => process.user.uid,
            gid => number(gid)?,
        };
    }
    Ok(process)
}

/// --detach: a child runs the exec (its pid goes to --pid-file) and this
/// returns once the command runs.
fn detach(args: &ExecArgs) -> Result<i32, String> {
    // The same command line, the waiter's pipe added after `exec`.
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let at = argv
        .iter()
        .position(|a| a == "exec")
        .ok_or("cannot find the exec command in the arguments")?;
    let (before, after) = argv.split_at(at + 1);
    let after = after.to_vec();
    let (mut child, ready) = spawn_detached(before.to_vec(), None, move |fd| {
        let mut rest: Vec<OsString> = vec!["--ready-fd".into(), fd.into()];
        rest.extend(after);
        rest
    })?;
    if let Err(e) = wait_ready(ready, &mut child, "the exec process") {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    if let Some(pid_file) = &args.pid_file {
        write_pid_file(pid_file, child.id() as i32)?;
    }
    Ok(0)
}

/// Asks the monitor of the container in `dir` to run `process` with this
/// process's stdio, or on a terminal whose master goes to
/// `console_socket`; returns its status.
fn run(
    dir: &std::path::Path,
    process: ProcessSpec,
    console_socket: Option<&Path>,
    ready: &mut Option<File>,
) -> Result<i32, String> {
    let mut conn = control::connect(&super::state::socket_path(dir))?;
    let terminal = console_socket.map(console::hand_over).transpose()?;
    // The terminal's slave, or this process's stdin, stdout and stderr.
    let stdio = match &terminal {
        Some(terminal) => [terminal.as_raw_fd(); 3],
        None => [0, 1, 2],
    };
    control::send_with_fds(&mut conn, &Request::Exec(process), &stdio)
        .map_err(|e| format!("sending the command to the container monitor: {e}"))?;
    loop {
        match control::recv::<Reply>(&mut conn) {
            Ok(Some(Reply::Started)) => {
                if let Some(mut ready) = ready.take() {
                    let _ = ready.write_all(b"ok\n");
                }
            }
            Ok(Some(Reply::Exited(status))) => return Ok(status),
            Ok(Some(Reply::Error(e))) => return Err(e),
            Ok(Some(Reply::Ok)) => {}
            Ok(None) => return Err("the container monitor ended during exec".into()),
            Err(e) => return Err(format!("waiting for the exec'd command: {e}")),
        }
    }
}
