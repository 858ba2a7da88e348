//! FloxHub client: reads an environment's `metadata.json` and `N/env/manifest.lock` from the
//! environment's branch of `<floxhub_url>/<owner>/floxmeta`, over git's smart HTTP protocol.
//!
//! Git's pack protocol is not implemented here: that is out of scope, and the real `git` CLI
//! (Debian's git, installed on nodes) does it well. This module drives it safely:
//! - one bare mirror per owner, `<cache_dir>/<owner>.git`, created atomically (init in a
//!   temporary directory, then rename) and reused: later resolves only fetch;
//! - `git ls-remote <url> refs/heads/<name>` first when the mirror has the branch: an unchanged
//!   tip is not fetched again (one request instead of a fetch's negotiation);
//! - `git fetch --depth 1 <url> +refs/heads/<name>:refs/heads/<name>`: the branch tip holds
//!   every generation as a directory, so history is not needed;
//! - files are read from the fetched commit by id (`git cat-file`), sizes checked first;
//! - an exclusive lock file per owner (`<cache_dir>/<owner>.lock`) around fetches, shared
//!   around reads, so concurrent resolves never corrupt a mirror;
//! - a token is sent as HTTP basic auth (user `oauth`) through `http.extraHeader`, configured
//!   through the child's environment (`GIT_CONFIG_COUNT`...), never its arguments, so it does
//!   not show in `ps`; git is never allowed to prompt; the child environment is rebuilt from
//!   scratch (no `GIT_TRACE*` that could print the header), and neither the token nor the
//!   header is ever logged or put into an error;
//! - a low-speed limit and an overall deadline: on expiry the whole process group is killed;
//! - failures are mapped to typed errors naming `owner/name` and the URL.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use thiserror::Error;

use crate::generations::MAX_METADATA_BYTES;
use crate::lockfile::MAX_LOCKFILE_BYTES;
use kof_node_api::envref::EnvRef;

/// Longest token accepted.
pub const MAX_TOKEN_LEN: usize = 16 << 10;
/// Most bytes of git's stderr kept for error messages.
const MAX_STDERR: usize = 64 << 10;

/// A FloxHub token. Its `Debug` does not show it; there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Why a token was refused.
#[derive(Debug, Error)]
pub enum TokenError {
    /// The token file could not be read.
    #[error("cannot read FloxHub token file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Empty after trimming whitespace.
    #[error("FloxHub token{} is empty", at(.path))]
    Empty {
        /// The file, when read from one.
        path: Option<PathBuf>,
    },
    /// Holds characters a token cannot have (control characters, spaces, non-ASCII) or is
    /// longer than [`MAX_TOKEN_LEN`].
    #[error("FloxHub token{} is malformed (not printable ASCII, or too long)", at(.path))]
    Malformed {
        /// The file, when read from one.
        path: Option<PathBuf>,
    },
}

fn at(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

impl Token {
    /// A token from a string; surrounding whitespace is trimmed.
    pub fn new(s: &str) -> Result<Self, TokenError> {
        Self::checked(s, None)
    }

    fn checked(s: &str, path: Option<&Path>) -> Result<Self, TokenError> {
        let t = s.trim();
        if t.is_empty() {
            return Err(TokenError::Empty {
                path: path.map(Path::to_path_buf),
            });
        }
        if t.len() > MAX_TOKEN_LEN || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Malformed {
                path: path.map(Path::to_path_buf),
            });
        }
        Ok(Token(t.to_string()))
    }

    /// The `Authorization` header value: basic auth, user `oauth`, the token as password.
    fn authorization(&self) -> String {
        let cred = base64::engine::general_purpose::STANDARD.encode(format!("oauth:{}", self.0));
        format!("Authorization: Basic {cred}")
    }
}

/// Reads a token file (`floxhub_token_file`, e.g. the mounted `floxhub-token` secret):
/// whitespace trimmed, empty refused.
pub fn read_token_file(path: &Path) -> Result<Token, TokenError> {
    let mut text = String::new();
    File::open(path)
        .and_then(|f| {
            f.take(MAX_TOKEN_LEN as u64 + 1024)
                .read_to_string(&mut text)
        })
        .map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    Token::checked(&text, Some(path))
}

/// Why talking to FloxHub failed. Every variant names the environment (`owner/name`) and the
/// repository URL; none holds the token.
#[derive(Debug, Error)]
pub enum FloxHubError {
    /// The configured base URL is not `http://` or `https://`, has no host, or holds credentials.
    #[error("FloxHub URL {url:?} is not an http(s) URL with a host and without credentials")]
    BadBaseUrl {
        /// The URL.
        url: String,
    },
    /// The owner's repository exists but has no branch for the environment.
    #[error("environment {env} not found on FloxHub ({url} has no branch {branch:?})")]
    EnvironmentNotFound {
        /// `owner/name`.
        env: String,
        /// The repository URL.
        url: String,
        /// The branch looked for.
        branch: String,
    },
    /// The owner's repository does not exist (HTTP 404).
    #[error("environment {env}: owner not found on FloxHub ({url} does not exist)")]
    OwnerNotFound {
        /// `owner/name`.
        env: String,
        /// The repository URL.
        url: String,
    },
    /// HTTP 401 without a token: the environment is private.
    #[error("environment {env}: FloxHub requires authentication for {url} (no token given)")]
    AuthRequired {
        /// `owner/name`.
        env: String,
        /// The repository URL.
        url: String,
    },
    /// HTTP 401/403 with a token: wrong, expired, or lacking access.
    #[error("environment {env}: FloxHub refused the token for {url} (wrong, expired, or without access)")]
    AuthRefused {
        /// `owner/name`.
        env: String,
        /// The repository URL.
        url: String,
    },
    /// Could not reach FloxHub, or the transfer broke.
    #[error("environment {env}: network error fetching {url}: {detail}")]
    Network {
        /// `owner/name`.
        env: String,
        /// The repository URL.
        url: String,
        /// git's own words.
        detail: String,
    },
    /// The fetch did not finish in time (killed), or went below the low-speed limit.
    #[error("environment {env}: fetching {url} timed out after {secs}s")]
    Timeout {
        /// `owner/name`.
        env: String,
        /// The repository URL.
        url: String,
        /// The limit that was hit.
        secs: u64,
    },
    /// Git failed in a way not recognised above.
    #[error("environment {env}: git failed fetching {url}: {detail}")]
    Git {
        /// `owner/name`.
        env: String,
        /// The repository URL.
        url: String,
        /// git's own words.
        detail: String,
    },
    /// What the branch holds is not what an environment holds.
    #[error("environment {env}: bad data in {url}: {detail}")]
    BadData {
        /// `owner/name`.
        env: String,
        /// The repository URL.
        url: String,
        /// What is wrong.
        detail: String,
    },
    /// The local mirror or its lock could not be used.
    #[error("environment {env}: local mirror {path}")]
    Mirror {
        /// `owner/name`.
        env: String,
        /// The mirror or lock path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The `git` program could not be run.
    #[error("environment {env}: cannot run {git}")]
    Spawn {
        /// `owner/name`.
        env: String,
        /// The program.
        git: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// The result of a fetch: the commit the environment's branch points to now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedBranch {
    /// The commit id of the branch tip.
    pub commit: String,
    /// Whether the owner's mirror had to be created (false: an existing one was reused).
    pub created_mirror: bool,
}

/// Reads environments from FloxHub's floxmeta repositories.
#[derive(Debug, Clone)]
pub struct FloxHubClient {
    base_url: String,
    cache_dir: PathBuf,
    git: PathBuf,
    timeout: Duration,
    low_speed_time: Duration,
    low_speed_limit: u32,
}

/// Result of one git run.
struct GitOutput {
    status: ExitStatus,
    stdout: Vec<u8>,
    stdout_truncated: bool,
    stderr: String,
}

enum RunError {
    Spawn(io::Error),
    Timeout,
}

impl FloxHubClient {
    /// A client for the git base `base_url` (FloxHub's is `https://api.flox.dev/git`), keeping
    /// its mirrors under `cache_dir` (created if needed). Defaults: `git` from `PATH`, a
    /// 120 s overall timeout per git run, and below 1000 B/s for 30 s counts as stalled.
    pub fn new(base_url: &str, cache_dir: impl Into<PathBuf>) -> Result<Self, FloxHubError> {
        let base_url = base_url.trim_end_matches('/').to_string();
        let authority = base_url
            .strip_prefix("http://")
            .or_else(|| base_url.strip_prefix("https://"))
            .map(|rest| rest.split('/').next().unwrap_or(""));
        // Credentials in the URL would end up in logs and errors: tokens go in a token file.
        if !matches!(authority, Some(a) if !a.is_empty() && !a.contains('@')) {
            return Err(FloxHubError::BadBaseUrl {
                url: base_url.split('@').next_back().unwrap_or("").to_string(),
            });
        }
        Ok(FloxHubClient {
            base_url,
            cache_dir: cache_dir.into(),
            git: PathBuf::from("git"),
            timeout: Duration::from_secs(120),
            low_speed_time: Duration::from_secs(30),
            low_speed_limit: 1000,
        })
    }

    /// Overall time limit of each git run.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Transfers slower than `bytes_per_sec` for `time` are aborted.
    pub fn with_low_speed(mut self, bytes_per_sec: u32, time: Duration) -> Self {
        self.low_speed_limit = bytes_per_sec;
        self.low_speed_time = time;
        self
    }

    /// The `git` program to run.
    pub fn with_git(mut self, git: impl Into<PathBuf>) -> Self {
        self.git = git.into();
        self
    }

    /// The git base URL.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `<base>/<owner>/floxmeta`.
    pub fn repo_url(&self, owner: &str) -> String {
        format!("{}/{}/floxmeta", self.base_url, owner)
    }

    /// The owner's bare mirror.
    pub fn mirror_path(&self, owner: &str) -> PathBuf {
        self.cache_dir.join(format!("{owner}.git"))
    }

    fn lock_path(&self, owner: &str) -> PathBuf {
        self.cache_dir.join(format!("{owner}.lock"))
    }

    /// Fetches the environment's branch into the owner's mirror and returns its tip.
    pub fn fetch(
        &self,
        env: &EnvRef,
        token: Option<&Token>,
    ) -> Result<FetchedBranch, FloxHubError> {
        let name = env.env_name();
        let url = self.repo_url(&env.owner);
        let mirror_err = |path: &Path| {
            let name = name.clone();
            let path = path.to_path_buf();
            move |source| FloxHubError::Mirror {
                env: name,
                path,
                source,
            }
        };
        fs::create_dir_all(&self.cache_dir).map_err(mirror_err(&self.cache_dir))?;
        let lock_path = self.lock_path(&env.owner);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(mirror_err(&lock_path))?;
        lock.lock().map_err(mirror_err(&lock_path))?;

        let mirror = self.mirror_path(&env.owner);
        let created_mirror = !mirror.join("HEAD").exists();
        if created_mirror {
            self.create_mirror(env, &mirror)?;
        }

        let refspec = format!("+refs/heads/{0}:refs/heads/{0}", env.name);
        let mut config = self.transport_config();
        if let Some(t) = token {
            config.push(("http.extraHeader".into(), t.authorization()));
        }
        // A mirror already holding the branch asks FloxHub only for the tip (one request, the
        // ref advertisement): when it is the commit the mirror has, there is nothing to fetch.
        // Any failure here falls through to the fetch, which reports it properly.
        if !created_mirror {
            if let Ok(Some(local)) = self.branch_tip(&mirror, &env.name) {
                if self
                    .remote_tip(&mirror, &url, &env.name, &config)
                    .as_deref()
                    == Some(&local)
                {
                    drop(lock);
                    tracing::info!(env = %name, commit = %local, "floxmeta branch unchanged");
                    return Ok(FetchedBranch {
                        commit: local,
                        created_mirror,
                    });
                }
            }
        }
        tracing::debug!(env = %name, %url, "fetching floxmeta branch");
        let fetched = self
            .run_git(
                &mirror,
                &[
                    "fetch",
                    "--quiet",
                    "--no-tags",
                    "--no-write-fetch-head",
                    "--no-auto-gc",
                    "--no-auto-maintenance",
                    "--depth",
                    "1",
                    &url,
                    &refspec,
                ],
                &config,
                1 << 20,
            )
            .map_err(|e| self.run_error(e, &name, &url))
            .and_then(|out| {
                if out.status.success() {
                    return Ok(());
                }
                Err(classify_fetch_failure(
                    &out.stderr,
                    &FetchContext {
                        env: &name,
                        url: &url,
                        branch: &env.name,
                        had_token: token.is_some(),
                        low_speed_secs: self.low_speed_time.as_secs().max(1),
                    },
                ))
            });
        if let Err(e) = fetched {
            // A mirror made for an owner that turned out not to exist (or not to be reachable)
            // is not kept: the cache holds only owners that were fetched at least once.
            if created_mirror {
                if let Err(rm) = fs::remove_dir_all(&mirror) {
                    tracing::warn!(mirror = %mirror.display(), error = %rm, "cannot remove new mirror");
                }
            }
            return Err(e);
        }
        let Some(commit) = self
            .branch_tip(&mirror, &env.name)
            .map_err(|e| self.run_error(e, &name, &url))?
        else {
            return Err(FloxHubError::BadData {
                env: name,
                url,
                detail: format!("fetched branch {:?} does not point to a commit", env.name),
            });
        };
        drop(lock);
        tracing::info!(env = %name, %commit, created_mirror, "fetched floxmeta branch");
        Ok(FetchedBranch {
            commit,
            created_mirror,
        })
    }

    /// The commit the mirror's branch `branch` points to; `None` if it points to none.
    fn branch_tip(&self, mirror: &Path, branch: &str) -> Result<Option<String>, RunError> {
        let out = self.run_git(
            mirror,
            &[
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("refs/heads/{branch}^{{commit}}"),
            ],
            &[],
            4096,
        )?;
        let commit = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok((out.status.success() && is_object_id(&commit)).then_some(commit))
    }

    /// The commit FloxHub advertises for `branch` (`git ls-remote`), if it answers.
    fn remote_tip(
        &self,
        mirror: &Path,
        url: &str,
        branch: &str,
        config: &[(String, String)],
    ) -> Option<String> {
        let want = format!("refs/heads/{branch}");
        // Protocol version 0: the refs come with the advertisement itself (one GET); version 2
        // would ask for them in a second request.
        let mut config = config.to_vec();
        config.push(("protocol.version".into(), "0".into()));
        let out = self
            .run_git(
                mirror,
                &["ls-remote", "--quiet", url, &want],
                &config,
                64 << 10,
            )
            .ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let (oid, name) = l.split_once('\t')?;
            (name == want && is_object_id(oid)).then(|| oid.to_string())
        })
    }

    /// Reads `path` from `commit` in the owner's mirror: `None` if absent; an error if it is
    /// not a file or bigger than `limit`.
    pub fn read_file(
        &self,
        env: &EnvRef,
        commit: &str,
        path: &str,
        limit: usize,
    ) -> Result<Option<Vec<u8>>, FloxHubError> {
        let name = env.env_name();
        let url = self.repo_url(&env.owner);
        let bad = |detail: String| FloxHubError::BadData {
            env: name.clone(),
            url: url.clone(),
            detail,
        };
        if !is_object_id(commit) {
            return Err(bad(format!("{commit:?} is not a commit id")));
        }
        let lock_path = self.lock_path(&env.owner);
        let lock = File::open(&lock_path).map_err(|source| FloxHubError::Mirror {
            env: name.clone(),
            path: lock_path.clone(),
            source,
        })?;
        lock.lock_shared().map_err(|source| FloxHubError::Mirror {
            env: name.clone(),
            path: lock_path.clone(),
            source,
        })?;
        let mirror = self.mirror_path(&env.owner);
        let spec = format!("{commit}:{path}");
        // `-t` and `-s` print nothing and fail for a missing object, whatever the reason.
        let kind = self
            .run_git(&mirror, &["cat-file", "-t", &spec], &[], 256)
            .map_err(|e| self.run_error(e, &name, &url))?;
        if !kind.status.success() {
            // Distinguish "no such file" from "no such commit".
            let has_commit = self
                .run_git(
                    &mirror,
                    &["cat-file", "-e", &format!("{commit}^{{commit}}")],
                    &[],
                    256,
                )
                .map_err(|e| self.run_error(e, &name, &url))?;
            if has_commit.status.success() {
                return Ok(None);
            }
            return Err(bad(format!("commit {commit} is not in the mirror")));
        }
        let kind = String::from_utf8_lossy(&kind.stdout).trim().to_string();
        if kind != "blob" {
            return Err(bad(format!("{path} is a {kind}, not a file")));
        }
        let size = self
            .run_git(&mirror, &["cat-file", "-s", &spec], &[], 256)
            .map_err(|e| self.run_error(e, &name, &url))?;
        let size: usize = String::from_utf8_lossy(&size.stdout)
            .trim()
            .parse()
            .map_err(|_| bad(format!("cannot size {path}")))?;
        if size > limit {
            return Err(bad(format!(
                "{path} is {size} bytes, more than the {limit} accepted"
            )));
        }
        let out = self
            .run_git(&mirror, &["cat-file", "blob", &spec], &[], limit)
            .map_err(|e| self.run_error(e, &name, &url))?;
        if !out.status.success() || out.stdout_truncated || out.stdout.len() != size {
            return Err(bad(format!("cannot read {path}: {}", out.stderr.trim())));
        }
        drop(lock);
        Ok(Some(out.stdout))
    }

    /// `metadata.json` of the fetched branch, as text.
    pub fn read_metadata(&self, env: &EnvRef, commit: &str) -> Result<String, FloxHubError> {
        let bytes = self
            .read_file(env, commit, "metadata.json", MAX_METADATA_BYTES)?
            .ok_or_else(|| FloxHubError::BadData {
                env: env.env_name(),
                url: self.repo_url(&env.owner),
                detail: format!("branch {:?} has no metadata.json", env.name),
            })?;
        self.utf8(env, bytes, "metadata.json")
    }

    /// `<generation>/env/manifest.lock` of the fetched branch, as text; `None` if the
    /// generation has no lockfile.
    pub fn read_lockfile(
        &self,
        env: &EnvRef,
        commit: &str,
        generation: u64,
    ) -> Result<Option<String>, FloxHubError> {
        let path = format!("{generation}/env/manifest.lock");
        match self.read_file(env, commit, &path, MAX_LOCKFILE_BYTES)? {
            Some(bytes) => self.utf8(env, bytes, &path).map(Some),
            None => Ok(None),
        }
    }

    fn utf8(&self, env: &EnvRef, bytes: Vec<u8>, path: &str) -> Result<String, FloxHubError> {
        String::from_utf8(bytes).map_err(|_| FloxHubError::BadData {
            env: env.env_name(),
            url: self.repo_url(&env.owner),
            detail: format!("{path} is not UTF-8"),
        })
    }

    /// Creates the owner's bare mirror: init in a temporary directory, then rename into place,
    /// so a half-made mirror is never used. Called with the owner's lock held.
    fn create_mirror(&self, env: &EnvRef, mirror: &Path) -> Result<(), FloxHubError> {
        let name = env.env_name();
        let url = self.repo_url(&env.owner);
        let tmp = self
            .cache_dir
            .join(format!(".{}.git.tmp-{}", env.owner, std::process::id()));
        let mirror_err = |path: &Path, source| FloxHubError::Mirror {
            env: name.clone(),
            path: path.to_path_buf(),
            source,
        };
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| mirror_err(&tmp, e))?;
        }
        if mirror.exists() {
            // A directory without HEAD: not a usable mirror (left by hand, or damaged).
            fs::remove_dir_all(mirror).map_err(|e| mirror_err(mirror, e))?;
        }
        let tmp_s = tmp.to_string_lossy().to_string();
        let steps: [&[&str]; 4] = [
            &["init", "--quiet", "--bare", &tmp_s],
            &["-C", &tmp_s, "config", "gc.auto", "0"],
            &["-C", &tmp_s, "config", "maintenance.auto", "false"],
            &["-C", &tmp_s, "config", "core.logAllRefUpdates", "false"],
        ];
        for args in steps {
            let out = self
                .run_git(&self.cache_dir, args, &[], 4096)
                .map_err(|e| self.run_error(e, &name, &url))?;
            if !out.status.success() {
                return Err(FloxHubError::Mirror {
                    env: name.clone(),
                    path: tmp.clone(),
                    source: io::Error::other(format!("git {}: {}", args[0], out.stderr.trim())),
                });
            }
        }
        fs::rename(&tmp, mirror).map_err(|e| mirror_err(mirror, e))?;
        tracing::info!(owner = %env.owner, mirror = %mirror.display(), "created floxmeta mirror");
        Ok(())
    }

    /// Configuration of every network run: no prompts, no credential helpers, only http(s),
    /// low-speed abort.
    fn transport_config(&self) -> Vec<(String, String)> {
        vec![
            ("credential.helper".into(), String::new()),
            ("core.askPass".into(), "/bin/false".into()),
            ("protocol.allow".into(), "never".into()),
            ("protocol.http.allow".into(), "always".into()),
            ("protocol.https.allow".into(), "always".into()),
            (
                "http.lowSpeedLimit".into(),
                self.low_speed_limit.to_string(),
            ),
            (
                "http.lowSpeedTime".into(),
                self.low_speed_time.as_secs().max(1).to_string(),
            ),
        ]
    }

    fn run_error(&self, e: RunError, env: &str, url: &str) -> FloxHubError {
        match e {
            RunError::Spawn(source) => FloxHubError::Spawn {
                env: env.to_string(),
                git: self.git.clone(),
                source,
            },
            RunError::Timeout => FloxHubError::Timeout {
                env: env.to_string(),
                url: url.to_string(),
                secs: self.timeout.as_secs(),
            },
        }
    }

    /// Runs git in `dir` with a clean environment, `config` passed through
    /// `GIT_CONFIG_COUNT`/`GIT_CONFIG_KEY_n`/`GIT_CONFIG_VALUE_n` (never argv), stdout kept up
    /// to `stdout_limit` bytes, and the whole process group killed at the deadline.
    fn run_git(
        &self,
        dir: &Path,
        args: &[&str],
        config: &[(String, String)],
        stdout_limit: usize,
    ) -> Result<GitOutput, RunError> {
        let mut cmd = Command::new(&self.git);
        cmd.args(args)
            .current_dir(dir)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // Pass through only what git needs to find itself, a proxy, and CA certificates.
        for var in [
            "PATH",
            "http_proxy",
            "https_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "all_proxy",
            "ALL_PROXY",
            "no_proxy",
            "NO_PROXY",
            "SSL_CERT_FILE",
            "SSL_CERT_DIR",
            "GIT_SSL_CAINFO",
            "GIT_EXEC_PATH",
        ] {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        cmd.env("LC_ALL", "C")
            .env("HOME", dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "/bin/false")
            .env("SSH_ASKPASS", "/bin/false")
            .env("GIT_CONFIG_COUNT", config.len().to_string());
        for (i, (k, v)) in config.iter().enumerate() {
            cmd.env(format!("GIT_CONFIG_KEY_{i}"), k)
                .env(format!("GIT_CONFIG_VALUE_{i}"), v);
        }
        let mut child = cmd.spawn().map_err(RunError::Spawn)?;
        let pgid = child.id() as libc::pid_t;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let out_reader = thread::spawn(move || read_bounded(stdout, stdout_limit));
        let err_reader = thread::spawn(move || read_bounded(stderr, MAX_STDERR));

        let status = match wait_exit(&mut child, self.timeout) {
            Ok(Some(())) => Some(child.wait().map_err(RunError::Spawn)?),
            Ok(None) => {
                // SAFETY: kill(2) on the process group we created; the leader is not yet
                // reaped (only `child.wait()` reaps it), so the group id cannot have been
                // reused.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                let _ = child.wait();
                None
            }
            Err(e) => {
                // SAFETY: as above.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                let _ = child.wait();
                return Err(RunError::Spawn(e));
            }
        };
        let (stdout, stdout_truncated) = out_reader.join().unwrap_or_default();
        let (stderr, _) = err_reader.join().unwrap_or_default();
        let status = status.ok_or(RunError::Timeout)?;
        Ok(GitOutput {
            status,
            stdout,
            stdout_truncated,
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }
}

/// Waits until `child` has exited (without reaping it, so its pid and process group stay
/// its own until `wait`), at most `timeout`: `Ok(None)` when it is still running then.
///
/// A pidfd tells the moment of the exit, so a git command that takes 40 ms (one FloxHub round
/// trip) is answered in 40 ms; polling `try_wait` at growing intervals answered it up to one
/// interval late (63 ms for a 40 ms `ls-remote`), on the path of every live pod start. Kernels
/// without pidfds (before 5.3) fall back to polling every millisecond to 10 ms.
fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> std::io::Result<Option<()>> {
    if let Ok(exited) = kof_node_api::pidfd::wait_exit(child.id() as i32, Some(timeout)) {
        return Ok(exited.then_some(()));
    }
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        // `try_wait` reaps: the exit status is kept in `child`, and `wait` returns it again.
        if child.try_wait()?.is_some() {
            return Ok(Some(()));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// Reads everything (so the writer never blocks), keeping at most `limit` bytes.
fn read_bounded(mut r: impl Read, limit: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = [0u8; 64 << 10];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = limit.saturating_sub(kept.len());
                if n > room {
                    truncated = true;
                }
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (kept, truncated)
}

fn is_object_id(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What a failed fetch was about.
struct FetchContext<'a> {
    env: &'a str,
    url: &'a str,
    branch: &'a str,
    had_token: bool,
    low_speed_secs: u64,
}

/// Maps git's (C-locale) stderr of a failed fetch to a typed error.
fn classify_fetch_failure(stderr: &str, cx: &FetchContext<'_>) -> FloxHubError {
    let (branch, had_token) = (cx.branch, cx.had_token);
    let detail = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let (env, url) = (cx.env.to_string(), cx.url.to_string());
    let has = |s: &str| stderr.contains(s);
    if has("couldn't find remote ref") {
        FloxHubError::EnvironmentNotFound {
            env,
            url,
            branch: branch.to_string(),
        }
    } else if has("returned error: 401")
        || has("returned error: 403")
        || has("Authentication failed")
        || has("could not read Username")
        || has("could not read Password")
    {
        if had_token {
            FloxHubError::AuthRefused { env, url }
        } else {
            FloxHubError::AuthRequired { env, url }
        }
    } else if (has("not found") && has("repository")) || has("returned error: 404") {
        FloxHubError::OwnerNotFound { env, url }
    } else if has("Operation too slow") || has("timed out") || has("Timeout was reached") {
        FloxHubError::Timeout {
            env,
            url,
            secs: cx.low_speed_secs,
        }
    } else if has("Failed to connect")
        || has("Could not resolve")
        || has("Connection refused")
        || has("Connection reset")
        || has("unable to access")
        || has("early EOF")
        || has("the remote end hung up")
        || has("RPC failed")
    {
        FloxHubError::Network { env, url, detail }
    } else {
        FloxHubError::Git { env, url, detail }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_is_trimmed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("floxhub-token");
        fs::write(&p, "  abc.DEF-123_xyz \n").unwrap();
        let t = read_token_file(&p).unwrap();
        assert_eq!(t, Token::new("abc.DEF-123_xyz").unwrap());
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        assert_eq!(
            t.authorization(),
            format!(
                "Authorization: Basic {}",
                base64::engine::general_purpose::STANDARD.encode("oauth:abc.DEF-123_xyz")
            )
        );

        fs::write(&p, " \n\t").unwrap();
        let e = read_token_file(&p).unwrap_err();
        assert!(matches!(e, TokenError::Empty { .. }));
        assert!(e.to_string().contains("floxhub-token"), "{e}");
        fs::write(&p, "abc\ndef").unwrap();
        assert!(matches!(
            read_token_file(&p),
            Err(TokenError::Malformed { .. })
        ));
        let e = read_token_file(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, TokenError::Read { .. }));
        assert!(matches!(
            Token::new(&"a".repeat(MAX_TOKEN_LEN + 1)),
            Err(TokenError::Malformed { .. })
        ));
    }

    #[test]
    fn base_url_must_be_http() {
        assert!(FloxHubClient::new("https://api.flox.dev/git/", "/tmp/x").is_ok());
        assert_eq!(
            FloxHubClient::new("https://api.flox.dev/git/", "/tmp/x")
                .unwrap()
                .repo_url("alice"),
            "https://api.flox.dev/git/alice/floxmeta"
        );
        for bad in [
            "file:///srv/git",
            "ext::sh -c evil",
            "/srv/git",
            "ssh://h/x",
        ] {
            assert!(matches!(
                FloxHubClient::new(bad, "/tmp/x"),
                Err(FloxHubError::BadBaseUrl { .. })
            ));
        }
    }
}
