//! The store through the command line: exact NARs, export, chroot runs, verify, gc.

use std::path::Path;
use std::process::Command;

use crate::support::*;

/// Exports a closure as `root/nix/store/...`.
fn export_closure(node: &Node, closure: &[String], root: &Path) {
    std::fs::create_dir_all(root.join("nix/store")).unwrap();
    for p in closure {
        let dir = root.join(p.trim_start_matches('/'));
        node.ok(&["export", p, dir.to_str().unwrap()]);
    }
}

#[test]
fn dump_nar_and_export_reproduce_what_nix_would() {
    let node = Node::new();
    node.ok(&["prefetch", "kof/tools"]);
    let tmp = tempfile::tempdir().unwrap();
    for p in closure_of("kof/tools", None) {
        let ours = must(&mut node.cmd(&["dump-nar", &p]));
        // The real Nix's NAR of the staged tree.
        let theirs = must(Command::new("nix-store").arg("--dump").arg(staged(&p)));
        assert!(
            ours == theirs,
            "dump-nar of {p} differs from nix-store --dump"
        );
        assert_eq!(
            kof_nar::NixHash::digest(&ours).to_nix_string(),
            manifest().store_paths[&p].nar_hash
        );
        // export, then the real Nix's NAR of what we wrote.
        let dir = tmp.path().join(p.trim_start_matches("/nix/store/"));
        node.ok(&["export", &p, dir.to_str().unwrap()]);
        let exported = must(Command::new("nix-store").arg("--dump").arg(&dir));
        assert!(exported == theirs, "export of {p} differs");
    }
    // export refuses an existing target and an unknown path, in one line each.
    let e = node.fails(&[
        "export",
        &closure_of("kof/tools", None)[0],
        tmp.path().to_str().unwrap(),
    ]);
    assert!(e.contains("exporting"), "{e}");
    let e = node.fails(&[
        "dump-nar",
        "/nix/store/00000000000000000000000000000000-nothing",
    ]);
    assert!(
        e.contains("00000000000000000000000000000000-nothing"),
        "{e}"
    );
}

#[test]
fn an_exported_closure_runs_with_nothing_from_the_host() {
    let node = Node::new();
    node.ok(&["prefetch", "kof/python", "kof/tools"]);
    let root = tempfile::tempdir().unwrap();
    let mut closure = closure_of("kof/python", None);
    closure.extend(closure_of("kof/tools", None));
    closure.sort();
    closure.dedup();
    export_closure(&node, &closure, root.path());
    let find = |pname: &str| {
        closure
            .iter()
            .find(|p| manifest().store_paths[*p].pname == pname)
            .unwrap_or_else(|| panic!("{pname} in the closure"))
            .clone()
    };
    let python = find("python3");
    let jq = find("jq");
    let out = must(
        Command::new("/usr/sbin/chroot")
            .arg(root.path())
            .arg(format!("{python}/bin/python3"))
            .args([
                "-c",
                "import json, sqlite3, ssl; print(json.dumps([1, sqlite3.sqlite_version_info[0]]))",
            ])
            .env_clear()
            .env("PYTHONDONTWRITEBYTECODE", "1"),
    );
    assert_eq!(String::from_utf8_lossy(&out).trim(), "[1, 3]");
    let out = must(
        Command::new("/usr/sbin/chroot")
            .arg(root.path())
            .arg(format!("{jq}/bin/jq"))
            .args(["-n", "[1,2] | add"])
            .env_clear(),
    );
    assert_eq!(String::from_utf8_lossy(&out).trim(), "3");
}

#[test]
fn verify_names_a_corrupted_object_and_its_store_path() {
    let node = Node::new();
    node.ok(&["prefetch", "kof/hello"]);
    node.ok(&["verify"]);
    // Flip a byte in the largest object file on disk.
    let mut objects: Vec<_> = walk(&node.store_dir().join("objects"));
    objects.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let victim = objects.last().unwrap();
    let mut bytes = std::fs::read(victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(victim, bytes).unwrap();
    let e = node.fails(&["verify"]);
    assert!(e.contains("corrupt"), "{e}");
    assert!(e.contains("/nix/store/"), "{e}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn gc_drops_only_what_no_kept_environment_needs() {
    let node = Node::new();
    node.ok(&["prefetch", "kof/dedup:1", "kof/dedup:5"]);
    let g1 = closure_of("kof/dedup", Some(1));
    let g5 = closure_of("kof/dedup", Some(5));
    let before = node.json(&["stats", "--json"]);
    // Nothing is dropped while both generations are kept.
    let v = node.json(&["gc", "--json"]);
    assert_eq!(v["paths_removed"].as_array().unwrap().len(), 0);

    node.ok(&["forget", "kof/dedup:1"]);
    let v = node.json(&["gc", "--json"]);
    let mut removed: Vec<String> = v["paths_removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    removed.sort();
    let only_g1: Vec<String> = g1.iter().filter(|p| !g5.contains(p)).cloned().collect();
    assert!(!only_g1.is_empty());
    assert_eq!(removed, only_g1);
    assert_eq!(node.stored_paths(), g5);
    let after = node.json(&["stats", "--json"]);
    assert!(after["stored_bytes"].as_u64() < before["stored_bytes"].as_u64());
    assert!(v["bytes_freed"].as_u64().unwrap() > 0);
    node.ok(&["verify"]);
    for p in &g5 {
        let nar = must(&mut node.cmd(&["dump-nar", p]));
        assert_eq!(
            kof_nar::NixHash::digest(&nar).to_nix_string(),
            manifest().store_paths[p].nar_hash
        );
    }
    let e = node.fails(&["forget", "kof/dedup:1"]);
    assert!(e.contains("kof/dedup:1"), "{e}");
}

#[test]
fn generations_of_one_environment_share_content() {
    let node = Node::new();
    node.ok(&["prefetch", "kof/dedup:1"]);
    let one = node.json(&["stats", "--json"]);
    node.ok(&[
        "prefetch",
        "kof/dedup:2",
        "kof/dedup:3",
        "kof/dedup:4",
        "kof/dedup:5",
    ]);
    let all = node.json(&["stats", "--json"]);
    let logical = all["logical_bytes"].as_u64().unwrap();
    let stored = all["stored_bytes"].as_u64().unwrap();
    let unique = all["unique_bytes"].as_u64().unwrap();
    // Five generations cost far less than five copies of the first.
    assert!(stored < 2 * one["stored_bytes"].as_u64().unwrap(), "{all}");
    assert!(unique < logical, "{all}");
}
