//! The view tree ([`kof_fuse::Entry`]) as JSON, for the daemon → FUSE server `add_view`
//! message. A mirror type, because the tree model has no serde derives.
//!
//! Names are JSON strings when they are UTF-8, else `{"b64": "..."}` (store file names may be
//! any bytes but `/` and NUL). Inline contents are base64. Subtrees shared by views in the
//! daemon are rebuilt per view in the FUSE server, except identical store path subtrees of
//! one message, which the decoder shares through [`Decoder`]'s cache.
//!
//! [`tree_digest`] (the view's, re-exported) names a tree by its content, so that the FUSE
//! server can keep a decoded tree and serve it again for another view of the same environment
//! generation without the daemon sending (and the FUSE server parsing) it again.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::Arc;

use base64::Engine;
use kof_fuse::{Content, Entry, FileRef};
use serde::{Deserialize, Serialize};

pub use kof_lazy::view::tree_digest;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A file name or symlink target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WireName {
    /// UTF-8.
    Text(String),
    /// Any other bytes, base64.
    Bytes {
        /// The bytes, base64.
        b64: String,
    },
}

impl WireName {
    fn from_os(s: &std::ffi::OsStr) -> WireName {
        match s.to_str() {
            Some(t) => WireName::Text(t.to_string()),
            None => WireName::Bytes {
                b64: B64.encode(s.as_bytes()),
            },
        }
    }

    fn to_os(&self) -> Result<OsString, WireError> {
        match self {
            WireName::Text(t) => Ok(OsString::from(t)),
            WireName::Bytes { b64 } => {
                B64.decode(b64)
                    .map(OsString::from_vec)
                    .map_err(|source| WireError::NotBase64 {
                        what: format!("name {b64:?}"),
                        source,
                    })
            }
        }
    }
}

/// One node of a view's tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum WireEntry {
    /// A directory: `(name, entry)` pairs.
    Dir {
        /// Entries.
        e: Vec<(WireName, WireEntry)>,
    },
    /// A store file.
    File {
        /// Executable.
        x: bool,
        /// Store path base name.
        sp: String,
        /// Path inside it.
        p: String,
        /// NAR offset of the contents.
        o: u64,
        /// Size.
        s: u64,
    },
    /// An inline file.
    Inline {
        /// Executable.
        x: bool,
        /// Contents, base64.
        d: String,
    },
    /// A symlink.
    Link {
        /// Target.
        to: WireName,
    },
}

impl WireEntry {
    /// The wire form of `e`.
    pub fn from_entry(e: &Entry) -> WireEntry {
        match e {
            Entry::Directory(m) => WireEntry::Dir {
                e: m.iter()
                    .map(|(k, v)| (WireName::from_os(k), WireEntry::from_entry(v)))
                    .collect(),
            },
            Entry::Regular {
                executable,
                content: Content::Store(f),
            } => WireEntry::File {
                x: *executable,
                sp: f.store_path.to_string(),
                p: f.path.to_string(),
                o: f.nar_offset,
                s: f.size,
            },
            Entry::Regular {
                executable,
                content: Content::Inline(d),
            } => WireEntry::Inline {
                x: *executable,
                d: B64.encode(d),
            },
            Entry::Symlink(t) => WireEntry::Link {
                to: WireName::from_os(t),
            },
        }
    }
}

/// Why a tree received on the wire is refused. Each names the offending name or content.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A name or inline content is not base64.
    #[error("{what} is not base64")]
    NotBase64 {
        /// Which name or content.
        what: String,
        /// The cause.
        #[source]
        source: base64::DecodeError,
    },
    /// A directory entry's name is empty, `.`, `..`, or holds `/` or NUL.
    #[error("invalid file name {0:?}")]
    InvalidName(OsString),
    /// A directory holds the same name twice.
    #[error("duplicate file name {0:?}")]
    DuplicateName(OsString),
}

/// Rebuilds trees, sharing the `Arc<str>` of store path names between files.
#[derive(Default)]
pub struct Decoder {
    names: HashMap<String, Arc<str>>,
}

impl Decoder {
    /// The tree of `w`; an error names what is malformed.
    pub fn entry(&mut self, w: &WireEntry) -> Result<Arc<Entry>, WireError> {
        Ok(Arc::new(match w {
            WireEntry::Dir { e } => {
                let mut m = BTreeMap::new();
                for (k, v) in e {
                    let name = k.to_os()?;
                    let b = name.as_bytes();
                    if b.is_empty()
                        || b == b"."
                        || b == b".."
                        || b.contains(&b'/')
                        || b.contains(&0)
                    {
                        return Err(WireError::InvalidName(name));
                    }
                    if m.insert(name.clone(), self.entry(v)?).is_some() {
                        return Err(WireError::DuplicateName(name));
                    }
                }
                Entry::Directory(m)
            }
            WireEntry::File { x, sp, p, o, s } => {
                let store_path = match self.names.get(sp) {
                    Some(a) => a.clone(),
                    None => {
                        let a: Arc<str> = Arc::from(sp.as_str());
                        self.names.insert(sp.clone(), a.clone());
                        a
                    }
                };
                Entry::Regular {
                    executable: *x,
                    content: Content::Store(FileRef {
                        store_path,
                        path: Arc::from(p.as_str()),
                        nar_offset: *o,
                        size: *s,
                    }),
                }
            }
            WireEntry::Inline { x, d } => Entry::Regular {
                executable: *x,
                content: Content::Inline(Arc::from(B64.decode(d).map_err(|source| {
                    WireError::NotBase64 {
                        what: "inline contents".into(),
                        source,
                    }
                })?)),
            },
            WireEntry::Link { to } => Entry::Symlink(to.to_os()?),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_survives_the_wire() {
        let file = Arc::new(Entry::Regular {
            executable: true,
            content: Content::Store(FileRef {
                store_path: Arc::from("abc-hello"),
                path: Arc::from("bin/hello"),
                nar_offset: 4096,
                size: 12345,
            }),
        });
        let mut bin = BTreeMap::new();
        bin.insert(OsString::from("hello"), file);
        bin.insert(
            OsString::from_vec(vec![0xff, b'x']),
            Arc::new(Entry::Symlink(OsString::from_vec(vec![b'a', 0xfe]))),
        );
        let mut root = BTreeMap::new();
        root.insert(OsString::from("bin"), Arc::new(Entry::Directory(bin)));
        root.insert(
            OsString::from("passwd"),
            Arc::new(Entry::Regular {
                executable: false,
                content: Content::Inline(Arc::from(&b"root:x:0:0::/:/bin/sh\n"[..])),
            }),
        );
        let tree = Entry::Directory(root);
        let json = serde_json::to_string(&WireEntry::from_entry(&tree)).unwrap();
        let back: WireEntry = serde_json::from_str(&json).unwrap();
        assert_eq!(*Decoder::default().entry(&back).unwrap(), tree);
    }

    #[test]
    fn the_digest_names_the_content() {
        let file = |offset: u64, executable: bool| {
            Arc::new(Entry::Regular {
                executable,
                content: Content::Store(FileRef {
                    store_path: Arc::from("abc-hello"),
                    path: Arc::from("bin/hello"),
                    nar_offset: offset,
                    size: 10,
                }),
            })
        };
        let dir = |entries: Vec<(&str, Arc<Entry>)>| {
            Entry::Directory(
                entries
                    .into_iter()
                    .map(|(k, v)| (OsString::from(k), v))
                    .collect(),
            )
        };
        let a = dir(vec![("hello", file(4096, true))]);
        // The same content built again: the same digest.
        assert_eq!(
            tree_digest(&a),
            tree_digest(&dir(vec![("hello", file(4096, true))]))
        );
        assert_eq!(tree_digest(&a).len(), 64);
        // Any difference gives another digest.
        let others = [
            dir(vec![("hello", file(4097, true))]),
            dir(vec![("hello", file(4096, false))]),
            dir(vec![("hellp", file(4096, true))]),
            dir(vec![
                ("hello", file(4096, true)),
                ("x", Arc::new(Entry::Symlink(OsString::from("hello")))),
            ]),
            dir(vec![(
                "hello",
                Arc::new(Entry::Regular {
                    executable: true,
                    content: Content::Inline(Arc::from(&b"abc-hello"[..])),
                }),
            )]),
            dir(vec![("hello", Arc::new(dir(vec![])))]),
        ];
        for o in &others {
            assert_ne!(tree_digest(&a), tree_digest(o), "{o:?}");
        }
        // Names and targets are length-prefixed: moving bytes between them changes the digest.
        let l1 = dir(vec![("ab", Arc::new(Entry::Symlink(OsString::from("c"))))]);
        let l2 = dir(vec![("a", Arc::new(Entry::Symlink(OsString::from("bc"))))]);
        assert_ne!(tree_digest(&l1), tree_digest(&l2));
    }

    #[test]
    fn hostile_names_are_refused() {
        for bad in ["..", ".", "a/b", ""] {
            let w = WireEntry::Dir {
                e: vec![(
                    WireName::Text(bad.into()),
                    WireEntry::Link {
                        to: WireName::Text("x".into()),
                    },
                )],
            };
            assert!(Decoder::default().entry(&w).is_err(), "{bad:?}");
        }
    }
}
