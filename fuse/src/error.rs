//! The typed errors of mounting, changing and unmounting the kof FUSE view.

use std::io;
use std::path::PathBuf;

/// What went wrong with the FUSE mount or one of its views. Every variant names the mount point
/// or the view it is about.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// The mount point cannot be inspected (missing, no permission, ...).
    #[error("mount point {path}")]
    MountPoint {
        /// The mount point as given.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The mount was handed over to another server: this one no longer changes it.
    #[error("the FUSE view at {path} was handed over to another server")]
    HandedOver {
        /// The mount point.
        path: PathBuf,
    },
    /// A handed-over mount could not be taken over.
    #[error("taking over the FUSE view at {path}")]
    TakeOver {
        /// The mount point.
        path: PathBuf,
        /// What did not match.
        #[source]
        source: crate::tree::RestoreError,
    },
    /// The mount point exists but is not a directory.
    #[error("mount point {path} is not a directory")]
    NotADirectory {
        /// The mount point as given.
        path: PathBuf,
    },
    /// `MountOptions::threads` was zero.
    #[error("mount at {path}: zero FUSE worker threads requested")]
    NoThreads {
        /// The mount point.
        path: PathBuf,
    },
    /// The kernel refused the mount, or the FUSE handshake failed.
    #[error("mounting the FUSE view at {path}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The thread driving the FUSE session could not be started.
    #[error("starting the FUSE session thread for {path}")]
    SpawnSession {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A view name is not one plain path component.
    #[error("view name {name:?} on {mountpoint}: {reason}")]
    InvalidViewName {
        /// The rejected name.
        name: String,
        /// The mount point.
        mountpoint: PathBuf,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A view's root entry is not a directory.
    #[error("view {name:?} on {mountpoint}: its root entry is not a directory")]
    ViewRootNotDirectory {
        /// The view.
        name: String,
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// A view of that name is already mounted.
    #[error("view {name:?} already exists on {mountpoint}")]
    ViewExists {
        /// The view.
        name: String,
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Neither a normal nor a lazy (`MNT_DETACH`) unmount succeeded.
    #[error("unmounting {path}")]
    Unmount {
        /// The mount point.
        path: PathBuf,
        /// The cause of the last attempt.
        source: io::Error,
    },
    /// The FUSE session ended with an error.
    #[error("FUSE session on {path} failed")]
    Session {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The thread driving the FUSE session panicked.
    #[error("FUSE session thread for {path} panicked")]
    SessionPanicked {
        /// The mount point.
        path: PathBuf,
    },
}
