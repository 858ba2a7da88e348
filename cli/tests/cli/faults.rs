//! Hostile and flaky caches: transient faults are retried, corruption and bad signatures are
//! refused with nothing ingested, stalls are bounded, and a kill -9 leaves nothing half-visible.

use std::time::{Duration, Instant};

use kof_fixtures::serve::{Fault, FaultKind};

use crate::support::*;

/// The largest path of an environment's closure (the one a fault is aimed at).
fn largest(env: &str) -> String {
    closure_of(env, None)
        .into_iter()
        .max_by_key(|p| nar_size(p))
        .unwrap()
}

#[test]
fn transient_faults_are_retried_to_success() {
    for kind in [
        FaultKind::Status500,
        FaultKind::Status503,
        FaultKind::Reset,
        FaultKind::Truncate,
        FaultKind::Stall,
    ] {
        let node = Node::new();
        let target = largest("kof/hello");
        node.server
            .add_fault(Fault::new(kind, nar_file(&target)).times(2));
        let out = node.run(&["prefetch", "kof/hello"]);
        assert!(
            out.status.success(),
            "{kind:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            node.stored_paths(),
            closure_of("kof/hello", None),
            "{kind:?}"
        );
        assert_eq!(node.server.stats().faults_injected, 2, "{kind:?}");
        node.ok(&["verify"]);
    }
}

#[test]
fn a_corrupted_nar_is_refused_and_nothing_of_it_is_ingested() {
    let node = Node::new();
    let target = largest("kof/hello");
    node.server
        .add_fault(Fault::new(FaultKind::Corrupt, nar_file(&target)));
    let e = node.fails(&["prefetch", "kof/hello"]);
    assert!(e.contains(&target), "{e}");
    assert!(e.to_lowercase().contains("hash"), "{e}");
    let stored = node.stored_paths();
    assert!(!stored.contains(&target));
    // The rest of the closure was fetched and is sound; the environment is not recorded.
    assert_eq!(stored.len(), closure_of("kof/hello", None).len() - 1);
    let stats = node.json(&["stats", "--json"]);
    assert_eq!(stats["environments"], 0);
    // The failure is kept as fetch state, naming the path and the cause.
    assert_eq!(stats["fetches_failed"], 1);
    assert_eq!(stats["fetches_unfinished"], 0);
    let human = node.ok(&["stats"]);
    assert!(
        human.contains(&target) && human.contains("Failed"),
        "{human}"
    );
    node.ok(&["verify"]);
    // Once the cache is healthy, the same command completes the work.
    node.server.clear_faults();
    node.ok(&["prefetch", "kof/hello"]);
    assert_eq!(node.stored_paths(), closure_of("kof/hello", None));
    assert_eq!(node.json(&["stats", "--json"])["fetches_failed"], 0);
}

#[test]
fn a_wrong_signature_is_refused_and_that_path_is_never_downloaded() {
    let node = Node::new();
    let target = largest("kof/hello");
    let hash = &target.trim_start_matches("/nix/store/")[..32];
    node.server
        .add_fault(Fault::new(FaultKind::Badsig, format!("{hash}.narinfo")));
    let e = node.fails(&["prefetch", "kof/hello"]);
    assert!(e.contains(&target), "{e}");
    assert!(e.to_lowercase().contains("signature"), "{e}");
    // Downloads start while the closure walk goes on, so paths accepted before the refusal
    // may be stored (each verified on its own); the refused path's NAR is never requested.
    let file = nar_file(&target);
    let requested = node.server.stats().requests_by_path;
    assert!(
        !requested.keys().any(|k| k.contains(&file)),
        "{requested:?}"
    );
    assert!(!node.stored_paths().contains(&target));
    let stats = node.json(&["stats", "--json"]);
    assert_eq!(stats["environments"], 0);
    // Every download started before the refusal finished before the command did.
    assert_eq!(stats["fetches_unfinished"], 0, "{stats}");
    node.ok(&["verify"]);
}

#[test]
fn an_untrusted_key_is_refused_unless_verification_is_off() {
    // A config trusting another key.
    let other = kof_nar::SecretKey::generate("someone-else-1")
        .public()
        .to_string();
    let node = Node::new();
    let cfg = std::fs::read_to_string(&node.config)
        .unwrap()
        .replace(&manifest().public_key, &other);
    std::fs::write(&node.config, &cfg).unwrap();
    let e = node.fails(&["prefetch", "kof/hello"]);
    assert!(
        e.contains("kof-fixtures-1") || e.to_lowercase().contains("trusted"),
        "{e}"
    );
    assert!(node.stored_paths().is_empty());
    std::fs::write(&node.config, format!("{cfg}require_sigs = false\n")).unwrap();
    node.ok(&["prefetch", "kof/hello"]);
    assert_eq!(node.stored_paths(), closure_of("kof/hello", None));
}

#[test]
fn a_cache_that_keeps_failing_gives_a_bounded_error_naming_path_and_url() {
    let node = Node::new();
    let target = largest("kof/hello");
    node.server
        .add_fault(Fault::new(FaultKind::Stall, nar_file(&target)));
    let start = Instant::now();
    let e = node.fails(&["prefetch", "kof/hello"]);
    assert!(e.contains(&target), "{e}");
    assert!(e.contains(&nar_file(&target)), "{e}");
    // Bounded by read_timeout_secs x download_attempts plus backoff, far below this guard.
    assert!(start.elapsed() < Duration::from_secs(120));
    assert!(!node.stored_paths().contains(&target));
}

#[test]
fn kill_9_mid_prefetch_leaves_nothing_half_visible_and_the_next_run_finishes() {
    let node = Node::new();
    let target = largest("kof/python");
    let file = nar_file(&target);
    node.server
        .add_fault(Fault::new(FaultKind::Stall, file.clone()));
    let mut child = node
        .cmd(&["prefetch", "kof/python"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the stalled download is under way (the others run alongside it).
    let start = Instant::now();
    loop {
        let seen = node
            .server
            .stats()
            .requests_by_path
            .keys()
            .any(|k| k.contains(&file));
        if seen {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "download never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let stored = node.stored_paths();
    assert!(!stored.contains(&target));
    // The interrupted fetch is visible as unfinished fetch state.
    let stats = node.json(&["stats", "--json"]);
    assert!(
        stats["fetches_unfinished"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    // Whatever is visible is complete and exact.
    node.ok(&["verify"]);
    for p in &stored {
        let nar = must(&mut node.cmd(&["dump-nar", p]));
        let expected = manifest().store_paths[p].nar_hash.clone();
        assert_eq!(
            kof_nar::NixHash::digest(&nar).to_nix_string(),
            expected,
            "{p}"
        );
    }
    node.server.clear_faults();
    node.ok(&["prefetch", "kof/python"]);
    assert_eq!(node.stored_paths(), closure_of("kof/python", None));
    node.ok(&["verify"]);
    let stats = node.json(&["stats", "--json"]);
    assert_eq!(stats["fetches_unfinished"], 0);
    assert_eq!(stats["fetches_failed"], 0);
}

#[test]
fn a_cache_for_another_store_directory_is_never_used() {
    let node = Node::new();
    let other = tempfile::tempdir().unwrap();
    std::fs::write(
        other.path().join("nix-cache-info"),
        "StoreDir: /gnu/store\nWantMassQuery: 1\nPriority: 10\n",
    )
    .unwrap();
    let cfg = std::fs::read_to_string(&node.config).unwrap();
    let only_other = cfg
        .lines()
        .map(|l| {
            if l.starts_with("substituters") {
                format!("substituters = [\"file://{}\"]", other.path().display())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&node.config, &only_other).unwrap();
    let e = node.fails(&["prefetch", "kof/hello"]);
    assert!(e.contains("/gnu/store"), "{e}");
    assert!(node.stored_paths().is_empty());
    // Listed before a good cache, it is skipped.
    let both = cfg.replace(
        "substituters = [\"",
        &format!("substituters = [\"file://{}\", \"", other.path().display()),
    );
    std::fs::write(&node.config, both).unwrap();
    node.ok(&["prefetch", "kof/hello"]);
    assert_eq!(node.stored_paths(), closure_of("kof/hello", None));
}
