//! Dedup across generations: fetch every generation of one environment (each upgrading one
//! package) into one kof store, and compare its bytes on disk with the unique content and with
//! a Nix store holding the same paths.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use anyhow::{Context, Result};
use kof_fixtures::build::Manifest;
use serde::Serialize;

use crate::node::{self, KofNode, Link, NixNode};

/// What it measured.
#[derive(Debug, Clone, Serialize)]
pub struct DedupReport {
    /// `owner/name`.
    pub env: String,
    /// Generations fetched.
    pub generations: Vec<u32>,
    /// Distinct store paths over all of them.
    pub paths: usize,
    /// Sum of NarSize of those paths (what the generations hold, logically).
    pub logical_bytes: u64,
    /// Sum of the sizes of distinct file contents (by BLAKE3 of the whole file) in those paths:
    /// the unique content, counted independently of kof from the staged trees.
    pub unique_content_bytes: u64,
    /// kof's bytes on disk for objects (`stats.stored_bytes`).
    pub kof_stored_bytes: u64,
    /// kof's stored bytes / unique content.
    pub kof_vs_unique: f64,
    /// The same paths in a Nix store (apparent size, `du -sb --apparent-size`).
    pub nix_store_bytes: u64,
    /// The same, in allocated blocks (`du -sB1`).
    pub nix_store_disk_bytes: u64,
    /// kof's stored bytes / Nix's apparent bytes.
    pub kof_vs_nix: f64,
}

/// Runs it over every generation of `env`.
pub fn run(
    fixtures: &Path,
    manifest: &Manifest,
    kof_store: &Path,
    env: &str,
) -> Result<DedupReport> {
    let e = node::environment(manifest, env)?;
    let generations: Vec<u32> = e
        .generations
        .iter()
        .filter(|g| g.has_lock)
        .map(|g| g.number)
        .collect();
    let mut paths = BTreeSet::new();
    let mut roots = BTreeSet::new();
    for g in &generations {
        let (r, c, _) = node::generation(manifest, env, Some(*g))?;
        roots.extend(r);
        paths.extend(c);
    }
    let logical_bytes: u64 = paths.iter().map(|p| manifest.store_paths[p].nar_size).sum();
    let mut seen = HashSet::new();
    let mut unique_content_bytes = 0;
    for p in &paths {
        unique_content_bytes +=
            unique_files(&fixtures.join(&manifest.store_paths[p].staged), &mut seen)?;
    }

    let server = node::serve(
        fixtures,
        Link {
            latency: Default::default(),
            bandwidth: None,
        },
    )?;
    let kof = KofNode::new(&server, manifest, "zstd", "")?;
    let refs: Vec<String> = generations.iter().map(|g| format!("{env}:{g}")).collect();
    let mut args = vec!["prefetch"];
    args.extend(refs.iter().map(String::as_str));
    node::timed(&server, &mut kof.cmd(kof_store, &args))?;
    let stats = kof.stats(kof_store)?;
    let kof_stored_bytes = stats["stored_bytes"].as_u64().context("stored_bytes")?;

    let nix = NixNode::new()?;
    let roots: Vec<String> = roots.into_iter().collect();
    node::timed(
        &server,
        &mut nix.copy(&server.cache_url("zstd"), &manifest.public_key, &roots),
    )?;
    let (nix_store_bytes, nix_store_disk_bytes) = nix.store_bytes()?;
    Ok(DedupReport {
        env: env.to_string(),
        generations,
        paths: paths.len(),
        logical_bytes,
        unique_content_bytes,
        kof_stored_bytes,
        kof_vs_unique: kof_stored_bytes as f64 / unique_content_bytes as f64,
        nix_store_bytes,
        nix_store_disk_bytes,
        kof_vs_nix: kof_stored_bytes as f64 / nix_store_bytes as f64,
    })
}

/// Sums the sizes of regular files under `dir` whose content was not seen before.
fn unique_files(dir: &Path, seen: &mut HashSet<[u8; 32]>) -> Result<u64> {
    let mut total = 0;
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.is_file() {
        let mut h = blake3::Hasher::new();
        h.update_reader(std::fs::File::open(dir)?)?;
        if seen.insert(*h.finalize().as_bytes()) {
            total += meta.len();
        }
    } else if meta.is_dir() {
        for e in std::fs::read_dir(dir)? {
            total += unique_files(&e?.path(), seen)?;
        }
    }
    Ok(total)
}
