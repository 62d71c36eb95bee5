//! The bundle's hooks that kiln-oci runs: `prestart` and `createRuntime`,
//! at `create`, once the container's network namespace exists and before
//! the VM boots, so that what they put in it (Docker's `libnetwork-setkey`
//! moves a veth in and addresses it) is carried into the VM. They run in
//! the runtime's own namespaces with the container's state on stdin, as
//! runc runs them. `createContainer` and `startContainer` would run inside
//! the container, a guest here, and `poststart`/`poststop` are not run yet:
//! `--debug` logs each left out.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// `hooks`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HooksSpec {
    /// Run at create, after the namespaces exist (deprecated by the spec
    /// for `createRuntime`, still Docker's).
    #[serde(default)]
    pub prestart: Vec<HookSpec>,
    /// Run at create, after the namespaces exist.
    #[serde(default)]
    pub create_runtime: Vec<HookSpec>,
    /// Not run (inside the container).
    #[serde(default)]
    pub create_container: Vec<HookSpec>,
    /// Not run (inside the container).
    #[serde(default)]
    pub start_container: Vec<HookSpec>,
    /// Not run yet.
    #[serde(default)]
    pub poststart: Vec<HookSpec>,
    /// Not run yet.
    #[serde(default)]
    pub poststop: Vec<HookSpec>,
}

/// One hook.
#[derive(Clone, Debug, Deserialize)]
pub struct HookSpec {
    /// The program (absolute).
    pub path: PathBuf,
    /// Its argv, argv[0] included.
    #[serde(default)]
    pub args: Vec<String>,
    /// Its whole environment, KEY=VALUE.
    #[serde(default)]
    pub env: Vec<String>,
    /// Seconds before it is killed and the create fails; none: no limit.
    pub timeout: Option<u64>,
}

impl HooksSpec {
    /// The hooks run at create, in order: `prestart` then `createRuntime`,
    /// with the kind each belongs to.
    pub fn at_create(&self) -> impl Iterator<Item = (&'static str, &HookSpec)> {
        let prestart = self.prestart.iter().map(|h| ("prestart", h));
        prestart.chain(self.create_runtime.iter().map(|h| ("createRuntime", h)))
    }

    /// The kinds present that kiln-oci does not run, with their counts.
    pub fn left_out(&self) -> Vec<(&'static str, usize)> {
        [
            ("createContainer", self.create_container.len()),
            ("startContainer", self.start_container.len()),
            ("poststart", self.poststart.len()),
            ("poststop", self.poststop.len()),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
    }
}

/// Runs `hook` (of `kind`) with `state` on its stdin, in the network
/// namespace `netns` when given (the runtime's, while the caller is in the
/// container's). Fails with one line: the hook, and its status with the
/// first line of its stderr, or its timeout.
pub fn run(kind: &str, hook: &HookSpec, state: &[u8], netns: Option<&File>) -> Result<(), String> {
    let named = format!("{kind} hook {}", hook.path.display());
    let mut command = Command::new(&hook.path);
    if let Some((argv0, args)) = hook.args.split_first() {
        command.arg0(argv0).args(args);
    }
    command.env_clear();
    for entry in &hook.env {
        let (key, value) = entry.split_once('=').unwrap_or((entry, ""));
        command.env(key, value);
    }
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(netns) = netns {
        let fd = netns.as_raw_fd();
        // SAFETY: between fork and exec only setns runs, a plain system
        // call on a descriptor the parent keeps open (async-signal-safe).
        unsafe {
            command.pre_exec(move || match libc::setns(fd, libc::CLONE_NEWNET) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            });
        }
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("{named}: cannot run it: {e}"))?;
    // A hook that does not read its stdin gets EPIPE: not an error.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(state);
    }
    let stderr = child.stderr.take();
    // Read on a thread: a hook writing much to stderr must not block on it,
    // and a daemon it leaves holding stderr must not block us (below).
    let (said_tx, said_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = Vec::new();
        if let Some(stderr) = stderr {
            let _ = stderr.take(64 << 10).read_to_end(&mut text);
        }
        let _ = said_tx.send(text);
    });
    let deadline = hook
        .timeout
        .map(|secs| Instant::now() + Duration::from_secs(secs));
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("{named}: waiting for it: {e}")),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{named} did not finish within its timeout of {} s",
                hook.timeout.unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stderr = said_rx
        .recv_timeout(Duration::from_secs(1))
        .unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&stderr);
    let said = said.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    Err(format!("{named} failed ({status}): {said}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(script: &str, timeout: Option<u64>) -> HookSpec {
        HookSpec {
            path: "/bin/sh".into(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec!["HOOK_VAR=set".into()],
            timeout,
        }
    }

    #[test]
    fn a_hook_gets_the_state_its_args_and_only_its_env() {
        let dir = std::env::temp_dir().join(format!("kiln-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let script = format!(
            "cat > {0}; echo \" $0 $HOOK_VAR ${{HOME:-nohome}}\" >> {0}",
            out.display()
        );
        run("prestart", &hook(&script, Some(10)), b"{\"pid\":1}", None).unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{\"pid\":1} sh set nohome\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failing_or_slow_hook_is_one_line() {
        let e = run(
            "createRuntime",
            &hook("echo; echo cannot set key >&2; exit 3", None),
            b"",
            None,
        )
        .unwrap_err();
        assert_eq!(
            e,
            "createRuntime hook /bin/sh failed (exit status: 3): cannot set key"
        );
        let e = run("prestart", &hook("sleep 30", Some(1)), b"", None).unwrap_err();
        assert_eq!(
            e,
            "prestart hook /bin/sh did not finish within its timeout of 1 s"
        );
        let missing = HookSpec {
            path: "/nonexistent/hook".into(),
            args: vec![],
            env: vec![],
            timeout: None,
        };
        let e = run("prestart", &missing, b"", None).unwrap_err();
        assert!(
            e.starts_with("prestart hook /nonexistent/hook: cannot run it: "),
            "{e}"
        );
    }

    #[test]
    fn hooks_at_create_are_prestart_then_create_runtime() {
        let spec: HooksSpec = serde_json::from_str(
            r#"{"prestart":[{"path":"/a"}],"createRuntime":[{"path":"/b"}],
                "poststop":[{"path":"/c"},{"path":"/d"}],"startContainer":[{"path":"/e"}]}"#,
        )
        .unwrap();
        let order: Vec<_> = spec
            .at_create()
            .map(|(kind, h)| (kind, h.path.to_str().unwrap()))
            .collect();
        assert_eq!(order, [("prestart", "/a"), ("createRuntime", "/b")]);
        assert_eq!(spec.left_out(), [("startContainer", 1), ("poststop", 2)]);
    }
}
