//! The `kof-node-install` binary end to end, against a temporary host root: what it prints,
//! what it writes, its backups, its restart (a recorder script), idempotency, and its one-line
//! errors. `probe` is run against a missing daemon.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const NODE_CONFIG: &str = r#"floxhub_url = "https://api.flox.dev/git"
substituters = ["https://cache.nixos.org", "https://cache.flox.dev"]
trusted_public_keys = [
  "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=",
  "flox-cache-public-1:7F4OyH7ZCnFhcze3fJdfyXYLQw/aV7GEed86nQ7IsOs=",
]
"#;

struct Node {
    dir: tempfile::TempDir,
    /// The containerd checking new configs (`containerd --config {path} config dump`).
    checker: PathBuf,
    /// A real containerd whose CRI (with a flox runtime) answers the installer's wait after
    /// the recorder's "restart".
    cri: Option<kof_harness::containerd::Containerd>,
}

impl Node {
    /// A host root with containerd's config (when given), and in the "image": the shim,
    /// kof-store, the node config and a restart recorder.
    fn new(containerd_config: Option<&str>) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("host/etc/containerd")).unwrap();
        if let Some(c) = containerd_config {
            std::fs::write(d.join("host/etc/containerd/config.toml"), c).unwrap();
        }
        std::fs::create_dir_all(d.join("image")).unwrap();
        std::fs::write(d.join("image/containerd-shim-flox-v2"), b"shim v1").unwrap();
        std::fs::write(d.join("image/kof-store"), b"kof-store v1").unwrap();
        std::fs::write(d.join("image/config.toml"), NODE_CONFIG).unwrap();
        let recorder = d.join("image/restart.sh");
        std::fs::write(
            &recorder,
            format!(
                "#!/bin/sh\necho \"restart $*\" >> {}\n",
                d.join("restarts.log").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&recorder, std::fs::Permissions::from_mode(0o755)).unwrap();
        Node {
            dir,
            checker: PathBuf::from("/usr/bin/containerd"),
            cri: None,
        }
    }

    /// With a real containerd answering CRI with a flox runtime.
    fn with_cri(mut self) -> Node {
        self.cri = Some(
            kof_harness::containerd::Containerd::start(
                kof_harness::containerd::ContainerdOptions {
                    flox_shim: Some(self.path("image/containerd-shim-flox-v2")),
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        // At the default socket's place under the host root.
        let run = self.path("host/run/containerd");
        std::fs::create_dir_all(&run).unwrap();
        let socket = self.cri.as_ref().unwrap().socket().to_owned();
        std::os::unix::fs::symlink(socket, run.join("containerd.sock")).unwrap();
        self
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn run(&self, extra: &[&str]) -> Output {
        let d = self.dir.path();
        Command::new(env!("CARGO_BIN_EXE_kof-node-install"))
            .arg("--host-root")
            .arg(d.join("host"))
            .arg("--shim")
            .arg(d.join("image/containerd-shim-flox-v2"))
            .arg("--kof-store")
            .arg(d.join("image/kof-store"))
            .arg("--node-config")
            .arg(d.join("image/config.toml"))
            // Tests choose containerd's release; a test's own --containerd-version wins.
            .arg("--containerd-version=1.7.2")
            .arg("--restart-command")
            .arg(format!(
                "{} containerd",
                d.join("image/restart.sh").display()
            ))
            .arg("--containerd-check-command")
            .arg(format!(
                "{} --config {{path}} config dump",
                self.checker.display()
            ))
            .args(["--cri-timeout-secs", "5"])
            .args(extra)
            .output()
            .unwrap()
    }

    fn restarts(&self) -> usize {
        std::fs::read_to_string(self.path("restarts.log"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    fn files_matching(&self, dir: &str, needle: &str) -> Vec<PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(self.path(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().contains(needle))
            .collect();
        v.sort();
        v
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn installs_then_changes_nothing_then_updates_only_what_changed() {
    let original = "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n  SystemdCgroup = true\n";
    let node = Node::new(Some(original)).with_cri();
    let out = node.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "",
        "no import, a non-ELF stand-in shim: no warning"
    );
    let host_shim = node.path("host/usr/local/bin/containerd-shim-flox-v2");
    let host_store = node.path("host/usr/local/bin/kof-store");
    let host_config = node.path("host/etc/containerd/config.toml");
    let text = stdout(&out);
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines[0], format!("created {}", host_shim.display()));
    assert_eq!(lines[1], format!("created {}", host_store.display()));
    assert_eq!(
        lines[2],
        format!(
            "created {}",
            node.path("host/etc/kof/config.toml").display()
        )
    );
    assert_eq!(
        lines[3],
        "containerd 1.7.2: flox runtime of type io.containerd.runc.v2 with runtime_path"
    );
    assert_eq!(
        lines[4],
        "SystemdCgroup = true, as the node's \"runc\" runtime has it"
    );
    let backups = node.files_matching("host/etc/containerd", "kof-backup-");
    assert_eq!(backups.len(), 1);
    assert_eq!(std::fs::read_to_string(&backups[0]).unwrap(), original);
    assert_eq!(
        lines[5],
        format!(
            "checked the new config: /usr/bin/containerd --config {}.kof-check config dump loads it, with the flox runtime and a table for the default runtime",
            host_config.display()
        )
    );
    assert_eq!(
        lines[6],
        format!(
            "replaced {} (old one kept as {})",
            host_config.display(),
            backups[0].display()
        )
    );
    assert!(lines[7].starts_with("set plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.flox.runtime_type = \"io.containerd.runc.v2\" in "));
    assert_eq!(
        lines[lines.len() - 2],
        format!(
            "restarted containerd ({} containerd)",
            node.path("image/restart.sh").display()
        )
    );
    // The wait for CRI: the real containerd the default socket leads to.
    assert!(
        lines.last().unwrap().starts_with(&format!(
            "CRI answers at {} with runtime handlers [",
            node.path("host/run/containerd/containerd.sock").display()
        )) && lines.last().unwrap().contains("\"flox\""),
        "{text}"
    );
    assert_eq!(lines.len(), 14, "{text}");
    assert_eq!(node.restarts(), 1);
    assert_eq!(std::fs::read(&host_shim).unwrap(), b"shim v1");
    assert_eq!(mode(&host_shim), 0o755);
    assert_eq!(mode(&host_store), 0o755);
    assert_eq!(
        std::fs::read_to_string(node.path("host/etc/kof/config.toml")).unwrap(),
        NODE_CONFIG
    );
    let installed = std::fs::read_to_string(&host_config).unwrap();
    assert!(installed.contains("runtime_path = \"/usr/local/bin/containerd-shim-flox-v2\""));

    // Second run: nothing written, no backup, no restart.
    let out = node.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.lines().all(|l| l.starts_with("unchanged ")
            || l.starts_with("SystemdCgroup = ")
            || l.starts_with("containerd 1.7.2: ")),
        "{text}"
    );
    assert_eq!(node.restarts(), 1);
    assert_eq!(std::fs::read_to_string(&host_config).unwrap(), installed);
    assert_eq!(
        node.files_matching("host/etc/containerd", "kof-backup-"),
        backups
    );
    assert!(node
        .files_matching("host/etc/kof", "kof-backup-")
        .is_empty());

    // A new shim and a new node config: replaced (the config backed up), containerd's config
    // untouched, so no restart.
    std::fs::write(node.path("image/containerd-shim-flox-v2"), b"shim v2").unwrap();
    let new_config = NODE_CONFIG.replace(
        "https://cache.flox.dev\"]",
        "https://cache.flox.dev\"]\nprefetch = \"none\"",
    );
    std::fs::write(node.path("image/config.toml"), &new_config).unwrap();
    let out = node.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("replaced {}\n", host_shim.display())),
        "{text}"
    );
    assert!(
        text.contains(&format!("unchanged {}\n", host_store.display())),
        "{text}"
    );
    assert_eq!(std::fs::read(&host_shim).unwrap(), b"shim v2");
    let kof_backups = node.files_matching("host/etc/kof", "kof-backup-");
    assert_eq!(kof_backups.len(), 1);
    assert_eq!(
        std::fs::read_to_string(&kof_backups[0]).unwrap(),
        NODE_CONFIG
    );
    assert_eq!(
        std::fs::read_to_string(node.path("host/etc/kof/config.toml")).unwrap(),
        new_config
    );
    assert_eq!(node.restarts(), 1);
    // No temporary file anywhere.
    for dir in ["host/usr/local/bin", "host/etc/kof", "host/etc/containerd"] {
        assert!(node.files_matching(dir, "kof-tmp").is_empty(), "{dir}");
    }
}

/// A dynamically linked shim (this very binary, linked against the build machine's glibc) is
/// installed with a warning naming its loader; the stand-in shims of the other tests are not
/// ELF and get none.
#[test]
fn a_dynamically_linked_shim_is_warned_about() {
    let node = Node::new(Some("version = 2\n"));
    std::fs::copy(
        env!("CARGO_BIN_EXE_kof-node-install"),
        node.path("image/containerd-shim-flox-v2"),
    )
    .unwrap();
    let out = node.run(&["--no-restart"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    let warning = format!(
        "kof-node-install: WARNING: {} is dynamically linked (loader /lib",
        node.path("image/containerd-shim-flox-v2").display()
    );
    assert!(err.starts_with(&warning), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("build it static (musl)"), "{err}");
}

#[test]
fn no_restart_says_a_restart_is_needed() {
    let node = Node::new(None);
    let out = node.run(&["--no-restart"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).ends_with("containerd's config changed but --no-restart was given: restart containerd for the flox runtime to exist\n"));
    assert_eq!(node.restarts(), 0);
    assert!(node.path("host/etc/containerd/config.toml").exists());
}

#[test]
fn containerd_version_chooses_the_new_config_version() {
    let mut node = Node::new(None);
    let sid = kof_harness::release::Release::Sid;
    if !kof_harness::release::should_test(sid).unwrap() {
        return; // reported loudly by should_test
    }
    node.checker = sid.containerd();
    let out = node.run(&["--no-restart", "--containerd-version", "v2.1.3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(node.path("host/etc/containerd/config.toml")).unwrap();
    assert!(text.starts_with("version = 3\n"), "{text}");
    assert!(text.contains("io.containerd.cri.v1.runtime"), "{text}");
    assert!(text.contains("runtime_path = "), "{text}");

    let out = node.run(&["--containerd-version", "0.9"]);
    assert!(!out.status.success());
    assert_eq!(
        stderr(&out),
        "kof-node-install: containerd release \"0.9\": kof knows containerd 1.x (config version 2) and 2.x (config version 3)\n"
    );
}

/// `auto` asks the real containerd of the test machine (1.6.20): the 1.6 form, on a new config
/// and over an existing config in the 1.7 form alike; the result is read by that containerd.
#[test]
fn auto_detects_containerd_16_and_registers_the_shim_on_path_form() {
    let auto = [
        "--no-restart",
        "--containerd-version",
        "auto",
        "--containerd-version-command",
        "containerd --version",
    ];
    let version = Command::new("containerd")
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8(version.stdout).unwrap();
    assert!(
        version.contains(" 1.6."),
        "this test expects containerd 1.6 on the machine: {version}"
    );
    let installed_17 = r#"version = 2

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.flox]
runtime_type = "io.containerd.runc.v2"
runtime_path = "/usr/local/bin/containerd-shim-flox-v2"
pod_annotations = ["flox.dev/*"]
container_annotations = ["flox.dev/*"]

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.flox.options]
SystemdCgroup = false
"#;
    let flox = r#"[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.flox]
runtime_type = "io.containerd.flox.v2"
pod_annotations = ["flox.dev/*"]
container_annotations = ["flox.dev/*"]
"#;
    // containerd's default runtime, which the file names no table for.
    let runc = r#"[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
SystemdCgroup = false
"#;
    for before in [None, Some(installed_17)] {
        let expected = match before {
            None => format!("version = 2\n\n{runc}\n{flox}"),
            Some(_) => format!("version = 2\n\n{flox}\n{runc}"),
        };
        let node = Node::new(before);
        let out = node.run(&auto);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(
            text.contains(" ignores runtime_path: flox runtime of type io.containerd.flox.v2 (containerd-shim-flox-v2 found on containerd's PATH), without options\n"),
            "{text}"
        );
        let config = node.path("host/etc/containerd/config.toml");
        assert_eq!(std::fs::read_to_string(&config).unwrap(), expected);
        let dump = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .args(["config", "dump"])
            .output()
            .unwrap();
        assert!(dump.status.success(), "{}", stderr(&dump));
        let dump = stdout(&dump);
        assert!(
            dump.contains("runtime_type = \"io.containerd.flox.v2\""),
            "{dump}"
        );
        // Second run: nothing changes.
        let out = node.run(&auto);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(!stdout(&out).contains("set "), "{}", stdout(&out));
        assert_eq!(std::fs::read_to_string(&config).unwrap(), expected);
    }
}

/// The release decides the registration, so a failing detection is an error on every node,
/// naming --containerd-version; given, no detection runs.
#[test]
fn an_unknown_containerd_version_is_an_error_unless_given() {
    let failing = [
        "--containerd-version",
        "auto",
        "--containerd-version-command",
        "/nonexistent/containerd --version",
    ];
    for before in [None, Some("version = 2\n")] {
        let node = Node::new(before);
        let out = node.run(&failing);
        assert!(!out.status.success());
        assert_eq!(
            stderr(&out),
            "kof-node-install: asking containerd its version with /nonexistent/containerd --version: cannot run it: No such file or directory (os error 2); the flox runtime's registration depends on it (containerd 1.6 ignores runtime_path): give the node's release with --containerd-version (e.g. 1.6.20, 1.7.2, 2.0.0)\n"
        );
        assert_eq!(node.restarts(), 0);
        let config = node.path("host/etc/containerd/config.toml");
        assert_eq!(std::fs::read_to_string(&config).ok().as_deref(), before);
    }
    // Output without a release number.
    let node = Node::new(Some("version = 2\n"));
    let out = node.run(&[
        "--containerd-version",
        "auto",
        "--containerd-version-command",
        "echo containerd",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no release number in its output \"containerd\""),
        "{}",
        stderr(&out)
    );
    // Given: the same failing command is never run.
    let node = Node::new(Some("version = 2\n"));
    let mut given = failing.to_vec();
    given.extend(["--no-restart", "--containerd-version", "1.6.20"]);
    let out = node.run(&given);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(node.path("host/etc/containerd/config.toml")).unwrap();
    assert!(text.contains("io.containerd.flox.v2"), "{text}");
}

#[test]
fn errors_are_one_line_naming_the_file() {
    // The shim is missing.
    let node = Node::new(Some("version = 2\n"));
    std::fs::remove_file(node.path("image/containerd-shim-flox-v2")).unwrap();
    let out = node.run(&[]);
    assert!(!out.status.success());
    assert_eq!(
        stderr(&out),
        format!(
            "kof-node-install: {}: cannot read the binary to install: No such file or directory (os error 2)\n",
            node.path("image/containerd-shim-flox-v2").display()
        )
    );

    // A node config kof-fetcherd would refuse: nothing of containerd's is touched.
    let node = Node::new(Some("version = 2\n"));
    std::fs::write(node.path("image/config.toml"), "substituter = [\"x\"]\n").unwrap();
    let out = node.run(&[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "kof-node-install: invalid config file {}: ",
            node.path("image/config.toml").display()
        )),
        "{err}"
    );
    assert!(err.contains("substituter"), "{err}");
    assert_eq!(
        std::fs::read_to_string(node.path("host/etc/containerd/config.toml")).unwrap(),
        "version = 2\n"
    );
    assert!(!node.path("host/etc/kof/config.toml").exists());

    // containerd's config is not TOML.
    let node = Node::new(Some("version = 2\n[plugins\n"));
    let out = node.run(&[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "kof-node-install: {}: not valid TOML: ",
            node.path("host/etc/containerd/config.toml").display()
        )),
        "{err}"
    );

    // The restart fails: the config is written (and backed up), the failure reported.
    let node = Node::new(Some("version = 2\n"));
    let out = node.run(&["--restart-command", "false"]);
    assert!(!out.status.success());
    assert_eq!(
        stderr(&out),
        "kof-node-install: restarting containerd: false failed (exit status: 1): nothing on stderr\n"
    );
    assert_eq!(
        node.files_matching("host/etc/containerd", "kof-backup-")
            .len(),
        1
    );
}

#[test]
fn probe_names_the_socket_when_no_daemon_answers() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fetcherd.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("socket = \"{}\"\n", socket.display())).unwrap();
    for ready in [false, true] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kof-node-install"));
        cmd.args(["probe", "--config"]).arg(&config);
        if ready {
            cmd.arg("--ready");
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        assert_eq!(
            stderr(&out),
            format!(
                "kof-node-install probe: cannot connect to kof-fetcherd at {}: No such file or directory (os error 2)\n",
                socket.display()
            )
        );
    }
}
