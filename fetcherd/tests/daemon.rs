//! End-to-end tests of `kof-fetcherd`: the real daemon binary and its real FUSE server, the
//! fixture FloxHub and binary caches over HTTP on loopback, a temporary store, socket and
//! mount point per test. Every test tears down what it started (daemon, FUSE server, mount)
//! in a guard, and checks that no mount is left.

mod common;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, metrics, sample, Node, NodeOptions};
use kof_node_api::api::{ApiError, Client, ErrorKind};
use kof_testkit::{closure_of, fixtures, manifest, staged};

fn sha256_file(p: &Path) -> String {
    kof_nar::NixHash::digest(&std::fs::read(p).unwrap()).to_hex()
}

/// Checks that kof/hello's `bin/bash` reads through the view at `view_root` with the staged
/// bytes; a failed read names the deepest path that exists and prints the node's logs.
fn assert_view_has_bash(node: &Node, view_root: &Path) {
    let bash = closure_of("kof/hello", None)
        .into_iter()
        .find(|p| p.contains("-bash-"))
        .unwrap();
    let file = view_root
        .join(bash.trim_start_matches('/'))
        .join("bin/bash");
    let read = std::fs::read(&file).unwrap_or_else(|e| {
        let missing = file
            .ancestors()
            .find(|a| std::fs::symlink_metadata(a).is_ok())
            .map(|a| a.display().to_string());
        panic!(
            "reading {} after the restart: {e} (the deepest existing ancestor: {missing:?})\n{}",
            file.display(),
            node.logs()
        )
    });
    assert_eq!(
        kof_nar::NixHash::digest(&read).to_hex(),
        sha256_file(&staged(&bash).join("bin/bash"))
    );
}

fn is_mounted(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let d = dir.to_string_lossy().to_string();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(d.as_str()))
}

#[test]
fn prepare_serves_the_closure_and_release_removes_it() {
    let port = free_port();
    // The published cache: demand reads are range GETs of verified chunks, counted when their
    // bytes arrive.
    // `idle_view_secs = 0`: a view goes with its last lease (kept idle otherwise: see
    // leases_of_one_generation_share_the_view_and_release_separately).
    let mut node = Node::new(NodeOptions {
        metrics_port: Some(port),
        flavour: "published",
        extra_config: "idle_view_secs = 0\n".into(),
        ..NodeOptions::default()
    });
    let mount_dir = node.mount_dir();

    // Root only: the socket 0600 in a 0700 directory.
    let mode = std::fs::metadata(node.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    let mode = std::fs::metadata(node.socket().parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "run dir mode {mode:o}");

    let mut c = node.client();
    let p = c.prepare("kof/hello", "c1", None).unwrap();
    let closure = closure_of("kof/hello", None);
    assert_eq!(p.closure, closure);
    assert_eq!(p.env, "kof/hello");
    // The view is the generation's, named by its tree, not by the lease.
    let view = view_name_of(&p.view_root);
    assert_eq!(p.view_root, mount_dir.join(&view));
    assert!(view.starts_with("tree@"), "{view}");
    assert!(p.flox_env.starts_with("/nix/store/"), "{}", p.flox_env);
    assert_eq!(p.activation.flox_env, p.flox_env);

    // Exactly the closure under nix/store, plus the rendered environment.
    let mut listed: Vec<String> = std::fs::read_dir(p.view_root.join("nix/store"))
        .unwrap()
        .map(|e| format!("/nix/store/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    listed.sort();
    let mut want = closure.clone();
    want.push(p.flox_env.clone());
    want.sort();
    assert_eq!(listed, want);

    // A file's bytes, fetched on demand, are the real ones.
    let bash = closure.iter().find(|p| p.contains("-bash-")).unwrap();
    let via_view = p
        .view_root
        .join(bash.trim_start_matches('/'))
        .join("bin/bash");
    assert_eq!(
        sha256_file(&via_view),
        sha256_file(&staged(bash).join("bin/bash"))
    );
    // ... and through the rendered environment's symlinks too.
    let flox_bin = p
        .view_root
        .join(p.flox_env.trim_start_matches('/'))
        .join("bin");
    assert!(flox_bin.is_dir(), "{}", flox_bin.display());

    let text = metrics(port);
    assert!(
        sample(&text, "kof_fetch_bytes_total{cause=\"demand\"}") > 0.0,
        "{text}"
    );
    assert!(
        sample(&text, "kof_fuse_op_seconds_count{op=\"read\"}") > 0.0,
        "{text}"
    );
    assert_eq!(sample(&text, "kof_leases"), 1.0);
    assert!(sample(&text, "kof_api_requests_total{op=\"prepare\"}") >= 1.0);

    // The lease is listed, and preparing it again is harmless.
    let leases = c.leases().unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].lease, "c1");
    assert_eq!(leases[0].closure_paths, closure.len());
    let again = c.prepare("kof/hello", "c1", None).unwrap();
    assert_eq!(again, p);
    // ... but not for another environment.
    let e = c.prepare("kof/python", "c1", None).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::LeaseExists), "{e}");
    // The leased generation is kept from gc.
    let status = c.status().unwrap();
    assert_eq!(status.leases.len(), 1);
    assert_eq!(
        status.fuse_server.as_ref().unwrap().views,
        vec![view.clone()]
    );

    // The leased generation is recorded and pinned as a gc root while leased.
    let roots = || {
        kof_store::Store::open(&node.tmp.path().join("store"))
            .unwrap()
            .roots()
            .unwrap()
    };
    let held = roots();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(
        (
            held[0].owner.as_str(),
            held[0].name.as_str(),
            held[0].generation,
            held[0].pinned
        ),
        ("kof", "hello", p.generation, true)
    );

    let r = c.release("c1").unwrap();
    assert!(r.released);
    assert!(roots().is_empty(), "the lease's gc root outlived it");
    assert!(!p.view_root.exists(), "the view is gone after release");
    assert!(c.leases().unwrap().is_empty());
    assert!(!c.release("c1").unwrap().released);
    assert!(!node.tmp.path().join("store/leases/c1.json").exists());

    // Node shutdown: the daemon stops (else it would start a new FUSE server), then stopping
    // the FUSE server unmounts the view.
    let fuse_pid = node.fuse_pid().unwrap();
    node.kill_daemon();
    let out = Command::new(env!("CARGO_BIN_EXE_kof-fetcherd"))
        .arg("--config")
        .arg(&node.config)
        .arg("stop-fuse-server")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = Instant::now();
    while Path::new(&format!("/proc/{fuse_pid}")).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the FUSE server did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!is_mounted(&mount_dir), "stop-fuse-server left the mount");

    drop(c);
    drop(node);
    assert!(
        !is_mounted(&mount_dir),
        "teardown left {} mounted",
        mount_dir.display()
    );
}

#[test]
fn errors_name_the_environment_and_the_cause() {
    let node = Node::new(NodeOptions::default());
    let mut c = node.client();
    let e = c.prepare("kof/no-such-env", "c1", None).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Resolve), "{e}");
    assert!(e.to_string().contains("kof/no-such-env"), "{e}");
    let e = c.prepare("not a ref", "c1", None).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::BadEnv), "{e}");
    let e = c.prepare("kof/hello", "../etc", None).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::BadLease), "{e}");
    let e = c.prepare("kof/hello:99", "c1", None).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Resolve), "{e}");
    assert!(e.to_string().contains("kof/hello"), "{e}");
    // A second daemon on the same socket refuses to start and leaves the first alone.
    let out = Command::new(env!("CARGO_BIN_EXE_kof-fetcherd"))
        .arg("--config")
        .arg(&node.config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another kof-fetcherd is running"), "{err}");
    assert!(c.status().is_ok());
    // Nothing was left behind by the failures.
    assert!(c.leases().unwrap().is_empty());
    assert!(std::fs::read_dir(node.mount_dir())
        .unwrap()
        .next()
        .is_none());
    // A malformed line gets a bad_request answer, and the connection goes on.
    {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::os::unix::net::UnixStream::connect(node.socket()).unwrap();
        s.write_all(b"{\"op\":\"mount\"}\n{\"op\":\"leases\"}\n")
            .unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("\"kind\":\"bad_request\""), "{line}");
        line.clear();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, "{\"leases\":[]}\n");
    }
}

/// Kills the daemon (SIGKILL) while a reader reads a large file through the view, fetched on
/// demand over a slow link; a new daemon starts; the reader finishes with the right bytes and
/// no error, the FUSE server and the view having stayed all along.
#[test]
fn a_daemon_restart_under_a_running_reader_breaks_nothing() {
    let mut node = Node::new(NodeOptions {
        flavour: "published",
        bandwidth: Some(2 << 20),
        ..NodeOptions::default()
    });
    let p = node.client().prepare("kof/python", "c1", None).unwrap();
    let python = closure_of("kof/python", None)
        .into_iter()
        .find(|p| p.contains("-python3-"))
        .unwrap();
    let rel = "bin/python3.11";
    let want = sha256_file(&staged(&python).join(rel));
    let size = std::fs::metadata(staged(&python).join(rel)).unwrap().len();
    let file = p.view_root.join(python.trim_start_matches('/')).join(rel);
    let fuse_pid = node.fuse_pid().unwrap();

    let progress = Arc::new(AtomicU64::new(0));
    let reader = {
        let progress = progress.clone();
        std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
            let mut f = std::fs::File::open(&file)?;
            let mut all = Vec::new();
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    return Ok(all);
                }
                all.extend_from_slice(&buf[..n]);
                progress.store(all.len() as u64, Ordering::SeqCst);
            }
        })
    };
    // Once the reader is under way, kill the daemon.
    while progress.load(Ordering::SeqCst) == 0 && !reader.is_finished() {
        std::thread::sleep(Duration::from_millis(5));
    }
    node.kill_daemon();
    let at_kill = progress.load(Ordering::SeqCst);
    assert!(
        at_kill < size,
        "the reader finished ({at_kill} of {size} bytes) before the daemon was killed: the link is not slow enough for this test"
    );
    node.start_daemon();
    let bytes = reader
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the read failed across the restart: {e}\n{}", node.logs()));
    assert_eq!(bytes.len() as u64, size);
    assert_eq!(kof_nar::NixHash::digest(&bytes).to_hex(), want);
    // The read really waited for the daemon: the FUSE server retried while it was away.
    let fuse_log = std::fs::read_to_string(node.tmp.path().join("run/fuse-server.log")).unwrap();
    assert!(fuse_log.contains("daemon away"), "{}", node.logs());
    assert!(fuse_log.contains("the daemon is back"), "{}", node.logs());
    // The same FUSE server served all along, and the new daemon adopted the lease.
    assert_eq!(node.fuse_pid(), Some(fuse_pid));
    let leases = node.client().leases().unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].lease, "c1");
    assert!(p.view_root.join("nix/store").is_dir());
}

/// With no daemon at all, the client fails with a connection error naming the socket.
#[test]
fn no_daemon_is_a_connect_error() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("none.sock");
    match Client::connect(&sock) {
        Err(e @ ApiError::Connect { .. }) => {
            assert!(e.is_unavailable());
            assert!(e.to_string().contains(&sock.display().to_string()), "{e}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("connected to nothing"),
    }
}

/// `prefetch` through the daemon fetches the whole closure once and records the environment;
/// a second one finds everything stored.
#[test]
fn prefetch_through_the_daemon_fetches_the_closure_once() {
    let node = Node::new(NodeOptions::default());
    let mut c = node.client();
    let closure = closure_of("kof/hello", None);
    let p = c.prefetch("kof/hello", None).unwrap();
    assert_eq!(p.env, "kof/hello");
    assert_eq!(p.paths, closure.len());
    assert_eq!(p.paths_fetched, closure.len());
    assert_eq!(
        node.server.stats().requests_by_kind.nar,
        closure.len() as u64
    );
    let again = c.prefetch("kof/hello", None).unwrap();
    assert_eq!(again.paths_fetched, 0);
    assert_eq!(again.paths_already_present, closure.len());
    assert_eq!(
        node.server.stats().requests_by_kind.nar,
        closure.len() as u64
    );
    let status = c.status().unwrap();
    assert_eq!(status.store.store_paths, closure.len() as u64);
    assert_eq!(status.store.environments, 1);
    assert_eq!(status.store_dir, node.tmp.path().join("store"));
}

/// With `prefetch = "closure"`, the rest of the closure arrives in the background after a
/// prepare, without any read.
#[test]
fn background_prefetch_completes_the_closure() {
    let node = Node::new(NodeOptions {
        prefetch: "closure",
        ..NodeOptions::default()
    });
    let mut c = node.client();
    let closure = closure_of("kof/hello", None);
    c.prepare("kof/hello", "c1", None).unwrap();
    let start = Instant::now();
    loop {
        let s = c.status().unwrap();
        if s.store.store_paths == closure.len() as u64 {
            assert!(s.prefetch_bytes > 0, "{s:?}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "prefetch did not complete: {s:?}\n{}",
            node.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Every path came once.
    assert_eq!(
        node.server.stats().requests_by_kind.nar,
        closure.len() as u64
    );
}

/// When the FUSE server itself dies (its mount is then dead for everyone), the daemon starts a
/// new one, which replaces the dead mount, and rebuilds every leased view from the lease files
/// and the store's records; a view without a lease is not brought back.
#[test]
fn a_dead_fuse_server_is_replaced_and_the_leased_views_rebuilt() {
    let node = Node::new(NodeOptions::default());
    let mut c = node.client();
    let p = c.prepare("kof/hello", "c1", None).unwrap();
    c.prepare("kof/hello", "c2", None).unwrap();
    c.release("c2").unwrap();
    let old = node.fuse_pid().unwrap();
    // SAFETY: kill(2) of the FUSE server this test's daemon started.
    unsafe {
        libc::kill(old as i32, libc::SIGKILL);
    }
    let start = Instant::now();
    let views = loop {
        if let Ok(s) = c.status() {
            if let Some(f) = s
                .fuse_server
                .filter(|f| f.pid != old && !f.views.is_empty())
            {
                break f.views;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no new FUSE server with views: {}",
            node.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // c2 shared c1's view: it stays for c1, and is the one rebuilt.
    assert_eq!(views, vec![view_name_of(&p.view_root)]);
    assert_view_has_bash(&node, &p.view_root);
}

/// A private environment: refused without a token (the error names it), prepared with the
/// token given in the request, which never shows in any log.
#[test]
fn a_private_environment_needs_its_token_which_is_never_logged() {
    let node = Node::new(NodeOptions::default());
    let token_file = fixtures().0.join(&manifest().tokens["secretorg"]);
    let token = std::fs::read_to_string(token_file)
        .unwrap()
        .trim()
        .to_string();
    let mut c = node.client();
    let e = c.prepare("secretorg/app", "c1", None).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Resolve), "{e}");
    assert!(e.to_string().contains("secretorg/app"), "{e}");
    let p = c.prepare("secretorg/app", "c1", Some(&token)).unwrap();
    assert_eq!(p.env, "secretorg/app");
    assert!(p.view_root.join("nix/store").is_dir());
    let e = c
        .prepare("secretorg/app", "c2", Some("bad token\n"))
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::BadToken), "{e}");
    assert!(!node.logs().contains(&token), "the token was logged");
}

/// The first start of an environment records what it reads; released, the lease leaves a
/// learned profile; another node given that profile fetches those ranges as soon as the
/// environment is prepared, before any read.
#[test]
fn the_first_start_teaches_the_next_cold_start() {
    let port = free_port();
    let a = Node::new(NodeOptions {
        flavour: "published",
        ..NodeOptions::default()
    });
    let bash = closure_of("kof/hello", None)
        .into_iter()
        .find(|p| p.contains("-bash-"))
        .unwrap();
    let mut c = a.client();
    let p = c.prepare("kof/hello", "c1", None).unwrap();
    let bytes = std::fs::read(
        p.view_root
            .join(bash.trim_start_matches('/'))
            .join("bin/bash"),
    )
    .unwrap();
    assert!(!bytes.is_empty());
    c.release("c1").unwrap();
    let saved = a.tmp.path().join("store/profiles/kof/hello.json");
    let profile = std::fs::read_to_string(&saved)
        .unwrap_or_else(|e| panic!("no profile at {}: {e}\n{}", saved.display(), a.logs()));
    let base = bash.trim_start_matches("/nix/store/");
    assert!(profile.contains(base), "{profile}");

    let b = Node::new(NodeOptions {
        flavour: "published",
        metrics_port: Some(port),
        ..NodeOptions::default()
    });
    let dir = b.tmp.path().join("store/profiles/kof");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hello.json"), &profile).unwrap();
    b.client().prepare("kof/hello", "c1", None).unwrap();
    let start = Instant::now();
    loop {
        let text = metrics(port);
        let profile_bytes = sample(&text, "kof_fetch_bytes_total{cause=\"profile\"}");
        if profile_bytes > 0.0 {
            assert_eq!(
                sample(&text, "kof_fetch_bytes_total{cause=\"demand\"}"),
                0.0,
                "nothing was read on node b"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the profile was not fetched: {text}\n{}",
            b.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// After a node restart (daemon and FUSE server both gone), a new daemon brings every lease's
/// view back from the lease files and the store's records.
#[test]
fn leases_survive_a_node_restart() {
    let mut node = Node::new(NodeOptions::default());
    let p = node.client().prepare("kof/hello", "c1", None).unwrap();
    node.kill_daemon();
    let out = Command::new(env!("CARGO_BIN_EXE_kof-fetcherd"))
        .arg("--config")
        .arg(&node.config)
        .arg("stop-fuse-server")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = Instant::now();
    while is_mounted(&node.mount_dir()) {
        assert!(start.elapsed() < Duration::from_secs(60), "still mounted");
        std::thread::sleep(Duration::from_millis(20));
    }
    node.start_daemon();
    let again = node.client().prepare("kof/hello", "c1", None).unwrap();
    assert_eq!(again, p);
    assert_view_has_bash(&node, &p.view_root);
}

/// Every file of a view under `root`, relative, with its kind and (regular files) the SHA-256
/// of its bytes read through the view; symlinks with their targets.
/// The name of the view (under the mount) at `view_root`.
fn view_name_of(view_root: &Path) -> String {
    view_root
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn view_files(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.file_type().is_symlink() {
            out.push((
                rel,
                format!("-> {}", std::fs::read_link(&p).unwrap().display()),
            ));
        } else if m.is_dir() {
            out.push((rel, "dir".into()));
            view_files(root, &p, out);
        } else {
            out.push((rel, sha256_file(&p)));
        }
    }
}

fn fuse_server_log(node: &Node) -> String {
    std::fs::read_to_string(node.tmp.path().join("run/fuse-server.log")).unwrap_or_default()
}

/// Leases of one generation share its built view: a second lease (and a lease after every
/// earlier one is released, and after a daemon restart) gets a view with the same files and
/// bytes, served from the tree the FUSE server keeps, without the tree crossing the control
/// socket again; releasing one lease leaves the other's view intact.
#[test]
fn leases_of_one_generation_share_the_view_and_release_separately() {
    let mut node = Node::new(NodeOptions::default());
    let mut c = node.client();
    let hello = c.hello().unwrap();
    assert_eq!(hello.store_dir, node.tmp.path().join("store"));
    assert_eq!(Some(hello.pid), node.daemon.as_ref().map(|d| d.id()));
    // Everything stored: the daemon keeps the view it builds.
    c.prefetch("kof/hello", None).unwrap();
    let p1 = c.prepare("kof/hello", "c1", None).unwrap();
    let mut want = Vec::new();
    view_files(&p1.view_root, &p1.view_root, &mut want);
    let bash = closure_of("kof/hello", None)
        .into_iter()
        .find(|p| p.contains("-bash-"))
        .unwrap();
    let bash_rel = format!("{}/bin/bash", bash.trim_start_matches('/'));
    assert!(
        want.contains(&(
            bash_rel.clone(),
            sha256_file(&staged(&bash).join("bin/bash"))
        )),
        "{want:?}"
    );

    // A second lease of the generation gets the same view: the same directory, dentries and
    // inodes, so what the kernel cached for c1 serves c2.
    let control = node.control();
    let views = || {
        kof_fetcherd::daemon::control::ControlClient::connect(&control)
            .unwrap()
            .ping()
            .unwrap()
            .views
    };
    let p2 = c.prepare("kof/hello", "c2", None).unwrap();
    assert_eq!(p2.view_root, p1.view_root);
    assert_eq!(p2.flox_env, p1.flox_env);
    assert_eq!(p2.activation, p1.activation);
    let view = view_name_of(&p1.view_root);
    assert_eq!(views(), vec![view.clone()]);
    let leases = c.leases().unwrap();
    assert!(
        leases.iter().all(|l| l.view_root == p1.view_root),
        "{leases:?}"
    );
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    let bash_ino = ino(&p1.view_root.join(&bash_rel));
    let mut got = Vec::new();
    view_files(&p2.view_root, &p2.view_root, &mut got);
    assert_eq!(got, want);

    // Releasing c1 leaves the view whole for c2, and a file open in it stays readable.
    let mut open = std::fs::File::open(p2.view_root.join(&bash_rel)).unwrap();
    assert!(c.release("c1").unwrap().released);
    assert_eq!(views(), vec![view.clone()]);
    assert_eq!(ino(&p2.view_root.join(&bash_rel)), bash_ino);
    let mut got = Vec::new();
    view_files(&p2.view_root, &p2.view_root, &mut got);
    assert_eq!(got, want);
    let mut bytes = Vec::new();
    open.read_to_end(&mut bytes).unwrap();
    assert_eq!(
        kof_nar::NixHash::digest(&bytes).to_hex(),
        sha256_file(&staged(&bash).join("bin/bash"))
    );

    // After the last lease the view stays, idle, for the next pod of the generation: the same
    // inodes, so what the kernel cached of it (dentries, pages) serves that pod too.
    assert!(c.release("c2").unwrap().released);
    assert_eq!(views(), vec![view.clone()]);
    let p3 = c.prepare("kof/hello", "c3", None).unwrap();
    assert_eq!(p3.view_root, p1.view_root);
    assert_eq!(ino(&p3.view_root.join(&bash_rel)), bash_ino);
    let mut got = Vec::new();
    view_files(&p3.view_root, &p3.view_root, &mut got);
    assert_eq!(got, want);
    assert!(node.logs().contains("idle view reused"), "{}", node.logs());

    // A new daemon finds c3's view on the FUSE server, and gives c4 the same one.
    drop(c);
    node.kill_daemon();
    node.start_daemon();
    let mut c = node.client();
    let p4 = c.prepare("kof/hello", "c4", None).unwrap();
    assert_eq!(p4.view_root, p1.view_root);
    let mut got = Vec::new();
    view_files(&p4.view_root, &p4.view_root, &mut got);
    assert_eq!(got, want);
    assert_eq!(views(), vec![view.clone()]);
    assert!(c.release("c3").unwrap().released);
    assert_eq!(views(), vec![view.clone()], "c4 still uses the view");
    assert!(c.release("c4").unwrap().released);
    assert_eq!(views(), vec![view.clone()], "kept idle");
}

/// An idle view is removed once it has been idle for `idle_view_secs`; one a lease took back
/// in time is not.
#[test]
fn an_idle_view_is_removed_after_idle_view_secs() {
    let node = Node::new(NodeOptions {
        extra_config: "idle_view_secs = 2\n".into(),
        ..NodeOptions::default()
    });
    let mut c = node.client();
    c.prefetch("kof/hello", None).unwrap();
    let p1 = c.prepare("kof/hello", "c1", None).unwrap();
    let view = view_name_of(&p1.view_root);
    let views = || {
        kof_fetcherd::daemon::control::ControlClient::connect(&node.control())
            .unwrap()
            .ping()
            .unwrap()
            .views
    };
    assert!(c.release("c1").unwrap().released);
    assert_eq!(views(), vec![view.clone()]);
    let start = Instant::now();
    while !views().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the idle view outlived idle_view_secs: {}",
            node.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "removed before it was idle 2 s"
    );
    assert!(!p1.view_root.exists());
    assert!(node.logs().contains("idle view removed"), "{}", node.logs());
    // The next lease builds it again (from the FUSE server's kept tree).
    let p2 = c.prepare("kof/hello", "c2", None).unwrap();
    assert_eq!(p2.view_root, p1.view_root);
    assert!(p2.view_root.join("nix/store").is_dir());
    assert!(
        fuse_server_log(&node).contains(&format!("view added from a kept tree view={view}")),
        "{}",
        fuse_server_log(&node)
    );
    assert!(c.release("c2").unwrap().released);
}

/// The control socket refuses a tree whose digest is not its own, and answers `false` for a
/// digest it does not keep, changing nothing.
#[test]
fn the_fuse_server_checks_tree_digests() {
    use kof_fetcherd::daemon::control::ControlClient;
    use kof_fetcherd::daemon::wire::{tree_digest, WireEntry};
    let node = Node::new(NodeOptions::default());
    let mut cc = ControlClient::connect(&node.control()).unwrap();
    let mut m = std::collections::BTreeMap::new();
    m.insert(
        std::ffi::OsString::from("motd"),
        std::sync::Arc::new(kof_fuse::Entry::Regular {
            executable: false,
            content: kof_fuse::Content::Inline(std::sync::Arc::from(&b"hello\n"[..])),
        }),
    );
    let tree = kof_fuse::Entry::Directory(m);
    let digest = tree_digest(&tree);
    let other = tree_digest(&kof_fuse::Entry::Directory(Default::default()));
    let e = cc
        .add_view("t1", WireEntry::from_entry(&tree), Some(&other))
        .unwrap_err();
    match &e {
        ApiError::Remote(r) => {
            assert_eq!(r.kind, ErrorKind::BadRequest, "{e}");
            assert!(r.message.contains("digest"), "{e}");
        }
        _ => panic!("{e}"),
    }
    assert!(!node.mount_dir().join("t1").exists());
    assert!(!cc.add_cached_view("t2", &digest).unwrap());
    assert!(!node.mount_dir().join("t2").exists());
    cc.add_view("t1", WireEntry::from_entry(&tree), Some(&digest))
        .unwrap();
    assert!(cc.add_cached_view("t2", &digest).unwrap());
    assert_eq!(
        std::fs::read(node.mount_dir().join("t2/motd")).unwrap(),
        b"hello\n"
    );
    assert!(cc.remove_view("t1").unwrap());
    assert_eq!(
        std::fs::read(node.mount_dir().join("t2/motd")).unwrap(),
        b"hello\n"
    );
    assert!(cc.remove_view("t2").unwrap());
}
