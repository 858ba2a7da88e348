//! NAR listings: the `.ls` JSON a cache written with `write-nar-listing=true` serves beside each
//! narinfo, giving the tree and each file's offset in the uncompressed NAR.

use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::nar::{self, NarError, NarVisitor};

/// A whole listing file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// Always 1.
    pub version: u32,
    /// The root node.
    pub root: ListingNode,
}

/// One node of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ListingNode {
    /// A regular file.
    Regular {
        /// Size in bytes.
        size: u64,
        /// Executable bit (omitted when false).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        executable: bool,
        /// Offset of the contents in the uncompressed NAR.
        #[serde(rename = "narOffset", default, skip_serializing_if = "Option::is_none")]
        nar_offset: Option<u64>,
    },
    /// A symlink.
    Symlink {
        /// Its target.
        target: String,
    },
    /// A directory.
    Directory {
        /// Its entries by name.
        entries: BTreeMap<String, ListingNode>,
    },
}

/// Builds the listing of the NAR read from `reader`.
pub fn listing_of_nar<R: Read>(reader: R) -> Result<Listing, NarError> {
    let mut b = Builder {
        stack: Vec::new(),
        root: None,
    };
    nar::parse(reader, &mut b)?;
    Ok(Listing {
        version: 1,
        root: b.root.ok_or(NarError::Truncated(0))?,
    })
}

struct Builder {
    stack: Vec<(Option<String>, BTreeMap<String, ListingNode>)>,
    root: Option<ListingNode>,
}

fn utf8(b: &[u8]) -> Result<String, NarError> {
    String::from_utf8(b.to_vec()).map_err(|e| NarError::Visitor(Box::new(e)))
}

impl Builder {
    fn put(&mut self, name: Option<&[u8]>, node: ListingNode) -> Result<(), NarError> {
        match (name, self.stack.last_mut()) {
            (Some(n), Some((_, entries))) => {
                entries.insert(utf8(n)?, node);
            }
            _ => self.root = Some(node),
        }
        Ok(())
    }
}

impl NarVisitor for Builder {
    fn enter_directory(&mut self, name: Option<&[u8]>) -> Result<(), NarError> {
        let name = name.map(utf8).transpose()?;
        self.stack.push((name, BTreeMap::new()));
        Ok(())
    }
    fn leave_directory(&mut self) -> Result<(), NarError> {
        let (name, entries) = self.stack.pop().expect("balanced by the parser");
        let node = ListingNode::Directory { entries };
        match (name, self.stack.last_mut()) {
            (Some(n), Some((_, parent))) => {
                parent.insert(n, node);
            }
            _ => self.root = Some(node),
        }
        Ok(())
    }
    fn symlink(&mut self, name: Option<&[u8]>, target: &[u8]) -> Result<(), NarError> {
        let node = ListingNode::Symlink {
            target: utf8(target)?,
        };
        self.put(name, node)
    }
    fn regular(
        &mut self,
        name: Option<&[u8]>,
        executable: bool,
        size: u64,
        nar_offset: u64,
        _contents: &mut dyn Read,
    ) -> Result<(), NarError> {
        let node = ListingNode::Regular {
            size,
            executable,
            nar_offset: Some(nar_offset),
        };
        self.put(name, node)
    }
}
