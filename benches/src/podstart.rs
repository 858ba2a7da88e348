//! Pod start through CRI: `CreateContainer` + `StartContainer` to the command's first output
//! line in the container's CRI log, on a private containerd of each release asked for
//! (Debian 12's 1.6, trixie's 1.7, sid's 2.x: [`Release`]) with the real
//! `containerd-shim-flox-v2` (runtime handler `flox`) and runc (handler `""`). The `flox` runtime
//! is registered as the shim's tests register it: by type on 1.6 (whose CRI ignores
//! `runtime_path`), as Flox documents it from 1.7 on. Each release is measured in turn, all its
//! modes in one pass; every ratio compares modes of one release.
//!
//! Modes, interleaved run by run (the order reversed on odd runs) so that machine noise hits
//! them alike and every ratio comes from one invocation, all over the same shaped fixture link:
//! - `cold`: a fresh kof node (empty store, a fresh `kof-fetcherd` with the default prefetch,
//!   range-capable cache) and a `flox` pod of the environment (`flox/empty` image);
//! - `warm`: a second `flox` pod on that node once the first is gone and the closure is
//!   stored (`prefetch` through the daemon, untimed); the annotation names the environment as
//!   a pod would (`owner/name`), so the shim still resolves the live generation on FloxHub;
//! - `warm_pinned`: the same with `owner/name:G`, which resolves without FloxHub. It always
//!   starts second: the first warm pod after the prefetch reads its files through FUSE again
//!   (about 180 reads; the second pod's are mostly answered by the page cache), which each
//!   start's `fuse_by_op` shows;
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
//!
//! Each start also records a [`Timeline`] (untimed, read after the line is found), from which
//! [`Breakdown`] gives the median of each part of a start per mode:
//! - the CRI calls' returns (CreateContainer, StartContainer), from the client;
//! - for `flox` pods, the shim's log (`<containers_dir>/shim.log`, with `KOF_SHIM_LOG` set to
//!   log the proxy's requests): when the proxy got the task `Create`, when it logged
//!   "container prepared" (the daemon's prepare, the overlay and the bundle's rewrite done), when
//!   it got the task `Start`;
//! - the daemon's metrics (`metrics_addr`): its prepare latency and the FUSE operations the view
//!   answered (from just before the timer to just after the line: a few operations of the
//!   command's exit may fall inside);
//! - containerd's own record of the task's start (`ContainerStatus.started_at`) and its
//!   timestamp of the line in the CRI log, so the poll's lag is known.
//!
//! The clocks: the timer is monotonic; the shim's, containerd's and the log's times are the
//! wall clock, set against the timer by the wall time read with the timer's start.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
use kof_harness::release::Release;
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
/// The shim's log filter (`KOF_SHIM_LOG`): its usual `info`, and the proxy's requests, whose
/// times the breakdown reads.
const SHIM_LOG_FILTER: &str = "info,kof_shim::proxy=debug";

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
    /// The containerd releases, measured in this order (see [`available_releases`]).
    pub releases: Vec<Release>,
}

/// The releases of `asked` (every release when empty) that are there; each missing one is
/// reported loudly on stderr, with how to get it, and skipped.
pub fn available_releases(asked: &[Release]) -> Vec<Release> {
    let asked = if asked.is_empty() {
        Release::ALL.to_vec()
    } else {
        asked.to_vec()
    };
    let mut out = Vec::new();
    for r in asked {
        if out.contains(&r) {
            continue;
        }
        if r.is_available() {
            out.push(r);
        } else {
            let bar = "#".repeat(88);
            eprintln!(
                "{bar}\n## containerd {r} is not available: its pod starts are SKIPPED.\n## Get it with: {}\n{bar}",
                r.how_to_get()
            );
        }
    }
    out
}

/// When the parts of one start happened, in seconds from the timer's start (see the module
/// doc); `None` where the source did not say (a plain pod has no shim and no daemon).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timeline {
    /// The shim's proxy got the container's task `Create`.
    pub shim_create: Option<f64>,
    /// The shim logged "container prepared" for the container.
    pub shim_prepared: Option<f64>,
    /// The shim's proxy got the container's task `Start`.
    pub shim_start: Option<f64>,
    /// containerd's record of the task's start (`ContainerStatus.started_at`).
    pub task_started: Option<f64>,
    /// containerd's timestamp of the line in the CRI log.
    pub line_written: Option<f64>,
    /// Seconds the daemon spent in prepare (its `kof_prepare_seconds` sum, before and after).
    pub prepare: Option<f64>,
    /// Prepares the daemon answered in that time.
    pub prepares: Option<u64>,
    /// FUSE operations the view answered (its `kof_fuse_op_seconds` counts, before and after;
    /// the FUSE server's counts are of all its views, and only this start's is in use).
    pub fuse_ops: Option<u64>,
    /// `lookup`s among them.
    pub fuse_lookups: Option<u64>,
    /// Seconds the FUSE server spent answering them.
    pub fuse_seconds: Option<f64>,
    /// The same per FUSE operation: its count and seconds.
    pub fuse_by_op: BTreeMap<String, (u64, f64)>,
    /// RunPodSandbox, seconds (made just before the timer; for a flox pod it starts the pod's
    /// resolution of a live reference, which its container's prepare waits for if it is
    /// still under way).
    pub sandbox: Option<f64>,
    /// Requests the server answered from RunPodSandbox to the timer's start (a live flox
    /// pod's one FloxHub round trip is among them).
    pub sandbox_requests: Option<u64>,
}

/// A pod sandbox made for one start, and what making it took.
pub struct Sandbox {
    pod: PodSpec,
    id: String,
    seconds: f64,
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
    /// Where its time went.
    pub timeline: Timeline,
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

/// The median of each part of the starts of one mode, seconds (see the module doc). A part is
/// `None` when no start of the mode had it (a plain pod has no shim).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Breakdown {
    /// CreateContainer's call.
    pub create_call: f64,
    /// StartContainer's call.
    pub start_call: f64,
    /// CreateContainer's return to the proxy's task `Create`: containerd, the shim binary's
    /// `start` (on 1.6 and 1.7, per container) and the runc shim's.
    pub to_shim_create: Option<f64>,
    /// The proxy's `Create` to "container prepared", less the daemon's prepare: the shim's own
    /// work (sweep, spec, container record, overlay mount, rewrite).
    pub shim_own: Option<f64>,
    /// The daemon's prepare.
    pub prepare: Option<f64>,
    /// "container prepared" to the proxy's task `Start`: the runc shim's `Create` (runc create)
    /// and containerd between the two.
    pub prepared_to_start: Option<f64>,
    /// The proxy's `Start` to containerd's record of the task's start (runc start).
    pub runc_start: Option<f64>,
    /// CreateContainer's return to containerd's record of the task's start: the whole of
    /// StartContainer's work, for every mode alike.
    pub to_task_started: Option<f64>,
    /// The task's start to StartContainer's return.
    pub started_to_return: Option<f64>,
    /// StartContainer's return to the line's CRI timestamp: the process (activation, the
    /// command) to its first line.
    pub return_to_line: Option<f64>,
    /// The line's CRI timestamp to the poll finding it.
    pub poll_lag: Option<f64>,
    /// The whole start (the timed figure).
    pub total: f64,
    /// RunPodSandbox, made just before the timer.
    pub sandbox: Option<f64>,
    /// RunPodSandbox plus the timed start: the pod's whole start.
    pub pod_total: Option<f64>,
    /// Requests answered from RunPodSandbox to the timer's start.
    pub sandbox_requests: Option<f64>,
    /// FUSE operations the view answered.
    pub fuse_ops: Option<f64>,
    /// `lookup`s among them.
    pub fuse_lookups: Option<f64>,
    /// Seconds the FUSE server spent answering them.
    pub fuse_seconds: Option<f64>,
}

impl Breakdown {
    /// The medians over `runs`.
    pub fn of(runs: &[PodRun]) -> Breakdown {
        let all = |f: &dyn Fn(&PodRun) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        let some = |f: &dyn Fn(&PodRun) -> Option<f64>| {
            let v: Vec<f64> = runs.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| median(&v))
        };
        let d = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        Breakdown {
            create_call: all(&|r| r.created_s),
            start_call: all(&|r| r.started_s - r.created_s),
            to_shim_create: some(&|r| d(Some(r.created_s), r.timeline.shim_create)),
            shim_own: some(&|r| {
                let t = &r.timeline;
                Some(d(t.shim_create, t.shim_prepared)? - t.prepare?)
            }),
            prepare: some(&|r| r.timeline.prepare),
            prepared_to_start: some(&|r| d(r.timeline.shim_prepared, r.timeline.shim_start)),
            runc_start: some(&|r| d(r.timeline.shim_start, r.timeline.task_started)),
            to_task_started: some(&|r| d(Some(r.created_s), r.timeline.task_started)),
            started_to_return: some(&|r| d(r.timeline.task_started, Some(r.started_s))),
            return_to_line: some(&|r| d(Some(r.started_s), r.timeline.line_written)),
            poll_lag: some(&|r| d(r.timeline.line_written, Some(r.seconds))),
            total: all(&|r| r.seconds),
            sandbox: some(&|r| r.timeline.sandbox),
            pod_total: some(&|r| Some(r.timeline.sandbox? + r.seconds)),
            sandbox_requests: some(&|r| r.timeline.sandbox_requests.map(|n| n as f64)),
            fuse_ops: some(&|r| r.timeline.fuse_ops.map(|n| n as f64)),
            fuse_lookups: some(&|r| r.timeline.fuse_lookups.map(|n| n as f64)),
            fuse_seconds: some(&|r| r.timeline.fuse_seconds),
        }
    }
}

/// The breakdowns of one environment on one release.
#[derive(Debug, Clone, Serialize)]
pub struct Breakdowns {
    /// Cold lazy pod.
    pub cold: Breakdown,
    /// Warm pod, live reference.
    pub warm: Breakdown,
    /// Warm pod, pinned generation.
    pub warm_pinned: Breakdown,
    /// Plain runc pod.
    pub plain: Breakdown,
}

/// What it measured for one environment on one containerd release.
#[derive(Debug, Clone, Serialize)]
pub struct PodStartReport {
    /// The containerd release (`bookworm`, `trixie`, `sid`).
    pub release: String,
    /// Its Debian package version.
    pub containerd_version: Option<String>,
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
    /// Where the time of the pods' starts went, per mode (medians).
    pub breakdown: Breakdowns,
    /// warm / plain (target ≤ 1.3).
    pub warm_vs_plain: f64,
    /// warm pinned / plain (target ≤ 1.2).
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

/// Where a `flox` start's timeline is read: the node's daemon metrics and the shim's log.
struct Probe {
    metrics_port: u16,
    shim_log: PathBuf,
}

impl Probe {
    fn of(node: &KofNode, metrics_port: u16) -> Probe {
        Probe {
            metrics_port,
            shim_log: node.dir.path().join("store/containers/shim.log"),
        }
    }
}

impl Rig {
    fn start(kof_store: &Path, release: Release) -> Result<Rig> {
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
        // containerd 1.6's CRI ignores runtime_path: there the runtime is registered by type and
        // the shim found on containerd's PATH (see kof-harness); from 1.7 on as Flox documents.
        let flox_runtime_type = match release {
            Release::Bookworm => FLOX_SHIM_RUNTIME_TYPE.to_string(),
            _ => ContainerdOptions::default().flox_runtime_type,
        };
        let ctrd = Containerd::start(ContainerdOptions {
            release,
            flox_shim: Some(shim),
            flox_runtime_type,
            env: vec![
                ("KOF_CONFIG".into(), config.display().to_string()),
                ("KOF_SHIM_LOG".into(), SHIM_LOG_FILTER.into()),
            ],
            ..ContainerdOptions::default()
        })
        .with_context(|| format!("starting containerd {release}"))?;
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

    /// A pod sandbox (before the timer, timed on its own): handler `flox` with the environment
    /// annotation, or runc.
    fn sandbox(
        &mut self,
        server: &ServerHandle,
        label: &str,
        env: Option<&str>,
    ) -> Result<Sandbox> {
        self.pods += 1;
        let name = format!("{label}-{}", self.pods);
        let mut pod = PodSpec::new(&name, &self.work.path().join("pods").join(&name));
        if let Some(env) = env {
            pod.runtime_handler = "flox".into();
            pod.annotations = HashMap::from([(ENV_ANNOTATION.to_string(), env.to_string())]);
        }
        server.reset();
        let t0 = Instant::now();
        let id = self
            .cri
            .run_pod_sandbox(&pod)
            .with_context(|| format!("RunPodSandbox {name}"))?;
        let seconds = t0.elapsed().as_secs_f64();
        Ok(Sandbox { pod, id, seconds })
    }

    /// The timed start: CreateContainer + StartContainer, then the log polled every `poll`
    /// until a line contains `marker`. Tears the pod down after (untimed).
    fn timed_start(
        &self,
        server: &ServerHandle,
        sb: &Sandbox,
        c: &ContainerSpec,
        marker: &str,
        poll: Duration,
        probe: Option<&Probe>,
    ) -> Result<PodRun> {
        let (pod, sandbox) = (&sb.pod, &sb.id);
        let sandbox_requests = server.stats().requests;
        let log = pod.log_directory.join(&c.log_path);
        let before = probe
            .map(|p| DaemonCounters::scrape(p.metrics_port))
            .transpose()?;
        server.reset();
        let wall0 = unix_now();
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
        // The timeline, untimed: what each source says, against the timer's start.
        let since = |wall: f64| wall - wall0;
        let mut timeline = Timeline {
            line_written: unix_seconds(&found.timestamp).map(since),
            sandbox: Some(sb.seconds),
            sandbox_requests: Some(sandbox_requests),
            ..Timeline::default()
        };
        let st = self.cri.container_status(&id)?;
        if st.started_at > 0 {
            timeline.task_started = Some(since(st.started_at as f64 / 1e9));
        }
        if let (Some(p), Some(before)) = (probe, before) {
            let d = DaemonCounters::scrape(p.metrics_port)?.since(&before);
            timeline.prepare = Some(d.prepare_seconds);
            timeline.prepares = Some(d.prepares);
            timeline.fuse_ops = Some(d.fuse_ops);
            timeline.fuse_lookups = Some(d.fuse_lookups);
            timeline.fuse_seconds = Some(d.fuse_seconds);
            timeline.fuse_by_op = d.fuse_by_op;
            let text = std::fs::read_to_string(&p.shim_log).unwrap_or_default();
            let shim = ShimEvents::read(&text, wall0, &id);
            timeline.shim_create = shim.create.map(since);
            timeline.shim_prepared = shim.prepared.map(since);
            timeline.shim_start = shim.start.map(since);
        }
        self.tear_down(sandbox, &id)?;
        Ok(PodRun {
            seconds,
            created_s,
            started_s,
            bytes: s.bytes_sent,
            requests: s.requests,
            nar_requests: s.requests_by_kind.nar,
            line: found.line,
            timeline,
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

/// The daemon's counters the timeline reads, from its metrics endpoint.
#[derive(Debug, Clone, Default)]
struct DaemonCounters {
    prepare_seconds: f64,
    prepares: u64,
    fuse_ops: u64,
    fuse_lookups: u64,
    fuse_seconds: f64,
    fuse_by_op: BTreeMap<String, (u64, f64)>,
}

impl DaemonCounters {
    /// `GET /metrics` from the daemon at 127.0.0.1:`port`.
    fn scrape(port: u16) -> Result<DaemonCounters> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
            .with_context(|| format!("the daemon's metrics on port {port}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        if !text.starts_with("HTTP/1.1 200") {
            bail!(
                "the daemon's metrics answered: {}",
                text.lines().next().unwrap_or("")
            );
        }
        Ok(DaemonCounters::parse(&text))
    }

    /// The counters in a Prometheus text exposition (zero where absent).
    fn parse(text: &str) -> DaemonCounters {
        let mut c = DaemonCounters::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let op = labels
                .split_once("op=\"")
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(op, _)| op.to_string())
                .unwrap_or_default();
            match name {
                "kof_prepare_seconds_sum" => c.prepare_seconds = v,
                "kof_prepare_seconds_count" => c.prepares = v as u64,
                "kof_fuse_op_seconds_sum" => {
                    c.fuse_seconds += v;
                    c.fuse_by_op.entry(op).or_default().1 += v;
                }
                "kof_fuse_op_seconds_count" => {
                    c.fuse_ops += v as u64;
                    if op == "lookup" {
                        c.fuse_lookups += v as u64;
                    }
                    c.fuse_by_op.entry(op).or_default().0 += v as u64;
                }
                _ => {}
            }
        }
        c
    }

    /// What changed since `before`.
    fn since(&self, before: &DaemonCounters) -> DaemonCounters {
        DaemonCounters {
            prepare_seconds: self.prepare_seconds - before.prepare_seconds,
            prepares: self.prepares.saturating_sub(before.prepares),
            fuse_ops: self.fuse_ops.saturating_sub(before.fuse_ops),
            fuse_lookups: self.fuse_lookups.saturating_sub(before.fuse_lookups),
            fuse_seconds: self.fuse_seconds - before.fuse_seconds,
            fuse_by_op: self
                .fuse_by_op
                .iter()
                .map(|(op, &(n, secs))| {
                    let (n0, secs0) = before.fuse_by_op.get(op).copied().unwrap_or_default();
                    (op.clone(), (n.saturating_sub(n0), secs - secs0))
                })
                .filter(|(_, (n, _))| *n > 0)
                .collect(),
        }
    }
}

/// The shim log's times (unix seconds) of one container's start.
#[derive(Debug, Default, PartialEq)]
struct ShimEvents {
    /// The first task `Create` the proxy got at or after the start.
    create: Option<f64>,
    /// "container prepared" for the container.
    prepared: Option<f64>,
    /// The first task `Start` after that `Create`.
    start: Option<f64>,
}

impl ShimEvents {
    /// Reads `text` (the shim log) for the start of container `id` begun at `since` (unix
    /// seconds). The proxy's requests name no container: the timer's window holds one start.
    fn read(text: &str, since: f64, id: &str) -> ShimEvents {
        let mut ev = ShimEvents::default();
        let id_field = format!("id=\"{id}\"");
        for line in text.lines() {
            let Some(t) = line
                .split_whitespace()
                .next()
                .and_then(unix_seconds)
                .filter(|t| *t >= since)
            else {
                continue;
            };
            let task_request = |method: &str| {
                line.contains("kof_shim::proxy: request")
                    && line.contains("service=containerd.task.v")
                    && line
                        .split_whitespace()
                        .any(|w| w.strip_prefix("method=") == Some(method))
            };
            if ev.create.is_none() && task_request("Create") {
                ev.create = Some(t);
            } else if ev.prepared.is_none()
                && line.contains("container prepared")
                && line.contains(&id_field)
            {
                ev.prepared = Some(t);
            } else if ev.create.is_some() && ev.start.is_none() && task_request("Start") {
                ev.start = Some(t);
            }
        }
        ev
    }
}

/// Now, in unix seconds.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Unix seconds of an RFC 3339 time (`2026-12-06T07:53:21.963284Z`, `...+01:00`), as the shim
/// log and containerd's CRI log write them; `None` for anything else.
fn unix_seconds(s: &str) -> Option<f64> {
    let num = |t: &str| -> Option<i64> {
        (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit())).then(|| t.parse().ok())?
    };
    let (date, rest) = s.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let (y, m, day) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
    let (clock, offset) = if let Some(c) = rest.strip_suffix('Z') {
        (c, 0)
    } else {
        let i = rest.rfind(['+', '-'])?;
        let (c, o) = rest.split_at(i);
        let (oh, om) = o[1..].split_once(':')?;
        let sign = if o.starts_with('-') { -1 } else { 1 };
        (c, sign * (num(oh)? * 3600 + num(om)? * 60))
    };
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut h = hms.splitn(3, ':');
    let (hh, mm, ss) = (num(h.next()?)?, num(h.next()?)?, num(h.next()?)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let frac = if frac.is_empty() {
        0.0
    } else {
        num(frac)? as f64 / 10f64.powi(frac.len() as i32)
    };
    // Days from 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60 + ss - offset) as f64 + frac)
}

/// A free TCP port on 127.0.0.1 for a node's metrics endpoint.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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
    /// Runs it: per release, one containerd for all environments.
    pub fn run(
        &self,
        fixtures: &Path,
        manifest: &Manifest,
        kof_store: &Path,
    ) -> Result<Vec<PodStartReport>> {
        if self.releases.is_empty() {
            bail!("no containerd release to run against");
        }
        let server = node::serve(fixtures, self.link)?;
        let mut reports = Vec::new();
        for &release in &self.releases {
            let version = release.version();
            eprintln!(
                "containerd {release} ({})",
                version.as_deref().unwrap_or("version unknown")
            );
            let mut rig = Rig::start(kof_store, release)?;
            for env in &self.envs {
                reports.push(self.run_env(&mut rig, &server, manifest, kof_store, env)?);
            }
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
        let release = rig.ctrd.release();
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
            eprintln!("  {release} {mode} {env}: {secs:.3} s, {bytes} bytes, {requests} requests");
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
                        let port = free_port()?;
                        let n = KofNode::new(
                            server,
                            manifest,
                            crate::coldstart::PUBLISHED,
                            &format!("metrics_addr = \"127.0.0.1:{port}\"\n"),
                        )?;
                        n.enable_daemon()?;
                        let daemon = Daemon::start(&n, kof_store)?;
                        let probe = Probe::of(&n, port);
                        rig.use_node(&n)?;
                        let pod = rig.sandbox(server, &format!("{short}-cold"), Some(env))?;
                        let r = rig.timed_start(
                            server,
                            &pod,
                            &flox_c,
                            marker,
                            self.poll,
                            Some(&probe),
                        )?;
                        say("cold", r.seconds, r.bytes, r.requests);
                        m.cold.push(r);
                        wait_no_leases(&n)?;
                        // The store filled (the default prefetch may still be running).
                        Client::connect(&n.socket())?
                            .with_timeout(Duration::from_secs(600))
                            .prefetch(env, None)?;
                        for (mode, reference) in [("warm", env), ("warm-pinned", pinned.as_str())] {
                            let pod =
                                rig.sandbox(server, &format!("{short}-{mode}"), Some(reference))?;
                            let r = rig.timed_start(
                                server,
                                &pod,
                                &flox_c,
                                marker,
                                self.poll,
                                Some(&probe),
                            )?;
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
                        let pod = rig.sandbox(server, &format!("{short}-plain"), None)?;
                        if step == 1 {
                            let r = rig.timed_start(server, &pod, &c, marker, self.poll, None)?;
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
                            let start =
                                rig.timed_start(server, &pod, &c, marker, self.poll, None)?;
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
        let breakdown = Breakdowns {
            cold: Breakdown::of(&m.cold),
            warm: Breakdown::of(&m.warm),
            warm_pinned: Breakdown::of(&m.warm_pinned),
            plain: Breakdown::of(&m.plain),
        };
        Ok(PodStartReport {
            release: release.name().to_string(),
            containerd_version: release.version(),
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
            breakdown,
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

/// A Markdown table of the pod starts: per release and environment, medians, bytes and requests
/// of the first run, ratios.
pub fn podstart_table(reports: &[PodStartReport]) -> String {
    let mut s = String::from(
        "| containerd | environment | mode | median | StartContainer returned (median) | vs plain runc | bytes (first run) | requests (NAR) |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let release = format!(
            "{} ({})",
            r.release,
            r.containerd_version.as_deref().unwrap_or("?")
        );
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
                "| {release} | {} | {name} | {med:.3} s | {st} | {:.2}x | {} | {req} ({nar}) |\n",
                r.env,
                med / m.plain,
                mb(bytes)
            ));
        }
        s.push_str(&format!(
            "| {release} | {} | ratios | warm/plain {:.2}x (target <= 1.3), pinned/plain {:.2}x (target <= 1.2) | | pod cold/eager {:.2}x vs cli lazy/Nix {:.2}x | ({:+.0}%) | closure {} in {} paths, image {} |\n",
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

/// A Markdown table of where the time of a start went: per release, environment and mode, the
/// median of each part (ms; see [`Breakdown`]), `-` where the mode has no such part.
pub fn breakdown_table(reports: &[PodStartReport]) -> String {
    let mut s = String::from(
        "| containerd | environment | mode | RunPodSandbox (requests) | CreateContainer | StartContainer | → shim Create | shim own | prepare | prepared → Start (runc create) | runc start | → task started | started → return | → line | poll lag | total | sandbox + total | FUSE ops (lookups) | in FUSE |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let ms = |v: f64| format!("{:.1}", v * 1e3);
    let opt = |v: Option<f64>| v.map_or("-".to_string(), ms);
    for r in reports {
        let b = &r.breakdown;
        for (mode, b) in [
            ("cold", &b.cold),
            ("warm (owner/name)", &b.warm),
            ("warm (owner/name:G)", &b.warm_pinned),
            ("plain runc", &b.plain),
        ] {
            let fuse = match (b.fuse_ops, b.fuse_lookups) {
                (Some(o), Some(l)) => format!("{o:.0} ({l:.0})"),
                _ => "-".to_string(),
            };
            let sandbox = match (b.sandbox, b.sandbox_requests) {
                (Some(t), Some(n)) => format!("{} ({n:.0})", ms(t)),
                _ => "-".to_string(),
            };
            s.push_str(&format!(
                "| {} | {} | {mode} | {sandbox} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {fuse} | {} |\n",
                r.release,
                r.env,
                ms(b.create_call),
                ms(b.start_call),
                opt(b.to_shim_create),
                opt(b.shim_own),
                opt(b.prepare),
                opt(b.prepared_to_start),
                opt(b.runc_start),
                opt(b.to_task_started),
                opt(b.started_to_return),
                opt(b.return_to_line),
                opt(b.poll_lag),
                ms(b.total),
                opt(b.pod_total),
                opt(b.fuse_seconds),
            ));
        }
    }
    s.push_str(
        "\nMedians of each part over the runs, ms (so the parts need not add up to the total). \
         RunPodSandbox is made just before the timer (requests: the server's from its call to \
         the timer's start; a live flox pod's FloxHub round trip is made there, while the \
         sandbox starts); sandbox + total is the pod's whole start. \
         From the timer's start: CreateContainer and StartContainer are the CRI calls; → shim \
         Create is CreateContainer's return to the proxy's task Create (shim log); shim own is \
         Create to \"container prepared\" less the daemon's prepare (its metrics); prepared → \
         Start is the runc shim's Create and containerd until the proxy's task Start; runc start \
         is that Start to containerd's record of the task's start; → task started is \
         CreateContainer's return to that record (every mode); → line is StartContainer's \
         return to the line's CRI timestamp; poll lag is that timestamp to the poll finding it.\n",
    );
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
    fn rfc3339_times_are_read_as_the_shim_and_containerd_write_them() {
        assert_eq!(unix_seconds("1970-01-01T00:00:00Z"), Some(0.0));
        let t = unix_seconds("2026-12-06T07:53:21.963284Z").unwrap();
        assert!((t - 1_796_543_601.963284).abs() < 1e-6, "{t}");
        let nano = unix_seconds("2026-12-06T07:53:21.96328412Z").unwrap();
        assert!((nano - t).abs() < 1e-6);
        let offset = unix_seconds("2026-12-06T08:53:21.963284+01:00").unwrap();
        assert!((offset - t).abs() < 1e-6);
        assert_eq!(unix_seconds("2000-02-29T12:00:00Z"), Some(951_825_600.0));
        assert_eq!(unix_seconds("garbage"), None);
        assert_eq!(unix_seconds("2026-13-06T07:53:21Z"), None);
    }

    #[test]
    fn shim_events_are_those_of_the_start_in_the_window() {
        let log = "\
2026-12-06T07:53:20.000000Z DEBUG kof_shim::proxy: request service=containerd.task.v2.Task method=Create
2026-12-06T07:53:21.000000Z DEBUG kof_shim::proxy: request service=containerd.task.v2.Task method=State
2026-12-06T07:53:21.100000Z DEBUG kof_shim::proxy: request service=containerd.task.v2.Task method=Create
2026-12-06T07:53:21.200000Z  INFO kof_shim::lifecycle: container prepared namespace=\"k8s.io\" id=\"abc\" s=Environment { lease: \"x\", env: \"kof/python\", generation: 1, mode: View }
2026-12-06T07:53:21.300000Z DEBUG kof_shim::proxy: request service=containerd.task.v2.Task method=Start
2026-12-06T07:53:21.400000Z DEBUG kof_shim::proxy: request service=containerd.task.v2.Task method=Start
";
        let since = unix_seconds("2026-12-06T07:53:21Z").unwrap();
        let ev = ShimEvents::read(log, since, "abc");
        let at = |s: &str| unix_seconds(s);
        assert_eq!(ev.create, at("2026-12-06T07:53:21.1Z"));
        assert_eq!(ev.prepared, at("2026-12-06T07:53:21.2Z"));
        assert_eq!(ev.start, at("2026-12-06T07:53:21.3Z"));
        assert_eq!(ShimEvents::read(log, since, "other").prepared, None);
    }

    #[test]
    fn daemon_counters_are_read_from_the_exposition() {
        let text = "\
# HELP kof_prepare_seconds x
kof_prepare_seconds_bucket{le=\"0.01\"} 1
kof_prepare_seconds_sum 0.25
kof_prepare_seconds_count 2
kof_fuse_op_seconds_sum{op=\"lookup\"} 0.5
kof_fuse_op_seconds_count{op=\"lookup\"} 40
kof_fuse_op_seconds_sum{op=\"read\"} 0.25
kof_fuse_op_seconds_count{op=\"read\"} 10
";
        let c = DaemonCounters::parse(text);
        assert_eq!((c.prepares, c.fuse_ops, c.fuse_lookups), (2, 50, 40));
        assert_eq!((c.prepare_seconds, c.fuse_seconds), (0.25, 0.75));
        assert_eq!(c.fuse_by_op["read"], (10, 0.25));
        let d = c.since(&DaemonCounters {
            prepares: 1,
            prepare_seconds: 0.05,
            ..DaemonCounters::default()
        });
        assert_eq!(d.prepares, 1);
        assert!((d.prepare_seconds - 0.2).abs() < 1e-9);
    }

    #[test]
    fn commands_are_known_for_the_two_environments_only() {
        let (cmd, marker) = command_for("kof/python").unwrap();
        assert!(cmd[2].contains(marker));
        assert_eq!(command_for("kof/jdk").unwrap().0, ["java", "-version"]);
        assert!(command_for("kof/other").is_err());
    }
}
