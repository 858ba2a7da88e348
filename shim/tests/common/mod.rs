//! A node for the shim's end-to-end tests: the fixture FloxHub and caches over HTTP on
//! loopback (from a copy of the fixtures whose floxmeta repositories a test may change, as a
//! `flox push` would), the real `kof-fetcherd` with its FUSE server, and a private containerd
//! with runc and the real `containerd-shim-flox-v2` registered. Dropping it stops all of them
//! and removes what they left.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kof_harness::containerd::{mounts_under, Containerd, ContainerdOptions};
pub use kof_harness::release::Release;
use kof_node_api::api::LeaseInfo;

/// The shim under test.
pub fn shim_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-flox-v2"))
}

/// How a [`Node`] is set up.
pub struct NodeOptions {
    /// The daemon's `prefetch`.
    pub prefetch: &'static str,
    /// `SystemdCgroup` of the `flox` runtime.
    pub systemd_cgroup: bool,
    /// The containerd release.
    pub release: Release,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            prefetch: "none",
            systemd_cgroup: false,
            release: Release::Bookworm,
        }
    }
}

impl NodeOptions {
    /// The defaults, on containerd `release`.
    pub fn on(release: Release) -> NodeOptions {
        NodeOptions {
            release,
            ..NodeOptions::default()
        }
    }
}

/// See the module doc. The daemon, its fixture server and directory are the shared
/// [`kof_testkit::Node`]'s (reached through `Deref`).
pub struct Node {
    /// The containerd namespace of this node's `ctr` containers: unique, because runc keeps
    /// the state of a runtime without options (the `flox` runtime as `ctr` runs it) under
    /// `/run/containerd/runc/<namespace>`, shared by every containerd on the machine.
    pub ns: String,
    pub containerd: Option<Containerd>,
    node: kof_testkit::Node,
}

impl std::ops::Deref for Node {
    type Target = kof_testkit::Node;
    fn deref(&self) -> &kof_testkit::Node {
        &self.node
    }
}

impl std::ops::DerefMut for Node {
    fn deref_mut(&mut self) -> &mut kof_testkit::Node {
        &mut self.node
    }
}

impl Node {
    /// Starts the fixture server (over a copy of the fixtures whose floxmeta repositories
    /// tests change), the daemon and containerd.
    pub fn new(opts: NodeOptions) -> Node {
        Node::with(
            kof_testkit::NodeOptions {
                prefetch: Some(opts.prefetch),
                download_attempts: Some(2),
                own_floxmeta: true,
                prefix: "kof-shim-test",
                ..kof_testkit::NodeOptions::default()
            },
            opts.systemd_cgroup,
            opts.release,
        )
    }

    /// The shared node `node_opts` describes (its fixture server, daemon and store), with
    /// containerd and the shim registered (`SystemdCgroup` as `systemd_cgroup`).
    pub fn with(
        node_opts: kof_testkit::NodeOptions,
        systemd_cgroup: bool,
        release: Release,
    ) -> Node {
        let node = kof_testkit::Node::new(node_opts);
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // containerd 1.6's CRI ignores `runtime_path` (it would run the plain runc shim): on
        // 1.6 the runtime is registered by type, the binary found on containerd's PATH. From
        // 1.7 on, the runtime is registered as Flox documents it (runc's type, `runtime_path`).
        let flox_runtime_type = match release {
            Release::Bookworm => "io.containerd.flox.v2".to_string(),
            _ => ContainerdOptions::default().flox_runtime_type,
        };
        let ctrd = Containerd::start(ContainerdOptions {
            release,
            flox_shim: Some(shim_bin()),
            flox_runtime_type,
            systemd_cgroup,
            env: vec![("KOF_CONFIG".into(), node.config.display().to_string())],
            ..ContainerdOptions::default()
        })
        .unwrap_or_else(|e| panic!("starting containerd: {e}"));
        Node {
            ns: format!("kof-test-{}-{n}", std::process::id()),
            containerd: Some(ctrd),
            node,
        }
    }

    pub fn ctrd(&self) -> &Containerd {
        self.containerd.as_ref().unwrap()
    }

    /// The shim's `containers_dir` (the default, under the store).
    pub fn containers_dir(&self) -> PathBuf {
        self.tmp.path().join("store/containers")
    }

    /// The fixture copy's floxmeta repository of `owner`.
    pub fn floxmeta(&self, owner: &str) -> PathBuf {
        self.fixtures_dir()
            .join("floxmeta")
            .join(owner)
            .join("floxmeta.git")
    }

    pub fn leases(&self) -> Vec<LeaseInfo> {
        self.client().leases().unwrap()
    }

    /// The daemon, FUSE server, shim and containerd logs.
    pub fn logs(&self) -> String {
        let mut out = self.node.logs();
        out.push_str("--- shim.log\n");
        out.push_str(
            &std::fs::read_to_string(self.containers_dir().join("shim.log")).unwrap_or_default(),
        );
        if let Some(c) = &self.containerd {
            out.push_str("--- containerd\n");
            out.push_str(&c.log());
        }
        out
    }

    /// This node's `ctr` (its containerd's release and socket, its namespace) with `args`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctrd()
            .ctr(&self.ns)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Starts a detached container `id` of environment `env` running `cmd` (`ctr run -d` on an
    /// empty root); panics with containerd's answer if it does not start.
    pub fn run_detached(&self, id: &str, env: &str, cmd: &[&str]) {
        let rootfs = empty_rootfs(self.dir());
        let ann = format!("flox.dev/environment={env}");
        let r = rootfs.display().to_string();
        let mut args = vec![
            "run",
            "-d",
            "--runtime",
            "io.containerd.flox.v2",
            "--annotation",
            &ann,
            "--rootfs",
            &r,
            id,
        ];
        args.extend_from_slice(cmd);
        let out = self.ctr(&args);
        assert!(
            out.status.success(),
            "{}\n{}",
            text(&out.stderr),
            self.logs()
        );
    }

    /// Waits until `cond` holds, or panics with `what` and the logs after a minute.
    pub fn wait_for(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let start = std::time::Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(60),
                "{what} did not happen\n{}",
                self.logs()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// `ctr run --rm --runtime io.containerd.flox.v2` of `cmd` on `rootfs` with `annotations`.
    pub fn ctr_run(
        &self,
        id: &str,
        rootfs: &Path,
        annotations: &[(&str, &str)],
        cmd: &[&str],
    ) -> Output {
        let mut c = self.ctrd().ctr(&self.ns);
        c.args(["run", "--rm", "--runtime", "io.containerd.flox.v2"]);
        for (k, v) in annotations {
            c.arg("--annotation").arg(format!("{k}={v}"));
        }
        c.arg("--rootfs").arg(rootfs).arg(id).args(cmd);
        c.stdin(Stdio::null()).output().unwrap()
    }

    /// Makes generation `generation` of `owner/name` live, the way `flox push` of a switch does:
    /// a commit appending a history entry to the environment's branch of the floxmeta
    /// repository the fixture FloxHub serves.
    pub fn set_live_generation(&self, owner: &str, name: &str, generation: u64) {
        let work = self
            .tmp
            .path()
            .join(format!("push-{owner}-{name}-{generation}"));
        let git = |args: &[&str], cwd: &Path| {
            let out = Command::new("git")
                .args(["-c", "user.name=kof", "-c", "user.email=kof@kof.invalid"])
                .args(args)
                .current_dir(cwd)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "git {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        git(
            &[
                "clone",
                "-q",
                "--branch",
                name,
                self.floxmeta(owner).to_str().unwrap(),
                work.to_str().unwrap(),
            ],
            self.tmp.path(),
        );
        let meta_path = work.join("metadata.json");
        let mut meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
        let history = meta["history"].as_array_mut().unwrap();
        let previous = history.last().unwrap()["current_generation"].clone();
        history.push(serde_json::json!({
            "author": "kof-test",
            "command": null,
            "current_generation": generation.to_string(),
            "hostname": "test",
            "kind": "switch_generation",
            "previous_generation": previous,
            "timestamp": 1767400000,
        }));
        std::fs::write(&meta_path, serde_json::to_vec_pretty(&meta).unwrap()).unwrap();
        git(&["commit", "-q", "-am", "switch generation"], &work);
        git(&["push", "-q", "origin", name], &work);
    }

    /// Asserts that nothing of any container is left: no lease, no view, no container
    /// directory, no mount under the containers' directory or containerd's.
    pub fn assert_no_leftovers(&self) {
        let leases = self.leases();
        assert!(
            leases.is_empty(),
            "leases left: {leases:?}\n{}",
            self.logs()
        );
        // Views no lease uses are kept idle for the next pod of their generation; any other
        // view is a leftover.
        let status = self.client().status().unwrap();
        let views: Vec<String> = status
            .fuse_server
            .map(|f| f.views)
            .unwrap_or_default()
            .into_iter()
            .filter(|v| !status.idle_views.contains(v))
            .collect();
        assert!(views.is_empty(), "views left: {views:?}");
        let mut dirs = Vec::new();
        if let Ok(nss) = std::fs::read_dir(self.containers_dir()) {
            for ns in nss.flatten().filter(|e| e.path().is_dir()) {
                for c in std::fs::read_dir(ns.path()).unwrap().flatten() {
                    dirs.push(c.path());
                }
            }
        }
        assert!(
            dirs.is_empty(),
            "container directories left: {dirs:?}\n{}",
            self.logs()
        );
        let mounts = mounts_under(&self.containers_dir());
        assert!(mounts.is_empty(), "mounts left: {mounts:?}");
        let ctrd_mounts = self.ctrd().mounts();
        assert!(
            ctrd_mounts.is_empty(),
            "containerd mounts left: {ctrd_mounts:?}"
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // containerd first: its Drop kills the shims and unmounts what they left.
        self.containerd.take();
        for m in mounts_under(&self.containers_dir()).into_iter().rev() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&m)
                .stderr(Stdio::null())
                .status();
        }
        // runc's state directory for this namespace (see `ns`), empty by now.
        let _ = std::fs::remove_dir(Path::new("/run/containerd/runc").join(&self.ns));
        // Then the shared node's drop: the daemon, its FUSE server and mount, the server.
    }
}

/// A placeholder root for `ctr run --rootfs`: one tiny file, as `flox/empty` holds.
pub fn empty_rootfs(dir: &Path) -> PathBuf {
    let r = dir.join("empty-rootfs");
    std::fs::create_dir_all(&r).unwrap();
    std::fs::write(r.join(".flox-empty"), "").unwrap();
    r
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
