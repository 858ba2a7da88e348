//! Binaries of other packages (a package's tests get only their own package's binaries).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The `kof-fetcherd` binary of this build: `kof-fetcherd` in the profile directory of the
/// running test (`target/<profile>/`), brought up to date once per process by
/// `cargo build -p kof-fetcherd` (a no-op when it is fresh; `--release` for a release test).
pub fn fetcherd_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test's own path");
        // target/<profile>/deps/<test> (or target/<profile>/<bench>).
        let mut profile_dir = exe.parent().expect("the test's directory").to_path_buf();
        if profile_dir.file_name().is_some_and(|n| n == "deps") {
            profile_dir.pop();
        }
        let target_dir = profile_dir.parent().expect("the target directory");
        let mut c = Command::new(env!("CARGO"));
        c.args(["build", "-q", "-p", "kof-fetcherd", "--bin", "kof-fetcherd"])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            c.arg("--release");
        }
        let out = c.output().unwrap_or_else(|e| panic!("running {c:?}: {e}"));
        assert!(
            out.status.success(),
            "building kof-fetcherd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        profile_dir.join("kof-fetcherd")
    })
    .clone()
}
