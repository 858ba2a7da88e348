//! The pieces every benchmark shares: the fixtures, a shaped fixture server, a fresh kof node
//! and a fresh Nix chroot store.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kof_fixtures::build::{Environment, Manifest};
use kof_fixtures::serve::{self, ServeConfig, ServerHandle};

/// Network shaping of the fixture link.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// Delay before each response.
    pub latency: Duration,
    /// Bytes per second shared by all connections.
    pub bandwidth: Option<u64>,
}

/// Starts the fixture server over `dir` with `link`.
pub fn serve(dir: &Path, link: Link) -> Result<ServerHandle> {
    let mut cfg = ServeConfig::new(dir);
    cfg.latency = link.latency;
    cfg.bandwidth = link.bandwidth;
    serve::try_start_in_background(cfg).context("starting the fixture server")
}

/// What one timed command did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Run {
    /// Wall time.
    pub seconds: f64,
    /// Body bytes the server sent during the run.
    pub bytes: u64,
    /// Requests the server answered during the run.
    pub requests: u64,
    /// NAR requests among them.
    pub nar_requests: u64,
}

/// Runs `cmd` to success, timing it and reading the server's counters around it.
pub fn timed(server: &ServerHandle, cmd: &mut Command) -> Result<Run> {
    server.reset();
    let start = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let seconds = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let s = server.stats();
    Ok(Run {
        seconds,
        bytes: s.bytes_sent,
        requests: s.requests,
        nar_requests: s.requests_by_kind.nar,
    })
}

/// A fresh kof node: an empty store and a config pointing at the server.
pub struct KofNode {
    /// Holds the node's files.
    pub dir: tempfile::TempDir,
    /// Its config file.
    pub config: PathBuf,
}

impl KofNode {
    /// A fresh node using `flavour`'s cache on `server`.
    pub fn new(
        server: &ServerHandle,
        manifest: &Manifest,
        flavour: &str,
        extra: &str,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("kof-bench-node")
            .tempdir()?;
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "floxhub_url = \"{}\"\nsubstituters = [\"{}\"]\ntrusted_public_keys = [\"{}\"]\nstore_dir = \"{}\"\n{extra}",
                server.git_base(),
                server.cache_url(flavour),
                manifest.public_key,
                dir.path().join("store").display()
            ),
        )?;
        Ok(KofNode { dir, config })
    }

    /// Gives the node its own `kof-fetcherd` socket and mount directory (else the system's).
    pub fn enable_daemon(&self) -> Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.config)?;
        writeln!(
            f,
            "socket = \"{}\"\nmount_dir = \"{}\"",
            self.socket().display(),
            self.dir.path().join("mnt").display()
        )?;
        Ok(())
    }

    /// The node's `kof-fetcherd` socket (after [`KofNode::enable_daemon`]).
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("fetcherd.sock")
    }

    /// `kof-store ARGS` for this node.
    pub fn cmd(&self, kof_store: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(kof_store);
        c.args(args).env("KOF_CONFIG", &self.config);
        c
    }

    /// `kof-store stats --json`.
    pub fn stats(&self, kof_store: &Path) -> Result<serde_json::Value> {
        let out = self.cmd(kof_store, &["stats", "--json"]).output()?;
        if !out.status.success() {
            bail!("kof-store stats: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

/// A fresh Nix chroot store with an empty narinfo cache (`~/.cache/nix` of a fresh HOME).
pub struct NixNode {
    /// Holds the store and HOME.
    pub dir: tempfile::TempDir,
}

impl NixNode {
    /// A fresh, empty one.
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("kof-bench-nix").tempdir()?;
        std::fs::create_dir_all(dir.path().join("home"))?;
        Ok(NixNode { dir })
    }

    /// The chroot store's root.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// `nix copy --from URL --to ROOT PATHS...`, trusting the fixture key.
    pub fn copy(&self, url: &str, public_key: &str, paths: &[String]) -> Command {
        let home = self.dir.path().join("home");
        let mut c = Command::new("nix");
        c.args(["copy", "--from", url])
            .arg("--to")
            .arg(self.root())
            .args(["--option", "trusted-public-keys", public_key])
            .args(paths)
            .env("HOME", &home)
            .env("XDG_CACHE_HOME", home.join(".cache"));
        c
    }

    /// Bytes the store's paths take: their apparent size (`du -sb --apparent-size`) and the
    /// blocks allocated (`du -sB1`), of `ROOT/nix/store` (Nix's database excluded).
    pub fn store_bytes(&self) -> Result<(u64, u64)> {
        Ok((
            du(&["-sb", "--apparent-size"], &self.root().join("nix/store"))?,
            du(&["-sB1"], &self.root().join("nix/store"))?,
        ))
    }
}

/// `du ARGS DIR`'s total.
fn du(args: &[&str], dir: &Path) -> Result<u64> {
    let out = Command::new("du").args(args).arg(dir).output()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("parsing du output for {}", dir.display()))
}

/// The fixture environment `owner/name`.
pub fn environment<'a>(manifest: &'a Manifest, env: &str) -> Result<&'a Environment> {
    let (owner, name) = env.split_once('/').context("env is owner/name")?;
    manifest
        .environment(owner, name)
        .with_context(|| format!("no fixture environment {env}"))
}

/// The roots and closure of generation `g` (or the live one) of `owner/name`.
pub fn generation(
    manifest: &Manifest,
    env: &str,
    g: Option<u32>,
) -> Result<(Vec<String>, Vec<String>, u64)> {
    let e = environment(manifest, env)?;
    let n = g.unwrap_or(e.live_generation);
    let gen = e
        .generation(n)
        .with_context(|| format!("{env} has no generation {n}"))?;
    Ok((gen.roots.clone(), gen.closure.clone(), gen.closure_nar_size))
}

/// Bytes of the compressed NARs of `paths` in cache `flavour` (what a full fetch downloads).
pub fn download_bytes(dir: &Path, flavour: &str, paths: &[String]) -> Result<u64> {
    let mut total = 0;
    for p in paths {
        let base = p.trim_start_matches("/nix/store/");
        let text =
            std::fs::read_to_string(dir.join(format!("caches/{flavour}/{}.narinfo", &base[..32])))?;
        let info = kof_nar::NarInfo::parse(&text)?;
        total += info.file_size.unwrap_or(info.nar_size);
    }
    Ok(total)
}

/// A node's running `kof-fetcherd` (the binary beside `kof-store`): kof-testkit's daemon,
/// stopped by [`Daemon::stop`] (or, less cleanly, on drop).
pub struct Daemon(kof_testkit::Daemon);

impl Daemon {
    /// Starts it with the node's config and waits (up to 30 s) until it answers with its FUSE
    /// server up, so that no timed run pays for starting them.
    pub fn start(node: &KofNode, kof_store: &Path) -> Result<Daemon> {
        let bin = kof_store
            .parent()
            .context("locating kof-fetcherd")?
            .join("kof-fetcherd");
        let spec = kof_testkit::DaemonSpec {
            bin,
            config: node.config.clone(),
            socket: node.socket(),
            mount_dir: node.dir.path().join("mnt"),
            log: node.dir.path().join("fetcherd.log"),
            log_level: None,
            timeout: Duration::from_secs(30),
        };
        Ok(Daemon(kof_testkit::Daemon::start(&spec)?))
    }

    /// SIGTERM, wait, then `kof-fetcherd stop-fuse-server` (unmounts every view).
    pub fn stop(self) -> Result<()> {
        Ok(self.0.stop()?)
    }
}
