//! The `fuser::Filesystem` the kernel talks to: metadata from the inode table ([`Tree`]), file
//! bytes from the [`ContentSource`], or straight from a local backing file by FUSE passthrough.
//!
//! - Content is immutable: entries and attributes inside views are cached by the kernel for a day
//!   (absent names too, as negative entries); only the mount root, whose children (views) come and
//!   go, uses a short timeout, and `remove_view` also invalidates the view's root entry.
//! - `open` replies `FOPEN_KEEP_CACHE`, so the page cache survives closes and is shared between
//!   views through shared store file inodes (see [`crate::tree`]).
//! - Metadata operations (`lookup`, `getattr`, `readdir`, `readlink`) never call the content
//!   source. `open` asks it for a backing file (passthrough); `read` asks it for bytes and turns
//!   its error into `EIO`, logging the store path, the file and the cause.
//! - Passthrough: the kernel keeps one backing file per inode and refuses (`EIO` to the opener) an
//!   inode open in cached mode and passthrough mode at once. So per inode we count the open
//!   handles of each mode: an inode with cached opens stays cached until they are released; one
//!   with passthrough opens reuses its `BackingId`, which is dropped with the last of them. Our
//!   counts only drop after the kernel's (release comes after close), so our choice is always one
//!   the kernel accepts.
//! - Hand-over ([`crate::Mounted::freeze`]): while frozen, an operation that would change the
//!   inode table or the open handles waits, holding its request unanswered, so the state handed
//!   to the successor is everything the kernel was told; the successor asks the kernel to
//!   resend the requests left unanswered. A hand-over that fails thaws the mount and the waiting
//!   operations go on.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    IoctlFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyXattr, Request,
};
use parking_lot::{Mutex, MutexGuard, RwLock, RwLockWriteGuard};

use crate::stats::{Op, OpRecorder};
use crate::tree::{negative_attr, Resolved, Tree, ROOT_INO};
use crate::{Content, ContentSource, Entry, FileRef};

/// Entry and attribute timeout of nodes inside views: their content never changes.
const VIEW_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Entry timeout of the mount root's children and attribute timeout of the root: views come and
/// go.
const ROOT_TTL: Duration = Duration::from_secs(1);

/// How long the kernel may keep an entry (or an absence) found in directory `parent`: the mount
/// root's entries are views, which come and go; everything inside a view is immutable.
fn entry_ttl(parent: u64) -> Duration {
    if parent == ROOT_INO {
        ROOT_TTL
    } else {
        VIEW_TTL
    }
}

/// State shared by the FUSE worker threads and the [`crate::Mounted`] handle.
pub(crate) struct Shared {
    pub(crate) tree: RwLock<Tree>,
    pub(crate) stats: OpRecorder,
    source: Arc<dyn ContentSource>,
    /// The caller asked for passthrough.
    passthrough_wanted: bool,
    /// The kernel granted the passthrough capability at `init`.
    passthrough_active: AtomicBool,
    /// A refused backing file was already logged as a warning.
    backing_refusal_warned: AtomicBool,
    handles: Mutex<Handles>,
    /// Handed over: state no longer changes here (see the module doc).
    frozen: AtomicBool,
    /// Operations wait here while frozen (with `thawed`).
    freeze_lock: Mutex<()>,
    thawed: parking_lot::Condvar,
    /// The connection's `/dev/fuse` descriptor (a duplicate of the session's), set once the
    /// session exists: what a hand-over passes on, and what closes handed-over backing ids.
    pub(crate) dev: std::sync::OnceLock<std::os::fd::OwnedFd>,
}

/// Open file handles and, per store file inode, its open modes.
#[derive(Default)]
pub(crate) struct Handles {
    next_fh: u64,
    open: HashMap<u64, OpenFile>,
    io: HashMap<u64, InodeIo>,
}

/// The open handles as a successor rebuilds them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct HandlesState {
    next_fh: u64,
    /// `(fh, inode, passthrough)`.
    open: Vec<(u64, u64, bool)>,
    /// `(inode, backing id)`: passthrough backing files open on the connection.
    backing: Vec<(u64, u32)>,
}

struct OpenFile {
    ino: u64,
    content: Content,
    passthrough: bool,
}

#[derive(Default)]
struct InodeIo {
    cached: u32,
    passthrough: u32,
    backing: Option<Backing>,
}

/// A passthrough backing file of an inode, open on the connection.
enum Backing {
    /// Opened, or adopted for a new open, by this server: closed when dropped.
    Owned(BackingId),
    /// Opened by the server this one took over from: closed by [`close_backing`] with the
    /// inode's last passthrough handle, or made `Owned` by the next passthrough open.
    Adopted(u32),
}

/// `FUSE_DEV_IOC_BACKING_CLOSE` of a backing id the previous server opened. fuser closes the
/// ids it wraps itself, but a handed-over id is wrapped only when a new open reuses it.
fn close_backing(dev: &std::os::fd::OwnedFd, id: u32) {
    use std::os::fd::AsRawFd;
    // _IOW(229, 2, uint32_t), as in the kernel's uapi/linux/fuse.h.
    const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_e502;
    // SAFETY: `dev` is an open /dev/fuse descriptor and `id` lives across the call.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_CLOSE, &id) };
    if rc < 0 {
        tracing::warn!(backing_id = id, error = %std::io::Error::last_os_error(),
            "closing a handed-over passthrough backing file failed");
    }
}

impl HandlesState {
    /// Open handles.
    pub(crate) fn len(&self) -> usize {
        self.open.len()
    }
}

impl Handles {
    /// Rebuilds the handles `state` lists over the restored inode table.
    pub(crate) fn restore(
        state: &HandlesState,
        tree: &Tree,
    ) -> Result<Handles, crate::tree::RestoreError> {
        let mut handles = Handles {
            next_fh: state.next_fh,
            ..Handles::default()
        };
        for &(fh, ino, passthrough) in &state.open {
            let content = match tree.entry(ino).map(|e| &**e) {
                Ok(Entry::Regular { content, .. }) => content.clone(),
                _ => {
                    return Err(crate::tree::RestoreError {
                        ino,
                        reason: format!("open handle {fh} is not of a regular file"),
                    })
                }
            };
            if let Content::Store(_) = content {
                let io = handles.io.entry(ino).or_default();
                if passthrough {
                    io.passthrough += 1;
                } else {
                    io.cached += 1;
                }
            }
            handles.open.insert(
                fh,
                OpenFile {
                    ino,
                    content,
                    passthrough,
                },
            );
        }
        for &(ino, id) in &state.backing {
            handles.io.entry(ino).or_default().backing = Some(Backing::Adopted(id));
        }
        Ok(handles)
    }

    fn insert(&mut self, file: OpenFile) -> u64 {
        self.next_fh += 1;
        self.open.insert(self.next_fh, file);
        self.next_fh
    }
}

impl Shared {
    pub(crate) fn new(source: Arc<dyn ContentSource>, passthrough: bool) -> Self {
        Shared::with(source, Tree::new(), Handles::default(), passthrough, false)
    }

    /// A server taking over: `tree` and `handles` as its predecessor left them, passthrough as
    /// the connection's `INIT` settled it.
    pub(crate) fn resumed(
        source: Arc<dyn ContentSource>,
        tree: Tree,
        handles: Handles,
        passthrough_active: bool,
    ) -> Self {
        Shared::with(
            source,
            tree,
            handles,
            passthrough_active,
            passthrough_active,
        )
    }

    fn with(
        source: Arc<dyn ContentSource>,
        tree: Tree,
        handles: Handles,
        passthrough_wanted: bool,
        passthrough_active: bool,
    ) -> Self {
        Shared {
            tree: RwLock::new(tree),
            stats: OpRecorder::default(),
            source,
            passthrough_wanted,
            passthrough_active: AtomicBool::new(passthrough_active),
            backing_refusal_warned: AtomicBool::new(false),
            handles: Mutex::new(handles),
            frozen: AtomicBool::new(false),
            freeze_lock: Mutex::new(()),
            thawed: parking_lot::Condvar::new(),
            dev: std::sync::OnceLock::new(),
        }
    }

    /// Whether the kernel granted passthrough.
    pub(crate) fn passthrough_active(&self) -> bool {
        self.passthrough_active.load(Ordering::Relaxed)
    }

    /// Whether this state was handed over.
    pub(crate) fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    /// Waits while the state is frozen (for good once the process hands over and exits).
    fn wait_thawed(&self) {
        let mut g = self.freeze_lock.lock();
        while self.is_frozen() {
            self.thawed.wait(&mut g);
        }
    }

    /// The inode table for a change; waits while frozen.
    pub(crate) fn tree_write(&self) -> RwLockWriteGuard<'_, Tree> {
        loop {
            let tree = self.tree.write();
            if !self.is_frozen() {
                return tree;
            }
            drop(tree);
            self.wait_thawed();
        }
    }

    /// The open handles for a change; waits while frozen.
    fn handles_lock(&self) -> MutexGuard<'_, Handles> {
        loop {
            let handles = self.handles.lock();
            if !self.is_frozen() {
                return handles;
            }
            drop(handles);
            self.wait_thawed();
        }
    }

    /// Undoes [`Shared::freeze`] after a failed hand-over: the backing ids handed out come back
    /// (as adopted ones) and the waiting operations go on.
    pub(crate) fn thaw(&self, state: &HandlesState) {
        {
            let mut handles = self.handles.lock();
            for &(ino, id) in &state.backing {
                if let Some(io) = handles.io.get_mut(&ino) {
                    io.backing = Some(Backing::Adopted(id));
                }
            }
        }
        let _g = self.freeze_lock.lock();
        self.frozen.store(false, Ordering::SeqCst);
        self.thawed.notify_all();
    }

    /// Freezes the state and returns it: until [`Shared::thaw`], no operation changes it or
    /// answers a change. Passthrough backing ids pass to the successor (this server no longer
    /// closes them).
    pub(crate) fn freeze(&self) -> (crate::tree::TreeState, HandlesState) {
        let tree = self.tree.write();
        let mut handles = self.handles.lock();
        {
            let _g = self.freeze_lock.lock();
            self.frozen.store(true, Ordering::SeqCst);
        }
        let tree_state = tree.snapshot();
        let mut open: Vec<(u64, u64, bool)> = handles
            .open
            .iter()
            .map(|(&fh, f)| (fh, f.ino, f.passthrough))
            .collect();
        open.sort_unstable();
        let mut backing = Vec::new();
        for (&ino, io) in handles.io.iter_mut() {
            match io.backing.take() {
                Some(Backing::Owned(id)) => backing.push((ino, id.into_raw())),
                Some(Backing::Adopted(id)) => backing.push((ino, id)),
                None => {}
            }
        }
        backing.sort_unstable();
        let next_fh = handles.next_fh;
        drop(tree);
        (
            tree_state,
            HandlesState {
                next_fh,
                open,
                backing,
            },
        )
    }

    /// Asks the source's gate for the store path `ino` lies in (if any), holding no lock.
    fn gate(&self, ino: u64) -> Result<(), Errno> {
        let Some(path) = self.tree.read().gate_of(ino) else {
            return Ok(());
        };
        let r = catch_unwind(AssertUnwindSafe(|| self.source.gate(&path)));
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::warn!(store_path = %path, error = %e, "store path not shown: it did not verify");
                Err(Errno::EIO)
            }
            Err(_) => {
                tracing::error!(store_path = %path, "the content source's gate panicked");
                Err(Errno::EIO)
            }
        }
    }

    /// Resolves `name` in `parent`, allocating its inode when needed. `Ok(None)`: absent.
    fn lookup(&self, parent: u64, name: &OsStr) -> Result<Option<FileAttr>, Errno> {
        self.gate(parent)?;
        {
            let tree = self.tree.read();
            match tree.resolve(parent, name)? {
                Resolved::Ino(ino) => return tree.attr(ino).map(Some),
                Resolved::Absent => return Ok(None),
                Resolved::Unallocated(_) => {}
            }
        }
        let mut tree = self.tree_write();
        match tree.lookup_alloc(parent, name)? {
            Some(ino) => tree.attr(ino).map(Some),
            None => Ok(None),
        }
    }

    /// Opens a store file, by passthrough when the kernel and the source allow it.
    fn open_store(&self, ino: u64, file: &FileRef, reply: ReplyOpen) {
        let flags = FopenFlags::FOPEN_KEEP_CACHE;
        let mut backing = None;
        if self.passthrough_active.load(Ordering::Relaxed) {
            let needs_backing = match self.handles_lock().io.get(&ino) {
                Some(io) => io.cached == 0 && io.backing.is_none(),
                None => true,
            };
            // Outside the lock: the source may touch the disk.
            if needs_backing {
                let local = catch_unwind(AssertUnwindSafe(|| self.source.backing_file(file)))
                    .unwrap_or_else(|_| {
                        tracing::error!(store_path = %file.store_path, path = %file.path,
                            "the content source panicked looking for a backing file");
                        None
                    });
                if let Some(local) = local {
                    match reply.open_backing(&local) {
                        Ok(id) => backing = Some(Backing::Owned(id)),
                        Err(e) => self.backing_refused(file, &e),
                    }
                }
            }
        }
        let mut handles = self.handles_lock();
        let Handles { next_fh, open, io } = &mut *handles;
        let io = io.entry(ino).or_default();
        if io.cached == 0 {
            if io.backing.is_none() {
                io.backing = backing.take();
            }
            if let Some(Backing::Adopted(raw)) = io.backing {
                // SAFETY: the previous server opened `raw` on this connection and handed it
                // over; nothing else closes it while it is held here.
                io.backing = Some(Backing::Owned(unsafe { reply.wrap_backing(raw) }));
            }
            if let Some(Backing::Owned(id)) = &io.backing {
                io.passthrough += 1;
                *next_fh += 1;
                open.insert(
                    *next_fh,
                    OpenFile {
                        ino,
                        content: Content::Store(file.clone()),
                        passthrough: true,
                    },
                );
                // Under the lock, so a concurrent release cannot close the id before the kernel
                // has it. No FOPEN_KEEP_CACHE: the kernel refuses any flag outside
                // FOPEN_PASSTHROUGH_MASK on a passthrough open (the page cache is the backing
                // file's anyway).
                reply.opened_passthrough(FileHandle(*next_fh), FopenFlags::empty(), id);
                return;
            }
        }
        io.cached += 1;
        let fh = handles.insert(OpenFile {
            ino,
            content: Content::Store(file.clone()),
            passthrough: false,
        });
        drop(handles);
        reply.opened(FileHandle(fh), flags);
    }

    fn backing_refused(&self, file: &FileRef, error: &std::io::Error) {
        if self.backing_refusal_warned.swap(true, Ordering::Relaxed) {
            tracing::debug!(store_path = %file.store_path, path = %file.path,
                error = %kof_node_api::report::chain(error),
                "kernel refused a passthrough backing file; reading through FUSE");
        } else {
            tracing::warn!(store_path = %file.store_path, path = %file.path,
                error = %kof_node_api::report::chain(error),
                "kernel refused a passthrough backing file; reading through FUSE \
                 (further refusals are logged at debug level)");
        }
    }

    /// Reads `size` bytes at `offset` of a store file from the content source.
    fn read_store(&self, file: &FileRef, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        if offset >= file.size {
            return Ok(Vec::new());
        }
        let want =
            usize::try_from((file.size - offset).min(u64::from(size))).expect("at most a u32");
        let mut buf = Vec::new();
        while buf.len() < want {
            let at = offset + buf.len() as u64;
            let len = u32::try_from(want - buf.len()).expect("at most a u32");
            // A panicking source must not take the worker thread down with it.
            let result = catch_unwind(AssertUnwindSafe(|| self.source.read(file, at, len)))
                .unwrap_or_else(|_| Err(std::io::Error::other("the content source panicked")));
            match result {
                Ok(bytes) if bytes.is_empty() => {
                    tracing::error!(store_path = %file.store_path, path = %file.path,
                        offset = at, size = file.size,
                        "content source ended before the end of the file; the reader gets EIO");
                    return Err(Errno::EIO);
                }
                Ok(bytes) if buf.is_empty() => buf = bytes,
                Ok(bytes) => buf.extend_from_slice(&bytes),
                Err(error) => {
                    tracing::error!(store_path = %file.store_path, path = %file.path,
                        offset = at, len, error = %kof_node_api::report::chain(&error),
                        "reading a store file failed; the reader gets EIO");
                    return Err(Errno::EIO);
                }
            }
        }
        buf.truncate(want);
        Ok(buf)
    }
}

/// The file system object handed to fuser; all state is in [`Shared`].
pub(crate) struct KofFs {
    pub(crate) shared: Arc<Shared>,
}

impl Filesystem for KofFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Optional capabilities: lookups in one directory in parallel, symlink targets cached.
        for cap in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
        ] {
            if let Err(missing) = config.add_capabilities(cap) {
                tracing::debug!(?missing, "kernel lacks a FUSE capability");
            }
        }
        if let Err(max) = config.set_max_background(64) {
            tracing::debug!(max, "kernel limits FUSE background requests");
        }
        if self.shared.passthrough_wanted {
            match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
                // Stack depth 1: backing files must be on a plain file system (not overlayfs or
                // another FUSE), and an overlay over the view (depth 2) stays within the kernel's
                // limit of 2, as a container's writable root needs.
                Ok(()) => match config.set_max_stack_depth(1) {
                    Ok(_) => {
                        self.shared
                            .passthrough_active
                            .store(true, Ordering::Relaxed);
                        tracing::info!("FUSE passthrough enabled");
                    }
                    Err(max) => tracing::warn!(max, "FUSE passthrough stack depth refused"),
                },
                Err(_) => tracing::info!("kernel lacks FUSE passthrough; reading through FUSE"),
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _timer = self.shared.stats.start(Op::Lookup);
        match self.shared.lookup(parent.0, name) {
            Ok(Some(attr)) => {
                reply.entry_with_ttls(&VIEW_TTL, &entry_ttl(parent.0), &attr, Generation(0));
            }
            // An absent view name may appear with the next `add_view`: only names inside a
            // view (immutable) are known absent for a day.
            Ok(None) => reply.entry(&entry_ttl(parent.0), &negative_attr(), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timer = self.shared.stats.start(Op::Getattr);
        let attr = self.shared.tree.read().attr(ino.0);
        match attr {
            Ok(attr) => {
                let ttl = if ino.0 == ROOT_INO {
                    ROOT_TTL
                } else {
                    VIEW_TTL
                };
                reply.attr(&ttl, &attr);
            }
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _timer = self.shared.stats.start(Op::Readlink);
        if let Err(e) = self.shared.gate(ino.0) {
            reply.error(e);
            return;
        }
        let tree = self.shared.tree.read();
        match tree.entry(ino.0).map(|e| &**e) {
            Ok(Entry::Symlink(target)) => reply.data(target.as_bytes()),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _timer = self.shared.stats.start(Op::Open);
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        let entry = self.shared.tree.read().entry(ino.0).cloned();
        let content = match entry.as_deref() {
            Ok(Entry::Regular { content, .. }) => content.clone(),
            Ok(Entry::Directory(_)) => return reply.error(Errno::EISDIR),
            Ok(Entry::Symlink(_)) => return reply.error(Errno::ELOOP),
            Err(e) => return reply.error(*e),
        };
        match content {
            Content::Store(file) => self.shared.open_store(ino.0, &file, reply),
            Content::Inline(_) => {
                let fh = self.shared.handles_lock().insert(OpenFile {
                    ino: ino.0,
                    content,
                    passthrough: false,
                });
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _timer = self.shared.stats.start(Op::Read);
        let content = self
            .shared
            .handles
            .lock()
            .open
            .get(&fh.0)
            .map(|f| f.content.clone());
        match content {
            None => reply.error(Errno::EBADF),
            Some(Content::Inline(bytes)) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                let end = start.saturating_add(size as usize).min(bytes.len());
                reply.data(&bytes[start..end]);
            }
            Some(Content::Store(file)) => match self.shared.read_store(&file, offset, size) {
                Ok(bytes) => reply.data(&bytes),
                Err(e) => reply.error(e),
            },
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut handles = self.shared.handles_lock();
        if let Some(file) = handles.open.remove(&fh.0) {
            if let (Content::Store(_), Some(io)) = (&file.content, handles.io.get_mut(&file.ino)) {
                if file.passthrough {
                    io.passthrough -= 1;
                    if io.passthrough == 0 {
                        if let Some(Backing::Adopted(raw)) = io.backing.take() {
                            if let Some(dev) = self.shared.dev.get() {
                                close_backing(dev, raw);
                            }
                        }
                    }
                } else {
                    io.cached -= 1;
                }
                if io.cached == 0 && io.passthrough == 0 {
                    handles.io.remove(&file.ino);
                }
            }
        }
        drop(handles);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == ROOT_INO {
            // The root's listing changes with the views: never cached.
            reply.opened(FileHandle(0), FopenFlags::empty());
            return;
        }
        if let Err(e) = self.shared.gate(ino.0) {
            reply.error(e);
            return;
        }
        let tree = self.shared.tree.read();
        match tree.entry(ino.0).map(|e| &**e) {
            Ok(Entry::Directory(_)) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _timer = self.shared.stats.start(Op::Readdir);
        if let Err(e) = self.shared.gate(ino.0) {
            reply.error(e);
            return;
        }
        let result = self
            .shared
            .tree_write()
            .readdir(ino.0, offset, |entry, next| {
                reply.add(INodeNo(entry.ino), next, entry.kind, entry.name)
            });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    // The operations below have fuser defaults that log a warning for every call and answer
    // ENOSYS; a read-only view of Nix store paths has a definite answer for each.

    /// Nothing is ever buffered for writing: closing a file has nothing to flush.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    /// Store paths carry no extended attributes (NARs have none).
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENODATA);
    }

    /// An empty attribute list.
    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    /// No ioctls (`FS_IOC_GETFLAGS` from overlayfs and `ls` included): not a tty, no flags.
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }
}
