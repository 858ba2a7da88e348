//! The daemon's local API: the protocol types and a blocking client.
//!
//! # Protocol
//!
//! `kof-fetcherd` listens on a unix stream socket (config `socket`, default
//! `/run/kof/fetcherd.sock`; the socket is mode 0600 and its directory, created if missing,
//! 0700, so only root can use it). A client sends requests and reads responses, each one JSON
//! object on one line (UTF-8, terminated by `\n`). A connection carries any number of requests,
//! answered in order, one response line per request line; either side may close it between
//! requests. A request line longer than 1 MiB is refused and the connection closed.
//!
//! Every request has an `"op"` field; the other fields depend on it:
//!
//! | request | success response |
//! | --- | --- |
//! | `{"op":"prepare","env":"owner/name[:N]","lease":"ID","token":"..."?,"pod":"SANDBOX"?}` | [`Prepared`] |
//! | `{"op":"release","lease":"ID"}` | [`Released`] |
//! | `{"op":"prefetch","env":"owner/name[:N]","token":"..."?}` | [`Prefetched`] |
//! | `{"op":"resolve","env":"owner/name[:N]","token":"..."?}` | [`Resolved`] |
//! | `{"op":"status"}` | [`Status`] |
//! | `{"op":"hello"}` | [`Hello`] |
//! | `{"op":"ensure","store_path":"<hash>-<name>","start":S,"end":E}` | `{"ok":true}` |
//! | `{"op":"gate","store_path":"<hash>-<name>"}` | `{"ok":true}` once what views show inside the path is verified |
//! | `{"op":"leases"}` | `{"leases":[`[`LeaseInfo`]`...]}` |
//! | `{"op":"pod_starting","env":"owner/name[:N]","pod":"SANDBOX","token":"..."?}` | [`PodResolved`] |
//! | `{"op":"gc","derived":false?}` | [`GcDone`] |
//!
//! - `prepare` resolves the environment (the generation `N`, else the live one, which then
//!   stays pinned for the life of the lease), computes its closure from metadata (no file
//!   contents are fetched), and makes its view visible at `view_root` =
//!   `<mount_dir>/<view>`, a complete root file system for a container; leases of the same
//!   view tree share one view (`tree@<digest>`), kept after the last lease for
//!   `idle_view_secs` so the next pod of the generation reuses it. A lease id is 1 to
//!   128 characters of `[A-Za-z0-9._-]`, not starting with `.`. Preparing a lease id that
//!   exists returns the existing lease when it is of the same environment (a retried
//!   `prepare` is harmless), and a `lease_exists` error otherwise. `token` is a FloxHub token
//!   for a private environment; it is used for that resolution only, never stored or logged
//!   (without it the daemon uses its configured `floxhub_token_file`, if any).
//! - `pod_starting` (the shim sends it when a pod's sandbox is created) resolves a live
//!   reference on FloxHub now, while the sandbox starts, once for the pod; a `prepare` naming
//!   the pod takes that generation without a round trip of its own (waiting for the
//!   resolution if it is still under way), so every container of a pod runs the generation
//!   that was live when the pod started. A failed or missing pod resolution makes `prepare`
//!   resolve by itself. Kept for two minutes.
//! - `release` removes the view and forgets the lease; `released` is `false` when there was
//!   no such lease.
//! - `prefetch` fetches the environment's whole closure into the store now (shared with any
//!   fetch already under way) and records the environment as kept, as `kof-store prefetch`
//!   does.
//! - `resolve` resolves the environment and computes its closure from metadata (no NAR is
//!   fetched), records the generation in the store (kept by nothing: a gc may drop it), and
//!   answers what `kof-store resolve` shows.
//! - `ensure` makes the NAR byte range `[start, end)` of a store path readable from the
//!   store (or its partial NAR); it returns when the bytes are there. The FUSE server uses
//!   it.
//! - `status`: the daemon's pid, leases, store totals, in-flight fetches, the FUSE server.
//! - `gc` collects now, while the daemon serves: every stored path outside the closures of
//!   the rooted (kept) environments, the leased generations, the idle views' generations,
//!   and the paths being fetched or read is removed, with the objects no remaining path
//!   uses; with `"derived":true` also every raw copy and every partial NAR no fetch uses. The
//!   run is recorded with trigger `manual` (`kof-store stats` shows it).
//! - `hello`: the daemon's pid and store, at once (no store query, no FUSE server round trip):
//!   what a client checks before using the daemon. A daemon older than `hello` answers
//!   `bad_request`; ask `status` then.
//!
//! Success responses (fields in this order; absent optional values are `null`):
//!
//! ```text
//! prepare  {"lease":"c1","env":"kof/hello","generation":2,"pinned":false,
//!           "view_root":"/var/lib/kof/mnt/c1","flox_env":"/nix/store/<hash>-flox-env-hello",
//!           "closure":["/nix/store/...",...],
//!           "activation":{"env":"kof/hello:2","flox_env":"/nix/store/<hash>-flox-env-hello",
//!                         "description":"hello","vars":{"K":"V"},"hook":"..."|null,
//!                         "bash":"/nix/store/<hash>-bash-5.2/bin/bash"|null}}
//! release  {"lease":"c1","released":true}
//! prefetch {"env":"kof/hello","generation":2,"paths":9,"paths_fetched":9,
//!           "paths_already_present":0,"bytes_downloaded":N,"nar_bytes":N,
//!           "new_stored_bytes":N,"elapsed_secs":1.5}
//! status   {"pid":P,"store_dir":"/var/lib/kof","leases":[<lease>...],
//!           "store":{"store_paths":N,"logical_bytes":N,"stored_bytes":N,"unique_bytes":N,
//!                    "objects":N,"environments":N},
//!           "in_flight_fetches":N,"demand_bytes":N,"prefetch_bytes":N,
//!           "fuse_server":{"pid":P,"mount_dir":"/var/lib/kof/mnt","views":["c1"]}|null}
//! resolve  {"owner":"kof","name":"hello","generation":2,"pinned":false,"live_generation":2,
//!           "newest_generation":3,"system":"x86_64-linux","roots":["/nix/store/..."],
//!           "closure":["/nix/store/...",...],"closure_nar_size":N,"vars":{"K":"V"},
//!           "hook":"..."|null,"history":[...],"floxmeta_commit":"<sha>"}
//! hello    {"pid":P,"store_dir":"/var/lib/kof"}
//! gc       {"trigger":"manual","paths_removed":["/nix/store/...",...],"objects_removed":N,
//!           "bytes_freed":N,"derived_bytes_freed":N,"elapsed_secs":0.2,
//!           "store_bytes_before":N,"store_bytes_after":N}
//! ensure   {"ok":true}
//! leases   {"leases":[<lease>...]}
//! <lease> = {"lease":"c1","env":"kof/hello","generation":2,"pinned":false,
//!            "view_root":"...","flox_env":"...","closure_paths":9,"created_at":UNIX_SECS}
//! ```
//!
//! The activation is applied as `flox activate -- CMD` does ([`crate::activate`]): the shim
//! runs the container's command with the view as its root and that environment.
//! A failure is `{"error":{"kind":K,"message":M}}`: `kind` is one of the [`ErrorKind`]
//! names (`bad_request`, `bad_env`, `bad_lease`, `bad_token`, `lease_exists`, `resolve`,
//! `closure`, `fetch`, `store`, `view`, `fuse`, `internal`), `message` one line naming the
//! environment (or lease, or store path) and the cause.
//!
//! # Client
//!
//! [`Client`] is the blocking client (std `UnixStream`), used by the shim, by `kof-store`
//! and by the FUSE server.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Longest request or response line accepted by the daemon (requests).
pub const MAX_REQUEST_LINE: usize = 1 << 20;
/// Longest response line the client accepts.
pub const MAX_RESPONSE_LINE: usize = 64 << 20;
/// The client's default time limit for one request (prepare may resolve and walk a closure).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// A FloxHub token carried in a request. Its `Debug` does not show it, so a logged request
/// never leaks it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretToken(pub String);

impl std::fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A request, as sent on the wire (`{"op": ..., ...}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Prepare a view of `env` for lease `lease`.
    Prepare {
        /// `owner/name` or `owner/name:N`.
        env: String,
        /// The lease id (the container's).
        lease: String,
        /// FloxHub token for a private environment.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<SecretToken>,
        /// The pod (CRI sandbox id) the container belongs to: a live reference takes the
        /// generation resolved for the pod by [`Request::PodStarting`], if there was one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod: Option<String>,
    },
    /// A pod of `env` is starting (its sandbox is being created): resolve its live generation
    /// now, once for the pod, while the sandbox starts; its containers' `prepare`s take it.
    PodStarting {
        /// `owner/name` or `owner/name:N`.
        env: String,
        /// The pod (CRI sandbox id).
        pod: String,
        /// FloxHub token for a private environment.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<SecretToken>,
    },
    /// Release a lease.
    Release {
        /// The lease id.
        lease: String,
    },
    /// Fetch an environment's closure now.
    Prefetch {
        /// `owner/name` or `owner/name:N`.
        env: String,
        /// FloxHub token for a private environment.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<SecretToken>,
    },
    /// Resolve an environment and describe its closure (no NAR is fetched).
    Resolve {
        /// `owner/name` or `owner/name:N`.
        env: String,
        /// FloxHub token for a private environment.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<SecretToken>,
    },
    /// The daemon's state.
    Status,
    /// The daemon's pid and store.
    Hello,
    /// Make a NAR byte range of a store path readable.
    Ensure {
        /// The store path's base name (`<hash>-<name>`).
        store_path: String,
        /// First NAR byte.
        start: u64,
        /// One past the last NAR byte.
        end: u64,
    },
    /// Return once what views show inside a store path (names, modes, symlink targets) is
    /// verified: at once for a path read through its signed index or stored; after the
    /// whole NAR is verified for one whose view came from an unsigned `.ls` listing.
    Gate {
        /// The store path's base name (`<hash>-<name>`).
        store_path: String,
    },
    /// The leases.
    Leases,
    /// Collect garbage now (see the module docs).
    Gc {
        /// Also remove derived data (raw copies, partial NARs no fetch uses).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        derived: bool,
    },
}

/// The kind of a failure, for callers that react to it (the message is for people).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is not valid JSON or not a known request.
    BadRequest,
    /// The environment reference is malformed.
    BadEnv,
    /// The lease id is malformed.
    BadLease,
    /// The token is malformed.
    BadToken,
    /// The lease id is taken by another environment.
    LeaseExists,
    /// The environment could not be resolved on FloxHub (unknown, no access, bad data...).
    Resolve,
    /// The closure could not be computed (a path no cache has, a refused narinfo...).
    Closure,
    /// Fetching failed.
    Fetch,
    /// The store failed.
    Store,
    /// The view could not be built.
    View,
    /// The FUSE server failed or is unreachable.
    Fuse,
    /// Anything else.
    Internal,
}

/// The error object of a failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// One line naming the thing and the cause.
    pub message: String,
}

/// What the activation of a prepared environment needs: the fields of
/// [`crate::activate::ActivationInput`] that come from the environment. The shim and
/// `kof-store run` complete it with `HOME` and `TERM` ([`Activation::input`]) and call
/// [`crate::activate::activate`], which behaves as `flox activate -- CMD`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    /// `owner/name:generation`, for errors.
    pub env: String,
    /// `FLOX_ENV`: the rendered environment's absolute path inside the view.
    pub flox_env: String,
    /// `FLOX_ENV_DESCRIPTION`: the environment's name.
    pub description: String,
    /// The manifest's `[vars]`.
    pub vars: BTreeMap<String, String>,
    /// The `on-activate` hook, if any.
    pub hook: Option<String>,
    /// The environment's bash (`/nix/store/.../bin/bash`), when it provides one.
    pub bash: Option<String>,
}

impl Activation {
    /// The activation input, with `HOME` and `TERM`.
    pub fn input(&self, home: &str, term: Option<&str>) -> crate::activate::ActivationInput {
        crate::activate::ActivationInput {
            env: self.env.clone(),
            flox_env: self.flox_env.clone(),
            description: self.description.clone(),
            vars: self.vars.clone(),
            hook: self.hook.clone(),
            bash: self.bash.clone(),
            home: home.to_string(),
            term: term.map(str::to_string),
            inherit: BTreeMap::new(),
        }
    }
}

/// The answer to `prepare`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepared {
    /// The lease id.
    pub lease: String,
    /// `owner/name`.
    pub env: String,
    /// The generation the lease holds.
    pub generation: u64,
    /// Whether the request named the generation.
    pub pinned: bool,
    /// The view: a root file system for the container.
    pub view_root: PathBuf,
    /// `FLOX_ENV` (an absolute path inside the view, `/nix/store/...`).
    pub flox_env: String,
    /// The closure, absolute store paths, sorted.
    pub closure: Vec<String>,
    /// The activation.
    pub activation: Activation,
}

/// The answer to `release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    /// The lease id.
    pub lease: String,
    /// Whether there was such a lease.
    pub released: bool,
}

/// The answer to `prefetch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prefetched {
    /// `owner/name`.
    pub env: String,
    /// The generation fetched.
    pub generation: u64,
    /// Paths in the closure.
    pub paths: usize,
    /// Paths downloaded by this request (or a fetch it shared).
    pub paths_fetched: usize,
    /// Paths already stored.
    pub paths_already_present: usize,
    /// Bytes downloaded (compressed).
    pub bytes_downloaded: u64,
    /// Uncompressed NAR bytes ingested.
    pub nar_bytes: u64,
    /// Bytes new to the store.
    pub new_stored_bytes: u64,
    /// Wall time in seconds.
    pub elapsed_secs: f64,
}

/// One lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// The lease id.
    pub lease: String,
    /// `owner/name`.
    pub env: String,
    /// The generation it holds.
    pub generation: u64,
    /// Whether the request named the generation.
    pub pinned: bool,
    /// Its view.
    pub view_root: PathBuf,
    /// `FLOX_ENV`.
    pub flox_env: String,
    /// Store paths in its closure.
    pub closure_paths: usize,
    /// Unix time it was prepared.
    pub created_at: i64,
}

/// The answer to `leases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leases {
    /// Every lease, by id.
    pub leases: Vec<LeaseInfo>,
}

/// The FUSE server as the daemon sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FuseServerInfo {
    /// Its process id.
    pub pid: u32,
    /// Its mount point.
    pub mount_dir: PathBuf,
    /// The views it serves.
    pub views: Vec<String>,
    /// Its build: BLAKE3 of its executable (absent from servers older than hand-over).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
}

/// Store totals (the fields of `kof-store stats --json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreTotals {
    /// Stored store paths.
    pub store_paths: u64,
    /// Sum of NarSize of stored paths.
    pub logical_bytes: u64,
    /// Bytes on disk for objects.
    pub stored_bytes: u64,
    /// Sum of uncompressed sizes of distinct objects.
    pub unique_bytes: u64,
    /// Distinct objects.
    pub objects: u64,
    /// Environments recorded.
    pub environments: u64,
}

/// The answer to `resolve`: an environment generation and its closure, as `kof-store resolve`
/// shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    /// FloxHub owner.
    pub owner: String,
    /// Environment name.
    pub name: String,
    /// The generation resolved (the pinned one, or the live one).
    pub generation: u64,
    /// Whether the reference pinned it.
    pub pinned: bool,
    /// The live generation (the last history entry's `current_generation`).
    pub live_generation: u64,
    /// The newest generation.
    pub newest_generation: u64,
    /// The node's system the roots are for.
    pub system: String,
    /// The store paths the lockfile installs for that system (absolute).
    pub roots: Vec<String>,
    /// Every path of their closure, sorted (absolute).
    pub closure: Vec<String>,
    /// The sum of the closure's NarSize.
    pub closure_nar_size: u64,
    /// `[vars]`.
    pub vars: BTreeMap<String, String>,
    /// The `on-activate` hook.
    pub hook: Option<String>,
    /// FloxHub's history entries, as `metadata.json` has them: the audit trail.
    pub history: serde_json::Value,
    /// The floxmeta commit read (empty when a recorded pin was answered from the store).
    pub floxmeta_commit: String,
}

/// The answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The daemon's process id.
    pub pid: u32,
    /// The store it owns.
    pub store_dir: PathBuf,
    /// The leases.
    pub leases: Vec<LeaseInfo>,
    /// Store totals.
    pub store: StoreTotals,
    /// Fetches under way now (demand and prefetch).
    pub in_flight_fetches: u64,
    /// NAR bytes fetched on demand since start.
    pub demand_bytes: u64,
    /// NAR bytes fetched by prefetch since start.
    pub prefetch_bytes: u64,
    /// The FUSE server, when it answers.
    pub fuse_server: Option<FuseServerInfo>,
    /// Views no lease uses, kept for the next lease of their tree (config `idle_view_secs`).
    #[serde(default)]
    pub idle_views: Vec<String>,
}

/// The answer to `pod_starting`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodResolved {
    /// `owner/name`.
    pub env: String,
    /// The generation the pod's containers get.
    pub generation: u64,
}

/// The answer to `gc`: what a collection removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GcDone {
    /// Why it ran: `manual`, `quota` or `no-space`.
    pub trigger: String,
    /// The store paths removed (absolute), sorted.
    pub paths_removed: Vec<String>,
    /// Objects removed (orphan object files included).
    pub objects_removed: u64,
    /// Bytes of the store's own files freed (objects, `tmp/`).
    pub bytes_freed: u64,
    /// Bytes of derived data (raw copies, partial NARs) freed.
    pub derived_bytes_freed: u64,
    /// How long it took.
    pub elapsed_secs: f64,
    /// The store's size on disk before (objects, metadata, derived data).
    pub store_bytes_before: u64,
    /// And after.
    pub store_bytes_after: u64,
}

/// The answer to `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The daemon's process id.
    pub pid: u32,
    /// The store it owns.
    pub store_dir: PathBuf,
}

/// Why a request through [`Client`] failed.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The daemon's socket could not be reached (not running, no permission...).
    #[error("cannot connect to kof-fetcherd at {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Sending the request or reading the answer failed.
    #[error("talking to kof-fetcherd at {path}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No answer within the client's time limit.
    #[error("kof-fetcherd at {path} did not answer {op} within {timeout:?}")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// The request.
        op: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// The daemon closed the connection without answering (it stopped or restarted).
    #[error("kof-fetcherd at {path} closed the connection without answering {op}")]
    Closed {
        /// The socket.
        path: PathBuf,
        /// The request.
        op: &'static str,
    },
    /// The answer is not what the protocol says.
    #[error("kof-fetcherd at {path} sent a malformed answer to {op}: {reason}")]
    BadResponse {
        /// The socket.
        path: PathBuf,
        /// The request.
        op: &'static str,
        /// What is wrong with it.
        reason: &'static str,
        /// The decoding error, if one found it.
        #[source]
        source: Option<serde_json::Error>,
    },
    /// The request could not be encoded as JSON.
    #[error("encoding the {op} request for kof-fetcherd at {path}")]
    Encode {
        /// The socket.
        path: PathBuf,
        /// The request.
        op: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The daemon refused or failed the request.
    #[error("kof-fetcherd: {}", .0.message)]
    Remote(RemoteError),
}

impl ApiError {
    /// Whether the failure is the daemon being away (not running, restarting), as opposed
    /// to an answer: a caller may retry after reconnecting.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            ApiError::Connect { .. } | ApiError::Io { .. } | ApiError::Closed { .. }
        )
    }

    /// The remote error's kind, when the daemon answered with an error.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ApiError::Remote(e) => Some(e.kind),
            _ => None,
        }
    }
}

impl Request {
    /// The op name, for messages.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Prepare { .. } => "prepare",
            Request::PodStarting { .. } => "pod_starting",
            Request::Release { .. } => "release",
            Request::Prefetch { .. } => "prefetch",
            Request::Resolve { .. } => "resolve",
            Request::Status => "status",
            Request::Hello => "hello",
            Request::Ensure { .. } => "ensure",
            Request::Gate { .. } => "gate",
            Request::Leases => "leases",
            Request::Gc { .. } => "gc",
        }
    }
}

/// A connection to the daemon. Requests on one client are sequential; use one client per
/// thread (connecting is cheap).
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    timeout: Duration,
}

#[derive(Deserialize)]
struct Ok_ {
    ok: bool,
}

impl Client {
    /// Connects to the daemon's socket.
    pub fn connect(path: &Path) -> Result<Client, ApiError> {
        let stream = UnixStream::connect(path).map_err(|source| ApiError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let writer = stream.try_clone().map_err(|source| ApiError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Client {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Sets the time limit for each following request (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// Sets the time limit for each following request.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The socket this client talks to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Prepares a view of `env` (`owner/name[:N]`) for `lease`.
    pub fn prepare(
        &mut self,
        env: &str,
        lease: &str,
        token: Option<&str>,
    ) -> Result<Prepared, ApiError> {
        self.prepare_in_pod(env, lease, token, None)
    }

    /// [`Client::prepare`] for a container of pod `pod` (its CRI sandbox id): a live reference
    /// takes the generation resolved for the pod by [`Client::pod_starting`], if any.
    pub fn prepare_in_pod(
        &mut self,
        env: &str,
        lease: &str,
        token: Option<&str>,
        pod: Option<&str>,
    ) -> Result<Prepared, ApiError> {
        self.call(&Request::Prepare {
            env: env.to_string(),
            lease: lease.to_string(),
            token: token.map(|t| SecretToken(t.to_string())),
            pod: pod.map(str::to_string),
        })
    }

    /// A pod of `env` is starting: the daemon resolves its live generation now, once for the
    /// pod, for the pod's containers to take.
    pub fn pod_starting(
        &mut self,
        env: &str,
        pod: &str,
        token: Option<&str>,
    ) -> Result<PodResolved, ApiError> {
        self.call(&Request::PodStarting {
            env: env.to_string(),
            pod: pod.to_string(),
            token: token.map(|t| SecretToken(t.to_string())),
        })
    }

    /// Releases `lease`.
    pub fn release(&mut self, lease: &str) -> Result<Released, ApiError> {
        self.call(&Request::Release {
            lease: lease.to_string(),
        })
    }

    /// Fetches `env`'s closure now.
    pub fn prefetch(&mut self, env: &str, token: Option<&str>) -> Result<Prefetched, ApiError> {
        self.call(&Request::Prefetch {
            env: env.to_string(),
            token: token.map(|t| SecretToken(t.to_string())),
        })
    }

    /// Resolves `env` and describes its closure (no NAR is fetched).
    pub fn resolve(&mut self, env: &str, token: Option<&str>) -> Result<Resolved, ApiError> {
        self.call(&Request::Resolve {
            env: env.to_string(),
            token: token.map(|t| SecretToken(t.to_string())),
        })
    }

    /// The daemon's state.
    pub fn status(&mut self) -> Result<Status, ApiError> {
        self.call(&Request::Status)
    }

    /// The daemon's pid and store (cheaper than [`Client::status`]).
    pub fn hello(&mut self) -> Result<Hello, ApiError> {
        self.call(&Request::Hello)
    }

    /// Collects garbage now (see [`Request::Gc`]); `derived` also removes derived data.
    pub fn gc(&mut self, derived: bool) -> Result<GcDone, ApiError> {
        self.call(&Request::Gc { derived })
    }

    /// The leases.
    pub fn leases(&mut self) -> Result<Vec<LeaseInfo>, ApiError> {
        self.call::<Leases>(&Request::Leases).map(|l| l.leases)
    }

    /// Makes NAR bytes `[start, end)` of `store_path` (base name) readable locally.
    pub fn ensure(&mut self, store_path: &str, start: u64, end: u64) -> Result<(), ApiError> {
        let r: Ok_ = self.call(&Request::Ensure {
            store_path: store_path.to_string(),
            start,
            end,
        })?;
        if !r.ok {
            return Err(ApiError::BadResponse {
                path: self.path.clone(),
                op: "ensure",
                reason: "\"ok\" is false",
                source: None,
            });
        }
        Ok(())
    }

    /// Returns once what views show inside `store_path` (base name) is verified (see
    /// [`Request::Gate`]).
    pub fn gate(&mut self, store_path: &str) -> Result<(), ApiError> {
        let r: Ok_ = self.call(&Request::Gate {
            store_path: store_path.to_string(),
        })?;
        if !r.ok {
            return Err(ApiError::BadResponse {
                path: self.path.clone(),
                op: "gate",
                reason: "\"ok\" is false",
                source: None,
            });
        }
        Ok(())
    }

    /// Sends `req` and parses the answer as `T` (or the error object).
    pub fn call<T: serde::de::DeserializeOwned>(&mut self, req: &Request) -> Result<T, ApiError> {
        self.call_json(req.op(), req)
    }

    /// Sends any request object (one line) and parses the answer line as `T` (or the error
    /// object). The same framing serves the FUSE server's control socket.
    pub fn call_json<Q: Serialize, T: serde::de::DeserializeOwned>(
        &mut self,
        op: &'static str,
        req: &Q,
    ) -> Result<T, ApiError> {
        let mut line = serde_json::to_vec(req).map_err(|source| ApiError::Encode {
            path: self.path.clone(),
            op,
            source,
        })?;
        line.push(b'\n');
        let io = |source| ApiError::Io {
            path: self.path.clone(),
            source,
        };
        self.writer
            .set_write_timeout(Some(self.timeout))
            .map_err(io)?;
        self.reader
            .get_ref()
            .set_read_timeout(Some(self.timeout))
            .map_err(io)?;
        if let Err(e) = self.writer.write_all(&line) {
            return Err(self.classify(e, op));
        }
        let mut answer = Vec::new();
        let n = match (&mut self.reader)
            .take(MAX_RESPONSE_LINE as u64 + 1)
            .read_until(b'\n', &mut answer)
        {
            Ok(n) => n,
            Err(e) => return Err(self.classify(e, op)),
        };
        if n == 0 {
            return Err(ApiError::Closed {
                path: self.path.clone(),
                op,
            });
        }
        if answer.last() != Some(&b'\n') {
            let reason = if answer.len() > MAX_RESPONSE_LINE {
                "the answer is too long"
            } else {
                // The daemon went away in the middle of its answer.
                return Err(ApiError::Closed {
                    path: self.path.clone(),
                    op,
                });
            };
            return Err(ApiError::BadResponse {
                path: self.path.clone(),
                op,
                reason,
                source: None,
            });
        }
        parse_answer(&answer).map_err(|e| match e {
            AnswerError::Remote(r) => ApiError::Remote(r),
            AnswerError::Bad(reason, source) => ApiError::BadResponse {
                path: self.path.clone(),
                op,
                reason,
                source: Some(source),
            },
        })
    }

    fn classify(&self, e: std::io::Error, op: &'static str) -> ApiError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ApiError::Timeout {
                path: self.path.clone(),
                op,
                timeout: self.timeout,
            },
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                ApiError::Closed {
                    path: self.path.clone(),
                    op,
                }
            }
            _ => ApiError::Io {
                path: self.path.clone(),
                source: e,
            },
        }
    }
}

enum AnswerError {
    Remote(RemoteError),
    Bad(&'static str, serde_json::Error),
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: RemoteError,
}

fn parse_answer<T: serde::de::DeserializeOwned>(line: &[u8]) -> Result<T, AnswerError> {
    let v: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| AnswerError::Bad("not JSON", e))?;
    if v.get("error").is_some() {
        let e: ErrorAnswer =
            serde_json::from_value(v).map_err(|e| AnswerError::Bad("malformed error object", e))?;
        return Err(AnswerError::Remote(e.error));
    }
    serde_json::from_value(v)
        .map_err(|e| AnswerError::Bad("its fields are not the expected ones", e))
}

/// The error line for a failure (what the daemon sends).
pub fn error_line(kind: ErrorKind, message: impl Into<String>) -> Vec<u8> {
    let mut v = serde_json::to_vec(&serde_json::json!({
        "error": RemoteError { kind, message: message.into() }
    }))
    .expect("an error object always encodes");
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_shape() {
        let r = Request::Prepare {
            env: "kof/hello:2".into(),
            lease: "c1".into(),
            token: None,
            pod: None,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"op":"prepare","env":"kof/hello:2","lease":"c1"}"#
        );
        let r: Request =
            serde_json::from_str(r#"{"op":"ensure","store_path":"abc-x","start":0,"end":10}"#)
                .unwrap();
        assert_eq!(
            r,
            Request::Ensure {
                store_path: "abc-x".into(),
                start: 0,
                end: 10
            }
        );
        let r: Request = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert_eq!(r, Request::Status);
        let r: Request = serde_json::from_str(r#"{"op":"hello"}"#).unwrap();
        assert_eq!(r, Request::Hello);
        // Unknown ops and fields are refused.
        assert!(serde_json::from_str::<Request>(r#"{"op":"mount"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"release","lease":"a","x":1}"#).is_err());
    }

    #[test]
    fn gc_requests_have_the_documented_shape() {
        let r: Request = serde_json::from_str(r#"{"op":"gc"}"#).unwrap();
        assert_eq!(r, Request::Gc { derived: false });
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"op":"gc"}"#);
        let r: Request = serde_json::from_str(r#"{"op":"gc","derived":true}"#).unwrap();
        assert_eq!(r, Request::Gc { derived: true });
        assert_eq!(r.op(), "gc");
    }

    #[test]
    fn a_token_never_shows_in_debug() {
        let r = Request::Prepare {
            env: "o/n".into(),
            lease: "l".into(),
            token: Some(SecretToken("s3cr3t-token".into())),
            pod: Some("sandbox1".into()),
        };
        assert!(!format!("{r:?}").contains("s3cr3t"));
        // ... but is sent.
        assert!(serde_json::to_string(&r).unwrap().contains("s3cr3t-token"));
    }

    #[test]
    fn error_answers_become_remote_errors() {
        let line = error_line(ErrorKind::Resolve, "environment kof/nope: not found");
        match parse_answer::<Released>(&line) {
            Err(AnswerError::Remote(e)) => {
                assert_eq!(e.kind, ErrorKind::Resolve);
                assert_eq!(e.message, "environment kof/nope: not found");
            }
            _ => panic!("expected a remote error"),
        }
        assert!(matches!(
            parse_answer::<Released>(b"{\"lease\":1}\n"),
            Err(AnswerError::Bad(..))
        ));
    }
}
