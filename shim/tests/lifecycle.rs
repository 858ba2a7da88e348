//! The shim's lifecycle on a real containerd: release at delete, cleanup after a killed shim,
//! a daemon restart under a running container, the sweep of a container whose delete never
//! came, and many create/delete cycles leaving nothing behind.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{empty_rootfs, text, Node, NodeOptions};
use kof_shim::container::{ContainerDir, ContainerRecord};

const ENV: &str = "flox.dev/environment";

/// Waits until `cond` holds, or panics with `what` after a minute.
fn wait_for(node: &Node, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what} did not happen\n{}",
            node.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ctr(node: &Node, args: &[&str]) -> std::process::Output {
    node.ctrd()
        .ctr(&node.ns)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Starts a detached environment container running `cmd`.
fn run_detached(node: &Node, id: &str, cmd: &[&str]) {
    let rootfs = empty_rootfs(node.dir());
    let mut args = vec![
        "run",
        "-d",
        "--runtime",
        "io.containerd.flox.v2",
        "--annotation",
    ];
    let ann = format!("{ENV}=kof/hello");
    args.push(&ann);
    args.push("--rootfs");
    let r = rootfs.display().to_string();
    args.push(&r);
    args.push(id);
    args.extend_from_slice(cmd);
    let out = ctr(node, &args);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        node.logs()
    );
}

#[test]
fn many_create_delete_cycles_leave_no_mounts_leases_or_directories() {
    let node = Node::new(NodeOptions::default());
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
    let out = ctr(&node, &["containers", "ls", "-q"]);
    assert_eq!(text(&out.stdout).trim(), "");
    wait_for(&node, "every shim exiting", || {
        node.ctrd().shim_pids().is_empty()
    });
}

#[test]
fn a_killed_shim_is_cleaned_up_by_the_delete_containerd_runs() {
    let node = Node::new(NodeOptions::default());
    run_detached(&node, "victim", &["sleep", "600"]);
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
    wait_for(&node, "the lease's release", || node.leases().is_empty());
    let _ = ctr(&node, &["tasks", "delete", "-f", "victim"]);
    let out = ctr(&node, &["containers", "delete", "victim"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    node.assert_no_leftovers();
}

#[test]
fn a_running_container_survives_a_daemon_restart_and_is_released_after() {
    let mut node = Node::new(NodeOptions::default());
    run_detached(
        &node,
        "steady",
        &[
            "sh",
            "-c",
            "while true; do ls /nix/store > /dev/null; sleep 0.05; done",
        ],
    );
    node.kill_daemon();
    node.start_daemon();
    // The container still reads its environment through the re-adopted view.
    let out = ctr(
        &node,
        &[
            "tasks",
            "exec",
            "--exec-id",
            "probe",
            "steady",
            "/bin/sh",
            "-c",
            "ls /nix/store | wc -l",
        ],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        node.logs()
    );
    assert!(text(&out.stdout).trim().parse::<u32>().unwrap() > 1);
    assert_eq!(node.leases().len(), 1);
    let out = ctr(&node, &["tasks", "kill", "-s", "SIGKILL", "steady"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_for(&node, "the task to stop", || {
        text(&ctr(&node, &["tasks", "ls"]).stdout).contains("STOPPED")
    });
    let out = ctr(&node, &["tasks", "delete", "steady"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = ctr(&node, &["containers", "delete", "steady"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_for(&node, "the lease's release", || node.leases().is_empty());
    node.assert_no_leftovers();
}

#[test]
fn a_container_whose_delete_never_came_is_swept_by_the_next_start() {
    let node = Node::new(NodeOptions::default());
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
