//! Preparing a view cold: metadata only (narinfos and listings, never file contents), so its
//! time should follow the number of paths and the depth of their reference graph, not their
//! bytes. Issue 3's target: ≤ 1 s for a 200-path closure on the fixture link (`kof/wide`).
//!
//! Each run is a fresh node (empty store, nothing resolved) with its own `kof-fetcherd`
//! (`prefetch = "none"`, so nothing but the preparation crosses the link, and its FUSE server
//! already up), then one `prepare` through the daemon's API, timed from the request to the
//! answer: FloxHub resolution, the closure's narinfos, the listings, the view built and added to
//! the mount. The view is then checked: its `nix/store` holds exactly the closure.
//!
//! Side by side, alternating: the real Nix walking the same closure's narinfos
//! (`nix path-info --recursive --store CACHE ROOTS` with an empty narinfo cache), which is the
//! least any client must do before it knows what to fetch.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use kof_fixtures::build::Manifest;
use kof_node_api::api::Client;
use serde::Serialize;

use crate::node::{self, Daemon, KofNode, Link};
use crate::prefetch::median;

/// The comparison.
#[derive(Debug, Clone)]
pub struct PrepareBench {
    /// `owner/name`.
    pub env: String,
    /// Cache flavour.
    pub flavour: String,
    /// Timed runs of each side.
    pub runs: usize,
    /// The link.
    pub link: Link,
}

/// One timed side of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// Wall time.
    pub seconds: f64,
    /// Every request the server answered.
    pub requests: u64,
    /// narinfo requests among them.
    pub narinfo_requests: u64,
    /// Listing (`.ls`) requests among them.
    pub listing_requests: u64,
    /// NAR requests among them (0 for a metadata-only preparation).
    pub nar_requests: u64,
    /// FloxHub (git) requests among them.
    pub git_requests: u64,
    /// Body bytes sent.
    pub bytes: u64,
}

/// What it measured.
#[derive(Debug, Clone, Serialize)]
pub struct PrepareReport {
    /// `owner/name`.
    pub env: String,
    /// Cache flavour.
    pub flavour: String,
    /// Store paths in the closure.
    pub paths: usize,
    /// The closure's NarSize sum.
    pub closure_nar_bytes: u64,
    /// Longest chain of references from the roots.
    pub depth: usize,
    /// kof: `prepare` through a fresh daemon.
    pub kof: Vec<Side>,
    /// Nix: `nix path-info --recursive` against the cache.
    pub nix: Vec<Side>,
}

impl PrepareReport {
    /// Median kof seconds.
    pub fn kof_seconds(&self) -> f64 {
        median(&self.kof.iter().map(|s| s.seconds).collect::<Vec<_>>())
    }

    /// Median Nix seconds.
    pub fn nix_seconds(&self) -> f64 {
        median(&self.nix.iter().map(|s| s.seconds).collect::<Vec<_>>())
    }
}

fn side(server: &kof_fixtures::serve::ServerHandle, seconds: f64) -> Side {
    let s = server.stats();
    Side {
        seconds,
        requests: s.requests,
        narinfo_requests: s.requests_by_kind.narinfo,
        listing_requests: s.requests_by_kind.ls,
        nar_requests: s.requests_by_kind.nar,
        git_requests: s.requests_by_kind.git,
        bytes: s.bytes_sent,
    }
}

impl PrepareBench {
    /// One cold `prepare` on a fresh node.
    fn kof(
        &self,
        fixtures: &Path,
        manifest: &Manifest,
        kof_store: &Path,
        closure: &[String],
    ) -> Result<Side> {
        let server = node::serve(fixtures, self.link)?;
        let n = KofNode::new(&server, manifest, &self.flavour, "prefetch = \"none\"\n")?;
        n.enable_daemon()?;
        // Not timed: the daemon and its FUSE server starting.
        let daemon = Daemon::start(&n, kof_store)?;
        let mut client = Client::connect(&n.socket()).context("connecting to kof-fetcherd")?;
        server.reset();
        let start = Instant::now();
        let prepared = client
            .prepare(&self.env, "bench", None)
            .with_context(|| format!("preparing {}", self.env))?;
        let seconds = start.elapsed().as_secs_f64();
        let s = side(&server, seconds);
        // The view holds exactly the closure.
        let mut shown: Vec<String> = std::fs::read_dir(prepared.view_root.join("nix/store"))
            .context("listing the view's nix/store")?
            .map(|e| e.map(|e| format!("/nix/store/{}", e.file_name().to_string_lossy())))
            .collect::<std::io::Result<_>>()?;
        shown.retain(|p| closure.contains(p));
        if shown.len() != closure.len() {
            bail!(
                "the view of {} shows {} of the closure's {} paths",
                self.env,
                shown.len(),
                closure.len()
            );
        }
        client.release("bench").context("releasing the lease")?;
        daemon.stop()?;
        server.shutdown();
        Ok(s)
    }

    /// One cold `nix path-info --recursive` of the roots against the cache.
    fn nix(&self, fixtures: &Path, manifest: &Manifest, roots: &[String]) -> Result<Side> {
        let server = node::serve(fixtures, self.link)?;
        let nix = node::NixNode::new()?;
        let home = nix.dir.path().join("home");
        let url = server.cache_url(&self.flavour);
        let mut c = Command::new("nix");
        c.args(["path-info", "--recursive", "--store", &url])
            .args(["--option", "trusted-public-keys", &manifest.public_key])
            .args(roots)
            .env("HOME", &home)
            .env("XDG_CACHE_HOME", home.join(".cache"));
        let run = node::timed(&server, &mut c)?;
        let s = side(&server, run.seconds);
        server.shutdown();
        Ok(s)
    }

    /// Runs it: one untimed warm-up of each side, then `runs` of each, alternating.
    pub fn run(
        &self,
        fixtures: &Path,
        manifest: &Manifest,
        kof_store: &Path,
    ) -> Result<PrepareReport> {
        let (roots, closure, closure_nar_bytes) = node::generation(manifest, &self.env, None)?;
        let mut report = PrepareReport {
            env: self.env.clone(),
            flavour: self.flavour.clone(),
            paths: closure.len(),
            closure_nar_bytes,
            depth: crate::coldstart::reference_depth(manifest, &roots),
            kof: Vec::new(),
            nix: Vec::new(),
        };
        for i in 0..=self.runs {
            let k = self.kof(fixtures, manifest, kof_store, &closure)?;
            let n = self.nix(fixtures, manifest, &roots)?;
            if k.nar_requests != 0 {
                bail!(
                    "preparing {} fetched {} NARs; it must need metadata only",
                    self.env,
                    k.nar_requests
                );
            }
            eprintln!(
                "  {} run {i}: kof prepare {:.3} s ({} requests: {} narinfo, {} listings, {} git), nix path-info {:.3} s ({} requests)",
                if i == 0 { "warm-up" } else { "timed" },
                k.seconds,
                k.requests,
                k.narinfo_requests,
                k.listing_requests,
                k.git_requests,
                n.seconds,
                n.requests
            );
            if i > 0 {
                report.kof.push(k);
                report.nix.push(n);
            }
        }
        Ok(report)
    }
}
