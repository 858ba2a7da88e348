//! Caches that lie, read through the shim: `ctr run --runtime io.containerd.flox.v2` of a
//! kof/python container on a node (containerd, runc, the shim, the real `kof-fetcherd` and its
//! FUSE server) whose one substituter tells one `kof_fixtures::tamper` lie, with
//! `prefetch = "none"` and `"closure"`. Every case runs; each gets its own node.
//!
//! - A chunk that lies: python never runs the changed code, the read fails, nothing of the
//!   path is stored, and the daemon's log says "failed verification" naming the path.
//! - An index that lies: the index is refused ("index refused"), the path is read whole and
//!   verified, python runs the genuine code and the lie shows nowhere in the container.
//! - A `.ls` listing that lies (a cache without indexes): the path is refused, the log names
//!   the listing and the cache, and nothing of the lie is shown.

mod common;

use std::process::Command;

use common::{empty_rootfs, text, Node, Release};
use kof_fixtures::tamper::Case;
use kof_testkit::{NodeOptions, TamperedFixtures};

/// Whether `node`'s store holds `base` (a store path's base name), read from its SQLite
/// database with the `sqlite3` CLI (this package does not link kof-store).
fn stored(node: &kof_testkit::Node, base: &str) -> bool {
    let db = node.store_dir().join("db.sqlite");
    let out = Command::new("sqlite3")
        .arg("-readonly")
        .arg(&db)
        .arg(format!(
            "SELECT count(*) FROM paths WHERE store_path = '{base}'"
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sqlite3 {}: {}",
        db.display(),
        text(&out.stderr)
    );
    text(&out.stdout).trim() != "0"
}

/// Runs the probe in a kof/python container on a node serving `case`'s cache; returns what
/// is wrong (nothing when the case ended as it must).
fn check(t: &TamperedFixtures, case: Case, prefetch: &'static str) -> Vec<String> {
    let node = Node::with(
        NodeOptions {
            flavour: case.name(),
            prefetch: Some(prefetch),
            read_timeout_secs: 30,
            download_attempts: Some(2),
            fixtures_dir: Some(t.dir().to_path_buf()),
            prefix: "kof-shim-tamper",
            ..NodeOptions::default()
        },
        false,
        Release::Bookworm,
    );
    let rootfs = empty_rootfs(node.dir());
    let out = node.ctr_run(
        &format!("tamper-{}", case.name()),
        &rootfs,
        &[("flox.dev/environment", "kof/python")],
        &["sh", "-c", &t.probe()],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let log = node.logs();
    let stored = stored(&node, &t.python.base_name());
    t.verdict(case, &stdout, &log, stored)
        .into_iter()
        .map(|w| {
            format!(
                "{case} (prefetch {prefetch}, through the shim): {w}\n--- stdout\n{stdout}\
                 --- stderr\n{stderr}{log}"
            )
        })
        .collect()
}

/// Every case with `prefetch`, four nodes at a time.
fn every_case(prefetch: &'static str) {
    let t = TamperedFixtures::build(&Case::ALL);
    let wrong = t.check_every_case(|case| check(&t, case, prefetch));
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

#[test]
fn every_tamper_through_the_shim_without_prefetch() {
    every_case("none");
}

#[test]
fn every_tamper_through_the_shim_with_closure_prefetch() {
    every_case("closure");
}
