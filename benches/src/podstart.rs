//! Pod start through CRI: `CreateContainer` + `StartContainer` to the command's first output
//! line in the container's CRI log, on a private containerd 1.6 with the real
//! `containerd-shim-flox-v2` (runtime handler `flox`) and runc (handler `""`).
//!
//! Modes, interleaved run by run (the order reversed on odd runs) so that machine noise hits
//! them alike and every ratio comes from one invocation, all over the same shaped fixture link:
//! - `cold`: a fresh kof node (empty store, a fresh `kof-fetcherd` with the default prefetch,
//!   range-capable cache) and a `flox` pod of the environment (`flox/empty` image);
//! - `warm`: a second `flox` pod on that node once the first is gone and the closure is
//!   stored (`prefetch` through the daemon, untimed); the annotation names the environment as
//!   a pod would (`owner/name`), so the shim still resolves the live generation on FloxHub;
//! - `warm_pinned`: the same with `owner/name:G`, which resolves without FloxHub;
//! - `plain`: plain runc with an ordinary image whose one layer holds the same files (the
//!   view's root copied out with `cp -a` after the first cold run) and whose config carries the
//!   activation's variables; the container runs the activation's argv, so the same process
//!   starts;
//! - `eager`: the real Nix substituting the closure (`nix copy --from` the zstd cache into a
//!   fresh chroot store, as coldstart's Nix side) then the `plain` start; the sum;
//! - `cli_lazy`, `cli_nix`: coldstart's lazy side (`kof-store run` on a fresh node) and Nix side
//!   (`nix copy` + the command in a chroot) for the same command, outside containerd, so that
//!   the pod ratio cold/eager can be set beside the ratio outside containerd.
//!
//! The pod sandbox of every measured start is made before the timer; RunPodSandbox is not
//! timed. The timer starts just before CreateContainer and stops when the poll of the log file
//! (every [`PodStartBench::poll`]) first finds a complete line containing the command's marker.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kof_fixtures::build::Manifest;
use kof_fixtures::serve::ServerHandle;
use kof_harness::containerd::{
    Containerd, ContainerdOptions, CRI_NAMESPACE, DEFAULT_SANDBOX_IMAGE, FLOX_SHIM_NAME,
    FLOX_SHIM_RUNTIME_TYPE,
};
use kof_harness::cri::{ContainerSpec, CriClient, PodSpec};
use kof_harness::cri_log::{read_cri_log, CriLogError, LogLine};
use kof_harness::images::{self, ImageConfig};
use kof_node_api::activate::{activate, BASE_PATH};
use kof_node_api::api::Client;
use serde::Serialize;

use crate::node::{self, Daemon, KofNode, Link, NixNode, Run};
use crate::prefetch::median;

/// The placeholder image of `flox` pods.
const EMPTY_IMAGE: &str = "docker.io/flox/empty:1.0.0";
/// The pod annotation naming the environment.
const ENV_ANNOTATION: &str = "flox.dev/environment";
/// Longest a measured start may take before it counts as failed.
const START_TIMEOUT: Duration = Duration::from_secs(600);

/// The command of each environment (coldstart's, made to print a line when done) and the text
/// its first line of output contains.
pub fn command_for(env: &str) -> Result<(Vec<String>, &'static str)> {
    Ok(match env {
        // The hook of kof/python prints "python env activated" to stderr first: the marker
        // skips it, so the time is to the command's own line.
        "kof/python" => (
            vec![
                "python3".into(),
                "-c".into(),
                "import json, sqlite3; print('ready', flush=True)".into(),
            ],
            "ready",
        ),
        // `java -version` prints `openjdk version "..."` to stderr; kof/jdk has no hook.
        "kof/jdk" => (vec!["java".into(), "-version".into()], "version"),
        other => bail!("no pod-start command for {other} (known: kof/python, kof/jdk)"),
    })
}

/// The benchmark.
#[derive(Debug, Clone)]
pub struct PodStartBench {
    /// `owner/name` of each environment.
    pub envs: Vec<String>,
    /// Runs of each mode.
    pub runs: usize,
    /// The link.
    pub link: Link,
    /// How often the log file is read while waiting for the line.
    pub poll: Duration,
}

/// One measured start.
#[derive(Debug, Clone, Serialize)]
pub struct PodRun {
    /// CreateContainer to the line, seconds.
    pub seconds: f64,
    /// CreateContainer's return, seconds from the start.
    pub created_s: f64,
    /// StartContainer's return, seconds from the start.
    pub started_s: f64,
    /// Body bytes the server sent from the start to the line.
    pub bytes: u64,
    /// Requests the server answered in that time.
    pub requests: u64,
    /// NAR requests among them.
    pub nar_requests: u64,
    /// The line found.
    pub line: String,
}

/// One eager start: `nix copy`, then the plain runc start.
#[derive(Debug, Clone, Serialize)]
pub struct EagerRun {
    /// The sum, seconds.
    pub seconds: f64,
    /// `nix copy` alone.
    pub copy: Run,
    /// The plain runc start after it.
    pub start: PodRun,
}

/// Medians (seconds).
#[derive(Debug, Clone, Serialize)]
pub struct PodMedians {
    /// Cold lazy pod.
    pub cold: f64,
    /// Warm pod, live reference.
    pub warm: f64,
    /// Warm pod, pinned generation.
    pub warm_pinned: f64,
    /// Plain runc pod.
    pub plain: f64,
    /// `nix copy` + plain runc pod.
    pub eager: f64,
    /// `kof-store run`, cold, outside containerd.
    pub cli_lazy: f64,
    /// `nix copy` + chroot, outside containerd.
    pub cli_nix: f64,
}

/// What it measured for one environment.
#[derive(Debug, Clone, Serialize)]
pub struct PodStartReport {
    /// `owner/name`.
    pub env: String,
    /// The command.
    pub cmd: Vec<String>,
    /// What the line waited for contains.
    pub marker: String,
    /// Store paths in the closure.
    pub paths: usize,
    /// Sum of NarSize.
    pub nar_bytes: u64,
    /// Link bandwidth (bytes/s).
    pub bandwidth: Option<u64>,
    /// Per-request latency in ms.
    pub latency_ms: u64,
    /// Log poll interval in ms.
    pub poll_ms: f64,
    /// Bytes of the plain image's layer tree (`du -sb --apparent-size`).
    pub plain_image_bytes: u64,
    /// See the module doc for each mode.
    pub cold: Vec<PodRun>,
    pub warm: Vec<PodRun>,
    pub warm_pinned: Vec<PodRun>,
    pub plain: Vec<PodRun>,
    pub eager: Vec<EagerRun>,
    pub cli_lazy: Vec<Run>,
    pub cli_nix: Vec<Run>,
    /// Medians.
    pub medians: PodMedians,
    /// warm / plain (target ≤ 1.2).
    pub warm_vs_plain: f64,
    /// warm pinned / plain.
    pub warm_pinned_vs_plain: f64,
    /// cold / eager, in pods.
    pub cold_vs_eager: f64,
    /// cli lazy / cli nix, outside containerd.
    pub cli_lazy_vs_nix: f64,
}

/// The private containerd and what every start needs.
struct Rig {
    ctrd: Containerd,
    cri: CriClient,
    /// The kof config the shims read (`KOF_CONFIG`): the current node's, copied here.
    config: PathBuf,
    work: tempfile::TempDir,
    pods: usize,
}

impl Rig {
    fn start(kof_store: &Path) -> Result<Rig> {
        let work = tempfile::Builder::new().prefix("kof-bench-pod").tempdir()?;
        let config = work.path().join("kof.toml");
        std::fs::write(&config, "")?;
        let shim = kof_store
            .parent()
            .context("locating the shim")?
            .join(FLOX_SHIM_NAME);
        if !shim.exists() {
            bail!(
                "{} is missing: cargo build --release -p kof-shim",
                shim.display()
            );
        }
        let ctrd = Containerd::start(ContainerdOptions {
            flox_shim: Some(shim),
            // containerd 1.6's CRI ignores runtime_path: the runtime is registered by type and
            // the shim found on containerd's PATH (see kof-harness).
            flox_runtime_type: FLOX_SHIM_RUNTIME_TYPE.into(),
            env: vec![("KOF_CONFIG".into(), config.display().to_string())],
            ..ContainerdOptions::default()
        })
        .context("starting containerd")?;
        let dir = work.path().join("images");
        std::fs::create_dir_all(&dir)?;
        images::write_pause_image(&dir.join("pause.tar"), DEFAULT_SANDBOX_IMAGE)?;
        images::write_empty_image(&dir.join("empty.tar"), EMPTY_IMAGE)?;
        for img in ["pause.tar", "empty.tar"] {
            ctrd.import_image(CRI_NAMESPACE, &dir.join(img))?;
        }
        let cri = CriClient::connect(ctrd.socket())?;
        Ok(Rig {
            ctrd,
            cri,
            config,
            work,
            pods: 0,
        })
    }

    /// Points the shims at `node` (they read `KOF_CONFIG` at each call).
    fn use_node(&self, node: &KofNode) -> Result<()> {
        let tmp = self.config.with_extension("toml.new");
        std::fs::copy(&node.config, &tmp)?;
        std::fs::rename(&tmp, &self.config)?;
        Ok(())
    }

    /// A pod sandbox (untimed): handler `flox` with the environment annotation, or runc.
    fn sandbox(&mut self, label: &str, env: Option<&str>) -> Result<(PodSpec, String)> {
        self.pods += 1;
        let name = format!("{label}-{}", self.pods);
        let mut pod = PodSpec::new(&name, &self.work.path().join("pods").join(&name));
        if let Some(env) = env {
            pod.runtime_handler = "flox".into();
            pod.annotations = HashMap::from([(ENV_ANNOTATION.to_string(), env.to_string())]);
        }
        let id = self
            .cri
            .run_pod_sandbox(&pod)
            .with_context(|| format!("RunPodSandbox {name}"))?;
        Ok((pod, id))
    }

    /// The timed start: CreateContainer + StartContainer, then the log polled every `poll`
    /// until a line contains `marker`. Tears the pod down after (untimed).
    fn timed_start(
        &self,
        server: &ServerHandle,
        (pod, sandbox): &(PodSpec, String),
        c: &ContainerSpec,
        marker: &str,
        poll: Duration,
    ) -> Result<PodRun> {
        let log = pod.log_directory.join(&c.log_path);
        server.reset();
        let t0 = Instant::now();
        let id = self
            .cri
            .create_container(sandbox, c, pod)
            .with_context(|| format!("CreateContainer in {}", pod.name))?;
        let created_s = t0.elapsed().as_secs_f64();
        self.cri
            .start_container(&id)
            .with_context(|| format!("StartContainer in {}", pod.name))?;
        let started_s = t0.elapsed().as_secs_f64();
        // After a few seconds, once a second: a container that exited without the line failed.
        let mut next_check = t0 + Duration::from_secs(5);
        let found = loop {
            if let Some(l) = find_line(&log, marker)? {
                break l;
            }
            let waited = t0.elapsed();
            if Instant::now() > next_check {
                next_check += Duration::from_secs(1);
                let st = self.cri.container_status(&id)?;
                if st.state == kof_harness::cri_api::ContainerState::ContainerExited as i32
                    && find_line(&log, marker)?.is_none()
                {
                    bail!(
                        "{} exited ({}) without a line containing {marker:?}; log: {:?}",
                        pod.name,
                        st.exit_code,
                        read_cri_log(&log).unwrap_or_default()
                    );
                }
            }
            if waited > START_TIMEOUT {
                bail!(
                    "no line containing {marker:?} in {} after {waited:?}",
                    log.display()
                );
            }
            std::thread::sleep(poll);
        };
        let seconds = t0.elapsed().as_secs_f64();
        let s = server.stats();
        self.tear_down(sandbox, &id)?;
        Ok(PodRun {
            seconds,
            created_s,
            started_s,
            bytes: s.bytes_sent,
            requests: s.requests,
            nar_requests: s.requests_by_kind.nar,
            line: found.line,
        })
    }

    fn tear_down(&self, sandbox: &str, id: &str) -> Result<()> {
        self.cri.stop_container(id, 5)?;
        self.cri.remove_container(id)?;
        self.cri.stop_pod_sandbox(sandbox)?;
        self.cri.remove_pod_sandbox(sandbox)?;
        Ok(())
    }
}

/// The first complete line of the CRI log at `path` containing `marker`, if any yet.
fn find_line(path: &Path, marker: &str) -> Result<Option<LogLine>> {
    match read_cri_log(path) {
        Ok(lines) => Ok(lines.into_iter().find(|l| l.line.contains(marker))),
        Err(CriLogError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Waits (up to 60 s) until the node's daemon holds no lease: the shim's `delete` of the last
/// container has run.
fn wait_no_leases(node: &KofNode) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let leases = Client::connect(&node.socket())?.leases()?;
        if leases.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("leases still held after 60 s: {leases:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The plain image of an environment: its view's root copied out, the activation's variables
/// as the image's, the activation's argv as the container's command.
struct PlainImage {
    name: String,
    argv: Vec<String>,
    bytes: u64,
}

fn build_plain_image(rig: &Rig, node: &KofNode, env: &str, cmd: &[String]) -> Result<PlainImage> {
    let mut client = Client::connect(&node.socket())?.with_timeout(Duration::from_secs(600));
    let lease = "kof-bench.plain-image";
    let prepared = client.prepare(env, lease, None)?;
    let short = env.replace('/', "-");
    let tree = rig.work.path().join(format!("plain-{short}"));
    std::fs::create_dir_all(&tree)?;
    let st = Command::new("cp")
        .arg("-a")
        .arg(prepared.view_root.join("."))
        .arg(&tree)
        .status()?;
    client.release(lease)?;
    if !st.success() {
        bail!("cp -a {} failed", prepared.view_root.display());
    }
    let mut input = prepared.activation.input("/root", None);
    input.inherit = [("PATH".to_string(), BASE_PATH.to_string())].into();
    let act = activate(&input, cmd)?;
    let name = format!("docker.io/kof/podstart-{short}:1");
    let archive = rig.work.path().join(format!("plain-{short}.tar"));
    images::write_dir_image(
        &archive,
        &name,
        &tree,
        &ImageConfig {
            env: act.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            ..ImageConfig::default()
        },
    )?;
    rig.ctrd.import_image(CRI_NAMESPACE, &archive)?;
    std::fs::remove_file(&archive)?;
    let out = Command::new("du")
        .args(["-sb", "--apparent-size"])
        .arg(&tree)
        .output()?;
    let bytes = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok(PlainImage {
        name,
        argv: act.argv,
        bytes,
    })
}

#[derive(Default)]
struct Modes {
    cold: Vec<PodRun>,
    warm: Vec<PodRun>,
    warm_pinned: Vec<PodRun>,
    plain: Vec<PodRun>,
    eager: Vec<EagerRun>,
    cli_lazy: Vec<Run>,
    cli_nix: Vec<Run>,
}

impl PodStartBench {
    /// Runs it: one containerd for all environments.
    pub fn run(
        &self,
        fixtures: &Path,
        manifest: &Manifest,
        kof_store: &Path,
    ) -> Result<Vec<PodStartReport>> {
        let mut rig = Rig::start(kof_store)?;
        let server = node::serve(fixtures, self.link)?;
        let mut reports = Vec::new();
        for env in &self.envs {
            reports.push(self.run_env(&mut rig, &server, manifest, kof_store, env)?);
        }
        server.shutdown();
        Ok(reports)
    }

    fn run_env(
        &self,
        rig: &mut Rig,
        server: &ServerHandle,
        manifest: &Manifest,
        kof_store: &Path,
        env: &str,
    ) -> Result<PodStartReport> {
        let (cmd, marker) = command_for(env)?;
        let (roots, closure, nar_bytes) = node::generation(manifest, env, None)?;
        let live = node::environment(manifest, env)?.live_generation;
        let pinned = format!("{env}:{live}");
        let short = env.rsplit('/').next().unwrap_or(env).to_string();
        let mut flox_c = ContainerSpec::new("app", EMPTY_IMAGE);
        flox_c.command = cmd.clone();
        let mut run_args = vec!["run".to_string(), env.to_string(), "--".to_string()];
        run_args.extend(cmd.iter().cloned());
        let run_args: Vec<&str> = run_args.iter().map(String::as_str).collect();

        let mut m = Modes::default();
        let mut plain: Option<PlainImage> = None;
        // Nodes are kept to the end, as in coldstart (deleting a store between runs charges the
        // next run for ext4's inode allocation).
        let mut keep_kof: Vec<KofNode> = Vec::new();
        let mut keep_nix: Vec<NixNode> = Vec::new();
        let say = |mode: &str, secs: f64, bytes: u64, requests: u64| {
            eprintln!("  {mode} {env}: {secs:.3} s, {bytes} bytes, {requests} requests");
        };
        for i in 0..self.runs {
            // cold + warm + warm pinned on one node; then plain, eager, cli lazy, cli nix.
            let mut order: Vec<usize> = (0..5).collect();
            if i % 2 == 1 {
                order.reverse();
            }
            for step in order {
                match step {
                    0 => {
                        let n = KofNode::new(server, manifest, crate::coldstart::PUBLISHED, "")?;
                        n.enable_daemon()?;
                        let daemon = Daemon::start(&n, kof_store)?;
                        rig.use_node(&n)?;
                        let pod = rig.sandbox(&format!("{short}-cold"), Some(env))?;
                        let r = rig.timed_start(server, &pod, &flox_c, marker, self.poll)?;
                        say("cold", r.seconds, r.bytes, r.requests);
                        m.cold.push(r);
                        wait_no_leases(&n)?;
                        // The store filled (the default prefetch may still be running).
                        Client::connect(&n.socket())?
                            .with_timeout(Duration::from_secs(600))
                            .prefetch(env, None)?;
                        for (mode, reference) in [("warm", env), ("warm-pinned", pinned.as_str())] {
                            let pod = rig.sandbox(&format!("{short}-{mode}"), Some(reference))?;
                            let r = rig.timed_start(server, &pod, &flox_c, marker, self.poll)?;
                            say(mode, r.seconds, r.bytes, r.requests);
                            if mode == "warm" {
                                m.warm.push(r);
                            } else {
                                m.warm_pinned.push(r);
                            }
                            wait_no_leases(&n)?;
                        }
                        if plain.is_none() {
                            eprintln!("  building the plain image of {env} from its view");
                            plain = Some(build_plain_image(rig, &n, env, &cmd)?);
                        }
                        daemon.stop()?;
                        keep_kof.push(n);
                    }
                    1 | 2 => {
                        let Some(img) = &plain else {
                            continue;
                        };
                        let mut c = ContainerSpec::new("app", &img.name);
                        c.command = img.argv.clone();
                        let pod = rig.sandbox(&format!("{short}-plain"), None)?;
                        if step == 1 {
                            let r = rig.timed_start(server, &pod, &c, marker, self.poll)?;
                            say("plain", r.seconds, r.bytes, r.requests);
                            m.plain.push(r);
                        } else {
                            let n = NixNode::new()?;
                            let copy = node::timed(
                                server,
                                &mut n.copy(
                                    &server.cache_url("zstd"),
                                    &manifest.public_key,
                                    &roots,
                                ),
                            )?;
                            let start = rig.timed_start(server, &pod, &c, marker, self.poll)?;
                            let seconds = copy.seconds + start.seconds;
                            say("eager", seconds, copy.bytes, copy.requests);
                            m.eager.push(EagerRun {
                                seconds,
                                copy,
                                start,
                            });
                            keep_nix.push(n);
                        }
                    }
                    3 => {
                        let n = KofNode::new(server, manifest, crate::coldstart::PUBLISHED, "")?;
                        let r = node::timed(server, &mut n.cmd(kof_store, &run_args))?;
                        say("cli-lazy", r.seconds, r.bytes, r.requests);
                        m.cli_lazy.push(r);
                        keep_kof.push(n);
                    }
                    _ => {
                        let n = NixNode::new()?;
                        server.reset();
                        let t0 = Instant::now();
                        for c in [
                            &mut n.copy(&server.cache_url("zstd"), &manifest.public_key, &roots),
                            &mut crate::coldstart::nix_chroot_run(&n.root(), &roots, &cmd)?,
                        ] {
                            let out = c.output().with_context(|| format!("running {c:?}"))?;
                            if !out.status.success() {
                                bail!(
                                    "{c:?} failed ({}): {}",
                                    out.status,
                                    String::from_utf8_lossy(&out.stderr).trim()
                                );
                            }
                        }
                        let s = server.stats();
                        let r = Run {
                            seconds: t0.elapsed().as_secs_f64(),
                            bytes: s.bytes_sent,
                            requests: s.requests,
                            nar_requests: s.requests_by_kind.nar,
                        };
                        say("cli-nix", r.seconds, r.bytes, r.requests);
                        m.cli_nix.push(r);
                        keep_nix.push(n);
                    }
                }
            }
        }
        // Run 0 starts with the cold step, which builds the plain image.
        if m.plain.len() != self.runs || m.eager.len() != self.runs {
            bail!("plain or eager runs missing (the plain image is built by the first cold run)");
        }
        let pm = |v: &[PodRun]| median(&v.iter().map(|r| r.seconds).collect::<Vec<_>>());
        let rm = |v: &[Run]| median(&v.iter().map(|r| r.seconds).collect::<Vec<_>>());
        let medians = PodMedians {
            cold: pm(&m.cold),
            warm: pm(&m.warm),
            warm_pinned: pm(&m.warm_pinned),
            plain: pm(&m.plain),
            eager: median(&m.eager.iter().map(|r| r.seconds).collect::<Vec<_>>()),
            cli_lazy: rm(&m.cli_lazy),
            cli_nix: rm(&m.cli_nix),
        };
        Ok(PodStartReport {
            env: env.to_string(),
            cmd,
            marker: marker.to_string(),
            paths: closure.len(),
            nar_bytes,
            bandwidth: self.link.bandwidth,
            latency_ms: self.link.latency.as_millis() as u64,
            poll_ms: self.poll.as_secs_f64() * 1e3,
            plain_image_bytes: plain.map_or(0, |p| p.bytes),
            warm_vs_plain: medians.warm / medians.plain,
            warm_pinned_vs_plain: medians.warm_pinned / medians.plain,
            cold_vs_eager: medians.cold / medians.eager,
            cli_lazy_vs_nix: medians.cli_lazy / medians.cli_nix,
            medians,
            cold: m.cold,
            warm: m.warm,
            warm_pinned: m.warm_pinned,
            plain: m.plain,
            eager: m.eager,
            cli_lazy: m.cli_lazy,
            cli_nix: m.cli_nix,
        })
    }
}

/// Bytes, requests and NAR requests of one run.
type Counts = (u64, u64, u64);

fn mb(n: u64) -> String {
    format!("{:.1} MB", n as f64 / 1e6)
}

/// A Markdown table of the pod starts: medians, bytes and requests of the first run, ratios.
pub fn podstart_table(reports: &[PodStartReport]) -> String {
    let mut s = String::from(
        "| environment | mode | median | StartContainer returned (median) | vs plain runc | bytes (first run) | requests (NAR) |\n|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let m = &r.medians;
        let first = |v: &[PodRun]| {
            v.first()
                .map_or((0, 0, 0), |x| (x.bytes, x.requests, x.nar_requests))
        };
        let first_run = |v: &[Run]| {
            v.first()
                .map_or((0, 0, 0), |x| (x.bytes, x.requests, x.nar_requests))
        };
        let eager_first = r.eager.first().map_or((0, 0, 0), |x| {
            (x.copy.bytes, x.copy.requests, x.copy.nar_requests)
        });
        let started = |v: &[PodRun]| {
            format!(
                "{:.3} s",
                median(&v.iter().map(|x| x.started_s).collect::<Vec<_>>())
            )
        };
        let eager_started: Vec<PodRun> = r.eager.iter().map(|x| x.start.clone()).collect();
        let rows: [(&str, f64, String, Counts); 7] = [
            (
                "pod cold lazy (fresh node)",
                m.cold,
                started(&r.cold),
                first(&r.cold),
            ),
            (
                "pod warm (owner/name)",
                m.warm,
                started(&r.warm),
                first(&r.warm),
            ),
            (
                "pod warm (owner/name:G)",
                m.warm_pinned,
                started(&r.warm_pinned),
                first(&r.warm_pinned),
            ),
            (
                "pod plain runc (same files)",
                m.plain,
                started(&r.plain),
                first(&r.plain),
            ),
            (
                "pod eager: nix copy + plain runc",
                m.eager,
                format!("copy + {}", started(&eager_started)),
                eager_first,
            ),
            (
                "cli lazy: kof-store run",
                m.cli_lazy,
                "-".into(),
                first_run(&r.cli_lazy),
            ),
            (
                "cli Nix: nix copy + chroot",
                m.cli_nix,
                "-".into(),
                first_run(&r.cli_nix),
            ),
        ];
        for (name, med, st, (bytes, req, nar)) in rows {
            s.push_str(&format!(
                "| {} | {name} | {med:.3} s | {st} | {:.2}x | {} | {req} ({nar}) |\n",
                r.env,
                med / m.plain,
                mb(bytes)
            ));
        }
        s.push_str(&format!(
            "| {} | ratios | warm/plain {:.2}x (target <= 1.2), pinned/plain {:.2}x | | pod cold/eager {:.2}x vs cli lazy/Nix {:.2}x | ({:+.0}%) | closure {} in {} paths, image {} |\n",
            r.env,
            r.warm_vs_plain,
            r.warm_pinned_vs_plain,
            r.cold_vs_eager,
            r.cli_lazy_vs_nix,
            (r.cold_vs_eager / r.cli_lazy_vs_nix - 1.0) * 100.0,
            mb(r.nar_bytes),
            r.paths,
            mb(r.plain_image_bytes),
        ));
    }
    if let Some(r) = reports.first() {
        s.push_str(&format!(
            "\nTimed: CreateContainer to the first CRI log line containing the marker (log polled every {} ms); sandboxes made before the timer. Link: {} ms per request, {} bytes/s.\n",
            r.poll_ms,
            r.latency_ms,
            r.bandwidth.map_or("unlimited".into(), |b| b.to_string()),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_line_waits_for_a_complete_line_with_the_marker() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        assert!(find_line(&log, "ready").unwrap().is_none());
        std::fs::write(
            &log,
            "2026-01-01T00:00:00.1Z stderr F python env activated\n2026-01-01T00:00:00.2Z stdout F rea",
        )
        .unwrap();
        assert!(find_line(&log, "ready").unwrap().is_none());
        std::fs::write(
            &log,
            "2026-01-01T00:00:00.1Z stderr F python env activated\n2026-01-01T00:00:00.2Z stdout F ready\n",
        )
        .unwrap();
        let l = find_line(&log, "ready").unwrap().unwrap();
        assert_eq!(l.line, "ready");
        std::fs::write(&log, "garbage\n").unwrap();
        assert!(find_line(&log, "ready").is_err());
    }

    #[test]
    fn commands_are_known_for_the_two_environments_only() {
        let (cmd, marker) = command_for("kof/python").unwrap();
        assert!(cmd[2].contains(marker));
        assert_eq!(command_for("kof/jdk").unwrap().0, ["java", "-version"]);
        assert!(command_for("kof/other").is_err());
    }
}
