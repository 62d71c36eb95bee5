//! `kiln-oci`: kiln as an OCI runtime. Engines (podman through conmon,
//! containerd's runc shim, Docker) drive it with runc's command line; each
//! container is a kiln micro-VM whose root is the bundle's root directory,
//! shared writable over virtio-fs.
//!
//! How a container lives: `create` checks the bundle and starts the
//! container's **monitor**, a detached process (setsid, the stdio the
//! engine gave `create`) that boots the VM with the sandbox API (the same
//! `VmConfig` and builder as every front end), reports it ready over a pipe
//! and then serves a control socket in the container's state directory;
//! `create` writes the monitor's pid to the pid file and exits, so the
//! engine's subreaper (conmon, the shim) adopts the monitor and waits for
//! it. `start`, `kill`, `exec` and `delete` talk to the monitor over that
//! socket; the monitor pumps its stdio to the guest command and exits with
//! the command's status (128+N for signal N) once the VM has ended.

pub mod cli;
mod commands;
mod console;
pub mod control;
mod exec;
pub mod files;
pub mod hooks;
pub mod log;
mod monitor;
pub mod network;
pub mod resources;
pub mod settings;
pub mod signal;
pub mod spec;
pub mod state;

use clap::Parser;

use cli::{OciCli, OciCommand};

/// Runs kiln-oci with the process's arguments; returns its exit status.
pub fn main() -> i32 {
    let mut cli = match OciCli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    let logger = log::Logger::new(&cli.global);
    match settings::state_root(&cli.global) {
        Ok(root) => cli.global.root = root,
        Err(msg) => {
            logger.error(&msg);
            eprintln!("kiln-oci: {msg}");
            return 1;
        }
    }
    logger.debug(&format!(
        "{:?}",
        std::env::args().skip(1).collect::<Vec<_>>()
    ));
    let global = &cli.global;
    let result = match cli.command {
        OciCommand::Create(args) => commands::create(global, &logger, &args),
        OciCommand::Start(args) => commands::start(global, &args.id),
        OciCommand::Run(args) => commands::run(global, &logger, &args),
        OciCommand::State(args) => commands::state(global, &args.id),
        OciCommand::Kill(args) => commands::kill(global, &args),
        OciCommand::Delete(args) => commands::delete(global, &logger, &args),
        OciCommand::Exec(args) => exec::exec(global, &args),
        OciCommand::Ps(args) => commands::ps(global, &args),
        OciCommand::List(args) => commands::list(global, &args),
        OciCommand::Features => commands::features(),
        OciCommand::Update(_) => Err(
            "update: not supported: a container's VM keeps the memory and vCPUs it was created with"
                .into(),
        ),
        OciCommand::Pause(args) => commands::pause_or_resume(global, &args.id, false),
        OciCommand::Resume(args) => commands::pause_or_resume(global, &args.id, true),
        OciCommand::Checkpoint(_) | OciCommand::Restore(_) => Err(
            "checkpoint and restore: not supported: kiln's VM snapshots (`kiln snapshot`) are not \
             offered through the OCI runtime yet"
                .into(),
        ),
        OciCommand::Monitor(args) => Ok(monitor::run(global, &logger, &args)),
    };
    result.unwrap_or_else(|msg| {
        logger.error(&msg);
        eprintln!("kiln-oci: {msg}");
        1
    })
}
