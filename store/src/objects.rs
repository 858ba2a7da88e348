//! Object files: content addressed by BLAKE3, kept under `objects/<2 hex>/<64 hex>`, each either
//! raw or zstd-compressed (the codec is recorded in the database, never guessed from the bytes).
//!
//! An object file holds exactly the object's bytes in its codec, with no header, so a raw object
//! can later be handed to the kernel as-is (FUSE passthrough). Objects are written to a
//! temporary file in `tmp/`, fsynced and renamed into place; the caller fsyncs the fan-out
//! directories ([`Objects::sync_dirs`]) before committing metadata that names them.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::StoreError;

/// zstd level for objects at rest: level 3 compresses at several hundred MB/s per core, so
/// ingest stays network-bound, while higher levels buy a few percent for several times the CPU.
pub const ZSTD_LEVEL: i32 = 3;

/// An object is stored compressed only if zstd makes it at most this fraction (in tenths) of
/// its size, i.e. saves at least 10%: below that, the decompression cost on every read is not
/// worth the disk it saves, and raw objects can be read with a plain `pread`.
const WORTH_IT_TENTHS: usize = 9;

/// How many decompressed objects [`Objects::read_range`] keeps, so a reader going through a
/// compressed object in small blocks (FUSE reads 128 KiB at a time) decompresses it once.
const DECOMPRESSED_CACHE: usize = 16;

/// A BLAKE3 digest: the name of an object, and the identity of a file's whole content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// BLAKE3 of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex, the object's file name.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Digest(out))
    }

    pub(crate) fn from_sql(bytes: Vec<u8>) -> Result<Self, StoreError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            StoreError::CorruptMetadata(format!("digest of {} bytes in the database", b.len()))
        })?;
        Ok(Digest(arr))
    }
}

impl From<blake3::Hash> for Digest {
    fn from(h: blake3::Hash) -> Self {
        Digest(*h.as_bytes())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

/// How an object's bytes are kept on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// The object file is the content.
    Raw,
    /// The object file is one zstd frame of the content.
    Zstd,
}

impl Codec {
    pub(crate) fn to_sql(self) -> i64 {
        match self {
            Codec::Raw => 0,
            Codec::Zstd => 1,
        }
    }

    pub(crate) fn from_sql(v: i64) -> Result<Self, StoreError> {
        match v {
            0 => Ok(Codec::Raw),
            1 => Ok(Codec::Zstd),
            _ => Err(StoreError::CorruptMetadata(format!("unknown codec {v}"))),
        }
    }
}

/// One object as the database describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its BLAKE3 digest (of the uncompressed content).
    pub digest: Digest,
    /// Uncompressed size.
    pub size: u64,
    /// Size of the object file on disk.
    pub stored_size: u64,
    /// Its codec.
    pub codec: Codec,
}

/// The object files of one store directory.
pub(crate) struct Objects {
    dir: PathBuf,
    tmp: PathBuf,
    cache: Mutex<VecDeque<(Digest, Arc<Vec<u8>>)>>,
}

impl Objects {
    /// Uses `<store>/objects` and `<store>/tmp`, creating them and the 256 fan-out directories.
    pub(crate) fn open(store_dir: &Path) -> Result<Self, StoreError> {
        let dir = store_dir.join("objects");
        let tmp = store_dir.join("tmp");
        for d in [&dir, &tmp] {
            fs::create_dir_all(d).map_err(|e| StoreError::io("creating", d, e))?;
        }
        let mut created = false;
        for i in 0..=255u8 {
            let sub = dir.join(hex::encode([i]));
            match fs::create_dir(&sub) {
                Ok(()) => created = true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(StoreError::io("creating", &sub, e)),
            }
        }
        if created {
            sync_dir(&dir)?;
            sync_dir(store_dir)?;
        }
        Ok(Objects {
            dir,
            tmp,
            cache: Mutex::new(VecDeque::new()),
        })
    }

    /// The fan-out directory of `digest`.
    pub(crate) fn fanout_dir(&self, digest: &Digest) -> PathBuf {
        self.dir.join(hex::encode(&digest.0[..1]))
    }

    /// The file of `digest`.
    pub(crate) fn path(&self, digest: &Digest) -> PathBuf {
        self.fanout_dir(digest).join(digest.to_hex())
    }

    pub(crate) fn objects_dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// Writes `data` (whose BLAKE3 is `digest`) as an object file, compressed if that pays,
    /// replacing any file already there (an orphan from an interrupted ingest, with the same
    /// content). Durable once [`Objects::sync_dirs`] has run for its fan-out directory.
    pub(crate) fn write(&self, digest: Digest, data: &[u8]) -> Result<ObjectInfo, StoreError> {
        let compressed = if data.len() >= 64 {
            zstd::bulk::compress(data, ZSTD_LEVEL)
                .ok()
                .filter(|c| c.len() * 10 <= data.len() * WORTH_IT_TENTHS)
        } else {
            None
        };
        let (codec, bytes) = match &compressed {
            Some(c) => (Codec::Zstd, c.as_slice()),
            None => (Codec::Raw, data),
        };
        let mut tmp = tempfile::Builder::new()
            .prefix("obj-")
            .tempfile_in(&self.tmp)
            .map_err(|e| StoreError::io("creating a temporary file in", &self.tmp, e))?;
        let tmp_path = tmp.path().to_path_buf();
        tmp.write_all(bytes)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| StoreError::io("writing", &tmp_path, e))?;
        let dest = self.path(&digest);
        tmp.persist(&dest)
            .map_err(|e| StoreError::io("renaming into", &dest, e.error))?;
        Ok(ObjectInfo {
            digest,
            size: data.len() as u64,
            stored_size: bytes.len() as u64,
            codec,
        })
    }

    /// fsyncs the fan-out directories of `digests`, making their renames durable.
    pub(crate) fn sync_dirs<'a>(
        &self,
        digests: impl IntoIterator<Item = &'a Digest>,
    ) -> Result<(), StoreError> {
        let dirs: BTreeSet<u8> = digests.into_iter().map(|d| d.0[0]).collect();
        for d in dirs {
            sync_dir(&self.dir.join(hex::encode([d])))?;
        }
        Ok(())
    }

    fn open_file(&self, digest: &Digest) -> Result<File, StoreError> {
        File::open(self.path(digest)).map_err(|source| StoreError::ObjectUnreadable {
            digest: *digest,
            source,
        })
    }

    /// The whole uncompressed content of an object, checked against its size (not its digest:
    /// that is [`crate::Store::verify`]'s job).
    pub(crate) fn read_all(&self, obj: &ObjectInfo) -> Result<Vec<u8>, StoreError> {
        let unreadable = |source| StoreError::ObjectUnreadable {
            digest: obj.digest,
            source,
        };
        let mut out = Vec::with_capacity(obj.size as usize);
        let mut f = self.open_file(&obj.digest)?;
        match obj.codec {
            Codec::Raw => {
                f.read_to_end(&mut out).map_err(unreadable)?;
            }
            Codec::Zstd => {
                let mut dec = zstd::stream::read::Decoder::new(f).map_err(unreadable)?;
                (&mut dec)
                    .take(obj.size + 1)
                    .read_to_end(&mut out)
                    .map_err(|e| StoreError::ObjectCorrupt {
                        digest: obj.digest,
                        reason: format!("zstd: {e}"),
                    })?;
            }
        }
        if out.len() as u64 != obj.size {
            return Err(StoreError::ObjectCorrupt {
                digest: obj.digest,
                reason: format!("{} bytes, expected {}", out.len(), obj.size),
            });
        }
        Ok(out)
    }

    /// A stream of the object's uncompressed content.
    pub(crate) fn reader(&self, obj: &ObjectInfo) -> Result<Box<dyn Read + Send>, StoreError> {
        let f = self.open_file(&obj.digest)?;
        Ok(match obj.codec {
            Codec::Raw => Box::new(f),
            Codec::Zstd => Box::new(zstd::stream::read::Decoder::new(f).map_err(|source| {
                StoreError::ObjectUnreadable {
                    digest: obj.digest,
                    source,
                }
            })?),
        })
    }

    /// Copies the object's bytes from `offset` into `buf` (which must fit in the object);
    /// raw objects are read with one `pread`, compressed ones are decompressed whole (at most
    /// one maximal chunk) and kept in a small cache.
    pub(crate) fn read_range(
        &self,
        obj: &ObjectInfo,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), StoreError> {
        debug_assert!(offset + buf.len() as u64 <= obj.size);
        match obj.codec {
            Codec::Raw => {
                let f = self.open_file(&obj.digest)?;
                f.read_exact_at(buf, offset).map_err(|e| {
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        StoreError::ObjectCorrupt {
                            digest: obj.digest,
                            reason: "object file shorter than its size".into(),
                        }
                    } else {
                        StoreError::ObjectUnreadable {
                            digest: obj.digest,
                            source: e,
                        }
                    }
                })
            }
            Codec::Zstd => {
                let data = self.decompressed(obj)?;
                let start = offset as usize;
                buf.copy_from_slice(&data[start..start + buf.len()]);
                Ok(())
            }
        }
    }

    fn decompressed(&self, obj: &ObjectInfo) -> Result<Arc<Vec<u8>>, StoreError> {
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, d)) = cache.iter().find(|(d, _)| *d == obj.digest) {
                return Ok(d.clone());
            }
        }
        let data = Arc::new(self.read_all(obj)?);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= DECOMPRESSED_CACHE {
            cache.pop_front();
        }
        cache.push_back((obj.digest, data.clone()));
        Ok(data)
    }

    /// Removes an object file; returns the bytes it took (0 if it was already gone).
    pub(crate) fn remove(&self, digest: &Digest) -> Result<u64, StoreError> {
        let p = self.path(digest);
        let len = match fs::symlink_metadata(&p) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(StoreError::io("inspecting", &p, e)),
        };
        match fs::remove_file(&p) {
            Ok(()) => Ok(len),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(StoreError::io("removing", &p, e)),
        }
    }

    /// Forgets cached decompressed objects (after gc removed some).
    pub(crate) fn clear_cache(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// fsyncs a directory, making renames and creations inside it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("syncing directory", dir, e))
}
