//! `kof-fetcherd`, the node daemon: one per node, the only writer of the node's store.
//!
//! What it owns: the local API server (the protocol itself is `kof-node-api`'s), leases and
//! their records on disk, the FUSE server process that serves every view of the node from one
//! mount ([`daemon`]), and the Prometheus metrics (`metrics`). It puts together what the
//! library crates do: `kof-floxhub` resolves, `kof-substituter` fetches and verifies,
//! `kof-lazy` prepares views and fetches on demand, `kof-store` keeps, `kof-fuse` serves.
//!
//! What it never does: parse FloxHub data, narinfos or NARs itself (the library crates do, and
//! check them), or run containers (the shim does, through the API).

#![deny(missing_docs)]

pub mod daemon;
mod metrics;
