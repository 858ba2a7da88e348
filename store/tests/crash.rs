//! Crash safety: a process ingesting paths is killed with SIGKILL at an arbitrary point; the
//! store it leaves must show only complete paths, and recover fully.
//!
//! The test re-runs its own test binary as the child (the `#[ignore]`d
//! `child_ingests_until_killed`, which does nothing unless the parent set its environment).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use kof_store::Store;

const PATHS: usize = 8;

fn path_name(i: usize) -> String {
    format!("crash-{i}")
}

fn make_nars(dir: &Path) -> Vec<Vec<u8>> {
    (0..PATHS)
        .map(|i| {
            let d = dir.join(format!("src{i}"));
            write(&d.join("big"), &random_bytes(i as u64, 3 << 20), false);
            write(&d.join("text"), &text_bytes(100 + i as u64, 500_000), false);
            for j in 0..50 {
                write(
                    &d.join(format!("small/{j}")),
                    format!("{i}-{j}").as_bytes(),
                    false,
                );
            }
            let nar = nix_dump(&d);
            fs::write(dir.join(format!("{i}.nar")), &nar).unwrap();
            nar
        })
        .collect()
}

#[test]
#[ignore = "helper: run by kill_9_mid_ingest_leaves_only_complete_paths as a child process"]
fn child_ingests_until_killed() {
    let Ok(work) = std::env::var("KOF_STORE_CRASH_WORK") else {
        return;
    };
    let work = PathBuf::from(work);
    let store = Store::open(&work.join("store")).unwrap();
    for round in 0.. {
        for i in 0..PATHS {
            let nar = fs::read(work.join(format!("{i}.nar"))).unwrap();
            let info = narinfo(&store_path(&format!("{}-{round}", path_name(i))), &nar, &[]);
            store.ingest_nar(&info, "c", &mut &nar[..]).unwrap();
            fs::write(work.join(format!("done-{round}-{i}")), b"").unwrap();
        }
    }
}

#[test]
fn kill_9_mid_ingest_leaves_only_complete_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let nars = make_nars(work);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_ingests_until_killed",
            "--ignored",
            "--nocapture",
        ])
        .env("KOF_STORE_CRASH_WORK", work)
        .spawn()
        .unwrap();
    // Wait until a few paths are in, then kill the child wherever it is.
    let marker = work.join("done-0-2");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !marker.exists() {
        assert!(child.try_wait().unwrap().is_none(), "child exited early");
        assert!(Instant::now() < deadline, "child made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let store = Store::open(&work.join("store")).unwrap();
    // An interrupted writer leaves only `.tmp-*` files beside the objects (gc removes them,
    // checked at the end); every other name in the fan-out directories is a digest.
    for d in fs::read_dir(work.join("store/objects")).unwrap() {
        for f in fs::read_dir(d.unwrap().path()).unwrap() {
            let name = f.unwrap().file_name().into_string().unwrap();
            assert!(
                name.starts_with(".tmp-") || kof_store::Digest::from_hex(&name).is_some(),
                "unexpected object file {name}"
            );
        }
    }
    let listed = store.list_paths().unwrap();
    assert!(listed.len() >= 3, "the paths reported done are visible");
    for info in &listed {
        let i: usize = info
            .store_path
            .name()
            .split('-')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let mut out = Vec::new();
        store.dump_nar(&info.store_path, &mut out).unwrap();
        assert!(out == nars[i], "{} is complete and exact", info.store_path);
    }
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:#?}");

    // Everything can be (re-)ingested afterwards.
    for (i, nar) in nars.iter().enumerate() {
        let info = narinfo(&store_path(&format!("{}-0", path_name(i))), nar, &[]);
        store.ingest_nar(&info, "c", &mut &nar[..]).unwrap();
    }
    assert!(store.list_paths().unwrap().len() >= PATHS);
    // gc (no roots) removes every path and any orphan the kill left; nothing stays on disk.
    store.gc().unwrap();
    let left: usize = fs::read_dir(work.join("store/objects"))
        .unwrap()
        .map(|d| fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum();
    assert_eq!(left, 0);
}
