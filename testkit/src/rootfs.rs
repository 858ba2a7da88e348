//! Container roots for the shim's and the harness's tests.

use std::path::{Path, PathBuf};

/// The static busybox of Debian's `busybox-static`.
const BUSYBOX: &str = "/bin/busybox";

/// A real image's root under `dir` (`dir/busybox-rootfs`): the static busybox as
/// `/bin/busybox`, applet links for the commands the tests run (`sh`, `echo`, `cat`, `sleep`,
/// `ls`, `true`), and a marker file `/etc/image-marker` ("from the image").
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("busybox-rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::copy(BUSYBOX, root.join("bin/busybox"))
        .unwrap_or_else(|e| panic!("copying {BUSYBOX}: {e}"));
    for applet in ["sh", "echo", "cat", "sleep", "ls", "true"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("etc/image-marker"), "from the image\n").unwrap();
    root
}
