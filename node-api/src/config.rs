//! The node configuration: one TOML file shared by the command line and the daemon.
//!
//! Every key is optional; unknown keys are refused (a typo must not silently fall back to a
//! default). [`Config::load`] picks the file: an explicit path (which must exist), else the
//! `KOF_CONFIG` environment variable (which must exist too), else `/etc/kof/config.toml` if it
//! exists, else the defaults. Trusted keys and substituter URLs are parsed at load time, so a bad
//! value fails at start-up with the file and key named, not at the first download.

use std::path::{Path, PathBuf};

use kof_nar::PublicKey;
use serde::Deserialize;
use thiserror::Error;

/// The system-wide config file, used when it exists and nothing else is named.
pub const SYSTEM_CONFIG: &str = "/etc/kof/config.toml";
/// The environment variable naming a config file.
pub const CONFIG_ENV: &str = "KOF_CONFIG";

/// Why a config could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// A config file named explicitly (argument or `KOF_CONFIG`) does not exist.
    #[error("config file {path} does not exist")]
    NotFound {
        /// The file.
        path: PathBuf,
    },
    /// The file exists but could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("invalid config file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error (names the key and line).
        source: toml::de::Error,
    },
    /// A `trusted_public_keys` entry is not `name:base64(32 bytes)`.
    #[error("invalid config file {path}: trusted_public_keys entry {key:?}")]
    BadPublicKey {
        /// The file.
        path: PathBuf,
        /// The entry as written.
        key: String,
        /// Why it was refused.
        source: kof_nar::signature::SignatureError,
    },
    /// A key has a value that parses but makes no sense.
    #[error("invalid config file {path}: {key}: {reason}")]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// What to fetch ahead when an environment is mounted (used by the daemon).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Prefetch {
    /// Fetch the whole closure in the background.
    #[default]
    Closure,
    /// Fetch only what is read.
    None,
}

/// The file as written: every key optional, nothing unknown.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    floxhub_url: Option<String>,
    floxhub_token_file: Option<PathBuf>,
    substituters: Option<Vec<String>>,
    trusted_public_keys: Option<Vec<String>>,
    require_sigs: Option<bool>,
    system: Option<String>,
    store_dir: Option<PathBuf>,
    max_parallel_downloads: Option<usize>,
    socket: Option<PathBuf>,
    mount_dir: Option<PathBuf>,
    containers_dir: Option<PathBuf>,
    dummy_images: Option<Vec<String>>,
    prefetch: Option<Prefetch>,
    metrics_addr: Option<String>,
    read_timeout_secs: Option<u64>,
    download_attempts: Option<u32>,
    demand_timeout_secs: Option<u64>,
    idle_view_secs: Option<u64>,
    store_max_bytes: Option<RawSize>,
    store_min_free: Option<RawSize>,
    fuse_server_cgroup: Option<String>,
}

/// A size as written: bytes as an integer, or a string (`"20GiB"`, `"10%"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

/// A store size limit (`store_max_bytes`, `store_min_free`): bytes, or a share of the store's
/// file system.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SizeLimit {
    /// So many bytes.
    Bytes(u64),
    /// This percentage (0 to 100) of the size of the file system holding `store_dir`.
    Percent(f64),
}

impl SizeLimit {
    /// Parses `"20GiB"`, `"500M"`, `"1048576"`, `"10%"` (units: B, K/KB/KiB, M/MB/MiB, G/GB/GiB,
    /// T/TB/TiB; KB and friends are decimal, KiB and single letters binary).
    pub fn parse(text: &str) -> Result<SizeLimit, String> {
        let t = text.trim();
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("{text:?} is not a percentage such as \"10%\""))?;
            if !(0.0..=100.0).contains(&v) {
                return Err(format!("{text:?}: a percentage is between 0 and 100"));
            }
            return Ok(SizeLimit::Percent(v));
        }
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let num: f64 = num
            .parse()
            .map_err(|_| format!("{text:?} is not a size such as \"20GiB\" or \"10%\""))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "K" | "KiB" => 1 << 10,
            "M" | "MiB" => 1 << 20,
            "G" | "GiB" => 1 << 30,
            "T" | "TiB" => 1 << 40,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            u => return Err(format!("{text:?}: unknown unit {u:?}")),
        };
        Ok(SizeLimit::Bytes((num * mult as f64) as u64))
    }

    /// The limit in bytes on a file system of `fs_bytes` bytes.
    pub fn bytes(&self, fs_bytes: u64) -> u64 {
        match *self {
            SizeLimit::Bytes(b) => b,
            SizeLimit::Percent(p) => (fs_bytes as f64 * p / 100.0) as u64,
        }
    }
}

impl std::fmt::Display for SizeLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SizeLimit::Bytes(b) => write!(f, "{b} bytes"),
            SizeLimit::Percent(p) => write!(f, "{p}% of the file system"),
        }
    }
}

fn size_limit(raw: Option<RawSize>) -> Result<Option<SizeLimit>, String> {
    match raw {
        None => Ok(None),
        Some(RawSize::Bytes(b)) => Ok(Some(SizeLimit::Bytes(b))),
        Some(RawSize::Text(t)) => SizeLimit::parse(&t).map(Some),
    }
}

/// The node configuration, defaults filled in and values checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config came from (`None`: built-in defaults).
    pub source: Option<PathBuf>,
    /// FloxHub's git endpoint.
    pub floxhub_url: String,
    /// File holding the FloxHub token, if any.
    pub floxhub_token_file: Option<PathBuf>,
    /// Binary caches, tried in order (`http://`, `https://`, `file://`).
    pub substituters: Vec<String>,
    /// Keys whose signatures are trusted.
    pub trusted_public_keys: Vec<PublicKey>,
    /// Refuse narinfos without a valid signature by a trusted key.
    pub require_sigs: bool,
    /// The Nix system of this node (`x86_64-linux`).
    pub system: String,
    /// Where the store lives.
    pub store_dir: PathBuf,
    /// At most this many NAR downloads at once.
    pub max_parallel_downloads: usize,
    /// The daemon's API socket.
    pub socket: PathBuf,
    /// Where the daemon mounts environments.
    pub mount_dir: PathBuf,
    /// Where the containerd shim keeps each container's root (an overlay's upper, work and
    /// mount point) and its record; default `<store_dir>/containers`.
    pub containers_dir: PathBuf,
    /// Images the shim treats as the few-byte placeholder of an environment pod: the container's
    /// root becomes the environment's view. A container of any other image keeps its root and
    /// gets the environment mounted on top (`/nix/store`, `FLOX_ENV`). Names without a tag or
    /// digest, as CRI's `io.kubernetes.cri.image-name` gives them (`docker.io/flox/empty`).
    pub dummy_images: Vec<String>,
    /// What the daemon fetches ahead.
    pub prefetch: Prefetch,
    /// Address for the daemon's metrics endpoint, if any.
    pub metrics_addr: Option<String>,
    /// Longest wait for any read from a cache (or FloxHub) before the transfer counts as
    /// stalled and is retried.
    pub read_timeout: std::time::Duration,
    /// Longest a read through a view waits for bytes not yet fetched (retries included) before
    /// it fails with `EIO`.
    pub demand_timeout: std::time::Duration,
    /// Attempts per download (and per narinfo) before giving up on a transient failure.
    pub download_attempts: u32,
    /// How long the daemon keeps a view after its last lease, for the next pod of the same
    /// generation to start on what the kernel cached of it (dentries, inodes, pages);
    /// `idle_view_secs`, 0 to remove a view with its last lease.
    pub idle_view: std::time::Duration,
    /// The most the store (objects, metadata and derived data under `store_dir`) may use
    /// before the daemon collects by itself (`store_max_bytes`); none by default.
    pub store_max_bytes: Option<SizeLimit>,
    /// The least free space the store's file system should keep before the daemon collects by
    /// itself (`store_min_free`); none by default.
    pub store_min_free: Option<SizeLimit>,
    /// The cgroup (a relative path, made under the root of each cgroup hierarchy of the host)
    /// the FUSE server moves into at start, so that killing whatever started it (the daemon's
    /// container) leaves the views serving (`fuse_server_cgroup`, default `kof-fuse-server`;
    /// `""` to stay in the starter's cgroup).
    pub fuse_server_cgroup: Option<String>,
}

/// This machine's Nix system name (`x86_64-linux`, `aarch64-darwin`...).
pub fn host_system() -> String {
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        other => other,
    };
    format!("{}-{}", std::env::consts::ARCH, os)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            source: None,
            floxhub_url: "https://api.flox.dev/git".to_string(),
            floxhub_token_file: None,
            substituters: Vec::new(),
            trusted_public_keys: Vec::new(),
            require_sigs: true,
            system: host_system(),
            store_dir: PathBuf::from("/var/lib/kof"),
            max_parallel_downloads: 16,
            socket: PathBuf::from("/run/kof/fetcherd.sock"),
            mount_dir: PathBuf::from("/var/lib/kof/mnt"),
            containers_dir: PathBuf::from("/var/lib/kof/containers"),
            dummy_images: vec!["docker.io/flox/empty".to_string()],
            prefetch: Prefetch::Closure,
            metrics_addr: None,
            read_timeout: std::time::Duration::from_secs(30),
            demand_timeout: std::time::Duration::from_secs(60),
            download_attempts: 5,
            idle_view: std::time::Duration::from_secs(600),
            store_max_bytes: None,
            store_min_free: None,
            fuse_server_cgroup: Some("kof-fuse-server".to_string()),
        }
    }
}

impl Config {
    /// Loads the config: `path` if given (must exist), else `$KOF_CONFIG` (must exist), else
    /// [`SYSTEM_CONFIG`] if it exists, else the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env = std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty());
        Self::load_from(
            path,
            env.as_deref().map(Path::new),
            Path::new(SYSTEM_CONFIG),
        )
    }

    /// [`Config::load`] with the environment and the system path given, for callers (and tests)
    /// that must not depend on the process environment.
    pub fn load_from(
        explicit: Option<&Path>,
        env: Option<&Path>,
        system: &Path,
    ) -> Result<Config, ConfigError> {
        let chosen = match explicit.or(env) {
            Some(p) => {
                if !p.exists() {
                    return Err(ConfigError::NotFound {
                        path: p.to_path_buf(),
                    });
                }
                Some(p)
            }
            None => system.exists().then_some(system),
        };
        match chosen {
            None => Ok(Config::default()),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                Self::parse(&text, p)
            }
        }
    }

    /// Parses config text; `path` is only used to name the file in errors and in `source`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        let d = Config::default();
        let bad = |key: &'static str, reason: String| ConfigError::BadValue {
            path: path.to_path_buf(),
            key,
            reason,
        };
        let trusted_public_keys = raw
            .trusted_public_keys
            .unwrap_or_default()
            .into_iter()
            .map(|k| {
                PublicKey::parse(&k).map_err(|source| ConfigError::BadPublicKey {
                    path: path.to_path_buf(),
                    key: k.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let substituters = raw.substituters.unwrap_or_default();
        for s in &substituters {
            let ok = ["http://", "https://", "file://"]
                .iter()
                .any(|scheme| s.starts_with(scheme) && s.len() > scheme.len());
            if !ok {
                return Err(bad(
                    "substituters",
                    format!("{s:?} is not an http://, https:// or file:// URL"),
                ));
            }
        }
        let max_parallel_downloads = raw
            .max_parallel_downloads
            .unwrap_or(d.max_parallel_downloads);
        if max_parallel_downloads == 0 {
            return Err(bad("max_parallel_downloads", "must be at least 1".into()));
        }
        let read_timeout = match raw.read_timeout_secs {
            Some(0) => return Err(bad("read_timeout_secs", "must be at least 1".into())),
            Some(s) => std::time::Duration::from_secs(s),
            None => d.read_timeout,
        };
        let demand_timeout = match raw.demand_timeout_secs {
            Some(0) => return Err(bad("demand_timeout_secs", "must be at least 1".into())),
            Some(s) => std::time::Duration::from_secs(s),
            None => d.demand_timeout,
        };
        let idle_view = raw
            .idle_view_secs
            .map(std::time::Duration::from_secs)
            .unwrap_or(d.idle_view);
        let download_attempts = raw.download_attempts.unwrap_or(d.download_attempts);
        if download_attempts == 0 {
            return Err(bad("download_attempts", "must be at least 1".into()));
        }
        let store_max_bytes =
            size_limit(raw.store_max_bytes).map_err(|r| bad("store_max_bytes", r))?;
        let store_min_free =
            size_limit(raw.store_min_free).map_err(|r| bad("store_min_free", r))?;
        let fuse_server_cgroup = match raw.fuse_server_cgroup {
            None => d.fuse_server_cgroup,
            Some(c) if c.is_empty() => None,
            Some(c) => {
                let ok = !c.starts_with('/')
                    && c.split('/')
                        .all(|p| !p.is_empty() && p != "." && p != ".." && !p.contains('\0'));
                if !ok {
                    return Err(bad(
                        "fuse_server_cgroup",
                        format!("{c:?} is not a relative cgroup path such as kof-fuse-server"),
                    ));
                }
                Some(c)
            }
        };
        let system = raw.system.unwrap_or(d.system);
        if system.is_empty() || !system.contains('-') {
            return Err(bad(
                "system",
                format!("{system:?} is not a Nix system such as x86_64-linux"),
            ));
        }
        Ok(Config {
            source: Some(path.to_path_buf()),
            floxhub_url: raw.floxhub_url.unwrap_or(d.floxhub_url),
            floxhub_token_file: raw.floxhub_token_file,
            substituters,
            trusted_public_keys,
            require_sigs: raw.require_sigs.unwrap_or(d.require_sigs),
            system,
            containers_dir: raw
                .containers_dir
                .or_else(|| raw.store_dir.as_ref().map(|s| s.join("containers")))
                .unwrap_or(d.containers_dir),
            dummy_images: raw.dummy_images.unwrap_or(d.dummy_images),
            store_dir: raw.store_dir.unwrap_or(d.store_dir),
            max_parallel_downloads,
            socket: raw.socket.unwrap_or(d.socket),
            mount_dir: raw.mount_dir.unwrap_or(d.mount_dir),
            prefetch: raw.prefetch.unwrap_or(d.prefetch),
            metrics_addr: raw.metrics_addr,
            read_timeout,
            demand_timeout,
            download_attempts,
            idle_view,
            store_max_bytes,
            store_min_free,
            fuse_server_cgroup,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_limits_parse_as_bytes_sizes_and_percentages() {
        let c = Config::parse(
            "store_max_bytes = \"20GiB\"\nstore_min_free = \"10%\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.store_max_bytes, Some(SizeLimit::Bytes(20 << 30)));
        assert_eq!(c.store_min_free, Some(SizeLimit::Percent(10.0)));
        assert_eq!(c.store_min_free.unwrap().bytes(1000), 100);
        let c = Config::parse("store_max_bytes = 1048576\n", Path::new("t.toml")).unwrap();
        assert_eq!(c.store_max_bytes, Some(SizeLimit::Bytes(1 << 20)));
        assert_eq!(c.store_min_free, None);
        assert_eq!(SizeLimit::parse("1.5M"), Ok(SizeLimit::Bytes(3 << 19)));
        assert_eq!(
            SizeLimit::parse("2 GB"),
            Ok(SizeLimit::Bytes(2_000_000_000))
        );
        for bad in ["lots", "10 parsecs", "120%", "-1"] {
            assert!(SizeLimit::parse(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            Config::parse("store_min_free = \"x%\"\n", Path::new("t.toml")),
            Err(ConfigError::BadValue {
                key: "store_min_free",
                ..
            })
        ));
    }
}
