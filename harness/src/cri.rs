//! A blocking CRI v1 (`runtime.v1`) client over containerd's unix socket, driving the CRI plugin
//! the way kubelet does: pods on the host network (this machine has no CNI) without a hostname,
//! each container in its own PID namespace, kubelet's `io.kubernetes.*` labels.
//!
//! The generated tonic clients ([`RuntimeServiceClient`], [`ImageServiceClient`]) are exposed for
//! calls the facade does not wrap; run them with [`CriClient::block_on`].
//!
//! Every call carries a deadline ([`CriClient::request_timeout`], kubelet's 2 minutes by default;
//! `exec_sync` adds its own timeout to it). A failed call is a [`CriError::Call`] holding the gRPC
//! status, whose message is containerd's own text (e.g. a shim's error from CreateContainer).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::cri_api as api;
pub use crate::cri_api::image_service_client::ImageServiceClient;
pub use crate::cri_api::runtime_service_client::RuntimeServiceClient;

/// kubelet's default `--runtime-request-timeout`.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_MESSAGE_SIZE: usize = 64 << 20;

/// Why a CRI call failed.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// The client's runtime could not be built.
    #[error("building the CRI client's tokio runtime")]
    Runtime(#[source] std::io::Error),
    /// The CRI socket could not be reached.
    #[error("connecting to CRI at {socket}")]
    Connect {
        /// the socket
        socket: PathBuf,
        /// the cause
        #[source]
        source: tonic::transport::Error,
    },
    /// containerd answered a call with an error. Its status is containerd's answer, not a
    /// cause below this layer: the code and message are this error's text.
    #[error("CRI {method} failed ({code:?}): {message}", code = .status.code(), message = .status.message())]
    Call {
        /// the CRI method
        method: &'static str,
        /// containerd's answer
        status: Box<tonic::Status>,
    },
    /// An answer lacked a field the call needs.
    #[error("CRI {method} answered without {field}")]
    MissingField {
        /// the CRI method
        method: &'static str,
        /// the missing field
        field: &'static str,
    },
}

impl CriError {
    /// The gRPC status message of a failed call (containerd's error text), if this is one.
    pub fn grpc_message(&self) -> Option<&str> {
        match self {
            CriError::Call { status, .. } => Some(status.message()),
            _ => None,
        }
    }

    /// The gRPC status code of a failed call, if this is one.
    pub fn grpc_code(&self) -> Option<tonic::Code> {
        match self {
            CriError::Call { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

/// A pod sandbox as the tests need it; always on the host network, never with a hostname.
#[derive(Debug, Clone, Default)]
pub struct PodSpec {
    /// The pod's name.
    pub name: String,
    /// Its Kubernetes namespace.
    pub namespace: String,
    /// Its uid (unique per pod).
    pub uid: String,
    /// Pod annotations.
    pub annotations: HashMap<String, String>,
    /// Pod labels.
    pub labels: HashMap<String, String>,
    /// CRI runtime handler: `"flox"`, or `""` for the default (`runc`).
    pub runtime_handler: String,
    /// Where CRI writes the containers' logs (each container's `log_path` is relative to it).
    /// Must be absolute; created by [`CriClient::run_pod_sandbox`] if missing.
    pub log_directory: PathBuf,
    /// `LinuxPodSandboxConfig.cgroup_parent`; empty: none (containerd's default).
    pub cgroup_parent: String,
}

static UID_COUNTER: AtomicU64 = AtomicU64::new(0);

impl PodSpec {
    /// A pod in namespace `default` with a uid unique to this process, default runtime.
    pub fn new(name: &str, log_directory: &Path) -> PodSpec {
        let n = UID_COUNTER.fetch_add(1, Ordering::Relaxed);
        PodSpec {
            name: name.to_owned(),
            namespace: "default".to_owned(),
            uid: format!("kof-{}-{}-{n}", std::process::id(), name),
            log_directory: log_directory.to_owned(),
            ..PodSpec::default()
        }
    }

    /// The `PodSandboxConfig` kubelet would send for this pod.
    pub fn to_config(&self) -> api::PodSandboxConfig {
        let mut labels = self.labels.clone();
        labels.insert("io.kubernetes.pod.name".into(), self.name.clone());
        labels.insert("io.kubernetes.pod.namespace".into(), self.namespace.clone());
        labels.insert("io.kubernetes.pod.uid".into(), self.uid.clone());
        api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            // No hostname: runc refuses to set one without its own UTS namespace.
            hostname: String::new(),
            log_directory: self.log_directory.to_string_lossy().into_owned(),
            labels,
            annotations: self.annotations.clone(),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(host_network_namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Network NODE (no CNI here), PID per container and IPC per pod, as kubelet sets them.
fn host_network_namespaces() -> api::NamespaceOption {
    api::NamespaceOption {
        network: api::NamespaceMode::Node as i32,
        pid: api::NamespaceMode::Container as i32,
        ipc: api::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// A bind mount into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The host's file or directory.
    pub host_path: PathBuf,
    /// Where it appears in the container.
    pub container_path: String,
    /// Mounted read-only.
    pub readonly: bool,
}

/// A container as the tests need it.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    /// The container's name in its pod.
    pub name: String,
    /// Image reference as a pod spec has it (`flox/empty:1.0.0`); CRI normalizes it.
    pub image: String,
    /// The command (replaces the image's entrypoint when not empty).
    pub command: Vec<String>,
    /// Its arguments (replace the image's cmd when not empty).
    pub args: Vec<String>,
    /// The working directory; empty: the image's.
    pub working_dir: String,
    /// Environment variables.
    pub envs: Vec<(String, String)>,
    /// Container annotations.
    pub annotations: HashMap<String, String>,
    /// Bind mounts.
    pub mounts: Vec<Mount>,
    /// Relative to the pod's `log_directory`; empty: no log.
    pub log_path: String,
}

impl ContainerSpec {
    /// A container named `name` from `image`, logging to `<name>.log`.
    pub fn new(name: &str, image: &str) -> ContainerSpec {
        ContainerSpec {
            name: name.to_owned(),
            image: image.to_owned(),
            log_path: format!("{name}.log"),
            ..ContainerSpec::default()
        }
    }

    /// The `ContainerConfig` kubelet would send for this container.
    pub fn to_config(&self) -> api::ContainerConfig {
        let mut labels = HashMap::new();
        labels.insert("io.kubernetes.container.name".into(), self.name.clone());
        api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: self.name.clone(),
                attempt: 0,
            }),
            image: Some(api::ImageSpec {
                image: self.image.clone(),
                user_specified_image: self.image.clone(),
                ..Default::default()
            }),
            command: self.command.clone(),
            args: self.args.clone(),
            working_dir: self.working_dir.clone(),
            envs: self
                .envs
                .iter()
                .map(|(key, value)| api::KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
            mounts: self
                .mounts
                .iter()
                .map(|m| api::Mount {
                    container_path: m.container_path.clone(),
                    host_path: m.host_path.to_string_lossy().into_owned(),
                    readonly: m.readonly,
                    ..Default::default()
                })
                .collect(),
            labels,
            annotations: self.annotations.clone(),
            log_path: self.log_path.clone(),
            linux: Some(api::LinuxContainerConfig {
                security_context: Some(api::LinuxContainerSecurityContext {
                    namespace_options: Some(host_network_namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// What `ExecSync` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// What the command wrote to stdout.
    pub stdout: Vec<u8>,
    /// What it wrote to stderr.
    pub stderr: Vec<u8>,
    /// Its exit code.
    pub exit_code: i32,
}

/// A blocking CRI client; owns a current-thread tokio runtime. See the module doc.
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    /// Deadline of each call.
    pub request_timeout: Duration,
}

impl std::fmt::Debug for CriClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriClient")
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl CriClient {
    /// Connects to CRI on containerd's socket.
    pub fn connect(socket: &Path) -> Result<CriClient, CriError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CriError::Runtime)?;
        let path = socket.to_owned();
        let channel = rt
            .block_on(async {
                // The URI is unused: the connector below always dials the unix socket.
                Endpoint::from_static("http://localhost")
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(stream))
                        }
                    }))
                    .await
            })
            .map_err(|source| CriError::Connect {
                socket: socket.to_owned(),
                source,
            })?;
        Ok(CriClient {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_SIZE),
            images: ImageServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_SIZE),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        })
    }

    /// The generated RuntimeService client (cheap to clone).
    pub fn runtime_client(&self) -> RuntimeServiceClient<Channel> {
        self.runtime.clone()
    }

    /// The generated ImageService client (cheap to clone).
    pub fn image_client(&self) -> ImageServiceClient<Channel> {
        self.images.clone()
    }

    /// Runs a future (e.g. a call on [`Self::runtime_client`]) on this client's runtime.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.rt.block_on(fut)
    }

    fn request<T>(&self, msg: T, extra: Duration) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(self.request_timeout + extra);
        req
    }

    fn call_runtime<T, R, F, Fut>(
        &self,
        method: &'static str,
        msg: T,
        extra: Duration,
        f: F,
    ) -> Result<R, CriError>
    where
        F: FnOnce(RuntimeServiceClient<Channel>, tonic::Request<T>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let req = self.request(msg, extra);
        let client = self.runtime.clone();
        tracing::debug!(method, "CRI call");
        self.rt
            .block_on(f(client, req))
            .map(tonic::Response::into_inner)
            .map_err(|status| CriError::Call {
                method,
                status: Box::new(status),
            })
    }

    /// `Version`.
    pub fn version(&self) -> Result<api::VersionResponse, CriError> {
        let msg = api::VersionRequest {
            version: "v1".into(),
        };
        self.call_runtime("Version", msg, Duration::ZERO, |mut c, r| async move {
            c.version(r).await
        })
    }

    /// `RunPodSandbox`; creates the pod's log directory first (kubelet does). Returns its id.
    pub fn run_pod_sandbox(&self, pod: &PodSpec) -> Result<String, CriError> {
        if !pod.log_directory.as_os_str().is_empty() {
            // If this fails, containerd reports the missing directory itself.
            let _ = std::fs::create_dir_all(&pod.log_directory);
        }
        let msg = api::RunPodSandboxRequest {
            config: Some(pod.to_config()),
            runtime_handler: pod.runtime_handler.clone(),
        };
        let resp = self.call_runtime(
            "RunPodSandbox",
            msg,
            Duration::ZERO,
            |mut c, r| async move { c.run_pod_sandbox(r).await },
        )?;
        Ok(resp.pod_sandbox_id)
    }

    /// `PodSandboxStatus`.
    pub fn pod_sandbox_status(&self, id: &str) -> Result<api::PodSandboxStatus, CriError> {
        let msg = api::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        };
        let resp = self.call_runtime(
            "PodSandboxStatus",
            msg,
            Duration::ZERO,
            |mut c, r| async move { c.pod_sandbox_status(r).await },
        )?;
        resp.status.ok_or(CriError::MissingField {
            method: "PodSandboxStatus",
            field: "status",
        })
    }

    /// `CreateContainer` in sandbox `sandbox_id` (created from `pod`). Returns its id.
    pub fn create_container(
        &self,
        sandbox_id: &str,
        container: &ContainerSpec,
        pod: &PodSpec,
    ) -> Result<String, CriError> {
        let msg = api::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.into(),
            config: Some(container.to_config()),
            sandbox_config: Some(pod.to_config()),
        };
        let resp = self.call_runtime(
            "CreateContainer",
            msg,
            Duration::ZERO,
            |mut c, r| async move { c.create_container(r).await },
        )?;
        Ok(resp.container_id)
    }

    /// `StartContainer`.
    pub fn start_container(&self, id: &str) -> Result<(), CriError> {
        let msg = api::StartContainerRequest {
            container_id: id.into(),
        };
        self.call_runtime(
            "StartContainer",
            msg,
            Duration::ZERO,
            |mut c, r| async move { c.start_container(r).await },
        )
        .map(drop)
    }

    /// `StopContainer`: SIGTERM (or the image's stop signal), SIGKILL after `timeout_s` seconds.
    pub fn stop_container(&self, id: &str, timeout_s: i64) -> Result<(), CriError> {
        let msg = api::StopContainerRequest {
            container_id: id.into(),
            timeout: timeout_s,
        };
        let extra = Duration::from_secs(timeout_s.max(0) as u64);
        self.call_runtime("StopContainer", msg, extra, |mut c, r| async move {
            c.stop_container(r).await
        })
        .map(drop)
    }

    /// `RemoveContainer`.
    pub fn remove_container(&self, id: &str) -> Result<(), CriError> {
        let msg = api::RemoveContainerRequest {
            container_id: id.into(),
        };
        self.call_runtime(
            "RemoveContainer",
            msg,
            Duration::ZERO,
            |mut c, r| async move { c.remove_container(r).await },
        )
        .map(drop)
    }

    /// `ContainerStatus` (not verbose).
    pub fn container_status(&self, id: &str) -> Result<api::ContainerStatus, CriError> {
        let msg = api::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        let resp = self.call_runtime(
            "ContainerStatus",
            msg,
            Duration::ZERO,
            |mut c, r| async move { c.container_status(r).await },
        )?;
        resp.status.ok_or(CriError::MissingField {
            method: "ContainerStatus",
            field: "status",
        })
    }

    /// `ExecSync`: runs `cmd` in the container, waiting at most `timeout` (whole seconds, at
    /// least one; CRI's unit) for it.
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<ExecResult, CriError> {
        let secs = timeout.as_secs().max(1);
        let msg = api::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: secs as i64,
        };
        let resp = self.call_runtime(
            "ExecSync",
            msg,
            Duration::from_secs(secs),
            |mut c, r| async move { c.exec_sync(r).await },
        )?;
        Ok(ExecResult {
            stdout: resp.stdout,
            stderr: resp.stderr,
            exit_code: resp.exit_code,
        })
    }

    /// `StopPodSandbox`.
    pub fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let msg = api::StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.call_runtime(
            "StopPodSandbox",
            msg,
            Duration::ZERO,
            |mut c, r| async move { c.stop_pod_sandbox(r).await },
        )
        .map(drop)
    }

    /// `RemovePodSandbox`.
    pub fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let msg = api::RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.call_runtime(
            "RemovePodSandbox",
            msg,
            Duration::ZERO,
            |mut c, r| async move { c.remove_pod_sandbox(r).await },
        )
        .map(drop)
    }

    /// `ListContainers`, optionally only those of one sandbox.
    pub fn list_containers(
        &self,
        sandbox_id: Option<&str>,
    ) -> Result<Vec<api::Container>, CriError> {
        let msg = api::ListContainersRequest {
            filter: sandbox_id.map(|s| api::ContainerFilter {
                pod_sandbox_id: s.into(),
                ..Default::default()
            }),
        };
        let resp = self.call_runtime(
            "ListContainers",
            msg,
            Duration::ZERO,
            |mut c, r| async move { c.list_containers(r).await },
        )?;
        Ok(resp.containers)
    }

    /// `ListPodSandbox` (all sandboxes).
    pub fn list_pod_sandboxes(&self) -> Result<Vec<api::PodSandbox>, CriError> {
        let msg = api::ListPodSandboxRequest { filter: None };
        let resp = self.call_runtime(
            "ListPodSandbox",
            msg,
            Duration::ZERO,
            |mut c, r| async move { c.list_pod_sandbox(r).await },
        )?;
        Ok(resp.items)
    }

    /// `ImageStatus`: `None` if CRI does not know the image.
    pub fn image_status(&self, name: &str) -> Result<Option<api::Image>, CriError> {
        let req = self.request(
            api::ImageStatusRequest {
                image: Some(api::ImageSpec {
                    image: name.into(),
                    ..Default::default()
                }),
                verbose: false,
            },
            Duration::ZERO,
        );
        let mut client = self.images.clone();
        self.rt
            .block_on(async move { client.image_status(req).await })
            .map(|r| r.into_inner().image)
            .map_err(|status| CriError::Call {
                method: "ImageStatus",
                status: Box::new(status),
            })
    }
}
