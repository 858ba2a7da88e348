//! The SQLite metadata database: schema, migrations, and a small pool of connections so that
//! several threads can read and ingest at once (SQLite in WAL mode serialises the writers;
//! `busy_timeout` makes them wait for each other instead of failing).
//!
//! Tables:
//! - `paths`: one row per visible store path, with its narinfo data. A row exists only once
//!   the path's objects are durable and its NarHash matched.
//! - `refs`: the References of each path (base names).
//! - `nodes`: each path's tree, one row per file, directory or symlink, numbered in NAR order
//!   (pre-order, entries sorted) so `ORDER BY id` replays the NAR. A regular file names its
//!   whole-content BLAKE3 `digest`; if `chunked` it is split into the `chunks` rows of that
//!   digest, otherwise the digest is the object itself. `nar_offset` is where the file's
//!   contents start in the NAR (for HTTP range requests).
//! - `chunks`: the chunk list of each chunked file content, shared by every path holding it.
//! - `objects`: every object with a file on disk: size, stored size, codec.
//! - `environments`, `roots`: resolved environment generations and the ones gc must keep.
//! - `fetches` (schema 2): store paths whose fetch started and has not ended in a stored path:
//!   `fetching` (a fetch is under way, or was when its process died) or `failed` (with the
//!   error). The row goes in the same transaction that makes the path visible.
//! - schema 3: `fetches.pid` and `fetches.pid_start` (the fetching process and its start time
//!   in clock ticks since boot, from `/proc/<pid>/stat`) so a row whose process died can be
//!   told from a fetch under way; `environments.last_used_at` (unix time a lease or prefetch
//!   last used the generation, for least-recently-used eviction); `gc_runs`, one row per
//!   collection (when, why, what it freed) for `kof-store stats` and the metrics.

use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::Connection;

use crate::error::StoreError;

/// The schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 3;

const SCHEMA_V1: &str = "
CREATE TABLE paths (
    id INTEGER PRIMARY KEY,
    store_path TEXT NOT NULL UNIQUE,
    nar_hash TEXT NOT NULL,
    nar_size INTEGER NOT NULL,
    deriver TEXT,
    sigs TEXT NOT NULL,
    ca TEXT,
    source_cache TEXT NOT NULL,
    registered_at INTEGER NOT NULL
);
CREATE TABLE refs (
    path_id INTEGER NOT NULL REFERENCES paths(id) ON DELETE CASCADE,
    reference TEXT NOT NULL,
    PRIMARY KEY (path_id, reference)
) WITHOUT ROWID;
CREATE TABLE nodes (
    path_id INTEGER NOT NULL REFERENCES paths(id) ON DELETE CASCADE,
    id INTEGER NOT NULL,
    parent INTEGER,
    name BLOB,
    kind INTEGER NOT NULL,
    executable INTEGER NOT NULL DEFAULT 0,
    size INTEGER,
    target BLOB,
    digest BLOB,
    chunked INTEGER NOT NULL DEFAULT 0,
    nar_offset INTEGER,
    PRIMARY KEY (path_id, id)
) WITHOUT ROWID;
CREATE INDEX nodes_by_parent ON nodes(path_id, parent, name);
CREATE INDEX nodes_by_digest ON nodes(digest);
CREATE TABLE chunks (
    file_digest BLOB NOT NULL,
    idx INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    size INTEGER NOT NULL,
    object BLOB NOT NULL,
    PRIMARY KEY (file_digest, idx)
) WITHOUT ROWID;
CREATE INDEX chunks_by_object ON chunks(object);
CREATE TABLE objects (
    digest BLOB PRIMARY KEY,
    size INTEGER NOT NULL,
    stored_size INTEGER NOT NULL,
    codec INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE environments (
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    generation INTEGER NOT NULL,
    system TEXT NOT NULL,
    lockfile TEXT NOT NULL,
    vars TEXT NOT NULL,
    hook TEXT,
    history TEXT NOT NULL,
    roots TEXT NOT NULL,
    closure TEXT NOT NULL,
    resolved_at INTEGER NOT NULL,
    PRIMARY KEY (owner, name, generation)
);
CREATE TABLE roots (
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    generation INTEGER NOT NULL,
    pinned INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (owner, name, generation)
);
";

const SCHEMA_V2: &str = "
CREATE TABLE fetches (
    store_path TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('fetching', 'failed')),
    source TEXT NOT NULL,
    error TEXT,
    attempts INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
";

const SCHEMA_V3: &str = "
ALTER TABLE fetches ADD COLUMN pid INTEGER;
ALTER TABLE fetches ADD COLUMN pid_start INTEGER;
ALTER TABLE environments ADD COLUMN last_used_at INTEGER;
CREATE TABLE gc_runs (
    id INTEGER PRIMARY KEY,
    started_at INTEGER NOT NULL,
    finished_at INTEGER NOT NULL,
    trigger TEXT NOT NULL,
    paths_removed INTEGER NOT NULL,
    objects_removed INTEGER NOT NULL,
    bytes_freed INTEGER NOT NULL,
    derived_bytes_freed INTEGER NOT NULL
);
";

/// Brings the database at `conn` to [`SCHEMA_VERSION`], one step per version, each step in its
/// own transaction.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        match version {
            SCHEMA_VERSION => return Ok(()),
            v if v > SCHEMA_VERSION => {
                return Err(StoreError::SchemaTooNew {
                    found: v,
                    supported: SCHEMA_VERSION,
                })
            }
            0 => {
                tx.execute_batch(SCHEMA_V1)?;
                tx.pragma_update(None, "user_version", 1)?;
            }
            1 => {
                tx.execute_batch(SCHEMA_V2)?;
                tx.pragma_update(None, "user_version", 2)?;
            }
            2 => {
                tx.execute_batch(SCHEMA_V3)?;
                tx.pragma_update(None, "user_version", 3)?;
            }
            v => {
                return Err(StoreError::CorruptMetadata(format!(
                    "no migration from schema version {v}"
                )))
            }
        }
        tx.commit()?;
    }
}

fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(60))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL in WAL mode: a power loss may drop the last commits but never corrupts; every
    // object a committed row names was fsynced before the commit.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// A pool of connections to one database file.
pub(crate) struct Pool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// Serialises this process's write transactions. SQLite allows one writer at a time; left
    /// to itself, a second writer spins in the busy handler, which sleeps in steps of up to
    /// 100 ms (measured: parallel ingests spent seconds in those sleeps). Writers of other
    /// processes still meet through `busy_timeout`.
    writer: Mutex<()>,
}

impl Pool {
    /// Opens the database at `path`, migrating it.
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn = connect(path)?;
        migrate(&mut conn)?;
        Ok(Pool {
            path: path.to_path_buf(),
            idle: Mutex::new(vec![conn]),
            writer: Mutex::new(()),
        })
    }

    /// Held for the duration of a write transaction (see `writer`).
    pub(crate) fn write_guard(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.writer.lock()
    }

    /// A connection, returned to the pool when dropped.
    pub(crate) fn get(&self) -> Result<PooledConn<'_>, StoreError> {
        let idle = self.idle.lock().pop();
        let conn = match idle {
            Some(c) => c,
            None => connect(&self.path)?,
        };
        Ok(PooledConn {
            pool: self,
            conn: Some(conn),
        })
    }
}

/// A connection borrowed from a [`Pool`].
pub(crate) struct PooledConn<'a> {
    pool: &'a Pool,
    conn: Option<Connection>,
}

impl std::ops::Deref for PooledConn<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn.as_ref().expect("connection present until drop")
    }
}

impl std::ops::DerefMut for PooledConn<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        self.conn.as_mut().expect("connection present until drop")
    }
}

impl Drop for PooledConn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            // A connection left inside a transaction (an error path) is not reused.
            if c.is_autocommit() {
                let mut idle = self.pool.idle.lock();
                if idle.len() < 8 {
                    idle.push(c);
                }
            }
        }
    }
}
