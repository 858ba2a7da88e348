//! The inode table of the mount: the mount root, one directory per view, and inode numbers for
//! the entries of the views' [`Entry`] trees, handed out lazily as the kernel meets them.
//!
//! Inode scheme:
//! - inode 1 is the mount root; its children are the views, listed by name.
//! - Directories, symlinks and inline files get an inode per view and per path, allocated on
//!   the first `lookup` or `readdir` that names them. The kernel refuses a directory reachable
//!   under two parents, so directories are never shared.
//! - Regular files of the store ([`Content::Store`]) share one inode per `(FileRef, executable)`
//!   across all views (and all paths of a view): pods of one environment then share the kernel's
//!   page cache of e.g. `libpython.so`. Such an inode is reference-counted by the views that
//!   reached it and dropped with the last of them. It reports `nlink` 1 even when it appears
//!   under several names: it is the same immutable content, and a hard-link count would change
//!   as views come and go.
//! - Inode numbers are never reused, so a stale kernel reference after `remove_view` gets
//!   `ENOENT` rather than another file. Nodes live until their view is removed (`forget` is not
//!   tracked): memory is bounded by the entries the view's users touched.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, INodeNo};

use crate::{Content, Entry, FileRef};

/// The mount root's inode number.
pub(crate) const ROOT_INO: u64 = 1;

/// Block size reported in `st_blksize`.
const BLKSIZE: u32 = 4096;

/// Timestamps of every node: one second after the epoch, as in the Nix store.
fn timestamp() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1)
}

/// Where a per-view node lies, as far as gating goes: a view's `nix/store/<base>` entries are
/// store paths, and lookups and directory reads inside one ask the content source's gate first.
#[derive(Clone)]
enum Place {
    Other,
    /// The view's `nix` directory.
    Nix,
    /// The view's `nix/store` directory.
    Store,
    /// Inside (or the root of) this store path, by base name.
    InPath(Arc<str>),
}

/// One inode inside a view.
struct Node {
    entry: Arc<Entry>,
    place: Place,
    /// The inode of the view's root directory; 0 for shared store files.
    view: u64,
    /// The parent directory (directories only; 0 for shared store files).
    parent: u64,
    /// Children already given inodes, by name (directories only).
    children: HashMap<OsString, u64>,
    /// `2 + subdirectories` for directories, 1 otherwise.
    nlink: u32,
    /// How many views reached this shared store file (0 for per-view nodes).
    views: u32,
}

/// One mounted view.
struct View {
    /// Per-view inodes to drop with the view (its root included).
    owned: Vec<u64>,
    /// Shared store file inodes this view holds a reference on.
    shared: HashSet<u64>,
}

/// What a name in a directory resolves to.
pub(crate) enum Resolved<'a> {
    /// An inode already allocated.
    Ino(u64),
    /// The name does not exist in an (immutable) view directory: cacheable as negative.
    Absent,
    /// The name exists but has no inode yet: allocate under the write lock.
    Unallocated(&'a Arc<Entry>),
}

/// A directory entry for `readdir`.
pub(crate) struct DirEntry<'a> {
    pub(crate) ino: u64,
    pub(crate) kind: FileType,
    pub(crate) name: &'a OsStr,
}

/// Why a view could not be added.
#[derive(Debug)]
pub(crate) enum AddViewError {
    Exists,
    RootNotDirectory,
}

/// The whole inode table, behind one `RwLock` in the file system.
pub(crate) struct Tree {
    next_ino: u64,
    nodes: HashMap<u64, Node>,
    /// By the view's root inode.
    views: HashMap<u64, View>,
    /// View names to their root inode, sorted for `readdir`.
    names: BTreeMap<String, u64>,
    /// Shared store file inodes.
    shared: HashMap<(FileRef, bool), u64>,
}

impl Tree {
    pub(crate) fn new() -> Self {
        Tree {
            next_ino: ROOT_INO + 1,
            nodes: HashMap::new(),
            views: HashMap::new(),
            names: BTreeMap::new(),
            shared: HashMap::new(),
        }
    }

    fn alloc_ino(&mut self) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    pub(crate) fn add_view(&mut self, name: &str, root: Arc<Entry>) -> Result<(), AddViewError> {
        if self.names.contains_key(name) {
            return Err(AddViewError::Exists);
        }
        if !matches!(*root, Entry::Directory(_)) {
            return Err(AddViewError::RootNotDirectory);
        }
        let ino = self.alloc_ino();
        self.nodes.insert(ino, Node::new(root, ino, ROOT_INO));
        self.views.insert(
            ino,
            View {
                owned: vec![ino],
                shared: HashSet::new(),
            },
        );
        self.names.insert(name.to_owned(), ino);
        Ok(())
    }

    /// Removes a view and every inode only it held. Returns whether it existed.
    pub(crate) fn remove_view(&mut self, name: &str) -> bool {
        let Some(root) = self.names.remove(name) else {
            return false;
        };
        let view = self
            .views
            .remove(&root)
            .expect("every view name maps to a view");
        for ino in view.owned {
            self.nodes.remove(&ino);
        }
        for ino in view.shared {
            let node = self.nodes.get_mut(&ino).expect("shared inode is live");
            node.views -= 1;
            if node.views == 0 {
                let node = self.nodes.remove(&ino).expect("shared inode is live");
                if let Entry::Regular {
                    executable,
                    content: Content::Store(file),
                } = &*node.entry
                {
                    self.shared.remove(&(file.clone(), *executable));
                }
            }
        }
        true
    }

    /// The tree of view `name`.
    pub(crate) fn view_root(&self, name: &str) -> Option<Arc<Entry>> {
        let ino = self.names.get(name)?;
        Some(self.nodes.get(ino)?.entry.clone())
    }

    pub(crate) fn view_names(&self) -> Vec<String> {
        self.names.keys().cloned().collect()
    }

    /// Resolves `name` in directory `parent` without allocating.
    pub(crate) fn resolve(&self, parent: u64, name: &OsStr) -> Result<Resolved<'_>, Errno> {
        if parent == ROOT_INO {
            return match name.to_str().and_then(|n| self.names.get(n)) {
                Some(&ino) => Ok(Resolved::Ino(ino)),
                // Views come and go: no negative caching at the root.
                None => Err(Errno::ENOENT),
            };
        }
        let node = self.nodes.get(&parent).ok_or(Errno::ENOENT)?;
        let Entry::Directory(entries) = &*node.entry else {
            return Err(Errno::ENOTDIR);
        };
        if let Some(&ino) = node.children.get(name) {
            return Ok(Resolved::Ino(ino));
        }
        Ok(match entries.get(name) {
            Some(child) => Resolved::Unallocated(child),
            None => Resolved::Absent,
        })
    }

    /// Gives `child` (named `name` in directory `parent`) its inode.
    pub(crate) fn alloc_child(&mut self, parent: u64, name: &OsStr, child: Arc<Entry>) -> u64 {
        let view = self.nodes[&parent].view;
        let ino = match &*child {
            Entry::Regular {
                executable,
                content: Content::Store(file),
            } => {
                let key = (file.clone(), *executable);
                let ino = match self.shared.get(&key) {
                    Some(&ino) => ino,
                    None => {
                        let ino = self.alloc_ino();
                        self.shared.insert(key, ino);
                        self.nodes.insert(ino, Node::new(child, 0, 0));
                        ino
                    }
                };
                let v = self.views.get_mut(&view).expect("node's view is live");
                if v.shared.insert(ino) {
                    self.nodes.get_mut(&ino).expect("just resolved").views += 1;
                }
                ino
            }
            _ => {
                let ino = self.alloc_ino();
                let place = match (&self.nodes[&parent].place, name.to_str()) {
                    (Place::InPath(p), _) => Place::InPath(p.clone()),
                    (Place::Store, Some(base)) => Place::InPath(Arc::from(base)),
                    (Place::Nix, Some("store")) => Place::Store,
                    (Place::Other, Some("nix")) if parent == view => Place::Nix,
                    _ => Place::Other,
                };
                let mut node = Node::new(child, view, parent);
                node.place = place;
                self.nodes.insert(ino, node);
                self.views
                    .get_mut(&view)
                    .expect("node's view is live")
                    .owned
                    .push(ino);
                ino
            }
        };
        self.nodes
            .get_mut(&parent)
            .expect("parent is live")
            .children
            .insert(name.to_owned(), ino);
        ino
    }

    /// Looks `name` up in `parent`, allocating its inode. `Ok(None)`: a cacheable absence.
    pub(crate) fn lookup_alloc(&mut self, parent: u64, name: &OsStr) -> Result<Option<u64>, Errno> {
        match self.resolve(parent, name)? {
            Resolved::Ino(ino) => Ok(Some(ino)),
            Resolved::Absent => Ok(None),
            Resolved::Unallocated(child) => {
                let child = child.clone();
                Ok(Some(self.alloc_child(parent, name, child)))
            }
        }
    }

    pub(crate) fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        if ino == ROOT_INO {
            let nlink = 2 + u32::try_from(self.names.len()).unwrap_or(u32::MAX - 2);
            return Ok(make_attr(ino, FileType::Directory, 0o555, 0, nlink));
        }
        let node = self.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        Ok(match &*node.entry {
            Entry::Directory(_) => make_attr(ino, FileType::Directory, 0o555, 0, node.nlink),
            Entry::Regular {
                executable,
                content,
            } => {
                let perm = if *executable { 0o555 } else { 0o444 };
                let size = match content {
                    Content::Store(file) => file.size,
                    Content::Inline(bytes) => bytes.len() as u64,
                };
                make_attr(ino, FileType::RegularFile, perm, size, 1)
            }
            Entry::Symlink(target) => {
                make_attr(ino, FileType::Symlink, 0o777, target.len() as u64, 1)
            }
        })
    }

    /// The store path (base name) that directory or symlink `ino` lies in, if any: what must
    /// pass the content source's gate before `ino` is looked into or read.
    pub(crate) fn gate_of(&self, ino: u64) -> Option<Arc<str>> {
        match &self.nodes.get(&ino)?.place {
            Place::InPath(p) => Some(p.clone()),
            _ => None,
        }
    }

    /// The entry behind `ino` (not the mount root).
    pub(crate) fn entry(&self, ino: u64) -> Result<&Arc<Entry>, Errno> {
        if ino == ROOT_INO {
            return Err(Errno::EISDIR);
        }
        Ok(&self.nodes.get(&ino).ok_or(Errno::ENOENT)?.entry)
    }

    /// Lists directory `ino` from position `offset` (`.` is 0, `..` is 1), allocating inodes of
    /// the entries listed, until `add` says the reply is full. `add` gets the next offset.
    pub(crate) fn readdir(
        &mut self,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(DirEntry<'_>, u64) -> bool,
    ) -> Result<(), Errno> {
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        if ino == ROOT_INO {
            let dots = [(".", ROOT_INO), ("..", ROOT_INO)];
            let dots = dots.iter().map(|&(n, i)| (OsStr::new(n), i));
            let views = self
                .names
                .iter()
                .map(|(name, &ino)| (OsStr::new(name.as_str()), ino));
            for (pos, (name, ino)) in dots.chain(views).enumerate().skip(skip) {
                let entry = DirEntry {
                    ino,
                    kind: FileType::Directory,
                    name,
                };
                if add(entry, pos as u64 + 1) {
                    break;
                }
            }
            return Ok(());
        }
        let node = self.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        let dir = node.entry.clone();
        let parent = node.parent;
        let Entry::Directory(entries) = &*dir else {
            return Err(Errno::ENOTDIR);
        };
        for pos in skip..2 {
            let (name, i) = if pos == 0 { (".", ino) } else { ("..", parent) };
            let entry = DirEntry {
                ino: i,
                kind: FileType::Directory,
                name: OsStr::new(name),
            };
            if add(entry, pos as u64 + 1) {
                return Ok(());
            }
        }
        for (pos, (name, child)) in entries.iter().enumerate().skip(skip.saturating_sub(2)) {
            let child_ino = match self.nodes[&ino].children.get(name.as_os_str()) {
                Some(&i) => i,
                None => self.alloc_child(ino, name, child.clone()),
            };
            let entry = DirEntry {
                ino: child_ino,
                kind: kind_of(child),
                name,
            };
            if add(entry, pos as u64 + 3) {
                break;
            }
        }
        Ok(())
    }
}

impl Node {
    fn new(entry: Arc<Entry>, view: u64, parent: u64) -> Self {
        let nlink = match &*entry {
            Entry::Directory(entries) => {
                let subdirs = entries
                    .values()
                    .filter(|e| matches!(***e, Entry::Directory(_)))
                    .count();
                2 + u32::try_from(subdirs).unwrap_or(u32::MAX - 2)
            }
            _ => 1,
        };
        Node {
            entry,
            place: Place::Other,
            view,
            parent,
            children: HashMap::new(),
            nlink,
            views: 0,
        }
    }
}

fn kind_of(entry: &Entry) -> FileType {
    match entry {
        Entry::Directory(_) => FileType::Directory,
        Entry::Regular { .. } => FileType::RegularFile,
        Entry::Symlink(_) => FileType::Symlink,
    }
}

fn make_attr(ino: u64, kind: FileType, perm: u16, size: u64, nlink: u32) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: timestamp(),
        mtime: timestamp(),
        ctime: timestamp(),
        crtime: timestamp(),
        kind,
        perm,
        nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
    }
}

/// The attributes of a negative entry (inode 0), which the kernel caches as "does not exist".
pub(crate) fn negative_attr() -> FileAttr {
    make_attr(0, FileType::RegularFile, 0, 0, 0)
}

/// The inode table as a successor rebuilds it: which inode each name the kernel met was given.
/// The trees themselves travel separately (by view name); `edges` replays every allocation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct TreeState {
    pub(crate) next_ino: u64,
    /// `(name, root inode)` of each view.
    pub(crate) views: Vec<(String, u64)>,
    /// `(parent, name, child)`: `name` in directory `parent` has inode `child`.
    pub(crate) edges: Vec<(u64, Vec<u8>, u64)>,
}

/// Why a handed-over inode table cannot be rebuilt (the trees given do not match it).
#[derive(Debug, thiserror::Error)]
#[error("inode {ino}: {reason}")]
pub struct RestoreError {
    /// The inode whose place could not be found.
    pub ino: u64,
    /// What did not match.
    pub reason: String,
}

impl Tree {
    /// Every view and every allocation, for [`Tree::restore`].
    pub(crate) fn snapshot(&self) -> TreeState {
        let views = self
            .names
            .iter()
            .map(|(name, &ino)| (name.clone(), ino))
            .collect();
        let mut edges = Vec::new();
        for (&parent, node) in &self.nodes {
            for (name, &child) in &node.children {
                edges.push((parent, name.as_bytes().to_vec(), child));
            }
        }
        // A directory's inode is larger than its parent's (it was allocated by a lookup in the
        // parent), so replaying by parent inode always finds the parent in place.
        edges.sort_unstable();
        TreeState {
            next_ino: self.next_ino,
            views,
            edges,
        }
    }

    /// Rebuilds the table `state` describes over the views' trees (by view name), giving every
    /// entry the inode the kernel knows it by.
    pub(crate) fn restore(
        state: &TreeState,
        trees: &HashMap<String, Arc<Entry>>,
    ) -> Result<Tree, RestoreError> {
        let mut tree = Tree::new();
        for (name, ino) in &state.views {
            let root = trees.get(name).ok_or_else(|| RestoreError {
                ino: *ino,
                reason: format!("no tree given for view {name}"),
            })?;
            if !matches!(**root, Entry::Directory(_)) {
                return Err(RestoreError {
                    ino: *ino,
                    reason: format!("the tree of view {name} is not a directory"),
                });
            }
            tree.nodes
                .insert(*ino, Node::new(root.clone(), *ino, ROOT_INO));
            tree.views.insert(
                *ino,
                View {
                    owned: vec![*ino],
                    shared: HashSet::new(),
                },
            );
            tree.names.insert(name.clone(), *ino);
        }
        for (parent, name, child) in &state.edges {
            let name = OsStr::from_bytes(name);
            let entry = match tree.resolve(*parent, name) {
                Ok(Resolved::Unallocated(entry)) => entry.clone(),
                Ok(Resolved::Ino(_)) => {
                    return Err(RestoreError {
                        ino: *child,
                        reason: format!("{name:?} in inode {parent} is listed twice"),
                    })
                }
                Ok(Resolved::Absent) | Err(_) => {
                    return Err(RestoreError {
                        ino: *child,
                        reason: format!("{name:?} is not in directory inode {parent}"),
                    })
                }
            };
            tree.next_ino = *child;
            let got = tree.alloc_child(*parent, name, entry);
            if got != *child {
                return Err(RestoreError {
                    ino: *child,
                    reason: format!(
                        "{name:?} in inode {parent} is a store file already given inode {got}"
                    ),
                });
            }
        }
        tree.next_ino = state.next_ino;
        Ok(tree)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, exec: bool) -> Arc<Entry> {
        Arc::new(Entry::Regular {
            executable: exec,
            content: Content::Store(FileRef {
                store_path: Arc::from("aaaa-p"),
                path: Arc::from(path),
                nar_offset: 8,
                size: 3,
            }),
        })
    }

    fn dir(entries: Vec<(&str, Arc<Entry>)>) -> Arc<Entry> {
        Arc::new(Entry::Directory(
            entries
                .into_iter()
                .map(|(n, e)| (OsString::from(n), e))
                .collect(),
        ))
    }

    fn view() -> Arc<Entry> {
        let path = dir(vec![("bin", dir(vec![("sh", file("bin/sh", true))]))]);
        dir(vec![(
            "nix",
            dir(vec![("store", dir(vec![("aaaa-p", path)]))]),
        )])
    }

    /// Walks `names` from `root` allocating inodes; returns the last one's.
    fn walk(tree: &mut Tree, root: u64, names: &[&str]) -> u64 {
        let mut ino = root;
        for n in names {
            ino = tree.lookup_alloc(ino, OsStr::new(n)).unwrap().unwrap();
        }
        ino
    }

    #[test]
    fn a_restored_table_gives_every_name_the_same_inode() {
        let mut tree = Tree::new();
        tree.add_view("a", view()).unwrap();
        tree.add_view("b", view()).unwrap();
        let (ra, rb) = (tree.names["a"], tree.names["b"]);
        let sh_a = walk(&mut tree, ra, &["nix", "store", "aaaa-p", "bin", "sh"]);
        let sh_b = walk(&mut tree, rb, &["nix", "store", "aaaa-p", "bin", "sh"]);
        // The store file is shared by the two views; the directories are not.
        assert_eq!(sh_a, sh_b);
        let bin_a = walk(&mut tree, ra, &["nix", "store", "aaaa-p", "bin"]);
        let state = tree.snapshot();

        let trees: HashMap<String, Arc<Entry>> =
            [("a".to_string(), view()), ("b".to_string(), view())].into();
        let mut restored = Tree::restore(&state, &trees).unwrap();
        assert_eq!(restored.snapshot(), state);
        assert_eq!(restored.names, tree.names);
        for ino in [ra, rb, sh_a, bin_a] {
            assert_eq!(restored.attr(ino).unwrap(), tree.attr(ino).unwrap());
        }
        assert_eq!(restored.gate_of(bin_a).as_deref(), Some("aaaa-p"));
        // Lookups in the restored table find the same inodes, and new ones go on from
        // next_ino without reusing any.
        assert_eq!(
            walk(&mut restored, rb, &["nix", "store", "aaaa-p", "bin", "sh"]),
            sh_a
        );
        let before = state.next_ino;
        restored.add_view("c", view()).unwrap();
        assert_eq!(restored.names["c"], before);
        // Removing both views drops the shared inode, as in the original.
        assert!(restored.remove_view("a") && restored.remove_view("b"));
        assert!(restored.attr(sh_a).is_err());
    }

    #[test]
    fn a_tree_that_does_not_match_is_refused_by_name() {
        let mut tree = Tree::new();
        tree.add_view("a", view()).unwrap();
        let ra = tree.names["a"];
        walk(&mut tree, ra, &["nix", "store", "aaaa-p", "bin", "sh"]);
        let state = tree.snapshot();
        let other = dir(vec![("nix", dir(vec![]))]);
        let trees: HashMap<String, Arc<Entry>> = [("a".to_string(), other)].into();
        let err = Tree::restore(&state, &trees).err().expect("refused");
        assert!(err.reason.contains("\"store\""), "{err}");
        let err = Tree::restore(&state, &HashMap::new())
            .err()
            .expect("refused");
        assert!(err.reason.contains("no tree given for view a"), "{err}");
    }
}
