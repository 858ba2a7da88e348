//! The FUSE server process (`kof-fetcherd fuse-server`): owns the node's FUSE mount and the
//! views' trees, so that a daemon restart (crash, upgrade) never breaks a container's root file
//! system.
//!
//! It reads bytes that are local (stored paths, the present parts of partial NARs) itself,
//! through the lazy engine's `LocalReader`, and asks the daemon only to `ensure` missing NAR
//! ranges over the API socket ([`DaemonEnsure`]). While the daemon is away, an `ensure`
//! reconnects and retries with backoff until the read bound (the lazy engine's, 60 s, or
//! `read_timeout_secs` if longer); a new daemon answers it. Only when the bound passes does the read
//! fail (EIO), and the log names the file and the cause.
//!
//! One FUSE server per run directory (an exclusive `flock` on `fuse.lock`). It stops on its
//! control socket's `shutdown`, or on SIGTERM/SIGINT, unmounting first.
//!
//! It outlives what started it: it leaves the starter's cgroup (`fuse_server_cgroup`, see
//! [`super::cgroup`]), so killing the daemon's container (a DaemonSet pod replaced, evicted or
//! OOM-killed) does not kill the views; and a newer build takes its mount over without
//! unmounting ([`Start::TakeOver`], [`super::handover`]): the daemon of a new version starts
//! it when the running server's build differs from its own.
//!
//! Decoded view trees are kept by content digest (`TreeCache`): views of the same
//! environment generation share one tree in memory, and a new lease of a generation served
//! recently is added by digest (`add_cached_view`) instead of its tree crossing the control
//! socket and being parsed again.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kof_fuse::{ContentSource, Entry, MountOptions, Mounted};
use parking_lot::Mutex;

use super::control::{ControlRequest, RunPaths, WireOpStats};
use super::handover::{self, HandOverError};
use super::wire::{tree_digest, Decoder};
use kof_node_api::api::{error_line, ApiError, Client, ErrorKind, FuseServerInfo};
use kof_node_api::config::Config;

/// Longest control request line (a view's tree can be large).
const MAX_CONTROL_LINE: u64 = 1 << 30;
/// Trees kept while no view uses them (the most recently used first).
const IDLE_TREES: usize = 8;

/// Decoded view trees by digest: those of the current views, and up to [`IDLE_TREES`] more
/// that no view uses any longer, the least recently used dropped first. A tree is immutable
/// (an `Arc`): serving it for another view never changes what a reader of an existing view
/// walks.
#[derive(Default)]
pub(crate) struct TreeCache {
    trees: HashMap<String, KeptTree>,
    /// View name → the digest of its tree (views added without a digest are absent).
    views: HashMap<String, String>,
    tick: u64,
}

struct KeptTree {
    root: Arc<Entry>,
    last_used: u64,
}

impl TreeCache {
    /// The tree kept under `digest`.
    pub(crate) fn get(&mut self, digest: &str) -> Option<Arc<Entry>> {
        self.tick += 1;
        let kept = self.trees.get_mut(digest)?;
        kept.last_used = self.tick;
        Some(kept.root.clone())
    }

    /// Keeps `root` under `digest`.
    pub(crate) fn insert(&mut self, digest: &str, root: Arc<Entry>) {
        self.tick += 1;
        self.trees.insert(
            digest.to_string(),
            KeptTree {
                root,
                last_used: self.tick,
            },
        );
    }

    /// View `name` now shows the tree `digest` (`None`: a tree not kept).
    pub(crate) fn view_added(&mut self, name: &str, digest: Option<&str>) {
        match digest {
            Some(d) => {
                self.views.insert(name.to_string(), d.to_string());
            }
            None => {
                self.views.remove(name);
            }
        }
        self.evict();
    }

    /// View `name` is gone.
    pub(crate) fn view_removed(&mut self, name: &str) {
        self.views.remove(name);
        self.evict();
    }

    /// Digests of the kept trees, sorted.
    #[cfg(test)]
    fn digests(&self) -> Vec<String> {
        let mut d: Vec<String> = self.trees.keys().cloned().collect();
        d.sort();
        d
    }

    fn evict(&mut self) {
        let in_use: std::collections::HashSet<&String> = self.views.values().collect();
        let mut idle: Vec<(u64, String)> = self
            .trees
            .iter()
            .filter(|(d, _)| !in_use.contains(d))
            .map(|(d, k)| (k.last_used, d.clone()))
            .collect();
        if idle.len() <= IDLE_TREES {
            return;
        }
        idle.sort();
        let drop_n = idle.len() - IDLE_TREES;
        for (_, d) in idle.into_iter().take(drop_n) {
            self.trees.remove(&d);
        }
    }
}

/// Why the FUSE server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum FuseServerError {
    /// A file or socket of the run directory could not be set up.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The content source (the store, read-only) could not be opened.
    #[error("opening the store at {path} for reading")]
    Store {
        /// The store directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<kof_store::StoreError>,
    },
    /// Mounting failed.
    #[error(transparent)]
    Mount(#[from] kof_fuse::FuseError),
    /// The running server's mount could not be taken over.
    #[error("taking the FUSE view over from the server on {control}")]
    TakeOver {
        /// Its control socket.
        control: PathBuf,
        /// Why.
        #[source]
        source: HandOverError,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FuseServerError {
    let path = path.to_path_buf();
    move |source| FuseServerError::Io {
        action,
        path,
        source,
    }
}

/// A range the daemon refused or failed to make readable (what a FUSE read of it logs and
/// fails with, as the cause of its `EIO`).
#[derive(Debug, thiserror::Error)]
#[error("{store_path} {what}")]
pub struct EnsureFailed {
    /// The store path's base name.
    pub store_path: String,
    /// What was asked: `bytes S..E`, or `verified for its view`.
    pub what: String,
    /// The daemon's answer or the failure to get one.
    #[source]
    pub source: ApiError,
}

/// `ensure` through the daemon's API socket, with reconnects while the daemon is away.
pub struct DaemonEnsure {
    socket: PathBuf,
    bound: Duration,
    idle: Mutex<Vec<Client>>,
}

impl DaemonEnsure {
    /// Ensures through `socket`, each call bounded by `bound`.
    pub fn new(socket: &Path, bound: Duration) -> DaemonEnsure {
        DaemonEnsure {
            socket: socket.to_path_buf(),
            bound,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Makes NAR bytes `[start, end)` of `store_path` local, or fails after the bound.
    pub fn ensure_range(&self, store_path: &str, start: u64, end: u64) -> std::io::Result<()> {
        self.retrying(store_path, &format!("bytes {start}..{end}"), |c| {
            c.ensure(store_path, start, end)
        })
    }

    /// Returns once what views show inside `store_path` is verified, or fails after the bound.
    pub fn gate(&self, store_path: &str) -> std::io::Result<()> {
        self.retrying(store_path, "verified for its view", |c| c.gate(store_path))
    }

    /// Calls the daemon with `call`, reconnecting while it is away, within the bound.
    fn retrying(
        &self,
        store_path: &str,
        what: &str,
        call: impl Fn(&mut Client) -> Result<(), ApiError>,
    ) -> std::io::Result<()> {
        let deadline = Instant::now() + self.bound;
        let mut delay = Duration::from_millis(20);
        let mut waited_for_daemon = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let msg = format!(
                    "{store_path} {what}: the daemon at {} did not answer within {:?}",
                    self.socket.display(),
                    self.bound
                );
                tracing::error!("{msg}");
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, msg));
            }
            let pooled = self.idle.lock().pop();
            let client = match pooled {
                Some(c) => Ok(c),
                None => Client::connect(&self.socket),
            };
            let result = client.and_then(|mut c| {
                c.set_timeout(left);
                call(&mut c).map(|()| c)
            });
            match result {
                Ok(c) => {
                    if waited_for_daemon {
                        tracing::info!(store_path, "the daemon is back; read resumed");
                    }
                    self.idle.lock().push(c);
                    return Ok(());
                }
                Err(e) if e.is_unavailable() => {
                    if !waited_for_daemon {
                        tracing::warn!(store_path, error = %kof_node_api::report::chain(&e),
                            "daemon away; retrying the read until the bound");
                        waited_for_daemon = true;
                    }
                    std::thread::sleep(delay.min(left));
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
                Err(e) => {
                    let kind = match e {
                        ApiError::Timeout { .. } => std::io::ErrorKind::TimedOut,
                        _ => std::io::ErrorKind::Other,
                    };
                    let e = EnsureFailed {
                        store_path: store_path.to_string(),
                        what: what.to_string(),
                        source: e,
                    };
                    tracing::error!("{}", kof_node_api::report::chain(&e));
                    return Err(std::io::Error::new(kind, e));
                }
            }
        }
    }
}

impl kof_lazy::Ensure for DaemonEnsure {
    fn ensure(&self, store_path: &str, start: u64, end: u64) -> std::io::Result<()> {
        self.ensure_range(store_path, start, end)
    }

    fn gate(&self, store_path: &str) -> std::io::Result<()> {
        DaemonEnsure::gate(self, store_path)
    }
}

/// The content source of the FUSE server: local reads, `ensure` through the daemon.
fn content_source(
    config: &Config,
    ensure: Arc<DaemonEnsure>,
) -> Result<Arc<dyn ContentSource>, FuseServerError> {
    let store = kof_store::Store::open(&config.store_dir).map_err(|e| FuseServerError::Store {
        path: config.store_dir.clone(),
        source: Box::new(e),
    })?;
    Ok(Arc::new(kof_lazy::LazyContent::new(
        kof_lazy::LocalReader::new(Arc::new(store)),
        ensure,
    )))
}

/// Detaches a dead FUSE mount left at `dir` by a FUSE server that died (its accesses fail
/// with `ENOTCONN`), so a new one can mount there.
fn clear_dead_mount(dir: &Path) {
    if let Err(e) = std::fs::metadata(dir) {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            tracing::warn!(mount_dir = %dir.display(), "detaching a dead FUSE mount");
            let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// How the FUSE server comes by its mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Mount afresh (detaching a dead mount left by a crashed server).
    Fresh,
    /// Take the mount over from the running server (a newer build replacing it), see
    /// [`super::handover`].
    TakeOver,
}

/// What the control threads share.
struct Server {
    mounted: Mutex<Option<Mounted>>,
    trees: Mutex<TreeCache>,
    mount_dir: PathBuf,
    /// BLAKE3 of this executable.
    build: String,
    /// The control socket's listener and the lock file: passed on at a hand-over.
    listener_fd: std::os::fd::RawFd,
    lock_fd: std::os::fd::RawFd,
}

/// How long a successor waits for the server it took over from to exit before killing it.
const PREDECESSOR_EXIT: Duration = Duration::from_secs(10);

/// Runs the FUSE server until shutdown. Returns `Ok(false)` at once when another FUSE server
/// holds the run directory (and `start` is [`Start::Fresh`]).
pub fn run(config: &Config, start: Start) -> Result<bool, FuseServerError> {
    let paths = RunPaths::of(config);
    paths.create_dir().map_err(io_err("creating", &paths.dir))?;
    // Before any thread exists: leave the cgroup of whoever started us (the DaemonSet pod's
    // container), so that killing that container does not kill the views.
    if let Some(name) = &config.fuse_server_cgroup {
        super::cgroup::leave_for(name);
    }
    let build =
        super::control::build_id().map_err(io_err("hashing", Path::new("/proc/self/exe")))?;
    // Block the stop signals in every thread; one thread waits for them.
    let mut stop = nix::sys::signal::SigSet::empty();
    stop.add(nix::sys::signal::Signal::SIGTERM);
    stop.add(nix::sys::signal::Signal::SIGINT);
    stop.add(nix::sys::signal::Signal::SIGHUP);
    let _ = stop.thread_block();

    // The same bound as the engine's own (a read never waits longer for the daemon than
    // the daemon would wait for the cache), and never below the transfer stall timeout.
    let bound = config.demand_timeout.max(config.read_timeout);
    let ensure = Arc::new(DaemonEnsure::new(&config.socket, bound));
    let source = content_source(config, ensure)?;
    let (lock, listener, mounted, trees) = match start {
        Start::Fresh => {
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&paths.lock)
                .map_err(io_err("opening", &paths.lock))?;
            match lock.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    tracing::info!(lock = %paths.lock.display(), "another FUSE server is running");
                    return Ok(false);
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(io_err("locking", &paths.lock)(e))
                }
            }
            // A dead control socket of a previous server: we hold the lock, so it is stale.
            let _ = std::fs::remove_file(&paths.control);
            clear_dead_mount(&config.mount_dir);
            std::fs::create_dir_all(&config.mount_dir)
                .map_err(io_err("creating", &config.mount_dir))?;
            let mounted = kof_fuse::mount(&config.mount_dir, source, MountOptions::default())?;
            tracing::info!(mount_dir = %config.mount_dir.display(), %build, "FUSE view mounted");
            let listener =
                UnixListener::bind(&paths.control).map_err(io_err("binding", &paths.control))?;
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&paths.control, std::fs::Permissions::from_mode(0o600))
                    .map_err(io_err("setting the mode of", &paths.control))?;
            }
            (
                std::os::fd::OwnedFd::from(lock),
                listener,
                mounted,
                TreeCache::default(),
            )
        }
        Start::TakeOver => take_over(&paths, &build, source)?,
    };
    let server = Arc::new(Server {
        mounted: Mutex::new(Some(mounted)),
        trees: Mutex::new(trees),
        mount_dir: config.mount_dir.clone(),
        build,
        listener_fd: std::os::fd::AsRawFd::as_raw_fd(&listener),
        lock_fd: std::os::fd::AsRawFd::as_raw_fd(&lock),
    });

    let (done_tx, done_rx) = std::sync::mpsc::channel::<&'static str>();
    {
        let done_tx = done_tx.clone();
        std::thread::spawn(move || {
            if let Ok(sig) = stop.wait() {
                let _ = done_tx.send(sig.as_str());
            }
        });
    }
    {
        let server = server.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let server = server.clone();
                let done_tx = done_tx.clone();
                std::thread::spawn(move || serve_control(conn, &server, &done_tx));
            }
        });
    }
    let why = done_rx.recv().unwrap_or("control channel closed");
    tracing::info!(reason = why, "FUSE server stopping");
    let _ = std::fs::remove_file(&paths.control);
    let taken = server.mounted.lock().take();
    if let Some(m) = taken {
        m.unmount()?;
    }
    drop(lock);
    Ok(true)
}

/// Takes the mount, the control socket and the lock over from the running server.
fn take_over(
    paths: &RunPaths,
    build: &str,
    source: Arc<dyn ContentSource>,
) -> Result<(std::os::fd::OwnedFd, UnixListener, Mounted, TreeCache), FuseServerError> {
    let failed = |source: HandOverError| FuseServerError::TakeOver {
        control: paths.control.clone(),
        source,
    };
    let mut conn =
        UnixStream::connect(&paths.control).map_err(io_err("connecting to", &paths.control))?;
    conn.write_all(b"{\"op\":\"hand_over\"}\n")
        .map_err(io_err("writing to", &paths.control))?;
    let (payload, [dev, listener, lock]) = handover::receive(&conn).map_err(failed)?;
    tracing::info!(from = payload.pid, from_build = %payload.build, %build,
        views = payload.views.len(), "taking the FUSE view over");
    let roots = payload.roots().map_err(failed)?;
    // The predecessor answers nothing more once it has handed over, and must be gone before
    // the kernel is asked to resend what it left unanswered. Its end of this connection closes
    // when its last thread has exited (whatever pid namespace it is in).
    let gone = conn
        .set_read_timeout(Some(PREDECESSOR_EXIT))
        .and_then(|()| conn.read(&mut [0u8; 1]))
        .is_ok_and(|n| n == 0);
    if !gone {
        // Stuck after handing over: kill it, if the pid it gave is that server in our pid
        // namespace (its executable is of the build it named).
        let pid = payload.pid as i32;
        let same = super::control::build_of(Path::new(&format!("/proc/{pid}/exe")))
            .is_ok_and(|b| b == payload.build);
        tracing::warn!(
            pid,
            same,
            "the previous FUSE server did not exit after handing over"
        );
        if same {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = kof_node_api::pidfd::wait_exit(pid, Some(PREDECESSOR_EXIT));
        }
    }
    let mounted = kof_fuse::resume(dev, &payload.state, &roots, source, MountOptions::default())?;
    let mut trees = TreeCache::default();
    for (view, digest) in &payload.views {
        if let Some(root) = roots.get(view) {
            trees.insert(digest, root.clone());
            trees.view_added(view, Some(digest));
        }
    }
    let (inodes, handles) = payload.state.counts();
    tracing::info!(
        from = payload.pid,
        views = payload.views.len(),
        inodes,
        handles,
        "FUSE view taken over"
    );
    Ok((lock, UnixListener::from(listener), mounted, trees))
}

fn serve_control(conn: UnixStream, server: &Server, done: &std::sync::mpsc::Sender<&'static str>) {
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = Vec::new();
        match (&mut reader)
            .take(MAX_CONTROL_LINE)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let (answer, shutdown) = match serde_json::from_slice::<ControlRequest>(&line) {
            Err(e) => (
                error_line(
                    ErrorKind::BadRequest,
                    format!("bad control request: {}", kof_node_api::report::chain(&e)),
                ),
                false,
            ),
            Ok(ControlRequest::HandOver) => (hand_over(&writer, server), false),
            Ok(req) => {
                let shutdown = matches!(req, ControlRequest::Shutdown);
                (handle(req, server), shutdown)
            }
        };
        if writer.write_all(&answer).is_err() {
            return;
        }
        if shutdown {
            let _ = done.send("shutdown requested");
            return;
        }
    }
}

/// Hands the mount, the control socket and the lock to the successor on `conn`, then exits
/// the process (without unmounting). Returns the error line when the hand-over fails (the
/// mount is thawed and served on).
fn hand_over(conn: &UnixStream, server: &Server) -> Vec<u8> {
    let mut guard = server.mounted.lock();
    let Some(m) = guard.as_ref() else {
        return error_line(ErrorKind::Fuse, "the FUSE view is being unmounted");
    };
    let roots: Vec<(String, Arc<Entry>)> = m
        .views()
        .into_iter()
        .filter_map(|v| m.view_root(&v).map(|r| (v, r)))
        .collect();
    let frozen = match m.freeze() {
        Ok(f) => f,
        Err(e) => return error_line(ErrorKind::Fuse, kof_node_api::report::chain(&e)),
    };
    let kof_fuse::HandOver { fd, state } = frozen;
    let payload = handover::Payload::new(&server.build, state, roots);
    let fds = [
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        server.listener_fd,
        server.lock_fd,
    ];
    match handover::send(conn, &payload, fds) {
        Ok(()) => {
            if let Some(m) = guard.take() {
                m.handed_over();
            }
            tracing::info!(
                views = payload.views.len(),
                "FUSE view handed over; exiting"
            );
            // Nothing of ours runs again: no unmount, no destructor; the successor waits for
            // this exit before it serves.
            std::process::exit(0);
        }
        Err(e) => {
            m.thaw(kof_fuse::HandOver {
                fd,
                state: payload.state,
            });
            tracing::error!(error = %kof_node_api::report::chain(&e), "hand-over failed");
            error_line(ErrorKind::Fuse, kof_node_api::report::chain(&e))
        }
    }
}

fn json_line(v: &impl serde::Serialize) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).expect("answers always encode");
    out.push(b'\n');
    out
}

/// Serves `root` as view `name`, replacing a view of that name.
fn replace_view(m: &Mounted, name: &str, root: Arc<Entry>) -> Result<(), kof_fuse::FuseError> {
    m.remove_view(name);
    m.add_view(name, root)
}

fn handle(req: ControlRequest, server: &Server) -> Vec<u8> {
    let (trees, mount_dir) = (&server.trees, &server.mount_dir);
    let guard = server.mounted.lock();
    let Some(m) = guard.as_ref() else {
        return error_line(ErrorKind::Fuse, "the FUSE view is being unmounted");
    };
    match req {
        ControlRequest::Ping => json_line(&FuseServerInfo {
            pid: std::process::id(),
            mount_dir: mount_dir.to_path_buf(),
            views: m.views(),
            build: Some(server.build.clone()),
        }),
        ControlRequest::AddView { name, root, tree } => {
            let root = match Decoder::default().entry(&root) {
                Ok(r) => r,
                Err(e) => {
                    return error_line(
                        ErrorKind::BadRequest,
                        format!("view {name}: {}", kof_node_api::report::chain(&e)),
                    );
                }
            };
            if let Some(d) = &tree {
                let actual = tree_digest(&root);
                if &actual != d {
                    return error_line(
                        ErrorKind::BadRequest,
                        format!("view {name}: the tree's digest is {actual}, not {d}"),
                    );
                }
            }
            // Replacing: the new tree takes the place of the old one.
            match replace_view(m, &name, root.clone()) {
                Ok(()) => {
                    let mut t = trees.lock();
                    if let Some(d) = &tree {
                        t.insert(d, root);
                    }
                    t.view_added(&name, tree.as_deref());
                    tracing::info!(view = %name, tree = tree.as_deref().unwrap_or("-"), "view added");
                    json_line(&serde_json::json!({"ok": true}))
                }
                Err(e) => {
                    trees.lock().view_removed(&name);
                    error_line(ErrorKind::Fuse, kof_node_api::report::chain(&e))
                }
            }
        }
        ControlRequest::AddCachedView { name, tree } => {
            let mut t = trees.lock();
            let Some(root) = t.get(&tree) else {
                tracing::info!(view = %name, %tree, "tree not kept; the daemon sends it");
                return json_line(&serde_json::json!({"added": false}));
            };
            match replace_view(m, &name, root) {
                Ok(()) => {
                    t.view_added(&name, Some(&tree));
                    tracing::info!(view = %name, %tree, "view added from a kept tree");
                    json_line(&serde_json::json!({"added": true}))
                }
                Err(e) => {
                    t.view_removed(&name);
                    error_line(ErrorKind::Fuse, kof_node_api::report::chain(&e))
                }
            }
        }
        ControlRequest::RemoveView { name } => {
            let removed = m.remove_view(&name);
            trees.lock().view_removed(&name);
            tracing::info!(view = %name, removed, "view removed");
            json_line(&serde_json::json!({ "removed": removed }))
        }
        ControlRequest::OpStats => {
            let ops = m
                .op_stats()
                .ops
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            json_line(&WireOpStats { ops })
        }
        ControlRequest::Shutdown => json_line(&serde_json::json!({"ok": true})),
        ControlRequest::HandOver => unreachable!("answered by hand_over"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn tree(n: u8) -> Arc<Entry> {
        let mut m = BTreeMap::new();
        m.insert(
            std::ffi::OsString::from("f"),
            Arc::new(Entry::Regular {
                executable: false,
                content: kof_fuse::Content::Inline(Arc::from(&[n][..])),
            }),
        );
        Arc::new(Entry::Directory(m))
    }

    #[test]
    fn trees_in_use_stay_and_idle_ones_are_bounded() {
        let mut c = TreeCache::default();
        c.insert("used", tree(0));
        c.view_added("v1", Some("used"));
        c.view_added("v2", Some("used"));
        for i in 0..(IDLE_TREES as u8 + 3) {
            let d = format!("idle{i:02}");
            c.insert(&d, tree(i + 1));
            c.view_added(&format!("w{i}"), Some(&d));
            c.view_removed(&format!("w{i}"));
        }
        // The tree two views show is kept; of the idle ones, the most recent IDLE_TREES.
        let kept = c.digests();
        assert!(kept.contains(&"used".to_string()), "{kept:?}");
        assert_eq!(kept.len(), IDLE_TREES + 1, "{kept:?}");
        for i in 0..3 {
            assert!(!kept.contains(&format!("idle{i:02}")), "{kept:?}");
        }
        assert_eq!(c.get("used"), Some(tree(0)));
        // Removing one of its two views keeps it in use; removing both makes it idle, and
        // the most recently used: it is kept, the oldest idle one goes.
        c.view_removed("v1");
        c.view_removed("v2");
        let kept = c.digests();
        assert!(kept.contains(&"used".to_string()), "{kept:?}");
        assert_eq!(kept.len(), IDLE_TREES, "{kept:?}");
        assert!(!kept.contains(&"idle03".to_string()), "{kept:?}");
        // A view replaced by one without a digest no longer holds its tree.
        c.view_added("x", Some("idle10"));
        c.view_added("x", None);
        assert!(c.get("unknown").is_none());
    }
}
