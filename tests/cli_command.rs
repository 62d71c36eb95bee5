//! `kiln run`'s command options on the path without the agent: an initrd
//! started by its own init never runs kiln's init, so a command or its
//! options cannot be honoured and are refused (one line, status 125) instead
//! of being dropped. Needs no KVM: the check comes before the VM.

mod common;

use common::kiln_cli;

#[test]
fn own_init_refuses_a_command_and_its_options() {
    for extra in [
        &["--", "echo", "hi"][..],
        &["-e", "A=1"],
        &["-w", "/"],
        &["--user", "1"],
    ] {
        let out = kiln_cli()
            .args([
                "run",
                "--kernel",
                "/nonexistent/vmlinux",
                "--initrd",
                "/nonexistent/i.cpio",
            ])
            .args(["--cmdline", "rdinit=/init"])
            .args(extra)
            .output()
            .expect("running kiln");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{extra:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{extra:?}: {stderr}");
        assert!(
            stderr.starts_with("kiln: ") && stderr.contains("rdinit=") && stderr.contains("/init"),
            "{extra:?}: {stderr}"
        );
    }
}
