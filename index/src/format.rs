//! The index file: its body, its signature lines, and the checks that turn untrusted bytes
//! into a [`VerifiedIndex`].

use std::ops::Range;

use kof_nar::listing::ListingNode;
use kof_nar::signature::{PublicKey, SecretKey, Signature};
use kof_nar::{NixHash, StorePath};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The index format version this crate reads and writes.
pub const INDEX_VERSION: u32 = 1;

/// The first line of an index file.
pub const FILE_MAGIC: &str = "kof-index-1";

/// The chunk digest, as the body names it.
pub const CHUNK_HASH: &str = "blake3";

/// Largest chunk (uncompressed) a valid index may have: bounds what one chunk read holds in
/// memory.
pub const MAX_CHUNK: u64 = 16 << 20;

/// Largest index file accepted.
pub const MAX_INDEX_BYTES: usize = 64 << 20;

/// Largest header (magic and signature lines) accepted.
const MAX_HEADER_BYTES: usize = 64 << 10;

/// How the NAR file holds each chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkCompression {
    /// One (or more) zstd frames per chunk: a seekable zstd NAR.
    Zstd,
    /// The NAR file is the uncompressed NAR.
    None,
}

/// One chunk of the NAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexChunk {
    /// Where it starts in the uncompressed NAR.
    pub nar_offset: u64,
    /// Its length in the uncompressed NAR.
    pub nar_len: u64,
    /// Where its bytes start in the NAR file.
    pub file_offset: u64,
    /// Their length in the NAR file.
    pub file_len: u64,
    /// BLAKE3 of its uncompressed bytes.
    pub digest: [u8; 32],
}

impl IndexChunk {
    /// Its range in the uncompressed NAR.
    pub fn nar_range(&self) -> Range<u64> {
        self.nar_offset..self.nar_offset + self.nar_len
    }

    /// Its range in the NAR file.
    pub fn file_range(&self) -> Range<u64> {
        self.file_offset..self.file_offset + self.file_len
    }
}

/// An index, not yet signed or not yet checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// The store path described.
    pub store_path: StorePath,
    /// Its NarHash.
    pub nar_hash: NixHash,
    /// Its NarSize.
    pub nar_size: u64,
    /// How the NAR file holds the chunks.
    pub compression: ChunkCompression,
    /// The NAR's tree, as a `.ls` listing's root.
    pub root: ListingNode,
    /// The chunk table, in NAR order.
    pub chunks: Vec<IndexChunk>,
}

/// What the narinfo (already signature-checked) says of the path an index must describe.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The store path.
    pub store_path: &'a StorePath,
    /// Its NarHash.
    pub nar_hash: &'a NixHash,
    /// Its NarSize.
    pub nar_size: u64,
}

/// Why an index file was refused.
#[derive(Debug, Error)]
pub enum IndexError {
    /// Larger than [`MAX_INDEX_BYTES`].
    #[error("index is {size} bytes, more than the {MAX_INDEX_BYTES} accepted")]
    TooLarge {
        /// Its size.
        size: usize,
    },
    /// The header is malformed.
    #[error("malformed index header: {0}")]
    Header(&'static str),
    /// A `Sig:` line does not parse.
    #[error("malformed index signature")]
    Signature(#[source] kof_nar::signature::SignatureError),
    /// The body is not the JSON of a version 1 index.
    #[error("malformed index body")]
    Body(#[source] serde_json::Error),
    /// A body field is not valid.
    #[error("invalid index: {0}")]
    Invalid(String),
    /// The index describes another NAR than the narinfo's.
    #[error("index is for {what} {found}, the narinfo says {expected}")]
    OtherNar {
        /// `store path`, `NarHash` or `NarSize`.
        what: &'static str,
        /// What the index says.
        found: String,
        /// What the narinfo says.
        expected: String,
    },
    /// No signature at all.
    #[error("index is unsigned")]
    Unsigned,
    /// Signatures, none by a trusted key.
    #[error("index is signed only by untrusted keys ({})", .names.join(", "))]
    Untrusted {
        /// The signing keys' names.
        names: Vec<String>,
    },
    /// A signature by a trusted key's name does not verify.
    #[error("index signature by {key} does not verify")]
    BadSignature {
        /// The key's name.
        key: String,
    },
}

/// Why a chunk's bytes were refused.
#[derive(Debug, Error)]
pub enum ChunkError {
    /// The file range fetched has the wrong length.
    #[error("chunk {index}: got {got} bytes of the NAR file, the index says {expected}")]
    FileLength {
        /// The chunk's number.
        index: usize,
        /// Bytes received.
        got: u64,
        /// `fileLength`.
        expected: u64,
    },
    /// The zstd frame does not decode.
    #[error("chunk {index}: its zstd frame does not decode")]
    Decode {
        /// The chunk's number.
        index: usize,
        /// The decoder's error.
        #[source]
        source: std::io::Error,
    },
    /// It decodes to the wrong length.
    #[error("chunk {index}: decodes to {got} bytes, the index says {expected}")]
    NarLength {
        /// The chunk's number.
        index: usize,
        /// Bytes decoded.
        got: u64,
        /// `narLength`.
        expected: u64,
    },
    /// Its digest does not match.
    #[error("chunk {index} (NAR bytes {start}..{end}): BLAKE3 {got} does not match the index's {expected}")]
    Digest {
        /// The chunk's number.
        index: usize,
        /// Its first NAR byte.
        start: u64,
        /// One past its last.
        end: u64,
        /// The digest of the bytes received.
        got: String,
        /// The digest the index holds.
        expected: String,
    },
}

/// An index whose signature by a trusted key verified and which describes the NAR the
/// narinfo names. Only [`VerifiedIndex::open`] makes one.
#[derive(Debug, Clone)]
pub struct VerifiedIndex {
    index: Index,
    digest: NixHash,
    signer: String,
}

/// The fingerprint an index signature signs.
pub fn fingerprint(
    store_path: &StorePath,
    nar_hash: &NixHash,
    nar_size: u64,
    body_digest: &NixHash,
) -> String {
    format!(
        "{FILE_MAGIC};{};{};{nar_size};{}",
        store_path.to_absolute(),
        nar_hash.to_nix_string(),
        body_digest.to_nix_string()
    )
}

/// The index file's name beside `<hashpart>.narinfo`.
pub fn index_file_name(path: &StorePath) -> String {
    format!("{}.kof-index", path.hash_part())
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    version: u32,
    #[serde(rename = "storePath")]
    store_path: String,
    #[serde(rename = "narHash")]
    nar_hash: String,
    #[serde(rename = "narSize")]
    nar_size: u64,
    compression: ChunkCompression,
    #[serde(rename = "chunkHash")]
    chunk_hash: String,
    chunks: Vec<(u64, u64, u64, u64, String)>,
    root: ListingNode,
}

impl Index {
    /// The body bytes (JSON).
    pub fn body(&self) -> Vec<u8> {
        let body = Body {
            version: INDEX_VERSION,
            store_path: self.store_path.to_absolute(),
            nar_hash: self.nar_hash.to_nix_string(),
            nar_size: self.nar_size,
            compression: self.compression,
            chunk_hash: CHUNK_HASH.to_string(),
            chunks: self
                .chunks
                .iter()
                .map(|c| {
                    (
                        c.nar_offset,
                        c.nar_len,
                        c.file_offset,
                        c.file_len,
                        hex::encode(c.digest),
                    )
                })
                .collect(),
            root: self.root.clone(),
        };
        serde_json::to_vec(&body).expect("an index body always serialises")
    }

    /// The whole index file, signed by each of `keys`.
    pub fn to_file(&self, keys: &[&SecretKey]) -> Vec<u8> {
        let body = self.body();
        let digest = NixHash(Sha256::digest(&body).into());
        let fp = fingerprint(&self.store_path, &self.nar_hash, self.nar_size, &digest);
        let mut out = format!("{FILE_MAGIC}\n").into_bytes();
        for key in keys {
            out.extend_from_slice(format!("Sig: {}\n", key.sign(fp.as_bytes())).as_bytes());
        }
        out.push(b'\n');
        out.extend_from_slice(&body);
        out
    }

    /// The chunks holding NAR bytes `start..end` (empty when `start >= end`).
    pub fn chunks_for(&self, start: u64, end: u64) -> Range<usize> {
        if start >= end {
            return 0..0;
        }
        let first = self
            .chunks
            .partition_point(|c| c.nar_offset + c.nar_len <= start);
        let last = self.chunks.partition_point(|c| c.nar_offset < end);
        first..last.max(first)
    }

    /// Checks everything about the index that does not need a key: contiguous chunks
    /// covering NarSize, sane lengths, a tree whose files lie inside the NAR.
    pub fn validate(&self) -> Result<(), IndexError> {
        let bad = |m: String| Err(IndexError::Invalid(m));
        if self.nar_size > 0 && self.chunks.is_empty() {
            return bad("no chunks".into());
        }
        let (mut nar, mut file) = (0u64, 0u64);
        for (i, c) in self.chunks.iter().enumerate() {
            if c.nar_offset != nar {
                return bad(format!(
                    "chunk {i} starts at NAR byte {}, not {nar}",
                    c.nar_offset
                ));
            }
            if c.file_offset != file {
                return bad(format!(
                    "chunk {i} starts at file byte {}, not {file}",
                    c.file_offset
                ));
            }
            if c.nar_len == 0 || c.nar_len > MAX_CHUNK {
                return bad(format!("chunk {i} has NAR length {}", c.nar_len));
            }
            if c.file_len == 0 || c.file_len > MAX_CHUNK + (MAX_CHUNK >> 4) {
                return bad(format!("chunk {i} has file length {}", c.file_len));
            }
            if self.compression == ChunkCompression::None && c.file_len != c.nar_len {
                return bad(format!(
                    "chunk {i}: uncompressed, yet file and NAR lengths differ"
                ));
            }
            nar = nar
                .checked_add(c.nar_len)
                .ok_or(IndexError::Invalid("chunk lengths overflow".into()))?;
            file += c.file_len;
        }
        if nar != self.nar_size {
            return bad(format!(
                "chunks cover {nar} bytes, NarSize is {}",
                self.nar_size
            ));
        }
        check_node(&self.root, self.nar_size, "", 0)
    }
}

/// Checks a tree node: names valid, files inside the NAR, not absurdly deep.
fn check_node(node: &ListingNode, nar_size: u64, at: &str, depth: usize) -> Result<(), IndexError> {
    if depth > 256 {
        return Err(IndexError::Invalid(format!(
            "tree deeper than 256 at {at:?}"
        )));
    }
    match node {
        ListingNode::Regular {
            size, nar_offset, ..
        } => match nar_offset {
            Some(o) if o.checked_add(*size).is_some_and(|e| e <= nar_size) => Ok(()),
            Some(o) => Err(IndexError::Invalid(format!(
                "file {at:?} ({size} bytes at {o}) lies outside the NAR"
            ))),
            None => Err(IndexError::Invalid(format!("file {at:?} has no narOffset"))),
        },
        ListingNode::Symlink { target } => {
            if target.is_empty() || target.contains('\0') {
                Err(IndexError::Invalid(format!(
                    "symlink {at:?} has an invalid target"
                )))
            } else {
                Ok(())
            }
        }
        ListingNode::Directory { entries } => {
            for (name, child) in entries {
                if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
                    return Err(IndexError::Invalid(format!(
                        "invalid name {name:?} in {at:?}"
                    )));
                }
                check_node(child, nar_size, &format!("{at}/{name}"), depth + 1)?;
            }
            Ok(())
        }
    }
}

impl VerifiedIndex {
    /// Parses an index file and checks it: the body describes `expected` (the narinfo's
    /// store path, NarHash and NarSize), a trusted key signed it, and it is well formed.
    pub fn open(
        file: &[u8],
        expected: Expected<'_>,
        trusted: &[PublicKey],
    ) -> Result<VerifiedIndex, IndexError> {
        if file.len() > MAX_INDEX_BYTES {
            return Err(IndexError::TooLarge { size: file.len() });
        }
        let (sigs, body) = split_file(file)?;
        let digest = NixHash(Sha256::digest(body).into());
        let index = parse_body(body)?;
        let other = |what, found: String, expected: String| {
            Err(IndexError::OtherNar {
                what,
                found,
                expected,
            })
        };
        if &index.store_path != expected.store_path {
            return other(
                "store path",
                index.store_path.to_absolute(),
                expected.store_path.to_absolute(),
            );
        }
        if &index.nar_hash != expected.nar_hash {
            return other(
                "NarHash",
                index.nar_hash.to_nix_string(),
                expected.nar_hash.to_nix_string(),
            );
        }
        if index.nar_size != expected.nar_size {
            return other(
                "NarSize",
                index.nar_size.to_string(),
                expected.nar_size.to_string(),
            );
        }
        let signer = check_sigs(&sigs, &index, &digest, trusted)?;
        index.validate()?;
        Ok(VerifiedIndex {
            index,
            digest,
            signer,
        })
    }

    /// The index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The SHA-256 of its body.
    pub fn digest(&self) -> &NixHash {
        &self.digest
    }

    /// The trusted key that signed it.
    pub fn signer(&self) -> &str {
        &self.signer
    }

    /// Decodes chunk `i` from its bytes of the NAR file and checks its length and digest:
    /// the only way NAR bytes come out of an indexed fetch.
    pub fn decode_chunk(&self, i: usize, raw: &[u8]) -> Result<Vec<u8>, ChunkError> {
        let c = &self.index.chunks[i];
        if raw.len() as u64 != c.file_len {
            return Err(ChunkError::FileLength {
                index: i,
                got: raw.len() as u64,
                expected: c.file_len,
            });
        }
        let bytes = match self.index.compression {
            ChunkCompression::None => raw.to_vec(),
            ChunkCompression::Zstd => {
                // One byte more than expected: a frame decoding to more is caught as a
                // length mismatch rather than silently cut.
                zstd::bulk::decompress(raw, c.nar_len as usize + 1)
                    .map_err(|source| ChunkError::Decode { index: i, source })?
            }
        };
        self.check_chunk(i, &bytes)?;
        Ok(bytes)
    }

    /// Checks chunk `i`'s uncompressed bytes against its length and digest.
    pub fn check_chunk(&self, i: usize, bytes: &[u8]) -> Result<(), ChunkError> {
        let c = &self.index.chunks[i];
        if bytes.len() as u64 != c.nar_len {
            return Err(ChunkError::NarLength {
                index: i,
                got: bytes.len() as u64,
                expected: c.nar_len,
            });
        }
        let got = blake3::hash(bytes);
        if got.as_bytes() != &c.digest {
            return Err(ChunkError::Digest {
                index: i,
                start: c.nar_offset,
                end: c.nar_offset + c.nar_len,
                got: got.to_hex().to_string(),
                expected: hex::encode(c.digest),
            });
        }
        Ok(())
    }
}

fn split_file(file: &[u8]) -> Result<(Vec<Signature>, &[u8]), IndexError> {
    let head_end = file
        .windows(2)
        .take(MAX_HEADER_BYTES)
        .position(|w| w == b"\n\n")
        .ok_or(IndexError::Header("no empty line ends the header"))?;
    let head = std::str::from_utf8(&file[..head_end])
        .map_err(|_| IndexError::Header("header is not UTF-8"))?;
    let body = &file[head_end + 2..];
    let mut lines = head.split('\n');
    if lines.next() != Some(FILE_MAGIC) {
        return Err(IndexError::Header("first line is not kof-index-1"));
    }
    let mut sigs = Vec::new();
    for line in lines {
        let value = line
            .strip_prefix("Sig: ")
            .ok_or(IndexError::Header("a header line is not a Sig: line"))?;
        sigs.push(Signature::parse(value).map_err(IndexError::Signature)?);
    }
    Ok((sigs, body))
}

fn parse_body(body: &[u8]) -> Result<Index, IndexError> {
    let b: Body = serde_json::from_slice(body).map_err(IndexError::Body)?;
    let invalid = |m: String| IndexError::Invalid(m);
    if b.version != INDEX_VERSION {
        return Err(invalid(format!(
            "version {} (this reads {INDEX_VERSION})",
            b.version
        )));
    }
    if b.chunk_hash != CHUNK_HASH {
        return Err(invalid(format!(
            "chunk hash {:?} (this reads blake3)",
            b.chunk_hash
        )));
    }
    let store_path = StorePath::from_absolute(&b.store_path)
        .map_err(|e| invalid(format!("store path {:?}: {e}", b.store_path)))?;
    let nar_hash = NixHash::parse(&b.nar_hash)
        .map_err(|e| invalid(format!("NarHash {:?}: {e}", b.nar_hash)))?;
    let mut chunks = Vec::with_capacity(b.chunks.len());
    for (i, (nar_offset, nar_len, file_offset, file_len, digest)) in
        b.chunks.into_iter().enumerate()
    {
        let mut d = [0u8; 32];
        hex::decode_to_slice(&digest, &mut d)
            .map_err(|_| invalid(format!("chunk {i}: digest {digest:?} is not 64 hex digits")))?;
        chunks.push(IndexChunk {
            nar_offset,
            nar_len,
            file_offset,
            file_len,
            digest: d,
        });
    }
    Ok(Index {
        store_path,
        nar_hash,
        nar_size: b.nar_size,
        compression: b.compression,
        root: b.root,
        chunks,
    })
}

fn check_sigs(
    sigs: &[Signature],
    index: &Index,
    digest: &NixHash,
    trusted: &[PublicKey],
) -> Result<String, IndexError> {
    if sigs.is_empty() {
        return Err(IndexError::Unsigned);
    }
    let fp = fingerprint(&index.store_path, &index.nar_hash, index.nar_size, digest);
    let mut invalid = None;
    for sig in sigs {
        for key in trusted.iter().filter(|k| k.name == sig.name) {
            if key.verify(fp.as_bytes(), sig) {
                return Ok(key.name.clone());
            }
            invalid = Some(key.name.clone());
        }
    }
    match invalid {
        Some(key) => Err(IndexError::BadSignature { key }),
        None => Err(IndexError::Untrusted {
            names: sigs.iter().map(|s| s.name.clone()).collect(),
        }),
    }
}
