//! The control socket of the FUSE server (`<run dir>/fuse.sock`, mode 0600): how the daemon
//! adds and removes views, lists them after a restart, and reads the FUSE operation
//! statistics. Same framing as the API (one JSON object per line each way, see
//! [`kof_node_api::api`]); requests:
//!
//! - `{"op":"ping"}` → `{"pid":P,"mount_dir":"...","views":["lease",...]}`
//! - `{"op":"add_view","name":"lease","root":<tree>,"tree":"<digest>"?}` → `{"ok":true}` (the
//!   tree as [`super::wire::WireEntry`]; replaces a view of the same name). With `tree` (the
//!   tree's [`super::wire::tree_digest`]), the server keeps the decoded tree under that digest
//!   for `add_cached_view`.
//! - `{"op":"add_cached_view","name":"lease","tree":"<digest>"}` → `{"added":bool}`: serves
//!   the tree kept under that digest as view `name` (replacing a view of the same name), without
//!   the tree crossing the socket again; `false` (nothing changed) when the server does not hold
//!   it (it keeps the trees of its views and a few recently unused ones; a new server holds
//!   none), and the daemon then sends it with `add_view`. A server older than this op answers
//!   `bad_request`; the daemon then sends `add_view` without `tree`.
//! - `{"op":"remove_view","name":"lease"}` → `{"removed":bool}`
//! - `{"op":"op_stats"}` → `{"ops":{"read":{"count":N,"sum_seconds":S,"buckets":[[le,n],...]},...}}`
//! - `{"op":"shutdown"}` → `{"ok":true}`, then the server unmounts and exits (views are gone:
//!   only for node shutdown and tests, never for a daemon restart).
//! - `{"op":"hand_over"}` (from a successor, `fuse-server --take-over`) → the hand-over
//!   payload with three descriptors, then the server exits without unmounting (see
//!   [`super::handover`]). The ping answer's `build` (BLAKE3 of the server's executable) tells
//!   the daemon when a newer build should take over.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::wire::WireEntry;
use kof_node_api::api::{ApiError, Client, FuseServerInfo};
use kof_node_api::config::Config;

/// Where the FUSE server's files are: beside the API socket.
#[derive(Debug, Clone)]
pub struct RunPaths {
    /// The run directory (the API socket's directory).
    pub dir: PathBuf,
    /// The FUSE server's control socket.
    pub control: PathBuf,
    /// Held (flock) by the running FUSE server: at most one per run directory.
    pub lock: PathBuf,
    /// The FUSE server's log (its stderr).
    pub log: PathBuf,
}

impl RunPaths {
    /// The paths for `config`.
    pub fn of(config: &Config) -> RunPaths {
        let dir = config
            .socket
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/run/kof"));
        RunPaths {
            control: dir.join("fuse.sock"),
            lock: dir.join("fuse.lock"),
            log: dir.join("fuse-server.log"),
            dir,
        }
    }

    /// Creates the run directory, mode 0700 (root only).
    pub fn create_dir(&self) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
    }
}

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Who are you, what do you serve.
    Ping,
    /// Serve a view.
    AddView {
        /// The view's name (the lease id).
        name: String,
        /// Its tree.
        root: WireEntry,
        /// The tree's digest ([`super::wire::tree_digest`]): keep the tree under it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tree: Option<String>,
    },
    /// Serve a tree the server keeps, by digest.
    AddCachedView {
        /// The view's name (the lease id).
        name: String,
        /// The tree's digest.
        tree: String,
    },
    /// Stop serving a view.
    RemoveView {
        /// The view's name.
        name: String,
    },
    /// FUSE operation statistics.
    OpStats,
    /// Unmount and exit.
    Shutdown,
    /// Hand the mount to the caller (a successor) and exit.
    HandOver,
}

impl ControlRequest {
    /// The op name.
    pub fn op(&self) -> &'static str {
        match self {
            ControlRequest::Ping => "ping",
            ControlRequest::AddView { .. } => "add_view",
            ControlRequest::AddCachedView { .. } => "add_cached_view",
            ControlRequest::RemoveView { .. } => "remove_view",
            ControlRequest::OpStats => "op_stats",
            ControlRequest::Shutdown => "shutdown",
            ControlRequest::HandOver => "hand_over",
        }
    }
}

/// The answer to `op_stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WireOpStats {
    /// By operation name: its latency histogram (a [`kof_fuse::OpStat`]).
    pub ops: BTreeMap<String, kof_metrics::HistogramSnapshot>,
}

#[derive(Deserialize)]
struct OkAnswer {
    #[allow(dead_code)]
    ok: bool,
}

#[derive(Deserialize)]
struct Added {
    added: bool,
}

#[derive(Deserialize)]
struct Removed {
    removed: bool,
}

/// A client of the control socket.
pub struct ControlClient {
    client: Client,
}

impl ControlClient {
    /// Connects.
    pub fn connect(path: &Path) -> Result<ControlClient, ApiError> {
        Ok(ControlClient {
            client: Client::connect(path)?.with_timeout(Duration::from_secs(60)),
        })
    }

    /// The server's pid, mount point and views.
    pub fn ping(&mut self) -> Result<FuseServerInfo, ApiError> {
        self.client.call_json("ping", &ControlRequest::Ping)
    }

    /// Serves `root` as view `name`; with `tree` (its digest), the server keeps it for
    /// [`ControlClient::add_cached_view`].
    pub fn add_view(
        &mut self,
        name: &str,
        root: WireEntry,
        tree: Option<&str>,
    ) -> Result<(), ApiError> {
        let _: OkAnswer = self.client.call_json(
            "add_view",
            &ControlRequest::AddView {
                name: name.to_string(),
                root,
                tree: tree.map(str::to_string),
            },
        )?;
        Ok(())
    }

    /// Serves the tree the server keeps under digest `tree` as view `name`; `false` when it
    /// keeps no such tree (nothing changed).
    pub fn add_cached_view(&mut self, name: &str, tree: &str) -> Result<bool, ApiError> {
        let r: Added = self.client.call_json(
            "add_cached_view",
            &ControlRequest::AddCachedView {
                name: name.to_string(),
                tree: tree.to_string(),
            },
        )?;
        Ok(r.added)
    }

    /// Removes view `name`; `false` if there was none.
    pub fn remove_view(&mut self, name: &str) -> Result<bool, ApiError> {
        let r: Removed = self.client.call_json(
            "remove_view",
            &ControlRequest::RemoveView {
                name: name.to_string(),
            },
        )?;
        Ok(r.removed)
    }

    /// FUSE operation statistics.
    pub fn op_stats(&mut self) -> Result<WireOpStats, ApiError> {
        self.client.call_json("op_stats", &ControlRequest::OpStats)
    }

    /// Asks the server to unmount and exit.
    pub fn shutdown(&mut self) -> Result<(), ApiError> {
        let _: OkAnswer = self
            .client
            .call_json("shutdown", &ControlRequest::Shutdown)?;
        Ok(())
    }
}

/// Why the FUSE server could not be reached or started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The run directory or the log could not be prepared.
    #[error("preparing {path} for the FUSE server")]
    Setup {
        /// What.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The process could not be started.
    #[error("starting the FUSE server ({exe})")]
    Spawn {
        /// The executable.
        exe: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Started to take over, it exited instead.
    #[error("the FUSE server started to take over exited ({status}; see its log {log})")]
    TakeOverExited {
        /// Its exit status.
        status: String,
        /// Its log.
        log: PathBuf,
    },
    /// It started but never answered on its control socket.
    #[error("the FUSE server did not answer on {control} within {waited:?} (see its log {log})")]
    NoAnswer {
        /// The control socket.
        control: PathBuf,
        /// Its log.
        log: PathBuf,
        /// How long we waited.
        waited: Duration,
        /// The last attempt's error (`None`: no attempt was made); boxed, as it is large.
        #[source]
        last: Option<Box<ApiError>>,
    },
}

/// Finds the running FUSE server, or starts one (detached in its own session, so it outlives
/// this daemon) and waits until it answers. Returns what it serves.
pub fn ensure_fuse_server(
    config: &Config,
    paths: &RunPaths,
    wait: Duration,
) -> Result<FuseServerInfo, SpawnError> {
    if let Ok(info) = ControlClient::connect(&paths.control).and_then(|mut c| c.ping()) {
        tracing::info!(
            pid = info.pid,
            views = info.views.len(),
            build = info.build.as_deref().unwrap_or("-"),
            "found the running FUSE server"
        );
        let own = match build_id() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hash this executable; the running FUSE server stays");
                return Ok(info);
            }
        };
        if info.build.as_deref() == Some(own.as_str()) {
            return Ok(info);
        }
        // A different build: the new one takes the mount over, views and open files included.
        return Ok(upgrade_fuse_server(config, paths, wait, info, &own));
    }
    spawn_fuse_server(config, paths, wait, false)
}

/// Starts this build's FUSE server to take over from `running` (another build), and waits until
/// it answers. The running server stays when the take-over fails (its log and ours say why).
fn upgrade_fuse_server(
    config: &Config,
    paths: &RunPaths,
    wait: Duration,
    running: FuseServerInfo,
    own: &str,
) -> FuseServerInfo {
    tracing::info!(
        pid = running.pid,
        from = running.build.as_deref().unwrap_or("-"),
        to = own,
        "replacing the FUSE server with this build's, without unmounting"
    );
    match spawn_fuse_server(config, paths, wait, true) {
        Ok(info) if info.pid != running.pid && info.build.as_deref() == Some(own) => {
            tracing::info!(
                pid = info.pid,
                views = info.views.len(),
                "the FUSE server was replaced"
            );
            info
        }
        Ok(info) => {
            tracing::warn!(pid = info.pid, log = %paths.log.display(),
                "the FUSE server did not take over (see its log); the running one stays");
            info
        }
        Err(e) => {
            tracing::warn!(error = %kof_node_api::report::chain(&e),
                "the FUSE server did not take over; the running one stays");
            running
        }
    }
}

/// BLAKE3 of this process's executable (hex): what tells two builds of the FUSE server apart.
/// Hashed once per process (the executable does not change under a running process).
pub fn build_id() -> std::io::Result<String> {
    static BUILD: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(b) = BUILD.get() {
        return Ok(b.clone());
    }
    let b = build_of(Path::new("/proc/self/exe"))?;
    Ok(BUILD.get_or_init(|| b).clone())
}

/// BLAKE3 (hex) of the executable at `exe` (`/proc/<pid>/exe` for a running process).
pub fn build_of(exe: &Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(std::fs::File::open(exe)?)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// Starts a FUSE server (taking over from the running one when `take_over`), detached in its
/// own session, and waits until a server of this build answers.
fn spawn_fuse_server(
    config: &Config,
    paths: &RunPaths,
    wait: Duration,
    take_over: bool,
) -> Result<FuseServerInfo, SpawnError> {
    paths.create_dir().map_err(|source| SpawnError::Setup {
        path: paths.dir.clone(),
        source,
    })?;
    let exe = std::env::current_exe().map_err(|source| SpawnError::Spawn {
        exe: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log)
        .map_err(|source| SpawnError::Setup {
            path: paths.log.clone(),
            source,
        })?;
    let log2 = log.try_clone().map_err(|source| SpawnError::Setup {
        path: paths.log.clone(),
        source,
    })?;
    let own = build_id().ok();
    let mut cmd = Command::new(&exe);
    cmd.arg("fuse-server");
    if take_over {
        cmd.arg("--take-over");
    }
    if let Some(src) = &config.source {
        cmd.arg("--config").arg(src);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
    // SAFETY: setsid is async-signal-safe; the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| SpawnError::Spawn {
        exe: exe.clone(),
        source,
    })?;
    tracing::info!(pid = child.id(), take_over, "started the FUSE server");
    let start = Instant::now();
    let mut last = None;
    let mut answer = None;
    while start.elapsed() < wait {
        match ControlClient::connect(&paths.control).and_then(|mut c| c.ping()) {
            // Taking over, the old server answers until it hands over.
            Ok(info) if take_over && info.build != own => {}
            Ok(info) => {
                answer = Some(info);
                break;
            }
            Err(e) => last = Some(Box::new(e)),
        }
        // A successor that gave up (an older server without hand-over, say) has exited: no
        // need to wait out the bound. (A fresh server that finds another running exits too,
        // and the loop waits for that one.)
        if take_over {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(SpawnError::TakeOverExited {
                    status: status.to_string(),
                    log: paths.log.clone(),
                });
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Reap it if it exits while we live (it normally outlives us).
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    if let Some(info) = answer {
        return Ok(info);
    }
    Err(SpawnError::NoAnswer {
        control: paths.control.clone(),
        log: paths.log.clone(),
        waited: wait,
        last,
    })
}
