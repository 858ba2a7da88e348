//! kof-harness: what kof's end-to-end tests and benchmarks need to run pods for real, with no
//! kubelet and no registry: a private containerd 1.6 (+ runc) in a temporary directory
//! ([`containerd`]), container images written locally as OCI archives ([`images`]), a CRI v1
//! client driving containerd's CRI plugin the way kubelet does ([`cri`]) and a reader for the
//! CRI log files containers write ([`cri_log`]).
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
//! FACTS_PLACEHOLDER

pub mod containerd;
pub mod cri;
pub mod cri_log;
pub mod images;

/// The CRI v1 API (`runtime.v1`), generated in build.rs from the vendored `proto/api.proto`.
#[allow(clippy::all, missing_docs)]
pub mod cri_api {
    tonic::include_proto!("runtime.v1");
}
