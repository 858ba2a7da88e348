//! A full file system on demand: a size-limited tmpfs mounted for a guard's life (the tests
//! run as root), and a filler that writes it full to its last byte.

use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of a given size mounted at a directory for the guard's life; dropping it unmounts
/// (lazily, when a plain unmount fails because something is still open there).
#[derive(Debug)]
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`: `16m`, `1g`) at `dir`, creating it first.
    /// Panics when the mount fails (the test needs root).
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("running mount");
        if !out.status.success() {
            panic!(
                "mounting a tmpfs at {} (the test needs root): {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Creates `file` and writes it until its file system is full, to the last byte; returns its
/// size. Panics on an error other than ENOSPC.
pub fn fill_file_system(file: &Path) -> u64 {
    let mut f = fs::File::create(file).unwrap();
    let block = vec![0x5au8; 64 << 10];
    let mut total = 0u64;
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == ErrorKind::StorageFull => break,
            Err(e) => panic!("filling {}: {e}", file.display()),
        }
    }
    // Whatever a short write left: fill byte by byte to the last one.
    while let Ok(n) = f.write(&block[..1]) {
        if n == 0 {
            break;
        }
        total += 1;
    }
    total
}
