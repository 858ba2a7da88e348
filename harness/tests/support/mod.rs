//! Shared pieces of the harness's own tests: a busybox rootfs and a containerd with the test
//! images imported into CRI's namespace.
#![allow(dead_code)]

use std::path::Path;

use kof_harness::containerd::{Containerd, ContainerdOptions, CRI_NAMESPACE};
use kof_harness::images::{self, ImageConfig};

pub const BUSYBOX_IMAGE: &str = "kof/busybox:1";
pub const EMPTY_IMAGE: &str = "flox/empty:1.0.0";

/// A rootfs holding the static busybox and applet links for the commands the tests use.
pub use kof_testkit::busybox_rootfs;

/// Writes the pause, empty and busybox images and imports them for CRI.
pub fn import_test_images(ctrd: &Containerd, work: &Path) {
    let pause = work.join("pause.tar");
    images::write_pause_image(&pause, &ContainerdOptions::default().sandbox_image).unwrap();
    let empty = work.join("empty.tar");
    images::write_empty_image(&empty, EMPTY_IMAGE).unwrap();
    let busybox = work.join("busybox.tar");
    let rootfs = busybox_rootfs(work);
    images::write_dir_image(&busybox, BUSYBOX_IMAGE, &rootfs, &ImageConfig::default()).unwrap();
    for archive in [pause, empty, busybox] {
        ctrd.import_image(CRI_NAMESPACE, &archive).unwrap();
    }
}

/// PIDs of processes whose argv has `-address <socket>` (the shims of that containerd).
pub fn shims_of(socket: &Path) -> Vec<i32> {
    kof_harness::containerd::shim_pids_for(socket)
}
