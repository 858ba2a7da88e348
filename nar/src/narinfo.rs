//! narinfo files: what a binary cache says about one store path.

use std::fmt;

use thiserror::Error;

use crate::hash::{HashError, NixHash};
use crate::signature::{Signature, SignatureError};
use crate::store_path::{StorePath, StorePathError};

/// How a cache compressed a NAR (`Compression:`; absent means bzip2, as in Nix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// `none`
    None,
    /// `xz`
    Xz,
    /// `zstd`
    Zstd,
    /// `bzip2`
    Bzip2,
}

impl Compression {
    /// Parses the narinfo spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Compression::None,
            "xz" => Compression::Xz,
            "zstd" => Compression::Zstd,
            "bzip2" => Compression::Bzip2,
            _ => return None,
        })
    }

    /// The narinfo spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
        }
    }

    /// The file extension Nix gives NARs of this compression (`.nar.xz`...).
    pub fn extension(&self) -> &'static str {
        match self {
            Compression::None => "nar",
            Compression::Xz => "nar.xz",
            Compression::Zstd => "nar.zst",
            Compression::Bzip2 => "nar.bz2",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a narinfo was refused.
#[derive(Debug, Error)]
pub enum NarInfoError {
    /// A line is not `Key: value`.
    #[error("narinfo line {line}: not `Key: value`")]
    BadLine {
        /// 1-based line number
        line: usize,
    },
    /// A required field is absent.
    #[error("narinfo lacks {0}")]
    Missing(&'static str),
    /// A field that may appear once appears twice.
    #[error("narinfo has {0} twice")]
    Duplicate(String),
    /// A field's value is malformed.
    #[error("narinfo field {field}: {reason}")]
    BadField {
        /// the key
        field: &'static str,
        /// why
        reason: String,
    },
    /// `StorePath` or a reference is not a valid store path.
    #[error("narinfo field {field}")]
    BadPath {
        /// the key
        field: &'static str,
        /// the parse error
        source: StorePathError,
    },
    /// A hash field is malformed.
    #[error("narinfo field {field}")]
    BadHash {
        /// the key
        field: &'static str,
        /// the parse error
        source: HashError,
    },
    /// A `Sig:` is malformed.
    #[error("narinfo field Sig")]
    BadSig(#[from] SignatureError),
    /// The URL would leave the cache (absolute, `..`, a scheme).
    #[error("narinfo URL {0:?} is not a relative path inside the cache")]
    UnsafeUrl(String),
}

/// One parsed narinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    /// `StorePath`
    pub store_path: StorePath,
    /// `URL`, relative to the cache
    pub url: String,
    /// `Compression`
    pub compression: Compression,
    /// `FileHash`, hash of the file as downloaded
    pub file_hash: Option<NixHash>,
    /// `FileSize`
    pub file_size: Option<u64>,
    /// `NarHash`
    pub nar_hash: NixHash,
    /// `NarSize`
    pub nar_size: u64,
    /// `References`, sorted as given
    pub references: Vec<StorePath>,
    /// `Deriver`, a base name
    pub deriver: Option<String>,
    /// `System`
    pub system: Option<String>,
    /// `Sig`, every one
    pub sigs: Vec<Signature>,
    /// `CA`
    pub ca: Option<String>,
}

fn bad(field: &'static str, reason: impl Into<String>) -> NarInfoError {
    NarInfoError::BadField {
        field,
        reason: reason.into(),
    }
}

impl NarInfo {
    /// Parses a narinfo. Unknown keys are ignored (Nix does the same); known ones are checked.
    pub fn parse(text: &str) -> Result<Self, NarInfoError> {
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut system = None;
        let mut sigs = Vec::new();
        let mut ca = None;
        fn once<T>(slot: &mut Option<T>, key: &str, v: T) -> Result<(), NarInfoError> {
            if slot.is_some() {
                return Err(NarInfoError::Duplicate(key.to_string()));
            }
            *slot = Some(v);
            Ok(())
        }
        let num = |field: &'static str, v: &str| -> Result<u64, NarInfoError> {
            v.parse::<u64>()
                .map_err(|_| bad(field, format!("{v:?} is not a number")))
        };
        for (i, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once(": ")
                .ok_or(NarInfoError::BadLine { line: i + 1 })?;
            match key {
                "StorePath" => {
                    let p = StorePath::from_absolute(value).map_err(|source| {
                        NarInfoError::BadPath {
                            field: "StorePath",
                            source,
                        }
                    })?;
                    once(&mut store_path, key, p)?
                }
                "URL" => {
                    let safe = !value.is_empty()
                        && !value.starts_with('/')
                        && !value.contains("://")
                        && !value
                            .split('/')
                            .any(|c| c == ".." || c == "." || c.is_empty())
                        && !value.contains(['?', '#', '\\']);
                    if !safe {
                        return Err(NarInfoError::UnsafeUrl(value.to_string()));
                    }
                    once(&mut url, key, value.to_string())?
                }
                "Compression" => {
                    let c = Compression::parse(value)
                        .ok_or_else(|| bad("Compression", format!("unknown method {value:?}")))?;
                    once(&mut compression, key, c)?
                }
                "FileHash" => {
                    let h = NixHash::parse(value).map_err(|source| NarInfoError::BadHash {
                        field: "FileHash",
                        source,
                    })?;
                    once(&mut file_hash, key, h)?
                }
                "FileSize" => once(&mut file_size, key, num("FileSize", value)?)?,
                "NarHash" => {
                    let h = NixHash::parse(value).map_err(|source| NarInfoError::BadHash {
                        field: "NarHash",
                        source,
                    })?;
                    once(&mut nar_hash, key, h)?
                }
                "NarSize" => once(&mut nar_size, key, num("NarSize", value)?)?,
                "References" => {
                    let refs = value
                        .split(' ')
                        .filter(|s| !s.is_empty())
                        .map(StorePath::from_base_name)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|source| NarInfoError::BadPath {
                            field: "References",
                            source,
                        })?;
                    once(&mut references, key, refs)?
                }
                "Deriver" if value == "unknown-deriver" => {}
                "Deriver" => once(&mut deriver, key, value.to_string())?,
                "System" => once(&mut system, key, value.to_string())?,
                "Sig" => sigs.push(Signature::parse(value)?),
                "CA" => once(&mut ca, key, value.to_string())?,
                _ => {}
            }
        }
        // "References:" with nothing after it has no ": " separator in some writers.
        if references.is_none() && text.lines().any(|l| l == "References:") {
            references = Some(Vec::new());
        }
        let nar_size = nar_size.ok_or(NarInfoError::Missing("NarSize"))?;
        if nar_size == 0 {
            return Err(bad("NarSize", "is zero"));
        }
        Ok(NarInfo {
            store_path: store_path.ok_or(NarInfoError::Missing("StorePath"))?,
            url: url.ok_or(NarInfoError::Missing("URL"))?,
            compression: compression.unwrap_or(Compression::Bzip2),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(NarInfoError::Missing("NarHash"))?,
            nar_size,
            references: references.unwrap_or_default(),
            deriver,
            system,
            sigs,
            ca,
        })
    }

    /// The fingerprint signatures are made over:
    /// `1;<StorePath>;<NarHash>;<NarSize>;<sorted absolute references, comma-separated>`.
    pub fn fingerprint(&self) -> String {
        let mut refs: Vec<String> = self.references.iter().map(|r| r.to_absolute()).collect();
        refs.sort();
        format!(
            "1;{};{};{};{}",
            self.store_path.to_absolute(),
            self.nar_hash.to_nix_string(),
            self.nar_size,
            refs.join(",")
        )
    }

    /// References other than the path itself.
    pub fn references_except_self(&self) -> impl Iterator<Item = &StorePath> {
        self.references
            .iter()
            .filter(move |r| **r != self.store_path)
    }
}

impl fmt::Display for NarInfo {
    /// Writes the narinfo in the field order Nix uses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StorePath: {}", self.store_path)?;
        writeln!(f, "URL: {}", self.url)?;
        writeln!(f, "Compression: {}", self.compression)?;
        if let Some(h) = &self.file_hash {
            writeln!(f, "FileHash: {h}")?;
        }
        if let Some(s) = self.file_size {
            writeln!(f, "FileSize: {s}")?;
        }
        writeln!(f, "NarHash: {}", self.nar_hash)?;
        writeln!(f, "NarSize: {}", self.nar_size)?;
        let refs: Vec<String> = self.references.iter().map(|r| r.base_name()).collect();
        writeln!(f, "References: {}", refs.join(" "))?;
        if let Some(d) = &self.deriver {
            writeln!(f, "Deriver: {d}")?;
        }
        if let Some(s) = &self.system {
            writeln!(f, "System: {s}")?;
        }
        for s in &self.sigs {
            writeln!(f, "Sig: {s}")?;
        }
        if let Some(ca) = &self.ca {
            writeln!(f, "CA: {ca}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "StorePath: /nix/store/gqfp6kcvhd30nkr6ydcmr0kljk7f0g8a-pkg2
URL: nar/1ngxzidcy58dypff88rhfvxp2hjbd7v3za0dw5kq8b5b82i3m7jj.nar.zst
Compression: zstd
FileHash: sha256:1ngxzidcy58dypff88rhfvxp2hjbd7v3za0dw5kq8b5b82i3m7jj
FileSize: 824
NarHash: sha256:1ngxzidcy58dypff88rhfvxp2hjbd7v3za0dw5kq8b5b82i3m7jj
NarSize: 824
References: gqfp6kcvhd30nkr6ydcmr0kljk7f0g8a-pkg2 66kvs1g1lqmf0sh0bx3lg2x3i9h3hq3l-pyapp-0.3.0
Deriver: xxx.drv
Sig: cache.example-1:6wzr1QlOPHG+knFuJIaw+85Z5ivwbdI512JikexG+nQ7JDSZM2hw8zzlcLOguSjLmTFRmVTLQm03d7ed3zz+DQ==
";

    #[test]
    fn parses_and_prints_back() {
        let n = NarInfo::parse(SAMPLE).unwrap();
        assert_eq!(n.compression, Compression::Zstd);
        assert_eq!(n.nar_size, 824);
        assert_eq!(n.references.len(), 2);
        assert_eq!(n.references_except_self().count(), 1);
        assert_eq!(n.to_string(), SAMPLE);
        assert_eq!(
            n.fingerprint(),
            "1;/nix/store/gqfp6kcvhd30nkr6ydcmr0kljk7f0g8a-pkg2;sha256:1ngxzidcy58dypff88rhfvxp2hjbd7v3za0dw5kq8b5b82i3m7jj;824;/nix/store/66kvs1g1lqmf0sh0bx3lg2x3i9h3hq3l-pyapp-0.3.0,/nix/store/gqfp6kcvhd30nkr6ydcmr0kljk7f0g8a-pkg2"
        );
    }

    #[test]
    fn refuses_bad_input() {
        for (needle, replacement) in [
            ("URL: nar/", "URL: ../"),
            ("URL: nar/", "URL: /etc/"),
            ("URL: nar/", "URL: http://evil/"),
            ("Compression: zstd", "Compression: lz4"),
            ("NarSize: 824", "NarSize: -1"),
            ("NarSize: 824", "NarSize: 0"),
            ("NarHash: sha256:1", "NarHash: md5:1"),
            ("StorePath: /nix/store/", "StorePath: /tmp/"),
            ("References: gq", "References: ../"),
            ("Sig: cache.example-1:", "Sig: nocolon"),
            ("FileSize: 824", "FileSize: 824\nFileSize: 825"),
        ] {
            let text = SAMPLE.replace(needle, replacement);
            assert!(NarInfo::parse(&text).is_err(), "accepted {replacement:?}");
        }
        assert!(matches!(
            NarInfo::parse(&SAMPLE.replace("NarHash", "X-NarHash")),
            Err(NarInfoError::Missing("NarHash"))
        ));
        assert!(matches!(
            NarInfo::parse("garbage"),
            Err(NarInfoError::BadLine { line: 1 })
        ));
    }
}
