//! Garbage collection on a live node, end to end: the real `kof-fetcherd` and its FUSE server,
//! the fixture FloxHub and signed caches over HTTP on loopback. gc runs while views are read,
//! prepared, released and fetched into, and by quota over a sequence of generations.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, metrics, sample, Node, NodeOptions};
use kof_nar::StorePath;
use kof_store::Store;
use kof_testkit::{closure_of, staged};
use parking_lot::Mutex;

fn store_path(abs: &str) -> StorePath {
    StorePath::from_base_name(abs.trim_start_matches("/nix/store/")).unwrap()
}

/// Reads every regular file of `path` through the view at `view_root` and compares it with the
/// staged tree: the bytes read, or what differed.
fn read_through_view(view_root: &Path, path: &str) -> Result<u64, String> {
    fn walk(view: &Path, reference: &Path, bytes: &mut u64) -> Result<(), String> {
        let meta = std::fs::symlink_metadata(reference).map_err(|e| e.to_string())?;
        if meta.is_dir() {
            for e in std::fs::read_dir(reference).map_err(|e| e.to_string())? {
                let name = e.map_err(|e| e.to_string())?.file_name();
                walk(&view.join(&name), &reference.join(&name), bytes)?;
            }
        } else if meta.is_file() {
            let got =
                std::fs::read(view).map_err(|e| format!("reading {}: {e}", view.display()))?;
            let want = std::fs::read(reference).unwrap();
            if got != want {
                return Err(format!("{}: wrong bytes", view.display()));
            }
            *bytes += got.len() as u64;
        }
        Ok(())
    }
    let mut bytes = 0;
    walk(
        &view_root.join(path.trim_start_matches('/')),
        &staged(path),
        &mut bytes,
    )?;
    Ok(bytes)
}

fn node(port: u16, extra_config: &str) -> Node {
    Node::new(NodeOptions {
        flavour: "published",
        prefetch: "closure",
        metrics_port: Some(port),
        extra_config: extra_config.into(),
        prefix: "kof-fetcherd-gc",
        ..NodeOptions::default()
    })
}

/// Waits (up to 180 s) until every path of `closure` is stored.
fn wait_stored(store: &Store, closure: &[String], node: &Node) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let missing: Vec<&String> = closure
            .iter()
            .filter(|p| !store.has_path(&store_path(p)).unwrap())
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not stored after 180 s: {missing:?}\n{}",
            node.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// gc runs again and again (with and without derived data) while two readers read a leased
/// view's every file, and another thread prepares, reads and releases leases of other
/// generations (demand reads, and the background prefetch's ingests): no read fails, the leased
/// closure stays whole, the released generations go, and the store verifies clean.
#[test]
fn gc_races_prepare_reads_and_ingest_without_a_failed_read() {
    let port = free_port();
    let node = node(port, "idle_view_secs = 0\n");
    let mut c = node.client();
    let steady = closure_of("kof/hello", Some(2));
    let p = c.prepare("kof/hello:2", "steady", None).unwrap();
    let view_root = p.view_root.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let (reads, bytes, gcs, churns) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut threads = Vec::new();
    for r in 0..2usize {
        let (stop, failures, reads, bytes, steady, view_root) = (
            stop.clone(),
            failures.clone(),
            reads.clone(),
            bytes.clone(),
            steady.clone(),
            view_root.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut i = r;
            while !stop.load(Ordering::Relaxed) {
                let path = &steady[i % steady.len()];
                i += 1;
                match read_through_view(&view_root, path) {
                    Ok(n) => {
                        bytes.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) => failures.lock().push(e),
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    {
        let (stop, failures, churns, socket) = (
            stop.clone(),
            failures.clone(),
            churns.clone(),
            node.socket(),
        );
        threads.push(std::thread::spawn(move || {
            let mut c = kof_node_api::api::Client::connect(&socket).unwrap();
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let generation = 1 + i % 5;
                let lease = format!("churn-{i}");
                i += 1;
                let p = match c.prepare(&format!("kof/dedup:{generation}"), &lease, None) {
                    Ok(p) => p,
                    Err(e) => {
                        failures.lock().push(format!("prepare {lease}: {e}"));
                        continue;
                    }
                };
                for path in closure_of("kof/dedup", Some(generation)).iter().take(3) {
                    if let Err(e) = read_through_view(&p.view_root, path) {
                        failures.lock().push(format!("lease {lease}: {e}"));
                    }
                }
                if let Err(e) = c.release(&lease) {
                    failures.lock().push(format!("release {lease}: {e}"));
                }
                churns.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    {
        let (stop, failures, gcs, socket) =
            (stop.clone(), failures.clone(), gcs.clone(), node.socket());
        threads.push(std::thread::spawn(move || {
            let mut c = kof_node_api::api::Client::connect(&socket).unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match c.gc(i % 2 == 1) {
                    Ok(done) => assert_eq!(done.trigger, "manual"),
                    Err(e) => failures.lock().push(format!("gc: {e}")),
                }
                i += 1;
                gcs.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline
        && (churns.load(Ordering::Relaxed) < 10 || gcs.load(Ordering::Relaxed) < 10)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let failed = failures.lock().clone();
    assert!(
        failed.is_empty(),
        "failures during gc: {failed:?}\n{}",
        node.logs()
    );
    assert!(churns.load(Ordering::Relaxed) >= 10, "{}", node.logs());
    assert!(gcs.load(Ordering::Relaxed) >= 10, "{}", node.logs());
    eprintln!(
        "{} gc runs, {} leases prepared and released, {} path reads ({} MB) through the view, 0 failed",
        gcs.load(Ordering::Relaxed),
        churns.load(Ordering::Relaxed),
        reads.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed) >> 20
    );

    // The leased closure is whole once its prefetch is done, and reads the same.
    let store = Store::open(&node.store_dir()).unwrap();
    wait_stored(&store, &steady, &node);
    // The released generations' own paths go (a prefetch of theirs may still be finishing:
    // collect until they are gone).
    let only_dedup: Vec<String> = (1..=5)
        .flat_map(|g| closure_of("kof/dedup", Some(g)))
        .filter(|p| !steady.contains(p))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        c.gc(true).unwrap();
        let left: Vec<&String> = only_dedup
            .iter()
            .filter(|p| store.has_path(&store_path(p)).unwrap())
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "released paths kept: {left:?}\n{}",
            node.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for path in &steady {
        assert!(store.has_path(&store_path(path)).unwrap(), "{path} lost");
        read_through_view(&view_root, path).unwrap();
    }
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    let closure_rule = store.check_closure_rule().unwrap();
    assert!(closure_rule.is_empty(), "{closure_rule:?}");

    // Reported: the runs in the store and in the metrics.
    let history = store.gc_history().unwrap();
    assert!(history.runs > gcs.load(Ordering::Relaxed), "{history:?}");
    assert_eq!(history.last.as_ref().unwrap().trigger, "manual");
    let text = metrics(port);
    assert!(sample(&text, "kof_gc_runs_total{trigger=\"manual\"}") >= 10.0);
    assert!(sample(&text, "kof_gc_last_run_timestamp_seconds") > 0.0);
    assert!(sample(&text, "kof_gc_duration_seconds_count") >= 10.0);
    assert!(sample(&text, "kof_gc_bytes_freed_total") > 0.0);
    assert!(sample(&text, "kof_store_bytes") > 0.0);
}

/// A quota (`store_max_bytes`) just above one leased generation: over a sequence of generations
/// each prepared (and fetched whole), then released, the store comes back under the limit
/// (idle views and their closures evicted, least recently used first) while the leased
/// generation stays whole and readable.
#[test]
fn quota_keeps_the_store_under_its_limit_while_leased_generations_stay() {
    let port = free_port();
    let mut node = node(port, "idle_view_secs = 3600\n");
    let store = Store::open(&node.store_dir()).unwrap();
    let kept = closure_of("kof/hello", Some(2));
    let p = node.client().prepare("kof/hello:2", "kept", None).unwrap();
    wait_stored(&store, &kept, &node);
    let base = sample(&metrics(port), "kof_store_bytes") as u64;
    // The quota: the leased generation and a little room (metadata, raw copies).
    let max = base + (4 << 20);
    node.daemon.take().unwrap().stop().unwrap();
    let mut config = std::fs::read_to_string(&node.config).unwrap();
    config.push_str(&format!("store_max_bytes = {max}\n"));
    std::fs::write(&node.config, config).unwrap();
    node.start_daemon();
    let mut c = node.client();

    let sequence: Vec<(&str, u32)> = vec![
        ("kof/dedup", 1),
        ("kof/dedup", 2),
        ("kof/dedup", 3),
        ("kof/dedup", 4),
        ("kof/dedup", 5),
        ("kof/rollback", 1),
        ("kof/rollback", 2),
        ("kof/rollback", 3),
        ("kof/legacy", 2),
        ("kof/tools", 1),
        ("kof/hello", 1),
    ];
    let mut peak = 0u64;
    for (i, (env, generation)) in sequence.iter().enumerate() {
        let lease = format!("gen-{i}");
        let q = c
            .prepare(&format!("{env}:{generation}"), &lease, None)
            .unwrap();
        let closure = closure_of(env, Some(*generation));
        wait_stored(&store, &closure, &node);
        // While leased, its closure stays whatever the quota says.
        for path in closure.iter().take(2) {
            read_through_view(&q.view_root, path).unwrap();
        }
        peak = peak.max(sample(&metrics(port), "kof_store_bytes") as u64);
        c.release(&lease).unwrap();
        // Released, it is evictable: the store comes back under its limit.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = sample(&metrics(port), "kof_store_bytes") as u64;
            if now <= max {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "after {env}:{generation} the store stays at {now} bytes, over {max}\n{}",
                node.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        for path in &kept {
            assert!(
                store.has_path(&store_path(path)).unwrap(),
                "{path} of the leased generation lost after {env}:{generation}"
            );
        }
    }
    for path in &kept {
        read_through_view(&p.view_root, path).unwrap();
    }
    let text = metrics(port);
    let quota_runs = sample(&text, "kof_gc_runs_total{trigger=\"quota\"}");
    assert!(quota_runs >= 1.0, "{text}");
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    let history = store.gc_history().unwrap();
    eprintln!(
        "quota {max} bytes (leased generation {base}); peak {peak}; {} generations; {quota_runs} quota runs freed {} + {} derived bytes",
        sequence.len(),
        history.bytes_freed,
        history.derived_bytes_freed
    );
    assert!(
        peak > max,
        "the sequence never went over the quota: the test proves nothing"
    );
}
