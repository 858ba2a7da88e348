//! The materialized raw cache: stored files that are not one raw object (zstd-compressed, or
//! chunked) get a raw copy under `<store_dir>/raw/` for FUSE passthrough, written in the
//! background on the first `backing_file` call; a copy of the wrong size is never used.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kof_fuse::FileRef;
use kof_lazy::LocalReader;
use kof_nar::{Compression, NarInfo, NixHash, StorePath};
use kof_store::{Codec, Digest, FileContent, NodeKind, Store};
use rand::{RngCore, SeedableRng};

/// A valid store path named `name`.
fn store_path(name: &str) -> StorePath {
    let h = NixHash::digest(name.as_bytes());
    let hash = kof_nar::base32::encode(&h.0[..20]);
    StorePath::from_base_name(&format!("{hash}-{name}")).unwrap()
}

/// Where the raw copy of `digest` lives (the layout documented by `lazy::local`).
fn raw_file(store_dir: &Path, digest: &Digest) -> std::path::PathBuf {
    let hex = digest.to_hex();
    store_dir.join("raw").join(&hex[..2]).join(hex)
}

/// Files under this size get no raw copy (`lazy::local`'s policy).
const RAW_CACHE_MIN: u64 = 16 << 10;

/// Text-like bytes zstd compresses well.
fn text(seed: u64, len: usize) -> Vec<u8> {
    let words = [
        "store", "path", "nix", "flox", "object", "chunk", "lib", "the",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        v.extend_from_slice(words[rng.next_u32() as usize % words.len()].as_bytes());
        v.push(b' ');
    }
    v.truncate(len);
    v
}

/// Ingests a path holding `files` (name, bytes) and returns it.
fn ingest(store: &Store, tmp: &Path, name: &str, files: &[(&str, &[u8])]) -> StorePath {
    let src = tmp.join(format!("src-{name}"));
    fs::create_dir_all(&src).unwrap();
    for (n, data) in files {
        fs::write(src.join(n), data).unwrap();
    }
    let nar = kof_nar::nar::dump_path(&src, Vec::new()).unwrap();
    let p = store_path(name);
    let info = NarInfo {
        store_path: p.clone(),
        url: format!("nar/{}.nar", p.hash_part()),
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
    p
}

/// The `FileRef` and stored content of the file `name` at the top of `path`.
fn file_of(store: &Store, path: &StorePath, name: &str) -> (FileRef, FileContent) {
    let node = store
        .tree(path)
        .unwrap()
        .into_iter()
        .find(|n| n.name == name.as_bytes())
        .unwrap_or_else(|| panic!("{name} not in the tree"));
    let content = match node.kind {
        NodeKind::Regular { content, .. } => content,
        other => panic!("{name} is {other:?}"),
    };
    let f = FileRef {
        store_path: path.to_string().rsplit('/').next().unwrap().into(),
        path: name.into(),
        nar_offset: node.nar_offset.unwrap(),
        size: content.size,
    };
    (f, content)
}

/// Calls `backing_file` until it gives a file (the copy is written in the background), up to
/// a bound on the number of tries; the bound only turns a hang into a failure.
fn backing_eventually(reader: &LocalReader, f: &FileRef) -> fs::File {
    for _ in 0..3000 {
        if let Some(file) = reader.backing_file(f) {
            return file;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "no backing file for {}/{} after 3000 tries",
        f.store_path, f.path
    );
}

fn bytes_of(mut f: fs::File) -> Vec<u8> {
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

#[test]
fn compressed_and_chunked_files_get_a_verified_raw_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&tmp.path().join("store")).unwrap());
    let small = text(1, 200_000);
    let big = text(2, 3 << 20);
    let tiny = text(3, 4_000);
    let p = ingest(
        &store,
        tmp.path(),
        "raw-cache",
        &[
            ("small.txt", &small),
            ("big.txt", &big),
            ("tiny.txt", &tiny),
        ],
    );
    let reader = LocalReader::new(store.clone());

    // A compressed single-object file.
    let (f, content) = file_of(&store, &p, "small.txt");
    assert!(!content.chunked);
    let pieces = store.file_pieces(&content).unwrap();
    assert!(
        pieces.iter().all(|p| p.object.codec != Codec::Raw),
        "text must be stored compressed for this test"
    );
    let raw = raw_file(store.dir(), &content.digest);
    assert!(!raw.exists());
    assert!(
        reader.backing_file(&f).is_none(),
        "the first open starts the copy"
    );
    let got = bytes_of(backing_eventually(&reader, &f));
    assert_eq!(got, small);
    let meta = fs::metadata(&raw).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o444
    );

    // A chunked file over 1 MiB.
    let (f, content) = file_of(&store, &p, "big.txt");
    assert!(content.chunked);
    assert!(reader.backing_file(&f).is_none());
    assert_eq!(bytes_of(backing_eventually(&reader, &f)), big);

    // A file under the size policy gets no copy (and its reads go through FUSE).
    let (f, content) = file_of(&store, &p, "tiny.txt");
    assert!(content.size < RAW_CACHE_MIN);
    for _ in 0..3 {
        assert!(reader.backing_file(&f).is_none());
    }
    assert!(!raw_file(store.dir(), &content.digest).exists());

    // Nothing left behind in the fan-out directories but the copies.
    let mut names = Vec::new();
    for d in fs::read_dir(store.dir().join("raw")).unwrap() {
        for e in fs::read_dir(d.unwrap().path()).unwrap() {
            names.push(e.unwrap().file_name().into_string().unwrap());
        }
    }
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");

    // The store's gc is not disturbed by raw/.
    store.gc().unwrap();
}

#[test]
fn a_raw_copy_of_the_wrong_size_is_not_used() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&tmp.path().join("store")).unwrap());
    let data = text(7, 100_000);
    let p = ingest(&store, tmp.path(), "raw-corrupt", &[("f.txt", &data)]);
    let (f, content) = file_of(&store, &p, "f.txt");
    let raw = raw_file(store.dir(), &content.digest);
    fs::create_dir_all(raw.parent().unwrap()).unwrap();
    fs::write(&raw, &data[..data.len() - 1]).unwrap();

    let reader = LocalReader::new(store.clone());
    assert!(
        reader.backing_file(&f).is_none(),
        "a short raw copy must not be used"
    );
    // It is replaced by a complete copy.
    let got = bytes_of(backing_eventually(&reader, &f));
    assert_eq!(got, data);
    assert_eq!(fs::metadata(&raw).unwrap().len(), data.len() as u64);
}
