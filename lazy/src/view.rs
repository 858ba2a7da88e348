//! The root file system of one environment view, built from metadata only.
//!
//! A view is what a container sees as `/`: `nix/store/` holding exactly the environment's
//! closure (one subtree per store path, shared with every other view of that path), the
//! *rendered environment* at a store-like path that `FLOX_ENV` names, `bin/sh` and
//! `usr/bin/env` when the environment provides them, `usr/local/bin` (and `sbin`) linking to
//! the environment's own, the essential `etc/` files, and empty
//! mount points (`proc`, `sys`, `dev`, `tmp`, `run`, `var`, ...).
//!
//! The rendered environment is a buildEnv-style merge of the installed packages' trees, as
//! nixpkgs' `buildenv.pl` (which Flox uses) builds it: every top-level directory (`bin`, `lib`,
//! `share`, ...) is a real directory; below it, a directory only one package provides is a
//! symlink to that package's directory, and one several packages provide is merged
//! recursively (a symlink to a directory is unfolded when another package puts a directory at
//! the same place). Files become symlinks to their absolute `/nix/store/<pkg>/...` path. Where
//! two packages provide the same name, the lower priority number wins; at equal priority the
//! first package in lockfile order wins and a warning names both.
//!
//! Everything here is a pure function of the [`ViewInput`]: no I/O, no file contents.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use kof_fuse::{Content, Entry};
use kof_nar::{base32, NixHash, StorePath};
use thiserror::Error;

use kof_floxhub::resolve::ResolvedEnvironment;
use kof_node_api::api::Activation;

/// Most symlinks followed while resolving one path (as Linux's `MAXSYMLINKS`).
const MAX_SYMLINK_HOPS: usize = 40;

/// The store directory views are built for.
pub const STORE_DIR: &str = "/nix/store";

/// Why a view could not be built.
#[derive(Debug, Error)]
pub enum ViewError {
    /// An installed path has no tree among the closure's trees.
    #[error("environment {env}: installed path {path} is not in the closure's trees")]
    InstalledNotInClosure {
        /// `owner/name:generation`.
        env: String,
        /// The installed path.
        path: StorePath,
    },
    /// The rendered environment's store path could not be named (the name is not a valid store
    /// path name even after sanitising).
    #[error("environment {env}: cannot name the rendered environment {name:?}: {source}")]
    BadEnvName {
        /// `owner/name:generation`.
        env: String,
        /// The base name tried.
        name: String,
        /// Why it was refused.
        #[source]
        source: kof_nar::store_path::StorePathError,
    },
    /// A closure member has the rendered environment's name.
    #[error("environment {env}: closure member {path} has the rendered environment's name")]
    NameClash {
        /// `owner/name:generation`.
        env: String,
        /// The clashing path.
        path: StorePath,
    },
}

/// One installed store path and the priority of the package it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledPath {
    /// The store path.
    pub path: StorePath,
    /// Lower wins on conflicts (Flox's default is 5).
    pub priority: u64,
}

/// What a view is built from.
#[derive(Debug, Clone)]
pub struct ViewInput {
    /// FloxHub owner.
    pub owner: String,
    /// Environment name (also `FLOX_ENV_DESCRIPTION` and part of the rendered path's name).
    pub name: String,
    /// The generation.
    pub generation: u64,
    /// The installed paths, in lockfile order, each once.
    pub installed: Vec<InstalledPath>,
    /// Every closure member's tree (the installed paths included).
    pub paths: BTreeMap<StorePath, Arc<Entry>>,
}

impl ViewInput {
    /// The installed paths of a resolved environment with their packages' priorities, in
    /// lockfile order (a path installed twice counts once, at its first place, with the best
    /// priority of its packages).
    pub fn installed_of(env: &ResolvedEnvironment) -> Vec<InstalledPath> {
        let mut out: Vec<InstalledPath> = Vec::new();
        for pkg in env.lockfile.packages_for(&env.system) {
            for p in pkg.installed_paths() {
                match out.iter_mut().find(|i| &i.path == p) {
                    Some(seen) => seen.priority = seen.priority.min(pkg.priority),
                    None => out.push(InstalledPath {
                        path: p.clone(),
                        priority: pkg.priority,
                    }),
                }
            }
        }
        out
    }

    /// The input for `env` with the closure's trees.
    pub fn new(env: &ResolvedEnvironment, paths: BTreeMap<StorePath, Arc<Entry>>) -> Self {
        ViewInput {
            owner: env.owner.clone(),
            name: env.name.clone(),
            generation: env.generation,
            installed: Self::installed_of(env),
            paths,
        }
    }

    fn label(&self) -> String {
        format!("{}/{}:{}", self.owner, self.name, self.generation)
    }
}

/// A built view.
#[derive(Debug, Clone)]
pub struct View {
    /// The root directory.
    pub root: Arc<Entry>,
    /// The rendered environment's store path; `FLOX_ENV` is its absolute form.
    pub env_path: StorePath,
    /// The environment's bash (`/nix/store/<bash>/bin/bash`), when it provides `bin/bash`.
    pub bash: Option<String>,
}

impl View {
    /// `FLOX_ENV`: `/nix/store/<hash>-flox-env-<name>`.
    pub fn flox_env(&self) -> String {
        self.env_path.to_absolute()
    }

    /// What activating `env` in this view needs (the caller adds `HOME` and `TERM`).
    pub fn activation(&self, env: &ResolvedEnvironment) -> Activation {
        Activation {
            env: format!("{}/{}:{}", env.owner, env.name, env.generation),
            flox_env: self.flox_env(),
            description: env.name.clone(),
            vars: env.vars.clone(),
            hook: env.hook.clone(),
            bash: self.bash.clone(),
        }
    }
}

/// The rendered environment's store path: `<hash>-flox-env-<name>`, the hash a digest of the
/// name and the installed paths with their priorities (so the same installation gets the same
/// path on every node, and any change a new one).
pub fn rendered_env_path(input: &ViewInput) -> Result<StorePath, ViewError> {
    let mut desc = Vec::new();
    desc.extend_from_slice(b"kof-flox-env-v1\0");
    desc.extend_from_slice(input.name.as_bytes());
    desc.push(0);
    for i in &input.installed {
        desc.extend_from_slice(i.path.to_absolute().as_bytes());
        desc.push(0);
        desc.extend_from_slice(i.priority.to_string().as_bytes());
        desc.push(0);
    }
    let digest = NixHash::digest(&desc);
    // Nix's compressHash: fold the 32-byte digest into the 20 bytes of a store path hash.
    let mut short = [0u8; 20];
    for (i, b) in digest.0.iter().enumerate() {
        short[i % 20] ^= b;
    }
    let name: String = input
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "+-._?=".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(200)
        .collect();
    let base = format!("{}-flox-env-{name}", base32::encode(&short));
    StorePath::from_base_name(&base).map_err(|source| ViewError::BadEnvName {
        env: input.label(),
        name: base,
        source,
    })
}

/// Where a merged node comes from.
#[derive(Debug, Clone)]
struct Source {
    /// Index of the package in [`ViewInput::installed`].
    pkg: usize,
    priority: u64,
    /// Absolute path of the node in its package (`/nix/store/<pkg>/bin/x`).
    path: String,
}

impl Source {
    /// Whether `self` beats `other` in a conflict.
    fn beats(&self, other: &Source) -> bool {
        (self.priority, self.pkg) < (other.priority, other.pkg)
    }
}

/// A node of the merge under construction.
#[derive(Debug)]
enum Node {
    Dir {
        children: BTreeMap<OsString, Node>,
        /// Every package directory merged here, best first not guaranteed.
        sources: Vec<Source>,
    },
    Leaf {
        source: Source,
        /// For a symlink resolving to a directory: that directory (and its absolute path), to
        /// unfold if another package puts a directory here.
        dir: Option<(Arc<Entry>, String)>,
    },
}

impl Node {
    fn best(&self) -> &Source {
        match self {
            Node::Dir { sources, .. } => sources
                .iter()
                .reduce(|a, b| if b.beats(a) { b } else { a })
                .expect("a merged directory has a source"),
            Node::Leaf { source, .. } => source,
        }
    }
}

/// The merge of the installed packages.
struct Merge<'a> {
    input: &'a ViewInput,
    root: BTreeMap<OsString, Node>,
}

fn join(base: &str, name: &OsStr) -> String {
    format!("{base}/{}", name.to_string_lossy())
}

impl<'a> Merge<'a> {
    /// Follows `target` (a symlink at absolute `at`) through the closure's trees to a
    /// directory, if it resolves to one.
    fn resolve_dir(&self, at: &str, target: &OsStr) -> Option<(Arc<Entry>, String)> {
        let mut path = resolve_target(at, target)?;
        for _ in 0..MAX_SYMLINK_HOPS {
            match self.lookup(&path)? {
                Lookup::Entry(e) => {
                    return match &*e {
                        Entry::Directory(_) => Some((e, path)),
                        _ => None,
                    }
                }
                Lookup::Symlink(at, t) => path = resolve_target(&at, &t)?,
            }
        }
        None
    }

    /// Finds an absolute `/nix/store/...` path in the closure's trees, stopping at the first
    /// symlink met on the way (returned with its location, to follow).
    fn lookup(&self, abs: &str) -> Option<Lookup> {
        let rest = abs.strip_prefix(STORE_DIR)?.strip_prefix('/')?;
        let mut parts = rest.split('/').filter(|p| !p.is_empty());
        let sp = StorePath::from_base_name(parts.next()?).ok()?;
        let mut e = self.input.paths.get(&sp)?.clone();
        let mut at = sp.to_absolute();
        let parts: Vec<&str> = parts.collect();
        for (i, p) in parts.iter().enumerate() {
            match &*e {
                Entry::Directory(children) => {
                    let next = children.get(OsStr::new(p))?.clone();
                    at = format!("{at}/{p}");
                    e = next;
                }
                Entry::Symlink(t) => {
                    let tail = parts[i..].join("/");
                    return Some(Lookup::Symlink(at, join_target(t, &tail)));
                }
                Entry::Regular { .. } => return None,
            }
        }
        match &*e {
            Entry::Symlink(t) => Some(Lookup::Symlink(at, t.clone())),
            _ => Some(Lookup::Entry(e)),
        }
    }

    /// Merges `entry` (found at absolute `path` in package `pkg`) into `dst` under `name`.
    fn add(
        &self,
        dst: &mut BTreeMap<OsString, Node>,
        name: &OsStr,
        entry: &Arc<Entry>,
        source: Source,
        depth: usize,
    ) {
        match &**entry {
            Entry::Directory(children) => self.add_dir(dst, name, children, source, depth),
            Entry::Symlink(target) => {
                let dir = self.resolve_dir(&source.path, target);
                // Top-level directories are always real: a package's `lib -> lib64` is
                // unfolded at once.
                if depth == 0 {
                    if let Some((d, p)) = &dir {
                        if let Entry::Directory(children) = &**d {
                            let source = Source {
                                path: p.clone(),
                                ..source
                            };
                            return self.add_dir(dst, name, children, source, depth);
                        }
                    }
                }
                self.add_leaf(dst, name, source, dir, depth)
            }
            Entry::Regular { .. } => self.add_leaf(dst, name, source, None, depth),
        }
    }

    fn add_dir(
        &self,
        dst: &mut BTreeMap<OsString, Node>,
        name: &OsStr,
        children: &BTreeMap<OsString, Arc<Entry>>,
        source: Source,
        depth: usize,
    ) {
        let slot = dst.entry(name.to_os_string());
        let node = match slot {
            std::collections::btree_map::Entry::Vacant(v) => v.insert(Node::Dir {
                children: BTreeMap::new(),
                sources: Vec::new(),
            }),
            std::collections::btree_map::Entry::Occupied(o) => {
                let node = o.into_mut();
                if let Node::Leaf { source: old, dir } = node {
                    match dir.take() {
                        // A symlink to a directory meets a directory: unfold it, then merge.
                        Some((d, p)) => {
                            let old = Source {
                                path: p,
                                ..old.clone()
                            };
                            let mut unfolded = BTreeMap::new();
                            if let Entry::Directory(c) = &*d {
                                for (n, e) in c {
                                    let s = Source {
                                        path: join(&old.path, n),
                                        ..old.clone()
                                    };
                                    self.add(&mut unfolded, n, e, s, depth + 1);
                                }
                            }
                            *node = Node::Dir {
                                children: unfolded,
                                sources: vec![old],
                            };
                        }
                        None => {
                            let old = old.clone();
                            if !self.settle(&old, &source, name) {
                                return;
                            }
                            *node = Node::Dir {
                                children: BTreeMap::new(),
                                sources: Vec::new(),
                            };
                        }
                    }
                }
                node
            }
        };
        let Node::Dir {
            children: merged,
            sources,
        } = node
        else {
            unreachable!("made a directory above");
        };
        sources.push(source.clone());
        for (n, e) in children {
            let s = Source {
                path: join(&source.path, n),
                ..source.clone()
            };
            self.add(merged, n, e, s, depth + 1);
        }
    }

    fn add_leaf(
        &self,
        dst: &mut BTreeMap<OsString, Node>,
        name: &OsStr,
        source: Source,
        dir: Option<(Arc<Entry>, String)>,
        depth: usize,
    ) {
        let old = match dst.get(name) {
            None => {
                dst.insert(name.to_os_string(), Node::Leaf { source, dir });
                return;
            }
            Some(Node::Leaf { source: old, .. }) if old.path == source.path => return,
            Some(Node::Dir { .. }) => {
                if let Some((d, p)) = &dir {
                    // A symlink to a directory meets a directory: merge what it points to.
                    if let Entry::Directory(children) = &**d {
                        let source = Source {
                            path: p.clone(),
                            ..source
                        };
                        return self.add_dir(dst, name, children, source, depth);
                    }
                }
                dst[name].best().clone()
            }
            Some(n) => n.best().clone(),
        };
        if self.settle(&old, &source, name) {
            dst.insert(name.to_os_string(), Node::Leaf { source, dir });
        }
    }

    /// Settles a conflict at `name` between what is there (`old`) and `new`: whether `new`
    /// replaces it. Logs the loser.
    fn settle(&self, old: &Source, new: &Source, name: &OsStr) -> bool {
        let installed = &self.input.installed;
        let (winner, loser) = if new.beats(old) {
            (new, old)
        } else {
            (old, new)
        };
        if winner.priority == loser.priority {
            tracing::warn!(
                env = %self.input.label(),
                file = %name.to_string_lossy(),
                kept = %winner.path,
                dropped = %loser.path,
                priority = winner.priority,
                "two packages of equal priority provide the same file; the first in lockfile order wins"
            );
        } else {
            tracing::debug!(
                env = %self.input.label(),
                kept = %winner.path,
                kept_from = %installed[winner.pkg].path,
                dropped = %loser.path,
                "file conflict settled by priority"
            );
        }
        new.beats(old)
    }
}

enum Lookup {
    Entry(Arc<Entry>),
    /// A symlink met at this absolute path, with its target (with the unresolved rest of the
    /// path appended).
    Symlink(String, OsString),
}

fn join_target(t: &OsStr, tail: &str) -> OsString {
    let mut s = t.to_os_string();
    if !tail.is_empty() {
        s.push("/");
        s.push(tail);
    }
    s
}

/// The absolute, normalised path a symlink at `at` with `target` points to.
fn resolve_target(at: &str, target: &OsStr) -> Option<String> {
    let t = std::str::from_utf8(target.as_bytes()).ok()?;
    let mut parts: Vec<&str> = if t.starts_with('/') {
        Vec::new()
    } else {
        let parent = at.rsplit_once('/')?.0;
        parent.split('/').filter(|p| !p.is_empty()).collect()
    };
    for p in t.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

/// Renders a merge node as view entries: real directories at the top level and wherever
/// packages were merged, symlinks elsewhere.
fn render(node: &Node, depth: usize) -> Arc<Entry> {
    match node {
        Node::Leaf { source, .. } => Arc::new(Entry::Symlink(source.path.clone().into())),
        Node::Dir { children, sources } => {
            if depth > 1 && sources.len() == 1 {
                return Arc::new(Entry::Symlink(sources[0].path.clone().into()));
            }
            Arc::new(Entry::Directory(
                children
                    .iter()
                    .map(|(n, c)| (n.clone(), render(c, depth + 1)))
                    .collect(),
            ))
        }
    }
}

/// The rendered environment of `input`: the buildEnv-style merge of its installed paths.
/// Returns the tree and the merge (to find `bin/bash` and friends in).
fn merge(input: &ViewInput) -> Result<BTreeMap<OsString, Node>, ViewError> {
    let mut m = Merge {
        input,
        root: BTreeMap::new(),
    };
    let mut root = BTreeMap::new();
    for (pkg, inst) in input.installed.iter().enumerate() {
        let tree = input
            .paths
            .get(&inst.path)
            .ok_or_else(|| ViewError::InstalledNotInClosure {
                env: input.label(),
                path: inst.path.clone(),
            })?;
        let Entry::Directory(children) = &**tree else {
            tracing::debug!(path = %inst.path, "installed path is not a directory: nothing to merge");
            continue;
        };
        for (name, e) in children {
            // Build metadata of the package, not part of an environment.
            if name == "nix-support" {
                continue;
            }
            let source = Source {
                pkg,
                priority: inst.priority,
                path: join(&inst.path.to_absolute(), name),
            };
            m.add(&mut root, name, e, source, 0);
        }
    }
    m.root = root;
    Ok(m.root)
}

/// The source path of the leaf at `rel` (`bin/bash`) in the merge, when it is a leaf.
fn leaf(root: &BTreeMap<OsString, Node>, rel: &str) -> Option<String> {
    let mut parts = rel.split('/').peekable();
    let mut children = root;
    while let Some(p) = parts.next() {
        let node = children.get(OsStr::new(p))?;
        match node {
            Node::Dir { children: c, .. } if parts.peek().is_some() => children = c,
            Node::Leaf { source, dir: None } if parts.peek().is_none() => {
                return Some(source.path.clone())
            }
            _ => return None,
        }
    }
    None
}

fn dir(entries: Vec<(&str, Arc<Entry>)>) -> Arc<Entry> {
    Arc::new(Entry::Directory(
        entries
            .into_iter()
            .map(|(n, e)| (OsString::from(n), e))
            .collect(),
    ))
}

fn empty_dir() -> Arc<Entry> {
    Arc::new(Entry::Directory(BTreeMap::new()))
}

fn inline(text: &str) -> Arc<Entry> {
    Arc::new(Entry::Regular {
        executable: false,
        content: Content::Inline(Arc::from(text.as_bytes())),
    })
}

/// `/etc/passwd`: root and nobody.
pub const ETC_PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
/// `/etc/group`: root and nogroup.
pub const ETC_GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";
/// `/etc/nsswitch.conf`: files, and DNS for hosts.
pub const ETC_NSSWITCH: &str = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n";
/// `/etc/hosts`: localhost.
pub const ETC_HOSTS: &str = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n";

/// Builds the root file system of the view of `input`.
pub fn build_view(input: &ViewInput) -> Result<View, ViewError> {
    let env_path = rendered_env_path(input)?;
    if let Some(p) = input.paths.keys().find(|p| **p == env_path) {
        return Err(ViewError::NameClash {
            env: input.label(),
            path: p.clone(),
        });
    }
    let merged = merge(input)?;
    let rendered = Arc::new(Entry::Directory(
        merged
            .iter()
            .map(|(n, c)| (n.clone(), render(c, 1)))
            .collect(),
    ));

    let mut store: BTreeMap<OsString, Arc<Entry>> = input
        .paths
        .iter()
        .map(|(p, e)| (OsString::from(p.base_name()), e.clone()))
        .collect();
    store.insert(OsString::from(env_path.base_name()), rendered);

    let bash = leaf(&merged, "bin/bash");
    let sh = leaf(&merged, "bin/sh").or_else(|| bash.clone());
    let env = leaf(&merged, "bin/env");

    let mut root: Vec<(&str, Arc<Entry>)> = vec![
        (
            "nix",
            dir(vec![("store", Arc::new(Entry::Directory(store)))]),
        ),
        (
            "etc",
            dir(vec![
                ("passwd", inline(ETC_PASSWD)),
                ("group", inline(ETC_GROUP)),
                ("nsswitch.conf", inline(ETC_NSSWITCH)),
                ("hosts", inline(ETC_HOSTS)),
            ]),
        ),
        ("proc", empty_dir()),
        ("sys", empty_dir()),
        ("dev", empty_dir()),
        ("tmp", empty_dir()),
        ("run", empty_dir()),
        ("var", dir(vec![("tmp", empty_dir())])),
        ("root", empty_dir()),
        ("home", empty_dir()),
    ];
    if let Some(sh) = sh {
        root.push((
            "bin",
            dir(vec![("sh", Arc::new(Entry::Symlink(sh.into())))]),
        ));
    }
    // `usr/local/bin` and `usr/local/sbin` are the environment's: a process that is not
    // activated (an `exec` into a container, which containerd starts with the container's
    // original variables) still finds the environment's programs on the default `PATH`.
    let flox_env = format!("{STORE_DIR}/{}", env_path.base_name());
    let local: Vec<(&str, Arc<Entry>)> = ["bin", "sbin"]
        .into_iter()
        .filter(|d| merged.contains_key(OsStr::new(d)))
        .map(|d| {
            (
                d,
                Arc::new(Entry::Symlink(format!("{flox_env}/{d}").into())),
            )
        })
        .collect();
    let mut usr: Vec<(&str, Arc<Entry>)> = Vec::new();
    if let Some(env) = env {
        usr.push((
            "bin",
            dir(vec![("env", Arc::new(Entry::Symlink(env.into())))]),
        ));
    }
    if !local.is_empty() {
        usr.push(("local", dir(local)));
    }
    if !usr.is_empty() {
        root.push(("usr", dir(usr)));
    }
    tracing::debug!(
        env = %input.label(),
        flox_env = %env_path,
        closure = input.paths.len(),
        "built view"
    );
    Ok(View {
        root: dir(root),
        env_path,
        bash,
    })
}

/// The content digest of a tree: BLAKE3 over an unambiguous encoding of every node (kind,
/// length-prefixed names and targets, file references, inline bytes, executable bits), as
/// 64 hex digits. Equal trees have equal digests; any difference (a name, an offset, a bit)
/// gives another.
pub fn tree_digest(e: &Entry) -> String {
    fn bytes(h: &mut blake3::Hasher, b: &[u8]) {
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    }
    fn walk(h: &mut blake3::Hasher, e: &Entry) {
        match e {
            Entry::Directory(m) => {
                h.update(b"d");
                h.update(&(m.len() as u64).to_le_bytes());
                for (k, v) in m {
                    bytes(h, k.as_bytes());
                    walk(h, v);
                }
            }
            Entry::Regular {
                executable,
                content: Content::Store(f),
            } => {
                h.update(if *executable { b"F" } else { b"f" });
                bytes(h, f.store_path.as_bytes());
                bytes(h, f.path.as_bytes());
                h.update(&f.nar_offset.to_le_bytes());
                h.update(&f.size.to_le_bytes());
            }
            Entry::Regular {
                executable,
                content: Content::Inline(d),
            } => {
                h.update(if *executable { b"I" } else { b"i" });
                bytes(h, d);
            }
            Entry::Symlink(t) => {
                h.update(b"l");
                bytes(h, t.as_bytes());
            }
        }
    }
    let mut h = blake3::Hasher::new();
    h.update(b"kof-view-tree-1\0");
    walk(&mut h, e);
    h.finalize().to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_resolve_like_the_kernel() {
        assert_eq!(
            resolve_target("/nix/store/a-x/lib", OsStr::new("lib64")).unwrap(),
            "/nix/store/a-x/lib64"
        );
        assert_eq!(
            resolve_target("/nix/store/a-x/share/man", OsStr::new("../../a-x/b/./c/")).unwrap(),
            "/nix/store/a-x/b/c"
        );
        assert_eq!(
            resolve_target(
                "/nix/store/a-x/bin/sh",
                OsStr::new("/nix/store/b-y/bin/bash")
            )
            .unwrap(),
            "/nix/store/b-y/bin/bash"
        );
    }
}
