//! A node for the shim's end-to-end tests: the fixture FloxHub and caches over HTTP on
//! loopback (from a copy of the fixtures whose floxmeta repositories a test may change, as a
//! `flox push` would), the real `kof-fetcherd` with its FUSE server, and a private containerd
//! with runc and the real `containerd-shim-flox-v2` registered. Dropping it stops all of them
//! and removes what they left.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kof_fixtures::build::{self, BuildOptions, FixtureSet, Manifest};
use kof_fixtures::serve::{self, ServeConfig, ServerHandle};
use kof_harness::containerd::{mounts_under, Containerd, ContainerdOptions};
use kof_node_api::api::{Client, LeaseInfo};
use tempfile::TempDir;

/// The shared fixtures (built once; the builder locks and stamps its directory).
pub fn fixtures() -> &'static (PathBuf, Manifest) {
    static F: OnceLock<(PathBuf, Manifest)> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::var_os("KOF_FIXTURES_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kof-fixtures/small")
            });
        let manifest = build::build(&BuildOptions::new(&dir, FixtureSet::Small))
            .unwrap_or_else(|e| panic!("building fixtures in {}: {e}", dir.display()));
        (dir, manifest)
    })
}

/// `kof-fetcherd`, built next to this test's binary (built first if it is not there).
pub fn fetcherd_bin() -> PathBuf {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let bin = exe.parent().unwrap().parent().unwrap().join("kof-fetcherd");
        if !bin.exists() {
            let st = Command::new(env!("CARGO"))
                .args(["build", "-q", "-p", "kof-fetcherd", "--bin", "kof-fetcherd"])
                .status()
                .unwrap();
            assert!(st.success(), "building kof-fetcherd failed");
        }
        bin
    })
    .clone()
}

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
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            prefetch: "none",
            systemd_cgroup: false,
        }
    }
}

/// See the module doc.
pub struct Node {
    /// The containerd namespace of this node's `ctr` containers: unique, because runc keeps
    /// the state of a runtime without options (the `flox` runtime as `ctr` runs it) under
    /// `/run/containerd/runc/<namespace>`, shared by every containerd on the machine.
    pub ns: String,
    pub containerd: Option<Containerd>,
    pub server: ServerHandle,
    pub config: PathBuf,
    daemon: Option<Child>,
    daemons_started: usize,
    tmp: TempDir,
}

impl Node {
    /// Starts the fixture server, the daemon and containerd.
    pub fn new(opts: NodeOptions) -> Node {
        let tmp = tempfile::Builder::new()
            .prefix("kof-shim-test")
            .tempdir()
            .unwrap();
        let (src, manifest) = fixtures();
        // A copy of the fixtures: everything linked but the floxmeta repositories, which tests
        // change.
        let fx = tmp.path().join("fixtures");
        std::fs::create_dir(&fx).unwrap();
        for e in std::fs::read_dir(src).unwrap().flatten() {
            let name = e.file_name();
            if name == "floxmeta" {
                let st = Command::new("cp")
                    .arg("-a")
                    .arg(e.path())
                    .arg(fx.join("floxmeta"))
                    .status()
                    .unwrap();
                assert!(st.success());
            } else {
                std::os::unix::fs::symlink(e.path(), fx.join(&name)).unwrap();
            }
        }
        let server = serve::start_in_background(ServeConfig::new(&fx));
        let config = tmp.path().join("kof.toml");
        std::fs::write(
            &config,
            format!(
                "floxhub_url = \"{}\"\nsubstituters = [\"{}\"]\ntrusted_public_keys = [\"{}\"]\n\
                 store_dir = \"{}\"\nsocket = \"{}\"\nmount_dir = \"{}\"\nprefetch = \"{}\"\n\
                 read_timeout_secs = 10\ndownload_attempts = 2\n",
                server.git_base(),
                server.cache_url("zstd"),
                manifest.public_key,
                tmp.path().join("store").display(),
                tmp.path().join("run/fetcherd.sock").display(),
                tmp.path().join("mnt").display(),
                opts.prefetch,
            ),
        )
        .unwrap();
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut node = Node {
            ns: format!("kof-test-{}-{n}", std::process::id()),
            containerd: None,
            server,
            config,
            daemon: None,
            daemons_started: 0,
            tmp,
        };
        node.start_daemon();
        let ctrd = Containerd::start(ContainerdOptions {
            flox_shim: Some(shim_bin()),
            // containerd 1.6's CRI ignores `runtime_path` (it would run the plain runc shim):
            // on 1.6 the runtime is registered by type, the binary found on containerd's PATH.
            flox_runtime_type: "io.containerd.flox.v2".into(),
            systemd_cgroup: opts.systemd_cgroup,
            env: vec![("KOF_CONFIG".into(), node.config.display().to_string())],
            ..ContainerdOptions::default()
        })
        .unwrap_or_else(|e| panic!("starting containerd: {e}"));
        node.containerd = Some(ctrd);
        node
    }

    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    pub fn ctrd(&self) -> &Containerd {
        self.containerd.as_ref().unwrap()
    }

    pub fn socket(&self) -> PathBuf {
        self.tmp.path().join("run/fetcherd.sock")
    }

    pub fn mount_dir(&self) -> PathBuf {
        self.tmp.path().join("mnt")
    }

    /// The shim's `containers_dir` (the default, under the store).
    pub fn containers_dir(&self) -> PathBuf {
        self.tmp.path().join("store/containers")
    }

    /// The fixture copy's floxmeta repository of `owner`.
    pub fn floxmeta(&self, owner: &str) -> PathBuf {
        self.tmp
            .path()
            .join("fixtures/floxmeta")
            .join(owner)
            .join("floxmeta.git")
    }

    /// Starts the daemon and waits until it answers with its FUSE server up.
    pub fn start_daemon(&mut self) {
        self.daemons_started += 1;
        let log = std::fs::File::create(
            self.tmp
                .path()
                .join(format!("daemon-{}.log", self.daemons_started)),
        )
        .unwrap();
        let child = Command::new(fetcherd_bin())
            .arg("--config")
            .arg(&self.config)
            .env("KOF_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let start = Instant::now();
        loop {
            if let Ok(s) = Client::connect(&self.socket()).and_then(|mut c| c.status()) {
                if s.fuse_server.is_some() {
                    return;
                }
            }
            if let Some(st) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!("the daemon exited with {st}: {}", self.logs());
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the daemon did not come up: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the daemon (its detached FUSE server keeps serving).
    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket()).unwrap()
    }

    pub fn leases(&self) -> Vec<LeaseInfo> {
        self.client().leases().unwrap()
    }

    /// The daemon, FUSE server, shim and containerd logs.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.tmp.path()).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.ends_with(".log") {
                out.push_str(&format!("--- {name}\n"));
                out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        for (name, path) in [
            (
                "fuse-server.log",
                self.tmp.path().join("run/fuse-server.log"),
            ),
            ("shim.log", self.containers_dir().join("shim.log")),
        ] {
            out.push_str(&format!("--- {name}\n"));
            out.push_str(&std::fs::read_to_string(path).unwrap_or_default());
        }
        if let Some(c) = &self.containerd {
            out.push_str("--- containerd\n");
            out.push_str(&c.log());
        }
        out
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
        let status = self.client().status().unwrap();
        let views = status.fuse_server.map(|f| f.views).unwrap_or_default();
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
        self.kill_daemon();
        let _ = Command::new(fetcherd_bin())
            .arg("--config")
            .arg(&self.config)
            .arg("stop-fuse-server")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !mounts_under(&self.mount_dir()).is_empty() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.mount_dir())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A placeholder root for `ctr run --rootfs`: one tiny file, as `flox/empty` holds.
pub fn empty_rootfs(dir: &Path) -> PathBuf {
    let r = dir.join("empty-rootfs");
    std::fs::create_dir_all(&r).unwrap();
    std::fs::write(r.join(".flox-empty"), "").unwrap();
    r
}

/// A real image's root: static busybox as `/bin/busybox` and `/bin/sh`, and a marker file.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let r = dir.join("busybox-rootfs");
    std::fs::create_dir_all(r.join("bin")).unwrap();
    std::fs::create_dir_all(r.join("etc")).unwrap();
    std::fs::copy("/bin/busybox", r.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", r.join("bin/sh")).unwrap();
    std::fs::write(r.join("etc/image-marker"), "from the image\n").unwrap();
    r
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
