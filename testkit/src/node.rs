//! A test node: its own fixture server, a store directory, a configuration, and, on demand, a
//! running `kof-fetcherd` whose logs it keeps.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kof_fixtures::serve::{self, ServeConfig, ServerHandle};
use kof_node_api::api::Client;
use tempfile::TempDir;

use crate::daemon::{Daemon, DaemonSpec, FuseServerLeft};
use crate::fixtures::fixtures;

/// How a [`Node`] is set up.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The fixture cache the node substitutes from (`zstd`, `xz`, `none`, ...).
    pub flavour: &'static str,
    /// The fixture server's delay before each response.
    pub latency: Duration,
    /// The fixture server's bandwidth, shared by all connections.
    pub bandwidth: Option<u64>,
    /// `prefetch`, when set.
    pub prefetch: Option<&'static str>,
    /// `read_timeout_secs`.
    pub read_timeout_secs: u64,
    /// `download_attempts`, when set.
    pub download_attempts: Option<u32>,
    /// `metrics_addr` on 127.0.0.1 at this port, when set.
    pub metrics_port: Option<u16>,
    /// `floxhub_token_file`, when set.
    pub token_file: Option<PathBuf>,
    /// More configuration, appended as is (top-level keys, or tables last).
    pub extra_config: String,
    /// Serve a copy of the fixtures whose floxmeta repositories the test may change (as a
    /// `flox push` would); everything else is linked.
    pub own_floxmeta: bool,
    /// Serve this fixtures directory (a test's own, e.g. a [`TamperedFixtures`](crate::TamperedFixtures)
    /// whose caches lie) instead of the shared one.
    pub fixtures_dir: Option<PathBuf>,
    /// Start the daemon in [`Node::new`].
    pub start_daemon: bool,
    /// The `kof-fetcherd` binary; `None`: [`fetcherd_bin`](crate::fetcherd_bin).
    pub fetcherd: Option<PathBuf>,
    /// Prefix of the node's temporary directory.
    pub prefix: &'static str,
}

impl Default for NodeOptions {
    /// A daemon node: the zstd cache, `prefetch = "none"`, a 10 s read timeout, its daemon
    /// started.
    fn default() -> Self {
        NodeOptions {
            flavour: "zstd",
            latency: Duration::ZERO,
            bandwidth: None,
            prefetch: Some("none"),
            read_timeout_secs: 10,
            download_attempts: None,
            metrics_port: None,
            token_file: None,
            extra_config: String::new(),
            own_floxmeta: false,
            fixtures_dir: None,
            start_daemon: true,
            fetcherd: None,
            prefix: "kof-test-node",
        }
    }
}

/// A node: its own fixture server (so counters and faults are its own), a temporary directory
/// holding its store (`store/`), sockets (`run/`), view mount (`mnt/`), configuration and
/// logs, and at most one daemon of its own ([`Node::start_daemon`]). Dropping it stops the
/// daemon and its FUSE server, unmounts the views, stops the server and removes the directory.
pub struct Node {
    /// The node's directory.
    pub tmp: TempDir,
    /// Its fixture server.
    pub server: ServerHandle,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its running daemon, if any.
    pub daemon: Option<Daemon>,
    fetcherd: Option<PathBuf>,
    fixtures_dir: PathBuf,
    daemons_started: AtomicUsize,
    /// The FUSE server a killed daemon left serving.
    left: Option<FuseServerLeft>,
}

impl Node {
    /// Starts the fixture server, writes the configuration and (by default) starts the daemon.
    pub fn new(opts: NodeOptions) -> Node {
        let tmp = tempfile::Builder::new()
            .prefix(opts.prefix)
            .tempdir()
            .unwrap();
        let (shared, manifest) = fixtures();
        let src = opts.fixtures_dir.as_ref().unwrap_or(shared);
        let fixtures_dir = if opts.own_floxmeta {
            copy_fixtures(src, &tmp.path().join("fixtures"))
        } else {
            src.clone()
        };
        let mut cfg = ServeConfig::new(&fixtures_dir);
        cfg.latency = opts.latency;
        cfg.bandwidth = opts.bandwidth;
        let server = serve::start_in_background(cfg);
        let config = tmp.path().join("config.toml");
        let mut text = format!(
            "floxhub_url = \"{}\"\nsubstituters = [\"{}\"]\ntrusted_public_keys = [\"{}\"]\n\
             store_dir = \"{}\"\nsocket = \"{}\"\nmount_dir = \"{}\"\nread_timeout_secs = {}\n",
            server.git_base(),
            server.cache_url(opts.flavour),
            manifest.public_key,
            tmp.path().join("store").display(),
            tmp.path().join("run/fetcherd.sock").display(),
            tmp.path().join("mnt").display(),
            opts.read_timeout_secs,
        );
        if let Some(p) = opts.prefetch {
            text.push_str(&format!("prefetch = \"{p}\"\n"));
        }
        if let Some(n) = opts.download_attempts {
            text.push_str(&format!("download_attempts = {n}\n"));
        }
        if let Some(p) = opts.metrics_port {
            text.push_str(&format!("metrics_addr = \"127.0.0.1:{p}\"\n"));
        }
        if let Some(t) = &opts.token_file {
            text.push_str(&format!("floxhub_token_file = \"{}\"\n", t.display()));
        }
        text.push_str(&opts.extra_config);
        std::fs::write(&config, text).unwrap();
        let mut node = Node {
            tmp,
            server,
            config,
            daemon: None,
            fetcherd: opts.fetcherd,
            fixtures_dir,
            daemons_started: AtomicUsize::new(0),
            left: None,
        };
        if opts.start_daemon {
            node.start_daemon();
        }
        node
    }

    /// The node's directory.
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// The fixtures directory its server serves (a copy with [`NodeOptions::own_floxmeta`]).
    pub fn fixtures_dir(&self) -> &Path {
        &self.fixtures_dir
    }

    /// Its store directory.
    pub fn store_dir(&self) -> PathBuf {
        self.tmp.path().join("store")
    }

    /// The daemon's API socket.
    pub fn socket(&self) -> PathBuf {
        self.tmp.path().join("run/fetcherd.sock")
    }

    /// The daemon's view mount directory.
    pub fn mount_dir(&self) -> PathBuf {
        self.tmp.path().join("mnt")
    }

    /// The FUSE server's control socket.
    pub fn control(&self) -> PathBuf {
        self.tmp.path().join("run/fuse.sock")
    }

    /// Starts a daemon for this node and waits (up to 120 s) until it answers with its FUSE
    /// server up; the caller owns it ([`Node::start_daemon`] gives it to the node). Panics
    /// with the node's logs if it does not come up.
    pub fn spawn_daemon(&self) -> Daemon {
        let n = self.daemons_started.fetch_add(1, Ordering::Relaxed) + 1;
        let spec = DaemonSpec {
            bin: self.fetcherd.clone().unwrap_or_else(crate::fetcherd_bin),
            config: self.config.clone(),
            socket: self.socket(),
            mount_dir: self.mount_dir(),
            log: self.tmp.path().join(format!("daemon-{n}.log")),
            log_level: Some("info".into()),
            timeout: Duration::from_secs(120),
        };
        Daemon::start(&spec).unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// Starts the node's daemon (see [`Node::spawn_daemon`]).
    pub fn start_daemon(&mut self) {
        assert!(self.daemon.is_none(), "the node's daemon is running");
        let d = self.spawn_daemon();
        self.daemon = Some(d);
    }

    /// Kills the node's daemon (SIGKILL); its detached FUSE server keeps serving.
    pub fn kill_daemon(&mut self) {
        if let Some(d) = self.daemon.take() {
            self.left = Some(d.kill());
        }
    }

    /// A client of the daemon's API (panics if it does not answer).
    pub fn client(&self) -> Client {
        Client::connect(&self.socket())
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.socket().display()))
    }

    /// Every log of the node: the daemons' (`*.log` in its directory) and the FUSE server's.
    pub fn logs(&self) -> String {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.tmp.path())
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        names.retain(|p| p.extension().is_some_and(|e| e == "log"));
        names.sort();
        names.push(self.tmp.path().join("run/fuse-server.log"));
        let mut out = String::new();
        for p in names {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            out.push_str(&format!("--- {name}\n"));
            out.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
        }
        out
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        match self.daemon.take() {
            Some(d) => drop(d),
            None => {
                if let Some(left) = self.left.take() {
                    left.stop();
                }
            }
        }
    }
}

/// Copies the fixtures in `src` to `dst`: the floxmeta repositories copied, everything else
/// linked. Returns `dst`.
fn copy_fixtures(src: &Path, dst: &Path) -> PathBuf {
    std::fs::create_dir(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let name = e.file_name();
        if name == "floxmeta" {
            let st = Command::new("cp")
                .arg("-a")
                .arg(e.path())
                .arg(dst.join("floxmeta"))
                .status()
                .unwrap();
            assert!(st.success(), "copying {}", e.path().display());
        } else {
            std::os::unix::fs::symlink(e.path(), dst.join(&name)).unwrap();
        }
    }
    dst.to_path_buf()
}
