//! Object files: content addressed by BLAKE3, kept under `objects/<2 hex>/<64 hex>`, each either
//! raw or zstd-compressed (the codec is recorded in the database, never guessed from the bytes).
//!
//! An object file holds exactly the object's bytes in its codec, with no header, so a raw object
//! can later be handed to the kernel as-is (FUSE passthrough). A compressed object is a
//! sequence of independent zstd frames of [`FRAME_SIZE`] content bytes each (a valid zstd
//! stream, readable by `zstd -d`), so a range read decompresses only the frames it touches
//! instead of the whole object. Objects are written to a temporary file in their fan-out
//! directory and renamed into place; the caller syncs the file system
//! (`Objects::sync_filesystem`) before committing metadata that names them.
//!
//! A full file system (`ENOSPC`, or `EDQUOT` under a quota) at any step of a write (the
//! fan-out directory, the temporary file, its bytes, the rename, the sync) fails it with
//! [`StoreError::NoSpace`] naming the file, and the temporary file is removed (dropping the
//! `NamedTempFile` unlinks it). The ingest then stops before its metadata commits, so no path
//! becomes visible without its objects. Objects an ingest wrote before the failure stay as
//! files without rows (another ingest may be about to commit a row naming the same digest,
//! so they are not removed here); gc's sweep removes them if nothing names them.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::StoreError;

/// zstd level for objects at rest. Ingest must keep up with a fast link on a 2-core node, and
/// compression is its largest CPU cost: on the fixture `kof/many` closure (130 MB of ELF files
/// and data) level 1 ran at 171 MB/s per core and level 3 at 95 MB/s, for 54.1 vs 45.5 MB
/// stored. Level 1 keeps most of the saving at less than half the cost.
pub const ZSTD_LEVEL: i32 = 1;

/// An object is stored compressed only if zstd makes it at most this fraction (in tenths) of
/// its size, i.e. saves at least 10%: below that, the decompression cost on every read is not
/// worth the disk it saves, and raw objects can be read with a plain `pread`.
const WORTH_IT_TENTHS: usize = 9;

/// Content bytes per zstd frame of a compressed object. 64 KiB: a random 128 KiB read
/// decompresses at most 3 frames; measured on real binaries, the ratio is within a few percent
/// of one frame per object.
pub const FRAME_SIZE: usize = 64 << 10;

/// A BLAKE3 digest: the name of an object, and the identity of a file's whole content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// BLAKE3 of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex, the object's file name.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Digest(out))
    }

    pub(crate) fn from_sql(bytes: Vec<u8>) -> Result<Self, StoreError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            StoreError::CorruptMetadata(format!("digest of {} bytes in the database", b.len()))
        })?;
        Ok(Digest(arr))
    }
}

impl From<blake3::Hash> for Digest {
    fn from(h: blake3::Hash) -> Self {
        Digest(*h.as_bytes())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

/// How an object's bytes are kept on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// The object file is the content.
    Raw,
    /// The object file is zstd frames of [`FRAME_SIZE`] content bytes each.
    Zstd,
}

impl Codec {
    pub(crate) fn to_sql(self) -> i64 {
        match self {
            Codec::Raw => 0,
            Codec::Zstd => 1,
        }
    }

    pub(crate) fn from_sql(v: i64) -> Result<Self, StoreError> {
        match v {
            0 => Ok(Codec::Raw),
            1 => Ok(Codec::Zstd),
            _ => Err(StoreError::CorruptMetadata(format!("unknown codec {v}"))),
        }
    }
}

/// One object as the database describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its BLAKE3 digest (of the uncompressed content).
    pub digest: Digest,
    /// Uncompressed size.
    pub size: u64,
    /// Size of the object file on disk.
    pub stored_size: u64,
    /// Its codec.
    pub codec: Codec,
}

/// The object files of one store directory.
pub(crate) struct Objects {
    dir: PathBuf,
    tmp: PathBuf,
}

impl Objects {
    /// Uses `<store>/objects` and `<store>/tmp`, creating them. The 256 fan-out directories are
    /// made as objects first need them ([`Objects::write`]): creating them all up front cost a
    /// fresh store (a new node's first start) 40 ms of `mkdir`s on the machines measured.
    pub(crate) fn open(store_dir: &Path) -> Result<Self, StoreError> {
        let dir = store_dir.join("objects");
        let tmp = store_dir.join("tmp");
        let mut created = false;
        for d in [&dir, &tmp] {
            if !d.is_dir() {
                fs::create_dir_all(d).map_err(|e| StoreError::io("creating", d, e))?;
                created = true;
            }
        }
        if created {
            sync_dir(store_dir)?;
        }
        Ok(Objects { dir, tmp })
    }

    /// Creates the fan-out directory `fanout` if it is missing. Durable with the objects
    /// written into it: [`Objects::sync_filesystem`] flushes directory entries too.
    fn ensure_fanout(&self, fanout: &Path) -> Result<(), StoreError> {
        match fs::create_dir(fanout) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(StoreError::io("creating", fanout, e)),
        }
    }

    /// The fan-out directory of `digest`.
    pub(crate) fn fanout_dir(&self, digest: &Digest) -> PathBuf {
        self.dir.join(hex::encode(&digest.0[..1]))
    }

    /// The file of `digest`.
    pub(crate) fn path(&self, digest: &Digest) -> PathBuf {
        self.fanout_dir(digest).join(digest.to_hex())
    }

    pub(crate) fn objects_dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// Writes `data` (whose BLAKE3 is `digest`) as an object file, compressed if that pays,
    /// replacing any file already there (an orphan from an interrupted ingest, with the same
    /// content). Durable once [`Objects::sync_filesystem`] has run.
    pub(crate) fn write(&self, digest: Digest, data: &[u8]) -> Result<ObjectInfo, StoreError> {
        let compressed = if data.len() >= 64 {
            compress_frames(data)
                .ok()
                .filter(|c| c.len() * 10 <= data.len() * WORTH_IT_TENTHS)
        } else {
            None
        };
        let (codec, bytes) = match &compressed {
            Some(c) => (Codec::Zstd, c.as_slice()),
            None => (Codec::Raw, data),
        };
        // The temporary file lives in the object's own fan-out directory: the rename then stays
        // inside one directory, and parallel ingests spread their creates and renames over 256
        // directory locks instead of all contending for one `tmp/` (measured: a third of a big
        // fetch's CPU went to that lock and ext4's inode allocation). A crash can leave a
        // `.tmp-*` file here; gc's sweep removes every name that is not a known digest.
        let fanout = self.fanout_dir(&digest);
        let temp = || {
            tempfile::Builder::new()
                .prefix(".tmp-")
                .tempfile_in(&fanout)
        };
        let mut tmp = match temp() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.ensure_fanout(&fanout)?;
                temp()
            }
            r => r,
        }
        .map_err(|e| StoreError::io("creating a temporary file in", &fanout, e))?;
        let tmp_path = tmp.path().to_path_buf();
        // Through the `File`: `NamedTempFile`'s own `write` wraps its errors with the path.
        tmp.as_file_mut()
            .write_all(bytes)
            .map_err(|e| StoreError::io("writing", &tmp_path, e))?;
        let dest = self.path(&digest);
        tmp.persist(&dest)
            .map_err(|e| StoreError::io("renaming into", &dest, e.error))?;
        Ok(ObjectInfo {
            digest,
            size: data.len() as u64,
            stored_size: bytes.len() as u64,
            codec,
        })
    }

    /// Makes every object written so far durable, data and directory entries alike, with one
    /// `syncfs(2)` of the store's file system.
    ///
    /// Why not an fsync per object and per fan-out directory: an ingest writes hundreds to
    /// thousands of objects, and on the virtual disks nodes run on each fsync costs milliseconds
    /// (measured: 2,426 fsyncs made a 128 MB closure fetch fsync-bound at 0.56 CPUs). One
    /// syncfs per committed path flushes the same data in one go; since Linux 5.8 it reports
    /// writeback errors, which fail the ingest before its metadata commits.
    pub(crate) fn sync_filesystem(&self) -> Result<(), StoreError> {
        let dir = File::open(&self.dir).map_err(|e| StoreError::io("opening", &self.dir, e))?;
        // SAFETY: syncfs takes a valid open file descriptor, which `dir` holds for the call.
        let rc = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) };
        if rc != 0 {
            return Err(StoreError::io(
                "syncing the file system of",
                &self.dir,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    fn open_file(&self, digest: &Digest) -> Result<File, StoreError> {
        File::open(self.path(digest)).map_err(|source| StoreError::ObjectUnreadable {
            digest: *digest,
            source,
        })
    }

    /// A stream of the object's uncompressed content.
    pub(crate) fn reader(&self, obj: &ObjectInfo) -> Result<Box<dyn Read + Send>, StoreError> {
        let f = self.open_file(&obj.digest)?;
        Ok(match obj.codec {
            Codec::Raw => Box::new(f),
            Codec::Zstd => Box::new(zstd::stream::read::Decoder::new(f).map_err(|source| {
                StoreError::ObjectUnreadable {
                    digest: obj.digest,
                    source,
                }
            })?),
        })
    }

    /// Copies the object's bytes from `offset` into `buf` (which must fit in the object):
    /// raw objects with one `pread`, compressed ones by decompressing only the frames that
    /// hold the range.
    pub(crate) fn read_range(
        &self,
        obj: &ObjectInfo,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), StoreError> {
        debug_assert!(offset + buf.len() as u64 <= obj.size);
        let corrupt = |reason: String| StoreError::ObjectCorrupt {
            digest: obj.digest,
            reason,
            source: None,
        };
        let f = self.open_file(&obj.digest)?;
        match obj.codec {
            Codec::Raw => f.read_exact_at(buf, offset).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    corrupt("object file shorter than its size".into())
                } else {
                    StoreError::ObjectUnreadable {
                        digest: obj.digest,
                        source: e,
                    }
                }
            }),
            Codec::Zstd => {
                if buf.is_empty() {
                    return Ok(());
                }
                let mut comp = Vec::with_capacity(obj.stored_size as usize);
                (&f).read_to_end(&mut comp)
                    .map_err(|source| StoreError::ObjectUnreadable {
                        digest: obj.digest,
                        source,
                    })?;
                let start = offset as usize;
                let end = start + buf.len();
                let (first, last) = (start / FRAME_SIZE, (end - 1) / FRAME_SIZE);
                let mut pos = 0usize;
                for k in 0..=last {
                    let len = zstd::zstd_safe::find_frame_compressed_size(&comp[pos..]).map_err(
                        |code| {
                            corrupt(format!(
                                "frame {k}: {}",
                                zstd::zstd_safe::get_error_name(code)
                            ))
                        },
                    )?;
                    if k >= first {
                        let frame = zstd::bulk::decompress(&comp[pos..pos + len], FRAME_SIZE)
                            .map_err(|e| StoreError::ObjectCorrupt {
                                digest: obj.digest,
                                reason: format!("frame {k}"),
                                source: Some(e),
                            })?;
                        let f_start = k * FRAME_SIZE;
                        let from = start.max(f_start);
                        let to = end.min(f_start + frame.len());
                        if to <= from || frame.len() != FRAME_SIZE.min(obj.size as usize - f_start)
                        {
                            return Err(corrupt(format!("frame {k} holds {} bytes", frame.len())));
                        }
                        buf[from - start..to - start]
                            .copy_from_slice(&frame[from - f_start..to - f_start]);
                    }
                    pos += len;
                }
                Ok(())
            }
        }
    }

    /// Removes an object file; returns the bytes it took (0 if it was already gone).
    pub(crate) fn remove(&self, digest: &Digest) -> Result<u64, StoreError> {
        let p = self.path(digest);
        let len = match fs::symlink_metadata(&p) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(StoreError::io("inspecting", &p, e)),
        };
        match fs::remove_file(&p) {
            Ok(()) => Ok(len),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(StoreError::io("removing", &p, e)),
        }
    }
}

/// Compresses `data` as independent zstd frames of [`FRAME_SIZE`] content bytes each.
fn compress_frames(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut c = zstd::bulk::Compressor::new(ZSTD_LEVEL)?;
    c.include_contentsize(true)?;
    let mut out = Vec::with_capacity(data.len() / 2);
    for piece in data.chunks(FRAME_SIZE) {
        out.extend_from_slice(&c.compress(piece)?);
    }
    Ok(out)
}

/// fsyncs a directory, making renames and creations inside it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("syncing directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects() -> (tempfile::TempDir, Objects) {
        let tmp = tempfile::tempdir().unwrap();
        let o = Objects::open(tmp.path()).unwrap();
        (tmp, o)
    }

    fn read_whole(o: &Objects, info: &ObjectInfo) -> Vec<u8> {
        let mut v = Vec::new();
        o.reader(info).unwrap().read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn compresses_only_where_it_pays() {
        let (_t, o) = objects();
        // Compressible: several frames of text.
        let text: Vec<u8> = (0..300_000u32)
            .flat_map(|i| format!("line {} of text\n", i % 977).into_bytes())
            .take(300_000)
            .collect();
        let info = o.write(Digest::of(&text), &text).unwrap();
        assert_eq!(info.codec, Codec::Zstd);
        assert!(info.stored_size * 4 < info.size, "{info:?}");
        assert_eq!(
            fs::metadata(o.path(&info.digest)).unwrap().len(),
            info.stored_size
        );
        assert_eq!(
            read_whole(&o, &info),
            text,
            "concatenated frames stream back whole"
        );
        // The file is a plain zstd stream.
        let via_zstd = zstd::decode_all(File::open(o.path(&info.digest)).unwrap()).unwrap();
        assert_eq!(via_zstd, text);
        // Ranges inside a frame, across frames, at the ends.
        for (off, len) in [
            (0, 1),
            (5, 100),
            (FRAME_SIZE - 3, 10),
            (70_000, 140_000),
            (299_990, 10),
        ] {
            let mut buf = vec![0u8; len];
            o.read_range(&info, off as u64, &mut buf).unwrap();
            assert_eq!(buf, text[off..off + len], "range {off}+{len}");
        }

        // Incompressible: raw, byte for byte.
        let mut x = 0x1234_5678_9abc_def0u64;
        let noise: Vec<u8> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let info = o.write(Digest::of(&noise), &noise).unwrap();
        assert_eq!(info.codec, Codec::Raw);
        assert_eq!(fs::read(o.path(&info.digest)).unwrap(), noise);
        let mut buf = vec![0u8; 1000];
        o.read_range(&info, 5000, &mut buf).unwrap();
        assert_eq!(buf, noise[5000..6000]);

        // Tiny files are not worth a zstd frame.
        let tiny = b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_vec();
        assert_eq!(o.write(Digest::of(&tiny), &tiny).unwrap().codec, Codec::Raw);
    }

    #[test]
    fn damaged_compressed_object_is_reported_not_misread() {
        let (_t, o) = objects();
        let text = "abcdefgh".repeat(40_000).into_bytes();
        let info = o.write(Digest::of(&text), &text).unwrap();
        assert_eq!(info.codec, Codec::Zstd);
        let p = o.path(&info.digest);
        let mut z = fs::read(&p).unwrap();
        z.truncate(z.len() - 3);
        fs::write(&p, &z).unwrap();
        let mut buf = vec![0u8; 100];
        assert!(matches!(
            o.read_range(&info, text.len() as u64 - 100, &mut buf),
            Err(StoreError::ObjectCorrupt { .. })
        ));
    }

    #[test]
    fn digest_hex_round_trips() {
        let d = Digest::of(b"hello");
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(d.to_hex(), blake3::hash(b"hello").to_hex().as_str());
        assert_eq!(Digest::from_hex("zz"), None);
    }
}
