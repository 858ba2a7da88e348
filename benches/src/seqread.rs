//! Sequential read of a large cached file through the FUSE view against the same bytes read
//! natively from the same disk.
//!
//! A file of incompressible bytes is written, made into a store path (`kof_nar::dump_path`,
//! ingested by `Store::ingest_nar` with a narinfo built here, its NarHash computed), and served
//! by a `kof_fuse` mount of `kof_lazy::LazyContent` over the store: with passthrough
//! (the kernel reads the store's object file) and without (every read answered by the FUSE
//! server). Each pass reads the whole file with 1 MiB reads. Warm-cache passes (the file read
//! once untimed first) always; cold-cache passes (`echo 3 > /proc/sys/vm/drop_caches` before
//! each) on request. Native is the source file the store path was made from, on the same file
//! system as the store.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use kof_fuse::{Entry, MountOptions};
use kof_lazy::{entry_of_tree, Ensure, LazyContent, LocalReader};
use kof_nar::hash::HashingReader;
use kof_nar::store_path::StorePath;
use kof_nar::NarInfo;
use kof_store::Store;
use serde::Serialize;

use crate::prefetch::median;

/// The store path's base name (a fixed, valid hash part).
const BASE_NAME: &str = "q3m8w1a8v7z5x9c2b4n6p0l1k3j5h7g9-kof-bench-seqread";
/// Read size.
const READ_SIZE: usize = 1 << 20;

/// Every byte is in the store: a read that needs fetching is a defect of the view, reported
/// as EIO instead of fetched.
struct AllLocal;

impl Ensure for AllLocal {
    fn ensure(&self, store_path: &str, start: u64, end: u64) -> std::io::Result<()> {
        Err(std::io::Error::other(format!(
            "{store_path} bytes {start}..{end} are not local, though the whole path is stored"
        )))
    }

    /// Stored paths are verified.
    fn gate(&self, _store_path: &str) -> std::io::Result<()> {
        Ok(())
    }
}

/// One side's passes.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// MB/s (1e6 bytes) of each warm-cache pass.
    pub warm_mb_s: Vec<f64>,
    /// MB/s of each cold-cache pass (empty unless asked).
    pub cold_mb_s: Vec<f64>,
    /// FUSE read requests answered by the server during the timed passes (0 for native; ~0
    /// when passthrough serves the file).
    pub fuse_reads: u64,
}

/// What it measured.
#[derive(Debug, Clone, Serialize)]
pub struct SeqReadReport {
    /// File size in bytes.
    pub size: u64,
    /// Reads of the source file (same disk).
    pub native: Side,
    /// Through the view, passthrough on.
    pub passthrough: Side,
    /// Through the view, passthrough off.
    pub fuse: Side,
    /// Median warm MB/s, passthrough / native.
    pub passthrough_ratio: f64,
    /// Median warm MB/s, no passthrough / native.
    pub fuse_ratio: f64,
    /// Median cold MB/s ratios (when measured).
    pub cold_passthrough_ratio: Option<f64>,
    /// Same, no passthrough.
    pub cold_fuse_ratio: Option<f64>,
}

/// Writes `size` incompressible bytes (xorshift64*) to `path`.
fn write_random(path: &Path, size: u64) -> Result<()> {
    let mut f = std::io::BufWriter::with_capacity(READ_SIZE, std::fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; READ_SIZE];
    let mut left = size;
    while left > 0 {
        for chunk in buf.chunks_exact_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            chunk.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.into_inner()?.sync_all()?;
    Ok(())
}

/// Reads `path` whole with 1 MiB reads; MB/s.
fn read_pass(path: &Path, expect: u64) -> Result<f64> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; READ_SIZE];
    let mut total = 0u64;
    let start = Instant::now();
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let s = start.elapsed().as_secs_f64();
    if total != expect {
        bail!("{}: read {total} bytes, expected {expect}", path.display());
    }
    Ok(total as f64 / 1e6 / s)
}

fn drop_caches() -> Result<()> {
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")
}

/// `runs` warm passes (after one untimed) and, when `cold`, `runs` cold passes.
fn passes(path: &Path, size: u64, runs: usize, cold: bool) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut c = Vec::new();
    if cold {
        for _ in 0..runs {
            drop_caches()?;
            c.push(read_pass(path, size)?);
        }
    }
    read_pass(path, size)?;
    let w = (0..runs)
        .map(|_| read_pass(path, size))
        .collect::<Result<Vec<_>>>()?;
    Ok((w, c))
}

fn fuse_reads(m: &kof_fuse::Mounted) -> u64 {
    m.op_stats().ops.get("read").map_or(0, |s| s.count)
}

/// Runs it with a file of `size` bytes under `work` (a directory on the disk to measure).
pub fn run(work: &Path, size: u64, runs: usize, cold: bool) -> Result<SeqReadReport> {
    let dir = tempfile::Builder::new()
        .prefix("kof-bench-seqread")
        .tempdir_in(work)?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src)?;
    let data = src.join("data");
    write_random(&data, size)?;

    // The store path: its NAR, hashed, then ingested.
    let nar_file = dir.path().join("path.nar");
    kof_nar::nar::dump_path(
        &src,
        std::io::BufWriter::new(std::fs::File::create(&nar_file)?),
    )?
    .into_inner()
    .map_err(|e| e.into_error())?
    .sync_all()?;
    let mut hashing = HashingReader::new(std::fs::File::open(&nar_file)?);
    std::io::copy(&mut hashing, &mut std::io::sink())?;
    let (nar_hash, nar_size, _) = hashing.finish();
    let store_path = StorePath::parse(BASE_NAME)?;
    let info = NarInfo::parse(&format!(
        "StorePath: {}\nURL: nar/seqread.nar\nCompression: none\nNarHash: {}\nNarSize: {nar_size}\nReferences: \n",
        store_path.to_absolute(),
        nar_hash.to_nix_string()
    ))?;
    let store = Arc::new(Store::open(&dir.path().join("store"))?);
    store.ingest_nar(&info, "kof-bench", &mut std::fs::File::open(&nar_file)?)?;
    std::fs::remove_file(&nar_file)?;
    let entry = Arc::new(
        entry_of_tree(BASE_NAME, &store.tree(&store_path)?)
            .map_err(|e| anyhow::anyhow!("{BASE_NAME}: {e}"))?,
    );
    let root = Arc::new(Entry::Directory(BTreeMap::from([(
        OsString::from(BASE_NAME),
        entry,
    )])));

    let (nw, nc) = passes(&data, size, runs, cold)?;
    let native = Side {
        warm_mb_s: nw,
        cold_mb_s: nc,
        fuse_reads: 0,
    };
    let view = |passthrough: bool| -> Result<Side> {
        let mnt = dir
            .path()
            .join(if passthrough { "mnt-pt" } else { "mnt-fuse" });
        std::fs::create_dir_all(&mnt)?;
        let source = Arc::new(LazyContent::new(
            LocalReader::new(store.clone()),
            Arc::new(AllLocal),
        ));
        let m = kof_fuse::mount(
            &mnt,
            source,
            MountOptions {
                passthrough,
                fs_name: "kof-bench".into(),
                ..MountOptions::default()
            },
        )?;
        m.add_view("v", root.clone())?;
        let file = mnt.join("v").join(BASE_NAME).join("data");
        let before = fuse_reads(&m);
        let measured = passes(&file, size, runs, cold);
        let reads = fuse_reads(&m) - before;
        m.unmount()?;
        let (w, c) = measured?;
        Ok(Side {
            warm_mb_s: w,
            cold_mb_s: c,
            fuse_reads: reads,
        })
    };
    let passthrough = view(true)?;
    let fuse = view(false)?;
    let ratio = |a: &[f64], b: &[f64]| {
        if a.is_empty() || b.is_empty() {
            None
        } else {
            Some(median(a) / median(b))
        }
    };
    Ok(SeqReadReport {
        size,
        passthrough_ratio: median(&passthrough.warm_mb_s) / median(&native.warm_mb_s),
        fuse_ratio: median(&fuse.warm_mb_s) / median(&native.warm_mb_s),
        cold_passthrough_ratio: ratio(&passthrough.cold_mb_s, &native.cold_mb_s),
        cold_fuse_ratio: ratio(&fuse.cold_mb_s, &native.cold_mb_s),
        native,
        passthrough,
        fuse,
    })
}
