//! The allow-lists: for each kind of thread, the system calls it makes once
//! its filter is on, with the arguments pinned where that is cheap and
//! meaningful (ioctl requests, socket families, no executable memory,
//! clone for threads only, futex and fcntl operations).
//!
//! Each list holds what a real run of that thread needs (found with
//! `strace -f` and `--seccomp log` over kiln's test suite), and nothing
//! for "maybe": a call a thread starts to need shows up as that thread's
//! forbidden-call line the first time a test makes it.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::ThreadKind;

/// System call number -> the argument rules that allow it (any one of them;
/// none means always allowed).
pub(super) type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// One argument test: (argument index, comparison, value), on the
/// argument's low 32 bits (every argument tested here is an int).
type Condition = (u8, SeccompCmpOp, u64);

fn arg_eq(arg: u8, value: u64) -> Condition {
    (arg, SeccompCmpOp::Eq, value)
}

fn arg_ne(arg: u8, value: u64) -> Condition {
    (arg, SeccompCmpOp::Ne, value)
}

/// The bits of `mask` in the argument equal `value`.
fn arg_masked(arg: u8, mask: u64, value: u64) -> Condition {
    (arg, SeccompCmpOp::MaskedEq(mask), value)
}

// KVM ioctls, computed as kvm-ioctls computes them.
vmm_sys_util::ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
// The VM's state for a snapshot (src/snapshot/vm_state.rs), read on the
// thread that saves it.
vmm_sys_util::ioctl_io_nr!(KVM_CHECK_EXTENSION, kvm_bindings::KVMIO, 0x03);
vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_MSR_INDEX_LIST,
    kvm_bindings::KVMIO,
    0x02,
    kvm_bindings::kvm_msr_list
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_PIT2,
    kvm_bindings::KVMIO,
    0x9f,
    kvm_bindings::kvm_pit_state2
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_CLOCK,
    kvm_bindings::KVMIO,
    0x7c,
    kvm_bindings::kvm_clock_data
);
vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_IRQCHIP,
    kvm_bindings::KVMIO,
    0x62,
    kvm_bindings::kvm_irqchip
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_REGS,
    kvm_bindings::KVMIO,
    0x81,
    kvm_bindings::kvm_regs
);
// A paused vCPU's state, read on its own thread for a snapshot
// (src/snapshot/vcpu_state.rs).
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_MP_STATE,
    kvm_bindings::KVMIO,
    0x98,
    kvm_bindings::kvm_mp_state
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_SREGS,
    kvm_bindings::KVMIO,
    0x83,
    kvm_bindings::kvm_sregs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_XSAVE,
    kvm_bindings::KVMIO,
    0xa4,
    kvm_bindings::kvm_xsave
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_XCRS,
    kvm_bindings::KVMIO,
    0xa6,
    kvm_bindings::kvm_xcrs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_DEBUGREGS,
    kvm_bindings::KVMIO,
    0xa1,
    kvm_bindings::kvm_debugregs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_LAPIC,
    kvm_bindings::KVMIO,
    0x8e,
    kvm_bindings::kvm_lapic_state
);
vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_MSRS,
    kvm_bindings::KVMIO,
    0x88,
    kvm_bindings::kvm_msrs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    kvm_bindings::KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);
vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_CPUID2,
    kvm_bindings::KVMIO,
    0x91,
    kvm_bindings::kvm_cpuid2
);
vmm_sys_util::ioctl_io_nr!(KVM_GET_TSC_KHZ, kvm_bindings::KVMIO, 0xa3);

/// The allow-list of `kind` for threads of process `pid`: the signals
/// a thread may send go to this process only, so a thread taken over
/// cannot signal other processes of its uid (other kilns of the same
/// jail uid, or the embedder's other processes).
pub(super) fn rules(kind: ThreadKind, pid: u32) -> Rules {
    let mut list = List {
        own_pid: pid.into(),
        ..List::default()
    };
    list.thread_runtime();
    match kind {
        ThreadKind::Vcpu => list.vcpu(),
        ThreadKind::Vmm => list.vmm(),
        ThreadKind::ConsoleOutput => {} // writes and waits: the runtime's calls
        ThreadKind::SandboxHost => list.sandbox_host(),
        ThreadKind::CliMain => list.cli_main(),
        ThreadKind::CliSnapshot => {
            list.cli_main();
            list.snapshot_save();
        }
        ThreadKind::SandboxVm => {
            list.cli_main();
            list.snapshot_save();
            // The sandbox's requests, with the snapshot directory's descriptor.
            list.allow(&[libc::SYS_recvmsg]);
        }
        ThreadKind::CliSignals => list.cli_signals(),
        ThreadKind::CliStdio => list.cli_stdio(),
    }
    list.rules
        .into_iter()
        .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
        .collect()
}

/// Syscall -> `None` (always allowed) or the rules, one of which must
/// hold; and the process the threads belong to.
#[derive(Default)]
struct List {
    rules: BTreeMap<i64, Option<Vec<SeccompRule>>>,
    own_pid: u64,
}

impl List {
    fn allow(&mut self, nrs: &[i64]) {
        for &nr in nrs {
            self.rules.insert(nr, None);
        }
    }

    /// Allows `nr` when every condition holds (repeat for alternatives).
    fn allow_if(&mut self, nr: i64, conditions: &[Condition]) {
        let conditions = conditions
            .iter()
            .map(|(arg, op, value)| {
                SeccompCondition::new(*arg, SeccompCmpArgLen::Dword, op.clone(), *value)
                    .expect("argument index below 6")
            })
            .collect();
        let rule = SeccompRule::new(conditions).expect("at least one condition");
        // None: already allowed whatever the arguments.
        if let Some(rules) = self.rules.entry(nr).or_insert_with(|| Some(Vec::new())) {
            rules.push(rule);
        }
    }

    fn allow_ioctls(&mut self, requests: &[u64]) {
        for &request in requests {
            self.allow_if(libc::SYS_ioctl, &[arg_eq(1, request)]);
        }
    }

    /// What every kiln thread does once it runs: memory (never executable),
    /// locks, logging to stderr, closing what it drops, ending.
    fn thread_runtime(&mut self) {
        self.allow(&[
            libc::SYS_write, // log lines on stderr (and this module's SIGSYS line)
            libc::SYS_close,
            libc::SYS_brk,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_sigaltstack, // Rust removes its alternate signal stack at thread exit
            libc::SYS_rt_sigprocmask, // glibc blocks signals at thread exit
            libc::SYS_rt_sigreturn, // returning from a signal handler (the vCPU kick)
            libc::SYS_sched_yield, // std's channels back off with it
            libc::SYS_clock_gettime, // Instant::now when the vDSO cannot serve it
            libc::SYS_exit,
            libc::SYS_exit_group,
            // Answered EACCES (the main thread: but for directories) by the
            // openat filter (see `no_file_opens`): glibc's malloc opens a
            // /proc file when a thread's heap first shrinks.
            libc::SYS_openat,
            // A panic's backtrace (RUST_BACKTRACE) prints paths relative
            // to it: without it the panic of a filtered thread died by SIGSYS
            // instead of unwinding (and stopping its VM).
            libc::SYS_getcwd,
            libc::SYS_readlink,
            // std::process::abort and a panic while panicking: raise SIGABRT.
            libc::SYS_getpid,
            libc::SYS_gettid,
        ]);
        // The jail's change of ids (`jail::drop_privileges`), which glibc
        // makes every thread run: only away from root (a thread without
        // CAP_SETUID cannot take any other ids), groups only emptied.
        for nr in [libc::SYS_setresuid, libc::SYS_setresgid] {
            let not_root = |arg| arg_ne(arg, 0);
            self.allow_if(nr, &[not_root(0), not_root(1), not_root(2)]);
        }
        self.allow_if(libc::SYS_setgroups, &[arg_eq(0, 0)]);
        let sigabrt = libc::SIGABRT as u64;
        self.allow_if(
            libc::SYS_tgkill,
            &[arg_eq(0, self.own_pid), arg_eq(2, sigabrt)],
        );
        self.allow_if(libc::SYS_rt_sigaction, &[arg_eq(0, sigabrt)]);
        // Anonymous private memory only (malloc, thread stacks), never
        // executable: no new code can be mapped in.
        let private_anonymous = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        let map_kind = (libc::MAP_TYPE | libc::MAP_ANONYMOUS) as u64;
        let exec = libc::PROT_EXEC as u64;
        self.allow_if(
            libc::SYS_mmap,
            &[
                arg_masked(2, exec, 0),
                arg_masked(3, map_kind, private_anonymous),
            ],
        );
        self.allow_if(libc::SYS_mprotect, &[arg_masked(2, exec, 0)]);
        // glibc's free and thread exit give pages back.
        self.allow_if(libc::SYS_madvise, &[arg_eq(2, libc::MADV_DONTNEED as u64)]);
        // Waiting and waking only (std's locks, condvars, thread join),
        // private or not, with any clock.
        let op = !(libc::FUTEX_PRIVATE_FLAG | libc::FUTEX_CLOCK_REALTIME) as u32 as u64;
        for cmd in [
            libc::FUTEX_WAIT,
            libc::FUTEX_WAKE,
            libc::FUTEX_WAIT_BITSET,
            libc::FUTEX_WAKE_BITSET,
        ] {
            self.allow_if(libc::SYS_futex, &[arg_masked(1, op, cmd as u64)]);
        }
        // std's debug builds check that a descriptor is open before closing it.
        self.allow_if(libc::SYS_fcntl, &[arg_eq(1, libc::F_GETFD as u64)]);
    }

    /// KVM_RUN and the register accesses the buses turn into device calls
    /// (eventfd writes for interrupts and the VM's end, console output).
    fn vcpu(&mut self) {
        self.allow_ioctls(&[
            KVM_RUN() as u64,
            KVM_GET_REGS() as u64, // the registers logged after a failure, and a snapshot's
            // A paused vCPU's state for a snapshot, read on its own thread
            // (`Pause::on_vcpu`), in Firecracker's order.
            KVM_GET_MP_STATE() as u64,
            KVM_GET_SREGS() as u64,
            KVM_GET_XSAVE() as u64,
            KVM_GET_XCRS() as u64,
            KVM_GET_DEBUGREGS() as u64,
            KVM_GET_LAPIC() as u64,
            KVM_GET_CPUID2() as u64,
            KVM_GET_MSRS() as u64,
            KVM_GET_VCPU_EVENTS() as u64,
            KVM_GET_TSC_KHZ() as u64, // the frequency a snapshot records
            // virtio-net: the guest's offloads, set when the driver starts
            // the device (a status write, served on the vCPU thread).
            libc::TUNSETOFFLOAD,
        ]);
        // vhost-user (virtio-fs): the messages that start and stop the
        // backend's rings when the driver starts or resets the device (a
        // status write, served on the vCPU thread), their eventfds and
        // guest memory passed along. Sends never raise SIGPIPE; receives
        // take no flags.
        self.allow_if(libc::SYS_sendmsg, &[arg_eq(2, libc::MSG_NOSIGNAL as u64)]);
        self.allow_if(libc::SYS_recvmsg, &[arg_eq(2, 0)]);
    }

    /// The VM thread once the VM is built: the event loop serving every
    /// device's host side, stopping the vCPUs and tearing the VM down.
    fn vmm(&mut self) {
        self.allow(&[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_read,  // eventfds, the TAP, console input
            libc::SYS_readv, // the TAP
            libc::SYS_writev,
            // virtio-blk; an overlay disk (an image root) reads two files,
            // its base and its overlay, and writes only the overlay.
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_fdatasync, // virtio-blk flush
            libc::SYS_getrandom, // virtio-rng
            libc::SYS_recvfrom,  // virtio-vsock streams
            libc::SYS_sendto,
            libc::SYS_connect, // vsock: a guest connection to a host port
            libc::SYS_shutdown,
            libc::SYS_unlink, // vsock: its listening socket goes with the device
            // Rate limits: a device out of tokens arms its timerfd (created
            // with the device, before the filter).
            libc::SYS_timerfd_settime,
        ]);
        // virtio-blk discard (a hole punched) and write-zeroes (a range
        // zeroed), both within the file's size; an overlay disk punches
        // holes in its overlay for both.
        for mode in [libc::FALLOC_FL_PUNCH_HOLE, libc::FALLOC_FL_ZERO_RANGE] {
            let mode = (mode | libc::FALLOC_FL_KEEP_SIZE) as u64;
            self.allow_if(libc::SYS_fallocate, &[arg_eq(1, mode)]);
        }
        self.allow_if(
            libc::SYS_accept4,
            &[arg_eq(3, libc::SOCK_CLOEXEC as u64)], // the vsock listener
        );
        let stream = (libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64;
        self.allow_if(
            libc::SYS_socket,
            &[
                arg_eq(0, libc::AF_UNIX as u64),
                arg_eq(1, stream),
                arg_eq(2, 0),
            ],
        );
        self.allow_ioctls(&[libc::FIONBIO]); // accepted vsock streams
                                             // Kicking the vCPUs out of KVM_RUN when the VM stops.
        let kick = vmm_sys_util::signal::SIGRTMIN() as u64;
        self.allow_if(
            libc::SYS_tgkill,
            &[arg_eq(0, self.own_pid), arg_eq(2, kick)],
        );
    }

    /// The sandbox's host side: the agent connection's reader and the stdin
    /// feeder read and write the agent's socket.
    fn sandbox_host(&mut self) {
        self.allow(&[
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            // Ending the connection when the agent stops reading (a send
            // that timed out).
            libc::SYS_shutdown,
            // The console of a VM in a process of its own, from its pipe
            // (`Isolation::Process`).
            libc::SYS_read,
        ]);
    }

    /// `kiln run`'s main thread once the VM is spawned: waits for the guest
    /// agent, starts the sandbox's threads and the stdio copiers, waits for
    /// the command, stops the VM, removes the sandbox's socket directory.
    fn cli_main(&mut self) {
        self.allow(&[
            libc::SYS_read,
            libc::SYS_poll, // the agent's connection or the VM's end
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_shutdown,
            libc::SYS_getrandom, // std's HashMap keys (the sandbox's command table)
            libc::SYS_clock_nanosleep, // the sandbox's shutdown grace period
            // Removing the sandbox's socket directory (std's remove_dir_all).
            libc::SYS_statx,
            libc::SYS_newfstatat,
            libc::SYS_getdents64,
            libc::SYS_unlinkat,
        ]);
        self.allow_if(libc::SYS_accept4, &[arg_eq(3, libc::SOCK_CLOEXEC as u64)]);
        for cmd in [libc::F_DUPFD_CLOEXEC, libc::F_GETFL, libc::F_SETFD] {
            self.allow_if(libc::SYS_fcntl, &[arg_eq(1, cmd as u64)]);
        }
        // The wait for the agent's HELLO, and the bound on each send to it.
        for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            let socket_level = arg_eq(1, libc::SOL_SOCKET as u64);
            self.allow_if(
                libc::SYS_setsockopt,
                &[socket_level, arg_eq(2, option as u64)],
            );
        }
        self.allow_ioctls(&[
            libc::FIONBIO, // the agent's connection
            libc::TCSETS,  // the terminal restored (classic path)
        ]);
        // glibc's tcsetattr reads the settings back (TCGETS) around its
        // TCSETS: kiln's terminal (stdin) put in raw mode for `kiln run
        // -it` once the agent is up, and restored at the end.
        self.allow_if(libc::SYS_ioctl, &[arg_eq(0, 0), arg_eq(1, libc::TCGETS)]);
        // Inherited by the threads this one starts: `kiln run -t`'s window
        // size thread (see `cli_stdio`).
        self.window_size();
        self.threads();
    }

    /// What `snapshot::save` does on the thread that calls it (the vCPUs'
    /// state is read on their own threads): pause the vCPUs (the kick),
    /// read the VM's KVM state, write the snapshot's new files.
    fn snapshot_save(&mut self) {
        self.allow_ioctls(&[
            KVM_CHECK_EXTENSION() as u64,
            KVM_GET_MSR_INDEX_LIST() as u64,
            KVM_GET_PIT2() as u64,
            KVM_GET_CLOCK() as u64,
            KVM_GET_IRQCHIP() as u64,
        ]);
        let kick = vmm_sys_util::signal::SIGRTMIN() as u64;
        self.allow_if(
            libc::SYS_tgkill,
            &[arg_eq(0, self.own_pid), arg_eq(2, kick)],
        );
        self.allow(&[
            libc::SYS_mkdir, // the directory (it exists: `kiln snapshot create` made it)
            libc::SYS_lseek, // the memory file's holes
            libc::SYS_ftruncate,
            libc::SYS_pread64, // an image root's overlay, copied into the snapshot
            libc::SYS_pwrite64,
            libc::SYS_fsync,
            libc::SYS_fstat,
            // unlinkat (`cli_main`'s): what a failed save had created.
        ]);
    }

    /// Starting threads (the sandbox's reader, the stdio copiers), which
    /// begin under this thread's filter and then install their own. glibc
    /// tries clone3 first, whose flags a filter cannot see: a separate
    /// filter makes it fail with ENOSYS (see `CLONE3_ENOSYS`), and glibc
    /// falls back to clone, allowed only with the flags of a thread.
    fn threads(&mut self) {
        self.allow(&[
            libc::SYS_clone3, // answered ENOSYS by the clone3 filter
            // What a new thread does before its own filter is on.
            libc::SYS_rseq,
            libc::SYS_set_robust_list,
            libc::SYS_sched_getaffinity,
            libc::SYS_seccomp,
        ]);
        let thread = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64;
        self.allow_if(libc::SYS_clone, &[arg_eq(0, thread)]);
        for option in [libc::PR_SET_NAME, libc::PR_SET_NO_NEW_PRIVS] {
            self.allow_if(libc::SYS_prctl, &[arg_eq(0, option as u64)]);
        }
    }

    /// The stop-signal thread: waits for SIGINT, SIGTERM or SIGHUP and
    /// stops the VM (an eventfd write, a lock).
    fn cli_signals(&mut self) {
        self.allow(&[libc::SYS_rt_sigtimedwait]);
    }

    /// `kiln run`'s stdin, stdout and stderr copiers: kiln's stdio on one
    /// side, the sandbox's command (its socket) on the other.
    fn cli_stdio(&mut self) {
        // shutdown: the stdin copier's send ends the connection when the
        // agent stops reading.
        self.allow(&[libc::SYS_read, libc::SYS_sendto, libc::SYS_shutdown]);
        // `kiln run -t`'s window size thread.
        self.window_size();
    }

    /// The size of kiln's terminal (stdin's or stdout's), nothing else of
    /// any descriptor.
    fn window_size(&mut self) {
        for fd in [0, 1] {
            let request = arg_eq(1, libc::TIOCGWINSZ);
            self.allow_if(libc::SYS_ioctl, &[arg_eq(0, fd), request]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_ioctl_numbers_are_the_kernels() {
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        // As in linux/kvm.h's numbers on x86-64.
        assert_eq!(KVM_GET_MSRS(), 0xc008_ae88);
        assert_eq!(KVM_GET_CPUID2(), 0xc008_ae91);
        assert_eq!(KVM_GET_TSC_KHZ(), 0xaea3);
        assert_eq!(KVM_GET_LAPIC(), 0x8400_ae8e);
    }
}
