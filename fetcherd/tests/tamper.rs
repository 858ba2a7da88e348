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

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kof_fixtures::tamper::{Case, CaseKind, LIE_TARGET};
use kof_testkit::{Node, NodeOptions, TamperedFixtures};

/// Runs `cmd` to completion, killing it (the child this test started) past `limit`; returns
/// its output and whether it was killed.
fn run_bounded(mut cmd: Command, limit: Duration) -> (Output, bool) {
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
    let mut wrong = verdict(t, case, &stdout, &log, stored);
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
fn every_tamper_through_the_daemon_without_prefetch() {
    every_case("none");
}

#[test]
fn every_tamper_through_the_daemon_with_closure_prefetch() {
    every_case("closure");
}
