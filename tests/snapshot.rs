//! Snapshots of tiny guests (`resources/test-guests/count.S`): a guest
//! paused while it makes exits, saved, and restored into a fresh VM (in this
//! process and in another) continues exactly where it was, and an interrupt
//! pending at save time arrives once; a damaged snapshot directory gives one
//! typed error per damage and is left as it was. The VMs run under kiln's
//! seccomp filters (the default).

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use common::{have_kvm, pipe, require, tree_listing, Capture, Scratch, HANG_LIMIT};
use kiln::config::{DiskConfig, VsockConfig};
use kiln::snapshot::{self, SnapshotError};
use kiln::{ConsoleIo, Error, VmConfig, VmHandle, VmOutcome};

macro_rules! require_kvm {
    () => {
        if !require(have_kvm(), "/dev/kvm not accessible") {
            return;
        }
    };
}

/// `count` reports 10 + the IRQ0 interrupts it took: its one pending
/// interrupt arrived once.
const INTERRUPT_ONCE: VmOutcome = VmOutcome::Exited(11);

fn count_config() -> VmConfig {
    let mut config = common::guest_config("count");
    // Only a guard against a hang: the guest ends when the test says so.
    config.timeout = Some(HANG_LIMIT);
    config
}

/// Panics unless `output` is everything `count` prints: "pending", the
/// numbers from 0 up without a gap or a repeat, "end"; returns how many
/// numbers it printed.
fn assert_complete_count(output: &[u8]) -> usize {
    let text = String::from_utf8_lossy(output);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() >= 2 && lines[0] == "pending" && lines[lines.len() - 1] == "end",
        "{text:?}"
    );
    let numbers = &lines[1..lines.len() - 1];
    for (expected, line) in numbers.iter().enumerate() {
        assert_eq!(
            line.parse::<usize>().ok(),
            Some(expected),
            "the count should go on with {expected}"
        );
    }
    assert!(text.ends_with("end\n"), "{text:?}");
    numbers.len()
}

/// A console for a VM: the captured output and its input pipe's writer.
fn console() -> (ConsoleIo, Capture, fs::File) {
    let capture = Capture::default();
    let (input, writer) = pipe();
    let io = ConsoleIo {
        output: Box::new(capture.clone()),
        input: Some(input),
    };
    (io, capture, writer)
}

/// A VM paused by a save, its console and the save's report.
struct Saved {
    vm: VmHandle,
    capture: Capture,
    /// The output up to the pause.
    before: Vec<u8>,
    input: fs::File,
    report: snapshot::SaveReport,
}

/// Starts `count`, waits until it has printed line 20 and saves it into
/// `dir`.
fn save_counting_guest(dir: &Path) -> Saved {
    save_guest(count_config(), dir)
}

/// As `save_counting_guest`, for `count` with this configuration.
fn save_guest(config: VmConfig, dir: &Path) -> Saved {
    let (io, capture, input) = console();
    let vm = kiln::spawn(config, io, Instant::now()).expect("kiln::spawn");
    assert!(
        capture.wait_for(b"\n20\n", HANG_LIMIT),
        "count never printed 20: {:?}",
        String::from_utf8_lossy(&capture.bytes())
    );
    let report = snapshot::save(&vm, dir).expect("saving the VM");
    // Paused: nothing more is printed until it resumes.
    let before = capture.bytes();
    Saved {
        vm,
        capture,
        before,
        input,
        report,
    }
}

/// Restores `dir` with a byte already waiting on the UART (so that the
/// guest ends after its current line) and runs it to its end: its report
/// and output.
fn restore_to_end(dir: &Path) -> (kiln::RunReport, Vec<u8>) {
    let (io, capture, mut input) = console();
    input.write_all(b"x").unwrap();
    let vm = snapshot::restore(dir, io, Instant::now()).expect("restoring the snapshot");
    assert!(common::wait_finished(&vm), "the restored VM did not end");
    let report = vm.wait().expect("the restored VM's report");
    (report, capture.bytes())
}

/// The files' sizes, and the disk space they take (the memory file is sparse).
fn file_sizes(dir: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    ["vmstate", "memory"]
        .map(|name| {
            let meta = fs::metadata(dir.join(name)).unwrap();
            format!(
                "{name} {} bytes ({} on disk)",
                meta.len(),
                meta.blocks() * 512
            )
        })
        .join(", ")
}

#[test]
fn a_guest_paused_mid_run_continues_exactly_after_resume_and_after_restore() {
    require_kvm!();
    let scratch = Scratch::new("snapshot");
    let dir = scratch.path("snap");
    let Saved {
        vm,
        capture,
        before,
        mut input,
        report: save,
    } = save_counting_guest(&dir);
    eprintln!("save: {save:?}; {}", file_sizes(&dir));
    let saved = tree_listing(&dir);
    // A second save into the same directory is refused and changes nothing.
    let again = snapshot::save(&vm, &dir).unwrap_err();
    assert!(
        matches!(&again, SnapshotError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists),
        "{again:?}"
    );
    assert_eq!(
        tree_listing(&dir),
        saved,
        "a refused save changed the snapshot"
    );

    // The paused original goes on from where it was.
    input.write_all(b"x").unwrap();
    snapshot::resume(&vm);
    assert!(common::wait_finished(&vm), "the resumed VM did not end");
    let report = vm.wait().expect("the resumed VM's report");
    assert_complete_count(&capture.bytes());
    assert_eq!(report.outcome, INTERRUPT_ONCE);

    // A fresh VM from the snapshot continues the output where it stopped:
    // no line missing, none repeated, and the pending interrupt arrives once.
    let (report, after) = restore_to_end(&dir);
    eprintln!("restore to first KVM_RUN: {:?}", report.startup);
    let outcome = report.outcome;
    let mut whole = before.clone();
    whole.extend_from_slice(&after);
    let numbers = assert_complete_count(&whole);
    assert!(numbers > 20, "{numbers}");
    assert_eq!(outcome, INTERRUPT_ONCE);
    assert_eq!(
        tree_listing(&dir),
        saved,
        "the restore changed the snapshot"
    );

    // And again: the memory file was not written by the first restore.
    let (report, again) = restore_to_end(&dir);
    let outcome = report.outcome;
    let mut whole = before;
    whole.extend_from_slice(&again);
    assert_complete_count(&whole);
    assert_eq!(outcome, INTERRUPT_ONCE);
}

/// Two vCPUs: vCPU 1 never gets a startup IPI and waits inside KVM_RUN; it
/// is paused, saved and restored in that state next to the counting vCPU 0.
#[test]
fn a_two_vcpu_guest_restores_with_both_vcpus() {
    require_kvm!();
    let scratch = Scratch::new("snapshot-smp");
    let dir = scratch.path("snap");
    let mut config = count_config();
    config.vcpus = 2;
    let saved = save_guest(config, &dir);
    saved.vm.stop();
    assert_eq!(saved.vm.wait().unwrap().outcome, VmOutcome::Stopped);
    let (report, after) = restore_to_end(&dir);
    let mut whole = saved.before;
    whole.extend_from_slice(&after);
    assert_complete_count(&whole);
    assert_eq!(report.outcome, INTERRUPT_ONCE);
}

/// Every port access the guest makes reaches kiln exactly once across a
/// save and restore: the exits of the original up to its pause and of the
/// restored VM add up to two per byte printed (a line-status read, then the
/// write) and one more read per number line, none repeated by the restored
/// VM, none lost. A port read the pause did not complete would be made
/// again by the restored VM.
#[test]
fn no_port_access_is_lost_or_repeated_across_a_snapshot() {
    require_kvm!();
    let scratch = Scratch::new("snapshot-exits");
    let dir = scratch.path("snap");
    let saved = save_counting_guest(&dir);
    saved.vm.stop();
    let original = saved.vm.wait().unwrap();
    assert_eq!(original.outcome, VmOutcome::Stopped);
    let (restored, after) = restore_to_end(&dir);
    assert_eq!(restored.outcome, INTERRUPT_ONCE);
    let mut whole = saved.before;
    whole.extend_from_slice(&after);
    let lines = assert_complete_count(&whole);
    assert_eq!(
        original.exits.pio + restored.exits.pio,
        (2 * whole.len() + lines) as u64,
        "port exits: {:?} before the save, {:?} after",
        original.exits,
        restored.exits
    );
    // The PIC and the PIT are in KVM; the only MMIO exit is the exit report.
    assert_eq!((original.exits.mmio, restored.exits.mmio), (0, 1));
}

/// The same snapshot restored by another process: the test binary again,
/// whose child half restores the directory the parent saved.
#[test]
fn a_snapshot_restores_in_another_process() {
    require_kvm!();
    const DIR: &str = "KILN_TEST_SNAPSHOT_DIR";
    if kiln_prereq::in_child() {
        let dir = Path::new(&std::env::var_os(DIR).expect("the parent's snapshot")).to_owned();
        let before = fs::read(dir.with_extension("before")).unwrap();
        let (report, after) = restore_to_end(&dir);
        let mut whole = before;
        whole.extend_from_slice(&after);
        assert_complete_count(&whole);
        assert_eq!(report.outcome, INTERRUPT_ONCE);
        return;
    }
    let scratch = Scratch::new("snapshot-process");
    let dir = scratch.path("snap");
    let saved = save_counting_guest(&dir);
    fs::write(dir.with_extension("before"), &saved.before).unwrap();
    // The saved VM can be stopped: it ends as stopped, not as it would have.
    saved.vm.stop();
    assert_eq!(saved.vm.wait().unwrap().outcome, VmOutcome::Stopped);
    let listing = tree_listing(&dir);
    kiln_prereq::run_in_child(
        concat!(module_path!(), "::a_snapshot_restores_in_another_process"),
        &[(DIR, Some(dir.to_str().unwrap()))],
    );
    assert_eq!(
        tree_listing(&dir),
        listing,
        "the restore changed the snapshot"
    );
}

/// Rewrites a field of the state file's header (its second line, JSON).
fn edit_header(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("vmstate");
    let bytes = fs::read(&path).unwrap();
    let magic_end = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
    let header_end = magic_end + bytes[magic_end..].iter().position(|&b| b == b'\n').unwrap();
    let mut header: serde_json::Value =
        serde_json::from_slice(&bytes[magic_end..header_end]).unwrap();
    edit(&mut header);
    let mut out = bytes[..magic_end].to_vec();
    out.extend_from_slice(&serde_json::to_vec(&header).unwrap());
    out.extend_from_slice(&bytes[header_end..]);
    fs::write(&path, out).unwrap();
}

fn truncate(path: &Path, len: impl FnOnce(u64) -> u64) {
    let file = fs::File::options().write(true).open(path).unwrap();
    let size = file.metadata().unwrap().len();
    file.set_len(len(size)).unwrap();
}

fn copy_snapshot(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for name in ["vmstate", "memory"] {
        fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

/// Whether KVM can give a guest another TSC frequency than the host's
/// (not on PVM).
fn host_scales_tsc() -> bool {
    kvm_ioctls::Kvm::new()
        .map(|kvm| kvm.check_extension(kvm_ioctls::Cap::TscControl))
        .unwrap_or(false)
}

#[test]
fn each_damage_to_a_snapshot_is_one_typed_error_and_the_directory_stays() {
    require_kvm!();
    let scratch = Scratch::new("snapshot-damaged");
    let good = scratch.path("good");
    let saved = save_counting_guest(&good);
    saved.vm.stop();
    saved.vm.wait().unwrap();

    type Damage = fn(&Path);
    type Check = fn(&SnapshotError) -> bool;
    let damages: [(&str, Damage, Check); 10] = [
        (
            "state file removed",
            |d| fs::remove_file(d.join("vmstate")).unwrap(),
            |e| matches!(e, SnapshotError::Missing(p) if p.ends_with("vmstate")),
        ),
        (
            "memory file removed",
            |d| fs::remove_file(d.join("memory")).unwrap(),
            |e| matches!(e, SnapshotError::Missing(p) if p.ends_with("memory")),
        ),
        (
            "state cut short",
            |d| truncate(&d.join("vmstate"), |n| n - 100),
            |e| matches!(e, SnapshotError::Truncated(_)),
        ),
        (
            "header cut short",
            |d| truncate(&d.join("vmstate"), |_| 40),
            |e| matches!(e, SnapshotError::Truncated(_)),
        ),
        (
            "bad magic",
            |d| {
                let mut bytes = fs::read(d.join("vmstate")).unwrap();
                bytes[..4].copy_from_slice(b"ELF\x7f");
                fs::write(d.join("vmstate"), bytes).unwrap();
            },
            |e| matches!(e, SnapshotError::BadMagic(_)),
        ),
        (
            "another format version",
            |d| edit_header(d, |h| h["format_version"] = 1.into()),
            |e| matches!(e, SnapshotError::FormatVersion { found: 1, .. }),
        ),
        (
            "one state byte changed",
            |d| {
                let mut bytes = fs::read(d.join("vmstate")).unwrap();
                let last = bytes.len() - 10;
                bytes[last] ^= 1;
                fs::write(d.join("vmstate"), bytes).unwrap();
            },
            |e| matches!(e, SnapshotError::Checksum(_)),
        ),
        (
            "another CPU vendor",
            |d| edit_header(d, |h| h["host_cpu"]["vendor"] = "OtherVendor".into()),
            |e| matches!(e, SnapshotError::IncompatibleCpu { saved, .. } if saved == "OtherVendor"),
        ),
        (
            "memory file shorter",
            |d| truncate(&d.join("memory"), |n| n - 4096),
            |e| matches!(e, SnapshotError::MemorySize { expected, found, .. } if expected - found == 4096),
        ),
        (
            "another TSC frequency",
            |d| {
                edit_header(d, |h| {
                    h["tsc_khz"] = (h["tsc_khz"].as_u64().unwrap() + 100_000).into()
                })
            },
            |e| matches!(e, SnapshotError::TscFrequency { saved, host, .. } if saved - host == 100_000),
        ),
    ];
    for (i, (what, damage, check)) in damages.into_iter().enumerate() {
        let dir = scratch.path(&format!("damaged-{i}"));
        copy_snapshot(&good, &dir);
        damage(&dir);
        let listing = tree_listing(&dir);
        let (io, _capture, mut input) = console();
        // A restore that wrongly succeeds ends after its current line.
        input.write_all(b"x").unwrap();
        // The file checks fail at once; the TSC's, once a vCPU exists.
        let result = snapshot::restore(&dir, io, Instant::now()).and_then(|vm| vm.wait());
        if what == "another TSC frequency" && host_scales_tsc() {
            // Hardware KVM with TSC scaling runs the guest at the saved rate.
            assert_eq!(result.unwrap().outcome, INTERRUPT_ONCE, "{what}");
            continue;
        }
        match result {
            Err(Error::Snapshot(e)) => {
                assert!(check(&e), "{what}: {e:?}");
                let message = e.to_string();
                assert_eq!(message.lines().count(), 1, "{what}: {message:?}");
                eprintln!("{what}: {message}");
            }
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(tree_listing(&dir), listing, "{what}: the directory changed");
    }
}

/// A tiny guest with virtio devices (rng and vsock, which it never
/// drives) saves, and its restored copy, built with the same devices in the
/// same slots from the saved configuration, counts on to its end.
#[test]
fn a_guest_with_virtio_devices_restores_with_them() {
    require_kvm!();
    let scratch = Scratch::new("snapshot-virtio");
    let dir = scratch.path("snap");
    let mut config = count_config();
    config.rng = true;
    config.vsock = Some(VsockConfig {
        cid: 3,
        socket: scratch.path("vsock.sock"),
    });
    let saved = save_guest(config, &dir);
    saved.vm.stop();
    saved.vm.wait().unwrap();
    let (report, after) = restore_to_end(&dir);
    assert_eq!(report.outcome, INTERRUPT_ONCE);
    assert_complete_count(&[&saved.before[..], &after[..]].concat());
}

/// Rewrites the state file's state (JSON) with `edit`, and its header's
/// size and checksum to match: a state file altered by someone who knows
/// the format.
fn edit_state(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("vmstate");
    let bytes = fs::read(&path).unwrap();
    let magic_end = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
    let header_end = magic_end + bytes[magic_end..].iter().position(|&b| b == b'\n').unwrap();
    let mut state: serde_json::Value = serde_json::from_slice(&bytes[header_end + 1..]).unwrap();
    edit(&mut state);
    let state = serde_json::to_vec(&state).unwrap();
    let state_len = state.len();
    fs::write(&path, [&bytes[..header_end + 1], &state[..]].concat()).unwrap();
    edit_header(dir, |h| {
        h["state_bytes"] = state_len.into();
        h["state_crc32"] = crc32fast::hash(&state).into();
    });
}

/// A snapshot whose saved devices do not fit the devices its configuration
/// builds (one missing, another kind in the slot, a queue no driver could
/// set up) is refused with one typed error, before the guest runs.
#[test]
fn saved_devices_that_do_not_fit_are_refused() {
    require_kvm!();
    let scratch = Scratch::new("snapshot-devices");
    let good = scratch.path("good");
    let mut config = count_config();
    config.rng = true;
    let saved = save_guest(config, &good);
    saved.vm.stop();
    saved.vm.wait().unwrap();

    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit, &str); 3] = [
        (
            "a device missing",
            |s| s["devices"]["virtio"] = serde_json::json!([]),
            "0 virtio devices saved, the configuration builds 1",
        ),
        (
            "another kind of device",
            |s| s["devices"]["virtio"][0]["device_type"] = 19.into(),
            "saved device type 19",
        ),
        (
            "a queue size no driver can set",
            |s| s["devices"]["virtio"][0]["queues"][0]["size"] = 3.into(),
            "queue 0",
        ),
    ];
    for (i, (what, edit, message)) in edits.into_iter().enumerate() {
        let dir = scratch.path(&format!("edited-{i}"));
        copy_snapshot(&good, &dir);
        edit_state(&dir, edit);
        let (io, capture, _input) = console();
        let vm = snapshot::restore(&dir, io, Instant::now()).expect("the files are sound");
        let e = vm.wait().expect_err(what);
        assert!(
            matches!(&e, Error::Snapshot(SnapshotError::Devices(m)) if m.contains(message)),
            "{what}: {e}"
        );
        assert!(capture.bytes().is_empty(), "{what}: the guest ran");
    }
}

/// A writable `--disk` (the user's file, written in place) cannot be
/// cloned: the save is refused before the VM is paused; it runs on, and
/// nothing is written.
#[test]
fn a_vm_with_a_writable_disk_is_refused_and_runs_on() {
    require_kvm!();
    let scratch = Scratch::new("snapshot-writable");
    let dir = scratch.path("snap");
    let disk = scratch.path("disk.img");
    fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut config = count_config();
    config.disks.push(DiskConfig {
        path: disk.clone(),
        read_only: false,
        id: None,
        rate_limit: Default::default(),
    });
    let (io, capture, mut input) = console();
    let vm = kiln::spawn(config, io, Instant::now()).expect("kiln::spawn");
    assert!(
        capture.wait_for(b"\n20\n", HANG_LIMIT),
        "count never printed 20"
    );
    let refused = snapshot::save(&vm, &dir).unwrap_err();
    assert!(
        matches!(&refused, SnapshotError::WritableDisk(p) if *p == disk),
        "{refused:?}"
    );
    assert!(!dir.exists(), "a refused save wrote {}", dir.display());
    input.write_all(b"x").unwrap();
    assert!(common::wait_finished(&vm), "the VM did not run on");
    assert_eq!(vm.wait().unwrap().outcome, INTERRUPT_ONCE);
    assert_complete_count(&capture.bytes());
}

/// The numbers of the `tick N ...` lines in `output`.
fn ticks(output: &[u8]) -> Vec<u64> {
    String::from_utf8_lossy(output)
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("tick ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// A real Linux guest with an ext4 image root (virtio-blk on a
/// copy-on-write overlay) and a vsock device, printing a counter on the
/// serial console while it writes, syncs and re-reads its disk, is saved,
/// stopped and restored into a fresh VM: the counter goes on from where it
/// was on the new console, a file written before the snapshot is read back
/// from the disk (page cache dropped) after it, and every tick's `sync`
/// needs the restored block device to complete requests. The image itself
/// is never written; the snapshot holds the guest's writes.
#[test]
fn a_linux_guest_with_an_image_root_counts_on_after_restore() {
    if !common::real_kernel_prerequisites(&["mkfs.ext4"]) {
        return;
    }
    let scratch = Scratch::new("snapshot-linux");
    let root = scratch.path("root");
    common::build_busybox_root(&root);
    let image = scratch.path("root.ext4");
    common::run_checked(
        std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&root)
            .arg(&image)
            .arg("64M"),
    );
    let image_before = fs::read(&image).unwrap();
    let mut config = VmConfig::new(common::guest_kernel("vmlinux").unwrap());
    config.rootfs = Some(image.clone());
    config.mem_bytes = 256 << 20;
    config.vsock = Some(VsockConfig {
        cid: 3,
        socket: scratch.path("vsock.sock"),
    });
    config.timeout = Some(std::time::Duration::from_secs(900));
    // Each tick needs the disk: a write and a sync (which waits for the
    // device), then a read of /keep with the page cache dropped.
    let script = "echo kept-across > /keep && sync && i=0 && \
        while :; do echo $i > /count; sync; echo 3 > /proc/sys/vm/drop_caches; \
        read k < /keep; echo \"tick $i $k\"; i=$((i+1)); done";
    config.command.argv = ["sh", "-c", script].map(Into::into).to_vec();
    // Root: it writes to / and drops the page cache.
    (config.command.uid, config.command.gid) = (Some(0), Some(0));

    let _vm = common::one_vm();
    let dir = scratch.path("snap");
    let (io, capture, _input) = console();
    let vm = kiln::spawn(config, io, Instant::now()).expect("kiln::spawn");
    let booted = capture.wait_for(b"tick 3 kept-across", std::time::Duration::from_secs(600));
    assert!(
        booted,
        "the guest never ticked: {}",
        String::from_utf8_lossy(&capture.bytes())
    );
    let report = snapshot::save(&vm, &dir).expect("saving the VM");
    let before = capture.bytes();
    vm.stop();
    vm.wait().unwrap();
    let last = *ticks(&before).last().expect("a tick before the save");
    eprintln!("saved at tick {last}: {report:?}, {}", file_sizes(&dir));
    assert!(
        dir.join("disk0.overlay").exists(),
        "the overlay was not saved"
    );

    let (io, capture, _input) = console();
    let restored = snapshot::restore(&dir, io, Instant::now()).expect("restoring");
    let goal = format!("tick {} kept-across", last + 3);
    let ticked = capture.wait_for(goal.as_bytes(), std::time::Duration::from_secs(300));
    let after = capture.bytes();
    restored.stop();
    let outcome = restored.wait().map(|r| r.outcome);
    assert!(
        ticked,
        "the restored guest did not tick on to {goal:?} ({outcome:?}): {}",
        String::from_utf8_lossy(&after)
    );
    // One console stream across the two VMs: every tick once, in order
    // (a line cut by the save is finished by the restored guest).
    let ticks = ticks(&[&before[..], &after[..]].concat());
    let expected: Vec<u64> = (ticks[0]..ticks[0] + ticks.len() as u64).collect();
    assert_eq!(ticks, expected, "ticks lost or repeated across the restore");
    assert!(ticks.last() >= Some(&(last + 3)));
    assert_eq!(
        fs::read(&image).unwrap(),
        image_before,
        "the image was written"
    );

    // A truncated overlay is refused before anything runs.
    truncate(&dir.join("disk0.overlay"), |size| size - 512);
    let (io, _, _input) = console();
    let e = snapshot::restore(&dir, io, Instant::now()).err();
    assert!(
        matches!(&e, Some(Error::Snapshot(SnapshotError::Truncated(p))) if p.ends_with("disk0.overlay")),
        "{e:?}"
    );
}
