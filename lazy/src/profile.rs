//! Learned prefetch profiles: which NAR byte ranges of which store paths the first start of an
//! environment read, so the next cold start fetches them first, in parallel.
//!
//! A profile is JSON (`version`, `key`, `ranges`), kept at `<store_dir>/profiles/<owner>/<name>.json`
//! and moved between nodes as is (`kof-store profile export/import`). Everything in it is
//! checked on load, since it may come from another node or a ConfigMap: store path names must
//! be valid, ranges non-empty and sane, the key a plain `owner/name`, the file small.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kof_nar::StorePath;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The profile format version.
pub const PROFILE_VERSION: u32 = 1;
/// Largest profile file accepted.
pub const MAX_PROFILE_BYTES: u64 = 16 << 20;
/// Most ranges in a profile.
pub const MAX_RANGES: usize = 200_000;
/// Largest NAR offset accepted in a range (1 TiB).
pub const MAX_OFFSET: u64 = 1 << 40;

/// Why a profile was refused or could not be read or written.
#[derive(Debug, Error)]
pub enum ProfileError {
    /// Reading or writing the file failed.
    #[error("profile {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_PROFILE_BYTES`].
    #[error("profile {}: larger than {MAX_PROFILE_BYTES} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The JSON does not parse.
    #[error("profile {what}")]
    Json {
        /// The file (or `"input"`).
        what: String,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The content is not acceptable.
    #[error("profile {key:?}: {reason}")]
    Invalid {
        /// Its key, as given.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A range names something that is not a store path's base name.
    #[error("profile {key:?}: store path {store_path:?}")]
    BadStorePath {
        /// Its key, as given.
        key: String,
        /// The name in the range.
        store_path: String,
        /// Why it is not a store path.
        source: kof_nar::store_path::StorePathError,
    },
    /// No profile is saved for the key.
    #[error("no profile saved for {0}")]
    Missing(String),
    /// The key is not `owner/name` with safe components.
    #[error("profile key {0:?} is not owner/name (letters, digits, '.', '_', '-'; not starting with '.')")]
    BadKey(String),
}

/// One range of one store path's NAR.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProfileRange {
    /// The store path's base name (`<hash>-<name>`).
    pub store_path: String,
    /// First NAR byte.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
}

/// A learned profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// [`PROFILE_VERSION`].
    pub version: u32,
    /// The environment it belongs to, `owner/name`.
    pub key: String,
    /// Ranges, sorted by store path and offset, not overlapping.
    pub ranges: Vec<ProfileRange>,
}

fn key_component_ok(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= 100
        && !c.starts_with('.')
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `(owner, name)` of a key `owner/name`.
pub fn split_key(key: &str) -> Result<(&str, &str), ProfileError> {
    match key.split_once('/') {
        Some((o, n)) if key_component_ok(o) && key_component_ok(n) => Ok((o, n)),
        _ => Err(ProfileError::BadKey(key.to_string())),
    }
}

impl Profile {
    /// A profile of `key` from recorded ranges: sorted, overlapping and adjacent ranges of a
    /// path merged.
    pub fn from_ranges(
        key: &str,
        ranges: impl IntoIterator<Item = (StorePath, u64, u64)>,
    ) -> Profile {
        let mut by_path: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
        for (p, s, e) in ranges {
            if s < e {
                by_path.entry(p.base_name()).or_default().push((s, e));
            }
        }
        let mut out = Vec::new();
        for (path, mut rs) in by_path {
            rs.sort();
            let mut cur: Option<(u64, u64)> = None;
            for (s, e) in rs {
                cur = match cur {
                    Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
                    Some((cs, ce)) => {
                        out.push(ProfileRange {
                            store_path: path.clone(),
                            start: cs,
                            end: ce,
                        });
                        Some((s, e))
                    }
                    None => Some((s, e)),
                };
            }
            if let Some((s, e)) = cur {
                out.push(ProfileRange {
                    store_path: path.clone(),
                    start: s,
                    end: e,
                });
            }
        }
        Profile {
            version: PROFILE_VERSION,
            key: key.to_string(),
            ranges: out,
        }
    }

    /// Checks everything a hostile profile could get wrong.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let bad = |reason: String| ProfileError::Invalid {
            key: self.key.clone(),
            reason,
        };
        if self.version != PROFILE_VERSION {
            return Err(bad(format!(
                "version {} (expected {PROFILE_VERSION})",
                self.version
            )));
        }
        split_key(&self.key)?;
        if self.ranges.len() > MAX_RANGES {
            return Err(bad(format!("more than {MAX_RANGES} ranges")));
        }
        for r in &self.ranges {
            StorePath::from_base_name(&r.store_path).map_err(|source| {
                ProfileError::BadStorePath {
                    key: self.key.clone(),
                    store_path: r.store_path.clone(),
                    source,
                }
            })?;
            if r.start >= r.end || r.end > MAX_OFFSET {
                return Err(bad(format!(
                    "range {}..{} of {} is empty or beyond {MAX_OFFSET}",
                    r.start, r.end, r.store_path
                )));
            }
        }
        Ok(())
    }

    /// The ranges as store paths (valid after [`Profile::validate`]).
    pub fn store_ranges(&self) -> Result<Vec<(StorePath, u64, u64)>, ProfileError> {
        self.validate()?;
        Ok(self
            .ranges
            .iter()
            .map(|r| {
                (
                    StorePath::from_base_name(&r.store_path).expect("validated"),
                    r.start,
                    r.end,
                )
            })
            .collect())
    }

    /// Bytes the profile covers.
    pub fn total_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// Parses and validates a profile.
    pub fn from_json(bytes: &[u8], what: &str) -> Result<Profile, ProfileError> {
        let p: Profile = serde_json::from_slice(bytes).map_err(|source| ProfileError::Json {
            what: what.to_string(),
            source,
        })?;
        p.validate()?;
        Ok(p)
    }

    /// The JSON text.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a profile always serialises")
    }

    /// Reads and validates a profile file (an import).
    pub fn read_file(path: &Path) -> Result<Profile, ProfileError> {
        let io = |source| ProfileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.len() > MAX_PROFILE_BYTES {
            return Err(ProfileError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let bytes = std::fs::read(path).map_err(io)?;
        Profile::from_json(&bytes, &path.display().to_string())
    }

    /// Writes the profile to `path` whole or not at all (an export).
    pub fn write_file(&self, path: &Path) -> Result<(), ProfileError> {
        self.validate()?;
        let io = |source| ProfileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".tmp-{name}"));
        std::fs::write(&tmp, self.to_json()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Where the profile of `key` lives in the store directory.
    pub fn path_in(store_dir: &Path, key: &str) -> Result<PathBuf, ProfileError> {
        let (owner, name) = split_key(key)?;
        Ok(store_dir
            .join("profiles")
            .join(owner)
            .join(format!("{name}.json")))
    }

    /// Saves the profile under the store directory; returns the file.
    pub fn save(&self, store_dir: &Path) -> Result<PathBuf, ProfileError> {
        let path = Profile::path_in(store_dir, &self.key)?;
        let dir = path.parent().expect("has the owner directory");
        std::fs::create_dir_all(dir).map_err(|source| ProfileError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        self.write_file(&path)?;
        Ok(path)
    }

    /// The saved profile of `key`, if any.
    pub fn load(store_dir: &Path, key: &str) -> Result<Option<Profile>, ProfileError> {
        let path = Profile::path_in(store_dir, key)?;
        if !path.exists() {
            return Ok(None);
        }
        let p = Profile::read_file(&path)?;
        if p.key != key {
            return Err(ProfileError::Invalid {
                key: p.key,
                reason: format!("found in the file of {key}"),
            });
        }
        Ok(Some(p))
    }
}

/// `kof-store profile export KEY`: the saved profile of `key` (write it with
/// [`Profile::write_file`] or print [`Profile::to_json`]).
pub fn export_profile(store_dir: &Path, key: &str) -> Result<Profile, ProfileError> {
    Profile::load(store_dir, key)?.ok_or_else(|| ProfileError::Missing(key.to_string()))
}

/// `kof-store profile import FILE`: validates a profile from another node and saves it under
/// its key in `store_dir`. Returns it and where it was saved.
pub fn import_profile(store_dir: &Path, file: &Path) -> Result<(Profile, PathBuf), ProfileError> {
    let p = Profile::read_file(file)?;
    let saved = p.save(store_dir)?;
    Ok((p, saved))
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "0ywnchrd1gb33i1d9vnf968a3wy8pj96-coreutils-9.1";

    #[test]
    fn ranges_are_merged_and_sorted() {
        let p = StorePath::from_base_name(P).unwrap();
        let prof = Profile::from_ranges(
            "kof/hello",
            [
                (p.clone(), 100, 200),
                (p.clone(), 0, 10),
                (p.clone(), 150, 300),
                (p.clone(), 300, 310),
                (p.clone(), 5, 5),
            ],
        );
        let got: Vec<(u64, u64)> = prof.ranges.iter().map(|r| (r.start, r.end)).collect();
        assert_eq!(got, vec![(0, 10), (100, 310)]);
        assert_eq!(prof.total_bytes(), 220);
        prof.validate().unwrap();
    }

    #[test]
    fn hostile_profiles_are_refused() {
        let ok = Profile::from_ranges(
            "kof/hello",
            [(StorePath::from_base_name(P).unwrap(), 0, 10)],
        );
        let json = String::from_utf8(ok.to_json()).unwrap();
        assert!(Profile::from_json(json.as_bytes(), "t").is_ok());
        for (from, to) in [
            (P, "../../etc-passwd"),
            ("\"kof/hello\"", "\"../x\""),
            ("\"kof/hello\"", "\"kof\""),
            ("\"end\": 10", "\"end\": 0"),
            ("\"end\": 10", "\"end\": 99999999999999999"),
            ("\"version\": 1", "\"version\": 2"),
        ] {
            let bad = json.replace(from, to);
            assert_ne!(bad, json, "{from}");
            assert!(Profile::from_json(bad.as_bytes(), "t").is_err(), "{bad}");
        }
        assert!(Profile::path_in(Path::new("/s"), ".hidden/x").is_err());
        // Import refuses a hostile file and saves a good one under its key.
        let tmp = tempfile::tempdir().unwrap();
        let bad = tmp.path().join("bad.json");
        std::fs::write(&bad, json.replace(P, "x/../../y")).unwrap();
        assert!(import_profile(tmp.path(), &bad).is_err());
        assert!(matches!(
            export_profile(tmp.path(), "kof/hello"),
            Err(ProfileError::Missing(_))
        ));
        let good = tmp.path().join("good.json");
        std::fs::write(&good, &json).unwrap();
        let (p, saved) = import_profile(tmp.path(), &good).unwrap();
        assert_eq!(saved, tmp.path().join("profiles/kof/hello.json"));
        assert_eq!(export_profile(tmp.path(), "kof/hello").unwrap(), p);
        assert_eq!(
            Profile::path_in(Path::new("/s"), "kof/hello").unwrap(),
            Path::new("/s/profiles/kof/hello.json")
        );
    }
}
