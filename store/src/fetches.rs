//! Fetch state: which store paths a fetcher started and has not (yet) stored, and why a failed
//! one failed, so an operator (and `kof-store stats`) can see interrupted and failing fetches.
//!
//! The fetcher records a start and a failure; the ingest that makes a path visible deletes its
//! row in the same transaction, so a path is never both stored and listed here. A `fetching`
//! row whose process died stays until the path is fetched again (the next run redoes the path
//! from scratch, reusing objects already written).

use kof_nar::StorePath;
use rusqlite::params;

use crate::error::StoreError;
use crate::ingest::now;
use crate::Store;

/// Where a listed fetch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FetchStateKind {
    /// Started and not finished (or its process died).
    Fetching,
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
}

impl Store {
    /// Records that a fetch of `path` from `source` started.
    pub fn record_fetch_started(&self, path: &StorePath, source: &str) -> Result<(), StoreError> {
        let conn = self.db.get()?;
        let _writer = self.db.write_guard();
        conn.execute(
            "INSERT INTO fetches (store_path, state, source, error, attempts, updated_at)
             VALUES (?1, 'fetching', ?2, NULL, 1, ?3)
             ON CONFLICT (store_path) DO UPDATE SET state = 'fetching', source = ?2,
                 error = NULL, attempts = attempts + 1, updated_at = ?3",
            params![path.base_name(), source, now()],
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

    /// Every fetch started and not stored, by store path.
    pub fn fetch_states(&self) -> Result<Vec<FetchState>, StoreError> {
        let conn = self.db.get()?;
        let mut stmt = conn.prepare_cached(
            "SELECT store_path, state, source, error, attempts, updated_at FROM fetches
             ORDER BY store_path",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (path, state, source, error, attempts, updated_at) = row?;
            let store_path = StorePath::from_base_name(&path).map_err(|source| {
                StoreError::CorruptStorePath {
                    what: "fetches row",
                    value: path.clone(),
                    source,
                }
            })?;
            let state = match state.as_str() {
                "fetching" => FetchStateKind::Fetching,
                _ => FetchStateKind::Failed,
            };
            out.push(FetchState {
                store_path,
                state,
                source,
                error,
                attempts: attempts as u64,
                updated_at,
            });
        }
        Ok(out)
    }
}
