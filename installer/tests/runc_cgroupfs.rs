//! The premise of the installer's warning for containerd 1.6 on systemd-cgroup nodes, shown
//! with the real runc: the flox runtime's 1.6 form carries no `SystemdCgroup`, so runc uses its
//! cgroupfs driver, and that driver takes the kubelet's systemd-style `cgroupsPath`
//! (`slice:prefix:name`, which containerd's CRI writes whenever the pod's parent is a
//! `.slice`) as one plain directory name under runc's own cgroup, outside the pod's slice.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A root file system holding `/bin/sleep` and the libraries `ldd` names for it.
fn sleep_rootfs(root: &Path) {
    let ldd = run(Command::new("ldd").arg("/bin/sleep"));
    let mut files = vec!["/bin/sleep".to_string()];
    files.extend(
        ldd.split_whitespace()
            .filter(|w| w.starts_with('/'))
            .map(str::to_string),
    );
    for f in files {
        let dest = root.join(f.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&f, &dest).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    std::fs::create_dir_all(root.join("proc")).unwrap();
}

#[test]
fn cgroupfs_runc_takes_a_systemd_cgroups_path_as_one_directory() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    sleep_rootfs(&bundle.join("rootfs"));
    run(Command::new("runc").arg("spec").current_dir(&bundle));
    let config_path = bundle.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    let id = format!("kof-cgtest-{}", std::process::id());
    let cgroups_path = format!("kubepods-besteffort-podtest.slice:cri-containerd:{id}");
    config["root"] = json!({"path": "rootfs", "readonly": true});
    config["process"]["args"] = json!(["/bin/sleep", "30"]);
    config["process"]["terminal"] = json!(false);
    config.as_object_mut().unwrap().remove("hostname");
    config["mounts"] = json!([{"destination": "/proc", "type": "proc", "source": "proc"}]);
    config["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "mount"}]);
    config["linux"]["cgroupsPath"] = json!(cgroups_path);
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();

    let state = dir.path().join("state");
    let runc = || {
        let mut c = Command::new("runc");
        c.arg("--root").arg(&state);
        c
    };
    // No --systemd-cgroup: the cgroupfs driver, as the runc shim uses it without options.
    // --no-pivot: the test may itself run where pivot_root is refused.
    // The container's stdio is not a pipe of ours: a detached container keeps it open.
    let log = std::fs::File::create(dir.path().join("runc.log")).unwrap();
    let started = runc()
        .args(["run", "--no-pivot", "--detach", &id])
        .current_dir(&bundle)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap();
    assert!(
        started.success(),
        "runc run: {}",
        std::fs::read_to_string(dir.path().join("runc.log")).unwrap()
    );
    let status: Value = serde_json::from_str(&run(runc().args(["state", &id]))).unwrap();
    let pid = status["pid"].as_u64().unwrap();
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    run(runc().args(["delete", "--force", &id]));

    // Each hierarchy's path: runc's own (this test's) cgroup, then the whole cgroupsPath as
    // one directory, colons included; not kubepods.slice/.../kubepods-besteffort-podtest.slice.
    let path_of = |text: &str, line: &str| -> Option<String> {
        let controllers = line.split(':').nth(1)?;
        text.lines()
            .find(|l| l.split(':').nth(1) == Some(controllers))
            .map(|l| l.splitn(3, ':').nth(2).unwrap().to_string())
    };
    let mut checked = 0;
    for line in cgroups.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap();
        let Some(parent) = path_of(&own, line) else {
            continue;
        };
        if line.split(':').nth(1) == Some("") && path == parent {
            continue; // a cgroup v2 hierarchy next to v1 ones, which runc does not use
        }
        let expected = Path::new(&parent).join(&cgroups_path);
        assert_eq!(Path::new(path), expected, "{line}\n{cgroups}");
        checked += 1;
    }
    assert!(checked > 0, "{cgroups}");
}
