//! A writable overlay over a view, as `kof-store run` and containers use it: the view is the
//! lower layer, with passthrough on. This is why passthrough declares a stack depth of 1: an
//! overlay over a mount of depth 2 would exceed the kernel's limit and fail to mount.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use kof_fuse::MountOptions;
use support::{dir, inline, is_mounted, pattern, Fixture};

/// Unmounts the overlay when dropped, also on panic.
struct OverlayGuard(PathBuf);

impl Drop for OverlayGuard {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
}

fn mount_overlay(lower: &Path, work: &Path) -> OverlayGuard {
    let (upper, ovl_work, merged) = (work.join("upper"), work.join("work"), work.join("merged"));
    for d in [&upper, &ovl_work, &merged] {
        fs::create_dir(d).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        ovl_work.display()
    );
    let out = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&merged)
        .output()
        .unwrap();
    assert!(out.status.success(), "overlay mount: {out:?}");
    OverlayGuard(merged)
}

#[test]
fn overlay_over_a_passthrough_view() {
    let fx = Fixture::new(MountOptions::default(), true);
    let lib = pattern(1 << 20, 31);
    let script = b"#!/bin/sh\necho from-overlay\n";
    let view = dir(vec![
        (
            "lib",
            dir(vec![(
                "libz.so",
                fx.store.file("lll-z", "lib/libz.so", &lib, false),
            )]),
        ),
        (
            "bin",
            dir(vec![(
                "run",
                fx.store.file("lll-z", "bin/run", script, true),
            )]),
        ),
        (
            "etc",
            dir(vec![("hosts", inline(b"127.0.0.1 localhost\n"))]),
        ),
    ]);
    fx.m().add_view("v", view).unwrap();
    let work = tempfile::tempdir().unwrap();
    let overlay = mount_overlay(&fx.mnt.join("v"), work.path());
    let merged = overlay.0.clone();

    assert_eq!(fs::read(merged.join("lib/libz.so")).unwrap(), lib);
    let out = Command::new(merged.join("bin/run")).output().unwrap();
    assert_eq!(out.stdout, b"from-overlay\n", "{out:?}");
    // Writes land in the upper layer; the view stays untouched.
    fs::write(merged.join("etc/hosts"), b"changed\n").unwrap();
    assert_eq!(fs::read(merged.join("etc/hosts")).unwrap(), b"changed\n");
    assert_eq!(
        fs::read(fx.mnt.join("v/etc/hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    assert_eq!(
        fx.source.reads(),
        0,
        "store files served by passthrough under the overlay"
    );

    drop(overlay);
    assert!(!is_mounted(&merged));
    fx.unmount();
}
