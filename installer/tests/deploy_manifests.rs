//! The manifests in `deploy/` say what the node side needs: every YAML file parses, and the key
//! facts hold (RuntimeClass `flox`, the DaemonSet's mounts and commands, the example pod as
//! Flox documents it). The ConfigMap's node config is loaded by `kof-fetcherd`'s own loader, and
//! the README's containerd snippets are checked to be exactly what the installer writes.
//!
//! YAML is parsed with `serde_norway`, the maintained fork of the archived `serde_yaml` (same
//! API, multi-document streams, a `Value` to walk), rather than `yaml-rust2`, whose untyped
//! `Yaml` tree would need more code for the same checks.

use std::path::{Path, PathBuf};

use kof_node_install::containerd_config::{ContainerdConfig, FloxRuntime, DEFAULT_RUNTIME_PATH};
use serde::Deserialize;
use serde_norway::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(name: &str) -> String {
    let p = deploy_dir().join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every document of a YAML stream.
fn documents(text: &str, name: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{name}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn load(name: &str) -> Vec<Value> {
    documents(&read(name), name)
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<_> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}");
    found[0]
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(str_of)
        .collect()
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no entry named {name}"))
}

#[test]
fn every_yaml_file_parses() {
    let mut names: Vec<_> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["daemonset.yaml", "example-pod.yaml", "runtimeclass.yaml"]
    );
    for name in names {
        let docs = load(&name);
        assert!(!docs.is_empty(), "{name}");
        for d in &docs {
            assert!(d["apiVersion"].is_string(), "{name}: {d:?}");
            assert!(d["kind"].is_string(), "{name}: {d:?}");
            assert!(d["metadata"]["name"].is_string(), "{name}: {d:?}");
        }
    }
}

#[test]
fn runtime_class_routes_to_the_flox_handler_on_labelled_nodes() {
    let docs = load("runtimeclass.yaml");
    let rc = of_kind(&docs, "RuntimeClass");
    assert_eq!(rc["apiVersion"], "node.k8s.io/v1");
    assert_eq!(rc["metadata"]["name"], "flox");
    assert_eq!(rc["handler"], "flox");
    // A string "true", as label values are: YAML's bare true would be refused by the API.
    assert_eq!(rc["scheduling"]["nodeSelector"]["flox.dev/enabled"], "true");
}

#[test]
fn example_pod_is_the_documented_one() {
    let text = read("example-pod.yaml");
    let docs = documents(&text, "example-pod.yaml");
    assert_eq!(docs.len(), 1);
    let pod = of_kind(&docs, "Pod");
    assert_eq!(
        pod["metadata"]["annotations"]["flox.dev/environment"],
        "limeytexan/echoip"
    );
    assert_eq!(pod["spec"]["runtimeClassName"], "flox");
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["image"], "flox/empty:1.0.0");
    assert_eq!(strings(&c["command"]), ["echoip"]);

    // The commented private variant, uncommented, is a valid pod mounting the token secret.
    let variant: String = text
        .lines()
        .skip_while(|l| !l.starts_with("# apiVersion: v1"))
        .map(|l| l.strip_prefix("# ").or(l.strip_prefix("#")).unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let docs = documents(&variant, "example-pod.yaml (private variant)");
    let pod = of_kind(&docs, "Pod");
    assert_eq!(pod["spec"]["runtimeClassName"], "flox");
    assert!(pod["metadata"]["annotations"]["flox.dev/environment"].is_string());
    let mount = named(
        &pod["spec"]["containers"][0]["volumeMounts"],
        "floxhub-token",
    );
    assert_eq!(mount["mountPath"], "/var/run/secrets/flox.dev");
    assert_eq!(mount["readOnly"], true);
    let volume = named(&pod["spec"]["volumes"], "floxhub-token");
    assert_eq!(volume["secret"]["secretName"], "floxhub-token");
}

#[test]
fn daemonset_installs_then_runs_the_daemon_with_the_host_mounts() {
    let docs = load("daemonset.yaml");
    assert_eq!(
        of_kind(&docs, "Namespace")["metadata"]["name"],
        "kof-system"
    );
    let sa = of_kind(&docs, "ServiceAccount");
    assert_eq!(sa["metadata"]["namespace"], "kof-system");
    let ds = of_kind(&docs, "DaemonSet");
    assert_eq!(ds["metadata"]["namespace"], "kof-system");
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"],
        ds["spec"]["template"]["metadata"]["labels"]
    );
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(spec["nodeSelector"]["flox.dev/enabled"], "true");
    assert_eq!(spec["hostPID"], true);
    let volumes = &spec["volumes"];
    let host_path = |name: &str| str_of(&named(volumes, name)["hostPath"]["path"]).to_string();

    // The init container: kof-node-install into /host, each /host/X mount the host's X.
    let install = &spec["initContainers"][0];
    let cmd = strings(&install["command"]);
    assert_eq!(cmd[0], "kof-node-install");
    assert!(cmd.contains(&"--host-root=/host"), "{cmd:?}");
    assert!(
        cmd.contains(&"--shim=/usr/local/bin/containerd-shim-flox-v2"),
        "{cmd:?}"
    );
    assert!(
        cmd.contains(&"--node-config=/config/config.toml"),
        "{cmd:?}"
    );
    // The release chooses the runtime's form (containerd 1.6 ignores runtime_path).
    assert!(cmd.contains(&"--containerd-version=auto"), "{cmd:?}");
    assert_eq!(install["securityContext"]["privileged"], true);
    let mut host_dirs = Vec::new();
    for m in install["volumeMounts"].as_sequence().unwrap() {
        let path = str_of(&m["mountPath"]);
        if let Some(on_host) = path.strip_prefix("/host") {
            assert_eq!(host_path(str_of(&m["name"])), on_host, "{m:?}");
            host_dirs.push(on_host);
        } else {
            assert_eq!(path, "/config");
            assert_eq!(
                named(volumes, str_of(&m["name"]))["configMap"]["name"],
                "kof-node-config"
            );
        }
    }
    host_dirs.sort();
    // /run/containerd: the installer's wait for CRI after the restart (its default socket is
    // the host's /run/containerd/containerd.sock under --host-root).
    assert_eq!(
        host_dirs,
        [
            "/etc/containerd",
            "/etc/kof",
            "/run/containerd",
            "/usr/local/bin"
        ]
    );

    // The daemon: privileged, /var/lib/kof shared both ways with the host, /run/kof, /dev/fuse.
    let fetcherd = named(&spec["containers"], "fetcherd");
    let script = strings(&fetcherd["command"]).join(" ");
    assert!(
        script.contains("kof-fetcherd --config /etc/kof/config.toml"),
        "{script}"
    );
    assert_eq!(fetcherd["securityContext"]["privileged"], true);
    let mounts = fetcherd["volumeMounts"].as_sequence().unwrap();
    let mount_at = |path: &str| {
        mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("fetcherd mounts nothing at {path}"))
    };
    let state = mount_at("/var/lib/kof");
    assert_eq!(state["mountPropagation"], "Bidirectional");
    assert_eq!(host_path(str_of(&state["name"])), "/var/lib/kof");
    assert_eq!(host_path(str_of(&mount_at("/run/kof")["name"])), "/run/kof");
    let fuse = named(volumes, str_of(&mount_at("/dev/fuse")["name"]));
    assert_eq!(fuse["hostPath"]["path"], "/dev/fuse");
    assert_eq!(fuse["hostPath"]["type"], "CharDevice");
    // The daemon reads the very file the installer wrote for the shim.
    let etc_kof = mount_at("/etc/kof");
    assert_eq!(host_path(str_of(&etc_kof["name"])), "/etc/kof");
    let token = named(
        volumes,
        str_of(&mount_at("/var/run/secrets/flox.dev")["name"]),
    );
    assert_eq!(token["secret"]["optional"], true);

    let ready = strings(&fetcherd["readinessProbe"]["exec"]["command"]);
    assert_eq!(
        ready,
        [
            "kof-node-install",
            "probe",
            "--ready",
            "--config",
            "/etc/kof/config.toml"
        ]
    );
    assert!(fetcherd["resources"]["requests"]["memory"].is_string());
    assert_eq!(install["image"], fetcherd["image"]);
}

#[test]
fn node_config_loads_and_matches_the_mounts() {
    let docs = load("daemonset.yaml");
    let cm = of_kind(&docs, "ConfigMap");
    let text = str_of(&cm["data"]["config.toml"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, text).unwrap();
    let config =
        kof_node_api::config::Config::load_from(Some(&file), None, Path::new("/nonexistent"))
            .unwrap_or_else(|e| panic!("the ConfigMap's config.toml: {e}"));
    assert_eq!(config.floxhub_url, "https://api.flox.dev/git");
    assert_eq!(
        config.substituters,
        ["https://cache.nixos.org", "https://cache.flox.dev"]
    );
    let keys: Vec<_> = config
        .trusted_public_keys
        .iter()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(
        keys,
        [
            "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=",
            "flox-cache-public-1:7F4OyH7ZCnFhcze3fJdfyXYLQw/aV7GEed86nQ7IsOs=",
        ]
    );
    // Where the DaemonSet mounts the host's directories.
    assert_eq!(config.socket, Path::new("/run/kof/fetcherd.sock"));
    assert_eq!(config.store_dir, Path::new("/var/lib/kof"));
    assert!(config.mount_dir.starts_with("/var/lib/kof"));
    assert_eq!(config.metrics_addr.as_deref(), Some("0.0.0.0:9464"));
}

#[test]
fn containerfile_builds_what_the_manifests_run() {
    let text = read("Containerfile");
    assert!(text.contains("FROM docker.io/library/debian:12-slim"));
    for pkg in ["fuse3", "git", "ca-certificates", "util-linux"] {
        assert!(text.contains(pkg), "{pkg}");
    }
    for bin in [
        "kof-fetcherd",
        "kof-node-install",
        "containerd-shim-flox-v2",
        "kof-store",
    ] {
        assert!(text.contains(&format!("release/{bin}")), "{bin}");
    }
}

/// The README's ```toml blocks that register the runtime are what the installer writes: an
/// install over each of them (with its config version and containerd release's form) changes
/// nothing. The containerd 1.6 block is also loaded by the real containerd 1.6.
#[test]
fn readme_snippets_are_what_the_installer_writes() {
    let readme = read("README.md");
    let mut blocks = Vec::new();
    let mut rest = readme.as_str();
    while let Some(start) = rest.find("```toml\n") {
        let body = &rest[start + 8..];
        let end = body.find("```").unwrap();
        blocks.push(&body[..end]);
        rest = &body[end + 3..];
    }
    let runtime_blocks: Vec<_> = blocks
        .iter()
        .filter(|b| b.contains("runtimes.flox]"))
        .collect();
    assert_eq!(runtime_blocks.len(), 3, "{blocks:?}");
    let runtime_path = FloxRuntime::RuntimePath {
        runtime_path: DEFAULT_RUNTIME_PATH.to_string(),
        systemd_cgroup: true,
    };
    let forms = [
        (2, FloxRuntime::ShimOnPath),
        (2, runtime_path.clone()),
        (3, runtime_path),
    ];
    for (block, (version, runtime)) in runtime_blocks.iter().zip(forms) {
        let text = format!("version = {version}\n\n{block}");
        let mut config = ContainerdConfig::parse(Path::new("README.md"), &text).unwrap();
        assert_eq!(config.version().unwrap().number(), version);
        let changes = config.register_flox(&runtime).unwrap();
        assert!(changes.is_empty(), "{runtime:?}: {changes:?}");
        assert_eq!(config.to_string(), text);
    }
    let first = format!("version = 2\n\n{}", runtime_blocks[0]);
    assert!(first.contains("io.containerd.flox.v2") && !first.contains("options"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, &first).unwrap();
    let out = std::process::Command::new("containerd")
        .arg("--config")
        .arg(&file)
        .args(["config", "dump"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: toml_edit::DocumentMut = String::from_utf8(out.stdout).unwrap().parse().unwrap();
    let flox = &dump["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["flox"];
    assert_eq!(flox["runtime_type"].as_str(), Some("io.containerd.flox.v2"));
}

/// The fetcherd container's restart loop, run for real with a stand-in `kof-fetcherd` on
/// `PATH` that fails on its first start: it is started again, and SIGTERM (pod deletion)
/// reaches the running daemon and ends the loop cleanly.
#[test]
fn fetcherd_restart_loop_restarts_and_passes_sigterm_on() {
    use std::os::unix::fs::PermissionsExt;
    let docs = load("daemonset.yaml");
    let ds = of_kind(&docs, "DaemonSet");
    let fetcherd = named(&ds["spec"]["template"]["spec"]["containers"], "fetcherd");
    let cmd = strings(&fetcherd["command"]);
    assert_eq!(&cmd[..2], ["/bin/sh", "-c"]);

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let fake = dir.path().join("kof-fetcherd");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"start $*\" >> {log}\n[ \"$(grep -c start {log})\" -ge 2 ] || exit 3\ntrap 'echo term >> {log}; exit 0' TERM\necho ready >> {log}\nwhile :; do sleep 0.05; done\n",
            log = log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let child = std::process::Command::new(cmd[0])
        .args(&cmd[1..])
        .env(
            "PATH",
            format!(
                "{}:{}",
                dir.path().display(),
                std::env::var("PATH").unwrap()
            ),
        )
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the second daemon to be up, its TERM trap set.
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("ready")
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        log,
        "start --config /etc/kof/config.toml\nstart --config /etc/kof/config.toml\nready\nterm\n"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "kof-fetcherd exited with status 3; starting it again\n"
    );
}
