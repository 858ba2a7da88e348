//! The sandbox `kof-store run` runs a command in: a writable overlay over a read-only view,
//! in new mount and pid namespaces.
//!
//! Three processes, so that every step runs in a single-threaded process (`unshare(CLONE_NEWNS)`
//! refuses multithreaded callers, and only a single-threaded process may do more than
//! async-signal-safe calls after a `fork`):
//!
//! 1. the *keeper*, in new mount and pid namespaces (`unshare(CLONE_NEWNS | CLONE_NEWPID)`):
//!    when the caller is single-threaded (`kof-store run` through `kof-fetcherd`), a `fork` of
//!    it; otherwise (the caller runs FUSE and async worker threads) a fresh `kof-store
//!    __sandbox-init /dev/fd/N` process, the spec passed on a pipe (an `exec` costs
//!    milliseconds a `fork` does not);
//! 2. the keeper forks the namespace's pid 1, which makes every mount private, mounts a
//!    `tmpfs` of the namespace on the run's temporary directory, holding the overlay's upper
//!    and work directories and its mount point, mounts the overlay (lower: the view), `proc`,
//!    `/dev` (recursive bind), a `tmpfs` on `/tmp` and `/etc/resolv.conf` (bind), `pivot_root`s
//!    into the overlay, detaches the old root, and forks
//! 3. the command, `execve`d with exactly the activated environment (looked up on that
//!    environment's `PATH` when `argv[0]` has no `/`).
//!
//! Pid 1 reaps every orphan until the command ends, then exits with the command's status
//! (`128 + n` for a signal); the kernel then kills what is left in the namespace, and the
//! mounts, which exist only in the namespace, vanish with it: nothing is left mounted on the
//! host whatever happens. The overlay's upper layer is on a `tmpfs` rather than the host's
//! disk: unmounting an overlay syncs its upper file system, and on a busy disk that sync
//! (tens of milliseconds, more under load) was the larger part of a warm run's teardown; the
//! run's writes are scratch anyway. For the same reason nothing but the temporary directory
//! itself is made on the host's disk (each directory made and removed there was a journal
//! operation, up to milliseconds each on a busy disk). Every process of the chain dies with its parent (`PR_SET_PDEATHSIG`);
//! a SIGTERM or SIGHUP to the caller is passed to the keeper, taking the sandbox down, and the
//! caller then cleans up as after a normal end.

use std::ffi::{CString, OsStr};
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{bail, Context as _, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{chdir, execve, fork, pivot_root, ForkResult, Pid};
use serde::{Deserialize, Serialize};

/// Exit status when the command cannot be found (as shells do).
pub const EXIT_NOT_FOUND: i32 = 127;
/// Exit status when the command cannot be executed, or the sandbox cannot be set up.
pub const EXIT_CANNOT_RUN: i32 = 126;

/// What the sandbox runs, and where.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// The read-only root (the view's directory on the FUSE mount).
    pub lower: PathBuf,
    /// A private temporary directory (created if missing, left empty): the namespace mounts a
    /// `tmpfs` on it holding the overlay's upper and work directories and its mount point.
    pub scratch: PathBuf,
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// Exactly the environment the program gets.
    pub env: Vec<(String, String)>,
    /// Bind the host's `/etc/resolv.conf` (name resolution inside).
    pub resolv_conf: bool,
}

impl SandboxSpec {
    /// The overlay's upper directory, on the namespace's `tmpfs`.
    fn upper(&self) -> PathBuf {
        self.scratch.join("upper")
    }
    /// The overlay's work directory, on the namespace's `tmpfs`.
    fn work(&self) -> PathBuf {
        self.scratch.join("work")
    }
    /// The overlay's mount point, on the namespace's `tmpfs`.
    fn root(&self) -> PathBuf {
        self.scratch.join("root")
    }
}

/// Runs `spec` and returns the command's exit status (`128 + n` when killed by signal `n`).
/// Blocks until the command and the sandbox are gone.
pub fn run(spec: &SandboxSpec) -> Result<i32> {
    std::fs::create_dir_all(&spec.scratch)
        .with_context(|| format!("creating {}", spec.scratch.display()))?;
    let keeper = if single_threaded() {
        fork_keeper(spec)?
    } else {
        exec_keeper(spec)?
    };
    // The terminal's ^C / ^\ go to the whole foreground process group: the command decides
    // what they mean; kof-store waits for it and cleans up. A SIGTERM or SIGHUP sent to
    // kof-store is passed to the keeper, whose end takes the sandbox down (PR_SET_PDEATHSIG),
    // after which kof-store cleans up as usual. (Installed after the fork: the command must
    // not inherit ignored interrupts.)
    KEEPER.store(keeper.as_raw(), Ordering::SeqCst);
    let _quiet = IgnoreInterrupts::new();
    let _forward = ForwardTermination::new();
    let status = wait_exit(keeper).context("waiting for the sandbox");
    KEEPER.store(0, Ordering::SeqCst);
    status
}

/// Whether this process runs a single thread (then a forked child may do anything).
fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|d| d.count() == 1)
}

/// The keeper as a fork of this single-threaded process.
fn fork_keeper(spec: &SandboxSpec) -> Result<Pid> {
    let parent = nix::unistd::getpid();
    // SAFETY: the caller is single-threaded (checked), so the child may run any code.
    match unsafe { fork() }.context("forking the sandbox's keeper")? {
        ForkResult::Child => {
            let code = (|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("PR_SET_PDEATHSIG")?;
                if nix::unistd::getppid() != parent {
                    bail!("kof-store ended before its sandbox started");
                }
                unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID)
                    .context("new mount and pid namespaces")?;
                keeper(spec)
            })()
            .unwrap_or_else(|e| {
                eprintln!("kof-store run: sandbox: {e:#}");
                EXIT_CANNOT_RUN
            });
            // SAFETY: ends this forked copy without running the caller's exit handlers or
            // flushing its (copied) buffers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => Ok(child),
    }
}

/// The keeper as a fresh `kof-store __sandbox-init /dev/fd/N` process in new namespaces, the
/// spec written to it on a pipe (its read end `N`, the only descriptor it gains; the keeper
/// closes it once read, so the command inherits exactly the caller's descriptors).
fn exec_keeper(spec: &SandboxSpec) -> Result<Pid> {
    let exe = std::env::current_exe().context("finding the kof-store executable")?;
    // Close-on-exec: only the keeper's copy of the read end, made inheritable below, survives.
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .context("a pipe for the sandbox's spec")?;
    let read_fd = read.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.arg("__sandbox-init").arg(format!("/dev/fd/{read_fd}"));
    // SAFETY: only async-signal-safe system calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID)?;
            if libc::fcntl(read_fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .context("starting the sandbox (new mount and pid namespaces)")?;
    drop(read);
    let pid = Pid::from_raw(child.id() as i32);
    // The keeper reads the whole spec first; if it died instead, `run` reaps it and reports
    // its status.
    let mut w = std::fs::File::from(write);
    if let Err(e) = w.write_all(&serde_json::to_vec(spec)?) {
        tracing::warn!(error = %e, "writing the sandbox's spec");
    }
    drop(w);
    Ok(pid)
}

/// The keeper's pid while `run` waits for it (0 otherwise), for the signal handler.
static KEEPER: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_to_keeper(sig: libc::c_int) {
    let pid = KEEPER.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Passes SIGTERM and SIGHUP to the keeper while alive.
struct ForwardTermination {
    old: Vec<(Signal, SigAction)>,
}

impl ForwardTermination {
    fn new() -> Self {
        let action = SigAction::new(
            SigHandler::Handler(forward_to_keeper),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        let mut old = Vec::new();
        for s in [Signal::SIGTERM, Signal::SIGHUP] {
            // SAFETY: the handler only reads an atomic and calls kill(2).
            if let Ok(prev) = unsafe { sigaction(s, &action) } {
                old.push((s, prev));
            }
        }
        ForwardTermination { old }
    }
}

impl Drop for ForwardTermination {
    fn drop(&mut self) {
        for (s, a) in self.old.drain(..) {
            // SAFETY: restores the previous action.
            let _ = unsafe { sigaction(s, &a) };
        }
    }
}

/// Ignores SIGINT and SIGQUIT while alive.
struct IgnoreInterrupts {
    old: Vec<(Signal, nix::sys::signal::SigHandler)>,
}

impl IgnoreInterrupts {
    fn new() -> Self {
        use nix::sys::signal::signal;
        let mut old = Vec::new();
        for s in [Signal::SIGINT, Signal::SIGQUIT] {
            // SAFETY: installing SIG_IGN runs no code.
            if let Ok(prev) = unsafe { signal(s, SigHandler::SigIgn) } {
                old.push((s, prev));
            }
        }
        IgnoreInterrupts { old }
    }
}

impl Drop for IgnoreInterrupts {
    fn drop(&mut self) {
        for (s, h) in self.old.drain(..) {
            // SAFETY: restores the previous disposition.
            let _ = unsafe { nix::sys::signal::signal(s, h) };
        }
    }
}

/// `kof-store __sandbox-init SPEC`: the keeper (see the module doc), its spec read from the
/// file `SPEC` (`/dev/fd/N`, a pipe, closed once read). Never returns.
pub fn init_main(spec_file: &Path) -> ! {
    let code = (|| {
        let spec: SandboxSpec = serde_json::from_slice(
            &std::fs::read(spec_file)
                .with_context(|| format!("reading {}", spec_file.display()))?,
        )
        .with_context(|| format!("parsing {}", spec_file.display()))?;
        let inherited = spec_file
            .to_str()
            .and_then(|s| s.strip_prefix("/dev/fd/"))
            .and_then(|n| n.parse::<i32>().ok());
        if let Some(fd) = inherited.filter(|fd| *fd > 2) {
            // SAFETY: closes the pipe `run` passed; nothing else in this process uses it.
            unsafe {
                libc::close(fd);
            }
        }
        keeper(&spec)
    })()
    .unwrap_or_else(|e| {
        eprintln!("kof-store run: sandbox: {e:#}");
        EXIT_CANNOT_RUN
    });
    std::process::exit(code)
}

/// Forks the namespace's pid 1 and waits for it; its exit status.
fn keeper(spec: &SandboxSpec) -> Result<i32> {
    // SAFETY: this process is single-threaded (a fresh exec that started no thread, or a fork
    // of a single-threaded one).
    match unsafe { fork() }.context("forking the namespace's pid 1")? {
        ForkResult::Child => {
            let code = match pid1(spec) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("kof-store run: sandbox: {e:#}");
                    EXIT_CANNOT_RUN
                }
            };
            // SAFETY: ends this forked copy without running exit handlers or flushing copied
            // buffers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            let _quiet = IgnoreInterrupts::new();
            wait_exit(child)
        }
    }
}

/// Waits for `pid` and maps its end to an exit status.
fn wait_exit(pid: Pid) -> Result<i32> {
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("waiting for the sandbox's pid 1"),
        }
    }
}

fn mount_err(what: &str, target: &Path, e: nix::errno::Errno) -> anyhow::Error {
    anyhow::Error::new(e).context(format!("mounting {what} at {}", target.display()))
}

/// Pid 1: mounts, pivots, starts the command, reaps.
fn pid1(spec: &SandboxSpec) -> Result<i32> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("PR_SET_PDEATHSIG")?;
    let none: Option<&str> = None;
    // Nothing done here may propagate to the host's mount namespace.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(|e| mount_err("private propagation", Path::new("/"), e))?;
    mount(
        Some("kof-run-rw"),
        &spec.scratch,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0700"),
    )
    .map_err(|e| mount_err("the writable layer's tmpfs", &spec.scratch, e))?;
    for d in [spec.upper(), spec.work(), spec.root()] {
        std::fs::create_dir(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    let root = spec.root();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        escape_overlay(&spec.lower)?,
        escape_overlay(&spec.upper())?,
        escape_overlay(&spec.work())?
    );
    mount(
        Some("kof-run"),
        &root,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|e| mount_err("the overlay", &root, e))?;
    let sub = |p: &str| root.join(p);
    for d in ["proc", "dev", "tmp"] {
        std::fs::create_dir_all(sub(d)).with_context(|| format!("creating /{d} in the root"))?;
    }
    mount(
        Some("proc"),
        &sub("proc"),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        none,
    )
    .map_err(|e| mount_err("proc", &sub("proc"), e))?;
    mount(
        Some("/dev"),
        &sub("dev"),
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(|e| mount_err("/dev", &sub("dev"), e))?;
    mount(
        Some("tmpfs"),
        &sub("tmp"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .map_err(|e| mount_err("tmpfs", &sub("tmp"), e))?;
    let resolv = Path::new("/etc/resolv.conf");
    if spec.resolv_conf && resolv.exists() {
        let target = sub("etc/resolv.conf");
        std::fs::create_dir_all(sub("etc")).context("creating /etc in the root")?;
        if !target.exists() {
            std::fs::write(&target, b"").context("creating /etc/resolv.conf in the root")?;
        }
        mount(Some(resolv), &target, none, MsFlags::MS_BIND, none)
            .map_err(|e| mount_err("/etc/resolv.conf", &target, e))?;
    }
    // pivot_root(".", ".") stacks the old root on the new one; detaching it leaves only the new.
    chdir(&root).context("entering the new root")?;
    pivot_root(".", ".").context("pivot_root into the overlay")?;
    umount2(".", MntFlags::MNT_DETACH).context("detaching the old root")?;
    chdir("/").context("chdir /")?;

    let path_var = spec
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    let program = match find_program(&spec.argv[0], path_var) {
        Some(p) => p,
        None => {
            eprintln!("kof-store run: {}: command not found", spec.argv[0]);
            return Ok(EXIT_NOT_FOUND);
        }
    };
    let cstr = |s: &[u8]| CString::new(s).context("a NUL byte in an argument or variable");
    let prog = cstr(program.as_os_str().as_bytes())?;
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| cstr(a.as_bytes()))
        .collect::<Result<_>>()?;
    let envp: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| cstr(format!("{k}={v}").as_bytes()))
        .collect::<Result<_>>()?;

    // SAFETY: single-threaded; the child only execs (or exits).
    let command = match unsafe { fork() }.context("forking the command")? {
        ForkResult::Child => {
            // Rust's runtime ignores SIGPIPE and an ignored signal stays ignored across exec:
            // the command starts with the default disposition, as a shell would start it.
            // SAFETY: signal(2) is async-signal-safe.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            }
            let e = execve(&prog, &argv, &envp).unwrap_err();
            eprintln!("kof-store run: {}: {e}", program.display());
            // SAFETY: exit without running this process's (copied) atexit handlers.
            unsafe { libc::_exit(EXIT_CANNOT_RUN) }
        }
        ForkResult::Parent { child } => child,
    };
    // Reap everything (orphans are re-parented to pid 1) until the command itself ends.
    loop {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == command => return Ok(code),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == command => return Ok(128 + sig as i32),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("waiting for the command"),
        }
    }
}

/// A directory name for overlay's comma- and colon-separated options.
fn escape_overlay(p: &Path) -> Result<String> {
    let s = p
        .to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))?;
    if s.contains([',', ':', '\\']) {
        bail!("{s}: overlay directories cannot hold ',', ':' or '\\'");
    }
    Ok(s.to_string())
}

/// `argv0` itself when it holds a `/`, else the first executable file named so on `path`.
fn find_program(argv0: &str, path: &str) -> Option<PathBuf> {
    if argv0.contains('/') {
        return Some(PathBuf::from(argv0));
    }
    if argv0.is_empty() {
        return None;
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(OsStr::new(argv0)))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}
