//! Shared by the fetch tests: store paths built by the real Nix, binary caches written by the
//! real `nix copy` (several compressions, signed with keys made by `nix-store
//! --generate-binary-cache-key`), served over loopback by `kof_fixtures::serve` (through
//! [`Server`], kof-testkit's [`CacheServer`](kof_testkit::CacheServer): requests counted per
//! URL path, faults injected on demand).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub use kof_fixtures::serve::FaultKind;
use kof_nar::{PublicKey, StorePath};
use kof_store::Store;
use kof_substituter::cache::{http_client, BinaryCache, HttpOptions, RetryPolicy};
use kof_substituter::fetcher::{FetchOptions, Fetcher};
use kof_substituter::substituters::Substituters;
pub use kof_testkit::{nix_dump, CacheServer as Server};

/// Everything built once per test binary.
pub struct Fixture {
    /// Root of the caches and keys.
    pub dir: PathBuf,
    /// A leaf path: text, a 1.5 MB file, an executable, a symlink.
    pub dep: StorePath,
    /// References `dep`.
    pub lib: StorePath,
    /// References `lib` and `dep`.
    pub app: StorePath,
    /// `kof-test-1:...`, the trusted key.
    pub trusted_key: String,
}

const EXPR: &str = r#"
let
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  };
  dep = mk "kof-fetch-test-dep" ''
    /bin/mkdir -p $out/bin $out/share
    echo hello > $out/share/hello.txt
    /usr/bin/head -c 1500000 /dev/urandom > $out/share/big.bin
    printf '#!/bin/sh\necho hi\n' > $out/bin/hi
    /bin/chmod +x $out/bin/hi
    /bin/ln -s ../share/hello.txt $out/bin/link
  '';
  lib = mk "kof-fetch-test-lib" ''
    /bin/mkdir -p $out
    echo ${dep}/share/hello.txt > $out/dep-path
  '';
  app = mk "kof-fetch-test-app" ''
    /bin/mkdir -p $out
    echo ${lib} ${dep} > $out/refs
  '';
in { inherit dep lib app; }
"#;

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// nix-build is sometimes killed (signal 9) on its first try on this machine: retry.
fn nix_build(expr: &Path, attr: &str) -> StorePath {
    let mut last = String::new();
    for _ in 0..4 {
        let out = Command::new("nix-build")
            .arg(expr)
            .args(["-A", attr, "--no-out-link"])
            .output()
            .expect("nix-build runs");
        if out.status.success() {
            let s = String::from_utf8(out.stdout).unwrap();
            return StorePath::parse(s.trim()).expect("nix-build prints a store path");
        }
        last = format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    panic!("nix-build -A {attr} failed: {last}");
}

fn gen_key(dir: &Path, file: &str, name: &str) -> (PathBuf, String) {
    let sec = dir.join(format!("{file}.sec"));
    let public = dir.join(format!("{file}.pub"));
    run(Command::new("nix-store")
        .arg("--generate-binary-cache-key")
        .arg(name)
        .arg(&sec)
        .arg(&public));
    (
        sec,
        std::fs::read_to_string(&public).unwrap().trim().to_string(),
    )
}

fn nix_copy(to: &str, paths: &[&StorePath]) {
    let mut cmd = Command::new("nix");
    cmd.args(["copy", "--to", to]);
    for p in paths {
        cmd.arg(p.to_absolute());
    }
    run(&mut cmd);
}

/// Builds (once per test binary) the store paths; writes the keys and caches once and keeps
/// them under cargo's target tmp dir for later runs, rewritten when the store paths change (a
/// garbage-collected and rebuilt `dep` has new random contents).
pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(tmp).unwrap();
        let expr = tmp.join("fetch-fixture-paths.nix");
        std::fs::write(&expr, EXPR).unwrap();
        let dep = nix_build(&expr, "dep");
        let lib = nix_build(&expr, "lib");
        let app = nix_build(&expr, "app");
        let marker = format!("{dep}\n{lib}\n{app}\n");
        let dir = tmp.join("fetch-fixture");
        let complete =
            |d: &Path| std::fs::read_to_string(d.join("complete")).is_ok_and(|m| m == marker);
        if !complete(&dir) {
            let fresh = tempfile::Builder::new()
                .prefix("fetch-fixture-new")
                .tempdir_in(tmp)
                .unwrap()
                .keep();
            write_caches(&fresh, &dep, &app);
            std::fs::write(fresh.join("complete"), &marker).unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            if std::fs::rename(&fresh, &dir).is_err() {
                // Another test binary won the race; theirs is as good.
                let _ = std::fs::remove_dir_all(&fresh);
            }
            assert!(complete(&dir), "fixture at {}", dir.display());
        }
        let trusted_key = std::fs::read_to_string(dir.join("keys/a.pub"))
            .unwrap()
            .trim()
            .to_string();
        Fixture {
            dir,
            dep,
            lib,
            app,
            trusted_key,
        }
    })
}

/// Keys and caches, written by the real Nix.
fn write_caches(dir: &Path, dep: &StorePath, app: &StorePath) {
    let keys = dir.join("keys");
    std::fs::create_dir(&keys).unwrap();
    let (a_sec, _) = gen_key(&keys, "a", "kof-test-1");
    // Same name as the trusted key, other key bytes: its signatures are invalid.
    let (b_sec, _) = gen_key(&keys, "b", "kof-test-1");
    let (c_sec, _) = gen_key(&keys, "c", "other-1");
    let c = |name: &str, compression: &str, key: Option<&Path>, listing: bool| {
        let mut url = format!(
            "file://{}?compression={compression}",
            dir.join(name).display()
        );
        if listing {
            url.push_str("&write-nar-listing=true");
        }
        if let Some(k) = key {
            url.push_str(&format!("&secret-key={}", k.display()));
        }
        url
    };
    let all = [app];
    nix_copy(&c("zstd", "zstd", Some(&a_sec), true), &all);
    nix_copy(&c("xz", "xz", Some(&a_sec), false), &all);
    nix_copy(&c("bzip2", "bzip2", Some(&a_sec), false), &all);
    nix_copy(&c("none", "none", Some(&a_sec), true), &all);
    nix_copy(&c("unsigned", "zstd", None, false), &all);
    nix_copy(&c("untrusted", "zstd", Some(&c_sec), false), &all);
    nix_copy(&c("badsig", "zstd", Some(&b_sec), false), &all);
    nix_copy(&c("deponly", "xz", Some(&a_sec), false), &[dep]);
    std::fs::create_dir(dir.join("empty")).unwrap();
    std::fs::write(
        dir.join("empty/nix-cache-info"),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n",
    )
    .unwrap();
}

impl Fixture {
    /// A valid store path no cache has.
    pub fn other_path_not_in_caches(&self) -> StorePath {
        StorePath::parse("/nix/store/00000000000000000000000000000000-kof-absent").unwrap()
    }
}

/// Copies a cache directory so a test can damage it.
pub fn copy_cache(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in walk(from) {
        let rel = entry.strip_prefix(from).unwrap();
        let dest = to.join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &dest).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `nix-store -qR`: the reference closure, sorted.
pub fn nix_closure(path: &StorePath) -> Vec<StorePath> {
    let out = run(Command::new("nix-store").arg("-qR").arg(path.to_absolute()));
    let mut v: Vec<StorePath> = out.lines().map(|l| StorePath::parse(l).unwrap()).collect();
    v.sort();
    v
}

/// The file a narinfo's URL points at, in a cache directory.
pub fn nar_file(cache_dir: &Path, path: &StorePath) -> (PathBuf, String) {
    let text =
        std::fs::read_to_string(cache_dir.join(format!("{}.narinfo", path.hash_part()))).unwrap();
    let url = text
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string();
    (cache_dir.join(&url), url)
}

/// A store in a fresh temp dir.
pub fn temp_store() -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).expect("store opens");
    (dir, Arc::new(store))
}

/// Retries that are quick, for tests.
pub fn quick_retry() -> RetryPolicy {
    RetryPolicy {
        attempts: 4,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
    }
}

/// A client with bounded timeouts so nothing hangs.
pub fn client() -> reqwest::Client {
    http_client(&HttpOptions {
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(20),
    })
    .unwrap()
}

/// Substituters for `urls`, trusting `keys`.
pub fn substituters(urls: &[String], keys: &[&str], require_sigs: bool) -> Arc<Substituters> {
    let client = client();
    let caches = urls
        .iter()
        .map(|u| BinaryCache::new(u, client.clone(), quick_retry()).unwrap())
        .collect();
    let keys = keys.iter().map(|k| PublicKey::parse(k).unwrap()).collect();
    Arc::new(Substituters::new(caches, keys, require_sigs))
}

/// A fetcher into `store` from `urls`, trusting `keys`.
pub fn fetcher(store: &Arc<Store>, urls: &[String], keys: &[&str], require_sigs: bool) -> Fetcher {
    fetcher_with(store, substituters(urls, keys, require_sigs))
}

/// A fetcher into `store` from `subs`, with the test tuning.
pub fn fetcher_with(store: &Arc<Store>, subs: Arc<Substituters>) -> Fetcher {
    fetcher_limited(store, subs, 4)
}

/// A fetcher with at most `downloads` NAR downloads at once.
pub fn fetcher_limited(store: &Arc<Store>, subs: Arc<Substituters>, downloads: usize) -> Fetcher {
    Fetcher::new(
        store.clone(),
        subs,
        FetchOptions {
            max_parallel_downloads: downloads,
            retry: quick_retry(),
            channel_chunks: 4,
            ..FetchOptions::default()
        },
    )
}

/// Bounds a test step so nothing hangs.
pub async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("step finished within its bound")
}
