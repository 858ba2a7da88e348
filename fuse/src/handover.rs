//! Handing a live mount to another server process, and taking one over, without unmounting:
//! how a newer build of the FUSE server replaces a running one while containers read through
//! the views.
//!
//! The kernel keeps a FUSE connection as long as any process holds its `/dev/fuse` file, and
//! a request a server has read but not answered stays on that file. So:
//! 1. [`Mounted::freeze`] freezes the old server's state (the inode table and the open
//!    handles; from then on an operation that would change them waits, unanswered, see
//!    [`crate::filesystem`]) and returns it with a duplicate of the connection's descriptor.
//!    The caller passes both to the successor (over a unix socket, `SCM_RIGHTS`), gives up
//!    unmounting ([`Mounted::handed_over`]) and exits; or, if that fails, serves on
//!    ([`Mounted::thaw`]).
//! 2. [`resume`] (in the successor, after the old process is gone) rebuilds the inode table
//!    over the views' trees, giving every entry the inode number the kernel knows it by,
//!    restores the open handles and the passthrough backing files, starts the worker threads
//!    on the same connection, and asks the kernel to resend every request left unanswered
//!    (`FUSE_NOTIFY_RESEND`, Linux 6.9 and later).
//!
//! Readers never see an error: their requests wait in the kernel while no server reads them.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use fuser::{Session, SessionACL, Version};

use crate::filesystem::{Handles, HandlesState, KofFs, Shared};
use crate::mount::{session_config, spawn_session};
use crate::tree::{Tree, TreeState};
use crate::{ContentSource, Entry, FuseError, MountOptions, Mounted};

/// What a server hands to its successor besides the connection's descriptor. Plain data
/// (serde): the FUSE server sends it as JSON.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MountState {
    /// Where the view file system is mounted.
    pub mountpoint: PathBuf,
    /// The protocol version `INIT` settled.
    proto: (u32, u32),
    /// Whether the kernel granted passthrough at `INIT`.
    passthrough: bool,
    tree: TreeState,
    handles: HandlesState,
}

impl MountState {
    /// Inodes the kernel was given, and open file handles: what the successor takes on.
    pub fn counts(&self) -> (usize, usize) {
        (self.tree.edges.len(), self.handles.len())
    }
}

/// A frozen mount: its state and a duplicate of its connection's descriptor.
#[derive(Debug)]
pub struct HandOver {
    /// The `/dev/fuse` file of the connection (the same open file the workers read).
    pub fd: OwnedFd,
    /// Everything else the successor needs.
    pub state: MountState,
}

impl Mounted {
    /// Freezes this mount for a successor (see the module doc) and returns its state with a
    /// duplicate of its connection's descriptor. Then either [`Mounted::handed_over`] (the
    /// successor has it: this process passes nothing more and exits) or [`Mounted::thaw`]
    /// (the hand-over failed: serve on).
    pub fn freeze(&self) -> Result<HandOver, FuseError> {
        let dev = self.shared.dev.get().ok_or_else(|| FuseError::HandedOver {
            path: self.mountpoint.clone(),
        })?;
        let fd = dev.try_clone().map_err(|source| FuseError::Mount {
            path: self.mountpoint.clone(),
            source,
        })?;
        let (tree, handles) = self.shared.freeze();
        let state = MountState {
            mountpoint: self.mountpoint.clone(),
            proto: self.proto,
            passthrough: self.shared.passthrough_active(),
            tree,
            handles,
        };
        tracing::info!(mountpoint = %self.mountpoint.display(), views = state.tree.views.len(),
            inodes = state.tree.edges.len(), handles = state.handles.len(),
            "FUSE view frozen for hand-over");
        Ok(HandOver { fd, state })
    }

    /// Serves on after a hand-over that failed.
    pub fn thaw(&self, hand_over: HandOver) {
        self.shared.thaw(&hand_over.state.handles);
        tracing::warn!(mountpoint = %self.mountpoint.display(), "hand-over abandoned; serving on");
    }

    /// The successor has the mount: never unmount it from here. The worker threads go on
    /// answering what does not change the state until the process exits.
    pub fn handed_over(mut self) {
        self.unmounter = None;
        self.resumed = false;
        self.session = None;
    }

    /// The tree view `name` shows.
    pub fn view_root(&self, name: &str) -> Option<Arc<Entry>> {
        self.shared.tree.read().view_root(name)
    }
}

/// Takes over the mount `state` describes, on the connection `fd` handed over, with each view's
/// tree by name (the trees the old server served). Call it only once the old server has
/// exited: it asks the kernel to resend what the old one left unanswered.
pub fn resume(
    fd: OwnedFd,
    state: &MountState,
    trees: &HashMap<String, Arc<Entry>>,
    source: Arc<dyn ContentSource>,
    opts: MountOptions,
) -> Result<Mounted, FuseError> {
    let mountpoint = state.mountpoint.clone();
    let take_over = |source| FuseError::TakeOver {
        path: mountpoint.clone(),
        source,
    };
    let tree = Tree::restore(&state.tree, trees).map_err(take_over)?;
    let handles = Handles::restore(&state.handles, &tree).map_err(take_over)?;
    if opts.threads == 0 {
        return Err(FuseError::NoThreads { path: mountpoint });
    }
    let shared = Arc::new(Shared::resumed(source, tree, handles, state.passthrough));
    let mount_err = |source| FuseError::Mount {
        path: mountpoint.clone(),
        source,
    };
    let dev = fd.try_clone().map_err(mount_err)?;
    let _ = shared.dev.set(dev);
    let config = session_config(&opts);
    let fs = KofFs {
        shared: shared.clone(),
    };
    let session = Session::resume_fd(
        fs,
        fd,
        SessionACL::All,
        config,
        Version(state.proto.0, state.proto.1),
    );
    let notifier = session.notifier();
    let handle = spawn_session(session, &mountpoint)?;
    let dev = shared.dev.get().expect("set above");
    match notify_resend(dev) {
        Ok(()) => {}
        Err(e) => tracing::warn!(mountpoint = %mountpoint.display(), error = %e,
            "the kernel cannot resend requests the old server left unanswered (FUSE_NOTIFY_RESEND \
             needs Linux 6.9); such readers wait until they are interrupted"),
    }
    tracing::info!(mountpoint = %mountpoint.display(), views = state.tree.views.len(),
        inodes = state.tree.edges.len(), handles = state.handles.len(),
        "FUSE view taken over");
    Ok(Mounted {
        mountpoint,
        shared,
        notifier,
        unmounter: None,
        session: Some(handle),
        proto: state.proto,
        resumed: true,
    })
}

/// Writes the `FUSE_NOTIFY_RESEND` notification: the kernel puts every request read from the
/// connection and not answered back in its queue, for this server's workers to read again.
/// fuser's `Notifier` has no such notification; it is one 16-byte header.
fn notify_resend(dev: &OwnedFd) -> io::Result<()> {
    // struct fuse_out_header { uint32_t len; int32_t error; uint64_t unique; }: a notification
    // has unique 0 and its code in `error` (FUSE_NOTIFY_RESEND = 7).
    const FUSE_NOTIFY_RESEND: i32 = 7;
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&16u32.to_ne_bytes());
    header[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: `dev` is an open descriptor; `header` is valid for its length.
    let n = unsafe {
        libc::write(
            dev.as_fd().as_raw_fd(),
            header.as_ptr().cast(),
            header.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
