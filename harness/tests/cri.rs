//! CRI through the private containerd, the way kubelet drives it: images imported locally, a pod
//! on the host network with the default runtime (runc) and one with the `flox` runtime handler
//! (served here by a recording wrapper around the runc shim), logs, exec, and teardown.
//! Needs root and containerd/runc/busybox-static installed.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kof_harness::containerd::{Containerd, ContainerdOptions, Release, FLOX_SHIM_RUNTIME_TYPE};
use kof_harness::cri::{ContainerSpec, CriClient, Mount, PodSpec};
use kof_harness::cri_api::ContainerState;
use kof_harness::cri_log::{read_cri_log, wait_for_line, Stream};

const WAIT: Duration = Duration::from_secs(60);

fn bundle_config(ctrd: &Containerd, id: &str) -> serde_json::Value {
    let path = ctrd
        .state()
        .join("io.containerd.runtime.v2.task/k8s.io")
        .join(id)
        .join("config.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn options(release: Release) -> ContainerdOptions {
    ContainerdOptions {
        release,
        ..Default::default()
    }
}

kof_harness::for_each_release!(
    images_import_and_cri_sees_them,
    runc_pod_lifecycle_with_logs_and_exec,
    failing_create_surfaces_containerds_message,
    flox_handler_passes_annotations_and_calls_the_shim_binary_as_recorded,
    documented_flox_config_and_runtime_path,
);

fn images_import_and_cri_sees_them(release: Release) {
    let work = tempfile::tempdir().unwrap();
    let ctrd = Containerd::start(options(release)).unwrap();
    support::import_test_images(&ctrd, work.path());
    let cri = CriClient::connect(ctrd.socket()).unwrap();
    let version = cri.version().unwrap();
    assert_eq!(version.runtime_name, "containerd");
    for (name, full) in [
        ("kof/pause:1", "docker.io/kof/pause:1"),
        (support::EMPTY_IMAGE, "docker.io/flox/empty:1.0.0"),
        (support::BUSYBOX_IMAGE, "docker.io/kof/busybox:1"),
    ] {
        let image = cri
            .image_status(name)
            .unwrap()
            .unwrap_or_else(|| panic!("{name} unknown"));
        assert_eq!(image.repo_tags, [full]);
    }
    assert!(cri.image_status("kof/not-imported:1").unwrap().is_none());
}

fn runc_pod_lifecycle_with_logs_and_exec(release: Release) {
    let work = tempfile::tempdir().unwrap();
    let ctrd = Containerd::start(options(release)).unwrap();
    support::import_test_images(&ctrd, work.path());
    let cri = CriClient::connect(ctrd.socket()).unwrap();

    let shared = work.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("note"), "from the host\n").unwrap();
    let pod = PodSpec::new("runc-pod", &work.path().join("logs/runc-pod"));
    let sandbox = cri.run_pod_sandbox(&pod).unwrap();
    assert_eq!(cri.pod_sandbox_status(&sandbox).unwrap().state, 0, "ready");

    let mut spec = ContainerSpec::new("echo", support::BUSYBOX_IMAGE);
    spec.command = vec!["/bin/sh".into(), "-c".into()];
    spec.args = vec![
        "echo hello $GREETING; cat /shared/note; echo to-stderr >&2; \
         trap 'exit 0' TERM; sleep 100000 & wait"
            .into(),
    ];
    spec.envs = vec![("GREETING".into(), "from-cri".into())];
    spec.mounts = vec![Mount {
        host_path: shared.clone(),
        container_path: "/shared".into(),
        readonly: true,
    }];
    let id = cri.create_container(&sandbox, &spec, &pod).unwrap();
    cri.start_container(&id).unwrap();

    let log = pod.log_directory.join(&spec.log_path);
    wait_for_line(&log, |l| l.line == "to-stderr", WAIT).unwrap();
    let lines = read_cri_log(&log).unwrap();
    let stdout: Vec<&str> = lines
        .iter()
        .filter(|l| l.stream == Stream::Stdout)
        .map(|l| l.line.as_str())
        .collect();
    assert_eq!(stdout, ["hello from-cri", "from the host"]);

    let status = cri.container_status(&id).unwrap();
    assert_eq!(status.state, ContainerState::ContainerRunning as i32);
    assert_eq!(status.image_ref.len(), "sha256:".len() + 64);

    let exec = cri
        .exec_sync(
            &id,
            &["/bin/sh", "-c", "echo out; echo err >&2; exit 3"],
            WAIT,
        )
        .unwrap();
    assert_eq!(
        (
            exec.stdout.as_slice(),
            exec.stderr.as_slice(),
            exec.exit_code
        ),
        (&b"out\n"[..], &b"err\n"[..], 3)
    );
    // The bind mount is read-only.
    let write = cri
        .exec_sync(&id, &["/bin/sh", "-c", "echo x > /shared/new"], WAIT)
        .unwrap();
    assert_ne!(write.exit_code, 0);
    assert!(!shared.join("new").exists());

    // Host network: the container sees the host's interfaces.
    let ifaces = cri
        .exec_sync(&id, &["/bin/cat", "/proc/net/dev"], WAIT)
        .unwrap();
    let host_ifaces = std::fs::read_to_string("/proc/net/dev").unwrap();
    assert_eq!(
        iface_names(&String::from_utf8_lossy(&ifaces.stdout)),
        iface_names(&host_ifaces)
    );

    assert_eq!(cri.list_containers(Some(&sandbox)).unwrap().len(), 1);
    cri.stop_container(&id, 10).unwrap();
    let status = cri.container_status(&id).unwrap();
    assert_eq!(status.state, ContainerState::ContainerExited as i32);
    assert_eq!(status.exit_code, 0, "the trap ended it on SIGTERM");
    cri.remove_container(&id).unwrap();
    cri.stop_pod_sandbox(&sandbox).unwrap();
    cri.remove_pod_sandbox(&sandbox).unwrap();
    assert!(cri.list_containers(None).unwrap().is_empty());
    assert!(cri.list_pod_sandboxes().unwrap().is_empty());
    assert!(
        ctrd.mounts().is_empty(),
        "left mounted: {:?}",
        ctrd.mounts()
    );
    assert!(
        ctrd.shim_pids().is_empty(),
        "shims left: {:?}",
        ctrd.shim_pids()
    );
}

fn iface_names(proc_net_dev: &str) -> Vec<String> {
    let mut names: Vec<String> = proc_net_dev
        .lines()
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_owned()))
        .collect();
    names.sort();
    names
}

fn failing_create_surfaces_containerds_message(release: Release) {
    let work = tempfile::tempdir().unwrap();
    let ctrd = Containerd::start(options(release)).unwrap();
    support::import_test_images(&ctrd, work.path());
    let cri = CriClient::connect(ctrd.socket()).unwrap();
    let pod = PodSpec::new("failing", &work.path().join("logs/failing"));
    let sandbox = cri.run_pod_sandbox(&pod).unwrap();

    let missing = ContainerSpec::new("missing", "kof/not-imported:1");
    let err = cri.create_container(&sandbox, &missing, &pod).unwrap_err();
    let message = err.grpc_message().unwrap();
    assert!(message.contains("kof/not-imported:1"), "{err}");

    // A command that does not exist fails in StartContainer, with runc's reason.
    let mut bad = ContainerSpec::new("bad", support::BUSYBOX_IMAGE);
    bad.command = vec!["/no/such/program".into()];
    let id = cri.create_container(&sandbox, &bad, &pod).unwrap();
    let err = cri.start_container(&id).unwrap_err();
    assert!(
        err.grpc_message().unwrap().contains("/no/such/program"),
        "{err}"
    );
    cri.remove_container(&id).unwrap();

    // No runtime registered for the handler: the error Flox documents for a lost config section.
    let mut flox_pod = PodSpec::new("no-flox", &work.path().join("logs/no-flox"));
    flox_pod.runtime_handler = "flox".into();
    let err = cri.run_pod_sandbox(&flox_pod).unwrap_err();
    assert!(
        err.grpc_message()
            .unwrap()
            .contains(r#"no runtime for "flox" is configured"#),
        "{err}"
    );

    cri.stop_pod_sandbox(&sandbox).unwrap();
    cri.remove_pod_sandbox(&sandbox).unwrap();
}

/// A stand-in for containerd-shim-flox-v2: records each invocation's arguments (a line of
/// `record`), its working directory (a line of `record.cwd`) and, for `start`, what the runc
/// shim printed (a line of `record.out`), then becomes the release's runc shim.
fn recording_shim(dir: &Path, release: Release) -> (PathBuf, PathBuf) {
    let record = dir.join("shim-calls");
    let shim = dir.join("recording-shim");
    std::fs::write(
        &shim,
        format!(
            r#"#!/bin/sh
rec='{rec}'
real='{real}'
echo "$*" >> "$rec"
pwd >> "$rec.cwd"
if [ "${{#}}" -gt 0 ] && eval "[ \"\${{$#}}\" = start ]"; then
  out=$("$real" "$@") || exit $?
  echo "$out" >> "$rec.out"
  printf '%s' "$out"
  exit 0
fi
exec "$real" "$@"
"#,
            rec = record.display(),
            real = release.runc_shim().display(),
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    (shim, record)
}

/// The facts the shim's design depends on, as each containerd release behaves (see the crate
/// doc): which annotations reach the OCI config of a `flox` pod's container, and which
/// subcommands containerd runs the shim binary with over a pod's life, where, and what `start`
/// answers.
fn flox_handler_passes_annotations_and_calls_the_shim_binary_as_recorded(release: Release) {
    let work = tempfile::tempdir().unwrap();
    let (shim, record) = recording_shim(work.path(), release);
    let ctrd = Containerd::start(ContainerdOptions {
        flox_shim: Some(shim),
        flox_runtime_type: FLOX_SHIM_RUNTIME_TYPE.into(),
        ..options(release)
    })
    .unwrap();
    support::import_test_images(&ctrd, work.path());
    let cri = CriClient::connect(ctrd.socket()).unwrap();

    let mut pod = PodSpec::new("flox-pod", &work.path().join("logs/flox-pod"));
    pod.runtime_handler = "flox".into();
    pod.annotations = HashMap::from([
        ("flox.dev/environment".into(), "owner/env:3".into()),
        ("other.example/kept-out".into(), "x".into()),
    ]);
    let sandbox = cri.run_pod_sandbox(&pod).unwrap();
    let mut spec = ContainerSpec::new("main", support::EMPTY_IMAGE);
    // flox/empty has no program: borrow busybox from the host, read-only, like a store mount.
    spec.mounts = vec![Mount {
        host_path: PathBuf::from(kof_harness::images::DEFAULT_BUSYBOX),
        container_path: "/busybox".into(),
        readonly: true,
    }];
    spec.command = vec!["/busybox".into(), "sh".into(), "-c".into()];
    spec.args = vec!["echo started; trap 'exit 0' TERM; /busybox sleep 100000 & wait".into()];
    spec.annotations = HashMap::from([("flox.dev/skip-containers-exec".into(), "none".into())]);
    let id = cri.create_container(&sandbox, &spec, &pod).unwrap();

    // The task's bundle (and its config.json) exists from StartContainer on.
    cri.start_container(&id).unwrap();
    let log = pod.log_directory.join(&spec.log_path);
    wait_for_line(&log, |l| l.line == "started", WAIT).unwrap();
    let annotations = bundle_config(&ctrd, &id)["annotations"].clone();
    assert_eq!(annotations["flox.dev/environment"], "owner/env:3");
    assert_eq!(annotations["flox.dev/skip-containers-exec"], "none");
    assert!(annotations.get("other.example/kept-out").is_none());
    assert_eq!(annotations["io.kubernetes.cri.container-type"], "container");
    assert_eq!(
        annotations["io.kubernetes.cri.sandbox-id"],
        sandbox.as_str()
    );
    assert_eq!(annotations["io.kubernetes.cri.container-name"], "main");
    // containerd 1.6.20 and 1.7.24 pass the image name normalized (the pod said
    // "flox/empty:1.0.0"); 2.1.9 passes it as the pod said it.
    let image_name = match release {
        Release::Bookworm | Release::Trixie => "docker.io/flox/empty:1.0.0",
        Release::Sid => support::EMPTY_IMAGE,
    };
    assert_eq!(
        annotations["io.kubernetes.cri.image-name"], image_name,
        "{annotations:#}"
    );
    assert_eq!(annotations["io.kubernetes.cri.sandbox-name"], "flox-pod");
    assert_eq!(
        annotations["io.kubernetes.cri.sandbox-namespace"],
        "default"
    );
    assert_eq!(
        annotations["io.kubernetes.cri.sandbox-uid"],
        pod.uid.as_str()
    );
    let sandbox_annotations = bundle_config(&ctrd, &sandbox)["annotations"].clone();
    assert_eq!(
        sandbox_annotations["io.kubernetes.cri.container-type"],
        "sandbox"
    );
    assert_eq!(sandbox_annotations["flox.dev/environment"], "owner/env:3");
    // The sandbox's own bundle names itself as the pod's sandbox, on every release.
    assert_eq!(
        sandbox_annotations["io.kubernetes.cri.sandbox-id"],
        sandbox.as_str(),
        "{sandbox_annotations:#}"
    );
    if release == Release::Sid {
        // 2.x adds the sandbox image's name.
        assert_eq!(
            sandbox_annotations["io.kubernetes.cri.podsandbox.image-name"],
            kof_harness::containerd::DEFAULT_SANDBOX_IMAGE
        );
    }

    cri.stop_container(&id, 10).unwrap();
    cri.remove_container(&id).unwrap();
    cri.stop_pod_sandbox(&sandbox).unwrap();
    cri.remove_pod_sandbox(&sandbox).unwrap();
    assert!(ctrd.shim_pids().is_empty());

    let calls = std::fs::read_to_string(&record).unwrap();
    let subcommands: Vec<(&str, &str)> = calls
        .lines()
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let id = words
                .windows(2)
                .find(|w| w[0] == "-id")
                .map_or("?", |w| w[1]);
            (*words.last().unwrap(), id)
        })
        .collect();
    // containerd 1.6.20 and 1.7.24: one `start` per task (the container's joins the sandbox's
    // shim), and one `delete` per task once it is gone: containerd runs
    // `<shim> -id <id> -bundle <dir> delete` when the shim connection for that task closes
    // ("cleaning up dead shim"), after the container exits (StopContainer) and again for the
    // sandbox (StopPodSandbox), on clean stops too.
    // containerd 2.1.9 runs the binary for the sandbox only: the container is created, started,
    // exec'd and deleted through the sandbox shim's task API.
    let expected = match release {
        Release::Bookworm | Release::Trixie => vec![
            ("start", sandbox.as_str()),
            ("start", id.as_str()),
            ("delete", id.as_str()),
            ("delete", sandbox.as_str()),
        ],
        Release::Sid => vec![("start", sandbox.as_str()), ("delete", sandbox.as_str())],
    };
    assert_eq!(subcommands, expected, "{release}: {calls}");
    // The full argv: `-namespace k8s.io -address <containerd's socket> -publish-binary
    // <containerd> -id <id> start`, and `... -id <id> -bundle <bundle> delete`.
    let bundle = |id: &str| {
        ctrd.state()
            .join("io.containerd.runtime.v2.task/k8s.io")
            .join(id)
    };
    let publish = release.containerd();
    assert_eq!(
        calls.lines().next().unwrap(),
        format!(
            "-namespace k8s.io -address {} -publish-binary {} -id {sandbox} start",
            ctrd.socket().display(),
            publish.display()
        )
    );
    assert_eq!(
        calls.lines().last().unwrap(),
        format!(
            "-namespace k8s.io -address {} -publish-binary {} -id {sandbox} -bundle {} delete",
            ctrd.socket().display(),
            publish.display(),
            bundle(&sandbox).display()
        )
    );
    // Each call runs in its task's bundle directory.
    let cwds = std::fs::read_to_string(record.with_extension("cwd")).unwrap();
    let expected_cwds: Vec<PathBuf> = expected.iter().map(|(_, id)| bundle(id)).collect();
    assert_eq!(
        cwds.lines().map(PathBuf::from).collect::<Vec<_>>(),
        expected_cwds
    );
    // `start` prints where the shim serves: 1.6 and 1.7 read a bare address, containerd 2 reads
    // the runc shim's JSON bootstrap (protocol version 3).
    let outs = std::fs::read_to_string(record.with_extension("out")).unwrap();
    for out in outs.lines() {
        match release {
            Release::Bookworm | Release::Trixie => {
                assert!(out.starts_with("unix:///run/containerd/s/"), "{out}")
            }
            Release::Sid => {
                let json: serde_json::Value = serde_json::from_str(out).unwrap();
                assert_eq!(json["version"], 3, "{out}");
                assert_eq!(json["protocol"], "ttrpc", "{out}");
                let address = json["address"].as_str().unwrap();
                assert!(address.starts_with("unix:///run/containerd/s/"), "{out}");
            }
        }
    }
}

/// containerd 1.6.20's CRI ignores `runtime_path`: with the configuration Flox documents
/// (`runtime_type = "io.containerd.runc.v2"` plus `runtime_path`), a shim that cannot even start
/// does not keep a `flox` pod from running, because containerd runs `containerd-shim-runc-v2`.
/// containerd 1.7.24 and 2.1.9 run the `runtime_path` binary (2.1.9 first asks it `-info`), so
/// that shim failing fails the pod.
fn documented_flox_config_and_runtime_path(release: Release) {
    let work = tempfile::tempdir().unwrap();
    let record = work.path().join("calls");
    let shim = work.path().join("failing-shim");
    std::fs::write(
        &shim,
        format!("#!/bin/sh\necho \"$*\" >> '{}'\nexit 7\n", record.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ctrd = Containerd::start(ContainerdOptions {
        flox_shim: Some(shim.clone()),
        ..options(release)
    })
    .unwrap();
    let config = std::fs::read_to_string(ctrd.config_path()).unwrap();
    assert!(config.contains(&format!("runtime_path = \"{}\"", shim.display())));
    assert!(config.contains(r#"runtime_type = "io.containerd.runc.v2""#));
    support::import_test_images(&ctrd, work.path());
    let cri = CriClient::connect(ctrd.socket()).unwrap();
    let mut pod = PodSpec::new("documented", &work.path().join("logs/documented"));
    pod.runtime_handler = "flox".into();
    let result = cri.run_pod_sandbox(&pod);
    if release == Release::Bookworm {
        let sandbox = result.unwrap();
        assert!(!record.exists(), "containerd ran the runtime_path shim");
        cri.stop_pod_sandbox(&sandbox).unwrap();
        cri.remove_pod_sandbox(&sandbox).unwrap();
        return;
    }
    let err = result.unwrap_err();
    assert!(
        err.grpc_message()
            .unwrap()
            .contains("failed to start shim: start failed: : exit status 7"),
        "{err}"
    );
    let calls = std::fs::read_to_string(&record).unwrap();
    let subcommands: Vec<&str> = calls
        .lines()
        .map(|l| l.split_whitespace().last().unwrap())
        .collect();
    let expected: &[&str] = match release {
        Release::Sid => &["-info", "start"],
        _ => &["start"],
    };
    assert_eq!(subcommands, expected, "{calls}");
}
