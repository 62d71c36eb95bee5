//! `kiln snapshot create`: boot a VM to its guest agent (and run a warm-up
//! command), save it into a directory and exit; `kiln run --from DIR` then
//! starts copies of it.

use std::path::{Path, PathBuf};

use super::run::{confine, AgentVm};
use super::{CommandArgs, JailArgs, VmArgs};
use crate::outcome::STATUS_KILN_ERROR;
use crate::sandbox::ExitStatus;
use crate::seccomp::ThreadKind;
use crate::VmConfig;

/// `kiln snapshot`'s sub-commands.
#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCommand {
    /// Boot a VM to kiln's guest agent, run the warm-up command if given,
    /// save the ready VM into --output and exit 0. `kiln run --from DIR`
    /// starts fresh copies of it.
    Create(Box<CreateArgs>),
}

/// `kiln snapshot create`: the VM options of `kiln run`, the warm-up
/// command and where the snapshot goes.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// The snapshot's directory: created; it must not exist or be empty.
    /// Holds the VM's state and its guest memory (a sparse file as large as
    /// --mem), readable by its owner only.
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// Run the command after `--` before saving (e.g. to load an
    /// interpreter or warm caches); its output is kiln's, and a status
    /// other than 0 writes no snapshot.
    #[arg(long, requires = "argv")]
    pub warmup: bool,
    #[command(flatten)]
    pub command: CommandArgs,
    #[command(flatten)]
    pub jail: JailArgs,
}

/// Runs a `kiln snapshot` command; returns kiln's exit status.
pub fn run(command: SnapshotCommand) -> i32 {
    match command {
        SnapshotCommand::Create(args) => create(*args),
    }
}

fn create(args: CreateArgs) -> i32 {
    super::init_logging(args.vm.verbose);
    let mut config = VmConfig::from(args.vm);
    match check(&config, &args.command, args.warmup) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("kiln: {e}");
            return STATUS_KILN_ERROR;
        }
    }
    let mut output = match make_output_dir(&args.output) {
        Ok(()) => args.output.clone(),
        Err(e) => {
            eprintln!("kiln: --output {}: {e}", args.output.display());
            return STATUS_KILN_ERROR;
        }
    };
    if let Err(e) = confine(&args.jail, &mut config, |plan| {
        output = plan.add_output_dir(&args.output)
    }) {
        eprintln!("kiln: {e}");
        return STATUS_KILN_ERROR;
    }
    // kiln writes the snapshot once it runs as the jail's ids.
    if let Some(ids) = config.run_as {
        if let Err(e) = std::os::unix::fs::chown(&output, Some(ids.uid), Some(ids.gid)) {
            eprintln!("kiln: handing --output to the jail's ids: {e}");
            return STATUS_KILN_ERROR;
        }
    }
    // This thread saves the VM: its filter allows that (and `kiln run`'s does not).
    let vm = match AgentVm::start(config, ThreadKind::CliSnapshot) {
        Ok(vm) => vm,
        Err(status) => return status,
    };
    if args.warmup {
        match vm.run(&args.command) {
            Ok(ExitStatus::Code(0)) => {}
            result => {
                let status = vm.finish(result);
                eprintln!(
                    "kiln: the warm-up command ended with status {status}: no snapshot written"
                );
                return match status {
                    0 => STATUS_KILN_ERROR,
                    s => s,
                };
            }
        }
    }
    let saved = vm.sandbox.snapshot(&output);
    let _ = vm.sandbox.shutdown();
    match saved {
        Ok(report) => {
            log::info!(
                "snapshot written to {} in {:?} (paused in {:?}; state {} bytes, memory {} bytes)",
                args.output.display(),
                report.total,
                report.pause,
                report.state_bytes,
                report.memory_bytes
            );
            0
        }
        Err(e) => {
            eprintln!("kiln: {e}");
            STATUS_KILN_ERROR
        }
    }
}

/// What `kiln snapshot create` refuses before it starts anything.
fn check(config: &VmConfig, command: &CommandArgs, warmup: bool) -> Result<(), String> {
    if config.restore_from.is_some() {
        return Err("kiln snapshot create boots a VM of its own: --from is `kiln run`'s".into());
    }
    if config.vsock.is_some() || config.own_init().is_some() {
        return Err("a snapshot needs kiln's guest agent, which does not run with --vsock or an initrd's own init (rdinit=)".into());
    }
    if !warmup && (command.guest_command().has_options() || command.interactive) {
        return Err("-e, -w, -i and --user are for the warm-up command (--warmup -- CMD)".into());
    }
    if !warmup && !command.argv.is_empty() {
        return Err("a command after -- is the warm-up command: give --warmup".into());
    }
    if let Some(disk) = config.disks.iter().find(|d| !d.read_only) {
        return Err(format!(
            "--disk {}: a snapshot's copies would all write to the same file; give it ro (an image --rootfs is copy-on-write)",
            disk.path.display()
        ));
    }
    // Refused by the save too; here before a boot that could only fail.
    if let Some(why) = crate::snapshot::shares_refusal(config) {
        return Err(why);
    }
    Ok(())
}

/// Creates `dir` (owner-only), or takes it when it exists empty.
fn make_output_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let mut entries = std::fs::read_dir(dir).map_err(|e| e.to_string())?;
            match entries.next() {
                None => Ok(()),
                Some(_) => Err("exists and is not empty (a snapshot is never overwritten)".into()),
            }
        }
        Err(e) => Err(e.to_string()),
    }
}
