//! Local container images: writes OCI image-layout tar archives that `ctr images import`
//! (containerd 1.6) accepts, names as given and unpacks for the overlayfs snapshotter, so the CRI
//! plugin can use them in namespace `k8s.io` without any registry.
//!
//! An archive holds `oci-layout`, `index.json` and `blobs/sha256/<hex>` for one uncompressed
//! layer (`application/vnd.oci.image.layer.v1.tar`), the image config and the manifest. The
//! index's manifest descriptor carries the image name twice: `io.containerd.image.name` (the full
//! normalized reference, which is what `ctr images import` names the image by) and
//! `org.opencontainers.image.ref.name` (the tag, as the OCI spec has it, for other tools).
//!
//! Written by hand because no crate writes an OCI layout from a directory tree: `tar` and `sha2`
//! do the real work here.

use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};

const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// The annotation `ctr images import` names an imported image by.
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
/// The OCI image-layout annotation for a manifest's tag.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Where [`write_pause_image`] takes its static binary from by default (Debian `busybox-static`).
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// Why an image archive could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image name is not one containerd accepts.
    #[error("invalid image name {name:?}: {reason}")]
    InvalidName {
        /// the name
        name: String,
        /// what is wrong with it
        reason: &'static str,
    },
    /// A file to put in the image could not be read.
    #[error("reading {path}")]
    ReadSource {
        /// the file
        path: PathBuf,
        /// the cause
        source: io::Error,
    },
    /// The pause binary is not a static executable.
    #[error("{path} is not a statically linked executable usable as the pause binary")]
    NotABinary {
        /// the file
        path: PathBuf,
    },
    /// The archive could not be written.
    #[error("writing image archive {path}")]
    Write {
        /// the archive
        path: PathBuf,
        /// the cause
        source: io::Error,
    },
}

/// The parts of an OCI image config a test image needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// The entrypoint.
    pub entrypoint: Vec<String>,
    /// The command (the entrypoint's arguments).
    pub cmd: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// The working directory, if any.
    pub working_dir: Option<String>,
}

/// What was written: the name containerd and CRI will know the image by, and its digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenImage {
    /// Fully normalized reference, e.g. `docker.io/flox/empty:1.0.0`.
    pub name: String,
    /// `sha256:<hex>` of the manifest (what `ctr images ls` shows as DIGEST).
    pub manifest_digest: String,
    /// `sha256:<hex>` of the image config (the image id CRI reports).
    pub config_digest: String,
}

/// Normalizes a reference the way Docker and containerd's CRI do for familiar names:
/// `busybox` → `docker.io/library/busybox:latest`, `flox/empty:1.0.0` →
/// `docker.io/flox/empty:1.0.0`; a first component with `.` or `:` or `localhost` is a domain.
/// Digests (`@sha256:…`) are refused: these images are named by tag.
pub fn normalize_image_name(name: &str) -> Result<String, ImageError> {
    let invalid = |reason| ImageError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.contains('@') {
        return Err(invalid("digest references are not supported"));
    }
    if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c.is_ascii_uppercase())
    {
        return Err(invalid(
            "contains whitespace, control or upper-case characters",
        ));
    }
    let (domain, rest) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first, rest.to_owned())
        }
        Some(_) => ("docker.io", name.to_owned()),
        None => ("docker.io", format!("library/{name}")),
    };
    if rest.is_empty() || rest.split('/').any(str::is_empty) {
        return Err(invalid("empty path component"));
    }
    let last = rest.rsplit('/').next().unwrap_or_default();
    let tagged = match last.split_once(':') {
        Some((repo, tag)) if repo.is_empty() || tag.is_empty() || tag.len() > 128 => {
            return Err(invalid("empty repository or bad tag"));
        }
        Some(_) => rest,
        None => format!("{rest}:latest"),
    };
    Ok(format!("{domain}/{tagged}"))
}

/// A `flox/empty`-style image: one layer holding one tiny file (`/.empty`), no entrypoint and no
/// command (a pod using it must give `command`).
pub fn write_empty_image(out: &Path, name: &str) -> Result<WrittenImage, ImageError> {
    let layer = LayerSource::Entries(vec![LayerEntry::File {
        path: ".empty".into(),
        mode: 0o644,
        contents: b"flox/empty\n".to_vec(),
    }]);
    write_image(out, name, layer, &ImageConfig::default())
}

/// A pause image for CRI sandboxes, from [`DEFAULT_BUSYBOX`] (Debian `busybox-static`).
/// See [`write_pause_image_from`].
pub fn write_pause_image(out: &Path, name: &str) -> Result<WrittenImage, ImageError> {
    write_pause_image_from(out, name, Path::new(DEFAULT_BUSYBOX))
}

/// A pause image from a static busybox: `/bin/busybox` runs a shell that waits on a `sleep`
/// forever and exits 0 on SIGTERM or SIGINT (PID 1 of a PID namespace gets no default signal
/// handlers, so the trap is needed); SIGKILL ends it as any process.
pub fn write_pause_image_from(
    out: &Path,
    name: &str,
    busybox: &Path,
) -> Result<WrittenImage, ImageError> {
    let contents = std::fs::read(busybox).map_err(|source| ImageError::ReadSource {
        path: busybox.to_owned(),
        source,
    })?;
    if !contents.starts_with(b"\x7fELF") {
        return Err(ImageError::NotABinary {
            path: busybox.to_owned(),
        });
    }
    let layer = LayerSource::Entries(vec![
        LayerEntry::Dir {
            path: "bin".into(),
            mode: 0o755,
        },
        LayerEntry::File {
            path: "bin/busybox".into(),
            mode: 0o755,
            contents,
        },
        LayerEntry::Symlink {
            path: "bin/sh".into(),
            target: "busybox".into(),
        },
    ]);
    let config = ImageConfig {
        entrypoint: vec![
            "/bin/busybox".into(),
            "sh".into(),
            "-c".into(),
            "trap 'exit 0' TERM INT; /bin/busybox sleep 2147483647 & wait".into(),
        ],
        ..ImageConfig::default()
    };
    write_image(out, name, layer, &config)
}

/// An ordinary image whose single layer is the directory tree `dir` (its contents become the
/// rootfs; symlinks are stored as symlinks, modes, owners and mtimes as they are).
pub fn write_dir_image(
    out: &Path,
    name: &str,
    dir: &Path,
    config: &ImageConfig,
) -> Result<WrittenImage, ImageError> {
    write_image(out, name, LayerSource::Dir(dir.to_owned()), config)
}

enum LayerEntry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        contents: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
}

enum LayerSource {
    Entries(Vec<LayerEntry>),
    Dir(PathBuf),
}

/// A writer that hashes and counts what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn write_image(
    out: &Path,
    name: &str,
    layer: LayerSource,
    config: &ImageConfig,
) -> Result<WrittenImage, ImageError> {
    let full_name = normalize_image_name(name)?;
    let write_err = |source| ImageError::Write {
        path: out.to_owned(),
        source,
    };

    // The layer goes to an anonymous temporary file first: the outer tar header needs its size.
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut layer_file = tempfile::tempfile_in(parent).map_err(write_err)?;
    let (layer_digest, layer_len) = {
        let mut hw = HashingWriter {
            inner: BufWriter::new(&mut layer_file),
            hasher: Sha256::new(),
            len: 0,
        };
        write_layer(&mut hw, &layer)?;
        hw.flush().map_err(write_err)?;
        let digest = format!("sha256:{}", hex::encode(hw.hasher.finalize()));
        (digest, hw.len)
    };
    layer_file.seek(SeekFrom::Start(0)).map_err(write_err)?;

    let mut image_config = serde_json::Map::new();
    if !config.entrypoint.is_empty() {
        image_config.insert("Entrypoint".into(), json!(config.entrypoint));
    }
    if !config.cmd.is_empty() {
        image_config.insert("Cmd".into(), json!(config.cmd));
    }
    if !config.env.is_empty() {
        image_config.insert("Env".into(), json!(config.env));
    }
    if let Some(wd) = &config.working_dir {
        image_config.insert("WorkingDir".into(), json!(wd));
    }
    let config_json = serde_json::to_vec(&json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": image_config,
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))
    .expect("serializing a JSON value cannot fail");
    let config_digest = sha256_digest(&config_json);

    let manifest_json = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": { "mediaType": MEDIA_TYPE_CONFIG, "digest": config_digest, "size": config_json.len() },
        "layers": [ { "mediaType": MEDIA_TYPE_LAYER, "digest": layer_digest, "size": layer_len } ],
    }))
    .expect("serializing a JSON value cannot fail");
    let manifest_digest = sha256_digest(&manifest_json);
    let tag = full_name
        .rsplit_once(':')
        .map(|(_, t)| t)
        .unwrap_or("latest");

    let index_json = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [ {
            "mediaType": MEDIA_TYPE_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_json.len(),
            "platform": { "architecture": oci_arch(), "os": "linux" },
            "annotations": { ANNOTATION_IMAGE_NAME: full_name, ANNOTATION_REF_NAME: tag },
        } ],
    }))
    .expect("serializing a JSON value cannot fail");

    // Write to a temporary name and rename, so a half-written archive never appears at `out`.
    let tmp = tempfile::NamedTempFile::new_in(parent).map_err(write_err)?;
    {
        let mut tar = tar::Builder::new(BufWriter::new(tmp.as_file()));
        let blob_path = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
        append_dir(&mut tar, "blobs").map_err(write_err)?;
        append_dir(&mut tar, "blobs/sha256").map_err(write_err)?;
        append_bytes(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)
            .map_err(write_err)?;
        let mut header = regular_header(0o644, layer_len);
        tar.append_data(&mut header, blob_path(&layer_digest), &mut layer_file)
            .map_err(write_err)?;
        append_bytes(&mut tar, &blob_path(&config_digest), &config_json).map_err(write_err)?;
        append_bytes(&mut tar, &blob_path(&manifest_digest), &manifest_json).map_err(write_err)?;
        append_bytes(&mut tar, "index.json", &index_json).map_err(write_err)?;
        tar.into_inner()
            .map_err(write_err)?
            .flush()
            .map_err(write_err)?;
    }
    tmp.persist(out).map_err(|e| write_err(e.error))?;
    Ok(WrittenImage {
        name: full_name,
        manifest_digest,
        config_digest,
    })
}

fn regular_header(mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, path: &str, data: &[u8]) -> io::Result<()> {
    let mut header = regular_header(0o644, data.len() as u64);
    tar.append_data(&mut header, path, data)
}

fn append_dir<W: Write>(tar: &mut tar::Builder<W>, path: &str) -> io::Result<()> {
    let mut header = regular_header(0o755, 0);
    header.set_entry_type(tar::EntryType::Directory);
    tar.append_data(&mut header, path, io::empty())
}

fn write_layer<W: Write>(out: W, layer: &LayerSource) -> Result<(), ImageError> {
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    match layer {
        LayerSource::Entries(entries) => {
            let werr = |source| ImageError::Write {
                path: PathBuf::from("<layer>"),
                source,
            };
            for entry in entries {
                match entry {
                    LayerEntry::Dir { path, mode } => {
                        let mut h = regular_header(*mode, 0);
                        h.set_entry_type(tar::EntryType::Directory);
                        tar.append_data(&mut h, path, io::empty()).map_err(werr)?;
                    }
                    LayerEntry::File {
                        path,
                        mode,
                        contents,
                    } => {
                        let mut h = regular_header(*mode, contents.len() as u64);
                        tar.append_data(&mut h, path, contents.as_slice())
                            .map_err(werr)?;
                    }
                    LayerEntry::Symlink { path, target } => {
                        let mut h = regular_header(0o777, 0);
                        h.set_entry_type(tar::EntryType::Symlink);
                        tar.append_link(&mut h, path, target).map_err(werr)?;
                    }
                }
            }
        }
        LayerSource::Dir(root) => append_tree(&mut tar, root, Path::new(""))?,
    }
    tar.into_inner()
        .map_err(|source| ImageError::Write {
            path: PathBuf::from("<layer>"),
            source,
        })?
        .flush()
        .map_err(|source| ImageError::Write {
            path: PathBuf::from("<layer>"),
            source,
        })
}

/// Appends the tree under `root/rel` in sorted order (so equal trees give equal layers), each
/// entry with its own metadata; symlinks are not followed.
fn append_tree<W: Write>(
    tar: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
) -> Result<(), ImageError> {
    let dir = root.join(rel);
    let read_err = |path: &Path, source| ImageError::ReadSource {
        path: path.to_owned(),
        source,
    };
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| read_err(&dir, e))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(&dir, e))?;
    names.sort();
    for name in names {
        let rel_child = rel.join(&name);
        let abs = root.join(&rel_child);
        let meta = std::fs::symlink_metadata(&abs).map_err(|e| read_err(&abs, e))?;
        tar.append_path_with_name(&abs, &rel_child)
            .map_err(|e| read_err(&abs, e))?;
        if meta.is_dir() {
            append_tree(tar, root, &rel_child)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_familiar_names() {
        let n = |s| normalize_image_name(s).unwrap();
        assert_eq!(n("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(n("flox/empty:1.0.0"), "docker.io/flox/empty:1.0.0");
        assert_eq!(n("localhost/kof/pause:1"), "localhost/kof/pause:1");
        assert_eq!(n("registry.k8s.io/pause:3.6"), "registry.k8s.io/pause:3.6");
        assert_eq!(n("host:5000/a/b"), "host:5000/a/b:latest");
        for bad in ["", "a@sha256:00", "Upper/x", "a//b", "a:", "x/ y"] {
            assert!(normalize_image_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn archive_layout_is_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("tree");
        std::fs::create_dir_all(src.join("bin")).unwrap();
        std::fs::write(src.join("bin/tool"), b"#!/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("tool", src.join("bin/alias")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            src.join("bin/tool"),
            std::fs::Permissions::from_mode(0o4711),
        )
        .unwrap();
        let out = dir.path().join("img.tar");
        let config = ImageConfig {
            cmd: vec!["/bin/tool".into()],
            ..Default::default()
        };
        let written = write_dir_image(&out, "kof/tree:1", &src, &config).unwrap();
        assert_eq!(written.name, "docker.io/kof/tree:1");

        let mut files = std::collections::HashMap::new();
        let mut archive = tar::Archive::new(std::fs::File::open(&out).unwrap());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            io::Read::read_to_end(&mut entry, &mut data).unwrap();
            files.insert(path, data);
        }
        // Every blob's name is its digest.
        for (path, data) in &files {
            if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                if !hex.is_empty() {
                    assert_eq!(sha256_digest(data), format!("sha256:{hex}"));
                }
            }
        }
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let desc = &index["manifests"][0];
        assert_eq!(desc["digest"], written.manifest_digest.as_str());
        assert_eq!(
            desc["annotations"][ANNOTATION_IMAGE_NAME],
            "docker.io/kof/tree:1"
        );
        assert_eq!(desc["annotations"][ANNOTATION_REF_NAME], "1");
        let blob = |d: &str| &files[&format!("blobs/sha256/{}", &d[7..])];
        let manifest: serde_json::Value =
            serde_json::from_slice(blob(&written.manifest_digest)).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(blob(&written.config_digest)).unwrap();
        assert_eq!(config["config"]["Cmd"][0], "/bin/tool");
        let layer_digest = manifest["layers"][0]["digest"].as_str().unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0], layer_digest);

        // The layer holds the tree with the symlink kept and the mode (setuid too) preserved.
        let mut layer = tar::Archive::new(blob(layer_digest).as_slice());
        let mut seen = Vec::new();
        for entry in layer.entries().unwrap() {
            let entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            match path.trim_end_matches('/') {
                "bin/alias" => {
                    assert_eq!(entry.header().entry_type(), tar::EntryType::Symlink);
                    assert_eq!(entry.link_name().unwrap().unwrap(), Path::new("tool"));
                }
                "bin/tool" => assert_eq!(entry.header().mode().unwrap() & 0o7777, 0o4711),
                _ => {}
            }
            seen.push(path.trim_end_matches('/').to_owned());
        }
        assert_eq!(seen, ["bin", "bin/alias", "bin/tool"]);
    }
}
