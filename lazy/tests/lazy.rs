//! The lazy engine against the real fixture server over loopback (the small fixture set: real
//! Debian binaries made into store paths, caches in every compression), counting what the
//! server sent. No timing is asserted: laziness is proven in bytes and requests.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kof_fixtures::serve::{self, Fault, FaultKind, ServeConfig, ServerHandle};
use kof_fuse::{Content, ContentSource, Entry, FileRef};
use kof_index::VerifiedIndex;
use kof_lazy::{Cause, Ensure, LazyContent, LazyOptions, LazyStore, LocalReader, Profile};
use kof_nar::{PublicKey, StorePath};
use kof_store::Store;
use kof_substituter::cache::{http_client, BinaryCache, HttpOptions, RetryPolicy};
use kof_substituter::closure::{Closure, ClosureEntry};
use kof_substituter::fetcher::{FetchOptions, Fetcher};
use kof_substituter::substituters::Substituters;
use kof_testkit::{fixtures, manifest, path_of, published_index, CacheServer, TamperedFixtures};
use tempfile::TempDir;

/// Where the fixture builder staged `path` (the reference contents).
fn staged(path: &StorePath) -> PathBuf {
    fixtures()
        .0
        .join(&manifest().store_paths[&path.to_absolute()].staged)
}

fn live_closure(env: &str) -> Vec<StorePath> {
    let e = manifest()
        .environments
        .iter()
        .find(|e| format!("{}/{}", e.owner, e.name) == env)
        .unwrap();
    let g = e
        .generations
        .iter()
        .find(|g| g.number == e.live_generation)
        .unwrap();
    g.closure
        .iter()
        .map(|p| StorePath::parse(p).unwrap())
        .collect()
}

/// A node: its own server (so counters and faults are its own), a fresh store, an engine.
struct Node {
    _tmp: TempDir,
    server: Option<ServerHandle>,
    store: Arc<Store>,
    engine: Arc<LazyStore>,
}

fn lazy_opts() -> LazyOptions {
    LazyOptions {
        read_timeout: Duration::from_secs(20),
        ..LazyOptions::default()
    }
}

impl Node {
    fn new(flavour: &str, opts: LazyOptions) -> Node {
        let server = serve::start_in_background(ServeConfig::new(&fixtures().0));
        Node::with_server(server, flavour, opts)
    }

    fn with_server(server: ServerHandle, flavour: &str, opts: LazyOptions) -> Node {
        let tmp = tempfile::Builder::new()
            .prefix("kof-lazy")
            .tempdir()
            .unwrap();
        let store = Arc::new(Store::open(&tmp.path().join("store")).unwrap());
        let engine = engine(&server, flavour, store.clone(), opts);
        Node {
            _tmp: tmp,
            server: Some(server),
            store,
            engine,
        }
    }

    fn server(&self) -> &ServerHandle {
        self.server.as_ref().unwrap()
    }

    /// The view content source over this node's engine.
    fn content(&self) -> Arc<LazyContent> {
        Arc::new(LazyContent::new(
            LocalReader::new(self.store.clone()),
            self.engine.clone(),
        ))
    }

    fn partial_files(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.store.dir().join("partial")) {
            Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

fn engine(
    server: &ServerHandle,
    flavour: &str,
    store: Arc<Store>,
    opts: LazyOptions,
) -> Arc<LazyStore> {
    let client = http_client(&HttpOptions {
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(10),
    })
    .unwrap();
    let retry = RetryPolicy {
        attempts: 2,
        base_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
    };
    let cache = BinaryCache::new(&server.cache_url(flavour), client, retry.clone()).unwrap();
    let key = PublicKey::parse(&manifest().public_key).unwrap();
    let subs = Substituters::new(vec![cache], vec![key], true);
    let fetcher = Fetcher::new(
        store.clone(),
        Arc::new(subs),
        FetchOptions {
            retry,
            ..FetchOptions::default()
        },
    );
    LazyStore::new(Arc::new(fetcher), store, opts)
}

/// Every regular file of an entry tree: (relative path, file).
fn files(e: &Entry) -> Vec<(String, FileRef)> {
    fn walk(e: &Entry, out: &mut Vec<(String, FileRef)>) {
        match e {
            Entry::Directory(d) => {
                for c in d.values() {
                    walk(c, out);
                }
            }
            Entry::Regular {
                content: Content::Store(f),
                ..
            } => out.push((f.path.to_string(), f.clone())),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(e, &mut out);
    out
}

/// Reads a whole file through the content source, in 128 KiB reads as the kernel would.
fn read_all(src: &dyn ContentSource, f: &FileRef) -> Vec<u8> {
    let mut out = Vec::new();
    while (out.len() as u64) < f.size {
        let got = src.read(f, out.len() as u64, 128 * 1024).unwrap();
        assert!(!got.is_empty(), "short read of {} at {}", f.path, out.len());
        out.extend_from_slice(&got);
    }
    out
}

/// The closure of `roots`, resolved by a fetcher on the node's server and store.
async fn resolve(node: &Node, flavour: &str, roots: &[StorePath]) -> Closure {
    let client = http_client(&HttpOptions::default()).unwrap();
    let cache = BinaryCache::new(
        &node.server().cache_url(flavour),
        client,
        RetryPolicy::default(),
    )
    .unwrap();
    let key = PublicKey::parse(&manifest().public_key).unwrap();
    let subs = Substituters::new(vec![cache], vec![key], true);
    let f = Fetcher::new(node.store.clone(), Arc::new(subs), FetchOptions::default());
    f.resolve(roots).await.unwrap()
}

fn entry_of<'a>(c: &'a Closure, p: &StorePath) -> &'a ClosureEntry {
    c.entries.iter().find(|e| e.path() == p).unwrap()
}

/// Runs `f` on a plain thread (FUSE workers are not runtime threads) and waits for it.
async fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(move || std::thread::spawn(f).join().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexed_reads_fetch_only_the_verified_chunks_of_the_files_read() {
    let node = Node::new("published", lazy_opts());
    let python = path_of("python3");
    let closure = resolve(&node, "published", std::slice::from_ref(&python)).await;
    node.server().reset();
    let entry = node
        .engine
        .entry(entry_of(&closure, &python))
        .await
        .unwrap();
    let st = node.server().stats();
    assert_eq!(
        st.requests_by_kind.index, 1,
        "metadata from the signed index"
    );
    assert_eq!(st.requests_by_kind.ls, 0, "no unsigned listing needed");
    assert_eq!(st.requests_by_kind.nar, 0, "no NAR bytes for metadata");

    // K files of 20-300 KB, spread over the NAR.
    let mut all = files(&entry);
    all.retain(|(_, f)| (20_000..300_000).contains(&f.size));
    all.sort_by_key(|(_, f)| f.nar_offset);
    assert!(all.len() >= 20, "python has many mid-sized files");
    let step = all.len() / 4;
    let picked: Vec<(String, FileRef)> = (0..4).map(|i| all[i * step].clone()).collect();

    let src = node.content();
    let base = staged(&python);
    let picked2 = picked.clone();
    on_thread(move || {
        for (rel, f) in &picked2 {
            let got = read_all(&*src, f);
            assert_eq!(got, std::fs::read(base.join(rel)).unwrap(), "{rel}");
        }
    })
    .await;

    // Exactly the compressed chunks holding the files read (readahead takes a small file
    // whole), each once.
    let index = published_index(&python);
    let ranges: Vec<(u64, u64)> = picked
        .iter()
        .map(|(_, f)| (f.nar_offset, f.nar_offset + f.size))
        .collect();
    let want = chunk_file_bytes(&index, &ranges);
    let st = node.server().stats();
    let nar_size = python_nar_size(&python);
    assert_eq!(st.bytes_by_kind.nar, want, "the chunks of the files read");
    assert!(
        st.bytes_by_kind.nar * 4 < nar_size,
        "{} of {nar_size}",
        st.bytes_by_kind.nar
    );
    assert_eq!(
        st.statuses.get(&206).copied(),
        Some(st.requests_by_kind.nar)
    );
    let c = node.engine.counters();
    assert_eq!(c.bytes_fetched.demand, st.bytes_by_kind.nar);
    assert_eq!(c.requests.demand, st.requests_by_kind.nar);
    assert!(
        !node.store.has_path(&python).unwrap(),
        "not stored until complete"
    );
    assert_eq!(node.partial_files().len(), 1);

    // Reading them again is local.
    let src = node.content();
    on_thread(move || {
        for (_, f) in &picked {
            read_all(&*src, f);
        }
    })
    .await;
    assert_eq!(
        node.server().stats().requests_by_kind.nar,
        st.requests_by_kind.nar
    );
}

fn python_nar_size(p: &StorePath) -> u64 {
    manifest().store_paths[&p.to_absolute()].nar_size
}

/// NAR-file bytes of the chunks of `index` covering any of `ranges` (each chunk once).
fn chunk_file_bytes(index: &VerifiedIndex, ranges: &[(u64, u64)]) -> u64 {
    let mut chunks = std::collections::BTreeSet::new();
    for &(a, b) in ranges {
        chunks.extend(index.index().chunks_for(a, b));
    }
    chunks
        .into_iter()
        .map(|i| index.index().chunks[i].file_len)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_cache_streams_each_path_once_for_concurrent_readers() {
    let node = Node::new("zstd", lazy_opts());
    let bash = path_of("bash");
    let closure = resolve(&node, "zstd", std::slice::from_ref(&bash)).await;
    node.server().reset();
    let entry = node.engine.entry(entry_of(&closure, &bash)).await.unwrap();
    assert_eq!(
        node.server().stats().requests_by_kind.ls,
        1,
        "zstd serves listings"
    );
    assert_eq!(node.server().stats().requests_by_kind.nar, 0);
    let (rel, file) = files(&entry)
        .into_iter()
        .max_by_key(|(_, f)| f.size)
        .unwrap();
    let want = std::fs::read(staged(&bash).join(&rel)).unwrap();
    let src = node.content();
    let readers: Vec<_> = (0..16)
        .map(|_| {
            let src = src.clone();
            let file = file.clone();
            std::thread::spawn(move || read_all(&*src, &file))
        })
        .collect();
    let got = on_thread(move || {
        readers
            .into_iter()
            .map(|r| r.join().unwrap())
            .collect::<Vec<_>>()
    })
    .await;
    for g in &got {
        assert!(g == &want, "{rel}: wrong bytes");
    }
    // Completion into the store is the same single stream; wait for it through prefetch
    // (which joins it rather than starting another).
    let report = node
        .engine
        .prefetch(closure_only(&closure, &bash))
        .await
        .unwrap();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let st = node.server().stats();
    // One GET for 16 readers, and one for each of its references (committed first).
    let nars: Vec<u64> = st
        .requests_by_path
        .iter()
        .filter(|(k, _)| k.contains("/nar/"))
        .map(|(_, n)| *n)
        .collect();
    assert_eq!(
        st.requests_by_kind.nar,
        1 + references_of(&bash).len() as u64,
        "one GET for 16 readers: {nars:?}"
    );
    assert!(nars.iter().all(|n| *n == 1), "{nars:?}");
    assert!(node.store.has_path(&bash).unwrap());
    assert!(node.partial_files().is_empty());
}

/// The references of `p` other than itself, per the manifest. Nix's closure rule: the engine
/// commits a path after these, fetching them whole first.
fn references_of(p: &StorePath) -> Vec<StorePath> {
    manifest().store_paths[&p.to_absolute()]
        .references
        .iter()
        .map(|r| StorePath::parse(r).unwrap())
        .filter(|r| r != p)
        .collect()
}

/// Requests for `hash_part`'s files ending in `suffix` (`kof-index`, `ls`, `narinfo`).
fn requests_for(st: &serve::Stats, hash_part: &str, suffix: &str) -> u64 {
    let name = format!("{hash_part}.{suffix}");
    st.requests_by_path
        .iter()
        .filter(|(k, _)| k.ends_with(&name))
        .map(|(_, n)| *n)
        .sum()
}

/// `closure` restricted to `p`.
fn closure_only(closure: &Closure, p: &StorePath) -> Closure {
    Closure {
        roots: vec![p.clone()],
        entries: vec![entry_of(closure, p).clone()],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_listing_fetches_the_whole_path_for_its_tree() {
    let node = Node::new("xz", lazy_opts());
    let jq = path_of("jq");
    let closure = resolve(&node, "xz", std::slice::from_ref(&jq)).await;
    let entry = node.engine.entry(entry_of(&closure, &jq)).await.unwrap();
    assert!(
        node.store.has_path(&jq).unwrap(),
        "fetched whole for its tree"
    );
    let st = node.server().stats();
    assert_eq!(
        (
            requests_for(&st, jq.hash_part(), "kof-index"),
            requests_for(&st, jq.hash_part(), "ls")
        ),
        (1, 1),
        "an index, then a listing, asked"
    );
    // (Its references, fetched whole to be committed first, were asked for their indexes.)
    assert_eq!(
        st.statuses.get(&404).copied(),
        Some(st.requests_by_kind.index + st.requests_by_kind.ls),
        "both absent"
    );
    let names: Vec<OsString> = match &*entry {
        Entry::Directory(d) => d.keys().cloned().collect(),
        other => panic!("{other:?}"),
    };
    assert!(names.contains(&OsString::from("bin")), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_cache_fails_within_the_bound() {
    let opts = LazyOptions {
        read_timeout: Duration::from_secs(3),
        ..LazyOptions::default()
    };
    for flavour in ["published", "none", "zstd"] {
        let node = Node::new(flavour, opts.clone());
        let ssl = path_of("openssl");
        let closure = resolve(&node, flavour, std::slice::from_ref(&ssl)).await;
        node.engine.entry(entry_of(&closure, &ssl)).await.unwrap();
        node.server()
            .add_fault(Fault::new(FaultKind::Stall, "/nar/"));
        let err = node
            .engine
            .ensure(&ssl, 0, 1000, Cause::Demand)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(&ssl.to_string()), "{flavour}: {err}");
        assert!(!node.store.has_path(&ssl).unwrap());
        // Through the blocking Ensure interface too (what the FUSE view calls).
        let engine = node.engine.clone();
        let base = ssl.base_name();
        let e = on_thread(move || Ensure::ensure(&*engine, &base, 5000, 6000)).await;
        assert!(e.is_err(), "{flavour}");
    }
    // A server that is gone.
    let mut node = Node::new("none", opts);
    let gmp = path_of("gmp");
    let closure = resolve(&node, "none", std::slice::from_ref(&gmp)).await;
    node.engine.entry(entry_of(&closure, &gmp)).await.unwrap();
    node.server.take().unwrap().shutdown();
    let err = node
        .engine
        .ensure(&gmp, 0, 10, Cause::Demand)
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&gmp.to_string()), "{err}");
}

/// A flipped byte in what the cache sends is never served: an indexed path's chunk fails its
/// digest before it is written, a path-level path its NarHash before any reader sees it. The
/// read fails naming the path, nothing is stored, and later reads fail too (one cache only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_data_is_never_served_nor_stored() {
    for flavour in ["published", "none", "zstd"] {
        let node = Node::new(flavour, lazy_opts());
        let p = path_of("libffi");
        let closure = resolve(&node, flavour, std::slice::from_ref(&p)).await;
        let entry = node.engine.entry(entry_of(&closure, &p)).await.unwrap();
        node.server().add_fault(Fault::new(
            FaultKind::Corrupt,
            format!("/cache/{flavour}/nar/"),
        ));
        let (_, f) = files(&entry)
            .into_iter()
            .max_by_key(|(_, f)| f.size)
            .unwrap();
        let src = node.content();
        let f2 = f.clone();
        let r = on_thread(move || src.read(&f2, 0, 4096)).await;
        let err = r.expect_err("corrupt bytes are not served");
        assert!(
            kof_node_api::report::chain(&err).contains(&p.to_string()),
            "{flavour}: {err}"
        );
        assert!(node.server().stats().faults_injected >= 1, "{flavour}");
        let err = node
            .engine
            .ensure(&p, f.nar_offset, f.nar_offset + 10, Cause::Demand)
            .await
            .unwrap_err();
        let text = kof_node_api::report::chain(&err);
        assert!(text.contains(&p.to_string()), "{flavour}: {text}");
        if flavour == "published" {
            assert!(text.contains("failed verification"), "{text}");
            assert!(text.contains("BLAKE3") || text.contains("decode"), "{text}");
        }
        assert!(!node.store.has_path(&p).unwrap(), "{flavour}");
        assert!(node.partial_files().is_empty(), "{flavour}: nothing kept");
        assert!(
            node.engine.counters().paths_refused >= 1 || flavour != "published",
            "{flavour}"
        );
        drop(err);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_completes_the_closure() {
    for flavour in ["published", "none", "zstd"] {
        let node = Node::new(flavour, lazy_opts());
        let roots = live_closure("kof/hello");
        let closure = resolve(&node, flavour, &roots).await;
        // A demand read first, so prefetch meets partly fetched paths.
        let bash = path_of("bash");
        if let Some(e) = closure.entries.iter().find(|e| e.path() == &bash) {
            node.engine.entry(e).await.unwrap();
            node.engine
                .ensure(&bash, 1000, 2000, Cause::Demand)
                .await
                .unwrap();
        }
        let report = node.engine.prefetch(closure.clone()).await.unwrap();
        assert!(
            report.failures.is_empty(),
            "{flavour}: {:?}",
            report.failures
        );
        assert_eq!(report.stored, closure.entries.len());
        for e in &closure.entries {
            assert!(
                node.store.has_path(e.path()).unwrap(),
                "{flavour}: {}",
                e.path()
            );
        }
        assert!(node.partial_files().is_empty(), "{flavour}");
        let c = node.engine.counters();
        assert!(
            c.bytes_fetched.prefetch > 0 && c.requests.prefetch > 0,
            "{c:?}"
        );
        assert_eq!(c.paths_completed as usize, closure.entries.len(), "{c:?}");
        // The stored contents are the staged ones.
        let (rel, f) = files(&node.engine.entry(entry_of(&closure, &bash)).await.unwrap())
            .into_iter()
            .max_by_key(|(_, f)| f.size)
            .unwrap();
        let src = node.content();
        let got = on_thread(move || read_all(&*src, &f)).await;
        assert!(got == std::fs::read(staged(&bash).join(rel)).unwrap());
        // Files kept as one raw object are handed out for passthrough, with exactly their bytes.
        let local = LocalReader::new(node.store.clone());
        let mut backed = 0;
        for (rel, f) in files(&node.engine.entry(entry_of(&closure, &bash)).await.unwrap()) {
            if let Some(mut b) = local.backing_file(&f) {
                let mut got = Vec::new();
                std::io::Read::read_to_end(&mut b, &mut got).unwrap();
                assert!(
                    got == std::fs::read(staged(&bash).join(&rel)).unwrap(),
                    "{rel}"
                );
                backed += 1;
            }
        }
        assert!(backed > 0, "{flavour}: some bash file is a raw object");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learned_profile_is_fetched_first_on_the_next_node() {
    let first = Node::new("published", lazy_opts());
    let python = path_of("python3");
    let closure = resolve(&first, "published", std::slice::from_ref(&python)).await;
    let entry = first
        .engine
        .entry(entry_of(&closure, &python))
        .await
        .unwrap();
    let mut fs = files(&entry);
    fs.retain(|(_, f)| (50_000..400_000).contains(&f.size));
    let picked: Vec<FileRef> = fs
        .iter()
        .step_by(fs.len() / 3)
        .map(|(_, f)| f.clone())
        .collect();
    first.engine.start_recording("kof/python");
    let src = first.content();
    let p2 = picked.clone();
    on_thread(move || {
        for f in &p2 {
            read_all(&*src, f);
        }
    })
    .await;
    let profile = first.engine.stop_recording("kof/python").unwrap();
    let read: u64 = picked.iter().map(|f| f.size).sum();
    assert!(profile.total_bytes() >= read, "{profile:?}");
    let saved = profile.save(first.store.dir()).unwrap();
    assert!(saved.ends_with("profiles/kof/python.json"));
    // Export / import to another node.
    let loaded = Profile::load(first.store.dir(), "kof/python")
        .unwrap()
        .unwrap();
    assert_eq!(loaded, profile);

    let second = Node::new("published", lazy_opts());
    let closure2 = resolve(&second, "published", std::slice::from_ref(&python)).await;
    second
        .engine
        .entry(entry_of(&closure2, &python))
        .await
        .unwrap();
    second.server().reset();
    let failures = second.engine.prefetch_profile(loaded).await.unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    let st = second.server().stats();
    // Exactly the compressed chunks of the recorded ranges.
    let ranges: Vec<(u64, u64)> = profile
        .ranges
        .iter()
        .filter(|r| r.store_path == python.base_name())
        .map(|r| (r.start, r.end))
        .collect();
    assert!(!ranges.is_empty(), "{profile:?}");
    assert_eq!(
        st.bytes_by_kind.nar,
        chunk_file_bytes(&published_index(&python), &ranges)
    );
    assert_eq!(
        second.engine.counters().requests.profile,
        st.requests_by_kind.nar
    );
    // The reads are then local: no more requests.
    let src = second.content();
    on_thread(move || {
        for f in &picked {
            read_all(&*src, f);
        }
    })
    .await;
    assert_eq!(
        second.server().stats().requests_by_kind.nar,
        st.requests_by_kind.nar
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demand_never_queues_behind_prefetch() {
    for flavour in ["zstd", "published"] {
        // Shorter than the stalled download holds its slot (the client's 10 s read timeout,
        // twice), so a demand read queued behind it would fail.
        let opts = LazyOptions {
            prefetch_concurrency: 1,
            read_timeout: Duration::from_secs(8),
            ..lazy_opts()
        };
        let node = Node::new(flavour, opts);
        let (a, b) = (path_of("openssl"), path_of("gmp"));
        let closure = resolve(&node, flavour, &[a.clone(), b.clone()]).await;
        let url_of = |p: &StorePath| match entry_of(&closure, p) {
            ClosureEntry::Remote(s) => s.info.url.clone(),
            ClosureEntry::Stored(_) => panic!("fresh store"),
        };
        // The only prefetch slot is taken by a download that never ends...
        node.server()
            .add_fault(Fault::new(FaultKind::Stall, url_of(&a)));
        node.server().reset();
        let stuck = node.engine.prefetch(closure_only(&closure, &a));
        let mut polls = 0;
        while node.server().stats().requests_by_kind.nar == 0 {
            polls += 1;
            assert!(polls < 2000, "the prefetch of {a} never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // ...a prefetch of b queues behind it...
        let queued = node.engine.prefetch(closure_only(&closure, &b));
        let mut polls = 0;
        while node.engine.counters().prefetch_queued == 0 {
            polls += 1;
            assert!(polls < 2000, "the prefetch of {b} never queued");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // ...and a demand read of b is served all the same, by one download of b.
        node.engine
            .ensure(&b, 0, python_nar_size(&b), Cause::Demand)
            .await
            .unwrap_or_else(|e| panic!("{flavour}: {e}"));
        let report = queued.await.unwrap();
        assert!(report.failures.is_empty(), "{flavour}: {report:?}");
        assert!(node.store.has_path(&b).unwrap());
        assert!(!node.store.has_path(&a).unwrap());
        let st = node.server().stats();
        let b_path = format!("/cache/{flavour}/{}", url_of(&b));
        let b_gets = st.requests_by_path.get(&b_path).copied().unwrap_or(0);
        assert!(b_gets >= 1, "{flavour}: {st:?}");
        if flavour == "zstd" {
            assert_eq!(b_gets, 1, "one stream of b, shared by demand and prefetch");
        }
        stuck.abort();
    }
}

/// A prefetch GET streaming when a demand read starts stops at its next chunk boundary, so the
/// demand read does not share the link with it; the prefetch then resumes from the chunks it
/// has, fetching no byte twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_yields_the_link_to_demand_reads() {
    // 8 MB/s: a 4 MiB prefetch GET streams for half a second, a 512 KiB chunk for 65 ms.
    let mut cfg = ServeConfig::new(&fixtures().0);
    cfg.bandwidth = Some(8_000_000);
    let opts = LazyOptions {
        prefetch_concurrency: 1,
        ..lazy_opts()
    };
    let node = Node::with_server(serve::start_in_background(cfg), "published", opts);
    let (a, b) = (path_of("glibc"), path_of("openssl"));
    let closure = resolve(&node, "published", &[a.clone(), b.clone()]).await;
    node.engine.entry(entry_of(&closure, &b)).await.unwrap();
    let a_size = python_nar_size(&a);
    assert!(
        a_size > 8 << 20,
        "{a} is large enough for several prefetch GETs"
    );
    let engine = node.engine.clone();
    let only_a = closure_only(&closure, &a);
    let prefetch = tokio::spawn(async move { engine.prefetch(only_a).await });
    let mut polls = 0;
    while node.engine.counters().bytes_fetched.prefetch == 0 {
        polls += 1;
        assert!(polls < 3000, "the prefetch of {a} never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // 2 MiB of b on demand: at least a quarter of a second at this bandwidth, so the prefetch
    // GET reaches a chunk boundary while it runs.
    let want = python_nar_size(&b).min(2 << 20);
    node.engine
        .ensure(&b, 0, want, Cause::Demand)
        .await
        .unwrap();
    let report = prefetch.await.unwrap().unwrap();
    assert!(report.failures.is_empty(), "{report:?}");
    assert!(
        node.store.has_path(&a).unwrap(),
        "{a} completed and verified"
    );
    let c = node.engine.counters();
    assert!(c.prefetch_yields >= 1, "{c:?}");
    // What the prefetch kept before yielding was not fetched again: every compressed chunk of
    // a once, but for the frame a yield cut short (its received part is not a whole chunk, so
    // it is dropped unverified), at most one per yield.
    let index = published_index(&a);
    let chunks = &index.index().chunks;
    let a_file: u64 = chunks.iter().map(|c| c.file_len).sum();
    let max_frame = chunks.iter().map(|c| c.file_len).max().unwrap();
    assert!(
        c.bytes_fetched.prefetch >= a_file
            && c.bytes_fetched.prefetch <= a_file + c.prefetch_yields * max_frame,
        "{a_file} file bytes: {c:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_ignoring_range_is_streamed_instead() {
    // A plain HTTP server that answers every GET with the whole file (200), over the fixtures'
    // published cache (indexes, seekable NARs).
    let server =
        CacheServer::start_one_ignoring_ranges(&fixtures().0.join("caches/published")).await;
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&tmp.path().join("store")).unwrap());
    let url = server.url("");
    let (engine, closure_fetcher) = engine_at(&url, store.clone());
    let sqlite = path_of("sqlite-lib");
    let closure = closure_fetcher
        .resolve(std::slice::from_ref(&sqlite))
        .await
        .unwrap();
    let entry = engine.entry(entry_of(&closure, &sqlite)).await.unwrap();
    let (rel, f) = files(&entry)
        .into_iter()
        .max_by_key(|(_, f)| f.size)
        .unwrap();
    assert_reads_staged(&store, &engine, &sqlite, &rel, f).await;
    assert_eq!(
        engine.cache_honours_range(url.trim_end_matches('/')),
        Some(false)
    );
    engine.fetch_whole(&sqlite, Cause::Demand).await.unwrap();
    assert!(store.has_path(&sqlite).unwrap());
    // The refused range request, then one stream (and one for each reference, committed
    // first).
    let sqlite_nar = match entry_of(&closure, &sqlite) {
        ClosureEntry::Remote(sub) => sub.info.url.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        server.count_matching(&sqlite_nar),
        2,
        "{:?}",
        server.counts()
    );
    assert_eq!(
        server.count_matching("nar/"),
        2 + references_of(&sqlite).len(),
        "{:?}",
        server.counts()
    );
}

/// Reads file `f` (`rel` inside `p`) through a view's content source over `store` and
/// `engine`, and asserts it holds the staged (genuine) bytes.
async fn assert_reads_staged(
    store: &Arc<Store>,
    engine: &Arc<LazyStore>,
    p: &StorePath,
    rel: &str,
    f: FileRef,
) {
    let src = Arc::new(LazyContent::new(
        LocalReader::new(store.clone()),
        engine.clone(),
    ));
    let got = on_thread(move || read_all(&*src, &f)).await;
    assert!(got == std::fs::read(staged(p).join(rel)).unwrap(), "{rel}");
}

/// An engine (and a fetcher for resolving closures) on the cache at `url`.
fn engine_at(url: &str, store: Arc<Store>) -> (Arc<LazyStore>, Fetcher) {
    let client = http_client(&HttpOptions::default()).unwrap();
    let cache = BinaryCache::new(url, client, RetryPolicy::default()).unwrap();
    let key = PublicKey::parse(&manifest().public_key).unwrap();
    let subs = Arc::new(Substituters::new(vec![cache], vec![key], true));
    let fetcher = Fetcher::new(store.clone(), subs.clone(), FetchOptions::default());
    let resolver = Fetcher::new(store.clone(), subs, FetchOptions::default());
    (
        LazyStore::new(Arc::new(fetcher), store, lazy_opts()),
        resolver,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_listing_is_not_used() {
    // A cache with one path whose `.ls` puts a file past the end of the NAR.
    let p = path_of("libattr1");
    let from = fixtures().0.join("caches/none");
    let dir = tempfile::tempdir().unwrap();
    let narinfo_name = format!("{}.narinfo", p.hash_part());
    let text = std::fs::read_to_string(from.join(&narinfo_name)).unwrap();
    let info = kof_nar::NarInfo::parse(&text).unwrap();
    std::fs::create_dir_all(dir.path().join("nar")).unwrap();
    for f in ["nix-cache-info", narinfo_name.as_str(), info.url.as_str()] {
        std::fs::copy(from.join(f), dir.path().join(f)).unwrap();
    }
    // Its references too (narinfo and NAR, no listing): the path is committed after them.
    for r in references_of(&p) {
        let name = format!("{}.narinfo", r.hash_part());
        let text = std::fs::read_to_string(from.join(&name)).unwrap();
        let url = kof_nar::NarInfo::parse(&text).unwrap().url;
        for f in [name.as_str(), url.as_str()] {
            std::fs::copy(from.join(f), dir.path().join(f)).unwrap();
        }
    }
    let mut listing: kof_nar::listing::Listing =
        serde_json::from_slice(&std::fs::read(from.join(format!("{}.ls", p.hash_part()))).unwrap())
            .unwrap();
    fn spoil(n: &mut kof_nar::listing::ListingNode, nar_size: u64) -> bool {
        match n {
            kof_nar::listing::ListingNode::Regular { nar_offset, .. } => {
                *nar_offset = Some(nar_size);
                true
            }
            kof_nar::listing::ListingNode::Directory { entries } => {
                entries.values_mut().any(|c| spoil(c, nar_size))
            }
            _ => false,
        }
    }
    assert!(spoil(&mut listing.root, info.nar_size));
    std::fs::write(
        dir.path().join(format!("{}.ls", p.hash_part())),
        serde_json::to_vec(&listing).unwrap(),
    )
    .unwrap();
    let server = CacheServer::start_one(dir.path()).await;
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&tmp.path().join("store")).unwrap());
    let (engine, resolver) = engine_at(&server.url(""), store.clone());
    // (No closure, just its narinfo.)
    let sub = resolver.substituters().lookup(&p).await.unwrap().unwrap();
    let entry = engine.entry(&ClosureEntry::Remote(sub)).await.unwrap();
    // The listing was read, refused, and the path fetched whole for its real tree.
    assert_eq!(server.count(&format!("{}.ls", p.hash_part())), 1);
    assert!(store.has_path(&p).unwrap());
    for (rel, f) in files(&entry) {
        assert!(f.nar_offset + f.size <= info.nar_size, "{rel}");
        assert_reads_staged(&store, &engine, &p, &rel, f).await;
    }
}

/// A chunk that fails verification sends the read to the next substituter: the first cache
/// (published) corrupts every NAR byte it sends, the second (plain zstd) is honest. The read
/// gets the genuine bytes, from the second cache, and the path is stored from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_that_fails_verification_sends_the_read_to_the_next_substituter() {
    let server = serve::start_in_background(ServeConfig::new(&fixtures().0));
    server.add_fault(Fault::new(FaultKind::Corrupt, "/cache/published/nar/"));
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&tmp.path().join("store")).unwrap());
    let client = http_client(&HttpOptions::default()).unwrap();
    let caches = ["published", "zstd"]
        .iter()
        .map(|f| BinaryCache::new(&server.cache_url(f), client.clone(), RetryPolicy::default()))
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PublicKey::parse(&manifest().public_key).unwrap();
    let subs = Arc::new(Substituters::new(caches, vec![key], true));
    let fetcher = Fetcher::new(store.clone(), subs.clone(), FetchOptions::default());
    let engine = LazyStore::new(Arc::new(fetcher), store.clone(), lazy_opts());
    let p = path_of("libffi");
    let sub = subs.lookup(&p).await.unwrap().unwrap();
    assert!(
        sub.cache.url().ends_with("/published"),
        "the first cache has it"
    );
    let entry = engine.entry(&ClosureEntry::Remote(sub)).await.unwrap();
    let (rel, f) = files(&entry)
        .into_iter()
        .max_by_key(|(_, f)| f.size)
        .unwrap();
    assert_reads_staged(&store, &engine, &p, &rel, f).await;
    let st = server.stats();
    assert!(st.faults_injected >= 1, "{st:?}");
    assert!(
        st.bytes_by_prefix.get("/cache/zstd").copied().unwrap_or(0) > 0,
        "the bytes came from the second cache: {st:?}"
    );
    assert!(store.has_path(&p).unwrap(), "stored from the honest cache");
    // The path, and each of its references (fetched from the same corrupting cache first to be
    // committed before it), refused once.
    assert_eq!(
        engine.counters().paths_refused,
        1 + references_of(&p).len() as u64
    );
}

/// A prefetch GET that brings a good chunk and then one that fails verification (python's
/// `encodings` and `json` chunks, the latter recompressed with other content) refuses the path
/// as a demand read would (no other substituter here), and leaves no reader waiting: a read of
/// the good chunk's file fails at once naming the verification, never at its bound. (The good
/// chunk was once decoded and written but left in flight, and readers of it waited until
/// their bound.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_meeting_a_lying_chunk_refuses_the_path_and_leaves_no_reader_waiting() {
    let case = kof_fixtures::tamper::Case::RecompressedChunk;
    let tampered = TamperedFixtures::build(&[case]);
    let python = tampered.python.clone();
    let server = serve::start_in_background(ServeConfig::new(tampered.dir()));
    let node = Node::with_server(
        server,
        case.name(),
        LazyOptions {
            read_timeout: Duration::from_secs(10),
            ..lazy_opts()
        },
    );
    let closure = resolve(&node, case.name(), std::slice::from_ref(&python)).await;
    let entry = node
        .engine
        .entry(entry_of(&closure, &python))
        .await
        .unwrap();
    let file = |name: &str| {
        files(&entry)
            .into_iter()
            .find(|(rel, _)| rel == name)
            .unwrap()
            .1
    };
    let (utf8, lie) = (
        file("lib/python3.11/encodings/utf_8.py"),
        file(kof_testkit::TAMPERED_FILE),
    );
    let index = published_index(&python);
    let (good, bad) = (
        index
            .index()
            .chunks_for(utf8.nar_offset, utf8.nar_offset + 1),
        index.index().chunks_for(lie.nar_offset, lie.nar_offset + 1),
    );
    assert_eq!(
        good.start + 1,
        bad.start,
        "adjacent chunks: {good:?} {bad:?}"
    );
    // The prefetch of python fails at the json chunk...
    let report = node
        .engine
        .prefetch(closure_only(&closure, &python))
        .await
        .unwrap();
    assert_eq!(report.failures.len(), 1, "{report:?}");
    assert!(
        report.failures[0].contains("failed verification"),
        "{report:?}"
    );
    // ...the path is refused, and a read of the encodings file fails at once, naming why.
    assert_eq!(node.engine.counters().paths_refused, 1);
    let src = node.content();
    let t0 = std::time::Instant::now();
    let err = on_thread(move || src.read(&utf8, 0, 4096))
        .await
        .expect_err("the path is refused");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let text = kof_node_api::report::chain(&err);
    assert!(text.contains("failed verification"), "{text}");
    assert!(!node.store.has_path(&python).unwrap());
    assert!(node.partial_files().is_empty(), "nothing kept");
}
