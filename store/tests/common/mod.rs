//! Helpers shared by the store's integration tests: trees on disk, the real Nix, narinfos.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use kof_nar::{Compression, NarInfo, NixHash, StorePath};
use rand::{RngCore, SeedableRng};

/// `nix-store --dump` of a path, by the real Nix.
pub use kof_testkit::nix_dump;

/// `nix hash path` of `path`, by the real Nix.
pub fn nix_hash_path(path: &Path) -> NixHash {
    let out = Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "hash",
            "path",
        ])
        .arg(path)
        .output()
        .expect("running nix hash path");
    assert!(
        out.status.success(),
        "nix hash path: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    NixHash::parse(String::from_utf8(out.stdout).unwrap().trim()).unwrap()
}

/// A valid store path named `name` (its hash part derived from the name).
pub fn store_path(name: &str) -> StorePath {
    let h = NixHash::digest(name.as_bytes());
    let hash = kof_nar::base32::encode(&h.0[..20]);
    StorePath::from_base_name(&format!("{hash}-{name}")).unwrap()
}

/// A narinfo for `nar` (NarHash and NarSize computed from it).
pub fn narinfo(path: &StorePath, nar: &[u8], references: &[StorePath]) -> NarInfo {
    NarInfo {
        store_path: path.clone(),
        url: format!("nar/{}.nar", path.hash_part()),
        compression: Compression::None,
        file_hash: None,
        file_size: None,
        nar_hash: NixHash::digest(nar),
        nar_size: nar.len() as u64,
        references: references.to_vec(),
        deriver: Some(format!("{}-x.drv", path.hash_part())),
        system: Some("x86_64-linux".into()),
        sigs: vec![],
        ca: None,
    }
}

/// `len` pseudo-random bytes from `seed` (incompressible).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// `len` bytes of text-like data from `seed` that zstd compresses well.
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    let words = [
        "store",
        "path",
        "nix",
        "flox",
        "environment",
        "object",
        "chunk",
        "kernel",
        "lib",
        "share",
        "bin",
        "the",
        "of",
        "and",
        "a",
        "to",
        "in",
        "is",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        let w = words[(rng.next_u32() as usize) % words.len()];
        v.extend_from_slice(w.as_bytes());
        v.push(if rng.next_u32() % 12 == 0 {
            b'\n'
        } else {
            b' '
        });
    }
    v.truncate(len);
    v
}

pub fn write(path: &Path, data: &[u8], executable: bool) {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).unwrap();
    }
    fs::write(path, data).unwrap();
    let mode = if executable { 0o755 } else { 0o644 };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A tree with the cases that break naive NAR handling.
pub fn nasty_tree(root: &Path) {
    fs::create_dir_all(root).unwrap();
    write(&root.join("empty"), b"", false);
    write(&root.join("empty-exec"), b"", true);
    fs::create_dir(root.join("empty-dir")).unwrap();
    write(&root.join("bin/run"), b"#!/bin/sh\necho hi\n", true);
    std::os::unix::fs::symlink("/nix/store/abc-absolute/target", root.join("link-abs")).unwrap();
    std::os::unix::fs::symlink("../bin/run", root.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("does-not-exist", root.join("dangling")).unwrap();
    write(&root.join("with space"), b"spaces in a name\n", false);
    write(&root.join("ünïcödé-名前"), "utf-8 ✓\n".as_bytes(), false);
    // Byte-order edge cases: upper case before lower, '-' and '.' before digits and letters,
    // a prefix before its extensions, a directory named like a file's prefix.
    for name in ["A", "B", "a", "a-b", "a.b", "a0", "ab", "b", "~", "\u{7f}x"] {
        write(&root.join("sorting").join(name), name.as_bytes(), false);
    }
    write(&root.join("sorting/a.d/inner"), b"inner", false);
    write(&root.join("deep/1/2/3/4/5/file"), b"deep", false);
    // Identical content twice, and at the chunking boundary and just past it.
    write(&root.join("dup1"), &text_bytes(7, 50_000), false);
    write(&root.join("dup2"), &text_bytes(7, 50_000), false);
    write(&root.join("exactly-1MiB"), &random_bytes(3, 1 << 20), false);
    write(
        &root.join("just-over-1MiB"),
        &random_bytes(4, (1 << 20) + 1),
        true,
    );
    // Multi-MiB, chunked: half compressible, half not.
    let mut big = text_bytes(5, 3 << 20);
    big.extend_from_slice(&random_bytes(6, 3 << 20));
    write(&root.join("share/big.bin"), &big, false);
    // Sizes around the 8-byte padding.
    for n in 0..=9 {
        write(&root.join(format!("pad/{n}")), &vec![b'x'; n], false);
    }
}
