//! FloxHub resolution through the command line: live generations, rollbacks, pins, old
//! metadata, private owners.

use crate::support::*;

fn resolve(node: &Node, r: &str) -> serde_json::Value {
    node.json(&["resolve", r, "--json"])
}

#[test]
fn a_rollback_makes_the_live_generation_differ_from_the_newest() {
    let node = Node::new();
    let v = resolve(&node, "kof/rollback");
    assert_eq!(v["generation"], 2);
    assert_eq!(v["newest_generation"], 3);
    assert_eq!(v["pinned"], false);
    let last = v["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["kind"], "switch_generation");
    assert_eq!(last["current_generation"], "2");
    node.ok(&["prefetch", "kof/rollback"]);
    assert_eq!(node.stored_paths(), closure_of("kof/rollback", Some(2)));
}

#[test]
fn a_pin_selects_that_generation() {
    let node = Node::new();
    let v = resolve(&node, "kof/rollback:3");
    assert_eq!(v["generation"], 3);
    assert_eq!(v["pinned"], true);
    node.ok(&["prefetch", "kof/rollback:3"]);
    assert_eq!(node.stored_paths(), closure_of("kof/rollback", Some(3)));
    let e = node.fails(&["resolve", "kof/rollback:9"]);
    assert!(e.contains("kof/rollback") && e.contains('9'), "{e}");
}

#[test]
fn version_1_metadata_and_a_generation_without_a_lockfile() {
    let node = Node::new();
    let v = resolve(&node, "kof/legacy");
    assert_eq!(v["generation"], 2);
    assert_eq!(
        v["closure"].as_array().unwrap().len(),
        closure_of("kof/legacy", Some(2)).len()
    );
    let e = node.fails(&["resolve", "kof/legacy:1"]);
    assert!(e.contains("kof/legacy") && e.contains("lock"), "{e}");
}

#[test]
fn a_private_owner_needs_its_token_and_the_token_is_never_printed() {
    let token_path = fixtures_dir().join(&manifest().tokens["secretorg"]);
    let token = std::fs::read_to_string(&token_path)
        .unwrap()
        .trim()
        .to_string();

    let anonymous = Node::new();
    let out = anonymous.run(&["prefetch", "secretorg/app"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("secretorg/app"), "{err}");
    assert!(anonymous.stored_paths().is_empty());

    let wrong = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(wrong.path(), "not-the-token\n").unwrap();
    let refused = Node::with(NodeOptions {
        token_file: Some(wrong.path().to_path_buf()),
        ..NodeOptions::default()
    });
    let e = refused.fails(&["prefetch", "secretorg/app"]);
    assert!(e.contains("secretorg/app"), "{e}");
    assert!(!e.contains("not-the-token"), "{e}");

    let authed = Node::with(NodeOptions {
        token_file: Some(token_path.clone()),
        ..NodeOptions::default()
    });
    let out = authed.run(&["prefetch", "secretorg/app"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for stream in [&out.stdout, &out.stderr] {
        assert!(!String::from_utf8_lossy(stream).contains(&token));
    }
    assert_eq!(authed.stored_paths(), closure_of("secretorg/app", None));
    // The mirror on disk does not keep the token either.
    let config = std::fs::read_to_string(authed.store_dir().join("floxmeta/secretorg.git/config"))
        .unwrap_or_default();
    assert!(!config.contains(&token));
}

#[test]
fn floxhub_down_fails_promptly_naming_the_environment() {
    let node = Node::new();
    let cfg = std::fs::read_to_string(&node.config).unwrap();
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let cfg = cfg
        .lines()
        .map(|l| {
            if l.starts_with("floxhub_url") {
                format!("floxhub_url = \"http://127.0.0.1:{port}/git\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&node.config, cfg).unwrap();
    let e = node.fails(&["prefetch", "kof/hello"]);
    assert!(e.contains("kof/hello"), "{e}");
    assert!(e.contains(&port.to_string()), "{e}");
}

#[test]
fn resolve_goes_through_the_daemon_when_it_answers() {
    let node = Node::new();
    let alone = resolve(&node, "kof/rollback");
    let daemon = node.spawn_daemon();
    let mut c = node.cmd(&["resolve", "kof/rollback", "--json"]);
    c.env("KOF_LOG", "info");
    let out = run_bounded(c, std::time::Duration::from_secs(120));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("resolved through kof-fetcherd"),
        "the daemon, the store's one writer, resolved it: {err}"
    );
    let through: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "owner",
        "name",
        "generation",
        "pinned",
        "newest_generation",
        "closure",
    ] {
        assert_eq!(through[key], alone[key], "{key}");
    }
    assert_eq!(
        through["closure"].as_array().unwrap().len(),
        closure_of("kof/rollback", Some(2)).len()
    );
    // A failure comes back from the daemon naming the environment.
    let e = node.fails(&["resolve", "kof/rollback:9"]);
    assert!(e.contains("kof/rollback") && e.contains('9'), "{e}");
    drop(daemon);
}
