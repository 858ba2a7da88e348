//! gc on a live node (issue 13's figures): the store's size over the 20 generations of one
//! environment, with and without a quota, the time of a collection, and the reads that failed
//! while gc ran.
//!
//! The environment is the fixtures' `kof/series`: generation after generation one package
//! upgraded to its next point release, bash installed, upgraded and uninstalled on the way.
//! Each side runs a fresh node (the real `kof-fetcherd` and its FUSE server, the published
//! cache, prefetch of whole closures, views kept idle for an hour after their last lease).
//! `kof/series:1` stays leased throughout (a pod pinned to the first generation, never
//! redeployed) while readers read every file of its closure through its view, again and
//! again. The other pods of the environment are redeployed generation by generation, 1 to 20,
//! as a rolling update does it: generation N is prepared (leased), fetched whole and its
//! installed packages read, and only then is generation N-1's lease released. After each
//! step, once the quota's collection has settled, the store's size is sampled
//! (`kof_store_bytes`: objects, metadata, derived data). Without a quota nothing is collected
//! and the size only grows; with one (`store_max_bytes` = the pinned generation's size, its
//! raw copies included, plus `--headroom-mib`) the daemon evicts derived data, garbage and
//! least recently used idle views. At the end, with the pinned generation and generation 20
//! still leased, a manual `gc` is timed on each node.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kof_fixtures::build::Manifest;
use kof_nar::StorePath;
use kof_store::Store;
use kof_testkit::{Node, NodeOptions};
use serde::Serialize;

/// The environment redeployed.
pub const ENVIRONMENT: &str = "kof/series";
/// Its generations in the sequence (1 to this).
pub const GENERATIONS: u32 = 20;
/// The generation leased and read throughout.
pub const PINNED: u32 = 1;

/// The bench.
pub struct GcBench {
    /// Room above the leased generation's size the quota allows, MiB.
    pub headroom_mib: u64,
    /// Reader threads reading the leased view.
    pub readers: usize,
}

/// The store's size after one generation of the sequence.
#[derive(Debug, Clone, Serialize)]
pub struct GcStep {
    /// `owner/name:N`.
    pub generation: String,
    /// The sum of its closure's NarSize, bytes.
    pub closure_nar_size: u64,
    /// Bytes without a quota.
    pub bytes_no_quota: u64,
    /// Bytes with the quota.
    pub bytes_quota: u64,
}

/// One side's totals.
#[derive(Debug, Clone, Serialize)]
pub struct GcSide {
    /// Its quota, bytes (none: unlimited).
    pub quota: Option<u64>,
    /// Collections by quota.
    pub quota_runs: u64,
    /// Their total time, seconds.
    pub quota_gc_seconds: f64,
    /// Bytes they freed (store and derived).
    pub freed_bytes: u64,
    /// The manual `gc` at the end: its time, seconds, and what it freed.
    pub manual_gc_seconds: f64,
    /// Bytes the manual gc freed.
    pub manual_gc_freed: u64,
    /// Reads of the pinned generation's files through its view.
    pub reads: u64,
    /// Those that failed.
    pub reads_failed: u64,
    /// Reads of each redeployed generation's installed packages through its view, once it is
    /// leased and fetched, that failed.
    pub rollout_reads_failed: u64,
    /// Peak size sampled.
    pub peak_bytes: u64,
    /// Size at the end.
    pub final_bytes: u64,
}

/// What it measured.
#[derive(Debug, Clone, Serialize)]
pub struct GcReport {
    /// The pinned generation's size (kof/series:1, stored whole, its raw copies written),
    /// bytes.
    pub leased_bytes: u64,
    /// The store's size after each generation.
    pub steps: Vec<GcStep>,
    /// Without a quota.
    pub no_quota: GcSide,
    /// With it.
    pub quota: GcSide,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn metrics(port: u16) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn sample(text: &str, series: &str) -> Result<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .with_context(|| format!("no {series} in the daemon's metrics"))
}

fn store_bytes(port: u16) -> Result<u64> {
    Ok(sample(&metrics(port)?, "kof_store_bytes")? as u64)
}

/// The store's size once it stops changing (raw copies are written in the background): the
/// same sample three times in a row, half a second apart, or the last one after 60 s.
fn settled_bytes(port: u16) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut last, mut same) = (store_bytes(port)?, 0);
    while same < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let now = store_bytes(port)?;
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    Ok(last)
}

/// One generation of the sequence.
struct Step {
    number: u32,
    roots: Vec<String>,
    closure: Vec<String>,
    closure_nar_size: u64,
}

/// Generations 1 to [`GENERATIONS`] of [`ENVIRONMENT`].
fn sequence(manifest: &Manifest) -> Result<Vec<Step>> {
    let (owner, name) = ENVIRONMENT.split_once('/').context("owner/name")?;
    let e = manifest.environment(owner, name).with_context(|| {
        format!("no fixture environment {ENVIRONMENT}: rebuild the fixtures with this kof-fixtures")
    })?;
    (1..=GENERATIONS)
        .map(|n| {
            let g = e
                .generation(n)
                .with_context(|| format!("no generation {n} of {ENVIRONMENT}"))?;
            Ok(Step {
                number: n,
                roots: g.roots.clone(),
                closure: g.closure.clone(),
                closure_nar_size: g.closure_nar_size,
            })
        })
        .collect()
}

fn wait_stored(store: &Store, closure: &[String]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    for p in closure {
        let path = StorePath::from_base_name(p.trim_start_matches("/nix/store/"))?;
        while !store.has_path(&path)? {
            if Instant::now() > deadline {
                bail!("{p} not stored after 300 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Reads every regular file under `dir` (bytes read, or the first error).
fn read_tree(dir: &Path) -> std::io::Result<u64> {
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.is_dir() {
        let mut n = 0;
        for e in std::fs::read_dir(dir)? {
            n += read_tree(&e?.path())?;
        }
        Ok(n)
    } else if meta.is_file() {
        Ok(std::fs::read(dir)?.len() as u64)
    } else {
        Ok(0)
    }
}

struct Side {
    samples: Vec<u64>,
    totals: GcSide,
    leased_bytes: u64,
}

impl GcBench {
    /// Runs both sides against the fixtures in `fixtures`.
    pub fn run(&self, fixtures: &Path) -> Result<GcReport> {
        let manifest = kof_fixtures::build::load_manifest(fixtures)?;
        let seq = sequence(&manifest)?;
        eprintln!("without a quota: {ENVIRONMENT}:1..{GENERATIONS}");
        let a = self.side(fixtures, &seq, None)?;
        let quota = a.leased_bytes + (self.headroom_mib << 20);
        eprintln!("with store_max_bytes = {quota}: {ENVIRONMENT}:1..{GENERATIONS}");
        let b = self.side(fixtures, &seq, Some(quota))?;
        let steps = seq
            .iter()
            .enumerate()
            .map(|(i, g)| GcStep {
                generation: format!("{ENVIRONMENT}:{}", g.number),
                closure_nar_size: g.closure_nar_size,
                bytes_no_quota: a.samples[i],
                bytes_quota: b.samples[i],
            })
            .collect();
        Ok(GcReport {
            leased_bytes: a.leased_bytes,
            steps,
            no_quota: a.totals,
            quota: b.totals,
        })
    }

    fn side(&self, fixtures: &Path, seq: &[Step], quota: Option<u64>) -> Result<Side> {
        let port = free_port()?;
        let mut extra = "idle_view_secs = 3600\n".to_string();
        if let Some(q) = quota {
            extra.push_str(&format!("store_max_bytes = {q}\n"));
        }
        let node = Node::new(NodeOptions {
            flavour: "published",
            prefetch: Some("closure"),
            metrics_port: Some(port),
            extra_config: extra,
            fixtures_dir: Some(fixtures.to_path_buf()),
            prefix: "kof-bench-gc",
            ..NodeOptions::default()
        });
        let store = Store::open(&node.store_dir())?;
        let mut c = node.client();
        let pinned = format!("{ENVIRONMENT}:{PINNED}");
        let kept = &seq
            .iter()
            .find(|g| g.number == PINNED)
            .context("the pinned generation is in the sequence")?
            .closure;
        let leased = c
            .prepare(&pinned, "pinned", None)
            .with_context(|| format!("preparing {pinned}"))?;
        wait_stored(&store, kept)?;
        // One read of every file first: the raw copies its passthrough opens write belong to
        // the pinned generation's working set.
        for p in kept {
            read_tree(&leased.view_root.join(p.trim_start_matches('/')))?;
        }
        let leased_bytes = settled_bytes(port)?;

        let stop = Arc::new(AtomicBool::new(false));
        let (reads, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut readers = Vec::new();
        for r in 0..self.readers {
            let (stop, reads, failed) = (stop.clone(), reads.clone(), failed.clone());
            let dirs: Vec<_> = kept
                .iter()
                .map(|p| leased.view_root.join(p.trim_start_matches('/')))
                .collect();
            readers.push(std::thread::spawn(move || {
                let mut i = r;
                while !stop.load(Ordering::Relaxed) {
                    if read_tree(&dirs[i % dirs.len()]).is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            }));
        }

        let mut samples = Vec::new();
        let mut peak = leased_bytes;
        let mut rollout_failed = 0;
        let mut previous: Option<String> = None;
        for g in seq {
            let name = format!("{ENVIRONMENT}:{}", g.number);
            let lease = format!("rollout-{}", g.number);
            let p = c
                .prepare(&name, &lease, None)
                .with_context(|| format!("preparing {name}"))?;
            wait_stored(&store, &g.closure)?;
            // The new pods run: what they installed is read.
            for root in &g.roots {
                if read_tree(&p.view_root.join(root.trim_start_matches('/'))).is_err() {
                    rollout_failed += 1;
                }
            }
            peak = peak.max(store_bytes(port)?);
            // The previous generation's pods go once the new ones run.
            if let Some(old) = previous.replace(lease) {
                c.release(&old)?;
            }
            // The quota's collection, prompted by the release, settles.
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut bytes = store_bytes(port)?;
            while quota.is_some_and(|q| bytes > q) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
                bytes = store_bytes(port)?;
            }
            eprintln!("  {name}: {:.1} MiB", bytes as f64 / 1048576.0);
            samples.push(bytes);
        }
        let done = c.gc(false).context("the manual gc")?;
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            let _ = r.join();
        }
        let text = metrics(port)?;
        let final_bytes = store_bytes(port)?;
        Ok(Side {
            samples,
            leased_bytes,
            totals: GcSide {
                quota,
                quota_runs: sample(&text, "kof_gc_runs_total{trigger=\"quota\"}")? as u64,
                quota_gc_seconds: sample(&text, "kof_gc_duration_seconds_sum")? - done.elapsed_secs,
                freed_bytes: sample(&text, "kof_gc_bytes_freed_total")? as u64,
                manual_gc_seconds: done.elapsed_secs,
                manual_gc_freed: done.bytes_freed + done.derived_bytes_freed,
                reads: reads.load(Ordering::Relaxed),
                reads_failed: failed.load(Ordering::Relaxed),
                rollout_reads_failed: rollout_failed,
                peak_bytes: peak,
                final_bytes,
            },
        })
    }
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / 1048576.0)
}

/// The report as text tables.
pub fn table(r: &GcReport) -> String {
    let mut out = format!(
        "store size (MiB) over {} generations of {ENVIRONMENT}, redeployed one after the other \
         (generation N-1 released once N is up); {ENVIRONMENT}:{PINNED} leased and read \
         throughout ({} MiB)\n",
        r.steps.len(),
        mib(r.leased_bytes)
    );
    out.push_str(&format!(
        "{:>3}  {:<16} {:>8} {:>12} {:>12}\n",
        "#",
        "generation",
        "closure",
        "no quota",
        format!("quota {}", mib(r.quota.quota.unwrap_or(0)))
    ));
    for (i, s) in r.steps.iter().enumerate() {
        out.push_str(&format!(
            "{:>3}  {:<16} {:>8} {:>12} {:>12}\n",
            i + 1,
            s.generation,
            mib(s.closure_nar_size),
            mib(s.bytes_no_quota),
            mib(s.bytes_quota)
        ));
    }
    for (name, s) in [("no quota", &r.no_quota), ("quota", &r.quota)] {
        out.push_str(&format!(
            "{name}: peak {} MiB, final {} MiB; {} quota collections ({:.3} s in all), {} MiB freed; manual gc {:.3} s freed {} MiB; reads of the pinned view during gc: {} ({} failed); reads of redeployed generations failed: {}\n",
            mib(s.peak_bytes),
            mib(s.final_bytes),
            s.quota_runs,
            s.quota_gc_seconds,
            mib(s.freed_bytes),
            s.manual_gc_seconds,
            mib(s.manual_gc_freed),
            s.reads,
            s.reads_failed,
            s.rollout_reads_failed
        ));
    }
    out
}
