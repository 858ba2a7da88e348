//! The two moments the shim binary acts: a container's `start` and its `delete`.
//!
//! **start** (cwd: the bundle; containerd has written `config.json`): containers without an
//! environment, pod sandboxes and skipped containers are left alone. For an environment
//! container the shim asks kof-fetcherd to `prepare` a lease (named after the container) of the
//! environment, which resolves the live generation now and pins it for the lease's life; makes
//! the root ([`RootMode`]); rewrites the process to run activated; and writes `config.json`
//! back. Then the runc shim takes over, and neither it nor runc knows kof was there. A failure
//! anywhere undoes what was done (mounts, lease, directory) and is reported to containerd as the
//! start's error.
//!
//! **delete** (containerd runs it when a container's shim connection closes, which is after
//! the container is deleted, or after a shim died): unmount, release the lease, remove the
//! container's directory. Both moments also [`sweep`]: a record whose bundle is gone belongs to
//! a container whose `delete` never came (containerd or the node crashed), and is cleaned up.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kof_node_api::api::{Client, Prepared};
use kof_node_api::config::Config;
use kof_node_api::report::chain;
use tracing::{info, warn};

use crate::annotations::{
    decide, Decision, EnvironmentRequest, PlainReason, CRI_SANDBOX_ID, ENVIRONMENT,
};
use crate::container::{ContainerDir, ContainerRecord, RootMode, NEW_PREFIX};
use crate::error::ShimError;
use crate::exec::{activated, ExecProfile};
use crate::spec::{BindMount, Spec};
use crate::token::{read_token, token_file};

/// Longest a `prepare` may take (resolution, closure walk; no file contents are fetched). A
/// FloxHub or cache that is down fails well before this; the bound is for one that stalls.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(120);

/// Longest a `release` may take.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);

/// `/nix/store` inside the container.
const STORE_DEST: &str = "/nix/store";

/// What `start` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    /// The container runs as plain runc would run it.
    Plain(PlainReason),
    /// The sandbox of a flox pod: it runs as plain runc would run it, and its pod's live
    /// generation is to be resolved now ([`pod_starting`]).
    PodSandbox {
        /// The pod's environment reference, as annotated.
        env: String,
        /// The pod (its CRI sandbox id).
        pod: String,
    },
    /// The container runs in an environment.
    Environment {
        /// The lease holding its view.
        lease: String,
        /// `owner/name`.
        env: String,
        /// The generation it got.
        generation: u64,
        /// How its root was made.
        mode: RootMode,
    },
}

/// The lease id of container `id` in `namespace`: `<namespace>.<id>`, or a digest of it when
/// that is longer than a lease id may be.
pub fn lease_id(namespace: &str, id: &str) -> String {
    let plain = format!("{namespace}.{id}");
    if plain.len() <= 128 {
        plain
    } else {
        let h = blake3::hash(plain.as_bytes()).to_hex();
        format!("c-{}", &h[..64])
    }
}

/// Whether the image at `root` is a placeholder whose root the view replaces.
///
/// CRI (containerd 1.7 and later) names the image in `io.kubernetes.cri.image-name`; it is a
/// placeholder when its repository is one of `dummy_images`. Without the name (containerd 1.6,
/// `ctr`), the root directory decides when it is already there (`ctr run --rootfs`): a real
/// image has `bin`, `usr`, `lib` or `etc`. A root not yet mounted (1.6's CRI mounts it after
/// `start`) counts as the placeholder, the way Flox's pods are written.
pub fn root_mode(cfg: &Config, req: &EnvironmentRequest, root: Option<&Path>) -> RootMode {
    if let Some(image) = &req.image_name {
        let repo = image_repository(image);
        return if cfg.dummy_images.iter().any(|d| image_repository(d) == repo) {
            RootMode::View
        } else {
            RootMode::Image
        };
    }
    let real = root
        .map(|r| {
            ["bin", "usr", "lib", "etc"]
                .iter()
                .any(|d| r.join(d).exists())
        })
        .unwrap_or(false);
    if real {
        RootMode::Image
    } else {
        RootMode::View
    }
}

/// `docker.io/flox/empty` for `flox/empty:1.0.0`, `docker.io/flox/empty@sha256:...`,
/// `docker.io/flox/empty`.
fn image_repository(image: &str) -> String {
    let no_digest = image.split('@').next().unwrap_or(image);
    // A tag is a ':' after the last '/' (a ':' before it is a registry port).
    let no_tag = match no_digest.rfind(':') {
        Some(c) if !no_digest[c..].contains('/') => &no_digest[..c],
        _ => no_digest,
    };
    let first = no_tag.split('/').next().unwrap_or("");
    let has_registry = no_tag.contains('/')
        && (first.contains('.') || first.contains(':') || first == "localhost");
    match (has_registry, no_tag.contains('/')) {
        (true, _) => no_tag.to_string(),
        (false, true) => format!("docker.io/{no_tag}"),
        (false, false) => format!("docker.io/library/{no_tag}"),
    }
}

/// Handles `start` for the container `namespace`/`id` whose bundle is `bundle`.
pub fn start(cfg: &Config, namespace: &str, id: &str, bundle: &Path) -> Result<Started, ShimError> {
    sweep(cfg);
    let mut spec = Spec::read(bundle)?;
    let annotations = spec.annotations();
    let pod = annotations.get(CRI_SANDBOX_ID).map(String::as_str);
    let req = match decide(&annotations)? {
        Decision::Plain(reason) => {
            info!(namespace, id, ?reason, "container runs unmodified");
            return Ok(match (reason, annotations.get(ENVIRONMENT), pod) {
                (PlainReason::Sandbox, Some(env), Some(pod)) => Started::PodSandbox {
                    env: env.trim().to_string(),
                    pod: pod.to_string(),
                },
                _ => Started::Plain(reason),
            });
        }
        Decision::Environment(req) => req,
    };
    let env = req.environment.clone();
    let cdir = ContainerDir::new(&cfg.containers_dir, namespace, id)
        .map_err(ShimError::container(&env))?;
    // A directory of the same container left by a start that never got its delete.
    cleanup(cfg, &cdir)?;
    let lease = lease_id(namespace, id);
    let record = ContainerRecord {
        namespace: namespace.to_string(),
        id: id.to_string(),
        bundle: bundle.to_path_buf(),
        lease: lease.clone(),
        environment: env.clone(),
        created_at: unix_now(),
        exec: None,
    };
    let lock = cdir.create(&record).map_err(ShimError::container(&env))?;
    let result = (|| {
        let prepared = prepare(cfg, &spec, &req, &lease, pod)?;
        let mode = root_mode(cfg, &req, spec.root_dir().as_deref());
        rewrite(&mut spec, &cdir, &prepared, &req, mode)?;
        spec.write()?;
        let record = ContainerRecord {
            exec: Some(ExecProfile {
                activation: prepared.activation.clone(),
                skip: req.skip_exec,
            }),
            ..record
        };
        cdir.write_record(&record)
            .map_err(ShimError::container(&env))?;
        Ok(Started::Environment {
            lease: lease.clone(),
            env: prepared.env.clone(),
            generation: prepared.generation,
            mode,
        })
    })();
    drop(lock);
    match result {
        Ok(s) => {
            info!(namespace, id, ?s, "container prepared");
            Ok(s)
        }
        Err(e) => {
            warn!(namespace, id, error = %chain(&e), "container start failed; undoing");
            if let Err(c) = cleanup(cfg, &cdir) {
                warn!(namespace, id, error = %chain(&c), "cleanup after a failed start");
            }
            Err(e)
        }
    }
}

/// Prepares `lease` of the container's environment; `pod` is its CRI sandbox id, when it has
/// one (the pod's resolution of a live generation is then used).
fn prepare(
    cfg: &Config,
    spec: &Spec,
    req: &EnvironmentRequest,
    lease: &str,
    pod: Option<&str>,
) -> Result<Prepared, ShimError> {
    let env = &req.environment;
    let token = match token_file(spec) {
        Some(path) => read_token(&path).map_err(|source| ShimError::Token {
            env: env.clone(),
            source,
        })?,
        None => None,
    };
    let prep_err = |source| ShimError::Prepare {
        env: env.clone(),
        source,
    };
    let mut client = Client::connect(&cfg.socket)
        .map_err(prep_err)?
        .with_timeout(PREPARE_TIMEOUT);
    client
        .prepare_in_pod(env, lease, token.as_deref(), pod)
        .map_err(prep_err)
}

/// Tells kof-fetcherd that pod `pod` of `env` is starting, so that it resolves the live
/// generation once for the pod while the sandbox starts, and the pod's containers start
/// without a FloxHub round trip of their own. Best effort: a failure only means the
/// containers resolve by themselves.
pub fn pod_starting(cfg: &Config, env: &str, pod: &str) {
    let answer = Client::connect(&cfg.socket)
        .and_then(|c| c.with_timeout(PREPARE_TIMEOUT).pod_starting(env, pod, None));
    match answer {
        Ok(r) => info!(
            pod,
            env,
            generation = r.generation,
            "resolved for the starting pod"
        ),
        Err(e) => {
            info!(pod, env, error = %chain(&e), "not resolved for the starting pod; its containers resolve by themselves")
        }
    }
}

/// Makes the root and the process of `spec` those of the environment.
fn rewrite(
    spec: &mut Spec,
    cdir: &ContainerDir,
    prepared: &Prepared,
    req: &EnvironmentRequest,
    mode: RootMode,
) -> Result<(), ShimError> {
    let view_store = prepared.view_root.join("nix/store");
    match mode {
        RootMode::View => {
            cdir.mount_root(&prepared.view_root)
                .map_err(ShimError::container(&req.environment))?;
            spec.set_root_path(&cdir.rootfs());
            if !req.nix_mutable {
                spec.add_bind_mount(&BindMount {
                    source: view_store,
                    destination: STORE_DEST.into(),
                    readonly: true,
                });
            }
        }
        RootMode::Image => {
            let source = if req.nix_mutable {
                cdir.mount_store(&view_store)
                    .map_err(ShimError::container(&req.environment))?;
                cdir.store()
            } else {
                view_store
            };
            spec.add_bind_mount(&BindMount {
                source,
                destination: STORE_DEST.into(),
                readonly: !req.nix_mutable,
            });
        }
    }
    let act = activated(&prepared.activation, &spec.args()?, &spec.env()?)?;
    spec.set_process(&act.argv, &act.env);
    Ok(())
}

/// How execs into container `namespace`/`id` run: `None` for a container kof did not set up.
pub fn exec_profile(
    cfg: &Config,
    namespace: &str,
    id: &str,
) -> Result<Option<ExecProfile>, ShimError> {
    let cdir = ContainerDir::new(&cfg.containers_dir, namespace, id)?;
    Ok(cdir.record()?.and_then(|r| r.exec))
}

/// Handles `delete` for container `namespace`/`id`: undoes its start, if it had one.
pub fn delete(cfg: &Config, namespace: &str, id: &str) -> Result<bool, ShimError> {
    let cdir = ContainerDir::new(&cfg.containers_dir, namespace, id)?;
    let done = cleanup(cfg, &cdir)?;
    sweep(cfg);
    Ok(done)
}

/// Unmounts, releases the lease and removes the directory of `cdir`, under its lock.
/// `Ok(false)` when there was nothing to clean up. When the daemon cannot be reached the
/// mounts are gone but the record stays, for a later sweep to release the lease.
fn cleanup(cfg: &Config, cdir: &ContainerDir) -> Result<bool, ShimError> {
    let Some(_lock) = cdir.lock()? else {
        return Ok(false);
    };
    let record = match cdir.record() {
        Ok(r) => r,
        Err(e) => {
            warn!(dir = %cdir.path().display(), error = %chain(&e), "unreadable container record; removing the directory");
            None
        }
    };
    // Unmount before releasing: the overlay's lower is the lease's view.
    cdir.unmount()?;
    if let Some(rec) = &record {
        let release_err = |source| ShimError::Release {
            lease: rec.lease.clone(),
            source,
        };
        let released = Client::connect(&cfg.socket)
            .map_err(release_err)
            .and_then(|c| {
                c.with_timeout(RELEASE_TIMEOUT)
                    .release(&rec.lease)
                    .map_err(release_err)
            });
        match released {
            Ok(r) => info!(lease = %rec.lease, released = r.released, "lease released"),
            Err(e) => {
                warn!(lease = %rec.lease, error = %chain(&e), "lease not released; a later sweep retries");
                return Err(e);
            }
        }
    }
    cdir.remove()?;
    Ok(record.is_some())
}

/// A container directory without a record (a start killed while making it) is removed once
/// it is this old.
const ORPHAN_AGE: Duration = Duration::from_secs(3600);

fn older_than(path: &Path, age: Duration) -> bool {
    std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map(|e| e > age)
        .unwrap_or(false)
}

/// Cleans up every container directory whose bundle is gone: containers whose `delete` never
/// came. Failures are logged; the next sweep retries them.
pub fn sweep(cfg: &Config) -> Vec<PathBuf> {
    let mut cleaned = Vec::new();
    let Ok(namespaces) = std::fs::read_dir(&cfg.containers_dir) else {
        return cleaned;
    };
    for ns in namespaces.flatten() {
        let Ok(containers) = std::fs::read_dir(ns.path()) else {
            continue;
        };
        for c in containers.flatten() {
            let path = c.path();
            if c.file_name().to_string_lossy().starts_with(NEW_PREFIX) {
                if older_than(&path, ORPHAN_AGE) {
                    let _ = std::fs::remove_dir_all(&path);
                }
                continue;
            }
            let cdir = ContainerDir::at(path.clone());
            let stale = match cdir.record() {
                Ok(Some(rec)) => !rec.bundle.join(crate::spec::CONFIG_JSON).exists(),
                Ok(None) | Err(_) => older_than(&path, ORPHAN_AGE),
            };
            if !stale {
                continue;
            }
            match cleanup(cfg, &cdir) {
                Ok(_) => cleaned.push(path),
                Err(e) => {
                    warn!(dir = %path.display(), error = %chain(&e), "sweep could not clean up")
                }
            }
        }
    }
    if !cleaned.is_empty() {
        info!(
            count = cleaned.len(),
            "swept containers whose delete never came"
        );
    }
    cleaned
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ids_fit_the_daemons_rule() {
        assert_eq!(lease_id("k8s.io", "abc"), "k8s.io.abc");
        let long = lease_id("k8s.io", &"a".repeat(200));
        assert!(long.len() <= 128 && long.starts_with("c-"), "{long}");
        kof_node_api::lease::check_lease_id(&long).unwrap();
        kof_node_api::lease::check_lease_id(&lease_id("default", "t-1_2")).unwrap();
    }

    #[test]
    fn image_names_are_compared_by_repository() {
        assert_eq!(image_repository("flox/empty:1.0.0"), "docker.io/flox/empty");
        assert_eq!(
            image_repository("docker.io/flox/empty@sha256:abcd"),
            "docker.io/flox/empty"
        );
        assert_eq!(image_repository("busybox"), "docker.io/library/busybox");
        assert_eq!(
            image_repository("localhost:5000/x/y:2"),
            "localhost:5000/x/y"
        );
        let cfg = Config::default();
        let mut req = EnvironmentRequest {
            environment: "o/e".into(),
            nix_mutable: false,
            skip_exec: false,
            container_name: None,
            image_name: Some("docker.io/flox/empty:1.0.0".into()),
        };
        assert_eq!(root_mode(&cfg, &req, None), RootMode::View);
        req.image_name = Some("docker.io/library/python:3.12".into());
        assert_eq!(root_mode(&cfg, &req, None), RootMode::Image);
        req.image_name = None;
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(root_mode(&cfg, &req, Some(dir.path())), RootMode::View);
        std::fs::create_dir(dir.path().join("usr")).unwrap();
        assert_eq!(root_mode(&cfg, &req, Some(dir.path())), RootMode::Image);
    }
}
