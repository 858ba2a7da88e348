//! `kof-cache publish`: makes a Nix binary cache whose NARs are seekable zstd streams with a
//! signed kof index beside each narinfo, so kof reads them lazily, chunk by verified chunk,
//! while stock Nix substitutes from the same cache unchanged.
//!
//! The input is an ordinary binary cache (`file://`, `http://`, `https://`, in any compression
//! Nix writes: xz, zstd, bzip2, none) or a kof store. Every NAR is verified before anything of
//! it is written: decompressed while its SHA-256 and size are computed, compared with the
//! narinfo's NarHash and NarSize, and its narinfo signature checked against the trusted keys
//! when some are given. For each path that passes, the output directory gets:
//!
//! | file | holds |
//! |---|---|
//! | `nar/<FileHash>.nar.zst` | the NAR as one zstd frame per chunk plus zstd's seek table ([`kof_index::seekable`]) |
//! | `<hashpart>.ls` | the NAR listing, for stock tools |
//! | `<hashpart>.kof-index` | the index (tree, chunk table) signed with the publisher's key ([`kof_index`]) |
//! | `<hashpart>.narinfo` | the source narinfo with `URL`, `Compression`, `FileHash` and `FileSize` changed, all else (its `Sig:` lines included) kept |
//!
//! and `nix-cache-info` once. Every file is written to a temporary file under `DIR/.tmp` and
//! renamed into place, the narinfo last, so a visible narinfo always has its NAR and index.
//! A path whose narinfo, NAR and index (verifying with the publisher's key) are already there
//! is skipped, so an interrupted run resumes where it stopped.
//!
//! - [`publish_nar`] publishes one NAR (already at hand, seekable) into a directory: what the
//!   fixtures and tests call.
//! - [`Publisher`] runs a whole publication from a [`Source`], in parallel, and returns a
//!   [`PublishReport`].
//!
//! This crate never serves a cache and never reads one lazily; it only writes caches.

#![deny(missing_docs)]

mod nar_file;
mod narinfo;
mod out_dir;
mod publish;
mod source;

pub use nar_file::{publish_nar, NarOptions, Published, DEFAULT_LEVEL, DEFAULT_MAX_CHUNK};
pub use narinfo::rewrite_narinfo;
pub use publish::{
    PathOutcome, PublishError, PublishOptions, PublishReport, Publisher, Refused, RunError,
    Selection,
};
pub use source::{Source, SourceError, SourceNarInfo};
