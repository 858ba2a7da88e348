//! Exact reproduction, checked against the real Nix: a tree with nasty cases is dumped by
//! `nix-store --dump`, ingested, and must come back byte-identical from `dump_nar` and, via
//! `export`, from `nix-store --dump` of the exported tree, with the modes `nix-store --restore`
//! gives.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use kof_store::{NodeKind, Store, StoreError};

/// Every entry below `root` with its kind, mode and (for files) content/target.
fn describe(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        let mode = meta.permissions().mode() & 0o7777;
        let desc = if meta.file_type().is_symlink() {
            format!("symlink -> {}", fs::read_link(&p).unwrap().display())
        } else if meta.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            format!("dir {mode:o}")
        } else {
            format!("file {mode:o} {:?}", blake3::hash(&fs::read(&p).unwrap()))
        };
        out.push((rel, desc));
    }
    out.sort();
    out
}

fn nix_restore(nar: &[u8], dest: &Path) {
    use std::io::Write;
    let mut child = Command::new("nix-store")
        .arg("--restore")
        .arg(dest)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(nar).unwrap();
    assert!(child.wait().unwrap().success());
}

fn roundtrip(store: &Store, name: &str, src: &Path, work: &Path) {
    let nar = nix_dump(src);
    let path = store_path(name);
    let info = narinfo(&path, &nar, &[]);
    assert_eq!(
        nix_hash_path(src),
        info.nar_hash,
        "nix hash path agrees with the NAR's sha256"
    );

    let stats = store
        .ingest_nar(&info, "file:///cache", &mut &nar[..])
        .unwrap();
    assert_eq!(stats.nar_bytes, nar.len() as u64);
    assert!(store.has_path(&path).unwrap());

    let mut dumped = Vec::new();
    store.dump_nar(&path, &mut dumped).unwrap();
    assert!(
        dumped == nar,
        "dump_nar of {name} is byte-identical to nix-store --dump"
    );

    let exported = work.join(format!("export-{name}"));
    store.export(&path, &exported).unwrap();
    assert!(
        nix_dump(&exported) == nar,
        "nix-store --dump of the export of {name} is identical"
    );

    let restored = work.join(format!("restore-{name}"));
    nix_restore(&nar, &restored);
    assert_eq!(
        describe(&exported),
        describe(&restored),
        "export matches nix-store --restore"
    );

    assert!(matches!(
        store.export(&path, &exported),
        Err(StoreError::ExportTargetExists(_))
    ));
}

#[test]
fn nasty_tree_roundtrips_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    nasty_tree(&src);
    let store = Store::open(&tmp.path().join("store")).unwrap();
    roundtrip(&store, "nasty", &src, tmp.path());

    // The big file really is chunked, the boundary files are not, and NAR offsets point at
    // the contents.
    let nar = nix_dump(&src);
    let tree = store.tree(&store_path("nasty")).unwrap();
    let find = |name: &[u8]| tree.iter().find(|n| n.name == name).unwrap();
    for (name, chunked) in [
        (&b"big.bin"[..], true),
        (b"exactly-1MiB", false),
        (b"just-over-1MiB", true),
        (b"empty", false),
    ] {
        let n = find(name);
        let NodeKind::Regular { content, .. } = n.kind else {
            panic!("{name:?} is a regular file")
        };
        assert_eq!(
            content.chunked,
            chunked,
            "{:?}",
            String::from_utf8_lossy(name)
        );
        let off = n.nar_offset.unwrap() as usize;
        let size = content.size as usize;
        let mut buf = vec![0u8; size];
        assert_eq!(store.read_file_range(&content, 0, &mut buf).unwrap(), size);
        assert!(buf == nar[off..off + size], "nar_offset of {name:?}");
    }
}

#[test]
fn single_file_and_symlink_paths_roundtrip() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let file = tmp.path().join("script");
    write(&file, b"#!/bin/sh\nexit 0\n", true);
    roundtrip(&store, "single-exec", &file, tmp.path());
    let plain = tmp.path().join("plain");
    write(&plain, &text_bytes(1, 3 << 20), false);
    roundtrip(&store, "single-big", &plain, tmp.path());
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink("/nix/store/somewhere/else", &link).unwrap();
    roundtrip(&store, "single-link", &link, tmp.path());
    let empty = tmp.path().join("empty-dir");
    fs::create_dir(&empty).unwrap();
    roundtrip(&store, "empty-dir", &empty, tmp.path());
}
