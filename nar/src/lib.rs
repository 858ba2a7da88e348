//! Nix's wire formats, exactly as the reference implementation writes them, and nothing else.
//!
//! This crate owns parsing and writing of the formats that flow between a Nix binary cache and
//! kof: nixbase32 ([`base32`]), hashes as Nix prints them ([`hash`]), store paths
//! ([`store_path`]), the NAR archive ([`nar`]: a strict streaming reader and a writer),
//! narinfo files ([`narinfo`]), ed25519 signatures over narinfo fingerprints ([`signature`]) and
//! NAR listings, the `.ls` files a cache may serve ([`listing`]).
//!
//! It does no I/O of its own beyond the `Read`/`Write` it is handed, keeps no state, and trusts
//! nothing it parses: every reader rejects malformed input with a typed error naming the cause.
//! `nix-compat` (snix) does this job too but is not published on crates.io, hence this crate.

#![deny(missing_docs)]

pub mod base32;
pub mod hash;
pub mod listing;
pub mod nar;
pub mod narinfo;
pub mod signature;
pub mod store_path;

pub use hash::NixHash;
pub use narinfo::{Compression, NarInfo};
pub use signature::{PublicKey, SecretKey, Signature};
pub use store_path::StorePath;
