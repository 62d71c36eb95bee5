//! kiln's guest init (PID 1 from the initramfs): sets up a minimal system,
//! runs the command in `/kiln/exec`, reports its status on kiln's control
//! page and reboots. Every path ends in a report attempt and a reboot.
//!
//! `no_main`: std's runtime start-up would abort if fds 0-2 were closed and
//! `/dev/null` missing (no devtmpfs yet), killing PID 1 without a report.
#![cfg_attr(not(test), no_main)]
#![cfg_attr(test, allow(dead_code))]

use kiln_init::spec::{ExecSpec, DEFAULT_IDS};
use kiln_init::{
    control, RootSource, EXIT_CANNOT_EXECUTE, EXIT_INIT_FAILED, EXIT_NOT_FOUND, ROOT_PARAM,
    SPEC_PATH,
};
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

mod netconfig;
use std::time::{Duration, Instant};

/// Upper bound on waiting for the console to drain before reporting.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the root device (`kiln.root=`) may take to appear.
const ROOT_DEVICE_TIMEOUT: Duration = Duration::from_secs(5);
/// Where the root device is mounted before it becomes `/`.
const NEW_ROOT: &CStr = c"/kiln/root";
/// The mounts init made, and where they move to in a new root.
const MOVED_MOUNTS: [(&CStr, &CStr); 4] = [
    (c"/dev", c"/kiln/root/dev"),
    (c"/proc", c"/kiln/root/proc"),
    (c"/sys", c"/kiln/root/sys"),
    (c"/tmp", c"/kiln/root/tmp"),
];

/// The mapped control page, or null when absent (e.g. not running under kiln).
static CONTROL: AtomicPtr<u32> = AtomicPtr::new(ptr::null_mut());

#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    // With panic=abort a panic would kill PID 1 silently: report it instead.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("kiln-init: {info}");
        finish(EXIT_INIT_FAILED)
    }));
    // devtmpfs first: /dev/mem and /dev/console live there.
    let dev_flags = libc::MS_NOSUID | libc::MS_NOEXEC;
    mount(c"devtmpfs", c"/dev", c"devtmpfs", dev_flags, c"mode=0755");
    open_control();
    setup_console();
    finish(run())
}

/// Sets the system up and runs the command; returns the exit report.
fn run() -> u32 {
    let quiet = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(c"proc", c"/proc", c"proc", quiet, c"");
    mount(c"sysfs", c"/sys", c"sysfs", quiet, c"");
    let tmp_flags = libc::MS_NOSUID | libc::MS_NODEV;
    mount(c"tmpfs", c"/tmp", c"tmpfs", tmp_flags, c"mode=1777");
    // Terminals for commands run on one (`/dev/ptmx` finds its instance
    // here); it moves with /dev into a new root.
    let pts_flags = libc::MS_NOSUID | libc::MS_NOEXEC;
    mount(
        c"devpts",
        c"/dev/pts",
        c"devpts",
        pts_flags,
        c"mode=0620,ptmxmode=0666",
    );
    // Read what the initramfs asks for before a new root hides it.
    let agent = kiln_init::agent::requested_port();
    let spec = match agent {
        Some(_) => None,
        None => Some(read_spec()),
    };
    let cmdline = std::fs::read("/proc/cmdline").unwrap_or_default();
    if let Some(root) = root_param(&cmdline) {
        if let Err(msg) = switch_root(&RootSource::parse(&root)) {
            return fail_with(&msg);
        }
    }
    // In the final root, before anything runs.
    if let Err(msg) = kiln_init::share_params(&cmdline).and_then(|m| mount_shares(&m)) {
        return fail_with(&msg);
    }
    if let Err(msg) = kiln_init::tmpfs_params(&cmdline).and_then(|m| mount_tmpfs(&m)) {
        return fail_with(&msg);
    }
    // The network as the host saw it (kiln.net=), before anything runs.
    match kiln_init::net::net_params(&cmdline) {
        Ok(interfaces) if interfaces.is_empty() => {}
        Ok(interfaces) => {
            if let Err(msg) = netconfig::apply(&interfaces) {
                return fail_with(&msg);
            }
        }
        Err(msg) => return fail_with(&msg),
    }
    // Sandbox mode: serve many commands over vsock (see kiln_init::agent).
    if let Some(port) = agent {
        set_hostname(b"kiln");
        return port.map_or_else(|m| fail_with(&m), kiln_init::agent::guest_main);
    }
    let spec = match spec {
        Some(Ok(spec)) => spec,
        Some(Err(msg)) => return fail_with(&msg),
        None => return fail_with("no exec spec"),
    };
    set_hostname(spec.hostname.as_deref().unwrap_or(b"kiln"));
    if let Some(cwd) = &spec.cwd {
        // Checked here so a bad directory is not reported as a missing command.
        let is_dir = std::fs::metadata(OsStr::from_bytes(cwd)).and_then(|m| match m.is_dir() {
            true => Ok(()),
            false => Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
        });
        if let Err(e) = is_dir {
            let cwd = String::from_utf8_lossy(cwd);
            warn(&format!("cannot change directory to '{cwd}'"), &e);
            return EXIT_INIT_FAILED;
        }
    }
    let pid = match spec.to_command(Some(DEFAULT_IDS)).spawn() {
        Ok(child) => child.id() as libc::pid_t,
        Err(e) => {
            let name = String::from_utf8_lossy(&spec.argv[0]);
            warn(&format!("cannot run '{name}'"), &e);
            return match e.raw_os_error() {
                Some(libc::ENOENT | libc::ENOTDIR) => EXIT_NOT_FOUND,
                _ => EXIT_CANNOT_EXECUTE,
            };
        }
    };
    wait_for(pid)
}

/// The value of the last `kiln.root=` word of a kernel command line; an
/// empty value (`kiln.root=`) cancels earlier ones.
fn root_param(cmdline: &[u8]) -> Option<Vec<u8>> {
    let prefix = format!("{ROOT_PARAM}=");
    cmdline
        .split(|b| b.is_ascii_whitespace())
        .filter_map(|word| word.strip_prefix(prefix.as_bytes()))
        .next_back()
        .filter(|device| !device.is_empty())
        .map(<[u8]>::to_vec)
}

/// Where a shared root is mounted read-only under an overlay.
const SHARED_LOWER: &CStr = c"/kiln/lower";
/// The tmpfs holding an overlay's upper and work directories.
const OVERLAY_RAM: &CStr = c"/kiln/overlay";

/// Mounts `root` at [`NEW_ROOT`]: a device (ext2/3/4), or a virtio-fs
/// share, alone or read-only under a tmpfs overlay that takes the
/// guest's writes. Returns its name for messages.
fn mount_new_root(root: &RootSource) -> Result<String, String> {
    // SAFETY: a NUL-terminated path.
    unsafe { libc::mkdir(NEW_ROOT.as_ptr(), 0o755) };
    let (tag, overlay) = match root {
        RootSource::Device(device) => {
            let name = String::from_utf8_lossy(device).into_owned();
            let dev = CString::new(device.clone())
                .map_err(|_| format!("{ROOT_PARAM}: NUL in '{name}'"))?;
            let start = Instant::now();
            while std::fs::metadata(OsStr::from_bytes(device)).is_err()
                && start.elapsed() < ROOT_DEVICE_TIMEOUT
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            sys_mount(Some(&dev), NEW_ROOT, Some(c"ext4"), 0, None).map_err(|e| {
                format!("cannot mount the root file system {name}: {}", describe(&e))
            })?;
            return Ok(name);
        }
        RootSource::Share { tag, overlay } => (tag, *overlay),
    };
    let name = format!("share {}", String::from_utf8_lossy(tag));
    let src = CString::new(tag.clone()).map_err(|_| format!("{ROOT_PARAM}: NUL in {name}"))?;
    let fail = |what: &str, e: io::Error| {
        format!("cannot mount the root {name}: {what}: {}", describe(&e))
    };
    if !overlay {
        sys_mount(Some(&src), NEW_ROOT, Some(c"virtiofs"), 0, None)
            .map_err(|e| fail("virtiofs", e))?;
        return Ok(name);
    }
    for dir in [SHARED_LOWER, OVERLAY_RAM] {
        // SAFETY: a NUL-terminated path.
        unsafe { libc::mkdir(dir.as_ptr(), 0o755) };
    }
    sys_mount(
        Some(&src),
        SHARED_LOWER,
        Some(c"virtiofs"),
        libc::MS_RDONLY,
        None,
    )
    .map_err(|e| fail("virtiofs", e))?;
    sys_mount(
        Some(c"tmpfs"),
        OVERLAY_RAM,
        Some(c"tmpfs"),
        0,
        Some(c"mode=0755"),
    )
    .map_err(|e| fail("tmpfs", e))?;
    for dir in [c"/kiln/overlay/upper", c"/kiln/overlay/work"] {
        // SAFETY: a NUL-terminated path.
        unsafe { libc::mkdir(dir.as_ptr(), 0o755) };
    }
    let layers = c"lowerdir=/kiln/lower,upperdir=/kiln/overlay/upper,workdir=/kiln/overlay/work";
    sys_mount(
        Some(c"overlay"),
        NEW_ROOT,
        Some(c"overlay"),
        0,
        Some(layers),
    )
    .map_err(|e| fail("overlay", e))?;
    Ok(name)
}

/// Mounts `root` and makes it the root, as switch_root(8) does: init's
/// /dev, /proc, /sys and /tmp move into it, then it moves onto `/` and
/// init chroots into it. The initramfs stays in memory, unreachable; init
/// keeps running from it (and keeps its control page mapping).
fn switch_root(root: &RootSource) -> Result<(), String> {
    let name = mount_new_root(root)?;
    for (old, new) in MOVED_MOUNTS {
        // SAFETY: a NUL-terminated path; an existing directory is fine.
        unsafe { libc::mkdir(new.as_ptr(), 0o755) };
        if let Err(e) = sys_mount(Some(old), new, None, libc::MS_MOVE, None) {
            let what = format!("cannot move {} into {name}", old.to_string_lossy());
            warn(&what, &e);
        }
    }
    let step = |what: &str, r: libc::c_int| match r {
        0 => Ok(()),
        _ => Err(format!(
            "cannot switch root to {name}: {what}: {}",
            describe(&io::Error::last_os_error())
        )),
    };
    // SAFETY: NUL-terminated paths; plain syscalls.
    step("chdir", unsafe { libc::chdir(NEW_ROOT.as_ptr()) })?;
    sys_mount(Some(c"."), c"/", None, libc::MS_MOVE, None)
        .map_err(|e| format!("cannot switch root to {name}: move: {}", describe(&e)))?;
    // SAFETY: as above.
    step("chroot", unsafe { libc::chroot(c".".as_ptr()) })?;
    // SAFETY: as above.
    step("chdir", unsafe { libc::chdir(c"/".as_ptr()) })
}

/// mount(2) with optional source, type and data.
fn sys_mount(
    src: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let ptr = |s: Option<&CStr>| s.map_or(ptr::null(), CStr::as_ptr);
    // SAFETY: NUL-terminated strings (or null, which mount accepts for the
    // source, type and data of a move) that outlive the call.
    let r = unsafe {
        libc::mount(
            ptr(src),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    };
    match r {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

fn set_hostname(hostname: &[u8]) {
    // SAFETY: the pointer and length describe a live byte slice.
    if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } != 0 {
        warn("cannot set the hostname", &io::Error::last_os_error());
    }
}

fn fail_with(msg: &str) -> u32 {
    eprintln!("kiln-init: {msg}");
    EXIT_INIT_FAILED
}

fn read_spec() -> Result<ExecSpec, String> {
    let bytes = std::fs::read(SPEC_PATH)
        .map_err(|e| format!("cannot read {SPEC_PATH}: {}", describe(&e)))?;
    ExecSpec::decode(&bytes).map_err(|e| format!("bad {SPEC_PATH}: {e}"))
}

/// Reaps children (orphans are reparented to PID 1) until `pid` exits.
fn wait_for(pid: libc::pid_t) -> u32 {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r == pid {
            return exit_report(status);
        }
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                warn("waiting for the command failed", &e);
                return EXIT_INIT_FAILED;
            }
        }
    }
}

/// Encodes a wait status as the control page's `(kind << 8) | code`.
fn exit_report(status: libc::c_int) -> u32 {
    if libc::WIFSIGNALED(status) {
        (control::EXIT_KIND_SIGNAL << 8) | libc::WTERMSIG(status) as u32
    } else {
        (control::EXIT_KIND_CODE << 8) | libc::WEXITSTATUS(status) as u32
    }
}

/// Maps the control page through /dev/mem, checks its magic and records the
/// boot-timer stage.
fn open_control() {
    let flags = libc::O_RDWR | libc::O_SYNC | libc::O_CLOEXEC;
    // SAFETY: a NUL-terminated path and plain flags.
    let fd = unsafe { libc::open(c"/dev/mem".as_ptr(), flags) };
    if fd < 0 {
        warn(
            "no status report: cannot open /dev/mem",
            &io::Error::last_os_error(),
        );
        return;
    }
    let (prot, flags) = (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED);
    // SAFETY: maps a fresh region chosen by the kernel; the fd is ours and
    // closed right after (the mapping stays valid).
    let page = unsafe {
        let p = libc::mmap(
            ptr::null_mut(),
            control::PAGE_SIZE,
            prot,
            flags,
            fd,
            control::PAGE_ADDR as libc::off_t,
        );
        libc::close(fd);
        p
    };
    if page == libc::MAP_FAILED {
        warn(
            "no status report: cannot map the control page",
            &io::Error::last_os_error(),
        );
        return;
    }
    let page = page.cast::<u32>();
    // SAFETY: REG_MAGIC is inside the 4 KiB mapping; MMIO needs volatile.
    let magic = unsafe { page.add(control::REG_MAGIC / 4).read_volatile() };
    if magic != control::MAGIC {
        eprintln!(
            "kiln-init: no kiln control page (magic {magic:#x}), status will not be reported"
        );
        // SAFETY: unmapping the mapping created above, never used again.
        unsafe { libc::munmap(page.cast(), control::PAGE_SIZE) };
        return;
    }
    CONTROL.store(page, Ordering::Relaxed);
    write_reg(control::REG_BOOT_TIMER, control::STAGE_USERSPACE);
}

fn write_reg(offset: usize, value: u32) {
    let page = CONTROL.load(Ordering::Relaxed);
    if !page.is_null() {
        // SAFETY: `page` is the live 4 KiB control mapping and every register
        // offset lies inside it; MMIO needs a volatile access.
        unsafe { page.add(offset / 4).write_volatile(value) };
    }
}

/// Mounts each shared directory (virtio-fs) at its path, creating the
/// directories on the way; the first failure is the error.
fn mount_shares(mounts: &[kiln_init::ShareMount]) -> Result<(), String> {
    for share in mounts {
        let path = String::from_utf8_lossy(&share.path).into_owned();
        let tag = String::from_utf8_lossy(&share.tag).into_owned();
        std::fs::create_dir_all(OsStr::from_bytes(&share.path))
            .map_err(|e| format!("cannot create the mount point {path} of share {tag}: {e}"))?;
        let (src, target) = match (
            CString::new(share.tag.clone()),
            CString::new(share.path.clone()),
        ) {
            (Ok(src), Ok(target)) => (src, target),
            _ => return Err(format!("share {tag}: NUL in its tag or path")),
        };
        let flags = match share.read_only {
            true => libc::MS_RDONLY,
            false => 0,
        };
        // SAFETY: NUL-terminated strings that outlive the call; no data.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                c"virtiofs".as_ptr(),
                flags,
                ptr::null(),
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(format!("cannot mount share {tag} at {path}: {e}"));
        }
    }
    Ok(())
}

/// Mounts each tmpfs at its path, creating the directories on the way;
/// the first failure is the error.
fn mount_tmpfs(mounts: &[kiln_init::TmpfsMount]) -> Result<(), String> {
    for tmpfs in mounts {
        let path = String::from_utf8_lossy(&tmpfs.path).into_owned();
        std::fs::create_dir_all(OsStr::from_bytes(&tmpfs.path))
            .map_err(|e| format!("cannot create the mount point of tmpfs {path}: {e}"))?;
        let (Ok(target), Ok(data)) = (
            CString::new(tmpfs.path.clone()),
            CString::new(tmpfs.mount_data()),
        ) else {
            return Err(format!("tmpfs {path}: NUL in its path"));
        };
        sys_mount(
            Some(c"tmpfs"),
            &target,
            Some(c"tmpfs"),
            tmpfs.mount_flags(),
            Some(&data),
        )
        .map_err(|e| format!("cannot mount a tmpfs at {path}: {e}"))?;
    }
    Ok(())
}

/// Mounts a filesystem, creating the mount point; logs failures.
fn mount(src: &CStr, target: &CStr, fstype: &CStr, flags: libc::c_ulong, data: &CStr) {
    let (src, target_ptr, fstype) = (src.as_ptr(), target.as_ptr(), fstype.as_ptr());
    // SAFETY: NUL-terminated strings that outlive the calls.
    let ok = unsafe {
        libc::mkdir(target_ptr, 0o755);
        libc::mount(src, target_ptr, fstype, flags, data.as_ptr().cast()) == 0
    };
    if !ok {
        let what = format!("cannot mount {}", target.to_string_lossy());
        warn(&what, &io::Error::last_os_error());
    }
}

/// Makes sure fds 0-2 are the console and puts it in raw mode, so the bytes
/// the command writes reach the host unchanged (no "\n" -> "\r\n", no echo).
fn setup_console() {
    // SAFETY: fcntl/open/dup2/close on plain integers and a NUL-terminated path.
    unsafe {
        if (0..3).any(|fd| libc::fcntl(fd, libc::F_GETFD) < 0) {
            // No /dev/console in the initramfs (the kernel opens it for
            // init); devtmpfs has one.
            let fd = libc::open(c"/dev/console".as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
            if fd < 0 {
                return;
            }
            for target in 0..3 {
                if libc::fcntl(target, libc::F_GETFD) < 0 {
                    libc::dup2(fd, target);
                }
            }
            if fd > 2 {
                libc::close(fd);
            }
        }
    }
    // SAFETY: termios is plain data, filled by tcgetattr before use.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(0, &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(0, libc::TCSANOW, &t);
        }
    }
}

/// Waits (bounded) until the serial driver has sent everything queued: the
/// monitor may end the VM as soon as it sees the exit report.
fn drain_console() {
    let start = Instant::now();
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int to a valid pointer.
        let r = unsafe { libc::ioctl(1, libc::TIOCOUTQ, &mut queued) };
        if r != 0 || queued == 0 || start.elapsed() > DRAIN_TIMEOUT {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Ends the VM: drains the console, syncs (so written data is safe before the
/// monitor may stop the VM), reports and reboots.
fn finish(report: u32) -> ! {
    drain_console();
    // SAFETY: sync and reboot take no pointers.
    unsafe { libc::sync() };
    write_reg(control::REG_EXIT, report);
    // SAFETY: as above.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    // Still here: PID 1 exiting panics the kernel, which reboots (panic=-1).
    warn("reboot failed", &io::Error::last_os_error());
    std::process::exit(1)
}

fn warn(what: &str, e: &io::Error) {
    eprintln!("kiln-init: {what}: {}", describe(e));
}

/// strerror text, like a shell prints it (io::Error adds "(os error N)").
fn describe(e: &io::Error) -> String {
    match e.raw_os_error() {
        // SAFETY: strerror returns a valid NUL-terminated string; init is
        // single-threaded, so its static buffer is not shared.
        Some(n) => unsafe { CStr::from_ptr(libc::strerror(n)) }
            .to_string_lossy()
            .into_owned(),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_init::spec::DEFAULT_PATH;

    #[test]
    fn root_param_takes_the_last_word() {
        assert_eq!(root_param(b"console=ttyS0 quiet"), None);
        assert_eq!(
            root_param(b"a kiln.root=/dev/vda b\n").as_deref(),
            Some(&b"/dev/vda"[..])
        );
        assert_eq!(
            root_param(b"kiln.root=/dev/vda kiln.root=/dev/vdb").as_deref(),
            Some(&b"/dev/vdb"[..])
        );
        assert_eq!(root_param(b"kiln.root=/dev/vda kiln.root="), None);
        assert_eq!(root_param(b"xkiln.root=/dev/vda kiln.rootfs=1"), None);
    }

    #[test]
    fn encodes_wait_statuses() {
        assert_eq!(exit_report(0), 0);
        assert_eq!(exit_report(3 << 8), 3);
        assert_eq!(exit_report(255 << 8), 255);
        assert_eq!(exit_report(libc::SIGKILL), (1 << 8) | 9);
    }

    #[test]
    fn command_uses_the_spec_environment_and_a_default_path() {
        let mut spec = ExecSpec::new(["prog", "a b", "c"]);
        spec.env.push((b"X".to_vec(), b"1".to_vec()));
        let cmd = spec.to_command(None);
        let envs: Vec<_> = cmd
            .get_envs()
            .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
            .collect();
        assert!(envs.contains(&("X".into(), Some("1".into()))));
        assert!(envs.contains(&("PATH".into(), Some(OsStr::from_bytes(DEFAULT_PATH).into()))));
        assert_eq!(cmd.get_args().collect::<Vec<_>>(), ["a b", "c"]);
        spec.env.push((b"PATH".to_vec(), b"/x".to_vec()));
        let cmd = spec.to_command(None);
        let paths: Vec<_> = cmd.get_envs().filter(|(k, _)| *k == "PATH").collect();
        assert_eq!(paths, [(OsStr::new("PATH"), Some(OsStr::new("/x")))]);
    }
}
