//! Test support for the FUSE view tests: a content source that serves real files of a temporary
//! "store" directory and counts its calls, tree builders, mounting under a temporary directory,
//! and a `/proc/self/mountinfo` check.

#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};

use kof_fuse::{mount, Content, ContentSource, Entry, FileRef, MountOptions, Mounted};

/// Serves `FileRef`s from real files: `<root>/<store_path>/<path>`. Counts calls.
pub struct DirSource {
    pub root: PathBuf,
    pub reads: AtomicU64,
    pub bytes: AtomicU64,
    pub backing_calls: AtomicU64,
    /// Whether `backing_file` hands out the local file (a file "becomes local").
    pub backing: AtomicBool,
}

impl DirSource {
    pub fn new(root: &Path, backing: bool) -> Arc<Self> {
        Arc::new(DirSource {
            root: root.to_owned(),
            reads: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            backing_calls: AtomicU64::new(0),
            backing: AtomicBool::new(backing),
        })
    }

    fn local_path(&self, file: &FileRef) -> PathBuf {
        let mut p = self.root.join(&*file.store_path);
        if !file.path.is_empty() {
            p.push(&*file.path);
        }
        p
    }

    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }
}

impl ContentSource for DirSource {
    fn read(&self, file: &FileRef, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let f = File::open(self.local_path(file))?;
        let mut buf = vec![0u8; size as usize];
        let mut filled = 0;
        while filled < buf.len() {
            let n = f.read_at(&mut buf[filled..], offset + filled as u64)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        buf.truncate(filled);
        self.bytes.fetch_add(filled as u64, Ordering::SeqCst);
        Ok(buf)
    }

    fn backing_file(&self, file: &FileRef) -> Option<File> {
        self.backing_calls.fetch_add(1, Ordering::SeqCst);
        if !self.backing.load(Ordering::SeqCst) {
            return None;
        }
        File::open(self.local_path(file)).ok()
    }
}

/// Deterministic pseudo-random bytes (xorshift), so contents differ at every offset.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A temporary store directory and the `Entry` builders that point into it.
pub struct Store {
    pub root: PathBuf,
}

impl Store {
    /// Writes `<root>/<store_path>/<path>` and returns the `Entry` of a regular store file.
    pub fn file(&self, store_path: &str, path: &str, bytes: &[u8], executable: bool) -> Arc<Entry> {
        let local = self.root.join(store_path).join(path);
        std::fs::create_dir_all(local.parent().unwrap()).unwrap();
        std::fs::write(&local, bytes).unwrap();
        Arc::new(Entry::Regular {
            executable,
            content: Content::Store(FileRef {
                store_path: store_path.into(),
                path: path.into(),
                nar_offset: 0,
                size: bytes.len() as u64,
            }),
        })
    }

    /// A store file entry whose bytes are missing on disk: every read fails.
    pub fn missing_file(&self, store_path: &str, path: &str, size: u64) -> Arc<Entry> {
        Arc::new(Entry::Regular {
            executable: false,
            content: Content::Store(FileRef {
                store_path: store_path.into(),
                path: path.into(),
                nar_offset: 0,
                size,
            }),
        })
    }
}

pub fn inline(bytes: &[u8]) -> Arc<Entry> {
    Arc::new(Entry::Regular {
        executable: false,
        content: Content::Inline(bytes.into()),
    })
}

pub fn symlink(target: &str) -> Arc<Entry> {
    Arc::new(Entry::Symlink(target.into()))
}

pub fn dir(entries: Vec<(&str, Arc<Entry>)>) -> Arc<Entry> {
    let map: BTreeMap<OsString, Arc<Entry>> = entries
        .into_iter()
        .map(|(n, e)| (OsString::from(n), e))
        .collect();
    Arc::new(Entry::Directory(map))
}

pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "kof_fuse=debug".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// A mount under a temporary directory. Field order matters: the mount (whose `Drop`
/// unmounts, also when a test panics) drops before the temporary directories.
pub struct Fixture {
    pub mounted: Option<Mounted>,
    pub mnt: PathBuf,
    pub store: Store,
    pub source: Arc<DirSource>,
    _mnt_dir: tempfile::TempDir,
    _store_dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new(opts: MountOptions, backing: bool) -> Fixture {
        init_tracing();
        let store_dir = tempfile::tempdir().unwrap();
        let mnt_dir = tempfile::tempdir().unwrap();
        let source = DirSource::new(store_dir.path(), backing);
        let mounted = mount(mnt_dir.path(), source.clone(), opts).expect("mount");
        let mnt = mounted.mountpoint().to_owned();
        Fixture {
            mounted: Some(mounted),
            mnt,
            store: Store {
                root: store_dir.path().to_owned(),
            },
            source,
            _mnt_dir: mnt_dir,
            _store_dir: store_dir,
        }
    }

    pub fn m(&self) -> &Mounted {
        self.mounted.as_ref().unwrap()
    }

    /// Unmounts explicitly and checks that the mount is gone.
    pub fn unmount(mut self) {
        let mnt = self.mnt.clone();
        self.mounted.take().unwrap().unmount().expect("unmount");
        assert!(!is_mounted(&mnt), "{} still in mountinfo", mnt.display());
    }
}

/// Whether `path` is a mount point according to `/proc/self/mountinfo`.
pub fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(path))
}
