//! The installation of kof on one node, step by step, each step reported as an [`Action`].
//!
//! 1. The shim (and `kof-store`, when given) is copied to `<host>/<bin_dir>/` when its content
//!    differs; a dynamically linked one gets a warning (it needs the host's libc to be new
//!    enough).
//! 2. The node config is checked as `kof-fetcherd` would load it, then written to
//!    `<host>/etc/kof/config.toml` when absent or different (the old one backed up).
//! 3. containerd's release is found out (given, or asked of the host's containerd): it chooses
//!    the form of the runtime's section (1.6 ignores `runtime_path`, see
//!    [`crate::containerd_config`]) and the version of a new config. containerd's config gets
//!    the `flox` runtime in that form; a missing or empty file becomes a minimal one of the
//!    release's version. The file is backed up before the
//!    first change and written atomically. Drop-ins named by `imports` are inspected: one that
//!    configures the CRI plugin can replace the main file's section (containerd 1.x merges
//!    imports plugin by plugin), so it is named in a warning.
//!    When the config names no table for its default runtime (`runc` unless
//!    `default_runtime_name` says otherwise), the one containerd would have used is written
//!    beside flox ([`ContainerdConfig::ensure_default_runtime`]): without it containerd 1.6 and
//!    1.7 refuse to load CRI once the file names any runtime.
//! 4. The new config is checked with the node's containerd before it replaces the old one
//!    ([`crate::check`]): a config that fails the check is never installed.
//! 5. containerd is restarted only when its config changed (and a restart command is given).
//!    Then the installer waits (bounded) until CRI answers `Status` with the `flox` runtime
//!    handler ([`crate::cri`]). If it does not, the old config is put back (or the new file
//!    removed, when there was none), containerd is restarted again, and the install fails
//!    naming what went wrong and whether CRI answers again.
//!
//! Running it again on an installed node changes nothing and restarts nothing.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::check::{self, CheckError};
use crate::containerd_config::{
    dotted, release_from_version_output, Change, ConfigVersion, ContainerdConfig,
    ContainerdConfigError, ContainerdRelease, FloxRuntime, RUNTIME_NAME, SHIM_FILE_NAME,
    SHIM_RUNTIME_TYPE,
};
use crate::cri::{self, CriError, CriStatus};
use crate::host_files::{self, HostFileError, Written};

/// containerd's socket when its config names none (`[grpc] address`).
pub const DEFAULT_CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";

/// Why CRI did not come up serving the flox runtime.
#[derive(Debug, Error)]
pub enum WaitError {
    /// CRI did not answer `Status`, or its runtime is not ready.
    #[error(transparent)]
    Cri(#[from] CriError),
    /// CRI answers, without the flox runtime handler.
    #[error("CRI at {socket} answers but its runtime handlers {handlers:?} do not include flox")]
    NoFlox {
        /// The socket.
        socket: PathBuf,
        /// The handlers it has.
        handlers: Vec<String>,
    },
}

/// Why the installation stopped.
#[derive(Debug, Error)]
pub enum InstallError {
    /// A binary to install is missing or unreadable.
    #[error("{path}: cannot read the binary to install")]
    Source {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The node config to install is not one `kof-fetcherd` accepts.
    #[error(transparent)]
    NodeConfig(Box<kof_node_api::config::ConfigError>),
    /// Reading or writing a host file failed.
    #[error(transparent)]
    HostFile(#[from] HostFileError),
    /// containerd's config could not be edited.
    #[error(transparent)]
    ContainerdConfig(Box<ContainerdConfigError>),
    /// containerd's config is not UTF-8.
    #[error("{path}: not UTF-8 text")]
    NotUtf8 {
        /// The file.
        path: PathBuf,
    },
    /// The restart command could not be started.
    #[error("restarting containerd: cannot run {command}")]
    RestartSpawn {
        /// The command line.
        command: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The restart command failed.
    #[error("restarting containerd: {command} failed ({status}): {stderr}")]
    RestartFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The end of its stderr, on one line.
        stderr: String,
    },
    /// The restart command is empty.
    #[error("restarting containerd: the restart command is empty")]
    EmptyRestart,
    /// The node's containerd refused the new config: the old one stays.
    #[error("{path} left as it was")]
    Check {
        /// containerd's config.
        path: PathBuf,
        /// The check's verdict.
        #[source]
        source: CheckError,
    },
    /// After the restart CRI did not serve the flox runtime in time: the config was rolled back.
    #[error("containerd did not serve CRI with the flox runtime within {waited:?} after the restart; {rollback}")]
    NotServing {
        /// How long the installer waited.
        waited: Duration,
        /// What the rollback did (restored, restarted, whether CRI answers again).
        rollback: String,
        /// The last answer (or failure) of CRI.
        #[source]
        last: WaitError,
    },
    /// containerd's release could not be found out.
    #[error("asking containerd its version with {command}: {reason}; the flox runtime's registration depends on it (containerd 1.6 ignores runtime_path): give the node's release with --containerd-version (e.g. 1.6.20, 1.7.2, 2.0.0)")]
    DetectVersion {
        /// The command line.
        command: String,
        /// What went wrong.
        reason: String,
    },
    /// containerd's release is not one kof knows.
    #[error("containerd release {release:?}: kof knows containerd 1.x (config version 2) and 2.x (config version 3)")]
    UnknownRelease {
        /// The release as given or printed.
        release: String,
    },
    /// The config is of a version the release cannot read.
    #[error("{path}: config version {version} is for containerd 2.x, but containerd is {release}; check --containerd-version")]
    ConfigTooNew {
        /// The file.
        path: PathBuf,
        /// Its version.
        version: ConfigVersion,
        /// The release.
        release: String,
    },
}

impl From<kof_node_api::config::ConfigError> for InstallError {
    fn from(e: kof_node_api::config::ConfigError) -> Self {
        InstallError::NodeConfig(Box::new(e))
    }
}

impl From<ContainerdConfigError> for InstallError {
    fn from(e: ContainerdConfigError) -> Self {
        InstallError::ContainerdConfig(Box::new(e))
    }
}

/// containerd's release on the node: it chooses the form of the flox runtime's section and the
/// version of a config written where there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerdVersion {
    /// This one.
    Release(ContainerdRelease),
    /// Run `command` (`containerd --version` on the host) and read its release.
    Detect {
        /// The command and its arguments.
        command: Vec<String>,
    },
}

impl ContainerdVersion {
    /// A known release (`1.7.2`, `v2.0.0`, `1.6.20~ds1`).
    pub fn for_release(release: &str) -> Result<ContainerdRelease, InstallError> {
        ContainerdRelease::parse(release)
            .filter(|r| r.config_version().is_some())
            .ok_or_else(|| InstallError::UnknownRelease {
                release: release.to_string(),
            })
    }

    /// Resolves the release (running the detection command if that is what it is).
    pub fn resolve(&self) -> Result<ContainerdRelease, InstallError> {
        let command = match self {
            ContainerdVersion::Release(r) => return Ok(r.clone()),
            ContainerdVersion::Detect { command } => command,
        };
        let line = command.join(" ");
        let err = |reason: String| InstallError::DetectVersion {
            command: line.clone(),
            reason,
        };
        let (program, args) = command
            .split_first()
            .ok_or_else(|| err("the command is empty".into()))?;
        let out = Command::new(program)
            .args(args)
            .output()
            .map_err(|e| err(format!("cannot run it: {e}")))?;
        if !out.status.success() {
            return Err(err(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let release = release_from_version_output(&stdout).ok_or_else(|| {
            err(format!(
                "no release number in its output {:?}",
                stdout.trim()
            ))
        })?;
        Self::for_release(release)
    }
}

/// The directories of systemd's default `PATH` for services (`systemd-path
/// search-binaries-default`), which containerd.service does not change: where containerd 1.6
/// can find the shim.
pub const SYSTEMD_DEFAULT_PATH: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// What to install, and where. Paths named "host" are absolute paths on the node and are
/// looked up under `host_root`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the node's root file system is mounted (`/` when run on the node itself).
    pub host_root: PathBuf,
    /// The shim binary to install (a path in this container).
    pub shim: PathBuf,
    /// `kof-store` to install as well, if given.
    pub kof_store: Option<PathBuf>,
    /// Host directory the binaries go to; the shim there is containerd's `runtime_path`.
    pub bin_dir: PathBuf,
    /// The node config to install, if given (a path in this container).
    pub node_config: Option<PathBuf>,
    /// Host path of the node config.
    pub node_config_dest: PathBuf,
    /// Host path of containerd's config.
    pub containerd_config: PathBuf,
    /// containerd's release: the form of the runtime's section, and the version of a config
    /// written where there is none (or an empty one).
    pub containerd_version: ContainerdVersion,
    /// `SystemdCgroup` when containerd's config does not say what runc uses (containerd's own
    /// default is `false`).
    pub systemd_cgroup_fallback: Option<bool>,
    /// The command restarting containerd after its config changed; `None`: do not restart.
    pub restart: Option<Vec<String>>,
    /// The command checking a new config with the node's containerd (see [`crate::check`]):
    /// `{host_path}` is replaced by the candidate's host path, `{path}` by the same file as this
    /// process sees it (under `host_root`). `None`: no check (only for tests of the file edits).
    pub check: Option<Vec<String>>,
    /// Waiting for CRI after a restart; `None`: no wait (only for tests of the file edits).
    pub cri_wait: Option<CriWait>,
}

/// How to wait for CRI after a restart.
#[derive(Debug, Clone)]
pub struct CriWait {
    /// containerd's socket (a host path); `None`: the config's `[grpc] address`, else
    /// [`DEFAULT_CONTAINERD_SOCKET`].
    pub socket: Option<PathBuf>,
    /// How long to wait for CRI to answer with the flox runtime (and again after a rollback).
    pub timeout: Duration,
}

/// How the shim's `SystemdCgroup` was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupSource {
    /// Copied from this runtime's options.
    Runtime(String),
    /// The config does not say; from the command line.
    Flag,
    /// The config does not say and no flag was given: containerd's default.
    ContainerdDefault,
}

/// One step of the installation, printed as one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A file was (or did not need to be) installed.
    File {
        /// The host file (under the host root).
        path: PathBuf,
        /// What happened.
        written: Written,
    },
    /// The form of the runtime's section chosen for containerd's release.
    Registration {
        /// The release.
        release: ContainerdRelease,
        /// Whether it is the `runtime_path` form (else the shim-on-`PATH` form).
        runtime_path: bool,
    },
    /// containerd's config did not exist (or was empty) and was started as `version = N`.
    ContainerdConfigNew {
        /// The file.
        path: PathBuf,
        /// Its version.
        version: ConfigVersion,
    },
    /// The `SystemdCgroup` value and where it came from.
    Cgroup {
        /// The value.
        systemd_cgroup: bool,
        /// Its origin.
        source: CgroupSource,
    },
    /// A key of the flox runtime was set.
    RuntimeKey {
        /// The file.
        path: PathBuf,
        /// The change.
        change: Change,
    },
    /// The flox runtime was already registered as wanted.
    RuntimeUpToDate {
        /// The file.
        path: PathBuf,
        /// The runtime's section.
        section: String,
    },
    /// Something the operator must check: the install went on.
    Warning(String),
    /// containerd was restarted.
    Restarted {
        /// The command line.
        command: String,
    },
    /// containerd's config changed but no restart was asked for.
    RestartSkipped,
    /// The config named no table for its default runtime: containerd's default was written.
    DefaultRuntimeAdded {
        /// The runtime.
        name: String,
    },
    /// The node's containerd loaded the new config and its dump has what kof needs.
    Checked {
        /// The check command.
        command: String,
    },
    /// CRI answers after the restart, with the flox runtime handler.
    CriServing {
        /// The socket.
        socket: PathBuf,
        /// Its runtime handlers.
        handlers: Vec<String>,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::File { path, written } => {
                let p = path.display();
                match written {
                    Written::Unchanged => write!(f, "unchanged {p}"),
                    Written::ModeSet => write!(f, "set mode of {p}"),
                    Written::Created => write!(f, "created {p}"),
                    Written::Replaced { backup: Some(b) } => {
                        write!(f, "replaced {p} (old one kept as {})", b.display())
                    }
                    Written::Replaced { backup: None } => write!(f, "replaced {p}"),
                }
            }
            Action::Registration {
                release,
                runtime_path: true,
            } => write!(
                f,
                "containerd {release}: flox runtime of type io.containerd.runc.v2 with runtime_path"
            ),
            Action::Registration {
                release,
                runtime_path: false,
            } => write!(
                f,
                "containerd {release} ignores runtime_path: flox runtime of type {SHIM_RUNTIME_TYPE} ({SHIM_FILE_NAME} found on containerd's PATH), without options"
            ),
            Action::ContainerdConfigNew { path, version } => write!(
                f,
                "containerd config {} is missing or empty: starting it as version {version}",
                path.display()
            ),
            Action::Cgroup {
                systemd_cgroup,
                source,
            } => match source {
                CgroupSource::Runtime(r) => write!(
                    f,
                    "SystemdCgroup = {systemd_cgroup}, as the node's {r:?} runtime has it"
                ),
                CgroupSource::Flag => write!(
                    f,
                    "SystemdCgroup = {systemd_cgroup}, from --systemd-cgroup (the config sets none for runc)"
                ),
                CgroupSource::ContainerdDefault => write!(
                    f,
                    "SystemdCgroup = {systemd_cgroup}, containerd's default (the config sets none for runc; use --systemd-cgroup to choose)"
                ),
            },
            Action::RuntimeKey { path, change } => {
                write!(f, "{change} in {}", path.display())
            }
            Action::RuntimeUpToDate { path, section } => {
                write!(f, "unchanged [{section}] in {}", path.display())
            }
            Action::Warning(w) => write!(f, "WARNING: {w}"),
            Action::Restarted { command } => write!(f, "restarted containerd ({command})"),
            Action::DefaultRuntimeAdded { name } => write!(
                f,
                "containerd's config names no table for its default runtime {name:?}: writing the one containerd would have used (io.containerd.runc.v2, SystemdCgroup = false) beside flox, without which containerd 1.6 and 1.7 refuse to load CRI"
            ),
            Action::Checked { command } => write!(
                f,
                "checked the new config: {command} loads it, with the flox runtime and a table for the default runtime"
            ),
            Action::CriServing { socket, handlers } => write!(
                f,
                "CRI answers at {} with runtime handlers {handlers:?}",
                socket.display()
            ),
            Action::RestartSkipped => write!(
                f,
                "containerd's config changed but --no-restart was given: restart containerd for the flox runtime to exist"
            ),
        }
    }
}

/// What [`install`] did overall.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Whether containerd's config was written.
    pub containerd_config_changed: bool,
    /// Whether containerd was restarted.
    pub restarted: bool,
    /// How many warnings were reported.
    pub warnings: usize,
}

/// `host` (an absolute path on the node) under `root`.
pub fn on_host(root: &Path, host: &Path) -> PathBuf {
    root.join(host.strip_prefix("/").unwrap_or(host))
}

/// Installs kof on the node as `opts` says, reporting each step to `report` as it happens.
pub fn install(opts: &Options, report: &mut dyn FnMut(&Action)) -> Result<Summary, InstallError> {
    let mut summary = Summary::default();
    let mut say = |a: Action, summary: &mut Summary| {
        if matches!(a, Action::Warning(_)) {
            summary.warnings += 1;
        }
        report(&a);
    };

    // 1. Binaries.
    let mut binaries = vec![&opts.shim];
    binaries.extend(opts.kof_store.as_ref());
    let mut runtime_path = None;
    for source in binaries {
        let content = std::fs::read(source).map_err(|e| InstallError::Source {
            path: source.clone(),
            source: e,
        })?;
        let name = source.file_name().ok_or_else(|| InstallError::Source {
            path: source.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"),
        })?;
        let host_path = opts.bin_dir.join(name);
        let path = on_host(&opts.host_root, &host_path);
        let written = host_files::install(&path, &content, 0o755, false)?;
        say(Action::File { path, written }, &mut summary);
        if let Some(interpreter) = elf_interpreter(&content) {
            say(
                Action::Warning(format!(
                    "{} is dynamically linked (loader {interpreter}): it runs on the host only if the host's libc is as new as the build's (Amazon Linux 2's glibc 2.26 is not); build it static (musl) as deploy/Containerfile does",
                    source.display()
                )),
                &mut summary,
            );
        }
        if runtime_path.is_none() {
            runtime_path = Some(host_path);
        }
    }
    let runtime_path = runtime_path.expect("the shim is always installed");

    // 2. The node config, refused here if the daemon would refuse it.
    if let Some(source) = &opts.node_config {
        kof_node_api::config::Config::load_from(Some(source), None, Path::new("/nonexistent"))?;
        let content = std::fs::read(source).map_err(|e| HostFileError::Read {
            path: source.clone(),
            source: e,
        })?;
        let path = on_host(&opts.host_root, &opts.node_config_dest);
        let written = host_files::install(&path, &content, 0o644, true)?;
        say(Action::File { path, written }, &mut summary);
    }

    // 3. containerd's config.
    let path = on_host(&opts.host_root, &opts.containerd_config);
    let original = host_files::read_if_exists(&path)?;
    let mut config = match &original {
        None => ContainerdConfig::parse(&path, "")?,
        Some(bytes) => {
            let text = std::str::from_utf8(bytes)
                .map_err(|_| InstallError::NotUtf8 { path: path.clone() })?;
            ContainerdConfig::parse(&path, text)?
        }
    };
    let release = opts.containerd_version.resolve()?;
    let release_version = release
        .config_version()
        .ok_or_else(|| InstallError::UnknownRelease {
            release: release.text.clone(),
        })?;
    say(
        Action::Registration {
            release: release.clone(),
            runtime_path: release.honours_runtime_path(),
        },
        &mut summary,
    );
    if original.is_none() || config.is_empty() {
        config.set_version(release_version);
        say(
            Action::ContainerdConfigNew {
                path: path.clone(),
                version: release_version,
            },
            &mut summary,
        );
    }
    let version = config.version()?;
    if version == ConfigVersion::V3 && release.major < 2 {
        return Err(InstallError::ConfigTooNew {
            path: path.clone(),
            version,
            release: release.text.clone(),
        });
    }
    for w in import_warnings(&config, version, &opts.host_root, &opts.containerd_config)? {
        say(Action::Warning(w), &mut summary);
    }
    let node_cgroup = config.node_systemd_cgroup(version)?;
    let runtime = if release.honours_runtime_path() {
        let (systemd_cgroup, source) = match node_cgroup {
            Some(n) => (n.systemd_cgroup, CgroupSource::Runtime(n.runtime)),
            None => match opts.systemd_cgroup_fallback {
                Some(v) => (v, CgroupSource::Flag),
                None => (false, CgroupSource::ContainerdDefault),
            },
        };
        say(
            Action::Cgroup {
                systemd_cgroup,
                source,
            },
            &mut summary,
        );
        FloxRuntime::RuntimePath {
            runtime_path: runtime_path.to_string_lossy().into_owned(),
            systemd_cgroup,
        }
    } else {
        let systemd = match node_cgroup {
            Some(n) => n
                .systemd_cgroup
                .then(|| format!("the node's {:?} runtime uses", n.runtime)),
            None => (opts.systemd_cgroup_fallback == Some(true))
                .then(|| "--systemd-cgroup says the node uses".to_string()),
        };
        if let Some(who) = systemd {
            say(
                Action::Warning(format!(
                    "{who} SystemdCgroup = true, but containerd {release} cannot pass options to the flox runtime, so runc runs flox containers with its cgroupfs driver, which takes the kubelet's systemd-style cgroupsPath (kubepods-...-pod<uid>.slice:cri-containerd:<id>) as a plain directory name under the shim's own cgroup: flox containers sit outside their pod's slice (their own resource limits apply; pod-level limits, the kubelet's pod accounting and systemd do not cover them); containerd 1.7 or later is needed for the flox runtime to use SystemdCgroup like runc"
                )),
                &mut summary,
            );
        }
        if runtime_path.file_name() != Some(std::ffi::OsStr::new(SHIM_FILE_NAME))
            || !SYSTEMD_DEFAULT_PATH
                .iter()
                .any(|d| runtime_path.parent() == Some(Path::new(d)))
        {
            say(
                Action::Warning(format!(
                    "containerd {release} runs the flox runtime as {SHIM_FILE_NAME} from its PATH ({}, systemd's default), but the shim is installed as {}: install it as /usr/local/bin/{SHIM_FILE_NAME}",
                    SYSTEMD_DEFAULT_PATH.join(":"),
                    runtime_path.display()
                )),
                &mut summary,
            );
        }
        FloxRuntime::ShimOnPath
    };
    let default_name = config.default_runtime_name(version)?;
    let mut changes = config.ensure_default_runtime()?;
    if !changes.is_empty() {
        say(
            Action::DefaultRuntimeAdded { name: default_name },
            &mut summary,
        );
    }
    changes.extend(config.register_flox(&runtime)?);
    let text = config.to_string();
    if original.as_deref() == Some(text.as_bytes()) {
        let mut section = version.runtimes_path().to_vec();
        section.push(RUNTIME_NAME);
        say(
            Action::RuntimeUpToDate {
                path: path.clone(),
                section: dotted(&section),
            },
            &mut summary,
        );
        return Ok(summary);
    }
    if let Some(template) = &opts.check {
        let command = check_candidate(opts, &path, text.as_bytes(), template, &runtime).map_err(
            |source| match source {
                CandidateError::Check(source) => InstallError::Check {
                    path: path.clone(),
                    source,
                },
                CandidateError::HostFile(e) => InstallError::HostFile(e),
            },
        )?;
        say(Action::Checked { command }, &mut summary);
    }
    let mode = existing_mode(&path);
    let written = host_files::install(&path, text.as_bytes(), mode, true)?;
    summary.containerd_config_changed = true;
    say(
        Action::File {
            path: path.clone(),
            written,
        },
        &mut summary,
    );
    for change in changes {
        say(
            Action::RuntimeKey {
                path: path.clone(),
                change,
            },
            &mut summary,
        );
    }

    // 5. Restart, and wait for CRI with the flox runtime.
    let Some(argv) = &opts.restart else {
        say(Action::RestartSkipped, &mut summary);
        return Ok(summary);
    };
    let command = run_restart(argv)?;
    summary.restarted = true;
    say(Action::Restarted { command }, &mut summary);
    let Some(wait) = &opts.cri_wait else {
        return Ok(summary);
    };
    let socket = on_host(
        &opts.host_root,
        &wait
            .socket
            .clone()
            .or_else(|| config.grpc_address().map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTAINERD_SOCKET)),
    );
    match wait_for_cri(&socket, wait.timeout, true) {
        Ok(status) => {
            say(
                Action::CriServing {
                    socket,
                    handlers: status.handlers,
                },
                &mut summary,
            );
            Ok(summary)
        }
        Err(last) => {
            let rollback = roll_back(
                &path,
                original.as_deref(),
                mode,
                argv,
                &socket,
                wait.timeout,
            );
            Err(InstallError::NotServing {
                waited: wait.timeout,
                rollback,
                last,
            })
        }
    }
}

/// Why a candidate config was not accepted.
enum CandidateError {
    Check(CheckError),
    HostFile(HostFileError),
}

/// Writes `text` beside the config, checks it with the node's containerd, removes it; returns
/// the check's command line.
fn check_candidate(
    opts: &Options,
    path: &Path,
    text: &[u8],
    template: &[String],
    runtime: &FloxRuntime,
) -> Result<String, CandidateError> {
    let candidate = check::candidate_path(path);
    let host_candidate = check::candidate_path(&opts.containerd_config);
    host_files::write_atomic(&candidate, text, 0o600).map_err(CandidateError::HostFile)?;
    let argv = check::command_for(
        template,
        &host_candidate.to_string_lossy(),
        &candidate.to_string_lossy(),
    );
    let result = check::check(&argv, runtime.runtime_type());
    let _ = std::fs::remove_file(&candidate);
    result.map_err(CandidateError::Check)?;
    Ok(argv.join(" "))
}

/// Asks CRI on `socket` until it answers (with the flox handler when `want_flox`) or `timeout`
/// passes; the last failure then.
pub fn wait_for_cri(
    socket: &Path,
    timeout: Duration,
    want_flox: bool,
) -> Result<CriStatus, WaitError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let last = match cri::status(
            socket,
            left.clamp(Duration::from_secs(1), Duration::from_secs(10)),
        ) {
            Ok(status) if !want_flox || status.handlers.iter().any(|h| h == RUNTIME_NAME) => {
                return Ok(status)
            }
            Ok(status) => WaitError::NoFlox {
                socket: socket.to_owned(),
                handlers: status.handlers,
            },
            Err(e) => WaitError::Cri(e),
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Puts the old config back (removes the new file when there was none), restarts containerd
/// and waits for CRI to answer; says what it did, in words for the error.
fn roll_back(
    path: &Path,
    original: Option<&[u8]>,
    mode: u32,
    restart: &[String],
    socket: &Path,
    timeout: Duration,
) -> String {
    let restored = match original {
        Some(old) => host_files::write_atomic(path, old, mode)
            .map(|()| format!("restored the old {}", path.display())),
        None => std::fs::remove_file(path)
            .map(|()| format!("removed the new {} (there was none)", path.display()))
            .map_err(|source| HostFileError::Write {
                path: path.to_path_buf(),
                source,
            }),
    };
    let restored = match restored {
        Ok(r) => r,
        Err(e) => {
            return format!(
                "ROLLBACK FAILED, the new config stays: {}",
                crate::one_line(&e)
            )
        }
    };
    if let Err(e) = run_restart(restart) {
        return format!(
            "{restored}, but restarting containerd again failed: {}",
            crate::one_line(&e)
        );
    }
    match wait_for_cri(socket, timeout, false) {
        Ok(status) => format!(
            "{restored} and restarted containerd, which answers CRI again (runtime handlers {:?})",
            status.handlers
        ),
        Err(e) => format!(
            "{restored} and restarted containerd, which still does not answer CRI within {timeout:?}: {}",
            crate::one_line(&e)
        ),
    }
}

/// The program interpreter (dynamic loader) an ELF executable names, `None` for a static
/// executable or anything that is not ELF. The binaries kof copies to the host run under the
/// host's libc, not the image's.
pub fn elf_interpreter(content: &[u8]) -> Option<String> {
    let elf = goblin::elf::Elf::parse(content).ok()?;
    elf.interpreter.map(str::to_string)
}

fn existing_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644)
}

/// The warnings `imports` deserves: always one (a drop-in may override the section), and one
/// per imported file that configures the CRI plugin (it can replace the main file's section).
/// `main` is the config's host path: relative imports are relative to its directory, as
/// containerd resolves them.
pub fn import_warnings(
    config: &ContainerdConfig,
    version: ConfigVersion,
    host_root: &Path,
    main: &Path,
) -> Result<Vec<String>, InstallError> {
    let imports = config.imports()?;
    if imports.is_empty() {
        return Ok(Vec::new());
    }
    let plugin = dotted(&["plugins", version.cri_plugin()]);
    let mut warnings = vec![format!(
        "{} imports {:?}: a drop-in that configures [{plugin}] can replace this file's section and with it the flox runtime (pods then fail with: no runtime for \"flox\" is configured); on the node, `containerd config dump | grep -A8 'runtimes.flox'` must show the flox runtime",
        config.path().display(),
        imports
    )];
    let base = main.parent().unwrap_or(Path::new("/"));
    for pattern in imports {
        let host_pattern = base.join(&pattern);
        let pattern_under_root = on_host(host_root, &host_pattern);
        let Ok(paths) = glob::glob(&pattern_under_root.to_string_lossy()) else {
            warnings.push(format!(
                "cannot expand import {pattern:?}: not a valid glob"
            ));
            continue;
        };
        for entry in paths.flatten() {
            let Ok(text) = std::fs::read_to_string(&entry) else {
                warnings.push(format!("cannot read imported {}", entry.display()));
                continue;
            };
            match ContainerdConfig::parse(&entry, &text) {
                Ok(dropin) if dropin.configures_cri_plugin(version) => warnings.push(format!(
                    "imported {} configures [{plugin}]: containerd may use its section instead of {}'s; register the flox runtime there too, or check `containerd config dump`",
                    entry.display(),
                    config.path().display()
                )),
                Ok(_) => {}
                Err(e) => warnings.push(format!(
                    "imported file: {}",
                    crate::one_line(&e)
                )),
            }
        }
    }
    Ok(warnings)
}

fn run_restart(argv: &[String]) -> Result<String, InstallError> {
    let (program, args) = argv.split_first().ok_or(InstallError::EmptyRestart)?;
    let command = argv.join(" ");
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| InstallError::RestartSpawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.split_whitespace().collect::<Vec<_>>().join(" ");
        let tail: String = stderr
            .chars()
            .rev()
            .take(400)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(InstallError::RestartFailed {
            command,
            status: out.status,
            stderr: if tail.is_empty() {
                "nothing on stderr".to_string()
            } else {
                tail
            },
        });
    }
    Ok(command)
}
