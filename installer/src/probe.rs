//! The DaemonSet's health probes: is `kof-fetcherd` answering on the node's socket?
//!
//! Liveness asks `hello` (answered at once, whatever the daemon is busy with): a daemon that
//! does not answer it is stuck and restarting it is right. Readiness asks `status` and also
//! requires the FUSE server to be up, since without it no container can get a view. The socket
//! is the one the node config names (`socket`), as the shim finds it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kof_node_api::api::{ApiError, Client};
use kof_node_api::config::{Config, ConfigError};
use thiserror::Error;

/// What to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The daemon answers `hello`.
    Live,
    /// The daemon answers `status` and its FUSE server is up.
    Ready,
}

/// Why a probe failed.
#[derive(Debug, Error)]
pub enum ProbeError {
    /// The node config could not be loaded.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The daemon did not answer.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The daemon answers but has no FUSE server.
    #[error("kof-fetcherd at {socket} (pid {pid}) answers but its FUSE server is not up")]
    NoFuseServer {
        /// The socket.
        socket: PathBuf,
        /// The daemon's pid.
        pid: u32,
    },
}

/// Runs `check` against the daemon of the node config at `config` (or the default config);
/// returns a one-line description of the healthy daemon.
pub fn probe(config: Option<&Path>, check: Check, timeout: Duration) -> Result<String, ProbeError> {
    let config = Config::load(config)?;
    let socket = config.socket.clone();
    let mut client = Client::connect(&socket)?.with_timeout(timeout);
    match check {
        Check::Live => {
            let hello = client.hello()?;
            Ok(format!(
                "kof-fetcherd at {} is alive (pid {}, store {})",
                socket.display(),
                hello.pid,
                hello.store_dir.display()
            ))
        }
        Check::Ready => {
            let status = client.status()?;
            let fuse = status.fuse_server.ok_or(ProbeError::NoFuseServer {
                socket: socket.clone(),
                pid: status.pid,
            })?;
            Ok(format!(
                "kof-fetcherd at {} is ready (pid {}, {} leases, FUSE server pid {} at {})",
                socket.display(),
                status.pid,
                status.leases.len(),
                fuse.pid,
                fuse.mount_dir.display()
            ))
        }
    }
}
