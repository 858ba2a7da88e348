//! The FUSE server's hand-over to a newer build: what crosses the control socket, and how.
//!
//! A FUSE server started with `fuse-server --take-over` connects to the running one's control
//! socket and sends `{"op":"hand_over"}`. The running server freezes its mount
//! ([`kof_fuse::Mounted::freeze`]) and answers with one [`Payload`] line carrying, as
//! `SCM_RIGHTS`, three descriptors: the FUSE connection (`/dev/fuse`), its control socket's
//! listener, and its `fuse.lock` (an `flock` belongs to the open file, so the lock passes with
//! it). Then it exits without unmounting. The successor waits for it to be gone, takes the
//! mount over ([`kof_fuse::resume`]) and serves the same socket: the daemon's connections wait
//! in the listener's backlog meanwhile, and readers' requests in the kernel.
//!
//! The payload holds the mount's state and every view's tree (as [`WireEntry`], each distinct
//! tree once, by [`tree_digest`]), so the successor needs nothing from the daemon.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use kof_fuse::{Entry, MountState};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use super::wire::{tree_digest, Decoder, WireEntry, WireError};

/// Descriptors that travel with the payload, in this order.
pub(crate) const FDS: usize = 3;

/// The hand-over message.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Payload {
    /// The old server's pid: the successor waits for it to exit before serving.
    pub(crate) pid: u32,
    /// The old server's build (BLAKE3 of its executable).
    pub(crate) build: String,
    /// The frozen mount.
    pub(crate) state: MountState,
    /// Each view's tree digest, by view name.
    pub(crate) views: BTreeMap<String, String>,
    /// The trees, by digest.
    pub(crate) trees: BTreeMap<String, WireEntry>,
}

/// Why a hand-over message could not be sent, received or decoded.
#[derive(Debug, thiserror::Error)]
pub enum HandOverError {
    /// The socket failed.
    #[error("{what} the hand-over")]
    Socket {
        /// Sending or receiving.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The answer was not a hand-over (an older server, or an error line).
    #[error("the running FUSE server answered {answer:?} instead of handing over")]
    Refused {
        /// The start of its answer.
        answer: String,
    },
    /// The descriptors did not all arrive.
    #[error("the hand-over carried {got} descriptors, not {FDS}")]
    Descriptors {
        /// How many came.
        got: usize,
    },
    /// The payload is not valid JSON of the expected shape.
    #[error("decoding the hand-over")]
    Decode(#[source] serde_json::Error),
    /// A view's tree could not be decoded.
    #[error("view {view}: its tree")]
    Tree {
        /// The view.
        view: String,
        /// The cause.
        #[source]
        source: WireError,
    },
    /// A view names a tree the payload does not hold.
    #[error("view {view}: tree {digest} is missing from the hand-over")]
    MissingTree {
        /// The view.
        view: String,
        /// The digest.
        digest: String,
    },
}

impl Payload {
    /// The payload of a frozen mount whose views show `roots`.
    pub(crate) fn new(
        build: &str,
        state: MountState,
        roots: impl IntoIterator<Item = (String, Arc<Entry>)>,
    ) -> Payload {
        let mut views = BTreeMap::new();
        let mut trees = BTreeMap::new();
        // Views of one generation share their tree (`Arc`): digest it once.
        let mut digests: HashMap<*const Entry, String> = HashMap::new();
        for (name, root) in roots {
            let digest = digests
                .entry(Arc::as_ptr(&root))
                .or_insert_with(|| tree_digest(&root))
                .clone();
            trees
                .entry(digest.clone())
                .or_insert_with(|| WireEntry::from_entry(&root));
            views.insert(name, digest);
        }
        Payload {
            pid: std::process::id(),
            build: build.to_string(),
            state,
            views,
            trees,
        }
    }

    /// Each view's decoded tree, by view name (views of one tree share it).
    pub(crate) fn roots(&self) -> Result<HashMap<String, Arc<Entry>>, HandOverError> {
        let mut decoded: HashMap<&str, Arc<Entry>> = HashMap::new();
        let mut out = HashMap::new();
        for (view, digest) in &self.views {
            let root = match decoded.get(digest.as_str()) {
                Some(r) => r.clone(),
                None => {
                    let wire =
                        self.trees
                            .get(digest)
                            .ok_or_else(|| HandOverError::MissingTree {
                                view: view.clone(),
                                digest: digest.clone(),
                            })?;
                    let r =
                        Decoder::default()
                            .entry(wire)
                            .map_err(|source| HandOverError::Tree {
                                view: view.clone(),
                                source,
                            })?;
                    decoded.insert(digest, r.clone());
                    r
                }
            };
            out.insert(view.clone(), root);
        }
        Ok(out)
    }
}

/// Sends `payload` as one line with `fds` attached to its first bytes.
pub(crate) fn send(
    conn: &UnixStream,
    payload: &Payload,
    fds: [RawFd; FDS],
) -> Result<(), HandOverError> {
    let mut line = serde_json::to_vec(payload).expect("a payload always encodes");
    line.push(b'\n');
    let err = |source| HandOverError::Socket {
        what: "sending",
        source,
    };
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let first = sendmsg::<()>(
        conn.as_raw_fd(),
        &[IoSlice::new(&line)],
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| err(e.into()))?;
    let mut rest = &line[first..];
    while !rest.is_empty() {
        let n = nix::unistd::write(conn, rest).map_err(|e| err(e.into()))?;
        rest = &rest[n..];
    }
    Ok(())
}

/// Receives a payload line and its descriptors.
pub(crate) fn receive(conn: &UnixStream) -> Result<(Payload, [OwnedFd; FDS]), HandOverError> {
    let err = |source| HandOverError::Socket {
        what: "receiving",
        source,
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg_space = nix::cmsg_space!([RawFd; FDS]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| err(e.into()))?;
        let mut fds: Vec<OwnedFd> = Vec::new();
        for c in msg.cmsgs().map_err(|e| err(e.into()))? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors in this process; each is
                // owned here once.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, fds)
    };
    let mut line = buf[..n].to_vec();
    if fds.len() != FDS {
        let answer = String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
        if fds.is_empty() {
            return Err(HandOverError::Refused { answer });
        }
        return Err(HandOverError::Descriptors { got: fds.len() });
    }
    if line.last() != Some(&b'\n') {
        // The rest of the line: no more descriptors come with it.
        std::io::BufReader::new(conn)
            .read_until(b'\n', &mut line)
            .map_err(err)?;
        if line.last() != Some(&b'\n') {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the running FUSE server closed the socket mid-payload",
            )));
        }
    }
    let payload = serde_json::from_slice(&line).map_err(HandOverError::Decode)?;
    let fds: [OwnedFd; FDS] = fds.try_into().expect("length checked");
    Ok((payload, fds))
}
