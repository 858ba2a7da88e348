//! The closure of a set of store paths under their references.
//!
//! [`compute_closure`] walks `References` breadth-first from the roots. A path already in the
//! store is described by its stored metadata (no network); any other is looked up through the
//! [`Substituters`], with a bounded number of lookups in flight. A path no cache has is an
//! error naming it and the path that referenced it.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use kof_nar::StorePath;
use kof_store::{PathInfo, Store, StoreError};
use thiserror::Error;

use crate::substituters::{Substitute, SubstituteError, Substituters};

/// Default number of narinfo lookups in flight.
pub const DEFAULT_LOOKUPS_IN_FLIGHT: usize = 32;

/// Why a closure could not be computed.
#[derive(Debug, Error)]
pub enum ClosureError {
    /// No substituter has the path.
    #[error("{path} is in no substituter{}", referenced_by.as_ref().map(|r| format!(" (referenced by {r})")).unwrap_or_else(|| " (a root)".into()))]
    Missing {
        /// The missing path.
        path: StorePath,
        /// The path that referenced it (`None` for a root).
        referenced_by: Option<StorePath>,
    },
    /// Looking the path up failed or its narinfo was refused.
    #[error("looking up {path}")]
    Lookup {
        /// The path.
        path: StorePath,
        /// The cause.
        source: SubstituteError,
    },
    /// Reading the store's metadata failed.
    #[error("reading store metadata of {path}")]
    Store {
        /// The path.
        path: StorePath,
        /// The cause.
        source: StoreError,
    },
    /// A blocking store task panicked or was cancelled.
    #[error("store task for {path} failed")]
    Join {
        /// The path.
        path: StorePath,
        /// The cause.
        source: tokio::task::JoinError,
    },
}

/// Where a member of the closure stands.
#[derive(Debug, Clone)]
pub enum ClosureEntry {
    /// Already stored; its stored metadata.
    Stored(Box<PathInfo>),
    /// To be fetched; the accepted narinfo and its cache.
    Remote(Arc<Substitute>),
}

impl ClosureEntry {
    /// The store path.
    pub fn path(&self) -> &StorePath {
        match self {
            ClosureEntry::Stored(i) => &i.store_path,
            ClosureEntry::Remote(s) => &s.info.store_path,
        }
    }

    /// Its references (may include itself).
    pub fn references(&self) -> &[StorePath] {
        match self {
            ClosureEntry::Stored(i) => &i.references,
            ClosureEntry::Remote(s) => &s.info.references,
        }
    }

    /// Its NAR size.
    pub fn nar_size(&self) -> u64 {
        match self {
            ClosureEntry::Stored(i) => i.nar_size,
            ClosureEntry::Remote(s) => s.info.nar_size,
        }
    }
}

/// A closure: every member, sorted by store path.
#[derive(Debug, Clone, Default)]
pub struct Closure {
    /// The roots asked for.
    pub roots: Vec<StorePath>,
    /// Every path of the closure, sorted.
    pub entries: Vec<ClosureEntry>,
}

impl Closure {
    /// The store paths, sorted.
    pub fn paths(&self) -> Vec<StorePath> {
        self.entries.iter().map(|e| e.path().clone()).collect()
    }

    /// The members still to fetch.
    pub fn remote(&self) -> impl Iterator<Item = &Arc<Substitute>> {
        self.entries.iter().filter_map(|e| match e {
            ClosureEntry::Remote(s) => Some(s),
            ClosureEntry::Stored(_) => None,
        })
    }
}

/// Computes the closure of `roots`, with at most `in_flight` lookups at once.
pub async fn compute_closure(
    subs: &Substituters,
    store: &Arc<Store>,
    roots: &[StorePath],
    in_flight: usize,
) -> Result<Closure, ClosureError> {
    compute_closure_with(subs, store, roots, in_flight, |_| {}).await
}

/// [`compute_closure`], calling `on_remote` with each path to fetch the moment its narinfo is
/// accepted, so that a caller can start downloading while the walk goes on.
pub async fn compute_closure_with(
    subs: &Substituters,
    store: &Arc<Store>,
    roots: &[StorePath],
    in_flight: usize,
    mut on_remote: impl FnMut(&Arc<Substitute>),
) -> Result<Closure, ClosureError> {
    let in_flight = in_flight.max(1);
    let mut seen: HashSet<StorePath> = HashSet::new();
    let mut queue: VecDeque<(StorePath, Option<StorePath>)> = VecDeque::new();
    for r in roots {
        if seen.insert(r.clone()) {
            queue.push_back((r.clone(), None));
        }
    }
    let mut found: BTreeMap<StorePath, ClosureEntry> = BTreeMap::new();
    let mut pending = FuturesUnordered::new();
    loop {
        while pending.len() < in_flight {
            let Some((path, parent)) = queue.pop_front() else {
                break;
            };
            pending.push(describe(subs, store.clone(), path, parent));
        }
        let Some(result) = pending.next().await else {
            break;
        };
        let entry = result?;
        if let ClosureEntry::Remote(sub) = &entry {
            on_remote(sub);
        }
        for r in entry.references() {
            if seen.insert(r.clone()) {
                queue.push_back((r.clone(), Some(entry.path().clone())));
            }
        }
        found.insert(entry.path().clone(), entry);
    }
    Ok(Closure {
        roots: roots.to_vec(),
        entries: found.into_values().collect(),
    })
}

/// The entry for one path: stored metadata if stored, else an accepted narinfo.
async fn describe(
    subs: &Substituters,
    store: Arc<Store>,
    path: StorePath,
    parent: Option<StorePath>,
) -> Result<ClosureEntry, ClosureError> {
    let p = path.clone();
    let stored = tokio::task::spawn_blocking(move || store.path_info(&p))
        .await
        .map_err(|source| ClosureError::Join {
            path: path.clone(),
            source,
        })?
        .map_err(|source| ClosureError::Store {
            path: path.clone(),
            source,
        })?;
    if let Some(info) = stored {
        return Ok(ClosureEntry::Stored(Box::new(info)));
    }
    match subs.lookup(&path).await {
        Ok(Some(s)) => Ok(ClosureEntry::Remote(s)),
        Ok(None) => Err(ClosureError::Missing {
            path,
            referenced_by: parent,
        }),
        Err(source) => Err(ClosureError::Lookup { path, source }),
    }
}
