//! The demand engine on a full disk, against the real fixture server (its published cache:
//! signed indexes, seekable zstd NARs) and a real store on a small tmpfs the test mounts (as
//! root).
//!
//! python3's NAR is fetched whole into its partial file while the file system has room for
//! it but not for its objects: the ingest meets the store's `NoSpace`, which is not a
//! refusal. The partial file is kept and every range of it stays readable (its bytes the
//! real NAR's), a caller waiting for the commit gets the error naming the full file system,
//! the store shows nothing of the path and verifies clean; once space is freed, the retried
//! ingest stores the path (the time from freeing the space to the committed path is
//! printed). And a raw copy for passthrough that meets a full disk is skipped, leaving
//! nothing behind, while the file reads through the store as before.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kof_fixtures::serve::{self, ServeConfig};
use kof_fuse::FileRef;
use kof_lazy::{partial_file, Cause, Ensure, LazyOptions, LazyStore, LocalReader};
use kof_nar::{Compression, NarInfo, NixHash, PublicKey, StorePath};
use kof_store::{Codec, NodeKind, Store};
use kof_substituter::cache::{http_client, BinaryCache, HttpOptions, RetryPolicy};
use kof_substituter::fetcher::{FetchOptions, Fetcher};
use kof_substituter::substituters::Substituters;
use kof_testkit::{fill_file_system, fixtures, manifest, nix_dump, path_of, Tmpfs};

/// Fills the file system of `file` to its last byte, then gives `leave` bytes back.
fn fill_leaving(file: &Path, leave: u64) {
    let total = fill_file_system(file);
    assert!(
        total > leave,
        "the file system is too small: {total} bytes free"
    );
    fs::OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .set_len(total - leave)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_partial_waits_for_space_and_stays_readable() {
    let server = serve::start_in_background(ServeConfig::new(&fixtures().0));
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("fs");
    // Room, once the filler goes, for python3 and its references (fetched before it commits,
    // by Nix's closure rule).
    let _fs = Tmpfs::mount(&mnt, "256m");
    let store_dir = mnt.join("store");
    let python = path_of("python3");
    let nar_size = manifest().store_paths[&python.to_absolute()].nar_size;
    let nar = nix_dump(
        &fixtures()
            .0
            .join(&manifest().store_paths[&python.to_absolute()].staged),
    );
    assert_eq!(nar.len() as u64, nar_size);

    let store = Arc::new(Store::open(&store_dir).unwrap());
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
    let opts = LazyOptions {
        read_timeout: Duration::from_secs(60),
        readahead_file_max: 0,
        readahead_window_min: 0,
        ..LazyOptions::default()
    };
    let engine = LazyStore::new(Arc::new(fetcher), store.clone(), opts);
    // The engine's metadata first (the narinfo, the index), then room for the partial file
    // and little more: its chunks fit, its objects do not.
    engine
        .ensure(&python, 0, 4096, Cause::Demand)
        .await
        .unwrap();
    let filler = mnt.join("filler");
    fill_leaving(&filler, nar_size + (1 << 20));

    let e = engine
        .fetch_whole(&python, Cause::Demand)
        .await
        .expect_err("no room for the path's objects");
    let msg = kof_node_api::report::chain(&e);
    eprintln!("fetch on a full disk: {msg}");
    assert!(msg.contains("file system full"), "{msg}");
    assert!(kof_store::chain_is_no_space(&e), "{e:?}");
    assert!(!store.has_path(&python).unwrap());
    assert_eq!(
        engine.counters().paths_refused,
        0,
        "a full disk is no refusal"
    );

    // The partial file is kept, whole, and every range of it reads as the NAR's bytes.
    let partial = partial_file(&store_dir, &python);
    for (a, b) in [
        (0, 100_000),
        (nar_size / 2, nar_size / 2 + 700_000),
        (nar_size - 5000, nar_size),
    ] {
        engine.ensure(&python, a, b, Cause::Demand).await.unwrap();
        let mut buf = vec![0u8; (b - a) as usize];
        fs::File::open(&partial)
            .unwrap()
            .read_exact_at(&mut buf, a)
            .unwrap();
        assert!(buf == nar[a as usize..b as usize], "bytes {a}..{b}");
    }
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");

    // Room again: the retried ingest stores the path.
    let t0 = Instant::now();
    fs::remove_file(&filler).unwrap();
    while !store.has_path(&python).unwrap() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the path was not stored within 60 s of freeing space"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!(
        "time to recover after ENOSPC (from freeing space to the retried ingest of a {nar_size} \
         byte NAR committed): {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    engine.fetch_whole(&python, Cause::Demand).await.unwrap();
    let mut dumped = Vec::new();
    store.dump_nar(&python, &mut dumped).unwrap();
    assert!(dumped == nar, "the stored path dumps to its NAR");
    assert!(
        !partial.exists(),
        "the partial file goes once the path is stored"
    );
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    drop(engine);
    drop(store);
}

/// The `Ensure` of a reader of stored paths only: asked for nothing.
struct StoredOnly;

impl Ensure for StoredOnly {
    fn ensure(&self, store_path: &str, start: u64, end: u64) -> std::io::Result<()> {
        panic!("a stored file needed no fetch, yet {store_path} {start}..{end} was asked for");
    }

    fn gate(&self, _store_path: &str) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every file under `dir` (none if it does not exist).
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_in(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_raw_copy_on_a_full_disk_is_skipped_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("fs");
    let _fs = Tmpfs::mount(&mnt, "8m");
    let store = Arc::new(Store::open(&mnt.join("store")).unwrap());
    // A compressible file of 400 KB: stored zstd, so passthrough needs a raw copy of it.
    let text: Vec<u8> = (0..40_000u32)
        .flat_map(|i| format!("line {:05}\n", i % 977).into_bytes())
        .collect();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f.txt"), &text).unwrap();
    let nar = nix_dump(&src);
    let h = NixHash::digest(b"nospace-raw");
    let path = StorePath::from_base_name(&format!(
        "{}-nospace-raw",
        kof_nar::base32::encode(&h.0[..20])
    ))
    .unwrap();
    let info = NarInfo {
        store_path: path.clone(),
        url: "nar/x.nar".into(),
        compression: Compression::None,
        file_hash: None,
        file_size: None,
        nar_hash: NixHash::digest(&nar),
        nar_size: nar.len() as u64,
        references: vec![],
        deriver: None,
        system: None,
        sigs: vec![],
        ca: None,
    };
    store.ingest_nar(&info, "test", &mut &nar[..]).unwrap();
    let node = store
        .tree(&path)
        .unwrap()
        .into_iter()
        .find(|n| n.name == b"f.txt")
        .unwrap();
    let NodeKind::Regular { content, .. } = node.kind else {
        panic!("f.txt is not a regular file");
    };
    let pieces = store.file_pieces(&content).unwrap();
    assert!(pieces.iter().all(|p| p.object.codec == Codec::Zstd));
    let f = FileRef {
        store_path: path.base_name().into(),
        path: "f.txt".into(),
        nar_offset: node.nar_offset.unwrap(),
        size: content.size,
    };

    fill_leaving(&mnt.join("filler"), 0);
    let reader = LocalReader::new(store.clone());
    // The first open starts the copy, which meets the full disk; later opens start none (or
    // fail the same way): no backing file, and nothing left under raw/.
    for _ in 0..20 {
        assert!(reader.backing_file(&f).is_none());
        std::thread::sleep(Duration::from_millis(25));
    }
    let raw = mnt.join("store/raw");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !files_in(&raw).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left under raw/: {:?}",
            files_in(&raw)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The file reads through the store, whole.
    let got = reader
        .read(&f, 0, content.size as u32, &StoredOnly)
        .unwrap();
    assert!(got == text, "f.txt reads back whole on a full disk");
    assert!(store.verify().unwrap().is_ok());
    drop(reader);
    drop(store);
}
