//! kof's benchmark harness: the numbers the issues set targets for, measured side by side in one
//! run against the real Nix.
//!
//! Every benchmark runs the real binaries as a user would (`kof-store`, `nix copy`) against the
//! fixture server with network shaping (per-request latency, a bandwidth limit shared by all
//! connections), alternating kof and Nix runs so machine noise hits both alike, and reports
//! ratios together with bytes and request counts (which do not drift).
//!
//! - [`prefetch`]: eager fetch of an environment's closure, kof vs `nix copy --from`.
//! - [`dedup`]: several generations of one environment, kof's stored bytes vs the unique content
//!   and vs a Nix store holding the same paths.
//! - [`coldstart`]: a command's cold start in an environment, lazy vs eager vs Nix, plus warm.
//! - [`concurrent`]: many cold starts of one environment at once through one daemon.
//! - [`prepare`]: preparing a view cold (metadata only), against Nix's narinfo walk.
//! - [`podstart`]: pod start through CRI (the flox shim, containerd, runc): cold, warm, plain
//!   runc and Nix's eager baseline.
//! - [`seqread`]: sequential read of a large cached file through the view vs native.
//! - [`gc`]: gc on a live node: the store's size over 20 generations with and without a
//!   quota, gc time, and reads that failed during gc.
//! - [`nospace`]: time to recover after ENOSPC: a demand read on a node whose store's file
//!   system filled up, once space is freed.

pub mod coldstart;
pub mod concurrent;
pub mod dedup;
pub mod gc;
pub mod node;
pub mod nospace;
pub mod podstart;
pub mod prefetch;
pub mod prepare;
pub mod report;
pub mod seqread;
