//! Partial NARs across engines on one store, against the real fixture server (its published
//! cache: signed indexes, seekable zstd NARs) and a real store: a partial an engine recorded at
//! its exit is resumed by the next engine without fetching its bytes again, each recorded chunk
//! checked against the index again; a partial whose record does not match the narinfo and
//! index, or that has no record (a killed process), is discarded; two live engines on one store
//! never remove each other's partial files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kof_fixtures::serve::{self, ServeConfig, ServerHandle};
use kof_lazy::{partial_file, Cause, LazyOptions, LazyStore};
use kof_nar::{PublicKey, StorePath};
use kof_store::Store;
use kof_substituter::cache::{http_client, BinaryCache, HttpOptions, RetryPolicy};
use kof_substituter::fetcher::{FetchOptions, Fetcher};
use kof_substituter::substituters::Substituters;
use kof_testkit::{fixtures, manifest, path_of, published_index};

fn nar_size(p: &StorePath) -> u64 {
    manifest().store_paths[&p.to_absolute()].nar_size
}

/// No readahead, so that the bytes fetched are exactly the chunks of the ranges ensured.
fn opts() -> LazyOptions {
    LazyOptions {
        read_timeout: Duration::from_secs(30),
        readahead_file_max: 0,
        readahead_window_min: 0,
        ..LazyOptions::default()
    }
}

/// An engine on the store at `store_dir` (opened afresh, as another process would),
/// fetching from the server's published cache.
fn engine(server: &ServerHandle, store_dir: &Path, opts: LazyOptions) -> Arc<LazyStore> {
    let store = Arc::new(Store::open(store_dir).unwrap());
    let client = http_client(&HttpOptions::default()).unwrap();
    let cache = BinaryCache::new(
        &server.cache_url("published"),
        client,
        RetryPolicy::default(),
    )
    .unwrap();
    let key = PublicKey::parse(&manifest().public_key).unwrap();
    let subs = Substituters::new(vec![cache], vec![key], true);
    let fetcher = Fetcher::new(store.clone(), Arc::new(subs), FetchOptions::default());
    LazyStore::new(Arc::new(fetcher), store, opts)
}

/// Ranges of python's NAR, apart from each other, not the whole of it.
fn ranges(p: &StorePath) -> Vec<(u64, u64)> {
    let size = nar_size(p);
    assert!(size > 8 << 20, "python's NAR is large: {size}");
    vec![
        (0, 100_000),
        (size / 2, size / 2 + 700_000),
        (size - 5000, size),
    ]
}

/// A process of its own: an engine in a runtime of its own ensures `ranges` of `p`, then
/// either saves its partials, as a caller does at a clean exit, or not (a killed process).
/// Everything it held is gone when this returns.
fn one_run(
    server: &ServerHandle,
    store_dir: &Path,
    opts: LazyOptions,
    p: &StorePath,
    ranges: &[(u64, u64)],
    save: bool,
) -> usize {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let saved = rt.block_on(async {
        let e = engine(server, store_dir, opts);
        for &(a, b) in ranges {
            e.ensure(p, a, b, Cause::Demand).await.unwrap();
        }
        if save {
            e.save_partials()
        } else {
            0
        }
    });
    drop(rt);
    saved
}

/// The NAR-file bytes of every chunk of `p` in the published cache (what a whole fetch by
/// chunks moves).
fn file_bytes(p: &StorePath) -> u64 {
    published_index(p)
        .index()
        .chunks
        .iter()
        .map(|c| c.file_len)
        .sum()
}

fn record_of(partial: &Path) -> PathBuf {
    partial.with_extension("json")
}

/// What each test starts from: its own fixture server and store directory, python's store
/// path, the ranges its runs ensure, and where its partial NAR lies.
struct Case {
    server: Arc<ServerHandle>,
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    python: StorePath,
    ranges: Vec<(u64, u64)>,
    partial: PathBuf,
}

fn case() -> Case {
    let server = Arc::new(serve::start_in_background(ServeConfig::new(&fixtures().0)));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let python = path_of("python3");
    let ranges = ranges(&python);
    let partial = partial_file(&dir, &python);
    Case {
        server,
        _tmp: tmp,
        dir,
        python,
        ranges,
        partial,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_partial_is_resumed_by_the_next_engine() {
    let Case {
        server,
        _tmp,
        dir,
        python,
        ranges,
        partial,
    } = case();

    let srv = server.clone();
    let (d, p, r) = (dir.clone(), python.clone(), ranges.clone());
    let saved = tokio::task::spawn_blocking(move || one_run(&srv, &d, opts(), &p, &r, true))
        .await
        .unwrap();
    assert_eq!(saved, 1, "one partial recorded");
    let first = server.stats();
    assert!(first.requests_by_kind.nar > 0);
    assert!(partial.exists() && record_of(&partial).exists());

    // The next run: the same ranges are local.
    server.reset();
    let e = engine(&server, &dir, opts());
    for &(a, b) in &ranges {
        e.ensure(&python, a, b, Cause::Demand).await.unwrap();
    }
    let st = server.stats();
    assert_eq!(st.requests_by_kind.nar, 0, "{st:?}");
    assert_eq!(st.bytes_by_kind.nar, 0, "{st:?}");
    assert_eq!(e.counters().requests.total(), 0);

    // Its bytes verify: the rest is fetched and the whole NAR passes the store's check.
    e.fetch_whole(&python, Cause::Demand).await.unwrap();
    assert!(e.store().has_path(&python).unwrap());
    let st = server.stats();
    // (And the rest of its closure, fetched whole, each path once, to be committed first:
    // Nix's closure rule.)
    let mut closure = std::collections::BTreeSet::new();
    let mut next = vec![python.to_absolute()];
    while let Some(p) = next.pop() {
        for r in &manifest().store_paths[&p].references {
            if closure.insert(r.clone()) {
                next.push(r.clone());
            }
        }
    }
    closure.remove(&python.to_absolute());
    let references: u64 = closure
        .iter()
        .map(|r| file_bytes(&StorePath::parse(r).unwrap()))
        .sum();
    assert_eq!(
        st.bytes_by_kind.nar + first.bytes_by_kind.nar,
        file_bytes(&python) + references,
        "only the missing chunks, each once: {} then {}",
        first.bytes_by_kind.nar,
        st.bytes_by_kind.nar
    );
    assert!(!partial.exists() && !record_of(&partial).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrecorded_or_mismatched_partials_are_discarded() {
    let Case {
        server,
        _tmp,
        dir,
        python,
        ranges,
        partial,
    } = case();
    let run = |opts: LazyOptions, save: bool| {
        let (srv, d, p, r) = (server.clone(), dir.clone(), python.clone(), ranges.clone());
        tokio::task::spawn_blocking(move || one_run(&srv, &d, opts, &p, &r, save))
    };

    // A killed process (no save): its bytes are not trusted; the next engine removes them.
    run(opts(), false).await.unwrap();
    assert!(partial.exists() && !record_of(&partial).exists());
    let e = engine(&server, &dir, opts());
    assert!(!partial.exists(), "an unrecorded partial is removed");
    drop(e);

    // A record of another index does not match: discarded, the bytes fetched again.
    assert_eq!(run(opts(), true).await.unwrap(), 1);
    let rec = record_of(&partial);
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    let index = json["index"].as_str().unwrap().to_string();
    json["index"] = index.replace(|c: char| c.is_ascii_digit(), "0").into();
    std::fs::write(&rec, serde_json::to_vec(&json).unwrap()).unwrap();
    server.reset();
    assert_eq!(run(opts(), true).await.unwrap(), 1);
    assert!(server.stats().requests_by_kind.nar > 0, "refetched");

    // A recorded chunk whose bytes changed on disk fails its digest at adoption: only it is
    // fetched again, the others are resumed.
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    assert_eq!(
        json["index"].as_str().unwrap(),
        index,
        "rewritten for the real index"
    );
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&partial)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"tampered", ranges[0].0 + 10).unwrap();
    drop(f);
    server.reset();
    assert_eq!(run(opts(), true).await.unwrap(), 1);
    let st = server.stats();
    assert_eq!(
        st.requests_by_kind.nar, 1,
        "one chunk fetched again: {st:?}"
    );

    // A record naming another NarHash: discarded too.
    let rec = record_of(&partial);
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    let hash = json["nar_hash"].as_str().unwrap().to_string();
    let forged = hash.replace(|c: char| c.is_ascii_digit(), "0");
    assert_ne!(forged, hash);
    json["nar_hash"] = forged.clone().into();
    std::fs::write(&rec, serde_json::to_vec(&json).unwrap()).unwrap();
    server.reset();
    let e = engine(&server, &dir, opts());
    e.ensure(&python, ranges[0].0, ranges[0].1, Cause::Demand)
        .await
        .unwrap();
    let st = server.stats();
    assert!(st.requests_by_kind.nar > 0, "{st:?}");
    assert!(
        !std::fs::read_to_string(&rec).is_ok_and(|t| t.contains(&forged)),
        "the forged record is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_live_engines_keep_each_others_partials() {
    let Case {
        server,
        _tmp,
        dir,
        python,
        ranges,
        partial,
    } = case();

    let a = engine(&server, &dir, opts());
    a.ensure(&python, ranges[0].0, ranges[0].1, Cause::Demand)
        .await
        .unwrap();
    assert!(partial.exists());
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let before = ino(&partial);

    // A second engine starts on the same store: A's partial file stays, and A's bytes stay
    // local to A.
    let b = engine(&server, &dir, opts());
    assert!(partial.exists(), "B's sweep left A's partial file");
    assert_eq!(ino(&partial), before);
    server.reset();
    a.ensure(&python, ranges[0].0, ranges[0].1, Cause::Demand)
        .await
        .unwrap();
    assert_eq!(server.stats().requests_by_kind.nar, 0);

    // Both fetch the same path at once, into the one file: both complete it, verified.
    b.ensure(&python, ranges[1].0, ranges[1].1, Cause::Demand)
        .await
        .unwrap();
    let (ra, rb) = tokio::join!(
        a.fetch_whole(&python, Cause::Demand),
        b.fetch_whole(&python, Cause::Demand)
    );
    ra.unwrap();
    rb.unwrap();
    assert!(a.store().has_path(&python).unwrap());
    assert_eq!(a.counters().paths_refused + b.counters().paths_refused, 0);

    // A third engine after they are gone finds nothing left behind.
    drop((a, b));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _c = engine(&server, &dir, opts());
    assert!(!partial.exists(), "no partial file is left behind");
}
