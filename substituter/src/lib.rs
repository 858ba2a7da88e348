//! The Nix binary-cache protocol, as a node's substituter speaks it: from store paths to
//! verified NAR streams in the kof store.
//!
//! Data flows one way: [`cache`] speaks HTTP to one binary cache (`nix-cache-info`, narinfos,
//! `.ls` listings, NAR bodies, with retries and timeouts); [`substituters`] tries the configured
//! caches in order and accepts a narinfo only with a valid signature by a trusted key;
//! [`closure`] follows references; [`fetcher`] downloads in parallel, single-flight, and streams
//! every NAR through decompression, the strict NAR parser and the FileHash/NarHash checks into
//! `kof-store`, which makes a path visible only when it is whole and exact.
//!
//! This crate never resolves environments (that is `kof-floxhub`), never serves a byte to a
//! reader before the store has it (the lazy engine, `kof-lazy`, builds on [`fetcher`] for
//! that) and never mounts anything. Nothing here trusts what it receives: narinfos, listings
//! and NARs are checked before use.

#![deny(missing_docs)]

pub mod cache;
pub mod closure;
pub mod encoding;
pub mod fetcher;
pub mod substituters;
