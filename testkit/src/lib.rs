//! The scaffold kof's tests and benchmarks share, so that each piece exists once.
//!
//! It owns:
//! - [`nix_dump`]: the reference NAR of a path, by the real `nix-store --dump`;
//! - [`busybox_rootfs`]: a container root holding the static busybox;
//! - [`Tmpfs`] and [`fill_file_system`]: a size-limited tmpfs mounted for a guard's life, and a filler
//!   that writes a file system full;
//! - with the `node` feature: [`fixtures()`] (the small fixture set, built once per machine;
//!   an environment's closure by [`closure_of`], a path's reference tree by [`staged`]),
//!   [`fetcherd_bin`] (the `kof-fetcherd` binary of this build), [`Node`] (a fixture server,
//!   a store, a configuration and, on demand, a running [`Daemon`] whose logs it keeps), and
//!   [`CacheServer`] (plain binary-cache directories served by `kof_fixtures::serve`, with
//!   per-path request counts), and [`TamperedFixtures`] (a fixtures directory whose caches lie,
//!   one `kof_fixtures::tamper` case each, with a probe script that shows what a program sees).
//!
//! It is for tests and benchmarks only: it panics where a test should fail (but
//! [`Daemon::start`], which benchmarks use, returns its errors), and it never runs on a node.
//! It holds no assertions of its own: what a test checks stays in the test.
//!
//! The Nix, rootfs and tmpfs helpers need no feature, so that the tests of `kof-nar` and
//! `kof-store` (below `kof-fixtures`) use them without building the fixture server.

#![deny(missing_docs)]

mod nix;
mod rootfs;
mod tmpfs;

#[cfg(feature = "node")]
mod bins;
#[cfg(feature = "node")]
mod caches;
#[cfg(feature = "node")]
mod daemon;
#[cfg(feature = "node")]
mod fixtures;
#[cfg(feature = "node")]
mod node;
#[cfg(feature = "node")]
mod tampered;

pub use nix::{nix_dump, DumpTarget};
pub use rootfs::busybox_rootfs;
pub use tmpfs::{fill_file_system, Tmpfs};

#[cfg(feature = "node")]
pub use bins::fetcherd_bin;
#[cfg(feature = "node")]
pub use caches::CacheServer;
#[cfg(feature = "node")]
pub use daemon::{Daemon, DaemonError, DaemonSpec, FuseServerLeft};
#[cfg(feature = "node")]
pub use fixtures::{
    closure_of, fixtures, fixtures_dir, manifest, path_of, published_index, staged,
};
#[cfg(feature = "node")]
pub use node::{Node, NodeOptions};
#[cfg(feature = "node")]
pub use tampered::{run_bounded, TamperedFixtures, TAMPERED_FILE, TAMPERED_LINK};
