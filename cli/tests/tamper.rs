//! Caches that lie, read by `kof-store run` alone (no daemon: its own engine and FUSE view),
//! with `prefetch = "none"` and `"closure"`: every `kof_fixtures::tamper` case, each served
//! by its own fixture server to its own node, running python3 from kof/python.
//!
//! - A chunk that lies (recompressed with changed content, or a flipped byte): python never
//!   runs the changed code, the read fails, nothing of the path is stored, and the log says
//!   "failed verification" naming the path.
//! - An index that lies (tree or chunk digest under its old signature, an untrusted key,
//!   another NarHash): the index is refused ("index refused"), the path is read whole and
//!   verified, python runs the genuine code and the lie shows nowhere.
//! - A `.ls` listing that lies (a cache without indexes): the path is refused, the log names
//!   the listing and the cache, and nothing of the lie is shown.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kof_fixtures::tamper::Case;
use kof_testkit::{run_bounded, Node, NodeOptions, TamperedFixtures};

/// Runs the probe in kof/python on a node whose one substituter is `case`'s cache; returns
/// what is wrong (nothing when the case ended as it must).
fn check(t: &TamperedFixtures, case: Case, prefetch: &'static str) -> Vec<String> {
    let node = Node::new(NodeOptions {
        flavour: case.name(),
        prefetch: Some(prefetch),
        read_timeout_secs: 30,
        download_attempts: Some(2),
        start_daemon: false,
        fixtures_dir: Some(t.dir().to_path_buf()),
        prefix: "kof-cli-tamper",
        ..NodeOptions::default()
    });
    let tmp = node.dir().join("run-tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_kof-store"));
    c.args(["run", "kof/python", "--", "sh", "-c", &t.probe()])
        .env("KOF_CONFIG", &node.config)
        .env("KOF_LOG", "info")
        .env("TMPDIR", &tmp)
        .env_remove("KOF_STORE")
        .stdin(Stdio::null());
    let limit = Duration::from_secs(120);
    let (out, killed) = run_bounded(c, limit);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stored = kof_store::Store::open(&node.store_dir())
        .unwrap()
        .has_path(&t.python)
        .unwrap();
    let mut wrong = t.verdict(case, &stdout, &stderr, stored);
    if killed {
        wrong.insert(0, format!("kof-store run did not finish within {limit:?}"));
    }
    wrong
        .into_iter()
        .map(|w| {
            format!("{case} (prefetch {prefetch}, alone): {w}\n--- stdout\n{stdout}--- stderr\n{stderr}")
        })
        .collect()
}

/// Every case with `prefetch`, four nodes at a time.
fn every_case(prefetch: &'static str) {
    let t = TamperedFixtures::build(&Case::ALL);
    let wrong = t.check_every_case(|case| check(&t, case, prefetch));
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
    assert!(Path::new(t.dir()).is_dir());
}

#[test]
fn every_tamper_alone_without_prefetch() {
    every_case("none");
}

#[test]
fn every_tamper_alone_with_closure_prefetch() {
    every_case("closure");
}
