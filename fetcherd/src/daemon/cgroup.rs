//! Leaving the starter's cgroup: the FUSE server's way to outlive the container it was started
//! in.
//!
//! Kubernetes stops a container by killing every process of its cgroup (runc freezes the cgroup
//! and signals each member; cgroup v2 writes `cgroup.kill`). The daemon runs in the DaemonSet
//! pod's container, and the FUSE server it starts would die with it, taking every flox
//! container's files away. So the FUSE server moves itself, before it starts any thread, into
//! its own cgroup (`fuse_server_cgroup`, default `kof-fuse-server`) at the root of each of the
//! host's cgroup hierarchies (v1: one per mounted controller set; v2: the unified one).
//!
//! The host's hierarchies are reached through process 1's root (`/proc/1/root`, the host's with
//! `hostPID: true`) and process 1's cgroup namespace (a container's own namespace forbids moving
//! a process out of it); where process 1's root is out of reach (not a container, or no
//! privilege to look into process 1), through this process's own mounts. A step that fails is
//! logged and the server runs on where it is: it then lives only as long as its starter, as
//! before.

use std::path::{Path, PathBuf};

/// Moves this process into cgroup `name` of every host hierarchy. Call before any thread is
/// started (joining a cgroup namespace needs a single-threaded process).
pub fn leave_for(name: &str) {
    join_host_cgroup_namespace();
    let hierarchies = match host_hierarchies() {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the host's cgroup hierarchies; the FUSE server stays in its starter's cgroup");
            return;
        }
    };
    let pid = std::process::id().to_string();
    let mut moved = Vec::new();
    for root in hierarchies {
        let dir = root.join(name);
        let result = std::fs::create_dir_all(&dir)
            .and_then(|()| inherit_cpuset(&root, &dir))
            .and_then(|()| std::fs::write(dir.join("cgroup.procs"), &pid));
        match result {
            Ok(()) => moved.push(dir),
            Err(e) => tracing::warn!(cgroup = %dir.display(), error = %e,
                "cannot move the FUSE server into its cgroup; killing its starter's cgroup would kill it"),
        }
    }
    tracing::info!(cgroups = ?moved, "the FUSE server left its starter's cgroup");
}

/// A new cgroup of v1's cpuset hierarchy starts with no CPUs and no memory nodes, and refuses
/// members until it has some: it gets its parent's (v2 needs nothing).
fn inherit_cpuset(parent: &Path, dir: &Path) -> std::io::Result<()> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let Ok(own) = std::fs::read_to_string(dir.join(file)) else {
            // Not a cpuset hierarchy.
            return Ok(());
        };
        // cgroup v2's root has no cpuset files, and an empty v2 cpuset means "the parent's".
        let Ok(theirs) = std::fs::read_to_string(parent.join(file)) else {
            return Ok(());
        };
        if own.trim().is_empty() {
            std::fs::write(dir.join(file), theirs.trim())?;
        }
    }
    Ok(())
}

/// Joins process 1's cgroup namespace, when this process is allowed to (it is in the host's
/// already, or lacks the privilege: nothing to do either way).
fn join_host_cgroup_namespace() {
    let Ok(ns) = std::fs::File::open("/proc/1/ns/cgroup") else {
        return;
    };
    if let Err(e) = nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWCGROUP) {
        tracing::debug!(error = %e, "staying in this cgroup namespace");
    }
}

/// The mount points of the host's cgroup hierarchies, one per hierarchy (a hierarchy mounted
/// twice is listed once): seen through `/proc/1/root` when it can be entered, else this
/// process's own.
fn host_hierarchies() -> std::io::Result<Vec<PathBuf>> {
    let (info, root) = match std::fs::read_dir("/proc/1/root/sys/fs/cgroup") {
        Ok(_) => ("/proc/1/mountinfo", Path::new("/proc/1/root")),
        Err(_) => ("/proc/self/mountinfo", Path::new("/")),
    };
    let info = std::fs::read_to_string(info)?;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in info.lines() {
        // `id parent major:minor root mount-point options [optional...] - fstype source super`
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = right.split(' ').next().unwrap_or("");
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        let fields: Vec<&str> = left.split(' ').collect();
        if fields.len() < 5 || fields[3] != "/" {
            // Not the hierarchy's root (a bind mount of a sub-cgroup).
            continue;
        }
        let super_opts = right.split(' ').nth(2).unwrap_or("");
        let key = format!("{fstype} {super_opts}");
        if !seen.insert(key) {
            continue;
        }
        let mount_point = fields[4].replace("\\040", " ");
        out.push(root.join(mount_point.trim_start_matches('/')));
    }
    Ok(out)
}
