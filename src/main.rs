//! `kiln`: the command-line front end of the kiln library. It parses the
//! command line and dispatches; `kiln::cli` does the rest.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use kiln::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let started = Instant::now();
    let status = match Cli::try_parse() {
        Ok(Cli {
            command: Command::Run(args),
        }) => cli::run::run(*args, started),
        Ok(Cli {
            command: Command::Snapshot(command),
        }) => cli::snapshot::run(command),
        Ok(Cli {
            command: Command::SandboxVm,
        }) => cli::sandbox_vm::run(started),
        Err(e) => cli::report_usage_error(&e),
    };
    ExitCode::from(status as u8)
}
