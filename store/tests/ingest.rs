//! Ingest: dedup, chunk sharing, bad input leaving nothing visible, interrupted streams,
//! re-ingest, concurrency, and range reads.

mod common;

use std::io::{self, Read};
use std::sync::Arc;

use common::*;
use kof_nar::NixHash;
use kof_store::{FileContent, NodeKind, Stats, Store, StoreError};

fn ingest_dir(store: &Store, name: &str, dir: &std::path::Path) -> kof_store::IngestStats {
    let nar = nix_dump(dir);
    let info = narinfo(&store_path(name), &nar, &[]);
    store.ingest_nar(&info, "file:///c", &mut &nar[..]).unwrap()
}

fn file_content(store: &Store, name: &str, file: &[u8]) -> FileContent {
    let tree = store.tree(&store_path(name)).unwrap();
    match &tree.iter().find(|n| n.name == file).unwrap().kind {
        NodeKind::Regular { content, .. } => *content,
        k => panic!("not a file: {k:?}"),
    }
}

#[test]
fn identical_files_in_two_paths_are_stored_once() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let shared = text_bytes(1, 400_000);
    let big = random_bytes(2, 5 << 20);
    for p in ["one", "two"] {
        let d = tmp.path().join(p);
        write(&d.join("lib/shared.txt"), &shared, false);
        write(&d.join("lib/big.so"), &big, true);
        write(&d.join("own"), p.as_bytes(), false);
    }
    let first = ingest_dir(&store, "one", &tmp.path().join("one"));
    let after_one = store.stats().unwrap();
    let second = ingest_dir(&store, "two", &tmp.path().join("two"));
    let after_two = store.stats().unwrap();

    assert!(first.new_stored_bytes > 5 << 20, "{first:?}");
    // The second path only adds its own 3-byte file.
    assert_eq!(second.new_objects, 1, "{second:?}");
    assert_eq!(second.new_stored_bytes, 3);
    assert_eq!(second.objects, first.objects);
    assert_eq!(after_two.stored_bytes, after_one.stored_bytes + 3);
    assert_eq!(after_two.store_paths, 2);
    assert_eq!(after_two.logical_bytes, first.nar_bytes + second.nar_bytes);
    // The text file is compressed at rest, the random one is not.
    assert!(after_two.stored_bytes < after_two.unique_bytes);
    let on_disk: u64 = walk_objects(&store.dir().join("objects"));
    assert_eq!(
        on_disk, after_two.stored_bytes,
        "stats count the bytes on disk"
    );
}

fn walk_objects(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for sub in std::fs::read_dir(dir).unwrap() {
        for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            total += f.unwrap().metadata().unwrap().len();
        }
    }
    total
}

#[test]
fn versions_of_a_large_file_share_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let v1 = random_bytes(10, 16 << 20);
    let mut v2 = v1.clone();
    v2[8 << 20..(8 << 20) + 5].copy_from_slice(b"XXXXX");
    v2.splice(12 << 20..12 << 20, b"inserted".iter().copied());
    write(&tmp.path().join("v1/lib.so"), &v1, false);
    write(&tmp.path().join("v2/lib.so"), &v2, false);
    let a = ingest_dir(&store, "lib-1", &tmp.path().join("v1"));
    let b = ingest_dir(&store, "lib-2", &tmp.path().join("v2"));
    assert!(a.new_stored_bytes >= 16 << 20, "{a:?}");
    assert!(
        b.new_stored_bytes < 4 << 20,
        "two small edits cost a few chunks, not the file: {b:?}"
    );
    assert!(b.objects > 16, "the file is split into many chunks: {b:?}");

    // Every byte reads back, in whole and by range.
    let c2 = file_content(&store, "lib-2", b"lib.so");
    assert!(c2.chunked);
    let mut all = Vec::new();
    store.open_file(&c2).unwrap().read_to_end(&mut all).unwrap();
    assert!(all == v2);
    for (off, len) in [
        (0u64, 1usize),
        (8 << 20, 300_000),
        ((12 << 20) - 3, 20),
        (v2.len() as u64 - 7, 100),
    ] {
        let mut buf = vec![0u8; len];
        let n = store.read_file_range(&c2, off, &mut buf).unwrap();
        let end = (off as usize + len).min(v2.len());
        assert_eq!(n, end - off as usize);
        assert!(buf[..n] == v2[off as usize..end], "range {off}+{len}");
    }
    let mut buf = [0u8; 4];
    assert_eq!(
        store
            .read_file_range(&c2, v2.len() as u64, &mut buf)
            .unwrap(),
        0
    );
    assert!(matches!(
        store.read_file_range(&c2, v2.len() as u64 + 1, &mut buf),
        Err(StoreError::RangeOutOfBounds { .. })
    ));
}

#[test]
fn range_reads_of_compressed_objects() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let small = text_bytes(20, 700_000);
    let big = text_bytes(21, 9 << 20);
    write(&tmp.path().join("p/small"), &small, false);
    write(&tmp.path().join("p/big"), &big, false);
    ingest_dir(&store, "p", &tmp.path().join("p"));
    let stats = store.stats().unwrap();
    assert!(
        stats.stored_bytes * 2 < stats.unique_bytes,
        "text compresses: {stats:?}"
    );
    for (name, data) in [(&b"small"[..], &small), (b"big", &big)] {
        let c = file_content(&store, "p", name);
        let mut off = 0u64;
        // Odd-sized reads walking the whole file cross every object boundary.
        while (off as usize) < data.len() {
            let mut buf = vec![0u8; 131_071];
            let n = store.read_file_range(&c, off, &mut buf).unwrap();
            assert!(n > 0);
            assert!(buf[..n] == data[off as usize..off as usize + n]);
            off += n as u64;
        }
    }
}

fn assert_nothing_visible(store: &Store, before: &Stats, name: &str) {
    let path = store_path(name);
    assert!(!store.has_path(&path).unwrap());
    assert!(store.path_info(&path).unwrap().is_none());
    assert!(matches!(
        store.tree(&path),
        Err(StoreError::PathNotFound(_))
    ));
    assert_eq!(&store.stats().unwrap(), before);
}

fn sample_nar(tmp: &std::path::Path) -> Vec<u8> {
    let d = tmp.join("sample");
    write(&d.join("a"), &text_bytes(30, 100_000), false);
    write(&d.join("b/big"), &random_bytes(31, 3 << 20), true);
    nix_dump(&d)
}

#[test]
fn bad_input_fails_cleanly_and_leaves_nothing_visible() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let nar = sample_nar(tmp.path());
    let before = store.stats().unwrap();
    let path = store_path("victim");

    // Truncated inside the big file.
    let info = narinfo(&path, &nar, &[]);
    let cut = &nar[..nar.len() - 500_000];
    match store.ingest_nar(&info, "c", &mut &cut[..]) {
        Err(StoreError::Nar { path: p, .. }) => assert_eq!(p, path),
        other => panic!("truncated NAR: {other:?}"),
    }
    assert_nothing_visible(&store, &before, "victim");

    // Hash mismatch: the narinfo says another hash.
    let mut info = narinfo(&path, &nar, &[]);
    info.nar_hash = NixHash::digest(b"something else");
    match store.ingest_nar(&info, "c", &mut &nar[..]) {
        Err(StoreError::NarHashMismatch {
            path: p,
            expected,
            got,
        }) => {
            assert_eq!(p, path);
            assert_eq!(expected, NixHash::digest(b"something else"));
            assert_eq!(got, NixHash::digest(&nar));
        }
        other => panic!("hash mismatch: {other:?}"),
    }
    assert_nothing_visible(&store, &before, "victim");

    // Size mismatch.
    let mut info = narinfo(&path, &nar, &[]);
    info.nar_size += 8;
    assert!(matches!(
        store.ingest_nar(&info, "c", &mut &nar[..]),
        Err(StoreError::NarSizeMismatch { got, .. }) if got == nar.len() as u64
    ));
    assert_nothing_visible(&store, &before, "victim");

    // Malformed: a corrupted tag, and trailing garbage.
    let mut bad = nar.clone();
    bad[8 + 13 + 3 + 8 + 1] = b'X';
    let info = narinfo(&path, &bad, &[]);
    assert!(matches!(
        store.ingest_nar(&info, "c", &mut &bad[..]),
        Err(StoreError::Nar { .. })
    ));
    let mut trailing = nar.clone();
    trailing.extend_from_slice(&[0u8; 8]);
    let info = narinfo(&path, &trailing, &[]);
    assert!(matches!(
        store.ingest_nar(&info, "c", &mut &trailing[..]),
        Err(StoreError::Nar { .. })
    ));
    assert_nothing_visible(&store, &before, "victim");

    // The real thing still goes in afterwards, and reads back exactly.
    let info = narinfo(&path, &nar, &[]);
    store.ingest_nar(&info, "c", &mut &nar[..]).unwrap();
    let mut out = Vec::new();
    store.dump_nar(&path, &mut out).unwrap();
    assert!(out == nar);
    assert!(store.verify().unwrap().is_ok());
}

/// Yields `limit` bytes of `data`, then fails like a dropped connection.
struct FailingReader<'a> {
    data: &'a [u8],
    limit: usize,
}

impl Read for FailingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.limit == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "peer went away",
            ));
        }
        let n = buf.len().min(self.limit).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        self.limit -= n;
        Ok(n)
    }
}

#[test]
fn interrupted_stream_then_fresh_ingest_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    let store = Store::open(&store_dir).unwrap();
    let nar = sample_nar(tmp.path());
    let path = store_path("interrupted");
    let info = narinfo(&path, &nar, &[]);
    let before = store.stats().unwrap();
    let mut r = FailingReader {
        data: &nar,
        limit: nar.len() - 1_000_000,
    };
    match store.ingest_nar(&info, "c", &mut r) {
        Err(StoreError::Nar { source, .. }) => {
            assert!(
                kof_node_api::report::chain(&source).contains("peer went away"),
                "{source}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_nothing_visible(&store, &before, "interrupted");
    assert_eq!(std::fs::read_dir(store_dir.join("tmp")).unwrap().count(), 0);
    // Objects written before the failure are on disk without rows; gc sweeps them.
    assert!(walk_objects(&store_dir.join("objects")) > 0);

    let stats = store.ingest_nar(&info, "c", &mut &nar[..]).unwrap();
    assert_eq!(stats.nar_bytes, nar.len() as u64);
    assert!(store.has_path(&path).unwrap());
    assert!(store.verify().unwrap().is_ok());
    let mut out = Vec::new();
    store.dump_nar(&path, &mut out).unwrap();
    assert!(out == nar);
}

#[test]
fn reingest_is_a_verified_noop() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let nar = sample_nar(tmp.path());
    let path = store_path("again");
    let mut info = narinfo(&path, &nar, &[store_path("dep")]);
    info.sigs = vec![kof_nar::SecretKey::generate("test-1").sign(b"x")];
    // Its reference first (Nix's closure rule: a path is stored only with its references).
    let dep_nar = nix_dump(&{
        let d = tmp.path().join("dep");
        write(&d, b"dep", false);
        d
    });
    store
        .ingest_nar(
            &narinfo(&store_path("dep"), &dep_nar, &[]),
            "c1",
            &mut &dep_nar[..],
        )
        .unwrap();
    store.ingest_nar(&info, "c1", &mut &nar[..]).unwrap();
    let stored = store.path_info(&path).unwrap().unwrap();
    assert_eq!(stored.references, vec![store_path("dep")]);
    assert_eq!(stored.sigs, vec![info.sigs[0].to_string()]);
    assert_eq!(stored.source_cache, "c1");
    assert_eq!(stored.nar_size, nar.len() as u64);
    let stats = store.stats().unwrap();

    let again = store.ingest_nar(&info, "c2", &mut &nar[..]).unwrap();
    assert_eq!(again.nar_bytes, nar.len() as u64);
    assert_eq!(again.new_stored_bytes, 0);
    assert_eq!(store.stats().unwrap(), stats);
    assert_eq!(store.path_info(&path).unwrap().unwrap(), stored);
    // Still verified: a bad stream for a stored path is an error, and changes nothing.
    let mut bad = info.clone();
    bad.nar_hash = NixHash::digest(b"no");
    assert!(matches!(
        store.ingest_nar(&bad, "c2", &mut &nar[..]),
        Err(StoreError::NarHashMismatch { .. })
    ));
    assert!(store.has_path(&path).unwrap());
    let dep = store.path_info(&store_path("dep")).unwrap().unwrap();
    let mut expected = vec![stored, dep];
    expected.sort_by(|a, b| a.store_path.cmp(&b.store_path));
    assert_eq!(store.list_paths().unwrap(), expected);
}

#[test]
fn concurrent_ingests_of_different_and_same_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&tmp.path().join("store")).unwrap());
    let shared = random_bytes(40, 2 << 20);
    let mut jobs = Vec::new();
    for i in 0..6 {
        let d = tmp.path().join(format!("src{i}"));
        write(&d.join("shared.bin"), &shared, false);
        write(&d.join("own"), &text_bytes(50 + i, 200_000), false);
        let nar = nix_dump(&d);
        jobs.push((format!("p{i}"), nar));
    }
    // Each path twice, all at once.
    let handles: Vec<_> = jobs
        .iter()
        .chain(jobs.iter())
        .cloned()
        .map(|(name, nar)| {
            let store = store.clone();
            std::thread::spawn(move || {
                let info = narinfo(&store_path(&name), &nar, &[]);
                store.ingest_nar(&info, "c", &mut &nar[..]).unwrap()
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let stats = store.stats().unwrap();
    assert_eq!(stats.store_paths, 6);
    assert!(store.verify().unwrap().is_ok());
    for (name, nar) in &jobs {
        let mut out = Vec::new();
        store.dump_nar(&store_path(name), &mut out).unwrap();
        assert!(&out == nar);
    }
    // The shared file's chunks are stored once, with bytes on disk matching the rows.
    assert_eq!(
        walk_objects(&store.dir().join("objects")),
        stats.stored_bytes
    );
    assert!(stats.unique_bytes < 2 * (2 << 20));
}

#[test]
fn metadata_survives_reopen_and_newer_schema_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let nar = sample_nar(tmp.path());
    let path = store_path("kept");
    {
        let store = Store::open(&dir).unwrap();
        store
            .ingest_nar(&narinfo(&path, &nar, &[]), "c", &mut &nar[..])
            .unwrap();
    }
    let store = Store::open(&dir).unwrap();
    let mut out = Vec::new();
    store.dump_nar(&path, &mut out).unwrap();
    assert!(out == nar);
    drop(store);
    let conn = rusqlite::Connection::open(dir.join("db.sqlite")).unwrap();
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, kof_store::db::SCHEMA_VERSION);
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    assert!(matches!(
        Store::open(&dir),
        Err(StoreError::SchemaTooNew { found: 99, .. })
    ));
}

#[test]
fn two_stores_on_one_directory_ingest_the_same_path_at_once() {
    // Two `Store`s stand in for two processes: they share nothing but the directory.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let a = Arc::new(Store::open(&dir).unwrap());
    let b = Arc::new(Store::open(&dir).unwrap());
    let nar = Arc::new(sample_nar(tmp.path()));
    let handles: Vec<_> = [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .map(|s| {
            let nar = nar.clone();
            std::thread::spawn(move || {
                let info = narinfo(&store_path("contended"), &nar, &[]);
                s.ingest_nar(&info, "c", &mut &nar[..]).unwrap()
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for s in [&a, &b] {
        assert_eq!(s.list_paths().unwrap().len(), 1);
        let mut out = Vec::new();
        s.dump_nar(&store_path("contended"), &mut out).unwrap();
        assert!(out == *nar);
    }
    assert!(a.verify().unwrap().is_ok());
    assert_eq!(
        walk_objects(&dir.join("objects")),
        a.stats().unwrap().stored_bytes
    );
}

#[test]
fn stale_tmp_files_are_removed_only_by_an_exclusive_opener() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    drop(Store::open(&dir).unwrap());
    let stale = dir.join("tmp/obj-left-by-a-crash");
    std::fs::write(&stale, b"partial").unwrap();
    let first = Store::open(&dir).unwrap();
    assert!(!stale.exists(), "the only opener cleans tmp/");
    std::fs::write(&stale, b"maybe being written").unwrap();
    let second = Store::open(&dir).unwrap();
    assert!(
        stale.exists(),
        "tmp/ is left alone while another Store has the store open"
    );
    drop(second);
    drop(first);
}
