//! kof-harness: what kof's end-to-end tests and benchmarks need to run pods for real, with no
//! kubelet and no registry: a private containerd 1.6 (+ runc) in a temporary directory
//! ([`containerd`]), container images written locally as OCI archives ([`images`]), a CRI v1
//! client driving containerd's CRI plugin the way kubelet does ([`cri`]) and a reader for the
//! CRI log files containers write ([`cri_log`]).
//!
//! It is test support only, never a dependency of a node binary, and it never touches the
//! machine's own containerd: every state, root and socket directory is under its own temporary
//! directory.
//!
//! Everything needs root, `containerd`, `ctr` and `runc` on `PATH` (Debian `containerd`, `runc`)
//! and, for the pause image, a static busybox (Debian `busybox-static`).
//!
//! ```no_run
//! use kof_harness::{containerd::*, cri::*, images};
//! let ctrd = Containerd::start(ContainerdOptions::default())?;
//! let dir = ctrd.dir().join("images");
//! std::fs::create_dir_all(&dir)?;
//! images::write_pause_image(&dir.join("pause.tar"), DEFAULT_SANDBOX_IMAGE)?;
//! ctrd.import_image(CRI_NAMESPACE, &dir.join("pause.tar"))?;
//! let cri = CriClient::connect(ctrd.socket())?;
//! let pod = PodSpec::new("demo", &ctrd.dir().join("logs/demo"));
//! let sandbox = cri.run_pod_sandbox(&pod)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## containerd 1.6.20 facts found with this harness (see `tests/cri.rs`)
//!
//! - **Image name**: CRI puts `io.kubernetes.cri.image-name` into each container's OCI
//!   annotations (`<state>/io.containerd.runtime.v2.task/k8s.io/<id>/config.json`), normalized
//!   (a pod's `flox/empty:1.0.0` arrives as `docker.io/flox/empty:1.0.0`), next to
//!   `io.kubernetes.cri.{container-type,container-name,sandbox-id,sandbox-name,sandbox-namespace,
//!   sandbox-uid}` and the `flox.dev/*` pod and container annotations `pod_annotations` /
//!   `container_annotations` let through (others are dropped). The bundle, and so `config.json`,
//!   exists only from StartContainer on.
//! - **`runtime_path` is ignored by CRI**: with the configuration Flox documents
//!   (`runtime_type = "io.containerd.runc.v2"` + `runtime_path`), containerd 1.6.20 starts
//!   `containerd-shim-runc-v2`, never the given binary (a shim that exits 7 at once does not stop
//!   a `flox` pod). `ctr run --runtime /abs/path` does use a path. To run the flox shim under
//!   CRI here, set [`containerd::ContainerdOptions::flox_runtime_type`] to
//!   `io.containerd.flox.v2` (found on `PATH`); CRI then passes no runc options (no
//!   `SystemdCgroup`), as it encodes other types' options in a form the runc shim refuses.
//! - **Shim binary calls**: per task, containerd execs the shim binary with `start` (a pod's
//!   container gets its own `start`, whose runc shim joins the sandbox's shim) and, when that
//!   task's shim connection closes, `-id <id> -bundle <bundle> delete` ("cleaning up dead
//!   shim") — on clean stops too: after StopContainer (the container's task is deleted on exit)
//!   and after StopPodSandbox. `ctr run --rm` likewise ends with a `delete`.

#![deny(missing_docs)]

pub mod containerd;
pub mod cri;
pub mod cri_log;
pub mod images;
pub mod release;

/// The CRI v1 API (`runtime.v1`), generated in build.rs from the vendored `proto/api.proto`.
#[allow(clippy::all, missing_docs)]
pub mod cri_api {
    tonic::include_proto!("runtime.v1");
}
