//! Smoke test of the benchmark driver: `resources/bench/run.sh --quick --only
//! exits,startup` (the parts that need no Linux guest) runs to the end and
//! writes BENCHMARKS.md and BENCHMARKS.json with numbers in them. It makes no
//! assertion about the numbers themselves: timings depend on the host.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::{have_kvm, have_program, require};

/// Metrics of the two quick sections that kiln must have a number for.
const KILN_METRICS: [&str; 7] = [
    "exit_pio_us",
    "exit_mmio_us",
    "startup_first_run_ms",
    "startup_kiln_log_ms",
    "tiny_vm_wall_ms",
    "vms_per_sec_seq",
    "vms_per_sec_par2",
];

#[test]
fn quick_exits_and_startup_write_both_reports() {
    if !(require(have_kvm(), "/dev/kvm not accessible")
        && require(
            have_program("gcc"),
            "gcc missing (resources/setup.sh installs it)",
        ))
    {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scratch =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-smoke-{}", std::process::id()));
    let out = scratch.join("out");
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&out).expect("creating the output directory");

    let result = Command::new("bash")
        .arg(root.join("resources/bench/run.sh"))
        .args(["--quick", "--only", "exits,startup", "--out"])
        .arg(&out)
        .env("KILN_BIN", env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_BENCH_WORK", scratch.join("work"))
        .output()
        .expect("running resources/bench/run.sh");
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        result.status.success(),
        "run.sh failed ({}):\n{stderr}",
        result.status
    );

    let md = fs::read_to_string(out.join("BENCHMARKS.md")).expect("BENCHMARKS.md written");
    let json = fs::read_to_string(out.join("BENCHMARKS.json")).expect("BENCHMARKS.json written");
    eprintln!("{md}");

    for header in ["date (UTC)", "host CPU", "KVM", "kiln revision"] {
        assert!(
            md.contains(&format!("| {header} |")),
            "BENCHMARKS.md lacks '{header}'"
        );
    }
    let exit_row = md
        .lines()
        .find(|l| l.starts_with("| Exit cost: port write"))
        .expect("BENCHMARKS.md has the PIO exit-cost row");
    // | title | unit | kiln | QEMU | floor | ...
    let cells: Vec<&str> = exit_row.split('|').map(str::trim).collect();
    for (name, cell) in [("kiln", cells[3]), ("floor", cells[5])] {
        assert!(
            leading_number(cell).is_some(),
            "{name} cell '{cell}' in: {exit_row}"
        );
    }

    assert!(json.trim_start().starts_with('{') && json.trim_end().ends_with('}'));
    for key in [
        "\"date\":",
        "\"host\":",
        "\"kvm\":",
        "\"kiln_revision\":",
        "\"results\":",
    ] {
        assert!(json.contains(key), "BENCHMARKS.json lacks {key}");
    }
    for id in KILN_METRICS {
        let median = kiln_median(&json, id)
            .unwrap_or_else(|| panic!("BENCHMARKS.json has no kiln median for {id}:\n{json}"));
        assert!(
            median.is_finite() && median >= 0.0,
            "{id}: kiln median {median}"
        );
    }
    let floor = json.find("\"floor\": {\"median\": ").is_some();
    assert!(floor, "BENCHMARKS.json has no floor result");

    let _ = fs::remove_dir_all(&scratch);
}

/// The number a table cell starts with ("12.3 (11.0–13.1)" gives 12.3).
fn leading_number(cell: &str) -> Option<f64> {
    cell.split_whitespace().next()?.parse().ok()
}

/// The kiln median of result `id` in BENCHMARKS.json, found by text: each
/// result is one object that starts with `{"id": "<id>"` and holds
/// `"kiln": {"median": <number>`.
fn kiln_median(json: &str, id: &str) -> Option<f64> {
    let start = json.find(&format!("{{\"id\": \"{id}\""))?;
    let rest = &json[start..];
    let end = rest[1..].find("{\"id\": ").map_or(rest.len(), |e| e + 1);
    let object = &rest[..end];
    let at = object.find("\"kiln\": {\"median\": ")? + "\"kiln\": {\"median\": ".len();
    let number: String = object[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | 'e' | 'E' | '+'))
        .collect();
    number.parse().ok()
}
