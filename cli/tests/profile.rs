//! `kof-store profile export|import` through the real binary: a profile moves between stores,
//! and a hostile one is refused with a message naming what is wrong.

use std::path::Path;
use std::process::{Command, Output};

fn kof_store(store: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kof-store"))
        .env_remove("KOF_CONFIG")
        .env_remove("KOF_STORE")
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .unwrap()
}

const PROFILE: &str = r#"{"version":1,"key":"kof/python","ranges":[
  {"store_path":"8abgz9hd6fmaqrj7z5y8vlaya54ym6y4-python3-3.11.2","start":0,"end":4096},
  {"store_path":"r3cfwss46p94mpif9imp1nwikqypqjcs-glibc-2.36","start":512,"end":70000}]}"#;

#[test]
fn a_profile_moves_between_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let file = tmp.path().join("in.json");
    std::fs::write(&file, PROFILE).unwrap();

    let out = kof_store(&a, &["profile", "import", file.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let msg = String::from_utf8(out.stdout).unwrap();
    assert!(
        msg.contains("kof/python") && msg.contains("2 ranges"),
        "{msg}"
    );
    assert!(a.join("profiles/kof/python.json").is_file());

    // Export from a, to a file and to stdout; import the file on b.
    let exported = tmp.path().join("out.json");
    let out = kof_store(
        &a,
        &[
            "profile",
            "export",
            "kof/python",
            "-o",
            exported.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let stdout = kof_store(&a, &["profile", "export", "kof/python"]).stdout;
    let parsed: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    let original: serde_json::Value = serde_json::from_str(PROFILE).unwrap();
    assert_eq!(parsed, original);
    let out = kof_store(&b, &["profile", "import", exported.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let on_b = kof_store(&b, &["profile", "export", "kof/python"]).stdout;
    assert_eq!(on_b, stdout);
}

#[test]
fn hostile_or_missing_profiles_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("s");
    for (bad, names) in [
        (PROFILE.replace("\"end\":4096", "\"end\":0"), "range"),
        (PROFILE.replace("kof/python", "../../etc"), "owner/name"),
        (
            PROFILE.replace("8abgz9hd6fmaqrj7z5y8vlaya54ym6y4-", "../"),
            "store path",
        ),
        ("{not json".to_string(), "profile"),
    ] {
        let file = tmp.path().join("bad.json");
        std::fs::write(&file, &bad).unwrap();
        let out = kof_store(&store, &["profile", "import", file.to_str().unwrap()]);
        assert!(!out.status.success(), "{bad}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.starts_with("kof-store: ") && err.contains(names),
            "{err}"
        );
    }
    assert!(!store.join("profiles").join("kof").exists());
    let out = kof_store(&store, &["profile", "export", "kof/python"]);
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("no profile saved for kof/python"));
}
