//! Nix's closure rule through `kof-store prefetch`: a fetch that fails for one path deep in a
//! closure leaves no stored path whose references are missing, and the next prefetch reuses
//! the objects the failed one wrote; and the liveness of fetch state: a prefetch killed with
//! SIGKILL mid-fetch shows as interrupted, a live one as fetching.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use kof_fixtures::serve::{Fault, FaultKind};

use crate::support::*;

const ENV: &str = "kof/hello";

/// The references (other than itself) of each path of `closure`, per the manifest.
fn references(closure: &[String]) -> HashMap<String, Vec<String>> {
    closure
        .iter()
        .map(|p| {
            let refs = manifest().store_paths[p]
                .references
                .iter()
                .filter(|r| *r != p)
                .cloned()
                .collect();
            (p.clone(), refs)
        })
        .collect()
}

/// The paths of the closure that reference `target`, directly or not.
fn dependents(refs: &HashMap<String, Vec<String>>, target: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    loop {
        let before = out.len();
        for (p, rs) in refs {
            if rs.iter().any(|r| r == target || out.contains(r)) {
                out.insert(p.clone());
            }
        }
        if out.len() == before {
            return out;
        }
    }
}

/// Every reference of every stored path is stored (from `kof-store ls --json`).
fn assert_closure_rule(node: &Node) {
    let listed = node.json(&["ls", "--json"]);
    let stored: BTreeSet<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    for p in listed.as_array().unwrap() {
        for r in p["references"].as_array().unwrap() {
            let r = r.as_str().unwrap();
            assert!(
                stored.contains(r),
                "{} is stored and its reference {r} is not",
                p["path"]
            );
        }
    }
}

#[test]
fn a_prefetch_failing_deep_in_the_closure_leaves_no_path_without_its_references() {
    let closure = closure_of(ENV, None);
    let refs = references(&closure);
    // A path with references of its own, whose dependents weigh the most: its failure withholds
    // the most (here pcre2, under libselinux and coreutils).
    let target = closure
        .iter()
        .filter(|p| !refs[*p].is_empty())
        .max_by_key(|p| {
            dependents(&refs, p)
                .iter()
                .map(|d| nar_size(d))
                .sum::<u64>()
        })
        .unwrap()
        .clone();
    let withheld = dependents(&refs, &target);
    assert!(!withheld.is_empty(), "{target} has dependents");

    let node = Node::new();
    node.server
        .add_fault(Fault::new(FaultKind::Status502, nar_file(&target)));
    let e = node.fails(&["prefetch", ENV]);
    assert!(e.contains(&target), "{e}");

    // Stored: everything but the failed path and what references it; no stored path lacks a
    // reference, and verify (which checks the rule) is clean.
    let expected: Vec<String> = closure
        .iter()
        .filter(|p| **p != target && !withheld.contains(*p))
        .cloned()
        .collect();
    assert_eq!(node.stored_paths(), expected);
    assert_closure_rule(&node);
    node.ok(&["verify"]);
    let stats = node.json(&["stats", "--json"]);
    assert_eq!(stats["environments"], 0);
    // The failed path and each path withheld for it are failed fetch state, none unfinished.
    assert_eq!(
        stats["fetches_failed"],
        1 + withheld.len() as u64,
        "{stats}"
    );
    assert_eq!(stats["fetches_unfinished"], 0, "{stats}");
    let human = node.ok(&["stats"]);
    for p in &withheld {
        assert!(human.contains(p.as_str()), "{human}");
    }
    let left_stored = stats["stored_bytes"].as_u64().unwrap();
    let nar_sent = node.server.stats().bytes_by_kind.nar;

    // With the cache healthy again, the same command completes, writing little more than the
    // failed path: the withheld paths' objects were written by the failed run and are reused.
    node.server.clear_faults();
    node.ok(&["prefetch", ENV]);
    assert_eq!(node.stored_paths(), closure);
    assert_closure_rule(&node);
    node.ok(&["verify"]);
    let stats = node.json(&["stats", "--json"]);
    assert_eq!(stats["fetches_failed"], 0);
    let total_stored = stats["stored_bytes"].as_u64().unwrap();
    let retry_written = total_stored - left_stored;
    let retry_downloaded = node.server.stats().bytes_by_kind.nar - nar_sent;

    // A fresh node stores the same bytes in one go.
    let fresh = Node::new();
    fresh.ok(&["prefetch", ENV]);
    let fresh_stored = fresh.json(&["stats", "--json"])["stored_bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(total_stored, fresh_stored);
    let withheld_nar: u64 = withheld.iter().map(|p| nar_size(p)).sum();
    eprintln!(
        "closure rule: fault on {target}; {} path(s) withheld ({withheld_nar} NAR bytes); the \
         failed run left {left_stored} stored bytes (committed paths and the withheld paths' \
         objects); the retry downloaded {retry_downloaded} bytes of NAR files and wrote \
         {retry_written} new bytes, for {total_stored} stored in all (a fresh node: {fresh_stored})",
        withheld.len(),
    );
    assert!(
        retry_written <= nar_size(&target),
        "the retry wrote {retry_written} bytes, more than {target}'s NAR: the withheld paths' \
         objects were not reused"
    );
}

#[test]
fn a_killed_prefetch_reads_as_interrupted_and_a_live_one_as_fetching() {
    let closure = closure_of(ENV, None);
    let target = closure.iter().max_by_key(|p| nar_size(p)).unwrap().clone();
    let node = Node::new();
    let file = nar_file(&target);
    node.server
        .add_fault(Fault::new(FaultKind::Stall, file.clone()));
    let mut child = node
        .cmd(&["prefetch", ENV])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let row = |node: &Node| {
        let stats = node.json(&["stats", "--json"]);
        let row = stats["fetches"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"] == target.as_str())
            .cloned();
        (stats, row)
    };
    // Wait until the stalled download is under way and recorded.
    let start = Instant::now();
    let live = loop {
        if let (_, Some(r)) = row(&node) {
            break r;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "prefetch ended before the stalled download"
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the download never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(live["state"], "fetching", "{live}");
    assert_eq!(live["pid"], child.id(), "{live}");

    child.kill().unwrap(); // SIGKILL, mid-fetch
    child.wait().unwrap();
    let (stats, dead) = row(&node);
    let dead = dead.unwrap();
    assert_eq!(dead["state"], "interrupted", "{dead}");
    assert!(
        stats["fetches_interrupted"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    let human = node.ok(&["stats"]);
    assert!(
        human.contains("interrupted") && human.contains(&format!("Interrupted {target}")),
        "{human}"
    );
    // Whatever the killed run left keeps the rule.
    assert_closure_rule(&node);
    node.ok(&["verify"]);

    node.server.clear_faults();
    node.ok(&["prefetch", ENV]);
    let (stats, row) = row(&node);
    assert!(row.is_none(), "{stats}");
    assert_eq!(stats["fetches_interrupted"], 0);
}
