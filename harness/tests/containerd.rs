//! The private containerd itself: it starts, runs containers with runc through `ctr`, finds the
//! flox shim on its PATH, and its Drop leaves no process, mount or file behind. Each test runs
//! against every containerd release of the matrix (`bookworm::*`, `trixie::*`, `sid::*`; see
//! `kof_harness::release`). Needs root and containerd/runc installed, and the newer releases
//! fetched (`scripts/fetch-containerd.sh`; a missing one is skipped, loudly).

mod support;

use std::path::Path;
use std::process::Stdio;

use kof_harness::containerd::{
    mounts_under, Containerd, ContainerdOptions, Release, CRI_NAMESPACE,
};

fn ctr_output(cmd: &mut std::process::Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn options(release: Release) -> ContainerdOptions {
    ContainerdOptions {
        release,
        ..Default::default()
    }
}

kof_harness::for_each_release!(
    starts_with_its_config_and_drop_removes_everything,
    ctr_run_with_a_busybox_rootfs_prints_its_output,
    flox_runtime_is_found_on_containerds_path,
    drop_kills_running_containers_and_unmounts_their_rootfs,
);

fn starts_with_its_config_and_drop_removes_everything(release: Release) {
    let ctrd = Containerd::start(options(release)).unwrap();
    assert_eq!(ctrd.release(), release);
    let dir = ctrd.dir().to_owned();
    assert!(ctrd.socket().starts_with(&dir) && ctrd.root().starts_with(&dir));
    let version = ctr_output(ctrd.ctr("default").arg("version"));
    assert!(version.contains("Server:"), "{version}");
    // The server is the release asked for: its upstream version is in the Debian one.
    let server = version.split("Server:").nth(1).unwrap();
    let upstream = release.version().unwrap();
    let upstream = upstream.split(['~', '+']).next().unwrap();
    assert!(server.contains(upstream), "{release} {upstream}: {version}");
    // The CRI plugin loaded (it is what the pods need) with our settings.
    let plugins = ctr_output(ctrd.ctr("default").args(["plugins", "ls"]));
    let cri = plugins
        .lines()
        .find(|l| l.contains("io.containerd.grpc.v1") && l.split_whitespace().nth(1) == Some("cri"))
        .expect("cri plugin listed");
    assert!(cri.trim_end().ends_with("ok"), "{cri}");
    let config = std::fs::read_to_string(ctrd.config_path()).unwrap();
    assert!(config.contains("restrict_oom_score_adj = true"));
    assert!(
        !config.contains("runtimes.flox"),
        "no flox runtime without a shim"
    );
    assert!(ctrd.log().contains("containerd successfully booted"));
    drop(ctrd);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(mounts_under(&dir).is_empty());
}

fn ctr_run_with_a_busybox_rootfs_prints_its_output(release: Release) {
    let work = tempfile::tempdir().unwrap();
    let rootfs = support::busybox_rootfs(work.path());
    let ctrd = Containerd::start(options(release)).unwrap();
    let out = ctr_output(
        ctrd.ctr("default")
            .args(["run", "--rm", "--rootfs"])
            .arg(&rootfs)
            .args([
                "kof-echo",
                "/bin/sh",
                "-c",
                "echo hello from $(cat /proc/1/comm)",
            ]),
    );
    assert_eq!(out.trim_end(), "hello from sh");
    // --rm removed the container: no shim, no task left.
    assert!(ctrd.shim_pids().is_empty(), "{:?}", ctrd.shim_pids());
    assert_eq!(
        ctr_output(ctrd.ctr("default").args(["containers", "ls", "-q"])),
        ""
    );
}

fn flox_runtime_is_found_on_containerds_path(release: Release) {
    // Stand in for containerd-shim-flox-v2 with the release's runc shim itself: what is under
    // test is that `--runtime io.containerd.flox.v2` resolves to the binary we gave.
    let work = tempfile::tempdir().unwrap();
    let rootfs = support::busybox_rootfs(work.path());
    let shim = work.path().join("shim-copy");
    std::fs::copy(release.runc_shim(), &shim).unwrap();
    let ctrd = Containerd::start(ContainerdOptions {
        flox_shim: Some(shim.clone()),
        ..options(release)
    })
    .unwrap();
    let link = ctrd.dir().join("bin/containerd-shim-flox-v2");
    assert_eq!(std::fs::read_link(&link).unwrap(), shim);
    let config = std::fs::read_to_string(ctrd.config_path()).unwrap();
    assert!(config.contains(&format!("runtime_path = \"{}\"", shim.display())));
    assert!(config.contains(r#"pod_annotations = [ "flox.dev/*" ]"#));
    let out = ctr_output(
        ctrd.ctr("default")
            .args([
                "run",
                "--rm",
                "--runtime",
                "io.containerd.flox.v2",
                "--rootfs",
            ])
            .arg(&rootfs)
            .args(["kof-flox", "/bin/echo", "via flox runtime"]),
    );
    assert_eq!(out.trim_end(), "via flox runtime");
    // A missing runtime binary is an error, so the run above really went through the link.
    std::fs::remove_file(&link).unwrap();
    let failed = ctrd
        .ctr("default")
        .args([
            "run",
            "--rm",
            "--runtime",
            "io.containerd.flox.v2",
            "--rootfs",
        ])
        .arg(&rootfs)
        .args(["kof-flox2", "/bin/true"])
        .output()
        .unwrap();
    assert!(!failed.status.success());
}

fn drop_kills_running_containers_and_unmounts_their_rootfs(release: Release) {
    let work = tempfile::tempdir().unwrap();
    let ctrd = Containerd::start(options(release)).unwrap();
    support::import_test_images(&ctrd, work.path());
    // A detached container from an image: an overlay rootfs mounted under the state dir, a shim
    // and a container process that would outlive containerd.
    ctr_output(ctrd.ctr(CRI_NAMESPACE).args([
        "run",
        "-d",
        "docker.io/kof/busybox:1",
        "kof-left-running",
        "/bin/sleep",
        "100000",
    ]));
    let dir = ctrd.dir().to_owned();
    let socket = ctrd.socket().to_owned();
    let shims = ctrd.shim_pids();
    assert!(!shims.is_empty(), "a shim runs the detached container");
    // containerd started the release's runc shim, found first on its PATH.
    for pid in &shims {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert_eq!(
            exe,
            release.runc_shim().canonicalize().unwrap(),
            "{release}"
        );
    }
    let rootfs_mounts: Vec<_> = ctrd
        .mounts()
        .into_iter()
        .filter(|m| m.ends_with("kof-left-running/rootfs"))
        .collect();
    assert_eq!(rootfs_mounts.len(), 1, "{:?}", ctrd.mounts());
    let container_pids = children_of(&shims);
    assert!(!container_pids.is_empty());

    drop(ctrd);
    assert!(support::shims_of(&socket).is_empty());
    for pid in container_pids.iter().chain(&shims) {
        assert!(!alive(*pid), "pid {pid} survived");
    }
    assert!(mounts_under(&dir).is_empty(), "{:?}", mounts_under(&dir));
    assert!(!dir.exists());
}

fn children_of(parents: &[i32]) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let after = &stat[stat.rfind(')').unwrap() + 1..];
        let ppid: i32 = after.split_whitespace().nth(1).unwrap().parse().unwrap();
        if parents.contains(&ppid) {
            out.push(pid);
        }
    }
    out
}

fn alive(pid: i32) -> bool {
    let stat = format!("/proc/{pid}/stat");
    match std::fs::read_to_string(Path::new(&stat)) {
        Ok(s) => !matches!(
            s[s.rfind(')').unwrap() + 1..].split_whitespace().next(),
            Some("Z") | Some("X")
        ),
        Err(_) => false,
    }
}
