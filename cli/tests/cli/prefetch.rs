//! `prefetch`, `resolve`, `ls`, `stats`: the main path, end to end.

use crate::support::*;

#[test]
fn prefetch_stores_the_exact_closure_and_reports_it() {
    let node = Node::new();
    let out = node.ok(&["prefetch", "kof/python"]);
    let closure = closure_of("kof/python", None);
    assert!(out.contains("kof/python generation 1"), "{out}");
    assert!(
        out.contains(&format!(
            "prefetched {} paths ({} fetched, 0 already present)",
            closure.len(),
            closure.len()
        )),
        "{out}"
    );
    assert_eq!(node.stored_paths(), closure);
    // Every NAR was downloaded exactly once.
    assert_eq!(node.nar_requests(), closure.len() as u64);

    let stats = node.json(&["stats", "--json"]);
    assert_eq!(stats["store_paths"], closure.len() as u64);
    let logical: u64 = closure.iter().map(|p| nar_size(p)).sum();
    assert_eq!(stats["logical_bytes"], logical);
    let stored = stats["stored_bytes"].as_u64().unwrap();
    assert!(
        stored > 0 && stored < logical,
        "stored {stored} of {logical}"
    );
    assert_eq!(stats["environments"], 1);

    // A second prefetch finds everything present and downloads nothing.
    let out = node.ok(&["prefetch", "kof/python"]);
    assert!(
        out.contains(&format!("0 fetched, {} already present", closure.len())),
        "{out}"
    );
    assert_eq!(node.nar_requests(), closure.len() as u64);

    node.ok(&["verify"]);
}

#[test]
fn resolve_json_has_the_contracted_fields() {
    let node = Node::new();
    let v = node.json(&["resolve", "kof/python", "--json"]);
    assert_eq!(v["owner"], "kof");
    assert_eq!(v["name"], "python");
    assert_eq!(v["generation"], 1);
    assert_eq!(v["system"], manifest().system);
    let closure: Vec<String> = v["closure"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    assert_eq!(closure, closure_of("kof/python", None));
    assert!(v["vars"].is_object());
    assert!(
        !v["vars"].as_object().unwrap().is_empty(),
        "kof/python has [vars]"
    );
    assert!(v["hook"].is_string(), "kof/python has an on-activate hook");
    let history = v["history"].as_array().unwrap();
    assert!(!history.is_empty());
    assert!(history[0]["author"].is_string());
    // resolve downloads no NAR.
    assert_eq!(node.nar_requests(), 0);
    // ... and an environment without a hook says null.
    let v = node.json(&["resolve", "kof/hello", "--json"]);
    assert!(v["hook"].is_null());
}

#[test]
fn shared_paths_of_two_environments_are_fetched_once() {
    let node = Node::new();
    node.ok(&["prefetch", "kof/hello", "kof/python"]);
    let mut union = closure_of("kof/hello", None);
    union.extend(closure_of("kof/python", None));
    union.sort();
    union.dedup();
    assert_eq!(node.stored_paths(), union);
    assert_eq!(node.nar_requests(), union.len() as u64);
    assert_eq!(node.json(&["stats", "--json"])["environments"], 2);
}

#[test]
fn every_cache_compression_gives_the_same_store() {
    let mut reference: Option<Vec<String>> = None;
    for flavour in ["zstd", "xz", "bzip2", "none", "published"] {
        let node = Node::with(NodeOptions {
            flavour,
            ..NodeOptions::default()
        });
        node.ok(&["prefetch", "kof/hello"]);
        let paths = node.stored_paths();
        assert_eq!(paths, closure_of("kof/hello", None), "{flavour}");
        // The NARs reproduce exactly whatever the compression was.
        let hashes: Vec<String> = paths
            .iter()
            .map(|p| sha256_hex(&must(&mut node.cmd(&["dump-nar", p]))))
            .collect();
        match &reference {
            None => reference = Some(hashes),
            Some(r) => assert_eq!(&hashes, r, "{flavour}"),
        }
        node.ok(&["verify"]);
    }
}

#[test]
fn bad_references_fail_with_one_line() {
    let node = Node::new();
    let e = node.fails(&["prefetch", "not a ref"]);
    assert!(e.contains("not a ref"), "{e}");
    let e = node.fails(&["prefetch", "kof/python:0"]);
    assert!(e.contains("kof/python:0"), "{e}");
    let e = node.fails(&["prefetch", "kof/no-such-env"]);
    assert!(e.contains("kof/no-such-env"), "{e}");
    let e = node.fails(&["prefetch", "nobody/env"]);
    assert!(e.contains("nobody/env"), "{e}");
    assert!(node.stored_paths().is_empty());
}
