//! `kof-store run REF [--] CMD [ARGS...]`: run a command inside an environment, lazily.
//!
//! The environment is resolved, its closure described from metadata (stored paths, else
//! narinfos and `.ls` listings), its view built ([`kof_lazy::view`]) and served by a FUSE
//! mount ([`prepare_view`]); the command then runs in the [`crate::sandbox`] over that view,
//! activated ([`kof_node_api::activate`]), while the rest of the closure is fetched in the
//! background (config `prefetch`). Files are fetched when first read. Afterwards the FUSE mount
//! and the temporary directories are removed, also on error; the command's exit status is
//! `kof-store`'s.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use kof_floxhub::client::read_token_file;
use kof_fuse::{Entry, MountOptions, Mounted};
use kof_lazy::prepare::{Lease, PrepareError, PreparedEnvironment, Preparer, Root};
use kof_lazy::{LazyContent, LazyStore, LocalReader};
use kof_node_api::activate::activate;
use kof_node_api::envref::EnvRef;
use tempfile::TempDir;

use crate::context::Context;
use crate::sandbox::{self, SandboxSpec};

/// Runs `cmd` in the environment `reference`; exits the process with the command's status.
pub fn run(ctx: &Context, reference: &str, cmd: &[String]) -> Result<()> {
    let code = run_status(ctx, reference, cmd)?;
    // Everything (mount, temporary directories, runtime) was dropped by `run_status`.
    std::process::exit(code)
}

/// How long a run alone, once its command has exited, lets the readahead its reads started
/// finish before it records its partial NARs and exits.
const EXIT_SETTLE: std::time::Duration = std::time::Duration::from_secs(10);

/// A view being served, and what to remove when done.
pub struct PreparedView {
    /// The view's root directory.
    pub root: PathBuf,
    /// The in-process FUSE mount serving it (the daemon's, when it serves the view, is not
    /// ours to unmount).
    mount: Option<Mounted>,
    /// Where the mount point lives.
    _dir: TempDir,
}

impl PreparedView {
    /// Unmounts (when the mount is ours) and removes the mount point.
    pub fn close(mut self) -> Result<()> {
        if let Some(m) = self.mount.take() {
            m.unmount().context("unmounting the view")?;
        }
        Ok(())
    }
}

/// Serves the view `root` named `name` and returns the directory it appears at.
///
/// This is the seam between `kof-store run` and the node daemon: today the view is served by a
/// FUSE mount of this process (bytes fetched by `lazy`, in process); when `kof-fetcherd` runs,
/// this is where the view is asked of it instead, so fetches are shared.
pub fn prepare_view(
    lazy: &Arc<LazyStore>,
    name: &str,
    root: Arc<Entry>,
    scratch: &Path,
) -> Result<PreparedView> {
    let dir = tempfile::Builder::new()
        .prefix("mnt-")
        .tempdir_in(scratch)
        .context("creating the mount point")?;
    let source = Arc::new(LazyContent::new(
        LocalReader::new(lazy.store().clone()),
        lazy.clone(),
    ));
    let mount = kof_fuse::mount(
        dir.path(),
        source,
        MountOptions {
            fs_name: "kof-run".into(),
            ..MountOptions::default()
        },
    )
    .with_context(|| format!("mounting the view at {}", dir.path().display()))?;
    mount
        .add_view(name, root)
        .with_context(|| format!("adding view {name}"))?;
    let root = mount.mountpoint().join(name);
    Ok(PreparedView {
        root,
        mount: Some(mount),
        _dir: dir,
    })
}

/// Everything up to the command's exit status; the caller exits with it. Through the node
/// daemon when it answers on the configured socket and owns this store (fetches shared, one
/// store writer), else alone.
pub fn run_status(ctx: &Context, reference: &str, cmd: &[String]) -> Result<i32> {
    let r = EnvRef::parse(reference)?;
    if let Some(client) = crate::daemon_client::connect(ctx) {
        return run_through_daemon(ctx, client, &r, cmd);
    }
    run_alone(ctx, &r, cmd)
}

/// The view prepared by `kof-fetcherd` for a lease of this run, released afterwards (also when
/// the command could not run).
fn run_through_daemon(
    ctx: &Context,
    mut client: kof_node_api::api::Client,
    r: &EnvRef,
    cmd: &[String],
) -> Result<i32> {
    let token = ctx
        .config
        .floxhub_token_file
        .as_deref()
        .map(|p| {
            let t = std::fs::read_to_string(p)
                .with_context(|| format!("FloxHub token file {}", p.display()))?;
            read_token_file(p).with_context(|| format!("FloxHub token file {}", p.display()))?;
            anyhow::Ok(t.trim().to_string())
        })
        .transpose()?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let lease = format!("kof-run-{}-{nanos}", std::process::id());
    let prepared = client
        .prepare(&r.to_string(), &lease, token.as_deref())
        .with_context(|| format!("preparing {r} through kof-fetcherd"))?;
    // The daemon need not keep an idle connection open for the command's life (nor the
    // sandbox's processes inherit it).
    drop(client);
    tracing::info!(env = %r, lease = %lease, view = %prepared.view_root.display(),
        "running in the view kof-fetcherd prepared");
    let status = (|| {
        let activation = activate(&prepared.activation.input("/root", None), cmd)
            .with_context(|| format!("activating {r}"))?;
        let scratch = tempfile::Builder::new()
            .prefix("kof-run-")
            .tempdir()
            .context("creating the run's temporary directory")?;
        let status = sandbox::run(&SandboxSpec {
            lower: prepared.view_root.clone(),
            scratch: scratch.path().to_path_buf(),
            argv: activation.argv,
            env: activation.env,
            resolv_conf: true,
        });
        drop(scratch);
        status
    })();
    let released =
        kof_node_api::api::Client::connect(&ctx.config.socket).and_then(|mut c| c.release(&lease));
    let status = status?;
    released.with_context(|| format!("releasing lease {lease} of kof-fetcherd"))?;
    Ok(status)
}

/// The view served by a FUSE mount of this process ([`prepare_view`]), prepared by the same
/// pipeline as the daemon's ([`Preparer::prepare_environment`]). What the run fetched stays:
/// completed paths are in the store, and the engine keeps the fetched ranges of partial NARs
/// for the next run.
fn run_alone(ctx: &Context, r: &EnvRef, cmd: &[String]) -> Result<i32> {
    let store = Arc::new(ctx.open_store()?);
    let scratch = tempfile::Builder::new()
        .prefix("kof-run-")
        .tempdir()
        .context("creating the run's temporary directory")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let _guard = rt.enter();
    let prep = Preparer::from_config(&ctx.config, store).map_err(crate::commands::report)?;
    let lease = format!("{}-{}", r.name, std::process::id());
    let mut mount = InProcessLease {
        lazy: prep.lazy().clone(),
        name: lease.clone(),
        scratch: scratch.path().to_path_buf(),
        view: None,
    };
    let (env, background) = rt
        .block_on(prep.prepare_environment(r, None, Root::None, &mut mount, &lease))
        .map_err(crate::commands::report)?;
    let prepared = mount.view.take().expect("a published lease has its view");
    let activation = activate(&env.activation.input("/root", None), cmd)
        .with_context(|| format!("activating {}", env.label()))?;
    tracing::info!(env = %env.label(), view = %prepared.root.display(),
        flox_env = %env.activation.flox_env, "running in the view");
    let spec = SandboxSpec {
        lower: prepared.root.clone(),
        scratch: scratch.path().join("sandbox"),
        argv: activation.argv,
        env: activation.env,
        resolv_conf: true,
    };
    let status = sandbox::run(&spec);
    if background.recording {
        prep.finish_recording(&env.key(), Some(&lease));
    }
    background.abort();
    let closed = prepared.close();
    // What was fetched stays for the next run: completed paths are stored already; the
    // readahead the command's reads started finishes (bounded), then the fetched chunks of
    // partial NARs are recorded, now that nothing reads them.
    if !rt.block_on(prep.lazy().settle(EXIT_SETTLE)) {
        tracing::info!(bound = ?EXIT_SETTLE, "readahead still under way at exit: its rest is fetched by the next run");
    }
    let kept = prep.lazy().save_partials();
    tracing::debug!(partial_nars = kept, "fetched ranges kept for the next run");
    drop(_guard);
    rt.shutdown_background();
    let status = status?;
    closed?;
    drop(scratch);
    Ok(status)
}

/// `kof-store run`'s lease step: the view mounted by this process ([`prepare_view`]).
struct InProcessLease {
    lazy: Arc<LazyStore>,
    name: String,
    scratch: PathBuf,
    view: Option<PreparedView>,
}

impl Lease for InProcessLease {
    async fn publish(&mut self, p: &PreparedEnvironment) -> Result<(), PrepareError> {
        let view = prepare_view(
            &self.lazy,
            &self.name,
            p.built.view.root.clone(),
            &self.scratch,
        )
        .map_err(|e| PrepareError::Lease {
            env: p.label(),
            what: "mounting the view".into(),
            source: e.into(),
        })?;
        self.view = Some(view);
        Ok(())
    }
}
