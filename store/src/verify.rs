//! Verification: re-hash every object and every chunked file and name what is corrupt, and
//! check Nix's closure rule (every stored path's References are stored).

use std::io::Read;

use kof_nar::StorePath;

use crate::error::StoreError;
use crate::objects::{Codec, Digest, ObjectInfo};
use crate::tree::{pieces, FileContent};
use crate::Store;

/// What is corrupt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorruptItem {
    /// An object whose file is missing, unreadable, or does not hash to its digest.
    Object(Digest),
    /// A chunked file whose chunks do not reassemble to its whole-content digest, or whose
    /// chunk list is broken.
    File(Digest),
    /// A regular file whose object has no row (metadata damage).
    MissingObjectRow(Digest),
}

/// One problem [`Store::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    /// The object or file.
    pub item: CorruptItem,
    /// What is wrong.
    pub reason: String,
    /// The stored paths holding it, sorted.
    pub store_paths: Vec<StorePath>,
}

/// The outcome of [`Store::verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Objects re-hashed.
    pub objects_checked: u64,
    /// Chunked files reassembled and re-hashed.
    pub files_checked: u64,
    /// Everything found wrong; empty if the store is sound.
    pub problems: Vec<Corruption>,
    /// Stored paths with a reference that is not stored (see [`Store::check_closure_rule`]).
    pub dangling_references: Vec<DanglingReference>,
}

/// A stored path whose reference is not stored: a break of Nix's closure rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DanglingReference {
    /// The stored path.
    pub path: StorePath,
    /// Its reference that is not stored.
    pub reference: StorePath,
}

impl VerifyReport {
    /// Whether nothing was found wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty() && self.dangling_references.is_empty()
    }
}

/// Hashes an object stream, returning its digest and length.
fn hash_stream(r: &mut dyn Read) -> std::io::Result<(Digest, u64)> {
    let mut h = blake3::Hasher::new();
    let n = std::io::copy(r, &mut h)?;
    Ok((Digest::from(h.finalize()), n))
}

impl Store {
    /// Every stored path with a reference (other than itself) that is not stored, sorted. Empty
    /// on a store that keeps Nix's closure rule, which commits enforce
    /// ([`Store::commit_prepared`]); rows written before that rule (or by hand) can break it.
    pub fn check_closure_rule(&self) -> Result<Vec<DanglingReference>, StoreError> {
        let conn = self.db.get()?;
        let mut stmt = conn.prepare_cached(
            "SELECT p.store_path, r.reference FROM refs r JOIN paths p ON p.id = r.path_id
             WHERE r.reference != p.store_path
               AND NOT EXISTS (SELECT 1 FROM paths q WHERE q.store_path = r.reference)
             ORDER BY p.store_path, r.reference",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let parse = |what, v: String| {
            StorePath::from_base_name(&v).map_err(|source| StoreError::CorruptStorePath {
                what,
                value: v.clone(),
                source,
            })
        };
        let mut out = Vec::new();
        for row in rows {
            let (path, reference) = row?;
            out.push(DanglingReference {
                path: parse("stored path", path)?,
                reference: parse("reference", reference)?,
            });
        }
        Ok(out)
    }

    /// Re-hashes every object (BLAKE3 of its decompressed content, and its size) and every
    /// chunked file (its chunks reassembled against its whole-content digest), and checks
    /// that every single-object file has its object row and every stored path's References are
    /// stored ([`Store::check_closure_rule`]). Reads everything: slow on big stores.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport {
            dangling_references: self.check_closure_rule()?,
            ..VerifyReport::default()
        };
        let conn = self.db.get()?;
        let objects: Vec<ObjectInfo> = {
            let mut stmt = conn.prepare("SELECT digest, size, stored_size, codec FROM objects")?;
            let mut rows = stmt.query([])?;
            let mut v = Vec::new();
            while let Some(r) = rows.next()? {
                v.push(ObjectInfo {
                    digest: Digest::from_sql(r.get(0)?)?,
                    size: r.get::<_, i64>(1)? as u64,
                    stored_size: r.get::<_, i64>(2)? as u64,
                    codec: Codec::from_sql(r.get(3)?)?,
                });
            }
            v
        };
        let object_paths = |d: &Digest| -> Result<Vec<StorePath>, StoreError> {
            paths_of(
                &conn,
                "SELECT DISTINCT p.store_path FROM paths p JOIN nodes n ON n.path_id = p.id
                 WHERE (n.chunked = 0 AND n.digest = ?1)
                    OR (n.chunked = 1 AND n.digest IN (SELECT file_digest FROM chunks WHERE object = ?1))
                 ORDER BY p.store_path",
                d,
            )
        };
        for obj in &objects {
            report.objects_checked += 1;
            let outcome = self.objects.reader(obj).and_then(|mut r| {
                hash_stream(&mut r).map_err(|source| StoreError::ObjectUndecodable {
                    digest: obj.digest,
                    source,
                })
            });
            let reason = match outcome {
                Err(e) => Some(kof_node_api::report::chain(&e)),
                Ok((d, n)) if n != obj.size => {
                    Some(format!("{n} bytes, expected {} (hash {d})", obj.size))
                }
                Ok((d, _)) if d != obj.digest => Some(format!("content hashes to {d}")),
                Ok(_) => None,
            };
            if let Some(reason) = reason {
                report.problems.push(Corruption {
                    item: CorruptItem::Object(obj.digest),
                    reason,
                    store_paths: object_paths(&obj.digest)?,
                });
            }
        }

        let files: Vec<(Digest, u64)> = {
            let mut stmt = conn.prepare(
                "SELECT DISTINCT digest, size FROM nodes WHERE kind = 1 AND chunked = 1",
            )?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))?;
            let mut v = Vec::new();
            for r in rows {
                let (d, s) = r?;
                v.push((Digest::from_sql(d)?, s as u64));
            }
            v
        };
        let file_paths = |d: &Digest| -> Result<Vec<StorePath>, StoreError> {
            paths_of(
                &conn,
                "SELECT DISTINCT p.store_path FROM paths p JOIN nodes n ON n.path_id = p.id
                 WHERE n.digest = ?1 ORDER BY p.store_path",
                d,
            )
        };
        for (digest, size) in files {
            report.files_checked += 1;
            let content = FileContent {
                digest,
                size,
                chunked: true,
            };
            let outcome = pieces(&conn, &content, 0, size).and_then(|_| {
                let mut r = self.open_file(&content)?;
                hash_stream(&mut r).map_err(|e| {
                    crate::tree::unwrap_io(e, |source| StoreError::ChunkedFile { digest, source })
                })
            });
            let reason = match outcome {
                Err(e) => Some(kof_node_api::report::chain(&e)),
                Ok((_, n)) if n != size => Some(format!("{n} bytes, expected {size}")),
                Ok((d, _)) if d != digest => Some(format!("chunks reassemble to {d}")),
                Ok(_) => None,
            };
            if let Some(reason) = reason {
                report.problems.push(Corruption {
                    item: CorruptItem::File(digest),
                    reason,
                    store_paths: file_paths(&digest)?,
                });
            }
        }

        let missing: Vec<Digest> = {
            let mut stmt = conn.prepare(
                "SELECT DISTINCT n.digest FROM nodes n LEFT JOIN objects o ON o.digest = n.digest
                 WHERE n.kind = 1 AND n.chunked = 0 AND o.digest IS NULL",
            )?;
            let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
            let mut v = Vec::new();
            for r in rows {
                v.push(Digest::from_sql(r?)?);
            }
            v
        };
        for d in missing {
            report.problems.push(Corruption {
                item: CorruptItem::MissingObjectRow(d),
                reason: "no object row for this file content".into(),
                store_paths: file_paths(&d)?,
            });
        }
        Ok(report)
    }
}

fn paths_of(
    conn: &rusqlite::Connection,
    sql: &str,
    d: &Digest,
) -> Result<Vec<StorePath>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map([&d.0[..]], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for r in rows {
        let p = r?;
        out.push(
            StorePath::from_base_name(&p).map_err(|source| StoreError::CorruptStorePath {
                what: "stored path",
                value: p.clone(),
                source,
            })?,
        );
    }
    Ok(out)
}
