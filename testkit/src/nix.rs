//! Reference bytes by the real Nix.

use std::path::{Path, PathBuf};
use std::process::Command;

use kof_nar::StorePath;

/// Something `nix-store --dump` can dump: a file-system path or a store path.
pub trait DumpTarget {
    /// The path to dump.
    fn dump_path(&self) -> PathBuf;
}

impl DumpTarget for Path {
    fn dump_path(&self) -> PathBuf {
        self.to_path_buf()
    }
}

impl DumpTarget for PathBuf {
    fn dump_path(&self) -> PathBuf {
        self.clone()
    }
}

impl DumpTarget for StorePath {
    fn dump_path(&self) -> PathBuf {
        PathBuf::from(self.to_absolute())
    }
}

/// `nix-store --dump` of `path`, by the real Nix: the reference NAR. Panics (naming the path
/// and Nix's error) when Nix fails.
pub fn nix_dump<T: DumpTarget + ?Sized>(path: &T) -> Vec<u8> {
    let path = path.dump_path();
    let out = Command::new("nix-store")
        .arg("--dump")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("running nix-store --dump {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "nix-store --dump {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
