//! `containerd-shim-flox-v2`: containerd's shim for flox pods.
//!
//! - `start`: runs `containerd-shim-runc-v2 start` and starts (or finds) the pod's task-API
//!   proxy in front of it; prints the proxy's address in the form the runc shim printed.
//! - `serve` (started by `start`): the proxy, until its runc shim exits.
//! - `delete`: cleans up what a container's Create set up, then `exec`s the runc shim's
//!   `delete`, whose output containerd reads. When the pod's proxy was killed, the runc shim
//!   behind it still runs, unknown to containerd: the container is then ended through that
//!   runc shim's task API (kill, wait, delete, shutdown), which lets it exit.
//! - anything else (`-v`): `exec`s the runc shim with the same command line.
//!
//! containerd reads `start`'s combined stdout and stderr as the shim's address, so nothing else
//! is printed on success; logs go to `<containers_dir>/shim.log`. A failure prints one line,
//! which containerd passes to its caller (`ctr`, the kubelet), and exits 1.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kof_node_api::config::Config;
use kof_node_api::report::chain;
use kof_shim::args::{Action, ShimArgs};
use kof_shim::bootstrap::{self, LISTENER_FD, SOCKET_ENV, UPSTREAM_ENV, UPSTREAM_PID_ENV};
use kof_shim::proxy::{self, ProxyOptions};
use kof_shim::{lifecycle, ShimError};

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

/// What the binary does for `args`; `Ok(true)` when it is done and must not hand over to the
/// runc shim.
fn act(args: &ShimArgs, argv: &[OsString]) -> Result<bool, ShimError> {
    if args.action == Action::Other {
        return Ok(false);
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
            let address = args
                .address
                .as_deref()
                .ok_or(ShimError::MissingArg("address"))?;
            let out = bootstrap::start(argv, address, namespace, id, &bundle, &runc_shim())?;
            print!("{}", out.render());
            Ok(true)
        }
        Action::Serve => {
            let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
            let opts = ProxyOptions {
                config: cfg,
                namespace: namespace.to_string(),
                upstream: var(UPSTREAM_ENV).ok_or(ShimError::MissingArg(UPSTREAM_ENV))?,
                upstream_pid: var(UPSTREAM_PID_ENV).and_then(|p| p.parse().ok()),
                socket: var(SOCKET_ENV)
                    .map(PathBuf::from)
                    .ok_or(ShimError::MissingArg(SOCKET_ENV))?,
            };
            if let Err(e) = proxy::serve(opts, LISTENER_FD) {
                tracing::error!(namespace, id, error = %chain(&e), "shim proxy failed");
                return Err(e.into());
            }
            Ok(true)
        }
        Action::Delete => {
            // The container is gone either way: a cleanup that fails is retried by a later
            // sweep, and must not keep the runc shim from cleaning up its part.
            if let Err(e) = lifecycle::delete(&cfg, namespace, id) {
                tracing::warn!(namespace, id, error = %chain(&e), "cleanup at delete failed");
            }
            // A killed proxy leaves its runc shim running, unknown to containerd: end the
            // container through it and let it exit, else nobody ever would.
            let bundle = args
                .bundle
                .clone()
                .unwrap_or_else(|| std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")));
            let orphan = args
                .address
                .as_deref()
                .and_then(|a| bootstrap::orphaned_upstream(a, namespace, id, &bundle));
            if let Some(upstream) = orphan {
                let version = match &upstream {
                    bootstrap::StartOutput::Params(p) => p.version,
                    bootstrap::StartOutput::Address(_) => 2,
                };
                match proxy::end_orphaned(upstream.address(), version, namespace, id) {
                    Ok(answer) => {
                        use std::io::Write;
                        tracing::info!(
                            namespace,
                            id,
                            upstream = upstream.address(),
                            "container ended through the runc shim of a dead proxy"
                        );
                        let mut out = std::io::stdout().lock();
                        let _ = out.write_all(&answer).and_then(|_| out.flush());
                        return Ok(true);
                    }
                    Err(e) => {
                        tracing::warn!(namespace, id, error = %e, "ending the container through the runc shim of a dead proxy; its delete runs instead")
                    }
                }
            }
            Ok(false)
        }
        Action::Other => Ok(false),
    }
}

fn main() {
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let args = ShimArgs::parse(&argv);
    match act(&args, &argv) {
        Ok(true) => return,
        Ok(false) => {}
        Err(e) => {
            // No newline: containerd appends ": exit status 1" to what the shim printed.
            eprint!("containerd-shim-flox-v2: {}", chain(&e).replace('\n', " "));
            std::process::exit(1);
        }
    }
    let shim = runc_shim();
    let err = Command::new(&shim).args(&argv).exec();
    eprintln!(
        "containerd-shim-flox-v2: cannot run {}: {err}",
        Path::new(&shim).display()
    );
    std::process::exit(1);
}
