//! Where paths are published from: a binary cache (`file://` read directly, `http(s)://`
//! through kof-substituter's [`BinaryCache`]) or a kof store.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use kof_nar::narinfo::NarInfoError;
use kof_nar::{Compression, NarInfo, StorePath};
use kof_store::{Store, StoreError};
use kof_substituter::cache::{http_client, BinaryCache, CacheError, HttpOptions, NarStream};
use parking_lot::Mutex;
use thiserror::Error;

use crate::out_dir::{file_err, FileError};

/// The `nix-cache-info` written when the source has none to copy (a kof store).
pub(crate) const DEFAULT_CACHE_INFO: &str =
    "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n";

/// A source narinfo: parsed, and the text it was parsed from (published with only the NAR
/// file's fields changed).
#[derive(Debug, Clone)]
pub struct SourceNarInfo {
    /// The parsed narinfo.
    pub info: NarInfo,
    /// Its text.
    pub text: String,
}

/// Why the source could not give what was asked.
#[derive(Debug, Error)]
pub enum SourceError {
    /// The binary cache refused or failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A file of a `file://` cache.
    #[error(transparent)]
    File(#[from] FileError),
    /// The kof store.
    #[error("kof store")]
    Store(#[source] StoreError),
    /// A narinfo does not parse.
    #[error("narinfo {file} does not parse")]
    NarInfo {
        /// Its file or URL.
        file: String,
        /// Why.
        #[source]
        source: NarInfoError,
    },
    /// A narinfo describes another path than the one asked for.
    #[error("narinfo {file} is for {got}")]
    WrongPath {
        /// Its file or URL.
        file: String,
        /// The path it names.
        got: StorePath,
    },
    /// `--all` asked of a source that cannot list its paths.
    #[error("listing every path needs a file:// cache or a kof store; {0} cannot be listed")]
    CannotList(String),
    /// The URL is not one this tool reads.
    #[error("unsupported source {0:?} (file://, http:// or https://)")]
    BadUrl(String),
    /// The HTTP client or its runtime could not be set up.
    #[error("setting up the HTTP client")]
    Setup(#[source] io::Error),
    /// The NAR file does not decompress.
    #[error("{compression} NAR {url} does not decompress")]
    Decompress {
        /// Its compression.
        compression: Compression,
        /// Its URL.
        url: String,
        /// The decoder's error.
        #[source]
        source: io::Error,
    },
}

/// A place store paths are published from.
pub enum Source {
    /// A binary cache directory (`file://DIR`), read directly.
    File(PathBuf),
    /// An HTTP(S) binary cache.
    Http {
        /// The cache.
        cache: BinaryCache,
        /// Runs its requests.
        runtime: tokio::runtime::Runtime,
    },
    /// A kof store.
    Store(Store),
}

impl Source {
    /// A binary cache at `url` (`file://`, `http://`, `https://`).
    pub fn cache(url: &str) -> Result<Source, SourceError> {
        if let Some(dir) = url.strip_prefix("file://") {
            let dir = dir.split('?').next().unwrap_or_default();
            if !dir.starts_with('/') {
                return Err(SourceError::BadUrl(url.to_string()));
            }
            return Ok(Source::File(PathBuf::from(dir)));
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(SourceError::BadUrl(url.to_string()));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(SourceError::Setup)?;
        let client = http_client(&HttpOptions::default())
            .map_err(|e| SourceError::Setup(io::Error::other(e)))?;
        let cache = BinaryCache::new(url, client, Default::default())?;
        Ok(Source::Http { cache, runtime })
    }

    /// The kof store at `dir`.
    pub fn store(dir: &Path) -> Result<Source, SourceError> {
        Ok(Source::Store(Store::open(dir).map_err(SourceError::Store)?))
    }

    /// What to write as the published cache's `nix-cache-info`: the source's own, or
    /// [`DEFAULT_CACHE_INFO`]-like text built from what it says.
    pub fn cache_info(&self) -> Result<String, SourceError> {
        match self {
            Source::File(dir) => {
                let p = dir.join("nix-cache-info");
                match std::fs::read_to_string(&p) {
                    Ok(t) => Ok(t),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        Ok(DEFAULT_CACHE_INFO.to_string())
                    }
                    Err(e) => Err(file_err("reading", &p)(e).into()),
                }
            }
            Source::Http { cache, runtime } => {
                let info = runtime.block_on(cache.cache_info())?;
                let mut t = format!(
                    "StoreDir: {}\nWantMassQuery: {}\n",
                    info.store_dir,
                    u8::from(info.want_mass_query)
                );
                if let Some(p) = info.priority {
                    t.push_str(&format!("Priority: {p}\n"));
                }
                Ok(t)
            }
            Source::Store(_) => Ok(DEFAULT_CACHE_INFO.to_string()),
        }
    }

    /// Every path the source holds (a `file://` cache's narinfos, a store's paths).
    pub fn all_paths(&self) -> Result<Vec<StorePath>, SourceError> {
        match self {
            Source::File(dir) => {
                let mut out = Vec::new();
                for entry in std::fs::read_dir(dir).map_err(file_err("listing", dir))? {
                    let entry = entry.map_err(file_err("listing", dir))?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if let Some(hash) = name.strip_suffix(".narinfo") {
                        if hash.starts_with('.') {
                            continue;
                        }
                        let info = self.read_file_narinfo(dir, hash)?;
                        if let Some(n) = info {
                            out.push(n.info.store_path);
                        }
                    }
                }
                out.sort();
                Ok(out)
            }
            Source::Http { cache, .. } => Err(SourceError::CannotList(cache.url().to_string())),
            Source::Store(store) => Ok(store
                .list_paths()
                .map_err(SourceError::Store)?
                .into_iter()
                .map(|p| p.store_path)
                .collect()),
        }
    }

    fn read_file_narinfo(
        &self,
        dir: &Path,
        hash: &str,
    ) -> Result<Option<SourceNarInfo>, SourceError> {
        let p = dir.join(format!("{hash}.narinfo"));
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(file_err("reading", &p)(e).into()),
        };
        let info = NarInfo::parse(&text).map_err(|source| SourceError::NarInfo {
            file: p.display().to_string(),
            source,
        })?;
        Ok(Some(SourceNarInfo { info, text }))
    }

    /// The narinfo of `path`, `None` when the source lacks it.
    ///
    /// From an HTTP cache the narinfo comes parsed by kof-substituter (Content-Encoding
    /// decoded, checked) and its text is written back in Nix's field order: fields kof-nar
    /// does not know are dropped there, as Nix drops them when it copies a path.
    pub fn narinfo(&self, path: &StorePath) -> Result<Option<SourceNarInfo>, SourceError> {
        let found = match self {
            Source::File(dir) => self.read_file_narinfo(dir, path.hash_part())?,
            Source::Http { cache, runtime } => {
                runtime
                    .block_on(cache.narinfo(path))?
                    .map(|info| SourceNarInfo {
                        text: info.to_string(),
                        info,
                    })
            }
            Source::Store(store) => store.path_info(path).map_err(SourceError::Store)?.map(|p| {
                let sigs = p
                    .sigs
                    .iter()
                    .filter_map(|s| kof_nar::Signature::parse(s).ok())
                    .collect();
                let info = NarInfo {
                    store_path: p.store_path,
                    url: format!("nar/{}.nar", kof_nar::base32::encode(&p.nar_hash.0)),
                    compression: Compression::None,
                    file_hash: None,
                    file_size: None,
                    nar_hash: p.nar_hash,
                    nar_size: p.nar_size,
                    references: p.references,
                    deriver: p.deriver,
                    system: None,
                    sigs,
                    ca: p.ca,
                };
                SourceNarInfo {
                    text: info.to_string(),
                    info,
                }
            }),
        };
        if let Some(n) = &found {
            if &n.info.store_path != path {
                return Err(SourceError::WrongPath {
                    file: format!("{}.narinfo", path.hash_part()),
                    got: n.info.store_path.clone(),
                });
            }
        }
        Ok(found)
    }

    /// Writes `info`'s NAR, decompressed, into `out`; returns the bytes read from the source
    /// (as downloaded). `out`'s own write errors are its to report: this returns
    /// [`SourceError::Decompress`] for any I/O failure, so a sink that fails should remember why.
    pub fn fetch_nar(&self, info: &NarInfo, out: &mut dyn Write) -> Result<u64, SourceError> {
        let url = info.url.clone();
        let decompress_err = |source| SourceError::Decompress {
            compression: info.compression,
            url: url.clone(),
            source,
        };
        match self {
            Source::Store(store) => {
                let mut counting = CountingWriter {
                    inner: out,
                    count: 0,
                };
                store
                    .dump_nar(&info.store_path, &mut counting)
                    .map_err(SourceError::Store)?;
                Ok(counting.count)
            }
            Source::File(dir) => {
                let p = dir.join(&info.url);
                let file = File::open(&p).map_err(file_err("opening", &p))?;
                let counter = Arc::new(AtomicU64::new(0));
                let reader = CountingReader {
                    inner: file,
                    count: counter.clone(),
                };
                copy_decompressed(info.compression, reader, out).map_err(decompress_err)?;
                Ok(counter.load(Ordering::Relaxed))
            }
            Source::Http { cache, runtime } => {
                let stream = runtime.block_on(cache.nar_stream(info))?;
                let failed = Arc::new(Mutex::new(None));
                let counter = Arc::new(AtomicU64::new(0));
                let reader = CountingReader {
                    inner: StreamReader {
                        handle: runtime.handle().clone(),
                        stream,
                        buf: Bytes::new(),
                        failed: failed.clone(),
                    },
                    count: counter.clone(),
                };
                let copied = copy_decompressed(info.compression, reader, out);
                if let Some(e) = failed.lock().take() {
                    return Err(e.into());
                }
                copied.map_err(decompress_err)?;
                Ok(counter.load(Ordering::Relaxed))
            }
        }
    }
}

/// Decompresses `input` as `compression` into `out`.
fn copy_decompressed<R: Read>(
    compression: Compression,
    input: R,
    out: &mut dyn Write,
) -> io::Result<u64> {
    let input = BufReader::with_capacity(1 << 20, input);
    match compression {
        Compression::None => io::copy(&mut { input }, out),
        Compression::Zstd => io::copy(&mut zstd::stream::read::Decoder::with_buffer(input)?, out),
        Compression::Xz => io::copy(&mut xz2::bufread::XzDecoder::new_multi_decoder(input), out),
        Compression::Bzip2 => io::copy(&mut bzip2::bufread::MultiBzDecoder::new(input), out),
    }
}

/// Counts the bytes read through it.
struct CountingReader<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Counts the bytes written through it.
struct CountingWriter<'a> {
    inner: &'a mut dyn Write,
    count: u64,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A NAR stream read from a worker thread: each read waits on the runtime for the next piece.
/// A cache error is kept in `failed` (typed) and shows up as an I/O error to the decoder.
struct StreamReader {
    handle: tokio::runtime::Handle,
    stream: NarStream,
    buf: Bytes,
    failed: Arc<Mutex<Option<CacheError>>>,
}

impl Read for StreamReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.buf.is_empty() {
            match self.handle.block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Ok(b)) => self.buf = b,
                Some(Err(e)) => {
                    *self.failed.lock() = Some(e);
                    return Err(io::Error::other("the NAR download failed"));
                }
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        let _ = self.buf.split_to(n);
        Ok(n)
    }
}
