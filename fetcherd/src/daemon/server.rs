//! The daemon process: start-up (store, fetcher, resolver, lazy engine, FUSE server, lease
//! reconciliation), the API socket and its request handlers, garbage collection while it
//! serves ([`collect`]), and shutdown.

mod collect;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kof_floxhub::client::Token;
use kof_floxhub::resolve::ResolvedEnvironment;
use kof_lazy::prepare::{BuiltView, Lease, PrepareError, PreparedEnvironment, Preparer, Root};
use kof_lazy::{Cause, StartedEntries};
use kof_nar::StorePath;
use kof_node_api::api::{
    error_line, ApiError, ErrorKind, FuseServerInfo, Hello, LeaseInfo, Leases, PodResolved,
    Prefetched, Prepared, Released, Request, Status, StoreTotals, MAX_REQUEST_LINE,
};
use kof_node_api::config::{Config, Prefetch};
use kof_node_api::envref::EnvRef;
use kof_node_api::lease::check_lease_id;
use kof_node_api::report::chain;
use kof_store::{EnvironmentRecord, Store};
use parking_lot::Mutex;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{error, info, warn};

use super::control::{ensure_fuse_server, ControlClient, RunPaths};
use super::leases::{view_name, LeaseDir, LeaseRecord};
use super::wire::WireEntry;
use crate::metrics::{DaemonMetrics, Exposition};
use collect::IdleView;

/// How long the daemon waits for a FUSE server it started to answer.
const FUSE_SERVER_START: Duration = Duration::from_secs(30);
/// How often the daemon checks that the FUSE server is alive.
const FUSE_SERVER_WATCH: Duration = Duration::from_secs(2);
/// How long the reads of an environment's first start are recorded for its learned profile
/// (or until its lease is released, if sooner).
const RECORD_WINDOW: Duration = Duration::from_secs(30);

/// Most views kept idle at once (beyond it the oldest goes first).
const IDLE_VIEWS_MAX: usize = 32;

/// How long a pod's resolution of its live generation is kept for its containers.
const POD_RESOLUTION_KEPT: Duration = Duration::from_secs(120);

/// A pod's resolution of a live reference: made once (the first caller runs it, the others
/// wait for it), `None` when it failed (the containers then resolve by themselves).
type PodResolution = Arc<tokio::sync::OnceCell<Option<ResolvedEnvironment>>>;

/// Why the daemon could not start or stopped with an error. Each names the step and the thing;
/// the cause is the source.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// A system call of the start-up failed.
    #[error("{what}")]
    Io {
        /// The step and the thing (`binding /run/kof/fetcherd.sock`).
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("opening store {}", dir.display())]
    Store {
        /// `store_dir`.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: Box<kof_store::StoreError>,
    },
    /// The prepare pipeline could not be set up (FloxHub, its token, the fetcher).
    #[error(transparent)]
    Pipeline(#[from] PrepareError),
    /// The lease directory could not be opened or read.
    #[error("{what}")]
    Leases {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: super::leases::LeaseStoreError,
    },
    /// The FUSE server could not be started.
    #[error("starting the FUSE server")]
    FuseServer(#[source] super::control::SpawnError),
    /// A start-up task stopped without a result.
    #[error("{what}: task failed")]
    Task {
        /// The task.
        what: &'static str,
        /// The cause.
        #[source]
        source: tokio::task::JoinError,
    },
    /// Another daemon answers on the socket.
    #[error("another kof-fetcherd is running on {0}")]
    AlreadyRunning(PathBuf),
}

/// The [`DaemonError::Io`] of a step.
fn io_step(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
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

/// The failure a client gets for a pipeline error: its kind, and the whole chain as the
/// message (which names the environment).
fn prepare_failure(e: PrepareError) -> Failure {
    let kind = match &e {
        PrepareError::Resolve { .. } => ErrorKind::Resolve,
        PrepareError::Closure { .. } => ErrorKind::Closure,
        PrepareError::Record { .. } => ErrorKind::Store,
        PrepareError::Describe { .. } | PrepareError::View { .. } => ErrorKind::View,
        PrepareError::Lease { .. } => ErrorKind::Fuse,
        PrepareError::FloxHub { .. }
        | PrepareError::TokenFile { .. }
        | PrepareError::Fetcher(_)
        | PrepareError::Task { .. } => ErrorKind::Internal,
    };
    let message = match &e {
        // A resolution error names the environment already, most of the time: say it once.
        PrepareError::Resolve { env, source } => {
            let cause = chain(source);
            let name = env.split(':').next().unwrap_or(env);
            if cause.contains(name) {
                cause
            } else {
                format!("environment {name}: {cause}")
            }
        }
        _ => chain(&e),
    };
    fail(kind, message)
}

/// Why an idle view could not be removed (it stays idle, and is tried again).
#[derive(Debug, Error)]
enum RemoveViewError {
    /// The FUSE server did not remove it.
    #[error(transparent)]
    Control(#[from] ApiError),
    /// The blocking control call ended without a result.
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

/// The daemon's state, shared by the connection tasks.
struct Daemon {
    config: Config,
    /// The one prepare pipeline (store, resolver, fetcher, lazy engine, built views).
    prep: Arc<Preparer>,
    lease_dir: LeaseDir,
    /// The leases, and a lock per lease id that serialises its prepare and release.
    leases: Mutex<BTreeMap<String, LeaseRecord>>,
    lease_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// One lock per view name, held while a view is added, rebuilt or removed and the leases
    /// using it change (taken after a lease's lock, never before).
    view_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Views whose last lease is gone, kept for the next lease of the same tree (config
    /// `idle_view_secs`), with the moment they became idle and the generation they show (live
    /// for gc while kept). Changed under the view's lock.
    idle_views: Mutex<HashMap<String, IdleView>>,
    /// Store paths (base names) with demand reads (`ensure`) in flight, and how many: live
    /// for gc.
    reading: Mutex<HashMap<String, usize>>,
    /// One garbage collection at a time.
    gc_lock: tokio::sync::Mutex<()>,
    /// Prompts a quota check (after a prepare, prefetch, release or gc).
    quota_kick: tokio::sync::Notify,
    /// A collection for a write that found no space is under way.
    no_space_gc: std::sync::atomic::AtomicBool,
    /// Live resolutions made for starting pods, by (pod, reference), with when they were asked.
    pod_resolutions: Mutex<HashMap<(String, String), (PodResolution, Instant)>>,
    paths: RunPaths,
    metrics: DaemonMetrics,
    started: Instant,
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
        .map_err(io_step("starting the async runtime"))?;
    rt.block_on(run_async(config))
}

async fn run_async(config: Config) -> Result<(), DaemonError> {
    let paths = RunPaths::of(&config);
    paths
        .create_dir()
        .map_err(io_step(format!("creating {}", paths.dir.display())))?;
    // The API socket first: a second daemon must fail before touching anything.
    if std::os::unix::net::UnixStream::connect(&config.socket).is_ok() {
        return Err(DaemonError::AlreadyRunning(config.socket.clone()));
    }
    let _ = std::fs::remove_file(&config.socket);
    let listener = UnixListener::bind(&config.socket)
        .map_err(io_step(format!("binding {}", config.socket.display())))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o600))
            .map_err(io_step(format!("chmod {}", config.socket.display())))?;
    }

    let store = Arc::new(
        Store::open(&config.store_dir).map_err(|source| DaemonError::Store {
            dir: config.store_dir.clone(),
            source: Box::new(source),
        })?,
    );
    let prep = Arc::new(Preparer::from_config(&config, store)?);
    let lease_dir =
        LeaseDir::open(&config.store_dir.join("leases")).map_err(|source| DaemonError::Leases {
            what: "opening the lease directory",
            source,
        })?;
    let records = lease_dir.load_all().map_err(|source| DaemonError::Leases {
        what: "reading leases",
        source,
    })?;
    let daemon = Arc::new(Daemon {
        config,
        prep,
        lease_dir,
        leases: Mutex::new(records.into_iter().map(|r| (r.lease.clone(), r)).collect()),
        lease_locks: Mutex::new(HashMap::new()),
        view_locks: Mutex::new(HashMap::new()),
        idle_views: Mutex::new(HashMap::new()),
        reading: Mutex::new(HashMap::new()),
        gc_lock: tokio::sync::Mutex::new(()),
        quota_kick: tokio::sync::Notify::new(),
        no_space_gc: std::sync::atomic::AtomicBool::new(false),
        pod_resolutions: Mutex::new(HashMap::new()),
        paths,
        metrics: DaemonMetrics::default(),
        started: Instant::now(),
    });

    // Serve at once: a FUSE server waiting on `ensure` since the last daemon died gets its
    // answers while the views are reconciled.
    let accept = tokio::spawn(accept_loop(daemon.clone(), listener));

    let d = daemon.clone();
    tokio::task::spawn_blocking(move || d.adopt_fuse_server())
        .await
        .map_err(|source| DaemonError::Task {
            what: "adopting the FUSE server",
            source,
        })??;
    daemon.clone().restart_prefetch();
    tokio::spawn(daemon.clone().expire_idle_views());
    tokio::spawn(daemon.clone().watch_fuse_server());
    tokio::spawn(daemon.clone().quota_task());

    if let Some(addr) = daemon.config.metrics_addr.clone() {
        let d = daemon.clone();
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || d.render_metrics());
        let (bound, _task) = crate::metrics::serve(&addr, render)
            .await
            .map_err(io_step(format!("metrics endpoint on {addr}")))?;
        info!(addr = %bound, "metrics at /metrics");
    }
    info!(
        socket = %daemon.config.socket.display(),
        mount_dir = %daemon.config.mount_dir.display(),
        "kof-fetcherd ready"
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io_step("installing the SIGTERM handler"))?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping (the FUSE server and its views stay)"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping (the FUSE server and its views stay)"),
    }
    accept.abort();
    let _ = std::fs::remove_file(&daemon.config.socket);
    // The next daemon resumes the partial NARs this one fetched into (the FUSE server and its
    // views stay; their reads of missing bytes wait for it).
    let d = daemon.clone();
    match tokio::task::spawn_blocking(move || d.prep.lazy().save_partials()).await {
        Ok(n) => info!(partial_nars = n, "fetched ranges kept for the next daemon"),
        Err(e) => warn!(error = %chain(&e), "keeping the fetched ranges of partial NARs"),
    }
    Ok(())
}

async fn accept_loop(daemon: Arc<Daemon>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(daemon.clone(), stream));
            }
            Err(e) => {
                warn!(error = %chain(&e), "API socket: accept failed");
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
                error_line(
                    ErrorKind::BadRequest,
                    format!("invalid request: {}", chain(&e)),
                )
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
    serde_json::to_vec(v).map_err(|e| fail(ErrorKind::Internal, format!("encoding: {}", chain(&e))))
}

async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        fail(
            ErrorKind::Internal,
            format!("{what}: task failed: {}", chain(&e)),
        )
    })?
}

impl Daemon {
    async fn handle(self: Arc<Self>, req: Request) -> Result<Vec<u8>, Failure> {
        match req {
            Request::Prepare {
                env,
                lease,
                token,
                pod,
            } => {
                let start = Instant::now();
                let r = self
                    .prepare(
                        &env,
                        &lease,
                        token.as_ref().map(|t| t.0.as_str()),
                        pod.as_deref(),
                    )
                    .await;
                self.metrics.prepare_latency.observe(start.elapsed());
                to_json(&r?)
            }
            Request::PodStarting { env, pod, token } => to_json(
                &self
                    .pod_starting(&env, &pod, token.as_ref().map(|t| t.0.as_str()))
                    .await?,
            ),
            Request::Release { lease } => to_json(&self.release(&lease).await?),
            Request::Prefetch { env, token } => to_json(
                &self
                    .prefetch(&env, token.as_ref().map(|t| t.0.as_str()))
                    .await?,
            ),
            Request::Resolve { env, token } => {
                let r = EnvRef::parse(&env).map_err(|e| fail(ErrorKind::BadEnv, chain(&e)))?;
                let token = self.token_for(token.as_ref().map(|t| t.0.as_str()))?;
                to_json(
                    &self
                        .prep
                        .describe(&r, token)
                        .await
                        .map_err(prepare_failure)?,
                )
            }
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
            Request::Gate { store_path } => {
                self.gate(&store_path).await?;
                to_json(&serde_json::json!({"ok": true}))
            }
            Request::Gc { derived } => to_json(&self.gc_op(derived).await?),
        }
    }

    fn lease_lock(&self, lease: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.lease_locks
            .lock()
            .entry(lease.to_string())
            .or_default()
            .clone()
    }

    fn view_lock(&self, view: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.view_locks
            .lock()
            .entry(view.to_string())
            .or_default()
            .clone()
    }

    fn view_root(&self, r: &LeaseRecord) -> PathBuf {
        self.config.mount_dir.join(r.view_name())
    }

    /// Whether the FUSE server serves view `name`.
    async fn has_view(&self, name: &str) -> bool {
        let control = self.paths.control.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            ControlClient::connect(&control)
                .and_then(|mut c| c.ping())
                .is_ok_and(|i| i.views.contains(&name))
        })
        .await
        .unwrap_or(false)
    }

    /// Builds the view of lease `rec` again when the FUSE server lacks it (a rebuild after a
    /// restart failed, or another lease of a shared view is rebuilding it): `Ok(true)` when it
    /// was rebuilt now.
    async fn ensure_view(&self, rec: &LeaseRecord) -> Result<bool, Failure> {
        let lock = self.view_lock(rec.view_name());
        let _held = lock.lock().await;
        if self.has_view(rec.view_name()).await {
            return Ok(false);
        }
        self.rebuild(rec).await?;
        Ok(true)
    }

    fn lease_info(&self, r: &LeaseRecord, closure_paths: usize) -> LeaseInfo {
        LeaseInfo {
            lease: r.lease.clone(),
            env: r.env_name(),
            generation: r.generation,
            pinned: r.pinned,
            view_root: self.view_root(r),
            flox_env: r.activation.flox_env.clone(),
            closure_paths,
            created_at: r.created_at,
        }
    }

    fn lease_infos(&self) -> Vec<LeaseInfo> {
        let leases: Vec<LeaseRecord> = self.leases.lock().values().cloned().collect();
        leases
            .iter()
            .map(|r| {
                let n = self
                    .prep
                    .store()
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
            view_root: self.view_root(r),
            flox_env: r.activation.flox_env.clone(),
            closure: record.closure.iter().map(|p| p.to_absolute()).collect(),
            activation: r.activation.clone(),
        }
    }

    /// The token a request brings, else the node's.
    fn token_for(&self, token: Option<&str>) -> Result<Option<Arc<Token>>, Failure> {
        match token {
            Some(t) => Token::new(t)
                .map(|t| Some(Arc::new(t)))
                .map_err(|e| fail(ErrorKind::BadToken, chain(&e))),
            None => Ok(self.prep.node_token()),
        }
    }

    /// The resolution of live reference `r` for pod `pod`: made now (`create`) or the one
    /// `pod_starting` made; `None` when there is none for the pod.
    fn pod_resolution(&self, pod: &str, r: &EnvRef, create: bool) -> Option<PodResolution> {
        let mut pods = self.pod_resolutions.lock();
        pods.retain(|_, (_, at)| at.elapsed() < POD_RESOLUTION_KEPT);
        let key = (pod.to_string(), r.to_string());
        if create {
            Some(
                pods.entry(key)
                    .or_insert_with(|| (PodResolution::default(), Instant::now()))
                    .0
                    .clone(),
            )
        } else {
            pods.get(&key).map(|(cell, _)| cell.clone())
        }
    }

    /// A pod of `env` is starting: resolves its live generation once for the pod (see the
    /// `pod_starting` op).
    async fn pod_starting(
        self: &Arc<Self>,
        env: &str,
        pod: &str,
        token: Option<&str>,
    ) -> Result<PodResolved, Failure> {
        let r = EnvRef::parse(env).map_err(|e| fail(ErrorKind::BadEnv, chain(&e)))?;
        if let Some(generation) = r.generation {
            return Ok(PodResolved {
                env: r.env_name(),
                generation,
            });
        }
        let token = self.token_for(token)?;
        let cell = self
            .pod_resolution(pod, &r, true)
            .expect("created on demand");
        let resolved = cell
            .get_or_init(|| async {
                match self.prep.resolve(&r, token).await {
                    Ok(resolved) => {
                        info!(pod, env = %r, generation = resolved.generation, "resolved for a starting pod");
                        Some(resolved)
                    }
                    Err(e) => {
                        warn!(pod, env = %r, error = %chain(&e), "resolving for a starting pod; its containers resolve by themselves");
                        None
                    }
                }
            })
            .await;
        match resolved {
            Some(resolved) => Ok(PodResolved {
                env: r.env_name(),
                generation: resolved.generation,
            }),
            None => Err(fail(
                ErrorKind::Resolve,
                format!("environment {r}: not resolved for pod {pod} (see the daemon's log)"),
            )),
        }
    }

    async fn prepare(
        self: &Arc<Self>,
        env: &str,
        lease: &str,
        token: Option<&str>,
        pod: Option<&str>,
    ) -> Result<Prepared, Failure> {
        check_lease_id(lease).map_err(|e| fail(ErrorKind::BadLease, chain(&e)))?;
        let r = EnvRef::parse(env).map_err(|e| fail(ErrorKind::BadEnv, chain(&e)))?;
        let token = self.token_for(token)?;
        let lock = self.lease_lock(lease);
        let _held = lock.lock().await;

        let existing = self.leases.lock().get(lease).cloned();
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
            self.ensure_view(&rec).await?;
            self.touch(&rec.owner, &rec.name, rec.generation).await;
            return Ok(self.prepared_of(&rec, &record));
        }

        let mut publish = DaemonLease {
            daemon: self,
            lease,
            record: None,
        };
        // A live reference of a pod that announced its start takes the pod's resolution
        // (waiting for it if it is under way): one FloxHub round trip per pod, made while the
        // sandbox started.
        let for_pod = match (pod, r.generation) {
            (Some(pod), None) => match self.pod_resolution(pod, &r, false) {
                Some(cell) => cell.get_or_init(|| async { None }).await.clone(),
                None => None,
            },
            _ => None,
        };
        let prepared = match for_pod {
            Some(resolved) => {
                info!(lease, env = %r, generation = resolved.generation, "the pod's resolution");
                self.prep
                    .prepare_resolved(resolved, Root::Lease, &mut publish, lease)
                    .await
            }
            None => {
                self.prep
                    .prepare_environment(&r, token, Root::Lease, &mut publish, lease)
                    .await
            }
        };
        let (prepared, background) = prepared.map_err(|e| {
            self.after_failure(&e);
            prepare_failure(e)
        })?;
        let rec = publish
            .record
            .take()
            .expect("a published lease has its record");
        info!(lease, env = %r, generation = rec.generation,
            paths = prepared.record.closure.len(), "prepared");
        if background.recording {
            self.prep
                .finish_recording_after(prepared.key(), RECORD_WINDOW);
        }
        self.touch(&rec.owner, &rec.name, rec.generation).await;
        self.quota_kick.notify_one();
        Ok(self.prepared_of(&rec, &prepared.record))
    }

    fn env_record(&self, rec: &LeaseRecord) -> Result<EnvironmentRecord, Failure> {
        self.prep
            .store()
            .get_environment(&rec.owner, &rec.name, rec.generation)
            .map_err(|e| {
                fail(
                    ErrorKind::Store,
                    format!("lease {}: {}", rec.lease, chain(&e)),
                )
            })?
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

    /// Serves `built` as view `name` on the FUSE server (replacing a view of that name): by
    /// digest when the server keeps that tree, else the whole tree (kept there under its
    /// digest); a FUSE server older than digests gets the tree alone.
    async fn add_view(&self, name: &str, built: Arc<BuiltView>) -> Result<(), ApiError> {
        let control = self.paths.control.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
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
        })
        .await
        .map_err(|e| ApiError::Io {
            path: self.paths.control.clone(),
            source: std::io::Error::other(e),
        })?
    }

    async fn release(self: &Arc<Self>, lease: &str) -> Result<Released, Failure> {
        check_lease_id(lease).map_err(|e| fail(ErrorKind::BadLease, chain(&e)))?;
        let lock = self.lease_lock(lease);
        let _held = lock.lock().await;
        let rec = self.leases.lock().get(lease).cloned();
        let Some(rec) = rec else {
            return Ok(Released {
                lease: lease.to_string(),
                released: false,
            });
        };
        // The view goes with its last lease.
        let view = rec.view_name().to_string();
        let view_lock = self.view_lock(&view);
        let _view_held = view_lock.lock().await;
        let shared = self
            .leases
            .lock()
            .values()
            .any(|o| o.lease != rec.lease && o.view_name() == view);
        if !shared && !self.config.idle_view.is_zero() {
            // Kept for the next pod of the generation: its dentries, inodes and cached pages
            // are what a warm start reuses. `expire_idle_views` removes it later.
            self.idle_views.lock().insert(
                view.clone(),
                IdleView {
                    since: Instant::now(),
                    generation: (rec.owner.clone(), rec.name.clone(), rec.generation),
                },
            );
            info!(view = %view, "view kept idle after its last lease");
        } else if !shared {
            let control = self.paths.control.clone();
            let name = view.clone();
            blocking("removing the view", move || {
                ControlClient::connect(&control)
                    .and_then(|mut c| c.remove_view(&name))
                    .map_err(|e| {
                        fail(
                            ErrorKind::Fuse,
                            format!("removing view {name}: {}", chain(&e)),
                        )
                    })
            })
            .await?;
        }
        self.lease_dir
            .remove(lease)
            .map_err(|e| fail(ErrorKind::Store, format!("lease {lease}: {}", chain(&e))))?;
        let still_held = {
            let mut leases = self.leases.lock();
            leases.remove(lease);
            leases.values().any(|o| {
                o.owner == rec.owner && o.name == rec.name && o.generation == rec.generation
            })
        };
        self.prep.finish_recording(&rec.env_name(), Some(lease));
        if rec.root_set_by_lease && !still_held {
            self.prep.unroot(&rec.owner, &rec.name, rec.generation);
        }
        info!(lease, env = %rec.env_name(), generation = rec.generation, "released");
        self.quota_kick.notify_one();
        Ok(Released {
            lease: lease.to_string(),
            released: true,
        })
    }

    async fn prefetch(
        self: &Arc<Self>,
        env: &str,
        token: Option<&str>,
    ) -> Result<Prefetched, Failure> {
        let r = EnvRef::parse(env).map_err(|e| fail(ErrorKind::BadEnv, chain(&e)))?;
        let token = self.token_for(token)?;
        let resolved = self
            .prep
            .resolve(&r, token)
            .await
            .map_err(prepare_failure)?;
        let label = format!("{}:{}", resolved.env_ref().env_name(), resolved.generation);
        // Record and root first, so a gc never drops what is being fetched.
        let closure = self
            .prep
            .fetcher()
            .resolve(&resolved.roots)
            .await
            .map_err(|source| {
                prepare_failure(PrepareError::Closure {
                    env: label.clone(),
                    source: Box::new(source),
                })
            })?;
        self.prep
            .record(&resolved, &closure, Root::Keep)
            .await
            .map_err(|e| {
                self.after_failure(&e);
                prepare_failure(e)
            })?;
        self.touch(&resolved.owner, &resolved.name, resolved.generation)
            .await;
        let summary = self
            .prep
            .fetcher()
            .fetch_closure(&resolved.roots, None)
            .await
            .map_err(|e| {
                self.after_failure(&e);
                fail(
                    ErrorKind::Fetch,
                    format!("environment {label}: {}", chain(&e)),
                )
            })?;
        self.quota_kick.notify_one();
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

    async fn gate(&self, store_path: &str) -> Result<(), Failure> {
        let path = StorePath::from_base_name(store_path).map_err(|e| {
            fail(
                ErrorKind::BadRequest,
                format!("invalid store path {store_path:?}: {}", chain(&e)),
            )
        })?;
        self.prep.lazy().gate(&path).await.map_err(|e| {
            let message = chain(&e);
            error!(store_path, error = %message, "store path not verified for its view");
            fail(ErrorKind::Fetch, message)
        })
    }

    async fn ensure(
        self: &Arc<Self>,
        store_path: &str,
        start: u64,
        end: u64,
    ) -> Result<(), Failure> {
        let path = StorePath::from_base_name(store_path).map_err(|e| {
            fail(
                ErrorKind::BadRequest,
                format!("invalid store path {store_path:?}: {}", chain(&e)),
            )
        })?;
        self.metrics
            .ensure_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = Instant::now();
        let reading = Reading::start(self, store_path);
        let r = self
            .prep
            .lazy()
            .ensure(&path, start, end, Cause::Demand)
            .await;
        drop(reading);
        self.metrics.ensure_latency.observe(t.elapsed());
        self.metrics
            .ensure_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        r.map_err(|e| {
            self.after_failure(&e);
            let message = chain(&e);
            error!(store_path, start, end, error = %message, "demand read failed");
            fail(ErrorKind::Fetch, message)
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
                d.prep
                    .store()
                    .stats()
                    .map_err(|e| fail(ErrorKind::Store, format!("store totals: {}", chain(&e))))?,
            );
            let c = d.prep.lazy().counters();
            Ok(Status {
                pid: std::process::id(),
                store_dir: d.config.store_dir.clone(),
                leases: d.lease_infos(),
                store,
                in_flight_fetches: c.in_flight.max(0) as u64,
                demand_bytes: c.bytes_fetched.demand,
                prefetch_bytes: c.bytes_fetched.prefetch,
                fuse_server: d.fuse_info(),
                idle_views: {
                    let mut v: Vec<String> = d.idle_views.lock().keys().cloned().collect();
                    v.sort();
                    v
                },
            })
        })
        .await
    }

    /// Finds or starts the FUSE server and makes its views match the leases.
    fn adopt_fuse_server(&self) -> Result<(), DaemonError> {
        let info = ensure_fuse_server(&self.config, &self.paths, FUSE_SERVER_START)
            .map_err(DaemonError::FuseServer)?;
        self.reconcile(&info);
        Ok(())
    }

    fn reconcile(&self, info: &FuseServerInfo) {
        let leases: Vec<LeaseRecord> = self.leases.lock().values().cloned().collect();
        let handle = tokio::runtime::Handle::current();
        for rec in &leases {
            if info.views.contains(&rec.view_name().to_string()) {
                continue;
            }
            // The API is served while this runs: a `prepare` of the same lease may have rebuilt
            // the view already, or a `release` dropped the lease. Under the lease's lock, look
            // again; `ensure_view` looks for the view again under the view's lock (another
            // lease of a shared view may have rebuilt it), as rebuilding twice would replace a
            // view a reader is already walking.
            let lock = self.lease_lock(&rec.lease);
            let _held = handle.block_on(lock.lock());
            if !self.leases.lock().contains_key(&rec.lease) {
                continue;
            }
            match handle.block_on(self.ensure_view(rec)) {
                Ok(true) => {
                    info!(lease = %rec.lease, view = rec.view_name(), "view rebuilt for a lease")
                }
                Ok(false) => {}
                Err(f) => {
                    error!(lease = %rec.lease, view = rec.view_name(), "cannot rebuild the view of a lease: {}", f.message)
                }
            }
        }
        for v in &info.views {
            if !leases.iter().any(|r| r.view_name() == v) {
                // A `prepare` adds its view before it records the lease, both under the view's
                // lock: under it, look again.
                let lock = self.view_lock(v);
                let _held = handle.block_on(lock.lock());
                if self.leases.lock().values().any(|r| r.view_name() == v)
                    || self.idle_views.lock().contains_key(v)
                {
                    continue;
                }
                info!(view = %v, "removing a view without a lease");
                if let Err(e) =
                    ControlClient::connect(&self.paths.control).and_then(|mut c| c.remove_view(v))
                {
                    warn!(view = %v, error = %chain(&e), "removing a view without a lease");
                }
            }
        }
    }

    /// Rebuilds a lease's view from the store's record of its environment.
    async fn rebuild(&self, rec: &LeaseRecord) -> Result<(), Failure> {
        let record = self.env_record(rec)?;
        // The view needs the lockfile's installed paths and priorities, which the record holds.
        let resolved = ResolvedEnvironment::from_record(&record, rec.pinned)
            .map_err(|e| fail(ErrorKind::Store, format!("recorded {}", chain(&e))))?;
        let closure = self
            .prep
            .fetcher()
            .resolve(&record.roots)
            .await
            .map_err(|e| {
                fail(
                    ErrorKind::Closure,
                    format!("lease {}: computing the closure: {}", rec.lease, chain(&e)),
                )
            })?;
        let built = self
            .prep
            .view_of(&resolved, &closure, StartedEntries::new())
            .await
            .map_err(prepare_failure)?;
        self.add_view(rec.view_name(), built).await.map_err(|e| {
            fail(
                ErrorKind::Fuse,
                format!(
                    "adding view {} of lease {}: {}",
                    rec.view_name(),
                    rec.lease,
                    chain(&e)
                ),
            )
        })
    }

    /// Removes idle views once they have been idle for `idle_view_secs`, and the oldest beyond
    /// [`IDLE_VIEWS_MAX`], checking every few seconds.
    async fn expire_idle_views(self: Arc<Self>) {
        if self.config.idle_view.is_zero() {
            return;
        }
        let every =
            (self.config.idle_view / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            tokio::time::sleep(every).await;
            let mut idle: Vec<(String, Instant)> = self
                .idle_views
                .lock()
                .iter()
                .map(|(v, i)| (v.clone(), i.since))
                .collect();
            idle.sort_by_key(|(_, t)| *t);
            let over = idle.len().saturating_sub(IDLE_VIEWS_MAX);
            for (i, (view, since)) in idle.into_iter().enumerate() {
                if i >= over && since.elapsed() < self.config.idle_view {
                    continue;
                }
                let lock = self.view_lock(&view);
                let _held = lock.lock().await;
                // A lease may have taken it meanwhile: then it is no longer idle.
                if self.idle_views.lock().get(&view).map(|i| i.since) != Some(since) {
                    continue;
                }
                match self.remove_idle_view(&view).await {
                    Ok(()) => info!(view = %view, "idle view removed"),
                    Err(e) => {
                        warn!(view = %view, error = %chain(&e), "removing an idle view; retried later")
                    }
                }
            }
        }
    }

    /// Removes idle view `view` through the FUSE server's control socket (a blocking call, run
    /// off the runtime) and, once it is gone, forgets it as idle. The caller holds the view's
    /// lock and has checked that it is still idle.
    async fn remove_idle_view(&self, view: &str) -> Result<(), RemoveViewError> {
        let control = self.paths.control.clone();
        let name = view.to_owned();
        tokio::task::spawn_blocking(move || {
            ControlClient::connect(&control).and_then(|mut c| c.remove_view(&name))
        })
        .await??;
        self.idle_views.lock().remove(view);
        Ok(())
    }

    /// Background prefetch of every leased closure again (after a restart).
    fn restart_prefetch(self: Arc<Self>) {
        if self.config.prefetch != Prefetch::Closure {
            return;
        }
        let leases: Vec<LeaseRecord> = self.leases.lock().values().cloned().collect();
        tokio::spawn(async move {
            for rec in leases {
                let Ok(record) = self.env_record(&rec) else {
                    continue;
                };
                match self.prep.fetcher().resolve(&record.roots).await {
                    Ok(closure) => {
                        self.prep.prefetch_closure(closure);
                    }
                    Err(e) => {
                        warn!(lease = %rec.lease, error = %chain(&e), "no prefetch after restart")
                    }
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
                Ok(Err(e)) => error!(error = %chain(&e), "restarting the FUSE server"),
                Err(e) => error!(error = %chain(&e), "restarting the FUSE server"),
            }
        }
    }

    fn render_metrics(&self) -> String {
        let mut out = Exposition::default();
        self.metrics.encode(&mut out);
        let c = self.prep.lazy().counters();
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
            "Store paths whose fetched bytes failed verification, or whose listing lied.",
        );
        out.sample("kof_paths_refused_total", &[], c.paths_refused as f64);
        out.header(
            "kof_indexes_refused_total",
            "counter",
            "Signed indexes refused (bad or untrusted signature, another NAR, malformed): their paths were read whole.",
        );
        out.sample("kof_indexes_refused_total", &[], c.indexes_refused as f64);
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
            &c.fetch_latency,
        );
        let leases = self.leases.lock().len();
        out.header("kof_leases", "gauge", "Leases (prepared views).");
        out.sample("kof_leases", &[], leases as f64);
        if let Ok(s) = self.prep.store().stats() {
            out.header("kof_store_paths", "gauge", "Store paths in the store.");
            out.sample("kof_store_paths", &[], s.store_paths as f64);
        }
        if let Ok(bytes) = self.store_bytes() {
            out.header(
                "kof_store_bytes",
                "gauge",
                "Bytes the store uses on disk (objects, metadata, derived data): what store_max_bytes limits.",
            );
            out.sample("kof_store_bytes", &[], bytes as f64);
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
                out.histogram_samples("kof_fuse_op_seconds", &[("op", op)], s);
            }
        }
        out.finish()
    }
}

/// A demand read in flight: its store path is live for gc until it is dropped.
struct Reading<'a> {
    daemon: &'a Daemon,
    path: String,
}

impl<'a> Reading<'a> {
    fn start(daemon: &'a Daemon, path: &str) -> Reading<'a> {
        *daemon.reading.lock().entry(path.to_string()).or_default() += 1;
        Reading {
            daemon,
            path: path.to_string(),
        }
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        let mut reading = self.daemon.reading.lock();
        if let Some(n) = reading.get_mut(&self.path) {
            *n -= 1;
            if *n == 0 {
                reading.remove(&self.path);
            }
        }
    }
}

/// The daemon's lease step of the prepare pipeline: the lease record is written (durably)
/// before its view appears on the FUSE server, so a crash in between leaves a lease whose view
/// the next daemon builds, never a view nobody knows.
struct DaemonLease<'a> {
    daemon: &'a Daemon,
    lease: &'a str,
    /// The record written, once published.
    record: Option<LeaseRecord>,
}

impl Lease for DaemonLease<'_> {
    async fn publish(&mut self, p: &PreparedEnvironment) -> Result<(), PrepareError> {
        let d = self.daemon;
        let lease_error =
            |what: String, source: Box<dyn std::error::Error + Send + Sync>| PrepareError::Lease {
                env: p.label(),
                what,
                source,
            };
        let rec = LeaseRecord {
            lease: self.lease.to_string(),
            owner: p.resolved.owner.clone(),
            name: p.resolved.name.clone(),
            generation: p.resolved.generation,
            pinned: p.resolved.pinned,
            activation: p.activation.clone(),
            root_set_by_lease: p.root_set,
            created_at: now_secs(),
            view: Some(view_name(&p.built.tree)),
        };
        let view = rec.view_name().to_string();
        // Under the view's lock: whether another lease already shows this tree, adding the view
        // if not, and recording this lease as one of its users are one step.
        let view_lock = d.view_lock(&view);
        let _view_held = view_lock.lock().await;
        let dir = d.lease_dir.clone();
        let rec2 = rec.clone();
        tokio::task::spawn_blocking(move || dir.put(&rec2))
            .await
            .map_err(|e| lease_error(format!("lease {}", self.lease), Box::new(e)))?
            .map_err(|e| lease_error(format!("lease {}", self.lease), Box::new(e)))?;
        // A view other leases use stays as it is: its dentries and inodes, which the kernel
        // caches, are what a warm start reuses.
        let shared = d.leases.lock().values().any(|o| o.view_name() == view);
        let idle = d.idle_views.lock().remove(&view).is_some();
        // An idle view is on the FUSE server unless that server was replaced since.
        let reused = shared || (idle && d.has_view(&view).await);
        if reused && !shared {
            info!(view = %view, lease = self.lease, "idle view reused");
        }
        if !reused {
            if let Err(e) = d.add_view(&view, p.built.clone()).await {
                let _ = d.lease_dir.remove(self.lease);
                return Err(lease_error(format!("adding view {view}"), Box::new(e)));
            }
        }
        d.leases.lock().insert(self.lease.to_string(), rec.clone());
        self.record = Some(rec);
        Ok(())
    }
}
