//! A whole publication: which paths, verification, skipping what is already published,
//! parallel workers, and the report.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kof_index::{Expected, IndexError, VerifiedIndex};
use kof_nar::nar::NarError;
use kof_nar::narinfo::NarInfoError;
use kof_nar::signature::{check_narinfo, SigCheck};
use kof_nar::{NarInfo, NixHash, PublicKey, SecretKey, StorePath};
use parking_lot::Mutex;
use serde::Serialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::nar_file::{check_nar, publish_nar, NarOptions};
use crate::out_dir::{self, file_err, DirLock, FileError, LockError};
use crate::source::{Source, SourceError, SourceNarInfo};

/// Which paths to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every path the source holds.
    All,
    /// These paths.
    Paths(Vec<StorePath>),
    /// These paths and everything they refer to.
    Closure(Vec<StorePath>),
}

/// How to publish.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Recompression.
    pub nar: NarOptions,
    /// Paths published at once.
    pub jobs: usize,
    /// When not empty, a narinfo must carry a valid signature by one of these keys.
    pub trusted_keys: Vec<PublicKey>,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            nar: NarOptions::default(),
            jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
            trusted_keys: Vec::new(),
        }
    }
}

/// Why one path was refused (nothing of it is written).
#[derive(Debug, Error)]
pub enum PublishError {
    /// The source does not have it.
    #[error("the source has no narinfo for it")]
    NotInSource,
    /// The source failed.
    #[error(transparent)]
    Source(Box<SourceError>),
    /// The narinfo does not parse.
    #[error("its narinfo does not parse")]
    NarInfo(#[source] NarInfoError),
    /// The narinfo is unsigned, or signed by no trusted key.
    #[error("its narinfo is not signed by a trusted key ({0})")]
    Untrusted(String),
    /// The NAR's size is not NarSize (`got` is a lower bound when it is longer).
    #[error("its NAR is {got} bytes, NarSize says {expected}")]
    NarSize {
        /// NarSize.
        expected: u64,
        /// What arrived.
        got: u64,
    },
    /// The NAR's hash is not NarHash.
    #[error("its NAR hashes to {got}, NarHash says {expected}")]
    NarHash {
        /// NarHash.
        expected: NixHash,
        /// What arrived.
        got: NixHash,
    },
    /// The NAR does not parse.
    #[error("its NAR is not a valid archive")]
    Nar(#[source] NarError),
    /// The index made is not valid (a chunk too large, say).
    #[error("its index is not valid")]
    Index(#[source] IndexError),
    /// Reading the spooled NAR back failed.
    #[error("reading the spooled NAR")]
    Spool(#[source] io::Error),
    /// The compressor could not be set up.
    #[error("setting up zstd")]
    Compress(#[source] io::Error),
    /// Writing into the output directory failed.
    #[error(transparent)]
    Write(FileError),
}

/// Why a whole run failed before publishing anything.
#[derive(Debug, Error)]
pub enum RunError {
    /// The output directory's lock.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// Writing `nix-cache-info`.
    #[error(transparent)]
    Write(#[from] FileError),
    /// The source could not list or describe the paths.
    #[error(transparent)]
    Source(Box<SourceError>),
}

impl From<SourceError> for PublishError {
    fn from(e: SourceError) -> Self {
        PublishError::Source(Box::new(e))
    }
}

impl From<SourceError> for RunError {
    fn from(e: SourceError) -> Self {
        RunError::Source(Box::new(e))
    }
}

/// A refused path.
#[derive(Debug)]
pub struct Refused {
    /// The path.
    pub path: StorePath,
    /// Why.
    pub error: PublishError,
}

/// What happened to one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathOutcome {
    /// Written.
    Published,
    /// Already there.
    Skipped,
    /// Refused.
    Refused,
}

/// What a run did.
#[derive(Debug, Default, Serialize)]
pub struct PublishReport {
    /// Paths written.
    pub published: usize,
    /// Paths already published.
    pub skipped: usize,
    /// Paths refused, each with its cause.
    #[serde(serialize_with = "ser_refused")]
    pub refused: Vec<Refused>,
    /// Bytes read from the source for the published paths, as downloaded (compressed).
    pub bytes_in: u64,
    /// NAR bytes of the published paths.
    pub nar_bytes: u64,
    /// Bytes of the NAR files written.
    pub bytes_out: u64,
    /// Chunks in the indexes written.
    pub chunks: u64,
    /// Wall time.
    #[serde(serialize_with = "ser_secs")]
    pub elapsed: Duration,
}

fn ser_refused<S: serde::Serializer>(r: &[Refused], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(r.iter().map(|r| {
        BTreeMap::from([
            ("path", r.path.to_absolute()),
            ("error", kof_node_api::report::chain(&r.error)),
        ])
    }))
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl PublishReport {
    /// NAR file bytes written per NAR byte published.
    pub fn ratio(&self) -> f64 {
        if self.nar_bytes == 0 {
            0.0
        } else {
            self.bytes_out as f64 / self.nar_bytes as f64
        }
    }

    /// NAR megabytes (10^6) published per second of wall time.
    pub fn nar_mb_per_s(&self) -> f64 {
        self.nar_bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Publishes paths from a [`Source`] into a cache directory.
pub struct Publisher {
    source: Source,
    dir: PathBuf,
    key: SecretKey,
    opts: PublishOptions,
}

struct Totals {
    report: PublishReport,
}

impl Publisher {
    /// A publisher of `source` into `dir`, signing indexes with `key`.
    pub fn new(source: Source, dir: &Path, key: SecretKey, opts: PublishOptions) -> Publisher {
        Publisher {
            source,
            dir: dir.to_path_buf(),
            key,
            opts,
        }
    }

    /// Runs the publication: locks the directory, writes `nix-cache-info`, then publishes
    /// every selected path (`jobs` at once). A refused path is named in the report; the
    /// others go on.
    pub fn run(&self, selection: &Selection) -> Result<PublishReport, RunError> {
        let started = Instant::now();
        let _lock = DirLock::take(&self.dir)?;
        if !self.dir.join("nix-cache-info").is_file() {
            out_dir::write_atomic(
                &self.dir,
                "nix-cache-info",
                self.source.cache_info()?.as_bytes(),
            )?;
        }
        let (work, mut refused) = self.select(selection)?;
        let totals = Mutex::new(Totals {
            report: PublishReport::default(),
        });
        let next = AtomicUsize::new(0);
        let jobs = self.opts.jobs.clamp(1, work.len().max(1));
        std::thread::scope(|s| {
            for _ in 0..jobs {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = work.get(i) else { break };
                    let result = self.publish_one(item);
                    let mut t = totals.lock();
                    match result {
                        Ok(Done::Skipped) => t.report.skipped += 1,
                        Ok(Done::Published {
                            bytes_in,
                            nar_bytes,
                            bytes_out,
                            chunks,
                        }) => {
                            t.report.published += 1;
                            t.report.bytes_in += bytes_in;
                            t.report.nar_bytes += nar_bytes;
                            t.report.bytes_out += bytes_out;
                            t.report.chunks += chunks;
                        }
                        Err(error) => {
                            tracing::warn!(path = %item.info.store_path,
                                error = %kof_node_api::report::chain(&error), "refused");
                            t.report.refused.push(Refused {
                                path: item.info.store_path.clone(),
                                error,
                            })
                        }
                    }
                });
            }
        });
        let mut report = totals.into_inner().report;
        report.refused.append(&mut refused);
        report.refused.sort_by(|a, b| a.path.cmp(&b.path));
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// The narinfos of the selected paths, and the paths refused while selecting (missing
    /// from the source, or a narinfo that does not parse).
    fn select(
        &self,
        selection: &Selection,
    ) -> Result<(Vec<SourceNarInfo>, Vec<Refused>), RunError> {
        let (roots, follow) = match selection {
            Selection::All => (self.source.all_paths()?, false),
            Selection::Paths(p) => (p.clone(), false),
            Selection::Closure(p) => (p.clone(), true),
        };
        let mut seen = BTreeSet::new();
        let mut todo = roots;
        let mut work = Vec::new();
        let mut refused = Vec::new();
        while let Some(path) = todo.pop() {
            if !seen.insert(path.clone()) {
                continue;
            }
            match self.source.narinfo(&path) {
                Ok(Some(n)) => {
                    if follow {
                        todo.extend(n.info.references_except_self().cloned());
                    }
                    work.push(n);
                }
                Ok(None) => refused.push(Refused {
                    path,
                    error: PublishError::NotInSource,
                }),
                Err(e) => refused.push(Refused {
                    path,
                    error: e.into(),
                }),
            }
        }
        // Largest first, so the long ones do not come last.
        work.sort_by_key(|n| std::cmp::Reverse(n.info.nar_size));
        Ok((work, refused))
    }

    fn publish_one(&self, item: &SourceNarInfo) -> Result<Done, PublishError> {
        let info = &item.info;
        if !self.opts.trusted_keys.is_empty() {
            match check_narinfo(info, &self.opts.trusted_keys) {
                SigCheck::Trusted(_) => {}
                SigCheck::Unsigned => return Err(PublishError::Untrusted("it is unsigned".into())),
                SigCheck::Untrusted(names) => {
                    return Err(PublishError::Untrusted(format!(
                        "signed only by {}",
                        names.join(", ")
                    )))
                }
                SigCheck::Invalid(name) => {
                    return Err(PublishError::Untrusted(format!(
                        "the signature by {name} does not verify"
                    )))
                }
            }
        }
        if self.already_published(info) {
            return Ok(Done::Skipped);
        }
        // Spool the decompressed NAR, hashing it; refuse before anything is visible.
        let spool_path =
            out_dir::tmp_path(&self.dir, &format!("{}.nar", info.store_path.hash_part()));
        let result = self.spool_and_publish(item, &spool_path);
        let _ = std::fs::remove_file(&spool_path);
        result
    }

    fn spool_and_publish(
        &self,
        item: &SourceNarInfo,
        spool_path: &Path,
    ) -> Result<Done, PublishError> {
        let info = &item.info;
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(spool_path)
            .map_err(|e| PublishError::Write(file_err("creating", spool_path)(e)))?;
        let mut spool = Spool {
            inner: BufWriter::with_capacity(1 << 20, file),
            sha: Sha256::new(),
            count: 0,
            limit: info.nar_size,
            too_long: false,
            failed: None,
        };
        let fetched = self.source.fetch_nar(info, &mut spool);
        if spool.too_long {
            return Err(PublishError::NarSize {
                expected: info.nar_size,
                got: spool.count,
            });
        }
        if let Some(e) = spool.failed.take() {
            return Err(PublishError::Write(file_err("writing", spool_path)(e)));
        }
        let bytes_in = fetched?;
        let Spool {
            inner, sha, count, ..
        } = spool;
        let mut file = inner
            .into_inner()
            .map_err(|e| PublishError::Write(file_err("writing", spool_path)(e.into_error())))?;
        check_nar(info, &NixHash(sha.finalize().into()), count)?;
        let published = publish_nar(&self.dir, &mut file, &item.text, &self.key, &self.opts.nar)?;
        Ok(Done::Published {
            bytes_in,
            nar_bytes: published.nar_size,
            bytes_out: published.file_size,
            chunks: published.chunks as u64,
        })
    }

    /// Whether `info`'s path is published already: narinfo for the same NarHash, its NAR
    /// file of FileSize bytes, and an index that verifies with this publisher's key.
    fn already_published(&self, info: &NarInfo) -> bool {
        let hash = info.store_path.hash_part();
        let Ok(text) = std::fs::read_to_string(self.dir.join(format!("{hash}.narinfo"))) else {
            return false;
        };
        let Ok(have) = NarInfo::parse(&text) else {
            return false;
        };
        if have.store_path != info.store_path
            || have.nar_hash != info.nar_hash
            || have.nar_size != info.nar_size
        {
            return false;
        }
        let nar_ok = std::fs::metadata(self.dir.join(&have.url))
            .is_ok_and(|m| Some(m.len()) == have.file_size);
        let Ok(index) = std::fs::read(self.dir.join(kof_index::index_file_name(&info.store_path)))
        else {
            return false;
        };
        nar_ok
            && VerifiedIndex::open(
                &index,
                Expected {
                    store_path: &have.store_path,
                    nar_hash: &have.nar_hash,
                    nar_size: have.nar_size,
                },
                &[self.key.public()],
            )
            .is_ok_and(|v| {
                v.index()
                    .chunks
                    .last()
                    .is_some_and(|c| c.file_offset + c.file_len <= have.file_size.unwrap_or(0))
            })
    }
}

enum Done {
    Skipped,
    Published {
        bytes_in: u64,
        nar_bytes: u64,
        bytes_out: u64,
        chunks: u64,
    },
}

/// The spooled NAR on its way to disk: hashed and counted. A write failure is kept, so it is
/// told apart from a source failure.
struct Spool {
    inner: BufWriter<File>,
    sha: Sha256,
    count: u64,
    /// NarSize: a NAR growing past it is cut off (a hostile source cannot fill the disk).
    limit: u64,
    too_long: bool,
    failed: Option<io::Error>,
}

impl Write for Spool {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.count + buf.len() as u64 > self.limit {
            self.too_long = true;
            self.count += buf.len() as u64;
            return Err(io::Error::other("the NAR is longer than NarSize"));
        }
        match self.inner.write(buf) {
            Ok(n) => {
                self.sha.update(&buf[..n]);
                self.count += n as u64;
                Ok(n)
            }
            Err(e) => {
                let kind = e.kind();
                self.failed = Some(e);
                Err(io::Error::new(kind, "writing the spooled NAR failed"))
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
