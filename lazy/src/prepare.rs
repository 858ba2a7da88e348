//! The one prepare pipeline: from an environment reference to a view a process can run in.
//!
//! [`Preparer::prepare_environment`] is what `kof-fetcherd`'s `prepare` and `kof-store run`
//! without the daemon both do, in this order:
//!
//! 1. **resolve** the reference on FloxHub (the live generation, or the pin; a pin the store
//!    recorded is answered from the record);
//! 2. **closure** from metadata only: narinfos of paths not stored (signature-checked), the
//!    stored references of the others; each path's listing is asked for the moment its narinfo
//!    is accepted, while the walk goes on;
//! 3. **record** the generation in the store (and, when the caller keeps a gc root for its
//!    lease, pin it as a root);
//! 4. **view**: every member's tree (stored, else its listing) and the environment's root file
//!    system; a view built from the same lockfile and the same all-stored closure is kept and
//!    shared by the next lease of that generation;
//! 5. **lease**: the caller's step ([`Lease::publish`]) makes the view visible (the daemon
//!    writes its lease record and hands the view to its FUSE server; `kof-store run` mounts it
//!    in process). When it fails, the root set in step 3 is taken back;
//! 6. **hooks**: the learned profile (a saved one is fetched first, in parallel; without one,
//!    this start's demand reads are recorded) and the background prefetch of the closure (config
//!    `prefetch`), both below demand reads.
//!
//! What the pipeline never does: keep leases, mount, or decide how long a recording lasts; the
//! callers own those ([`Preparer::finish_recording`] ends a recording).

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kof_floxhub::client::{read_token_file, FloxHubClient, FloxHubError, Token, TokenError};
use kof_floxhub::resolve::{ResolveError, ResolvedEnvironment, Resolver};
use kof_nar::StorePath;
use kof_node_api::api::{Activation, Resolved};
use kof_node_api::config::{Config, Prefetch};
use kof_node_api::envref::EnvRef;
use kof_store::{EnvironmentRecord, Store, StoreError};
use kof_substituter::closure::{Closure, ClosureEntry, ClosureError};
use kof_substituter::fetcher::{Fetcher, SetupError};
use parking_lot::Mutex;
use thiserror::Error;
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{info, warn};

use crate::view::{build_view, tree_digest, View, ViewError, ViewInput};
use crate::{LazyError, LazyOptions, LazyStore, Profile, StartedEntries};

/// Views of environment generations kept for their next lease.
const BUILT_VIEWS: usize = 16;

/// Why an environment could not be prepared. Each variant names the environment; the cause is
/// its source.
#[derive(Debug, Error)]
pub enum PrepareError {
    /// The FloxHub client could not be set up.
    #[error("FloxHub at {url}")]
    FloxHub {
        /// `floxhub_url`.
        url: String,
        /// The cause.
        #[source]
        source: FloxHubError,
    },
    /// The FloxHub token file is unusable.
    #[error("FloxHub token file {}", file.display())]
    TokenFile {
        /// `floxhub_token_file`.
        file: PathBuf,
        /// The cause.
        #[source]
        source: TokenError,
    },
    /// The fetcher could not be set up.
    #[error("setting up the fetcher")]
    Fetcher(#[source] SetupError),
    /// The reference did not resolve on FloxHub (or from the store's record of a pin).
    #[error("environment {env}")]
    Resolve {
        /// The reference as asked.
        env: String,
        /// The cause.
        #[source]
        source: Box<ResolveError>,
    },
    /// The closure could not be computed.
    #[error("environment {env}: computing the closure")]
    Closure {
        /// `owner/name:generation`.
        env: String,
        /// The cause.
        #[source]
        source: Box<ClosureError>,
    },
    /// The store could not record the generation (or its gc root).
    #[error("environment {env}: recording it")]
    Record {
        /// `owner/name:generation`.
        env: String,
        /// The cause.
        #[source]
        source: Box<StoreError>,
    },
    /// A closure member could not be described (its stored tree, or its listing).
    #[error("environment {env}: describing the closure")]
    Describe {
        /// `owner/name:generation`.
        env: String,
        /// The cause.
        #[source]
        source: Box<LazyError>,
    },
    /// The view could not be built from the closure.
    #[error("environment {env}: building the view")]
    View {
        /// `owner/name:generation`.
        env: String,
        /// The cause.
        #[source]
        source: Box<ViewError>,
    },
    /// The caller's lease step failed.
    #[error("environment {env}: {what}")]
    Lease {
        /// `owner/name:generation`.
        env: String,
        /// What the step was doing.
        what: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A task of the pipeline stopped without a result.
    #[error("environment {env}: {what} stopped")]
    Task {
        /// The reference.
        env: String,
        /// The task.
        what: &'static str,
        /// The cause.
        #[source]
        source: tokio::task::JoinError,
    },
}

/// How a recorded generation is kept from gc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    /// A pinned gc root for the caller's lease (the daemon's leases); the prepare says whether
    /// it set the root, so the lease's end takes back only a root it made.
    Lease,
    /// The environment is kept (a prefetch): the generation becomes its root, pinned when the
    /// reference pinned it, else replacing the environment's previous live generation.
    Keep,
    /// Only recorded (`kof-store run`, which holds the store open, so no gc runs meanwhile).
    None,
}

/// A view of an environment generation, as built once and shared by its leases.
#[derive(Debug)]
pub struct BuiltView {
    /// The lockfile it was built from.
    lockfile: String,
    /// The closure it was built from.
    closure: Vec<StorePath>,
    /// The view.
    pub view: View,
    /// [`tree_digest`] of the view's root: names the tree, so a FUSE server that keeps decoded
    /// trees serves it again without receiving it again.
    pub tree: String,
}

/// An environment prepared: resolved, its closure described, recorded, its view built.
#[derive(Debug)]
pub struct PreparedEnvironment {
    /// The resolution.
    pub resolved: ResolvedEnvironment,
    /// The closure (metadata only; members not stored are fetched as they are read).
    pub closure: Closure,
    /// What the store recorded of the generation.
    pub record: EnvironmentRecord,
    /// The view.
    pub built: Arc<BuiltView>,
    /// What activating a command in the view needs.
    pub activation: Activation,
    /// Whether this prepare made the generation a gc root (it was not one before), so that
    /// the caller takes the root back when its lease ends.
    pub root_set: bool,
}

impl PreparedEnvironment {
    /// `owner/name:generation`.
    pub fn label(&self) -> String {
        format!(
            "{}:{}",
            self.resolved.env_ref().env_name(),
            self.resolved.generation
        )
    }

    /// `owner/name`: the key of the environment's learned profile.
    pub fn key(&self) -> String {
        self.resolved.env_ref().env_name()
    }
}

/// The caller's lease step: makes a prepared view visible to whoever will run in it.
pub trait Lease {
    /// Publishes `prepared` (writes the lease, serves the view). A failure fails the prepare,
    /// which then takes back the gc root it set.
    fn publish(
        &mut self,
        prepared: &PreparedEnvironment,
    ) -> impl Future<Output = Result<(), PrepareError>> + Send;
}

/// The background work a prepare started: the learned profile's fetch and the closure's
/// prefetch. Dropping it leaves them running; [`Background::abort`] stops them (bytes they
/// completed stay: completed paths are in the store, partial ones in partial NARs).
#[derive(Debug, Default)]
pub struct Background {
    tasks: Vec<AbortHandle>,
    /// Whether this prepare started recording the environment's first start.
    pub recording: bool,
}

impl Background {
    /// Stops the background fetches.
    pub fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Generation (`owner`, `name`, `generation`) → its built view and when it was last used.
type BuiltViews = HashMap<(String, String, u64), (Arc<BuiltView>, u64)>;

/// The prepare pipeline of one node process: the store, the resolver, the fetcher and the lazy
/// engine, the views kept for the next lease of their generation, and the recordings under way.
pub struct Preparer {
    store: Arc<Store>,
    resolver: Arc<Resolver>,
    fetcher: Arc<Fetcher>,
    lazy: Arc<LazyStore>,
    /// The node's FloxHub token (config `floxhub_token_file`), used when a request brings none.
    token: Option<Arc<Token>>,
    store_dir: PathBuf,
    prefetch: Prefetch,
    /// Views built for the latest generations prepared (at most [`BUILT_VIEWS`]), and a use
    /// counter.
    built: Mutex<(BuiltViews, u64)>,
    /// Recordings under way: environment key (`owner/name`) → the lease recording it.
    recordings: Mutex<HashMap<String, String>>,
}

impl Preparer {
    /// The pipeline for `config` over `store`: its FloxHub client and token, a fetcher and a lazy
    /// engine. Must be called within a tokio runtime (the engine spawns its tasks there).
    pub fn from_config(config: &Config, store: Arc<Store>) -> Result<Preparer, PrepareError> {
        let floxhub = FloxHubClient::new(&config.floxhub_url, config.store_dir.join("floxmeta"))
            .map_err(|source| PrepareError::FloxHub {
                url: config.floxhub_url.clone(),
                source,
            })?;
        let token = config
            .floxhub_token_file
            .as_deref()
            .map(|p| {
                read_token_file(p)
                    .map(Arc::new)
                    .map_err(|source| PrepareError::TokenFile {
                        file: p.to_path_buf(),
                        source,
                    })
            })
            .transpose()?;
        let fetcher =
            Arc::new(Fetcher::from_config(config, store.clone()).map_err(PrepareError::Fetcher)?);
        let lazy = LazyStore::new(
            fetcher.clone(),
            store.clone(),
            LazyOptions::from_config(config),
        );
        let resolver = Resolver::new(floxhub, config.system.clone()).with_store(store.clone());
        Ok(Preparer {
            store,
            resolver: Arc::new(resolver),
            fetcher,
            lazy,
            token,
            store_dir: config.store_dir.clone(),
            prefetch: config.prefetch,
            built: Mutex::new((HashMap::new(), 0)),
            recordings: Mutex::new(HashMap::new()),
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The fetcher.
    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    /// The lazy engine.
    pub fn lazy(&self) -> &Arc<LazyStore> {
        &self.lazy
    }

    /// The node's FloxHub token, if configured.
    pub fn node_token(&self) -> Option<Arc<Token>> {
        self.token.clone()
    }

    /// Resolves `r` (blocking work, on the blocking pool): `token`, else the node's.
    pub async fn resolve(
        &self,
        r: &EnvRef,
        token: Option<Arc<Token>>,
    ) -> Result<ResolvedEnvironment, PrepareError> {
        let resolver = self.resolver.clone();
        let token = token.or_else(|| self.token.clone());
        let r2 = r.clone();
        tokio::task::spawn_blocking(move || resolver.resolve(&r2, token.as_deref()))
            .await
            .map_err(|source| PrepareError::Task {
                env: r.to_string(),
                what: "resolving",
                source,
            })?
            .map_err(|source| PrepareError::Resolve {
                env: r.to_string(),
                source: Box::new(source),
            })
    }

    /// Records `resolved` with `closure` in the store and keeps the generation from gc as
    /// `root` says. Returns the record and whether a [`Root::Lease`] root was set by this call
    /// (it was not one before).
    pub async fn record(
        &self,
        resolved: &ResolvedEnvironment,
        closure: &Closure,
        root: Root,
    ) -> Result<(EnvironmentRecord, bool), PrepareError> {
        let record = resolved.to_record(closure.paths());
        let store = self.store.clone();
        let rec = record.clone();
        let (owner, name, generation) = (
            resolved.owner.clone(),
            resolved.name.clone(),
            resolved.generation,
        );
        let pinned = resolved.pinned;
        let label = format!("{owner}/{name}:{generation}");
        let root_set = tokio::task::spawn_blocking(move || {
            store.put_environment(&rec)?;
            match root {
                Root::None => Ok(false),
                Root::Keep => store
                    .set_root(&owner, &name, generation, pinned)
                    .map(|()| false),
                Root::Lease => {
                    let pinned_before = store.roots()?.iter().any(|k| {
                        k.owner == owner && k.name == name && k.generation == generation && k.pinned
                    });
                    store.set_root(&owner, &name, generation, true)?;
                    Ok(!pinned_before)
                }
            }
        })
        .await
        .map_err(|source| PrepareError::Task {
            env: label.clone(),
            what: "recording",
            source,
        })?
        .map_err(|source| PrepareError::Record {
            env: label,
            source: Box::new(source),
        })?;
        Ok((record, root_set))
    }

    /// Resolves `r`, computes its closure from metadata (no NAR is fetched) and records the
    /// generation (kept by nothing): what `kof-store resolve` shows, through the daemon or alone.
    pub async fn describe(
        &self,
        r: &EnvRef,
        token: Option<Arc<Token>>,
    ) -> Result<Resolved, PrepareError> {
        let env = self.resolve(r, token).await?;
        let label = format!("{}:{}", env.env_ref().env_name(), env.generation);
        let closure =
            self.fetcher
                .resolve(&env.roots)
                .await
                .map_err(|source| PrepareError::Closure {
                    env: label,
                    source: Box::new(source),
                })?;
        self.record(&env, &closure, Root::None).await?;
        Ok(Resolved {
            owner: env.owner.clone(),
            name: env.name.clone(),
            generation: env.generation,
            pinned: env.pinned,
            live_generation: env.live,
            newest_generation: env.newest,
            system: env.system.clone(),
            roots: env.roots.iter().map(|p| p.to_absolute()).collect(),
            closure: closure.paths().iter().map(|p| p.to_absolute()).collect(),
            closure_nar_size: closure.entries.iter().map(|e| e.nar_size()).sum(),
            vars: env.vars,
            hook: env.hook,
            history: env.history,
            floxmeta_commit: env.commit,
        })
    }

    /// Takes back the gc root a prepare set (`root_set`), as a lease ends.
    pub fn unroot(&self, owner: &str, name: &str, generation: u64) {
        if let Err(e) = self.store.remove_root(owner, name, generation) {
            warn!(env = %format!("{owner}/{name}:{generation}"),
                error = %kof_node_api::report::chain(&e), "removing a gc root");
        }
    }

    /// Resolves `r`, describes its closure, records it, builds (or reuses) its view, and has
    /// `lease` publish it; then starts the learned profile and the prefetch (see the module
    /// docs). The background work's handles come back with the prepared environment.
    pub async fn prepare_environment(
        &self,
        r: &EnvRef,
        token: Option<Arc<Token>>,
        root: Root,
        lease: &mut impl Lease,
        lease_id: &str,
    ) -> Result<(PreparedEnvironment, Background), PrepareError> {
        let resolved = self.resolve(r, token).await?;
        self.prepare_resolved(resolved, root, lease, lease_id).await
    }

    /// [`Preparer::prepare_environment`] from step 2, for an environment resolved already (the
    /// daemon's resolution for a pod, made while the pod's sandbox started).
    pub async fn prepare_resolved(
        &self,
        resolved: ResolvedEnvironment,
        root: Root,
        lease: &mut impl Lease,
        lease_id: &str,
    ) -> Result<(PreparedEnvironment, Background), PrepareError> {
        let label = format!("{}:{}", resolved.env_ref().env_name(), resolved.generation);
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
            .map_err(|source| PrepareError::Closure {
                env: label.clone(),
                source: Box::new(source),
            })?;
        let (record, root_set) = self.record(&resolved, &closure, root).await?;
        let built = match self.view_of(&resolved, &closure, listings).await {
            Ok(b) => b,
            Err(e) => {
                if root_set {
                    self.unroot(&resolved.owner, &resolved.name, resolved.generation);
                }
                return Err(e);
            }
        };
        let activation = built.view.activation(&resolved);
        let prepared = PreparedEnvironment {
            resolved,
            closure,
            record,
            built,
            activation,
            root_set,
        };
        if let Err(e) = lease.publish(&prepared).await {
            if root_set {
                let r = &prepared.resolved;
                self.unroot(&r.owner, &r.name, r.generation);
            }
            return Err(e);
        }
        let background = self.start_background(&prepared, lease_id);
        Ok((prepared, background))
    }

    /// The view of an environment generation: the one built for an earlier lease when it was
    /// built from the same lockfile and the same closure, every member stored (a stored path's
    /// tree never changes; a path still to fetch is described afresh, its listing registered
    /// with the engine); else built now (and kept when every member is stored).
    pub async fn view_of(
        &self,
        resolved: &ResolvedEnvironment,
        closure: &Closure,
        listings: StartedEntries,
    ) -> Result<Arc<BuiltView>, PrepareError> {
        let label = format!("{}:{}", resolved.env_ref().env_name(), resolved.generation);
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
            let mut built = self.built.lock();
            let (views, clock) = &mut *built;
            *clock += 1;
            if let Some((b, used)) = views.get_mut(&key) {
                if b.lockfile == resolved.lockfile_text && b.closure == paths {
                    *used = *clock;
                    return Ok(b.clone());
                }
            }
        }
        let entries = self
            .lazy
            .entries(closure, listings)
            .await
            .map_err(|source| PrepareError::Describe {
                env: label.clone(),
                source: Box::new(source),
            })?;
        let input = ViewInput::new(resolved, entries);
        let view = build_view(&input).map_err(|source| PrepareError::View {
            env: label.clone(),
            source: Box::new(source),
        })?;
        let root = view.root.clone();
        let tree = tokio::task::spawn_blocking(move || tree_digest(&root))
            .await
            .map_err(|source| PrepareError::Task {
                env: label,
                what: "naming the view's tree",
                source,
            })?;
        let b = Arc::new(BuiltView {
            lockfile: resolved.lockfile_text.clone(),
            closure: paths,
            view,
            tree,
        });
        if all_stored {
            let mut built = self.built.lock();
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

    /// The hooks after a lease is published: the learned profile of the environment (a saved
    /// one, learned here or imported, is fetched now, in parallel, ahead of the closure
    /// prefetch; without one, the demand reads of this first start are recorded for `lease`
    /// until [`Preparer::finish_recording`]) and, with config `prefetch = "closure"`, the rest
    /// of the closure in the background, below demand reads.
    pub fn start_background(&self, prepared: &PreparedEnvironment, lease: &str) -> Background {
        let mut bg = Background::default();
        let key = prepared.key();
        match Profile::load(&self.store_dir, &key) {
            Ok(Some(profile)) => {
                let n = profile.ranges.len();
                let task = self.lazy.prefetch_profile(profile);
                bg.tasks.push(task.abort_handle());
                log_when_done(task, move |r| match r {
                    Ok(failures) if failures.is_empty() => {
                        info!(env = %key, ranges = n, "learned profile fetched")
                    }
                    Ok(failures) => {
                        warn!(env = %key, ranges = n, first_failure = %failures[0],
                            "learned profile fetched in part")
                    }
                    Err(e) => {
                        warn!(env = %key, error = %kof_node_api::report::chain(&e), "learned profile task failed")
                    }
                });
            }
            Ok(None) => {
                let mut recs = self.recordings.lock();
                if !recs.contains_key(&key) {
                    recs.insert(key.clone(), lease.to_string());
                    self.lazy
                        .start_recording_only(&key, Some(prepared.closure.paths()));
                    info!(env = %key, lease, "recording the first start's reads");
                    bg.recording = true;
                }
            }
            Err(e) => warn!(env = %key, error = %kof_node_api::report::chain(&e),
                "learned profile unusable; ignored"),
        }
        if self.prefetch == Prefetch::Closure {
            bg.tasks
                .push(self.prefetch_closure(prepared.closure.clone()));
        }
        bg
    }

    /// Fetches the rest of a closure in the background, below demand reads.
    pub fn prefetch_closure(&self, closure: Closure) -> AbortHandle {
        let n = closure.entries.len();
        let task = self.lazy.prefetch(closure);
        let abort = task.abort_handle();
        log_when_done(task, move |r| match r {
            Ok(report) if report.failures.is_empty() => {
                info!(
                    paths = n,
                    fetched = report.stored,
                    "background prefetch done"
                )
            }
            Ok(report) => warn!(paths = n, fetched = report.stored,
                first_failure = %report.failures[0], "background prefetch incomplete"),
            Err(e) => {
                warn!(paths = n, error = %kof_node_api::report::chain(&e), "background prefetch task failed")
            }
        });
        abort
    }

    /// Ends the recording of environment `key` (only if `lease` started it, when given) and
    /// saves what it saw as the environment's learned profile.
    pub fn finish_recording(&self, key: &str, lease: Option<&str>) {
        {
            let mut recs = self.recordings.lock();
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
        match profile.save(&self.store_dir) {
            Ok(path) => {
                info!(env = %key, ranges = profile.ranges.len(), file = %path.display(),
                    "learned profile saved")
            }
            Err(e) => warn!(env = %key, error = %kof_node_api::report::chain(&e),
                "saving the learned profile"),
        }
    }

    /// Ends a recording after `window` unless its lease ended it first.
    pub fn finish_recording_after(self: &Arc<Self>, key: String, window: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            me.finish_recording(&key, None);
        });
    }
}

/// Spawns a task that awaits `task` and hands its result to `log`.
fn log_when_done<T: Send + 'static>(
    task: JoinHandle<T>,
    log: impl FnOnce(Result<T, tokio::task::JoinError>) + Send + 'static,
) {
    tokio::spawn(async move { log(task.await) });
}
