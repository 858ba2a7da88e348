//! End-to-end tests of the `kof-store` command against the fixture FloxHub and binary caches,
//! served over real HTTP on loopback, with the real Nix as the reference.
//!
//! One test target (as ripgrep does): each test gets its own temporary node (store and
//! configuration) and its own fixture server; the fixtures themselves (real Debian binaries
//! made into store paths, signed caches, floxmeta repositories) are built once and shared.

mod support;

mod closure_rule;
mod faults;
mod floxhub;
mod interop;
mod prefetch;
mod run;
mod run_keeps;
mod store;
