//! Time to recover after ENOSPC (issue 13's figure): a node (the real `kof-fetcherd` and its
//! FUSE server) whose store is on a small tmpfs, its view of kof/python prepared from the
//! published cache (verified chunk reads) over a shaped link. Each run, on a fresh node:
//!
//! 1. **baseline**: a cold read of one file of the python3 path through the view (its chunk
//!    fetched, verified and written to the partial NAR);
//! 2. the store's file system is filled to its last byte (a filler file beside the store);
//! 3. **failing read**: a cold read of another file fails (EIO: its verified chunk cannot be
//!    written), timed;
//! 4. the filler is deleted and the second file is read again until it succeeds: **recover**
//!    is the time from the deletion to the first successful read.
//!
//! Recover minus baseline is what a full disk costs the first read after it; it needs root
//! (tmpfs mounts).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kof_testkit::{Node, NodeOptions};
use serde::Serialize;

use crate::node::Link;

/// The two files read, in the python3 path: small (a chunk or two each) and far apart in
/// the NAR, so that they share no chunk.
const FILES: [&str; 2] = [
    "lib/python3.11/json/decoder.py",
    "lib/python3.11/urllib/parse.py",
];

/// The bench.
pub struct NoSpaceBench {
    /// Runs (a fresh node each).
    pub runs: usize,
    /// The link to the fixture cache.
    pub link: Link,
}

/// One run's times, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct NoSpaceRun {
    /// A cold read before the disk filled.
    pub baseline_ms: f64,
    /// The cold read that failed on the full disk.
    pub failed_read_ms: f64,
    /// From freeing the space to the first successful read.
    pub recover_ms: f64,
    /// Reads tried until one succeeded after the space was freed.
    pub attempts: u32,
}

/// What it measured.
#[derive(Debug, Clone, Serialize)]
pub struct NoSpaceReport {
    /// Per-request latency of the link, ms.
    pub latency_ms: u64,
    /// Bandwidth of the link, bytes/s.
    pub bandwidth: Option<u64>,
    /// Every run.
    pub runs: Vec<NoSpaceRun>,
    /// Medians.
    pub median_baseline_ms: f64,
    /// Median of the failing reads.
    pub median_failed_read_ms: f64,
    /// Median time to recover.
    pub median_recover_ms: f64,
}

/// A tmpfs mounted for the guard's life.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(dir)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            bail!(
                "mounting a tmpfs at {} (needs root): {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.0).status();
        if !ok.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn fill(file: &Path) -> Result<()> {
    let mut f = std::fs::File::create(file)?;
    let block = vec![0x5au8; 64 << 10];
    while f.write(&block).is_ok_and(|n| n > 0) {}
    while f.write(&block[..1]).is_ok_and(|n| n > 0) {}
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

impl NoSpaceBench {
    /// Runs it against the fixtures in `fixtures`.
    pub fn run(&self, fixtures: &Path) -> Result<NoSpaceReport> {
        let mut runs = Vec::new();
        for i in 0..self.runs {
            let r = self.one(fixtures)?;
            eprintln!(
                "run {}: baseline {:.1} ms, failed read {:.1} ms, recover {:.1} ms ({} attempts)",
                i + 1,
                r.baseline_ms,
                r.failed_read_ms,
                r.recover_ms,
                r.attempts
            );
            runs.push(r);
        }
        Ok(NoSpaceReport {
            latency_ms: self.link.latency.as_millis() as u64,
            bandwidth: self.link.bandwidth,
            median_baseline_ms: median(runs.iter().map(|r| r.baseline_ms).collect()),
            median_failed_read_ms: median(runs.iter().map(|r| r.failed_read_ms).collect()),
            median_recover_ms: median(runs.iter().map(|r| r.recover_ms).collect()),
            runs,
        })
    }

    fn one(&self, fixtures: &Path) -> Result<NoSpaceRun> {
        let mut node = Node::new(NodeOptions {
            flavour: "published",
            latency: self.link.latency,
            bandwidth: self.link.bandwidth,
            fixtures_dir: Some(fixtures.to_path_buf()),
            start_daemon: false,
            prefix: "kof-bench-nospace",
            ..NodeOptions::default()
        });
        let store = node.store_dir();
        let fs = Tmpfs::mount(&store, "64m")?;
        node.start_daemon();
        let p = node
            .client()
            .prepare("kof/python", "bench", None)
            .context("preparing kof/python")?;
        let manifest = kof_fixtures::build::load_manifest(fixtures)?;
        let python3 = manifest
            .store_paths
            .keys()
            .find(|p| p.contains("-python3-3"))
            .context("no python3 path in the fixtures")?
            .clone();
        let file = |rel: &str| p.view_root.join(python3.trim_start_matches('/')).join(rel);
        let read = |f: &Path| std::fs::read(f);

        let t = Instant::now();
        read(&file(FILES[0])).with_context(|| format!("baseline read of {}", FILES[0]))?;
        let baseline = t.elapsed();

        fill(&store.join("filler"))?;
        let t = Instant::now();
        if read(&file(FILES[1])).is_ok() {
            bail!("a read of a new range succeeded on a full disk");
        }
        let failed = t.elapsed();

        let t = Instant::now();
        std::fs::remove_file(store.join("filler"))?;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match read(&file(FILES[1])) {
                Ok(_) => break,
                Err(e) if t.elapsed() < Duration::from_secs(60) => {
                    eprintln!("read after freeing space: {e}");
                }
                Err(e) => bail!("no recovery within 60 s: {e}"),
            }
        }
        let recover = t.elapsed();
        // The daemon and its FUSE server first, then the tmpfs, then the node's directory.
        drop(node.daemon.take());
        drop(fs);
        drop(node);
        Ok(NoSpaceRun {
            baseline_ms: ms(baseline),
            failed_read_ms: ms(failed),
            recover_ms: ms(recover),
            attempts,
        })
    }
}

/// The table.
pub fn table(r: &NoSpaceReport) -> String {
    let mut out = format!(
        "time to recover after ENOSPC (kof/python view, published cache, {} ms, {} B/s; {} runs)\n",
        r.latency_ms,
        r.bandwidth.map_or("unlimited".into(), |b| b.to_string()),
        r.runs.len()
    );
    out.push_str(&format!(
        "{:<28} {:>10}\n{:<28} {:>10.1}\n{:<28} {:>10.1}\n{:<28} {:>10.1}\n",
        "median",
        "ms",
        "cold read (baseline)",
        r.median_baseline_ms,
        "read on the full disk (EIO)",
        r.median_failed_read_ms,
        "recover (free -> read ok)",
        r.median_recover_ms
    ));
    out
}
