//! Publishing one NAR: its seekable zstd file, listing, signed index and narinfo.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use kof_index::seekable::SeekableWriter;
use kof_index::{chunk_boundaries, ChunkCompression, Index, IndexChunk};
use kof_nar::hash::HashingReader;
use kof_nar::listing::{listing_of_nar, Listing};
use kof_nar::{Compression, NarInfo, NixHash, SecretKey, StorePath};
use sha2::{Digest, Sha256};

use crate::narinfo::rewrite_narinfo;
use crate::out_dir::{self, file_err};
use crate::publish::PublishError;

/// The default zstd level of the chunk frames.
///
/// Chosen with [`DEFAULT_MAX_CHUNK`] on the small fixtures' zstd cache (38 paths, 100.6 MB of
/// NAR, 28.0 MB as whole-stream zstd -3), one job, CPU time from `/usr/bin/time` (the machine
/// was shared), whole pipeline (zstd decompression, hashing, listing, recompression):
///
/// ```text
/// for c in 65536 131072 262144 524288 786432 1048576; do for l in 3 6 9 12; do rm -rf /tmp/m;
///   kof-cache publish --from file://$F/caches/zstd --to /tmp/m --key $F/keys/cache.secret \
///     --all --jobs 1 --level $l --max-chunk $c --json; done; done
/// ```
///
/// | max chunk | level | out / zstd cache | MB/s of NAR per core |
/// |---|---|---|---|
/// | 64 KiB | 3 / 6 / 12 | 1.41 / 1.34 / 1.33 | 68 / 54 / 18 (wall) |
/// | 256 KiB | 3 / 6 / 12 | 1.27 / 1.23 / 1.19 | 74 / 49 / 17 (wall) |
/// | 512 KiB | 6 / 9 | 1.13 / 1.12 | 56 / 35 |
/// | 640 KiB | 6 / 8 | 1.11 / 1.10 | 62 / 48 |
/// | **768 KiB** | **6** | **1.078** | **64** |
/// | 1 MiB | 3 / 5 / 6 | 1.089 / 1.057 / 1.037 | 100 / 75 / 62 |
///
/// 768 KiB is the smallest chunk within 1.10× of the zstd cache at 50 MB/s per core or more.
pub const DEFAULT_LEVEL: i32 = 6;

/// The default largest chunk (uncompressed), in bytes. See [`DEFAULT_LEVEL`] for the figures.
pub const DEFAULT_MAX_CHUNK: u64 = 768 << 10;

/// How NARs are recompressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarOptions {
    /// zstd level of each chunk's frame.
    pub level: i32,
    /// Largest chunk (uncompressed; framing between files may add a little).
    pub max_chunk: u64,
}

impl Default for NarOptions {
    fn default() -> Self {
        NarOptions {
            level: DEFAULT_LEVEL,
            max_chunk: DEFAULT_MAX_CHUNK,
        }
    }
}

/// What [`publish_nar`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The store path.
    pub store_path: StorePath,
    /// The NAR file, relative to the cache (`nar/<FileHash>.nar.zst`).
    pub url: String,
    /// Its SHA-256.
    pub file_hash: NixHash,
    /// Its size.
    pub file_size: u64,
    /// The NAR's size.
    pub nar_size: u64,
    /// Chunks in the index.
    pub chunks: usize,
    /// The published narinfo's text.
    pub narinfo: String,
}

/// Publishes the NAR read from `nar` (from its start) into cache directory `dir`, whose
/// `nar/` and `.tmp/` must exist (see [`crate::Publisher`], which makes them).
///
/// `narinfo` is the source narinfo's text: it must parse, and the NAR must hash to its
/// NarHash and NarSize (checked while the listing is made, before anything is written). Then
/// `nar/<FileHash>.nar.zst`, `<hashpart>.ls` and `<hashpart>.kof-index` (signed by `key`) are
/// written, each whole or not at all, and `<hashpart>.narinfo` last. Signatures of the
/// narinfo are the caller's to check.
pub fn publish_nar<R: Read + Seek>(
    dir: &Path,
    nar: &mut R,
    narinfo: &str,
    key: &SecretKey,
    opts: &NarOptions,
) -> Result<Published, PublishError> {
    let info = NarInfo::parse(narinfo).map_err(PublishError::NarInfo)?;
    let path = info.store_path.clone();
    let hash_part = path.hash_part().to_string();

    // Pass 1: the listing, with NarHash and NarSize checked.
    nar.seek(SeekFrom::Start(0)).map_err(PublishError::Spool)?;
    let mut hashing = HashingReader::new(BufReader::with_capacity(1 << 20, &mut *nar));
    let listing = listing_of_nar(&mut hashing).map_err(PublishError::Nar)?;
    // Whatever follows the archive counts too: it makes the size (and hash) wrong.
    io::copy(&mut hashing, &mut io::sink()).map_err(PublishError::Spool)?;
    let (nar_hash, nar_size, _) = hashing.finish();
    check_nar(&info, &nar_hash, nar_size)?;

    // Pass 2: one zstd frame per chunk.
    let boundaries = chunk_boundaries(&listing.root, nar_size, opts.max_chunk);
    let tmp = out_dir::tmp_path(dir, &format!("{hash_part}.nar.zst"));
    let written = write_seekable(nar, &tmp, &boundaries, opts.level);
    let (chunks, file_hash, file_size) = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let index = Index {
        store_path: path.clone(),
        nar_hash,
        nar_size,
        compression: ChunkCompression::Zstd,
        root: listing.root.clone(),
        chunks,
    };
    if let Err(e) = index.validate() {
        let _ = std::fs::remove_file(&tmp);
        return Err(PublishError::Index(e));
    }
    let url = format!(
        "nar/{}.{}",
        kof_nar::base32::encode(&file_hash.0),
        Compression::Zstd.extension()
    );
    out_dir::place(&tmp, &dir.join(&url)).map_err(PublishError::Write)?;

    let ls = serde_json::to_vec(&Listing {
        version: 1,
        root: listing.root,
    })
    .expect("a listing always serialises");
    out_dir::write_atomic(dir, &format!("{hash_part}.ls"), &ls).map_err(PublishError::Write)?;
    out_dir::write_atomic(
        dir,
        &kof_index::index_file_name(&path),
        &index.to_file(&[key]),
    )
    .map_err(PublishError::Write)?;
    let text = rewrite_narinfo(narinfo, &url, Compression::Zstd, &file_hash, file_size);
    out_dir::write_atomic(dir, &format!("{hash_part}.narinfo"), text.as_bytes())
        .map_err(PublishError::Write)?;
    Ok(Published {
        store_path: path,
        url,
        file_hash,
        file_size,
        nar_size,
        chunks: index.chunks.len(),
        narinfo: text,
    })
}

/// Refuses a NAR whose hash or size differs from the narinfo's.
pub(crate) fn check_nar(info: &NarInfo, hash: &NixHash, size: u64) -> Result<(), PublishError> {
    if size != info.nar_size {
        return Err(PublishError::NarSize {
            expected: info.nar_size,
            got: size,
        });
    }
    if *hash != info.nar_hash {
        return Err(PublishError::NarHash {
            expected: info.nar_hash,
            got: *hash,
        });
    }
    Ok(())
}

/// Compresses the chunks of `nar` into `tmp`; returns the chunk table, FileHash and FileSize.
fn write_seekable<R: Read + Seek>(
    nar: &mut R,
    tmp: &Path,
    boundaries: &[(u64, u64)],
    level: i32,
) -> Result<(Vec<IndexChunk>, NixHash, u64), PublishError> {
    let write_err = |e| PublishError::Write(file_err("writing", tmp)(e));
    let file = File::create(tmp).map_err(|e| PublishError::Write(file_err("creating", tmp)(e)))?;
    let out = HashWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        sha: Sha256::new(),
    };
    let mut writer = SeekableWriter::new(out, level).map_err(PublishError::Compress)?;
    nar.seek(SeekFrom::Start(0)).map_err(PublishError::Spool)?;
    let mut input = BufReader::with_capacity(1 << 20, nar);
    let mut buf = Vec::new();
    for &(_, len) in boundaries {
        buf.resize(len as usize, 0);
        input.read_exact(&mut buf).map_err(PublishError::Spool)?;
        writer.chunk(&buf).map_err(write_err)?;
    }
    let (out, chunks, file_size) = writer.finish().map_err(write_err)?;
    let HashWriter { inner, sha } = out;
    let file = inner.into_inner().map_err(|e| write_err(e.into_error()))?;
    file.sync_data().map_err(write_err)?;
    Ok((chunks, NixHash(sha.finalize().into()), file_size))
}

/// Hashes what passes through to `inner`.
struct HashWriter<W> {
    inner: W,
    sha: Sha256,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
