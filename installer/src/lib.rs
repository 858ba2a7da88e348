//! `kof-node-install`: installs kof on a Kubernetes node, idempotently.
//!
//! Run by the kof DaemonSet's init container with the node's root mounted (`--host-root
//! /host`), or by hand on a node (`--host-root /`). It puts `containerd-shim-flox-v2` (and
//! optionally `kof-store`) in the host's `/usr/local/bin`, writes the node config
//! `/etc/kof/config.toml`, registers the `flox` runtime in containerd's config the way Flox
//! documents it (with a table for containerd's default runtime, which containerd 1.6 and 1.7
//! need), checks the new config with the node's containerd before installing it, and restarts
//! containerd only when that config changed; after a restart it waits for CRI to serve the flox
//! runtime, and rolls the config back when it does not. A second run on an
//! installed node changes no byte and restarts nothing.
//!
//! It owns those host files and nothing else: it never starts or stops kof-fetcherd, never
//! touches the store, and acts on containerd only by editing its config and restarting it (the
//! probe only asks the daemon's API).
//!
//! - [`containerd_config`]: containerd's config, versions 1 to 3, edited with `toml_edit`.
//! - [`check`]: a new containerd config checked with the node's containerd before it is installed.
//! - [`cri`]: CRI's `Status`, asked after the restart (the flox runtime handler must be there).
//! - [`host_files`]: writing host files only when different, atomically, with backups.
//! - [`install`]: the steps, reported one [`install::Action`] at a time.
//! - [`probe`]: the DaemonSet's liveness and readiness checks of `kof-fetcherd`.

#![deny(missing_docs)]

pub mod check;
pub mod containerd_config;
pub mod cri;
pub mod host_files;
pub mod install;
pub mod probe;

pub use containerd_config::{
    ConfigVersion, ContainerdConfig, ContainerdConfigError, ContainerdRelease, FloxRuntime,
};
pub use host_files::{HostFileError, Written};
pub use install::{
    install, Action, ContainerdVersion, CriWait, InstallError, Options, Summary, WaitError,
};

/// An error as the one line `kof-node-install` prints: the error and its causes
/// ([`kof_node_api::report::chain`]), every run of whitespace (a TOML error's multi-line
/// snippet) made one space.
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    kof_node_api::report::chain(err)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}
