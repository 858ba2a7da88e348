//! `kof-store run`: commands run inside an environment's lazy view (real FUSE, overlay, mount
//! and pid namespaces), activated as `flox activate -- CMD`, leaving nothing mounted.

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// Runs `kof-store run args...` with its temporary directories under the node's own, so a test
/// can check that nothing of its run is left mounted while other tests run.
fn run(node: &Node, args: &[&str]) -> Output {
    run_but(node, args, None)
}

/// [`run`], when a daemon's view mount (`daemon_mount`) lies under the node's directory.
fn run_but(node: &Node, args: &[&str], daemon_mount: Option<&Path>) -> Output {
    let tmp = node.tmp.path().join("run-tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    let mut c = node.cmd(&all);
    c.env("TMPDIR", &tmp);
    let out = run_bounded(c, std::time::Duration::from_secs(300));
    assert_nothing_mounted_under_but(node.tmp.path(), daemon_mount);
    out
}

/// No mount of this process's namespace lies under `dir` but `except` (a daemon's view mount),
/// and no temporary directory is left.
fn assert_nothing_mounted_under_but(dir: &Path, except: Option<&Path>) {
    let dir = dir.canonicalize().unwrap();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.contains(dir.to_str().unwrap()))
        .filter(|l| except.is_none_or(|e| l.split(' ').nth(4) != Some(e.to_str().unwrap())))
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
    ok_but(node, args, None)
}

/// [`ok`], when a daemon's view mount (`daemon_mount`) lies under the node's directory.
fn ok_but(node: &Node, args: &[&str], daemon_mount: Option<&Path>) -> (String, String) {
    let out = run_but(node, args, daemon_mount);
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
    // The published cache (signed indexes, seekable zstd NARs): files are fetched by the
    // verified chunks read.
    let node = Node::with(NodeOptions {
        flavour: "published",
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
    // With prefetch off, only what was read was fetched (python reads about 29%).
    let closure = closure_of("kof/python", None);
    let closure_bytes: u64 = closure.iter().map(|p| nar_size(p)).sum();
    let fetched = node.server.stats().bytes_by_kind.nar;
    assert!(fetched > 0, "python's files were fetched");
    assert!(
        fetched * 100 <= closure_bytes * 35,
        "a lazy run fetches what it reads (at most 35% of the closure, the issue's target): {fetched} of {closure_bytes} NAR bytes"
    );
    // The first start's reads were saved as the environment's learned profile.
    let profile = node.store_dir().join("profiles/kof/python.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&profile).unwrap()).unwrap();
    assert!(
        !v["ranges"].as_array().unwrap().is_empty(),
        "the profile holds the reads: {v}"
    );
    // The next start fetches that profile first and runs the same.
    let (out, _) = ok(&node, &["kof/python", "--", "python3", "-c", "print(2)"]);
    assert_eq!(out, "2\n");
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

/// Starts `kof-store run kof/python -- sh -c 'echo ready; exec sleep 300'`, waits for it to be
/// ready, sends it SIGTERM, and checks it ends with 143 leaving nothing mounted and no command
/// alive (`daemon_mount`: the daemon's view mount, which stays).
fn terminate_a_run(node: &Node, daemon_mount: Option<&Path>) {
    let tmp = node.tmp.path().join("run-tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut c = node.cmd(&[
        "run",
        "kof/python",
        "--",
        "sh",
        "-c",
        "echo ready; exec sleep 300",
    ]);
    c.env("TMPDIR", &tmp)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\n");
    // SAFETY: kill(2) of the kof-store this test started.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "kof-store run did not end after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(128 + 15));
    assert_nothing_mounted_under_but(node.tmp.path(), daemon_mount);
    // The command died with its pid namespace.
    let survivors: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| c == b"sleep\x00300\x00")
        .map(|c| String::from_utf8_lossy(&c).into_owned())
        .collect();
    assert!(survivors.is_empty(), "{survivors:?}");
}

#[test]
fn a_terminated_run_takes_its_sandbox_down_and_cleans_up() {
    terminate_a_run(&Node::new(), None);
}

/// The descriptors the command starts with beyond stdin, stdout and stderr (but `ls`'s own,
/// reading the directory): `kof-store run` must add none to those its caller passed.
fn command_descriptors(node: &Node, daemon_mount: Option<&Path>) -> Vec<u32> {
    let (out, _) = ok_but(
        node,
        &["kof/python", "--", "ls", "-l", "/proc/self/fd"],
        daemon_mount,
    );
    let mut fds: Vec<u32> = out
        .lines()
        .filter_map(|l| {
            let (left, target) = l.split_once(" -> ")?;
            let fd: u32 = left.rsplit(' ').next()?.parse().ok()?;
            let own_listing = target.starts_with("/proc/") && target.ends_with("/fd");
            (fd > 2 && !own_listing).then_some(fd)
        })
        .collect();
    fds.sort();
    fds
}

/// The descriptors of this process a child inherits (no close-on-exec), beyond 0, 1 and 2.
fn inheritable_descriptors() -> Vec<u32> {
    let mut fds: Vec<u32> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd: &u32| {
            // SAFETY: F_GETFD only reads the flags of a descriptor number (a closed one fails).
            let flags = unsafe { libc::fcntl(*fd as i32, libc::F_GETFD) };
            *fd > 2 && flags >= 0 && flags & libc::FD_CLOEXEC == 0
        })
        .collect();
    fds.sort();
    fds
}

#[test]
fn the_command_inherits_no_descriptor_of_the_run() {
    let node = Node::new();
    let want = inheritable_descriptors();
    // Alone (the sandbox's keeper is a fresh process, its spec passed on a pipe).
    assert_eq!(command_descriptors(&node, None), want);
    // Through the daemon (the keeper is a fork of kof-store, which talked to the daemon).
    let daemon = node.spawn_daemon();
    assert_eq!(command_descriptors(&node, Some(&daemon.mount_dir)), want);
    assert_eq!(daemon.client().leases().unwrap().len(), 0);
}

/// `SigIgn` of the command's shell, as a mask.
fn ignored_signals(node: &Node, daemon_mount: Option<&Path>) -> u64 {
    let (out, _) = ok_but(
        node,
        &[
            "kof/python",
            "--",
            "sh",
            "-c",
            "while read k v; do [ \"$k\" = SigIgn: ] && echo $v; done < /proc/$$/status; exit 0",
        ],
        daemon_mount,
    );
    u64::from_str_radix(out.trim(), 16).unwrap_or_else(|e| panic!("{out:?}: {e}"))
}

/// The command starts with SIGPIPE at its default (a writer to a closed pipe dies of it, as
/// under a shell), though `kof-store`, a Rust program, ignores it; alone and through the daemon.
#[test]
fn the_command_starts_with_sigpipe_at_its_default() {
    let node = Node::new();
    let sigpipe = 1u64 << (libc::SIGPIPE - 1);
    assert_eq!(ignored_signals(&node, None) & sigpipe, 0);
    // A writer to a closed pipe dies of SIGPIPE, without an EPIPE error message.
    let (out, err) = ok(&node, &["kof/python", "--", "sh", "-c", "yes | head -n 2"]);
    assert_eq!(out, "y\ny\n");
    assert!(!err.contains("Broken pipe"), "{err}");
    let daemon = node.spawn_daemon();
    let mount = Some(daemon.mount_dir.as_path());
    assert_eq!(ignored_signals(&node, mount) & sigpipe, 0);
    let (out, err) = ok_but(
        &node,
        &["kof/python", "--", "sh", "-c", "yes | head -n 2"],
        mount,
    );
    assert_eq!(out, "y\ny\n");
    assert!(!err.contains("Broken pipe"), "{err}");
}

/// Through the daemon the sandbox's keeper is a fork of `kof-store`: a SIGTERM still takes the
/// sandbox down, and the lease is released.
#[test]
fn a_terminated_run_through_the_daemon_takes_its_sandbox_down_and_releases_its_lease() {
    let node = Node::new();
    let daemon = node.spawn_daemon();
    terminate_a_run(&node, Some(&daemon.mount_dir));
    assert_eq!(daemon.client().leases().unwrap().len(), 0);
    // The run's view is at most kept idle for the next lease of its tree, not held.
    let st = daemon.client().status().unwrap();
    let held: Vec<String> = st
        .fuse_server
        .unwrap()
        .views
        .into_iter()
        .filter(|v| !st.idle_views.contains(v))
        .collect();
    assert_eq!(held, Vec::<String>::new());
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

#[test]
fn runs_through_the_daemon_when_it_answers() {
    let node = Node::new();
    let daemon = node.spawn_daemon();
    let tmp = node.tmp.path().join("run-tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut c = node.cmd(&[
        "run",
        "kof/python",
        "--",
        "python3",
        "-c",
        "import json, sqlite3, os; print(1, os.environ['KOF_HOOK_RAN'])",
    ]);
    c.env("TMPDIR", &tmp).env("KOF_LOG", "info");
    let out = run_bounded(c, Duration::from_secs(300));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "1 1\n");
    assert!(
        stderr(&out).contains("running in the view kof-fetcherd prepared"),
        "the run went through the daemon: {}",
        stderr(&out)
    );
    // The lease was released, and the run's own directories are gone.
    assert_eq!(daemon.client().leases().unwrap().len(), 0);
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
    assert!(left.is_empty(), "{left:?}");
    // The exit status passes through this way too.
    let mut c = node.cmd(&["run", "kof/python", "--", "sh", "-c", "exit 3"]);
    c.env("TMPDIR", &tmp);
    assert_eq!(
        run_bounded(c, Duration::from_secs(300)).status.code(),
        Some(3)
    );
    drop(daemon);
}
