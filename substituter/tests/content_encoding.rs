//! Cache metadata served Content-Encoded (as S3-hosted caches serve `.ls` and, with Nix ≥ 2.30,
//! narinfos) by the real fixture server over loopback: `nix-cache-info`, narinfos, listings and
//! index files decode to exactly what the unencoded cache gives, in every encoding Nix decodes;
//! corrupt bodies, unknown encodings and decompression bombs are refused with typed errors;
//! NAR bodies are never touched; and the real Nix reads the same encoded cache.

#[allow(unused_imports)] // the shared support module re-exports what other tests use
mod fetch_support;

use std::process::Command;

use fetch_support::*;
use futures_util::StreamExt;
use kof_fixtures::serve::{self, Fault, ServeConfig, ServerHandle};
use kof_nar::StorePath;
use kof_substituter::cache::{BinaryCache, CacheError, DEFAULT_MAX_METADATA_BYTES};
use kof_substituter::encoding::{DecodeError, Encoding};
use tempfile::TempDir;

/// The fixture server over a copy of the `zstd` cache (narinfos, listings, NARs written by the
/// real `nix copy`, plus an index file for `dep`), sending `encoding` as metadata's
/// `Content-Encoding` (`None`: as stored).
struct Encoded {
    handle: ServerHandle,
    _root: TempDir,
}

impl Encoded {
    async fn start(encoding: Option<&str>) -> Encoded {
        let fx = fixture();
        let root = tempfile::tempdir().unwrap();
        let cache = root.path().join("caches/c");
        copy_cache(&fx.dir.join("zstd"), &cache);
        std::fs::write(cache.join(index_name(&fx.dep)), index_bytes()).unwrap();
        let mut config = ServeConfig::new(root.path());
        config.content_encoding = encoding.map(str::to_string);
        let handle = serve::start(config).await.unwrap();
        Encoded {
            handle,
            _root: root,
        }
    }

    fn url(&self) -> String {
        self.handle.cache_url("c")
    }

    fn cache(&self) -> BinaryCache {
        BinaryCache::new(&self.url(), client(), quick_retry()).unwrap()
    }

    fn dir(&self) -> std::path::PathBuf {
        self._root.path().join("caches/c")
    }
}

fn index_name(path: &StorePath) -> String {
    format!("{}.kof-index", path.hash_part())
}

/// Binary bytes standing in for an index file (nothing parses them here): the first 300 KB of
/// `dep`'s NAR, which holds random data.
fn index_bytes() -> Vec<u8> {
    let mut nar = nix_dump(&fixture().dep);
    nar.truncate(300_000);
    nar
}

/// Everything the metadata GETs return, for comparing an encoded cache with the plain one.
#[derive(Debug, PartialEq)]
struct Metadata {
    info: kof_substituter::cache::CacheInfo,
    narinfos: Vec<kof_nar::NarInfo>,
    listing: kof_nar::listing::Listing,
    index: Vec<u8>,
    absent: (bool, bool, bool),
}

async fn metadata(c: &BinaryCache) -> Metadata {
    let fx = fixture();
    let absent = fx.other_path_not_in_caches();
    let mut narinfos = Vec::new();
    for p in [&fx.dep, &fx.lib, &fx.app] {
        narinfos.push(bounded(c.narinfo(p)).await.unwrap().expect("in the cache"));
    }
    Metadata {
        info: bounded(c.cache_info()).await.unwrap(),
        narinfos,
        listing: bounded(c.listing(&fx.dep)).await.unwrap().expect("listed"),
        index: bounded(c.index_file(&fx.dep))
            .await
            .unwrap()
            .expect("index file"),
        absent: (
            bounded(c.narinfo(&absent)).await.unwrap().is_none(),
            bounded(c.listing(&absent)).await.unwrap().is_none(),
            bounded(c.index_file(&absent)).await.unwrap().is_none(),
        ),
    }
}

/// The raw answer to a GET of `url`: its `Content-Encoding` and body as sent.
async fn raw(url: &str) -> (Option<String>, Vec<u8>) {
    let resp = client().get(url).send().await.unwrap();
    assert!(resp.status().is_success(), "{url}: {}", resp.status());
    let enc = resp
        .headers()
        .get("content-encoding")
        .map(|v| v.to_str().unwrap().to_string());
    (enc, resp.bytes().await.unwrap().to_vec())
}

/// Every encoding's name as sent, with `x-gzip` for gzip's other spelling.
const NAMES: [&str; 6] = ["br", "zstd", "xz", "gzip", "x-gzip", "bzip2"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_encoding_decodes_to_what_the_plain_cache_gives() {
    let fx = fixture();
    let plain = Encoded::start(None).await;
    let expected = metadata(&plain.cache()).await;
    assert_eq!(expected.index, index_bytes());
    assert!(expected.absent == (true, true, true));
    let narinfo_rel = format!("{}.narinfo", fx.lib.hash_part());
    let on_disk = std::fs::read(plain.dir().join(&narinfo_rel)).unwrap();
    for name in NAMES {
        let server = Encoded::start(Some(name)).await;
        // The server really encodes: the header is there and the bytes differ.
        for rel in [
            "nix-cache-info".to_string(),
            narinfo_rel.clone(),
            format!("{}.ls", fx.dep.hash_part()),
            index_name(&fx.dep),
        ] {
            let (enc, body) = raw(&format!("{}/{rel}", server.url())).await;
            assert_eq!(enc.as_deref(), Some(name), "{rel}");
            assert_ne!(
                body,
                std::fs::read(server.dir().join(&rel)).unwrap(),
                "{name} {rel}"
            );
        }
        assert_ne!(
            raw(&format!("{}/{narinfo_rel}", server.url())).await.1,
            on_disk
        );
        let got = metadata(&server.cache()).await;
        assert_eq!(got, expected, "{name}");

        // NAR bodies are never encoded, and come out byte for byte as stored.
        let info = &got.narinfos[0];
        let (enc, _) = raw(&server.cache().nar_url(info)).await;
        assert_eq!(enc, None, "{name}: NAR sent with a Content-Encoding");
        let mut stream = bounded(server.cache().nar_stream(info)).await.unwrap();
        let mut nar = Vec::new();
        while let Some(chunk) = stream.next().await {
            nar.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(nar, std::fs::read(server.dir().join(&info.url)).unwrap());
    }
}

/// Asserts `err` is a decoding error of `url` for `path` whose cause is `check`ed.
fn assert_decode_error(
    err: CacheError,
    url: &str,
    path: Option<&StorePath>,
    check: impl FnOnce(&DecodeError) -> bool,
) {
    let text = kof_node_api::report::chain(&err);
    match &err {
        CacheError::ContentEncoding {
            url: u,
            path: p,
            source,
        } => {
            assert_eq!(u, url, "{text}");
            assert_eq!(p.as_ref(), path, "{text}");
            assert!(check(source), "{text}");
            assert!(text.contains(source.encoding()), "{text}");
            assert!(!text.contains("UTF-8"), "{text}");
        }
        other => panic!("not a decoding error: {text} ({other:?})"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_encoded_bodies_are_typed_errors_naming_url_and_encoding() {
    let fx = fixture();
    for enc in Encoding::ALL {
        let server = Encoded::start(Some(enc.name())).await;
        let c = server.cache();
        if enc == Encoding::Brotli {
            // Brotli carries no checksum: a flipped byte may decode, without error, to other
            // bytes (it does for these narinfos). The narinfo is still refused, by the first
            // check that sees the damage: the decoder, the parser or the signature.
            let rel = format!("{}.narinfo", fx.lib.hash_part());
            server.handle.add_fault(Fault::new(FaultKind::Corrupt, rel));
            let subs = substituters(&[server.url()], &[&fx.trusted_key], true);
            let refused = bounded(subs.lookup(&fx.lib)).await;
            assert!(refused.is_err(), "{enc}: {refused:?}");
            // A truncated or non-brotli body is a decoding error: see the unit tests.
            continue;
        }
        // The `corrupt` fault flips a byte in the middle of the encoded body; zstd (sent with
        // its content checksum), xz, gzip and bzip2 all check their content.
        let cases = [
            format!("{}.narinfo", fx.lib.hash_part()),
            format!("{}.ls", fx.dep.hash_part()),
            "nix-cache-info".to_string(),
        ];
        for rel in &cases {
            server
                .handle
                .add_fault(Fault::new(FaultKind::Corrupt, rel.clone()));
        }
        let corrupt = |e: &DecodeError| {
            matches!(e, DecodeError::Corrupt { encoding, .. } if *encoding == enc)
                && std::error::Error::source(e).is_some()
        };
        let err = bounded(c.narinfo(&fx.lib)).await.unwrap_err();
        assert_decode_error(err, &c.url_of(&cases[0]), Some(&fx.lib), corrupt);
        let err = bounded(c.listing(&fx.dep)).await.unwrap_err();
        assert_decode_error(err, &c.url_of(&cases[1]), Some(&fx.dep), corrupt);
        let err = bounded(c.cache_info()).await.unwrap_err();
        assert_decode_error(err, &c.url_of(&cases[2]), None, corrupt);
        // Not retried: a corrupt body is not a transient failure.
        for rel in &cases {
            assert_eq!(
                server
                    .handle
                    .stats()
                    .requests_by_path
                    .get(&format!("/cache/c/{rel}")),
                Some(&1),
                "{enc} {rel}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_encoding_is_a_typed_error_naming_it() {
    let fx = fixture();
    for name in ["compress", "deflate", "zstd, br"] {
        let server = Encoded::start(Some(name)).await;
        let c = server.cache();
        let unknown =
            |e: &DecodeError| matches!(e, DecodeError::Unknown { encoding } if encoding == name);
        let err = bounded(c.cache_info()).await.unwrap_err();
        assert_decode_error(err, &c.url_of("nix-cache-info"), None, unknown);
        let rel = format!("{}.narinfo", fx.app.hash_part());
        let err = bounded(c.narinfo(&fx.app)).await.unwrap_err();
        assert_decode_error(err, &c.url_of(&rel), Some(&fx.app), unknown);
        let err = bounded(c.index_file(&fx.dep)).await.unwrap_err();
        assert_decode_error(err, &c.url_of(&index_name(&fx.dep)), Some(&fx.dep), unknown);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decompression_bomb_is_refused_at_the_metadata_limit() {
    let fx = fixture();
    for enc in Encoding::ALL {
        let server = Encoded::start(Some(enc.name())).await;
        // A narinfo of 4 MiB of one letter: a few kilobytes encoded, under the limit on the
        // wire, four times the limit decoded.
        let rel = format!("{}.narinfo", fx.lib.hash_part());
        std::fs::write(server.dir().join(&rel), vec![b'a'; 4 << 20]).unwrap();
        let (_, sent) = raw(&format!("{}/{rel}", server.url())).await;
        assert!(
            sent.len() < DEFAULT_MAX_METADATA_BYTES,
            "{enc}: {}",
            sent.len()
        );
        let c = server.cache();
        let err = bounded(c.narinfo(&fx.lib)).await.unwrap_err();
        assert_decode_error(err, &c.url_of(&rel), Some(&fx.lib), |e| {
            matches!(e, DecodeError::TooLarge { encoding, limit }
                if *encoding == enc && *limit == DEFAULT_MAX_METADATA_BYTES)
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_index_file_is_none_on_404_and_403() {
    let fx = fixture();
    let server = Encoded::start(Some("zstd")).await;
    let c = server.cache();
    assert!(bounded(c.index_file(&fx.lib)).await.unwrap().is_none());
    // S3 answers 403 for a key that does not exist (without list permission).
    server
        .handle
        .add_fault(Fault::new(FaultKind::Status403, index_name(&fx.dep)));
    assert!(bounded(c.index_file(&fx.dep)).await.unwrap().is_none());
    // A narinfo's 403 is still an error.
    server.handle.add_fault(Fault::new(
        FaultKind::Status403,
        format!("{}.narinfo", fx.dep.hash_part()),
    ));
    assert!(matches!(
        bounded(c.narinfo(&fx.dep)).await,
        Err(CacheError::Status { status: 403, .. })
    ));
}

/// Runs `cmd` (blocking, off the runtime the server runs on) and returns its stdout.
async fn run_nix(mut cmd: Command) -> String {
    let out = tokio::task::spawn_blocking(move || {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    });
    String::from_utf8(bounded(out).await.unwrap().stdout).unwrap()
}

/// The real Nix (2.8 here) reads the same Content-Encoded cache: `nix path-info` reads the
/// narinfo, and `nix copy --from` substitutes `app`'s closure into a fresh store, every NAR
/// identical to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_nix_reads_the_encoded_cache() {
    let fx = fixture();
    for name in ["br", "zstd"] {
        let server = Encoded::start(Some(name)).await;
        let work = tempfile::tempdir().unwrap();
        let nix = |args: &[&str]| {
            let mut cmd = Command::new("nix");
            // Nix's narinfo cache goes to the test's own directory.
            cmd.env("XDG_CACHE_HOME", work.path().join("cache"));
            cmd.args(args);
            cmd
        };
        let out = run_nix(nix(&[
            "path-info",
            "--store",
            &server.url(),
            &fx.app.to_absolute(),
        ]))
        .await;
        assert_eq!(out.trim(), fx.app.to_absolute(), "{name}");
        let root = work.path().join("root");
        let key = format!("trusted-public-keys = {}", fx.trusted_key);
        let mut copy = nix(&[
            "copy",
            "--from",
            &server.url(),
            "--to",
            root.to_str().unwrap(),
            &fx.app.to_absolute(),
        ]);
        copy.env("NIX_CONFIG", key);
        run_nix(copy).await;
        for p in [&fx.dep, &fx.lib, &fx.app] {
            let copied = root.join(p.to_absolute().trim_start_matches('/'));
            assert_eq!(nix_dump(copied.as_path()), nix_dump(p), "{name} {p}");
        }
        // Nix fetched the narinfos the server encoded.
        let stats = server.handle.stats();
        let narinfo = format!("/cache/c/{}.narinfo", fx.dep.hash_part());
        assert!(
            stats
                .requests_by_path
                .get(&narinfo)
                .is_some_and(|n| *n >= 1),
            "{name}"
        );
    }
}
