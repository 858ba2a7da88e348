//! Resolved environment generations and the gc roots that keep them.

use kof_nar::StorePath;
use rusqlite::{params, OptionalExtension, Row};

use crate::error::StoreError;
use crate::ingest::now;
use crate::{EnvironmentRecord, Store};

/// An environment generation gc keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootRecord {
    /// FloxHub owner.
    pub owner: String,
    /// Environment name.
    pub name: String,
    /// Generation.
    pub generation: u64,
    /// Pinned roots stay until removed; an unpinned (live) one is replaced by the next.
    pub pinned: bool,
    /// Unix time it was set.
    pub created_at: i64,
}

fn paths_json(paths: &[StorePath]) -> Result<String, StoreError> {
    let v: Vec<String> = paths.iter().map(|p| p.base_name()).collect();
    Ok(serde_json::to_string(&v)?)
}

fn paths_from_json(s: &str) -> Result<Vec<StorePath>, StoreError> {
    let v: Vec<String> = serde_json::from_str(s)?;
    v.iter()
        .map(|p| {
            StorePath::from_base_name(p).map_err(|source| StoreError::CorruptStorePath {
                what: "environment store path",
                value: p.clone(),
                source,
            })
        })
        .collect()
}

const ENV_COLUMNS: &str =
    "owner, name, generation, system, lockfile, vars, hook, history, roots, closure, resolved_at";

fn env_row(r: &Row<'_>) -> Result<EnvironmentRecord, StoreError> {
    Ok(EnvironmentRecord {
        owner: r.get(0)?,
        name: r.get(1)?,
        generation: r.get::<_, i64>(2)? as u64,
        system: r.get(3)?,
        lockfile: r.get(4)?,
        vars: serde_json::from_str(&r.get::<_, String>(5)?)?,
        hook: r.get(6)?,
        history: serde_json::from_str(&r.get::<_, String>(7)?)?,
        roots: paths_from_json(&r.get::<_, String>(8)?)?,
        closure: paths_from_json(&r.get::<_, String>(9)?)?,
        resolved_at: r.get(10)?,
    })
}

impl Store {
    /// Records a resolved environment generation (replacing an earlier record of the same
    /// owner, name and generation; its last use is kept).
    pub fn put_environment(&self, env: &EnvironmentRecord) -> Result<(), StoreError> {
        let conn = self.db.get()?;
        conn.execute(
            &format!(
                "INSERT INTO environments ({ENV_COLUMNS})
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (owner, name, generation) DO UPDATE SET
                   system = excluded.system, lockfile = excluded.lockfile,
                   vars = excluded.vars, hook = excluded.hook, history = excluded.history,
                   roots = excluded.roots, closure = excluded.closure,
                   resolved_at = excluded.resolved_at"
            ),
            params![
                env.owner,
                env.name,
                env.generation as i64,
                env.system,
                env.lockfile,
                serde_json::to_string(&env.vars)?,
                env.hook,
                serde_json::to_string(&env.history)?,
                paths_json(&env.roots)?,
                paths_json(&env.closure)?,
                env.resolved_at
            ],
        )?;
        Ok(())
    }

    /// A recorded environment generation.
    pub fn get_environment(
        &self,
        owner: &str,
        name: &str,
        generation: u64,
    ) -> Result<Option<EnvironmentRecord>, StoreError> {
        self.environment_row(ENV_COLUMNS, owner, name, generation, |r| Ok(env_row(r)))?
            .transpose()
    }

    /// `columns` of generation `generation` of `owner/name` in `environments`, read by `read`;
    /// `None` if it is not recorded.
    fn environment_row<T>(
        &self,
        columns: &str,
        owner: &str,
        name: &str,
        generation: u64,
        read: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Option<T>, StoreError> {
        let conn = self.db.get()?;
        let found = conn
            .prepare_cached(&format!(
                "SELECT {columns} FROM environments
                 WHERE owner = ? AND name = ? AND generation = ?"
            ))?
            .query_row(params![owner, name, generation as i64], read)
            .optional()?;
        Ok(found)
    }

    /// Every recorded environment generation, by owner, name and generation.
    pub fn list_environments(&self) -> Result<Vec<EnvironmentRecord>, StoreError> {
        let conn = self.db.get()?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {ENV_COLUMNS} FROM environments ORDER BY owner, name, generation"
        ))?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(env_row(r)?);
        }
        Ok(out)
    }

    /// Marks an environment generation (which must be recorded) as kept by gc. A live
    /// (unpinned) root replaces the environment's previous unpinned root; pinned roots stay
    /// until removed. Setting an unpinned root on a pinned generation leaves it pinned.
    pub fn set_root(
        &self,
        owner: &str,
        name: &str,
        generation: u64,
        pinned: bool,
    ) -> Result<(), StoreError> {
        let mut conn = self.db.get()?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let recorded = tx
            .query_row(
                "SELECT 1 FROM environments WHERE owner = ? AND name = ? AND generation = ?",
                params![owner, name, generation as i64],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if !recorded {
            return Err(StoreError::EnvironmentNotFound {
                owner: owner.to_string(),
                name: name.to_string(),
                generation,
            });
        }
        if !pinned {
            tx.execute(
                "DELETE FROM roots WHERE owner = ? AND name = ? AND pinned = 0 AND generation != ?",
                params![owner, name, generation as i64],
            )?;
        }
        tx.execute(
            "INSERT INTO roots (owner, name, generation, pinned, created_at) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (owner, name, generation) DO UPDATE SET pinned = max(pinned, excluded.pinned)",
            params![owner, name, generation as i64, pinned as i64, now()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Runs the statement `sql` with `params`: whether it changed any row.
    fn changed_a_row(&self, sql: &str, params: impl rusqlite::Params) -> Result<bool, StoreError> {
        let conn = self.db.get()?;
        Ok(conn.execute(sql, params)? > 0)
    }

    /// Removes a root; `false` if there was none.
    pub fn remove_root(
        &self,
        owner: &str,
        name: &str,
        generation: u64,
    ) -> Result<bool, StoreError> {
        self.changed_a_row(
            "DELETE FROM roots WHERE owner = ? AND name = ? AND generation = ?",
            params![owner, name, generation as i64],
        )
    }

    /// Records that a lease, prepare or prefetch used the generation now
    /// (`environments.last_used_at`, for least-recently-used eviction); `false` if it is not
    /// recorded.
    pub fn touch_environment(
        &self,
        owner: &str,
        name: &str,
        generation: u64,
    ) -> Result<bool, StoreError> {
        self.changed_a_row(
            "UPDATE environments SET last_used_at = ? WHERE owner = ? AND name = ? AND generation = ?",
            params![now(), owner, name, generation as i64],
        )
    }

    /// When the generation was last used (unix time; `None` if never, or not recorded).
    pub fn environment_last_used(
        &self,
        owner: &str,
        name: &str,
        generation: u64,
    ) -> Result<Option<i64>, StoreError> {
        let used = self.environment_row("last_used_at", owner, name, generation, |r| {
            r.get::<_, Option<i64>>(0)
        })?;
        Ok(used.flatten())
    }

    /// Every root, by owner, name and generation.
    pub fn roots(&self) -> Result<Vec<RootRecord>, StoreError> {
        let conn = self.db.get()?;
        let mut stmt = conn.prepare_cached(
            "SELECT owner, name, generation, pinned, created_at FROM roots
             ORDER BY owner, name, generation",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(RootRecord {
                owner: r.get(0)?,
                name: r.get(1)?,
                generation: r.get::<_, i64>(2)? as u64,
                pinned: r.get::<_, i64>(3)? != 0,
                created_at: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
