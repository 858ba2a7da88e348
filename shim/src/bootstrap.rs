//! The shim binary's `start`: find or make the task-API proxy a container's pod uses.
//!
//! containerd runs `containerd-shim-flox-v2 ... -id ID start` in a new container's bundle and
//! reads the shim's address from its stdout. On containerd 1.6 and 1.7 that happens for every
//! container; on 2.x only for a pod's sandbox, whose shim then gets every later container of the
//! pod through its task API. So kof acts in the task API ([`crate::proxy`]), and `start` only
//! puts a proxy in front of the runc shim:
//!
//! 1. The container's group is the pod (`io.kubernetes.cri.sandbox-id`) or the runc shim's own
//!    group annotation, else the container alone: the rule `containerd-shim-runc-v2` follows,
//!    so one flox proxy fronts one runc shim.
//! 2. The proxy's socket is a name derived from containerd's address, the namespace and the
//!    group. Binding it decides who makes the proxy; a start that finds it bound and answering
//!    uses the running one.
//! 3. `containerd-shim-runc-v2 start` runs with the same command line, environment and working
//!    directory (so its grouping, its events to containerd, its `address` and `shim.pid` files
//!    are its own), and prints its address: a bare `unix://` address, or on containerd 2.x a
//!    JSON bootstrap record naming the task API version.
//! 4. A new proxy is this binary again (`serve`), in its own session, with the bound socket as
//!    fd 3 and the runc shim's address in its environment. containerd gets the runc shim's
//!    answer with the proxy's address in it, and the bundle's `address` file (read by
//!    containerd when it reconnects after a restart) names the proxy too. The answer is kept
//!    beside the socket ([`answer_path`]): a later container of the pod (containerd 1.x runs
//!    `start` for each) gets it again without the runc shim's `start` being run, which would
//!    only find its running shim, at the cost of a process start on every pod start.

use std::ffi::OsString;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The directory of the proxies' sockets (the runc shim keeps its own there too).
pub const SOCKET_DIR: &str = "/run/containerd/s";

/// Annotations naming a container's group, in the order the runc shim reads them.
pub const GROUP_ANNOTATIONS: [&str; 2] = [
    "io.containerd.runc.v2.group",
    "io.kubernetes.cri.sandbox-id",
];

/// The environment variable a proxy finds the runc shim's address in.
pub const UPSTREAM_ENV: &str = "KOF_SHIM_UPSTREAM";
/// The environment variable a proxy finds the runc shim's pid in (when it wrote one).
pub const UPSTREAM_PID_ENV: &str = "KOF_SHIM_UPSTREAM_PID";
/// The environment variable a proxy finds its own socket's path in.
pub const SOCKET_ENV: &str = "KOF_SHIM_SOCKET";
/// The file descriptor a proxy's listening socket arrives on.
pub const LISTENER_FD: i32 = 3;
/// The action word that makes the binary a proxy.
pub const SERVE_ACTION: &str = "serve";

/// Why `start` could not give containerd an address.
#[derive(Debug, Error)]
pub enum BootstrapError {
    /// The proxy's socket could not be made.
    #[error("shim socket {path}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The runc shim could not be run.
    #[error("cannot run {shim}")]
    RunShim {
        /// The runc shim.
        shim: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The runc shim's `start` failed.
    #[error("{shim} start failed ({status}): {output}")]
    ShimFailed {
        /// The runc shim.
        shim: PathBuf,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed.
        output: String,
    },
    /// The runc shim printed something that is not an address.
    #[error("{shim} start printed {output:?}, which is not a shim address")]
    BadAddress {
        /// The runc shim.
        shim: PathBuf,
        /// What it printed.
        output: String,
    },
    /// The proxy could not be started.
    #[error("cannot start the shim proxy {exe}")]
    Spawn {
        /// This binary.
        exe: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The bundle's `address` file (or the group's kept answer) could not be written.
    #[error("writing {path}")]
    AddressFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What a shim's `start` prints: containerd 1.x reads a bare address; containerd 2.x also takes
/// a JSON record naming the task API version the shim serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutput {
    /// `unix:///run/containerd/s/...`.
    Address(String),
    /// `{"version":3,"address":"unix://...","protocol":"ttrpc"}`.
    Params(BootstrapParams),
}

/// containerd 2.x's bootstrap record (`BootstrapParams` in containerd's shim package).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapParams {
    /// The task API version (2 or 3).
    pub version: i64,
    /// The shim's address.
    pub address: String,
    /// `ttrpc` (or `grpc`).
    pub protocol: String,
}

impl StartOutput {
    /// Reads what a shim printed; `None` when it is neither form.
    pub fn parse(printed: &str) -> Option<StartOutput> {
        let text = printed.trim();
        if text.starts_with('{') {
            let params: BootstrapParams = serde_json::from_str(text).ok()?;
            return (!params.address.is_empty()).then_some(StartOutput::Params(params));
        }
        let is_address = !text.is_empty()
            && !text.contains(char::is_whitespace)
            && (text.starts_with("unix://") || text.starts_with('/'));
        is_address.then(|| StartOutput::Address(text.to_string()))
    }

    /// The address.
    pub fn address(&self) -> &str {
        match self {
            StartOutput::Address(a) => a,
            StartOutput::Params(p) => &p.address,
        }
    }

    /// The same answer naming `address` instead.
    pub fn with_address(&self, address: &str) -> StartOutput {
        match self {
            StartOutput::Address(_) => StartOutput::Address(address.to_string()),
            StartOutput::Params(p) => StartOutput::Params(BootstrapParams {
                address: address.to_string(),
                ..p.clone()
            }),
        }
    }

    /// The text to print, in the form it was read.
    pub fn render(&self) -> String {
        match self {
            StartOutput::Address(a) => a.clone(),
            StartOutput::Params(p) => serde_json::to_string(p).unwrap_or_default(),
        }
    }
}

/// The group of a container with `annotations`: the pod, the runc shim's group, or itself.
pub fn group_id<'a>(
    annotations: &'a std::collections::BTreeMap<String, String>,
    id: &'a str,
) -> &'a str {
    GROUP_ANNOTATIONS
        .iter()
        .find_map(|k| annotations.get(*k).filter(|v| !v.is_empty()))
        .map(String::as_str)
        .unwrap_or(id)
}

/// The proxy socket of `group` in `namespace` of the containerd at `containerd_address`.
pub fn socket_path(containerd_address: &str, namespace: &str, group: &str) -> PathBuf {
    let mut h = blake3::Hasher::new();
    for part in ["kof-flox-shim", containerd_address, namespace, group] {
        h.update(part.as_bytes());
        h.update(&[0]);
    }
    Path::new(SOCKET_DIR).join(h.finalize().to_hex().as_str())
}

/// The proxy socket of the group of container `id`, whose bundle is `bundle`.
fn group_socket(
    containerd_address: &str,
    namespace: &str,
    id: &str,
    bundle: &Path,
) -> Result<PathBuf, crate::spec::SpecError> {
    let annotations = crate::spec::Spec::read(bundle)?.annotations();
    Ok(socket_path(
        containerd_address,
        namespace,
        group_id(&annotations, id),
    ))
}

/// `unix://<path>`.
pub fn unix_address(path: &Path) -> String {
    format!("unix://{}", path.display())
}

/// The socket of a group: a new one this start must serve, or one a proxy already serves.
enum GroupSocket {
    New(UnixListener),
    Running,
}

fn bind_group_socket(path: &Path) -> Result<GroupSocket, BootstrapError> {
    let sock_err = |source| BootstrapError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(sock_err)?;
    }
    match UnixListener::bind(path) {
        Ok(l) => Ok(GroupSocket::New(l)),
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Ok(GroupSocket::Running);
            }
            // A proxy that died left its socket.
            let _ = std::fs::remove_file(path);
            match UnixListener::bind(path) {
                Ok(l) => Ok(GroupSocket::New(l)),
                // Another start of the same group won the race.
                Err(e) if e.kind() == ErrorKind::AddrInUse => Ok(GroupSocket::Running),
                Err(e) => Err(sock_err(e)),
            }
        }
        Err(e) => Err(sock_err(e)),
    }
}

/// Runs `start` for container `id` of `namespace` whose bundle is `bundle`, with containerd's
/// command line `argv` (without the program name); returns what to print to containerd.
pub fn start(
    argv: &[OsString],
    containerd_address: &str,
    namespace: &str,
    id: &str,
    bundle: &Path,
    runc_shim: &Path,
) -> Result<StartOutput, crate::ShimError> {
    let path = group_socket(containerd_address, namespace, id, bundle)?;
    let socket = bind_group_socket(&path)?;
    let address_file = bundle.join("address");
    if let GroupSocket::Running = socket {
        // The pod's proxy answers already (a later container of the pod, on containerd 1.x):
        // the runc shim's `start` would only find its own running shim and write `address`,
        // so its answer as the proxy gave it first is given again, without running it.
        if let Some(ours) = std::fs::read_to_string(answer_path(&path))
            .ok()
            .and_then(|a| StartOutput::parse(&a))
        {
            write_file(&address_file, ours.address().as_bytes())?;
            return Ok(ours);
        }
    }
    let upstream = match run_runc_start(argv, bundle, runc_shim) {
        Ok(u) => u,
        Err(e) => {
            if matches!(socket, GroupSocket::New(_)) {
                let _ = std::fs::remove_file(&path);
            }
            return Err(e.into());
        }
    };
    let upstream_is_new = matches!(socket, GroupSocket::New(_));
    if let GroupSocket::New(listener) = socket {
        let pid = std::fs::read_to_string(bundle.join("shim.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if let Err(e) = spawn_proxy(argv, &listener, upstream.address(), pid, &path) {
            let _ = std::fs::remove_file(&path);
            return Err(e.into());
        }
        tracing::info!(namespace, id, socket = %path.display(), upstream = upstream.address(), "shim proxy started");
    }
    let ours = upstream.with_address(&unix_address(&path));
    if upstream_is_new {
        write_file(&answer_path(&path), ours.render().as_bytes())?;
        write_file(&upstream_path(&path), upstream.render().as_bytes())?;
    }
    write_file(&address_file, ours.address().as_bytes())?;
    Ok(ours)
}

/// Where the answer a group's first `start` gave is kept, beside the proxy's socket (removed
/// with it).
pub fn answer_path(socket: &Path) -> PathBuf {
    socket.with_extension("start")
}

/// Where the runc shim's own answer (its address and task API version) is kept, beside the
/// proxy's socket, for [`orphaned_upstream`].
pub fn upstream_path(socket: &Path) -> PathBuf {
    socket.with_extension("upstream")
}

/// The runc shim behind a proxy that died (killed; it removes these files when it exits
/// itself): its answer, when the proxy of the group of the container whose bundle is `bundle`
/// no longer answers and the runc shim still does. containerd never learnt the runc shim's
/// address, so nobody else would ever stop it.
pub fn orphaned_upstream(
    containerd_address: &str,
    namespace: &str,
    id: &str,
    bundle: &Path,
) -> Option<StartOutput> {
    let path = group_socket(containerd_address, namespace, id, bundle).ok()?;
    if UnixStream::connect(&path).is_ok() {
        return None;
    }
    let upstream = StartOutput::parse(&std::fs::read_to_string(upstream_path(&path)).ok()?)?;
    let sock = upstream.address().strip_prefix("unix://")?;
    UnixStream::connect(sock).ok()?;
    Some(upstream)
}

fn run_runc_start(
    argv: &[OsString],
    bundle: &Path,
    runc_shim: &Path,
) -> Result<StartOutput, BootstrapError> {
    let out = Command::new(runc_shim)
        .args(argv)
        .current_dir(bundle)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| BootstrapError::RunShim {
            shim: runc_shim.to_path_buf(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let mut output = stdout;
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        return Err(BootstrapError::ShimFailed {
            shim: runc_shim.to_path_buf(),
            status: out.status,
            output: output.trim().to_string(),
        });
    }
    StartOutput::parse(&stdout).ok_or_else(|| BootstrapError::BadAddress {
        shim: runc_shim.to_path_buf(),
        output: stdout,
    })
}

/// Starts this binary as the group's proxy: its own session, `/` as its working directory, no
/// stdio (it logs to the shim log), `listener` as fd [`LISTENER_FD`].
fn spawn_proxy(
    argv: &[OsString],
    listener: &UnixListener,
    upstream: &str,
    upstream_pid: Option<i32>,
    socket: &Path,
) -> Result<(), BootstrapError> {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let mut args: Vec<OsString> = argv
        .iter()
        .filter(|a| a.as_os_str() != "start")
        .cloned()
        .collect();
    args.push(SERVE_ACTION.into());
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(&exe);
    cmd.args(&args)
        .current_dir("/")
        .env(UPSTREAM_ENV, upstream)
        .env(SOCKET_ENV, socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(pid) = upstream_pid {
        cmd.env(UPSTREAM_PID_ENV, pid.to_string());
    }
    // SAFETY: between fork and exec only async-signal-safe calls (setsid, dup2, fcntl).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if fd == LISTENER_FD {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, LISTENER_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // The child is not waited for: it outlives this start, as a shim does.
    cmd.spawn()
        .map(drop)
        .map_err(|source| BootstrapError::Spawn { exe, source })
}

fn write_file(path: &Path, content: &[u8]) -> Result<(), BootstrapError> {
    let err = |source| BootstrapError::AddressFile {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("kof-tmp");
    std::fs::write(&tmp, content).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn reads_both_forms_of_a_shims_answer() {
        let a = StartOutput::parse("unix:///run/containerd/s/abc\n").unwrap();
        assert_eq!(
            a,
            StartOutput::Address("unix:///run/containerd/s/abc".into())
        );
        assert_eq!(a.with_address("unix:///x").render(), "unix:///x");
        let p = StartOutput::parse(
            r#"{"version":3,"address":"unix:///run/containerd/s/abc","protocol":"ttrpc"}"#,
        )
        .unwrap();
        assert_eq!(p.address(), "unix:///run/containerd/s/abc");
        let moved = p.with_address("unix:///y");
        assert_eq!(
            StartOutput::parse(&moved.render()).unwrap(),
            StartOutput::Params(BootstrapParams {
                version: 3,
                address: "unix:///y".into(),
                protocol: "ttrpc".into()
            })
        );
        assert_eq!(StartOutput::parse(""), None);
        assert_eq!(StartOutput::parse("time=... level=error msg=boom"), None);
        assert_eq!(StartOutput::parse(r#"{"version":3}"#), None);
    }

    #[test]
    fn a_pods_containers_share_a_group_and_a_socket() {
        let mut ann = BTreeMap::new();
        assert_eq!(group_id(&ann, "c1"), "c1");
        ann.insert(
            "io.kubernetes.cri.sandbox-id".to_string(),
            "pod".to_string(),
        );
        assert_eq!(group_id(&ann, "c1"), "pod");
        ann.insert("io.containerd.runc.v2.group".to_string(), "g".to_string());
        assert_eq!(group_id(&ann, "c1"), "g");
        let a = socket_path("/run/containerd/containerd.sock", "k8s.io", "pod");
        assert_eq!(
            a,
            socket_path("/run/containerd/containerd.sock", "k8s.io", "pod")
        );
        assert_ne!(
            a,
            socket_path("/run/containerd/containerd.sock", "default", "pod")
        );
        assert_ne!(a, socket_path("/other.sock", "k8s.io", "pod"));
        // A unix socket path has room for 107 bytes.
        assert!(a.as_os_str().len() < 108, "{}", a.display());
    }
}
