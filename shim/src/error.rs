//! Why the shim could not set a container up.

use thiserror::Error;

use crate::annotations::AnnotationError;
use crate::container::ContainerError;
use crate::spec::SpecError;
use crate::token::TokenError;

impl ShimError {
    /// A [`ShimError::Container`] of environment `env`, for `map_err`.
    pub fn container(env: &str) -> impl FnOnce(ContainerError) -> ShimError + '_ {
        move |source| ShimError::Container {
            env: env.to_string(),
            source,
        }
    }
}

/// A failed start or cleanup. Its message is what containerd shows the caller (`ctr`, the
/// kubelet's event), so each names the container or environment and the cause.
#[derive(Debug, Error)]
pub enum ShimError {
    /// containerd did not give the shim what it always gives.
    #[error("missing -{0} on the shim's command line")]
    MissingArg(&'static str),
    /// The kof configuration could not be loaded.
    #[error(transparent)]
    Config(#[from] kof_node_api::config::ConfigError),
    /// The bundle's spec is unreadable.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A `flox.dev/*` annotation is malformed.
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
    /// The token could not be read.
    #[error("environment {env}")]
    Token {
        /// The environment.
        env: String,
        /// The cause.
        #[source]
        source: TokenError,
    },
    /// kof-fetcherd could not prepare the environment.
    #[error("environment {env}")]
    Prepare {
        /// The environment.
        env: String,
        /// The cause.
        #[source]
        source: kof_node_api::api::ApiError,
    },
    /// kof-fetcherd could not release a lease.
    #[error("releasing lease {lease}")]
    Release {
        /// The lease.
        lease: String,
        /// The cause.
        #[source]
        source: kof_node_api::api::ApiError,
    },
    /// The container's command could not be activated.
    #[error(transparent)]
    Activate(#[from] kof_node_api::activate::ActivateError),
    /// The container's directory or mounts failed.
    #[error("environment {env}")]
    Container {
        /// The environment (or the container, for a cleanup).
        env: String,
        /// The cause.
        #[source]
        source: ContainerError,
    },
    /// Cleaning up a container's directory failed.
    #[error(transparent)]
    Cleanup(#[from] ContainerError),
    /// `start` could not give containerd a shim address.
    #[error(transparent)]
    Bootstrap(#[from] crate::bootstrap::BootstrapError),
    /// The task-API proxy could not run.
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),
}
