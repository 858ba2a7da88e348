//! The daemon process: start-up (store, fetcher, resolver, lazy engine, FUSE server, lease
//! reconciliation), the API socket and its request handlers, and shutdown.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kof_nar::StorePath;
use kof_store::{EnvironmentRecord, Store};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{error, info, warn};

use super::control::{ensure_fuse_server, ControlClient, RunPaths};
use super::leases::{LeaseDir, LeaseRecord};
use super::wire::{tree_digest, WireEntry};
use crate::metrics::{DaemonMetrics, Exposition};
use kof_floxhub::client::{read_token_file, FloxHubClient, Token};
use kof_floxhub::resolve::{ResolvedEnvironment, Resolver};
use kof_lazy::view::{build_view, ViewInput};
use kof_lazy::{Cause, LazyStore, StartedEntries};
use kof_node_api::api::{
    error_line, ApiError, ErrorKind, FuseServerInfo, Hello, LeaseInfo, Leases, Prefetched,
    Prepared, Released, Request, Status, StoreTotals, MAX_REQUEST_LINE,
};
use kof_node_api::config::{Config, Prefetch};
use kof_node_api::envref::EnvRef;
use kof_node_api::lease::check_lease_id;
use kof_substituter::closure::{Closure, ClosureEntry};
use kof_substituter::fetcher::Fetcher;

/// How long the daemon waits for a FUSE server it started to answer.
const FUSE_SERVER_START: Duration = Duration::from_secs(30);
/// How often the daemon checks that the FUSE server is alive.
const FUSE_SERVER_WATCH: Duration = Duration::from_secs(2);
/// Views of environment generations kept for their next lease.
const BUILT_VIEWS: usize = 16;
/// How long the reads of an environment's first start are recorded for its learned profile
/// (or until its lease is released, if sooner).
const RECORD_WINDOW: Duration = Duration::from_secs(30);

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// A setup step failed (names the step and the thing).
    #[error("{what}: {message}")]
    Setup {
        /// The step.
        what: String,
        /// The cause.
        message: String,
    },
    /// Another daemon answers on the socket.
    #[error("another kof-fetcherd is running on {0}")]
    AlreadyRunning(PathBuf),
}

fn setup(what: impl Into<String>) -> impl FnOnce(String) -> DaemonError {
    let what = what.into();
    move |message| DaemonError::Setup { what, message }
}

/// A failed request: what the client gets.
#[derive(Debug)]
struct Failure {
    kind: ErrorKind,
    message: String,
}

fn fail(kind: ErrorKind, message: impl Into<String>) -> Failure {
    Failure {
        kind,
        message: message.into(),
    }
}

/// A view built for an environment generation, kept so that the next lease of that generation
/// skips building it, and the FUSE server, which keeps the decoded tree under the same digest,
/// serves it without the tree crossing the control socket again.
struct BuiltView {
    /// The lockfile it was built from.
    lockfile: String,
    /// The closure it was built from, every member stored.
    closure: Vec<StorePath>,
    view: kof_lazy::view::View,
    /// [`tree_digest`] of the view's root.
    tree: String,
}

/// Generation (`owner`, `name`, `generation`) → its built view and when it was last used.
type BuiltViews = HashMap<(String, String, u64), (Arc<BuiltView>, u64)>;

/// The daemon's state, shared by the connection tasks.
struct Daemon {
    config: Config,
    store: Arc<Store>,
    fetcher: Fetcher,
    resolver: Arc<Resolver>,
    token: Option<Arc<Token>>,
    lazy: Arc<LazyStore>,
    lease_dir: LeaseDir,
    /// The leases, and a lock per lease id that serialises its prepare and release.
    leases: std::sync::Mutex<BTreeMap<String, LeaseRecord>>,
    lease_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    paths: RunPaths,
    metrics: DaemonMetrics,
    started: Instant,
    /// Profile recordings under way: environment key (`owner/name`) → the lease recording.
    recordings: std::sync::Mutex<HashMap<String, String>>,
    /// Views built for the latest generations leased (at most [`BUILT_VIEWS`]), and a use
    /// counter.
    built: std::sync::Mutex<(BuiltViews, u64)>,
}

/// The store's totals as the API reports them.
fn store_totals(s: kof_store::Stats) -> StoreTotals {
    StoreTotals {
        store_paths: s.store_paths,
        logical_bytes: s.logical_bytes,
        stored_bytes: s.stored_bytes,
        unique_bytes: s.unique_bytes,
        objects: s.objects,
        environments: s.environments,
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Runs the daemon with `config` until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), DaemonError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| setup("starting the async runtime")(e.to_string()))?;
    rt.block_on(run_async(config))
}

async fn run_async(config: Config) -> Result<(), DaemonError> {
    let paths = RunPaths::of(&config);
    paths
        .create_dir()
        .map_err(|e| setup(format!("creating {}", paths.dir.display()))(e.to_string()))?;
    // The API socket first: a second daemon must fail before touching anything.
    if std::os::unix::net::UnixStream::connect(&config.socket).is_ok() {
        return Err(DaemonError::AlreadyRunning(config.socket.clone()));
    }
    let _ = std::fs::remove_file(&config.socket);
    let listener = UnixListener::bind(&config.socket)
        .map_err(|e| setup(format!("binding {}", config.socket.display()))(e.to_string()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| setup(format!("chmod {}", config.socket.display()))(e.to_string()))?;
    }

    let store = Arc::new(Store::open(&config.store_dir).map_err(|e| {
        setup(format!("opening store {}", config.store_dir.display()))(e.to_string())
    })?);
    let fetcher = Fetcher::from_config(&config, store.clone())
        .map_err(|e| setup("setting up the fetcher")(e.to_string()))?;
    let floxhub = FloxHubClient::new(&config.floxhub_url, config.store_dir.join("floxmeta"))
        .map_err(|e| setup(format!("FloxHub at {}", config.floxhub_url))(e.to_string()))?;
    let token = config
        .floxhub_token_file
        .as_deref()
        .map(|p| read_token_file(p).map(Arc::new))
        .transpose()
        .map_err(|e| setup("reading the FloxHub token file")(e.to_string()))?;
    let lazy = LazyStore::new(
        Arc::new(fetcher.clone()),
        store.clone(),
        kof_lazy::LazyOptions::from_config(&config),
    );
    let lease_dir = LeaseDir::open(&config.store_dir.join("leases"))
        .map_err(|e| setup("opening the lease directory")(e.to_string()))?;
    let records = lease_dir
        .load_all()
        .map_err(|e| setup("reading leases")(e.to_string()))?;
    let daemon = Arc::new(Daemon {
        resolver: Arc::new(Resolver::new(floxhub, config.system.clone()).with_store(store.clone())),
        config,
        store,
        fetcher,
        token,
        lazy,
        lease_dir,
        leases: std::sync::Mutex::new(records.into_iter().map(|r| (r.lease.clone(), r)).collect()),
        lease_locks: std::sync::Mutex::new(HashMap::new()),
        paths,
        metrics: DaemonMetrics::default(),
        started: Instant::now(),
        recordings: std::sync::Mutex::new(HashMap::new()),
        built: std::sync::Mutex::new((HashMap::new(), 0)),
    });

    // Serve at once: a FUSE server waiting on `ensure` since the last daemon died gets its
    // answers while the views are reconciled.
    let accept = tokio::spawn(accept_loop(daemon.clone(), listener));

    let d = daemon.clone();
    tokio::task::spawn_blocking(move || d.adopt_fuse_server())
        .await
        .map_err(|e| setup("adopting the FUSE server")(e.to_string()))??;
    daemon.clone().restart_prefetch();
    tokio::spawn(daemon.clone().watch_fuse_server());

    if let Some(addr) = daemon.config.metrics_addr.clone() {
        let d = daemon.clone();
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || d.render_metrics());
        let (bound, _task) = crate::metrics::serve(&addr, render)
            .await
            .map_err(|e| setup(format!("metrics endpoint on {addr}"))(e.to_string()))?;
        info!(addr = %bound, "metrics at /metrics");
    }
    info!(
        socket = %daemon.config.socket.display(),
        mount_dir = %daemon.config.mount_dir.display(),
        "kof-fetcherd ready"
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| setup("installing the SIGTERM handler")(e.to_string()))?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping (the FUSE server and its views stay)"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping (the FUSE server and its views stay)"),
    }
    accept.abort();
    let _ = std::fs::remove_file(&daemon.config.socket);
    Ok(())
}

async fn accept_loop(daemon: Arc<Daemon>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(daemon.clone(), stream));
            }
            Err(e) => {
                warn!(error = %e, "API socket: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(daemon: Arc<Daemon>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let n = match (&mut reader)
            .take(MAX_REQUEST_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        if line.last() != Some(&b'\n') {
            if line.len() > MAX_REQUEST_LINE {
                daemon.metrics.request("invalid", true);
                let _ = write
                    .write_all(&error_line(
                        ErrorKind::BadRequest,
                        format!("request line longer than {MAX_REQUEST_LINE} bytes"),
                    ))
                    .await;
            }
            return;
        }
        let answer = match serde_json::from_slice::<Request>(&line) {
            Err(e) => {
                daemon.metrics.request("invalid", true);
                error_line(ErrorKind::BadRequest, format!("invalid request: {e}"))
            }
            Ok(req) => {
                let op = req.op();
                let result = daemon.clone().handle(req).await;
                // `hello` is a light `status`, counted with it.
                let counted = if op == "hello" { "status" } else { op };
                daemon.metrics.request(counted, result.is_err());
                match result {
                    Ok(mut v) => {
                        v.push(b'\n');
                        v
                    }
                    Err(f) => {
                        if op != "ensure" {
                            warn!(op, kind = ?f.kind, "{}", f.message);
                        }
                        error_line(f.kind, f.message)
                    }
                }
            }
        };
        if write.write_all(&answer).await.is_err() {
            return;
        }
    }
}

fn to_json(v: &impl serde::Serialize) -> Result<Vec<u8>, Failure> {
    serde_json::to_vec(v).map_err(|e| fail(ErrorKind::Internal, format!("encoding: {e}")))
}

async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| fail(ErrorKind::Internal, format!("{what}: task failed: {e}")))?
}

impl Daemon {
    async fn handle(self: Arc<Self>, req: Request) -> Result<Vec<u8>, Failure> {
        match req {
            Request::Prepare { env, lease, token } => {
                let start = Instant::now();
                let r = self
                    .prepare(&env, &lease, token.as_ref().map(|t| t.0.as_str()))
                    .await;
                self.metrics.prepare_latency.observe(start.elapsed());
                to_json(&r?)
            }
            Request::Release { lease } => to_json(&self.release(&lease).await?),
            Request::Prefetch { env, token } => to_json(
                &self
                    .prefetch(&env, token.as_ref().map(|t| t.0.as_str()))
                    .await?,
            ),
            Request::Status => to_json(&self.status().await?),
            Request::Hello => to_json(&Hello {
                pid: std::process::id(),
                store_dir: self.config.store_dir.clone(),
            }),
            Request::Leases => to_json(&Leases {
                leases: self.lease_infos(),
            }),
            Request::Ensure {
                store_path,
                start,
                end,
            } => {
                self.ensure(&store_path, start, end).await?;
                to_json(&serde_json::json!({"ok": true}))
            }
        }
    }

    fn lease_lock(&self, lease: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.lease_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(lease.to_string())
            .or_default()
            .clone()
    }

    fn view_root(&self, lease: &str) -> PathBuf {
        self.config.mount_dir.join(lease)
    }

    fn lease_info(&self, r: &LeaseRecord, closure_paths: usize) -> LeaseInfo {
        LeaseInfo {
            lease: r.lease.clone(),
            env: r.env_name(),
            generation: r.generation,
            pinned: r.pinned,
            view_root: self.view_root(&r.lease),
            flox_env: r.activation.flox_env.clone(),
            closure_paths,
            created_at: r.created_at,
        }
    }

    fn lease_infos(&self) -> Vec<LeaseInfo> {
        let leases: Vec<LeaseRecord> = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        leases
            .iter()
            .map(|r| {
                let n = self
                    .store
                    .get_environment(&r.owner, &r.name, r.generation)
                    .ok()
                    .flatten()
                    .map(|e| e.closure.len())
                    .unwrap_or(0);
                self.lease_info(r, n)
            })
            .collect()
    }

    fn prepared_of(&self, r: &LeaseRecord, record: &EnvironmentRecord) -> Prepared {
        Prepared {
            lease: r.lease.clone(),
            env: r.env_name(),
            generation: r.generation,
            pinned: r.pinned,
            view_root: self.view_root(&r.lease),
            flox_env: r.activation.flox_env.clone(),
            closure: record.closure.iter().map(|p| p.to_absolute()).collect(),
            activation: r.activation.clone(),
        }
    }

    fn token_for(&self, token: Option<&str>) -> Result<Option<Arc<Token>>, Failure> {
        match token {
            Some(t) => Token::new(t)
                .map(|t| Some(Arc::new(t)))
                .map_err(|e| fail(ErrorKind::BadToken, e.to_string())),
            None => Ok(self.token.clone()),
        }
    }

    async fn resolve(
        &self,
        r: &EnvRef,
        token: Option<Arc<Token>>,
    ) -> Result<ResolvedEnvironment, Failure> {
        let resolver = self.resolver.clone();
        let r2 = r.clone();
        let env = r.env_name();
        blocking("resolving", move || {
            resolver.resolve(&r2, token.as_deref()).map_err(|e| {
                let msg = e.to_string();
                let msg = if msg.contains(&env) {
                    msg
                } else {
                    format!("environment {env}: {msg}")
                };
                fail(ErrorKind::Resolve, msg)
            })
        })
        .await
    }

    async fn prepare(
        self: &Arc<Self>,
        env: &str,
        lease: &str,
        token: Option<&str>,
    ) -> Result<Prepared, Failure> {
        check_lease_id(lease).map_err(|e| fail(ErrorKind::BadLease, e.to_string()))?;
        let r = EnvRef::parse(env).map_err(|e| fail(ErrorKind::BadEnv, e.to_string()))?;
        let token = self.token_for(token)?;
        let lock = self.lease_lock(lease);
        let _held = lock.lock().await;

        let existing = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(lease)
            .cloned();
        if let Some(rec) = existing {
            let same = rec.owner == r.owner
                && rec.name == r.name
                && r.generation.is_none_or(|g| g == rec.generation);
            if !same {
                return Err(fail(
                    ErrorKind::LeaseExists,
                    format!(
                        "lease {lease} exists for environment {}:{}, not {r}",
                        rec.env_name(),
                        rec.generation
                    ),
                ));
            }
            let record = self.env_record(&rec)?;
            // Its view may be missing (a rebuild after a restart failed): build it now.
            let d = self.clone();
            let name = lease.to_string();
            let has_view = tokio::task::spawn_blocking(move || {
                d.fuse_info().is_some_and(|i| i.views.contains(&name))
            })
            .await
            .unwrap_or(false);
            if !has_view {
                self.rebuild(&rec).await?;
            }
            return Ok(self.prepared_of(&rec, &record));
        }

        let label = r.to_string();
        let resolved = self.resolve(&r, token).await?;
        let label_g = format!("{}:{}", resolved.env_ref().env_name(), resolved.generation);
        // Metadata only: narinfos of paths not stored, stored metadata of the others. Each
        // path's listing is asked for as soon as its narinfo is accepted, while the walk of the
        // references goes on (for a 200-path closure, a round of listings less).
        let mut listings = StartedEntries::new();
        let closure = self
            .fetcher
            .resolve_with(&resolved.roots, |sub| {
                self.lazy.start_entry(sub, &mut listings)
            })
            .await
            .map_err(|e| {
                fail(
                    ErrorKind::Closure,
                    format!("environment {label_g}: computing the closure: {e}"),
                )
            })?;
        let record = resolved.to_record(closure.paths());
        let pinned_before = {
            let store = self.store.clone();
            let record = record.clone();
            let (owner, name, generation) = (
                resolved.owner.clone(),
                resolved.name.clone(),
                resolved.generation,
            );
            let label_g = label_g.clone();
            blocking("recording", move || {
                let pinned_before = store
                    .roots()
                    .map_err(|e| {
                        fail(
                            ErrorKind::Store,
                            format!("{label_g}: reading gc roots: {e}"),
                        )
                    })?
                    .iter()
                    .any(|k| {
                        k.owner == owner && k.name == name && k.generation == generation && k.pinned
                    });
                store
                    .put_environment(&record)
                    .and_then(|()| store.set_root(&owner, &name, generation, true))
                    .map_err(|e| fail(ErrorKind::Store, format!("{label_g}: recording it: {e}")))?;
                Ok(pinned_before)
            })
            .await?
        };
        let built = self
            .view_of(&resolved, &closure, listings)
            .await
            .map_err(|f| fail(f.kind, format!("environment {label_g}: {}", f.message)))?;
        let view = &built.view;
        let activation = view.activation(&resolved);
        let rec = LeaseRecord {
            lease: lease.to_string(),
            owner: resolved.owner.clone(),
            name: resolved.name.clone(),
            generation: resolved.generation,
            pinned: resolved.pinned,
            activation,
            root_set_by_lease: !pinned_before,
            created_at: now_secs(),
        };
        // The lease is durable before its view appears: a crash in between leaves a lease
        // whose view the next daemon builds, never a view nobody knows.
        let dir = self.lease_dir.clone();
        let rec2 = rec.clone();
        blocking("writing the lease", move || {
            dir.put(&rec2)
                .map_err(|e| fail(ErrorKind::Store, format!("lease {}: {e}", rec2.lease)))
        })
        .await?;
        let added = self.add_view(lease, built).await;
        if let Err(f) = added {
            let _ = self.lease_dir.remove(lease);
            if !pinned_before {
                let _ = self
                    .store
                    .remove_root(&rec.owner, &rec.name, rec.generation);
            }
            return Err(f);
        }
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(lease.to_string(), rec.clone());
        info!(lease, env = %label, generation = rec.generation, paths = record.closure.len(), "prepared");
        self.learned_profile(&rec, &closure);
        if self.config.prefetch == Prefetch::Closure {
            self.prefetch_closure(closure);
        }
        Ok(self.prepared_of(&rec, &record))
    }

    fn env_record(&self, rec: &LeaseRecord) -> Result<EnvironmentRecord, Failure> {
        self.store
            .get_environment(&rec.owner, &rec.name, rec.generation)
            .map_err(|e| fail(ErrorKind::Store, format!("lease {}: {e}", rec.lease)))?
            .ok_or_else(|| {
                fail(
                    ErrorKind::Store,
                    format!(
                        "lease {}: environment {}:{} is not recorded in the store",
                        rec.lease,
                        rec.env_name(),
                        rec.generation
                    ),
                )
            })
    }

    /// The view of an environment generation: the one built for an earlier lease when it was
    /// built from the same lockfile and the same closure, every member stored (a stored path's
    /// tree never changes; a path still to fetch is described afresh, its listing registered
    /// with the engine); else built now (and kept when every member is stored).
    async fn view_of(
        &self,
        resolved: &ResolvedEnvironment,
        closure: &Closure,
        listings: StartedEntries,
    ) -> Result<Arc<BuiltView>, Failure> {
        let all_stored = closure
            .entries
            .iter()
            .all(|e| matches!(e, ClosureEntry::Stored(_)));
        let key = (
            resolved.owner.clone(),
            resolved.name.clone(),
            resolved.generation,
        );
        let paths = closure.paths();
        if all_stored {
            let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
            let (views, clock) = &mut *built;
            *clock += 1;
            if let Some((b, used)) = views.get_mut(&key) {
                if b.lockfile == resolved.lockfile_text && b.closure == paths {
                    *used = *clock;
                    return Ok(b.clone());
                }
            }
        }
        let view = self.build(resolved, closure, listings).await?;
        let root = view.root.clone();
        let tree = blocking("naming the tree", move || Ok(tree_digest(&root))).await?;
        let b = Arc::new(BuiltView {
            lockfile: resolved.lockfile_text.clone(),
            closure: paths,
            view,
            tree,
        });
        if all_stored {
            let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
            let (views, clock) = &mut *built;
            *clock += 1;
            views.insert(key, (b.clone(), *clock));
            if views.len() > BUILT_VIEWS {
                if let Some(oldest) = views
                    .iter()
                    .min_by_key(|(_, (_, used))| *used)
                    .map(|(k, _)| k.clone())
                {
                    views.remove(&oldest);
                }
            }
        }
        Ok(b)
    }

    /// Serves `built` as view `name` on the FUSE server (replacing a view of that name): by
    /// digest when the server keeps that tree, else the whole tree (kept there under its
    /// digest); a FUSE server older than digests gets the tree alone.
    async fn add_view(&self, name: &str, built: Arc<BuiltView>) -> Result<(), Failure> {
        let control = self.paths.control.clone();
        let name = name.to_string();
        blocking("adding the view", move || {
            let add = || {
                let mut c = ControlClient::connect(&control)?;
                match c.add_cached_view(&name, &built.tree) {
                    Ok(true) => Ok(()),
                    Ok(false) => c.add_view(
                        &name,
                        WireEntry::from_entry(&built.view.root),
                        Some(&built.tree),
                    ),
                    Err(ApiError::Remote(e)) if e.kind == ErrorKind::BadRequest => {
                        c.add_view(&name, WireEntry::from_entry(&built.view.root), None)
                    }
                    Err(e) => Err(e),
                }
            };
            add().map_err(|e| fail(ErrorKind::Fuse, format!("adding view {name}: {e}")))
        })
        .await
    }

    /// The view of an environment: every closure member's tree (metadata only; those
    /// `listings` has under way taken from there), then the root file system.
    async fn build(
        &self,
        resolved: &ResolvedEnvironment,
        closure: &Closure,
        listings: StartedEntries,
    ) -> Result<kof_lazy::view::View, Failure> {
        let entries = self
            .lazy
            .entries(closure, listings)
            .await
            .map_err(|e| fail(ErrorKind::View, format!("describing the closure: {e}")))?;
        let input = ViewInput::new(resolved, entries);
        build_view(&input).map_err(|e| fail(ErrorKind::View, e.to_string()))
    }

    /// The learned profile of a lease's environment: when one is saved (this node recorded it,
    /// or it was imported), its ranges are fetched now, in parallel, ahead of the closure
    /// prefetch; otherwise the demand reads of this first start are recorded (for
    /// [`RECORD_WINDOW`] or until the lease is released) and saved as the profile.
    fn learned_profile(self: &Arc<Self>, rec: &LeaseRecord, closure: &Closure) {
        let key = rec.env_name();
        match kof_lazy::Profile::load(&self.config.store_dir, &key) {
            Ok(Some(profile)) => {
                let n = profile.ranges.len();
                let task = self.lazy.prefetch_profile(profile);
                let key2 = key.clone();
                tokio::spawn(async move {
                    match task.await {
                        Ok(failures) if failures.is_empty() => {
                            info!(env = %key2, ranges = n, "learned profile fetched")
                        }
                        Ok(failures) => {
                            warn!(env = %key2, ranges = n, first_failure = %failures[0], "learned profile fetched in part")
                        }
                        Err(e) => warn!(env = %key2, error = %e, "learned profile task failed"),
                    }
                });
            }
            Ok(None) => {
                {
                    let mut recs = self.recordings.lock().unwrap_or_else(|p| p.into_inner());
                    if recs.contains_key(&key) {
                        return;
                    }
                    recs.insert(key.clone(), rec.lease.clone());
                }
                self.lazy.start_recording_only(&key, Some(closure.paths()));
                info!(env = %key, lease = %rec.lease, "recording the first start's reads");
                let d = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(RECORD_WINDOW).await;
                    d.finish_recording(&key, None);
                });
            }
            Err(e) => warn!(env = %key, error = %e, "learned profile unusable; ignored"),
        }
    }

    /// Ends the recording of `key` (only if `lease` started it, when given) and saves what it
    /// saw.
    fn finish_recording(&self, key: &str, lease: Option<&str>) {
        {
            let mut recs = self.recordings.lock().unwrap_or_else(|p| p.into_inner());
            match recs.get(key) {
                Some(l) if lease.is_none_or(|x| x == l) => {
                    recs.remove(key);
                }
                _ => return,
            }
        }
        let Some(profile) = self.lazy.stop_recording(key) else {
            return;
        };
        if profile.ranges.is_empty() {
            info!(env = %key, "the first start read nothing missing; no profile saved");
            return;
        }
        match profile.save(&self.config.store_dir) {
            Ok(path) => {
                info!(env = %key, ranges = profile.ranges.len(), file = %path.display(), "learned profile saved")
            }
            Err(e) => warn!(env = %key, error = %e, "saving the learned profile"),
        }
    }

    /// Fetches the rest of a closure in the background, below demand reads.
    fn prefetch_closure(&self, closure: Closure) {
        let n = closure.entries.len();
        let task = self.lazy.prefetch(closure);
        tokio::spawn(async move {
            match task.await {
                Ok(report) if report.failures.is_empty() => {
                    info!(
                        paths = n,
                        fetched = report.stored,
                        "background prefetch done"
                    )
                }
                Ok(report) => warn!(
                    paths = n,
                    fetched = report.stored,
                    first_failure = %report.failures[0],
                    "background prefetch incomplete"
                ),
                Err(e) => warn!(paths = n, error = %e, "background prefetch task failed"),
            }
        });
    }

    async fn release(self: &Arc<Self>, lease: &str) -> Result<Released, Failure> {
        check_lease_id(lease).map_err(|e| fail(ErrorKind::BadLease, e.to_string()))?;
        let lock = self.lease_lock(lease);
        let _held = lock.lock().await;
        let rec = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(lease)
            .cloned();
        let Some(rec) = rec else {
            return Ok(Released {
                lease: lease.to_string(),
                released: false,
            });
        };
        let control = self.paths.control.clone();
        let name = lease.to_string();
        blocking("removing the view", move || {
            ControlClient::connect(&control)
                .and_then(|mut c| c.remove_view(&name))
                .map_err(|e| fail(ErrorKind::Fuse, format!("removing view {name}: {e}")))
        })
        .await?;
        self.lease_dir
            .remove(lease)
            .map_err(|e| fail(ErrorKind::Store, format!("lease {lease}: {e}")))?;
        let still_held = {
            let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
            leases.remove(lease);
            leases.values().any(|o| {
                o.owner == rec.owner && o.name == rec.name && o.generation == rec.generation
            })
        };
        self.finish_recording(&rec.env_name(), Some(lease));
        if rec.root_set_by_lease && !still_held {
            if let Err(e) = self
                .store
                .remove_root(&rec.owner, &rec.name, rec.generation)
            {
                warn!(lease, error = %e, "removing the gc root of a released lease");
            }
        }
        info!(lease, env = %rec.env_name(), generation = rec.generation, "released");
        Ok(Released {
            lease: lease.to_string(),
            released: true,
        })
    }

    async fn prefetch(&self, env: &str, token: Option<&str>) -> Result<Prefetched, Failure> {
        let r = EnvRef::parse(env).map_err(|e| fail(ErrorKind::BadEnv, e.to_string()))?;
        let token = self.token_for(token)?;
        let resolved = self.resolve(&r, token).await?;
        let label = format!("{}:{}", resolved.env_ref().env_name(), resolved.generation);
        // Record and root first, so a gc never drops what is being fetched.
        let closure = self.fetcher.resolve(&resolved.roots).await.map_err(|e| {
            fail(
                ErrorKind::Closure,
                format!("environment {label}: computing the closure: {e}"),
            )
        })?;
        self.store
            .put_environment(&resolved.to_record(closure.paths()))
            .and_then(|()| {
                self.store.set_root(
                    &resolved.owner,
                    &resolved.name,
                    resolved.generation,
                    resolved.pinned,
                )
            })
            .map_err(|e| {
                fail(
                    ErrorKind::Store,
                    format!("environment {label}: recording it: {e}"),
                )
            })?;
        let summary = self
            .fetcher
            .fetch_closure(&resolved.roots, None)
            .await
            .map_err(|e| fail(ErrorKind::Fetch, format!("environment {label}: {e}")))?;
        Ok(Prefetched {
            env: resolved.env_ref().env_name(),
            generation: resolved.generation,
            paths: summary.paths,
            paths_fetched: summary.paths_fetched,
            paths_already_present: summary.paths_already_present,
            bytes_downloaded: summary.bytes_downloaded,
            nar_bytes: summary.nar_bytes,
            new_stored_bytes: summary.new_stored_bytes,
            elapsed_secs: summary.elapsed.as_secs_f64(),
        })
    }

    async fn ensure(&self, store_path: &str, start: u64, end: u64) -> Result<(), Failure> {
        let path = StorePath::from_base_name(store_path).map_err(|e| {
            fail(
                ErrorKind::BadRequest,
                format!("invalid store path {store_path:?}: {e}"),
            )
        })?;
        self.metrics
            .ensure_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = Instant::now();
        let r = self.lazy.ensure(&path, start, end, Cause::Demand).await;
        self.metrics.ensure_latency.observe(t.elapsed());
        self.metrics
            .ensure_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        r.map_err(|e| {
            error!(store_path, start, end, error = %e, "demand read failed");
            fail(ErrorKind::Fetch, e.to_string())
        })
    }

    fn fuse_info(&self) -> Option<FuseServerInfo> {
        ControlClient::connect(&self.paths.control)
            .and_then(|mut c| c.ping())
            .ok()
    }

    async fn status(self: &Arc<Self>) -> Result<Status, Failure> {
        let d = self.clone();
        blocking("status", move || {
            let store = store_totals(
                d.store
                    .stats()
                    .map_err(|e| fail(ErrorKind::Store, format!("store totals: {e}")))?,
            );
            let c = d.lazy.counters();
            Ok(Status {
                pid: std::process::id(),
                store_dir: d.config.store_dir.clone(),
                leases: d.lease_infos(),
                store,
                in_flight_fetches: c.in_flight.max(0) as u64,
                demand_bytes: c.bytes_fetched.demand,
                prefetch_bytes: c.bytes_fetched.prefetch,
                fuse_server: d.fuse_info(),
            })
        })
        .await
    }

    /// Finds or starts the FUSE server and makes its views match the leases.
    fn adopt_fuse_server(&self) -> Result<(), DaemonError> {
        let info = ensure_fuse_server(&self.config, &self.paths, FUSE_SERVER_START)
            .map_err(|e| setup("starting the FUSE server")(e.to_string()))?;
        self.reconcile(&info);
        Ok(())
    }

    fn reconcile(&self, info: &FuseServerInfo) {
        let leases: Vec<LeaseRecord> = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let handle = tokio::runtime::Handle::current();
        for rec in &leases {
            if info.views.contains(&rec.lease) {
                continue;
            }
            // The API is served while this runs: a `prepare` of the same lease may have rebuilt
            // the view already, or a `release` dropped the lease. Under the lease's lock, look
            // again; rebuilding twice would replace a view a reader is already walking.
            let lock = self.lease_lock(&rec.lease);
            let _held = handle.block_on(lock.lock());
            let still_leased = self
                .leases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&rec.lease);
            if !still_leased
                || self
                    .fuse_info()
                    .is_some_and(|i| i.views.contains(&rec.lease))
            {
                continue;
            }
            match handle.block_on(self.rebuild(rec)) {
                Ok(()) => info!(lease = %rec.lease, "view rebuilt for a lease"),
                Err(f) => {
                    error!(lease = %rec.lease, "cannot rebuild the view of a lease: {}", f.message)
                }
            }
        }
        for v in &info.views {
            if !leases.iter().any(|r| &r.lease == v) {
                // A `prepare` adds its view before it records the lease: under the lease's lock,
                // look again.
                let lock = self.lease_lock(v);
                let _held = handle.block_on(lock.lock());
                if self
                    .leases
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(v)
                {
                    continue;
                }
                info!(view = %v, "removing a view without a lease");
                if let Err(e) =
                    ControlClient::connect(&self.paths.control).and_then(|mut c| c.remove_view(v))
                {
                    warn!(view = %v, error = %e, "removing a view without a lease");
                }
            }
        }
    }

    /// Rebuilds a lease's view from the store's record of its environment.
    async fn rebuild(&self, rec: &LeaseRecord) -> Result<(), Failure> {
        let record = self.env_record(rec)?;
        // The view needs the lockfile's installed paths and priorities, which the record holds.
        let resolved = ResolvedEnvironment::from_record(&record, rec.pinned)
            .map_err(|e| fail(ErrorKind::Store, format!("recorded {e}")))?;
        let closure = self.fetcher.resolve(&record.roots).await.map_err(|e| {
            fail(
                ErrorKind::Closure,
                format!("lease {}: computing the closure: {e}", rec.lease),
            )
        })?;
        let built = self
            .view_of(&resolved, &closure, StartedEntries::new())
            .await?;
        self.add_view(&rec.lease, built).await
    }

    /// Background prefetch of every leased closure again (after a restart).
    fn restart_prefetch(self: Arc<Self>) {
        if self.config.prefetch != Prefetch::Closure {
            return;
        }
        let leases: Vec<LeaseRecord> = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        tokio::spawn(async move {
            for rec in leases {
                let Ok(record) = self.env_record(&rec) else {
                    continue;
                };
                match self.fetcher.resolve(&record.roots).await {
                    Ok(closure) => self.prefetch_closure(closure),
                    Err(e) => warn!(lease = %rec.lease, error = %e, "no prefetch after restart"),
                }
            }
        });
    }

    /// Restarts the FUSE server if it dies while the daemon runs, and rebuilds its views.
    async fn watch_fuse_server(self: Arc<Self>) {
        loop {
            tokio::time::sleep(FUSE_SERVER_WATCH).await;
            let d = self.clone();
            let alive = tokio::task::spawn_blocking(move || d.fuse_info().is_some())
                .await
                .unwrap_or(true);
            if alive {
                continue;
            }
            warn!("the FUSE server is gone; starting a new one");
            let d = self.clone();
            match tokio::task::spawn_blocking(move || d.adopt_fuse_server()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(error = %e, "restarting the FUSE server"),
                Err(e) => error!(error = %e, "restarting the FUSE server"),
            }
        }
    }

    fn render_metrics(&self) -> String {
        let mut out = Exposition::default();
        self.metrics.encode(&mut out);
        let c = self.lazy.counters();
        out.header(
            "kof_fetch_bytes_total",
            "counter",
            "Bytes received from binary caches by the lazy engine, by cause.",
        );
        for (cause, v) in [
            ("demand", c.bytes_fetched.demand),
            ("prefetch", c.bytes_fetched.prefetch),
            ("profile", c.bytes_fetched.profile),
        ] {
            out.sample("kof_fetch_bytes_total", &[("cause", cause)], v as f64);
        }
        out.header(
            "kof_fetch_requests_total",
            "counter",
            "NAR requests sent to binary caches (range GETs and streams), by cause.",
        );
        for (cause, v) in [
            ("demand", c.requests.demand),
            ("prefetch", c.requests.prefetch),
            ("profile", c.requests.profile),
        ] {
            out.sample("kof_fetch_requests_total", &[("cause", cause)], v as f64);
        }
        out.header(
            "kof_local_hits_total",
            "counter",
            "Reads answered from the store or a partial NAR without fetching.",
        );
        out.sample("kof_local_hits_total", &[], c.local_hits as f64);
        out.header(
            "kof_fetches_in_flight",
            "gauge",
            "NAR fetches under way now.",
        );
        out.sample("kof_fetches_in_flight", &[], c.in_flight as f64);
        out.header(
            "kof_paths_completed_total",
            "counter",
            "Store paths completed into the store by the lazy engine.",
        );
        out.sample("kof_paths_completed_total", &[], c.paths_completed as f64);
        out.header(
            "kof_paths_refused_total",
            "counter",
            "Store paths whose fetched bytes failed verification.",
        );
        out.sample("kof_paths_refused_total", &[], c.paths_refused as f64);
        out.header(
            "kof_ensure_failures_total",
            "counter",
            "Reads whose bytes could not be fetched.",
        );
        out.sample("kof_ensure_failures_total", &[], c.ensure_failures as f64);
        out.header(
            "kof_prefetch_yields_total",
            "counter",
            "Prefetch GETs stopped early to leave the link to demand reads.",
        );
        out.sample("kof_prefetch_yields_total", &[], c.prefetch_yields as f64);
        out.histogram(
            "kof_fetch_seconds",
            "Duration of NAR fetches (range GET to last byte; streamed path to commit).",
            &[],
            &crate::metrics::HistogramSnapshot {
                buckets: c.fetch_latency.buckets.clone(),
                count: c.fetch_latency.count,
                sum: c.fetch_latency.sum,
            },
        );
        let leases = self.leases.lock().unwrap_or_else(|p| p.into_inner()).len();
        out.header("kof_leases", "gauge", "Leases (prepared views).");
        out.sample("kof_leases", &[], leases as f64);
        if let Ok(s) = self.store.stats() {
            out.header("kof_store_paths", "gauge", "Store paths in the store.");
            out.sample("kof_store_paths", &[], s.store_paths as f64);
            out.header("kof_store_bytes", "gauge", "Bytes of objects on disk.");
            out.sample("kof_store_bytes", &[], s.stored_bytes as f64);
        }
        out.header(
            "kof_uptime_seconds",
            "gauge",
            "Seconds since this daemon process started.",
        );
        out.sample(
            "kof_uptime_seconds",
            &[],
            self.started.elapsed().as_secs_f64(),
        );
        let ops = ControlClient::connect(&self.paths.control).and_then(|mut c| c.op_stats());
        out.header(
            "kof_fuse_server_up",
            "gauge",
            "Whether the FUSE server answered this scrape.",
        );
        out.sample("kof_fuse_server_up", &[], ops.is_ok() as u8 as f64);
        if let Ok(ops) = ops {
            out.header(
                "kof_fuse_op_seconds",
                "histogram",
                "Latency of FUSE operations answered by the view, by operation.",
            );
            for (op, s) in &ops.ops {
                out.histogram_samples(
                    "kof_fuse_op_seconds",
                    &[("op", op)],
                    &crate::metrics::HistogramSnapshot {
                        buckets: s.buckets.clone(),
                        count: s.count,
                        sum: s.sum_seconds,
                    },
                );
            }
        }
        out.finish()
    }
}
