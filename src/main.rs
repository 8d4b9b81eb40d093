//! `vgpu-emu`: emulated mediated vGPU devices served to VMs over vfio-user.

mod catalog_cmd;
mod error;

use std::error::Error as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::CliError;

/// Emulated mediated vGPU devices, served to virtual machines over vfio-user.
#[derive(Debug, Parser)]
#[command(name = "vgpu-emu", version, about, long_about = None)]
struct Cli {
    /// Load extra vGPU types from a TOML file (repeatable; see README "Adding a type").
    #[arg(long = "types-file", value_name = "FILE", global = true)]
    types_files: Vec<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List every vGPU type version with its parent family, personality, available/max
    /// instances and NVIDIA-style description.
    Types {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print every guest-visible property of one type version and its ABI fingerprint.
    Describe {
        /// NAME (newest non-deprecated version) or NAME@VERSION.
        #[arg(value_name = "NAME[@VERSION]")]
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn run(cli: Cli) -> Result<(), CliError> {
    let catalog = catalog_cmd::load_catalog(&cli.types_files)?;
    let out = match cli.command {
        Command::Types { json } => catalog_cmd::types(&catalog, json)?,
        Command::Describe { name, json } => catalog_cmd::describe(&catalog, &name, json)?,
    };
    // A closed pipe (`| head`) is not an error worth a message.
    let _ = std::io::stdout().write_all(out.as_bytes());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("vgpu-emu: error: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            for hint in e.hints() {
                eprintln!("  {hint}");
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
