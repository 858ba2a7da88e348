//! The node's fetcher: resolves Flox environments on FloxHub and fetches their closures from Nix
//! binary caches into the kof store.
//!
//! Data flows one way: FloxHub ([`floxhub`], [`generations`], [`lockfile`], [`resolve`]) names
//! the store paths of an environment generation; the binary caches ([`cache`],
//! [`substituters`]) describe and serve them; [`closure`] follows references; [`fetcher`]
//! downloads in parallel, verifies every byte, and hands verified NAR streams to `kof-store`.
//! [`config`] is the node configuration shared with the command line and the daemon.
//! [`daemon`] is the node daemon `kof-fetcherd` (its local API in [`api`], its Prometheus
//! metrics in [`metrics`]).
//! Nothing here trusts what it receives: FloxHub data, narinfos and NARs are checked before use.

pub mod activate;
pub mod api;
pub mod cache;
pub mod closure;
pub mod config;
pub mod daemon;
pub mod envref;
pub mod fetcher;
pub mod floxhub;
pub mod generations;
pub mod lazy;
pub mod lockfile;
pub mod metrics;
pub mod resolve;
pub mod substituters;
pub mod view;
