//! One Nix binary cache, spoken to over HTTP(S) or read from a local `file://` directory.
//!
//! [`BinaryCache`] fetches `nix-cache-info`, narinfos, `.ls` listings, kof index files and
//! (compressed) NAR streams. Metadata bodies served with a `Content-Encoding` (S3-hosted caches
//! send `br` or `zstd`) are decoded as Nix decodes them ([`crate::encoding`]), under the same
//! size limit as plain ones; NAR bodies never are (their compression is the narinfo's). Everything
//! it returns except index files is parsed with `kof-nar` and checked for what can be checked
//! here (the narinfo names the path asked for, bodies stay under a size limit); signatures are
//! [`crate::substituters`]' job and NAR contents the fetcher's and the store's. Small requests are
//! retried with exponential backoff and jitter on transient failures (5xx, 429, connection errors,
//! timeouts, truncated bodies); a NAR stream is retried only while opening it, since a failure
//! in the middle of a body is retried by the fetcher for the whole path.

use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use kof_nar::listing::Listing;
use kof_nar::{NarInfo, StorePath};
use thiserror::Error;
use tokio::io::AsyncReadExt;

use crate::encoding::{self, DecodeError, Encoding};

/// Largest narinfo, `nix-cache-info` or listing body accepted (as received and decoded), by
/// default.
pub const DEFAULT_MAX_METADATA_BYTES: usize = 1 << 20;
/// Largest index file (`<hashpart>.kof-index`) accepted, as received and decoded.
pub const MAX_INDEX_BYTES: usize = 64 << 20;
/// Size of the chunks a `file://` NAR is read in.
const FILE_CHUNK: usize = 64 * 1024;

/// `" for /nix/store/..."` when the request was about a store path.
fn for_path(path: &Option<StorePath>) -> String {
    match path {
        Some(p) => format!(" (for {p})"),
        None => String::new(),
    }
}

/// `" (decoded from br)"` when a body had a `Content-Encoding`.
fn decoded_from(encoding: &Option<Encoding>) -> String {
    match encoding {
        Some(e) => format!(" (decoded from {e})"),
        None => String::new(),
    }
}

/// Why a URL does not parse (`url::ParseError`, as reqwest uses it).
pub type UrlParseError = <reqwest::Url as std::str::FromStr>::Err;

/// Why a request to a cache failed. Every variant names the URL, and the store path when the
/// request was about one.
#[derive(Debug, Error)]
pub enum CacheError {
    /// The substituter URL itself is unusable.
    #[error("bad binary cache URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why.
        reason: String,
        /// The parse error, when the URL does not parse.
        #[source]
        source: Option<UrlParseError>,
    },
    /// Connecting, sending, or reading the body failed (includes timeouts and truncated bodies).
    #[error("GET {url}{}", for_path(.path))]
    Transport {
        /// The URL requested.
        url: String,
        /// The store path it was for.
        path: Option<StorePath>,
        /// reqwest's error.
        source: reqwest::Error,
    },
    /// The server answered with a status that is neither success nor 404.
    #[error("GET {url}{}: HTTP status {status}", for_path(.path))]
    Status {
        /// The URL requested.
        url: String,
        /// The store path it was for.
        path: Option<StorePath>,
        /// The status code.
        status: u16,
    },
    /// A metadata body was larger than allowed.
    #[error("GET {url}{}: body larger than {limit} bytes", for_path(.path))]
    TooLarge {
        /// The URL requested.
        url: String,
        /// The store path it was for.
        path: Option<StorePath>,
        /// The limit.
        limit: usize,
    },
    /// Reading a `file://` cache failed.
    #[error("reading {url}{}", for_path(.path))]
    File {
        /// The URL.
        url: String,
        /// The store path it was for.
        path: Option<StorePath>,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A metadata body's `Content-Encoding` is unknown, or the body does not decode in it (or
    /// decodes to more than the limit).
    #[error("GET {url}{}: cannot decode the body", for_path(.path))]
    ContentEncoding {
        /// The URL.
        url: String,
        /// The store path it was for.
        path: Option<StorePath>,
        /// Which encoding, and why.
        source: DecodeError,
    },
    /// A metadata body is not UTF-8 (after decoding its `Content-Encoding`, if it had one: a
    /// flipped byte in a `br` body, which carries no checksum, can decode to anything).
    #[error("GET {url}{}: body{} is not UTF-8", for_path(.path), decoded_from(.encoding))]
    NotUtf8 {
        /// The URL.
        url: String,
        /// The store path it was for.
        path: Option<StorePath>,
        /// The `Content-Encoding` the body was decoded from.
        encoding: Option<Encoding>,
        /// Where the bytes stop being UTF-8.
        source: std::str::Utf8Error,
    },
    /// The narinfo does not parse.
    #[error("invalid narinfo {url} (for {path})")]
    NarInfo {
        /// The URL.
        url: String,
        /// The store path asked for.
        path: StorePath,
        /// The parse error.
        source: Box<kof_nar::narinfo::NarInfoError>,
    },
    /// The narinfo describes another store path than the one asked for.
    #[error("narinfo {url} was asked for {requested} but describes {got}")]
    WrongStorePath {
        /// The URL.
        url: String,
        /// The path asked for.
        requested: StorePath,
        /// The path it names.
        got: StorePath,
    },
    /// The `.ls` listing does not parse.
    #[error("invalid NAR listing {url} (for {path})")]
    Listing {
        /// The URL.
        url: String,
        /// The store path.
        path: StorePath,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// A ranged NAR request was answered with another range than asked for.
    #[error("GET {url}{} bytes {start}..{end}: {reason}", for_path(.path))]
    BadRange {
        /// The URL.
        url: String,
        /// The store path it was for.
        path: Option<StorePath>,
        /// First byte asked for.
        start: u64,
        /// End (exclusive) asked for.
        end: u64,
        /// What was wrong.
        reason: String,
    },
    /// `nix-cache-info` is malformed.
    #[error("invalid {url}: {reason}")]
    CacheInfo {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The cache serves a store other than `/nix/store`.
    #[error("{url} has StoreDir {store_dir:?}, not /nix/store")]
    WrongStoreDir {
        /// The URL.
        url: String,
        /// What it says.
        store_dir: String,
    },
}

impl CacheError {
    /// Whether trying again may succeed (server errors, rate limits, connection trouble,
    /// timeouts, truncated bodies).
    pub fn is_transient(&self) -> bool {
        match self {
            CacheError::Transport { .. } => true,
            CacheError::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            _ => false,
        }
    }
}

/// How requests are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all (at least 1).
    pub attempts: u32,
    /// Delay before the second attempt; doubled for each further one, with ±50% jitter.
    pub base_delay: Duration,
    /// Largest delay between attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The delay to wait after failed attempt number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let capped = exp.min(self.max_delay);
        let jitter = rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..1.5);
        capped.mul_f64(jitter)
    }
}

/// Options of the shared HTTP client.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Limit on establishing a connection.
    pub connect_timeout: Duration,
    /// Limit on waiting for each read (each body chunk), so a stalled transfer fails.
    pub read_timeout: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
        }
    }
}

/// Builds the HTTP client every cache of a process shares (connection pooling, rustls).
pub fn http_client(opts: &HttpOptions) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(opts.connect_timeout)
        .read_timeout(opts.read_timeout)
        .user_agent(concat!("kof-fetcherd/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// What `nix-cache-info` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    /// Always `/nix/store` (anything else is refused).
    pub store_dir: String,
    /// `WantMassQuery`.
    pub want_mass_query: bool,
    /// `Priority` (lower is preferred), if given.
    pub priority: Option<u32>,
}

/// A stream of NAR file bytes, as served (still compressed).
pub type NarStream = Pin<Box<dyn Stream<Item = Result<Bytes, CacheError>> + Send>>;

#[derive(Debug, Clone)]
enum Location {
    /// Base URL, ending in `/`.
    Http(reqwest::Url),
    /// Directory.
    File(PathBuf),
}

/// One binary cache.
#[derive(Debug, Clone)]
pub struct BinaryCache {
    url: String,
    location: Location,
    client: reqwest::Client,
    retry: RetryPolicy,
    max_metadata_bytes: usize,
}

impl BinaryCache {
    /// A cache at `url` (`http://`, `https://` or `file://`), using `client`.
    pub fn new(
        url: &str,
        client: reqwest::Client,
        retry: RetryPolicy,
    ) -> Result<BinaryCache, CacheError> {
        let bad = |reason: &str| CacheError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
            source: None,
        };
        let trimmed = url.trim_end_matches('/');
        let location = if let Some(dir) = trimmed.strip_prefix("file://") {
            let dir = dir.split('?').next().unwrap_or_default();
            if !dir.starts_with('/') {
                return Err(bad("a file:// URL needs an absolute path"));
            }
            Location::File(PathBuf::from(dir))
        } else if trimmed.starts_with("http://") || trimmed.starts_with("https://") {
            let parsed =
                reqwest::Url::parse(&format!("{trimmed}/")).map_err(|e| CacheError::BadUrl {
                    url: url.to_string(),
                    reason: "it does not parse".into(),
                    source: Some(e),
                })?;
            if parsed.query().is_some() || parsed.fragment().is_some() {
                return Err(bad("query strings and fragments are not supported"));
            }
            Location::Http(parsed)
        } else {
            return Err(bad("only http://, https:// and file:// are supported"));
        };
        Ok(BinaryCache {
            url: trimmed.to_string(),
            location,
            client,
            retry,
            max_metadata_bytes: DEFAULT_MAX_METADATA_BYTES,
        })
    }

    /// Sets the largest metadata body accepted.
    pub fn with_max_metadata_bytes(mut self, limit: usize) -> Self {
        self.max_metadata_bytes = limit;
        self
    }

    /// The cache's URL as configured (no trailing `/`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The full URL of `rel` (a path relative to the cache root).
    pub fn url_of(&self, rel: &str) -> String {
        format!("{}/{rel}", self.url)
    }

    /// Reads and checks `nix-cache-info`.
    pub async fn cache_info(&self) -> Result<CacheInfo, CacheError> {
        let url = self.url_of("nix-cache-info");
        let text = self
            .get_small("nix-cache-info", None, Metadata::Small)
            .await?
            .ok_or_else(|| CacheError::Status {
                url: url.clone(),
                path: None,
                status: 404,
            })?
            .text(&url, None)?;
        let mut store_dir = None;
        let mut want_mass_query = false;
        let mut priority = None;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (k, v) = line.split_once(':').ok_or_else(|| CacheError::CacheInfo {
                url: url.clone(),
                reason: format!("line {line:?} is not `Key: value`"),
            })?;
            let v = v.trim();
            match k {
                "StoreDir" => store_dir = Some(v.to_string()),
                "WantMassQuery" => want_mass_query = v == "1",
                "Priority" => {
                    priority = Some(v.parse().map_err(|_| CacheError::CacheInfo {
                        url: url.clone(),
                        reason: format!("Priority {v:?} is not a number"),
                    })?)
                }
                _ => {}
            }
        }
        let store_dir = store_dir.ok_or_else(|| CacheError::CacheInfo {
            url: url.clone(),
            reason: "no StoreDir".into(),
        })?;
        if store_dir != kof_nar::store_path::STORE_DIR {
            return Err(CacheError::WrongStoreDir { url, store_dir });
        }
        Ok(CacheInfo {
            store_dir,
            want_mass_query,
            priority,
        })
    }

    /// The narinfo of `path`, or `None` if this cache does not have it.
    #[tracing::instrument(skip(self), fields(cache = %self.url, path = %path))]
    pub async fn narinfo(&self, path: &StorePath) -> Result<Option<NarInfo>, CacheError> {
        let rel = format!("{}.narinfo", path.hash_part());
        let url = self.url_of(&rel);
        let Some(body) = self.get_small(&rel, Some(path), Metadata::Small).await? else {
            return Ok(None);
        };
        let text = body.text(&url, Some(path))?;
        let info = NarInfo::parse(&text).map_err(|source| CacheError::NarInfo {
            url: url.clone(),
            path: path.clone(),
            source: Box::new(source),
        })?;
        if &info.store_path != path {
            return Err(CacheError::WrongStorePath {
                url,
                requested: path.clone(),
                got: info.store_path,
            });
        }
        Ok(Some(info))
    }

    /// The NAR listing (`.ls`) of `path`, or `None` if the cache has none.
    pub async fn listing(&self, path: &StorePath) -> Result<Option<Listing>, CacheError> {
        let rel = format!("{}.ls", path.hash_part());
        let url = self.url_of(&rel);
        let Some(body) = self.get_small(&rel, Some(path), Metadata::Small).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&body.bytes)
            .map(Some)
            .map_err(|source| CacheError::Listing {
                url,
                path: path.clone(),
                source,
            })
    }

    /// The raw bytes of `path`'s kof index file (`<hashpart>.kof-index`), decoded from its
    /// `Content-Encoding`, or `None` when the cache has none (404, or 403 as S3 answers for a
    /// missing key). At most [`MAX_INDEX_BYTES`]; nothing is parsed or checked here.
    pub async fn index_file(&self, path: &StorePath) -> Result<Option<Vec<u8>>, CacheError> {
        let rel = format!("{}.kof-index", path.hash_part());
        let body = self.get_small(&rel, Some(path), Metadata::Index).await?;
        Ok(body.map(|b| b.bytes))
    }

    /// The full URL of `info`'s NAR file.
    pub fn nar_url(&self, info: &NarInfo) -> String {
        self.url_of(&info.url)
    }

    /// Opens the NAR file of `info` as a stream of (compressed) chunks. Opening is retried on
    /// transient errors; an error in the middle of the body comes out of the stream.
    pub async fn nar_stream(&self, info: &NarInfo) -> Result<NarStream, CacheError> {
        let path = info.store_path.clone();
        let url = self.nar_url(info);
        match &self.location {
            Location::File(dir) => {
                let file = tokio::fs::File::open(dir.join(&info.url))
                    .await
                    .map_err(|source| CacheError::File {
                        url: url.clone(),
                        path: Some(path.clone()),
                        source,
                    })?;
                let stream = futures_util::stream::unfold(Some(file), move |file| {
                    let url = url.clone();
                    let path = path.clone();
                    async move {
                        let mut file = file?;
                        let mut buf = vec![0u8; FILE_CHUNK];
                        match file.read(&mut buf).await {
                            Ok(0) => None,
                            Ok(n) => {
                                buf.truncate(n);
                                Some((Ok(Bytes::from(buf)), Some(file)))
                            }
                            Err(source) => Some((
                                Err(CacheError::File {
                                    url,
                                    path: Some(path),
                                    source,
                                }),
                                None,
                            )),
                        }
                    }
                });
                Ok(Box::pin(stream))
            }
            Location::Http(base) => {
                let full = self.join(base, &info.url, Some(&path))?;
                let resp = self.get_nar(&full, None, &url, &path).await?;
                Ok(body_stream(resp, url, path))
            }
        }
    }

    /// Opens bytes `start..end` of `info`'s NAR file (only meaningful for an uncompressed NAR,
    /// whose file bytes are the NAR's). `Ok(None)` when the server ignored `Range` and answered
    /// `200` with the whole file: the caller falls back to [`BinaryCache::nar_stream`]. A `206`
    /// must say `Content-Range: bytes start-(end-1)/total` for the range asked; the body's
    /// length is the caller's to check (the stream may break off). Opening is retried on
    /// transient errors. A `file://` cache reads the range from the file.
    pub async fn nar_range(
        &self,
        info: &NarInfo,
        start: u64,
        end: u64,
    ) -> Result<Option<NarStream>, CacheError> {
        let path = info.store_path.clone();
        let url = self.nar_url(info);
        let bad = |reason: String| CacheError::BadRange {
            url: url.clone(),
            path: Some(path.clone()),
            start,
            end,
            reason,
        };
        if start >= end {
            return Err(bad("empty range".into()));
        }
        match &self.location {
            Location::File(dir) => {
                use tokio::io::AsyncSeekExt;
                let file_err = |source| CacheError::File {
                    url: url.clone(),
                    path: Some(path.clone()),
                    source,
                };
                let mut file = tokio::fs::File::open(dir.join(&info.url))
                    .await
                    .map_err(file_err)?;
                file.seek(std::io::SeekFrom::Start(start))
                    .await
                    .map_err(file_err)?;
                let mut buf = Vec::new();
                file.take(end - start)
                    .read_to_end(&mut buf)
                    .await
                    .map_err(file_err)?;
                let one: Result<Bytes, CacheError> = Ok(Bytes::from(buf));
                Ok(Some(Box::pin(futures_util::stream::iter([one]))))
            }
            Location::Http(base) => {
                let full = self.join(base, &info.url, Some(&path))?;
                let range = format!("bytes={}-{}", start, end - 1);
                let resp = self.get_nar(&full, Some(&range), &url, &path).await?;
                if resp.status() != reqwest::StatusCode::PARTIAL_CONTENT {
                    return Ok(None);
                }
                let content_range = resp
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                let expected = format!("bytes {}-{}/", start, end - 1);
                if !content_range.starts_with(&expected) {
                    return Err(bad(format!("answered Content-Range {content_range:?}")));
                }
                Ok(Some(body_stream(resp, url, path)))
            }
        }
    }

    /// GETs a NAR file (or the `Range` of it given, a header value), retrying transient
    /// failures; any non-2xx status is an error.
    async fn get_nar(
        &self,
        full: &reqwest::Url,
        range: Option<&str>,
        url: &str,
        path: &StorePath,
    ) -> Result<reqwest::Response, CacheError> {
        self.with_retries(url, Some(path), || async {
            let mut req = self.client.get(full.clone());
            if let Some(range) = range {
                req = req.header(reqwest::header::RANGE, range);
            }
            let resp = req.send().await.map_err(|source| CacheError::Transport {
                url: url.to_string(),
                path: Some(path.clone()),
                source,
            })?;
            let status = resp.status();
            if !status.is_success() {
                return Err(CacheError::Status {
                    url: url.to_string(),
                    path: Some(path.clone()),
                    status: status.as_u16(),
                });
            }
            Ok(resp)
        })
        .await
    }

    fn join(
        &self,
        base: &reqwest::Url,
        rel: &str,
        path: Option<&StorePath>,
    ) -> Result<reqwest::Url, CacheError> {
        let bad = |reason: String, source| CacheError::BadUrl {
            url: format!("{}{}", self.url_of(rel), for_path(&path.cloned())),
            reason,
            source,
        };
        let full = base
            .join(rel)
            .map_err(|e| bad("it does not parse".into(), Some(e)))?;
        // The narinfo's URL is checked to be a plain relative path, but URL parsing also
        // resolves percent-encoded dot segments: make sure the result stays under the cache.
        if !full.as_str().starts_with(base.as_str()) {
            return Err(bad("resolves outside the cache".into(), None));
        }
        Ok(full)
    }

    /// Runs `attempt` until it succeeds, fails for good, or attempts run out.
    async fn with_retries<T, F, Fut>(
        &self,
        url: &str,
        path: Option<&StorePath>,
        mut attempt: F,
    ) -> Result<T, CacheError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, CacheError>>,
    {
        let attempts = self.retry.attempts.max(1);
        let mut n = 1;
        loop {
            match attempt().await {
                Err(e) if e.is_transient() && n < attempts => {
                    let delay = self.retry.delay(n);
                    tracing::warn!(%url, path = ?path.map(|p| p.to_string()), attempt = n,
                        ?delay, error = %kof_node_api::report::chain(&e), "transient cache error, retrying");
                    tokio::time::sleep(delay).await;
                    n += 1;
                }
                other => return other,
            }
        }
    }

    /// GETs a small file relative to the cache root, decoded from its `Content-Encoding`;
    /// `None` when it is missing (404, a missing file, and 403 for an index file).
    async fn get_small(
        &self,
        rel: &str,
        path: Option<&StorePath>,
        kind: Metadata,
    ) -> Result<Option<Fetched>, CacheError> {
        let url = self.url_of(rel);
        let limit = match kind {
            Metadata::Small => self.max_metadata_bytes,
            Metadata::Index => MAX_INDEX_BYTES,
        };
        let too_large = || CacheError::TooLarge {
            url: url.clone(),
            path: path.cloned(),
            limit,
        };
        let decode_error = |source| CacheError::ContentEncoding {
            url: url.clone(),
            path: path.cloned(),
            source,
        };
        match &self.location {
            Location::File(dir) => {
                let file_path = dir.join(rel);
                let file_err = |source| CacheError::File {
                    url: url.clone(),
                    path: path.cloned(),
                    source,
                };
                let file = match tokio::fs::File::open(&file_path).await {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(file_err(e)),
                };
                let mut body = Vec::new();
                file.take(limit as u64 + 1)
                    .read_to_end(&mut body)
                    .await
                    .map_err(file_err)?;
                if body.len() > limit {
                    return Err(too_large());
                }
                Ok(Some(Fetched {
                    bytes: body,
                    encoding: None,
                }))
            }
            Location::Http(base) => {
                let full = self.join(base, rel, path)?;
                let received = self
                    .with_retries(&url, path, || async {
                        let transport = |source| CacheError::Transport {
                            url: url.clone(),
                            path: path.cloned(),
                            source,
                        };
                        let mut resp = self
                            .client
                            .get(full.clone())
                            .send()
                            .await
                            .map_err(transport)?;
                        let status = resp.status();
                        if kind.is_missing(status) {
                            return Ok(None);
                        }
                        if !status.is_success() {
                            return Err(CacheError::Status {
                                url: url.clone(),
                                path: path.cloned(),
                                status: status.as_u16(),
                            });
                        }
                        // Known before the body is read: an unknown encoding is refused
                        // without downloading it.
                        let encoding = content_encoding(&resp).map_err(decode_error)?;
                        if resp.content_length().is_some_and(|l| l > limit as u64) {
                            return Err(too_large());
                        }
                        let mut body = Vec::new();
                        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
                            if body.len() + chunk.len() > limit {
                                return Err(too_large());
                            }
                            body.extend_from_slice(&chunk);
                        }
                        Ok(Some((encoding, body)))
                    })
                    .await?;
                match received {
                    None => Ok(None),
                    Some((None, bytes)) => Ok(Some(Fetched {
                        bytes,
                        encoding: None,
                    })),
                    Some((Some(encoding), body)) => decode_off_runtime(encoding, body, limit)
                        .await
                        .map(|bytes| {
                            Some(Fetched {
                                bytes,
                                encoding: Some(encoding),
                            })
                        })
                        .map_err(decode_error),
                }
            }
        }
    }
}

/// A small file's body, decoded.
struct Fetched {
    bytes: Vec<u8>,
    /// The `Content-Encoding` it was decoded from.
    encoding: Option<Encoding>,
}

impl Fetched {
    /// The body as text.
    fn text(self, url: &str, path: Option<&StorePath>) -> Result<String, CacheError> {
        let encoding = self.encoding;
        String::from_utf8(self.bytes).map_err(|e| CacheError::NotUtf8 {
            url: url.to_string(),
            path: path.cloned(),
            encoding,
            source: e.utf8_error(),
        })
    }
}

/// Which kind of small file a GET is for: its size limit and what counts as missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metadata {
    /// `nix-cache-info`, a narinfo or a listing: the cache's metadata limit; 404 is missing.
    Small,
    /// A kof index file: [`MAX_INDEX_BYTES`]; 404 and 403 are missing.
    Index,
}

impl Metadata {
    fn is_missing(self, status: reqwest::StatusCode) -> bool {
        status == reqwest::StatusCode::NOT_FOUND
            || (self == Metadata::Index && status == reqwest::StatusCode::FORBIDDEN)
    }
}

/// The `Content-Encoding` of a response, as [`Encoding::from_header`] reads it. Several
/// header lines mean several encodings applied in turn, which is refused like a list in one
/// line.
fn content_encoding(resp: &reqwest::Response) -> Result<Option<Encoding>, DecodeError> {
    let values: Vec<String> = resp
        .headers()
        .get_all(reqwest::header::CONTENT_ENCODING)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    if values.is_empty() {
        return Ok(None);
    }
    Encoding::from_header(Some(&values.join(", ")))
}

/// Decodes `body` on a blocking thread (an index file may take a while), at most `limit`
/// bytes.
async fn decode_off_runtime(
    encoding: Encoding,
    body: Vec<u8>,
    limit: usize,
) -> Result<Vec<u8>, DecodeError> {
    match tokio::task::spawn_blocking(move || encoding::decode_as(encoding, &body, limit)).await {
        Ok(decoded) => decoded,
        // The decoders do not panic on any input; if one did, the panic goes on here. (A
        // blocking task is only cancelled when the runtime shuts down, and then so does this.)
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// A response's body as a [`NarStream`]; a broken transfer is a transport error naming the
/// URL and the store path.
fn body_stream(resp: reqwest::Response, url: String, path: StorePath) -> NarStream {
    let stream = futures_util::stream::unfold(Some(resp), move |resp| {
        let url = url.clone();
        let path = path.clone();
        async move {
            let mut resp = resp?;
            match resp.chunk().await {
                Ok(Some(b)) => Some((Ok(b), Some(resp))),
                Ok(None) => None,
                Err(source) => Some((
                    Err(CacheError::Transport {
                        url,
                        path: Some(path),
                        source,
                    }),
                    None,
                )),
            }
        }
    });
    Box::pin(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let p = RetryPolicy {
            attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        for _ in 0..50 {
            let d1 = p.delay(1);
            assert!(
                d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(150),
                "{d1:?}"
            );
            let d3 = p.delay(3);
            assert!(
                d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(600),
                "{d3:?}"
            );
            let d9 = p.delay(9);
            assert!(
                d9 >= Duration::from_millis(500) && d9 <= Duration::from_millis(1500),
                "{d9:?}"
            );
            assert!(p.delay(u32::MAX) <= Duration::from_millis(1500));
        }
    }

    #[test]
    fn transient_classification() {
        let st = |status| CacheError::Status {
            url: "u".into(),
            path: None,
            status,
        };
        assert!(st(500).is_transient() && st(503).is_transient() && st(429).is_transient());
        assert!(!st(403).is_transient() && !st(410).is_transient());
        let bad = CacheError::BadUrl {
            url: "x".into(),
            reason: "y".into(),
            source: None,
        };
        assert!(!bad.is_transient());
    }
}
