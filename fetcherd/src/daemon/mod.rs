//! `kof-fetcherd`, the node daemon: owns the store, serves the local API ([`kof_node_api::api`]),
//! prepares and releases environment views for containers, fetches on demand and ahead, and
//! exports metrics.
//!
//! # Processes, and why a daemon restart never breaks a container's file system
//!
//! Two long-lived processes of the same binary:
//! - the **daemon** (`kof-fetcherd`): the API socket, resolution, closures, the lazy engine
//!   (all network fetching), the store's writer, leases, metrics;
//! - the **FUSE server** (`kof-fetcherd fuse-server`, [`fuse_server`]): owns the mount at
//!   `mount_dir` and every view's tree in memory, reads local bytes itself (stored paths and
//!   the present ranges of partial NARs, straight from the store directory), and asks the
//!   daemon only to `ensure` missing NAR ranges.
//!
//! The daemon starts the FUSE server detached (its own session, `setsid`; the server then
//! moves into its own cgroup, [`cgroup`], so killing the daemon's container spares it) when
//! none answers on `<run dir>/fuse.sock`, and never stops it. When the running FUSE server is
//! another build, the daemon starts this build's to take the mount over without unmounting
//! ([`handover`]). When the daemon dies (crash, `kill -9`,
//! upgrade), the mount and the views stay: a read of a stored path goes on as before (no
//! daemon involved), and a read of a path not yet stored retries its `ensure` until a new
//! daemon answers, within the read bound (60 s, the lazy engine's). A new daemon finds the
//! running FUSE server, re-adopts it, and reconciles: each lease on disk
//! (`<store_dir>/leases/<id>.json`, written atomically before its view appears) whose view is
//! missing gets its view rebuilt from the store's record of its environment; each view without
//! a lease is removed. Fetches interrupted by the crash start again in the new daemon (its
//! engine discards partial NARs of an earlier process) as the waiting reads ask for them.
//!
//! Learned profiles: a prepare whose environment has a saved profile
//! (`<store_dir>/profiles/<owner>/<name>.json`, learned here or imported) fetches its ranges
//! first, in parallel; otherwise the demand reads of that first start are recorded until the
//! lease is released (at most 30 s) and saved as the profile.
//!
//! Leases keep their closures from gc: the leased generation is recorded in the store and
//! pinned as a gc root for the life of the lease (a root that existed before the lease is
//! left as it was on release).

pub mod cgroup;
pub mod control;
pub mod fuse_server;
pub mod handover;
mod leases;
mod server;
pub mod wire;

pub use server::{run, DaemonError};
