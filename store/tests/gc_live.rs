//! The live gc (`Store::gc_live`): collecting while another `Store` has the directory open (the
//! FUSE server's reads), and racing this store's own ingests and reads under load.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use kof_nar::{NixHash, StorePath};
use kof_store::{EnvironmentRecord, GcRun, GcTrigger, LiveSet, Store, StoreError};
use parking_lot::Mutex;

fn env(name: &str, generation: u64, closure: &[StorePath]) -> EnvironmentRecord {
    EnvironmentRecord {
        owner: "alice".into(),
        name: name.into(),
        generation,
        system: "x86_64-linux".into(),
        lockfile: format!("{{\"gen\": {generation}}}"),
        vars: BTreeMap::new(),
        hook: None,
        history: serde_json::json!([]),
        roots: closure[..1].to_vec(),
        closure: closure.to_vec(),
        resolved_at: 1_700_000_000,
    }
}

/// A path's NAR: a file of its own and a file every path shares (so objects are shared across
/// generations and only the unshared ones may go).
fn nar_of(tmp: &std::path::Path, name: &str, seed: u64) -> Vec<u8> {
    let d = tmp.join(format!("src-{name}"));
    write(&d.join("own.bin"), &random_bytes(seed, 200_000), false);
    write(&d.join("common.txt"), &text_bytes(99, 150_000), false);
    write(
        &d.join("big.bin"),
        &random_bytes(seed + 1, 1_500_000),
        false,
    );
    nix_dump(&d)
}

fn ingest(store: &Store, name: &str, nar: &[u8], refs: &[StorePath]) -> StorePath {
    let p = store_path(name);
    store
        .ingest_nar(&narinfo(&p, nar, refs), "c", &mut &nar[..])
        .unwrap();
    p
}

#[test]
fn gc_live_runs_beside_another_open_store_and_keeps_the_live_set() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let store = Store::open(&dir).unwrap();
    let base = ingest(&store, "base", &nar_of(tmp.path(), "base", 1), &[]);
    let leased = ingest(
        &store,
        "leased",
        &nar_of(tmp.path(), "leased", 2),
        std::slice::from_ref(&base),
    );
    let idle = ingest(&store, "idle", &nar_of(tmp.path(), "idle", 3), &[]);
    let reading = ingest(&store, "reading", &nar_of(tmp.path(), "reading", 4), &[]);
    let dead = ingest(&store, "dead", &nar_of(tmp.path(), "dead", 5), &[]);
    store
        .put_environment(&env("web", 1, std::slice::from_ref(&leased)))
        .unwrap();
    store
        .put_environment(&env("web", 2, std::slice::from_ref(&idle)))
        .unwrap();

    // A reader elsewhere (the FUSE server) has the store open: the offline gc refuses, the
    // live one runs.
    let reader = Store::open(&dir).unwrap();
    assert!(matches!(store.gc(), Err(StoreError::Busy { .. })));
    let mut calls = 0;
    let report = store
        .gc_live(
            &mut || {
                calls += 1;
                Ok(LiveSet {
                    // Leased (its closure follows References: base stays), idle, and one not
                    // recorded (skipped).
                    generations: vec![
                        ("alice".into(), "web".into(), 1),
                        ("alice".into(), "web".into(), 2),
                        ("alice".into(), "web".into(), 9),
                    ],
                    paths: vec![reading.clone()],
                })
            },
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(calls, 1);
    assert_eq!(report.paths_removed, vec![dead.clone()]);
    assert!(report.objects_removed >= 2, "{report:?}");
    for p in [&base, &leased, &idle, &reading] {
        assert!(reader.has_path(p).unwrap(), "{p} was live");
        let mut out = Vec::new();
        reader.dump_nar(p, &mut out).unwrap();
        assert_eq!(
            NixHash::digest(&out),
            reader.path_info(p).unwrap().unwrap().nar_hash
        );
    }
    assert!(!reader.has_path(&dead).unwrap());
    assert!(reader.verify().unwrap().is_ok());

    // Nothing named: only the roots count (none here).
    let report = store
        .gc_live(&mut || Ok(LiveSet::default()), &mut |_| {})
        .unwrap();
    assert_eq!(report.paths_removed.len(), 4);
    assert!(reader.verify().unwrap().is_ok());
    assert_eq!(reader.stats().unwrap().objects, 0);
}

#[test]
fn gc_runs_are_recorded_and_last_use_survives_a_new_record() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    assert_eq!(store.gc_history().unwrap().runs, 0);
    assert_eq!(store.gc_history().unwrap().last, None);
    let report = store.gc().unwrap();
    store
        .record_gc_run(&GcRun::of(GcTrigger::Manual, 100, &report, 0))
        .unwrap();
    let mut quota = GcRun::of(GcTrigger::Quota, 200, &report, 4096);
    quota.bytes_freed = 10;
    store.record_gc_run(&quota).unwrap();
    let h = store.gc_history().unwrap();
    assert_eq!(h.runs, 2);
    assert_eq!(h.last.as_ref().unwrap().trigger, "quota");
    assert_eq!(h.last.as_ref().unwrap().started_at, 200);
    assert_eq!((h.bytes_freed, h.derived_bytes_freed), (10, 4096));
    assert_eq!(
        h.runs_by_trigger,
        vec![("manual".to_string(), 1), ("quota".to_string(), 1)]
    );
    assert_eq!(GcTrigger::parse("no-space"), Some(GcTrigger::NoSpace));

    let e = env("web", 1, &[store_path("x")]);
    store.put_environment(&e).unwrap();
    assert_eq!(
        store.environment_last_used("alice", "web", 1).unwrap(),
        None
    );
    assert!(store.touch_environment("alice", "web", 1).unwrap());
    assert!(!store.touch_environment("alice", "web", 2).unwrap());
    let used = store.environment_last_used("alice", "web", 1).unwrap();
    assert!(used.is_some());
    // Recording the generation again (a new prepare) keeps its last use.
    store.put_environment(&e).unwrap();
    assert_eq!(
        store.environment_last_used("alice", "web", 1).unwrap(),
        used
    );
    assert_eq!(store.get_environment("alice", "web", 1).unwrap(), Some(e));
}

/// The daemon's use of the store, in miniature: generations are leased (named in the live
/// set) before they are ingested, readers take a lease on a generation before reading it and
/// give it back after, old generations are retired, and gc runs again and again meanwhile.
/// No read fails, no leased path loses an object, and the store verifies clean after.
#[test]
fn gc_live_under_load_never_takes_what_a_lease_or_read_holds() {
    const GENERATIONS: u64 = 12;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let store = Arc::new(Store::open(&dir).unwrap());
    // The shared base every generation references, kept by a pinned root (a kept environment).
    let base = ingest(&store, "base", &nar_of(tmp.path(), "base", 1), &[]);
    store
        .put_environment(&env("base", 1, std::slice::from_ref(&base)))
        .unwrap();
    store.set_root("alice", "base", 1, true).unwrap();

    // Generation g -> (its app path, and how many readers hold it); retired ones take no new
    // readers and stay live only while a reader holds them.
    #[derive(Default)]
    struct Leases {
        open: BTreeMap<u64, StorePath>,
        held: HashMap<u64, usize>,
        retired: BTreeMap<u64, StorePath>,
    }
    let leases = Arc::new(Mutex::new(Leases::default()));
    let expected: Arc<Mutex<HashMap<StorePath, NixHash>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, read_failures, gcs) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(Mutex::new(Vec::<String>::new())),
        Arc::new(AtomicU64::new(0)),
    );

    let live_set = {
        let leases = leases.clone();
        move || {
            let l = leases.lock();
            let mut generations: Vec<(String, String, u64)> = l
                .open
                .keys()
                .map(|g| ("alice".to_string(), "app".to_string(), *g))
                .collect();
            generations.extend(
                l.held
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(g, _)| ("alice".to_string(), "app".to_string(), *g)),
            );
            LiveSet {
                generations,
                paths: vec![],
            }
        }
    };

    let gc = {
        let (store, stop, gcs, live_set) = (store.clone(), stop.clone(), gcs.clone(), live_set);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                store.gc_live(&mut || Ok(live_set()), &mut |_| {}).unwrap();
                gcs.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let mut readers = Vec::new();
    for r in 0..3u64 {
        let (store, stop, leases, expected, reads, failures, base) = (
            store.clone(),
            stop.clone(),
            leases.clone(),
            expected.clone(),
            reads.clone(),
            read_failures.clone(),
            base.clone(),
        );
        readers.push(std::thread::spawn(move || {
            let mut i = r;
            while !stop.load(Ordering::Relaxed) {
                // Take a lease on an open generation (the newest few, round robin).
                let taken = {
                    let mut l = leases.lock();
                    let gens: Vec<(u64, StorePath)> =
                        l.open.iter().map(|(g, p)| (*g, p.clone())).collect();
                    if gens.is_empty() {
                        None
                    } else {
                        let (g, p) = gens[i as usize % gens.len()].clone();
                        *l.held.entry(g).or_default() += 1;
                        Some((g, p))
                    }
                };
                i += 1;
                let Some((g, p)) = taken else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                for path in [&p, &base] {
                    let mut out = Vec::new();
                    let want = expected.lock().get(path).cloned().unwrap();
                    match store.dump_nar(path, &mut out) {
                        Ok(()) if NixHash::digest(&out) == want => {}
                        Ok(()) => failures.lock().push(format!("{path}: wrong bytes")),
                        Err(e) => failures.lock().push(format!("{path}: {e}")),
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                *leases.lock().held.get_mut(&g).unwrap() -= 1;
            }
        }));
    }

    // The writer: lease, ingest and publish each generation, retiring the one three back.
    expected.lock().insert(
        base.clone(),
        store.path_info(&base).unwrap().unwrap().nar_hash,
    );
    let start = Instant::now();
    for g in 1..=GENERATIONS {
        let name = format!("app-{g}");
        let p = store_path(&name);
        store
            .put_environment(&env("app", g, &[p.clone(), base.clone()]))
            .unwrap();
        // Named live before its ingest (a lease's root is set before its fetch).
        let nar = nar_of(tmp.path(), &name, 10 + g);
        {
            let mut l = leases.lock();
            l.held.insert(g, 1);
        }
        ingest(&store, &name, &nar, std::slice::from_ref(&base));
        expected.lock().insert(p.clone(), NixHash::digest(&nar));
        {
            let mut l = leases.lock();
            l.open.insert(g, p);
            *l.held.get_mut(&g).unwrap() -= 1;
            if g > 3 {
                let old = l.open.remove(&(g - 3)).unwrap();
                l.retired.insert(g - 3, old);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let the readers and gc run a little longer on the last generations.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    gc.join().unwrap();
    let failures = read_failures.lock().clone();
    assert!(failures.is_empty(), "reads failed during gc: {failures:?}");
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert!(
        gcs.load(Ordering::Relaxed) >= 5,
        "gc ran {} times",
        gcs.load(Ordering::Relaxed)
    );

    // The open generations and the base are intact; the retired ones go at the next gc.
    let l = leases.lock();
    for p in l.open.values().chain([&base]) {
        assert!(store.has_path(p).unwrap(), "{p} (leased) was removed");
    }
    let live = LiveSet {
        generations: l
            .open
            .keys()
            .map(|g| ("alice".to_string(), "app".to_string(), *g))
            .collect(),
        paths: vec![],
    };
    drop(l);
    let mut told = Vec::new();
    let report = store
        .gc_live(&mut || Ok(live.clone()), &mut |p| told.extend_from_slice(p))
        .unwrap();
    assert_eq!(told, report.paths_removed, "told of every removed path");
    let l = leases.lock();
    for p in l.retired.values() {
        assert!(!store.has_path(p).unwrap(), "{p} (retired) was kept");
    }
    for p in l.open.values().chain([&base]) {
        let mut out = Vec::new();
        store.dump_nar(p, &mut out).unwrap();
        assert_eq!(NixHash::digest(&out), expected.lock()[p]);
    }
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    eprintln!(
        "{GENERATIONS} generations, {} gc runs, {} reads, 0 failed, in {:.2} s",
        gcs.load(Ordering::Relaxed),
        reads.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64()
    );
}
