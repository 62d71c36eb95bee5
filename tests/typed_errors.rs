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
