//! `containerd-shim-flox-v2`: runs containers inside Flox environments served by kof.
//!
//! containerd runs this binary for a runtime registered as Flox documents it (`runtime_type =
//! "io.containerd.runc.v2"` with `runtime_path`, or `io.containerd.flox.v2` found on `PATH`).
//! It is a wrapper around `containerd-shim-runc-v2`: it acts at the two moments containerd runs
//! a shim binary ([`lifecycle`]: `start`, with the bundle's `config.json` written, and
//! `delete`), then `exec`s the runc shim with the same command line, which does everything else
//! (the ttrpc task service, runc, I/O, events, cgroups with either driver). So for an
//! environment container the root, the mounts and the process are already the environment's
//! when the runc shim reads the spec, and plain containers (pod sandboxes, skipped sidecars,
//! containers without the annotation) never see kof at all.
//!
//! - [`args`]: the shim command line containerd gives;
//! - [`annotations`]: the `flox.dev/*` annotations and what they decide;
//! - [`spec`]: the bundle's OCI spec, rewritten in place;
//! - [`container`]: the container's overlay root and record on the node;
//! - [`token`]: a private environment's token, from the pod's secret mount;
//! - [`lifecycle`]: `start`, `delete`, and the sweep of containers whose `delete` never came.
//!
//! It owns each container's directory under `containers_dir` (its overlay and record) and
//! nothing else: it never fetches, never reads or writes the store, never talks to FloxHub or a
//! cache, and never mounts a view itself; environments are prepared and released by
//! kof-fetcherd through its API ([`kof_node_api::api::Client`]).
//!
//! kof-fetcherd is found through the kof config (`KOF_CONFIG`, else `/etc/kof/config.toml`; key
//! `socket`), whose `containers_dir` holds the containers' roots.
//!
//! Known limit of the wrapper shape: `exec`s into a container (`kubectl exec`, CRI
//! `ExecSync`) go from containerd straight to the runc shim with the process containerd keeps
//! for the container, so they run in the container's root (the environment's view) with the
//! container's original variables, not activated; `flox.dev/skip-containers-exec` is accepted
//! and changes nothing.

#![deny(missing_docs)]

pub mod annotations;
pub mod args;
pub mod container;
pub mod error;
pub mod lifecycle;
pub mod spec;
pub mod token;

pub use error::ShimError;
