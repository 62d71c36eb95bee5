//! The exec round trip against the guest's own fork+exec of the same
//! command, side by side on one VM (resources/bench/run.sh's `exec`
//! section).
//!
//!     cargo run --release --example exec_bench -- KERNEL ROOTFS_DIR [REPS [N]]
//!
//! Each repetition alternates, N times: one `Sandbox::exec` of
//! `sh -c 'echo hello'`, timed on the host from the call to its return
//! (output and status in hand); then one exec of a guest shell that runs
//! the same command itself (`sh -c 'echo hello' >/dev/null`) between two
//! reads of the guest's clock (`/proc/uptime`, read by the shell's own
//! `read`: no process), which the shell prints. Alternating command by
//! command keeps a busy host's load changes out of the ratio. Prints one
//! line per repetition (means over its N pairs) and a summary line with
//! the medians and ranges over the repetitions:
//!
//!     exec-bench exec_s=MEDIAN guest_s=MEDIAN ratio=MEDIAN (min-max: ...)

use std::time::Instant;

use kiln::sandbox::{Command, Sandbox};

const COMMAND: &str = "echo hello";

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kernel, rootfs, rest @ ..] = &args[..] else {
        eprintln!("usage: exec_bench KERNEL ROOTFS_DIR [REPS [N]]");
        std::process::exit(2);
    };
    let number = |i: usize, default: u32| -> Result<u32, String> {
        rest.get(i).map_or(Ok(default), |s| {
            s.parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("'{s}' is not a positive number"))
        })
    };
    let reps = number(0, 5)?;
    let n = number(1, 10)?;
    let started = Instant::now();
    let sandbox = Sandbox::builder()
        .kernel(kernel)
        .rootfs(rootfs)
        .memory(256 << 20)
        .vcpus(1)
        .build()?;
    println!("exec-bench ready_s={:.3}", started.elapsed().as_secs_f64());
    let run = |cmd: Command| -> Result<Vec<u8>, Error> {
        let out = sandbox.exec(cmd)?;
        match out.status.success() {
            true => Ok(out.stdout),
            false => Err(format!(
                "command failed: {} ({})",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
            .into()),
        }
    };
    let exec_once = || -> Result<f64, Error> {
        let t = Instant::now();
        let out = run(Command::new("sh").arg("-c").arg(COMMAND))?;
        let took = t.elapsed().as_secs_f64();
        match out == b"hello\n" {
            true => Ok(took),
            false => Err(format!("unexpected output {:?}", String::from_utf8_lossy(&out)).into()),
        }
    };
    let guest_script = format!(
        "read a _ </proc/uptime; sh -c '{COMMAND}' >/dev/null; read b _ </proc/uptime; echo $a $b"
    );
    let guest_once = || -> Result<f64, Error> {
        let out = run(Command::new("sh").arg("-c").arg(&guest_script))?;
        let text = String::from_utf8_lossy(&out);
        let times: Vec<f64> = text
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        match times[..] {
            [a, b] => Ok(b - a),
            _ => Err(format!("unexpected guest output {text:?}").into()),
        }
    };
    // Warm the guest's page cache (busybox) and the agent.
    exec_once()?;
    guest_once()?;
    let (mut execs, mut guests, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 1..=reps {
        let (mut exec, mut guest) = (Vec::new(), Vec::new());
        for _ in 0..n {
            exec.push(exec_once()?);
            guest.push(guest_once()?);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let range = |v: &[f64]| {
            let lo = v.iter().copied().fold(f64::MAX, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            format!("{lo:.3}-{hi:.3}")
        };
        let (e, g) = (mean(&exec), mean(&guest));
        println!(
            "exec-bench rep={rep} n={n} exec_s={e:.4} ({}) guest_s={g:.4} ({}) ratio={:.3}",
            range(&exec),
            range(&guest),
            e / g
        );
        execs.push(e);
        guests.push(g);
        ratios.push(e / g);
    }
    sandbox.shutdown()?;
    let summary = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (e, g, r) = (
        summary(&mut execs),
        summary(&mut guests),
        summary(&mut ratios),
    );
    println!(
        "exec-bench exec_s={:.4} guest_s={:.4} ratio={:.3} (min-max: exec {:.4}-{:.4}, guest \
         {:.4}-{:.4}, ratio {:.3}-{:.3}; {reps} reps of {n} pairs)",
        e.0, g.0, r.0, e.1, e.2, g.1, g.2, r.1, r.2
    );
    Ok(())
}
