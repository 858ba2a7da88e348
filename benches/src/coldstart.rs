//! Cold start of a command in an environment: lazy (`kof-store run` on a fresh node) against eager
//! (`kof-store prefetch`, then `kof-store run`) and against the real Nix (`nix copy --from` the
//! zstd cache into a fresh chroot store with an empty `~/.cache/nix`, then the same command in a
//! chroot; and the same from the xz cache), over the same shaped link, alternating sides run by
//! run.
//!
//! Variants of the lazy side, each on its own fresh node:
//! - `lazy`: the default (`prefetch = "closure"`), the published cache (`kof-cache publish`:
//!   signed indexes, seekable zstd NARs, verified chunk reads);
//! - `lazy_none`: the same with `prefetch = "none"`, so the bytes fetched are what the command
//!   touched (compressed, on the wire);
//! - `lazy_zstd`: the plain zstd cache (no indexes: path-level laziness, what a stock Nix cache
//!   with listings offers), compared with `nix`;
//! - `lazy_xz`: the plain xz cache (no indexes, no listings, cache.nixos.org's format), compared
//!   with `nix_xz` (Nix copying from that same cache);
//! - `lazy_profile`: a learned profile recorded on another node, exported and imported first.
//!
//! Warm runs (everything local) compare the run through the FUSE view with the same command in
//! the Nix chroot, whose files are the same tree on local disk. They name the generation
//! (`owner/name:G`, the live one): a pinned generation the store recorded resolves without
//! FloxHub, so nothing but local work is timed. Two kof sides: `kof-store run` alone (its own
//! FUSE mount per run) and through a running `kof-fetcherd` on the node (the mount persists,
//! views share inodes and the page cache).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kof_fixtures::build::Manifest;
use kof_fixtures::serve::ServerHandle;
use serde::Serialize;

use crate::node::{self, KofNode, Link, NixNode, Run};
use crate::prefetch::median;

/// The fixture cache `kof-cache publish` made (signed indexes, seekable zstd NARs).
pub(crate) const PUBLISHED: &str = "published";

/// One cold-start comparison.
#[derive(Debug, Clone)]
pub struct ColdStartBench {
    /// `owner/name`.
    pub env: String,
    /// The command, run inside the environment (looked up on the environment's `PATH`).
    pub cmd: Vec<String>,
    /// Runs of each side.
    pub runs: usize,
    /// The link.
    pub link: Link,
}

/// What it measured.
#[derive(Debug, Clone, Serialize)]
pub struct ColdStartReport {
    /// `owner/name`.
    pub env: String,
    /// The command.
    pub cmd: Vec<String>,
    /// Store paths in the closure.
    pub paths: usize,
    /// Sum of NarSize.
    pub nar_bytes: u64,
    /// Sum of the zstd NAR sizes (what an eager fetch downloads).
    pub zstd_download_bytes: u64,
    /// Link bandwidth (bytes/s).
    pub bandwidth: Option<u64>,
    /// Per-request latency in ms.
    pub latency_ms: u64,
    /// Nix: `nix copy` from the zstd cache, then the command in a chroot.
    pub nix: Vec<Run>,
    /// Nix: `nix copy` from the xz cache, then the command in a chroot.
    pub nix_xz: Vec<Run>,
    /// kof eager: `kof-store prefetch` then `kof-store run` (zstd cache).
    pub eager: Vec<Run>,
    /// kof lazy, default prefetch, published cache.
    pub lazy: Vec<Run>,
    /// kof lazy, `prefetch = "none"`, published cache.
    pub lazy_none: Vec<Run>,
    /// kof lazy, default prefetch, plain zstd cache (path-level).
    pub lazy_zstd: Vec<Run>,
    /// kof lazy, default prefetch, plain xz cache (path-level, no listings).
    pub lazy_xz: Vec<Run>,
    /// kof lazy, default prefetch, with a learned profile imported.
    pub lazy_profile: Vec<Run>,
    /// Medians (seconds).
    pub medians: Medians,
    /// `lazy_none` bytes / NarSize of the closure.
    pub touched_fraction: f64,
    /// The physical limit: touched bytes / bandwidth + one round trip per dependent metadata
    /// fetch (FloxHub's two, the reference chain's depth, one listing). A lower bound: it
    /// ignores the program's own chain of dependent reads.
    pub physical_limit_s: f64,
    /// Warm: the command through the FUSE view (`kof-store run REF:G` alone, everything
    /// local), seconds.
    pub warm_view: Vec<f64>,
    /// Warm: the same through a running `kof-fetcherd` (persistent mount), seconds.
    pub warm_daemon: Vec<f64>,
    /// Warm: the same command in the Nix chroot (the same tree on local disk), seconds,
    /// alternating with the runs alone.
    pub warm_local: Vec<f64>,
    /// Warm: the Nix chroot again, alternating with the runs through `kof-fetcherd`.
    pub warm_local_daemon: Vec<f64>,
}

/// Medians of every side.
#[derive(Debug, Clone, Serialize)]
pub struct Medians {
    /// Nix (zstd cache).
    pub nix: f64,
    /// Nix (xz cache).
    pub nix_xz: f64,
    /// Eager.
    pub eager: f64,
    /// Lazy (default).
    pub lazy: f64,
    /// Lazy, no prefetch.
    pub lazy_none: f64,
    /// Lazy, plain zstd cache.
    pub lazy_zstd: f64,
    /// Lazy, plain xz cache.
    pub lazy_xz: f64,
    /// Lazy, learned profile.
    pub lazy_profile: f64,
    /// Warm, view (`kof-store run` alone).
    pub warm_view: f64,
    /// Warm, view through `kof-fetcherd`.
    pub warm_daemon: f64,
    /// Warm, local disk (alternating with the runs alone).
    pub warm_local: f64,
    /// Warm, local disk (alternating with the runs through `kof-fetcherd`).
    pub warm_local_daemon: f64,
}

fn med(runs: &[Run]) -> f64 {
    median(&runs.iter().map(|r| r.seconds).collect::<Vec<_>>())
}

/// Runs `cmds` one after another to success, timing them together and reading the server's
/// counters around them.
fn timed_all(server: &ServerHandle, cmds: &mut [Command]) -> Result<Run> {
    server.reset();
    let start = Instant::now();
    for cmd in cmds.iter_mut() {
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        if !out.status.success() {
            bail!(
                "{cmd:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let s = server.stats();
    Ok(Run {
        seconds,
        bytes: s.bytes_sent,
        requests: s.requests,
        nar_requests: s.requests_by_kind.nar,
    })
}

/// The command in the Nix chroot at `root`: private mount and pid namespaces, `/proc` and
/// `/dev` mounted as `kof-store run` does, `PATH` made of the roots' `bin` directories.
pub(crate) fn nix_chroot_run(root: &Path, roots: &[String], cmd: &[String]) -> Result<Command> {
    for d in ["proc", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let path: Vec<String> = roots.iter().map(|r| format!("{r}/bin")).collect();
    // The host's `env` clears the environment and the host's `chroot` then looks the command
    // up on the environment's PATH inside the chroot.
    let script = format!(
        "mount -t proc proc '{r}/proc' && mount --rbind /dev '{r}/dev' && exec /usr/bin/env -i PATH='{p}' HOME=/ PYTHONDONTWRITEBYTECODE=1 /usr/sbin/chroot '{r}' \"$@\"",
        r = root.display(),
        p = path.join(":")
    );
    let mut c = Command::new("unshare");
    c.args(["--mount", "--pid", "--fork", "sh", "-c", &script, "sh"])
        .args(cmd);
    Ok(c)
}

/// Longest chain of references from the roots (each link is one dependent narinfo round trip).
pub(crate) fn reference_depth(manifest: &Manifest, roots: &[String]) -> usize {
    fn depth(
        m: &Manifest,
        p: &str,
        memo: &mut std::collections::BTreeMap<String, usize>,
        seen: &mut std::collections::BTreeSet<String>,
    ) -> usize {
        if let Some(d) = memo.get(p) {
            return *d;
        }
        if !seen.insert(p.to_string()) {
            return 0;
        }
        let refs = m
            .store_paths
            .get(p)
            .map(|i| i.references.clone())
            .unwrap_or_default();
        let d = 1 + refs
            .iter()
            .filter(|r| r.as_str() != p)
            .map(|r| depth(m, r, memo, seen))
            .max()
            .unwrap_or(0);
        memo.insert(p.to_string(), d);
        d
    }
    let mut memo = Default::default();
    let mut seen = Default::default();
    roots
        .iter()
        .map(|r| depth(manifest, r, &mut memo, &mut seen))
        .max()
        .unwrap_or(0)
}

impl ColdStartBench {
    fn run_args(&self) -> Vec<String> {
        let mut a = vec!["run".to_string(), self.env.clone(), "--".to_string()];
        a.extend(self.cmd.iter().cloned());
        a
    }

    /// Runs it.
    pub fn run(
        &self,
        fixtures: &Path,
        manifest: &Manifest,
        kof_store: &Path,
    ) -> Result<ColdStartReport> {
        let (roots, closure, nar_bytes) = node::generation(manifest, &self.env, None)?;
        let zstd_download_bytes = node::download_bytes(fixtures, "zstd", &closure)?;
        let server = node::serve(fixtures, self.link)?;
        let run_args = self.run_args();
        let run_args: Vec<&str> = run_args.iter().map(String::as_str).collect();
        let mut r = Sides::default();
        // Nodes are kept until the end (see prefetch.rs: deleting a store between runs charges
        // the next run for ext4's inode allocation).
        let mut keep_kof: Vec<KofNode> = Vec::new();
        let mut keep_nix: Vec<NixNode> = Vec::new();

        // The learned profile: one recording run on a node of its own, exported once.
        let profile_file = tempfile::NamedTempFile::new()?;
        {
            let n = KofNode::new(&server, manifest, PUBLISHED, "prefetch = \"none\"\n")?;
            node::timed(&server, &mut n.cmd(kof_store, &run_args))?;
            let out = n
                .cmd(kof_store, &["profile", "export", &self.env])
                .output()?;
            if !out.status.success() {
                bail!(
                    "kof-store profile export: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            std::fs::write(profile_file.path(), &out.stdout)?;
            keep_kof.push(n);
        }
        let profile_path = profile_file.path().to_string_lossy().into_owned();

        // Nix copying the closure from `cache`, then the command in its chroot.
        let nix_side = |cache: &str| -> Result<(Run, NixNode)> {
            let n = NixNode::new()?;
            let run = timed_all(
                &server,
                &mut [
                    n.copy(&server.cache_url(cache), &manifest.public_key, &roots),
                    nix_chroot_run(&n.root(), &roots, &self.cmd)?,
                ],
            )?;
            Ok((run, n))
        };
        // `kof-store run` on a fresh node on `flavour` with config `extra`, after importing
        // the learned profile at `profile` when given.
        let lazy_side =
            |flavour: &str, extra: &str, profile: Option<&str>| -> Result<(Run, KofNode)> {
                let n = KofNode::new(&server, manifest, flavour, extra)?;
                if let Some(profile) = profile {
                    let out = n.cmd(kof_store, &["profile", "import", profile]).output()?;
                    if !out.status.success() {
                        bail!(
                            "kof-store profile import: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        );
                    }
                }
                let run = node::timed(&server, &mut n.cmd(kof_store, &run_args))?;
                Ok((run, n))
            };
        for i in 0..self.runs {
            let mut order: Vec<usize> = (0..8).collect();
            if i % 2 == 1 {
                order.reverse();
            }
            for side in order {
                let (name, runs, run) = match side {
                    0 => {
                        let (run, n) = nix_side("zstd")?;
                        keep_nix.push(n);
                        ("nix", &mut r.nix, run)
                    }
                    1 => {
                        let n = KofNode::new(&server, manifest, "zstd", "")?;
                        let run = timed_all(
                            &server,
                            &mut [
                                n.cmd(kof_store, &["prefetch", &self.env]),
                                n.cmd(kof_store, &run_args),
                            ],
                        )?;
                        keep_kof.push(n);
                        ("eager", &mut r.eager, run)
                    }
                    2 => {
                        let (run, n) = lazy_side(PUBLISHED, "", None)?;
                        keep_kof.push(n);
                        ("lazy", &mut r.lazy, run)
                    }
                    3 => {
                        let (run, n) = lazy_side(PUBLISHED, "prefetch = \"none\"\n", None)?;
                        keep_kof.push(n);
                        ("lazy_none", &mut r.lazy_none, run)
                    }
                    4 => {
                        let (run, n) = lazy_side("zstd", "", None)?;
                        keep_kof.push(n);
                        ("lazy_zstd", &mut r.lazy_zstd, run)
                    }
                    5 => {
                        let (run, n) = nix_side("xz")?;
                        keep_nix.push(n);
                        ("nix_xz", &mut r.nix_xz, run)
                    }
                    6 => {
                        let (run, n) = lazy_side("xz", "", None)?;
                        keep_kof.push(n);
                        ("lazy_xz", &mut r.lazy_xz, run)
                    }
                    _ => {
                        let (run, n) = lazy_side(PUBLISHED, "", Some(&profile_path))?;
                        keep_kof.push(n);
                        ("lazy_profile", &mut r.lazy_profile, run)
                    }
                };
                runs.push(run.clone());
                eprintln!(
                    "  {name} {}: {:.2} s, {} bytes, {} requests",
                    self.env, run.seconds, run.bytes, run.requests
                );
            }
        }
        server.shutdown();

        // Warm: an unshaped link; the kof node already holds the closure, the Nix chroot too.
        let warm = self.warm(fixtures, manifest, kof_store, &roots)?;

        let medians = Medians {
            nix: med(&r.nix),
            nix_xz: med(&r.nix_xz),
            eager: med(&r.eager),
            lazy: med(&r.lazy),
            lazy_none: med(&r.lazy_none),
            lazy_zstd: med(&r.lazy_zstd),
            lazy_xz: med(&r.lazy_xz),
            lazy_profile: med(&r.lazy_profile),
            warm_view: median(&warm.view),
            warm_daemon: median(&warm.daemon),
            warm_local: median(&warm.local),
            warm_local_daemon: median(&warm.local_daemon),
        };
        let touched = r.lazy_none.first().map_or(0, |x| x.bytes);
        let rtts = 2 + reference_depth(manifest, &roots) + 1;
        let physical_limit_s = self
            .link
            .bandwidth
            .map_or(0.0, |b| touched as f64 / b as f64)
            + rtts as f64 * self.link.latency.as_secs_f64();
        Ok(ColdStartReport {
            env: self.env.clone(),
            cmd: self.cmd.clone(),
            paths: closure.len(),
            nar_bytes,
            zstd_download_bytes,
            bandwidth: self.link.bandwidth,
            latency_ms: self.link.latency.as_millis() as u64,
            touched_fraction: touched as f64 / nar_bytes as f64,
            physical_limit_s,
            nix: r.nix,
            nix_xz: r.nix_xz,
            eager: r.eager,
            lazy: r.lazy,
            lazy_none: r.lazy_none,
            lazy_zstd: r.lazy_zstd,
            lazy_xz: r.lazy_xz,
            lazy_profile: r.lazy_profile,
            medians,
            warm_view: warm.view,
            warm_daemon: warm.daemon,
            warm_local: warm.local,
            warm_local_daemon: warm.local_daemon,
        })
    }

    /// Warm runs of the pinned live generation: alone, through the daemon, in the Nix chroot.
    pub fn warm(
        &self,
        fixtures: &Path,
        manifest: &Manifest,
        kof_store: &Path,
        roots: &[String],
    ) -> Result<Warm> {
        let server = node::serve(
            fixtures,
            Link {
                latency: Duration::ZERO,
                bandwidth: None,
            },
        )?;
        let live = node::environment(manifest, &self.env)?.live_generation;
        let pinned = format!("{}:{live}", self.env);
        let kof = KofNode::new(&server, manifest, "zstd", "prefetch = \"none\"\n")?;
        kof.enable_daemon()?;
        let out = kof.cmd(kof_store, &["prefetch", &pinned]).output()?;
        if !out.status.success() {
            bail!(
                "kof-store prefetch: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let nix = NixNode::new()?;
        let out = nix
            .copy(&server.cache_url("zstd"), &manifest.public_key, roots)
            .output()?;
        if !out.status.success() {
            bail!("nix copy: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut run_args = vec!["run", pinned.as_str(), "--"];
        run_args.extend(self.cmd.iter().map(String::as_str));
        let mut w = Warm::default();
        // Alone, alternating with the chroot; one untimed run of each first, so both start
        // with a warm page cache.
        for i in 0..=self.runs {
            let a = node::timed(&server, &mut kof.cmd(kof_store, &run_args))?;
            let b = node::timed(&server, &mut nix_chroot_run(&nix.root(), roots, &self.cmd)?)?;
            if a.requests != 0 {
                bail!("a warm run of {pinned} sent {} requests", a.requests);
            }
            if i > 0 {
                w.view.push(a.seconds);
                w.local.push(b.seconds);
            }
        }
        // Through the daemon: its first run prepares the view (untimed), the mount persists.
        // Alternating with the chroot again, so both sides of this ratio see the same noise.
        let daemon = node::Daemon::start(&kof, kof_store)?;
        for i in 0..=self.runs {
            let a = node::timed(&server, &mut kof.cmd(kof_store, &run_args))?;
            let b = node::timed(&server, &mut nix_chroot_run(&nix.root(), roots, &self.cmd)?)?;
            if a.requests != 0 {
                bail!(
                    "a warm run of {pinned} through kof-fetcherd sent {} requests",
                    a.requests
                );
            }
            if i > 0 {
                w.daemon.push(a.seconds);
                w.local_daemon.push(b.seconds);
            }
        }
        daemon.stop()?;
        server.shutdown();
        Ok(w)
    }
}

/// Warm run times (seconds).
#[derive(Debug, Clone, Default)]
pub struct Warm {
    /// `kof-store run` alone.
    pub view: Vec<f64>,
    /// Through `kof-fetcherd`.
    pub daemon: Vec<f64>,
    /// The Nix chroot, alternating with the runs alone.
    pub local: Vec<f64>,
    /// The Nix chroot, alternating with the runs through the daemon.
    pub local_daemon: Vec<f64>,
}

#[derive(Default)]
struct Sides {
    nix: Vec<Run>,
    nix_xz: Vec<Run>,
    eager: Vec<Run>,
    lazy: Vec<Run>,
    lazy_none: Vec<Run>,
    lazy_zstd: Vec<Run>,
    lazy_xz: Vec<Run>,
    lazy_profile: Vec<Run>,
}
