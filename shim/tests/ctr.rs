//! The shim driven the way `ctr run --runtime io.containerd.flox.v2` drives it: a real
//! containerd and runc, the real kof-fetcherd and its FUSE server, the fixture FloxHub and
//! caches over HTTP on loopback.

mod common;

use common::{empty_rootfs, text, Node, NodeOptions, Release};
use kof_testkit::busybox_rootfs;

kof_harness::for_each_release!(
    a_container_runs_activated_in_its_environment,
    generations_pin_and_a_new_live_generation_reaches_the_next_container,
    nix_mutable_makes_the_store_writable_for_that_container_only,
    a_real_image_keeps_its_root_and_gets_the_environment_on_top,
    containers_without_the_annotation_run_as_plain_runc,
    a_failing_environment_fails_the_start_with_its_name_and_cause,
    an_exec_runs_activated_in_its_containers_environment,
);

const ENV: &str = "flox.dev/environment";

fn flox_env_of(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("FLOX_ENV="))
        .unwrap_or_else(|| panic!("no FLOX_ENV= line in {out:?}"))
        .to_string()
}

fn a_container_runs_activated_in_its_environment(release: Release) {
    let node = Node::new(NodeOptions::on(release));
    let rootfs = empty_rootfs(node.dir());
    let out = node.ctr_run(
        "py1",
        &rootfs,
        &[(ENV, "kof/python")],
        &[
            "sh",
            "-c",
            "echo \"FLOX_ENV=$FLOX_ENV\"; echo \"vars=$KOF_GREETING|$KOF_HOOK_RAN|$PYTHONDONTWRITEBYTECODE\"; \
             python3 -c 'print(6*7)'; \
             touch /nix/store/x 2>/dev/null && echo store-writable || echo store-readonly; \
             echo written > /root-file && cat /root-file; exit 7",
        ],
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{stdout}\n{stderr}\n{}",
        node.logs()
    );
    assert!(
        flox_env_of(&stdout).contains("-flox-env-python"),
        "{stdout}"
    );
    assert!(
        stdout.contains("vars=hello from kof/python|1|1"),
        "the lockfile's vars and hook: {stdout}"
    );
    assert!(stdout.contains("\n42\n"), "{stdout}");
    assert!(stdout.contains("store-readonly"), "{stdout}");
    assert!(stdout.contains("written"), "the root is writable: {stdout}");
    // The hook's output goes to stderr, as in Flox.
    assert!(stderr.contains("python env activated"), "{stderr}");
    node.assert_no_leftovers();
}

fn generations_pin_and_a_new_live_generation_reaches_the_next_container(release: Release) {
    let node = Node::new(NodeOptions::on(release));
    let rootfs = empty_rootfs(node.dir());
    let run = |id: &str, env: &str| {
        let out = node.ctr_run(
            id,
            &rootfs,
            &[(ENV, env)],
            &["sh", "-c", "echo FLOX_ENV=$FLOX_ENV; jq --version"],
        );
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    // kof/rollback: generation 2 is live (bash, coreutils); 3 adds jq.
    let (code, live2, err) = run("rb1", "kof/rollback");
    assert_eq!(
        code,
        Some(127),
        "jq is not in the live generation: {live2} {err}"
    );
    let (code, pinned3, err) = run("rb2", "kof/rollback:3");
    assert_eq!(code, Some(0), "{pinned3} {err}\n{}", node.logs());
    assert!(pinned3.contains("jq-"), "{pinned3}");
    assert_ne!(flox_env_of(&live2), flox_env_of(&pinned3));

    // A new live generation, with nothing restarted: the next container gets it.
    node.set_live_generation("kof", "rollback", 3);
    let (code, live3, err) = run("rb3", "kof/rollback");
    assert_eq!(code, Some(0), "{live3} {err}\n{}", node.logs());
    assert_eq!(flox_env_of(&live3), flox_env_of(&pinned3));
    node.assert_no_leftovers();
}

fn nix_mutable_makes_the_store_writable_for_that_container_only(release: Release) {
    let node = Node::new(NodeOptions::on(release));
    let rootfs = empty_rootfs(node.dir());
    let probe =
        "touch /nix/store/kof-probe 2>/dev/null && echo store-writable || echo store-readonly; \
                 ls /nix/store/kof-probe 2>/dev/null || echo no-probe";
    let out = node.ctr_run(
        "m1",
        &rootfs,
        &[(ENV, "kof/hello"), ("flox.dev/nix-mutable", "true")],
        &["sh", "-c", probe],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", text(&out.stderr));
    assert!(stdout.contains("store-writable"), "{stdout}");
    assert!(stdout.contains("/nix/store/kof-probe"), "{stdout}");
    // The next container sees the environment as it is, read-only.
    let out = node.ctr_run("m2", &rootfs, &[(ENV, "kof/hello")], &["sh", "-c", probe]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("store-readonly"), "{stdout}");
    assert!(stdout.contains("no-probe"), "{stdout}");
    node.assert_no_leftovers();
}

fn a_real_image_keeps_its_root_and_gets_the_environment_on_top(release: Release) {
    let node = Node::new(NodeOptions::on(release));
    let rootfs = busybox_rootfs(node.dir());
    let out = node.ctr_run(
        "img1",
        &rootfs,
        &[(ENV, "kof/hello")],
        &[
            "/bin/sh",
            "-c",
            "cat /etc/image-marker; echo FLOX_ENV=$FLOX_ENV; test -x $FLOX_ENV/bin/bash && echo has-bash; \
             bash -c 'echo bash-from-env'",
        ],
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}\n{}",
        text(&out.stderr),
        node.logs()
    );
    assert!(stdout.contains("from the image"), "{stdout}");
    assert!(flox_env_of(&stdout).contains("-flox-env-hello"), "{stdout}");
    assert!(stdout.contains("has-bash"), "{stdout}");
    assert!(stdout.contains("bash-from-env"), "{stdout}");
    node.assert_no_leftovers();
}

fn containers_without_the_annotation_run_as_plain_runc(release: Release) {
    let node = Node::new(NodeOptions::on(release));
    let rootfs = busybox_rootfs(node.dir());
    let out = node.ctr_run(
        "plain1",
        &rootfs,
        &[],
        &[
            "/bin/sh",
            "-c",
            "cat /etc/image-marker; echo FLOX_ENV=[$FLOX_ENV]; ls /nix 2>&1 | head -1",
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", text(&out.stderr));
    assert!(stdout.contains("from the image"), "{stdout}");
    assert!(stdout.contains("FLOX_ENV=[]"), "{stdout}");
    assert!(stdout.contains("No such file"), "no /nix: {stdout}");
    assert!(node.leases().is_empty());
    node.assert_no_leftovers();
}

fn a_failing_environment_fails_the_start_with_its_name_and_cause(release: Release) {
    let node = Node::new(NodeOptions::on(release));
    let rootfs = empty_rootfs(node.dir());
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case; 4] = [
        ("kof/nope", &[], &["environment kof/nope", "not found"]),
        (
            "kof/hello:9",
            &[],
            &["environment kof/hello:9", "generation 9 does not exist"],
        ),
        ("not-a-ref", &[], &["flox.dev/environment=\"not-a-ref\""]),
        (
            "kof/hello",
            &[("flox.dev/nix-mutable", "maybe")],
            &[
                "flox.dev/nix-mutable=\"maybe\"",
                "expected \"true\" or \"false\"",
            ],
        ),
    ];
    for (i, (env, extra, want)) in cases.iter().enumerate() {
        let mut ann = vec![(ENV, *env)];
        ann.extend_from_slice(extra);
        let out = node.ctr_run(&format!("bad{i}"), &rootfs, &ann, &["true"]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{env}: started");
        for w in *want {
            assert!(stderr.contains(w), "{env}: {w:?} not in {stderr:?}");
        }
    }
    // FloxHub down: the daemon cannot resolve; the start fails naming the environment.
    node.server.add_fault(
        "status503:/git/"
            .parse::<kof_fixtures::serve::Fault>()
            .unwrap(),
    );
    let out = node.ctr_run("bad-hub", &rootfs, &[(ENV, "kof/tools")], &["true"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("environment kof/tools"), "{stderr}");
    assert!(stderr.contains("503"), "{stderr}");
    node.server.clear_faults();
    // A bad signature on a narinfo: the closure is refused.
    node.server.add_fault(
        "badsig:.narinfo"
            .parse::<kof_fixtures::serve::Fault>()
            .unwrap(),
    );
    let out = node.ctr_run("bad-sig", &rootfs, &[(ENV, "kof/tools")], &["true"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("environment kof/tools"), "{stderr}");
    assert!(stderr.to_lowercase().contains("signature"), "{stderr}");
    node.server.clear_faults();
    node.assert_no_leftovers();
}

fn an_exec_runs_activated_in_its_containers_environment(release: Release) {
    let node = Node::new(NodeOptions::on(release));
    node.run_detached("ex1", "kof/python", &["sleep", "600"]);
    // `ctr task exec` gives the exec the container's configured process (not the activated one
    // its Create made): kof activates it on its way to the runc shim.
    let out = node.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        "ex1",
        "sh",
        "-c",
        "echo \"FLOX_ENV=$FLOX_ENV\"; echo \"vars=$KOF_GREETING|$KOF_HOOK_RAN\"; python3 -c 'print(6*7)'",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}\n{}", node.logs());
    assert!(
        flox_env_of(&stdout).contains("-flox-env-python"),
        "{stdout}"
    );
    assert!(stdout.contains("vars=hello from kof/python|1"), "{stdout}");
    assert!(stdout.contains("\n42\n"), "{stdout}");
    // The hook ran for the exec, its output on stderr as in Flox.
    assert!(stderr.contains("python env activated"), "{stderr}");
    assert!(node.logs().contains("exec activated"), "{}", node.logs());

    let out = node.ctr(&["tasks", "kill", "-s", "SIGKILL", "ex1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    node.wait_for("the task to stop", || {
        text(&node.ctr(&["tasks", "ls"]).stdout).contains("STOPPED")
    });
    for args in [["tasks", "delete", "ex1"], ["containers", "delete", "ex1"]] {
        let out = node.ctr(&args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    node.wait_for("the lease's release", || node.leases().is_empty());
    node.assert_no_leftovers();
}
