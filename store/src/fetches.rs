//! Fetch state: which store paths a fetcher started and has not (yet) stored, and why a failed
//! one failed, so an operator (and `kof-store stats`) can see interrupted and failing fetches.
//!
//! The fetcher records a start and a failure; the commit that makes a path visible deletes its
//! row in the same transaction, so a path is never both stored and listed here.
//!
//! Liveness: a start records the fetching process's pid and its start time (field 22 of
//! `/proc/<pid>/stat`, clock ticks since boot). [`Store::fetch_states`] reports a `fetching`
//! row as [`FetchStateKind::Interrupted`] when that process is gone, or when the pid now belongs
//! to another process (its start time differs). The row stays until the path is fetched again
//! (the next run redoes the path, reusing the objects already written). The pid is the one the
//! recording process sees; the daemon runs with the host's pid namespace (`hostPID`), as does
//! `kof-store` on the node. A row without a pid (written before schema 3) reads as `fetching`.

use kof_nar::StorePath;
use rusqlite::params;

use crate::error::StoreError;
use crate::ingest::now;
use crate::Store;

/// Where a listed fetch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FetchStateKind {
    /// Started and not finished, by a process that is still running.
    Fetching,
    /// Started and not finished, and the process that started it is gone (killed, crashed).
    Interrupted,
    /// Ended in an error.
    Failed,
}

/// One row of fetch state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchState {
    /// The store path.
    pub store_path: StorePath,
    /// Where it stands.
    pub state: FetchStateKind,
    /// The URL it was (being) fetched from.
    pub source: String,
    /// The error, for a failed fetch.
    pub error: Option<String>,
    /// Starts recorded since the path was last stored.
    pub attempts: u64,
    /// Unix time of the last change.
    pub updated_at: i64,
    /// The process that recorded the last start, if known.
    pub pid: Option<u32>,
}

/// The start time of process `pid` in clock ticks since boot (field 22 of `/proc/<pid>/stat`),
/// or `None` if there is no such process.
pub(crate) fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or parentheses itself:
    // fields are counted from the last ')'. After it comes field 3, so field 22 is the 20th.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// Whether the process `pid`, started at `start` (clock ticks since boot, when known), still
/// runs.
fn process_alive(pid: u32, start: Option<u64>) -> bool {
    match (process_start_time(pid), start) {
        (Some(now), Some(start)) => now == start,
        (found, None) => found.is_some(),
        (None, Some(_)) => false,
    }
}

impl Store {
    /// Records that this process started a fetch of `path` from `source` (with this process's
    /// pid and start time, so that the row reads as interrupted once the process is gone).
    pub fn record_fetch_started(&self, path: &StorePath, source: &str) -> Result<(), StoreError> {
        let pid = std::process::id();
        let start = process_start_time(pid).map(|t| t as i64);
        let conn = self.db.get()?;
        let _writer = self.db.write_guard();
        conn.execute(
            "INSERT INTO fetches (store_path, state, source, error, attempts, updated_at, pid,
                                  pid_start)
             VALUES (?1, 'fetching', ?2, NULL, 1, ?3, ?4, ?5)
             ON CONFLICT (store_path) DO UPDATE SET state = 'fetching', source = ?2,
                 error = NULL, attempts = attempts + 1, updated_at = ?3, pid = ?4,
                 pid_start = ?5",
            params![path.base_name(), source, now(), pid, start],
        )?;
        Ok(())
    }

    /// Records that the fetch of `path` failed with `error` (unless the path got stored
    /// meanwhile, by another fetch). The source stays that of the last recorded start.
    pub fn record_fetch_failed(&self, path: &StorePath, error: &str) -> Result<(), StoreError> {
        let conn = self.db.get()?;
        let _writer = self.db.write_guard();
        conn.execute(
            "INSERT INTO fetches (store_path, state, source, error, attempts, updated_at)
             SELECT ?1, 'failed', '', ?2, 0, ?3
             WHERE NOT EXISTS (SELECT 1 FROM paths WHERE store_path = ?1)
             ON CONFLICT (store_path) DO UPDATE SET state = 'failed', error = ?2, updated_at = ?3",
            params![path.base_name(), error, now()],
        )?;
        Ok(())
    }

    /// Every fetch started and not stored, by store path; a `fetching` row whose process is
    /// gone reads as [`FetchStateKind::Interrupted`].
    pub fn fetch_states(&self) -> Result<Vec<FetchState>, StoreError> {
        let conn = self.db.get()?;
        let mut stmt = conn.prepare_cached(
            "SELECT store_path, state, source, error, attempts, updated_at, pid, pid_start
             FROM fetches ORDER BY store_path",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, Option<i64>>(6)?,
                r.get::<_, Option<i64>>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (path, state, source, error, attempts, updated_at, pid, pid_start) = row?;
            let pid = pid.and_then(|p| u32::try_from(p).ok());
            let store_path = StorePath::from_base_name(&path).map_err(|source| {
                StoreError::CorruptStorePath {
                    what: "fetches row",
                    value: path.clone(),
                    source,
                }
            })?;
            let state = match (state.as_str(), pid, pid_start) {
                ("fetching", Some(pid), start) if !process_alive(pid, start.map(|s| s as u64)) => {
                    FetchStateKind::Interrupted
                }
                ("fetching", ..) => FetchStateKind::Fetching,
                _ => FetchStateKind::Failed,
            };
            out.push(FetchState {
                store_path,
                state,
                source,
                error,
                attempts: attempts as u64,
                updated_at,
                pid,
            });
        }
        Ok(out)
    }
}
