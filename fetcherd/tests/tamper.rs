//! Caches that lie, read through the daemon: the real `kof-fetcherd` and its FUSE server lease
//! a kof/python view from a cache telling one `kof_fixtures::tamper` lie, and python3 runs
//! inside that view (`chroot`, the environment's activation), with `prefetch = "none"` and
//! `"closure"`. Each case gets its own node (daemon, store, fixture server).
//!
//! - A chunk that lies: python never runs the changed code, the read fails, nothing of the
//!   path is stored, and the daemon's log says "failed verification" naming the path.
//! - An index that lies: the index is refused ("index refused"), the path is read whole and
//!   verified, python runs the genuine code and the lie shows nowhere in the view.
//! - A `.ls` listing that lies (a cache without indexes): the path is refused, the log names
//!   the listing and the cache, and nothing of the lie is shown.

use std::process::{Command, Stdio};
use std::time::Duration;

use kof_fixtures::tamper::Case;
use kof_testkit::{run_bounded, Node, NodeOptions, TamperedFixtures};

/// Leases kof/python from `case`'s cache through the daemon and runs the probe inside the
/// view; returns what is wrong (nothing when the case ended as it must).
fn check(t: &TamperedFixtures, case: Case, prefetch: &'static str) -> Vec<String> {
    let node = Node::new(NodeOptions {
        flavour: case.name(),
        prefetch: Some(prefetch),
        read_timeout_secs: 30,
        download_attempts: Some(2),
        fixtures_dir: Some(t.dir().to_path_buf()),
        fetcherd: Some(env!("CARGO_BIN_EXE_kof-fetcherd").into()),
        prefix: "kof-fetcherd-tamper",
        ..NodeOptions::default()
    });
    let mut client = node.client();
    let p = client
        .prepare("kof/python", "tamper", None)
        .unwrap_or_else(|e| panic!("{case}: prepare: {e}\n{}", node.logs()));
    // The environment's PATH and vars, and the probe as the command, in the view as root.
    let mut c = Command::new("/usr/sbin/chroot");
    c.arg(&p.view_root)
        .args(["/bin/sh", "-c", &t.probe()])
        .env_clear()
        .env("PATH", format!("{}/bin:/bin", p.flox_env))
        .env("HOME", "/")
        .envs(&p.activation.vars)
        .stdin(Stdio::null());
    let limit = Duration::from_secs(120);
    let (out, killed) = run_bounded(c, limit);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let released = client.release("tamper");
    let log = node.logs();
    let stored = kof_store::Store::open(&node.store_dir())
        .unwrap()
        .has_path(&t.python)
        .unwrap();
    let mut wrong = t.verdict(case, &stdout, &log, stored);
    if killed {
        wrong.insert(0, format!("the probe did not finish within {limit:?}"));
    }
    if let Err(e) = released {
        wrong.push(format!("release failed: {e}"));
    }
    wrong
        .into_iter()
        .map(|w| {
            format!(
                "{case} (prefetch {prefetch}, through the daemon): {w}\n--- stdout\n{stdout}\
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
fn every_tamper_through_the_daemon_without_prefetch() {
    every_case("none");
}

#[test]
fn every_tamper_through_the_daemon_with_closure_prefetch() {
    every_case("closure");
}
