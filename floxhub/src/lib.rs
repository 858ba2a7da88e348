//! FloxHub, the source of truth for environments: what an environment reference
//! (`owner/name[:N]`) names, down to the Nix store paths its generation installs.
//!
//! - [`client`]: the node's bare mirror of each owner's `floxmeta` repository, driven through
//!   the real git CLI over smart HTTP (git's pack protocol is not reimplemented), with the
//!   FloxHub token kept out of argv, logs and the mirror's config;
//! - `generations` (private): `metadata.json` (versions 1 and 2), the live generation and history;
//! - [`lockfile`]: Flox's `manifest.lock` (lockfile-version 1), validated whole;
//! - [`resolve`]: reference → generation → lockfile → the roots for the node's system, and
//!   the record the store keeps of a resolved generation.
//!
//! This crate never fetches from a binary cache, never reads a NAR and never serves a view:
//! what it produces is a [`resolve::ResolvedEnvironment`], data for the substituter and the
//! lazy engine. Everything it reads comes from the network and is checked before use.

#![deny(missing_docs)]

pub mod client;
mod generations;
pub mod lockfile;
pub mod resolve;
