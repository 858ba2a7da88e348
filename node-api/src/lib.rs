//! What every process on a kof node shares, and nothing heavier: the node configuration
//! ([`config`]), the local API of `kof-fetcherd` with its blocking client ([`api`]),
//! environment references as pods name them ([`envref`]), lease ids ([`lease`]), and the
//! activation of a command inside an environment as `flox activate -- CMD` does it
//! ([`activate`]), and waiting for a process's exit through a pidfd ([`pidfd`]).
//!
//! The containerd shim and `kof-node-install` depend on this crate alone among kof's: it never
//! touches the network, SQLite, FUSE or a compressor, so they neither compile nor link any of
//! those, and changes to the fetcher or the lazy engine never rebuild them. Everything here is
//! data and validation: the daemon (`kof-fetcherd`) does the work these types describe.
//!
//! Everything parsed here comes from outside (a config file, a pod's annotations, a socket
//! peer) and is validated before use; a bad value is refused with an error naming it.

#![deny(missing_docs)]

pub mod activate;
pub mod api;
pub mod config;
pub mod envref;
pub mod lease;
pub mod pidfd;
pub mod report;
