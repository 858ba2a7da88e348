//! A fixtures directory whose caches lie: for each `kof_fixtures::tamper` case, a cache
//! `caches/<case name>` telling that one lie about python3's `json/__init__.py` (or, for the
//! symlink cases, its `bin/pdb3` symlink), everything else linked to the shared fixtures.
//! Chunk and index cases are copies of `caches/published` (indexes, seekable zstd NARs),
//! listing cases copies of `caches/zstd` (listings, no indexes).
//!
//! Also what every read path's tamper test shares: the probe a program runs in kof/python,
//! the verdict on what it saw, running every case, and running a probe within a bound.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kof_fixtures::tamper::{tamper, Case, CaseKind, Tampered, LIE_TARGET};
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

    /// What is wrong with a case's outcome: the probe's `stdout`, the node's logs (`log`),
    /// whether the lied-about path ended in the store. Empty when the case ended as it must:
    /// nothing of any lie shown; for a chunk lie, the changed code never run, the log saying
    /// "failed verification" naming the path, nothing stored; for an index lie, the index
    /// refused, the genuine code run and the path read whole; for a listing lie, the path
    /// refused and the log naming the listing, the cache and the path.
    pub fn verdict(&self, case: Case, stdout: &str, log: &str, stored: bool) -> Vec<String> {
        let mut wrong = Vec::new();
        let mut want = |ok: bool, what: &str| {
            if !ok {
                wrong.push(what.to_string());
            }
        };
        let python = self.python.base_name();
        // Nothing of any lie is ever shown.
        want(
            !stdout.contains("TAMPERED") && !log.contains("TAMPERED"),
            "the changed code ran",
        );
        want(!stdout.contains("exec=yes"), "the file shows as executable");
        want(
            !stdout.contains(LIE_TARGET),
            "the symlink shows the lie's target",
        );
        match case.kind() {
            CaseKind::Chunk => {
                want(
                    !stdout.contains("json-ok") && !stdout.contains("python=0"),
                    "import json succeeded on a tampered chunk",
                );
                want(
                    log.contains("failed verification") && log.contains(&python),
                    "the log does not say 'failed verification' naming the path",
                );
                want(!stored, "the path is in the store");
            }
            CaseKind::Index => {
                want(
                    log.contains("index refused") && log.contains(&python),
                    "the log does not say 'index refused' naming the path",
                );
                want(
                    stdout.contains("json-ok [1]") && stdout.contains("python=0"),
                    "python did not run the genuine module",
                );
                want(
                    stdout.contains("exec=no"),
                    "the file's mode is not the genuine one",
                );
                want(
                    stdout.contains("link=pdb3.11\n"),
                    "the symlink's target is not the genuine one",
                );
                want(stored, "the path was not read whole and stored");
            }
            CaseKind::Listing => {
                want(
                    !stdout.contains("json-ok") && !stdout.contains("python=0"),
                    "python ran from a path whose listing lied",
                );
                want(
                    stdout.contains("link=\n"),
                    "the symlink was readable in a path whose listing lied",
                );
                want(
                    log.contains("listing") && log.contains(case.name()) && log.contains(&python),
                    "the log does not name the listing, the cache and the path",
                );
            }
        }
        wrong
    }

    /// Runs `check` for every case of [`Case::ALL`], four at a time (each on a node of its
    /// own), and returns everything they found wrong.
    pub fn check_every_case(&self, check: impl Fn(Case) -> Vec<String> + Sync) -> Vec<String> {
        let check = &check;
        Case::ALL
            .chunks(4)
            .flat_map(|group| {
                std::thread::scope(|s| {
                    let jobs: Vec<_> = group
                        .iter()
                        .map(|&case| s.spawn(move || check(case)))
                        .collect();
                    jobs.into_iter()
                        .flat_map(|j| j.join().unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect()
    }
}

/// Runs `cmd` to completion, killing it (a child the test started) past `limit`; returns its
/// output and whether it was killed.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> (Output, bool) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut killed = false;
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().unwrap(), killed)
}
