//! The one CRI call the installer makes: `runtime.v1.RuntimeService/Status`, verbose, on
//! containerd's socket, to see after a restart that the node serves pods and knows the `flox`
//! runtime handler.
//!
//! Why this check and not another: it is what kubelet asks. containerd answers it only when its
//! CRI plugin loaded (a CRI plugin that refused its config, e.g. a default runtime without a
//! table, leaves the service unregistered, and the call fails with `Unimplemented`), and its
//! answer lists the runtime handlers CRI really loaded, after imports, migration and defaults:
//! `runtime_handlers` (containerd 2.x) or the runtimes of the CRI config in the verbose `info`
//! (`info["config"]`, JSON, every release). `ctr plugins ls` would show the plugin `ok` but not its
//! handlers, and `containerd config dump` shows the file, not what the running CRI plugin took.
//!
//! The client is the smallest tonic client for that one method, with the two messages written
//! out here (field numbers of the CRI v1 API), so the installer needs no generated code.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use thiserror::Error;
use tonic::transport::{Endpoint, Uri};

/// The method's path.
const STATUS_PATH: &str = "/runtime.v1.RuntimeService/Status";

/// `runtime.v1.StatusRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct StatusRequest {
    #[prost(bool, tag = "1")]
    verbose: bool,
}

/// `runtime.v1.StatusResponse`, the fields read here.
#[derive(Clone, PartialEq, prost::Message)]
struct StatusResponse {
    #[prost(message, optional, tag = "1")]
    status: Option<RuntimeStatus>,
    #[prost(map = "string, string", tag = "2")]
    info: HashMap<String, String>,
    #[prost(message, repeated, tag = "3")]
    runtime_handlers: Vec<RuntimeHandler>,
}

/// `runtime.v1.RuntimeStatus`.
#[derive(Clone, PartialEq, prost::Message)]
struct RuntimeStatus {
    #[prost(message, repeated, tag = "1")]
    conditions: Vec<RuntimeCondition>,
}

/// `runtime.v1.RuntimeCondition`.
#[derive(Clone, PartialEq, prost::Message)]
struct RuntimeCondition {
    #[prost(string, tag = "1")]
    r#type: String,
    #[prost(bool, tag = "2")]
    status: bool,
    #[prost(string, tag = "3")]
    reason: String,
    #[prost(string, tag = "4")]
    message: String,
}

/// `runtime.v1.RuntimeHandler`, its name.
#[derive(Clone, PartialEq, prost::Message)]
struct RuntimeHandler {
    #[prost(string, tag = "1")]
    name: String,
}

/// Why CRI's `Status` did not give a serving runtime.
#[derive(Debug, Error)]
pub enum CriError {
    /// The client's runtime could not be built.
    #[error("building the CRI client's runtime")]
    Runtime(#[source] std::io::Error),
    /// The socket did not take the connection.
    #[error("connecting to CRI at {socket}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The call failed: containerd's answer (e.g. `Unimplemented` when the CRI plugin did not
    /// load) is this error's text.
    #[error("CRI Status at {socket} failed ({code:?}): {message}", code = .status.code(), message = .status.message())]
    Call {
        /// The socket.
        socket: PathBuf,
        /// containerd's answer.
        status: Box<tonic::Status>,
    },
    /// CRI answers, but says its runtime is not ready.
    #[error(
        "CRI at {socket} answers but its RuntimeReady condition is false ({reason}: {message})"
    )]
    NotReady {
        /// The socket.
        socket: PathBuf,
        /// The condition's reason.
        reason: String,
        /// The condition's message.
        message: String,
    },
}

/// What CRI's `Status` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriStatus {
    /// The runtime handlers CRI loaded, sorted (from `runtime_handlers` and the verbose config).
    pub handlers: Vec<String>,
}

/// Asks CRI on `socket` for its status (verbose), within `timeout`; an error unless the call
/// answers and the `RuntimeReady` condition is true (or absent).
pub fn status(socket: &Path, timeout: Duration) -> Result<CriStatus, CriError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CriError::Runtime)?;
    let path = socket.to_owned();
    let response = rt.block_on(async {
        // The URI is unused: the connector always dials the unix socket.
        let channel = Endpoint::from_static("http://localhost")
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|source| CriError::Connect {
                socket: socket.to_owned(),
                source,
            })?;
        let mut grpc = tonic::client::Grpc::new(channel);
        let call = |status| CriError::Call {
            socket: socket.to_owned(),
            status: Box::new(status),
        };
        grpc.ready()
            .await
            .map_err(|e| call(tonic::Status::unavailable(e.to_string())))?;
        let mut request = tonic::Request::new(StatusRequest { verbose: true });
        request.set_timeout(timeout);
        grpc.unary(
            request,
            tonic::codegen::http::uri::PathAndQuery::from_static(STATUS_PATH),
            tonic_prost::ProstCodec::<StatusRequest, StatusResponse>::default(),
        )
        .await
        .map(tonic::Response::into_inner)
        .map_err(call)
    })?;
    if let Some(c) = response
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.r#type == "RuntimeReady" && !c.status)
    {
        return Err(CriError::NotReady {
            socket: socket.to_owned(),
            reason: c.reason.clone(),
            message: c.message.clone(),
        });
    }
    let mut handlers: Vec<String> = response
        .runtime_handlers
        .iter()
        .map(|h| h.name.clone())
        .filter(|n| !n.is_empty())
        .collect();
    handlers.extend(config_runtimes(&response.info));
    handlers.sort();
    handlers.dedup();
    Ok(CriStatus { handlers })
}

/// The runtimes of the CRI config containerd puts in the verbose `info["config"]` (JSON:
/// `containerd.runtimes` in 1.6 and 1.7; the same keys in 2.x's runtime config).
fn config_runtimes(info: &HashMap<String, String>) -> Vec<String> {
    let Some(config) = info
        .get("config")
        .and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok())
    else {
        return Vec::new();
    };
    config
        .get("containerd")
        .and_then(|c| c.get("runtimes"))
        .and_then(serde_json::Value::as_object)
        .map(|r| r.keys().cloned().collect())
        .unwrap_or_default()
}
