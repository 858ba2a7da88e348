//! The configured binary caches, in order, and the trust decision over what they say.
//!
//! [`Substituters::lookup`] asks each cache in turn for a store path's narinfo (a 404 moves on to
//! the next) and, when signatures are required, accepts a narinfo only if it carries a valid
//! signature by a trusted key (as Nix's `require-sigs`). A cache whose narinfo is refused is
//! skipped too; if no cache offers an acceptable narinfo, the refusal is the error. Results are
//! memoised for the life of the process, single-flight: concurrent lookups of one path share one
//! request. Errors are not memoised, so a later lookup tries again.

use std::collections::HashMap;
use std::sync::Arc;

use kof_nar::signature::{check_narinfo, SigCheck};
use kof_nar::{NarInfo, PublicKey, StorePath};
use parking_lot::Mutex;
use thiserror::Error;
use tokio::sync::OnceCell;

use crate::cache::{BinaryCache, CacheError, CacheInfo};

/// Why a path's narinfo was not accepted.
#[derive(Debug, Error)]
pub enum SubstituteError {
    /// A cache failed to answer.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The narinfo has no signature at all.
    #[error("narinfo of {path} from {cache} is unsigned (require_sigs is on)")]
    Unsigned {
        /// The store path.
        path: StorePath,
        /// The cache URL.
        cache: String,
    },
    /// The narinfo is signed, but by no trusted key.
    #[error("narinfo of {path} from {cache} is signed only by untrusted keys {keys:?}")]
    Untrusted {
        /// The store path.
        path: StorePath,
        /// The cache URL.
        cache: String,
        /// The names of the keys it is signed by.
        keys: Vec<String>,
    },
    /// A signature by a trusted key's name does not verify.
    #[error("narinfo of {path} from {cache} has an invalid signature by trusted key {key}")]
    InvalidSignature {
        /// The store path.
        path: StorePath,
        /// The cache URL.
        cache: String,
        /// The trusted key's name.
        key: String,
    },
}

impl SubstituteError {
    /// Whether asking again may give another answer.
    pub fn is_transient(&self) -> bool {
        matches!(self, SubstituteError::Cache(e) if e.is_transient())
    }
}

/// An accepted narinfo and the cache it came from.
#[derive(Debug, Clone)]
pub struct Substitute {
    /// The narinfo.
    pub info: NarInfo,
    /// The cache that serves it.
    pub cache: Arc<BinaryCache>,
    /// Index of that cache in the substituter list.
    pub cache_index: usize,
    /// The trusted key that signed it (`None` when signatures are not required and it was not
    /// signed by a trusted key).
    pub trusted_by: Option<String>,
}

type Memo = Arc<OnceCell<Option<Arc<Substitute>>>>;

/// The caches in order, the trusted keys, and the narinfo memo.
pub struct Substituters {
    caches: Vec<Arc<BinaryCache>>,
    /// Each cache's checked `nix-cache-info`, read before its first narinfo.
    infos: Vec<OnceCell<CacheInfo>>,
    keys: Vec<PublicKey>,
    require_sigs: bool,
    memo: Mutex<HashMap<StorePath, Memo>>,
}

impl Substituters {
    /// Caches tried in the order given.
    pub fn new(caches: Vec<BinaryCache>, keys: Vec<PublicKey>, require_sigs: bool) -> Self {
        Substituters {
            infos: caches.iter().map(|_| OnceCell::new()).collect(),
            caches: caches.into_iter().map(Arc::new).collect(),
            keys,
            require_sigs,
            memo: Mutex::new(HashMap::new()),
        }
    }

    /// The caches, in order.
    pub fn caches(&self) -> &[Arc<BinaryCache>] {
        &self.caches
    }

    /// The trusted public keys (`trusted_public_keys`): what narinfos and kof indexes must be
    /// signed by.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// The accepted narinfo of `path` from the first cache that has one, or `None` if no cache
    /// has the path. Memoised and single-flight.
    pub async fn lookup(
        &self,
        path: &StorePath,
    ) -> Result<Option<Arc<Substitute>>, SubstituteError> {
        let cell = {
            let mut memo = self.memo.lock();
            memo.entry(path.clone()).or_default().clone()
        };
        cell.get_or_try_init(|| self.lookup_from(path, 0))
            .await
            .cloned()
    }

    /// Forgets every memoised answer (a long-running daemon calls this so that paths pushed to
    /// a cache later, or narinfos changed there, are seen). Lookups in flight finish normally.
    pub fn clear_memo(&self) {
        self.memo.lock().clear();
    }

    /// Like [`Substituters::lookup`] but only in caches from index `first` on, and not
    /// memoised: used to find another source after a cache served bad data.
    pub async fn lookup_from(
        &self,
        path: &StorePath,
        first: usize,
    ) -> Result<Option<Arc<Substitute>>, SubstituteError> {
        let mut refusal: Option<SubstituteError> = None;
        for (index, cache) in self.caches.iter().enumerate().skip(first) {
            // Like Nix, read the cache's nix-cache-info first: a cache for another store
            // directory (or no cache at all) is never asked for narinfos.
            if let Err(e) = self.infos[index]
                .get_or_try_init(|| cache.cache_info())
                .await
            {
                tracing::warn!(cache = cache.url(), error = %kof_node_api::report::chain(&e), "unusable cache");
                refusal.get_or_insert(e.into());
                continue;
            }
            let info = match cache.narinfo(path).await {
                Ok(Some(info)) => info,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(cache = cache.url(), %path, error = %kof_node_api::report::chain(&e), "narinfo lookup failed");
                    refusal.get_or_insert(e.into());
                    continue;
                }
            };
            match self.check(&info, cache) {
                Ok(trusted_by) => {
                    return Ok(Some(Arc::new(Substitute {
                        info,
                        cache: cache.clone(),
                        cache_index: index,
                        trusted_by,
                    })))
                }
                Err(e) => {
                    tracing::warn!(cache = cache.url(), %path, error = %kof_node_api::report::chain(&e), "narinfo refused");
                    refusal.get_or_insert(e);
                }
            }
        }
        match refusal {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    /// Applies the signature policy to `info` from `cache`.
    fn check(
        &self,
        info: &NarInfo,
        cache: &BinaryCache,
    ) -> Result<Option<String>, SubstituteError> {
        let verdict = check_narinfo(info, &self.keys);
        let path = || info.store_path.clone();
        let cache_url = || cache.url().to_string();
        match verdict {
            SigCheck::Trusted(key) => Ok(Some(key)),
            _ if !self.require_sigs => Ok(None),
            SigCheck::Unsigned => Err(SubstituteError::Unsigned {
                path: path(),
                cache: cache_url(),
            }),
            SigCheck::Untrusted(keys) => Err(SubstituteError::Untrusted {
                path: path(),
                cache: cache_url(),
                keys,
            }),
            SigCheck::Invalid(key) => Err(SubstituteError::InvalidSignature {
                path: path(),
                cache: cache_url(),
                key,
            }),
        }
    }
}
