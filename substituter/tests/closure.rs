//! Fetching closures over real HTTP from caches written by the real Nix, into a real store.

mod fetch_support;

use std::sync::Arc;

use fetch_support::*;
use kof_nar::{NixHash, StorePath};
use kof_store::Store;
use kof_substituter::closure::{ClosureEntry, ClosureError};
use kof_substituter::fetcher::{FetchError, FetchEvent, PathError};
use kof_substituter::substituters::SubstituteError;

/// Every path of `app`'s closure is stored and dumps to exactly `nix-store --dump`'s NAR.
fn assert_closure_stored(store: &Store, fx: &Fixture) {
    for p in nix_closure(&fx.app) {
        assert!(store.has_path(&p).unwrap(), "{p} stored");
        let mut nar = Vec::new();
        store.dump_nar(&p, &mut nar).unwrap();
        let reference = nix_dump(&p);
        assert_eq!(nar.len(), reference.len(), "{p} NAR size");
        assert!(
            nar == reference,
            "{p}: dump_nar differs from nix-store --dump"
        );
        let info = store.path_info(&p).unwrap().unwrap();
        assert_eq!(info.nar_hash, NixHash::digest(&nar), "{p} NarHash");
    }
}

fn nothing_stored(store: &Store, fx: &Fixture) {
    for p in [&fx.app, &fx.lib, &fx.dep] {
        assert!(!store.has_path(p).unwrap(), "{p} must not be stored");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fetches_closure_from_every_compression() {
    let fx = fixture();
    let server = Server::start(&fx.dir).await;
    for cache in ["zstd", "xz", "bzip2", "none"] {
        let (_dir, store) = temp_store();
        let f = fetcher(&store, &[server.url(cache)], &[&fx.trusted_key], true);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let summary = bounded(f.fetch_closure(std::slice::from_ref(&fx.app), Some(tx)))
            .await
            .unwrap_or_else(|e| panic!("{cache}: {e}"));
        assert_eq!(summary.paths, 3, "{cache}");
        assert_eq!(summary.paths_fetched, 3, "{cache}");
        assert_eq!(summary.paths_already_present, 0, "{cache}");
        assert_closure_stored(&store, fx);
        // Byte counts match the cache's files and the NARs.
        let mut file_bytes = 0;
        let mut nar_bytes = 0;
        for p in nix_closure(&fx.app) {
            let (file, _) = nar_file(&fx.dir.join(cache), &p);
            file_bytes += std::fs::metadata(file).unwrap().len();
            nar_bytes += nix_dump(&p).len() as u64;
        }
        assert_eq!(summary.bytes_downloaded, file_bytes, "{cache}");
        assert_eq!(summary.nar_bytes, nar_bytes, "{cache}");
        assert!(summary.new_stored_bytes > 0, "{cache}");
        // Events: one Resolved, a start and a done per path, no failure.
        let mut events = Vec::new();
        while let Ok(e) = rx.try_recv() {
            events.push(e);
        }
        // Downloads start while the closure walk goes on, so `Resolved` (the totals, known
        // once the walk ends) need not come first; it comes exactly once.
        let resolved: Vec<&FetchEvent> = events
            .iter()
            .filter(|e| matches!(e, FetchEvent::Resolved { .. }))
            .collect();
        assert_eq!(resolved.len(), 1, "{cache}: {events:?}");
        assert!(
            matches!(
                resolved[0],
                FetchEvent::Resolved { paths: 3, to_fetch: 3, total_download_bytes, total_nar_bytes }
                    if *total_download_bytes == file_bytes && *total_nar_bytes == nar_bytes
            ),
            "{cache}: {:?}",
            resolved[0]
        );
        let started = events
            .iter()
            .filter(|e| matches!(e, FetchEvent::PathStarted { .. }))
            .count();
        let done: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                FetchEvent::PathDone { path, .. } => Some(path.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(started, 3, "{cache}");
        assert_eq!(done.len(), 3, "{cache}");
        assert!(events
            .iter()
            .any(|e| matches!(e, FetchEvent::Progress { path, .. } if *path == fx.dep)));
        assert!(!events
            .iter()
            .any(|e| matches!(e, FetchEvent::PathFailed { .. })));

        // A second fetch finds everything stored: no NAR is requested again.
        let nar_requests = server.count_matching(&format!("/{cache}/nar/"));
        assert_eq!(nar_requests, 3, "{cache}");
        let again = bounded(f.fetch_closure(std::slice::from_ref(&fx.app), None))
            .await
            .unwrap();
        assert_eq!(again.paths_already_present, 3);
        assert_eq!(again.paths_fetched, 0);
        assert_eq!(again.bytes_downloaded, 0);
        assert_eq!(
            server.count_matching(&format!("/{cache}/nar/")),
            nar_requests
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closure_matches_nix_and_uses_stored_references() {
    let fx = fixture();
    let server = Server::start(&fx.dir).await;
    let (_dir, store) = temp_store();
    let f = fetcher(&store, &[server.url("zstd")], &[&fx.trusted_key], true);
    let closure = bounded(f.resolve(std::slice::from_ref(&fx.app)))
        .await
        .unwrap();
    assert_eq!(closure.paths(), nix_closure(&fx.app));
    assert!(closure
        .entries
        .iter()
        .all(|e| matches!(e, ClosureEntry::Remote(_))));

    // Once `dep` is stored, a fresh fetcher resolves it from the store without asking a cache.
    bounded(f.fetch_closure(std::slice::from_ref(&fx.dep), None))
        .await
        .unwrap();
    let narinfo = format!("zstd/{}.narinfo", fx.dep.hash_part());
    let before = server.count(&narinfo);
    let f2 = fetcher(&store, &[server.url("zstd")], &[&fx.trusted_key], true);
    let closure = bounded(f2.resolve(std::slice::from_ref(&fx.app)))
        .await
        .unwrap();
    assert_eq!(closure.paths(), nix_closure(&fx.app));
    assert_eq!(
        server.count(&narinfo),
        before,
        "stored path looked up remotely"
    );
    let dep_entry = closure
        .entries
        .iter()
        .find(|e| e.path() == &fx.dep)
        .unwrap();
    assert!(matches!(dep_entry, ClosureEntry::Stored(_)));
    let summary = bounded(f2.fetch(&closure, None)).await.unwrap();
    assert_eq!(
        (summary.paths_fetched, summary.paths_already_present),
        (2, 1)
    );
    assert_closure_stored(&store, fx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_url_caches_work() {
    let fx = fixture();
    let (_dir, store) = temp_store();
    let url = format!("file://{}", fx.dir.join("xz").display());
    let f = fetcher(&store, &[url], &[&fx.trusted_key], true);
    let s = bounded(f.fetch_closure(std::slice::from_ref(&fx.app), None))
        .await
        .unwrap();
    assert_eq!(s.paths_fetched, 3);
    assert_closure_stored(&store, fx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refuses_unsigned_untrusted_and_badly_signed_caches() {
    let fx = fixture();
    let server = Server::start(&fx.dir).await;
    for cache in ["unsigned", "untrusted", "badsig"] {
        let (_dir, store) = temp_store();
        let f = fetcher(&store, &[server.url(cache)], &[&fx.trusted_key], true);
        let err = bounded(f.fetch_closure(std::slice::from_ref(&fx.app), None))
            .await
            .unwrap_err();
        let FetchError::Closure(ClosureError::Lookup { path, source }) = &err else {
            panic!("{cache}: {err:?}");
        };
        assert_eq!(path, &fx.app);
        let url = server.url(cache);
        match (cache, source) {
            ("unsigned", SubstituteError::Unsigned { path, cache: c }) => {
                assert_eq!((path, c), (&fx.app, &url))
            }
            ("untrusted", SubstituteError::Untrusted { keys, cache: c, .. }) => {
                assert_eq!(keys, &["other-1".to_string()]);
                assert_eq!(c, &url);
            }
            ("badsig", SubstituteError::InvalidSignature { key, cache: c, .. }) => {
                assert_eq!(key, "kof-test-1");
                assert_eq!(c, &url);
            }
            _ => panic!("{cache}: wrong refusal {source:?}"),
        }
        let msg = kof_node_api::report::chain(&err);
        assert!(
            msg.contains(&fx.app.to_string()) && msg.contains(&url),
            "{msg}"
        );
        nothing_stored(&store, fx);
        assert_eq!(
            server.count_matching(&format!("/{cache}/nar/")),
            0,
            "{cache}: NAR fetched"
        );
    }
    // Without require_sigs the unsigned cache is accepted.
    let (_dir, store) = temp_store();
    let f = fetcher(&store, &[server.url("unsigned")], &[&fx.trusted_key], false);
    let s = bounded(f.fetch_closure(std::slice::from_ref(&fx.app), None))
        .await
        .unwrap();
    assert_eq!(s.paths_fetched, 3);
    assert_closure_stored(&store, fx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn not_found_falls_through_to_the_next_cache() {
    let fx = fixture();
    let server = Server::start(&fx.dir).await;
    let (_dir, store) = temp_store();
    // `empty` has nothing, `deponly` has only dep, `zstd` has everything.
    let urls = [
        server.url("empty"),
        server.url("deponly"),
        server.url("zstd"),
    ];
    let f = fetcher(&store, &urls, &[&fx.trusted_key], true);
    let s = bounded(f.fetch_closure(std::slice::from_ref(&fx.app), None))
        .await
        .unwrap();
    assert_eq!(s.paths_fetched, 3);
    assert_closure_stored(&store, fx);
    for p in [&fx.app, &fx.lib, &fx.dep] {
        assert_eq!(server.count(&format!("empty/{}.narinfo", p.hash_part())), 1);
    }
    assert_eq!(
        server.count_matching("/deponly/nar/"),
        1,
        "dep from deponly"
    );
    assert_eq!(
        server.count_matching("/zstd/nar/"),
        2,
        "app and lib from zstd"
    );
    let info = store.path_info(&fx.dep).unwrap().unwrap();
    assert_eq!(info.source_cache, server.url("deponly"));
    // A path in no cache is missing, naming who referenced it.
    let (_dir2, store2) = temp_store();
    let f = fetcher(
        &store2,
        &[server.url("empty"), server.url("deponly")],
        &[&fx.trusted_key],
        true,
    );
    let err = bounded(f.fetch_closure(std::slice::from_ref(&fx.app), None))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, FetchError::Closure(ClosureError::Missing { path, referenced_by: None }) if path == &fx.app),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_reference_names_the_referrer() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    copy_cache(&fx.dir.join("zstd"), &dir.path().join("c"));
    std::fs::remove_file(dir.path().join(format!("c/{}.narinfo", fx.dep.hash_part()))).unwrap();
    let server = Server::start(dir.path()).await;
    let (_d, store) = temp_store();
    let f = fetcher(&store, &[server.url("c")], &[&fx.trusted_key], true);
    let err = bounded(f.fetch_closure(std::slice::from_ref(&fx.app), None))
        .await
        .unwrap_err();
    let FetchError::Closure(ClosureError::Missing {
        path,
        referenced_by,
    }) = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!(path, &fx.dep);
    // Both app and lib reference dep; whichever was walked first is named.
    let by = referenced_by.clone().unwrap();
    assert!(by == fx.app || by == fx.lib, "{by}");
    assert!(err.to_string().contains(&fx.dep.to_string()));
    // Downloads start while the walk goes on, so the paths found before the missing one may
    // have been fetched (each verified on its own, and finished before the error returned);
    // the missing one is not stored.
    assert!(!store.has_path(&fx.dep).unwrap());
    let states = store.fetch_states().unwrap();
    assert!(
        states
            .iter()
            .all(|s| s.state != kof_store::FetchStateKind::Fetching),
        "{states:?}"
    );
}

/// Flips `from` to `to` inside the file (first occurrence).
fn patch(file: &std::path::Path, from: &[u8], to: &[u8]) {
    let mut data = std::fs::read(file).unwrap();
    let at = data
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    data[at..at + to.len()].copy_from_slice(to);
    std::fs::write(file, data).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupted_nar_file_is_refused_with_nothing_ingested() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    copy_cache(&fx.dir.join("none"), &dir.path().join("c"));
    // Same length, other bytes, inside a file's contents: the NAR still parses.
    let (file, url) = nar_file(&dir.path().join("c"), &fx.dep);
    patch(&file, b"hello\n", b"jello\n");
    let server = Server::start(dir.path()).await;
    let (_d, store) = temp_store();
    let f = fetcher(&store, &[server.url("c")], &[&fx.trusted_key], true);
    let err = bounded(f.fetch_closure(std::slice::from_ref(&fx.dep), None))
        .await
        .unwrap_err();
    let FetchError::Paths { failures, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(failures.len(), 1);
    match &*failures[0] {
        PathError::FileHash {
            path,
            url: u,
            expected,
            got,
        } => {
            assert_eq!(path, &fx.dep);
            assert_eq!(u, &format!("{}/{url}", server.url("c")));
            assert_ne!(expected, got);
            assert_eq!(got, &NixHash::digest(&std::fs::read(&file).unwrap()));
        }
        other => panic!("expected FileHash, got {other:?}"),
    }
    // Not retried at the same cache: a verification failure is not transient.
    assert_eq!(server.count(&format!("c/{url}")), 1);
    assert!(!store.has_path(&fx.dep).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corruption_without_file_hash_is_caught_by_nar_hash() {
    // A hostile cache can strip FileHash/FileSize (the signature does not cover them); the
    // store's NarHash check must still refuse the NAR.
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("c");
    copy_cache(&fx.dir.join("none"), &c);
    let (file, _) = nar_file(&c, &fx.dep);
    patch(&file, b"hello\n", b"jello\n");
    strip_file_fields(&c, &fx.dep);
    let server = Server::start(dir.path()).await;
    let (_d, store) = temp_store();
    let f = fetcher(&store, &[server.url("c")], &[&fx.trusted_key], true);
    let err = bounded(f.fetch_closure(std::slice::from_ref(&fx.dep), None))
        .await
        .unwrap_err();
    let FetchError::Paths { failures, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(
        matches!(&*failures[0], PathError::Ingest { path, .. } if path == &fx.dep),
        "{:?}",
        failures[0]
    );
    assert!(!store.has_path(&fx.dep).unwrap());
}

fn strip_file_fields(cache: &std::path::Path, p: &StorePath) {
    let ni = cache.join(format!("{}.narinfo", p.hash_part()));
    let text = std::fs::read_to_string(&ni).unwrap();
    let kept: String = text
        .lines()
        .filter(|l| !l.starts_with("FileHash:") && !l.starts_with("FileSize:"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&ni, kept).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn junk_after_the_compressed_stream_is_refused() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    for cache in ["xz", "bzip2", "zstd"] {
        let c = dir.path().join(cache);
        copy_cache(&fx.dir.join(cache), &c);
        let (file, _) = nar_file(&c, &fx.dep);
        let mut data = std::fs::read(&file).unwrap();
        data.extend_from_slice(b"trailing junk that is not a compressed stream");
        std::fs::write(&file, data).unwrap();
        // With FileSize/FileHash present the size check catches it; strip them so the
        // decompressor's end-of-stream check is what is tested.
        strip_file_fields(&c, &fx.dep);
    }
    let server = Server::start(dir.path()).await;
    for cache in ["xz", "bzip2", "zstd"] {
        let (_d, store) = temp_store();
        let f = fetcher(&store, &[server.url(cache)], &[&fx.trusted_key], true);
        let err = bounded(f.fetch_closure(std::slice::from_ref(&fx.dep), None))
            .await
            .unwrap_err();
        let FetchError::Paths { failures, .. } = &err else {
            panic!("{cache}: {err:?}")
        };
        match (cache, &*failures[0]) {
            // The bzip2 decoder stops at its stream's end: the drain finds the junk.
            ("bzip2", PathError::TrailingCompressed { path, .. }) => assert_eq!(path, &fx.dep),
            // xz2 feeds what follows the stream's end back to liblzma, which calls it corrupt;
            // zstd reads concatenated frames, and junk is an invalid frame.
            ("xz" | "zstd", PathError::Decompress { path, .. }) => assert_eq!(path, &fx.dep),
            (_, other) => panic!("{cache}: {other:?}"),
        }
        assert!(!store.has_path(&fx.dep).unwrap(), "{cache}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_fetches_download_each_nar_once() {
    let fx = fixture();
    let server = Server::start(&fx.dir).await;
    let (_d, store) = temp_store();
    let f = fetcher(&store, &[server.url("xz")], &[&fx.trusted_key], true);
    let roots = [fx.app.clone()];
    let (a, b) = bounded(async {
        tokio::join!(f.fetch_closure(&roots, None), f.fetch_closure(&roots, None))
    })
    .await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.paths, 3);
    assert_eq!(b.paths, 3);
    for p in nix_closure(&fx.app) {
        let (_, url) = nar_file(&fx.dir.join("xz"), &p);
        assert_eq!(
            server.count(&format!("xz/{url}")),
            1,
            "{p} NAR requested once"
        );
        assert_eq!(
            server.count(&format!("xz/{}.narinfo", p.hash_part())),
            1,
            "{p} narinfo once"
        );
    }
    assert_closure_stored(&store, fx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_failures_are_retried() {
    let fx = fixture();
    let server = Server::start(&fx.dir).await;
    let (_, dep_url) = nar_file(&fx.dir.join("zstd"), &fx.dep);
    let (_, lib_url) = nar_file(&fx.dir.join("zstd"), &fx.lib);
    server.fault(&format!("zstd/{dep_url}"), FaultKind::Truncate, 2);
    server.fault(&format!("zstd/{lib_url}"), FaultKind::Status503, 2);
    server.fault(
        &format!("zstd/{}.narinfo", fx.app.hash_part()),
        FaultKind::Status500,
        1,
    );
    let (_d, store) = temp_store();
    let f = fetcher(&store, &[server.url("zstd")], &[&fx.trusted_key], true);
    let s = bounded(f.fetch_closure(std::slice::from_ref(&fx.app), None))
        .await
        .unwrap();
    assert_eq!(s.paths_fetched, 3);
    assert_eq!(server.count(&format!("zstd/{dep_url}")), 3);
    assert_eq!(server.count(&format!("zstd/{lib_url}")), 3);
    assert_eq!(
        server.count(&format!("zstd/{}.narinfo", fx.app.hash_part())),
        2
    );
    assert_closure_stored(&store, fx);

    // Persistent server errors give up after the configured attempts, naming path and URL.
    let (_d2, store2) = temp_store();
    server.fault(&format!("zstd/{dep_url}"), FaultKind::Status502, 100);
    let f = fetcher(&store2, &[server.url("zstd")], &[&fx.trusted_key], true);
    let before = server.count(&format!("zstd/{dep_url}"));
    let err = bounded(f.fetch_closure(std::slice::from_ref(&fx.dep), None))
        .await
        .unwrap_err();
    let FetchError::Paths { failures, .. } = &err else {
        panic!("{err:?}")
    };
    let msg = kof_node_api::report::chain(&*failures[0]);
    assert!(
        msg.contains(&fx.dep.to_string()) && msg.contains(&dep_url) && msg.contains("502"),
        "{msg}"
    );
    // quick_retry: 4 attempts for the path, each opening the stream with up to 4 tries.
    assert_eq!(server.count(&format!("zstd/{dep_url}")) - before, 16);
    assert!(!store2.has_path(&fx.dep).unwrap());
    let _ = Arc::clone(&store2);
}

/// Replaces `p`'s NAR file in `cache` (an xz cache) with `xz(nar)`, and drops the narinfo's
/// FileSize (and FileHash too when `strip_hash`).
fn rewrite_xz(cache: &std::path::Path, p: &StorePath, nar: &[u8], strip_hash: bool) {
    use std::io::Read;
    let (file, _) = nar_file(cache, p);
    let mut out = Vec::new();
    xz2::read::XzEncoder::new(nar, 1)
        .read_to_end(&mut out)
        .unwrap();
    assert_ne!(
        out,
        std::fs::read(&file).unwrap(),
        "recompression differs from Nix's"
    );
    std::fs::write(&file, out).unwrap();
    let ni = cache.join(format!("{}.narinfo", p.hash_part()));
    let text = std::fs::read_to_string(&ni).unwrap();
    let kept: String = text
        .lines()
        .filter(|l| !(l.starts_with("FileSize:") || strip_hash && l.starts_with("FileHash:")))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&ni, kept).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_hash_is_checked_before_the_store_commits() {
    // The file decompresses to the correct NAR (the store alone would accept it), but it is not
    // the file the narinfo's FileHash names. Only the FileHash check can refuse it, and it must
    // do so before the store commits.
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("c");
    copy_cache(&fx.dir.join("xz"), &c);
    rewrite_xz(&c, &fx.dep, &nix_dump(&fx.dep), false);
    let server = Server::start(dir.path()).await;
    let (_d, store) = temp_store();
    let f = fetcher(&store, &[server.url("c")], &[&fx.trusted_key], true);
    let err = bounded(f.fetch_closure(std::slice::from_ref(&fx.dep), None))
        .await
        .unwrap_err();
    let FetchError::Paths { failures, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(
        matches!(&*failures[0], PathError::FileHash { path, .. } if path == &fx.dep),
        "{:?}",
        failures[0]
    );
    assert!(
        !store.has_path(&fx.dep).unwrap(),
        "committed despite a FileHash mismatch"
    );

    // The same file with FileHash dropped too is accepted: the NAR is right.
    let c2 = dir.path().join("c2");
    copy_cache(&fx.dir.join("xz"), &c2);
    rewrite_xz(&c2, &fx.dep, &nix_dump(&fx.dep), true);
    let f = fetcher(&store, &[server.url("c2")], &[&fx.trusted_key], true);
    bounded(f.fetch_closure(std::slice::from_ref(&fx.dep), None))
        .await
        .unwrap();
    assert!(store.has_path(&fx.dep).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decompressed_data_beyond_nar_size_is_refused() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("c");
    copy_cache(&fx.dir.join("xz"), &c);
    let mut nar = nix_dump(&fx.dep);
    nar.extend_from_slice(b"\0\0\0\0\0\0\0\0 junk after the NAR");
    rewrite_xz(&c, &fx.dep, &nar, true);
    // And a NAR cut short.
    let full = nix_dump(&fx.lib);
    rewrite_xz(&c, &fx.lib, &full[..full.len() - 8], true);
    let server = Server::start(dir.path()).await;
    let (_d, store) = temp_store();
    let f = fetcher(&store, &[server.url("c")], &[&fx.trusted_key], true);
    let err = bounded(f.fetch_closure(std::slice::from_ref(&fx.lib), None))
        .await
        .unwrap_err();
    let FetchError::Paths { failures, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(failures.len(), 2, "{failures:?}");
    // Sorted by path; find each.
    let by_path = |p: &StorePath| failures.iter().find(|f| f.path() == p).unwrap();
    assert!(
        matches!(&**by_path(&fx.dep), PathError::NarTooLong { .. }),
        "{:?}",
        by_path(&fx.dep)
    );
    assert!(
        matches!(&**by_path(&fx.lib), PathError::NarTooShort { expected, got, .. } if *got + 8 == *expected),
        "{:?}",
        by_path(&fx.lib)
    );
    assert!(!store.has_path(&fx.dep).unwrap());
    assert!(!store.has_path(&fx.lib).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_file_at_one_cache_falls_back_to_the_next() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    copy_cache(&fx.dir.join("none"), &dir.path().join("bad"));
    let (file, url) = nar_file(&dir.path().join("bad"), &fx.dep);
    patch(&file, b"hello\n", b"jello\n");
    copy_cache(&fx.dir.join("zstd"), &dir.path().join("good"));
    let server = Server::start(dir.path()).await;
    let (_d, store) = temp_store();
    let f = fetcher(
        &store,
        &[server.url("bad"), server.url("good")],
        &[&fx.trusted_key],
        true,
    );
    let s = bounded(f.fetch_closure(std::slice::from_ref(&fx.dep), None))
        .await
        .unwrap();
    assert_eq!(s.paths_fetched, 1);
    assert_eq!(
        server.count(&format!("bad/{url}")),
        1,
        "not retried at the bad cache"
    );
    assert_eq!(server.count_matching("/good/nar/"), 1);
    let info = store.path_info(&fx.dep).unwrap().unwrap();
    assert_eq!(info.source_cache, server.url("good"));
    assert_closure_stored_for(&store, &fx.dep);
}

fn assert_closure_stored_for(store: &Store, p: &StorePath) {
    let mut nar = Vec::new();
    store.dump_nar(p, &mut nar).unwrap();
    assert!(nar == nix_dump(p));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_download_times_out_and_is_retried() {
    use kof_substituter::cache::{http_client, BinaryCache, HttpOptions};
    use kof_substituter::substituters::Substituters;
    let fx = fixture();
    let server = Server::start(&fx.dir).await;
    let (_, dep_url) = nar_file(&fx.dir.join("xz"), &fx.dep);
    let rel = format!("xz/{dep_url}");
    server.fault(&rel, FaultKind::Stall, 1);
    let client = http_client(&HttpOptions {
        connect_timeout: std::time::Duration::from_secs(5),
        read_timeout: std::time::Duration::from_millis(500),
    })
    .unwrap();
    let cache = BinaryCache::new(&server.url("xz"), client, quick_retry()).unwrap();
    let keys = vec![kof_nar::PublicKey::parse(&fx.trusted_key).unwrap()];
    let subs = Arc::new(Substituters::new(vec![cache], keys, true));
    let (_d, store) = temp_store();
    let f = fetcher_with(&store, subs);
    let s = bounded(f.fetch_closure(std::slice::from_ref(&fx.dep), None))
        .await
        .unwrap();
    assert_eq!(s.paths_fetched, 1);
    assert_eq!(server.count(&rel), 2, "stalled once, then fetched");
    assert_closure_stored_for(&store, &fx.dep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn endless_file_without_file_size_is_cut_off() {
    // zstd skippable frames decode to nothing: a hostile cache could send them forever.
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("c");
    copy_cache(&fx.dir.join("zstd"), &c);
    let (file, _) = nar_file(&c, &fx.lib);
    let mut data = std::fs::read(&file).unwrap();
    for _ in 0..64 {
        data.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
        data.extend_from_slice(&4096u32.to_le_bytes());
        data.extend_from_slice(&[0u8; 4096]);
    }
    std::fs::write(&file, data).unwrap();
    strip_file_fields(&c, &fx.lib);
    // dep is fine; only lib's file is bad.
    let server = Server::start(dir.path()).await;
    let (_d, store) = temp_store();
    let f = fetcher(&store, &[server.url("c")], &[&fx.trusted_key], true);
    let err = bounded(f.fetch_closure(std::slice::from_ref(&fx.lib), None))
        .await
        .unwrap_err();
    let FetchError::Paths { failures, total } = &err else {
        panic!("{err:?}")
    };
    assert_eq!((*total, failures.len()), (2, 1));
    assert!(
        matches!(&*failures[0], PathError::FileTooLarge { path, .. } if path == &fx.lib),
        "{:?}",
        failures[0]
    );
    assert!(!store.has_path(&fx.lib).unwrap());
    assert!(
        store.has_path(&fx.dep).unwrap(),
        "the good path of the closure is still fetched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nar_url_escaping_the_cache_is_refused() {
    // The signature does not cover URL: a cache can point it anywhere it likes.
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("c");
    copy_cache(&fx.dir.join("xz"), &c);
    let ni = c.join(format!("{}.narinfo", fx.dep.hash_part()));
    let text = std::fs::read_to_string(&ni).unwrap();
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("URL: ") {
                "URL: nar/%2e%2e/%2E%2E/secret\n".to_string()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&ni, text).unwrap();
    let server = Server::start(dir.path()).await;
    let (_d, store) = temp_store();
    let f = fetcher(&store, &[server.url("c")], &[&fx.trusted_key], true);
    let err = bounded(f.fetch_closure(std::slice::from_ref(&fx.dep), None))
        .await
        .unwrap_err();
    let FetchError::Paths { failures, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(
        matches!(
            &*failures[0],
            PathError::Open {
                source: kof_substituter::cache::CacheError::BadUrl { .. },
                ..
            }
        ),
        "{:?}",
        failures[0]
    );
    assert_eq!(server.count("secret"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn downloads_at_once_are_bounded() {
    let fx = fixture();
    let server = Server::start(&fx.dir).await;
    // Every NAR body is held until released.
    for p in nix_closure(&fx.app) {
        let (_, url) = nar_file(&fx.dir.join("zstd"), &p);
        server.fault(&format!("zstd/{url}"), FaultKind::Hold, 0);
    }
    let (_d, store) = temp_store();
    let subs = substituters(&[server.url("zstd")], &[&fx.trusted_key], true);
    let f = fetcher_limited(&store, subs, 2);
    let roots = [fx.app.clone()];
    let task = tokio::spawn(async move { f.fetch_closure(&roots, None).await });
    let nar_requests = || server.count_matching("/zstd/nar/");
    let wait_for = |n: usize| async move {
        bounded(async {
            while nar_requests() < n {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await
    };
    wait_for(2).await;
    // The third download waits for a slot. (A pause can only miss a violation, never invent one.)
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(nar_requests(), 2, "more than 2 downloads at once");
    server.release(1);
    wait_for(3).await;
    server.release(2);
    let s = bounded(task).await.unwrap().unwrap();
    assert_eq!(s.paths_fetched, 3);
    assert_eq!(nar_requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fetcher_from_node_config() {
    use kof_node_api::config::Config;
    use kof_substituter::fetcher::Fetcher;
    let fx = fixture();
    let server = Server::start(&fx.dir).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "substituters = [\"{}\", \"file://{}\"]\ntrusted_public_keys = [\"{}\"]\nmax_parallel_downloads = 2\n",
            server.url("empty"),
            fx.dir.join("bzip2").display(),
            fx.trusted_key
        ),
    )
    .unwrap();
    let config = Config::load(Some(&cfg)).unwrap();
    let (_d, store) = temp_store();
    let f = Fetcher::from_config(&config, store.clone()).unwrap();
    assert_eq!(f.substituters().caches().len(), 2);
    let s = bounded(f.fetch_closure(std::slice::from_ref(&fx.app), None))
        .await
        .unwrap();
    assert_eq!(s.paths_fetched, 3);
    assert_closure_stored(&store, fx);
    let info = store.path_info(&fx.app).unwrap().unwrap();
    assert_eq!(
        info.source_cache,
        format!("file://{}", fx.dir.join("bzip2").display())
    );
}
