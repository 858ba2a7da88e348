//! The shim's lifecycle on a real containerd: release at delete, cleanup after a killed shim,
//! a daemon restart under a running container, the sweep of a container whose delete never
//! came, and many create/delete cycles leaving nothing behind.

mod common;

use common::{empty_rootfs, text, Node, NodeOptions, Release};
use kof_shim::container::{ContainerDir, ContainerRecord};

kof_harness::for_each_release!(
    many_create_delete_cycles_leave_no_mounts_leases_or_directories,
    a_killed_shim_is_cleaned_up_by_the_delete_containerd_runs,
    a_killed_proxy_takes_its_runc_shim_and_container_with_it,
    a_running_container_survives_a_daemon_restart_and_is_released_after,
    a_container_whose_delete_never_came_is_swept_by_the_next_start,
);

const ENV: &str = "flox.dev/environment";

fn many_create_delete_cycles_leave_no_mounts_leases_or_directories(release: Release) {
    let node = Node::new(NodeOptions::on(release));
    let rootfs = empty_rootfs(node.dir());
    const WORKERS: usize = 4;
    const CYCLES: usize = 500;
    std::thread::scope(|s| {
        for w in 0..WORKERS {
            let (node, rootfs) = (&node, &rootfs);
            s.spawn(move || {
                for i in (w..CYCLES).step_by(WORKERS) {
                    let out = node.ctr_run(
                        &format!("cycle-{i}"),
                        rootfs,
                        &[(ENV, "kof/hello")],
                        &["true"],
                    );
                    assert!(
                        out.status.success(),
                        "cycle {i}: {}\n{}",
                        text(&out.stderr),
                        node.logs()
                    );
                }
            });
        }
    });
    node.assert_no_leftovers();
    // Nothing left by containerd either: no container, no shim.
    let out = node.ctr(&["containers", "ls", "-q"]);
    assert_eq!(text(&out.stdout).trim(), "");
    node.wait_for("every shim exiting", || node.ctrd().shim_pids().is_empty());
}

fn a_killed_shim_is_cleaned_up_by_the_delete_containerd_runs(release: Release) {
    let node = Node::new(NodeOptions::on(release));
    node.run_detached("victim", "kof/hello", &["sleep", "600"]);
    assert_eq!(node.leases().len(), 1);
    let pids = node.ctrd().shim_pids();
    assert!(!pids.is_empty());
    for p in pids {
        // SAFETY: kill(2) of a shim process this test's containerd started.
        unsafe {
            libc::kill(p, libc::SIGKILL);
        }
    }
    // containerd sees the shim's connection close and runs `<shim> delete`.
    node.wait_for("the lease's release", || node.leases().is_empty());
    let _ = node.ctr(&["tasks", "delete", "-f", "victim"]);
    let out = node.ctr(&["containers", "delete", "victim"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    node.assert_no_leftovers();
}

/// Only kof's proxy dies (the runc shim behind it lives): containerd sees its shim gone and
/// runs `delete`; the lease is released, and nothing of the pod is left running.
fn a_killed_proxy_takes_its_runc_shim_and_container_with_it(release: Release) {
    let node = Node::new(NodeOptions::on(release));
    node.run_detached("orphan", "kof/hello", &["sleep", "600"]);
    assert_eq!(node.leases().len(), 1);
    let exe = |pid: i32| {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let proxies: Vec<i32> = node
        .ctrd()
        .shim_pids()
        .into_iter()
        .filter(|p| exe(*p) == "containerd-shim-flox-v2")
        .collect();
    assert_eq!(proxies.len(), 1, "{}", node.logs());
    // SAFETY: kill(2) of the proxy this test's containerd started.
    unsafe {
        libc::kill(proxies[0], libc::SIGKILL);
    }
    node.wait_for("the lease's release", || node.leases().is_empty());
    node.wait_for("the runc shim's exit", || {
        node.ctrd().shim_pids().is_empty()
    });
    assert!(
        node.logs()
            .contains("container ended through the runc shim of a dead proxy"),
        "{}",
        node.logs()
    );
    let _ = node.ctr(&["tasks", "delete", "-f", "orphan"]);
    let out = node.ctr(&["containers", "delete", "orphan"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    node.assert_no_leftovers();
}

fn a_running_container_survives_a_daemon_restart_and_is_released_after(release: Release) {
    let mut node = Node::new(NodeOptions::on(release));
    node.run_detached(
        "steady",
        "kof/hello",
        &[
            "sh",
            "-c",
            "while true; do ls /nix/store > /dev/null; sleep 0.05; done",
        ],
    );
    node.kill_daemon();
    node.start_daemon();
    // The container still reads its environment through the re-adopted view.
    let out = node.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "probe",
        "steady",
        "/bin/sh",
        "-c",
        "ls /nix/store | wc -l",
    ]);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        node.logs()
    );
    assert!(text(&out.stdout).trim().parse::<u32>().unwrap() > 1);
    assert_eq!(node.leases().len(), 1);
    let out = node.ctr(&["tasks", "kill", "-s", "SIGKILL", "steady"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    node.wait_for("the task to stop", || {
        text(&node.ctr(&["tasks", "ls"]).stdout).contains("STOPPED")
    });
    let out = node.ctr(&["tasks", "delete", "steady"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = node.ctr(&["containers", "delete", "steady"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    node.wait_for("the lease's release", || node.leases().is_empty());
    node.assert_no_leftovers();
}

fn a_container_whose_delete_never_came_is_swept_by_the_next_start(release: Release) {
    let node = Node::new(NodeOptions::on(release));
    // A container as a start leaves it when containerd and the node go down before its delete:
    // a lease, an overlay over its view, a record naming a bundle that is gone.
    let lease = format!("{}.ghost", node.ns);
    let prepared = node.client().prepare("kof/hello", &lease, None).unwrap();
    let cdir = ContainerDir::new(&node.containers_dir(), &node.ns, "ghost").unwrap();
    let lock = cdir
        .create(&ContainerRecord {
            namespace: node.ns.clone(),
            id: "ghost".into(),
            bundle: node.dir().join("gone-bundle"),
            lease,
            environment: "kof/hello".into(),
            created_at: 0,
            exec: None,
        })
        .unwrap();
    cdir.mount_root(&prepared.view_root).unwrap();
    drop(lock);
    assert!(cdir.rootfs().join("nix/store").is_dir());

    let rootfs = empty_rootfs(node.dir());
    let out = node.ctr_run("next", &rootfs, &[(ENV, "kof/hello")], &["true"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!cdir.path().exists(), "the ghost's directory is swept");
    node.assert_no_leftovers();
}
