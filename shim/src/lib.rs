//! `containerd-shim-flox-v2`: runs containers inside Flox environments served by kof.
//!
//! containerd runs this binary for a runtime registered as Flox documents it (`runtime_type =
//! "io.containerd.runc.v2"` with `runtime_path`, or `io.containerd.flox.v2` found on `PATH`).
//! It is containerd's shim for the container's pod, in front of `containerd-shim-runc-v2`:
//!
//! - `start` ([`bootstrap`]) runs the runc shim's `start` and puts a task-API proxy in front of
//!   the runc shim it names, one per pod, as the runc shim groups them;
//! - the proxy ([`proxy`]) serves containerd's task API (ttrpc) and passes every request to the
//!   runc shim, reading three on the way: **Create** sets an environment container up (the
//!   view as its root, the activated process: [`lifecycle`]), **Exec** activates the process of
//!   an exec into one ([`exec`]), and **Delete** releases what Create set up;
//! - `delete` (containerd runs it when a shim is gone) cleans up what is left, then hands over
//!   to the runc shim's `delete`.
//!
//! So kof sees every container and every exec on containerd 1.6, 1.7 and 2.x, where containerd
//! 2.x starts the shim binary only once per pod. runc, I/O, events, cgroups (with either
//! driver, `SystemdCgroup` passed on in the runtime's options) stay the runc shim's, and plain
//! containers (pod sandboxes, skipped sidecars, containers without the annotation) go through
//! untouched.
//!
//! - [`args`]: the shim command line containerd gives;
//! - [`annotations`]: the `flox.dev/*` annotations and what they decide;
//! - [`spec`]: the bundle's OCI spec, rewritten in place;
//! - [`container`]: the container's overlay root and record on the node;
//! - [`token`]: a private environment's token, from the pod's secret mount;
//! - [`lifecycle`]: a container's set-up at Create, its clean-up, and the sweep of containers
//!   whose delete never came.
//!
//! It owns each container's directory under `containers_dir` (its overlay and record) and its
//! proxies' sockets, and nothing else: it never fetches, never reads or writes the store, never
//! talks to FloxHub or a cache, and never mounts a view itself; environments are prepared and
//! released by kof-fetcherd through its API ([`kof_node_api::api::Client`]).
//!
//! kof-fetcherd is found through the kof config (`KOF_CONFIG`, else `/etc/kof/config.toml`; key
//! `socket`), whose `containers_dir` holds the containers' roots.

#![deny(missing_docs)]

pub mod annotations;
pub mod args;
pub mod bootstrap;
pub mod container;
pub mod error;
pub mod exec;
pub mod lifecycle;
pub mod proxy;
pub mod spec;
pub mod token;

pub use error::ShimError;
