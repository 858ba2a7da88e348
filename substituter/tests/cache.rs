//! The binary-cache client and the substituter list against real HTTP over loopback, serving
//! caches written by the real `nix copy`.

mod fetch_support;

use std::sync::Arc;

use fetch_support::*;
use kof_nar::listing::listing_of_nar;
use kof_substituter::cache::{BinaryCache, CacheError};
use kof_substituter::substituters::SubstituteError;

fn cache(url: &str) -> BinaryCache {
    BinaryCache::new(url, client(), quick_retry()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_info_narinfo_and_listing() {
    let fx = fixture();
    let server = Server::start(&fx.dir).await;
    for url in [
        server.url("none"),
        format!("file://{}", fx.dir.join("none").display()),
    ] {
        let c = cache(&url);
        let info = bounded(c.cache_info()).await.unwrap();
        assert_eq!(info.store_dir, "/nix/store");
        let ni = bounded(c.narinfo(&fx.lib))
            .await
            .unwrap()
            .expect("lib is in the cache");
        assert_eq!(ni.store_path, fx.lib);
        assert_eq!(ni.nar_size, nix_dump(&fx.lib).len() as u64);
        assert_eq!(ni.nar_hash, kof_nar::NixHash::digest(&nix_dump(&fx.lib)));
        assert!(ni.references.contains(&fx.dep));
        assert_eq!(ni.sigs.len(), 1);
        // The listing Nix wrote equals the one computed from `nix-store --dump`.
        let ls = bounded(c.listing(&fx.dep))
            .await
            .unwrap()
            .expect("listing written");
        assert_eq!(ls, listing_of_nar(&nix_dump(&fx.dep)[..]).unwrap());
        // The other caches were written without listings.
        let absent = fx.other_path_not_in_caches();
        assert!(bounded(c.narinfo(&absent)).await.unwrap().is_none());
        assert!(bounded(c.listing(&absent)).await.unwrap().is_none());
    }
    assert!(bounded(cache(&server.url("xz")).listing(&fx.dep))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_metadata_is_refused() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("c");
    copy_cache(&fx.dir.join("zstd"), &c);
    // The narinfo of dep served under lib's hash.
    std::fs::copy(
        c.join(format!("{}.narinfo", fx.dep.hash_part())),
        c.join(format!("{}.narinfo", fx.lib.hash_part())),
    )
    .unwrap();
    // A garbage narinfo for app, and a huge one for dep.
    std::fs::write(
        c.join(format!("{}.narinfo", fx.app.hash_part())),
        "StorePath: nonsense\n",
    )
    .unwrap();
    std::fs::write(
        c.join(format!("{}.narinfo", fx.dep.hash_part())),
        vec![b'a'; 2 << 20],
    )
    .unwrap();
    std::fs::write(c.join("nix-cache-info"), "StoreDir: /gnu/store\n").unwrap();
    let server = Server::start(dir.path()).await;
    let cc = cache(&server.url("c"));
    let err = bounded(cc.narinfo(&fx.lib)).await.unwrap_err();
    assert!(
        matches!(&err, CacheError::WrongStorePath { requested, got, .. } if requested == &fx.lib && got == &fx.dep),
        "{err:?}"
    );
    let err = bounded(cc.narinfo(&fx.app)).await.unwrap_err();
    assert!(
        matches!(&err, CacheError::NarInfo { path, .. } if path == &fx.app),
        "{err:?}"
    );
    assert!(err.to_string().contains(&server.url("c")), "{err}");
    let err = bounded(cc.narinfo(&fx.dep)).await.unwrap_err();
    assert!(matches!(&err, CacheError::TooLarge { .. }), "{err:?}");
    let err = bounded(cc.cache_info()).await.unwrap_err();
    assert!(
        matches!(&err, CacheError::WrongStoreDir { store_dir, .. } if store_dir == "/gnu/store"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_then_reported() {
    let fx = fixture();
    let server = Server::start(&fx.dir).await;
    let rel = format!("zstd/{}.narinfo", fx.dep.hash_part());
    server.fault(&rel, FaultKind::Status503, 3);
    let c = cache(&server.url("zstd"));
    assert!(bounded(c.narinfo(&fx.dep)).await.unwrap().is_some());
    assert_eq!(server.count(&rel), 4);
    // A 4xx other than 404 is an error at once; 5xx after all attempts.
    let rel = format!("zstd/{}.narinfo", fx.lib.hash_part());
    server.fault(&rel, FaultKind::Status403, 1);
    let err = bounded(c.narinfo(&fx.lib)).await.unwrap_err();
    assert!(
        matches!(&err, CacheError::Status { status: 403, .. }),
        "{err:?}"
    );
    assert_eq!(server.count(&rel), 1);
    let rel = format!("zstd/{}.narinfo", fx.app.hash_part());
    server.fault(&rel, FaultKind::Status500, 100);
    let err = bounded(c.narinfo(&fx.app)).await.unwrap_err();
    assert!(
        matches!(&err, CacheError::Status { status: 500, .. }),
        "{err:?}"
    );
    assert_eq!(server.count(&rel), quick_retry().attempts as usize);
    let msg = err.to_string();
    assert!(
        msg.contains(&fx.app.to_string()) && msg.contains(&server.url(&rel)),
        "{msg}"
    );
    // Nothing listening: a connection error, retried, naming the URL.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let c = cache(&format!("http://{dead}/x"));
    let err = bounded(c.narinfo(&fx.dep)).await.unwrap_err();
    assert!(
        matches!(&err, CacheError::Transport { .. }) && err.is_transient(),
        "{err:?}"
    );
    assert!(err.to_string().contains(&dead.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_are_refused() {
    for url in [
        "ftp://x",
        "file://relative/dir",
        "https://x/?q=1",
        "s3://bucket",
    ] {
        let err = BinaryCache::new(url, client(), quick_retry()).unwrap_err();
        assert!(matches!(err, CacheError::BadUrl { .. }), "{url}: {err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lookups_are_memoised_single_flight() {
    let fx = fixture();
    let server = Server::start(&fx.dir).await;
    let subs = substituters(
        &[server.url("empty"), server.url("zstd")],
        &[&fx.trusted_key],
        true,
    );
    let lookups: Vec<_> = (0..16)
        .map(|_| {
            let subs = subs.clone();
            let p = fx.app.clone();
            tokio::spawn(async move { subs.lookup(&p).await })
        })
        .collect();
    let mut first = None;
    for l in lookups {
        let s = bounded(l).await.unwrap().unwrap().expect("found");
        assert_eq!(s.info.store_path, fx.app);
        assert_eq!(s.cache_index, 1);
        assert_eq!(s.trusted_by.as_deref(), Some("kof-test-1"));
        let prev = first.get_or_insert_with(|| s.clone());
        assert!(Arc::ptr_eq(prev, &s), "all callers share one result");
    }
    assert_eq!(
        server.count(&format!("empty/{}.narinfo", fx.app.hash_part())),
        1
    );
    assert_eq!(
        server.count(&format!("zstd/{}.narinfo", fx.app.hash_part())),
        1
    );
    // "Not anywhere" is memoised too.
    let absent = fx.other_path_not_in_caches();
    assert!(subs.lookup(&absent).await.unwrap().is_none());
    assert!(subs.lookup(&absent).await.unwrap().is_none());
    assert_eq!(
        server.count(&format!("zstd/{}.narinfo", absent.hash_part())),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_does_not_hide_a_good_cache() {
    // An untrusted cache first, a trusted one after: the trusted narinfo is used.
    let fx = fixture();
    let server = Server::start(&fx.dir).await;
    let subs = substituters(
        &[server.url("untrusted"), server.url("zstd")],
        &[&fx.trusted_key],
        true,
    );
    let s = bounded(subs.lookup(&fx.dep)).await.unwrap().unwrap();
    assert_eq!(s.cache.url(), server.url("zstd"));
    // Only the untrusted one: the refusal is the answer.
    let subs = substituters(&[server.url("untrusted")], &[&fx.trusted_key], true);
    let err = bounded(subs.lookup(&fx.dep)).await.unwrap_err();
    assert!(matches!(err, SubstituteError::Untrusted { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clearing_the_memo_asks_again() {
    let fx = fixture();
    let server = Server::start(&fx.dir).await;
    let subs = substituters(&[server.url("xz")], &[&fx.trusted_key], true);
    let rel = format!("xz/{}.narinfo", fx.lib.hash_part());
    bounded(subs.lookup(&fx.lib)).await.unwrap().unwrap();
    bounded(subs.lookup(&fx.lib)).await.unwrap().unwrap();
    assert_eq!(server.count(&rel), 1);
    subs.clear_memo();
    bounded(subs.lookup(&fx.lib)).await.unwrap().unwrap();
    assert_eq!(server.count(&rel), 2);
}
