//! The kernel command line kiln hands the guest.
//!
//! Defaults keep the emulated guest kernel's work small: a quiet console
//! (every console byte is a VM exit), panics that reboot at once, reset through
//! the i8042 (which ends the VM), and kiln's init as the initramfs init.

use linux_loader::cmdline::Cmdline;

use crate::error::{Error, Result};
use crate::layout::CMDLINE_MAX_SIZE;

/// Always present. `reboot=k` resets through the i8042, `panic=-1` reboots on
/// panic instead of hanging, `tsc=reliable`/`no_timer_check` skip boot-time
/// clock checks that cost emulated time and mean nothing in a VM.
const BASE: &str =
    "console=ttyS0 reboot=k panic=-1 rdinit=/kiln/init tsc=reliable no_timer_check i8042.noaux";
/// Without `--verbose`, the kernel prints only emergencies (e.g. a panic).
const QUIET: &str = "quiet loglevel=1";

/// Pieces of the command line, in the order they are applied: later words
/// override earlier ones in the kernel's parser, so the user's come last.
#[derive(Debug, Default)]
pub struct CmdlineParts<'a> {
    pub verbose: bool,
    /// From the host profile (empty on hardware KVM).
    pub host_additions: &'a str,
    /// Device descriptions such as `virtio_mmio.device=...`.
    pub devices: Vec<String>,
    /// `--cmdline`.
    pub user: Option<&'a str>,
}

/// The init a user's `--cmdline` asks for instead of kiln's (the last
/// `rdinit=` word, as the kernel takes it), if any.
pub fn user_rdinit(user: Option<&str>) -> Option<&str> {
    user?
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix("rdinit="))
        .next_back()
        .filter(|path| *path != kiln_init::INIT_PATH)
}

pub fn build(parts: &CmdlineParts<'_>) -> Result<Cmdline> {
    let mut words: Vec<&str> = vec![BASE];
    if !parts.verbose {
        words.push(QUIET);
    }
    if !parts.host_additions.is_empty() {
        words.push(parts.host_additions);
    }
    words.extend(parts.devices.iter().map(String::as_str));
    if let Some(user) = parts.user.filter(|u| !u.trim().is_empty()) {
        words.push(user.trim());
    }
    let line = words.join(" ");
    // The kernel silently truncates anything longer; refuse instead.
    Cmdline::try_from(&line, CMDLINE_MAX_SIZE).map_err(|e| {
        Error::Config(format!(
            "kernel command line ({} bytes) rejected: {e} (limit {} bytes)",
            line.len(),
            CMDLINE_MAX_SIZE - 1
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_rdinit_is_the_last_word_unless_it_is_kilns() {
        assert_eq!(user_rdinit(None), None);
        assert_eq!(user_rdinit(Some("ip=dhcp")), None);
        assert_eq!(user_rdinit(Some("rdinit=/init quiet")), Some("/init"));
        assert_eq!(user_rdinit(Some("rdinit=/a rdinit=/b")), Some("/b"));
        assert_eq!(user_rdinit(Some("rdinit=/a rdinit=/kiln/init")), None);
        assert_eq!(user_rdinit(Some("xrdinit=/a")), None);
    }

    fn text(c: &Cmdline) -> String {
        c.as_cstring().unwrap().into_string().unwrap()
    }

    #[test]
    fn defaults_are_quiet_and_user_words_come_last() {
        let parts = CmdlineParts {
            host_additions: "noxsave",
            devices: vec!["virtio_mmio.device=4K@0xd0001000:5".into()],
            user: Some(" ip=10.0.0.2 "),
            ..Default::default()
        };
        let c = text(&build(&parts).unwrap());
        assert!(c.starts_with("console=ttyS0 reboot=k panic=-1 rdinit=/kiln/init"));
        assert!(c.contains(" quiet "));
        assert!(c.ends_with("noxsave virtio_mmio.device=4K@0xd0001000:5 ip=10.0.0.2"));
    }

    #[test]
    fn verbose_drops_quiet_and_hardware_adds_nothing() {
        // Literal lines, not the module's constants: a default that changes
        // (a word lost, or `quiet` left in verbose mode) must fail here.
        let base = "console=ttyS0 reboot=k panic=-1 rdinit=/kiln/init tsc=reliable \
                    no_timer_check i8042.noaux";
        let line = |verbose| {
            text(
                &build(&CmdlineParts {
                    verbose,
                    ..Default::default()
                })
                .unwrap(),
            )
        };
        assert_eq!(line(false), format!("{base} quiet loglevel=1"));
        let verbose = line(true);
        assert_eq!(verbose, base);
        assert!(
            !verbose
                .split(' ')
                .any(|w| w == "quiet" || w.starts_with("loglevel=")),
            "{verbose}"
        );
    }

    #[test]
    fn overlong_lines_are_refused() {
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        let err = build(&CmdlineParts {
            user: Some(&long),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("kernel command line"), "{err}");
    }
}
