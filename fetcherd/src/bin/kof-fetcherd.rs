//! `kof-fetcherd`: the node daemon (see `kof_fetcherd::daemon`), and its FUSE server
//! (`kof-fetcherd fuse-server`, started by the daemon; not meant to be run by hand).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kof_node_api::config::Config;
use kof_node_api::report::chain;

#[derive(Parser)]
#[command(
    name = "kof-fetcherd",
    version,
    about = "The kof node daemon: prepares lazy environment views for containers, fetches on demand"
)]
struct Cli {
    /// Configuration file (TOML). Default: $KOF_CONFIG, else /etc/kof/config.toml if present.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Subcommand)]
enum Sub {
    /// Run the FUSE server (the daemon starts it; it outlives daemon restarts).
    FuseServer {
        /// Take the mount over from the running FUSE server (a newer build replacing it)
        /// instead of mounting.
        #[arg(long)]
        take_over: bool,
    },
    /// Stop the FUSE server: every view disappears (for node shutdown, never for a daemon
    /// restart).
    StopFuseServer,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KOF_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => fail(&chain(&e)),
    };
    let result = match cli.command {
        None => kof_fetcherd::daemon::run(config).map_err(|e| chain(&e)),
        Some(Sub::FuseServer { take_over }) => {
            let start = if take_over {
                kof_fetcherd::daemon::fuse_server::Start::TakeOver
            } else {
                kof_fetcherd::daemon::fuse_server::Start::Fresh
            };
            kof_fetcherd::daemon::fuse_server::run(&config, start)
                .map(|_| ())
                .map_err(|e| chain(&e))
        }
        Some(Sub::StopFuseServer) => {
            let control = kof_fetcherd::daemon::control::RunPaths::of(&config).control;
            kof_fetcherd::daemon::control::ControlClient::connect(&control)
                .and_then(|mut c| c.shutdown())
                .map_err(|e| {
                    format!(
                        "stopping the FUSE server at {}: {}",
                        control.display(),
                        chain(&e)
                    )
                })
        }
    };
    if let Err(line) = result {
        fail(&line);
    }
}

/// Prints the one failure line (the error chain, outermost first) and exits non-zero.
fn fail(line: &str) -> ! {
    eprintln!("kof-fetcherd: {}", line.replace('\n', " "));
    std::process::exit(1);
}
