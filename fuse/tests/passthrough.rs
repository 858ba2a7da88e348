//! FUSE passthrough on a real mount (needs a kernel with it, 6.9+, and root): files whose bytes
//! are local are served by the kernel from the backing file, so the content source's `read` is
//! never called for them; the fallback when no backing file exists; and an inode open in cached
//! mode when its file becomes local.
//!
//! Passthrough is detected by the source's read counter: with passthrough the kernel reads the
//! backing file itself and never sends FUSE `read` requests.

mod support;

use std::fs;
use std::io::Read;
use std::sync::atomic::Ordering;

use kof_fuse::MountOptions;
use support::{dir, pattern, Fixture};

/// Maps `path` read-only and returns a copy of its bytes, through `mmap(2)` (no crate here maps
/// files, and the test must exercise the kernel's mmap path of the FUSE file).
fn mmap_read(path: &std::path::Path, len: usize) -> Vec<u8> {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(path).unwrap();
    // SAFETY: a fresh private read-only mapping of an open file, unmapped before returning;
    // the slice is only used while mapped.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        let copy = std::slice::from_raw_parts(p as *const u8, len).to_vec();
        assert_eq!(libc::munmap(p, len), 0);
        copy
    }
}

#[test]
fn local_files_are_served_by_passthrough() {
    let fx = Fixture::new(MountOptions::default(), true);
    let data = pattern(3 << 20, 21);
    let script = b"#!/bin/sh\necho passthrough-exec\n";
    let view = dir(vec![
        ("data", fx.store.file("hhh-data", "data", &data, false)),
        ("run", fx.store.file("hhh-data", "run", script, true)),
    ]);
    fx.m().add_view("v", view).unwrap();
    let path = fx.mnt.join("v/data");
    assert_eq!(fs::read(&path).unwrap(), data);
    assert_eq!(mmap_read(&path, data.len()), data);
    // Two handles at once share the inode's backing id.
    let mut a = fs::File::open(&path).unwrap();
    let mut b = fs::File::open(&path).unwrap();
    let (mut ga, mut gb) = (Vec::new(), Vec::new());
    a.read_to_end(&mut ga).unwrap();
    b.read_to_end(&mut gb).unwrap();
    assert!(ga == data && gb == data);
    drop((a, b));
    let out = std::process::Command::new(fx.mnt.join("v/run"))
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"passthrough-exec\n", "{out:?}");
    assert!(fx.source.backing_calls.load(Ordering::SeqCst) >= 1);
    assert_eq!(
        fx.source.reads(),
        0,
        "every read served by the kernel from the backing file"
    );
    fx.unmount();
}

#[test]
fn without_backing_file_reads_go_through_fuse() {
    // Passthrough wanted but the source has no local file: normal reads.
    let fx = Fixture::new(MountOptions::default(), false);
    let data = pattern(1 << 20, 22);
    fx.m()
        .add_view(
            "v",
            dir(vec![("d", fx.store.file("iii-d", "d", &data, false))]),
        )
        .unwrap();
    let path = fx.mnt.join("v/d");
    assert_eq!(fs::read(&path).unwrap(), data);
    assert_eq!(mmap_read(&path, data.len()), data);
    assert!(fx.source.backing_calls.load(Ordering::SeqCst) >= 1);
    assert!(fx.source.reads() > 0);
    fx.unmount();
}

#[test]
fn passthrough_off_never_asks_for_backing_files() {
    let fx = Fixture::new(
        MountOptions {
            passthrough: false,
            ..MountOptions::default()
        },
        true,
    );
    let data = pattern(200_000, 23);
    fx.m()
        .add_view(
            "v",
            dir(vec![("d", fx.store.file("jjj-d", "d", &data, false))]),
        )
        .unwrap();
    assert_eq!(fs::read(fx.mnt.join("v/d")).unwrap(), data);
    assert_eq!(fx.source.backing_calls.load(Ordering::SeqCst), 0);
    assert!(fx.source.reads() > 0);
    fx.unmount();
}

#[test]
fn a_file_becoming_local_while_open_in_cached_mode() {
    let fx = Fixture::new(MountOptions::default(), false);
    let data = pattern(2 << 20, 24);
    fx.m()
        .add_view(
            "v",
            dir(vec![("d", fx.store.file("kkk-d", "d", &data, false))]),
        )
        .unwrap();
    let path = fx.mnt.join("v/d");
    // Opened while not local: cached mode.
    let mut cached = fs::File::open(&path).unwrap();
    let mut first = vec![0u8; 4096];
    cached.read_exact(&mut first).unwrap();
    assert_eq!(first, data[..4096]);
    // Now local, but the inode is open in cached mode: the kernel would refuse a passthrough
    // open of it, so this one must be cached too, and work.
    fx.source.backing.store(true, Ordering::SeqCst);
    let mut second = fs::File::open(&path).unwrap();
    let mut got = Vec::new();
    second.read_to_end(&mut got).unwrap();
    assert_eq!(got, data);
    drop((cached, second));
    // Release is asynchronous: wait until the file system has seen both releases, observable
    // as the next open being served by passthrough. Opens after that read nothing through FUSE.
    // Drop the page cache of the inode first, or a cached-mode open would be served from it.
    let mut attempts = 0;
    loop {
        let mut f = fs::File::open(&path).unwrap();
        let mut got = Vec::new();
        // POSIX_FADV_DONTNEED drops clean cached pages, so a cached-mode read has to come
        // back to the source and a passthrough one does not.
        use std::os::fd::AsRawFd;
        // SAFETY: plain advice call on an open descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let reads = fx.source.reads();
        f.read_to_end(&mut got).unwrap();
        assert_eq!(got, data);
        if fx.source.reads() == reads {
            break;
        }
        attempts += 1;
        assert!(
            attempts < 100,
            "passthrough never resumed after the cached opens closed"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    fx.unmount();
}
