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
use kof_floxhub::client::{read_token_file, FloxHubClient};
use kof_floxhub::resolve::{ResolvedEnvironment, Resolver};
use kof_fuse::{Entry, MountOptions, Mounted};
use kof_lazy::view::{build_view, View, ViewInput};
use kof_lazy::{LazyContent, LazyStore, LocalReader, Profile, StartedEntries};
use kof_node_api::activate::activate;
use kof_node_api::config::Prefetch;
use kof_node_api::envref::EnvRef;
use kof_substituter::fetcher::Fetcher;
use tempfile::TempDir;

use crate::context::Context;
use crate::sandbox::{self, SandboxSpec};

/// Runs `cmd` in the environment `reference`; exits the process with the command's status.
pub fn run(ctx: &Context, reference: &str, cmd: &[String]) -> Result<()> {
    let code = run_status(ctx, reference, cmd)?;
    // Everything (mount, temporary directories, runtime) was dropped by `run_status`.
    std::process::exit(code)
}

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
    let source = Arc::new(LazyContent {
        local: LocalReader::new(lazy.store().clone()),
        ensure: lazy.clone(),
    });
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

fn resolver(ctx: &Context) -> Result<(Resolver, Option<kof_floxhub::client::Token>)> {
    let cfg = &ctx.config;
    let client = FloxHubClient::new(&cfg.floxhub_url, cfg.store_dir.join("floxmeta"))
        .with_context(|| format!("FloxHub at {}", cfg.floxhub_url))?;
    let token = cfg
        .floxhub_token_file
        .as_deref()
        .map(|p| read_token_file(p).with_context(|| format!("FloxHub token file {}", p.display())))
        .transpose()?;
    Ok((Resolver::new(client, cfg.system.clone()), token))
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

/// The view served by a FUSE mount of this process ([`prepare_view`]).
fn run_alone(ctx: &Context, r: &EnvRef, cmd: &[String]) -> Result<i32> {
    let store = Arc::new(ctx.open_store()?);
    let (resolver, token) = resolver(ctx)?;
    // A pinned generation this store recorded resolves without FloxHub.
    let resolver = resolver.with_store(store.clone());
    let fetcher = Arc::new(
        Fetcher::from_config(&ctx.config, store.clone()).context("setting up the fetcher")?,
    );
    let scratch = tempfile::Builder::new()
        .prefix("kof-run-")
        .tempdir()
        .context("creating the run's temporary directory")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (env, closure, view, lazy) = rt.block_on(async {
        let env: ResolvedEnvironment = {
            let r = r.clone();
            let r2 = r.clone();
            tokio::task::spawn_blocking(move || resolver.resolve(&r2, token.as_ref()))
                .await
                .context("resolver task")?
                .with_context(|| format!("resolving {r}"))?
        };
        let lazy = LazyStore::new(
            fetcher.clone(),
            store.clone(),
            kof_lazy::LazyOptions::from_config(&ctx.config),
        );
        // Each path's listing is asked for as soon as its narinfo is accepted, while the
        // walk of the references goes on.
        let mut listings = StartedEntries::new();
        let closure = fetcher
            .resolve_with(&env.roots, |sub| lazy.start_entry(sub, &mut listings))
            .await
            .with_context(|| format!("computing the closure of {}", env.env_ref()))?;
        let paths = lazy
            .entries(&closure, listings)
            .await
            .with_context(|| format!("describing the closure of {}", env.env_ref()))?;
        let view: View = build_view(&ViewInput::new(&env, paths))
            .with_context(|| format!("building the view of {}", env.env_ref()))?;
        anyhow::Ok((env, closure, view, lazy))
    })?;
    store
        .put_environment(&env.to_record(closure.paths()))
        .with_context(|| format!("recording {}", env.env_ref()))?;
    let activation = activate(&view.activation(&env).input("/root", None), cmd)
        .with_context(|| format!("activating {}", env.env_ref()))?;

    let _guard = rt.enter();
    let name = format!("{}-{}-{}", env.owner, env.name, std::process::id());
    let prepared = prepare_view(&lazy, &name, view.root.clone(), scratch.path())?;
    // The learned profile, as the daemon does: a saved one is fetched first; without one,
    // this start's demand reads are recorded and saved as the profile.
    let key = format!("{}/{}", env.owner, env.name);
    let (profile_task, recording) = match Profile::load(&ctx.config.store_dir, &key) {
        Ok(Some(profile)) => (Some(lazy.prefetch_profile(profile)), false),
        Ok(None) => {
            lazy.start_recording_only(&key, Some(closure.paths()));
            (None, true)
        }
        Err(e) => {
            tracing::warn!(env = %key, error = %e, "learned profile unusable; ignored");
            (None, false)
        }
    };
    let prefetch = match ctx.config.prefetch {
        Prefetch::Closure => Some(lazy.prefetch(closure)),
        Prefetch::None => None,
    };
    tracing::info!(env = %env.env_ref(), view = %prepared.root.display(),
        flox_env = %view.flox_env(), "running in the view");
    let spec = SandboxSpec {
        lower: prepared.root.clone(),
        scratch: scratch.path().join("sandbox"),
        argv: activation.argv,
        env: activation.env,
        resolv_conf: true,
    };
    let status = sandbox::run(&spec);
    if recording {
        match lazy.stop_recording(&key) {
            Some(p) if !p.ranges.is_empty() => match p.save(&ctx.config.store_dir) {
                Ok(file) => tracing::info!(env = %key, ranges = p.ranges.len(),
                    file = %file.display(), "learned profile saved"),
                Err(e) => tracing::warn!(env = %key, error = %e, "saving the learned profile"),
            },
            _ => {}
        }
    }
    if let Some(p) = prefetch {
        p.abort();
    }
    if let Some(p) = profile_task {
        p.abort();
    }
    let closed = prepared.close();
    drop(_guard);
    rt.shutdown_background();
    let status = status?;
    closed?;
    drop(scratch);
    Ok(status)
}
