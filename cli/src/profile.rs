//! `kof-store profile export|import`: moving learned prefetch profiles between nodes (a
//! cluster can ship one in a ConfigMap). A profile is the JSON the fetcher daemon saves under
//! `<store_dir>/profiles/<owner>/<name>.json`; an imported one is validated before it is saved.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Subcommand;
use kof_lazy::{export_profile, import_profile};

use crate::context::Context;

/// What to do with profiles.
#[derive(Subcommand)]
pub enum ProfileCommand {
    /// Write the saved profile of an environment (JSON) to stdout or a file.
    Export {
        /// `owner/name`.
        environment: String,
        /// Write here instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Validate a profile file from another node and save it for its environment.
    Import {
        /// The profile file.
        file: PathBuf,
    },
}

/// Runs a profile subcommand.
pub fn run(ctx: &Context, cmd: ProfileCommand) -> Result<()> {
    let store_dir = &ctx.config.store_dir;
    match cmd {
        ProfileCommand::Export {
            environment,
            output,
        } => {
            let p = export_profile(store_dir, &environment)?;
            match output {
                Some(path) => p
                    .write_file(&path)
                    .with_context(|| format!("exporting the profile of {environment}"))?,
                None => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&p.to_json())?;
                    out.write_all(b"\n")?;
                }
            }
        }
        ProfileCommand::Import { file } => {
            let (p, saved) = import_profile(store_dir, &file)?;
            println!(
                "imported the profile of {} ({} ranges, {} bytes) to {}",
                p.key,
                p.ranges.len(),
                p.total_bytes(),
                saved.display()
            );
        }
    }
    Ok(())
}
