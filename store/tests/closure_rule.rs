//! Nix's closure rule in the store: a prepared path is committed only with its References,
//! a refused or dropped prepare leaves nothing visible and its objects reusable, and fetch rows
//! whose process died read as interrupted.
//!
//! The liveness test re-runs its own test binary as the child that records a fetch start (the
//! `#[ignore]`d `child_records_a_fetch_and_waits`, which does nothing unless the parent set its
//! environment), and kills it with SIGKILL.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use kof_nar::{NarInfo, StorePath};
use kof_store::{DanglingReference, FetchStateKind, Store, StoreError};

/// A NAR of a small tree named `name` (a few files, one of them large enough to be chunked),
/// and its narinfo with `references`.
fn sample(tmp: &Path, name: &str, seed: u64, references: &[StorePath]) -> (NarInfo, Vec<u8>) {
    let d = tmp.join(format!("src-{name}"));
    write(&d.join("lib/big"), &random_bytes(seed, 2 << 20), false);
    write(&d.join("share/doc"), &text_bytes(seed + 1, 50_000), false);
    write(&d.join("bin/tool"), name.as_bytes(), true);
    let nar = nix_dump(&d);
    (narinfo(&store_path(name), &nar, references), nar)
}

#[test]
fn commit_refuses_a_path_whose_reference_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let lib = store_path("lib");
    let app = store_path("app");
    // app references lib and itself; lib references nothing.
    let (app_info, app_nar) = sample(tmp.path(), "app", 1, &[lib.clone(), app.clone()]);
    let (lib_info, lib_nar) = sample(tmp.path(), "lib", 2, &[]);
    let before = store.stats().unwrap();

    let prepared = store
        .prepare_nar(&app_info, "c", &mut &app_nar[..])
        .unwrap();
    assert!(prepared.stats().new_objects > 0);
    let first_written = prepared.stats().new_stored_bytes;
    assert!(
        !store.has_path(&app).unwrap(),
        "a prepared path is not visible"
    );
    match store.commit_prepared(vec![prepared]) {
        Err(StoreError::MissingReference { path, reference }) => {
            assert_eq!(path, app);
            assert_eq!(reference, lib);
        }
        other => panic!("expected MissingReference, got {other:?}"),
    }
    assert!(!store.has_path(&app).unwrap());
    assert_eq!(store.stats().unwrap().store_paths, before.store_paths);
    // The single-path API refuses it the same way.
    assert!(matches!(
        store.ingest_nar(&app_info, "c", &mut &app_nar[..]),
        Err(StoreError::MissingReference { .. })
    ));
    assert!(store.check_closure_rule().unwrap().is_empty());

    // The refused prepare's objects stay and deduplicate the next try: nothing is written again.
    let again = store
        .prepare_nar(&app_info, "c", &mut &app_nar[..])
        .unwrap();
    assert_eq!(
        again.stats().new_objects,
        0,
        "objects of the refused prepare are reused"
    );
    assert_eq!(again.stats().new_stored_bytes, 0);
    assert!(first_written > 0);

    // Committed together with its reference, in one transaction, it is valid.
    let lib_prepared = store
        .prepare_nar(&lib_info, "c", &mut &lib_nar[..])
        .unwrap();
    assert_eq!(
        store.commit_prepared(vec![again, lib_prepared]).unwrap(),
        vec![true, true]
    );
    assert!(store.has_path(&app).unwrap() && store.has_path(&lib).unwrap());
    assert!(store.check_closure_rule().unwrap().is_empty());
    assert!(store.verify().unwrap().is_ok());
    let mut out = Vec::new();
    store.dump_nar(&app, &mut out).unwrap();
    assert!(out == app_nar);

    // Committing a path stored meanwhile is a no-op.
    let dup = store
        .prepare_nar(&lib_info, "c", &mut &lib_nar[..])
        .unwrap();
    assert!(dup.already_stored());
    assert_eq!(store.commit_prepared(vec![dup]).unwrap(), vec![false]);
}

#[test]
fn gc_keeps_a_prepared_path_s_objects_and_removes_them_once_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let store = Store::open(&dir).unwrap();
    let (info, nar) = sample(tmp.path(), "dropped", 3, &[]);
    let prepared = store.prepare_nar(&info, "c", &mut &nar[..]).unwrap();
    let objects = prepared.stats().new_objects;
    assert!(objects > 0);
    // Until it is committed or dropped, gc keeps its objects.
    assert_eq!(store.gc().unwrap().objects_removed, 0);
    assert_eq!(store.stats().unwrap().objects, objects);
    drop(prepared);
    assert!(!store.has_path(&info.store_path).unwrap());
    assert_eq!(store.stats().unwrap().objects, objects);
    let report = store.gc().unwrap();
    assert_eq!(report.objects_removed, objects);
    assert_eq!(store.stats().unwrap().objects, 0);
    let left: usize = std::fs::read_dir(dir.join("objects"))
        .unwrap()
        .map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum();
    assert_eq!(left, 0);
}

#[test]
fn check_closure_rule_names_a_stored_path_with_a_missing_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let store = Store::open(&dir).unwrap();
    let (info, nar) = sample(tmp.path(), "dangling", 4, &[]);
    store.ingest_nar(&info, "c", &mut &nar[..]).unwrap();
    assert!(store.check_closure_rule().unwrap().is_empty());
    // A row a store before the rule could hold (or a hand edit): a reference not stored.
    let missing = store_path("gone");
    let db = rusqlite::Connection::open(dir.join("db.sqlite")).unwrap();
    db.execute(
        "INSERT INTO refs (path_id, reference)
         SELECT id, ?1 FROM paths WHERE store_path = ?2",
        [missing.base_name(), info.store_path.base_name()],
    )
    .unwrap();
    let expected = vec![DanglingReference {
        path: info.store_path.clone(),
        reference: missing,
    }];
    assert_eq!(store.check_closure_rule().unwrap(), expected);
    let report = store.verify().unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.dangling_references, expected);
}

#[test]
#[ignore = "helper: run by a_fetch_whose_process_was_killed_reads_as_interrupted as a child"]
fn child_records_a_fetch_and_waits() {
    let Ok(work) = std::env::var("KOF_STORE_FETCH_CHILD") else {
        return;
    };
    let work = PathBuf::from(work);
    let store = Store::open(&work.join("store")).unwrap();
    store
        .record_fetch_started(&store_path("killed"), "http://cache/nar/killed.nar")
        .unwrap();
    std::fs::write(work.join("recorded"), b"").unwrap();
    std::thread::sleep(Duration::from_secs(300));
}

#[test]
fn a_fetch_whose_process_was_killed_reads_as_interrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_records_a_fetch_and_waits",
            "--ignored",
            "--nocapture",
        ])
        .env("KOF_STORE_FETCH_CHILD", work)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !work.join("recorded").exists() {
        assert!(child.try_wait().unwrap().is_none(), "child exited early");
        assert!(Instant::now() < deadline, "child recorded nothing");
        std::thread::sleep(Duration::from_millis(5));
    }
    let store = Store::open(&work.join("store")).unwrap();
    // This process's own fetch, under way.
    store
        .record_fetch_started(&store_path("live"), "http://cache/nar/live.nar")
        .unwrap();
    let state = |name: &str| {
        store
            .fetch_states()
            .unwrap()
            .into_iter()
            .find(|s| s.store_path == store_path(name))
            .unwrap()
    };
    let killed = state("killed");
    assert_eq!(killed.state, FetchStateKind::Fetching, "its process runs");
    assert_eq!(killed.pid, Some(child.id()));
    assert_eq!(state("live").pid, Some(std::process::id()));

    child.kill().unwrap(); // SIGKILL, mid-fetch
    child.wait().unwrap();
    assert_eq!(state("killed").state, FetchStateKind::Interrupted);
    assert_eq!(state("live").state, FetchStateKind::Fetching);

    // A pid now held by another process (its start time differs) is not the fetch's.
    let db = rusqlite::Connection::open(work.join("store/db.sqlite")).unwrap();
    db.execute(
        "UPDATE fetches SET pid_start = pid_start - 1 WHERE store_path = ?1",
        [store_path("live").base_name()],
    )
    .unwrap();
    assert_eq!(state("live").state, FetchStateKind::Interrupted);

    // A new start by a live process makes it `fetching` again.
    store
        .record_fetch_started(&store_path("killed"), "http://cache/nar/killed.nar")
        .unwrap();
    assert_eq!(state("killed").state, FetchStateKind::Fetching);
    assert_eq!(state("killed").attempts, 2);
}
