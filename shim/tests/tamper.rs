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

use std::path::Path;
use std::process::{Command, Stdio};

use common::{empty_rootfs, shim_bin, text};
use kof_fixtures::tamper::{Case, CaseKind, LIE_TARGET};
use kof_harness::containerd::{mounts_under, Containerd, ContainerdOptions};
use kof_testkit::{NodeOptions, TamperedFixtures};

/// A node serving `case`'s cache, with containerd and the shim registered. Dropping it stops
/// containerd (and the shims) first, then the daemon and the fixture server.
struct Node {
    ns: String,
    containerd: Option<Containerd>,
    node: kof_testkit::Node,
}

impl Node {
    fn new(t: &TamperedFixtures, case: Case, prefetch: &'static str) -> Node {
        let node = kof_testkit::Node::new(NodeOptions {
            flavour: case.name(),
            prefetch: Some(prefetch),
            read_timeout_secs: 30,
            download_attempts: Some(2),
            fixtures_dir: Some(t.dir().to_path_buf()),
            prefix: "kof-shim-tamper",
            ..NodeOptions::default()
        });
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ctrd = Containerd::start(ContainerdOptions {
            flox_shim: Some(shim_bin()),
            flox_runtime_type: "io.containerd.flox.v2".into(),
            env: vec![("KOF_CONFIG".into(), node.config.display().to_string())],
            ..ContainerdOptions::default()
        })
        .unwrap_or_else(|e| panic!("starting containerd: {e}"));
        Node {
            ns: format!("kof-tamper-{}-{n}", std::process::id()),
            containerd: Some(ctrd),
            node,
        }
    }

    fn containers_dir(&self) -> std::path::PathBuf {
        self.node.store_dir().join("containers")
    }

    /// The daemon's, the FUSE server's and the shim's logs.
    fn logs(&self) -> String {
        let mut out = self.node.logs();
        out.push_str("--- shim.log\n");
        out.push_str(
            &std::fs::read_to_string(self.containers_dir().join("shim.log")).unwrap_or_default(),
        );
        out
    }

    /// Whether the store holds `base` (a store path's base name), read from its SQLite
    /// database with the `sqlite3` CLI (this package does not link kof-store).
    fn stored(&self, base: &str) -> bool {
        let db = self.node.store_dir().join("db.sqlite");
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
}

impl Drop for Node {
    fn drop(&mut self) {
        self.containerd.take();
        for m in mounts_under(&self.containers_dir()).into_iter().rev() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&m)
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir(Path::new("/run/containerd/runc").join(&self.ns));
    }
}

/// Runs the probe in a kof/python container on a node serving `case`'s cache; returns what
/// is wrong (nothing when the case ended as it must).
fn check(t: &TamperedFixtures, case: Case, prefetch: &'static str) -> Vec<String> {
    let node = Node::new(t, case, prefetch);
    let rootfs = empty_rootfs(node.node.dir());
    let ctrd = node.containerd.as_ref().unwrap();
    let mut c = ctrd.ctr(&node.ns);
    c.args(["run", "--rm", "--runtime", "io.containerd.flox.v2"])
        .arg("--annotation")
        .arg("flox.dev/environment=kof/python")
        .arg("--rootfs")
        .arg(&rootfs)
        .arg(format!("tamper-{}", case.name()))
        .args(["sh", "-c", &t.probe()])
        .stdin(Stdio::null());
    let out = c.output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let log = node.logs();
    let stored = node.stored(&t.python.base_name());
    verdict(t, case, &stdout, &log, stored)
        .into_iter()
        .map(|w| {
            format!(
                "{case} (prefetch {prefetch}, through the shim): {w}\n--- stdout\n{stdout}\
                 --- stderr\n{stderr}{log}"
            )
        })
        .collect()
}

/// What is wrong with a case's outcome: the probe's `stdout`, the node's logs (`log`), whether
/// the lied-about path ended in the store.
fn verdict(t: &TamperedFixtures, case: Case, stdout: &str, log: &str, stored: bool) -> Vec<String> {
    let mut wrong = Vec::new();
    let mut want = |ok: bool, what: &str| {
        if !ok {
            wrong.push(what.to_string());
        }
    };
    let python = t.python.base_name();
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

/// Every case with `prefetch`, four nodes at a time.
fn every_case(prefetch: &'static str) {
    let t = TamperedFixtures::build(&Case::ALL);
    let wrong: Vec<String> = Case::ALL
        .chunks(4)
        .flat_map(|group| {
            std::thread::scope(|s| {
                let jobs: Vec<_> = group
                    .iter()
                    .map(|&case| {
                        let t = &t;
                        s.spawn(move || check(t, case, prefetch))
                    })
                    .collect();
                jobs.into_iter()
                    .flat_map(|j| j.join().unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
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
