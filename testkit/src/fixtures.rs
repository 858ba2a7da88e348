//! The small fixture set, built once.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kof_fixtures::build::{self, BuildOptions, FixtureSet, Manifest};
use kof_nar::StorePath;

/// The shared fixtures and their manifest: `$KOF_FIXTURES_DIR`, else
/// `<workspace>/target/kof-fixtures/small`, built once per process (the builder keeps a stamp
/// and a lock, so concurrent test binaries share one build, and a built set is reused).
pub fn fixtures() -> &'static (PathBuf, Manifest) {
    static F: OnceLock<(PathBuf, Manifest)> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::var_os("KOF_FIXTURES_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kof-fixtures/small")
            });
        let manifest = build::build(&BuildOptions::new(&dir, FixtureSet::Small))
            .unwrap_or_else(|e| panic!("building fixtures in {}: {e}", dir.display()));
        (dir, manifest)
    })
}

/// The fixtures directory (see [`fixtures()`]).
pub fn fixtures_dir() -> &'static Path {
    &fixtures().0
}

/// The fixtures manifest (see [`fixtures()`]).
pub fn manifest() -> &'static Manifest {
    &fixtures().1
}

/// The closure of fixture environment `env` (`owner/name`): of generation `generation`, or of
/// its live generation on `None` (absolute paths, sorted).
pub fn closure_of(env: &str, generation: Option<u32>) -> Vec<String> {
    let (owner, name) = env.split_once('/').unwrap();
    let e = manifest()
        .environments
        .iter()
        .find(|e| e.owner == owner && e.name == name)
        .unwrap_or_else(|| panic!("no fixture environment {env}"));
    let number = generation.unwrap_or(e.live_generation);
    let mut c = e
        .generations
        .iter()
        .find(|g| g.number == number)
        .unwrap_or_else(|| panic!("no generation {number} of {env}"))
        .closure
        .clone();
    c.sort();
    c
}

/// The staged (reference) tree of fixture store path `path` (absolute).
pub fn staged(path: &str) -> PathBuf {
    fixtures_dir().join(&manifest().store_paths[path].staged)
}

/// The fixture store path of package `pname` (its first variant).
pub fn path_of(pname: &str) -> StorePath {
    let (p, _) = manifest()
        .store_paths
        .iter()
        .filter(|(_, i)| i.pname == pname)
        .min_by_key(|(_, i)| i.variant)
        .unwrap_or_else(|| panic!("no fixture package {pname}"));
    StorePath::parse(p).unwrap()
}

/// The signed index of `p` in the fixtures' published cache (`caches/published`, made by
/// `kof-cache publish`), verified with the fixture key against the manifest's NarHash and
/// NarSize: what tests count chunks and compressed bytes with.
pub fn published_index(p: &StorePath) -> kof_index::VerifiedIndex {
    let dir = fixtures().0.join("caches/published");
    let bytes = std::fs::read(dir.join(kof_index::index_file_name(p)))
        .unwrap_or_else(|e| panic!("the published index of {p}: {e}"));
    let m = &manifest().store_paths[&p.to_absolute()];
    let nar_hash = kof_nar::NixHash::parse(&m.nar_hash).unwrap();
    let key = kof_nar::PublicKey::parse(&manifest().public_key).unwrap();
    kof_index::VerifiedIndex::open(
        &bytes,
        kof_index::Expected {
            store_path: p,
            nar_hash: &nar_hash,
            nar_size: m.nar_size,
        },
        &[key],
    )
    .unwrap_or_else(|e| panic!("the published index of {p}: {e}"))
}
