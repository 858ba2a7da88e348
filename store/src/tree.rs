//! Reading a stored path's tree and its files' contents: what `dump_nar`, `export` and the
//! FUSE view are built on.

use std::io::{self, Read};

use kof_nar::StorePath;
use rusqlite::{params, Connection, OptionalExtension};

use crate::error::StoreError;
use crate::objects::{Codec, Digest, ObjectInfo};
use crate::Store;

pub(crate) const KIND_DIRECTORY: i64 = 0;
pub(crate) const KIND_REGULAR: i64 = 1;
pub(crate) const KIND_SYMLINK: i64 = 2;

/// The content of a regular file: enough to read it with [`Store::open_file`] or
/// [`Store::read_file_range`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileContent {
    /// BLAKE3 of the whole content.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Whether the content is split into chunks (else the digest names the one object).
    pub chunked: bool,
}

/// What a tree node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory; its entries are the nodes whose `parent` is this node's id.
    Directory,
    /// A regular file.
    Regular {
        /// The executable bit (`nix-store --restore` makes it 0755, else 0644).
        executable: bool,
        /// Its content.
        content: FileContent,
    },
    /// A symlink.
    Symlink {
        /// Its target, verbatim.
        target: Vec<u8>,
    },
}

/// One node of a stored path's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeNode {
    /// Its number inside the path: 0 for the root, then NAR (pre-)order.
    pub id: u64,
    /// The directory holding it; `None` for the root.
    pub parent: Option<u64>,
    /// Its name in the parent (empty for the root).
    pub name: Vec<u8>,
    /// What it is.
    pub kind: NodeKind,
    /// For regular files, where the contents start in the path's NAR.
    pub nar_offset: Option<u64>,
}

/// One piece of a file: the object holding bytes `offset..offset + object.size` of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilePiece {
    /// Where the piece starts in the file.
    pub offset: u64,
    /// The object holding it.
    pub object: ObjectInfo,
}

fn object_row(r: &rusqlite::Row<'_>, base: usize) -> Result<ObjectInfo, StoreError> {
    Ok(ObjectInfo {
        digest: Digest::from_sql(r.get(base)?)?,
        size: r.get::<_, i64>(base + 1)? as u64,
        stored_size: r.get::<_, i64>(base + 2)? as u64,
        codec: Codec::from_sql(r.get(base + 3)?)?,
    })
}

/// The objects making up `content` that overlap `start..end`, in order.
pub(crate) fn pieces(
    conn: &Connection,
    content: &FileContent,
    start: u64,
    end: u64,
) -> Result<Vec<FilePiece>, StoreError> {
    if !content.chunked {
        let obj = conn
            .prepare_cached(
                "SELECT digest, size, stored_size, codec FROM objects WHERE digest = ?",
            )?
            .query_row([&content.digest.0[..]], |r| Ok(object_row(r, 0)))
            .optional()?
            .transpose()?
            .ok_or_else(|| {
                StoreError::CorruptMetadata(format!("no object row for file {}", content.digest))
            })?;
        if obj.size != content.size {
            return Err(StoreError::CorruptMetadata(format!(
                "object {} has size {}, file says {}",
                obj.digest, obj.size, content.size
            )));
        }
        return Ok(vec![FilePiece {
            offset: 0,
            object: obj,
        }]);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT c.offset, o.digest, o.size, o.stored_size, o.codec
         FROM chunks c LEFT JOIN objects o ON o.digest = c.object
         WHERE c.file_digest = ?1 AND c.offset < ?3 AND c.offset + c.size > ?2
         ORDER BY c.idx",
    )?;
    let mut rows = stmt.query(params![&content.digest.0[..], start as i64, end as i64])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        if r.get::<_, Option<Vec<u8>>>(1)?.is_none() {
            return Err(StoreError::CorruptMetadata(format!(
                "a chunk of file {} has no object row",
                content.digest
            )));
        }
        out.push(FilePiece {
            offset: r.get::<_, i64>(0)? as u64,
            object: object_row(r, 1)?,
        });
    }
    // The pieces must tile the requested range exactly.
    let mut at = out.first().map(|p| p.offset.min(start)).unwrap_or(start);
    for p in &out {
        if p.offset != at {
            return Err(StoreError::CorruptMetadata(format!(
                "chunk list of file {} has a gap or overlap at {}",
                content.digest, at
            )));
        }
        at += p.object.size;
    }
    if start < end && (out.is_empty() || out[0].offset > start || at < end) {
        return Err(StoreError::CorruptMetadata(format!(
            "chunk list of file {} does not cover bytes {start}..{end}",
            content.digest
        )));
    }
    Ok(out)
}

/// A stream of a file's content, object after object (see [`Store::open_file`]).
pub struct FileReader<'a> {
    store: &'a Store,
    pieces: std::vec::IntoIter<FilePiece>,
    current: Option<(Box<dyn Read + Send>, ObjectInfo, u64)>,
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.current.is_none() {
                match self.pieces.next() {
                    None => return Ok(0),
                    Some(p) => {
                        let r = self
                            .store
                            .objects
                            .reader(&p.object)
                            .map_err(io::Error::other)?;
                        self.current = Some((r, p.object, 0));
                    }
                }
            }
            let (r, obj, done) = self.current.as_mut().expect("set above");
            let want = buf
                .len()
                .min((obj.size - *done).min(usize::MAX as u64) as usize);
            if want == 0 {
                // Make sure the object holds nothing past its size.
                let mut probe = [0u8; 1];
                let extra = r.read(&mut probe).map_err(|e| corrupt(obj, e))?;
                if extra != 0 {
                    return Err(io::Error::other(StoreError::ObjectCorrupt {
                        digest: obj.digest,
                        reason: format!("longer than its size {}", obj.size),
                        source: None,
                    }));
                }
                self.current = None;
                continue;
            }
            let n = r.read(&mut buf[..want]).map_err(|e| corrupt(obj, e))?;
            if n == 0 {
                return Err(io::Error::other(StoreError::ObjectCorrupt {
                    digest: obj.digest,
                    reason: format!("ends after {done} of {} bytes", obj.size),
                    source: None,
                }));
            }
            *done += n as u64;
            return Ok(n);
        }
    }
}

fn corrupt(obj: &ObjectInfo, e: io::Error) -> io::Error {
    io::Error::other(StoreError::ObjectUndecodable {
        digest: obj.digest,
        source: e,
    })
}

/// Turns an I/O error from a `Read`/`Write` chain that includes a [`FileReader`] back into the
/// store error it carries, or into `fallback` if it came from elsewhere.
pub(crate) fn unwrap_io(
    e: io::Error,
    fallback: impl FnOnce(io::Error) -> StoreError,
) -> StoreError {
    if e.get_ref().is_some_and(|inner| inner.is::<StoreError>()) {
        let inner = e.into_inner().expect("checked above");
        *inner.downcast::<StoreError>().expect("checked above")
    } else {
        fallback(e)
    }
}

impl Store {
    /// The tree of a stored path in NAR order (the root first, entries of a directory sorted
    /// by name, each directory followed by its contents).
    pub fn tree(&self, path: &StorePath) -> Result<Vec<TreeNode>, StoreError> {
        let conn = self.db.get()?;
        let path_id: i64 = conn
            .prepare_cached("SELECT id FROM paths WHERE store_path = ?")?
            .query_row([path.base_name()], |r| r.get(0))
            .optional()?
            .ok_or_else(|| StoreError::PathNotFound(path.clone()))?;
        let mut stmt = conn.prepare_cached(
            "SELECT id, parent, name, kind, executable, size, target, digest, chunked, nar_offset
             FROM nodes WHERE path_id = ? ORDER BY id",
        )?;
        let mut rows = stmt.query([path_id])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let kind = match r.get::<_, i64>(3)? {
                KIND_DIRECTORY => NodeKind::Directory,
                KIND_REGULAR => NodeKind::Regular {
                    executable: r.get::<_, i64>(4)? != 0,
                    content: FileContent {
                        digest: Digest::from_sql(r.get(7)?)?,
                        size: r.get::<_, i64>(5)? as u64,
                        chunked: r.get::<_, i64>(8)? != 0,
                    },
                },
                KIND_SYMLINK => NodeKind::Symlink { target: r.get(6)? },
                k => {
                    return Err(StoreError::CorruptMetadata(format!(
                        "node of unknown kind {k} in {path}"
                    )))
                }
            };
            out.push(TreeNode {
                id: r.get::<_, i64>(0)? as u64,
                parent: r.get::<_, Option<i64>>(1)?.map(|p| p as u64),
                name: r.get::<_, Option<Vec<u8>>>(2)?.unwrap_or_default(),
                kind,
                nar_offset: r.get::<_, Option<i64>>(9)?.map(|o| o as u64),
            });
        }
        Ok(out)
    }

    /// The objects a file is made of, in order (one for an unchunked file). With
    /// [`Store::object_path`], a raw object's file can be handed out directly.
    pub fn file_pieces(&self, content: &FileContent) -> Result<Vec<FilePiece>, StoreError> {
        let conn = self.db.get()?;
        pieces(&conn, content, 0, content.size)
    }

    /// Where an object's file is (its bytes are the content only if its codec is raw).
    pub fn object_path(&self, digest: &Digest) -> std::path::PathBuf {
        self.objects.path(digest)
    }

    /// A stream of a file's whole content.
    pub fn open_file(&self, content: &FileContent) -> Result<FileReader<'_>, StoreError> {
        let conn = self.db.get()?;
        let pieces = pieces(&conn, content, 0, content.size)?;
        Ok(FileReader {
            store: self,
            pieces: pieces.into_iter(),
            current: None,
        })
    }

    /// Reads up to `buf.len()` bytes of a file starting at `offset`, returning how many were
    /// read (fewer only at the end of the file; 0 at it). Touches only the objects holding
    /// the range: a raw object is read with `pread`; of a compressed one only the 64 KiB
    /// frames holding the range are decompressed.
    pub fn read_file_range(
        &self,
        content: &FileContent,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, StoreError> {
        if offset > content.size {
            return Err(StoreError::RangeOutOfBounds {
                offset,
                len: buf.len() as u64,
                size: content.size,
            });
        }
        let end = (offset + buf.len() as u64).min(content.size);
        if end == offset {
            return Ok(0);
        }
        let conn = self.db.get()?;
        let pieces = pieces(&conn, content, offset, end)?;
        drop(conn);
        for p in pieces {
            let from = offset.max(p.offset);
            let to = end.min(p.offset + p.object.size);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            self.objects.read_range(&p.object, from - p.offset, dst)?;
        }
        Ok((end - offset) as usize)
    }
}
