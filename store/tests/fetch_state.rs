//! Fetch state: a started fetch is listed until the ingest that stores the path removes it, a
//! failure keeps its error, and a path already stored is never listed as failed.

mod common;

use common::*;
use kof_store::{FetchStateKind, Store};

#[test]
fn fetch_state_follows_a_path_from_start_to_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path().join("t");
    write(&root, b"contents", false);
    let nar = nix_dump(&root);
    let path = store_path("fetch-state");
    let info = narinfo(&path, &nar, &[]);

    store
        .record_fetch_started(&path, "http://cache/nar/x.nar.zst")
        .unwrap();
    let s = store.fetch_states().unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].state, FetchStateKind::Fetching);
    assert_eq!(s[0].attempts, 1);
    assert_eq!(store.stats().unwrap().fetches_unfinished, 1);

    store
        .record_fetch_failed(&path, "FileHash mismatch")
        .unwrap();
    let s = store.fetch_states().unwrap();
    assert_eq!(s[0].state, FetchStateKind::Failed);
    assert_eq!(s[0].source, "http://cache/nar/x.nar.zst");
    assert_eq!(s[0].error.as_deref(), Some("FileHash mismatch"));
    assert_eq!(store.stats().unwrap().fetches_failed, 1);

    // A retry counts, and the ingest that stores the path clears it.
    store
        .record_fetch_started(&path, "http://cache/nar/x.nar.zst")
        .unwrap();
    assert_eq!(store.fetch_states().unwrap()[0].attempts, 2);
    store
        .ingest_nar(&info, "http://cache", &mut &nar[..])
        .unwrap();
    assert!(store.fetch_states().unwrap().is_empty());

    // A late failure report for a stored path (another fetch won) is not recorded.
    store.record_fetch_failed(&path, "too late").unwrap();
    assert!(store.fetch_states().unwrap().is_empty());
}
