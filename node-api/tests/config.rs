//! The node config: defaults, every key, refusals naming the file and key, and the choice of
//! file (explicit > KOF_CONFIG > /etc/kof/config.toml > defaults).

use std::path::{Path, PathBuf};

use kof_node_api::config::{host_system, Config, ConfigError, Prefetch};

const KEY: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn defaults_when_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let c = Config::load_from(None, None, &dir.path().join("absent.toml")).unwrap();
    assert_eq!(c.source, None);
    assert_eq!(c.floxhub_url, "https://api.flox.dev/git");
    assert!(c.require_sigs);
    assert!(c.substituters.is_empty());
    assert_eq!(c.store_dir, PathBuf::from("/var/lib/kof"));
    assert_eq!(c.socket, PathBuf::from("/run/kof/fetcherd.sock"));
    assert_eq!(c.mount_dir, PathBuf::from("/var/lib/kof/mnt"));
    assert_eq!(c.prefetch, Prefetch::Closure);
    assert_eq!(c.max_parallel_downloads, 16);
    assert_eq!(c.demand_timeout, std::time::Duration::from_secs(60));
    assert_eq!(c.idle_view, std::time::Duration::from_secs(600));
    assert_eq!(c.system, host_system());
    let expected_arch = std::env::consts::ARCH;
    assert!(c.system.starts_with(expected_arch) && c.system.ends_with("-linux"));
}

#[test]
fn every_key_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "c.toml",
        &format!(
            r#"
floxhub_url = "http://127.0.0.1:1/git"
floxhub_token_file = "/etc/kof/token"
substituters = ["https://cache.flox.dev", "file:///srv/cache"]
trusted_public_keys = ["{KEY}"]
require_sigs = false
system = "aarch64-linux"
store_dir = "/srv/kof"
max_parallel_downloads = 3
socket = "/tmp/s.sock"
mount_dir = "/tmp/mnt"
prefetch = "none"
metrics_addr = "127.0.0.1:9100"
demand_timeout_secs = 7
idle_view_secs = 0
"#
        ),
    );
    let c = Config::load_from(Some(&p), None, Path::new("/nonexistent")).unwrap();
    assert_eq!(c.source.as_deref(), Some(p.as_path()));
    assert_eq!(c.floxhub_url, "http://127.0.0.1:1/git");
    assert_eq!(c.floxhub_token_file, Some(PathBuf::from("/etc/kof/token")));
    assert_eq!(
        c.substituters,
        ["https://cache.flox.dev", "file:///srv/cache"]
    );
    assert_eq!(c.trusted_public_keys.len(), 1);
    assert_eq!(c.trusted_public_keys[0].name, "cache.nixos.org-1");
    assert!(!c.require_sigs);
    assert_eq!(c.system, "aarch64-linux");
    assert_eq!(c.store_dir, PathBuf::from("/srv/kof"));
    assert_eq!(c.max_parallel_downloads, 3);
    assert_eq!(c.socket, PathBuf::from("/tmp/s.sock"));
    assert_eq!(c.mount_dir, PathBuf::from("/tmp/mnt"));
    assert_eq!(c.prefetch, Prefetch::None);
    assert_eq!(c.metrics_addr.as_deref(), Some("127.0.0.1:9100"));
    assert_eq!(c.demand_timeout, std::time::Duration::from_secs(7));
    assert_eq!(c.idle_view, std::time::Duration::ZERO);
}

#[test]
fn unknown_key_is_refused_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "c.toml", "substituter = [\"https://x\"]\n");
    let err = Config::load_from(Some(&p), None, Path::new("/nonexistent")).unwrap_err();
    assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
    let msg = kof_node_api::report::chain(&err);
    assert!(msg.contains(&p.display().to_string()), "{msg}");
    assert!(msg.contains("substituter"), "{msg}");
}

#[test]
fn bad_values_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "k.toml",
        "trusted_public_keys = [\"nocolon\"]\n",
    );
    let err = Config::load_from(Some(&p), None, Path::new("/x")).unwrap_err();
    assert!(
        matches!(&err, ConfigError::BadPublicKey { key, path, .. } if key == "nocolon" && path == &p),
        "{err:?}"
    );
    let p = write(dir.path(), "s.toml", "substituters = [\"ftp://x\"]\n");
    let err = Config::load_from(Some(&p), None, Path::new("/x")).unwrap_err();
    assert!(
        matches!(
            &err,
            ConfigError::BadValue {
                key: "substituters",
                ..
            }
        ),
        "{err:?}"
    );
    let p = write(dir.path(), "m.toml", "max_parallel_downloads = 0\n");
    let err = Config::load_from(Some(&p), None, Path::new("/x")).unwrap_err();
    assert!(
        matches!(
            &err,
            ConfigError::BadValue {
                key: "max_parallel_downloads",
                ..
            }
        ),
        "{err:?}"
    );
    let p = write(dir.path(), "t.toml", "require_sigs = \"yes\"\n");
    let err = Config::load_from(Some(&p), None, Path::new("/x")).unwrap_err();
    assert!(matches!(&err, ConfigError::Parse { .. }), "{err:?}");
    assert!(
        kof_node_api::report::chain(&err).contains("require_sigs"),
        "{err}"
    );
    let p = write(dir.path(), "d.toml", "demand_timeout_secs = 0\n");
    let err = Config::load_from(Some(&p), None, Path::new("/x")).unwrap_err();
    assert!(
        matches!(
            &err,
            ConfigError::BadValue {
                key: "demand_timeout_secs",
                ..
            }
        ),
        "{err:?}"
    );
    let p = write(dir.path(), "p.toml", "prefetch = \"everything\"\n");
    assert!(Config::load_from(Some(&p), None, Path::new("/x")).is_err());
}

#[test]
fn file_choice_order() {
    let dir = tempfile::tempdir().unwrap();
    let explicit = write(dir.path(), "a.toml", "system = \"a-linux\"\n");
    let env = write(dir.path(), "b.toml", "system = \"b-linux\"\n");
    let system = write(dir.path(), "c.toml", "system = \"c-linux\"\n");
    let sys = |e, v| Config::load_from(e, v, &system).unwrap().system;
    assert_eq!(
        sys(Some(explicit.as_path()), Some(env.as_path())),
        "a-linux"
    );
    assert_eq!(sys(None, Some(env.as_path())), "b-linux");
    assert_eq!(sys(None, None), "c-linux");
    // A named file must exist; the system file is optional.
    let missing = dir.path().join("missing.toml");
    let err = Config::load_from(Some(&missing), None, &system).unwrap_err();
    assert!(
        matches!(&err, ConfigError::NotFound { path } if path == &missing),
        "{err:?}"
    );
    let err = Config::load_from(None, Some(&missing), &system).unwrap_err();
    assert!(matches!(&err, ConfigError::NotFound { .. }), "{err:?}");
    assert_eq!(
        Config::load_from(None, None, &missing).unwrap().source,
        None
    );
}

#[test]
fn load_reads_kof_config_env() {
    // The only test in this binary touching the environment.
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "env.toml", "system = \"env-linux\"\n");
    std::env::set_var("KOF_CONFIG", &p);
    let c = Config::load(None);
    std::env::remove_var("KOF_CONFIG");
    assert_eq!(c.unwrap().system, "env-linux");
}

#[test]
fn the_shims_directories_follow_the_store_unless_given() {
    let p = Path::new("kof.toml");
    let d = Config::parse("", p).unwrap();
    assert_eq!(d.containers_dir, PathBuf::from("/var/lib/kof/containers"));
    assert_eq!(d.dummy_images, vec!["docker.io/flox/empty".to_string()]);
    let c = Config::parse("store_dir = \"/srv/kof\"\n", p).unwrap();
    assert_eq!(c.containers_dir, PathBuf::from("/srv/kof/containers"));
    let c = Config::parse(
        "store_dir = \"/srv/kof\"\ncontainers_dir = \"/data/c\"\ndummy_images = [\"registry.example/empty\"]\n",
        p,
    )
    .unwrap();
    assert_eq!(c.containers_dir, PathBuf::from("/data/c"));
    assert_eq!(c.dummy_images, vec!["registry.example/empty".to_string()]);
}
