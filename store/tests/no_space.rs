//! A full file system: the store on a small tmpfs (mounted by the test, as root) is filled by
//! a filler file. An ingest then fails with `StoreError::NoSpace` naming the file it was
//! writing, nothing of it becomes visible, `verify` is clean and earlier paths read back
//! byte-exact; once the filler is deleted, the same ingest succeeds (the time from freeing the
//! space to that success is printed: issue 13's "time to recover after ENOSPC").

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::*;
use kof_store::{Store, StoreError};
use kof_testkit::{fill_file_system, Tmpfs};

/// The NAR of a tree of `seed`: an incompressible file of `big` bytes (chunked above 1 MiB),
/// compressible text and small files.
fn nar_of(dir: &Path, seed: u64, big: usize) -> Vec<u8> {
    write(&dir.join("bin/big"), &random_bytes(seed, big), true);
    write(
        &dir.join("share/text"),
        &text_bytes(seed + 1, 200_000),
        false,
    );
    for j in 0..20 {
        write(
            &dir.join(format!("small/{j}")),
            format!("{seed}-{j}").as_bytes(),
            false,
        );
    }
    nix_dump(dir)
}

fn dump(store: &Store, path: &kof_nar::StorePath) -> Vec<u8> {
    let mut out = Vec::new();
    store.dump_nar(path, &mut out).unwrap();
    out
}

#[test]
fn ingest_on_a_full_file_system_fails_cleanly_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let nars = tmp.path().join("nars");
    let nar_a = nar_of(&nars.join("a"), 1, 3 << 20);
    let nar_b = nar_of(&nars.join("b"), 2, 4 << 20);
    let (path_a, path_b) = (store_path("nospace-a"), store_path("nospace-b"));
    let (info_a, info_b) = (narinfo(&path_a, &nar_a, &[]), narinfo(&path_b, &nar_b, &[]));

    let fs_dir = tmp.path().join("fs");
    let _mount = Tmpfs::mount(&fs_dir, "16m");
    let store_dir = fs_dir.join("store");
    let store = Store::open(&store_dir).unwrap();
    store.ingest_nar(&info_a, "c", &mut &nar_a[..]).unwrap();

    let filler = fs_dir.join("filler");
    let filled = fill_file_system(&filler);
    eprintln!("filler: {filled} bytes; the file system is full");

    let e = store
        .ingest_nar(&info_b, "c", &mut &nar_b[..])
        .expect_err("an ingest into a full file system fails");
    let message = chain(&e);
    eprintln!("ingest on a full file system: {message}");
    let StoreError::NoSpace { path, source } = &e else {
        panic!("expected NoSpace, got {e:?}");
    };
    assert!(
        path.starts_with(store_dir.join("objects")),
        "names the object file being written: {}",
        path.display()
    );
    assert_eq!(source.kind(), std::io::ErrorKind::StorageFull, "{source:?}");
    assert!(
        e.to_string().contains("file system full")
            && e.to_string().contains(&*path.to_string_lossy()),
        "{e}"
    );
    assert!(e.is_no_space() && kof_store::chain_is_no_space(&e));

    // Nothing of B is visible; A is whole; the store is consistent.
    assert!(!store.has_path(&path_b).unwrap());
    assert_eq!(
        store
            .list_paths()
            .unwrap()
            .into_iter()
            .map(|p| p.store_path)
            .collect::<Vec<_>>(),
        vec![path_a.clone()]
    );
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(dump(&store, &path_a), nar_a, "A reads back byte-exact");
    // No temporary object file is left behind.
    let leftovers: Vec<_> = walk(&store_dir.join("objects"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".tmp-")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A path whose objects are all stored needs only database pages: it either fits in the
    // WAL's free pages or fails with SQLITE_FULL, rolled back. Either way the store stays
    // consistent.
    let path_a2 = store_path("nospace-a2");
    let info_a2 = narinfo(&path_a2, &nar_a, &[]);
    match store.ingest_nar(&info_a2, "c", &mut &nar_a[..]) {
        Ok(_) => {
            eprintln!("a dedup-only ingest fitted in the database's free pages");
            assert!(store.has_path(&path_a2).unwrap());
            assert_eq!(dump(&store, &path_a2), nar_a);
        }
        Err(e) => {
            eprintln!("a dedup-only ingest on a full file system: {}", chain(&e));
            assert!(e.is_no_space(), "{e:?}");
            let StoreError::NoSpace { path, .. } = &e else {
                panic!("a full database is NoSpace: {e:?}");
            };
            assert_eq!(
                path,
                &store_dir.join("db.sqlite"),
                "it names the database file"
            );
            assert!(!store.has_path(&path_a2).unwrap());
        }
    }
    assert!(store.verify().unwrap().is_ok());

    // Freeing space: the same ingest succeeds at once.
    let t0 = Instant::now();
    fs::remove_file(&filler).unwrap();
    store.ingest_nar(&info_b, "c", &mut &nar_b[..]).unwrap();
    let recovered = t0.elapsed();
    eprintln!(
        "time to recover after ENOSPC (store ingest of a {} byte NAR, from freeing space to the \
         committed path): {:.1} ms",
        nar_b.len(),
        recovered.as_secs_f64() * 1e3
    );
    assert!(store.has_path(&path_b).unwrap());
    assert_eq!(dump(&store, &path_b), nar_b);
    assert_eq!(dump(&store, &path_a), nar_a);
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    drop(store);
}

/// The error and its sources, joined with ": ".
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
