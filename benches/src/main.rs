//! `kof-bench`: runs kof's benchmarks against the real Nix and prints tables (and JSON).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kof_benches::coldstart::ColdStartBench;
use kof_benches::concurrent::ConcurrentBench;
use kof_benches::node::Link;
use kof_benches::nospace::{self, NoSpaceBench};
use kof_benches::podstart::{self, PodStartBench};
use kof_benches::prefetch::PrefetchBench;
use kof_benches::prepare::PrepareBench;
use kof_benches::{dedup, report, seqread};
use kof_fixtures::serve::parse_bandwidth;
use kof_harness::release::Release;

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
    /// Warm runs only (everything local, pinned generation): kof-store run alone, through
    /// kof-fetcherd, and the Nix chroot.
    Warm {
        /// `owner/name`.
        #[arg(long)]
        env: String,
        /// Runs of each side.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Concurrent cold starts of one environment through one kof-fetcherd on a fresh node.
    Concurrent {
        /// `owner/name`.
        #[arg(long, default_value = "kof/python")]
        env: String,
        /// Concurrent starts.
        #[arg(long, default_value_t = 20)]
        starts: usize,
        /// Cache flavour (`published`: signed indexes, verified chunk reads).
        #[arg(long, default_value = "published")]
        flavour: String,
        /// Per-request latency.
        #[arg(long, default_value_t = 20)]
        latency_ms: u64,
        /// Shared bandwidth (`50MB`).
        #[arg(long, default_value = "50MB", value_parser = parse_bandwidth)]
        bandwidth: u64,
        /// The command and its arguments (default: the python set's).
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// Preparing a view cold (metadata only) through a fresh kof-fetcherd, against
    /// `nix path-info --recursive`; 20 ms, 50 MB/s.
    Prepare {
        /// `owner/name` (repeatable; default: kof/wide, kof/python, kof/jdk).
        #[arg(long)]
        env: Vec<String>,
        /// Cache flavour.
        #[arg(long, default_value = "zstd")]
        flavour: String,
        /// Timed runs of each side.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Sequential read of a cached file through the view vs native (the fixtures are unused).
    Seqread {
        /// File size in MiB.
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        /// Timed passes of each side.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Also cold-cache passes (drops the whole machine's page cache before each).
        #[arg(long)]
        cold: bool,
        /// Where the file and the store go (the disk measured).
        #[arg(long, default_value = "/var/tmp")]
        work: PathBuf,
    },
    /// Pod start through CRI (private containerd, the flox shim, runc): cold lazy, warm, plain
    /// runc with the same files, and the real Nix's eager baseline, interleaved; on each
    /// containerd release, with a breakdown of each start.
    Podstart {
        /// containerd release: bookworm (1.6), trixie (1.7), sid (2.x); repeatable or a comma
        /// list (default: every release there; a missing one is skipped, loudly). The fetched
        /// releases are found under `$KOF_CONTAINERD_DIR` (default: the workspace's
        /// `target/containerd`, from `scripts/fetch-containerd.sh`).
        #[arg(long = "containerd", value_delimiter = ',')]
        containerd: Vec<Release>,
        /// `owner/name` (repeatable; default: kof/python, kof/jdk).
        #[arg(long)]
        env: Vec<String>,
        /// Runs of each mode.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Per-request latency.
        #[arg(long, default_value_t = 20)]
        latency_ms: u64,
        /// Shared bandwidth (`50MB`).
        #[arg(long, default_value = "50MB", value_parser = parse_bandwidth)]
        bandwidth: u64,
        /// Interval of the CRI log polls, in microseconds.
        #[arg(long, default_value_t = 1000)]
        poll_us: u64,
    },
    /// Time to recover after ENOSPC: a demand read through a view once the store's full file
    /// system has room again (fresh node per run, store on a tmpfs: needs root).
    Nospace {
        /// Runs (a fresh node each).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Per-request latency.
        #[arg(long, default_value_t = 20)]
        latency_ms: u64,
        /// Shared bandwidth (`50MB`).
        #[arg(long, default_value = "50MB", value_parser = parse_bandwidth)]
        bandwidth: u64,
    },
    /// gc on a live node: the store's size over 20 generations with and without a quota, gc
    /// time, and reads that failed during gc (a leased view read throughout).
    Gc {
        /// Room above the leased generation the quota allows, MiB.
        #[arg(long, default_value_t = 8)]
        headroom_mib: u64,
        /// Threads reading the leased view meanwhile.
        #[arg(long, default_value_t = 2)]
        readers: usize,
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
        Cmd::Warm { env, runs, cmd } => {
            let b = ColdStartBench {
                env: env.clone(),
                cmd: cmd.clone(),
                runs,
                link: standard,
            };
            let (roots, _, _) = kof_benches::node::generation(&manifest, &env, None)?;
            let w = b.warm(&cli.fixtures, &manifest, &kof_store, &roots)?;
            let m = |v: &[f64]| kof_benches::prefetch::median(v);
            println!(
                "| environment | kof-store run alone | Nix chroot (alternating) | alone/chroot | through kof-fetcherd | Nix chroot (alternating) | daemon/chroot |\n|---|---|---|---|---|---|---|\n| {env} | {:.3} s | {:.3} s | {:.2}x | {:.3} s | {:.3} s | {:.2}x |",
                m(&w.view),
                m(&w.local),
                m(&w.view) / m(&w.local),
                m(&w.daemon),
                m(&w.local_daemon),
                m(&w.daemon) / m(&w.local_daemon)
            );
            json.insert(
                "warm".into(),
                serde_json::json!({"env": env, "cmd": cmd, "alone": w.view, "chroot_with_alone": w.local, "daemon": w.daemon, "chroot_with_daemon": w.local_daemon}),
            );
        }
        Cmd::Concurrent {
            env,
            starts,
            flavour,
            latency_ms,
            bandwidth,
            cmd,
        } => {
            let cmd = if cmd.is_empty() {
                COLDSTART_SET[0].1.iter().map(|s| s.to_string()).collect()
            } else {
                cmd
            };
            let b = ConcurrentBench {
                env,
                cmd,
                starts,
                flavour,
                link: Link {
                    latency: Duration::from_millis(latency_ms),
                    bandwidth: Some(bandwidth),
                },
            };
            let r = b.run(&cli.fixtures, &manifest, &kof_store)?;
            println!("{}", report::concurrent_table(&r));
            json.insert("concurrent".into(), serde_json::to_value(r)?);
        }
        Cmd::Prepare { env, flavour, runs } => {
            let envs = if env.is_empty() {
                ["kof/wide", "kof/python", "kof/jdk"]
                    .map(String::from)
                    .to_vec()
            } else {
                env
            };
            let mut reports = Vec::new();
            for env in envs {
                eprintln!("prepare {env} ({flavour}), {runs} runs each side");
                let b = PrepareBench {
                    env,
                    flavour: flavour.clone(),
                    runs,
                    link: standard,
                };
                reports.push(b.run(&cli.fixtures, &manifest, &kof_store)?);
            }
            println!("{}", report::prepare_table(&reports));
            json.insert("prepare".into(), serde_json::to_value(reports)?);
        }
        Cmd::Podstart {
            containerd,
            env,
            runs,
            latency_ms,
            bandwidth,
            poll_us,
        } => {
            let envs = if env.is_empty() {
                ["kof/python", "kof/jdk"].map(String::from).to_vec()
            } else {
                env
            };
            let b = PodStartBench {
                envs,
                runs,
                link: Link {
                    latency: Duration::from_millis(latency_ms),
                    bandwidth: Some(bandwidth),
                },
                poll: Duration::from_micros(poll_us),
                releases: podstart::available_releases(&containerd),
            };
            eprintln!(
                "podstart {:?} on containerd {:?}, {runs} runs of each mode",
                b.envs,
                b.releases.iter().map(|r| r.name()).collect::<Vec<_>>()
            );
            let r = b.run(&cli.fixtures, &manifest, &kof_store)?;
            println!("{}", podstart::podstart_table(&r));
            println!("{}", podstart::breakdown_table(&r));
            json.insert("podstart".into(), serde_json::to_value(r)?);
        }
        Cmd::Seqread {
            mib,
            runs,
            cold,
            work,
        } => {
            let r = seqread::run(&work, mib << 20, runs, cold)?;
            println!("{}", report::seqread_table(&r));
            json.insert("seqread".into(), serde_json::to_value(r)?);
        }
        Cmd::Nospace {
            runs,
            latency_ms,
            bandwidth,
        } => {
            let b = NoSpaceBench {
                runs,
                link: Link {
                    latency: Duration::from_millis(latency_ms),
                    bandwidth: Some(bandwidth),
                },
            };
            let r = b.run(&cli.fixtures)?;
            println!("{}", nospace::table(&r));
            json.insert("nospace".into(), serde_json::to_value(r)?);
        }
        Cmd::Gc {
            headroom_mib,
            readers,
        } => {
            let b = kof_benches::gc::GcBench {
                headroom_mib,
                readers,
            };
            let r = b.run(&cli.fixtures)?;
            println!("{}", kof_benches::gc::table(&r));
            json.insert("gc".into(), serde_json::to_value(r)?);
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
