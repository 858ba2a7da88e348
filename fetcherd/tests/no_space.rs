//! A node whose store's file system fills up (issue 13, item 5): the real `kof-fetcherd` and
//! its FUSE server, the fixture FloxHub and published cache over loopback, and a store on a
//! small tmpfs the test mounts (as root) and fills with a filler file.
//!
//! While the disk is full, a reader of a view reads every byte of the stored files it shows;
//! a demand read that needs a range not yet fetched fails with EIO (that read only: the
//! verified chunk cannot be written, and the engine serves no byte it has not written, see
//! "A full file system" in the lazy engine's module doc), and the daemon's log names the
//! cause; a prepare whose lease record cannot be written fails and leaves no record. Once the
//! filler is deleted, the same read succeeds: the time from freeing the space to its first
//! successful read is printed ("time to recover after ENOSPC"). The store verifies clean.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kof_testkit::{closure_of, fill_file_system, staged, Node, NodeOptions, Tmpfs};

/// Every regular file under `dir`, relative to it.
fn files_under(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir.join(rel)).unwrap() {
        let e = e.unwrap();
        let r = rel.join(e.file_name());
        let t = e.file_type().unwrap();
        if t.is_dir() {
            files_under(dir, &r, out);
        } else if t.is_file() {
            out.push(r);
        }
    }
}

/// Reads `file` whole through a fresh open.
fn read_whole(file: &Path) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    fs::File::open(file)?.read_to_end(&mut v)?;
    Ok(v)
}

#[test]
fn a_full_disk_keeps_stored_files_readable_and_fails_only_new_ranges() {
    let mut node = Node::new(NodeOptions {
        flavour: "published",
        start_daemon: false,
        prefix: "kof-test-nospace",
        ..NodeOptions::default()
    });
    // The store's own file system: big enough for kof/tools stored and some of python.
    let fs_guard = Tmpfs::mount(&node.store_dir(), "96m");
    node.start_daemon();
    let store_dir = node.store_dir();
    let mut c = node.client();

    // kof/tools is stored (prefetched); kof/python's python3 path is not (its view is
    // metadata only, with prefetch off).
    c.prefetch("kof/tools", None).unwrap();
    let tools = c.prepare("kof/tools", "c1", None).unwrap();
    let python = c.prepare("kof/python", "c2", None).unwrap();
    let python3 = closure_of("kof/python", None)
        .into_iter()
        .find(|p| p.contains("-python3-"))
        .unwrap();
    let py_file = python
        .view_root
        .join(python3.trim_start_matches('/'))
        .join("bin/python3.11");
    let py_want = fs::read(staged(&python3).join("bin/python3.11")).unwrap();

    let filled = fill_file_system(&store_dir.join("filler"));
    eprintln!("filler: {filled} bytes; the store's file system is full");

    // Every stored file of the tools view reads back whole, while the disk is full.
    let mut checked = (0usize, 0u64);
    for p in closure_of("kof/tools", None) {
        let src = staged(&p);
        let mut files = Vec::new();
        files_under(&src, Path::new(""), &mut files);
        for rel in files {
            let want = fs::read(src.join(&rel)).unwrap();
            let via = tools.view_root.join(p.trim_start_matches('/')).join(&rel);
            let got = read_whole(&via).unwrap_or_else(|e| {
                panic!(
                    "reading stored {} on a full disk: {e}\n{}",
                    via.display(),
                    node.logs()
                )
            });
            assert!(got == want, "{} differs", via.display());
            checked.0 += 1;
            checked.1 += got.len() as u64;
        }
    }
    eprintln!(
        "read {} stored files ({} bytes) through the view on a full disk",
        checked.0, checked.1
    );
    assert!(checked.0 > 10, "{checked:?}");

    // A demand read of a range not fetched yet: EIO for that read, the cause in the log.
    let e = read_whole(&py_file).expect_err("a new range cannot be written on a full disk");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let logs = node.logs();
    assert!(
        logs.contains("file system full"),
        "the daemon's log names the cause:\n{logs}"
    );

    // A prepare on a full disk fails (on its environment record, SQLite's `SQLITE_FULL`, or
    // on its lease record) with the cause, leaving no lease and no record.
    let e = c
        .prepare("kof/tools", "c3", None)
        .expect_err("no space for the prepare's records");
    let msg = e.to_string();
    eprintln!("prepare on a full disk: {msg}");
    assert!(
        msg.contains("file system full")
            || msg.contains("No space left on device")
            || msg.contains("database or disk is full"),
        "{msg}"
    );
    let leases: Vec<String> = c.leases().unwrap().into_iter().map(|l| l.lease).collect();
    assert_eq!(leases, vec!["c1".to_string(), "c2".to_string()]);
    let names: Vec<String> = fs::read_dir(store_dir.join("leases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".tmp-")) && !names.contains(&"c3.json".into()),
        "{names:?}"
    );

    // Space again: the same read succeeds at once.
    let t0 = Instant::now();
    fs::remove_file(store_dir.join("filler")).unwrap();
    let mut attempts = 0;
    let got = loop {
        attempts += 1;
        match read_whole(&py_file) {
            Ok(v) => break v,
            Err(e) if t0.elapsed() < Duration::from_secs(60) => {
                eprintln!("read after freeing space failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("no recovery within 60 s: {e}\n{}", node.logs()),
        }
    };
    let recovered = t0.elapsed();
    assert!(got == py_want, "python3.11 differs after recovery");
    eprintln!(
        "time to recover after ENOSPC (from freeing space to the first successful demand read \
         of a {} byte file through the view, {attempts} attempt(s)): {:.1} ms",
        got.len(),
        recovered.as_secs_f64() * 1e3
    );

    // The store is consistent: every object and chunked file re-hashes.
    let store = kof_store::Store::open(&store_dir).unwrap();
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    drop(store);

    // The daemon and its FUSE server first, then the tmpfs, then the node's directory.
    drop(c);
    drop(node.daemon.take());
    drop(fs_guard);
    drop(node);
}
