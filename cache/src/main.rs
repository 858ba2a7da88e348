//! `kof-cache`: publishes a binary cache with seekable zstd NARs and signed kof indexes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kof_cache::{
    NarOptions, PublishOptions, PublishReport, Publisher, Selection, Source, DEFAULT_LEVEL,
    DEFAULT_MAX_CHUNK,
};
use kof_nar::{PublicKey, SecretKey, StorePath};

#[derive(Parser)]
#[command(
    name = "kof-cache",
    about = "Publishes Nix binary caches kof reads lazily"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Verifies paths from a binary cache (or a kof store) and writes them into DIR as
    /// seekable zstd NARs with signed indexes.
    Publish(PublishArgs),
}

#[derive(clap::Args)]
struct PublishArgs {
    /// The source binary cache: file:///dir, http://..., https://...
    #[arg(
        long,
        conflicts_with = "from_store",
        required_unless_present = "from_store"
    )]
    from: Option<String>,
    /// Publish from a kof store directory instead.
    #[arg(long, value_name = "DIR")]
    from_store: Option<PathBuf>,
    /// The output cache directory.
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// The signing key file (as `nix-store --generate-binary-cache-key` writes it).
    #[arg(long, value_name = "KEYFILE")]
    key: PathBuf,
    /// Publish every path of the source.
    #[arg(long, conflicts_with_all = ["closure", "paths"])]
    all: bool,
    /// Publish the closures of the paths given.
    #[arg(long)]
    closure: bool,
    /// A key narinfos must be signed by (name:base64; repeatable). Without one, signatures
    /// are not checked (the NarHash always is).
    #[arg(long = "trusted-public-key", value_name = "KEY")]
    trusted_public_keys: Vec<String>,
    /// Paths published at once (default: the number of cores).
    #[arg(long)]
    jobs: Option<usize>,
    /// zstd level of the chunk frames.
    #[arg(long, default_value_t = DEFAULT_LEVEL)]
    level: i32,
    /// Largest chunk, in bytes of NAR.
    #[arg(long, default_value_t = DEFAULT_MAX_CHUNK)]
    max_chunk: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Store paths (absolute or base names).
    #[arg(value_name = "STOREPATH")]
    paths: Vec<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Publish(args) => match publish(args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("kof-cache: {}", kof_node_api::report::chain(e.as_ref()));
                ExitCode::from(2)
            }
        },
    }
}

/// Runs a publication; `Ok(false)` when some path was refused.
fn publish(args: PublishArgs) -> Result<bool> {
    let key_text = std::fs::read_to_string(&args.key)
        .with_context(|| format!("reading the key {}", args.key.display()))?;
    let key = SecretKey::parse(key_text.trim())
        .with_context(|| format!("parsing the key {}", args.key.display()))?;
    let trusted_keys = args
        .trusted_public_keys
        .iter()
        .map(|k| PublicKey::parse(k).with_context(|| format!("parsing trusted key {k:?}")))
        .collect::<Result<Vec<_>>>()?;
    let paths = args
        .paths
        .iter()
        .map(|p| StorePath::parse(p).with_context(|| format!("parsing store path {p:?}")))
        .collect::<Result<Vec<_>>>()?;
    let selection = if args.all {
        Selection::All
    } else if paths.is_empty() {
        bail!("name store paths to publish, or --all");
    } else if args.closure {
        Selection::Closure(paths)
    } else {
        Selection::Paths(paths)
    };
    let source = match (&args.from, &args.from_store) {
        (Some(url), None) => Source::cache(url).context("opening the source cache")?,
        (None, Some(dir)) => Source::store(dir).context("opening the source store")?,
        _ => bail!("give exactly one of --from and --from-store"),
    };
    let mut opts = PublishOptions {
        nar: NarOptions {
            level: args.level,
            max_chunk: args.max_chunk,
        },
        trusted_keys,
        ..Default::default()
    };
    if let Some(j) = args.jobs {
        opts.jobs = j.max(1);
    }
    let report = Publisher::new(source, &args.to, key, opts)
        .run(&selection)
        .with_context(|| format!("publishing into {}", args.to.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(report.refused.is_empty())
}

fn print_report(r: &PublishReport) {
    for refused in &r.refused {
        println!(
            "refused {}: {}",
            refused.path,
            kof_node_api::report::chain(&refused.error)
        );
    }
    println!(
        "paths: {} published, {} skipped, {} refused",
        r.published,
        r.skipped,
        r.refused.len()
    );
    println!(
        "bytes: {} in (as downloaded), {} NAR, {} out ({} chunks); out/NAR {:.3}",
        r.bytes_in,
        r.nar_bytes,
        r.bytes_out,
        r.chunks,
        r.ratio()
    );
    println!(
        "time: {:.2} s, {:.1} MB/s of NAR",
        r.elapsed.as_secs_f64(),
        r.nar_mb_per_s()
    );
}
