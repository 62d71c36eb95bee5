//! The fuzz targets' CI pass without libFuzzer: every committed seed
//! (`fuzz/seeds/TARGET/`) and every input that once found a bug
//! (`fuzz/regressions/TARGET/`) runs through the target's body with its
//! bounds checked (`kiln_fuzz::fuzz`), under a watchdog that fails the run
//! if one never returns. A test also checks the committed seeds are what the
//! targets' seed generators make (`KILN_FUZZ_WRITE_SEEDS=1` rewrites them).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// Far above what any input takes (milliseconds; a sandbox send that times
/// out takes a few seconds): only a hang gets here.
const WATCHDOG: Duration = Duration::from_secs(120);

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    out.retain(|p| p.is_file());
    out.sort();
    out
}

/// Runs one input on a thread of its own; a hang ends the whole test
/// process with the input's name (the hung thread holds the targets' lock,
/// so nothing else could run anyway).
fn run_with_watchdog(target: &'static str, path: &Path, data: Vec<u8>) {
    let (done, wait) = mpsc::channel();
    let runner = std::thread::spawn(move || {
        let result = std::panic::catch_unwind(|| kiln_fuzz::fuzz(target, &data));
        let _ = done.send(());
        result
    });
    if wait.recv_timeout(WATCHDOG).is_err() {
        eprintln!(
            "fuzz target {target}: {} did not finish within {WATCHDOG:?} (a hang)",
            path.display()
        );
        std::process::exit(101);
    }
    if let Err(panic) = runner.join().expect("the runner catches panics") {
        eprintln!("fuzz target {target}: {} fails", path.display());
        std::panic::resume_unwind(panic);
    }
}

fn replay(target: &'static str) {
    // Read under the targets' lock: an input's file-descriptor count is
    // process-wide, so no other test may open a file while one runs.
    let only_one = kiln_fuzz::exclusive();
    let seeds = files(&fuzz_dir().join("seeds").join(target));
    assert!(!seeds.is_empty(), "fuzz/seeds/{target} holds no seeds");
    let regressions = files(&fuzz_dir().join("regressions").join(target));
    let inputs: Vec<(PathBuf, Vec<u8>)> = seeds
        .into_iter()
        .chain(regressions)
        .map(|path| {
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, data)
        })
        .collect();
    drop(only_one);
    for (path, data) in inputs {
        run_with_watchdog(target, &path, data);
    }
}

macro_rules! replay_tests {
    ($($name:ident),+ $(,)?) => {
        $(
            #[test]
            fn $name() {
                replay(stringify!($name));
            }
        )+

        #[test]
        fn every_target_is_replayed() {
            let mut replayed = vec![$(stringify!($name)),+];
            let mut all: Vec<&str> = kiln_fuzz::TARGETS.iter().map(|t| t.name).collect();
            replayed.sort();
            all.sort();
            assert_eq!(replayed, all);
        }
    };
}

replay_tests!(
    vsock, sandbox, protocol, net, block, mmio, console, tar, exec_spec, bus, rng, kernel,
);

/// The committed seeds are the generators' output, so a change to a
/// target's input format cannot leave stale seeds behind.
#[test]
fn committed_seeds_are_current() {
    let write = std::env::var_os("KILN_FUZZ_WRITE_SEEDS").is_some();
    let _only_one = kiln_fuzz::exclusive();
    for target in kiln_fuzz::TARGETS {
        let dir = fuzz_dir().join("seeds").join(target.name);
        let seeds = (target.seeds)();
        assert!(!seeds.is_empty(), "{} has no seed generator", target.name);
        if write {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("seed directory");
        }
        let mut names = Vec::new();
        for (name, data) in seeds {
            let path = dir.join(name);
            if write {
                std::fs::write(&path, &data).expect("write a seed");
            }
            let committed = std::fs::read(&path).unwrap_or_default();
            assert!(
                committed == data,
                "{} is not what its generator makes (KILN_FUZZ_WRITE_SEEDS=1 cargo test -p kiln-fuzz --test replay committed_seeds_are_current rewrites the seeds)",
                path.display()
            );
            names.push(path);
        }
        names.sort();
        assert_eq!(
            files(&dir),
            names,
            "files in {} that no generator makes",
            dir.display()
        );
    }
}
