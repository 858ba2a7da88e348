//! `containerd-shim-flox-v2`: prepares an environment container at `start`, cleans it up at
//! `delete`, and `exec`s `containerd-shim-runc-v2` with the same command line for everything.
//!
//! containerd reads `start`'s combined stdout and stderr as the shim's address, so nothing is
//! printed on success; logs go to `<containers_dir>/shim.log`. A failed start prints one line,
//! which containerd passes to its caller (`ctr`, the kubelet), and exits 1.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kof_node_api::config::Config;
use kof_node_api::report::chain;
use kof_shim::args::{Action, ShimArgs};
use kof_shim::lifecycle;
use kof_shim::ShimError;

/// The runc shim's binary name, looked up on `PATH` unless `KOF_RUNC_SHIM` names it.
const RUNC_SHIM: &str = "containerd-shim-runc-v2";

fn runc_shim() -> PathBuf {
    if let Some(p) = std::env::var_os("KOF_RUNC_SHIM").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(RUNC_SHIM))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/bin").join(RUNC_SHIM))
}

fn init_logging(cfg: &Config) {
    let _ = std::fs::create_dir_all(&cfg.containers_dir);
    let path = cfg.containers_dir.join("shim.log");
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    else {
        return;
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KOF_SHIM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
}

fn act(args: &ShimArgs) -> Result<(), ShimError> {
    if args.action == Action::Other {
        return Ok(());
    }
    let cfg = Config::load(None)?;
    init_logging(&cfg);
    let namespace = args
        .namespace
        .as_deref()
        .ok_or(ShimError::MissingArg("namespace"))?;
    let id = args.id.as_deref().ok_or(ShimError::MissingArg("id"))?;
    match args.action {
        Action::Start => {
            let bundle = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
            lifecycle::start(&cfg, namespace, id, &bundle)?;
        }
        Action::Delete => {
            // The container is gone either way: a cleanup that fails is retried by a later
            // sweep, and must not keep the runc shim from cleaning up its part.
            if let Err(e) = lifecycle::delete(&cfg, namespace, id) {
                tracing::warn!(namespace, id, error = %chain(&e), "cleanup at delete failed");
            }
        }
        Action::Other => {}
    }
    Ok(())
}

fn main() {
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let args = ShimArgs::parse(&argv);
    if let Err(e) = act(&args) {
        // No newline: containerd appends ": exit status 1" to what the shim printed.
        eprint!("containerd-shim-flox-v2: {}", chain(&e).replace('\n', " "));
        std::process::exit(1);
    }
    let shim = runc_shim();
    let err = Command::new(&shim).args(&argv).exec();
    if args.action == Action::Start {
        if let (Some(ns), Some(id), Ok(cfg)) = (
            args.namespace.as_deref(),
            args.id.as_deref(),
            Config::load(None),
        ) {
            let _ = lifecycle::delete(&cfg, ns, id);
        }
    }
    eprintln!(
        "containerd-shim-flox-v2: cannot run {}: {err}",
        Path::new(&shim).display()
    );
    std::process::exit(1);
}
