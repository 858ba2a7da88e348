//! `kof-node-install`: the command line of the installer (see the library's docs), and the
//! DaemonSet's probe of `kof-fetcherd` (`kof-node-install probe`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kof_node_install::containerd_config::DEFAULT_RUNTIME_PATH;
use kof_node_install::install::{
    install, Action, ContainerdVersion, CriWait, InstallError, Options,
};
use kof_node_install::one_line;
use kof_node_install::probe::{probe, Check};

const DEFAULT_RESTART: &str =
    "nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl restart containerd";
const DEFAULT_VERSION_COMMAND: &str = "nsenter --target 1 --mount -- containerd --version";
const DEFAULT_CHECK_COMMAND: &str =
    "nsenter --target 1 --mount -- containerd --config {host_path} config dump";

#[derive(Parser)]
#[command(
    name = "kof-node-install",
    version,
    args_conflicts_with_subcommands = true,
    args_override_self = true,
    about = "Install kof on a node: the flox containerd shim, the node config, and containerd's flox runtime (idempotent)"
)]
struct Cli {
    /// Where the node's root file system is mounted.
    #[arg(long, default_value = "/")]
    host_root: PathBuf,
    /// The shim binary to install (its file name is kept).
    #[arg(long, default_value = DEFAULT_RUNTIME_PATH)]
    shim: PathBuf,
    /// `kof-store` binary to install as well.
    #[arg(long)]
    kof_store: Option<PathBuf>,
    /// Host directory for the binaries (the shim there is containerd's runtime_path).
    #[arg(long, default_value = "/usr/local/bin")]
    bin_dir: PathBuf,
    /// Node config to install (checked as kof-fetcherd would load it).
    #[arg(long)]
    node_config: Option<PathBuf>,
    /// Host path of the node config.
    #[arg(long, default_value = "/etc/kof/config.toml")]
    node_config_dest: PathBuf,
    /// Host path of containerd's config.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    containerd_config: PathBuf,
    /// containerd's release (`1.6.20`, `1.7.2`, `2.0.0`) or `auto` (ask
    /// --containerd-version-command). It chooses the flox runtime's form (1.6 and older ignore
    /// runtime_path: type io.containerd.flox.v2, no options; 1.7+: io.containerd.runc.v2 with
    /// runtime_path and SystemdCgroup) and the version of a config written where there is
    /// none (1.x: 2, 2.x: 3).
    #[arg(long, default_value = "auto")]
    containerd_version: String,
    /// The command printing `containerd --version` on the host, for `--containerd-version
    /// auto` (split on whitespace).
    #[arg(long, default_value = DEFAULT_VERSION_COMMAND)]
    containerd_version_command: String,
    /// SystemdCgroup for the flox runtime when containerd's config sets none for runc
    /// (otherwise runc's value is copied). Default: false, containerd's own default. Not
    /// written for containerd 1.6 (which cannot pass it on), only warned about when true.
    #[arg(long)]
    systemd_cgroup: Option<bool>,
    /// The command restarting containerd when its config changed (split on whitespace).
    #[arg(long, default_value = DEFAULT_RESTART)]
    restart_command: String,
    /// Never restart containerd (print that it is needed instead).
    #[arg(long)]
    no_restart: bool,
    /// The command checking a new containerd config with the node's containerd before it is
    /// installed (split on whitespace; `{host_path}`: the new file's host path, `{path}`: the
    /// same file under --host-root). It must print containerd's `config dump` of it; a config
    /// it refuses, or whose dump lacks the flox runtime or a table for the default runtime, is
    /// never installed.
    #[arg(long, default_value = DEFAULT_CHECK_COMMAND)]
    containerd_check_command: String,
    /// containerd's socket (host path) for CRI after the restart. Default: the config's
    /// `[grpc] address`, else /run/containerd/containerd.sock.
    #[arg(long)]
    containerd_socket: Option<PathBuf>,
    /// How long to wait after the restart for CRI to answer with the flox runtime handler
    /// before the config is rolled back (and again for CRI after the rollback).
    #[arg(long, default_value_t = 120)]
    cri_timeout_secs: u64,
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Subcommand)]
enum Sub {
    /// Check that kof-fetcherd answers on the node config's socket (DaemonSet probes).
    Probe {
        /// Node config. Default: $KOF_CONFIG, else /etc/kof/config.toml if present.
        #[arg(long, env = "KOF_CONFIG")]
        config: Option<PathBuf>,
        /// Readiness: also require the FUSE server to be up (default: liveness, `hello`).
        #[arg(long)]
        ready: bool,
        /// Time limit for the answer.
        #[arg(long, default_value_t = 5)]
        timeout_secs: u64,
    },
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

fn containerd_version(cli: &Cli) -> Result<ContainerdVersion, InstallError> {
    Ok(match cli.containerd_version.as_str() {
        "auto" => ContainerdVersion::Detect {
            command: words(&cli.containerd_version_command),
        },
        release => ContainerdVersion::Release(ContainerdVersion::for_release(release)?),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Sub::Probe {
        config,
        ready,
        timeout_secs,
    }) = &cli.command
    {
        let check = if *ready { Check::Ready } else { Check::Live };
        return match probe(config.as_deref(), check, Duration::from_secs(*timeout_secs)) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kof-node-install probe: {}", one_line(&e));
                ExitCode::FAILURE
            }
        };
    }
    let containerd_version = match containerd_version(&cli) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("kof-node-install: {}", one_line(&e));
            return ExitCode::FAILURE;
        }
    };
    let opts = Options {
        host_root: cli.host_root.clone(),
        shim: cli.shim.clone(),
        kof_store: cli.kof_store.clone(),
        bin_dir: cli.bin_dir.clone(),
        node_config: cli.node_config.clone(),
        node_config_dest: cli.node_config_dest.clone(),
        containerd_config: cli.containerd_config.clone(),
        containerd_version,
        systemd_cgroup_fallback: cli.systemd_cgroup,
        restart: (!cli.no_restart).then(|| words(&cli.restart_command)),
        check: Some(words(&cli.containerd_check_command)),
        cri_wait: Some(CriWait {
            socket: cli.containerd_socket.clone(),
            timeout: Duration::from_secs(cli.cri_timeout_secs),
        }),
    };
    let mut print = |a: &Action| match a {
        Action::Warning(_) => eprintln!("kof-node-install: {a}"),
        _ => println!("{a}"),
    };
    match install(&opts, &mut print) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kof-node-install: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}
