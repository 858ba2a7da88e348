//! The shim driven the way kubelet drives containerd: CRI over gRPC (RunPodSandbox with runtime
//! handler `flox`, CreateContainer, StartContainer, ExecSync, StopContainer, RemoveContainer,
//! StopPodSandbox, RemovePodSandbox) against a real containerd whose `flox` runtime is
//! registered as Flox documents it (`runtime_path`, `pod_annotations = ["flox.dev/*"]`), with
//! a locally built pause image and a `flox/empty`-style placeholder image.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Node, NodeOptions, Release};
use kof_harness::containerd::{CRI_NAMESPACE, DEFAULT_SANDBOX_IMAGE};
use kof_harness::cri::{ContainerSpec, CriClient, Mount, PodSpec};
use kof_harness::cri_log::{read_cri_log, wait_for_line, LogLine};
use kof_harness::images::{self, ImageConfig};
use kof_testkit::{busybox_rootfs, fixtures};

kof_harness::for_each_release!(
    a_pod_runs_in_its_environment_through_cri,
    skipped_containers_of_a_pod_run_as_plain_runc,
    a_failing_environment_fails_the_container_start_with_its_name_and_cause,
    a_private_environment_uses_the_pods_token_which_is_never_logged,
    two_pods_of_one_environment_share_one_fetch_of_each_object,
    execs_of_a_container_named_in_skip_containers_exec_run_unmodified,
    a_pods_containers_run_the_generation_live_when_the_pod_started,
);

const ENV: &str = "flox.dev/environment";
const EMPTY_IMAGE: &str = "docker.io/flox/empty:1.0.0";
const BUSYBOX_IMAGE: &str = "docker.io/kof/busybox:1";
const LOG_WAIT: Duration = Duration::from_secs(120);

/// A node with the pause, placeholder and busybox images imported for CRI.
fn cri_node(release: Release) -> (Node, CriClient) {
    let node = Node::new(NodeOptions::on(release));
    let dir = node.dir().join("images");
    std::fs::create_dir_all(&dir).unwrap();
    images::write_pause_image(&dir.join("pause.tar"), DEFAULT_SANDBOX_IMAGE).unwrap();
    images::write_empty_image(&dir.join("empty.tar"), EMPTY_IMAGE).unwrap();
    let bb = busybox_rootfs(node.dir());
    images::write_dir_image(
        &dir.join("busybox.tar"),
        BUSYBOX_IMAGE,
        &bb,
        &ImageConfig {
            cmd: vec!["/bin/sh".into()],
            env: vec!["PATH=/bin".into()],
            ..ImageConfig::default()
        },
    )
    .unwrap();
    for img in ["pause.tar", "empty.tar", "busybox.tar"] {
        node.ctrd()
            .import_image(CRI_NAMESPACE, &dir.join(img))
            .unwrap();
    }
    let cri = CriClient::connect(node.ctrd().socket()).unwrap();
    (node, cri)
}

fn pod(node: &Node, name: &str, annotations: &[(&str, &str)]) -> PodSpec {
    let mut p = PodSpec::new(name, &node.dir().join("pods").join(name));
    p.runtime_handler = "flox".into();
    p.annotations = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<HashMap<_, _>>();
    p
}

fn log_of(p: &PodSpec, c: &ContainerSpec) -> PathBuf {
    p.log_directory.join(&c.log_path)
}

fn wait_line(node: &Node, path: &Path, want: &str) -> LogLine {
    wait_for_line(path, |l| l.line.contains(want), LOG_WAIT)
        .unwrap_or_else(|e| panic!("{want:?} in {}: {e}\n{}", path.display(), node.logs()))
}

/// `ExecSync` of `cmd` in container `id`: its stdout (trimmed) and stderr; panics with both
/// unless it exits 0.
fn exec_ok(cri: &CriClient, id: &str, cmd: &[&str]) -> (String, String) {
    let r = cri.exec_sync(id, cmd, Duration::from_secs(60)).unwrap();
    let out = String::from_utf8_lossy(&r.stdout).trim().to_string();
    let err = String::from_utf8_lossy(&r.stderr).into_owned();
    assert_eq!(r.exit_code, 0, "{cmd:?}: {out} {err}");
    (out, err)
}

/// Stops and removes everything of `sandbox`, then checks that nothing is left.
fn tear_down(node: &Node, cri: &CriClient, sandbox: &str, containers: &[String]) {
    for c in containers {
        cri.stop_container(c, 5).unwrap();
        cri.remove_container(c).unwrap();
    }
    cri.stop_pod_sandbox(sandbox).unwrap();
    cri.remove_pod_sandbox(sandbox).unwrap();
    let start = std::time::Instant::now();
    while !node.leases().is_empty() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    node.assert_no_leftovers();
}

fn a_pod_runs_in_its_environment_through_cri(release: Release) {
    let (node, cri) = cri_node(release);
    let p = pod(&node, "py", &[(ENV, "kof/python")]);
    let sandbox = cri.run_pod_sandbox(&p).unwrap();
    // The pause container is not an environment container.
    assert!(node.leases().is_empty());
    // Its creation told the daemon that a pod of kof/python is starting: the live generation
    // is resolved for the pod while the sandbox starts...
    node.wait_for("the pod's resolution", || {
        node.logs().contains("resolved for a starting pod")
    });

    let mut c = ContainerSpec::new("app", EMPTY_IMAGE);
    c.command = vec!["sh".into(), "-c".into()];
    c.args = vec![
        "echo \"greeting=$KOF_GREETING hook=$KOF_HOOK_RAN pod=$POD_VAR\"; \
         python3 -c 'print(\"answer\", 6*7)'; exec sleep 600"
            .into(),
    ];
    c.envs = vec![("POD_VAR".into(), "from-the-pod".into())];
    let id = cri.create_container(&sandbox, &c, &p).unwrap();
    cri.start_container(&id)
        .unwrap_or_else(|e| panic!("{e}\n{}", node.logs()));
    let log = log_of(&p, &c);
    wait_line(&node, &log, "answer 42");
    let lines = read_cri_log(&log).unwrap();
    let text: Vec<&str> = lines.iter().map(|l| l.line.as_str()).collect();
    assert!(
        text.contains(&"greeting=hello from kof/python hook=1 pod=from-the-pod"),
        "{text:?}"
    );
    // The hook's output is the container's stderr, as in Flox.
    assert!(
        lines.iter().any(|l| l.line.contains("python env activated")
            && l.stream == kof_harness::cri_log::Stream::Stderr),
        "{text:?}"
    );
    let leases = node.leases();
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0].env, "kof/python");
    // ... and the container took it, without a FloxHub round trip of its own.
    assert!(
        node.logs().contains("the pod's resolution"),
        "{}",
        node.logs()
    );

    // Exec: into the environment's root, with its programs on the default PATH.
    let (out, _) = exec_ok(
        &cri,
        &id,
        &["sh", "-c", "python3 -c 'print(1+1)'; test -d /nix/store"],
    );
    assert_eq!(out, "2");
    // The exec runs activated, as `flox activate -- CMD` would: the environment's vars and
    // hook over the container's own environment.
    let (out, err) = exec_ok(
        &cri,
        &id,
        &[
            "sh",
            "-c",
            "echo \"$FLOX_ENV|$KOF_GREETING|$KOF_HOOK_RAN|$POD_VAR\"",
        ],
    );
    let fields: Vec<&str> = out.split('|').collect();
    assert!(fields[0].contains("-flox-env-python"), "{out}");
    assert_eq!(
        &fields[1..],
        ["hello from kof/python", "1", "from-the-pod"],
        "{out}"
    );
    assert!(
        err.contains("python env activated"),
        "the hook's output: {err}"
    );
    tear_down(&node, &cri, &sandbox, &[id]);
}

fn skipped_containers_of_a_pod_run_as_plain_runc(release: Release) {
    let (node, cri) = cri_node(release);
    let p = pod(
        &node,
        "mixed",
        &[(ENV, "kof/hello"), ("flox.dev/skip-containers", "sidecar")],
    );
    let sandbox = cri.run_pod_sandbox(&p).unwrap();
    let mut app = ContainerSpec::new("app", EMPTY_IMAGE);
    app.command = vec![
        "sh".into(),
        "-c".into(),
        "echo app-env=$FLOX_ENV; exec sleep 600".into(),
    ];
    let mut side = ContainerSpec::new("sidecar", BUSYBOX_IMAGE);
    side.command = vec![
        "/bin/sh".into(),
        "-c".into(),
        "cat /etc/image-marker; echo sidecar-env=[$FLOX_ENV]; exec sleep 600".into(),
    ];
    let app_id = cri.create_container(&sandbox, &app, &p).unwrap();
    let side_id = cri.create_container(&sandbox, &side, &p).unwrap();
    cri.start_container(&app_id).unwrap();
    cri.start_container(&side_id).unwrap();
    let line = wait_line(&node, &log_of(&p, &app), "app-env=");
    assert!(line.line.contains("-flox-env-hello"), "{line:?}");
    wait_line(&node, &log_of(&p, &side), "from the image");
    wait_line(&node, &log_of(&p, &side), "sidecar-env=[]");
    assert_eq!(node.leases().len(), 1);
    // One shim for the pod, as containerd groups it: kof's proxy and the runc shim behind it.
    let mut exes: Vec<String> = node
        .ctrd()
        .shim_pids()
        .into_iter()
        .map(|pid| {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
            exe.file_name().unwrap().to_string_lossy().into_owned()
        })
        .collect();
    exes.sort();
    assert_eq!(
        exes,
        ["containerd-shim-flox-v2", "containerd-shim-runc-v2"],
        "{}",
        node.logs()
    );
    tear_down(&node, &cri, &sandbox, &[app_id, side_id]);
}

fn a_failing_environment_fails_the_container_start_with_its_name_and_cause(release: Release) {
    let (node, cri) = cri_node(release);
    let p = pod(&node, "bad", &[(ENV, "kof/nope")]);
    let sandbox = cri.run_pod_sandbox(&p).unwrap();
    let mut c = ContainerSpec::new("app", EMPTY_IMAGE);
    c.command = vec!["true".into()];
    let id = cri.create_container(&sandbox, &c, &p).unwrap();
    let err = cri.start_container(&id).unwrap_err();
    let msg = err.grpc_message().unwrap_or_default().to_string();
    assert!(msg.contains("environment kof/nope"), "{msg}");
    assert!(msg.contains("not found on FloxHub"), "{msg}");
    cri.remove_container(&id).unwrap();
    cri.stop_pod_sandbox(&sandbox).unwrap();
    cri.remove_pod_sandbox(&sandbox).unwrap();
    node.assert_no_leftovers();
}

fn a_private_environment_uses_the_pods_token_which_is_never_logged(release: Release) {
    let (node, cri) = cri_node(release);
    let (fx, manifest) = fixtures();
    let token_src = fx.join(&manifest.tokens["secretorg"]);
    let token = std::fs::read_to_string(&token_src)
        .unwrap()
        .trim()
        .to_string();
    // The secret volume as kubelet lays it out.
    let secret = node.dir().join("secret-volume");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("floxhub-token"), format!("{token}\n")).unwrap();

    let p = pod(&node, "private", &[(ENV, "secretorg/app")]);
    let sandbox = cri.run_pod_sandbox(&p).unwrap();
    // Without the secret: refused, naming the environment.
    let mut bare = ContainerSpec::new("bare", EMPTY_IMAGE);
    bare.command = vec!["true".into()];
    let bare_id = cri.create_container(&sandbox, &bare, &p).unwrap();
    let err = cri.start_container(&bare_id).unwrap_err();
    let msg = err.grpc_message().unwrap_or_default().to_string();
    assert!(msg.contains("environment secretorg/app"), "{msg}");
    cri.remove_container(&bare_id).unwrap();

    let mut c = ContainerSpec::new("app", EMPTY_IMAGE);
    c.command = vec![
        "sh".into(),
        "-c".into(),
        "echo private-env=$FLOX_ENV; exec sleep 600".into(),
    ];
    c.mounts = vec![Mount {
        host_path: secret.clone(),
        container_path: "/var/run/secrets/flox.dev".into(),
        readonly: true,
    }];
    let id = cri.create_container(&sandbox, &c, &p).unwrap();
    cri.start_container(&id).unwrap();
    let line = wait_line(&node, &log_of(&p, &c), "private-env=");
    assert!(line.line.contains("/nix/store/"), "{line:?}");
    tear_down(&node, &cri, &sandbox, &[id]);
    let logs = node.logs();
    assert!(!logs.contains(&token), "the token appears in a log");
}

fn two_pods_of_one_environment_share_one_fetch_of_each_object(release: Release) {
    let (node, cri) = cri_node(release);
    let mut started = Vec::new();
    for name in ["one", "two"] {
        let p = pod(&node, name, &[(ENV, "kof/python")]);
        let sandbox = cri.run_pod_sandbox(&p).unwrap();
        let mut c = ContainerSpec::new("app", EMPTY_IMAGE);
        c.command = vec![
            "python3".into(),
            "-c".into(),
            "import json, sqlite3, email.parser; print('imported', flush=True); import time; time.sleep(600)".into(),
        ];
        let id = cri.create_container(&sandbox, &c, &p).unwrap();
        started.push((p, c, sandbox, id));
    }
    // Both start together.
    std::thread::scope(|s| {
        for (_, _, _, id) in &started {
            let cri = &cri;
            s.spawn(move || cri.start_container(id).unwrap());
        }
    });
    for (p, c, _, _) in &started {
        wait_line(&node, &log_of(p, c), "imported");
    }
    let stats = node.server.stats();
    let nar_requests: Vec<(&String, &u64)> = stats
        .requests_by_path
        .iter()
        .filter(|(path, _)| path.contains("/nar/"))
        .collect();
    assert!(!nar_requests.is_empty());
    for (path, n) in &nar_requests {
        assert_eq!(**n, 1, "{path} fetched {n} times: {nar_requests:?}");
    }
    for (_, _, sandbox, id) in started {
        tear_down_pod_only(&cri, &sandbox, &id);
    }
    node.assert_no_leftovers();
}

fn tear_down_pod_only(cri: &CriClient, sandbox: &str, id: &str) {
    cri.stop_container(id, 5).unwrap();
    cri.remove_container(id).unwrap();
    cri.stop_pod_sandbox(sandbox).unwrap();
    cri.remove_pod_sandbox(sandbox).unwrap();
}

fn execs_of_a_container_named_in_skip_containers_exec_run_unmodified(release: Release) {
    let (node, cri) = cri_node(release);
    let p = pod(
        &node,
        "skipexec",
        &[
            (ENV, "kof/python"),
            ("flox.dev/skip-containers-exec", "app"),
        ],
    );
    let sandbox = cri.run_pod_sandbox(&p).unwrap();
    let mut c = ContainerSpec::new("app", EMPTY_IMAGE);
    c.command = vec![
        "sh".into(),
        "-c".into(),
        "echo \"main=$KOF_GREETING\"; exec sleep 600".into(),
    ];
    c.envs = vec![("POD_VAR".into(), "from-the-pod".into())];
    let id = cri.create_container(&sandbox, &c, &p).unwrap();
    cri.start_container(&id)
        .unwrap_or_else(|e| panic!("{e}\n{}", node.logs()));
    // The container's own process is activated all the same.
    wait_line(&node, &log_of(&p, &c), "main=hello from kof/python");
    let (out, err) = exec_ok(
        &cri,
        &id,
        &[
            "/bin/sh",
            "-c",
            "echo \"[$FLOX_ENV|$KOF_GREETING|$POD_VAR]\"",
        ],
    );
    assert_eq!(out, "[||from-the-pod]", "the container's plain environment");
    assert!(!err.contains("python env activated"), "no hook: {err}");
    assert!(
        node.logs().contains("exec runs unmodified"),
        "{}",
        node.logs()
    );
    tear_down(&node, &cri, &sandbox, &[id]);
}

/// `SystemdCgroup = true` in the flox runtime's options (containerd 1.7 and 2.x carry them;
/// 1.6's form has none) reaches the runc shim through the proxy's Create untouched: runc runs
/// with the systemd cgroup driver, whose check of the sandbox's cgroups path fails here (the
/// harness's CRI gives a cgroupfs-style path, as no kubelet with systemd runs on this machine).
fn systemd_cgroup_in_the_runtimes_options_reaches_runc(release: Release) {
    let node = Node::new(NodeOptions {
        systemd_cgroup: true,
        ..NodeOptions::on(release)
    });
    let dir = node.dir().join("images");
    std::fs::create_dir_all(&dir).unwrap();
    images::write_pause_image(&dir.join("pause.tar"), DEFAULT_SANDBOX_IMAGE).unwrap();
    node.ctrd()
        .import_image(CRI_NAMESPACE, &dir.join("pause.tar"))
        .unwrap();
    let cri = CriClient::connect(node.ctrd().socket()).unwrap();
    let p = pod(&node, "systemd", &[(ENV, "kof/hello")]);
    let err = cri.run_pod_sandbox(&p).unwrap_err();
    let msg = err.grpc_message().unwrap_or_default().to_lowercase();
    // runc's own check of the systemd driver (the pod has no systemd-style cgroupsPath here,
    // as kubelet would give it): only runc run with `--systemd-cgroup` makes it.
    assert!(
        msg.contains("for systemd cgroups"),
        "{msg}\n{}",
        node.logs()
    );
    // The runc shim got the options as containerd sent them.
    assert!(
        node.logs().contains("shim proxy started"),
        "the pod went through kof's shim: {}",
        node.logs()
    );
}

#[test]
fn trixie_systemd_cgroup_in_the_runtimes_options_reaches_runc() {
    if kof_harness::release::should_test(Release::Trixie).unwrap() {
        systemd_cgroup_in_the_runtimes_options_reaches_runc(Release::Trixie);
    }
}

#[test]
fn sid_systemd_cgroup_in_the_runtimes_options_reaches_runc() {
    if kof_harness::release::should_test(Release::Sid).unwrap() {
        systemd_cgroup_in_the_runtimes_options_reaches_runc(Release::Sid);
    }
}

/// The live generation is resolved once per pod, when its sandbox starts: a generation pushed
/// after that reaches the next pod, not the later containers of a pod already started.
fn a_pods_containers_run_the_generation_live_when_the_pod_started(release: Release) {
    let (node, cri) = cri_node(release);
    let start_pod = |name: &str| {
        let p = pod(&node, name, &[(ENV, "kof/rollback")]);
        let sandbox = cri.run_pod_sandbox(&p).unwrap();
        node.wait_for("the pod's resolution", || {
            node.logs().matches("resolved for a starting pod").count()
                >= if name == "first" { 1 } else { 2 }
        });
        (p, sandbox)
    };
    let run = |p: &PodSpec, sandbox: &str, name: &str| {
        let mut c = ContainerSpec::new(name, EMPTY_IMAGE);
        c.command = vec![
            "sh".into(),
            "-c".into(),
            "echo started; exec sleep 600".into(),
        ];
        let id = cri.create_container(sandbox, &c, p).unwrap();
        cri.start_container(&id)
            .unwrap_or_else(|e| panic!("{e}\n{}", node.logs()));
        wait_line(&node, &log_of(p, &c), "started");
        let generation = node
            .leases()
            .into_iter()
            .find(|l| l.lease.ends_with(&id))
            .unwrap_or_else(|| panic!("no lease for {id}: {:?}", node.leases()))
            .generation;
        (id, generation)
    };
    // kof/rollback: generation 2 is live.
    let (p1, sandbox1) = start_pod("first");
    // A push makes 3 live after the first pod started.
    node.set_live_generation("kof", "rollback", 3);
    let (a, gen_a) = run(&p1, &sandbox1, "a");
    assert_eq!(
        gen_a, 2,
        "the first pod's container runs what was live at its start"
    );
    let (p2, sandbox2) = start_pod("second");
    let (b, gen_b) = run(&p2, &sandbox2, "b");
    assert_eq!(gen_b, 3, "the next pod runs the new live generation");
    for (c, sandbox) in [(a, &sandbox1), (b, &sandbox2)] {
        cri.stop_container(&c, 5).unwrap();
        cri.remove_container(&c).unwrap();
        cri.stop_pod_sandbox(sandbox).unwrap();
        cri.remove_pod_sandbox(sandbox).unwrap();
    }
    node.wait_for("every lease's release", || node.leases().is_empty());
    node.assert_no_leftovers();
}
