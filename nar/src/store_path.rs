//! Store paths: `/nix/store/<32 nixbase32 chars>-<name>`.

use std::fmt;

use thiserror::Error;

use crate::base32;

/// The store directory every path kof handles lives in.
pub const STORE_DIR: &str = "/nix/store";

/// Why a store path was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StorePathError {
    /// The path is not directly inside `/nix/store`.
    #[error("{0:?} is not in {STORE_DIR}")]
    NotInStore(String),
    /// The hash part is not 32 nixbase32 characters.
    #[error("{0:?} has a malformed hash part")]
    BadHash(String),
    /// The name is empty, too long, starts with `.`, or holds characters Nix refuses.
    #[error("{0:?} has an invalid name")]
    BadName(String),
}

/// A store path, kept as its 32-character hash part and its name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    hash: String,
    name: String,
}

impl StorePath {
    /// Parses a base name `<hash>-<name>` (as in narinfo `References`).
    pub fn from_base_name(s: &str) -> Result<Self, StorePathError> {
        if s.len() < 34 || s.as_bytes()[32] != b'-' {
            return Err(StorePathError::BadHash(s.to_string()));
        }
        let (hash, rest) = s.split_at(32);
        if !hash.bytes().all(base32::is_valid_char) {
            return Err(StorePathError::BadHash(s.to_string()));
        }
        let name = &rest[1..];
        let valid = !name.is_empty()
            && name.len() <= 211
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c));
        if !valid {
            return Err(StorePathError::BadName(s.to_string()));
        }
        Ok(StorePath {
            hash: hash.to_string(),
            name: name.to_string(),
        })
    }

    /// Parses an absolute path `/nix/store/<hash>-<name>`.
    pub fn from_absolute(s: &str) -> Result<Self, StorePathError> {
        let base = s
            .strip_prefix(STORE_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .filter(|b| !b.contains('/'))
            .ok_or_else(|| StorePathError::NotInStore(s.to_string()))?;
        Self::from_base_name(base)
    }

    /// Parses either form.
    pub fn parse(s: &str) -> Result<Self, StorePathError> {
        if s.starts_with('/') {
            Self::from_absolute(s)
        } else {
            Self::from_base_name(s)
        }
    }

    /// The 32-character hash part (the narinfo's file name without `.narinfo`).
    pub fn hash_part(&self) -> &str {
        &self.hash
    }

    /// The name after the dash.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash, self.name)
    }

    /// `/nix/store/<hash>-<name>`.
    pub fn to_absolute(&self) -> String {
        format!("{STORE_DIR}/{}-{}", self.hash, self.name)
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}-{}", self.hash, self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let p = StorePath::parse("/nix/store/gqfp6kcvhd30nkr6ydcmr0kljk7f0g8a-pkg2").unwrap();
        assert_eq!(p.hash_part(), "gqfp6kcvhd30nkr6ydcmr0kljk7f0g8a");
        assert_eq!(p.name(), "pkg2");
        assert_eq!(StorePath::parse(&p.base_name()).unwrap(), p);
        for bad in [
            "/nix/store/gqfp6kcvhd30nkr6ydcmr0kljk7f0g8a-",
            "/nix/store/gqfp6kcvhd30nkr6ydcmr0kljk7f0g8e-x",
            "/nix/store/gqfp6kcvhd30nkr6ydcmr0kljk7f0g8a-../x",
            "/nix/store/gqfp6kcvhd30nkr6ydcmr0kljk7f0g8a-.x",
            "/tmp/gqfp6kcvhd30nkr6ydcmr0kljk7f0g8a-x",
            "/nix/store/gqfp6kcvhd30nkr6ydcmr0kljk7f0g8a-x/bin",
            "gqfp6kcvhd30nkr6ydcmr0kljk7f0g8a",
        ] {
            assert!(StorePath::parse(bad).is_err(), "{bad}");
        }
    }
}
