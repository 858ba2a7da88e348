//! kof-harness: what kof's end-to-end tests and benchmarks need to run pods for real, with no
//! kubelet and no registry: a private containerd (+ runc) in a temporary directory
//! ([`containerd`]), of any release of the test matrix — Debian 12's 1.6.20, trixie's 1.7.24,
//! sid's 2.1.9 ([`release`], [`for_each_release!`]) —, container images written locally as OCI
//! archives ([`images`]), a CRI v1 client driving containerd's CRI plugin the way kubelet does
//! ([`cri`]) and a reader for the CRI log files containers write ([`cri_log`]).
//!
//! It is test support only, never a dependency of a node binary, and it never touches the
//! machine's own containerd: every state, root and socket directory is under its own temporary
//! directory.
//!
//! Everything needs root, Debian 12's `containerd` and `runc` (`/usr/bin/containerd`,
//! `/usr/sbin/runc`) and, for the pause image, a static busybox (Debian `busybox-static`). The
//! newer releases come from `scripts/fetch-containerd.sh` (unpacked under `target/containerd`,
//! nothing installed); they run Debian 12's runc too.
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
//!
//! ## containerd 1.7.24 and 2.1.9 facts (trixie's and sid's, with Debian 12's runc 1.1.5)
//!
//! Found with this harness (`tests/cri.rs`, `tests/containerd.rs`, run against every release).
//!
//! - **Config**: 1.7.24 reads the version 2 form exactly as 1.6 does
//!   (`plugins."io.containerd.grpc.v1.cri"` with `sandbox_image`, `restrict_oom_score_adj`,
//!   `.cni`, `.containerd.runtimes.<name>`). 2.1.9 reads `version = 3`, with CRI split in two:
//!   `plugins."io.containerd.cri.v1.images"` holds `snapshotter` and
//!   `[...images".pinned_images] sandbox = <pause image>` (no `sandbox_image`);
//!   `plugins."io.containerd.cri.v1.runtime"` holds `restrict_oom_score_adj`, `.cni`
//!   (`bin_dirs` a list, `conf_dir`) and `.containerd` (`default_runtime_name`,
//!   `.runtimes.<name>` with `runtime_type`, `runtime_path`, `pod_annotations`,
//!   `container_annotations`, `.options`). `plugins."io.containerd.grpc.v1.cri"` keeps only the
//!   streaming server. 2.1.9 enables NRI by default (socket `/var/run/nri/nri.sock`); the harness
//!   disables it (`[plugins."io.containerd.nri.v1.nri"] disable = true`). Keys as
//!   `containerd config default` of each release prints them.
//! - **Shim lookup**: every release execs `containerd-shim-<name>-v2` from its `PATH` (the
//!   release's bin dir first here, so its own `containerd-shim-runc-v2` runs, which drives
//!   `/usr/sbin/runc`).
//! - **`runtime_path` is used from 1.7 on**: with the documented `flox` entry
//!   (`runtime_type = "io.containerd.runc.v2"` + `runtime_path`), 1.7.24 and 2.1.9 start the
//!   `runtime_path` binary (a shim exiting 7 fails RunPodSandbox with `failed to start shim:
//!   start failed: : exit status 7`); 2.1.9 first runs it with `-info` alone (the runtime
//!   options on stdin; its failure does not stop containerd), then `start`.
//! - **Shim binary calls**: 1.7.24 behaves as 1.6.20: `start` per task (the container's start
//!   answers the sandbox shim's address) and `-bundle <bundle> delete` per task. **2.1.9 runs the
//!   binary for the sandbox only**: `start` and, after StopPodSandbox, `delete` with the
//!   sandbox's id; the pod's containers are created, started, exec'd and deleted through the
//!   sandbox shim's task API (ttrpc), never by running the binary. On every release the argv is
//!   `-namespace k8s.io -address <containerd's grpc socket> -publish-binary <containerd binary>
//!   -id <task id> start` (and `... -id <id> -bundle <bundle> delete`), the working directory is
//!   the task's bundle (`<state>/io.containerd.runtime.v2.task/k8s.io/<id>`), and with
//!   `runtime_type = "io.containerd.flox.v2"` stdin is empty. The environment carries
//!   `TTRPC_ADDRESS` (all releases) and, on 1.7.24 and 2.1.9, also `GRPC_ADDRESS`, `NAMESPACE`
//!   and `MAX_SHIM_VERSION=2`.
//! - **`start`'s answer**: 1.6.20's and 1.7.24's runc shims print a bare address
//!   (`unix:///run/containerd/s/<hash>`); 2.1.9's prints the JSON bootstrap
//!   `{"version":3,"address":"unix:///run/containerd/s/<hash>","protocol":"ttrpc"}`.
//! - **Annotations**: the sandbox's own bundle `config.json` has
//!   `io.kubernetes.cri.sandbox-id` (its own id), `container-type = sandbox` and
//!   `sandbox-log-directory` on all three releases; 2.1.9 adds
//!   `io.kubernetes.cri.podsandbox.image-name` (the pause image). A container's annotations are
//!   the same on all three, except `io.kubernetes.cri.image-name`: normalized by 1.6.20 and
//!   1.7.24 (`docker.io/flox/empty:1.0.0`), **as the pod wrote it by 2.1.9** (`flox/empty:1.0.0`).
//!   On 2.1.9 the container's bundle (`<state>/io.containerd.runtime.v2.task/k8s.io/<id>`, with
//!   `config.json`) exists too, written for the sandbox's shim.

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
