//! seccomp-BPF filters, one allow-list per kind of thread kiln creates
//! ([`ThreadKind`], lists in `lists.rs`). Each thread installs its filter
//! on itself once the files and sockets it needs are open, and before the
//! guest runs its first instruction; a thread started later begins under
//! its parent's filter and narrows it to its own. Filters are per thread
//! (no TSYNC), so the embedder's own threads are never filtered.
//!
//! With [`SeccompMode::On`] a call outside the list traps: the SIGSYS
//! handler (`sigsys.rs`) prints one line naming the thread and the call,
//! and the process dies by SIGSYS. [`SeccompMode::Log`] lets such a call
//! through and the host kernel logs it (dmesg); [`SeccompMode::Off`]
//! installs nothing.

mod lists;
mod sigsys;
mod syscall_names;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::config::SeccompMode;

/// The kinds of threads kiln creates, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ThreadKind {
    /// `kiln-vcpuN`: KVM_RUN and the register accesses it returns.
    Vcpu,
    /// `kiln-vmm` once the VM is built: the event loop (every device's host
    /// side), stopping the vCPUs, teardown.
    Vmm,
    /// `kiln-console-out`: the virtio console's output writer.
    ConsoleOutput,
    /// The sandbox's host side: the agent connection's reader
    /// (`kiln-sandbox`) and stdin feeders (`kiln-stdin`).
    SandboxHost,
    /// `kiln run`'s main thread once the VM is spawned.
    CliMain,
    /// `kiln snapshot create`'s main thread: `CliMain`'s calls, and the
    /// save (the VM's state reads, new files in the snapshot directory).
    CliSnapshot,
    /// `kiln sandbox-vm`'s main thread (the VM process of a sandbox):
    /// `CliSnapshot`'s calls (it saves the VM when the sandbox asks), and
    /// the requests on its control channel (recvmsg).
    SandboxVm,
    /// `kiln-signals`: `kiln run`'s stop-signal thread.
    CliSignals,
    /// `kiln run`'s stdin, stdout and stderr copiers.
    CliStdio,
}

impl ThreadKind {
    #[cfg(test)]
    const ALL: [ThreadKind; 9] = [
        ThreadKind::Vcpu,
        ThreadKind::Vmm,
        ThreadKind::ConsoleOutput,
        ThreadKind::SandboxHost,
        ThreadKind::CliMain,
        ThreadKind::CliSnapshot,
        ThreadKind::SandboxVm,
        ThreadKind::CliSignals,
        ThreadKind::CliStdio,
    ];

    /// Whether threads of this kind start threads under their filter.
    fn starts_threads(self) -> bool {
        matches!(
            self,
            ThreadKind::CliMain | ThreadKind::CliSnapshot | ThreadKind::SandboxVm
        )
    }
}

/// A thread's filter could not be installed (a host kernel without seccomp
/// filters, for instance). Nothing of the VM has run yet.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the seccomp filter of thread {thread}: {reason} (`--seccomp off` runs without filters)")]
pub struct SeccompError {
    thread: String,
    reason: String,
}

/// Installs the filter of `kind` on the calling thread (nothing with
/// [`SeccompMode::Off`]). Irreversible: the thread and the threads it
/// starts from now on can only make the calls the list allows.
pub(crate) fn install(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("unnamed");
    let error = |reason: String| SeccompError {
        thread: name.to_string(),
        reason,
    };
    let programs = match mode {
        SeccompMode::Off => return Ok(()),
        SeccompMode::On => {
            sigsys::install_handler()
                .map_err(|e| error(format!("installing the SIGSYS handler: {e}")))?;
            programs(kind, false)
        }
        SeccompMode::Log => programs(kind, true),
    };
    let programs = programs.as_ref().as_ref().map_err(|e| error(e.clone()))?;
    sigsys::set_thread_name(name);
    for program in programs {
        seccompiler::apply_filter(program).map_err(|e| error(e.to_string()))?;
    }
    Ok(())
}

/// Starts a thread named `name` that installs the filter of `kind` and
/// then runs `body`. Returns once the filter is on (or with the error that
/// kept it off: the thread then ends without running `body`).
pub(crate) fn spawn<T, F>(
    name: String,
    kind: ThreadKind,
    mode: SeccompMode,
    body: F,
) -> std::io::Result<JoinHandle<T>>
where
    T: Default + Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (installed_tx, installed) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        let result = install(kind, mode);
        let ok = result.is_ok();
        let _ = installed_tx.send(result);
        match ok {
            true => body(),
            false => T::default(),
        }
    })?;
    match installed.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(std::io::Error::other(e))
        }
        // The thread died before reporting (it cannot panic before that).
        Err(_) => Err(std::io::Error::other(
            "a filtered thread ended at its start",
        )),
    }
}

/// Compiled filters, in installation order.
type Programs = Arc<Result<Vec<BpfProgram>, String>>;

/// The compiled filters of `kind` for this process (cached: threads of one
/// kind share them; a forked child, whose pid differs, compiles its own).
fn programs(kind: ThreadKind, log_only: bool) -> Programs {
    type Cache = Mutex<Vec<((ThreadKind, bool, u32), Programs)>>;
    static CACHE: Cache = Mutex::new(Vec::new());
    let pid = std::process::id();
    let key = (kind, log_only, pid);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, programs)) = cache.iter().find(|(k, _)| *k == key) {
        return programs.clone();
    }
    let programs = Arc::new(compile(kind, log_only, pid));
    // At most one entry per kind and mode: a forked child's replace its parent's.
    cache.retain(|((k, l, _), _)| (*k, *l) != (kind, log_only));
    cache.push((key, programs.clone()));
    programs
}

fn compile(kind: ThreadKind, log_only: bool, pid: u32) -> Result<Vec<BpfProgram>, String> {
    let denied = match log_only {
        true => SeccompAction::Log,
        false => SeccompAction::Trap,
    };
    let mut filters = vec![no_file_opens(kind, log_only)?];
    if kind.starts_threads() {
        filters.push(clone3_enosys()?);
    }
    filters.push(to_bpf(
        lists::rules(kind, pid),
        denied,
        SeccompAction::Allow,
    )?);
    Ok(filters)
}

/// A filter that makes openat fail with EACCES (for `kiln run`'s main
/// thread: openat of anything but a directory) and lets every other call
/// through. No thread opens files once filtered, but glibc's malloc does,
/// on any thread: the first time a thread's heap shrinks it reads
/// /proc/sys/vm/overcommit_memory, and does without it when the open
/// fails. So openat is refused rather than trapped; every list allows it,
/// so this filter's answer is the one that counts. In log mode the open is
/// logged and done, as every other call off a list is.
fn no_file_opens(kind: ThreadKind, log_only: bool) -> Result<BpfProgram, String> {
    let flags = |mask: i32, value: i32| {
        SeccompCondition::new(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(mask as u64),
            value as u64,
        )
    };
    let refused = |conditions: Vec<Result<SeccompCondition, _>>| {
        conditions
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .and_then(SeccompRule::new)
            .map_err(|e: seccompiler::BackendError| e.to_string())
    };
    let not_a_directory = || flags(libc::O_DIRECTORY, 0);
    let rules = match kind {
        ThreadKind::CliMain => vec![refused(vec![not_a_directory()])?],
        // The snapshot's files are new (O_CREAT | O_EXCL): any other open of
        // a file is refused.
        ThreadKind::CliSnapshot | ThreadKind::SandboxVm => {
            let new_file = libc::O_CREAT | libc::O_EXCL;
            [0, libc::O_CREAT, libc::O_EXCL]
                .into_iter()
                .map(|value| refused(vec![not_a_directory(), flags(new_file, value)]))
                .collect::<Result<Vec<_>, _>>()?
        }
        _ => Vec::new(),
    };
    let refused = match log_only {
        true => SeccompAction::Log,
        false => SeccompAction::Errno(libc::EACCES as u32),
    };
    to_bpf(
        [(libc::SYS_openat, rules)].into(),
        SeccompAction::Allow,
        refused,
    )
}

/// A filter that makes clone3 fail with ENOSYS and lets every other call
/// through (to the allow-list, installed after it). glibc then starts
/// threads with clone, whose flags the allow-list can check; a clone3
/// argument is a pointer a filter cannot read. The allow-list allows
/// clone3 itself, so this filter's answer is the one that counts.
fn clone3_enosys() -> Result<BpfProgram, String> {
    let rules = [(libc::SYS_clone3, Vec::<SeccompRule>::new())].into();
    let enosys = SeccompAction::Errno(libc::ENOSYS as u32);
    to_bpf(rules, SeccompAction::Allow, enosys)
}

fn to_bpf(
    rules: lists::Rules,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .map_err(|e| e.to_string())?;
    BpfProgram::try_from(filter).map_err(|e| e.to_string())
}
