//! `kof-bench`: runs kof's benchmarks against the real Nix and prints tables (and JSON).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kof_benches::coldstart::ColdStartBench;
use kof_benches::node::Link;
use kof_benches::prefetch::PrefetchBench;
use kof_benches::{dedup, report};
use kof_fixtures::serve::parse_bandwidth;

#[derive(Parser)]
#[command(
    name = "kof-bench",
    about = "kof's benchmarks, side by side with the real Nix"
)]
struct Cli {
    /// The fixtures directory (built with `kof-fixtures build`; the full set for `all`).
    #[arg(long, env = "KOF_FIXTURES_DIR")]
    fixtures: PathBuf,
    /// The kof-store binary (default: beside this one).
    #[arg(long)]
    kof_store: Option<PathBuf>,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// kof prefetch vs nix copy for one environment.
    Prefetch {
        /// `owner/name`.
        #[arg(long)]
        env: String,
        /// Cache flavour: zstd, xz, bzip2 or none.
        #[arg(long, default_value = "zstd")]
        flavour: String,
        /// Runs of each side.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Per-request latency.
        #[arg(long, default_value_t = 20)]
        latency_ms: u64,
        /// Shared bandwidth (`50MB`).
        #[arg(long, default_value = "50MB", value_parser = parse_bandwidth)]
        bandwidth: u64,
    },
    /// Stored bytes over every generation of an environment vs unique content and Nix.
    Dedup {
        /// `owner/name`.
        #[arg(long, default_value = "kof/dedup")]
        env: String,
    },
    /// Cold start of a command: lazy vs eager vs Nix, plus warm runs.
    Coldstart {
        /// `owner/name`.
        #[arg(long)]
        env: String,
        /// Runs of each side.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Per-request latency.
        #[arg(long, default_value_t = 20)]
        latency_ms: u64,
        /// Shared bandwidth (`50MB`).
        #[arg(long, default_value = "50MB", value_parser = parse_bandwidth)]
        bandwidth: u64,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// The lazy-environments issue's set: kof/python and kof/jdk cold starts; 20 ms, 50 MB/s.
    ColdstartAll {
        /// Runs of each side.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// The set: kof/big (zstd, xz), kof/many (zstd), and dedup; 20 ms, 50 MB/s.
    All {
        /// Runs of each side.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

/// The lazy-environments issue's two environments and commands.
const COLDSTART_SET: [(&str, &[&str]); 2] = [
    (
        "kof/python",
        &["python3", "-c", "import json, sqlite3; print(1)"],
    ),
    ("kof/jdk", &["java", "-version"]),
];

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("kof-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let kof_store = match cli.kof_store {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("locating kof-store")?
            .join("kof-store"),
    };
    let manifest = kof_fixtures::build::load_manifest(&cli.fixtures)
        .with_context(|| format!("fixtures in {}", cli.fixtures.display()))?;
    let standard = Link {
        latency: Duration::from_millis(20),
        bandwidth: Some(50_000_000),
    };
    let mut json = serde_json::Map::new();
    match cli.command {
        Cmd::Prefetch {
            env,
            flavour,
            runs,
            latency_ms,
            bandwidth,
        } => {
            let b = PrefetchBench {
                env,
                flavour,
                runs,
                link: Link {
                    latency: Duration::from_millis(latency_ms),
                    bandwidth: Some(bandwidth),
                },
            };
            let r = b.run(&cli.fixtures, &manifest, &kof_store)?;
            println!("{}", report::prefetch_table(std::slice::from_ref(&r)));
            json.insert("prefetch".into(), serde_json::to_value(vec![r])?);
        }
        Cmd::Coldstart {
            env,
            runs,
            latency_ms,
            bandwidth,
            cmd,
        } => {
            let b = ColdStartBench {
                env,
                cmd,
                runs,
                link: Link {
                    latency: Duration::from_millis(latency_ms),
                    bandwidth: Some(bandwidth),
                },
            };
            let r = b.run(&cli.fixtures, &manifest, &kof_store)?;
            println!("{}", report::coldstart_table(std::slice::from_ref(&r)));
            json.insert("coldstart".into(), serde_json::to_value(vec![r])?);
        }
        Cmd::ColdstartAll { runs } => {
            let mut reports = Vec::new();
            for (env, cmd) in COLDSTART_SET {
                let b = ColdStartBench {
                    env: env.to_string(),
                    cmd: cmd.iter().map(|s| s.to_string()).collect(),
                    runs,
                    link: standard,
                };
                eprintln!("coldstart {env}: {cmd:?}, {runs} runs each side");
                reports.push(b.run(&cli.fixtures, &manifest, &kof_store)?);
            }
            println!("{}", report::coldstart_table(&reports));
            json.insert("coldstart".into(), serde_json::to_value(reports)?);
        }
        Cmd::Dedup { env } => {
            let r = dedup::run(&cli.fixtures, &manifest, &kof_store, &env)?;
            println!("{}", report::dedup_table(&r));
            json.insert("dedup".into(), serde_json::to_value(r)?);
        }
        Cmd::All { runs } => {
            let mut reports = Vec::new();
            for (env, flavour) in [("kof/big", "zstd"), ("kof/many", "zstd"), ("kof/big", "xz")] {
                let b = PrefetchBench {
                    env: env.into(),
                    flavour: flavour.into(),
                    runs,
                    link: standard,
                };
                eprintln!("prefetch {env} ({flavour}), {runs} runs each side");
                reports.push(b.run(&cli.fixtures, &manifest, &kof_store)?);
            }
            println!("{}", report::prefetch_table(&reports));
            let d = dedup::run(&cli.fixtures, &manifest, &kof_store, "kof/dedup")?;
            println!("{}", report::dedup_table(&d));
            json.insert("prefetch".into(), serde_json::to_value(reports)?);
            json.insert("dedup".into(), serde_json::to_value(d)?);
        }
    }
    if let Some(p) = cli.json {
        write_json(&p, &serde_json::Value::Object(json))?;
    }
    Ok(())
}

fn write_json(p: &Path, v: &serde_json::Value) -> Result<()> {
    std::fs::write(p, serde_json::to_string_pretty(v)?)
        .with_context(|| format!("writing {}", p.display()))
}
