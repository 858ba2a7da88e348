//! The task-API proxy: containerd's shim in front of `containerd-shim-runc-v2`.
//!
//! containerd talks to a shim over ttrpc (the task service `containerd.task.v2.Task`, or `v3`
//! on containerd 2.x, and the sandbox service on 2.x). The proxy serves those services on the
//! socket [`crate::bootstrap`] gave containerd and passes every request to the runc shim as it
//! came (service, method, payload, metadata, timeout), and every answer back, status included.
//! Three requests are read on the way:
//!
//! - **Create**: before the runc shim sees it, the container is set up ([`crate::lifecycle`]):
//!   for an environment container the bundle's `config.json` gets the view as its root and the
//!   activated process. A container the runc shim then fails to create is undone. The Create
//!   of a flox pod's sandbox tells kof-fetcherd the pod is starting (in the background), so
//!   the live generation is resolved once for the pod while its sandbox starts, and its
//!   containers start without a FloxHub round trip of their own.
//! - **Exec**: for a process run in an environment container (`kubectl exec`, CRI `ExecSync`,
//!   `ctr task exec`), the process spec is activated ([`crate::exec`]), unless the pod's
//!   `flox.dev/skip-containers-exec` names the container.
//! - **Delete** of a container (not of an exec): once the runc shim deleted it, its view,
//!   overlay and lease are released.
//!
//! So kof sees every container and every exec on containerd 1.6, 1.7 and 2.x alike, and
//! everything else (runc, I/O, events, cgroups with either driver, the runtime's options such
//! as `SystemdCgroup`) stays the runc shim's. Events go from the runc shim to containerd
//! directly, as they always did.
//!
//! The proxy lives as long as its runc shim: when the runc shim exits (after containerd's
//! `Shutdown`, or a crash), the proxy closes its socket and exits, and containerd sees the same
//! end of the shim it would have seen without kof.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::shim::shim::{
    CreateTaskRequest, DeleteRequest, ExecProcessRequest, KillRequest, ShutdownRequest, WaitRequest,
};
use kof_node_api::config::Config;
use kof_node_api::report::chain;
use protobuf::Message;
use thiserror::Error;
use tracing::{debug, info, warn};
use ttrpc::{Code, MethodHandler, Request, Response, TtrpcContext};

use crate::lifecycle;

/// The task API's methods (the same in `containerd.task.v2.Task` and `containerd.task.v3.Task`).
pub const TASK_METHODS: [&str; 17] = [
    "State",
    "Create",
    "Start",
    "Delete",
    "Pids",
    "Pause",
    "Resume",
    "Checkpoint",
    "Kill",
    "Exec",
    "ResizePty",
    "CloseIO",
    "Update",
    "Wait",
    "Stats",
    "Connect",
    "Shutdown",
];

/// The task services containerd may use: v2 (containerd 1.6 to 2.x) and v3 (2.x).
pub const TASK_SERVICES: [&str; 2] = ["containerd.task.v2.Task", "containerd.task.v3.Task"];

/// containerd 2.x's sandbox service, served by shims that run sandboxes themselves.
pub const SANDBOX_SERVICE: &str = "containerd.runtime.sandbox.v1.Sandbox";

/// The sandbox service's methods.
pub const SANDBOX_METHODS: [&str; 9] = [
    "CreateSandbox",
    "StartSandbox",
    "Platform",
    "StopSandbox",
    "WaitSandbox",
    "SandboxStatus",
    "PingSandbox",
    "ShutdownSandbox",
    "SandboxMetrics",
];

/// How often a proxy without the runc shim's pid checks that the runc shim still answers.
const UPSTREAM_POLL: Duration = Duration::from_secs(1);

/// Why the proxy could not run.
#[derive(Debug, Error)]
pub enum ProxyError {
    /// The runc shim's socket did not answer.
    #[error("connecting to the runc shim at {address}")]
    Upstream {
        /// Its address.
        address: String,
        /// The cause.
        #[source]
        source: ttrpc::Error,
    },
    /// The listening socket could not be served.
    #[error("serving the shim socket {socket}")]
    Serve {
        /// The socket.
        socket: PathBuf,
        /// The cause.
        #[source]
        source: ttrpc::Error,
    },
}

/// What a proxy needs to run.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// The kof node config.
    pub config: Config,
    /// The containerd namespace of its containers.
    pub namespace: String,
    /// The runc shim's address.
    pub upstream: String,
    /// The runc shim's pid, when it wrote one.
    pub upstream_pid: Option<i32>,
    /// The proxy's own socket (removed when it exits).
    pub socket: PathBuf,
}

struct Proxy {
    config: Config,
    namespace: String,
    upstream: ttrpc::Client,
}

/// The handler registered for every method: passes the request through [`Proxy::call`].
struct Method(Arc<Proxy>);

impl MethodHandler for Method {
    fn handler(&self, ctx: TtrpcContext, req: Request) -> ttrpc::Result<()> {
        let stream = ctx.mh.stream_id;
        let res = self.0.call(req);
        ctx.respond(stream, res)
    }
}

fn failure(code: Code, message: String) -> Response {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message)).into()
}

fn ok(res: &Response) -> bool {
    res.status
        .as_ref()
        .map(|s| s.code.value() == Code::OK as i32)
        .unwrap_or(true)
}

impl Proxy {
    fn call(&self, req: Request) -> Response {
        let task = TASK_SERVICES.contains(&req.service.as_str());
        debug!(service = %req.service, method = %req.method, "request");
        match req.method.as_str() {
            "Create" if task => self.create(req),
            "Exec" if task => self.exec(req),
            "Delete" if task => self.delete(req),
            _ => self.forward(req),
        }
    }

    /// Passes `req` to the runc shim and returns its answer, its error status included.
    fn forward(&self, req: Request) -> Response {
        let what = format!("{}/{}", req.service, req.method);
        match self.upstream.request(req) {
            Ok(res) => res,
            Err(ttrpc::Error::RpcStatus(status)) => ttrpc::Error::RpcStatus(status).into(),
            Err(e) => {
                warn!(request = %what, error = %e, "the runc shim did not answer");
                failure(
                    Code::UNAVAILABLE,
                    format!("containerd-shim-flox-v2: the runc shim did not answer {what}: {e}"),
                )
            }
        }
    }

    fn create(&self, req: Request) -> Response {
        let create = match CreateTaskRequest::parse_from_bytes(&req.payload) {
            Ok(c) => c,
            Err(e) => {
                return failure(
                    Code::INVALID_ARGUMENT,
                    format!("containerd-shim-flox-v2: unreadable Create request: {e}"),
                )
            }
        };
        let started = match lifecycle::start(
            &self.config,
            &self.namespace,
            &create.id,
            Path::new(&create.bundle),
        ) {
            Ok(s) => s,
            Err(e) => {
                warn!(id = %create.id, error = %chain(&e), "container not created");
                return failure(
                    Code::FAILED_PRECONDITION,
                    format!("containerd-shim-flox-v2: {}", chain(&e).replace('\n', " ")),
                );
            }
        };
        if let lifecycle::Started::PodSandbox { env, pod } = &started {
            // A flox pod is starting: its live generation is resolved while its sandbox starts.
            let (config, env, pod) = (self.config.clone(), env.clone(), pod.clone());
            std::thread::spawn(move || lifecycle::pod_starting(&config, &env, &pod));
        }
        let res = self.forward(req);
        if !ok(&res) {
            if let lifecycle::Started::Environment { .. } = started {
                info!(id = %create.id, "the runc shim refused the container; undoing its set-up");
                if let Err(e) = lifecycle::delete(&self.config, &self.namespace, &create.id) {
                    warn!(id = %create.id, error = %chain(&e), "cleanup after a refused create");
                }
            }
        }
        res
    }

    fn exec(&self, mut req: Request) -> Response {
        let mut exec = match ExecProcessRequest::parse_from_bytes(&req.payload) {
            Ok(e) => e,
            Err(e) => {
                return failure(
                    Code::INVALID_ARGUMENT,
                    format!("containerd-shim-flox-v2: unreadable Exec request: {e}"),
                )
            }
        };
        match lifecycle::exec_profile(&self.config, &self.namespace, &exec.id) {
            Ok(Some(profile)) if profile.skip => {
                info!(id = %exec.id, exec = %exec.exec_id, "exec runs unmodified (flox.dev/skip-containers-exec)");
            }
            Ok(Some(profile)) => {
                let Some(spec) = exec.spec.as_mut() else {
                    return self.forward(req);
                };
                match crate::exec::activate_process(&spec.value, &profile.activation) {
                    Ok(value) => {
                        spec.value = value;
                        match exec.write_to_bytes() {
                            Ok(payload) => req.payload = payload,
                            Err(e) => {
                                return failure(
                                    Code::INTERNAL,
                                    format!("containerd-shim-flox-v2: re-encoding Exec: {e}"),
                                )
                            }
                        }
                        info!(id = %exec.id, exec = %exec.exec_id, env = %profile.activation.env, "exec activated");
                    }
                    Err(e) => {
                        warn!(id = %exec.id, exec = %exec.exec_id, error = %chain(&e), "exec not activated");
                        return failure(
                            Code::FAILED_PRECONDITION,
                            format!(
                                "containerd-shim-flox-v2: exec {} in container {}: {}",
                                exec.exec_id,
                                exec.id,
                                chain(&e)
                            ),
                        );
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                warn!(id = %exec.id, error = %chain(&e), "unreadable container record");
                return failure(
                    Code::FAILED_PRECONDITION,
                    format!(
                        "containerd-shim-flox-v2: container {}: {}",
                        exec.id,
                        chain(&e)
                    ),
                );
            }
        }
        self.forward(req)
    }

    fn delete(&self, req: Request) -> Response {
        let delete = DeleteRequest::parse_from_bytes(&req.payload).ok();
        let res = self.forward(req);
        if let Some(d) = delete.filter(|d| d.exec_id.is_empty()) {
            if ok(&res) {
                if let Err(e) = lifecycle::delete(&self.config, &self.namespace, &d.id) {
                    warn!(id = %d.id, error = %chain(&e), "cleanup at delete failed; a later sweep retries");
                }
            }
        }
        res
    }
}

/// Every method path the proxy serves.
pub fn method_paths() -> Vec<String> {
    let mut paths = Vec::new();
    for service in TASK_SERVICES {
        for m in TASK_METHODS {
            paths.push(format!("/{service}/{m}"));
        }
    }
    for m in SANDBOX_METHODS {
        paths.push(format!("/{SANDBOX_SERVICE}/{m}"));
    }
    paths
}

/// Serves the proxy on the listening socket at fd `listener` until the runc shim is gone.
pub fn serve(opts: ProxyOptions, listener: i32) -> Result<(), ProxyError> {
    let upstream =
        ttrpc::Client::connect(&opts.upstream).map_err(|source| ProxyError::Upstream {
            address: opts.upstream.clone(),
            source,
        })?;
    let proxy = Arc::new(Proxy {
        config: opts.config.clone(),
        namespace: opts.namespace.clone(),
        upstream,
    });
    let mut methods: HashMap<String, Box<dyn MethodHandler + Send + Sync>> = HashMap::new();
    for path in method_paths() {
        methods.insert(path, Box::new(Method(proxy.clone())));
    }
    let serve_err = |source| ProxyError::Serve {
        socket: opts.socket.clone(),
        source,
    };
    let mut server = ttrpc::Server::new()
        .add_listener(listener)
        .map_err(serve_err)?
        .register_service(methods);
    server.start().map_err(serve_err)?;
    info!(socket = %opts.socket.display(), upstream = %opts.upstream, pid = ?opts.upstream_pid, "shim proxy serving");
    wait_for_upstream_exit(&opts);
    info!(socket = %opts.socket.display(), "the runc shim is gone; the proxy exits");
    let _ = std::fs::remove_file(&opts.socket);
    let _ = std::fs::remove_file(crate::bootstrap::answer_path(&opts.socket));
    let _ = std::fs::remove_file(crate::bootstrap::upstream_path(&opts.socket));
    // The runc shim answered containerd's last request (Shutdown) before it exited, and that
    // answer has been passed on: closing the connections is what containerd waits for.
    server.shutdown();
    Ok(())
}

/// Returns once the runc shim has exited: its pidfd becomes readable, or (without its pid) its
/// socket stops answering.
fn wait_for_upstream_exit(opts: &ProxyOptions) {
    if let Some(pid) = opts.upstream_pid {
        match kof_node_api::pidfd::wait_exit(pid, None) {
            Ok(_) => return,
            Err(e) => {
                warn!(pid, error = %e, "cannot watch the runc shim's pid; watching its socket")
            }
        }
    }
    let path = opts
        .upstream
        .strip_prefix("unix://")
        .unwrap_or(&opts.upstream)
        .to_string();
    while std::os::unix::net::UnixStream::connect(&path).is_ok() {
        std::thread::sleep(UPSTREAM_POLL);
    }
}

/// How long each call to an orphaned runc shim may take.
const ORPHAN_CALL: Duration = Duration::from_secs(30);

/// Ends container `id` on the runc shim `upstream` whose proxy died, through its task API
/// (task API `version`): kill, wait, delete, then ask the runc shim to shut down (it does once
/// it holds no container). Returns the `DeleteResponse`, encoded, which containerd reads from
/// the shim binary's `delete`.
pub fn end_orphaned(
    upstream: &str,
    version: i64,
    namespace: &str,
    id: &str,
) -> Result<Vec<u8>, ttrpc::Error> {
    let client = ttrpc::Client::connect(upstream)?;
    let service = format!("containerd.task.v{version}.Task");
    let call = |method: &str, payload: Vec<u8>| {
        let mut req = Request::new();
        req.service = service.clone();
        req.method = method.to_string();
        req.payload = payload;
        req.timeout_nano = ORPHAN_CALL.as_nanos() as i64;
        req.metadata = ttrpc::context::to_pb(HashMap::from([(
            "containerd-namespace-ttrpc".to_string(),
            vec![namespace.to_string()],
        )]));
        client.request(req).map(|r| r.payload)
    };
    let encode = |m: &dyn protobuf::MessageDyn| {
        m.write_to_bytes_dyn()
            .map_err(|e| ttrpc::Error::Others(e.to_string()))
    };
    let mut kill = KillRequest::new();
    kill.id = id.to_string();
    kill.signal = libc::SIGKILL as u32;
    kill.all = true;
    // A task that already exited answers Kill with an error: its Wait and Delete still work.
    let _ = call("Kill", encode(&kill)?);
    let mut wait = WaitRequest::new();
    wait.id = id.to_string();
    let _ = call("Wait", encode(&wait)?);
    let mut delete = DeleteRequest::new();
    delete.id = id.to_string();
    let answer = call("Delete", encode(&delete)?)?;
    let mut shutdown = ShutdownRequest::new();
    shutdown.id = id.to_string();
    // The runc shim exits while answering the last Shutdown: the call may fail.
    let _ = call("Shutdown", encode(&shutdown)?);
    Ok(answer)
}
