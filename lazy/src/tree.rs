//! A store path's view tree ([`kof_fuse::Entry`]) from metadata only: the stored tree of a
//! stored path, or a cache's `.ls` listing, checked against the narinfo before use.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::sync::Arc;

use kof_fuse::{Content, Entry, FileRef};
use kof_nar::listing::{Listing, ListingNode};
use kof_store::{NodeKind, TreeNode};

/// Deepest directory nesting accepted in a listing.
pub const MAX_DEPTH: usize = 256;

/// Whether `name` can be a directory entry (what the NAR reader accepts too).
fn name_ok(name: &[u8]) -> bool {
    !name.is_empty()
        && name != b"."
        && name != b".."
        && name.len() <= 255
        && !name.contains(&b'/')
        && !name.contains(&0)
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// The entry of a stored path from its tree (`Store::tree`, NAR order). `Err` names what is
/// inconsistent.
pub fn entry_of_tree(base_name: &str, nodes: &[TreeNode]) -> Result<Entry, String> {
    let store_path: Arc<str> = Arc::from(base_name);
    let mut rel: HashMap<u64, String> = HashMap::with_capacity(nodes.len());
    for n in nodes {
        let p = match n.parent {
            None => String::new(),
            Some(parent) => {
                let dir = rel
                    .get(&parent)
                    .ok_or_else(|| format!("node {} comes before its parent {parent}", n.id))?;
                join(dir, &String::from_utf8_lossy(&n.name))
            }
        };
        rel.insert(n.id, p);
    }
    // Children have higher ids than their parent: build from the end.
    let mut children: HashMap<u64, BTreeMap<OsString, Arc<Entry>>> = HashMap::new();
    let mut root = None;
    for n in nodes.iter().rev() {
        let e = match &n.kind {
            NodeKind::Directory => Entry::Directory(children.remove(&n.id).unwrap_or_default()),
            NodeKind::Symlink { target } => Entry::Symlink(OsString::from_vec(target.clone())),
            NodeKind::Regular {
                executable,
                content,
            } => Entry::Regular {
                executable: *executable,
                content: Content::Store(FileRef {
                    store_path: store_path.clone(),
                    path: Arc::from(rel[&n.id].as_str()),
                    nar_offset: n
                        .nar_offset
                        .ok_or_else(|| format!("file {} has no NAR offset", rel[&n.id]))?,
                    size: content.size,
                }),
            },
        };
        match n.parent {
            None => root = Some(e),
            Some(p) => {
                children
                    .entry(p)
                    .or_default()
                    .insert(OsString::from_vec(n.name.clone()), Arc::new(e));
            }
        }
    }
    root.ok_or_else(|| "the tree has no root".to_string())
}

/// The entry of a path from its `.ls` listing, refusing what a hostile listing could get
/// wrong: bad names, files without an offset or reaching past NarSize, too deep a tree.
pub fn entry_of_listing(
    base_name: &str,
    listing: &Listing,
    nar_size: u64,
) -> Result<Entry, String> {
    if listing.version != 1 {
        return Err(format!("listing version {}", listing.version));
    }
    let store_path: Arc<str> = Arc::from(base_name);
    convert(&store_path, &listing.root, "", 0, nar_size)
}

fn convert(
    store_path: &Arc<str>,
    node: &ListingNode,
    rel: &str,
    depth: usize,
    nar_size: u64,
) -> Result<Entry, String> {
    if depth > MAX_DEPTH {
        return Err(format!("deeper than {MAX_DEPTH} at {rel:?}"));
    }
    Ok(match node {
        ListingNode::Regular {
            size,
            executable,
            nar_offset,
        } => {
            let off = nar_offset.ok_or_else(|| format!("file {rel:?} has no narOffset"))?;
            if off.checked_add(*size).is_none_or(|end| end > nar_size) {
                return Err(format!(
                    "file {rel:?} at {off} of {size} bytes reaches past NarSize {nar_size}"
                ));
            }
            Entry::Regular {
                executable: *executable,
                content: Content::Store(FileRef {
                    store_path: store_path.clone(),
                    path: Arc::from(rel),
                    nar_offset: off,
                    size: *size,
                }),
            }
        }
        ListingNode::Symlink { target } => {
            if target.is_empty() || target.contains('\0') {
                return Err(format!("symlink {rel:?} has an invalid target"));
            }
            Entry::Symlink(OsString::from(target))
        }
        ListingNode::Directory { entries } => {
            let mut out = BTreeMap::new();
            for (name, child) in entries {
                if !name_ok(name.as_bytes()) {
                    return Err(format!("invalid name {name:?} in {rel:?}"));
                }
                let e = convert(store_path, child, &join(rel, name), depth + 1, nar_size)?;
                out.insert(OsString::from(name), Arc::new(e));
            }
            Entry::Directory(out)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(json: &str) -> Listing {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn listing_is_converted_with_offsets_and_paths() {
        let l = listing(
            r#"{"version":1,"root":{"type":"directory","entries":{
                "bin":{"type":"directory","entries":{"x":{"type":"regular","size":3,"executable":true,"narOffset":200}}},
                "l":{"type":"symlink","target":"bin/x"}}}}"#,
        );
        let e = entry_of_listing("aaa-x", &l, 1000).unwrap();
        let Entry::Directory(root) = e else { panic!() };
        let Entry::Directory(bin) = &*root[&OsString::from("bin")] else {
            panic!()
        };
        match &*bin[&OsString::from("x")] {
            Entry::Regular {
                executable: true,
                content: Content::Store(f),
            } => {
                assert_eq!(
                    (&*f.store_path, &*f.path, f.nar_offset, f.size),
                    ("aaa-x", "bin/x", 200, 3)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hostile_listings_are_refused() {
        for bad in [
            r#"{"version":1,"root":{"type":"regular","size":10,"narOffset":995}}"#,
            r#"{"version":1,"root":{"type":"regular","size":18446744073709551615,"narOffset":2}}"#,
            r#"{"version":1,"root":{"type":"regular","size":10}}"#,
            r#"{"version":1,"root":{"type":"directory","entries":{"..":{"type":"symlink","target":"x"}}}}"#,
            r#"{"version":1,"root":{"type":"directory","entries":{"a/b":{"type":"symlink","target":"x"}}}}"#,
            r#"{"version":1,"root":{"type":"directory","entries":{"":{"type":"symlink","target":"x"}}}}"#,
            r#"{"version":2,"root":{"type":"symlink","target":"x"}}"#,
        ] {
            assert!(
                entry_of_listing("aaa-x", &listing(bad), 1000).is_err(),
                "{bad}"
            );
        }
    }
}
