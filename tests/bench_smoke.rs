//! Smoke tests of the benchmark driver, resources/bench/run.sh:
//! - `--quick --only exits,startup,security,stop` (the parts that need no Linux guest) runs
//!   to the end and writes BENCHMARKS.md and BENCHMARKS.json with numbers in
//!   them. No assertion about the numbers themselves: timings depend on the host.
//! - `--dry-run`: in the identical-input rows (boot, disk, net, fs) kiln and
//!   QEMU get the same guest: kernel, initramfs, memory, vCPUs, devices (a
//!   share: the same directory, served by the same virtiofsd with kiln's
//!   options), kernel command line word for word, and the KVM paravirt
//!   features kiln hides.
//!   Every difference between the two invocations is named below with why.
//! - `--dry-run --only oci`: podman with runc and with kiln-oci gets the same
//!   image and the same options but `--runtime` (and kiln-oci's kernel by
//!   `--runtime-flag kernel=`), in a store of the run's own.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use common::{guest_kernel, have_kvm, have_program, is_root, require, Scratch};

/// Metrics of the quick sections that kiln must have a number for.
const KILN_METRICS: [&str; 18] = [
    "exit_pio_us",
    "exit_mmio_us",
    "startup_first_run_ms",
    "startup_kiln_log_ms",
    "tiny_vm_wall_ms",
    "vms_per_sec_seq",
    "vms_per_sec_par2",
    "stop_timeout_spin_ms",
    "stop_timeout_halt_ms",
    "stop_signal_ms",
    "security_default_start_ms",
    "security_nojail_start_ms",
    "security_noseccomp_start_ms",
    "security_off_start_ms",
    "security_default_wall_ms",
    "security_nojail_wall_ms",
    "security_noseccomp_wall_ms",
    "security_off_wall_ms",
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
        .args(["--quick", "--only", "exits,startup,security,stop", "--out"])
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

/// The rows whose two sides must match.
const IDENTICAL_ROWS: [&str; 4] = ["boot", "disk", "net", "fs"];

/// The options of QEMU's virtiofsd besides its socket and directory: those
/// src/share.rs gives kiln's own daemon for a share without `cache=`.
const VIRTIOFSD_OPTIONS: [&str; 3] = ["--cache=auto", "--sandbox=namespace", "--log-level=error"];

/// kiln's virtio-fs request queue size (devices/src/virtio/fs), which
/// QEMU's vhost-user-fs-device gets (its default is 128).
const FS_QUEUE_SIZE: &str = "256";

/// QEMU microvm options the identical-input rows may use, each with why (none
/// of them changes what the guest is given besides what kiln has too).
const QEMU_MACHINE_OPTIONS: [(&str, &str); 6] = [
    (
        "x-option-roms=off",
        "no firmware option ROMs: kiln loads the kernel itself",
    ),
    ("rtc=off", "kiln has no RTC"),
    (
        "acpi=off",
        "no ACPI in kiln; microvm then writes an MP table, as kiln does",
    ),
    ("ioapic2=off", "one IO-APIC, as kiln has"),
    (
        "kernel-irqchip=on",
        "PIC, IO-APIC and PIT in KVM, as kiln creates them",
    ),
    (
        "auto-kernel-cmdline=off",
        "the command line is kiln's, word for word",
    ),
];

/// `-cpu` properties QEMU may get, each with why: together they make QEMU's
/// CPUID kiln's where QEMU can express it.
const QEMU_CPU_OPTIONS: [(&str, &str); 10] = [
    ("host", "kiln passes KVM's supported CPUID"),
    (
        "migratable=off",
        "features QEMU holds back for migration, which kiln passes",
    ),
    (
        "host-cache-info=on",
        "the host's cache leaves, as kiln passes them",
    ),
    (
        "vmware-cpuid-freq=off",
        "no TSC frequency leaf: kiln adds none",
    ),
    (
        "model-id=",
        "the empty brand string KVM reports and kiln passes",
    ),
    (
        "+topoext",
        "extended topology bit, which kiln passes where the host has it",
    ),
    (
        "-arch-capabilities",
        "PVM: QEMU aborts setting MSR 0x10a otherwise",
    ),
    ("kvm-pv-unhalt=off", "kiln's PVM profile hides PV_UNHALT"),
    ("kvm-pv-ipi=off", "kiln's PVM profile hides PV_SEND_IPI"),
    (
        "kvm-pv-sched-yield=off",
        "kiln's PVM profile hides PV_SCHED_YIELD",
    ),
];

/// QEMU options that add nothing to the guest: no device, no firmware, no UI.
/// `-name ...,debug-threads=on` names QEMU's vCPU thread for the idle-CPU split.
const QEMU_NEUTRAL_FLAGS: [&str; 3] = ["-enable-kvm", "-nodefaults", "-no-user-config"];
const QEMU_NEUTRAL_OPTIONS: [(&str, &str); 3] = [
    ("-display", "none"),
    ("-monitor", "none"),
    ("-name", "kilnbench,debug-threads=on"),
];

/// KVM paravirt feature bits (CPUID 0x4000_0001 EAX) kiln's PVM profile
/// hides: PV_UNHALT, PV_SEND_IPI, PV_SCHED_YIELD.
const KVM_PV_HIDDEN_BITS: [u32; 3] = [7, 11, 13];

/// What every dry run needs: run.sh's own prerequisites, the guest kernel
/// and virtiofsd (the fs row shares a directory, kiln-oci the root).
fn dry_run_prerequisites() -> bool {
    require(have_kvm(), "/dev/kvm not accessible")
        && require(
            have_program("gcc"),
            "gcc missing (resources/setup.sh installs it)",
        )
        && require(
            have_program("busybox") && have_program("cpio"),
            "busybox or cpio missing (resources/setup.sh installs them)",
        )
        && require(
            guest_kernel("vmlinux").is_some(),
            "guest kernel missing (run resources/setup.sh)",
        )
        && require(
            kiln::share::find_virtiofsd(None).is_ok(),
            "the fs and oci rows need virtiofsd (resources/setup.sh installs it)",
        )
}

/// `run.sh --dry-run --only SECTIONS` with `work` as its scratch root: its
/// rows, by name.
fn dry_run(sections: &str, work: &Path) -> BTreeMap<String, Row> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let result = Command::new("bash")
        .arg(root.join("resources/bench/run.sh"))
        .args(["--dry-run", "--only", sections])
        .env("KILN_BIN", env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_BENCH_WORK", work)
        .output()
        .expect("running resources/bench/run.sh --dry-run");
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        result.status.success(),
        "run.sh --dry-run failed ({}):\n{stdout}\n{stderr}",
        result.status
    );
    eprintln!("{stdout}");
    parse_dry_run(&stdout)
}

/// A row of the dry run that must be there.
fn row<'a>(rows: &'a BTreeMap<String, Row>, name: &str) -> &'a Row {
    rows.get(name)
        .unwrap_or_else(|| panic!("no '{name}' row in the dry run: {:?}", rows.keys()))
}

#[test]
fn identical_input_rows_give_kiln_and_qemu_the_same_guest() {
    if !(dry_run_prerequisites()
        && require(
            have_program("qemu-system-x86_64"),
            "qemu-system-x86_64 missing (resources/setup.sh installs it)",
        )
        && require(
            is_root() && have_program("ip"),
            "the net row needs root and ip (a network namespace)",
        ))
    {
        return;
    }
    let scratch = Scratch::new("bench-dry");
    let rows = dry_run("boot,disk,net,fs", &scratch.path("work"));
    for name in IDENTICAL_ROWS {
        check_row(name, row(&rows, name));
    }
}

/// podman's global options that take a separate value, as run.sh passes
/// them; any other global option must be one `--name=value` word or a flag.
const PODMAN_VALUE_OPTIONS: [&str; 5] = [
    "--root",
    "--runroot",
    "--tmpdir",
    "--runtime",
    "--runtime-flag",
];

/// What podman's containers need on these hosts (../shared/ENVIRONMENT.md),
/// as tests/oci.rs gives them.
const PODMAN_RUN_OPTIONS: [&str; 6] = [
    "--network",
    "none",
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=32768:32768",
];

#[test]
fn oci_row_gives_runc_and_kiln_oci_the_same_podman() {
    if !(dry_run_prerequisites()
        && require(
            ["podman", "runc", "conmon", "tar"]
                .iter()
                .all(|p| have_program(p)),
            "podman, runc, conmon or tar missing (resources/setup.sh installs them)",
        )
        && require(is_root(), "the oci row needs root (podman's private store)"))
    {
        return;
    }
    let scratch = Scratch::new("bench-dry-oci");
    let work = scratch.path("work");
    let rows = dry_run("oci", &work);
    check_oci_row(row(&rows, "oci"), &work);
}

/// One podman invocation of the dry run, taken apart.
#[derive(Debug, Clone, PartialEq)]
struct Podman {
    /// Global options besides the runtime's, in order.
    globals: Vec<String>,
    runtime: Option<String>,
    runtime_flags: Vec<String>,
    /// The subcommand and its words.
    command: Vec<String>,
}

fn podman_invocation(what: &str, line: &str) -> Podman {
    let argv = shell_words(line);
    assert_eq!(
        argv.first().map(String::as_str),
        Some("podman"),
        "{what}: {line}"
    );
    let mut podman = Podman {
        globals: Vec::new(),
        runtime: None,
        runtime_flags: Vec::new(),
        command: Vec::new(),
    };
    let mut words = argv[1..].iter();
    while let Some(word) = words.next() {
        if !word.starts_with("--") {
            podman.command.push(word.clone());
            podman.command.extend(words.by_ref().cloned());
            break;
        }
        if !PODMAN_VALUE_OPTIONS.contains(&word.as_str()) {
            podman.globals.push(word.clone());
            continue;
        }
        let value = words
            .next()
            .unwrap_or_else(|| panic!("{what}: {word} without a value: {line}"))
            .clone();
        match word.as_str() {
            "--runtime" => {
                assert!(podman.runtime.is_none(), "{what}: two --runtime: {line}");
                podman.runtime = Some(value);
            }
            "--runtime-flag" => podman.runtime_flags.push(value),
            _ => podman.globals.extend([word.clone(), value]),
        }
    }
    podman
}

fn check_oci_row(row: &Row, work: &Path) {
    let image = one("oci", row, "image");
    let kernel = one("oci", row, "kiln-oci kernel");
    assert!(
        Path::new(kernel).is_absolute() && Path::new(kernel).is_file(),
        "oci: kiln-oci's kernel '{kernel}' is not an absolute path to a file"
    );
    let import = podman_invocation("import", one("oci", row, "image import argv"));
    let globals = &import.globals;
    // A store of the run's own, under its work directory.
    for option in ["--root", "--runroot", "--tmpdir"] {
        let at = globals
            .iter()
            .position(|g| g == option)
            .unwrap_or_else(|| panic!("oci: podman without {option}: {globals:?}"));
        assert!(
            Path::new(&globals[at + 1]).starts_with(work),
            "oci: podman {option} {} is not under the run's work directory {}",
            globals[at + 1],
            work.display()
        );
    }
    assert!(
        globals.iter().any(|g| g == "--cgroup-manager=cgroupfs"),
        "oci: podman without --cgroup-manager=cgroupfs: {globals:?}"
    );
    assert_eq!(import.runtime, None, "oci: import with a runtime");
    assert_eq!(
        import.command.first().map(String::as_str),
        Some("import"),
        "oci: {import:?}"
    );
    assert_eq!(
        import.command.last().map(String::as_str),
        Some(image),
        "oci: the imported image is not the one the rows run"
    );

    let kiln_oci = Path::new(env!("CARGO_BIN_EXE_kiln-oci"));
    for what in ["run", "detached", "exec"] {
        let runc = podman_invocation(what, one("oci", row, &format!("runc {what} argv")));
        let kiln = podman_invocation(what, one("oci", row, &format!("kiln-oci {what} argv")));
        // The runtime and kiln-oci's kernel: the one difference in options.
        assert_eq!(runc.runtime.as_deref(), Some("runc"), "oci: runc {what}");
        assert!(runc.runtime_flags.is_empty(), "oci: runc {what}: {runc:?}");
        assert_eq!(
            kiln.runtime.as_deref().map(Path::new),
            Some(kiln_oci),
            "oci: kiln-oci {what}: not the kiln-oci beside KILN_BIN"
        );
        assert_eq!(
            kiln.runtime_flags,
            [format!("kernel={kernel}")],
            "oci: kiln-oci {what}: its runtime flags"
        );
        assert_eq!(runc.globals, *globals, "oci: runc {what}: podman's options");
        assert_eq!(
            kiln.globals, *globals,
            "oci: kiln-oci {what}: podman's options"
        );

        let (r, k) = (&runc.command, &kiln.command);
        match what {
            "run" => {
                assert_eq!(
                    r, k,
                    "oci: {what}: runc's (left) and kiln-oci's (right) differ"
                );
                let mut expected = vec!["run".to_string(), "--rm".to_string()];
                expected.extend(PODMAN_RUN_OPTIONS.map(String::from));
                expected.extend([image.to_string(), "true".to_string()]);
                assert_eq!(*r, expected, "oci: {what}");
            }
            "detached" => {
                // `run -d --name NAME OPTIONS IMAGE sleep N`: only the names differ.
                let name_at = r.iter().position(|w| w == "--name").expect("--name") + 1;
                assert_ne!(r[name_at], k[name_at], "oci: both containers have one name");
                let mut k_renamed = k.clone();
                k_renamed[name_at] = r[name_at].clone();
                assert_eq!(
                    *r, k_renamed,
                    "oci: {what}: runc's (left) and kiln-oci's (right) differ"
                );
                let mut expected: Vec<String> = ["run", "-d", "--name", r[name_at].as_str()]
                    .map(String::from)
                    .to_vec();
                expected.extend(PODMAN_RUN_OPTIONS.map(String::from));
                expected.extend([image.to_string(), "sleep".to_string()]);
                assert_eq!(r[..r.len() - 1], expected, "oci: {what}");
                let secs = r.last().unwrap();
                assert!(secs.parse::<u32>().is_ok(), "oci: {what}: sleep {secs}");
            }
            _ => {
                // `exec NAME true` on the detached container of its runtime.
                for (side, words) in [("runc", r), ("kiln-oci", k)] {
                    let detached =
                        podman_invocation(what, one("oci", row, &format!("{side} detached argv")));
                    let name_at = detached.command.iter().position(|w| w == "--name").unwrap() + 1;
                    assert_eq!(
                        *words,
                        ["exec", detached.command[name_at].as_str(), "true"],
                        "oci: {side} exec"
                    );
                }
            }
        }
    }
}

/// One row of the dry run: its `key: value` lines (repeated keys in order).
type Row = BTreeMap<String, Vec<String>>;

fn parse_dry_run(text: &str) -> BTreeMap<String, Row> {
    let mut rows = BTreeMap::new();
    let mut current: Option<(String, Row)> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("== ") {
            rows.extend(current.take());
            current = Some((name.trim().to_string(), Row::new()));
        } else if let (Some((_, row)), Some((key, value))) =
            (current.as_mut(), line.split_once(": "))
        {
            row.entry(key.to_string())
                .or_default()
                .push(value.to_string());
        }
    }
    rows.extend(current);
    rows
}

fn one<'a>(row_name: &str, row: &'a Row, key: &str) -> &'a str {
    match row.get(key).map(Vec::as_slice) {
        Some([value]) => value,
        other => panic!("{row_name}: expected one '{key}' line, got {other:?}"),
    }
}

/// What a monitor's invocation gives the guest.
#[derive(Debug, Default, PartialEq)]
struct Guest {
    kernel: String,
    initrd: String,
    mem: String,
    cpus: String,
    /// In the order the guest finds them (the virtio transports' order).
    devices: Vec<String>,
    /// The virtiofsd program serving the shares (none: no share).
    virtiofsd: String,
}

fn check_row(name: &str, row: &Row) {
    let kiln_argv = shell_words(one(name, row, "kiln argv"));
    let qemu_argv = shell_words(one(name, row, "qemu argv"));
    let (kiln, user_words) = kiln_guest(name, &kiln_argv);
    let daemon_argv = row
        .get("qemu virtiofsd argv")
        .map(|_| shell_words(one(name, row, "qemu virtiofsd argv")));
    let (qemu, qemu_line) = qemu_guest(name, &qemu_argv, daemon_argv.as_deref());
    assert_eq!(
        kiln, qemu,
        "{name}: kiln's guest (left) and QEMU's (right) differ"
    );

    // kiln runs the guest the classic way (console on stdio, nothing of its
    // own added) only for an initrd started by its own init.
    assert!(
        !kiln.initrd.is_empty()
            && user_words
                .split_whitespace()
                .any(|w| w.starts_with("rdinit=")),
        "{name}: kiln's initrd must start its own init (--initrd and --cmdline rdinit=...)"
    );

    // kiln's command line: what --print-cmdline said is what its run logged.
    let printed = one(name, row, "kiln cmdline (--print-cmdline)");
    let logged = one(name, row, "kiln cmdline (logged by its run)");
    assert_eq!(
        printed, logged,
        "{name}: kiln --print-cmdline vs the line its run logged"
    );
    assert_eq!(
        qemu_line,
        one(name, row, "qemu cmdline"),
        "{name}: QEMU's -append"
    );
    let kiln_words: Vec<&str> = printed.split_whitespace().collect();
    let qemu_words: Vec<&str> = qemu_line.split_whitespace().collect();
    assert_eq!(
        kiln_words.len(),
        qemu_words.len(),
        "{name}: command lines differ in length:\nkiln: {printed}\nqemu: {qemu_line}"
    );
    for (k, q) in kiln_words.iter().zip(&qemu_words) {
        // The one difference allowed: where each monitor put a virtio device.
        let both_virtio =
            k.starts_with("virtio_mmio.device=") && q.starts_with("virtio_mmio.device=");
        assert!(
            k == q || both_virtio,
            "{name}: kiln's word '{k}' vs QEMU's '{q}':\nkiln: {printed}\nqemu: {qemu_line}"
        );
    }
    let virtio_devices = kiln
        .devices
        .iter()
        .filter(|d| d.starts_with("virtio-"))
        .count();
    let virtio_words = kiln_words
        .iter()
        .filter(|w| w.starts_with("virtio_mmio.device="))
        .count();
    assert_eq!(
        virtio_words, virtio_devices,
        "{name}: kiln's command line names {virtio_words} virtio devices, its options ask for {virtio_devices}"
    );
    assert!(
        kiln_words.ends_with(&user_words.split_whitespace().collect::<Vec<_>>()),
        "{name}: kiln's --cmdline words must end its command line"
    );

    // CPUID: the KVM paravirt features kiln hides, QEMU hides too.
    let features = one(name, row, "kvm features (cpuid 0x40000001.0 eax)");
    let value = |side: &str| -> u32 {
        let text = features
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{side}=")))
            .unwrap_or_else(|| panic!("{name}: no {side} value in '{features}'"));
        u32::from_str_radix(text.trim_start_matches("0x"), 16)
            .unwrap_or_else(|e| panic!("{name}: {side} CPUID value '{text}': {e}"))
    };
    let (kiln_eax, qemu_eax) = (value("kiln"), value("qemu"));
    for bit in KVM_PV_HIDDEN_BITS {
        assert_eq!(
            kiln_eax >> bit & 1,
            qemu_eax >> bit & 1,
            "{name}: KVM paravirt feature bit {bit} (CPUID 0x40000001 EAX): kiln {kiln_eax:#x}, QEMU {qemu_eax:#x}"
        );
    }
}

/// kiln's guest from `kiln run ...`, and its `--cmdline` words.
fn kiln_guest(row: &str, argv: &[String]) -> (Guest, String) {
    assert_eq!(
        argv.get(1).map(String::as_str),
        Some("run"),
        "{row}: {argv:?}"
    );
    // kiln's UART is always there as ttyS0; for an initrd started by its own
    // init (checked by the caller) it is kiln's stdin and stdout.
    let mut guest = Guest {
        cpus: "1".into(),
        devices: vec!["serial ttyS0 on stdio".into()],
        ..Default::default()
    };
    let mut user = String::new();
    let mut args = argv[2..].iter();
    while let Some(opt) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| panic!("{row}: kiln {opt} without a value"))
                .clone()
        };
        match opt.as_str() {
            "--kernel" => guest.kernel = value(),
            "--initrd" => guest.initrd = value(),
            "--mem" => guest.mem = value(),
            "--cpus" => guest.cpus = value(),
            "--cmdline" => user = value(),
            "--disk" => guest.devices.push(format!("virtio-blk {}", value())),
            "--net" => guest.devices.push(format!("virtio-net {}", value())),
            "--share" => {
                // HOST_DIR:GUEST_PATH; the guest path (and the tag) reach
                // the guest as kiln's kiln.share= word, compared with the
                // rest of the command line.
                let share = value();
                let (dir, _) = share
                    .rsplit_once(':')
                    .unwrap_or_else(|| panic!("{row}: --share {share}"));
                guest.devices.push(format!("virtio-fs {dir}"));
            }
            "--virtiofsd" => guest.virtiofsd = value(),
            other => panic!(
                "{row}: kiln option '{other}' has no QEMU counterpart in this check; name one here"
            ),
        }
    }
    (guest, user)
}

/// QEMU's guest from its invocation (and that of the virtiofsd the script
/// starts for it, if any), and its `-append` line. Every option is either
/// part of the guest (compared with kiln's) or named above.
fn qemu_guest(row: &str, argv: &[String], daemon: Option<&[String]>) -> (Guest, String) {
    let mut guest = Guest {
        cpus: "1".into(),
        ..Default::default()
    };
    let mut line = String::new();
    let mut drives = BTreeMap::new();
    let mut netdevs = BTreeMap::new();
    let mut sockets = BTreeMap::new();
    // The memory backend the machine names, and the memfd objects by id.
    let mut backend = None;
    let mut memfds = BTreeMap::new();
    let mut tags = Vec::new();
    // virtiofsd: its socket and the directory it serves.
    let served = daemon.map(|argv| {
        guest.virtiofsd = argv[0].clone();
        let mut socket = None;
        let mut dir = None;
        let mut args = argv[1..].iter();
        while let Some(arg) = args.next() {
            if let Some(path) = arg.strip_prefix("--socket-path=") {
                socket = Some(path.to_string());
            } else if arg == "--shared-dir" {
                dir = args.next().cloned();
            } else {
                assert!(
                    VIRTIOFSD_OPTIONS.contains(&arg.as_str()),
                    "{row}: QEMU's virtiofsd option {arg} is not one kiln gives its own"
                );
            }
        }
        for option in VIRTIOFSD_OPTIONS {
            assert!(
                argv.iter().any(|a| a == option),
                "{row}: QEMU's virtiofsd lacks {option}, which kiln gives its own"
            );
        }
        (
            socket.unwrap_or_else(|| panic!("{row}: virtiofsd without --socket-path")),
            dir.unwrap_or_else(|| panic!("{row}: virtiofsd without --shared-dir")),
        )
    });
    let mut args = argv[1..].iter();
    while let Some(opt) = args.next() {
        if QEMU_NEUTRAL_FLAGS.contains(&opt.as_str()) {
            continue;
        }
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{row}: QEMU {opt} without a value"))
            .clone();
        match opt.as_str() {
            "-M" | "-machine" => {
                // Guest RAM virtiofsd can map (checked below), as kiln's
                // is with a share.
                let value = match value.strip_suffix(",memory-backend=mem") {
                    Some(rest) => {
                        backend = Some("mem".to_string());
                        rest.to_string()
                    }
                    None => value,
                };
                check_options(row, "-M", &value, "microvm", &QEMU_MACHINE_OPTIONS, true)
            }
            "-object" => {
                let (kind, rest) = value.split_once(',').unwrap_or((&value, ""));
                assert_eq!(kind, "memory-backend-memfd", "{row}: QEMU -object {value}");
                let props = checked_properties(row, "-object", rest, |k, v| {
                    matches!((k, v), ("id" | "size", _) | ("share", "on"))
                });
                assert_eq!(
                    props.get("share").map(String::as_str),
                    Some("on"),
                    "{row}: {value}"
                );
                memfds.insert(props["id"].clone(), props["size"].clone());
            }
            "-chardev" => {
                let (kind, rest) = value.split_once(',').unwrap_or((&value, ""));
                assert_eq!(kind, "socket", "{row}: QEMU -chardev {value}");
                let props =
                    checked_properties(row, "-chardev", rest, |k, _| matches!(k, "id" | "path"));
                sockets.insert(props["id"].clone(), props["path"].clone());
            }
            "-cpu" => check_options(row, "-cpu", &value, "host", &QEMU_CPU_OPTIONS, false),
            "-kernel" => guest.kernel = value,
            "-initrd" => guest.initrd = value,
            "-m" => guest.mem = value,
            "-smp" => guest.cpus = value,
            "-append" => line = value,
            "-serial" if value == "stdio" => guest.devices.push("serial ttyS0 on stdio".into()),
            "-drive" => {
                // kiln's disks are raw files it reads and writes through the
                // host page cache (buffered I/O); QEMU's the same.
                let props = checked_properties(row, "-drive", &value, |k, v| {
                    matches!(
                        (k, v),
                        ("file" | "id", _)
                            | ("format", "raw")
                            | ("if", "none")
                            | ("cache", "writeback")
                            | ("aio", "threads")
                    )
                });
                drives.insert(props["id"].clone(), props["file"].clone());
            }
            "-netdev" => {
                let (kind, rest) = value.split_once(',').unwrap_or((&value, ""));
                assert_eq!(kind, "tap", "{row}: QEMU -netdev {value}");
                // kiln opens the TAP itself, and its virtio-net backend is in
                // user space (no vhost-net).
                let props = checked_properties(row, "-netdev", rest, |k, v| {
                    matches!(
                        (k, v),
                        ("id" | "ifname", _) | ("script" | "downscript", "no") | ("vhost", "off")
                    )
                });
                netdevs.insert(props["id"].clone(), props["ifname"].clone());
            }
            "-device" => {
                let (kind, rest) = value.split_once(',').unwrap_or((&value, ""));
                let props = properties(rest);
                let device = match (kind, props.len()) {
                    ("virtio-blk-device", 1) => format!("virtio-blk {}", drives[&props["drive"]]),
                    ("virtio-net-device", 1) => {
                        format!("virtio-net tap={}", netdevs[&props["netdev"]])
                    }
                    ("vhost-user-fs-device", 3) => {
                        let (socket, dir) = served
                            .as_ref()
                            .unwrap_or_else(|| panic!("{row}: {value} without a virtiofsd"));
                        assert_eq!(
                            &sockets[&props["chardev"]], socket,
                            "{row}: the device's socket is not the virtiofsd's"
                        );
                        assert_eq!(props["queue-size"], FS_QUEUE_SIZE, "{row}: {value}");
                        tags.push(props["tag"].clone());
                        format!("virtio-fs {dir}")
                    }
                    _ => {
                        panic!("{row}: QEMU -device {value} has no kiln counterpart in this check")
                    }
                };
                guest.devices.push(device);
            }
            other => {
                let neutral = QEMU_NEUTRAL_OPTIONS.contains(&(other, value.as_str()));
                assert!(
                    neutral,
                    "{row}: QEMU option '{other} {value}' is not named in this check"
                );
            }
        }
    }
    // A share needs guest RAM the daemon can map: the machine's memory is a
    // shared memfd of the guest's size.
    if !tags.is_empty() {
        let id = backend.unwrap_or_else(|| panic!("{row}: a share without memory-backend="));
        assert_eq!(
            memfds.get(&id),
            Some(&guest.mem),
            "{row}: the memory backend {id} is not a shared memfd of -m {}",
            guest.mem
        );
    }
    // Each tag is the one kiln gave its share (its kiln.share=TAG,... word,
    // which QEMU's guest gets too).
    for tag in tags {
        assert!(
            line.split_whitespace()
                .any(|w| w.starts_with(&format!("kiln.share={tag},"))),
            "{row}: tag {tag} is not the one on the command line: {line}"
        );
    }
    (guest, line)
}

/// Checks `value` (`BASE,opt,opt...`) against the named options: each must be
/// one of them, and with `all` every one of them must be there.
fn check_options(row: &str, opt: &str, value: &str, base: &str, named: &[(&str, &str)], all: bool) {
    let mut words = value.split(',');
    assert_eq!(words.next(), Some(base), "{row}: QEMU {opt} {value}");
    let given: Vec<&str> = words.collect();
    for word in &given {
        assert!(
            named.iter().any(|(n, _)| n == word),
            "{row}: QEMU {opt} ...,{word} is not named in this check (QEMU {opt} {value})"
        );
    }
    if all {
        for (n, why) in named {
            assert!(given.contains(n), "{row}: QEMU {opt} lacks {n} ({why})");
        }
    }
}

/// `k=v,k=v` as a map, each property checked with `known`.
fn checked_properties(
    row: &str,
    opt: &str,
    text: &str,
    known: fn(&str, &str) -> bool,
) -> BTreeMap<String, String> {
    let props = properties(text);
    for (k, v) in &props {
        assert!(
            known(k, v),
            "{row}: QEMU {opt} property {k}={v} has no kiln counterpart"
        );
    }
    props
}

/// `k=v,k=v` as a map.
fn properties(text: &str) -> BTreeMap<String, String> {
    text.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// Splits a line of words quoted by bash's `printf %q`: backslash escapes
/// and single quotes (run.sh's words hold no control characters, which %q
/// would write as $'...').
fn shell_words(line: &str) -> Vec<String> {
    assert!(
        !line.contains("$'"),
        "$'...' quoting is not handled: {line}"
    );
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                word.extend(chars.next());
                in_word = true;
            }
            '\'' => {
                word.extend(chars.by_ref().take_while(|&c| c != '\''));
                in_word = true;
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

#[test]
fn shell_words_undoes_printf_q() {
    let words =
        shell_words(r"/a/b run --cmdline rdinit=/init\ bench_idle=1 -M microvm\,rtc=off '' a\'b");
    assert_eq!(
        words,
        [
            "/a/b",
            "run",
            "--cmdline",
            "rdinit=/init bench_idle=1",
            "-M",
            "microvm,rtc=off",
            "",
            "a'b"
        ]
    );
}
