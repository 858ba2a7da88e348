//! Real FUSE mounts of view trees (run as root): walking a view with `std::fs`, views side by
//! side, removing views, read errors becoming `EIO`, concurrent readers, executing from the
//! mount, unmounting. Passthrough is off here so every byte goes through `read`.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use kof_fuse::{FuseError, MountOptions};
use support::{dir, inline, is_mounted, pattern, symlink, Fixture};

fn no_passthrough() -> MountOptions {
    MountOptions {
        passthrough: false,
        ..MountOptions::default()
    }
}

fn names(path: &Path) -> BTreeSet<String> {
    fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

#[test]
fn walk_a_view_then_remove_it_and_unmount() {
    let fx = Fixture::new(no_passthrough(), false);
    let doc = pattern(300_000, 1);
    let script = b"#!/bin/sh\necho hi\n".to_vec();
    let sp = "0123456789abcdfghijklmnpqrsvwxyz-hello-1.0";
    let pkg = dir(vec![
        (
            "bin",
            dir(vec![(
                "hello",
                fx.store.file(sp, "bin/hello", &script, true),
            )]),
        ),
        (
            "share",
            dir(vec![
                ("doc.bin", fx.store.file(sp, "share/doc.bin", &doc, false)),
                ("empty", fx.store.file(sp, "share/empty", b"", false)),
                ("link", symlink("doc.bin")),
            ]),
        ),
    ]);
    let view = dir(vec![
        ("nix", dir(vec![("store", dir(vec![(sp, pkg)]))])),
        (
            "etc",
            dir(vec![("passwd", inline(b"root:x:0:0::/root:/bin/sh\n"))]),
        ),
        (
            "bin",
            dir(vec![(
                "hello",
                symlink(&format!("/nix/store/{sp}/bin/hello")),
            )]),
        ),
        ("tmp", dir(vec![])),
    ]);
    fx.m().add_view("v1", view).unwrap();
    assert_eq!(fx.m().views(), vec!["v1".to_owned()]);

    let root = fx.mnt.join("v1");
    let store_dir = root.join("nix/store").join(sp);

    // Metadata first: it must not touch the content source.
    assert_eq!(names(&fx.mnt), BTreeSet::from(["v1".to_owned()]));
    assert_eq!(
        names(&root),
        ["bin", "etc", "nix", "tmp"].map(String::from).into()
    );
    assert_eq!(
        names(&store_dir.join("share")),
        ["doc.bin", "empty", "link"].map(String::from).into()
    );
    assert!(names(&root.join("tmp")).is_empty());
    let m = fs::metadata(&root).unwrap();
    assert!(m.is_dir());
    assert_eq!(m.mode(), 0o40555);
    assert_eq!(m.nlink(), 2 + 4, "four subdirectories");
    assert_eq!((m.uid(), m.gid()), (0, 0));
    let m = fs::metadata(store_dir.join("bin/hello")).unwrap();
    assert_eq!(m.mode(), 0o100555);
    assert_eq!(m.len(), script.len() as u64);
    assert_eq!(m.nlink(), 1);
    assert_eq!(m.modified().unwrap(), UNIX_EPOCH + Duration::from_secs(1));
    let m = fs::metadata(store_dir.join("share/doc.bin")).unwrap();
    assert_eq!(m.mode(), 0o100444);
    assert_eq!(m.len(), doc.len() as u64);
    assert_eq!(m.blocks(), (doc.len() as u64).div_ceil(512));
    let m = fs::metadata(root.join("etc/passwd")).unwrap();
    assert_eq!(m.mode(), 0o100444);
    let m = fs::symlink_metadata(root.join("bin/hello")).unwrap();
    assert!(m.file_type().is_symlink());
    assert_eq!(
        fs::read_link(root.join("bin/hello")).unwrap(),
        Path::new(&format!("/nix/store/{sp}/bin/hello"))
    );
    assert_eq!(
        fs::read_link(store_dir.join("share/link")).unwrap(),
        Path::new("doc.bin")
    );
    let missing = fs::metadata(root.join("etc/shadow")).unwrap_err();
    assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
    // Twice: the second answer may come from the kernel's negative entry cache.
    assert!(fs::metadata(root.join("etc/shadow")).is_err());
    assert_eq!(fx.source.reads(), 0, "metadata operations read no content");

    // Contents.
    assert_eq!(fs::read(store_dir.join("share/doc.bin")).unwrap(), doc);
    assert_eq!(fs::read(store_dir.join("bin/hello")).unwrap(), script);
    assert_eq!(fs::read(store_dir.join("share/link")).unwrap(), doc);
    assert_eq!(fs::read(store_dir.join("share/empty")).unwrap(), b"");
    assert_eq!(
        fs::read(root.join("etc/passwd")).unwrap(),
        b"root:x:0:0::/root:/bin/sh\n"
    );
    assert!(fx.source.reads() > 0, "store bytes come from the source");
    // Read-only.
    let err = fs::OpenOptions::new()
        .write(true)
        .open(root.join("etc/passwd"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));

    // Stats cover the operations done.
    let stats = fx.m().op_stats();
    for op in ["lookup", "getattr", "readdir", "open", "read", "readlink"] {
        let s = &stats.ops[op];
        assert!(s.count > 0, "{op} counted");
        assert_eq!(s.buckets.last().unwrap().1, s.count);
    }

    // Removal: the view vanishes from the root and from path lookups.
    assert!(fx.m().remove_view("v1"));
    assert!(!fx.m().remove_view("v1"));
    assert!(fx.m().views().is_empty());
    assert!(names(&fx.mnt).is_empty());
    assert_eq!(
        fs::metadata(root.join("etc/passwd")).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );

    fx.unmount();
}

#[test]
fn two_views_side_by_side_share_store_files() {
    let fx = Fixture::new(no_passthrough(), false);
    let lib = pattern(100_000, 7);
    let shared_lib = fx.store.file("aaa-lib", "lib/libx.so", &lib, false);
    let a = dir(vec![
        ("lib", dir(vec![("libx.so", shared_lib.clone())])),
        ("etc", dir(vec![("hostname", inline(b"a\n"))])),
    ]);
    let b = dir(vec![
        ("lib", dir(vec![("libx.so", shared_lib)])),
        ("etc", dir(vec![("hostname", inline(b"b\n"))])),
        ("only-b", dir(vec![])),
    ]);
    fx.m().add_view("a", a).unwrap();
    fx.m().add_view("b", b).unwrap();
    assert_eq!(fx.m().views(), vec!["a".to_owned(), "b".to_owned()]);
    assert_eq!(names(&fx.mnt), ["a", "b"].map(String::from).into());
    assert_eq!(fs::read(fx.mnt.join("a/etc/hostname")).unwrap(), b"a\n");
    assert_eq!(fs::read(fx.mnt.join("b/etc/hostname")).unwrap(), b"b\n");
    assert!(!fx.mnt.join("a/only-b").exists());
    assert!(fx.mnt.join("b/only-b").is_dir());

    // The store file is one inode in both views; directories are not shared.
    let ia = fs::metadata(fx.mnt.join("a/lib/libx.so")).unwrap();
    let ib = fs::metadata(fx.mnt.join("b/lib/libx.so")).unwrap();
    assert_eq!(ia.ino(), ib.ino());
    let da = fs::metadata(fx.mnt.join("a/lib")).unwrap();
    let db = fs::metadata(fx.mnt.join("b/lib")).unwrap();
    assert_ne!(da.ino(), db.ino());
    assert_eq!(fs::read(fx.mnt.join("a/lib/libx.so")).unwrap(), lib);
    let reads = fx.source.reads();
    // Same inode, page cache kept: the second view's read is served from the cache.
    assert_eq!(fs::read(fx.mnt.join("b/lib/libx.so")).unwrap(), lib);
    assert_eq!(fx.source.reads(), reads, "shared page cache");

    // Removing one view leaves the other whole, its shared file included.
    assert!(fx.m().remove_view("a"));
    assert!(!fx.mnt.join("a").exists());
    assert_eq!(fs::read(fx.mnt.join("b/lib/libx.so")).unwrap(), lib);
    assert_eq!(fs::read(fx.mnt.join("b/etc/hostname")).unwrap(), b"b\n");
    // A view of the same name can come back with other content.
    fx.m()
        .add_view("a", dir(vec![("new", inline(b"again"))]))
        .unwrap();
    assert_eq!(fs::read(fx.mnt.join("a/new")).unwrap(), b"again");
    assert!(!fx.mnt.join("a/etc").exists());
    fx.unmount();
}

#[test]
fn add_view_rejects_bad_names_duplicates_and_non_directories() {
    let fx = Fixture::new(no_passthrough(), false);
    for bad in ["", ".", "..", "a/b", "nul\0"] {
        let err = fx.m().add_view(bad, dir(vec![])).unwrap_err();
        assert!(
            matches!(err, FuseError::InvalidViewName { .. }),
            "{bad:?}: {err}"
        );
    }
    fx.m().add_view("x", dir(vec![])).unwrap();
    let err = fx.m().add_view("x", dir(vec![])).unwrap_err();
    assert!(matches!(err, FuseError::ViewExists { .. }), "{err}");
    assert!(err.to_string().contains(fx.mnt.to_str().unwrap()));
    let err = fx.m().add_view("y", inline(b"file")).unwrap_err();
    assert!(
        matches!(err, FuseError::ViewRootNotDirectory { .. }),
        "{err}"
    );
    assert_eq!(fx.m().views(), vec!["x".to_owned()]);
    fx.unmount();
}

#[test]
fn failing_source_gives_eio_and_the_mount_stays_usable() {
    let fx = Fixture::new(no_passthrough(), false);
    let good = pattern(10_000, 3);
    let view = dir(vec![
        // Its bytes are not on disk: the source's read fails (ENOENT from the real open).
        ("broken", fx.store.missing_file("bbb-gone", "data", 5000)),
        ("good", fx.store.file("ccc-ok", "data", &good, false)),
    ]);
    fx.m().add_view("v", view).unwrap();
    let mut f = fs::File::open(fx.mnt.join("v/broken")).unwrap();
    let mut buf = Vec::new();
    let err = f.read_to_end(&mut buf).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(fx.source.reads() > 0);
    // Metadata and other files keep working.
    assert_eq!(fs::metadata(fx.mnt.join("v/broken")).unwrap().len(), 5000);
    assert_eq!(fs::read(fx.mnt.join("v/good")).unwrap(), good);
    // The failure is not cached: the next reader gets EIO again from a new source call.
    let before = fx.source.reads();
    let err = fs::read(fx.mnt.join("v/broken")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert!(fx.source.reads() > before);
    drop(f);
    fx.unmount();
}

#[test]
fn sixteen_threads_read_one_file() {
    let fx = Fixture::new(no_passthrough(), false);
    let data = Arc::new(pattern(8 << 20, 11));
    fx.m()
        .add_view(
            "v",
            dir(vec![("big", fx.store.file("ddd-big", "big", &data, false))]),
        )
        .unwrap();
    let path = fx.mnt.join("v/big");
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let path = path.clone();
            let data = data.clone();
            std::thread::spawn(move || {
                // Each reader starts at a different place and reads everything.
                let mut f = fs::File::open(&path).unwrap();
                let start = (i * 512 * 1024) % data.len();
                let mut got = vec![0u8; data.len()];
                use std::os::unix::fs::FileExt;
                f.read_exact_at(&mut got[start..], start as u64).unwrap();
                f.read_exact(&mut got[..start]).unwrap();
                assert!(got == *data, "reader {i} got wrong bytes");
            })
        })
        .collect();
    for t in threads {
        t.join().expect("reader thread");
    }
    assert!(fx.source.reads() > 0);
    fx.unmount();
}

#[test]
fn executes_programs_from_the_mount() {
    let fx = Fixture::new(no_passthrough(), false);
    let script = b"#!/bin/sh\necho \"hello from kof: $1\"\n";
    // A dynamically linked host binary: its interpreter and libraries are found on the host.
    let echo = fs::read("/bin/echo").unwrap();
    let view = dir(vec![(
        "bin",
        dir(vec![
            (
                "hello",
                fx.store.file("eee-hello", "bin/hello", script, true),
            ),
            (
                "echo",
                fx.store.file("fff-coreutils", "bin/echo", &echo, true),
            ),
            (
                "noexec",
                fx.store.file("eee-hello", "bin/noexec", script, false),
            ),
        ]),
    )]);
    fx.m().add_view("v", view).unwrap();
    let out = std::process::Command::new(fx.mnt.join("v/bin/hello"))
        .arg("x")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"hello from kof: x\n");
    let out = std::process::Command::new(fx.mnt.join("v/bin/echo"))
        .arg("binary")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"binary\n");
    // Another user (containers run as any uid): allow_other and the 0555/0444 modes let it in.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(fx.mnt.join("v/bin/hello"))
        .arg("nobody")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"hello from kof: nobody\n");
    let err = std::process::Command::new(fx.mnt.join("v/bin/noexec"))
        .output()
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    fx.unmount();
}

#[test]
fn unmount_while_busy_detaches_and_drop_unmounts() {
    let mut fx = Fixture::new(no_passthrough(), false);
    let data = pattern(50_000, 5);
    fx.m()
        .add_view(
            "v",
            dir(vec![("f", fx.store.file("ggg-f", "f", &data, false))]),
        )
        .unwrap();
    // An open file keeps the mount busy: unmount falls back to a lazy detach, and the open
    // file stays readable.
    let mut open = fs::File::open(fx.mnt.join("v/f")).unwrap();
    let mnt = fx.mnt.clone();
    fx.mounted.take().unwrap().unmount().expect("lazy unmount");
    assert!(!is_mounted(&mnt));
    let mut got = Vec::new();
    open.read_to_end(&mut got).unwrap();
    assert_eq!(got, data);
    drop(open);

    // Drop unmounts too.
    let fx2 = Fixture::new(no_passthrough(), false);
    let mnt2 = fx2.mnt.clone();
    assert!(is_mounted(&mnt2));
    let m = fs::metadata(&mnt2).unwrap();
    assert_eq!(m.mode(), 0o40555);
    assert_eq!(m.permissions().mode() & 0o777, 0o555);
    drop(fx2);
    assert!(!is_mounted(&mnt2));
}

#[test]
fn unmount_after_an_external_umount_succeeds() {
    let mut fx = Fixture::new(no_passthrough(), false);
    let mnt = fx.mnt.clone();
    let status = std::process::Command::new("umount")
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(!is_mounted(&mnt));
    fx.mounted
        .take()
        .unwrap()
        .unmount()
        .expect("unmount after external umount");
    assert!(!is_mounted(&mnt));
}

#[test]
fn the_kernel_caches_view_metadata_including_absent_names() {
    use std::os::fd::AsRawFd;
    let fx = Fixture::new(no_passthrough(), false);
    let view = dir(vec![(
        "etc",
        dir(vec![
            ("hosts", inline(b"127.0.0.1 localhost\n")),
            ("localtime", symlink("/usr/share/zoneinfo/UTC")),
        ]),
    )]);
    fx.m().add_view("v", view).unwrap();
    // Paths through an open descriptor of the view's root, so the walk does not pass the mount
    // root, whose entries have a short timeout on purpose.
    let root = fs::File::open(fx.mnt.join("v")).unwrap();
    let base = std::path::PathBuf::from(format!("/proc/self/fd/{}", root.as_raw_fd()));
    let walk = || {
        assert_eq!(fs::metadata(base.join("etc/hosts")).unwrap().len(), 20);
        assert_eq!(
            fs::read_link(base.join("etc/localtime")).unwrap(),
            Path::new("/usr/share/zoneinfo/UTC")
        );
        let err = fs::metadata(base.join("etc/missing")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        assert_eq!(
            names(&base.join("etc")),
            ["hosts", "localtime"].map(String::from).into()
        );
    };
    walk();
    let first = fx.m().op_stats();
    walk();
    let second = fx.m().op_stats();
    // Listings are cached too (FOPEN_CACHE_DIR), but the kernel drops that cache on its own
    // terms, so readdir is not asserted here.
    // (getattr may not be needed at all: lookup replies carry the attributes.)
    for op in ["lookup", "readlink"] {
        assert!(first.ops[op].count > 0, "{op} seen on the first walk");
    }
    for op in ["lookup", "getattr", "readlink"] {
        assert_eq!(
            first.ops[op].count, second.ops[op].count,
            "{op}: the second walk is answered by the kernel's caches"
        );
    }
    drop(root);
    fx.unmount();
}

#[test]
fn xattrs_ioctls_and_close_have_definite_answers() {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    let fx = Fixture::new(no_passthrough(), false);
    let bytes = pattern(4096, 9);
    let view = dir(vec![("f", fx.store.file("ddd-x", "f", &bytes, false))]);
    fx.m().add_view("v", view).unwrap();
    let path = CString::new(fx.mnt.join("v/f").as_os_str().as_encoded_bytes()).unwrap();
    let name = CString::new("user.anything").unwrap();
    let mut buf = [0u8; 64];
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 64) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENODATA)
    );
    // SAFETY: as above.
    let r = unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), 64) };
    assert_eq!(r, 0, "no attributes listed");
    let f = fs::File::open(fx.mnt.join("v/f")).unwrap();
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one long into `flags`.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENOTTY)
    );
    // close(2) sends FLUSH: it must succeed, not fail with ENOSYS.
    // SAFETY: the fd is ours and closed once (into_raw_fd gives up ownership).
    let r = unsafe { libc::close(std::os::fd::IntoRawFd::into_raw_fd(f)) };
    assert_eq!(r, 0);
    fx.unmount();
}

#[test]
fn a_view_looked_up_before_it_was_added_appears_when_added() {
    let fx = Fixture::new(no_passthrough(), false);
    let bytes = pattern(1000, 4);
    // The kernel is told the name is absent, and may cache that absence.
    let err = fs::metadata(fx.mnt.join("later/f")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    let view = dir(vec![("f", fx.store.file("eee-y", "f", &bytes, false))]);
    fx.m().add_view("later", view).unwrap();
    // At once, not after some cache timeout.
    assert_eq!(fs::read(fx.mnt.join("later/f")).unwrap(), bytes);
    fx.unmount();
}
