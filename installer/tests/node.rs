//! `kof-node-install` on a node with a real containerd of each release (Debian 12's 1.6,
//! trixie's 1.7, sid's 2.x: `kof_harness::release`), restarted by the installer's own restart
//! command, then driven through CRI: after the install CRI runs a plain pod and lists the `flox`
//! runtime handler. Cases: no config file, a minimal CRI section, an EKS-style version 2 config,
//! a containerd 2 version 3 config, an `imports` drop-in; a config the check must refuse (the
//! node keeps its old config and keeps serving); and the rollback when CRI does not come up
//! after the restart.
//!
//! The node here: a directory holding `etc/containerd/config.toml` (the file the installer is
//! pointed at, with `--host-root /`), and a "service" that the restart command restarts. That
//! command runs this test binary again ([`restart_entry`]), which stops the node's containerd
//! and starts it from the node's config, as `systemctl restart containerd` would, with what this
//! machine needs on top, added to the text containerd is started with and never to the node's
//! file: private `root`, `state` and sockets, the local sandbox image, and
//! `restrict_oom_score_adj = true` (this machine refuses to lower `oom_score_adj` to CRI's
//! -998 for sandboxes, so runc fails without it). None of these touches the runtimes.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kof_harness::containerd::{shim_pids_for, CRI_NAMESPACE, DEFAULT_SANDBOX_IMAGE};
use kof_harness::cri::{ContainerSpec, CriClient, PodSpec};
use kof_harness::images;
use kof_harness::release::{ConfigForm, Release};
use kof_node_install::check::dump_problem;
use toml_edit::{DocumentMut, Item, Table};

const NODE_ENV: &str = "KOF_TEST_NODE";
const RELEASE_ENV: &str = "KOF_TEST_NODE_RELEASE";

kof_harness::for_each_release!(
    no_config_file,
    minimal_cri_section,
    eks_style_version_2,
    containerd_2_version_3,
    imports_drop_in,
    a_config_the_check_refuses_is_never_installed,
    rollback_when_cri_does_not_come_up,
    what_each_release_does_without_a_default_runtime_table,
);

/// The node's containerd service: `restart` (run by the installer's restart command).
#[test]
fn restart_entry() {
    let (Some(dir), Some(release)) = (std::env::var_os(NODE_ENV), std::env::var(RELEASE_ENV).ok())
    else {
        return; // Only a restart command runs it for real.
    };
    let release: Release = release.parse().unwrap();
    let node = Paths::new(Path::new(&dir));
    node.stop();
    node.start(release);
}

/// The files of a node.
struct Paths {
    dir: PathBuf,
}

impl Paths {
    fn new(dir: &Path) -> Paths {
        Paths {
            dir: dir.to_owned(),
        }
    }
    fn config(&self) -> PathBuf {
        self.dir.join("etc/containerd/config.toml")
    }
    fn socket(&self) -> PathBuf {
        self.dir.join("c.sock")
    }
    fn pidfile(&self) -> PathBuf {
        self.dir.join("containerd.pid")
    }
    fn log(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }
    /// When present, the next start runs containerd without its CRI plugin (a CRI failure that
    /// no check of the file can see), and the marker is removed.
    fn fail_next(&self) -> PathBuf {
        self.dir.join("fail-next-restart")
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pidfile())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn stop(&self) {
        let Some(pid) = self.pid() else { return };
        let _ = std::fs::remove_file(self.pidfile());
        let _ = Command::new("kill").arg(pid.to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while alive(pid) {
            if Instant::now() > deadline {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// containerd started from the node's config plus this machine's needs (module doc), in
    /// its own process group (it outlives the restart command), then waited for like systemd.
    fn start(&self, release: Release) {
        let text = std::fs::read_to_string(self.config()).unwrap_or_default();
        let mut doc: DocumentMut = text.parse().unwrap();
        let version = match doc.get("version").and_then(Item::as_integer) {
            Some(v) => v,
            None if text.trim().is_empty() => match release.config_form() {
                ConfigForm::V2 => 2,
                ConfigForm::V3 => 3,
            },
            None => 1,
        };
        doc["version"] = toml_edit::value(version);
        let s = |p: PathBuf| toml_edit::value(p.to_string_lossy().into_owned());
        doc["root"] = s(self.dir.join("root"));
        doc["state"] = s(self.dir.join("state"));
        set(&mut doc, &["grpc"], "address", s(self.socket()));
        set(
            &mut doc,
            &["ttrpc"],
            "address",
            s(self.dir.join("c.sock.ttrpc")),
        );
        let (runtime, images) = match version {
            1 => ("cri", vec!["cri"]),
            2 => (
                "io.containerd.grpc.v1.cri",
                vec!["io.containerd.grpc.v1.cri"],
            ),
            _ => (
                "io.containerd.cri.v1.runtime",
                vec!["io.containerd.cri.v1.images", "pinned_images"],
            ),
        };
        set(
            &mut doc,
            &["plugins", runtime],
            "restrict_oom_score_adj",
            toml_edit::value(true),
        );
        let mut image_path = vec!["plugins"];
        image_path.extend(images);
        let key = if version == 3 {
            "sandbox"
        } else {
            "sandbox_image"
        };
        set(
            &mut doc,
            &image_path,
            key,
            toml_edit::value(DEFAULT_SANDBOX_IMAGE),
        );
        if std::fs::remove_file(self.fail_next()).is_ok() {
            let cri = if version == 3 {
                "io.containerd.cri.v1.runtime"
            } else {
                "io.containerd.grpc.v1.cri"
            };
            doc["disabled_plugins"] = toml_edit::value(toml_edit::Array::from_iter([cri]));
        }
        let run = self.dir.join("run.toml");
        std::fs::write(&run, doc.to_string()).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        let mut path = std::ffi::OsString::from(release.bin_dir());
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());
        // Never waited for here: it outlives this process, as a service does; `stop` ends it.
        #[allow(clippy::zombie_processes)]
        let child = Command::new(release.containerd())
            .arg("--config")
            .arg(&run)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        std::fs::write(self.pidfile(), child.id().to_string()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let ok = Command::new(release.ctr())
                .arg("-a")
                .arg(self.socket())
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("containerd did not answer on {}", self.socket().display());
    }
}

/// Sets `key` in the table at `path` (created when missing; dotted or implicit tables kept).
fn set(doc: &mut DocumentMut, path: &[&str], key: &str, value: Item) {
    let mut table: &mut Table = doc.as_table_mut();
    for k in path {
        let entry = table.entry(k).or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        });
        table = entry.as_table_mut().expect("a [section]");
    }
    table.insert(key, value);
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X")
    })
}

/// A node with `config` (`{D}` replaced by its directory; `None`: no file), its containerd
/// started.
struct Node {
    dir: tempfile::TempDir,
    release: Release,
}

impl Node {
    fn new(release: Release, config: Option<&str>, dropins: &[(&str, &str)]) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("kof-n-")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path().display().to_string();
        std::fs::create_dir_all(dir.path().join("etc/containerd/config.d")).unwrap();
        if let Some(c) = config {
            std::fs::write(
                dir.path().join("etc/containerd/config.toml"),
                c.replace("{D}", &d),
            )
            .unwrap();
        }
        for (name, text) in dropins {
            std::fs::write(
                dir.path().join("etc/containerd/config.d").join(name),
                text.replace("{D}", &d),
            )
            .unwrap();
        }
        std::fs::write(
            dir.path().join("containerd-shim-flox-v2"),
            "#!/bin/sh\nexit 1\n",
        )
        .unwrap();
        let node = Node { dir, release };
        node.paths().start(release);
        let archive = node.dir.path().join("pause.tar");
        images::write_pause_image(&archive, DEFAULT_SANDBOX_IMAGE).unwrap();
        let out = Command::new(release.ctr())
            .arg("-a")
            .arg(node.paths().socket())
            .args(["-n", CRI_NAMESPACE, "images", "import"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        node
    }

    fn paths(&self) -> Paths {
        Paths::new(self.dir.path())
    }

    fn config(&self) -> Option<String> {
        std::fs::read_to_string(self.paths().config()).ok()
    }

    fn restart_command(&self) -> String {
        format!(
            "env {NODE_ENV}={} {RELEASE_ENV}={} {} --exact restart_entry --nocapture --test-threads=1 -q",
            self.dir.path().display(),
            self.release.name(),
            std::env::current_exe().unwrap().display()
        )
    }

    fn install(&self) -> Output {
        let containerd = self.release.containerd();
        Command::new(env!("CARGO_BIN_EXE_kof-node-install"))
            .args(["--host-root", "/"])
            .arg("--shim")
            .arg(self.dir.path().join("containerd-shim-flox-v2"))
            .arg("--bin-dir")
            .arg(self.dir.path().join("bin"))
            .arg("--containerd-config")
            .arg(self.paths().config())
            .arg("--containerd-version-command")
            .arg(format!("{} --version", containerd.display()))
            .arg("--containerd-check-command")
            .arg(format!(
                "{} --config {{path}} config dump",
                containerd.display()
            ))
            .arg("--restart-command")
            .arg(self.restart_command())
            .arg("--containerd-socket")
            .arg(self.paths().socket())
            .args(["--cri-timeout-secs", "30"])
            .output()
            .unwrap()
    }

    /// The runtime handlers CRI lists (runtime_handlers, and the verbose config's runtimes).
    fn handlers(&self, cri: &CriClient) -> Vec<String> {
        let mut c = cri.runtime_client();
        let resp = cri
            .block_on(c.status(kof_harness::cri_api::StatusRequest { verbose: true }))
            .unwrap()
            .into_inner();
        let mut names: Vec<String> = resp
            .runtime_handlers
            .iter()
            .map(|h| h.name.clone())
            .collect();
        if let Some(config) = resp.info.get("config") {
            let v: serde_json::Value = serde_json::from_str(config).unwrap();
            if let Some(r) = v["containerd"]["runtimes"].as_object() {
                names.extend(r.keys().cloned());
            }
        }
        names.sort();
        names.dedup();
        names
    }

    /// A plain pod (runc, the pause image as its container) runs through CRI; returns the
    /// runtime handlers CRI lists.
    fn serves_a_plain_pod(&self, name: &str) -> Vec<String> {
        let cri = CriClient::connect(&self.paths().socket()).unwrap();
        let pod = PodSpec::new(name, &self.dir.path().join("logs").join(name));
        let sandbox = cri
            .run_pod_sandbox(&pod)
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", self.release, self.log_tail()));
        let spec = ContainerSpec::new("c", DEFAULT_SANDBOX_IMAGE);
        let id = cri.create_container(&sandbox, &spec, &pod).unwrap();
        cri.start_container(&id).unwrap();
        let status = cri.container_status(&id).unwrap();
        assert_eq!(
            status.state,
            kof_harness::cri_api::ContainerState::ContainerRunning as i32,
            "{status:?}"
        );
        cri.stop_container(&id, 0).unwrap();
        cri.remove_container(&id).unwrap();
        cri.stop_pod_sandbox(&sandbox).unwrap();
        cri.remove_pod_sandbox(&sandbox).unwrap();
        self.handlers(&cri)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.paths().log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Installs, and checks the outcome: success, a restart, CRI serving a plain pod and the
    /// flox handler, and a second run changing nothing.
    fn install_and_serve(&self) -> String {
        let out = self.install();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{}: install failed:\n{stdout}\n{}\n{}",
            self.release,
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        assert!(stdout.contains("restarted containerd"), "{stdout}");
        assert!(stdout.contains("CRI answers at"), "{stdout}");
        let handlers = self.serves_a_plain_pod("after");
        assert!(handlers.iter().any(|h| h == "flox"), "{handlers:?}");
        assert!(handlers.iter().any(|h| h == "runc"), "{handlers:?}");
        let config = self.config().unwrap();
        let again = self.install();
        assert!(again.status.success());
        assert!(
            !String::from_utf8_lossy(&again.stdout).contains("restarted"),
            "second run restarted"
        );
        assert_eq!(self.config().unwrap(), config);
        eprintln!("{}: installed\n{stdout}", self.release);
        config
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let socket = self.paths().socket();
        self.paths().stop();
        for pid in shim_pids_for(&socket) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        let mut mounts = kof_harness::containerd::mounts_under(self.dir.path());
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

fn version_line(release: Release) -> &'static str {
    match release.config_form() {
        ConfigForm::V2 => "version = 2",
        ConfigForm::V3 => "version = 3",
    }
}

fn no_config_file(release: Release) {
    let node = Node::new(release, None, &[]);
    node.serves_a_plain_pod("before");
    let config = node.install_and_serve();
    assert!(config.contains("runtimes.runc]"), "{config}");
}

fn minimal_cri_section(release: Release) {
    let node = Node::new(
        release,
        Some("version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  enable_selinux = false\n"),
        &[],
    );
    node.serves_a_plain_pod("before");
    let config = node.install_and_serve();
    assert!(config.contains("runtimes.runc]"), "{config}");
}

fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(p)
        .unwrap()
        // No systemd runs on this machine: runc's cgroupfs driver.
        .replace("SystemdCgroup = true", "SystemdCgroup = false")
        .replace("/etc/containerd/config.d", "{D}/etc/containerd/config.d")
}

fn eks_style_version_2(release: Release) {
    let original = fixture("eks-al2.toml");
    let node = Node::new(release, Some(&original), &[]);
    node.serves_a_plain_pod("before");
    node.install_and_serve();
}

fn containerd_2_version_3(release: Release) {
    if release.config_form() != ConfigForm::V3 {
        eprintln!("{release}: a version 3 config is for containerd 2.x only (kof refuses it on 1.x: containerd_config.rs)");
        return;
    }
    let node = Node::new(release, Some(&fixture("containerd2-v3.toml")), &[]);
    node.serves_a_plain_pod("before");
    node.install_and_serve();
}

fn imports_drop_in(release: Release) {
    let main = format!(
        "{}\nimports = [\"{{D}}/etc/containerd/config.d/*.toml\"]\n",
        version_line(release)
    );
    let dropin = format!("{}\n[debug]\n  level = \"debug\"\n", version_line(release));
    let node = Node::new(release, Some(&main), &[("10-debug.toml", &dropin)]);
    node.serves_a_plain_pod("before");
    node.install_and_serve();
}

/// A drop-in registers its own `flox` (another type) in the CRI section: containerd 1.x takes
/// the drop-in's whole section, 2.x merges it over the file's; either way the flox runtime
/// containerd would run is not kof's, and the check refuses the config.
fn a_config_the_check_refuses_is_never_installed(release: Release) {
    let (plugin, version) = match release.config_form() {
        ConfigForm::V2 => ("io.containerd.grpc.v1.cri", 2),
        ConfigForm::V3 => ("io.containerd.cri.v1.runtime", 3),
    };
    let main =
        format!("version = {version}\nimports = [\"{{D}}/etc/containerd/config.d/*.toml\"]\n");
    // containerd 1.x runs the drop-in's CRI section alone: it carries this machine's needs.
    let site = match release.config_form() {
        ConfigForm::V2 => format!(
            "[plugins.\"{plugin}\"]\nsandbox_image = \"{DEFAULT_SANDBOX_IMAGE}\"\nrestrict_oom_score_adj = true\n"
        ),
        ConfigForm::V3 => String::new(),
    };
    let dropin = format!(
        "version = {version}\n{site}[plugins.\"{plugin}\".containerd.runtimes.runc]\nruntime_type = \"io.containerd.runc.v2\"\n[plugins.\"{plugin}\".containerd.runtimes.flox]\nruntime_type = \"io.containerd.kata.v2\"\n"
    );
    let node = Node::new(release, Some(&main), &[("50-flox.toml", &dropin)]);
    node.serves_a_plain_pod("before");
    let before = node.config();
    let out = node.install();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("left as it was: checked with"), "{stderr}");
    assert!(stderr.contains("config dump"), "{stderr}");
    assert!(stderr.contains("io.containerd.kata.v2"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("restarted"));
    assert_eq!(node.config(), before);
    node.serves_a_plain_pod("still");
    eprintln!("{release}: refused: {stderr}");
}

fn rollback_when_cri_does_not_come_up(release: Release) {
    let original =
        "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  enable_selinux = false\n";
    let node = Node::new(release, Some(original), &[]);
    std::fs::write(node.paths().fail_next(), "").unwrap();
    let out = node.install();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("did not serve CRI with the flox runtime within 30s after the restart; restored the old"),
        "{stderr}"
    );
    assert!(stderr.contains("which answers CRI again"), "{stderr}");
    assert_eq!(node.config().as_deref(), Some(original));
    assert!(!node.paths().fail_next().exists());
    let handlers = node.serves_a_plain_pod("after-rollback");
    assert!(!handlers.iter().any(|h| h == "flox"), "{handlers:?}");
    eprintln!("{release}: rolled back: {stderr}");
}

/// What the default-runtime check is for, per release: a file naming only flox.
fn what_each_release_does_without_a_default_runtime_table(release: Release) {
    let dir = tempfile::tempdir().unwrap();
    let (plugin, version) = match release.config_form() {
        ConfigForm::V2 => ("io.containerd.grpc.v1.cri", 2),
        ConfigForm::V3 => ("io.containerd.cri.v1.runtime", 3),
    };
    let file = dir.path().join("flox-only.toml");
    std::fs::write(
        &file,
        format!("version = {version}\n[plugins.\"{plugin}\".containerd.runtimes.flox]\nruntime_type = \"io.containerd.runc.v2\"\n"),
    )
    .unwrap();
    let out = Command::new(release.containerd())
        .arg("--config")
        .arg(&file)
        .args(["config", "dump"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let problem = dump_problem(
        &String::from_utf8_lossy(&out.stdout),
        "io.containerd.runc.v2",
    );
    match release.config_form() {
        // 1.6 and 1.7 replace their default runtimes with the file's.
        ConfigForm::V2 => assert!(
            problem
                .as_deref()
                .is_some_and(|p| p.contains("no table for the default runtime \"runc\"")),
            "{problem:?}"
        ),
        // 2.x merges the file's runtimes into its defaults.
        ConfigForm::V3 => assert_eq!(problem, None),
    }
}
