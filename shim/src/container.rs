//! A container's own directory on the node: the overlay that is its root, and its record.
//!
//! `<containers_dir>/<namespace>/<id>/` holds `upper/` and `work/` (the overlay's writable layer
//! and its work directory), `rootfs/` (the overlay's mount point, which becomes the container's
//! root), `store/` (only for `nix-mutable` on a real image: a writable overlay of the store) and
//! `record.json` (the lease and bundle, so that a container whose `delete` never came can be
//! cleaned up later). The directory is outside the bundle on purpose: containerd removes the
//! bundle recursively, and must never walk into a mounted overlay.
//!
//! Cleanup takes an `flock` on the directory, so a `delete` and a sweep from another
//! container's start never undo each other half-way; every step of it tolerates having been
//! done already.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a container directory could not be made, mounted or removed.
#[derive(Debug, Error)]
pub enum ContainerError {
    /// A namespace or container id kof will not put in a path.
    #[error("container {namespace}/{id}: {what} {value:?} holds characters other than [A-Za-z0-9._-] or starts with '.'")]
    BadName {
        /// The namespace.
        namespace: String,
        /// The container id.
        id: String,
        /// Which of the two.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// A file system operation failed.
    #[error("{path}: {what}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The operation.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A path cannot be an overlay option (`,`, `:` or `\`).
    #[error("{path}: overlay directories cannot hold ',', ':' or '\\'")]
    OverlayPath {
        /// The path.
        path: PathBuf,
    },
    /// Mounting failed.
    #[error("mounting {what} at {path}")]
    Mount {
        /// What was mounted.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::errno::Errno,
    },
    /// Unmounting failed.
    #[error("unmounting {path}")]
    Unmount {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::errno::Errno,
    },
}

/// How a container's root was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootMode {
    /// The image is a placeholder: the root is an overlay of the view.
    View,
    /// The image is real: its root stays, the environment is mounted on top.
    Image,
}

/// What kof remembers about a container until it is cleaned up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// containerd namespace.
    pub namespace: String,
    /// Container id.
    pub id: String,
    /// The bundle containerd made for it.
    pub bundle: PathBuf,
    /// The daemon lease holding its view.
    pub lease: String,
    /// The environment, as annotated.
    pub environment: String,
    /// Unix time of its start.
    pub created_at: i64,
    /// How execs into it run; written once its environment is prepared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<crate::exec::ExecProfile>,
}

const RECORD: &str = "record.json";

/// Prefix of a container directory being made (see [`ContainerDir::create`]).
pub const NEW_PREFIX: &str = ".new-";

fn check_name(
    namespace: &str,
    id: &str,
    what: &'static str,
    value: &str,
) -> Result<(), ContainerError> {
    let ok = !value.is_empty()
        && value.len() <= 255
        && !value.starts_with('.')
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::BadName {
            namespace: namespace.to_string(),
            id: id.to_string(),
            what,
            value: value.to_string(),
        })
    }
}

/// `<containers_dir>/<namespace>/<id>`.
#[derive(Debug, Clone)]
pub struct ContainerDir {
    dir: PathBuf,
}

/// An `flock` held on a container directory (released on drop).
pub struct DirLock {
    _file: File,
}

impl ContainerDir {
    /// The directory of container `id` in `namespace` (not created).
    pub fn new(containers_dir: &Path, namespace: &str, id: &str) -> Result<Self, ContainerError> {
        check_name(namespace, id, "namespace", namespace)?;
        check_name(namespace, id, "id", id)?;
        Ok(ContainerDir {
            dir: containers_dir.join(namespace).join(id),
        })
    }

    /// A directory found on disk (by a sweep).
    pub fn at(dir: PathBuf) -> Self {
        ContainerDir { dir }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The overlay's mount point: the container's root.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// The writable store overlay's mount point (`nix-mutable` on a real image).
    pub fn store(&self) -> PathBuf {
        self.dir.join("store")
    }

    fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> ContainerError {
        let path = path.to_path_buf();
        move |source| ContainerError::Io { path, what, source }
    }

    /// Creates the directory (mode 0700) holding `rec`, and locks it. The directory appears
    /// with its record already in it (made under a temporary name, then renamed), so a sweep
    /// never finds a container's directory without knowing its bundle.
    pub fn create(&self, rec: &ContainerRecord) -> Result<DirLock, ContainerError> {
        use std::os::unix::fs::DirBuilderExt;
        let parent = self.dir.parent().unwrap_or(Path::new("/"));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)
            .map_err(Self::io(parent, "creating the directory"))?;
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = ContainerDir {
            dir: parent.join(format!("{NEW_PREFIX}{name}-{}", std::process::id())),
        };
        let _ = std::fs::remove_dir_all(&tmp.dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp.dir)
            .map_err(Self::io(&tmp.dir, "creating the container's directory"))?;
        let made = tmp.write_record(rec).and_then(|()| {
            std::fs::rename(&tmp.dir, &self.dir)
                .map_err(Self::io(&self.dir, "creating the container's directory"))
        });
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&tmp.dir);
            return Err(e);
        }
        self.lock()?.ok_or_else(|| ContainerError::Io {
            path: self.dir.clone(),
            what: "locking the container's directory",
            source: std::io::ErrorKind::NotFound.into(),
        })
    }

    /// Locks the directory; `None` when it does not exist (any more).
    pub fn lock(&self) -> Result<Option<DirLock>, ContainerError> {
        let file = match File::open(&self.dir) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Self::io(&self.dir, "opening the container's directory")(e)),
        };
        file.lock()
            .map_err(Self::io(&self.dir, "locking the container's directory"))?;
        Ok(Some(DirLock { _file: file }))
    }

    /// The record, if there is one.
    pub fn record(&self) -> Result<Option<ContainerRecord>, ContainerError> {
        let path = self.dir.join(RECORD);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Self::io(&path, "reading the record")(e.into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Self::io(&path, "reading the record")(e)),
        }
    }

    /// Writes the record atomically.
    pub fn write_record(&self, rec: &ContainerRecord) -> Result<(), ContainerError> {
        use std::io::Write;
        let path = self.dir.join(RECORD);
        let tmp = self.dir.join(".record.json.tmp");
        let text = serde_json::to_vec(rec).expect("a record serialises");
        let mut f = File::create(&tmp).map_err(Self::io(&tmp, "writing the record"))?;
        f.write_all(&text)
            .and_then(|_| f.sync_all())
            .map_err(Self::io(&tmp, "writing the record"))?;
        std::fs::rename(&tmp, &path).map_err(Self::io(&path, "writing the record"))
    }

    /// Mounts an overlay of `lower` at `target`, its upper and work directories named `name`
    /// in this directory.
    fn mount_overlay(&self, lower: &Path, name: &str, target: &Path) -> Result<(), ContainerError> {
        let upper = self.dir.join(format!("{name}.upper"));
        let work = self.dir.join(format!("{name}.work"));
        for d in [&upper, &work, &target.to_path_buf()] {
            std::fs::create_dir_all(d).map_err(Self::io(d, "creating the directory"))?;
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            overlay_path(lower)?,
            overlay_path(&upper)?,
            overlay_path(&work)?
        );
        mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .map_err(|source| ContainerError::Mount {
            what: "an overlay",
            path: target.to_path_buf(),
            source,
        })
    }

    /// Mounts the container's root: an overlay of `view_root` at [`ContainerDir::rootfs`].
    pub fn mount_root(&self, view_root: &Path) -> Result<(), ContainerError> {
        self.mount_overlay(view_root, "root", &self.rootfs())
    }

    /// Mounts a writable overlay of the view's store at [`ContainerDir::store`].
    pub fn mount_store(&self, view_store: &Path) -> Result<(), ContainerError> {
        self.mount_overlay(view_store, "store", &self.store())
    }

    /// Unmounts whatever of ours is mounted. Idempotent.
    pub fn unmount(&self) -> Result<(), ContainerError> {
        for target in [self.rootfs(), self.store()] {
            unmount_if_mounted(&target)?;
        }
        Ok(())
    }

    /// Unmounts whatever of ours is mounted and removes the directory. Idempotent.
    pub fn remove(&self) -> Result<(), ContainerError> {
        self.unmount()?;
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Self::io(&self.dir, "removing the container's directory")(e)),
        }
    }
}

/// A path as an overlay option value.
fn overlay_path(p: &Path) -> Result<String, ContainerError> {
    let s = p.to_str().ok_or_else(|| ContainerError::OverlayPath {
        path: p.to_path_buf(),
    })?;
    if s.contains([',', ':', '\\']) {
        return Err(ContainerError::OverlayPath {
            path: p.to_path_buf(),
        });
    }
    Ok(s.to_string())
}

/// Unmounts `target` if something is mounted there; a busy mount is detached.
fn unmount_if_mounted(target: &Path) -> Result<(), ContainerError> {
    loop {
        match umount2(target, MntFlags::empty()) {
            // Mounted twice (a retried start): unmount again.
            Ok(()) => continue,
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(nix::errno::Errno::EBUSY) => {
                return umount2(target, MntFlags::MNT_DETACH).map_err(|source| {
                    ContainerError::Unmount {
                        path: target.to_path_buf(),
                        source,
                    }
                })
            }
            Err(source) => {
                return Err(ContainerError::Unmount {
                    path: target.to_path_buf(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_leave_the_directory_are_refused() {
        let root = Path::new("/var/lib/kof/containers");
        for (ns, id) in [
            ("k8s.io", "../x"),
            ("..", "a"),
            ("default", ""),
            ("a/b", "c"),
        ] {
            assert!(ContainerDir::new(root, ns, id).is_err(), "{ns} {id}");
        }
        let d = ContainerDir::new(root, "k8s.io", "abc_1-2.3").unwrap();
        assert_eq!(d.path(), root.join("k8s.io/abc_1-2.3"));
    }

    #[test]
    fn records_round_trip_and_removal_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let d = ContainerDir::new(tmp.path(), "default", "c1").unwrap();
        let rec = ContainerRecord {
            namespace: "default".into(),
            id: "c1".into(),
            bundle: "/run/b/c1".into(),
            lease: "default.c1".into(),
            environment: "kof/hello".into(),
            created_at: 1,
            exec: None,
        };
        let lock = d.create(&rec).unwrap();
        assert_eq!(d.record().unwrap(), Some(rec.clone()));
        let names: Vec<_> = std::fs::read_dir(tmp.path().join("default"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("c1")]);
        drop(lock);
        assert_eq!(d.record().unwrap(), Some(rec));
        d.remove().unwrap();
        d.remove().unwrap();
        assert!(!d.path().exists());
        assert!(d.lock().unwrap().is_none());
    }
}
