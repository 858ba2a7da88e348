//! Mounting and unmounting the view file system, and the [`Mounted`] handle through which views
//! are added and removed while it runs.
//!
//! The mount is made by this process directly (it runs as root; no `fusermount3`, no
//! auto-unmount helper, which once left a hung mount on this kind of machine), read-only,
//! `allow_other` and `default_permissions`. Unmounting is explicit: a plain `umount`, and when
//! that fails (files still open, a process's working directory inside), a lazy `MNT_DETACH`
//! unmount, after which the worker threads go on serving the remaining users until they let go.

use std::ffi::CString;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use fuser::{Config, INodeNo, MountOption, Notifier, Session, SessionACL, SessionUnmounter};

use crate::filesystem::{KofFs, Shared};
use crate::stats::OpStats;
use crate::tree::{AddViewError, ROOT_INO};
use crate::{ContentSource, Entry, FuseError};

/// How to mount the view file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// FUSE worker threads, all reading the one `/dev/fuse` descriptor: a request a thread has
    /// read stays on that descriptor's open file until answered, so a hand-over (which passes
    /// that file on) loses none. Default 8.
    pub threads: usize,
    /// Serve files that are fully local by FUSE passthrough when the kernel supports it. Default
    /// true.
    pub passthrough: bool,
    /// The file system name shown in `/proc/self/mountinfo`. Default `kof`.
    pub fs_name: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            threads: 8,
            passthrough: true,
            fs_name: "kof".to_owned(),
        }
    }
}

/// A mounted view file system. Dropping it unmounts (best effort; errors are logged).
pub struct Mounted {
    pub(crate) mountpoint: PathBuf,
    pub(crate) shared: Arc<Shared>,
    pub(crate) notifier: Notifier,
    pub(crate) unmounter: Option<SessionUnmounter>,
    pub(crate) session: Option<JoinHandle<io::Result<()>>>,
    /// The protocol version the connection's `INIT` settled.
    pub(crate) proto: (u32, u32),
    /// Taken over from another server: fuser does not own the mount, we unmount by path.
    pub(crate) resumed: bool,
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted")
            .field("mountpoint", &self.mountpoint)
            .field("views", &self.views())
            .finish_non_exhaustive()
    }
}

/// Mounts an empty view file system on `dir` and starts its worker threads. Returns once the
/// kernel has completed the FUSE handshake, so the mount is usable.
pub fn mount(
    dir: &Path,
    source: Arc<dyn ContentSource>,
    opts: MountOptions,
) -> Result<Mounted, FuseError> {
    let meta = std::fs::metadata(dir).map_err(|source| FuseError::MountPoint {
        path: dir.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(FuseError::NotADirectory {
            path: dir.to_owned(),
        });
    }
    let mountpoint = dir.canonicalize().map_err(|source| FuseError::MountPoint {
        path: dir.to_owned(),
        source,
    })?;
    if opts.threads == 0 {
        return Err(FuseError::NoThreads { path: mountpoint });
    }
    let mut config = session_config(&opts);
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(opts.fs_name.clone()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::Exec,
    ];

    let shared = Arc::new(Shared::new(source, opts.passthrough));
    let fs = KofFs {
        shared: shared.clone(),
    };
    let mut session =
        Session::new(fs, &mountpoint, &config).map_err(|source| FuseError::Mount {
            path: mountpoint.clone(),
            source,
        })?;
    let notifier = session.notifier();
    let unmounter = session.unmount_callable();
    let proto = session
        .proto_version()
        .map(|v| (v.0, v.1))
        .expect("a mounted session completed its handshake");
    let dev = session
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| FuseError::Mount {
            path: mountpoint.clone(),
            source,
        })?;
    let _ = shared.dev.set(dev);
    // On a spawn error the session was dropped inside the failed closure, which unmounted.
    let handle = spawn_session(session, &mountpoint)?;
    tracing::info!(mountpoint = %mountpoint.display(), threads = opts.threads,
        passthrough = opts.passthrough, "kof FUSE view mounted");
    Ok(Mounted {
        mountpoint,
        shared,
        notifier,
        unmounter: Some(unmounter),
        session: Some(handle),
        proto,
        resumed: false,
    })
}

/// The session configuration of a mount and of a take-over: every user may enter, `threads`
/// workers sharing one descriptor (see [`MountOptions::threads`]).
pub(crate) fn session_config(opts: &MountOptions) -> Config {
    let mut config = Config::default();
    config.acl = SessionACL::All;
    config.n_threads = Some(opts.threads);
    // One descriptor for all workers (see `MountOptions::threads`).
    config.clone_fd = false;
    config
}

/// Runs `session` (serving `mountpoint`) on a thread of its own, which starts its workers.
pub(crate) fn spawn_session(
    session: Session<KofFs>,
    mountpoint: &Path,
) -> Result<JoinHandle<io::Result<()>>, FuseError> {
    std::thread::Builder::new()
        .name("kof-fuse".to_owned())
        .spawn(move || session.run())
        .map_err(|source| FuseError::SpawnSession {
            path: mountpoint.to_path_buf(),
            source,
        })
}

impl Mounted {
    /// Adds a view named `name` (one path component) showing the tree `root`, a directory.
    pub fn add_view(&self, name: &str, root: Arc<Entry>) -> Result<(), FuseError> {
        let invalid = |reason| FuseError::InvalidViewName {
            name: name.to_owned(),
            mountpoint: self.mountpoint.clone(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("empty"));
        }
        if name == "." || name == ".." {
            return Err(invalid("`.` and `..` are not names"));
        }
        if name.contains('/') {
            return Err(invalid("contains `/`"));
        }
        if name.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        if name.len() > 255 {
            return Err(invalid("longer than 255 bytes"));
        }
        if self.shared.is_frozen() {
            return Err(FuseError::HandedOver {
                path: self.mountpoint.clone(),
            });
        }
        self.shared
            .tree_write()
            .add_view(name, root)
            .map_err(|e| match e {
                AddViewError::Exists => FuseError::ViewExists {
                    name: name.to_owned(),
                    mountpoint: self.mountpoint.clone(),
                },
                AddViewError::RootNotDirectory => FuseError::ViewRootNotDirectory {
                    name: name.to_owned(),
                    mountpoint: self.mountpoint.clone(),
                },
            })?;
        // A lookup of this name before it existed may have left an absence in the kernel's
        // cache.
        self.invalidate_root_entry(name);
        tracing::debug!(mountpoint = %self.mountpoint.display(), view = name, "view added");
        Ok(())
    }

    /// Drops the kernel's cached entry (or cached absence) for `name` in the mount root. Called
    /// outside the tree lock: the kernel may call back into the file system while invalidating.
    /// Failure is harmless: root entries are cached for a second only.
    fn invalidate_root_entry(&self, name: &str) {
        match self
            .notifier
            .inval_entry(INodeNo(ROOT_INO), std::ffi::OsStr::new(name))
        {
            // Nothing cached under that name.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(error) => tracing::warn!(mountpoint = %self.mountpoint.display(), view = name,
                error = %kof_node_api::report::chain(&error), "invalidating a view's root entry failed; it is right within a second"),
            Ok(()) => {}
        }
    }

    /// Removes the view `name`; returns whether it existed. Files already open in it stay
    /// readable; new path lookups through the mount root no longer find it.
    pub fn remove_view(&self, name: &str) -> bool {
        if self.shared.is_frozen() || !self.shared.tree_write().remove_view(name) {
            return false;
        }
        self.invalidate_root_entry(name);
        tracing::debug!(mountpoint = %self.mountpoint.display(), view = name, "view removed");
        true
    }

    /// The names of the mounted views, sorted.
    pub fn views(&self) -> Vec<String> {
        self.shared.tree.read().view_names()
    }

    /// Where the file system is mounted (canonical).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// A snapshot of the operation latency statistics.
    pub fn op_stats(&self) -> OpStats {
        self.shared.stats.snapshot()
    }

    /// Unmounts: a plain unmount, else a lazy one (`MNT_DETACH`) when the mount is busy.
    pub fn unmount(mut self) -> Result<(), FuseError> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<(), FuseError> {
        let unmounter = self.unmounter.take();
        if unmounter.is_none() && !self.resumed {
            return Ok(());
        }
        // A session that already ended had its connection aborted (or was unmounted by someone
        // else): fuser then skips the unmount, but an aborted mount is still in the mount table.
        let ended = self.session.as_ref().is_none_or(JoinHandle::is_finished);
        let unmounted = match unmounter {
            Some(mut u) => u.unmount(),
            None => {
                self.resumed = false;
                umount(&self.mountpoint)
            }
        };
        if let (Ok(()), false) = (&unmounted, ended) {
            tracing::info!(mountpoint = %self.mountpoint.display(), "kof FUSE view unmounted");
        } else {
            // Busy (open files, working directories), no longer mounted, or aborted: detach
            // lazily; `EINVAL` means it is no longer a mount point, nothing left to do.
            match detach(&self.mountpoint) {
                Ok(()) => tracing::warn!(mountpoint = %self.mountpoint.display(),
                    unmount = ?unmounted.err(), "detached the mount lazily"),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(mountpoint = %self.mountpoint.display(),
                        "kof FUSE view was already unmounted");
                }
                Err(source) => {
                    return Err(FuseError::Unmount {
                        path: self.mountpoint.clone(),
                        source,
                    })
                }
            }
            if !ended {
                // The worker threads serve the remaining users of a detached mount and end when
                // the kernel drops the connection: not joined, so this does not block.
                self.session.take();
                return Ok(());
            }
        }
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        match session.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(FuseError::Session {
                path: self.mountpoint.clone(),
                source,
            }),
            Err(_) => Err(FuseError::SessionPanicked {
                path: self.mountpoint.clone(),
            }),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(error) = self.unmount_inner() {
            tracing::error!(mountpoint = %self.mountpoint.display(),
                error = %kof_node_api::report::chain(&error),
                "unmounting the kof FUSE view on drop failed");
        }
    }
}

// Others keep the handle in shared state and call it from any thread.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Mounted>();
};

/// `umount2(path, 0)`, for a mount fuser did not make (taken over).
fn umount(path: &Path) -> io::Result<()> {
    umount2(path, 0)
}

/// `umount2(path, MNT_DETACH)`: libc has it and nothing higher-level is needed for one call.
fn detach(path: &Path) -> io::Result<()> {
    umount2(path, libc::MNT_DETACH)
}

fn umount2(path: &Path, flags: libc::c_int) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mount point contains NUL"))?;
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::umount2(c_path.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
