//! The jail of a running `kiln run` (issue 10's check): its root is not the
//! host's and holds only what the run names, it is in namespaces of its
//! own, every thread runs as the jail's uid with no capability, no new
//! privileges and its seccomp filter, and nothing it inherited is open;
//! with `--jail off`, the same probes see the host's root and root's
//! capabilities (so the probes can tell). Run by an unprivileged user,
//! kiln jails itself in a user namespace. Bad jail options get one line.
//! That the jail holds everything a run needs is shown by the rest of the
//! suite, which runs with it on.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{have_kvm, is_root, kiln_cli, require, test_guest, Scratch};

const JAIL_ID: u32 = kiln::jail::DEFAULT_JAIL_ID;

/// The fields of /proc/PID/task/TID/status a jail sets, for every thread.
#[derive(Debug, PartialEq, Eq)]
struct Privileges {
    uids: String,
    gids: String,
    groups: String,
    /// CapInh, CapPrm, CapEff, CapBnd, CapAmb.
    caps: [u64; 5],
    no_new_privs: bool,
    seccomp: u32,
}

fn privileges(pid: u32) -> Vec<(String, Privileges)> {
    let mut all = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/task")).expect("kiln's tasks") {
        let Ok(status) = fs::read_to_string(entry.expect("a task").path().join("status")) else {
            continue; // a thread that ended meanwhile
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|| panic!("{key} in {status}"))
        };
        let cap = |key: &str| u64::from_str_radix(&field(key), 16).expect("hex");
        all.push((
            field("Name:"),
            Privileges {
                uids: field("Uid:"),
                gids: field("Gid:"),
                groups: field("Groups:"),
                caps: ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"].map(cap),
                no_new_privs: field("NoNewPrivs:") == "1",
                seccomp: field("Seccomp:").parse().expect("a number"),
            },
        ));
    }
    all
}

fn jailed(uid: u32, gid: u32) -> Privileges {
    Privileges {
        uids: [uid; 4].map(|u| u.to_string()).join(" "),
        gids: [gid; 4].map(|g| g.to_string()).join(" "),
        groups: String::new(),
        caps: [0; 5],
        no_new_privs: true,
        seccomp: 2,
    }
}

/// The names directly under `dir`.
fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

fn same_file(a: &Path, b: &Path) -> bool {
    let (a, b) = (fs::metadata(a).unwrap(), fs::metadata(b).unwrap());
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

/// Reads kiln's stderr until the line every VM thread is set up before.
fn wait_for_guest(kiln: &mut Child) {
    let stderr = kiln.stderr.take().expect("piped");
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.expect("kiln's stderr");
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("guest started") {
            // Keep draining, so that kiln never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return;
        }
    }
    panic!("kiln ended before its guest started:\n{seen}");
}

/// `kiln run` of a tiny guest that halts for good, on the agent path and
/// the classic one (`--vsock`, whose socket directory the jail shows),
/// with an extra descriptor inherited at 7 (a pipe), jail on and off.
#[test]
fn a_running_kiln_run_is_jailed_and_not_with_jail_off() {
    if !require(have_kvm(), "no read-write access to /dev/kvm")
        || !require(is_root(), "the jail's uid change needs root")
    {
        return;
    }
    let guest = test_guest("halt");
    let scratch = Scratch::new("jail");
    common::hand_to_jail(&scratch.0);
    let socket = scratch.path("v.sock");
    let classic = [
        "--vsock".to_string(),
        format!("cid=3,socket={}", socket.display()),
    ];
    let (pipe_read, _pipe_write) = common::pipe();
    let inherited = format!("pipe:[{}]", pipe_read.metadata().unwrap().ino());
    for (path, extra) in [("agent", &[][..]), ("classic", &classic[..])] {
        for jail in ["on", "off"] {
            let context = format!("{path} path, --jail {jail}");
            let fd = std::os::fd::AsRawFd::as_raw_fd(&pipe_read);
            let mut cmd = kiln_cli();
            cmd.arg("run")
                .arg("--kernel")
                .arg(&guest)
                .args(["--mem", "32M", "--timeout", "600s", "-v", "--jail", jail])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            // SAFETY: dup2 and fcntl are async-signal-safe; the child gets
            // the pipe at 7 without close-on-exec, as a careless parent
            // would leave it (dup2 onto itself would keep the flag).
            unsafe {
                cmd.pre_exec(move || {
                    let ok = match fd {
                        7 => libc::fcntl(7, libc::F_SETFD, 0) == 0,
                        _ => libc::dup2(fd, 7) == 7,
                    };
                    match ok {
                        true => Ok(()),
                        false => Err(std::io::Error::last_os_error()),
                    }
                });
            }
            let mut kiln = cmd.spawn().expect("starting kiln");
            wait_for_guest(&mut kiln);
            let pid = kiln.id();
            let proc = |p: &str| format!("/proc/{pid}/{p}");
            let root = Path::new(&proc("root")).to_path_buf();
            let threads = privileges(pid);
            let fd7 = fs::read_link(proc("fd/7")).ok();
            let guest_inside = root.join(guest.strip_prefix("/").unwrap());
            match jail {
                "on" => {
                    let expected = jailed(JAIL_ID, JAIL_ID);
                    for (name, p) in &threads {
                        assert_eq!(p, &expected, "{context}: thread {name}");
                    }
                    assert!(threads.len() >= 4, "{context}: {threads:?}");
                    assert!(!same_file(&root, Path::new("/")), "{context}: host root");
                    let top = names(&root);
                    for host_only in ["etc", "usr", "home", "proc", "sys", "root", "bin"] {
                        assert!(
                            !top.contains(host_only),
                            "{context}: /{host_only} in {top:?}"
                        );
                    }
                    assert_eq!(names(&root.join("dev")), ["kvm".to_string()].into());
                    assert!(same_file(&guest_inside, &guest), "{context}: the kernel");
                    if path == "classic" {
                        // Shown at kiln's own place, not at its path.
                        let dir_inside = root.join(".kiln/vsock");
                        assert!(same_file(&dir_inside, &scratch.0), "{context}");
                    }
                    for ns in ["mnt", "ipc", "uts", "net"] {
                        assert_ne!(
                            fs::read_link(proc(&format!("ns/{ns}"))).unwrap(),
                            fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(),
                            "{context}: {ns} namespace"
                        );
                    }
                    assert_ne!(fd7.as_deref(), Some(Path::new(&inherited)), "{context}");
                }
                _ => {
                    assert!(same_file(&root, Path::new("/")), "{context}");
                    let (name, main) = &threads[0];
                    assert!(main.uids.starts_with("0 "), "{context}: {name} {main:?}");
                    assert_ne!(main.caps[2], 0, "{context}: root's capabilities");
                    assert_eq!(
                        fs::read_link(proc("ns/mnt")).unwrap(),
                        fs::read_link("/proc/self/ns/mnt").unwrap(),
                        "{context}"
                    );
                    assert_eq!(fd7.as_deref(), Some(Path::new(&inherited)), "{context}");
                }
            }
            common::terminate(kiln);
        }
    }
    assert!(!socket.exists(), "the jailed kiln removed its socket");
}

/// Run by an unprivileged user (uid 65534, given read-write access to a
/// /dev/kvm of its own in a private mount namespace, as a member of a kvm
/// group would have), kiln enters a user namespace: its root is not the
/// host's, it holds no capability, and the guest runs to its end.
#[test]
fn an_unprivileged_kiln_run_jails_itself_in_a_user_namespace() {
    if !require(have_kvm(), "no read-write access to /dev/kvm")
        || !require(
            is_root(),
            "setting up an unprivileged user's /dev/kvm needs root",
        )
        || !require(common::have_program("unshare"), "no unshare(1)")
        || !require(common::have_program("setpriv"), "no setpriv(1)")
    {
        return;
    }
    let scratch = Scratch::new("jail-user");
    // Readable by the user: the guest, in a directory it can reach.
    let guest = scratch.path("halt.elf");
    fs::copy(test_guest("halt"), &guest).unwrap();
    for path in [&scratch.0, &guest] {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let kvm = scratch.path("kvm");
    let script = format!(
        "set -e; mknod {kvm} c 10 232; chown {JAIL_ID}:{JAIL_ID} {kvm}; \
         mount --bind {kvm} /dev/kvm; \
         exec setpriv --reuid {JAIL_ID} --regid {JAIL_ID} --clear-groups -- \"$@\"",
        kvm = kvm.display()
    );
    let mut kiln = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            &script,
            "sh",
        ])
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .arg("run")
        .arg("--kernel")
        .arg(&guest)
        .args(["--mem", "32M", "--timeout", "600s", "-v"])
        .env_remove("KILN_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kiln");
    wait_for_guest(&mut kiln);
    // setpriv execs kiln: the child's pid is kiln's.
    let pid = kiln.id();
    let root = Path::new(&format!("/proc/{pid}/root")).to_path_buf();
    for (name, p) in privileges(pid) {
        assert_eq!(p.uids, jailed(JAIL_ID, JAIL_ID).uids, "{name}");
        assert_eq!(p.caps[..3], [0; 3], "{name}: {p:?}");
        assert_eq!((p.no_new_privs, p.seccomp), (true, 2), "{name}");
    }
    assert!(!same_file(&root, Path::new("/")), "host root");
    assert_ne!(
        fs::read_link(format!("/proc/{pid}/ns/user")).unwrap(),
        fs::read_link("/proc/self/ns/user").unwrap(),
        "a user namespace of its own"
    );
    common::terminate(kiln);
}

/// Bad jail options and a `--vsock` directory the jail's uid cannot write
/// get one line and status 125, before anything runs.
#[test]
fn bad_jail_options_are_refused_in_one_line() {
    if !require(is_root(), "the jail's uid checks apply to root") {
        return;
    }
    let guest = test_guest("hello");
    let scratch = Scratch::new("jail-refused");
    // Root's, mode 0755: uid 65534 cannot create a socket there.
    let root_only = scratch.path("root-only");
    fs::create_dir(&root_only).unwrap();
    let socket = format!("cid=3,socket={}", root_only.join("v.sock").display());
    let cases: [(&[&str], &str); 6] = [
        (&["--cgroup", "mem=1M"], "mem=1M: at least 16M"),
        (&["--cgroup", "disk=1"], "--cgroup"),
        (
            &["--jail-uid", "0"],
            "--jail-uid and --jail-gid must not be 0",
        ),
        (
            &["--jail-gid", "0"],
            "--jail-uid and --jail-gid must not be 0",
        ),
        (&["--jail", "maybe"], "'maybe': the jail is 'on' or 'off'"),
        (
            &["--vsock", &socket],
            "--vsock: kiln runs as uid 65534 gid 65534 once jailed and cannot create its socket in",
        ),
    ];
    for (args, expected) in cases {
        let out = kiln_cli()
            .arg("run")
            .arg("--kernel")
            .arg(&guest)
            .args(["--mem", "32M", "--timeout", "5s"])
            .args(args)
            .output()
            .expect("running kiln");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    assert!(!root_only.join("v.sock").exists());
}

/// `--cgroup cpus=0.5,mem=256M,pids=64`: the running kiln is in a cgroup of
/// its own (`kiln-PID` in each hierarchy: cgroup v1 here, v2 where it is
/// the only one) with those limits, and the cgroup is gone once kiln has
/// ended, by SIGTERM or by SIGKILL (its keeper process removes it).
#[test]
fn cgroup_limits_apply_and_the_cgroup_goes_with_kiln() {
    if !require(have_kvm(), "no read-write access to /dev/kvm")
        || !require(is_root(), "creating cgroups needs root")
    {
        return;
    }
    let guest = test_guest("halt");
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let mut kiln = kiln_cli()
            .arg("run")
            .arg("--kernel")
            .arg(&guest)
            .args(["--mem", "32M", "--timeout", "600s", "-v"])
            .args(["--cgroup", "cpus=0.5,mem=256M,pids=64"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting kiln");
        wait_for_guest(&mut kiln);
        let pid = kiln.id();
        let name = format!("kiln-{pid}");
        let membership = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let dirs: Vec<(String, &str, &str)> = match v2 {
            true => {
                let dir = format!("/sys/fs/cgroup/{name}");
                vec![
                    (dir.clone(), "memory.max", "268435456"),
                    (dir.clone(), "pids.max", "64"),
                    (dir, "cpu.max", "50000 100000"),
                ]
            }
            false => vec![
                (
                    format!("/sys/fs/cgroup/memory/{name}"),
                    "memory.limit_in_bytes",
                    "268435456",
                ),
                (format!("/sys/fs/cgroup/pids/{name}"), "pids.max", "64"),
                (
                    format!("/sys/fs/cgroup/cpu/{name}"),
                    "cpu.cfs_quota_us",
                    "50000",
                ),
            ],
        };
        for (dir, file, value) in &dirs {
            let path = format!("{dir}/{file}");
            let read = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(read.trim(), *value, "{path}");
            let tasks = fs::read_to_string(format!("{dir}/cgroup.procs")).unwrap();
            assert_eq!(tasks.trim(), pid.to_string(), "{dir}: only kiln");
        }
        assert!(
            membership
                .lines()
                .any(|l| l.ends_with(&format!(":/{name}"))),
            "{membership}"
        );
        // kiln's one child process: the keeper that removes the cgroup.
        let keeper: i32 = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap()
            .trim()
            .parse()
            .expect("one keeper process");
        // SAFETY: kill with the pid of a child this test owns and has not reaped.
        assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
        kiln.wait().expect("waiting for kiln");
        // The keeper ends once it has removed the cgroup.
        assert!(common::process_ended(keeper), "the keeper still runs");
        for (dir, _, _) in &dirs {
            assert!(
                !Path::new(dir).exists(),
                "{dir} left behind after signal {signal}"
            );
        }
    }
}
