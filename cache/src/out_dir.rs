//! The output directory: its lock, its scratch space `.tmp/`, and files that appear whole or
//! not at all (written under `.tmp/`, then renamed into place).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The scratch directory under an output directory.
pub(crate) const TMP_DIR: &str = ".tmp";
/// The lock file one publication holds.
pub(crate) const LOCK_FILE: &str = ".kof-publish.lock";

/// An I/O failure on a named file.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}", path.display())]
pub struct FileError {
    /// What was being done (`writing`, `renaming into`...).
    pub what: &'static str,
    /// The file.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: io::Error,
}

pub(crate) fn file_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FileError {
    let path = path.to_path_buf();
    move |source| FileError { what, path, source }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary file name under `dir/.tmp/` (unique within the process; the lock keeps
/// other processes out).
pub(crate) fn tmp_path(dir: &Path, label: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(TMP_DIR)
        .join(format!("{label}.{}.{n}", std::process::id()))
}

/// Creates `dir`, `dir/nar` and `dir/.tmp`.
pub(crate) fn prepare(dir: &Path) -> Result<(), FileError> {
    for d in [dir.to_path_buf(), dir.join("nar"), dir.join(TMP_DIR)] {
        fs::create_dir_all(&d).map_err(file_err("creating", &d))?;
    }
    Ok(())
}

/// Writes `data` to `dir/rel` whole or not at all.
pub(crate) fn write_atomic(dir: &Path, rel: &str, data: &[u8]) -> Result<(), FileError> {
    let tmp = tmp_path(dir, &rel.replace('/', "_"));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(file_err("creating", &tmp))?;
        f.write_all(data).map_err(file_err("writing", &tmp))?;
        f.sync_data().map_err(file_err("syncing", &tmp))?;
        place(&tmp, &dir.join(rel))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Renames a finished temporary file to `dest`.
pub(crate) fn place(tmp: &Path, dest: &Path) -> Result<(), FileError> {
    fs::rename(tmp, dest).map_err(file_err("renaming into", dest))
}

/// Holds the output directory's lock for one publication.
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock (failing at once when another publication holds it) and empties
    /// `.tmp/` of what an interrupted run left.
    pub(crate) fn take(dir: &Path) -> Result<DirLock, LockError> {
        prepare(dir)?;
        let path = dir.join(LOCK_FILE);
        let file = File::create(&path).map_err(file_err("creating", &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(LockError::Busy(path)),
            Err(fs::TryLockError::Error(e)) => return Err(file_err("locking", &path)(e).into()),
        }
        let tmp = dir.join(TMP_DIR);
        for entry in fs::read_dir(&tmp).map_err(file_err("listing", &tmp))? {
            let entry = entry.map_err(file_err("listing", &tmp))?;
            let p = entry.path();
            fs::remove_file(&p).map_err(file_err("removing", &p))?;
        }
        Ok(DirLock { _file: file })
    }
}

/// Why the output directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another publication into the same directory is running.
    #[error("another kof-cache publish holds {}", .0.display())]
    Busy(PathBuf),
    /// The lock file or scratch directory failed.
    #[error(transparent)]
    File(#[from] FileError),
}
