//! A test suite on one VM: boot once, then check many things with `exec`.
//!
//!     cargo run --release --example sandbox -- KERNEL ROOTFS_DIR

use std::time::{Duration, Instant};

use kiln::sandbox::{Command, ExitStatus, Sandbox};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(kernel), Some(rootfs)) = (args.next(), args.next()) else {
        eprintln!("usage: sandbox KERNEL ROOTFS_DIR");
        std::process::exit(2);
    };
    let started = Instant::now();
    let sandbox = Sandbox::builder()
        .kernel(kernel)
        .rootfs(rootfs)
        .memory(256 << 20)
        .vcpus(1)
        .timeout(Duration::from_secs(600))
        .build()?;
    println!("sandbox ready in {:?}", started.elapsed());

    let sh = |script: &str| Command::new("sh").arg("-c").arg(script);
    let checks: Vec<(&str, Command, ExitStatus, &[u8])> = vec![
        ("echo", sh("echo hello"), ExitStatus::Code(0), b"hello\n"),
        ("status", sh("exit 42"), ExitStatus::Code(42), b""),
        (
            "env",
            sh("echo $GREETING").env("GREETING", "hi"),
            ExitStatus::Code(0),
            b"hi\n",
        ),
        (
            "cwd",
            Command::new("pwd").current_dir("/tmp"),
            ExitStatus::Code(0),
            b"/tmp\n",
        ),
        (
            "stdin",
            Command::new("cat").stdin_bytes("piped"),
            ExitStatus::Code(0),
            b"piped",
        ),
        ("signal", sh("kill -TERM $$"), ExitStatus::Signal(15), b""),
    ];
    let mut failed = 0;
    for (name, cmd, status, stdout) in checks {
        let t = Instant::now();
        let out = sandbox.exec(cmd.timeout(Duration::from_secs(60)))?;
        let ok = out.status == status && out.stdout == stdout;
        failed += usize::from(!ok);
        println!(
            "{} {name} ({:?}): {} {:?}",
            if ok { "ok  " } else { "FAIL" },
            t.elapsed(),
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    sandbox.shutdown()?;
    if failed > 0 {
        return Err(format!("{failed} checks failed").into());
    }
    Ok(())
}
