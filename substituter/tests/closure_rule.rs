//! Nix's closure rule in the fetcher, over real HTTP from caches written by the real Nix: a
//! fault on the deepest path of a closure (`dep`, under `lib` and `app`) fails the fetch with no
//! stored path whose references are missing, and the next fetch writes only that path, reusing
//! the objects the failed one prepared.

mod fetch_support;

use fetch_support::*;
use kof_substituter::fetcher::{FetchError, PathError};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_reference_withholds_its_dependents_and_the_retry_reuses_their_objects() {
    let fx = fixture();
    let server = Server::start(&fx.dir).await;
    let (_, dep_url) = nar_file(&fx.dir.join("zstd"), &fx.dep);
    server.fault(&format!("zstd/{dep_url}"), FaultKind::Status502, 0);
    let (_dir, store) = temp_store();
    let f = fetcher(&store, &[server.url("zstd")], &[&fx.trusted_key], true);

    let err = bounded(f.fetch_closure(std::slice::from_ref(&fx.app), None))
        .await
        .unwrap_err();
    let FetchError::Paths { total, failures } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*total, 3);
    // dep failed to download; lib and app (which reference it) were prepared, not committed.
    let failed: Vec<_> = failures.iter().map(|e| e.path().clone()).collect();
    let mut expected = vec![fx.dep.clone(), fx.lib.clone(), fx.app.clone()];
    expected.sort();
    assert_eq!(failed, expected);
    for e in failures.iter() {
        if e.path() == &fx.dep {
            assert!(
                matches!(**e, PathError::Open { .. } | PathError::Download { .. }),
                "{e:?}"
            );
        } else {
            let PathError::Reference { reference, .. } = &**e else {
                panic!("{e:?}")
            };
            // app waits for lib and dep; whichever it names, dep is at the bottom of it.
            assert!(reference == &fx.dep || reference == &fx.lib, "{e:?}");
            let chain = kof_node_api::report::chain(&**e);
            assert!(chain.contains(&fx.dep.to_string()), "{chain}");
        }
    }
    for p in [&fx.app, &fx.lib, &fx.dep] {
        assert!(!store.has_path(p).unwrap(), "{p} must not be valid");
    }
    assert!(store.check_closure_rule().unwrap().is_empty());
    assert!(store.verify().unwrap().is_ok());
    let prepared_objects = store.stats().unwrap().objects;
    assert!(prepared_objects > 0, "lib's and app's objects are kept");

    // The cache heals: the retry downloads all three again (each is verified again) and writes
    // only what dep needs; lib's and app's objects are reused.
    server.handle().clear_faults();
    let summary = bounded(f.fetch_closure(std::slice::from_ref(&fx.app), None))
        .await
        .unwrap();
    assert_eq!(summary.paths_fetched, 3);
    assert!(store.check_closure_rule().unwrap().is_empty());
    assert!(store.verify().unwrap().is_ok());
    for p in [&fx.app, &fx.lib, &fx.dep] {
        assert!(store.has_path(p).unwrap(), "{p}");
        let mut nar = Vec::new();
        store.dump_nar(p, &mut nar).unwrap();
        assert!(
            nar == nix_dump(p),
            "{p}: exactly what nix-store --dump gives"
        );
    }
    // What dep alone writes into a fresh store.
    let (_dir2, fresh) = temp_store();
    let g = fetcher(&fresh, &[server.url("zstd")], &[&fx.trusted_key], true);
    let dep_only = bounded(g.fetch_closure(std::slice::from_ref(&fx.dep), None))
        .await
        .unwrap();
    let (_dir3, full) = temp_store();
    let h = fetcher(&full, &[server.url("zstd")], &[&fx.trusted_key], true);
    let whole = bounded(h.fetch_closure(std::slice::from_ref(&fx.app), None))
        .await
        .unwrap();
    eprintln!(
        "retry: downloaded {} bytes, wrote {} new bytes (dep alone: {}; the whole closure into a \
         fresh store: {})",
        summary.bytes_downloaded,
        summary.new_stored_bytes,
        dep_only.new_stored_bytes,
        whole.new_stored_bytes
    );
    assert_eq!(summary.new_stored_bytes, dep_only.new_stored_bytes);
    assert!(summary.new_stored_bytes < whole.new_stored_bytes);
    assert_eq!(summary.bytes_downloaded, whole.bytes_downloaded);
}
