//! `kiln run -it -- sh` driven as a person at a terminal drives it: kiln
//! runs on the slave of a pseudo-terminal this test owns (kiln's
//! controlling terminal, in a session of its own), and the test types into
//! the master and reads what the screen would show. One boot checks the
//! prompt, `tty`, the window size at start and after a resize of the host
//! terminal (SIGWINCH to kiln), line editing, a full-screen program (vi),
//! Ctrl-C reaching the guest's foreground program while the shell stays,
//! the command's exit status as kiln's, and kiln's terminal restored after
//! it exits. Without a boot: `-it` with a stdin that is not a terminal is
//! refused as docker refuses it.

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;
use std::time::Duration;

use common::{guest_kernel, guest_rootfs, have_kvm, kiln_cli, require, set_size, Screen};

/// Far above a boot on an emulated guest kernel (a busy host included):
/// only a hang gets here.
const BOOT_LIMIT: Duration = Duration::from_secs(900);
/// Far above one typed command's round trip.
const STEP_LIMIT: Duration = Duration::from_secs(300);

fn prerequisites() -> bool {
    require(have_kvm(), "/dev/kvm not accessible")
        && require(
            guest_kernel("vmlinux").is_some(),
            "guest kernel not built (run resources/setup.sh)",
        )
}

/// A new pseudo-terminal: (master, slave).
fn open_pty() -> (File, File) {
    // SAFETY: plain calls on the new master; `name` is a writable buffer
    // of its length, NUL-terminated by ptsname_r on success; the fds are
    // owned right after their creation.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(
            master >= 0,
            "posix_openpt: {}",
            std::io::Error::last_os_error()
        );
        let master = OwnedFd::from_raw_fd(master);
        assert_eq!(libc::grantpt(master.as_raw_fd()), 0);
        assert_eq!(libc::unlockpt(master.as_raw_fd()), 0);
        let mut name = [0 as libc::c_char; 64];
        assert_eq!(
            libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()),
            0
        );
        let slave = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        assert!(slave >= 0, "{}", std::io::Error::last_os_error());
        (File::from(master), File::from(OwnedFd::from_raw_fd(slave)))
    }
}

/// The terminal's settings (read through its master: the slave's).
fn modes(pty: &File) -> libc::termios {
    // SAFETY: termios is plain data, filled by tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a valid termios to fill.
    assert_eq!(unsafe { libc::tcgetattr(pty.as_raw_fd(), &mut t) }, 0);
    t
}

/// The settings a terminal program may change, comparable.
fn mode_fields(t: &libc::termios) -> (u32, u32, u32, u32, Vec<u8>) {
    (
        t.c_iflag,
        t.c_oflag,
        t.c_cflag,
        t.c_lflag,
        t.c_cc[..libc::NCCS].to_vec(),
    )
}

#[test]
fn kiln_run_it_sh_behaves_like_a_terminal_session() {
    if !prerequisites() {
        return;
    }
    let (master, slave) = open_pty();
    set_size(&master, 30, 100);
    let before = modes(&master);
    let kernel = guest_kernel("vmlinux").expect("checked by prerequisites");
    let mut cmd = kiln_cli();
    cmd.arg("run")
        .arg("--kernel")
        .arg(kernel)
        .arg("--rootfs")
        .arg(guest_rootfs())
        .args(["--timeout", "1800s", "-it", "--", "sh"])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // kiln is the foreground group of the slave: it gets SIGWINCH.
    common::on_controlling_terminal(&mut cmd);
    let mut kiln = cmd.spawn().expect("starting kiln");
    drop(cmd); // our copies of the slave: kiln holds the only ones
    let mut keys = master.try_clone().unwrap();
    let mut screen = Screen::new(master.try_clone().unwrap());
    let mut type_line = |line: &str| keys.write_all(line.as_bytes()).unwrap();

    // The prompt (uid 65534: `$`), then raw mode on kiln's terminal.
    screen.until("$ ", BOOT_LIMIT);
    let raw = modes(&master);
    assert_eq!(
        raw.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG),
        0,
        "kiln's terminal is not in raw mode during the run"
    );
    // Quotes split the markers, so the echo of what is typed never matches.
    type_line("tty; echo \"do\"\"ne-1\"\r");
    let shown = screen.until("done-1", STEP_LIMIT);
    assert!(
        shown.lines().any(|l| l.starts_with("/dev/pts/")),
        "tty: {shown:?}"
    );
    type_line("stty size; echo \"do\"\"ne-2\"\r");
    let shown = screen.until("done-2", STEP_LIMIT);
    assert!(shown.contains("30 100\r\n"), "stty size: {shown:?}");

    // A resize of kiln's terminal reaches the guest's foreground program.
    type_line(
        "sh -c 'trap \"stty size; exit 0\" WINCH; echo \"ar\"\"med\"; while :; do sleep 1; done'\r",
    );
    screen.until("armed\r\n", STEP_LIMIT);
    set_size(&master, 40, 120);
    screen.until("40 120\r\n", STEP_LIMIT);
    screen.until("$ ", STEP_LIMIT);

    // Line editing: two DELs erase "xy" before the line is run.
    type_line("echo ed-xy\x7f\x7fok\r");
    screen.until("ed-ok\r\n", STEP_LIMIT);

    // A full-screen program: vi (its status line starts "- FILE" in
    // command mode) writes a file. Escape alone, as a person presses it:
    // followed at once by more keys, vi takes it as the start of a key's
    // escape sequence.
    type_line("vi /tmp/note\r");
    screen.until("- /tmp/note", STEP_LIMIT);
    type_line("ihello from vi");
    screen.until("hello from vi", STEP_LIMIT);
    type_line("\x1b");
    screen.until("- /tmp/note", STEP_LIMIT);
    type_line(":wq\r");
    screen.until("$ ", STEP_LIMIT);
    type_line("cat /tmp/note; echo \"do\"\"ne-3\"\r");
    let shown = screen.until("done-3", STEP_LIMIT);
    assert!(shown.contains("hello from vi\r\n"), "vi: {shown:?}");

    // Ctrl-C ends the foreground program (status 130), not the shell,
    // which abandons the rest of that line (as bash does) and prompts.
    type_line("sh -c 'echo \"sle\"\"eping\"; exec sleep 100'; echo \"not \"\"abandoned\"\r");
    screen.until("sleeping\r\n", STEP_LIMIT);
    type_line("\x03");
    screen.until("$ ", STEP_LIMIT);
    type_line("echo \"st\"\"atus-$?\"\r");
    let shown = screen.until("status-130\r\n", STEP_LIMIT);
    assert!(!shown.contains("not abandoned"), "{shown:?}");

    type_line("exit 7\r");
    let status = kiln.wait().expect("waiting for kiln");
    assert_eq!(
        status.code(),
        Some(7),
        "{status:?}; the screen:\n{}",
        screen.text()
    );
    assert_eq!(
        mode_fields(&modes(&master)),
        mode_fields(&before),
        "kiln's terminal settings were not restored"
    );
}

/// As docker: `-it` needs a terminal on stdin (refused before any boot);
/// `-t` on `kiln snapshot create` has no use and is refused.
#[test]
fn it_without_a_terminal_is_refused() {
    let out = kiln_cli()
        .args(["run", "--kernel", "/nonexistent", "-it", "--", "sh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("kiln: the input device is not a TTY"),
        "{err}"
    );
    let out = kiln_cli()
        .args([
            "snapshot",
            "create",
            "--kernel",
            "/nonexistent",
            "--output",
            "/nonexistent/s",
            "-t",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end(),
        "kiln: -t is `kiln run`'s: a warm-up command runs without a terminal"
    );
}
