//! The `flox.dev/*` annotations a container carries, and what they decide.
//!
//! containerd copies a pod's `flox.dev/*` annotations into each of its containers' OCI
//! annotations (`pod_annotations` in the runtime's configuration), next to CRI's own
//! (`io.kubernetes.cri.container-type`, `...container-name`, `...image-name`). `ctr run
//! --annotation` sets them directly. Values are checked here: a malformed one fails the
//! container's creation with a message naming the annotation, rather than running the container
//! in some other way than asked.

use std::collections::BTreeMap;

use kof_node_api::envref::EnvRef;
use thiserror::Error;

/// `owner/name` or `owner/name:N`: the environment; required for kof to act.
pub const ENVIRONMENT: &str = "flox.dev/environment";
/// `run` (default) or `dev`.
pub const ACTIVATE_MODE: &str = "flox.dev/activate-mode";
/// `true`: `/nix/store` writable inside the container.
pub const NIX_MUTABLE: &str = "flox.dev/nix-mutable";
/// Comma-separated container names that run unmodified.
pub const SKIP_CONTAINERS: &str = "flox.dev/skip-containers";
/// Comma-separated container names whose `exec`s are not activated.
pub const SKIP_CONTAINERS_EXEC: &str = "flox.dev/skip-containers-exec";
/// Telemetry off; accepted, kof sends none.
pub const DISABLE_METRICS: &str = "flox.dev/disable-metrics";
/// CRI: `sandbox` or `container`.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI: the pod's sandbox id (on the sandbox and on each of the pod's containers).
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// CRI: the container's name in its pod.
pub const CRI_CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
/// CRI (containerd 1.7 and later): the image the container was made from.
pub const CRI_IMAGE_NAME: &str = "io.kubernetes.cri.image-name";

/// A `flox.dev/*` annotation kof cannot act on.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AnnotationError {
    /// The environment reference is malformed.
    #[error("annotation {ENVIRONMENT}={value:?}")]
    Environment {
        /// The value.
        value: String,
        /// Why it is refused.
        #[source]
        source: kof_node_api::envref::EnvRefError,
    },
    /// A boolean annotation is neither `true` nor `false`.
    #[error("annotation {name}={value:?}: expected \"true\" or \"false\"")]
    NotABool {
        /// The annotation.
        name: &'static str,
        /// The value.
        value: String,
    },
    /// `activate-mode` is not one kof runs.
    #[error("annotation {ACTIVATE_MODE}={value:?}: kof runs environments in \"run\" mode only (development mode is not supported)")]
    ActivateMode {
        /// The value.
        value: String,
    },
}

/// What the annotations ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run the container exactly as plain runc would.
    Plain(PlainReason),
    /// Run it in an environment.
    Environment(EnvironmentRequest),
}

/// Why a container runs unmodified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainReason {
    /// No `flox.dev/environment` annotation.
    NoEnvironment,
    /// A CRI pod sandbox (pause) container.
    Sandbox,
    /// Named in `flox.dev/skip-containers`.
    Skipped,
}

/// A container to run in an environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvironmentRequest {
    /// The environment, as the annotation gives it (checked).
    pub environment: String,
    /// `/nix/store` writable.
    pub nix_mutable: bool,
    /// `exec`s into this container are not to be activated.
    pub skip_exec: bool,
    /// The container's CRI name, when it has one.
    pub container_name: Option<String>,
    /// The image CRI made it from, when containerd says (1.7 and later).
    pub image_name: Option<String>,
}

fn flag(
    annotations: &BTreeMap<String, String>,
    name: &'static str,
) -> Result<bool, AnnotationError> {
    match annotations.get(name).map(|v| v.trim()) {
        None | Some("") => Ok(false),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(v) => Err(AnnotationError::NotABool {
            name,
            value: v.to_string(),
        }),
    }
}

fn listed(annotations: &BTreeMap<String, String>, name: &str, container: Option<&str>) -> bool {
    let (Some(list), Some(container)) = (annotations.get(name), container) else {
        return false;
    };
    list.split(',').map(str::trim).any(|c| c == container)
}

/// Decides how the container with these OCI annotations runs.
pub fn decide(annotations: &BTreeMap<String, String>) -> Result<Decision, AnnotationError> {
    let Some(env) = annotations.get(ENVIRONMENT) else {
        return Ok(Decision::Plain(PlainReason::NoEnvironment));
    };
    if annotations.get(CRI_CONTAINER_TYPE).map(String::as_str) == Some("sandbox") {
        return Ok(Decision::Plain(PlainReason::Sandbox));
    }
    let container_name = annotations.get(CRI_CONTAINER_NAME).cloned();
    if listed(annotations, SKIP_CONTAINERS, container_name.as_deref()) {
        return Ok(Decision::Plain(PlainReason::Skipped));
    }
    let environment = env.trim().to_string();
    EnvRef::parse(&environment).map_err(|source| AnnotationError::Environment {
        value: env.clone(),
        source,
    })?;
    match annotations.get(ACTIVATE_MODE).map(|v| v.trim()) {
        None | Some("") | Some("run") => {}
        Some(v) => {
            return Err(AnnotationError::ActivateMode {
                value: v.to_string(),
            })
        }
    }
    // Checked so that a typo is an error, though kof never sends telemetry.
    flag(annotations, DISABLE_METRICS)?;
    Ok(Decision::Environment(EnvironmentRequest {
        environment,
        nix_mutable: flag(annotations, NIX_MUTABLE)?,
        skip_exec: listed(annotations, SKIP_CONTAINERS_EXEC, container_name.as_deref()),
        container_name,
        image_name: annotations.get(CRI_IMAGE_NAME).cloned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn sandboxes_skipped_and_plain_containers_run_unmodified() {
        assert_eq!(
            decide(&ann(&[])).unwrap(),
            Decision::Plain(PlainReason::NoEnvironment)
        );
        assert_eq!(
            decide(&ann(&[
                (ENVIRONMENT, "o/e"),
                (CRI_CONTAINER_TYPE, "sandbox")
            ]))
            .unwrap(),
            Decision::Plain(PlainReason::Sandbox)
        );
        let skipped = ann(&[
            (ENVIRONMENT, "o/e"),
            (CRI_CONTAINER_TYPE, "container"),
            (CRI_CONTAINER_NAME, "sidecar"),
            (SKIP_CONTAINERS, "logger, sidecar"),
        ]);
        assert_eq!(
            decide(&skipped).unwrap(),
            Decision::Plain(PlainReason::Skipped)
        );
    }

    #[test]
    fn an_environment_container_carries_its_options() {
        let a = ann(&[
            (ENVIRONMENT, " kof/hello:2 "),
            (CRI_CONTAINER_NAME, "app"),
            (NIX_MUTABLE, "TRUE"),
            (SKIP_CONTAINERS, "sidecar"),
            (SKIP_CONTAINERS_EXEC, "app"),
            (DISABLE_METRICS, "true"),
            (ACTIVATE_MODE, "run"),
        ]);
        let Decision::Environment(r) = decide(&a).unwrap() else {
            panic!("expected an environment container");
        };
        assert_eq!(r.environment, "kof/hello:2");
        assert!(r.nix_mutable);
        assert!(r.skip_exec);
        assert_eq!(r.container_name.as_deref(), Some("app"));
    }

    #[test]
    fn malformed_annotations_are_named() {
        let e = decide(&ann(&[(ENVIRONMENT, "no-slash")])).unwrap_err();
        assert!(
            e.to_string().contains("flox.dev/environment=\"no-slash\""),
            "{e}"
        );
        let e = decide(&ann(&[(ENVIRONMENT, "o/e"), (NIX_MUTABLE, "yes")])).unwrap_err();
        assert_eq!(
            e,
            AnnotationError::NotABool {
                name: NIX_MUTABLE,
                value: "yes".into()
            }
        );
        let e = decide(&ann(&[(ENVIRONMENT, "o/e"), (ACTIVATE_MODE, "dev")])).unwrap_err();
        assert!(e.to_string().contains("\"run\" mode only"), "{e}");
    }
}
