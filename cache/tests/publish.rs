//! kof-cache publish against the fixture caches, with the real Nix as the reference.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kof_cache::{PublishOptions, PublishReport, Publisher, Selection, Source};
use kof_index::{Expected, VerifiedIndex};
use kof_nar::{NarInfo, NixHash, PublicKey, SecretKey, StorePath};
use kof_testkit::{fixtures, CacheServer};

fn secret() -> SecretKey {
    let text = fs::read_to_string(fixtures().0.join("keys/cache.secret")).unwrap();
    SecretKey::parse(text.trim()).unwrap()
}

fn public() -> PublicKey {
    PublicKey::parse(&fixtures().1.public_key).unwrap()
}

fn cache_dir(flavour: &str) -> PathBuf {
    fs::canonicalize(fixtures().0.join("caches").join(flavour)).unwrap()
}

fn publish(from: &str, to: &Path, selection: &Selection) -> PublishReport {
    let opts = PublishOptions {
        trusted_keys: vec![public()],
        ..Default::default()
    };
    Publisher::new(Source::cache(from).unwrap(), to, secret(), opts)
        .run(selection)
        .unwrap()
}

fn bin(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kof-cache"));
    c.arg("publish").args(args);
    c
}

fn out_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every path of the manifest: narinfo kept but for the file fields, NAR decodes whole to the
/// NarHash, index verifies and every chunk decodes to its NAR bytes.
fn check_published(dir: &Path, source: &Path) {
    let m = &fixtures().1;
    let key = public();
    assert!(dir.join("nix-cache-info").is_file());
    for (path, info) in &m.store_paths {
        let sp = StorePath::from_absolute(path).unwrap();
        let hash = sp.hash_part();
        let text = fs::read_to_string(dir.join(format!("{hash}.narinfo"))).unwrap();
        let ni = NarInfo::parse(&text).unwrap();
        let src =
            NarInfo::parse(&fs::read_to_string(source.join(format!("{hash}.narinfo"))).unwrap())
                .unwrap();
        assert_eq!(ni.compression.as_str(), "zstd");
        assert_eq!(ni.sigs, src.sigs, "{path}: signatures kept");
        assert_eq!(
            (&ni.nar_hash, ni.nar_size, &ni.references),
            (&src.nar_hash, src.nar_size, &src.references)
        );
        let file = fs::read(dir.join(&ni.url)).unwrap();
        assert_eq!(ni.file_size, Some(file.len() as u64));
        assert_eq!(ni.file_hash, Some(NixHash::digest(&file)));
        let nar = zstd::decode_all(&file[..]).unwrap();
        assert_eq!(
            NixHash::digest(&nar).to_nix_string(),
            info.nar_hash,
            "{path}"
        );
        let index = fs::read(dir.join(kof_index::index_file_name(&sp))).unwrap();
        let v = VerifiedIndex::open(
            &index,
            Expected {
                store_path: &sp,
                nar_hash: &ni.nar_hash,
                nar_size: ni.nar_size,
            },
            std::slice::from_ref(&key),
        )
        .unwrap_or_else(|e| panic!("{path}: {e}"));
        for (i, c) in v.index().chunks.iter().enumerate() {
            let raw = &file[c.file_offset as usize..(c.file_offset + c.file_len) as usize];
            let bytes = v.decode_chunk(i, raw).unwrap();
            assert_eq!(
                bytes,
                &nar[c.nar_offset as usize..(c.nar_offset + c.nar_len) as usize]
            );
        }
        let ls: kof_nar::listing::Listing =
            serde_json::from_slice(&fs::read(dir.join(format!("{hash}.ls"))).unwrap()).unwrap();
        assert_eq!(ls.root, v.index().root);
    }
    assert!(
        !fs::read_dir(dir.join(".tmp")).unwrap().any(|_| true),
        ".tmp is emptied"
    );
}

#[test]
fn publishes_every_compression_and_skips_the_second_time() {
    for flavour in ["zstd", "xz", "bzip2", "none"] {
        let out = tempfile::tempdir().unwrap();
        let src = cache_dir(flavour);
        let r = publish(
            &format!("file://{}", src.display()),
            out.path(),
            &Selection::All,
        );
        assert!(r.refused.is_empty(), "{flavour}: {:?}", r.refused);
        assert_eq!(r.published, fixtures().1.store_paths.len(), "{flavour}");
        check_published(out.path(), &src);
        println!(
            "{flavour}: {} in, {} NAR, {} out, {:.1} MB/s",
            r.bytes_in,
            r.nar_bytes,
            r.bytes_out,
            r.nar_mb_per_s()
        );
        let again = publish(
            &format!("file://{}", src.display()),
            out.path(),
            &Selection::All,
        );
        assert_eq!(
            (again.published, again.skipped),
            (0, r.published),
            "{flavour}"
        );
    }
}

#[test]
fn real_nix_substitutes_from_the_published_cache() {
    let m = &fixtures().1;
    let out = tempfile::tempdir().unwrap();
    let python = m.environment("kof", "python").unwrap().live().unwrap();
    let roots: Vec<StorePath> = python
        .roots
        .iter()
        .map(|r| StorePath::from_absolute(r).unwrap())
        .collect();
    let r = publish(
        &format!("file://{}", cache_dir("zstd").display()),
        out.path(),
        &Selection::Closure(roots),
    );
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    assert_eq!(r.published, python.closure.len());
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let o = Command::new("nix")
        .env("XDG_CACHE_HOME", tmp.path().join("cache"))
        .args(["copy", "--from"])
        .arg(format!("file://{}", out.path().display()))
        .arg("--to")
        .arg(&root)
        .args(["--option", "trusted-public-keys", &m.public_key])
        .args(["--option", "require-sigs", "true"])
        .args(&python.roots)
        .output()
        .unwrap();
    assert!(o.status.success(), "nix copy: {}", out_text(&o));
    for p in &python.closure {
        let o = Command::new("nix-store")
            .arg("--dump")
            .arg(root.join(p.trim_start_matches('/')))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", out_text(&o));
        assert_eq!(
            NixHash::digest(&o.stdout).to_nix_string(),
            m.store_paths[p].nar_hash,
            "{p}"
        );
    }
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(tmp.path())
        .status();
}

/// A copy of the zstd cache (narinfos, nix-cache-info, NARs).
fn copy_cache(flavour: &str, to: &Path) {
    let src = cache_dir(flavour);
    fs::create_dir_all(to.join("nar")).unwrap();
    for entry in fs::read_dir(&src)
        .unwrap()
        .chain(fs::read_dir(src.join("nar")).unwrap())
    {
        let p = entry.unwrap().path();
        if p.is_file() {
            let rel = p.strip_prefix(&src).unwrap();
            fs::copy(&p, to.join(rel)).unwrap();
        }
    }
}

#[test]
fn a_tampered_nar_is_refused_and_named_and_nothing_of_it_is_written() {
    let m = &fixtures().1;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    // The uncompressed cache: a flipped byte still decompresses, so the NarHash must catch it.
    copy_cache("none", &src);
    let victim =
        StorePath::from_absolute(m.store_paths.keys().find(|p| p.contains("-jq-")).unwrap())
            .unwrap();
    let ni = NarInfo::parse(
        &fs::read_to_string(src.join(format!("{}.narinfo", victim.hash_part()))).unwrap(),
    )
    .unwrap();
    let nar = src.join(&ni.url);
    let mut bytes = fs::read(&nar).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    fs::write(&nar, bytes).unwrap();
    // And a compressed one whose NAR no longer decodes.
    let zsrc = tmp.path().join("zsrc");
    copy_cache("zstd", &zsrc);
    let zni = NarInfo::parse(
        &fs::read_to_string(zsrc.join(format!("{}.narinfo", victim.hash_part()))).unwrap(),
    )
    .unwrap();
    let znar = zsrc.join(&zni.url);
    let mut zbytes = fs::read(&znar).unwrap();
    let at = zbytes.len() / 2;
    zbytes[at] ^= 0x55;
    fs::write(&znar, zbytes).unwrap();

    for (src, cause) in [(&src, "NarHash says"), (&zsrc, "")] {
        let out = tmp.path().join(format!(
            "out-{}",
            src.file_name().unwrap().to_string_lossy()
        ));
        let o = bin(&["--from", &format!("file://{}", src.display())])
            .arg("--to")
            .arg(&out)
            .arg("--key")
            .arg(fixtures().0.join("keys/cache.secret"))
            .args(["--all", "--trusted-public-key", &m.public_key])
            .output()
            .unwrap();
        let text = out_text(&o);
        assert_eq!(o.status.code(), Some(1), "{text}");
        let line = text
            .lines()
            .find(|l| l.starts_with("refused "))
            .unwrap_or_else(|| panic!("no refused line: {text}"));
        assert!(
            line.contains(&victim.to_absolute()) && line.contains(cause),
            "{line}"
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with("refused ")).count(),
            1,
            "{text}"
        );
        let hash = victim.hash_part();
        for ext in ["narinfo", "ls", "kof-index"] {
            assert!(!out.join(format!("{hash}.{ext}")).exists(), "{ext} written");
        }
        let published = fs::read_dir(&out)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "narinfo")
            })
            .count();
        assert_eq!(published, m.store_paths.len() - 1);
        // Only the published paths' NARs are there.
        assert_eq!(fs::read_dir(out.join("nar")).unwrap().count(), published);
    }
}

#[test]
fn an_untrusted_signature_is_refused() {
    let out = tempfile::tempdir().unwrap();
    let other = SecretKey::generate("other-1").public();
    let o = bin(&["--from", &format!("file://{}", cache_dir("xz").display())])
        .arg("--to")
        .arg(out.path())
        .arg("--key")
        .arg(fixtures().0.join("keys/cache.secret"))
        .args(["--all", "--trusted-public-key", &other.to_string()])
        .output()
        .unwrap();
    let text = out_text(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    let refused: Vec<&str> = text.lines().filter(|l| l.starts_with("refused ")).collect();
    assert_eq!(refused.len(), fixtures().1.store_paths.len(), "{text}");
    assert!(
        refused
            .iter()
            .all(|l| l.contains("not signed by a trusted key") && l.contains("kof-fixtures-1")),
        "{text}"
    );
    assert_eq!(fs::read_dir(out.path().join("nar")).unwrap().count(), 0);
}

#[test]
fn a_killed_run_leaves_no_half_file_and_the_next_completes() {
    let m = &fixtures().1;
    let out = tempfile::tempdir().unwrap();
    let from = format!("file://{}", cache_dir("xz").display());
    let key = fixtures().0.join("keys/cache.secret");
    let mut child = bin(&["--from", &from, "--all", "--jobs", "1", "--level", "12"])
        .arg("--to")
        .arg(out.path())
        .arg("--key")
        .arg(&key)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let count = |ext: &str| {
        fs::read_dir(out.path())
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == ext)
                })
                .count()
            })
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while count("narinfo") < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done = count("narinfo");
    assert!(
        done >= 2 && done < m.store_paths.len(),
        "killed after {done} paths"
    );
    // Every visible narinfo has its NAR (whole) and its index; no visible file is partial.
    for e in fs::read_dir(out.path()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "narinfo") {
            let ni = NarInfo::parse(&fs::read_to_string(&p).unwrap()).unwrap();
            let file = fs::read(out.path().join(&ni.url)).unwrap();
            assert_eq!(Some(NixHash::digest(&file)), ni.file_hash);
            assert!(out
                .path()
                .join(kof_index::index_file_name(&ni.store_path))
                .is_file());
        }
    }
    for e in fs::read_dir(out.path().join("nar")).unwrap() {
        let p = e.unwrap().path();
        let file = fs::read(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            name,
            format!(
                "{}.nar.zst",
                kof_nar::base32::encode(&NixHash::digest(&file).0)
            ),
            "a NAR file under its own hash"
        );
    }
    let o = bin(&["--from", &from, "--all", "--json"])
        .arg("--to")
        .arg(out.path())
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out_text(&o));
    let r: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["skipped"], done);
    assert_eq!(r["published"], m.store_paths.len() - done);
    check_published(out.path(), &cache_dir("xz"));
}

#[test]
fn publishes_from_an_http_cache() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(CacheServer::start_one(&cache_dir("bzip2")));
    let url = server.url("");
    let url = url.trim_end_matches('/').to_string();
    let out = tempfile::tempdir().unwrap();
    let m = &fixtures().1;
    let hello = m.environment("kof", "hello").unwrap().live().unwrap();
    let mut cmd = bin(&[
        "--from",
        &url,
        "--closure",
        "--trusted-public-key",
        &m.public_key,
    ]);
    cmd.arg("--to")
        .arg(out.path())
        .arg("--key")
        .arg(fixtures().0.join("keys/cache.secret"))
        .args(&hello.roots);
    let o = cmd.output().unwrap();
    let text = out_text(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "{} published, 0 skipped, 0 refused",
            hello.closure.len()
        )),
        "{text}"
    );
    assert!(server.count_matching(".nar.bz2") >= hello.closure.len());
    for p in &hello.closure {
        let sp = StorePath::from_absolute(p).unwrap();
        assert!(out.path().join(kof_index::index_file_name(&sp)).is_file());
    }
    drop(server);
}
