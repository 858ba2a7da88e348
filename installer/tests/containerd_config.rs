//! Registering the flox runtime in real-world containerd configs (fixtures in `fixtures/`), and
//! checking with the real containerd (1.6 on the test machine: `containerd --config F config
//! dump`) that it reads the runtime as we meant it. Both forms are exercised: containerd 1.7+
//! (`runtime_path`, `options.SystemdCgroup`) and 1.6 (type `io.containerd.flox.v2`, no options).

use std::path::{Path, PathBuf};
use std::process::Command;

use kof_node_install::containerd_config::{
    ConfigVersion, ContainerdConfig, ContainerdRelease, FloxRuntime, DEFAULT_RUNTIME_PATH,
};
use kof_node_install::install::{install, Action, CgroupSource, ContainerdVersion, Options};
use kof_node_install::Written;
use toml_edit::DocumentMut;

fn release(text: &str) -> ContainerdVersion {
    ContainerdVersion::Release(ContainerdRelease::parse(text).unwrap())
}

/// Options for a node running containerd 1.6.
fn on_16(mut opts: Options) -> Options {
    opts.containerd_version = release("1.6.20");
    opts
}

fn warnings(actions: &[Action]) -> Vec<&str> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Warning(w) => Some(w.as_str()),
            _ => None,
        })
        .collect()
}

fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A host root holding `etc/containerd/config.toml` (when `config` is given) and a shim to
/// install.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new(config: Option<&str>) -> Host {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root/etc/containerd")).unwrap();
        if let Some(c) = config {
            std::fs::write(dir.path().join("root/etc/containerd/config.toml"), c).unwrap();
        }
        std::fs::write(
            dir.path().join("containerd-shim-flox-v2"),
            b"\x7fELF the shim",
        )
        .unwrap();
        Host { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn config_path(&self) -> PathBuf {
        self.root().join("etc/containerd/config.toml")
    }

    fn config(&self) -> String {
        std::fs::read_to_string(self.config_path()).unwrap()
    }

    fn options(&self) -> Options {
        Options {
            host_root: self.root(),
            shim: self.dir.path().join("containerd-shim-flox-v2"),
            kof_store: None,
            bin_dir: PathBuf::from("/usr/local/bin"),
            node_config: None,
            node_config_dest: PathBuf::from("/etc/kof/config.toml"),
            containerd_config: PathBuf::from("/etc/containerd/config.toml"),
            containerd_version: release("1.7.2"),
            systemd_cgroup_fallback: None,
            restart: None,
            check: None,
            cri_wait: None,
        }
    }

    fn install(&self, opts: &Options) -> Vec<Action> {
        let mut actions = Vec::new();
        install(opts, &mut |a| actions.push(a.clone())).unwrap();
        actions
    }

    /// Backups of containerd's config.
    fn backups(&self) -> Vec<PathBuf> {
        let mut b: Vec<_> = std::fs::read_dir(self.root().join("etc/containerd"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains("config.toml.kof-backup-"))
            .collect();
        b.sort();
        b
    }
}

/// `containerd --config FILE config dump`, parsed.
fn containerd_dump(config: &Path) -> DocumentMut {
    let out = Command::new("containerd")
        .arg("--config")
        .arg(config)
        .args(["config", "dump"])
        .output()
        .expect("the real containerd must be installed (Debian package `containerd`, in .ci/apt-packages)");
    assert!(
        out.status.success(),
        "containerd refused {}: {}",
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().parse().unwrap()
}

/// The flox runtime as containerd 1.6 sees it (always under the version-2 plugin name: it
/// migrates version 1).
fn assert_containerd_has_flox(config: &Path, systemd_cgroup: bool) {
    let dump = containerd_dump(config);
    let flox = &dump["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["flox"];
    assert!(
        flox.is_table(),
        "containerd's dump of {} has no flox runtime:\n{dump}",
        config.display()
    );
    assert_eq!(flox["runtime_path"].as_str(), Some(DEFAULT_RUNTIME_PATH));
    assert_eq!(flox["runtime_type"].as_str(), Some("io.containerd.runc.v2"));
    for key in ["pod_annotations", "container_annotations"] {
        let a: Vec<_> = flox[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(a, ["flox.dev/*"], "{key}");
    }
    assert_eq!(
        flox["options"]["SystemdCgroup"].as_bool(),
        Some(systemd_cgroup)
    );
}

#[test]
fn empty_config_becomes_version_2_that_containerd_reads() {
    let host = Host::new(Some(&fixture("empty.toml")));
    let actions = host.install(&host.options());
    assert!(actions.contains(&Action::ContainerdConfigNew {
        path: host.config_path(),
        version: ConfigVersion::V2
    }));
    let text = host.config();
    assert!(text.starts_with("version = 2\n"), "{text}");
    assert!(
        text.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.flox]"),
        "{text}"
    );
    // An empty file is replaced (and kept) like any other.
    assert_eq!(host.backups().len(), 1);
    assert_containerd_has_flox(&host.config_path(), false);
}

#[test]
fn missing_config_is_written_in_the_chosen_version() {
    let host = Host::new(None);
    let mut opts = host.options();
    opts.containerd_version = release("2.0.0");
    let actions = host.install(&opts);
    assert!(actions.contains(&Action::File {
        path: host.config_path(),
        written: Written::Created
    }));
    let c = ContainerdConfig::parse(&host.config_path(), &host.config()).unwrap();
    assert_eq!(c.version().unwrap(), ConfigVersion::V3);
    assert!(host
        .config()
        .contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.flox]"));
    assert!(host.backups().is_empty());

    let host = Host::new(None);
    host.install(&host.options());
    assert_containerd_has_flox(&host.config_path(), false);
}

#[test]
fn eks_al2_config_keeps_its_text_gains_flox_and_warns_about_imports() {
    let original = fixture("eks-al2.toml");
    let host = Host::new(Some(&original));
    let actions = host.install(&host.options());
    let text = host.config();
    // Everything of the node's stays byte for byte; the runtime's sections go after the
    // other runtimes (toml_edit places new sections next to their siblings).
    let cni = "[plugins.\"io.containerd.grpc.v1.cri\".cni]";
    let block = r#"[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.flox]
runtime_type = "io.containerd.runc.v2"
runtime_path = "/usr/local/bin/containerd-shim-flox-v2"
pod_annotations = ["flox.dev/*"]
container_annotations = ["flox.dev/*"]

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.flox.options]
SystemdCgroup = true

"#;
    assert_eq!(text, original.replace(cni, &format!("{block}{cni}")));
    assert!(actions.contains(&Action::Cgroup {
        systemd_cgroup: true,
        source: CgroupSource::Runtime("runc".into())
    }));
    let warnings = warnings(&actions);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("imports [\"/etc/containerd/config.d/*.toml\"]"));
    assert!(warnings[0].contains("no runtime for \"flox\" is configured"));

    let backups = host.backups();
    assert_eq!(backups.len(), 1);
    assert_eq!(std::fs::read_to_string(&backups[0]).unwrap(), original);
    // The imports glob is of the test machine's /etc/containerd/config.d: nothing there that
    // configures the CRI plugin is expected.
    assert_containerd_has_flox(&host.config_path(), true);
}

#[test]
fn version_3_config_gets_the_containerd_2_section() {
    let original = fixture("containerd2-v3.toml");
    let host = Host::new(Some(&original));
    let mut opts = host.options();
    opts.containerd_version = release("2.0.0");
    host.install(&opts);
    let text = host.config();
    assert!(text.starts_with(&original), "{text}");
    let doc: DocumentMut = text.parse().unwrap();
    let flox = &doc["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["flox"];
    assert_eq!(flox["runtime_path"].as_str(), Some(DEFAULT_RUNTIME_PATH));
    assert_eq!(flox["runtime_type"].as_str(), Some("io.containerd.runc.v2"));
    assert_eq!(flox["pod_annotations"].as_array().unwrap().len(), 1);
    assert_eq!(flox["options"]["SystemdCgroup"].as_bool(), Some(true));
    assert!(doc["plugins"].get("io.containerd.grpc.v1.cri").is_none());
    // containerd 1.6 cannot read a version-3 file ("unsupported config version"), so this
    // one is checked by parsing only; containerd 2.x is not on the test machine.
}

#[test]
fn an_installed_runtime_is_left_byte_identical() {
    let original = fixture("installed-v2.toml");
    let host = Host::new(Some(&original));
    let actions = host.install(&host.options());
    assert_eq!(host.config(), original);
    assert!(host.backups().is_empty());
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::RuntimeUpToDate { .. })));
    assert!(!actions
        .iter()
        .any(|a| matches!(a, Action::RuntimeKey { .. })));
    assert_containerd_has_flox(&host.config_path(), false);

    let mut c = ContainerdConfig::parse(Path::new("x"), &original).unwrap();
    let changes = c
        .register_flox(&FloxRuntime::RuntimePath {
            runtime_path: DEFAULT_RUNTIME_PATH.into(),
            systemd_cgroup: false,
        })
        .unwrap();
    assert!(changes.is_empty(), "{changes:?}");
}

#[test]
fn every_fixture_is_idempotent() {
    for name in [
        "empty.toml",
        "eks-al2.toml",
        "containerd2-v3.toml",
        "installed-v2.toml",
        "old-flox-path.toml",
        "systemd-runc-v2.toml",
    ] {
        for containerd in ["1.7.2", "1.6.20"] {
            // containerd 1.x cannot read a version-3 file (refused, see below).
            let containerd = match (containerd, name) {
                ("1.6.20", "containerd2-v3.toml") => continue,
                (_, "containerd2-v3.toml") => "2.0.0",
                (c, _) => c,
            };
            let host = Host::new(Some(&fixture(name)));
            let mut opts = host.options();
            opts.containerd_version = release(containerd);
            host.install(&opts);
            let first = host.config();
            let backups = host.backups();
            let actions = host.install(&opts);
            assert_eq!(
                host.config(),
                first,
                "{name} {containerd}: second run changed the file"
            );
            assert_eq!(
                host.backups(),
                backups,
                "{name} {containerd}: second run made a backup"
            );
            assert!(
                !actions
                    .iter()
                    .any(|a| matches!(a, Action::RuntimeKey { .. } | Action::Restarted { .. })),
                "{name} {containerd}: {actions:?}"
            );
        }
    }
}

#[test]
fn an_older_runtime_path_is_updated_in_place() {
    let original = fixture("old-flox-path.toml");
    let host = Host::new(Some(&original));
    let actions = host.install(&host.options());
    let changes: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::RuntimeKey { change, .. } => Some(change),
            _ => None,
        })
        .collect();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(
        changes[0].key,
        "plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.flox.runtime_path"
    );
    assert_eq!(
        changes[0].old.as_deref(),
        Some("\"/usr/bin/containerd-shim-flox-v2\"")
    );
    // Only that value changed: same lines otherwise, in the same order.
    let expected = original.replace(
        "runtime_path = \"/usr/bin/containerd-shim-flox-v2\"",
        "runtime_path = \"/usr/local/bin/containerd-shim-flox-v2\"",
    );
    assert_eq!(host.config(), expected);
    assert_containerd_has_flox(&host.config_path(), true);
}

#[test]
fn runc_systemd_cgroup_is_copied() {
    let host = Host::new(Some(&fixture("systemd-runc-v2.toml")));
    let mut opts = host.options();
    // The flag is only a fallback: the node's runc says true.
    opts.systemd_cgroup_fallback = Some(false);
    let actions = host.install(&opts);
    assert!(actions.contains(&Action::Cgroup {
        systemd_cgroup: true,
        source: CgroupSource::Runtime("runc".into())
    }));
    assert_containerd_has_flox(&host.config_path(), true);

    // Where the config says nothing, the flag decides.
    let host = Host::new(Some("version = 2\n"));
    let mut opts = host.options();
    opts.systemd_cgroup_fallback = Some(true);
    let actions = host.install(&opts);
    assert!(actions.contains(&Action::Cgroup {
        systemd_cgroup: true,
        source: CgroupSource::Flag
    }));
    assert_containerd_has_flox(&host.config_path(), true);
}

#[test]
fn version_1_config_is_read_by_containerd() {
    let host = Host::new(Some("root = \"/var/lib/containerd\"\n"));
    host.install(&host.options());
    assert!(host
        .config()
        .contains("[plugins.cri.containerd.runtimes.flox]"));
    assert_containerd_has_flox(&host.config_path(), false);
}

/// The documented failure: a drop-in configuring the CRI plugin replaces the main file's
/// section (containerd 1.6 merges imports plugin by plugin), so the flox runtime disappears.
/// The real containerd shows it; the installer names that drop-in.
#[test]
fn a_dropin_overriding_the_cri_plugin_is_named() {
    let host = Host::new(None);
    let dropin_dir = host.root().join("etc/containerd/config.d");
    std::fs::create_dir_all(&dropin_dir).unwrap();
    let dropin = dropin_dir.join("20-gpu.toml");
    std::fs::write(
        &dropin,
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.nvidia]\nruntime_type = \"io.containerd.runc.v2\"\n",
    )
    .unwrap();
    std::fs::write(
        dropin_dir.join("10-other.toml"),
        "version = 2\n[debug]\nlevel = \"info\"\n",
    )
    .unwrap();
    // A relative import, as containerd resolves it: against the main file's directory.
    std::fs::write(
        host.config_path(),
        "version = 2\nimports = [\"config.d/*.toml\"]\n",
    )
    .unwrap();
    let actions = host.install(&host.options());
    let warnings = warnings(&actions);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[1].starts_with(&format!("imported {} configures", dropin.display())),
        "{warnings:?}"
    );

    // What containerd does with it: the import is resolved against the real root here, so
    // point it at the drop-in's real path.
    let absolute = host.config().replace(
        "imports = [\"config.d/*.toml\"]",
        &format!("imports = [\"{}\"]", dropin.display()),
    );
    let checked = host.dir.path().join("absolute.toml");
    std::fs::write(&checked, absolute).unwrap();
    let dump = containerd_dump(&checked);
    let runtimes = &dump["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
    assert!(runtimes.get("nvidia").is_some(), "{dump}");
    assert!(
        runtimes.get("flox").is_none(),
        "containerd 1.6 now merges drop-ins deeply: the warning's premise changed\n{dump}"
    );
}

/// The flox runtime as containerd 1.6 sees it in the 1.6 form: type `io.containerd.flox.v2`,
/// the annotations, and neither `runtime_path` nor options (containerd's dump prints
/// `runtime_path = ""` and an empty `options` table for a runtime whose config sets neither;
/// with an `options` table in the file, its keys show there).
fn assert_containerd_has_flox_16(config: &Path) -> DocumentMut {
    let dump = containerd_dump(config);
    let flox = &dump["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["flox"];
    assert!(flox.is_table(), "no flox runtime:\n{dump}");
    assert_eq!(
        flox["runtime_type"].as_str(),
        Some("io.containerd.flox.v2"),
        "{dump}"
    );
    assert!(
        flox.get("runtime_path")
            .and_then(|p| p.as_str())
            .unwrap_or("")
            .is_empty(),
        "{dump}"
    );
    assert!(
        flox.get("options")
            .is_none_or(|o| o.as_table().is_some_and(|t| t.is_empty())),
        "{dump}"
    );
    for key in ["pod_annotations", "container_annotations"] {
        let a: Vec<_> = flox[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(a, ["flox.dev/*"], "{key}");
    }
    dump
}

#[test]
fn containerd_16_gets_the_shim_on_path_form_that_it_reads() {
    let host = Host::new(None);
    let actions = host.install(&on_16(host.options()));
    assert_eq!(
        host.config(),
        r#"version = 2

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
SystemdCgroup = false

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.flox]
runtime_type = "io.containerd.flox.v2"
pod_annotations = ["flox.dev/*"]
container_annotations = ["flox.dev/*"]
"#
    );
    assert!(actions.contains(&Action::Registration {
        release: ContainerdRelease::parse("1.6.20").unwrap(),
        runtime_path: false
    }));
    // No SystemdCgroup is chosen, so nothing is said about it.
    assert!(!actions.iter().any(|a| matches!(a, Action::Cgroup { .. })));
    assert!(warnings(&actions).is_empty(), "{actions:?}");
    assert_containerd_has_flox_16(&host.config_path());
    // The check sees an options table when there is one (what the 1.6 form must not have).
    let with_options = host.dir.path().join("with-options.toml");
    std::fs::write(
        &with_options,
        format!(
            "{}\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.flox.options]\nSystemdCgroup = true\n",
            host.config()
        ),
    )
    .unwrap();
    let dump = containerd_dump(&with_options);
    let flox = &dump["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["flox"];
    assert_eq!(flox["options"]["SystemdCgroup"].as_bool(), Some(true));
}

/// A node installed with the 1.7 form (or by an earlier kof) on containerd 1.6 is converted:
/// the type changes, `runtime_path` and the options table go, everything else stays; then the
/// file is stable.
#[test]
fn containerd_16_converts_an_installed_runtime_path_form() {
    let original = fixture("installed-v2.toml");
    let host = Host::new(Some(&original));
    let actions = host.install(&on_16(host.options()));
    let expected = original
        .replace(
            "    runtime_type = \"io.containerd.runc.v2\"\n    runtime_path = \"/usr/local/bin/containerd-shim-flox-v2\"\n",
            "    runtime_type = \"io.containerd.flox.v2\"\n",
        )
        .replace(
            "\n  [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.flox.options]\n    SystemdCgroup = false\n",
            "",
        );
    assert_ne!(expected, original);
    assert_eq!(host.config(), expected);
    let changes: Vec<String> = actions
        .iter()
        .filter_map(|a| match a {
            Action::RuntimeKey { change, .. } => Some(change.to_string()),
            _ => None,
        })
        .collect();
    let flox = "plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.flox";
    assert_eq!(
        changes,
        [
            format!("set {flox}.runtime_type = \"io.containerd.flox.v2\" (was \"io.containerd.runc.v2\")"),
            format!("removed {flox}.runtime_path (was \"/usr/local/bin/containerd-shim-flox-v2\")"),
            format!("removed {flox}.options (was {{ SystemdCgroup = false }})"),
        ]
    );
    assert_eq!(host.backups().len(), 1);
    let dump = assert_containerd_has_flox_16(&host.config_path());
    let flox_dump = &dump["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["flox"];
    assert_eq!(
        flox_dump["privileged_without_host_devices"].as_bool(),
        Some(false)
    );

    // Idempotent: byte-identical, no backup, no change.
    let actions = host.install(&on_16(host.options()));
    assert_eq!(host.config(), expected);
    assert_eq!(host.backups().len(), 1);
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::RuntimeUpToDate { .. })));

    // containerd upgraded to 1.7: converted back to the runtime_path form.
    host.install(&host.options());
    assert_containerd_has_flox(&host.config_path(), false);
}

/// On a systemd-cgroup node, containerd 1.6 gets no SystemdCgroup for flox (it cannot pass it
/// on): one warning says so.
#[test]
fn containerd_16_warns_when_runc_uses_systemd_cgroups() {
    for name in ["systemd-runc-v2.toml", "old-flox-path.toml"] {
        let host = Host::new(Some(&fixture(name)));
        let actions = host.install(&on_16(host.options()));
        let w = warnings(&actions);
        assert_eq!(w.len(), 1, "{name}: {w:?}");
        assert!(
            w[0].starts_with("the node's \"runc\" runtime uses SystemdCgroup = true, but containerd 1.6.20 cannot pass options to the flox runtime"),
            "{}",
            w[0]
        );
        assert!(
            w[0].contains("outside their pod's slice")
                && w[0].contains("containerd 1.7 or later is needed"),
            "{}",
            w[0]
        );
        assert!(!w[0].contains('\n'));
        assert!(!host.config().contains("runtimes.flox.options"), "{name}");
        assert_containerd_has_flox_16(&host.config_path());
    }
    // The flag stands for the node's driver when the config says nothing.
    let host = Host::new(Some("version = 2\n"));
    let mut opts = on_16(host.options());
    opts.systemd_cgroup_fallback = Some(true);
    let actions = host.install(&opts);
    let w = warnings(&actions);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].starts_with("--systemd-cgroup says the node uses SystemdCgroup = true"));
    // cgroupfs nodes: nothing to warn about.
    let host = Host::new(Some(&fixture("installed-v2.toml")));
    assert!(warnings(&host.install(&on_16(host.options()))).is_empty());
}

/// containerd 1.6 finds the shim only on its PATH, by its name.
#[test]
fn containerd_16_warns_when_the_shim_is_not_on_containerds_path() {
    let host = Host::new(Some("version = 2\n"));
    let mut opts = on_16(host.options());
    opts.bin_dir = PathBuf::from("/opt/kof/bin");
    let actions = host.install(&opts);
    let w = warnings(&actions);
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(
        w[0],
        "containerd 1.6.20 runs the flox runtime as containerd-shim-flox-v2 from its PATH (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin, systemd's default), but the shim is installed as /opt/kof/bin/containerd-shim-flox-v2: install it as /usr/local/bin/containerd-shim-flox-v2"
    );
}

#[test]
fn a_version_3_config_with_containerd_1_is_refused() {
    let original = fixture("containerd2-v3.toml");
    let host = Host::new(Some(&original));
    let e = install(&on_16(host.options()), &mut |_| {}).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: config version 3 is for containerd 2.x, but containerd is 1.6.20; check --containerd-version",
            host.config_path().display()
        )
    );
    assert_eq!(host.config(), original);
}
