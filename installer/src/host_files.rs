//! Writing files on the host: only when the content differs, atomically, backing up what is
//! replaced.
//!
//! A file is written to a temporary name in its own directory, flushed, given its mode and
//! renamed over the old one, so a reader (containerd starting the shim, the daemon reading its
//! config) sees the old file or the new one, never a part; renaming also never hits `ETXTBSY`
//! on a shim binary that is running. The directory is synced after the rename.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;

/// Why a file could not be read, backed up or written.
#[derive(Debug, Error)]
pub enum HostFileError {
    /// Reading a file failed.
    #[error("{path}: cannot read")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Creating the directory that holds a file failed.
    #[error("{path}: cannot create directory")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Writing (or renaming into place) a file failed.
    #[error("{path}: cannot write")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Writing the backup of a file failed.
    #[error("{path}: cannot back up to {backup}")]
    Backup {
        /// The file.
        path: PathBuf,
        /// The backup.
        backup: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// The file already had this content and mode.
    Unchanged,
    /// The file had this content; only its mode was set.
    ModeSet,
    /// The file did not exist.
    Created,
    /// The file had other content; `backup` holds it when a backup was asked for.
    Replaced {
        /// The backup, if one was made.
        backup: Option<PathBuf>,
    },
}

/// Reads `path`, `None` when it does not exist.
pub fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, HostFileError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(HostFileError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The backup name of `path`: `<path>.kof-backup-<unix seconds>`, with `.N` added if a backup
/// of that second exists already.
fn backup_name(path: &Path, n: u32) -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".kof-backup-{secs}"));
    if n > 0 {
        name.push(format!(".{n}"));
    }
    PathBuf::from(name)
}

/// Copies `content` (the current content of `path`) to a new backup file next to it, keeping
/// `path`'s mode; returns the backup's name. An existing backup is never overwritten.
pub fn backup(path: &Path, content: &[u8]) -> Result<PathBuf, HostFileError> {
    let mode = fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    for n in 0..1000 {
        let target = backup_name(path, n);
        let err = |source| HostFileError::Backup {
            path: path.to_path_buf(),
            backup: target.clone(),
            source,
        };
        let mut file = match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&target)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(err(e)),
        };
        file.write_all(content).map_err(err)?;
        file.sync_all().map_err(err)?;
        return Ok(target);
    }
    Err(HostFileError::Backup {
        path: path.to_path_buf(),
        backup: backup_name(path, 1000),
        source: io::Error::new(io::ErrorKind::AlreadyExists, "too many backups this second"),
    })
}

/// Makes `path` hold `content` with `mode`: nothing is written when it already does; otherwise
/// the old file is backed up first (when `keep_backup`) and the new one renamed into place.
pub fn install(
    path: &Path,
    content: &[u8],
    mode: u32,
    keep_backup: bool,
) -> Result<Written, HostFileError> {
    let current = read_if_exists(path)?;
    if current.as_deref() == Some(content) {
        let meta = fs::metadata(path).map_err(|source| HostFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.permissions().mode() & 0o7777 == mode {
            return Ok(Written::Unchanged);
        }
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|source| {
            HostFileError::Write {
                path: path.to_path_buf(),
                source,
            }
        })?;
        return Ok(Written::ModeSet);
    }
    let backup = match (&current, keep_backup) {
        (Some(old), true) => Some(backup(path, old)?),
        _ => None,
    };
    write_atomic(path, content, mode)?;
    Ok(match current {
        None => Written::Created,
        Some(_) => Written::Replaced { backup },
    })
}

/// Writes `content` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> Result<(), HostFileError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(|source| HostFileError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.kof-tmp-{}", std::process::id()));
    let err = |source| HostFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    // A leftover of a run that died at this point (same pid in another container) is ours.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(content)?;
        // The umask may have cut bits off `mode`.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_writes_only_differences_and_backs_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc/kof/config.toml");
        assert_eq!(
            install(&path, b"a = 1\n", 0o644, true).unwrap(),
            Written::Created
        );
        assert_eq!(
            install(&path, b"a = 1\n", 0o644, true).unwrap(),
            Written::Unchanged
        );
        assert_eq!(
            install(&path, b"a = 1\n", 0o600, true).unwrap(),
            Written::ModeSet
        );
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            0o600
        );
        let Written::Replaced { backup: Some(b1) } =
            install(&path, b"a = 2\n", 0o600, true).unwrap()
        else {
            panic!("expected a replacement with a backup")
        };
        assert_eq!(fs::read(&b1).unwrap(), b"a = 1\n");
        assert!(b1.to_string_lossy().contains("config.toml.kof-backup-"));
        // A second backup in the same second gets its own name.
        let Written::Replaced { backup: Some(b2) } =
            install(&path, b"a = 3\n", 0o600, true).unwrap()
        else {
            panic!("expected a replacement with a backup")
        };
        assert_ne!(b1, b2);
        assert_eq!(fs::read(&b2).unwrap(), b"a = 2\n");
        assert_eq!(fs::read(&path).unwrap(), b"a = 3\n");
        assert_eq!(
            install(&path, b"a = 4\n", 0o600, false).unwrap(),
            Written::Replaced { backup: None }
        );
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains("kof-tmp")), "{names:?}");
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, "x").unwrap();
        let e = install(&blocker.join("sub/config.toml"), b"x", 0o644, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!(
                "{}: cannot ",
                blocker.join("sub/config.toml").display()
            )) || e.starts_with(&format!(
                "{}: cannot create directory",
                blocker.join("sub").display()
            )),
            "{e}"
        );
    }
}
