//! Hashes as Nix writes them in narinfo files: `sha256:<nixbase32>` (also accepting the
//! `sha256:<hex>` and SRI `sha256-<base64>` forms Nix accepts on input).

use std::fmt;

use base64::Engine;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::base32;

/// Why a hash string was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashError {
    /// Only sha256 is used for NarHash and FileHash by the caches kof speaks to.
    #[error("unsupported hash algorithm in {0:?} (only sha256)")]
    UnsupportedAlgorithm(String),
    /// The digest part is not a valid encoding of 32 bytes.
    #[error("malformed sha256 digest in {0:?}")]
    BadDigest(String),
}

/// A sha256 digest as used for NarHash and FileHash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NixHash(pub [u8; 32]);

impl NixHash {
    /// Parses `sha256:<nixbase32|hex|base64>` or SRI `sha256-<base64>`.
    pub fn parse(s: &str) -> Result<Self, HashError> {
        let (algo, digest, sri) = if let Some((a, d)) = s.split_once(':') {
            (a, d, false)
        } else if let Some((a, d)) = s.split_once('-') {
            (a, d, true)
        } else {
            return Err(HashError::UnsupportedAlgorithm(s.to_string()));
        };
        if algo != "sha256" {
            return Err(HashError::UnsupportedAlgorithm(s.to_string()));
        }
        let bad = || HashError::BadDigest(s.to_string());
        let bytes = if !sri && digest.len() == base32::encoded_len(32) {
            base32::decode(digest, 32).map_err(|_| bad())?
        } else if !sri && digest.len() == 64 {
            hex::decode(digest).map_err(|_| bad())?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(digest)
                .map_err(|_| bad())?
        };
        let arr: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
        Ok(NixHash(arr))
    }

    /// sha256 of a byte string.
    pub fn digest(data: &[u8]) -> Self {
        NixHash(Sha256::digest(data).into())
    }

    /// `sha256:<nixbase32>`, the form narinfo files use.
    pub fn to_nix_string(&self) -> String {
        format!("sha256:{}", base32::encode(&self.0))
    }

    /// Lower-case hex of the digest.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for NixHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

impl fmt::Debug for NixHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NixHash({})", self.to_nix_string())
    }
}

/// A `Write`/`Read` pass-through that sha256-hashes and counts every byte going through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Bytes read so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The hash and count of everything read so far; gives back the inner reader.
    pub fn finish(self) -> (NixHash, u64, R) {
        (
            NixHash(self.hasher.finalize().into()),
            self.count,
            self.inner,
        )
    }
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_forms() {
        let h = NixHash::digest(b"");
        let nix = h.to_nix_string();
        assert_eq!(NixHash::parse(&nix).unwrap(), h);
        assert_eq!(
            NixHash::parse(&format!("sha256:{}", h.to_hex())).unwrap(),
            h
        );
        let b64 = base64::engine::general_purpose::STANDARD.encode(h.0);
        assert_eq!(NixHash::parse(&format!("sha256-{b64}")).unwrap(), h);
        assert!(matches!(
            NixHash::parse("md5:abc"),
            Err(HashError::UnsupportedAlgorithm(_))
        ));
        assert!(matches!(
            NixHash::parse("sha256:xyz"),
            Err(HashError::BadDigest(_))
        ));
    }
}
