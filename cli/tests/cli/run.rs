//! `kof-store run`: commands run inside an environment's lazy view (real FUSE, overlay, mount
//! and pid namespaces), activated as `flox activate -- CMD`, leaving nothing mounted.

use std::path::Path;
use std::process::Output;

use crate::support::*;

/// Runs `kof-store run args...` with its temporary directories under the node's own, so a test
/// can check that nothing of its run is left mounted while other tests run.
fn run(node: &Node, args: &[&str]) -> Output {
    let tmp = node.tmp.path().join("run-tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    let mut c = node.cmd(&all);
    c.env("TMPDIR", &tmp);
    let out = run_bounded(c, std::time::Duration::from_secs(300));
    assert_nothing_mounted_under(node.tmp.path());
    out
}

/// No mount of this process's namespace lies under `dir`, and no temporary directory is left.
fn assert_nothing_mounted_under(dir: &Path) {
    let dir = dir.canonicalize().unwrap();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.contains(dir.to_str().unwrap()))
        .collect();
    assert!(left.is_empty(), "left mounted: {left:#?}");
    let tmp = dir.join("run-tmp");
    let entries: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        entries.is_empty(),
        "temporary directories left: {entries:?}"
    );
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(node: &Node, args: &[&str]) -> (String, String) {
    let out = run(node, args);
    assert!(
        out.status.success(),
        "kof-store run {args:?} failed ({:?}): {}\nstdout: {}",
        out.status,
        stderr(&out),
        stdout(&out)
    );
    (stdout(&out), stderr(&out))
}

#[test]
fn python_runs_in_a_lazy_view_and_fetches_only_part_of_the_closure() {
    // An uncompressed cache with listings and Range: files are fetched by the ranges read.
    let node = Node::with(NodeOptions {
        flavour: "none",
        extra_config: "prefetch = \"none\"\n".into(),
        ..NodeOptions::default()
    });
    let (out, err) = ok(
        &node,
        &[
            "kof/python",
            "--",
            "python3",
            "-c",
            "import json, sqlite3; print(1)",
        ],
    );
    assert_eq!(out, "1\n");
    // The on-activate hook ran (it writes to stderr).
    assert!(err.contains("python env activated"), "{err}");
    // With prefetch off, only what was read was fetched: well under the closure's NAR bytes.
    let closure = closure_of("kof/python", None);
    let closure_bytes: u64 = closure.iter().map(|p| nar_size(p)).sum();
    let fetched = node.server.stats().bytes_by_kind.nar;
    assert!(fetched > 0, "python's files were fetched");
    assert!(
        fetched * 2 < closure_bytes,
        "a lazy run fetches what it reads: {fetched} of {closure_bytes} NAR bytes"
    );
}

#[test]
fn the_exit_status_is_passed_through() {
    let node = Node::new();
    let out = run(&node, &["kof/python", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    // Killed by a signal: 128 + n, as shells report it.
    let out = run(&node, &["kof/python", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(128 + 15), "{}", stderr(&out));
    // A command the environment does not have.
    let out = run(&node, &["kof/python", "--", "no-such-command"]);
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    assert!(stderr(&out).contains("no-such-command"), "{}", stderr(&out));
}

#[test]
fn the_command_is_activated_with_vars_hook_flox_env_and_path() {
    let node = Node::new();
    let (out, _) = ok(
        &node,
        &[
            "kof/python",
            "sh",
            "-c",
            "echo \"$KOF_GREETING|$PYTHONDONTWRITEBYTECODE|$KOF_HOOK_RAN|$FLOX_ENV_DESCRIPTION|${_KOF_ON_ACTIVATE-unset}\"; \
             echo \"$FLOX_ENV\"; echo \"$PATH\"; command -v python3; echo $$; \
             test -d \"$FLOX_ENV/bin\" && echo has-bin",
        ],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "hello from kof/python|1|1|python|unset",
        "vars, hook exports, description: {out}"
    );
    let flox_env = lines[1];
    assert!(
        flox_env.starts_with("/nix/store/") && flox_env.ends_with("-flox-env-python"),
        "{flox_env}"
    );
    assert!(
        lines[2].starts_with(&format!("{flox_env}/bin:{flox_env}/sbin:")),
        "PATH starts with the environment: {}",
        lines[2]
    );
    assert_eq!(lines[3], format!("{flox_env}/bin/python3"));
    // The hook's bash runs as pid 2, after the namespace's init: a pid namespace of its own.
    assert_eq!(lines[4], "2", "pid inside the sandbox");
    assert_eq!(lines[5], "has-bin");
}

#[test]
fn the_view_shows_exactly_the_closure() {
    let node = Node::new();
    let (out, _) = ok(&node, &["kof/python", "--", "ls", "-1", "/nix/store"]);
    let mut seen: Vec<String> = out.lines().map(|l| format!("/nix/store/{l}")).collect();
    let env: Vec<String> = seen
        .iter()
        .filter(|p| p.ends_with("-flox-env-python"))
        .cloned()
        .collect();
    assert_eq!(env.len(), 1, "one rendered environment: {out}");
    seen.retain(|p| !p.ends_with("-flox-env-python"));
    seen.sort();
    assert_eq!(seen, closure_of("kof/python", None));
    // The root is writable (an overlay) and the view underneath is not changed by it.
    let (out, _) = ok(
        &node,
        &[
            "kof/python",
            "--",
            "sh",
            "-c",
            "echo hi > /root/x && cat /root/x && ls /proc/self/ >/dev/null && echo proc-ok",
        ],
    );
    assert_eq!(out, "hi\nproc-ok\n");
    let (out, _) = ok(&node, &["kof/python", "--", "sh", "-c", "ls /root | wc -l"]);
    assert_eq!(out.trim(), "0", "each run starts from the view");
}

#[test]
fn a_pinned_generation_runs_its_own_packages() {
    let node = Node::new();
    let show = "readlink \"$FLOX_ENV/bin/jq\"; jq --version";
    let (pinned, _) = ok(&node, &["kof/dedup:1", "--", "sh", "-c", show]);
    let (live, _) = ok(&node, &["kof/dedup", "--", "sh", "-c", show]);
    let jq_of = |g: Option<u32>| {
        closure_of("kof/dedup", g)
            .into_iter()
            .find(|p| p.contains("-jq-"))
            .unwrap()
    };
    let (jq1, jq_live) = (jq_of(Some(1)), jq_of(None));
    assert_ne!(jq1, jq_live, "the fixture's generations differ in jq");
    assert_eq!(pinned.lines().next().unwrap(), format!("{jq1}/bin/jq"));
    assert_eq!(live.lines().next().unwrap(), format!("{jq_live}/bin/jq"));
    assert!(
        pinned.lines().nth(1).unwrap().starts_with("jq-"),
        "{pinned}"
    );
}
