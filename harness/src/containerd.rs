//! A private containerd for tests and benchmarks: started in a fresh temporary directory with its
//! own `root`, `state`, sockets and CNI directories, the CRI plugin configured the way this
//! machine needs (host-network pods, a local sandbox image, `restrict_oom_score_adj`) and the
//! `flox` runtime registered exactly as Flox documents it. Dropping it stops containerd, kills the
//! shims it started (and their containers), unmounts what is left under its directory and removes
//! the directory; nothing outside that directory is touched.
//!
//! Paths containerd (1.6, 1.7 and 2.x alike) keeps outside its `root`/`state` regardless of
//! configuration: a shim's ttrpc socket (`/run/containerd/s/<hash>`), `ctr`'s FIFOs
//! (`/run/containerd/fifo`), runc's state for `ctr` containers and the `flox` runtime
//! (`/run/containerd/runc/<ns>`) and cgroups.
//! They go away when containers are deleted, which is why `Drop` first deletes, through
//! containerd, any task and container a test left behind; only a shim it then has to kill
//! can leave them behind.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub use crate::release::{ConfigForm, Release};

/// The file name containerd looks up on `PATH` for runtime `io.containerd.flox.v2`.
pub const FLOX_SHIM_NAME: &str = "containerd-shim-flox-v2";
/// The `runtime_type` Flox documents for its runtime.
pub const FLOX_DOCUMENTED_RUNTIME_TYPE: &str = "io.containerd.runc.v2";
/// The `runtime_type` that makes containerd find `containerd-shim-flox-v2` on its `PATH`.
pub const FLOX_SHIM_RUNTIME_TYPE: &str = "io.containerd.flox.v2";
/// The name [`crate::images::write_pause_image`] archives are expected under by default.
pub const DEFAULT_SANDBOX_IMAGE: &str = "docker.io/kof/pause:1";
/// containerd's namespace for CRI.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// Longest unix socket path (`sun_path` is 108 bytes with its NUL; containerd adds `.ttrpc`).
const MAX_SOCKET_PATH: usize = 100;

/// Why containerd could not be started or driven.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    /// The temporary directory could not be created.
    #[error("creating containerd's temporary directory")]
    TempDir(#[source] io::Error),
    /// The socket path would not fit a unix socket address.
    #[error("socket path {0} is too long for a unix socket; set TMPDIR to a shorter directory")]
    SocketPathTooLong(PathBuf),
    /// A file (config, link) could not be written.
    #[error("writing {path}")]
    Write {
        /// the file
        path: PathBuf,
        /// the cause
        source: io::Error,
    },
    /// A program could not be started.
    #[error("running {program}")]
    Spawn {
        /// the program
        program: String,
        /// the cause
        source: io::Error,
    },
    /// containerd exited while starting.
    #[error("containerd exited ({status}) before answering on its socket; log tail:\n{log_tail}")]
    Exited {
        /// its exit status
        status: String,
        /// the end of its log
        log_tail: String,
    },
    /// containerd did not answer in time.
    #[error("containerd did not answer on {socket} within {timeout:?}; log tail:\n{log_tail}")]
    StartTimeout {
        /// its socket
        socket: PathBuf,
        /// how long it was given
        timeout: Duration,
        /// the end of its log
        log_tail: String,
    },
    /// `ctr images import` failed.
    #[error("`ctr images import {archive}` failed ({status}): {stderr}")]
    Import {
        /// the image archive
        archive: PathBuf,
        /// ctr's exit status
        status: String,
        /// ctr's stderr
        stderr: String,
    },
    /// An image imported into the CRI namespace was not seen by CRI in time.
    #[error("CRI did not see the imported image {image} within {waited:?}")]
    ImportNotSeen {
        /// the image name ctr reported unpacking
        image: String,
        /// how long we waited
        waited: Duration,
    },
}

/// How long CRI may take to see an image imported into its namespace.
const CRI_SEES_IMPORT: Duration = Duration::from_secs(30);

/// How to start a [`Containerd`].
#[derive(Debug, Clone)]
pub struct ContainerdOptions {
    /// Which containerd runs: its `containerd` binary, its `ctr` for [`Containerd::ctr`], its
    /// bin dir first on containerd's `PATH` (so its `containerd-shim-runc-v2` is the one
    /// started; runc stays Debian 12's) and the config form it reads. The system's 1.6 by
    /// default.
    pub release: Release,
    /// A `containerd-shim-flox-v2` binary: registered as CRI runtime handler `flox` (with
    /// `runtime_path`) and linked into a directory first on containerd's `PATH`, so that
    /// `ctr run --runtime io.containerd.flox.v2` finds it. `None`: no `flox` runtime at all.
    pub flox_shim: Option<PathBuf>,
    /// `runtime_type` of the `flox` runtime. Flox documents `io.containerd.runc.v2` (with
    /// `runtime_path` naming the shim), the default here; but containerd 1.6.20's CRI ignores
    /// `runtime_path` and starts `containerd-shim-runc-v2` (see the crate doc).
    /// `io.containerd.flox.v2` makes containerd run `containerd-shim-flox-v2` from `PATH` instead,
    /// which the link described at [`Self::flox_shim`] provides.
    pub flox_runtime_type: String,
    /// `SystemdCgroup` in the `flox` runtime's options, written only with the documented
    /// `runtime_type` (the `runc` runtime always uses cgroupfs: no systemd runs on this machine).
    pub systemd_cgroup: bool,
    /// Extra environment for containerd, inherited by the shims it starts (e.g. `KOF_CONFIG`).
    pub env: Vec<(String, String)>,
    /// CRI's `sandbox_image`; must be imported into namespace `k8s.io` before the first pod.
    pub sandbox_image: String,
    /// containerd's `[debug] level` (`info` by default; `debug` logs every shim call).
    pub log_level: String,
    /// How long to wait for containerd's socket to answer.
    pub start_timeout: Duration,
}

impl Default for ContainerdOptions {
    fn default() -> Self {
        Self {
            release: Release::Bookworm,
            flox_shim: None,
            flox_runtime_type: FLOX_DOCUMENTED_RUNTIME_TYPE.to_owned(),
            systemd_cgroup: false,
            env: Vec::new(),
            sandbox_image: DEFAULT_SANDBOX_IMAGE.to_owned(),
            log_level: "info".to_owned(),
            start_timeout: Duration::from_secs(30),
        }
    }
}

/// A running private containerd. See the module doc.
#[derive(Debug)]
pub struct Containerd {
    release: Release,
    dir: PathBuf,
    socket: PathBuf,
    root: PathBuf,
    state: PathBuf,
    log_path: PathBuf,
    runc_root: PathBuf,
    config_path: PathBuf,
    child: Option<Child>,
}

fn toml_str(s: impl AsRef<str>) -> String {
    toml::Value::String(s.as_ref().to_owned()).to_string()
}

fn toml_path(p: &Path) -> String {
    toml_str(p.to_string_lossy())
}

impl Containerd {
    /// Writes the config, starts containerd and waits until its socket answers.
    pub fn start(opts: ContainerdOptions) -> Result<Containerd, ContainerdError> {
        let dir = tempfile::Builder::new()
            .prefix("kof-ctrd-")
            .tempdir()
            .map_err(ContainerdError::TempDir)?
            .keep();
        // From here on `Containerd`'s Drop owns the directory, also on the error paths.
        let mut this = Containerd {
            release: opts.release,
            socket: dir.join("containerd.sock"),
            root: dir.join("root"),
            state: dir.join("state"),
            log_path: dir.join("containerd.log"),
            runc_root: dir.join("runc"),
            config_path: dir.join("config.toml"),
            dir,
            child: None,
        };
        if this.socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ContainerdError::SocketPathTooLong(this.socket.clone()));
        }
        let bin_dir = this.dir.join("bin");
        let write = |path: &Path, res: io::Result<()>| {
            res.map_err(|source| ContainerdError::Write {
                path: path.to_owned(),
                source,
            })
        };
        write(&bin_dir, fs::create_dir_all(&bin_dir))?;
        if let Some(shim) = &opts.flox_shim {
            let link = bin_dir.join(FLOX_SHIM_NAME);
            let target = std::path::absolute(shim).unwrap_or_else(|_| shim.clone());
            write(&link, std::os::unix::fs::symlink(target, &link))?;
        }
        for sub in ["cni/bin", "cni/net.d", "opt"] {
            let d = this.dir.join(sub);
            write(&d, fs::create_dir_all(&d))?;
        }
        let config = this.config_toml(&opts);
        write(&this.config_path, fs::write(&this.config_path, config))?;

        let log = fs::File::create(&this.log_path).map_err(|source| ContainerdError::Write {
            path: this.log_path.clone(),
            source,
        })?;
        // The release's binaries first (containerd execs `containerd-shim-runc-v2` from its
        // PATH), then the flox shim's link; runc comes from the rest (Debian 12's).
        let mut path_var = OsString::from(opts.release.bin_dir().as_os_str());
        path_var.push(":");
        path_var.push(bin_dir.as_os_str());
        if let Some(old) = std::env::var_os("PATH") {
            path_var.push(":");
            path_var.push(old);
        }
        let containerd = opts.release.containerd();
        let mut cmd = Command::new(&containerd);
        cmd.arg("--config")
            .arg(&this.config_path)
            .env("PATH", path_var)
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().map_err(|source| ContainerdError::Spawn {
            program: containerd.display().to_string(),
            source,
        })?;
        tracing::debug!(
            pid = child.id(),
            release = %opts.release,
            dir = %this.dir.display(),
            "containerd started"
        );
        this.child = Some(child);
        this.wait_ready(opts.start_timeout)?;
        Ok(this)
    }

    /// The config for `opts.release`, in the form it reads (see [`ConfigForm`]): the same
    /// settings either way, only the CRI tables' names and a few keys differ.
    fn config_toml(&self, opts: &ContainerdOptions) -> String {
        let form = opts.release.config_form();
        let mut c = format!(
            r#"# Written by kof-harness for a private test containerd ({release}).
version = {version}
root = {root}
state = {state}
# Snapshotters that cannot work here; skipping them only saves start time.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = {sock}

[ttrpc]
  address = {ttrpc}

[debug]
  level = {level}

[plugins."io.containerd.internal.v1.opt"]
  path = {opt}
"#,
            release = opts.release,
            version = match form {
                ConfigForm::V2 => 2,
                ConfigForm::V3 => 3,
            },
            root = toml_path(&self.root),
            state = toml_path(&self.state),
            sock = toml_path(&self.socket),
            ttrpc = toml_str(format!("{}.ttrpc", self.socket.display())),
            level = toml_str(&opts.log_level),
            opt = toml_path(&self.dir.join("opt")),
        );
        let sandbox = toml_str(&opts.sandbox_image);
        let cni_bin = toml_path(&self.dir.join("cni/bin"));
        let cni_conf = toml_path(&self.dir.join("cni/net.d"));
        // The table CRI's runtimes live under, and the keys that differ between the forms.
        let runtime = match form {
            ConfigForm::V2 => {
                let cri = r#"plugins."io.containerd.grpc.v1.cri""#;
                c.push_str(&format!(
                    r#"
[{cri}]
  sandbox_image = {sandbox}
  # This sandbox refuses to lower oom_score_adj to kubelet's -998; without this runc fails
  # with "can't get final child's PID from pipe".
  restrict_oom_score_adj = true

[{cri}.cni]
  bin_dir = {cni_bin}
  conf_dir = {cni_conf}

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
"#
                ));
                cri
            }
            ConfigForm::V3 => {
                let images = r#"plugins."io.containerd.cri.v1.images""#;
                let runtime = r#"plugins."io.containerd.cri.v1.runtime""#;
                c.push_str(&format!(
                    r#"
# containerd 2 enables NRI by default, with its socket in /var/run/nri: not for a private one.
[plugins."io.containerd.nri.v1.nri"]
  disable = true

[{images}]
  snapshotter = "overlayfs"

[{images}.pinned_images]
  sandbox = {sandbox}

[{runtime}]
  # This sandbox refuses to lower oom_score_adj to kubelet's -998; without this runc fails
  # with "can't get final child's PID from pipe".
  restrict_oom_score_adj = true

[{runtime}.cni]
  bin_dirs = [ {cni_bin} ]
  conf_dir = {cni_conf}

[{runtime}.containerd]
  default_runtime_name = "runc"
"#
                ));
                runtime
            }
        };
        c.push_str(&format!(
            r#"
[{runtime}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{runtime}.containerd.runtimes.runc.options]
  Root = {runc_root}
  SystemdCgroup = false
"#,
            runc_root = toml_path(&self.runc_root),
        ));
        if let Some(shim) = &opts.flox_shim {
            let shim = std::path::absolute(shim).unwrap_or_else(|_| shim.clone());
            c.push_str(&format!(
                r#"
# The Flox runtime, as Flox documents it (runtime_type may differ: see kof-harness's doc).
[{runtime}.containerd.runtimes.flox]
  runtime_path = {shim}
  runtime_type = {rtype}
  pod_annotations = [ "flox.dev/*" ]
  container_annotations = [ "flox.dev/*" ]
"#,
                shim = toml_path(&shim),
                rtype = toml_str(&opts.flox_runtime_type),
            ));
            // CRI encodes the options of a runtime type other than io.containerd.runc.v2 as
            // generic runtimeoptions.v1.Options, which the runc shim refuses: only the
            // documented type gets them.
            if opts.flox_runtime_type == FLOX_DOCUMENTED_RUNTIME_TYPE {
                c.push_str(&format!(
                    "[{runtime}.containerd.runtimes.flox.options]\n  SystemdCgroup = {}\n",
                    opts.systemd_cgroup
                ));
            }
        }
        c
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), ContainerdError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(ContainerdError::Exited {
                        status: status.to_string(),
                        log_tail: self.log_tail(40),
                    });
                }
            }
            if self.socket.exists() {
                let answered = Command::new(self.release.ctr())
                    .arg("-a")
                    .arg(&self.socket)
                    .arg("version")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map_err(|source| ContainerdError::Spawn {
                        program: self.release.ctr().display().to_string(),
                        source,
                    })?;
                if answered.success() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(ContainerdError::StartTimeout {
                    socket: self.socket.clone(),
                    timeout,
                    log_tail: self.log_tail(40),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// containerd's gRPC socket (also CRI's endpoint).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// containerd's `root` (content, snapshots, metadata).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// containerd's `state` (task bundles: `<state>/io.containerd.runtime.v2.task/<ns>/<id>`).
    pub fn state(&self) -> &Path {
        &self.state
    }

    /// The temporary directory everything of this containerd lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// runc's `--root` for the `runc` runtime (under [`Self::dir`]).
    pub fn runc_root(&self) -> &Path {
        &self.runc_root
    }

    /// The config file containerd was started with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// containerd's log (its stderr) so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The release this containerd is.
    pub fn release(&self) -> Release {
        self.release
    }

    /// `ctr -a <socket> -n <namespace>` (the release's own `ctr`), ready for more arguments.
    pub fn ctr(&self, namespace: &str) -> Command {
        let mut cmd = Command::new(self.release.ctr());
        cmd.arg("-a").arg(&self.socket).arg("-n").arg(namespace);
        cmd
    }

    /// `ctr images import` of an OCI archive (see [`crate::images`]) into `namespace`, unpacked
    /// for the default (overlayfs) snapshotter. Use [`CRI_NAMESPACE`] for images CRI should see:
    /// then it returns once CRI's `ImageStatus` knows each image (containerd 2.x's CRI learns of
    /// an import from an event, after `ctr` has returned).
    pub fn import_image(&self, namespace: &str, archive: &Path) -> Result<(), ContainerdError> {
        let out = self
            .ctr(namespace)
            .args(["images", "import"])
            .arg(archive)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ContainerdError::Spawn {
                program: self.release.ctr().display().to_string(),
                source,
            })?;
        if !out.status.success() {
            return Err(ContainerdError::Import {
                archive: archive.to_owned(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        if namespace == CRI_NAMESPACE {
            // `unpacking docker.io/kof/busybox:1 (sha256:...)...done`
            let stdout = String::from_utf8_lossy(&out.stdout);
            let images = stdout
                .lines()
                .filter_map(|l| l.strip_prefix("unpacking "))
                .filter_map(|l| l.split_whitespace().next());
            // A containerd without CRI has nothing to wait for.
            if let Ok(cri) = crate::cri::CriClient::connect(&self.socket) {
                for image in images {
                    let start = Instant::now();
                    while !cri.image_status(image).is_ok_and(|i| i.is_some()) {
                        if start.elapsed() > CRI_SEES_IMPORT {
                            return Err(ContainerdError::ImportNotSeen {
                                image: image.to_string(),
                                waited: CRI_SEES_IMPORT,
                            });
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
        Ok(())
    }

    /// PIDs of the shims started for this containerd; see [`shim_pids_for`].
    pub fn shim_pids(&self) -> Vec<i32> {
        shim_pids_for(&self.socket)
    }

    /// Mount points at or under this containerd's directory, as `/proc/self/mountinfo` lists them.
    pub fn mounts(&self) -> Vec<PathBuf> {
        mounts_under(&self.dir)
    }

    /// Runs a `ctr` command with a deadline; its stdout if it succeeded.
    fn ctr_quick(&self, namespace: &str, args: &[&str]) -> Option<String> {
        let mut child = self
            .ctr(namespace)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    let mut out = String::new();
                    io::Read::read_to_string(child.stdout.as_mut()?, &mut out).ok()?;
                    return status.success().then_some(out);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
            }
        }
    }

    /// Deletes every task and container still there, through containerd, so that their shims
    /// exit and clean up after themselves (their sockets, runc state and cgroups live outside
    /// our directory). Cheap when a test already cleaned up.
    fn delete_leftover_containers(&self) {
        let Some(namespaces) = self.ctr_quick("default", &["namespaces", "ls", "-q"]) else {
            return;
        };
        for ns in namespaces.lines().map(str::trim).filter(|n| !n.is_empty()) {
            let tasks = self
                .ctr_quick(ns, &["tasks", "ls", "-q"])
                .unwrap_or_default();
            let containers = self
                .ctr_quick(ns, &["containers", "ls", "-q"])
                .unwrap_or_default();
            if !tasks.trim().is_empty() || !containers.trim().is_empty() {
                tracing::warn!(namespace = ns, "deleting containers left running");
            }
            for id in tasks.lines().filter(|l| !l.is_empty()) {
                self.ctr_quick(ns, &["tasks", "delete", "--force", id]);
            }
            for id in containers.lines().filter(|l| !l.is_empty()) {
                self.ctr_quick(ns, &["containers", "delete", id]);
            }
        }
    }

    fn stop_containerd(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(pid = child.id(), "containerd ignored SIGTERM; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }

    fn kill_shims(&self) {
        let shims = self.shim_pids();
        if shims.is_empty() {
            return;
        }
        // Their containers first (a container's init is a child of its shim, which is a
        // subreaper), then the shims themselves.
        let procs = processes();
        let children: Vec<i32> = procs
            .iter()
            .filter(|p| shims.contains(&p.ppid))
            .map(|p| p.pid)
            .collect();
        tracing::warn!(
            ?shims,
            ?children,
            "killing leftover shims and their containers"
        );
        for pid in children.iter().chain(shims.iter()) {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let all: Vec<i32> = children.into_iter().chain(shims).collect();
        while Instant::now() < deadline && all.iter().any(|p| is_alive(*p)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn unmount_all(&self) -> bool {
        for _ in 0..10 {
            let mut mounts = mounts_under(&self.dir);
            if mounts.is_empty() {
                return true;
            }
            // Deepest first; lazily, so a busy mount cannot keep us.
            mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
            for m in &mounts {
                if let Err(e) = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH) {
                    tracing::warn!(mount = %m.display(), error = %e, "unmount failed");
                }
            }
        }
        mounts_under(&self.dir).is_empty()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.delete_leftover_containers();
        }
        self.stop_containerd();
        self.kill_shims();
        if !self.unmount_all() {
            // Never let remove_dir_all walk into a mount: it could reach outside the directory.
            tracing::error!(dir = %self.dir.display(), "mounts remain; leaving the directory");
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "removing containerd's directory");
        }
    }
}

/// PIDs of the processes whose argv has `-address <socket>`: the shims a containerd listening on
/// `socket` started (they keep running after containerd stops).
pub fn shim_pids_for(socket: &Path) -> Vec<i32> {
    let sock = socket.as_os_str().as_bytes();
    processes()
        .into_iter()
        .filter(|p| {
            p.argv
                .windows(2)
                .any(|w| w[0] == b"-address" && w[1] == sock)
        })
        .map(|p| p.pid)
        .collect()
}

struct ProcInfo {
    pid: i32,
    ppid: i32,
    argv: Vec<Vec<u8>>,
}

fn processes() -> Vec<ProcInfo> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The fields after the parenthesised command name: state, ppid, ...
            let after = &stat[stat.rfind(')')? + 1..];
            let ppid = after.split_whitespace().nth(1)?.parse().ok()?;
            let argv = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(<[u8]>::to_vec)
                .collect();
            Some(ProcInfo { pid, ppid, argv })
        })
        .collect()
}

fn is_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Decodes the octal escapes (`\040` etc.) mountinfo uses in paths.
fn unescape_mountinfo(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// Mount points at or under `dir` in this process's mount namespace.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|m| m.starts_with(dir))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(
            unescape_mountinfo(r"/tmp/a\040b\134c"),
            PathBuf::from(r"/tmp/a b\c")
        );
        assert_eq!(unescape_mountinfo(r"/x\04"), PathBuf::from(r"/x\04"));
    }
}
