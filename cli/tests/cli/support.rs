//! The test node: a fixture server, a store directory and a configuration, and helpers to run
//! `kof-store` against them.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use kof_testkit::{closure_of, fixtures_dir, manifest, staged};

/// NarSize of a fixture store path.
pub fn nar_size(path: &str) -> u64 {
    manifest().store_paths[path].nar_size
}

/// A node: its own fixture server (so counters and faults are its own), store and config;
/// the shared [`kof_testkit::Node`] (reached through `Deref`), without a daemon until a test
/// starts one.
pub struct Node(kof_testkit::Node);

impl std::ops::Deref for Node {
    type Target = kof_testkit::Node;
    fn deref(&self) -> &kof_testkit::Node {
        &self.0
    }
}

/// How a node's configuration differs from the default test one.
pub struct NodeOptions {
    pub flavour: &'static str,
    pub latency: Duration,
    pub token_file: Option<PathBuf>,
    pub extra_config: String,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            flavour: "zstd",
            latency: Duration::ZERO,
            token_file: None,
            extra_config: String::new(),
        }
    }
}

impl Node {
    pub fn new() -> Node {
        Node::with(NodeOptions::default())
    }

    pub fn with(opts: NodeOptions) -> Node {
        Node(kof_testkit::Node::new(kof_testkit::NodeOptions {
            flavour: opts.flavour,
            latency: opts.latency,
            prefetch: None,
            read_timeout_secs: 3,
            download_attempts: Some(3),
            token_file: opts.token_file,
            extra_config: opts.extra_config,
            start_daemon: false,
            prefix: "kof-cli-test",
            ..kof_testkit::NodeOptions::default()
        }))
    }

    /// A `kof-store` command for this node.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kof-store"));
        c.args(args)
            .env("KOF_CONFIG", &self.config)
            .env_remove("KOF_STORE")
            .stdin(Stdio::null());
        c
    }

    /// Runs `kof-store args`, bounded in time, and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        run_bounded(self.cmd(args), Duration::from_secs(300))
    }

    /// Runs `kof-store args` and insists on success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kof-store {args:?} failed: {}\nstdout: {}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `kof-store args` and insists on failure; returns the last stderr line.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "kof-store {args:?} succeeded unexpectedly: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        let last = err.lines().last().unwrap_or_default().to_string();
        assert!(
            last.starts_with("kof-store: "),
            "the failure should end with one line naming what failed: {err}"
        );
        last
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    /// Absolute store paths in the store, sorted.
    pub fn stored_paths(&self) -> Vec<String> {
        let v = self.json(&["ls", "--json"]);
        let mut out: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["path"].as_str().unwrap().to_string())
            .collect();
        out.sort();
        out
    }

    /// NAR requests the server has answered for this node.
    pub fn nar_requests(&self) -> u64 {
        self.server.stats().requests_by_kind.nar
    }
}

/// Runs a command with a deadline, killing it past the deadline (a test must never hang).
pub fn run_bounded(mut c: Command, limit: Duration) -> Output {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = c.spawn().expect("spawning");
    let pid = child.id();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d2 = done.clone();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < limit {
            if d2.load(std::sync::atomic::Ordering::SeqCst) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        unsafe_kill(pid);
        true
    });
    let out = child.wait_with_output().expect("waiting");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let killed = watchdog.join().unwrap();
    assert!(!killed, "{c:?} did not finish within {limit:?}");
    out
}

fn unsafe_kill(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// sha256 (hex) of bytes.
pub fn sha256_hex(b: &[u8]) -> String {
    kof_nar::NixHash::digest(b).to_hex()
}

/// Runs a command to completion, asserting success; returns stdout bytes.
pub fn must(c: &mut Command) -> Vec<u8> {
    let out = c.output().unwrap_or_else(|e| panic!("running {c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The NAR file name (`<filehash>.nar.zst`) of a fixture path in the zstd cache.
pub fn nar_file(path: &str) -> String {
    let base = path.trim_start_matches("/nix/store/");
    let narinfo = std::fs::read_to_string(
        fixtures_dir().join(format!("caches/zstd/{}.narinfo", &base[..32])),
    )
    .unwrap();
    let url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string();
    url.rsplit('/').next().unwrap().to_string()
}
