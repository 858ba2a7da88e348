//! Plain binary-cache directories (caches written by `nix copy`, or a test's damaged copy)
//! served by `kof_fixtures::serve`, with their requests counted per path.

use std::collections::BTreeMap;
use std::path::Path;

use kof_fixtures::serve::{self, Fault, FaultKind, ServeConfig, ServerHandle};
use tempfile::TempDir;

/// `kof_fixtures::serve` over cache directories outside a fixture set. Paths (`rel`) are
/// relative to what was served: a cache's name then its file (`zstd/nar/...`) for
/// [`CacheServer::start`], a file of the one cache (`nar/...`) for
/// [`CacheServer::start_one`].
pub struct CacheServer {
    handle: ServerHandle,
    /// The URL path under which `rel` paths live, with no trailing slash.
    prefix: String,
    /// The fixtures directory served: `caches` links to what the test gave.
    _root: TempDir,
}

impl CacheServer {
    /// Serves every cache directory under `caches` (`caches/<name>/` at [`url`](Self::url)
    /// of `<name>`), on the current tokio runtime.
    pub async fn start(caches: &Path) -> CacheServer {
        let root = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(caches, root.path().join("caches")).unwrap();
        CacheServer::launch(root, "/cache", true).await
    }

    /// Serves the one cache directory `cache` at [`url`](Self::url) of `""`.
    pub async fn start_one(cache: &Path) -> CacheServer {
        CacheServer::one(cache, true).await
    }

    /// [`CacheServer::start_one`], answering every request with the whole file (a server
    /// that ignores `Range`).
    pub async fn start_one_ignoring_ranges(cache: &Path) -> CacheServer {
        CacheServer::one(cache, false).await
    }

    async fn one(cache: &Path, ranges: bool) -> CacheServer {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("caches")).unwrap();
        std::os::unix::fs::symlink(cache, root.path().join("caches/c")).unwrap();
        CacheServer::launch(root, "/cache/c", ranges).await
    }

    async fn launch(root: TempDir, prefix: &str, ranges: bool) -> CacheServer {
        let mut cfg = ServeConfig::new(root.path());
        cfg.ranges = ranges;
        let handle = serve::start(cfg)
            .await
            .unwrap_or_else(|e| panic!("kof-fixtures server: {e}"));
        CacheServer {
            handle,
            prefix: prefix.to_string(),
            _root: root,
        }
    }

    /// The URL of `rel`.
    pub fn url(&self, rel: &str) -> String {
        format!("{}{}/{rel}", self.handle.base_url(), self.prefix)
    }

    /// Requests seen for `rel`.
    pub fn count(&self, rel: &str) -> usize {
        let path = format!("{}/{rel}", self.prefix);
        self.counts().get(&path).copied().unwrap_or(0) as usize
    }

    /// Requests seen whose URL path contains `part`.
    pub fn count_matching(&self, part: &str) -> usize {
        self.counts()
            .iter()
            .filter(|(k, _)| k.contains(part))
            .map(|(_, v)| *v as usize)
            .sum()
    }

    /// Every request path seen, with its count.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.handle.stats().requests_by_path
    }

    /// Breaks the next `times` responses for `rel` (0: every one) the way `kind` says.
    pub fn fault(&self, rel: &str, kind: FaultKind, times: u32) {
        let path = format!("{}/{rel}", self.prefix);
        self.handle.add_fault(Fault::new(kind, path).times(times));
    }

    /// Lets `n` bodies held by a [`FaultKind::Hold`] fault go.
    pub fn release(&self, n: usize) {
        self.handle.release_held(n);
    }

    /// The server itself.
    pub fn handle(&self) -> &ServerHandle {
        &self.handle
    }
}
