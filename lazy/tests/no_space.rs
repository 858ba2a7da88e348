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
//! printed).

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kof_fixtures::serve::{self, ServeConfig};
use kof_lazy::{partial_file, Cause, LazyOptions, LazyStore};
use kof_nar::PublicKey;
use kof_store::Store;
use kof_substituter::cache::{http_client, BinaryCache, HttpOptions, RetryPolicy};
use kof_substituter::fetcher::{FetchOptions, Fetcher};
use kof_substituter::substituters::Substituters;
use kof_testkit::{fixtures, manifest, nix_dump, path_of};

/// A tmpfs of `size` mounted at `dir` for the guard's life.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs at {} (the test needs root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Fills the file system of `file` to its last byte, then gives `leave` bytes back.
fn fill_leaving(file: &Path, leave: u64) {
    let mut f = fs::File::create(file).unwrap();
    let block = vec![0x5au8; 64 << 10];
    let mut total = 0u64;
    while let Ok(n) = f.write(&block) {
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert!(
        total > leave,
        "the file system is too small: {total} bytes free"
    );
    f.set_len(total - leave).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_partial_waits_for_space_and_stays_readable() {
    let server = serve::start_in_background(ServeConfig::new(&fixtures().0));
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("fs");
    let _fs = Tmpfs::mount(&mnt, "64m");
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
