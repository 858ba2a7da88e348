//! The kof NAR index: what makes one store path's NAR randomly accessible and every byte of it
//! verifiable before it is used.
//!
//! A Nix signature covers a whole NAR (its NarHash); it says nothing about a part of one, and a
//! cache's `.ls` listing is not signed at all. A lazy reader that serves bytes before the whole
//! NAR has arrived needs digests of the parts, bound to the signed NarHash by a signature of
//! their own. That is this index, published beside the narinfo as `<hashpart>.kof-index`:
//!
//! - the store path, NarHash and NarSize it describes;
//! - the NAR's tree, exactly as a `.ls` listing holds it (names, types, sizes, executable bits,
//!   symlink targets, NAR offsets);
//! - a chunk table: each chunk's offset and length in the uncompressed NAR, its offset and
//!   length in the NAR *file* the narinfo's `URL` names, and its BLAKE3 digest;
//! - ed25519 signatures (Nix's key format, the keys of `trusted_public_keys`) over a
//!   fingerprint binding the store path, NarHash, NarSize and the digest of the index body.
//!
//! The NAR file is a **seekable zstd** stream: one independent zstd frame per chunk, followed
//! by zstd's seekable-format seek table in a skippable frame. It is a valid `Compression:
//! zstd` NAR, so stock Nix substitutes from the cache unchanged, and the narinfo keeps its
//! original signatures (they cover NarHash, never FileHash).
//!
//! # The file format (version 1)
//!
//! ```text
//! kof-index-1
//! Sig: <key name>:<base64 of the 64-byte ed25519 signature>      (zero or more lines)
//! <empty line>
//! <body: UTF-8 JSON, to the end of the file>
//! ```
//!
//! The body:
//!
//! ```json
//! {"version":1,"storePath":"/nix/store/<hash>-<name>","narHash":"sha256:<nixbase32>",
//!  "narSize":123456,"compression":"zstd","chunkHash":"blake3",
//!  "chunks":[[0,65536,0,20911,"<64 hex digits>"], ...],
//!  "root":{"type":"directory","entries":{...}}}
//! ```
//!
//! - `chunks[i]` is `[narOffset, narLength, fileOffset, fileLength, blake3hex]`. The chunks
//!   cover the NAR exactly, in order, without gaps (`narOffset` of the first is 0, each
//!   starts where the one before ends, the last ends at `narSize`); their file ranges are
//!   likewise contiguous from 0. With `"compression":"zstd"` the file range of a chunk holds
//!   one zstd frame (or frames) decoding to exactly the chunk's NAR bytes; with `"none"` the
//!   NAR file is the uncompressed NAR and file ranges equal NAR ranges.
//! - `root` is a `.ls` listing's `root`: every regular file carries its `narOffset`.
//! - The body digest is the SHA-256 of the body bytes exactly as they appear in the file.
//! - The fingerprint signed is
//!   `kof-index-1;<StorePath>;<NarHash>;<NarSize>;sha256:<nixbase32 of the body digest>`,
//!   with StorePath absolute and NarHash as the narinfo writes it (`sha256:<nixbase32>`).
//!
//! Why BLAKE3 for chunks: every chunk is hashed on the read path of a waiting program, and
//! BLAKE3 runs several times faster than SHA-256 on one core with the same 256-bit strength;
//! the kof store already addresses its objects by BLAKE3. The body digest is SHA-256 so the
//! fingerprint reads like Nix's own.
//!
//! Chunk boundaries ([`chunk_boundaries`]) follow the NAR's files: a file no larger than the
//! maximum chunk lies whole inside one chunk, and a larger file is split at multiples of the
//! maximum from its start, so one small file costs one chunk and a large file is read in
//! pieces.
//!
//! This crate owns the format: building, writing, signing, parsing and verifying indexes,
//! chunk boundaries, and decoding and checking one chunk ([`VerifiedIndex::decode_chunk`]). It
//! does no I/O: publishing (`kof-cache`) and fetching (`kof-lazy`) are other crates' jobs.

#![deny(missing_docs)]

mod chunking;
mod format;
pub mod seekable;

pub use chunking::chunk_boundaries;
pub use format::{
    fingerprint, index_file_name, ChunkCompression, ChunkError, Expected, Index, IndexChunk,
    IndexError, VerifiedIndex, CHUNK_HASH, FILE_MAGIC, INDEX_VERSION, MAX_CHUNK, MAX_INDEX_BYTES,
};
