//! `kof-store run` without the daemon keeps what it fetched: the next run of the same pinned
//! generation on the same store reads it locally instead of fetching it again.

use crate::support::*;

/// `kof-store run REF -- CMD...` alone (no daemon answers on the node's socket), insisting on
/// success; returns stdout.
fn run_ok(node: &Node, args: &[&str]) -> String {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    node.ok(&all)
}

#[test]
fn a_second_run_alone_of_a_pinned_generation_fetches_no_nar_byte() {
    // The published cache (signed indexes), prefetch off: the first run fetches only the
    // verified chunks python reads, most paths stay partial NARs.
    let node = Node::with(NodeOptions {
        flavour: "published",
        extra_config: "prefetch = \"none\"\n".into(),
        ..NodeOptions::default()
    });
    let live = manifest()
        .environment("kof", "python")
        .expect("fixture environment kof/python")
        .live_generation;
    let pinned = format!("kof/python:{live}");
    let python = [
        pinned.as_str(),
        "--",
        "python3",
        "-c",
        "import json, sqlite3; print(1)",
    ];
    assert_eq!(run_ok(&node, &python), "1\n");
    let after_first = node.server.stats();
    assert!(
        after_first.bytes_by_kind.nar > 0,
        "the first run fetched python's files"
    );
    let closure_bytes: u64 = closure_of("kof/python", Some(live))
        .iter()
        .map(|p| nar_size(p))
        .sum();
    assert!(
        after_first.bytes_by_kind.nar < closure_bytes,
        "the first run fetched part of the closure ({} of {closure_bytes} NAR bytes), so the \
         second one depends on partial NARs being kept",
        after_first.bytes_by_kind.nar
    );

    assert_eq!(run_ok(&node, &python), "1\n");
    let after_second = node.server.stats();
    eprintln!(
        "first run: {} NAR bytes in {} NAR requests (closure {closure_bytes} bytes); second \
         run: {} NAR bytes in {} NAR requests, {} narinfo and {} listing requests",
        after_first.bytes_by_kind.nar,
        after_first.requests_by_kind.nar,
        after_second.bytes_by_kind.nar - after_first.bytes_by_kind.nar,
        after_second.requests_by_kind.nar - after_first.requests_by_kind.nar,
        after_second.requests_by_kind.narinfo - after_first.requests_by_kind.narinfo,
        after_second.requests_by_kind.ls - after_first.requests_by_kind.ls,
    );
    assert_eq!(
        after_second.bytes_by_kind.nar - after_first.bytes_by_kind.nar,
        0,
        "the second run fetched NAR bytes again"
    );
    assert_eq!(
        after_second.requests_by_kind.nar - after_first.requests_by_kind.nar,
        0,
        "the second run sent NAR requests again"
    );
    assert_eq!(
        after_second.requests_by_kind.git - after_first.requests_by_kind.git,
        0,
        "a pinned generation the store recorded resolves without FloxHub"
    );
}
