//! A library user can tell why a VM could not start by matching on the
//! cause, not by reading the message: kiln's errors carry the module errors
//! whole (and the sandbox's carry kiln's), while their text stays the one
//! line the CLI prints.

mod common;

use std::fs;
use std::time::Instant;

use common::{have_kvm, require, test_guest, Scratch};
use kiln::config::{DiskConfig, VsockConfig};
use kiln::error::{CpioError, DiskError, InitramfsError, MptableError, RootfsError, VsockError};
use kiln::sandbox::{Sandbox, SandboxError};
use kiln::{ConsoleIo, Error, VmConfig};

fn run(config: &VmConfig) -> kiln::Result<kiln::RunReport> {
    let io = ConsoleIo {
        output: Box::new(std::io::sink()),
        input: None,
    };
    kiln::run(config, io, Instant::now())
}

fn one_line(e: &impl std::fmt::Display) -> String {
    let text = e.to_string();
    assert_eq!(text.lines().count(), 1, "{text}");
    text
}

/// Caught before KVM is touched: no /dev/kvm needed.
#[test]
fn root_file_system_causes_are_matchable() {
    let scratch = Scratch::new("typed-errors-root");
    let missing = scratch.path("no-such-root");
    let e = Sandbox::builder()
        .kernel(test_guest("hello"))
        .rootfs(&missing)
        .build()
        .err()
        .expect("a missing root cannot boot");
    match &e {
        SandboxError::Vm(Error::Rootfs(RootfsError::Read { path, source })) => {
            assert_eq!(path, &missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected a rootfs read error, got {other:?}"),
    }
    assert!(one_line(&e).contains(&format!("rootfs {}: ", missing.display())));

    // A directory root larger than guest memory.
    let root = scratch.path("big-root");
    fs::create_dir(&root).unwrap();
    let big = fs::File::create(root.join("big")).unwrap();
    big.set_len(64 << 20).unwrap(); // sparse: nothing is written
    let mut config = VmConfig::new(test_guest("hello"));
    config.mem_bytes = 32 << 20;
    config.rootfs = Some(root.clone());
    let e = run(&config).expect_err("the root cannot fit");
    match &e {
        Error::Initramfs(InitramfsError::Cpio(CpioError::OverLimit { path, limit })) => {
            assert_eq!((path, *limit), (&root.join("big"), 32 << 20));
        }
        other => panic!("expected an initramfs size error, got {other:?}"),
    }
    assert!(one_line(&e).starts_with("initramfs: "));
}

/// Device causes are found after the VM exists: these need /dev/kvm.
#[test]
fn device_causes_are_matchable() {
    if !require(have_kvm(), "/dev/kvm not accessible") {
        return;
    }
    let scratch = Scratch::new("typed-errors-dev");
    let mut config = VmConfig::new(test_guest("hello"));
    config.mem_bytes = 32 << 20;

    let missing = scratch.path("no-such.img");
    let mut with_disk = config.clone();
    with_disk.disks.push(DiskConfig {
        path: missing.clone(),
        read_only: false,
        id: None,
        rate_limit: Default::default(),
    });
    let e = run(&with_disk).expect_err("a missing disk cannot be attached");
    assert!(
        matches!(&e, Error::Disk(DiskError::NotFound(p)) if *p == missing),
        "{e:?}"
    );
    assert_eq!(
        one_line(&e),
        format!(
            "invalid configuration: --disk: disk image {} does not exist",
            missing.display()
        )
    );

    // The same cause through the sandbox API.
    let e = Sandbox::builder()
        .config(with_disk)
        .build()
        .err()
        .expect("a missing disk cannot be attached");
    assert!(
        matches!(&e, SandboxError::Vm(Error::Disk(DiskError::NotFound(_)))),
        "{e:?}"
    );

    let mut with_vsock = config.clone();
    with_vsock.vsock = Some(VsockConfig {
        cid: 3,
        socket: scratch.path("no-such-dir/v.sock"),
    });
    let e = run(&with_vsock).expect_err("the socket's directory does not exist");
    assert!(
        matches!(&e, Error::Vsock(VsockError::Socket { .. })),
        "{e:?}"
    );
    assert!(one_line(&e).starts_with("invalid configuration: --vsock: "));
}

/// The MP table's own error type reaches the top unchanged.
#[test]
fn boot_table_causes_keep_their_type() {
    let e = Error::from(MptableError::CpuCount(0));
    assert!(matches!(e, Error::Mptable(MptableError::CpuCount(0))));
    assert!(one_line(&e).starts_with("boot setup: "));
}

/// README: kiln stops reading an archive root that expands past twice
/// `--mem` plus 64 MiB (a gzip bomb). A small .tar.gz whose one entry (a
/// name kiln skips, so nothing reaches the initramfs and its limit) claims
/// 8 GiB of zeros: with 16 MiB of guest memory the run stops at 96 MiB.
/// Caught before KVM is touched.
#[test]
fn an_archive_root_is_read_up_to_twice_memory_plus_64_mib() {
    use std::io::Write;
    let scratch = Scratch::new("typed-errors-bomb");
    // A ustar header: `../escape`, a regular file of 8 GiB - 1 bytes.
    let mut header = [0u8; 512];
    header[..9].copy_from_slice(b"../escape");
    header[100..108].copy_from_slice(b"0000644\0");
    header[108..116].copy_from_slice(b"0000000\0");
    header[116..124].copy_from_slice(b"0000000\0");
    header[124..136].copy_from_slice(b"77777777777\0");
    header[136..148].copy_from_slice(b"00000000000\0");
    header[156] = b'0';
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].fill(b' ');
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let gzip = |data: &[u8]| {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    };
    // gzip members concatenate: the header, then 112 members of 1 MiB of
    // zeros each (about 1 KiB apiece on disk).
    let mut bomb = gzip(&header);
    let zeros = gzip(&vec![0u8; 1 << 20]);
    for _ in 0..112 {
        bomb.extend_from_slice(&zeros);
    }
    let path = scratch.path("bomb.tar.gz");
    fs::write(&path, &bomb).unwrap();
    assert!(bomb.len() < 256 << 10, "{} bytes on disk", bomb.len());

    let mut config = VmConfig::new(test_guest("hello"));
    config.mem_bytes = 16 << 20;
    config.rootfs = Some(path.clone());
    let e = run(&config).expect_err("the archive expands past the budget");
    match &e {
        Error::Initramfs(InitramfsError::Cpio(CpioError::BadArchive { path: p, reason })) => {
            assert_eq!(p, &path);
            assert!(
                reason.contains("the archive holds more than 96 MiB"),
                "{reason}"
            );
        }
        other => panic!("expected the archive's read budget, got {other:?}"),
    }
    one_line(&e);
}
