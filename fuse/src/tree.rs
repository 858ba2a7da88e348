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
