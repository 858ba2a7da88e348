//! Resolution of an environment reference to what the node must fetch: FloxHub branch →
//! `metadata.json` → the live (or pinned) generation → its `manifest.lock` → the store paths
//! to install for the node's system.
//!
//! Everything read is validated (`metadata.json` by the generations parser, [`crate::lockfile`]) before a
//! [`ResolvedEnvironment`] exists; a resolution either succeeds whole or fails with an error
//! naming the environment and the cause.
//!
//! A pinned generation is immutable: once the node's store has recorded it (the record is
//! written only after a whole, validated resolution), a resolver given the store
//! ([`Resolver::with_store`]) answers that reference from the record without asking FloxHub.
//! The live generation (no pin) is always asked of FloxHub: it moves.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use kof_nar::StorePath;
use kof_store::{EnvironmentRecord, Store};
use parking_lot::Mutex;
use thiserror::Error;

use crate::client::{FloxHubClient, FloxHubError, Token};
use crate::generations::{Generations, GenerationsError};
use crate::lockfile::{Lockfile, LockfileError};
use kof_node_api::envref::EnvRef;

/// Why an environment could not be resolved.
#[derive(Debug, Error)]
pub enum ResolveError {
    /// FloxHub could not be read (not found, auth, network, timeout, bad data).
    #[error(transparent)]
    FloxHub(#[from] FloxHubError),
    /// `metadata.json` was refused.
    #[error("environment {env}")]
    Metadata {
        /// `owner/name`.
        env: String,
        /// Why.
        #[source]
        source: GenerationsError,
    },
    /// The pinned generation does not exist.
    #[error("environment {env}: generation {generation} does not exist (known generations: {known:?}, live {live})")]
    NoSuchGeneration {
        /// `owner/name`.
        env: String,
        /// The pinned generation.
        generation: u64,
        /// The generations that exist.
        known: Vec<u64>,
        /// The live one.
        live: u64,
    },
    /// The generation has no `manifest.lock`.
    #[error("environment {env}: generation {generation} has no manifest.lock")]
    LockfileMissing {
        /// `owner/name`.
        env: String,
        /// The generation.
        generation: u64,
    },
    /// The generation's `manifest.lock` was refused.
    #[error("environment {env}: generation {generation}")]
    Lockfile {
        /// `owner/name`.
        env: String,
        /// The generation.
        generation: u64,
        /// Why (boxed: it is large and rare).
        #[source]
        source: Box<LockfileError>,
    },
    /// Nothing is installed for the node's system.
    #[error("environment {env}: generation {generation} has no packages for {system} (it has packages for: {available:?})")]
    NoPackagesForSystem {
        /// `owner/name`.
        env: String,
        /// The generation.
        generation: u64,
        /// The node's system.
        system: String,
        /// The systems the lockfile has packages for.
        available: Vec<String>,
    },
}

/// An environment generation, resolved for one system.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedEnvironment {
    /// FloxHub owner.
    pub owner: String,
    /// Environment name.
    pub name: String,
    /// The generation resolved (the pinned one, or the live one).
    pub generation: u64,
    /// Whether the reference pinned the generation.
    pub pinned: bool,
    /// The node's system.
    pub system: String,
    /// The floxmeta commit read; empty when the generation was resolved from the store's
    /// record ([`ResolvedEnvironment::from_record`]), FloxHub not asked.
    pub commit: String,
    /// The generation's `manifest.lock`, verbatim.
    pub lockfile_text: String,
    /// The same, parsed.
    pub lockfile: Lockfile,
    /// `[vars]`.
    pub vars: BTreeMap<String, String>,
    /// The `on-activate` hook.
    pub hook: Option<String>,
    /// The raw history entries of `metadata.json`: the audit trail.
    pub history: serde_json::Value,
    /// The store paths installed for `system`, sorted.
    pub roots: Vec<StorePath>,
    /// The live generation at resolution time (the generation itself when resolved from the
    /// store's record: FloxHub was not asked).
    pub live: u64,
    /// The newest generation at resolution time (likewise).
    pub newest: u64,
}

impl ResolvedEnvironment {
    /// The generation the store recorded, as resolved then (its lockfile validated again);
    /// `commit` is empty and `live`/`newest` are the generation itself.
    pub fn from_record(record: &EnvironmentRecord, pinned: bool) -> Result<Self, ResolveError> {
        let lockfile =
            Lockfile::parse(&record.lockfile).map_err(|source| ResolveError::Lockfile {
                env: format!("{}/{}", record.owner, record.name),
                generation: record.generation,
                source: Box::new(source),
            })?;
        Ok(ResolvedEnvironment {
            owner: record.owner.clone(),
            name: record.name.clone(),
            generation: record.generation,
            pinned,
            system: record.system.clone(),
            commit: String::new(),
            lockfile_text: record.lockfile.clone(),
            lockfile,
            vars: record.vars.clone(),
            hook: record.hook.clone(),
            history: record.history.clone(),
            roots: record.roots.clone(),
            live: record.generation,
            newest: record.generation,
        })
    }

    /// `owner/name:generation`.
    pub fn env_ref(&self) -> EnvRef {
        EnvRef {
            owner: self.owner.clone(),
            name: self.name.clone(),
            generation: Some(self.generation),
        }
    }

    /// The store's record of this environment, with its whole `closure`, stamped now.
    pub fn to_record(&self, closure: Vec<StorePath>) -> EnvironmentRecord {
        let mut closure = closure;
        closure.sort();
        closure.dedup();
        let resolved_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        EnvironmentRecord {
            owner: self.owner.clone(),
            name: self.name.clone(),
            generation: self.generation,
            system: self.system.clone(),
            lockfile: self.lockfile_text.clone(),
            vars: self.vars.clone(),
            hook: self.hook.clone(),
            history: self.history.clone(),
            roots: self.roots.clone(),
            closure,
            resolved_at,
        }
    }
}

/// Resolves environment references for one node system.
#[derive(Clone)]
pub struct Resolver {
    /// Where environments are read from.
    pub floxhub: FloxHubClient,
    /// The node's Nix system (`x86_64-linux`).
    pub system: String,
    /// The node's store: its recorded generations answer pinned references locally.
    pub store: Option<Arc<Store>>,
    /// Resolutions by (owner, name, requested generation, branch commit): what a commit holds
    /// never changes, so a resolve whose fetch finds the same tip reads nothing again.
    by_commit: Arc<Mutex<HashMap<ResolutionKey, ResolvedEnvironment>>>,
}

type ResolutionKey = (String, String, Option<u64>, String);

/// Resolutions kept by [`Resolver`] (each a parsed lockfile; a node has few environments).
const RESOLUTIONS_KEPT: usize = 256;

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("floxhub", &self.floxhub)
            .field("system", &self.system)
            .field("store", &self.store.as_ref().map(|s| s.dir().to_path_buf()))
            .finish()
    }
}

impl Resolver {
    /// A resolver for `system` that always asks FloxHub.
    pub fn new(floxhub: FloxHubClient, system: impl Into<String>) -> Self {
        Resolver {
            floxhub,
            system: system.into(),
            store: None,
            by_commit: Arc::default(),
        }
    }

    /// The same, answering a pinned generation the store has recorded from that record.
    pub fn with_store(mut self, store: Arc<Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// A pinned generation the store recorded for this system, if any. A record that cannot
    /// be read or whose lockfile no longer parses is ignored (FloxHub is asked instead).
    fn recorded(&self, r: &EnvRef) -> Option<ResolvedEnvironment> {
        let (store, generation) = (self.store.as_ref()?, r.generation?);
        let record = match store.get_environment(&r.owner, &r.name, generation) {
            Ok(Some(record)) if record.system == self.system => record,
            Ok(_) => return None,
            Err(e) => {
                tracing::warn!(env = %r, error = %e, "reading the recorded generation; asking FloxHub");
                return None;
            }
        };
        match ResolvedEnvironment::from_record(&record, true) {
            Ok(env) => {
                tracing::debug!(env = %r, roots = env.roots.len(),
                    "pinned generation resolved from the store's record");
                Some(env)
            }
            Err(e) => {
                tracing::warn!(env = %r, error = %e, "recorded generation unusable; asking FloxHub");
                None
            }
        }
    }

    /// Resolves the pinned generation, or the live one: a pinned generation the store has
    /// recorded (see [`Resolver::with_store`]) from that record, anything else by fetching the
    /// environment's branch. Blocking (runs git); call it from `spawn_blocking` in async code.
    pub fn resolve(
        &self,
        r: &EnvRef,
        token: Option<&Token>,
    ) -> Result<ResolvedEnvironment, ResolveError> {
        if let Some(env) = self.recorded(r) {
            return Ok(env);
        }
        let env = r.env_name();
        let fetched = self.floxhub.fetch(r, token)?;
        let key = (
            r.owner.clone(),
            r.name.clone(),
            r.generation,
            fetched.commit.clone(),
        );
        if let Some(hit) = self.by_commit.lock().get(&key) {
            tracing::debug!(env = %env, generation = hit.generation, commit = %fetched.commit,
                "resolved from the same commit as before");
            return Ok(hit.clone());
        }
        let resolved = self.resolve_commit(r, &fetched.commit)?;
        let mut cache = self.by_commit.lock();
        if cache.len() >= RESOLUTIONS_KEPT {
            cache.clear();
        }
        cache.insert(key, resolved.clone());
        Ok(resolved)
    }

    /// Resolves `r` from `commit` of its branch in the mirror.
    fn resolve_commit(
        &self,
        r: &EnvRef,
        commit: &str,
    ) -> Result<ResolvedEnvironment, ResolveError> {
        let env = r.env_name();
        let metadata = self.floxhub.read_metadata(r, commit)?;
        let generations =
            Generations::parse(&metadata).map_err(|source| ResolveError::Metadata {
                env: env.clone(),
                source,
            })?;
        let generation = match r.generation {
            Some(g) if !generations.contains(g) => {
                return Err(ResolveError::NoSuchGeneration {
                    env,
                    generation: g,
                    known: generations.known.iter().copied().collect(),
                    live: generations.live,
                })
            }
            Some(g) => g,
            None => generations.live,
        };
        let lockfile_text = self
            .floxhub
            .read_lockfile(r, commit, generation)?
            .ok_or_else(|| ResolveError::LockfileMissing {
                env: env.clone(),
                generation,
            })?;
        let lockfile =
            Lockfile::parse(&lockfile_text).map_err(|source| ResolveError::Lockfile {
                env: env.clone(),
                generation,
                source: Box::new(source),
            })?;
        let roots = lockfile.roots_for(&self.system);
        if roots.is_empty() {
            let available = lockfile.systems();
            return Err(ResolveError::NoPackagesForSystem {
                env,
                generation,
                system: self.system.clone(),
                available,
            });
        }
        tracing::info!(
            env = %env,
            generation,
            live = generations.live,
            newest = generations.newest,
            roots = roots.len(),
            commit = %commit,
            "resolved environment"
        );
        Ok(ResolvedEnvironment {
            owner: r.owner.clone(),
            name: r.name.clone(),
            generation,
            pinned: r.generation.is_some(),
            system: self.system.clone(),
            commit: commit.to_string(),
            vars: lockfile.vars().clone(),
            hook: lockfile.hook().map(str::to_string),
            lockfile_text,
            lockfile,
            history: generations.history_raw,
            roots,
            live: generations.live,
            newest: generations.newest,
        })
    }
}
