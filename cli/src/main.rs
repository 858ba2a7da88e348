//! `kof-store`: the node's command line for the kof store and fetcher.
//!
//! Glue only: it parses flags, loads the node configuration, opens the store, and calls
//! `kof-fetcherd` (FloxHub resolution, binary-cache fetching) and `kof-store` (the store). Its
//! output is a contract other tools rely on: `--json` shapes are stable, every failure is one
//! line on stderr naming what failed and why (the error chain, [`kof_node_api::report::chain`]),
//! with a non-zero exit.
//!
//! It owns no data format and no state of its own: what it reads and writes is the store's,
//! the daemon's API or the libraries' (FloxHub mirror, profiles). It never edits the store's
//! files directly, and never keeps a process behind except the sandbox of `run`.

mod commands;
mod context;
mod daemon_client;
mod profile;
mod progress;
mod run;
mod sandbox;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kof-store",
    version,
    about = "The kof node store: fetch Flox environments' closures from Nix binary caches into a deduplicating content-addressed store"
)]
struct Cli {
    /// Configuration file (TOML). Default: $KOF_CONFIG, else /etc/kof/config.toml if present.
    #[arg(long, global = true, env = "KOF_CONFIG")]
    config: Option<PathBuf>,
    /// Store directory, overriding the configuration's `store_dir`.
    #[arg(long, global = true, env = "KOF_STORE")]
    store: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Resolve environments on FloxHub and fetch their closures into the store.
    Prefetch {
        /// `owner/name` (live generation) or `owner/name:N` (generation N).
        #[arg(required = true)]
        refs: Vec<String>,
    },
    /// Resolve an environment and print its generation, closure, vars, hook and history.
    Resolve {
        /// `owner/name` or `owner/name:N`.
        reference: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List stored store paths.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show store totals.
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every object and file; exit non-zero naming any corruption.
    Verify,
    /// Write a stored path's tree to DIR, as `nix-store --restore` would.
    Export {
        /// The store path (`/nix/store/...` or its base name).
        store_path: String,
        /// The target directory (must not exist).
        dir: PathBuf,
    },
    /// Write a stored path's NAR to stdout.
    DumpNar {
        /// The store path (`/nix/store/...` or its base name).
        store_path: String,
    },
    /// Stop keeping an environment (`owner/name`: every kept generation; `owner/name:N`: that
    /// one); the next `gc` may then drop what only it needed.
    Forget {
        /// `owner/name` or `owner/name:N`.
        reference: String,
    },
    /// Drop what no kept environment needs.
    Gc {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside an environment: its view is mounted at once and files are fetched
    /// when read; the command runs in new mount and pid namespaces over a writable overlay,
    /// activated as `flox activate -- CMD`. Exits with the command's status.
    Run {
        /// `owner/name` or `owner/name:N`.
        reference: String,
        /// The command and its arguments (after `--` when they start with `-`).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Internal: the sandbox's namespace keeper (started by `run`).
    #[command(name = "__sandbox-init", hide = true)]
    SandboxInit {
        /// The sandbox description written by `run`.
        spec: PathBuf,
    },
    /// Export or import an environment's learned prefetch profile.
    Profile {
        #[command(subcommand)]
        command: profile::ProfileCommand,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KOF_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Run { .. } | Command::SandboxInit { .. }
    ) {
        // Output commands end quietly when their reader goes away (`kof-store ls | head`), as
        // Unix tools do, instead of panicking on EPIPE. `run` keeps Rust's default: it must
        // outlive its command's pipes to clean up its mounts.
        // SAFETY: setting a signal's disposition to the default before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Command::SandboxInit { spec } = &cli.command {
        sandbox::init_main(spec);
    }
    if let Err(e) = commands::run(cli) {
        // One line: what failed and why (the error chain, outermost first).
        let line = kof_node_api::report::chain(e.as_ref());
        eprintln!("kof-store: {}", line.replace('\n', " "));
        std::process::exit(1);
    }
}
