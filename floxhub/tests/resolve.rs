//! Resolution against a real git smart-HTTP server on loopback: bare floxmeta repositories made
//! with the git CLI, served by `git http-backend` (tests/support/git_http_server.py), fetched
//! by the real git through `FloxHubClient`.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kof_floxhub::client::{FloxHubClient, FloxHubError, Token};
use kof_floxhub::resolve::{ResolveError, Resolver};
use kof_nar::StorePath;
use kof_node_api::envref::EnvRef;
use serde_json::json;

const SYSTEM: &str = "x86_64-linux";
const TOKEN: &str = "fh_s3cret-Token.123";

fn lockfile(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/data/flox-lockfiles")
            .join(name),
    )
    .unwrap()
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(["-c", "user.name=test", "-c", "user.email=test@example.org"])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The FloxHub stand-in: a directory of `<owner>/floxmeta` bare repositories and the server.
struct Hub {
    dir: tempfile::TempDir,
    server: Child,
    port: u16,
}

impl Hub {
    fn start(private: &[(&str, &str)]) -> Hub {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/git_http_server.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script).arg("--root").arg(dir.path().join("root"));
        for (owner, token) in private {
            cmd.arg("--private").arg(format!("{owner}:{token}"));
        }
        let mut server = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(server.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("server prints its port");
        Hub { dir, server, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Commits `files` (path, content) to branch `env` of `owner/floxmeta` and pushes it.
    fn push(&self, owner: &str, env: &str, files: &[(String, String)]) {
        let bare = self.dir.path().join("root").join(owner).join("floxmeta");
        if !bare.exists() {
            std::fs::create_dir_all(&bare).unwrap();
            git(&bare, &["init", "--quiet", "--bare"]);
        }
        let work = self.dir.path().join("work").join(owner).join(env);
        if !work.exists() {
            std::fs::create_dir_all(&work).unwrap();
            git(&work, &["init", "--quiet"]);
        }
        for (path, content) in files {
            let p = work.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "--quiet", "-m", "update"]);
        git(
            &work,
            &[
                "push",
                "--quiet",
                "--force",
                bare.to_str().unwrap(),
                &format!("HEAD:refs/heads/{env}"),
            ],
        );
    }

    fn requests(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("root/requests.log")).unwrap_or_default()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn entry(kind: &str, current: u64, previous: Option<u64>) -> serde_json::Value {
    json!({
        "kind": kind, "targets": ["hello"], "author": "alice", "hostname": "laptop",
        "timestamp": 1767003600 + current, "current_generation": current.to_string(),
        "previous_generation": previous.map(|p| p.to_string()),
        "command": ["flox", kind],
    })
}

fn metadata_v2(total: u64, history: &[serde_json::Value]) -> String {
    json!({"version": 2, "total_generations": total, "history": history}).to_string()
}

fn generation(n: u64, lock: &str) -> Vec<(String, String)> {
    vec![
        (format!("{n}/env/manifest.toml"), "version = 1\n".into()),
        (format!("{n}/env/manifest.lock"), lockfile(lock)),
    ]
}

/// alice/hello: generations 1 (hello), 2 (kitchen_sink), 3 (go_gcc); rolled back to 2.
fn push_rollback_env(hub: &Hub, owner: &str, env: &str) {
    let mut files = vec![(
        "metadata.json".to_string(),
        metadata_v2(
            3,
            &[
                entry("install", 1, None),
                entry("edit", 2, Some(1)),
                entry("upgrade", 3, Some(2)),
                entry("switch_generation", 2, Some(3)),
            ],
        ),
    )];
    files.extend(generation(1, "hello.manifest.lock.json"));
    files.extend(generation(2, "kitchen_sink.manifest.lock.json"));
    files.extend(generation(3, "go_gcc.manifest.lock.json"));
    hub.push(owner, env, &files);
}

/// Pushes generation 4 of `owner/env` (pushed by [`push_rollback_env`]) and makes it live.
fn push_live_generation_4(hub: &Hub, owner: &str, env: &str) {
    let mut files = vec![(
        "metadata.json".to_string(),
        metadata_v2(
            4,
            &[
                entry("install", 1, None),
                entry("edit", 2, Some(1)),
                entry("upgrade", 3, Some(2)),
                entry("switch_generation", 2, Some(3)),
                entry("install", 4, Some(2)),
            ],
        ),
    )];
    files.extend(generation(4, "krb5_prereqs.manifest.lock.json"));
    hub.push(owner, env, &files);
}

fn sp(s: &str) -> StorePath {
    StorePath::from_absolute(s).unwrap()
}

fn resolver(hub: &Hub, cache: &Path, system: &str) -> Resolver {
    Resolver::new(FloxHubClient::new(&hub.url(), cache).unwrap(), system)
}

fn env(s: &str) -> EnvRef {
    EnvRef::parse(s).unwrap()
}

#[test]
fn live_generation_pinning_and_rollback() {
    let hub = Hub::start(&[]);
    push_rollback_env(&hub, "alice", "hello");
    let cache = tempfile::tempdir().unwrap();
    let r = resolver(&hub, cache.path(), SYSTEM);

    // Live: the last history entry switched back to 2, though 3 is the newest.
    let e = r.resolve(&env("alice/hello"), None).unwrap();
    assert_eq!((e.owner.as_str(), e.name.as_str()), ("alice", "hello"));
    assert_eq!((e.generation, e.live, e.newest), (2, 2, 3));
    assert!(!e.pinned);
    assert_eq!(e.system, SYSTEM);
    assert_eq!(e.lockfile_text, lockfile("kitchen_sink.manifest.lock.json"));
    assert_eq!(
        e.roots,
        vec![sp(
            "/nix/store/lxra5fkapsdbdjqi6wa205s7vmqh1vxb-hello-2.12.3"
        )]
    );
    assert_eq!(e.vars["VARS_SECTION_VAR"], "vars_section_var");
    assert!(e.hook.as_deref().unwrap().contains("running on-activate"));
    let history = e.history.as_array().unwrap();
    assert_eq!(history.len(), 4);
    assert_eq!(history[3]["kind"], "switch_generation");
    assert_eq!(history[0]["author"], "alice");
    assert_eq!(e.commit.len(), 40);

    // Pinned to the newest and to the first.
    let e3 = r.resolve(&env("alice/hello:3"), None).unwrap();
    assert_eq!(
        (e3.generation, e3.live, e3.newest, e3.pinned),
        (3, 2, 3, true)
    );
    assert_eq!(
        e3.roots,
        vec![
            sp("/nix/store/dxqah042znlglapf07vha4qannacibf2-gcc-wrapper-15.2.0-man"),
            sp("/nix/store/gb0njhqswlc5n127ikgyikvq39r40l6f-go-1.26.4"),
            sp("/nix/store/xcnqqnhw9hb4j5rjgds2yjryi8qki5f3-gcc-wrapper-15.2.0"),
        ]
    );
    assert!(e3.vars.is_empty() && e3.hook.is_none());
    let e1 = r.resolve(&env("alice/hello:1"), None).unwrap();
    assert_eq!(
        e1.roots,
        vec![sp(
            "/nix/store/nm7p8wxflggcwxfzayhysq4z6a1wg373-hello-2.12.3"
        )]
    );

    // Another system picks its own entries.
    let arm = resolver(&hub, cache.path(), "aarch64-linux")
        .resolve(&env("alice/hello:3"), None)
        .unwrap();
    assert_eq!(
        arm.roots,
        vec![
            sp("/nix/store/07nfp0wv2yk9k6h7qg5h3nhgxkkr9hc3-gcc-wrapper-15.2.0-man"),
            sp("/nix/store/lgcj27hrbanbc93xm9zdrldds7b1jrw8-go-1.26.4"),
            sp("/nix/store/lx4f4lvm5hrbxbils30ssjal1jz9yxgh-gcc-wrapper-15.2.0"),
        ]
    );

    // A pin to a generation that does not exist names the known ones.
    let err = r.resolve(&env("alice/hello:4"), None).unwrap_err();
    match &err {
        ResolveError::NoSuchGeneration {
            env,
            generation,
            known,
            live,
        } => {
            assert_eq!((env.as_str(), *generation, *live), ("alice/hello", 4, 2));
            assert_eq!(known, &vec![1, 2, 3]);
        }
        other => panic!("unexpected {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("alice/hello") && msg.contains("[1, 2, 3]"),
        "{msg}"
    );

    // The store record.
    let closure = vec![
        sp("/nix/store/lxra5fkapsdbdjqi6wa205s7vmqh1vxb-hello-2.12.3"),
        sp("/nix/store/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-glibc-2.40"),
        sp("/nix/store/lxra5fkapsdbdjqi6wa205s7vmqh1vxb-hello-2.12.3"),
    ];
    let rec = e.to_record(closure);
    assert_eq!(
        (rec.owner.as_str(), rec.name.as_str(), rec.generation),
        ("alice", "hello", 2)
    );
    assert_eq!(rec.system, SYSTEM);
    assert_eq!(rec.lockfile, e.lockfile_text);
    assert_eq!(rec.vars, e.vars);
    assert_eq!(rec.hook, e.hook);
    assert_eq!(rec.history, e.history);
    assert_eq!(rec.roots, e.roots);
    assert_eq!(
        rec.closure,
        vec![
            sp("/nix/store/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-glibc-2.40"),
            sp("/nix/store/lxra5fkapsdbdjqi6wa205s7vmqh1vxb-hello-2.12.3"),
        ]
    );
    assert!(rec.resolved_at > 1_700_000_000);
}

#[test]
fn version_1_metadata() {
    let hub = Hub::start(&[]);
    let mut files = vec![(
        "metadata.json".to_string(),
        json!({"version": 1, "currentGen": "1", "generations": {
            "1": {"created": 1700000000, "lastActive": 1700000500, "logMessage": ["flox install hello"]},
            "2": {"created": 1700000100, "lastActive": 1700000200, "logMessage": ["flox install gcc"]},
        }})
        .to_string(),
    )];
    files.extend(generation(1, "flake_hello.manifest.lock.json"));
    files.extend(generation(2, "krb5_prereqs.manifest.lock.json"));
    hub.push("alice", "old", &files);
    let cache = tempfile::tempdir().unwrap();
    let r = resolver(&hub, cache.path(), SYSTEM);

    let e = r.resolve(&env("alice/old"), None).unwrap();
    assert_eq!((e.generation, e.live, e.newest), (1, 1, 2));
    assert_eq!(
        e.roots,
        vec![sp(
            "/nix/store/i3zw7h6pg3n9r5i63iyqxrapa70i4v5w-hello-2.12.2"
        )]
    );
    let history = e.history.as_array().unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1]["generation"], "2");
    assert_eq!(history[1]["logMessage"][0], "flox install gcc");

    let e2 = r.resolve(&env("alice/old:2"), None).unwrap();
    assert_eq!(e2.roots.len(), 6);
    assert!(e2.roots.contains(&sp(
        "/nix/store/l9k0anq0z7zz81zcwy035jfwap9ga6rl-python3-3.13.13"
    )));
}

#[test]
fn broken_environments_are_refused_with_their_name() {
    let hub = Hub::start(&[]);
    // Generation 1 lost its lockfile (old data); 2 has one.
    let mut files = vec![
        (
            "metadata.json".to_string(),
            metadata_v2(
                2,
                &[
                    entry("install", 1, None),
                    entry("install", 2, Some(1)),
                    entry("switch_generation", 1, Some(2)),
                ],
            ),
        ),
        (
            "1/env/manifest.toml".to_string(),
            "version = 1\n".to_string(),
        ),
    ];
    files.extend(generation(2, "hello.manifest.lock.json"));
    hub.push("alice", "nolock", &files);

    // Only darwin packages.
    let mut lock: serde_json::Value =
        serde_json::from_str(&lockfile("go_gcc.manifest.lock.json")).unwrap();
    lock["packages"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["system"].as_str().unwrap().ends_with("darwin"));
    hub.push(
        "alice",
        "mac",
        &[
            (
                "metadata.json".to_string(),
                metadata_v2(1, &[entry("install", 1, None)]),
            ),
            ("1/env/manifest.lock".to_string(), lock.to_string()),
        ],
    );

    // A lockfile whose output is not a store path; a metadata of an unknown version.
    let evil = lockfile("hello.manifest.lock.json").replace(
        "/nix/store/nm7p8wxflggcwxfzayhysq4z6a1wg373-hello-2.12.3",
        "/etc/passwd",
    );
    hub.push(
        "alice",
        "evil",
        &[
            (
                "metadata.json".to_string(),
                metadata_v2(1, &[entry("install", 1, None)]),
            ),
            ("1/env/manifest.lock".to_string(), evil),
        ],
    );
    hub.push(
        "alice",
        "future",
        &[(
            "metadata.json".to_string(),
            json!({"version": 9, "history": []}).to_string(),
        )],
    );
    hub.push(
        "alice",
        "nometa",
        &[("README".to_string(), "hi".to_string())],
    );
    // metadata.json over the 16 MiB limit (compresses well, so the transfer is small), and
    // metadata.json that is a directory.
    let huge = format!(
        "{{\"version\":2,\"pad\":\"{}\",\"history\":[]}}",
        " ".repeat(17 << 20)
    );
    hub.push("alice", "huge", &[("metadata.json".to_string(), huge)]);
    hub.push(
        "alice",
        "dirmeta",
        &[("metadata.json/x".to_string(), "{}".to_string())],
    );

    let cache = tempfile::tempdir().unwrap();
    let r = resolver(&hub, cache.path(), SYSTEM);

    let err = r.resolve(&env("alice/nolock"), None).unwrap_err();
    assert!(
        matches!(&err, ResolveError::LockfileMissing { env, generation: 1 } if env == "alice/nolock"),
        "{err:?}"
    );
    assert!(err.to_string().contains("alice/nolock") && err.to_string().contains("generation 1"));
    assert_eq!(
        r.resolve(&env("alice/nolock:2"), None).unwrap().generation,
        2
    );

    let err = r.resolve(&env("alice/mac"), None).unwrap_err();
    match &err {
        ResolveError::NoPackagesForSystem {
            env,
            system,
            available,
            ..
        } => {
            assert_eq!(env, "alice/mac");
            assert_eq!(system, SYSTEM);
            assert_eq!(
                available,
                &vec!["aarch64-darwin".to_string(), "x86_64-darwin".into()]
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("aarch64-darwin"));

    let err = r.resolve(&env("alice/evil"), None).unwrap_err();
    assert!(
        matches!(&err, ResolveError::Lockfile { env, generation: 1, .. } if env == "alice/evil"),
        "{err:?}"
    );
    assert!(
        kof_node_api::report::chain(&err).contains("/etc/passwd"),
        "{err}"
    );

    let err = r.resolve(&env("alice/future"), None).unwrap_err();
    assert!(
        matches!(&err, ResolveError::Metadata { env, .. } if env == "alice/future"),
        "{err:?}"
    );

    for (name, needle) in [
        ("alice/huge", "more than the 16777216"),
        ("alice/dirmeta", "not a file"),
    ] {
        let err = r.resolve(&env(name), None).unwrap_err();
        assert!(
            matches!(&err, ResolveError::FloxHub(FloxHubError::BadData { env, .. }) if env == name),
            "{err:?}"
        );
        assert!(err.to_string().contains(needle), "{err}");
    }

    let err = r.resolve(&env("alice/nometa"), None).unwrap_err();
    assert!(
        matches!(&err, ResolveError::FloxHub(FloxHubError::BadData { env, .. }) if env == "alice/nometa"),
        "{err:?}"
    );
}

/// Collects what `tracing` logs, at every level.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn private_owner_needs_the_right_token_which_never_leaks() {
    let hub = Hub::start(&[("acme", TOKEN)]);
    push_rollback_env(&hub, "acme", "secret");
    let cache = tempfile::tempdir().unwrap();

    // A git wrapper recording its arguments: the token must reach git, but not through argv.
    let argv_log = cache.path().join("argv.log");
    let wrapper = cache.path().join("git-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{}'\nexec git \"$@\"\n",
            argv_log.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let client = FloxHubClient::new(&hub.url(), cache.path().join("mirrors"))
        .unwrap()
        .with_git(&wrapper);
    let r = Resolver::new(client, SYSTEM);

    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let token = Token::new(TOKEN).unwrap();
    let wrong = Token::new("fh_wrong-token").unwrap();
    let url = format!("{}/acme/floxmeta", hub.url());

    let (ok, missing, refused) = tracing::subscriber::with_default(subscriber, || {
        (
            r.resolve(&env("acme/secret"), Some(&token)),
            r.resolve(&env("acme/secret"), None),
            r.resolve(&env("acme/secret:3"), Some(&wrong)),
        )
    });
    let ok = ok.unwrap();
    assert_eq!((ok.generation, ok.newest), (2, 3));

    let missing = missing.unwrap_err();
    assert!(
        matches!(&missing, ResolveError::FloxHub(FloxHubError::AuthRequired { env, url: u }) if env == "acme/secret" && *u == url),
        "{missing:?}"
    );
    let refused = refused.unwrap_err();
    assert!(
        matches!(&refused, ResolveError::FloxHub(FloxHubError::AuthRefused { env, url: u }) if env == "acme/secret" && *u == url),
        "{refused:?}"
    );

    use base64::Engine;
    let header = base64::engine::general_purpose::STANDARD.encode(format!("oauth:{TOKEN}"));
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("acme/secret"),
        "the resolves were logged: {logs}"
    );
    let argv = std::fs::read_to_string(&argv_log).unwrap();
    assert!(argv.contains("fetch"), "the wrapper ran git fetch: {argv}");
    for text in [
        missing.to_string(),
        refused.to_string(),
        format!("{missing:?}"),
        format!("{refused:?}"),
        format!("{ok:?}"),
        logs,
        argv,
    ] {
        assert!(!text.contains(TOKEN), "token leaked: {text}");
        assert!(!text.contains("fh_wrong-token"), "token leaked: {text}");
        assert!(!text.contains(&header), "auth header leaked: {text}");
    }
}

#[test]
fn missing_environment_owner_and_server() {
    let hub = Hub::start(&[]);
    push_rollback_env(&hub, "alice", "hello");
    let cache = tempfile::tempdir().unwrap();
    let r = resolver(&hub, cache.path(), SYSTEM);

    let err = r.resolve(&env("alice/nope"), None).unwrap_err();
    assert!(
        matches!(&err, ResolveError::FloxHub(FloxHubError::EnvironmentNotFound { env, .. }) if env == "alice/nope"),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains(&format!("{}/alice/floxmeta", hub.url())),
        "{err}"
    );

    let err = r.resolve(&env("nobody/x"), None).unwrap_err();
    assert!(
        matches!(&err, ResolveError::FloxHub(FloxHubError::OwnerNotFound { env, .. }) if env == "nobody/x"),
        "{err:?}"
    );
    assert!(err.to_string().contains("nobody/floxmeta"), "{err}");
    assert!(
        !cache.path().join("nobody.git").exists(),
        "no mirror is kept for an owner that does not exist"
    );

    // Connection refused: a port that was just released.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let down = Resolver::new(
        FloxHubClient::new(&format!("http://127.0.0.1:{port}"), cache.path()).unwrap(),
        SYSTEM,
    );
    let err = down.resolve(&env("alice/hello"), None).unwrap_err();
    assert!(
        matches!(&err, ResolveError::FloxHub(FloxHubError::Network { env, url, .. }) if env == "alice/hello" && url.contains(&port.to_string())),
        "{err:?}"
    );

    // A server that accepts and never answers: the deadline kills git.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let hung = Resolver::new(
        FloxHubClient::new(&format!("http://127.0.0.1:{silent_port}"), cache.path())
            .unwrap()
            .with_timeout(Duration::from_secs(2)),
        SYSTEM,
    );
    let err = hung.resolve(&env("alice/hello"), None).unwrap_err();
    assert!(
        matches!(&err, ResolveError::FloxHub(FloxHubError::Timeout { env, .. }) if env == "alice/hello"),
        "{err:?}"
    );
    drop(silent);

    // The mirror is still usable after all that.
    assert_eq!(r.resolve(&env("alice/hello"), None).unwrap().generation, 2);
}

#[test]
fn mirror_is_reused_and_only_fetches() {
    let hub = Hub::start(&[]);
    push_rollback_env(&hub, "alice", "hello");
    let cache = tempfile::tempdir().unwrap();
    let client = FloxHubClient::new(&hub.url(), cache.path()).unwrap();
    let r = Resolver::new(client.clone(), SYSTEM);

    let first = client.fetch(&env("alice/hello"), None).unwrap();
    assert!(first.created_mirror);
    let mirror = client.mirror_path("alice");
    assert_eq!(mirror, cache.path().join("alice.git"));
    let marker = mirror.join("kof-test-marker");
    std::fs::write(&marker, "still here").unwrap();
    assert_eq!(r.resolve(&env("alice/hello"), None).unwrap().generation, 2);

    // A new generation 4 becomes live on FloxHub; the next resolve sees it.
    push_live_generation_4(&hub, "alice", "hello");

    let e = r.resolve(&env("alice/hello"), None).unwrap();
    assert_eq!((e.generation, e.live, e.newest), (4, 4, 4));
    assert_ne!(e.commit, first.commit);
    let again = client.fetch(&env("alice/hello"), None).unwrap();
    assert!(!again.created_mirror);
    assert_eq!(again.commit, e.commit);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "still here");
    // Every request was a fetch (ref advertisement + upload-pack): nothing is ever pushed.
    let requests = hub.requests();
    assert!(requests.lines().count() >= 6, "{requests}");
    assert!(
        requests
            .lines()
            .all(|l| l.ends_with("/info/refs") || l.ends_with("/git-upload-pack")),
        "{requests}"
    );
}

#[test]
fn concurrent_resolves_of_one_owner() {
    let hub = Hub::start(&[]);
    push_rollback_env(&hub, "alice", "hello");
    let mut files = vec![(
        "metadata.json".to_string(),
        metadata_v2(1, &[entry("install", 1, None)]),
    )];
    files.extend(generation(1, "flake_hello.manifest.lock.json"));
    hub.push("alice", "flake", &files);
    let cache = tempfile::tempdir().unwrap();
    let r = Arc::new(resolver(&hub, cache.path(), SYSTEM));

    let threads: Vec<_> = (0..6)
        .map(|i| {
            let r = r.clone();
            std::thread::spawn(move || {
                let name = if i % 2 == 0 {
                    "alice/hello"
                } else {
                    "alice/flake"
                };
                (0..3)
                    .map(|_| {
                        r.resolve(&env(name), None)
                            .map(|e| (name, e.generation, e.roots))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for t in threads {
        for res in t.join().unwrap() {
            let (name, generation, roots) = res.unwrap();
            if name == "alice/hello" {
                assert_eq!(generation, 2);
                assert_eq!(
                    roots,
                    vec![sp(
                        "/nix/store/lxra5fkapsdbdjqi6wa205s7vmqh1vxb-hello-2.12.3"
                    )]
                );
            } else {
                assert_eq!(generation, 1);
                assert_eq!(
                    roots,
                    vec![sp(
                        "/nix/store/i3zw7h6pg3n9r5i63iyqxrapa70i4v5w-hello-2.12.2"
                    )]
                );
            }
        }
    }
    // One mirror, intact, with both branches.
    let mirror: PathBuf = cache.path().join("alice.git");
    let out = Command::new("git")
        .args(["fsck", "--no-progress"])
        .current_dir(&mirror)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("git")
        .args(["for-each-ref", "--format=%(refname)", "refs/heads"])
        .current_dir(&mirror)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "refs/heads/flake\nrefs/heads/hello\n"
    );
    let leftovers: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_recorded_pinned_generation_resolves_from_the_store_without_floxhub() {
    let hub = Hub::start(&[]);
    push_rollback_env(&hub, "alice", "hello");
    let cache = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let store = Arc::new(kof_store::Store::open(store_dir.path()).unwrap());
    let r = resolver(&hub, cache.path(), SYSTEM).with_store(store.clone());
    let fetches = |hub: &Hub| hub.requests().lines().count();

    // Not recorded yet: FloxHub is asked.
    let before = fetches(&hub);
    let first = r.resolve(&env("alice/hello:3"), None).unwrap();
    assert!(
        fetches(&hub) > before,
        "an unrecorded generation asks FloxHub"
    );
    assert_eq!(first.commit.len(), 40);
    store
        .put_environment(&first.to_record(first.roots.clone()))
        .unwrap();

    // Recorded: answered from the record, no request at all.
    let before = fetches(&hub);
    let local = r.resolve(&env("alice/hello:3"), None).unwrap();
    assert_eq!(
        fetches(&hub),
        before,
        "a recorded pinned generation asks nothing"
    );
    assert_eq!(local.commit, "");
    assert_eq!((local.generation, local.pinned), (3, true));
    assert_eq!(local.roots, first.roots);
    assert_eq!(local.lockfile_text, first.lockfile_text);
    assert_eq!(local.lockfile, first.lockfile);
    assert_eq!((&local.vars, &local.hook), (&first.vars, &first.hook));
    assert_eq!(local.history, first.history);

    // The live generation moves: always asked of FloxHub, even when its number is recorded.
    let live = r.resolve(&env("alice/hello"), None).unwrap();
    store
        .put_environment(&live.to_record(live.roots.clone()))
        .unwrap();
    let before = fetches(&hub);
    let again = r.resolve(&env("alice/hello"), None).unwrap();
    assert!(fetches(&hub) > before, "the live generation asks FloxHub");
    assert_eq!(
        (again.generation, again.pinned, again.commit.len()),
        (2, false, 40)
    );

    // Another system's resolver does not take this system's record.
    let before = fetches(&hub);
    let arm = resolver(&hub, cache.path(), "aarch64-linux")
        .with_store(store.clone())
        .resolve(&env("alice/hello:3"), None)
        .unwrap();
    assert!(fetches(&hub) > before);
    assert_eq!(arm.system, "aarch64-linux");
    assert_ne!(arm.roots, first.roots);

    // With FloxHub gone, the recorded pin still resolves; the live one and an unrecorded pin
    // fail.
    drop(hub);
    let offline = r.resolve(&env("alice/hello:3"), None).unwrap();
    assert_eq!(offline.roots, first.roots);
    assert!(r.resolve(&env("alice/hello"), None).is_err());
    assert!(r.resolve(&env("alice/hello:1"), None).is_err());
    // A resolver without the store asks FloxHub for the pin too.
    let bare = Resolver::new(
        FloxHubClient::new("http://127.0.0.1:9", cache.path()).unwrap(),
        SYSTEM,
    );
    assert!(bare.resolve(&env("alice/hello:3"), None).is_err());
}

#[test]
fn an_unchanged_branch_costs_one_ref_advertisement_and_no_reads() {
    let hub = Hub::start(&[]);
    push_rollback_env(&hub, "alice", "hello");
    let cache = tempfile::tempdir().unwrap();
    let client = FloxHubClient::new(&hub.url(), cache.path()).unwrap();
    let r = Resolver::new(client.clone(), SYSTEM);
    let first = r.resolve(&env("alice/hello"), None).unwrap();
    let before = hub.requests().lines().count();

    // The tip is unchanged: one ref advertisement, no upload-pack, the same resolution.
    let again = r.resolve(&env("alice/hello"), None).unwrap();
    assert_eq!(again, first);
    let requests = hub.requests();
    let new: Vec<&str> = requests.lines().skip(before).collect();
    assert_eq!(new.len(), 1, "{new:?}");
    assert!(new[0].ends_with("/info/refs"), "{new:?}");

    // A push moves the tip: the next resolve fetches it and sees the new live generation.
    push_live_generation_4(&hub, "alice", "hello");
    let moved = r.resolve(&env("alice/hello"), None).unwrap();
    assert_eq!(moved.generation, 4);
    assert_ne!(moved.commit, first.commit);
    let requests = hub.requests();
    assert!(
        requests
            .lines()
            .skip(before + 1)
            .any(|l| l.ends_with("/git-upload-pack")),
        "{requests}"
    );
}
