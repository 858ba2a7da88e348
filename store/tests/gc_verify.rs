//! Environments, roots, garbage collection and verification.

mod common;

use std::collections::BTreeMap;
use std::fs;

use common::*;
use kof_nar::StorePath;
use kof_store::{Codec, CorruptItem, EnvironmentRecord, Store, StoreError};

fn env(
    name: &str,
    generation: u64,
    roots: &[StorePath],
    closure: &[StorePath],
) -> EnvironmentRecord {
    let mut vars = BTreeMap::new();
    vars.insert("GREETING".to_string(), "hello world".to_string());
    EnvironmentRecord {
        owner: "alice".into(),
        name: name.into(),
        generation,
        system: "x86_64-linux".into(),
        lockfile: format!("{{\"lockfile-version\": 1, \"gen\": {generation}}}"),
        vars,
        hook: Some("echo activated".into()),
        history: serde_json::json!([{"generation": generation, "summary": "installed things"}]),
        roots: roots.to_vec(),
        closure: closure.to_vec(),
        resolved_at: 1_700_000_000 + generation as i64,
    }
}

/// Ingests a path with one unique file and one file shared by every path, referencing `refs`.
fn add(store: &Store, tmp: &std::path::Path, name: &str, refs: &[StorePath]) -> StorePath {
    let d = tmp.join(format!("src-{name}"));
    write(
        &d.join("own.bin"),
        &random_bytes(
            name.len() as u64 * 7919 + name.as_bytes()[0] as u64,
            300_000,
        ),
        false,
    );
    write(&d.join("common.txt"), &text_bytes(99, 200_000), false);
    let nar = nix_dump(&d);
    let p = store_path(name);
    store
        .ingest_nar(&narinfo(&p, &nar, refs), "c", &mut &nar[..])
        .unwrap();
    p
}

#[test]
fn environments_and_roots() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let e1 = env(
        "web",
        1,
        &[store_path("a")],
        &[store_path("a"), store_path("b")],
    );
    let e2 = env("web", 2, &[store_path("c")], &[store_path("c")]);
    store.put_environment(&e1).unwrap();
    store.put_environment(&e2).unwrap();
    assert_eq!(
        store.get_environment("alice", "web", 1).unwrap(),
        Some(e1.clone())
    );
    assert_eq!(store.get_environment("alice", "web", 3).unwrap(), None);
    assert_eq!(
        store.list_environments().unwrap(),
        vec![e1.clone(), e2.clone()]
    );
    assert_eq!(store.stats().unwrap().environments, 2);

    assert!(matches!(
        store.set_root("alice", "web", 7, false),
        Err(StoreError::EnvironmentNotFound { generation: 7, .. })
    ));
    store.set_root("alice", "web", 1, false).unwrap();
    store.set_root("alice", "web", 2, false).unwrap();
    let roots = store.roots().unwrap();
    assert_eq!(
        roots.len(),
        1,
        "a live root replaces the previous one: {roots:?}"
    );
    assert_eq!((roots[0].generation, roots[0].pinned), (2, false));
    store.set_root("alice", "web", 1, true).unwrap();
    store.set_root("alice", "web", 2, false).unwrap();
    let gens: Vec<_> = store
        .roots()
        .unwrap()
        .iter()
        .map(|r| (r.generation, r.pinned))
        .collect();
    assert_eq!(gens, vec![(1, true), (2, false)]);
    assert!(store.remove_root("alice", "web", 1).unwrap());
    assert!(!store.remove_root("alice", "web", 1).unwrap());
    assert_eq!(store.roots().unwrap().len(), 1);
}

#[test]
fn gc_keeps_rooted_closures_and_frees_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let store = Store::open(&dir).unwrap();
    // lib <- app (app references lib; the env's recorded closure only names app: gc follows
    // the stored References), and an unrelated path.
    let lib = add(&store, tmp.path(), "lib", &[]);
    let app = add(&store, tmp.path(), "app", &[lib.clone(), store_path("app")]);
    let old = add(&store, tmp.path(), "old", &[]);
    let stats_before = store.stats().unwrap();
    store
        .put_environment(&env(
            "web",
            1,
            std::slice::from_ref(&app),
            std::slice::from_ref(&app),
        ))
        .unwrap();
    store
        .put_environment(&env(
            "web",
            2,
            std::slice::from_ref(&old),
            std::slice::from_ref(&old),
        ))
        .unwrap();
    store.set_root("alice", "web", 1, false).unwrap();

    // Another open Store blocks gc.
    let other = Store::open(&dir).unwrap();
    assert!(matches!(store.gc(), Err(StoreError::Busy { .. })));
    drop(other);

    // An orphan object file and a stale temporary file are cleaned up too.
    let orphan = dir.join("objects/ab").join("ab".repeat(32));
    // (Fan-out directories are made as objects need them: this one may not exist yet.)
    fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    fs::write(&orphan, b"orphan").unwrap();
    fs::write(dir.join("tmp/obj-stale"), b"stale").unwrap();

    let report = store.gc().unwrap();
    assert_eq!(report.paths_removed, vec![old.clone()]);
    assert_eq!(
        report.objects_removed, 1,
        "only old's own file; the common one stays"
    );
    assert_eq!(report.orphans_removed, 1);
    assert!(!orphan.exists());
    assert_eq!(fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
    let stats = store.stats().unwrap();
    assert_eq!(stats.store_paths, 2);
    assert_eq!(
        report.bytes_freed,
        stats_before.stored_bytes - stats.stored_bytes + 6 + 5
    );
    assert!(store.has_path(&lib).unwrap() && store.has_path(&app).unwrap());
    assert!(!store.has_path(&old).unwrap());
    assert!(store.verify().unwrap().is_ok());
    // gc released its exclusive lock: another Store can open, and the store still works.
    drop(Store::open(&dir).unwrap());
    let mut out = Vec::new();
    store.dump_nar(&app, &mut out).unwrap();
    assert!(out == nix_dump(&tmp.path().join("src-app")));

    // Moving the live root to generation 2 makes 1's closure collectable... but 2's path is
    // gone, so everything goes.
    store.set_root("alice", "web", 2, false).unwrap();
    let report = store.gc().unwrap();
    assert_eq!(report.paths_removed, {
        let mut v = vec![app, lib];
        v.sort();
        v
    });
    let stats = store.stats().unwrap();
    assert_eq!(
        (stats.store_paths, stats.objects, stats.stored_bytes),
        (0, 0, 0)
    );
    let left: usize = fs::read_dir(dir.join("objects"))
        .unwrap()
        .map(|d| fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum();
    assert_eq!(left, 0, "no object files left");
    assert_eq!(
        stats.environments, 2,
        "environment records are history, gc keeps them"
    );
}

#[test]
fn verify_names_corrupt_objects_and_their_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let store = Store::open(&dir).unwrap();
    let d = tmp.path().join("src");
    let text = text_bytes(5, 300_000);
    let noise = random_bytes(6, 200_000);
    let big = random_bytes(7, 4 << 20);
    write(&d.join("text"), &text, false);
    write(&d.join("noise"), &noise, false);
    write(&d.join("big"), &big, false);
    let nar = nix_dump(&d);
    let p = store_path("victim");
    store
        .ingest_nar(&narinfo(&p, &nar, &[]), "c", &mut &nar[..])
        .unwrap();
    let other = add(&store, tmp.path(), "bystander", &[]);
    let clean = store.verify().unwrap();
    assert!(clean.is_ok(), "{clean:?}");
    assert!(
        clean.objects_checked >= 6 && clean.files_checked == 1,
        "{clean:?}"
    );

    let text_d = kof_store::Digest::of(&text);
    let noise_d = kof_store::Digest::of(&noise);
    let obj = |d: &kof_store::Digest| dir.join("objects").join(&d.to_hex()[..2]).join(d.to_hex());
    // Flip a byte of a raw object, and damage a compressed one.
    let mut raw = fs::read(obj(&noise_d)).unwrap();
    assert_eq!(raw, noise, "incompressible content is stored raw");
    raw[1000] ^= 1;
    fs::write(obj(&noise_d), &raw).unwrap();
    let mut z = fs::read(obj(&text_d)).unwrap();
    assert!(z.len() < text.len(), "text is stored compressed");
    let mid = z.len() / 2;
    z[mid] ^= 0xff;
    fs::write(obj(&text_d), &z).unwrap();
    let tree = store.tree(&p).unwrap();
    let big_content = tree
        .iter()
        .find_map(|n| match &n.kind {
            kof_store::NodeKind::Regular { content, .. } if n.name == b"big" => Some(*content),
            _ => None,
        })
        .unwrap();
    assert!(big_content.chunked);

    let report = store.verify().unwrap();
    let items: Vec<_> = report.problems.iter().map(|c| c.item.clone()).collect();
    assert!(items.contains(&CorruptItem::Object(noise_d)), "{report:#?}");
    assert!(items.contains(&CorruptItem::Object(text_d)), "{report:#?}");
    assert_eq!(report.problems.len(), 2, "{report:#?}");
    for c in &report.problems {
        assert_eq!(c.store_paths, vec![p.clone()], "{c:?}");
    }
    // Reading the damaged file fails with a typed error rather than returning wrong bytes.
    let mut out = Vec::new();
    assert!(store.dump_nar(&p, &mut out).is_err());
    let mut fine = Vec::new();
    store.dump_nar(&other, &mut fine).unwrap();

    // A missing chunk of the big file: both the object and the file are reported.
    let pieces = store.file_pieces(&big_content).unwrap();
    assert!(pieces.len() > 4, "{pieces:?}");
    assert_eq!(pieces[0].offset, 0);
    assert!(pieces
        .iter()
        .all(|pc| pc.object.codec == Codec::Raw && pc.object.size <= 1 << 20));
    let first_chunk = store.object_path(&pieces[0].object.digest);
    assert_eq!(
        fs::read(&first_chunk).unwrap(),
        big[..pieces[0].object.size as usize]
    );
    fs::remove_file(&first_chunk).unwrap();
    let report = store.verify().unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|c| c.item == CorruptItem::File(big_content.digest)
                && c.store_paths == vec![p.clone()]),
        "{report:#?}"
    );
    assert_eq!(report.problems.len(), 4, "{report:#?}");
}
