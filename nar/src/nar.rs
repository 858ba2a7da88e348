//! The NAR archive: a strict streaming reader ([`parse`]) and a writer ([`NarWriter`],
//! [`dump_path`]).
//!
//! The reader never buffers file contents: it hands each regular file to the visitor as a
//! `Read` limited to exactly that file's bytes, so a NAR of any size is parsed in constant memory.
//! It rejects everything Nix would not write: unknown or misplaced tags, non-zero padding, names
//! that are empty, `.`, `..` or hold `/` or NUL, entries out of order or repeated, truncation,
//! trailing bytes, and lengths past [`Limits`].

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use thiserror::Error;

/// The magic string a NAR starts with.
pub const NAR_MAGIC: &[u8] = b"nix-archive-1";

/// Bounds the reader enforces on untrusted archives.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest entry name (Linux's NAME_MAX is 255).
    pub max_name_len: usize,
    /// Longest symlink target (Linux's PATH_MAX is 4096 with the NUL).
    pub max_target_len: usize,
    /// Deepest directory nesting.
    pub max_depth: usize,
    /// Largest single regular file.
    pub max_file_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_name_len: 255,
            max_target_len: 4095,
            max_depth: 256,
            max_file_size: 1 << 40,
        }
    }
}

/// Why a NAR was refused.
#[derive(Debug, Error)]
pub enum NarError {
    /// Reading the underlying stream failed (including the stream ending early).
    #[error("reading NAR")]
    Io(#[from] io::Error),
    /// The stream ended inside the archive.
    #[error("NAR truncated at byte {0}")]
    Truncated(u64),
    /// A token other than the grammar allows at this point.
    #[error("malformed NAR at byte {offset}: expected {expected}, found {found:?}")]
    UnexpectedToken {
        /// byte offset of the token
        offset: u64,
        /// what the grammar allows here
        expected: &'static str,
        /// what was there (lossy, shortened)
        found: String,
    },
    /// Padding after a string was not zero.
    #[error("malformed NAR at byte {0}: non-zero padding")]
    BadPadding(u64),
    /// A string, name, target or file is longer than the limits allow.
    #[error("malformed NAR at byte {offset}: {what} of length {len} exceeds limit {limit}")]
    TooLong {
        /// byte offset of the length field
        offset: u64,
        /// which kind of token
        what: &'static str,
        /// its declared length
        len: u64,
        /// the limit
        limit: u64,
    },
    /// An entry name that could escape or confuse the target directory.
    #[error("malformed NAR at byte {offset}: invalid entry name {name:?}")]
    BadName {
        /// byte offset of the name
        offset: u64,
        /// the name (lossy)
        name: String,
    },
    /// Directory entries not strictly increasing in byte order (covers duplicates).
    #[error("malformed NAR at byte {offset}: entry {name:?} is not after {prev:?}")]
    Unsorted {
        /// byte offset of the name
        offset: u64,
        /// the previous name (lossy)
        prev: String,
        /// the offending name (lossy)
        name: String,
    },
    /// Nesting deeper than the limit.
    #[error("malformed NAR at byte {0}: directories nested too deep")]
    TooDeep(u64),
    /// Bytes follow the end of the archive.
    #[error("malformed NAR: trailing data after byte {0}")]
    TrailingData(u64),
    /// The visitor refused the archive (its own error, kept as the cause).
    #[error(transparent)]
    Visitor(Box<dyn std::error::Error + Send + Sync>),
}

/// Receives a NAR's contents as the reader parses it, in archive order.
///
/// `name` is `None` for the root node and the entry's name inside its parent otherwise. Every
/// `enter_directory` is matched by a `leave_directory`. The reader guarantees names are valid
/// and strictly sorted before the visitor sees them.
///
/// Every method defaults to accepting and ignoring its node, so a visitor implements only what
/// it needs, and `struct Check; impl NarVisitor for Check {}` just validates an archive.
pub trait NarVisitor {
    /// A directory starts; its entries follow until the matching `leave_directory`.
    fn enter_directory(&mut self, _name: Option<&[u8]>) -> Result<(), NarError> {
        Ok(())
    }
    /// The innermost open directory ends.
    fn leave_directory(&mut self) -> Result<(), NarError> {
        Ok(())
    }
    /// A symlink.
    fn symlink(&mut self, _name: Option<&[u8]>, _target: &[u8]) -> Result<(), NarError> {
        Ok(())
    }
    /// A regular file of `size` bytes whose contents start at `nar_offset` in the uncompressed
    /// NAR. `contents` yields exactly `size` bytes; whatever the visitor does not read is
    /// read and discarded by the parser afterwards.
    fn regular(
        &mut self,
        _name: Option<&[u8]>,
        _executable: bool,
        _size: u64,
        _nar_offset: u64,
        _contents: &mut dyn Read,
    ) -> Result<(), NarError> {
        Ok(())
    }
}

/// Parses a NAR from `reader` with default [`Limits`], feeding `visitor`; the reader must end
/// exactly where the archive does.
pub fn parse<R: Read, V: NarVisitor + ?Sized>(reader: R, visitor: &mut V) -> Result<(), NarError> {
    parse_with_limits(reader, visitor, Limits::default())
}

/// [`parse`] with explicit limits.
pub fn parse_with_limits<R: Read, V: NarVisitor + ?Sized>(
    reader: R,
    visitor: &mut V,
    limits: Limits,
) -> Result<(), NarError> {
    let mut p = Parser {
        r: reader,
        pos: 0,
        limits,
    };
    p.expect_str(NAR_MAGIC, "nix-archive-1")?;
    p.node(visitor, None, 0)?;
    let mut probe = [0u8; 1];
    loop {
        match p.r.read(&mut probe) {
            Ok(0) => return Ok(()),
            Ok(_) => return Err(NarError::TrailingData(p.pos)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

struct Parser<R> {
    r: R,
    pos: u64,
    limits: Limits,
}

fn lossy(b: &[u8]) -> String {
    let mut s = String::from_utf8_lossy(&b[..b.len().min(64)]).into_owned();
    if b.len() > 64 {
        s.push('…');
    }
    s
}

fn padding(len: u64) -> usize {
    ((8 - (len % 8)) % 8) as usize
}

impl<R: Read> Parser<R> {
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), NarError> {
        match self.r.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(NarError::Truncated(self.pos))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn read_u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_padding(&mut self, len: u64) -> Result<(), NarError> {
        let pad = padding(len);
        if pad > 0 {
            let at = self.pos;
            let mut b = [0u8; 8];
            self.read_exact(&mut b[..pad])?;
            if b[..pad].iter().any(|&x| x != 0) {
                return Err(NarError::BadPadding(at));
            }
        }
        Ok(())
    }

    /// Reads a string token of at most `limit` bytes.
    fn read_str(&mut self, limit: usize, what: &'static str) -> Result<Vec<u8>, NarError> {
        let at = self.pos;
        let len = self.read_u64()?;
        if len > limit as u64 {
            return Err(NarError::TooLong {
                offset: at,
                what,
                len,
                limit: limit as u64,
            });
        }
        let mut buf = vec![0u8; len as usize];
        self.read_exact(&mut buf)?;
        self.read_padding(len)?;
        Ok(buf)
    }

    /// Reads a short grammar token (tags are at most 13 bytes).
    fn read_tag(&mut self) -> Result<(u64, Vec<u8>), NarError> {
        let at = self.pos;
        let s = self.read_str(16, "tag")?;
        Ok((at, s))
    }

    fn expect_str(&mut self, want: &[u8], expected: &'static str) -> Result<(), NarError> {
        let (at, got) = self.read_tag()?;
        if got != want {
            return Err(NarError::UnexpectedToken {
                offset: at,
                expected,
                found: lossy(&got),
            });
        }
        Ok(())
    }

    fn node<V: NarVisitor + ?Sized>(
        &mut self,
        v: &mut V,
        name: Option<&[u8]>,
        depth: usize,
    ) -> Result<(), NarError> {
        if depth > self.limits.max_depth {
            return Err(NarError::TooDeep(self.pos));
        }
        self.expect_str(b"(", "\"(\"")?;
        self.expect_str(b"type", "\"type\"")?;
        let (at, ty) = self.read_tag()?;
        match ty.as_slice() {
            b"regular" => {
                let (at, mut tag) = self.read_tag()?;
                let mut executable = false;
                if tag == b"executable" {
                    executable = true;
                    self.expect_str(b"", "\"\" after \"executable\"")?;
                    let (_, t) = self.read_tag()?;
                    tag = t;
                }
                if tag != b"contents" {
                    return Err(NarError::UnexpectedToken {
                        offset: at,
                        expected: "\"contents\" or \"executable\"",
                        found: lossy(&tag),
                    });
                }
                let len_at = self.pos;
                let size = self.read_u64()?;
                if size > self.limits.max_file_size {
                    return Err(NarError::TooLong {
                        offset: len_at,
                        what: "file",
                        len: size,
                        limit: self.limits.max_file_size,
                    });
                }
                let offset = self.pos;
                let mut contents = FileContents {
                    inner: &mut self.r,
                    remaining: size,
                };
                v.regular(name, executable, size, offset, &mut contents)?;
                // Drain what the visitor left unread.
                let left = contents.remaining;
                if left > 0 {
                    let copied = io::copy(&mut contents, &mut io::sink())?;
                    if copied != left {
                        return Err(NarError::Truncated(offset + size - (left - copied)));
                    }
                }
                if contents.remaining > 0 {
                    return Err(NarError::Truncated(offset + size - contents.remaining));
                }
                self.pos = offset + size;
                self.read_padding(size)?;
                self.expect_str(b")", "\")\"")?;
            }
            b"symlink" => {
                self.expect_str(b"target", "\"target\"")?;
                let t_at = self.pos;
                let target = self.read_str(self.limits.max_target_len, "symlink target")?;
                if target.is_empty() || target.contains(&0) {
                    return Err(NarError::UnexpectedToken {
                        offset: t_at,
                        expected: "a non-empty symlink target without NUL",
                        found: lossy(&target),
                    });
                }
                v.symlink(name, &target)?;
                self.expect_str(b")", "\")\"")?;
            }
            b"directory" => {
                v.enter_directory(name)?;
                let mut prev: Option<Vec<u8>> = None;
                loop {
                    let (at, tag) = self.read_tag()?;
                    match tag.as_slice() {
                        b")" => break,
                        b"entry" => {}
                        _ => {
                            return Err(NarError::UnexpectedToken {
                                offset: at,
                                expected: "\"entry\" or \")\"",
                                found: lossy(&tag),
                            })
                        }
                    }
                    self.expect_str(b"(", "\"(\"")?;
                    self.expect_str(b"name", "\"name\"")?;
                    let n_at = self.pos;
                    let entry = self.read_str(self.limits.max_name_len, "entry name")?;
                    if entry.is_empty()
                        || entry == b"."
                        || entry == b".."
                        || entry.contains(&b'/')
                        || entry.contains(&0)
                    {
                        return Err(NarError::BadName {
                            offset: n_at,
                            name: lossy(&entry),
                        });
                    }
                    if let Some(p) = &prev {
                        if entry.as_slice() <= p.as_slice() {
                            return Err(NarError::Unsorted {
                                offset: n_at,
                                prev: lossy(p),
                                name: lossy(&entry),
                            });
                        }
                    }
                    self.expect_str(b"node", "\"node\"")?;
                    self.node(v, Some(&entry), depth + 1)?;
                    self.expect_str(b")", "\")\"")?;
                    prev = Some(entry);
                }
                v.leave_directory()?;
            }
            _ => {
                return Err(NarError::UnexpectedToken {
                    offset: at,
                    expected: "\"regular\", \"symlink\" or \"directory\"",
                    found: lossy(&ty),
                })
            }
        }
        Ok(())
    }
}

/// A regular file's contents inside the archive stream: exactly its declared bytes.
struct FileContents<'a, R> {
    inner: &'a mut R,
    remaining: u64,
}

impl<R: Read> Read for FileContents<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 && want > 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "NAR ends inside a file's contents",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Writes a NAR token by token. The caller is responsible for the grammar's order (entries
/// sorted); [`dump_path`] does it for a directory tree.
pub struct NarWriter<W: Write> {
    w: W,
    pos: u64,
}

const ZEROS: [u8; 8] = [0; 8];

impl<W: Write> NarWriter<W> {
    /// Starts an archive (writes the magic).
    pub fn new(w: W) -> io::Result<Self> {
        let mut n = NarWriter { w, pos: 0 };
        n.str(NAR_MAGIC)?;
        Ok(n)
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn raw(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn str(&mut self, s: &[u8]) -> io::Result<()> {
        self.raw(&(s.len() as u64).to_le_bytes())?;
        self.raw(s)?;
        self.raw(&ZEROS[..padding(s.len() as u64)])
    }

    /// A regular file node; copies exactly `size` bytes from `contents` (an error if it has
    /// fewer). Returns the offset of the contents in the archive.
    pub fn regular(
        &mut self,
        executable: bool,
        size: u64,
        contents: &mut dyn Read,
    ) -> io::Result<u64> {
        self.str(b"(")?;
        self.str(b"type")?;
        self.str(b"regular")?;
        if executable {
            self.str(b"executable")?;
            self.str(b"")?;
        }
        self.str(b"contents")?;
        self.raw(&size.to_le_bytes())?;
        let offset = self.pos;
        let copied = io::copy(&mut contents.take(size), &mut self.w)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file contents ended after {copied} of {size} bytes"),
            ));
        }
        self.pos += size;
        self.raw(&ZEROS[..padding(size)])?;
        self.str(b")")?;
        Ok(offset)
    }

    /// A symlink node.
    pub fn symlink(&mut self, target: &[u8]) -> io::Result<()> {
        self.str(b"(")?;
        self.str(b"type")?;
        self.str(b"symlink")?;
        self.str(b"target")?;
        self.str(target)?;
        self.str(b")")
    }

    /// Opens a directory node; follow with `entry`/`end_entry` pairs in sorted name order, then
    /// `end_directory`.
    pub fn begin_directory(&mut self) -> io::Result<()> {
        self.str(b"(")?;
        self.str(b"type")?;
        self.str(b"directory")
    }

    /// Opens a directory entry; the entry's node follows.
    pub fn entry(&mut self, name: &[u8]) -> io::Result<()> {
        self.str(b"entry")?;
        self.str(b"(")?;
        self.str(b"name")?;
        self.str(name)?;
        self.str(b"node")
    }

    /// Closes a directory entry.
    pub fn end_entry(&mut self) -> io::Result<()> {
        self.str(b")")
    }

    /// Closes a directory node.
    pub fn end_directory(&mut self) -> io::Result<()> {
        self.str(b")")
    }

    /// Flushes and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.w.flush()?;
        Ok(self.w)
    }
}

/// Writes the NAR of the file tree at `path`, as `nix-store --dump` does.
pub fn dump_path<W: Write>(path: &Path, w: W) -> io::Result<W> {
    let mut n = NarWriter::new(w)?;
    dump_node(path, &mut n)?;
    n.finish()
}

fn dump_node<W: Write>(path: &Path, n: &mut NarWriter<W>) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let t = fs::read_link(path)?;
        n.symlink(t.as_os_str().as_bytes())
    } else if ft.is_file() {
        let exec = meta.permissions().mode() & 0o100 != 0;
        let mut f = fs::File::open(path)?;
        n.regular(exec, meta.len(), &mut f).map(|_| ())
    } else if ft.is_dir() {
        let mut names: Vec<_> = fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        n.begin_directory()?;
        for name in names {
            n.entry(name.as_bytes())?;
            dump_node(&path.join(&name), n)?;
            n.end_entry()?;
        }
        n.end_directory()
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: not a regular file, symlink or directory",
                path.display()
            ),
        ))
    }
}

/// A visitor that unpacks an archive below a directory, as `nix-store --restore` does
/// (executable files 0755, others 0644). It only ever creates entries inside `root`, which
/// must not exist yet: names are validated by the parser and nothing is followed through
/// symlinks because every entry is created fresh inside a directory this visitor created.
pub struct Restorer {
    stack: Vec<std::path::PathBuf>,
    root: std::path::PathBuf,
}

impl Restorer {
    /// Restores into `root` (created by the archive's root node).
    pub fn new(root: &Path) -> Self {
        Restorer {
            stack: Vec::new(),
            root: root.to_path_buf(),
        }
    }

    fn target(&self, name: Option<&[u8]>) -> std::path::PathBuf {
        match (name, self.stack.last()) {
            (Some(n), Some(dir)) => dir.join(std::ffi::OsStr::from_bytes(n)),
            _ => self.root.clone(),
        }
    }
}

impl NarVisitor for Restorer {
    fn enter_directory(&mut self, name: Option<&[u8]>) -> Result<(), NarError> {
        let p = self.target(name);
        fs::create_dir(&p)?;
        self.stack.push(p);
        Ok(())
    }
    fn leave_directory(&mut self) -> Result<(), NarError> {
        self.stack.pop();
        Ok(())
    }
    fn symlink(&mut self, name: Option<&[u8]>, target: &[u8]) -> Result<(), NarError> {
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), self.target(name))?;
        Ok(())
    }
    fn regular(
        &mut self,
        name: Option<&[u8]>,
        executable: bool,
        _size: u64,
        _nar_offset: u64,
        contents: &mut dyn Read,
    ) -> Result<(), NarError> {
        let p = self.target(name);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if executable { 0o755 } else { 0o644 })
            .open(&p)?;
        io::copy(contents, &mut f)?;
        Ok(())
    }
}
