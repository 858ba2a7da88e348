//! Ingest of a NAR stream in two steps, so that a path becomes valid only with its References
//! (Nix's closure rule) while downloads and parsing run in parallel:
//!
//! 1. **prepare** ([`Store::prepare_nar`]): contents go into objects as the NAR is parsed, the
//!    NAR's own sha256 and length are checked against the narinfo at the end, the new objects
//!    are fsynced and get their `objects` rows. The result, a [`PreparedPath`], holds the tree
//!    and narinfo rows in memory; nothing of the path is visible.
//! 2. **commit** ([`Store::commit_prepared`]): one SQLite transaction makes one or more
//!    prepared paths visible, and refuses ([`StoreError::MissingReference`]) a path whose
//!    References (other than itself) are neither stored nor committed in the same transaction.
//!
//! A prepared path dropped uncommitted leaves objects that no path uses: they deduplicate the
//! next ingest of the same content, and gc removes them. [`Store::ingest_nar`] is both steps for
//! one path whose References are stored already.
//!
//! Memory stays bounded whatever the NAR: a file up to [`SMALL_FILE_MAX`] is buffered whole,
//! a larger one goes through FastCDC one chunk (at most [`CHUNK_MAX`]) at a time.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;

use fastcdc::v2020::StreamCDC;
use kof_nar::hash::HashingReader;
use kof_nar::nar::{self, NarError, NarVisitor};
use kof_nar::{NarInfo, StorePath};
use parking_lot::{Condvar, Mutex};
use rusqlite::{params, Connection, OptionalExtension};
use tracing::{debug, warn};

use crate::error::StoreError;
use crate::objects::{Digest, ObjectInfo};
use crate::tree::{KIND_DIRECTORY, KIND_REGULAR, KIND_SYMLINK};
use crate::{IngestStats, Store};

/// Files up to this size are one object each; larger ones are split by FastCDC.
///
/// 1 MiB because: most files in store paths are far smaller, and splitting a file that is at
/// most four average chunks long buys little sharing for more rows; it bounds what one ingest
/// buffers per file; and it equals [`CHUNK_MAX`], so every object is at most 1 MiB and a read
/// of any byte range of a compressed object decompresses at most 1 MiB.
pub const SMALL_FILE_MAX: u64 = 1 << 20;
/// FastCDC minimum chunk size.
pub const CHUNK_MIN: u32 = 64 << 10;
/// FastCDC average chunk size: 256 KiB keeps the chunk count of a 100 MiB library near 400
/// while a few changed bytes cost about one chunk.
pub const CHUNK_AVG: u32 = 256 << 10;
/// FastCDC maximum chunk size.
pub const CHUNK_MAX: u32 = 1 << 20;

/// A node row as it will be inserted.
#[derive(Debug)]
struct NodeRow {
    id: i64,
    parent: Option<i64>,
    name: Option<Vec<u8>>,
    kind: i64,
    executable: bool,
    size: Option<u64>,
    target: Option<Vec<u8>>,
    digest: Option<Digest>,
    chunked: bool,
    nar_offset: Option<u64>,
}

#[derive(Debug)]
struct ChunkRow {
    offset: u64,
    size: u64,
    object: Digest,
}

/// Collects a path's tree while its contents are written into objects.
struct IngestVisitor<'a> {
    conn: &'a Connection,
    nodes: Vec<NodeRow>,
    stack: Vec<i64>,
    /// New objects go to this ingest's writer thread (see [`ObjectWriter`]).
    writer: Option<SyncSender<(Digest, Vec<u8>)>>,
    /// Every object the path uses.
    referenced: HashSet<Digest>,
    chunk_lists: HashMap<Digest, Vec<ChunkRow>>,
}

fn visitor_err(e: StoreError) -> NarError {
    NarError::Visitor(Box::new(e))
}

impl IngestVisitor<'_> {
    fn push(&mut self, name: Option<&[u8]>, mut row: NodeRow) -> i64 {
        let id = self.nodes.len() as i64;
        row.id = id;
        row.parent = if name.is_some() {
            self.stack.last().copied()
        } else {
            None
        };
        row.name = name.map(|n| n.to_vec());
        self.nodes.push(row);
        id
    }

    /// Makes sure the object `digest` with content `data` exists, handing it to the writer if
    /// the store has no row for it.
    fn ensure_object(&mut self, digest: Digest, data: Vec<u8>) -> Result<(), StoreError> {
        if !self.referenced.insert(digest) {
            return Ok(());
        }
        let known = self
            .conn
            .prepare_cached("SELECT 1 FROM objects WHERE digest = ?")?
            .query_row([&digest.0[..]], |_| Ok(()))
            .optional()?
            .is_some();
        if !known {
            let sent = self
                .writer
                .as_ref()
                .is_some_and(|w| w.send((digest, data)).is_ok());
            if !sent {
                // The writer stopped on an error, which the ingest reports once it joins it.
                return Err(StoreError::WriterStopped);
            }
        }
        Ok(())
    }

    fn node(kind: i64) -> NodeRow {
        NodeRow {
            id: 0,
            parent: None,
            name: None,
            kind,
            executable: false,
            size: None,
            target: None,
            digest: None,
            chunked: false,
            nar_offset: None,
        }
    }
}

/// Feeds the bytes it passes on to a BLAKE3 hasher.
struct HashTee<'a, R> {
    inner: R,
    hasher: &'a mut blake3::Hasher,
}

impl<R: Read> Read for HashTee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl NarVisitor for IngestVisitor<'_> {
    fn enter_directory(&mut self, name: Option<&[u8]>) -> Result<(), NarError> {
        let id = self.push(name, Self::node(KIND_DIRECTORY));
        self.stack.push(id);
        Ok(())
    }

    fn leave_directory(&mut self) -> Result<(), NarError> {
        self.stack.pop();
        Ok(())
    }

    fn symlink(&mut self, name: Option<&[u8]>, target: &[u8]) -> Result<(), NarError> {
        let mut row = Self::node(KIND_SYMLINK);
        row.target = Some(target.to_vec());
        self.push(name, row);
        Ok(())
    }

    fn regular(
        &mut self,
        name: Option<&[u8]>,
        executable: bool,
        size: u64,
        nar_offset: u64,
        contents: &mut dyn Read,
    ) -> Result<(), NarError> {
        let (digest, chunked) = if size <= SMALL_FILE_MAX {
            let mut buf = Vec::with_capacity(size as usize);
            contents.read_to_end(&mut buf)?;
            let digest = Digest::of(&buf);
            self.ensure_object(digest, buf).map_err(visitor_err)?;
            (digest, false)
        } else {
            let mut hasher = blake3::Hasher::new();
            let mut list = Vec::new();
            let tee = HashTee {
                inner: contents,
                hasher: &mut hasher,
            };
            let mut total = 0u64;
            for chunk in StreamCDC::new(tee, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX) {
                let chunk = chunk.map_err(|e| match e {
                    fastcdc::v2020::Error::IoError(io) => NarError::Io(io),
                    other => NarError::Io(std::io::Error::other(other.to_string())),
                })?;
                let d = Digest::of(&chunk.data);
                list.push(ChunkRow {
                    offset: chunk.offset,
                    size: chunk.length as u64,
                    object: d,
                });
                self.ensure_object(d, chunk.data).map_err(visitor_err)?;
                total += chunk.length as u64;
            }
            debug_assert_eq!(
                total, size,
                "the NAR parser yields exactly the file's bytes"
            );
            let digest = Digest::from(hasher.finalize());
            self.chunk_lists.entry(digest).or_insert(list);
            (digest, true)
        };
        let mut row = Self::node(KIND_REGULAR);
        row.executable = executable;
        row.size = Some(size);
        row.digest = Some(digest);
        row.chunked = chunked;
        row.nar_offset = Some(nar_offset);
        self.push(name, row);
        Ok(())
    }
}

/// Compresses and writes one ingest's new objects on a thread of its own, so that for a large
/// path the parse, hashing and chunking (on the ingest's thread) overlap with compression and
/// file creation (here): measured on a 2-core node, those two halves cost about the same, and
/// one thread doing both held a single big path to one core. The queue is bounded, so at most
/// `QUEUE` objects (each at most `CHUNK_MAX`) wait in memory.
struct ObjectWriter {
    sender: SyncSender<(Digest, Vec<u8>)>,
    thread: std::thread::JoinHandle<Result<HashMap<Digest, ObjectInfo>, StoreError>>,
}

impl ObjectWriter {
    const QUEUE: usize = 8;

    fn start(store: &Store) -> ObjectWriter {
        let (sender, rx) = sync_channel::<(Digest, Vec<u8>)>(Self::QUEUE);
        let objects = store.objects.clone();
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name("kof-object-writer".into())
            .spawn(move || {
                let _span = span.enter();
                let mut written = HashMap::new();
                for (digest, data) in rx {
                    let info = objects.write(digest, &data)?;
                    written.insert(digest, info);
                }
                Ok(written)
            })
            .expect("spawning the object writer thread");
        ObjectWriter { sender, thread }
    }

    /// Closes the queue and returns what was written.
    fn finish(self) -> Result<HashMap<Digest, ObjectInfo>, StoreError> {
        drop(self.sender);
        self.thread
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

/// Parses and discards a NAR (for re-ingest of a stored path, which still verifies the stream).
struct DiscardVisitor;

impl NarVisitor for DiscardVisitor {}

/// Store paths being ingested by this process, so a second ingest of the same path waits for
/// the first and then finds it stored; and the objects of prepared paths not yet committed,
/// which gc keeps.
#[derive(Default)]
pub(crate) struct InFlight {
    paths: Mutex<HashSet<StorePath>>,
    done: Condvar,
    pins: Arc<Mutex<HashMap<Digest, usize>>>,
}

/// The objects one [`PreparedPath`] uses, kept from gc until it is committed or dropped.
#[derive(Debug)]
struct ObjectPins {
    registry: Arc<Mutex<HashMap<Digest, usize>>>,
    digests: Vec<Digest>,
}

impl Drop for ObjectPins {
    fn drop(&mut self) {
        let mut pins = self.registry.lock();
        for d in &self.digests {
            if let std::collections::hash_map::Entry::Occupied(mut e) = pins.entry(*d) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }
}

pub(crate) struct InFlightGuard<'a> {
    set: &'a InFlight,
    path: StorePath,
}

impl InFlight {
    /// Whether gc must keep object `digest`: a prepared path not yet committed uses it.
    pub(crate) fn is_pinned(&self, digest: &Digest) -> bool {
        self.pins.lock().contains_key(digest)
    }

    /// Keeps `digests` from gc until the returned pins are dropped.
    fn pin(&self, digests: &HashSet<Digest>) -> ObjectPins {
        let mut pins = self.pins.lock();
        for d in digests {
            *pins.entry(*d).or_default() += 1;
        }
        ObjectPins {
            registry: self.pins.clone(),
            digests: digests.iter().copied().collect(),
        }
    }

    pub(crate) fn claim(&self, path: &StorePath) -> InFlightGuard<'_> {
        let mut paths = self.paths.lock();
        while paths.contains(path) {
            self.done.wait(&mut paths);
        }
        paths.insert(path.clone());
        InFlightGuard {
            set: self,
            path: path.clone(),
        }
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        let mut paths = self.set.paths.lock();
        paths.remove(&self.path);
        self.set.done.notify_all();
    }
}

fn nar_error(path: &StorePath, e: NarError) -> StoreError {
    match e {
        NarError::Visitor(b) => match b.downcast::<StoreError>() {
            Ok(se) => *se,
            Err(other) => StoreError::Nar {
                path: path.clone(),
                source: NarError::Visitor(other),
            },
        },
        source => StoreError::Nar {
            path: path.clone(),
            source,
        },
    }
}

fn check_hash<R>(info: &NarInfo, hashing: HashingReader<R>) -> Result<u64, StoreError> {
    let (got, count, _) = hashing.finish();
    if count != info.nar_size {
        return Err(StoreError::NarSizeMismatch {
            path: info.store_path.clone(),
            expected: info.nar_size,
            got: count,
        });
    }
    if got != info.nar_hash {
        return Err(StoreError::NarHashMismatch {
            path: info.store_path.clone(),
            expected: info.nar_hash,
            got,
        });
    }
    Ok(count)
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A store path prepared for [`Store::commit_prepared`]: its NAR was read whole and matched
/// its NarHash and NarSize, every object it uses is written, fsynced and has its `objects`
/// row, and its tree and narinfo rows are ready in memory. Nothing of it is visible: no
/// `paths` row, no tree.
///
/// Until it is committed or dropped, gc in this process keeps its objects (they are pinned).
/// Dropped uncommitted, it leaves only objects no path uses, which gc removes like any other
/// unused object. Until then they deduplicate: a later ingest of the same content (the next
/// try of a failed fetch) finds their rows and writes nothing again.
#[derive(Debug)]
pub struct PreparedPath {
    info: NarInfo,
    source_cache: String,
    /// The path was stored when it was prepared: its commit does nothing.
    already_stored: bool,
    nodes: Vec<NodeRow>,
    chunk_lists: HashMap<Digest, Vec<ChunkRow>>,
    referenced: HashSet<Digest>,
    stats: IngestStats,
    /// Keeps the objects from gc in this process until the path is committed or dropped.
    _pins: Option<ObjectPins>,
}

impl PreparedPath {
    /// The store path.
    pub fn store_path(&self) -> &StorePath {
        &self.info.store_path
    }

    /// Its References, as the narinfo gave them (may include itself).
    pub fn references(&self) -> &[StorePath] {
        &self.info.references
    }

    /// What preparing it did (bytes read, objects written).
    pub fn stats(&self) -> &IngestStats {
        &self.stats
    }

    /// Whether the path was stored already when it was prepared (its commit is a no-op).
    pub fn already_stored(&self) -> bool {
        self.already_stored
    }
}

impl Store {
    /// Ingests the uncompressed NAR of `info.store_path` read from `nar`: [`Store::prepare_nar`]
    /// then [`Store::commit_prepared`] of that one path. Its References (other than itself) must
    /// already be stored, else it fails with [`StoreError::MissingReference`] and nothing
    /// becomes visible. Safe to call from several threads at once for different paths; a second
    /// ingest of a path being prepared waits for the first. Ingesting a path already stored is a
    /// no-op that still consumes and verifies the stream.
    pub fn ingest_nar(
        &self,
        info: &NarInfo,
        source_cache: &str,
        nar: &mut dyn Read,
    ) -> Result<IngestStats, StoreError> {
        let prepared = self.prepare_nar(info, source_cache, nar)?;
        let stats = prepared.stats.clone();
        self.commit_prepared(vec![prepared])?;
        Ok(stats)
    }

    /// Reads the NAR of `info.store_path` from `nar` into objects and checks its sha256 and size
    /// against `info.nar_hash` / `info.nar_size`; makes nothing visible (see [`PreparedPath`]).
    /// On any error no object it wrote has a row (gc's orphan sweep removes their files).
    pub fn prepare_nar(
        &self,
        info: &NarInfo,
        source_cache: &str,
        nar: &mut dyn Read,
    ) -> Result<PreparedPath, StoreError> {
        let path = &info.store_path;
        // Held while objects are written and found present: gc in this process waits, so an
        // object found present is not removed before it is pinned (see `InFlight::pin`; the
        // commit checks again that every object still has its row).
        let _gc = self.gc_guard.read();
        let _claim = self.inflight.claim(path);
        let mut hashing = HashingReader::new(nar);

        if self.has_path(path)? {
            nar::parse(&mut hashing, &mut DiscardVisitor).map_err(|e| nar_error(path, e))?;
            let nar_bytes = check_hash(info, hashing)?;
            if let Some(stored) = self.path_info(path)? {
                if stored.nar_hash != info.nar_hash {
                    warn!(%path, stored = %stored.nar_hash, offered = %info.nar_hash,
                        "path already stored with another NarHash; keeping the stored one");
                }
            }
            return Ok(PreparedPath {
                info: info.clone(),
                source_cache: source_cache.to_string(),
                already_stored: true,
                nodes: Vec::new(),
                chunk_lists: HashMap::new(),
                referenced: HashSet::new(),
                stats: IngestStats {
                    nar_bytes,
                    ..IngestStats::default()
                },
                _pins: None,
            });
        }

        let mut conn = self.db.get()?;
        let writer = ObjectWriter::start(self);
        let mut v = IngestVisitor {
            conn: &conn,
            nodes: Vec::new(),
            stack: Vec::new(),
            writer: Some(writer.sender.clone()),
            referenced: HashSet::new(),
            chunk_lists: HashMap::new(),
        };
        let parsed = nar::parse(&mut hashing, &mut v);
        v.writer = None;
        // The writer's own error (a full disk, say) explains a parse stopped by it.
        let written = writer.finish()?;
        parsed.map_err(|e| nar_error(path, e))?;
        let nar_bytes = check_hash(info, hashing)?;
        let IngestVisitor {
            nodes,
            referenced,
            chunk_lists,
            ..
        } = v;
        if !written.is_empty() {
            self.objects.sync_filesystem()?;
            let _writer = self.db.write_guard();
            register_objects(&mut conn, &written)
                .map_err(|e| e.naming_db(&self.dir.join("db.sqlite")))?;
        }
        let stats = IngestStats {
            nar_bytes,
            new_stored_bytes: written.values().map(|o| o.stored_size).sum(),
            new_objects: written.len() as u64,
            objects: referenced.len() as u64,
        };
        debug!(%path, ?stats, "prepared");
        // Pinned before `_gc` is released: no gc in this process sees them unpinned.
        let pins = self.inflight.pin(&referenced);
        Ok(PreparedPath {
            info: info.clone(),
            source_cache: source_cache.to_string(),
            already_stored: false,
            nodes,
            chunk_lists,
            referenced,
            stats,
            _pins: Some(pins),
        })
    }

    /// Makes `paths` visible in one transaction, all or none, following Nix's closure rule: a
    /// path becomes valid only with its References. Each reference of each path (other than
    /// itself) must be stored already or be among `paths`, else the commit fails with
    /// [`StoreError::MissingReference`] naming the first such path and reference, and nothing
    /// becomes visible (the prepared paths are consumed; their objects stay for gc or the next
    /// try). Fails with [`StoreError::PreparedObjectGone`] if gc removed an object a path uses
    /// after it was prepared.
    ///
    /// Returns, per path in order, whether this commit stored it (`false`: it was stored
    /// already, by this or another process).
    pub fn commit_prepared(&self, paths: Vec<PreparedPath>) -> Result<Vec<bool>, StoreError> {
        // A full disk names the database file (`SQLITE_FULL`: the transaction rolled back).
        self.commit_prepared_in_tx(paths)
            .map_err(|e| e.naming_db(&self.dir.join("db.sqlite")))
    }

    fn commit_prepared_in_tx(&self, paths: Vec<PreparedPath>) -> Result<Vec<bool>, StoreError> {
        let mut conn = self.db.get()?;
        let _writer = self.db.write_guard();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let batch: HashSet<&StorePath> = paths.iter().map(|p| p.store_path()).collect();
        let mut out = Vec::with_capacity(paths.len());
        for p in paths.iter().filter(|p| !p.already_stored) {
            for r in &p.info.references {
                if r == p.store_path() || batch.contains(r) {
                    continue;
                }
                let valid = tx
                    .prepare_cached("SELECT 1 FROM paths WHERE store_path = ?")?
                    .exists([r.base_name()])?;
                if !valid {
                    return Err(StoreError::MissingReference {
                        path: p.store_path().clone(),
                        reference: r.clone(),
                    });
                }
            }
        }
        for p in &paths {
            out.push(!p.already_stored && insert_path(&tx, p)?);
        }
        tx.commit()?;
        for (p, stored) in paths.iter().zip(&out) {
            debug!(path = %p.store_path(), stored, "committed");
        }
        Ok(out)
    }
}

/// Gives the objects a prepare wrote their rows (they are durable: synced before).
fn register_objects(
    conn: &mut Connection,
    written: &HashMap<Digest, ObjectInfo>,
) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut ins = tx.prepare_cached(
            "INSERT OR IGNORE INTO objects (digest, size, stored_size, codec) VALUES (?, ?, ?, ?)",
        )?;
        for o in written.values() {
            ins.execute(params![
                &o.digest.0[..],
                o.size as i64,
                o.stored_size as i64,
                o.codec.to_sql()
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Inserts one prepared path's rows inside the commit's transaction; `false` if the path is
/// stored already (another process stored it meanwhile).
fn insert_path(tx: &rusqlite::Transaction<'_>, p: &PreparedPath) -> Result<bool, StoreError> {
    let info = &p.info;
    let base = info.store_path.base_name();
    let exists = tx
        .prepare_cached("SELECT 1 FROM paths WHERE store_path = ?")?
        .exists([&base])?;
    if exists {
        return Ok(false);
    }
    {
        let mut present = tx.prepare_cached("SELECT 1 FROM objects WHERE digest = ?")?;
        for d in &p.referenced {
            if !present.exists([&d.0[..]])? {
                return Err(StoreError::PreparedObjectGone {
                    path: info.store_path.clone(),
                    digest: *d,
                });
            }
        }
        let mut ins = tx.prepare_cached(
            "INSERT OR IGNORE INTO chunks (file_digest, idx, offset, size, object)
             VALUES (?, ?, ?, ?, ?)",
        )?;
        for (file, list) in &p.chunk_lists {
            for (i, c) in list.iter().enumerate() {
                ins.execute(params![
                    &file.0[..],
                    i as i64,
                    c.offset as i64,
                    c.size as i64,
                    &c.object.0[..]
                ])?;
            }
        }
        let sigs: Vec<String> = info.sigs.iter().map(|s| s.to_string()).collect();
        tx.execute(
            "INSERT INTO paths (store_path, nar_hash, nar_size, deriver, sigs, ca, source_cache,
                                registered_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            params![
                base,
                info.nar_hash.to_nix_string(),
                info.nar_size as i64,
                info.deriver,
                serde_json::to_string(&sigs)?,
                info.ca,
                p.source_cache,
                now()
            ],
        )?;
        let path_id = tx.last_insert_rowid();
        let mut ins =
            tx.prepare_cached("INSERT OR IGNORE INTO refs (path_id, reference) VALUES (?, ?)")?;
        for r in &info.references {
            ins.execute(params![path_id, r.base_name()])?;
        }
        let mut ins = tx.prepare_cached(
            "INSERT INTO nodes (path_id, id, parent, name, kind, executable, size, target, digest,
                                chunked, nar_offset)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )?;
        for n in &p.nodes {
            ins.execute(params![
                path_id,
                n.id,
                n.parent,
                n.name,
                n.kind,
                n.executable as i64,
                n.size.map(|s| s as i64),
                n.target,
                n.digest.map(|d| d.0.to_vec()),
                n.chunked as i64,
                n.nar_offset.map(|o| o as i64)
            ])?;
        }
    }
    tx.execute("DELETE FROM fetches WHERE store_path = ?", [&base])?;
    Ok(true)
}
