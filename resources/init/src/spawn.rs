//! Starting the agent's commands without copying the agent.
//!
//! `std::process::Command` forks when it must change ids or run `pre_exec`
//! code (the agent does both): the kernel then copies the agent's page
//! tables, the child takes copy-on-write faults until it execs, and the
//! parent waits on a pipe for the exec. In a guest whose kernel code is
//! emulated (PVM hosts) that is a large part of a command's start. Here the
//! child is a `clone(CLONE_VM | CLONE_VFORK)`: it runs on a stack of its
//! own in the agent's memory, makes only raw system calls on data prepared
//! beforehand, and the agent resumes once it has exec'd (or failed, with
//! its errno left in shared memory), as glibc's `posix_spawn` does.
//!
//! The command gets what `ExecSpec::to_command` gives it (environment,
//! supplementary groups, resource limits, ids,
//! working directory, `PR_SET_NO_NEW_PRIVS` for an unprivileged uid) plus a
//! session of its own (setsid), its stdio, an empty signal mask and SIGPIPE
//! at its default; on a terminal (see [`Stdio::Terminal`]) that session's
//! controlling terminal is the command's stdio. `argv[0]` without a slash is searched in the command's
//! own `PATH` as `execvp` does; directories without that name are skipped
//! before the clone by a cheap existence check, since a failed `execve`
//! builds and tears down a whole address space in the guest kernel.

use crate::protocol::WindowSize;
use crate::spec::{ExecSpec, PLATFORM_ENV};
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// The child's stack: it makes a handful of system calls, nothing more.
const CHILD_STACK: usize = 64 << 10;
/// The kernel's signal set size (64 signals).
const SIGSET_BYTES: usize = 8;

/// A command's stdin, stdout and stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stdio {
    /// Pipes for stdout and stderr; stdin a pipe when `stdin`, else
    /// /dev/null.
    Pipes {
        /// Stdin is a pipe the agent writes.
        stdin: bool,
    },
    /// A new pseudo-terminal of this window size: its slave is the
    /// command's stdin, stdout, stderr and controlling terminal (owned by
    /// the command's user); the agent keeps the master.
    Terminal(WindowSize),
}

/// A started command: its pid and the agent's ends of its stdio.
#[derive(Debug)]
pub struct Child {
    /// The command's pid (also its session and process group id).
    pub pid: libc::pid_t,
    /// Its stdin pipe, when asked for (never with a terminal: the master
    /// takes input).
    pub stdin: Option<OwnedFd>,
    /// Its stdout pipe, or the terminal's master.
    pub stdout: OwnedFd,
    /// Its stderr pipe (none with a terminal).
    pub stderr: Option<OwnedFd>,
}

/// Reused child stacks (one at a time: the agent is suspended while a
/// child runs on it), so only the first spawn faults its pages in.
#[derive(Default)]
pub struct Spawner {
    stack: Vec<u8>,
}

/// Everything the child reads, prepared by the parent (the child must not
/// allocate: it shares the parent's heap and the parent's allocator may be
/// in any state).
struct Plan {
    /// Program paths to try, in order (`execvp`'s search, pre-filtered).
    programs: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// The fds to put at 0, 1 and 2.
    stdio: [RawFd; 3],
    /// Make stdin the controlling terminal of the new session.
    controlling_terminal: bool,
    cwd: Option<CString>,
    creds: Credentials,
    /// Written by the child: the errno that stopped it (0: it exec'd).
    error: libc::c_int,
}

impl Spawner {
    /// Starts `spec` with `default_ids` when it names none (see
    /// `ExecSpec::ids`), on `stdio`. Errors are those the command's start
    /// met (ENOENT for a program not found, EACCES, a failed setuid or
    /// chdir, no pseudo-terminal to be had ...).
    pub fn spawn(
        &mut self,
        spec: &ExecSpec,
        default_ids: Option<(u32, u32)>,
        stdin: Stdio,
    ) -> io::Result<Child> {
        self.spawn_with(spec, std::env::var_os(PLATFORM_ENV), default_ids, stdin)
    }

    /// `spawn` with the agent's [`PLATFORM_ENV`] value given.
    pub fn spawn_with(
        &mut self,
        spec: &ExecSpec,
        platform: Option<OsString>,
        default_ids: Option<(u32, u32)>,
        stdio: Stdio,
    ) -> io::Result<Child> {
        let cstring = |b: &[u8]| CString::new(b).map_err(|_| einval());
        let env = spec.environment(platform);
        // execvp searches the command's own PATH (there is always one).
        let path = env
            .get(OsStr::new("PATH"))
            .map_or(&[][..], |p| p.as_bytes());
        let programs = search(&spec.argv[0], path)?;
        let env: Vec<CString> = env
            .iter()
            .map(|(k, v)| cstring(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
            .collect::<io::Result<_>>()?;
        let args: Vec<CString> = spec
            .argv
            .iter()
            .map(|a| cstring(a))
            .collect::<io::Result<_>>()?;
        let cwd = spec.cwd.as_deref().map(cstring).transpose()?;

        let (uid, gid) = spec.ids(default_ids);
        // The agent's ends, and the fds the child takes as 0, 1 and 2
        // (closed here once it has them).
        let (parent_in, stdout, stderr, child_stdio) = match stdio {
            Stdio::Pipes { stdin } => {
                let (child_in, parent_in) = match stdin {
                    true => {
                        let (r, w) = pipe()?;
                        (r, Some(w))
                    }
                    false => (dev_null()?, None),
                };
                let (stdout, child_out) = pipe()?;
                let (stderr, child_err) = pipe()?;
                (
                    parent_in,
                    stdout,
                    Some(stderr),
                    vec![child_in, child_out, child_err],
                )
            }
            Stdio::Terminal(size) => {
                let (master, slave) = open_terminal(size, uid, gid)?;
                (None, master, None, vec![slave])
            }
        };
        let controlling_terminal = matches!(stdio, Stdio::Terminal(_));
        let fd_at = |i: usize| child_stdio[i.min(child_stdio.len() - 1)].as_raw_fd();
        // SAFETY: plain syscall without arguments.
        let root = unsafe { libc::getuid() } == 0;
        let mut plan = Plan {
            argv: nul_terminated(&args),
            envp: nul_terminated(&env),
            programs,
            stdio: [fd_at(0), fd_at(1), fd_at(2)],
            controlling_terminal,
            cwd,
            creds: Credentials::new(spec, default_ids, root),
            error: 0,
        };
        if self.stack.len() < CHILD_STACK {
            self.stack = vec![0u8; CHILD_STACK];
        }
        // The stack grows down from its (16-byte aligned) top.
        let top = self.stack.as_mut_ptr_range().end as usize & !15;
        let pid = with_signals_blocked(|| {
            // SAFETY: `child` only makes raw system calls on `plan`, which
            // lives (unmoved) until clone returns: CLONE_VFORK suspends this
            // thread until the child has exec'd or exited. The stack is
            // ours alone meanwhile. All signals are blocked, so no handler
            // runs on the shared memory before the child resets its mask.
            unsafe {
                libc::clone(
                    child,
                    top as *mut libc::c_void,
                    libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                    (&mut plan as *mut Plan).cast(),
                )
            }
        });
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the child is done with `plan` (exec'd or exited).
        let error = unsafe { std::ptr::read_volatile(&plan.error) };
        if error != 0 {
            // SAFETY: reaping the child that just exited; plain syscall.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            return Err(io::Error::from_raw_os_error(error));
        }
        Ok(Child {
            pid,
            stdin: parent_in,
            stdout,
            stderr,
        })
    }
}

/// A command's supplementary groups, resource limits and ids, prepared
/// before the fork (applied in the child, which must not allocate).
#[derive(Debug)]
pub(crate) struct Credentials {
    /// setgroups(2) with these (root changing its uid drops its own
    /// groups, as std does; a spec's groups are set whenever given).
    groups: Option<Vec<libc::gid_t>>,
    /// prlimit64(2) of the command itself: (resource, [soft, hard]).
    rlimits: Vec<(libc::c_uint, [u64; 2])>,
    gid: Option<libc::gid_t>,
    uid: Option<libc::uid_t>,
    /// An unprivileged command cannot regain root's powers through a
    /// set-uid program or file capability.
    no_new_privs: bool,
}

impl Credentials {
    /// `spec`'s groups, limits and ids (`default_ids` when it names none:
    /// see `ExecSpec::ids`), for a parent running as root or not.
    pub(crate) fn new(spec: &ExecSpec, default_ids: Option<(u32, u32)>, root: bool) -> Self {
        let (uid, gid) = spec.ids(default_ids);
        let groups = match spec.groups.is_empty() {
            false => Some(spec.groups.clone()),
            true if uid.is_some() && root => Some(Vec::new()),
            true => None,
        };
        Self {
            groups,
            rlimits: spec
                .rlimits
                .iter()
                .map(|l| (l.resource.number(), [l.soft, l.hard]))
                .collect(),
            gid,
            uid,
            no_new_privs: uid.is_some_and(|u| u != 0),
        }
    }

    /// Groups, then limits, then gid and uid: setting groups and raising
    /// a hard limit need root's capabilities, which setuid takes away.
    /// Returns the errno of the step that failed.
    ///
    /// # Safety
    /// Only raw system calls on `self` (no allocation, no locks): callable
    /// in a child between fork (or a `CLONE_VM` clone) and exec.
    pub(crate) unsafe fn apply(&self) -> Result<(), libc::c_int> {
        let sys = |r: libc::c_long| match r {
            r if r < 0 => Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)),
            _ => Ok(()),
        };
        if let Some(groups) = &self.groups {
            sys(libc::syscall(
                libc::SYS_setgroups,
                groups.len(),
                groups.as_ptr(),
            ))?;
        }
        for (resource, limits) in &self.rlimits {
            sys(libc::syscall(
                libc::SYS_prlimit64,
                0,
                *resource,
                limits.as_ptr(),
                std::ptr::null_mut::<u64>(),
            ))?;
        }
        if let Some(gid) = self.gid {
            sys(libc::syscall(libc::SYS_setgid, gid))?;
        }
        if let Some(uid) = self.uid {
            sys(libc::syscall(libc::SYS_setuid, uid))?;
        }
        if self.no_new_privs {
            sys(libc::syscall(
                libc::SYS_prctl,
                libc::PR_SET_NO_NEW_PRIVS,
                1,
                0,
                0,
                0,
            ))?;
        }
        Ok(())
    }
}

/// The child: stdio, ids, working directory, signals, session, exec. Only
/// raw system calls (no allocation, no locks, no libc state).
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `Plan`, alive and not touched by the
    // parent until this child execs or exits.
    let plan = unsafe { &mut *arg.cast::<Plan>() };
    // SAFETY: raw system calls on fds, ids and strings the plan holds.
    let error = unsafe { set_up(plan) };
    // SAFETY: the parent reads it once this child has exited.
    unsafe { std::ptr::write_volatile(&mut plan.error, error) };
    // SAFETY: ends this child only (no atexit handlers, no stdio flush).
    unsafe { libc::syscall(libc::SYS_exit, 127) };
    127
}

/// Everything before the exec; returns the errno that stopped it.
///
/// # Safety
/// Only in the child of a `CLONE_VM | CLONE_VFORK` clone, on a valid plan.
unsafe fn set_up(plan: &Plan) -> libc::c_int {
    let errno = || {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    let sys = |r: libc::c_long| if r < 0 { Err(errno()) } else { Ok(()) };
    let steps = || -> Result<(), libc::c_int> {
        for (to, &from) in plan.stdio.iter().enumerate() {
            if from == to as RawFd {
                // dup2 onto itself keeps close-on-exec: clear it instead.
                sys(libc::syscall(libc::SYS_fcntl, from, libc::F_SETFD, 0))?;
            } else {
                sys(libc::syscall(libc::SYS_dup2, from, to))?;
            }
        }
        plan.creds.apply()?;
        if let Some(cwd) = &plan.cwd {
            sys(libc::syscall(libc::SYS_chdir, cwd.as_ptr()))?;
        }
        // The agent ignores SIGPIPE; a command starts with the default.
        // The kernel's struct sigaction: handler, flags, restorer, mask;
        // all zero is SIG_DFL.
        let default_action = [0u64; 4];
        sys(libc::syscall(
            libc::SYS_rt_sigaction,
            libc::SIGPIPE,
            default_action.as_ptr(),
            std::ptr::null_mut::<u64>(),
            SIGSET_BYTES,
        ))?;
        let no_signals = 0u64;
        sys(libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &no_signals as *const u64,
            std::ptr::null_mut::<u64>(),
            SIGSET_BYTES,
        ))?;
        sys(libc::syscall(libc::SYS_setsid))?;
        if plan.controlling_terminal {
            // The new session has no terminal yet: stdin's becomes its own.
            sys(libc::syscall(libc::SYS_ioctl, 0, libc::TIOCSCTTY, 0))?;
        }
        Ok(())
    };
    if let Err(e) = steps() {
        return e;
    }
    exec(plan)
}

/// `execvp`'s loop over the candidates: a missing one is skipped, EACCES
/// is remembered and the search goes on, any other error ends it; a file
/// the kernel cannot execute (no `#!`) is run by `/bin/sh`.
///
/// # Safety
/// As `set_up`.
unsafe fn exec(plan: &Plan) -> libc::c_int {
    let mut eacces = false;
    let mut last = libc::ENOENT;
    for program in &plan.programs {
        libc::syscall(
            libc::SYS_execve,
            program.as_ptr(),
            plan.argv.as_ptr(),
            plan.envp.as_ptr(),
        );
        let e = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        match e {
            libc::EACCES => eacces = true,
            libc::ENOENT | libc::ESTALE | libc::ENOTDIR | libc::ENODEV | libc::ETIMEDOUT => {}
            libc::ENOEXEC => return script(plan, program),
            e => return e,
        }
        last = e;
    }
    if eacces {
        libc::EACCES
    } else {
        last
    }
}

/// Runs `program` (not an executable format) as glibc's execvp does:
/// `/bin/sh program args...`, on the child's stack (no allocation).
///
/// # Safety
/// As `set_up`.
unsafe fn script(plan: &Plan, program: &CString) -> libc::c_int {
    const MAX_ARGS: usize = 1024;
    let args = plan.argv.len() - 1; // without the terminating null
    if args + 2 > MAX_ARGS {
        return libc::E2BIG;
    }
    let mut argv = [std::ptr::null::<libc::c_char>(); MAX_ARGS];
    argv[0] = c"/bin/sh".as_ptr();
    argv[1] = program.as_ptr();
    argv[2..args + 1].copy_from_slice(&plan.argv[1..args]);
    libc::syscall(libc::SYS_execve, argv[0], argv.as_ptr(), plan.envp.as_ptr());
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// The paths `execvp` would try for `name` with `path` (its `PATH`), minus
/// those that do not exist (`ENOENT`/`ENOTDIR`: execve would skip them
/// too). A name with a slash is the one path. An empty list means not found.
fn search(name: &[u8], path: &[u8]) -> io::Result<Vec<CString>> {
    if name.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    let cstring = |b: Vec<u8>| CString::new(b).map_err(|_| einval());
    if name.contains(&b'/') {
        return Ok(vec![cstring(name.to_vec())?]);
    }
    let mut found = Vec::new();
    for dir in path.split(|&b| b == b':') {
        // An empty entry is the working directory, as for execvp.
        let mut candidate = match dir.is_empty() {
            true => Vec::new(),
            false => [dir, b"/"].concat(),
        };
        candidate.extend_from_slice(name);
        let candidate = cstring(candidate)?;
        // SAFETY: a valid C string; plain syscall.
        if unsafe { libc::access(candidate.as_ptr(), libc::F_OK) } != 0 {
            let e = io::Error::last_os_error().raw_os_error();
            if matches!(e, Some(libc::ENOENT | libc::ENOTDIR)) {
                continue;
            }
        }
        found.push(candidate);
    }
    if found.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    Ok(found)
}

fn nul_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    let mut v: Vec<_> = strings.iter().map(|s| s.as_ptr()).collect();
    v.push(std::ptr::null());
    v
}

/// Runs `f` with every signal blocked in this thread.
fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigset_t is plain data; sigfillset and pthread_sigmask only
    // read and write the sets given.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let result = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        result
    }
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two fresh fds owned by no one else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A new pseudo-terminal of `size`: (master, slave), both close-on-exec,
/// the master's slave side owned by `uid`/`gid` when given (the command's
/// user, who may then reopen it by name, as `login` arranges).
fn open_terminal(
    size: WindowSize,
    uid: Option<u32>,
    gid: Option<u32>,
) -> io::Result<(OwnedFd, OwnedFd)> {
    let check = |r: libc::c_int| match r {
        r if r < 0 => Err(io::Error::last_os_error()),
        r => Ok(r),
    };
    // SAFETY: plain syscall; the fd is owned below.
    let master =
        check(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: a fresh fd owned by no one else.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let m = master.as_raw_fd();
    let mut name = [0 as libc::c_char; 64];
    // SAFETY: calls on the master fd we own; `name` is a writable buffer of
    // the given length, NUL-terminated by ptsname_r on success.
    unsafe {
        check(libc::grantpt(m))?;
        check(libc::unlockpt(m))?;
        let r = libc::ptsname_r(m, name.as_mut_ptr(), name.len());
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
    }
    let winsize = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `winsize` is a valid struct the kernel only reads.
    check(unsafe { libc::ioctl(m, libc::TIOCSWINSZ, &winsize) })?;
    // SAFETY: `name` is NUL-terminated (ptsname_r succeeded); the fd is
    // owned below.
    let slave = check(unsafe {
        libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: a fresh fd owned by no one else.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    if uid.is_some() || gid.is_some() {
        let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
        // SAFETY: plain syscall on an fd we own; -1 keeps that id.
        check(unsafe { libc::fchown(slave.as_raw_fd(), u, g) })?;
    }
    Ok((master, slave))
}

fn dev_null() -> io::Result<OwnedFd> {
    // SAFETY: a valid C string; the fd is owned below.
    let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;

    /// Runs `spec` to its end: (status, stdout, stderr).
    fn run(spec: &ExecSpec, input: Option<&[u8]>) -> io::Result<(i32, String, String)> {
        let stdio = Stdio::Pipes {
            stdin: input.is_some(),
        };
        let child = Spawner::default().spawn_with(spec, None, None, stdio)?;
        if let (Some(fd), Some(input)) = (child.stdin, input) {
            std::fs::File::from(fd).write_all(input)?;
        }
        let read = |fd: OwnedFd| {
            let mut s = String::new();
            std::fs::File::from(fd).read_to_string(&mut s).map(|_| s)
        };
        let (out, err) = (read(child.stdout)?, read(child.stderr.unwrap())?);
        let mut st = 0;
        // SAFETY: reaping our own child; `st` is a valid out pointer.
        assert_eq!(unsafe { libc::waitpid(child.pid, &mut st, 0) }, child.pid);
        Ok((libc::WEXITSTATUS(st), out, err))
    }

    fn sh(script: &str) -> ExecSpec {
        ExecSpec::new(["sh", "-c", script])
    }

    /// The command reads its stdin pipe and writes both output pipes; it
    /// leads its own session, and starts with no signal blocked and SIGPIPE
    /// at its default, although this test process ignores it (as the agent
    /// does).
    #[test]
    fn a_command_gets_its_pipes_a_session_and_default_signals() {
        let script = "read x; echo \"got $x\"; grep -E '^Sig(Ign|Blk)' /proc/self/status; \
                      echo sid=$(cut -d' ' -f6 /proc/self/stat) pid=$$; echo oops >&2; exit 3";
        let (status, out, err) = run(&sh(script), Some(b"hi\n")).unwrap();
        assert_eq!(status, 3);
        assert_eq!(err, "oops\n");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "got hi");
        assert_eq!(lines[1], "SigBlk:\t0000000000000000", "{out}");
        // Only SIGPIPE is reset (as std does): other ignored signals of the
        // agent's own parent stay ignored across exec.
        let ignored = lines[2].strip_prefix("SigIgn:\t").unwrap();
        let ignored = u64::from_str_radix(ignored, 16).unwrap();
        assert_eq!(ignored & 1 << (libc::SIGPIPE - 1), 0, "{out}");
        let (sid, pid) = lines[3].split_once(' ').unwrap();
        assert_eq!(sid.strip_prefix("sid="), pid.strip_prefix("pid="), "{out}");
        // Without stdin: /dev/null.
        assert_eq!(run(&sh("cat; echo end"), None).unwrap().1, "end\n");
    }

    /// The spec's environment only (with the default PATH), and its
    /// working directory.
    #[test]
    fn a_command_gets_the_specs_environment_and_directory() {
        let mut spec = sh("echo \"$A|$PATH|$(pwd)\"; env | wc -l");
        spec.env.push((b"A".to_vec(), b"1".to_vec()));
        spec.env.push((b"A".to_vec(), b"2".to_vec()));
        spec.cwd = Some(b"/tmp".to_vec());
        let (_, out, _) = run(&spec, None).unwrap();
        let path = String::from_utf8_lossy(crate::spec::DEFAULT_PATH);
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some(format!("2|{path}|/tmp").as_str()));
        // A, PATH, and what sh itself adds (PWD, maybe SHLVL and _).
        let count: usize = lines.next().unwrap().trim().parse().unwrap();
        assert!((2..=5).contains(&count), "{count} variables: {out}");
    }

    /// execvp's search: missing directories and names are skipped, a file
    /// without execute permission is passed over (and reported when nothing
    /// else is found), a file without `#!` runs under /bin/sh, a name with a
    /// slash is not searched; a start that fails in the child is an error.
    #[test]
    fn the_path_is_searched_as_execvp_does() {
        let dir = std::env::temp_dir().join(format!("kiln-spawn-test-{}", std::process::id()));
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let file = |path: &std::path::Path, text: &str, mode: u32| {
            std::fs::write(path, text).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        file(&a.join("prog"), "#!/bin/sh\necho a\n", 0o644);
        file(&b.join("prog"), "#!/bin/sh\necho b \"$@\"\n", 0o755);
        file(&b.join("plain"), "echo plain \"$1\"\n", 0o755);
        let with_path = |argv: &[&str], path: &str| {
            let mut spec = ExecSpec::new(argv.iter().copied());
            spec.env.push((b"PATH".to_vec(), path.into()));
            run(&spec, None)
        };
        let (a_dir, b_dir) = (a.to_str().unwrap(), b.to_str().unwrap());
        let path = format!("/nonexistent:{a_dir}:{b_dir}");
        assert_eq!(with_path(&["prog", "x"], &path).unwrap().1, "b x\n");
        assert_eq!(with_path(&["plain", "y"], &path).unwrap().1, "plain y\n");
        let eacces = with_path(&["prog"], &format!("/nonexistent:{a_dir}")).unwrap_err();
        assert_eq!(eacces.raw_os_error(), Some(libc::EACCES));
        let missing = with_path(&["no-such-program"], &path).unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
        let slash = format!("{b_dir}/prog");
        assert_eq!(with_path(&[&slash], "/nonexistent").unwrap().1, "b\n");
        let mut bad_cwd = sh("true");
        bad_cwd.cwd = Some(b"/nonexistent".to_vec());
        let e = run(&bad_cwd, None).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Groups and limits are set before the ids change: the command, run
    /// as another user, has exactly the spec's groups and limits (a raised
    /// hard limit included); a limit the kernel refuses fails the start
    /// with its errno. Needs root (setgroups), as the agent is.
    #[test]
    fn a_command_gets_its_groups_and_limits() {
        use crate::spec::{Resource, Rlimit};
        // SAFETY: plain syscall without arguments.
        if unsafe { libc::getuid() } != 0 {
            eprintln!("skipped: setgroups needs root");
            return;
        }
        let mut spec = sh("grep -E '^(Uid|Gid|Groups):' /proc/self/status; \
                           grep -E 'core|open files' /proc/self/limits");
        spec.uid = Some(1000);
        spec.gid = Some(100);
        spec.groups = vec![4242, 7];
        spec.rlimits = vec![
            Rlimit {
                resource: Resource::Core,
                soft: 1234,
                hard: 5678,
            },
            Rlimit {
                resource: Resource::Nofile,
                soft: 64,
                hard: 128,
            },
        ];
        let (status, out, err) = run(&spec, None).unwrap();
        assert_eq!(status, 0, "{err}");
        let fields = |line: &str| {
            line.split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
        };
        let lines: Vec<Vec<String>> = out.lines().map(fields).collect();
        assert_eq!(lines[0][1..3], ["1000", "1000"], "{out}");
        assert_eq!(lines[1][1..3], ["100", "100"], "{out}");
        assert_eq!(lines[2][1..], ["7", "4242"], "{out}");
        assert_eq!(lines[3][4..7], ["1234", "5678", "bytes"], "{out}");
        assert_eq!(lines[4][3..6], ["64", "128", "files"], "{out}");
        // Without groups, another user has none (root's are dropped).
        spec.groups.clear();
        let out = run(&spec, None).unwrap().1;
        assert_eq!(
            out.lines().nth(2).map(fields).unwrap(),
            ["Groups:"],
            "{out}"
        );
        // Above fs.nr_open: the kernel refuses, the start fails.
        spec.rlimits[1].hard = u64::MAX - 1;
        spec.rlimits[1].soft = u64::MAX - 1;
        let e = run(&spec, None).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn the_search_keeps_only_paths_that_exist() {
        let names = |name: &[u8], path: &[u8]| {
            search(name, path).map(|v| v.into_iter().map(|c| c.into_bytes()).collect::<Vec<_>>())
        };
        assert_eq!(
            names(b"sh", b"/nonexistent:/bin").unwrap(),
            [b"/bin/sh".to_vec()]
        );
        assert_eq!(names(b"./x/y", b"/bin").unwrap(), [b"./x/y".to_vec()]);
        for (name, path) in [(&b"sh"[..], &b"/nonexistent"[..]), (b"", b"/bin")] {
            assert_eq!(
                names(name, path).unwrap_err().raw_os_error(),
                Some(libc::ENOENT)
            );
        }
    }
}
