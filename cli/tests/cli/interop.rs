//! Interoperation with the real Nix: it substitutes from the fixture caches over HTTP, and its
//! NARs of what it substituted equal kof's.

use std::process::Command;

use crate::support::*;

#[test]
fn nix_copies_from_the_fixture_cache_and_agrees_with_kof() {
    let node = Node::new();
    let closure = closure_of("kof/hello", None);
    let roots: Vec<String> = manifest()
        .environments
        .iter()
        .find(|e| e.owner == "kof" && e.name == "hello")
        .map(|e| e.generations.last().unwrap().roots.clone())
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let nix_root = tmp.path().join("root");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut c = Command::new("nix");
    c.args(["copy", "--from", &node.server.cache_url("zstd")])
        .arg("--to")
        .arg(&nix_root)
        .args(["--option", "trusted-public-keys", &manifest().public_key])
        .args(&roots)
        .env("HOME", &home)
        .env("XDG_CACHE_HOME", home.join(".cache"));
    must(&mut c);

    node.ok(&["prefetch", "kof/hello"]);
    for p in &closure {
        // What Nix unpacked into its chroot store, dumped by Nix.
        let unpacked = nix_root.join(p.trim_start_matches('/'));
        assert!(unpacked.exists(), "nix copy did not substitute {p}");
        let theirs = must(
            Command::new("nix-store")
                .arg("--dump")
                .arg(&unpacked)
                .env("HOME", &home),
        );
        let ours = must(&mut node.cmd(&["dump-nar", p]));
        assert!(ours == theirs, "kof's NAR of {p} differs from Nix's");
    }
}
