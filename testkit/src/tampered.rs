//! A fixtures directory whose caches lie: for each `kof_fixtures::tamper` case, a cache
//! `caches/<case name>` telling that one lie about python3's `json/__init__.py` (or, for the
//! symlink cases, its `bin/pdb3` symlink), everything else linked to the shared fixtures.
//! Chunk and index cases are copies of `caches/published` (indexes, seekable zstd NARs),
//! listing cases copies of `caches/zstd` (listings, no indexes).

use std::path::Path;

use kof_fixtures::tamper::{tamper, Case, CaseKind, Tampered};
use kof_nar::{SecretKey, StorePath};
use tempfile::TempDir;

use crate::fixtures::{fixtures, path_of};

/// The regular file the lies are about, inside python3's store path.
pub const TAMPERED_FILE: &str = "lib/python3.11/json/__init__.py";

/// The symlink the symlink lies are about (`pdb3 -> pdb3.11`).
pub const TAMPERED_LINK: &str = "bin/pdb3";

/// See the module doc. Dropping it removes the directory.
pub struct TamperedFixtures {
    tmp: TempDir,
    /// python3's store path, which every case lies about.
    pub python: StorePath,
    /// What each case did.
    pub cases: Vec<Tampered>,
}

impl TamperedFixtures {
    /// Builds the caches of `cases` (in parallel) into a new temporary fixtures directory.
    pub fn build(cases: &[Case]) -> TamperedFixtures {
        let (shared, _) = fixtures();
        let tmp = tempfile::Builder::new()
            .prefix("kof-tampered-fixtures")
            .tempdir()
            .unwrap();
        for e in std::fs::read_dir(shared).unwrap().flatten() {
            if e.file_name() != "caches" {
                std::os::unix::fs::symlink(e.path(), tmp.path().join(e.file_name())).unwrap();
            }
        }
        let caches = tmp.path().join("caches");
        std::fs::create_dir(&caches).unwrap();
        for e in std::fs::read_dir(shared.join("caches")).unwrap().flatten() {
            std::os::unix::fs::symlink(e.path(), caches.join(e.file_name())).unwrap();
        }
        let key_text = std::fs::read_to_string(shared.join("keys/cache.secret")).unwrap();
        let key = SecretKey::parse(key_text.trim()).unwrap();
        let python = path_of("python3");
        let done = std::thread::scope(|s| {
            let jobs: Vec<_> = cases
                .iter()
                .map(|&case| {
                    let (key, python, caches) = (&key, &python, &caches);
                    s.spawn(move || {
                        let from = match case.kind() {
                            CaseKind::Listing => "zstd",
                            CaseKind::Chunk | CaseKind::Index => "published",
                        };
                        let file = if case.wants_symlink() {
                            TAMPERED_LINK
                        } else {
                            TAMPERED_FILE
                        };
                        tamper(
                            case,
                            &shared.join("caches").join(from),
                            &caches.join(case.name()),
                            python,
                            file,
                            key,
                        )
                        .unwrap_or_else(|e| panic!("tampering {case}: {e}"))
                    })
                })
                .collect();
            jobs.into_iter().map(|j| j.join().unwrap()).collect()
        });
        TamperedFixtures {
            tmp,
            python,
            cases: done,
        }
    }

    /// The fixtures directory (for [`NodeOptions::fixtures_dir`](crate::NodeOptions)); each
    /// case's cache is the flavour named [`Case::name`].
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// A shell script run inside kof/python that reports what a program sees of the lie:
    /// `json-ok [1]` and `python=0` when `import json` ran the genuine module (`python=N`
    /// otherwise; a tampered module would print `TAMPERED`), `exec=yes|no` for the file's
    /// executable bit, `link=<target>` for the symlink's target.
    pub fn probe(&self) -> String {
        let p = self.python.to_absolute();
        format!(
            "python3 -c 'import json; print(\"json-ok\", json.dumps([1]))'; echo \"python=$?\"; \
             if test -x {p}/{TAMPERED_FILE}; then echo exec=yes; else echo exec=no; fi; \
             echo \"link=$(readlink {p}/{TAMPERED_LINK})\""
        )
    }
}
