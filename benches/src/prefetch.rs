//! Eager prefetch of an environment's closure: `kof-store prefetch` vs `nix copy --from`, from
//! the same cache over the same shaped link, alternating runs.

use std::path::Path;

use anyhow::Result;
use kof_fixtures::build::Manifest;
use serde::Serialize;

use crate::node::{self, KofNode, Link, NixNode, Run};

/// One prefetch comparison.
#[derive(Debug, Clone)]
pub struct PrefetchBench {
    /// `owner/name`.
    pub env: String,
    /// Cache flavour (`zstd`, `xz`, ...).
    pub flavour: String,
    /// Runs of each side.
    pub runs: usize,
    /// The link.
    pub link: Link,
}

/// What it measured.
#[derive(Debug, Clone, Serialize)]
pub struct PrefetchReport {
    /// `owner/name`.
    pub env: String,
    /// Cache flavour.
    pub flavour: String,
    /// Store paths in the closure.
    pub paths: usize,
    /// Sum of NarSize.
    pub nar_bytes: u64,
    /// Sum of the compressed NAR sizes (what a full fetch must download).
    pub download_bytes: u64,
    /// Link bandwidth (bytes/s), latency (ms).
    pub bandwidth: Option<u64>,
    /// Per-request latency in ms.
    pub latency_ms: u64,
    /// kof's runs.
    pub kof: Vec<Run>,
    /// Nix's runs.
    pub nix: Vec<Run>,
    /// Median wall time of kof's runs.
    pub kof_median_s: f64,
    /// Median wall time of Nix's runs.
    pub nix_median_s: f64,
    /// kof / Nix, medians.
    pub ratio: f64,
    /// download_bytes / kof median / bandwidth.
    pub kof_link_utilisation: Option<f64>,
    /// download_bytes / Nix median / bandwidth.
    pub nix_link_utilisation: Option<f64>,
}

/// The median of some values.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        0.0
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

impl PrefetchBench {
    /// Runs it.
    pub fn run(
        &self,
        fixtures: &Path,
        manifest: &Manifest,
        kof_store: &Path,
    ) -> Result<PrefetchReport> {
        let (roots, closure, nar_bytes) = node::generation(manifest, &self.env, None)?;
        let download_bytes = node::download_bytes(fixtures, &self.flavour, &closure)?;
        let server = node::serve(fixtures, self.link)?;
        let url = server.cache_url(&self.flavour);
        let mut kof = Vec::new();
        let mut nix = Vec::new();
        // Every node is kept until the end: deleting a store's thousands of files between runs
        // made ext4's inode allocator (which skips recently deleted inodes) charge the next run
        // for it, on whichever side came next. A real node starts on a quiet file system.
        let mut nodes = (Vec::new(), Vec::new());
        for i in 0..self.runs {
            // Alternate which side goes first, so drift in machine load hits both alike.
            for side in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
                if side == 0 {
                    let n = KofNode::new(&server, manifest, &self.flavour, "")?;
                    let r = node::timed(&server, &mut n.cmd(kof_store, &["prefetch", &self.env]))?;
                    eprintln!(
                        "  kof {} {}: {:.2} s, {} bytes, {} requests",
                        self.env, self.flavour, r.seconds, r.bytes, r.requests
                    );
                    kof.push(r);
                    nodes.0.push(n);
                } else {
                    let n = NixNode::new()?;
                    let r = node::timed(&server, &mut n.copy(&url, &manifest.public_key, &roots))?;
                    eprintln!(
                        "  nix {} {}: {:.2} s, {} bytes, {} requests",
                        self.env, self.flavour, r.seconds, r.bytes, r.requests
                    );
                    nix.push(r);
                    nodes.1.push(n);
                }
            }
        }
        let kof_median_s = median(&kof.iter().map(|r| r.seconds).collect::<Vec<_>>());
        let nix_median_s = median(&nix.iter().map(|r| r.seconds).collect::<Vec<_>>());
        let util = |s: f64| {
            self.link
                .bandwidth
                .map(|b| download_bytes as f64 / s / b as f64)
        };
        Ok(PrefetchReport {
            env: self.env.clone(),
            flavour: self.flavour.clone(),
            paths: closure.len(),
            nar_bytes,
            download_bytes,
            bandwidth: self.link.bandwidth,
            latency_ms: self.link.latency.as_millis() as u64,
            kof_median_s,
            nix_median_s,
            ratio: kof_median_s / nix_median_s,
            kof_link_utilisation: util(kof_median_s),
            nix_link_utilisation: util(nix_median_s),
            kof,
            nix,
        })
    }
}
