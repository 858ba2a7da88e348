//! Leases on disk: one JSON file per lease in `<store_dir>/leases/`, written atomically
//! (temporary file, fsync, rename, fsync of the directory), so a restarted daemon knows every
//! lease a container may still be using, and a crash leaves either the old file or the new one.
//!
//! A write that fails (a full file system above all: [`LeaseStoreError::NoSpace`]) removes its
//! temporary file at once and leaves the lease's file as it was, so the prepare that wrote it
//! fails with the error and no half-written record is ever read.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What the daemon remembers of a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The lease id.
    pub lease: String,
    /// FloxHub owner.
    pub owner: String,
    /// Environment name.
    pub name: String,
    /// The generation held (the environment record in the store has the rest).
    pub generation: u64,
    /// Whether the request named the generation.
    pub pinned: bool,
    /// The activation (holds `FLOX_ENV`).
    pub activation: kof_node_api::api::Activation,
    /// Whether this lease set the gc root (and so its release may remove it).
    pub root_set_by_lease: bool,
    /// Unix time it was prepared.
    pub created_at: i64,
    /// The FUSE view its containers use, shared by every lease of the same view tree (see
    /// [`view_name`]); absent in records written before views were shared, whose view is
    /// named after the lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<String>,
}

impl LeaseRecord {
    /// `owner/name`.
    pub fn env_name(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }

    /// The name of the view under the FUSE mount that this lease's containers use.
    pub fn view_name(&self) -> &str {
        self.view.as_deref().unwrap_or(&self.lease)
    }
}

/// The name of the shared view of tree `tree` (a [`kof_lazy::view::tree_digest`]): `tree@` and
/// 32 hex digits of the digest. The `@` is outside the lease-id alphabet, so a shared view never
/// has the name of a lease's own view (the views of records without [`LeaseRecord::view`]).
pub fn view_name(tree: &str) -> String {
    let hex: String = tree
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(32)
        .collect();
    format!("tree@{hex}")
}

/// Why the lease directory failed.
#[derive(Debug, Error)]
pub enum LeaseStoreError {
    /// An I/O operation failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A lease record could not be written: the file system is full (`ENOSPC`, or `EDQUOT`
    /// under a quota).
    #[error("writing lease record {path}: file system full")]
    NoSpace {
        /// The file being written.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A lease file is not a lease.
    #[error("lease file {path} is malformed")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// The lease directory.
#[derive(Debug, Clone)]
pub struct LeaseDir {
    dir: PathBuf,
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LeaseStoreError {
    let path = path.to_path_buf();
    move |source| {
        if kof_store::is_no_space_io(&source) {
            LeaseStoreError::NoSpace { path, source }
        } else {
            LeaseStoreError::Io {
                action,
                path,
                source,
            }
        }
    }
}

impl LeaseDir {
    /// Opens (creating, mode 0700) the directory.
    pub fn open(dir: &Path) -> Result<LeaseDir, LeaseStoreError> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("creating", dir))?;
        Ok(LeaseDir {
            dir: dir.to_path_buf(),
        })
    }

    fn file(&self, lease: &str) -> PathBuf {
        self.dir.join(format!("{lease}.json"))
    }

    /// Writes `rec` atomically. On failure the temporary file is removed and the lease's
    /// file is as it was.
    pub fn put(&self, rec: &LeaseRecord) -> Result<(), LeaseStoreError> {
        let path = self.file(&rec.lease);
        let tmp = self
            .dir
            .join(format!(".tmp-{}-{}", std::process::id(), rec.lease));
        let text = serde_json::to_vec_pretty(rec).expect("a lease record always encodes");
        let written = (|| {
            let mut f = fs::File::create(&tmp).map_err(io("creating", &tmp))?;
            f.write_all(&text).map_err(io("writing", &tmp))?;
            f.sync_all().map_err(io("syncing", &tmp))?;
            drop(f);
            fs::rename(&tmp, &path).map_err(io("renaming into place", &path))
        })();
        if let Err(e) = written {
            if let Err(rm) = fs::remove_file(&tmp) {
                if rm.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(file = %tmp.display(), error = %kof_node_api::report::chain(&rm),
                        "removing a lease record's temporary file");
                }
            }
            return Err(e);
        }
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<(), LeaseStoreError> {
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing", &self.dir))
    }

    /// Removes a lease file; `false` if there was none.
    pub fn remove(&self, lease: &str) -> Result<bool, LeaseStoreError> {
        let path = self.file(lease);
        match fs::remove_file(&path) {
            Ok(()) => {
                self.sync_dir()?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io("removing", &path)(e)),
        }
    }

    /// Every lease on disk, by id. Leftover temporary files are removed; a malformed file is
    /// an error (it may be a lease a container is using: it must not be forgotten silently).
    pub fn load_all(&self) -> Result<Vec<LeaseRecord>, LeaseStoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io("listing", &self.dir))? {
            let entry = entry.map_err(io("listing", &self.dir))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".tmp-") {
                fs::remove_file(&path).map_err(io("removing", &path))?;
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            let text = fs::read(&path).map_err(io("reading", &path))?;
            let rec: LeaseRecord =
                serde_json::from_slice(&text).map_err(|source| LeaseStoreError::Malformed {
                    path: path.clone(),
                    source,
                })?;
            out.push(rec);
        }
        out.sort_by(|a, b| a.lease.cmp(&b.lease));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record of lease `c1` of kof/hello's generation 2, its view `view`.
    fn record(view: Option<String>) -> LeaseRecord {
        LeaseRecord {
            lease: "c1".into(),
            owner: "kof".into(),
            name: "hello".into(),
            generation: 2,
            pinned: false,
            activation: kof_node_api::api::Activation {
                env: "kof/hello:2".into(),
                flox_env: "/nix/store/abc-flox-env-hello".into(),
                description: "hello".into(),
                vars: Default::default(),
                hook: None,
                bash: None,
            },
            root_set_by_lease: true,
            created_at: 7,
            view,
        }
    }

    #[test]
    fn leases_round_trip_and_leftovers_are_cleaned() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = LeaseDir::open(&tmp.path().join("leases")).unwrap();
        let rec = record(Some(view_name("0123456789abcdef0123456789abcdef0123")));
        dir.put(&rec).unwrap();
        std::fs::write(tmp.path().join("leases/.tmp-1-c2"), b"{").unwrap();
        assert_eq!(dir.load_all().unwrap(), vec![rec.clone()]);
        assert!(!tmp.path().join("leases/.tmp-1-c2").exists());
        assert!(dir.remove("c1").unwrap());
        assert!(!dir.remove("c1").unwrap());
        assert!(dir.load_all().unwrap().is_empty());
        std::fs::write(tmp.path().join("leases/bad.json"), b"{").unwrap();
        assert!(matches!(
            dir.load_all(),
            Err(LeaseStoreError::Malformed { .. })
        ));
    }

    /// A lease record write on a full file system (a tmpfs the test mounts, as root) fails
    /// with `NoSpace` naming the file, leaves no temporary file, and the lease's earlier
    /// record stays whole.
    #[test]
    fn a_full_file_system_fails_the_write_and_leaves_the_old_record() {
        let tmp = tempfile::tempdir().unwrap();
        let mnt = tmp.path().join("fs");
        let _fs = kof_testkit::Tmpfs::mount(&mnt, "1m");

        let dir = LeaseDir::open(&mnt.join("leases")).unwrap();
        let rec = record(None);
        dir.put(&rec).unwrap();
        kof_testkit::fill_file_system(&mnt.join("filler"));

        let mut newer = rec.clone();
        newer.generation = 3;
        let mut other = rec.clone();
        other.lease = "c2".into();
        for r in [&newer, &other] {
            let e = dir.put(r).expect_err("no space for the record");
            let LeaseStoreError::NoSpace { path, .. } = &e else {
                panic!("expected NoSpace, got {e:?}");
            };
            assert!(path.starts_with(mnt.join("leases")), "{}", path.display());
            assert!(e.to_string().contains("file system full"), "{e}");
        }
        let names: Vec<String> = std::fs::read_dir(mnt.join("leases"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec!["c1.json".to_string()],
            "no temporary file is left"
        );
        assert_eq!(dir.load_all().unwrap(), vec![rec.clone()]);

        // Room again: the update goes through.
        std::fs::remove_file(mnt.join("filler")).unwrap();
        dir.put(&newer).unwrap();
        assert_eq!(dir.load_all().unwrap(), vec![newer]);
    }

    #[test]
    fn shared_view_names_are_never_lease_ids_and_old_records_name_their_own() {
        let name = view_name("0123456789abcdef0123456789abcdef0123");
        assert_eq!(name, "tree@0123456789abcdef0123456789abcdef");
        assert!(kof_node_api::lease::check_lease_id(&name).is_err());
        // A record written before views were shared has no `view`: its view is the lease's.
        let old = r#"{"lease":"k8s.io.c1","owner":"kof","name":"hello","generation":2,
            "pinned":false,"activation":{"env":"kof/hello:2","flox_env":"/nix/store/x",
            "description":"hello","vars":{},"hook":null,"bash":null},
            "root_set_by_lease":true,"created_at":7}"#;
        let rec: LeaseRecord = serde_json::from_str(old).unwrap();
        assert_eq!(rec.view, None);
        assert_eq!(rec.view_name(), "k8s.io.c1");
    }
}
