//! A running `kof-fetcherd`: started, awaited until it answers with its FUSE server up, and
//! taken down with its FUSE server and mount.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kof_node_api::api::Client;
use thiserror::Error;

/// How to start a daemon.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    /// The `kof-fetcherd` binary.
    pub bin: PathBuf,
    /// Its configuration file (`--config`).
    pub config: PathBuf,
    /// The API socket the configuration names.
    pub socket: PathBuf,
    /// The view mount directory the configuration names.
    pub mount_dir: PathBuf,
    /// Where its stderr goes.
    pub log: PathBuf,
    /// `KOF_LOG`, when set.
    pub log_level: Option<String>,
    /// How long it may take to answer with its FUSE server up.
    pub timeout: Duration,
}

/// Why a daemon did not come up, or did not stop cleanly.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The log file could not be created.
    #[error("cannot create the daemon's log {}", .path.display())]
    Log {
        /// the log file
        path: PathBuf,
        /// the cause
        #[source]
        source: std::io::Error,
    },
    /// The binary could not be run.
    #[error("cannot start {}", .bin.display())]
    Spawn {
        /// the binary
        bin: PathBuf,
        /// the cause
        #[source]
        source: std::io::Error,
    },
    /// It exited before it answered.
    #[error("kof-fetcherd exited with {status} before it answered (log: {})", .log.display())]
    Exited {
        /// its exit status
        status: ExitStatus,
        /// its log
        log: PathBuf,
    },
    /// It did not answer with its FUSE server up in time.
    #[error("kof-fetcherd did not answer with its FUSE server up on {} within {timeout:?} (log: {})", .socket.display(), .log.display())]
    Timeout {
        /// its socket
        socket: PathBuf,
        /// the time given
        timeout: Duration,
        /// its log
        log: PathBuf,
    },
    /// Waiting for it (or running `stop-fuse-server`) failed.
    #[error("waiting for kof-fetcherd")]
    Wait(#[source] std::io::Error),
    /// `kof-fetcherd stop-fuse-server` failed.
    #[error("kof-fetcherd stop-fuse-server failed: {stderr}")]
    StopFuseServer {
        /// its stderr
        stderr: String,
    },
}

/// A running `kof-fetcherd`. Dropping it kills it (SIGKILL), stops its FUSE server (which
/// unmounts every view) and makes sure nothing stays mounted on its mount directory;
/// [`Daemon::kill`] kills the daemon alone, leaving its FUSE server serving (as a daemon
/// crash or restart does), and [`Daemon::stop`] stops both cleanly.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    bin: PathBuf,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its API socket.
    pub socket: PathBuf,
    /// Its view mount directory.
    pub mount_dir: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// The FUSE server's pid when last seen.
    fuse_pid: Option<u32>,
    /// Stopped or killed already: nothing left for `drop`.
    done: bool,
}

impl Daemon {
    /// Starts it and waits until it answers `status` with its FUSE server up.
    pub fn start(spec: &DaemonSpec) -> Result<Daemon, DaemonError> {
        if let Some(dir) = spec.log.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let log = std::fs::File::create(&spec.log).map_err(|source| DaemonError::Log {
            path: spec.log.clone(),
            source,
        })?;
        let mut c = Command::new(&spec.bin);
        c.arg("--config")
            .arg(&spec.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(level) = &spec.log_level {
            c.env("KOF_LOG", level);
        }
        let child = c.spawn().map_err(|source| DaemonError::Spawn {
            bin: spec.bin.clone(),
            source,
        })?;
        let mut d = Daemon {
            child: Some(child),
            bin: spec.bin.clone(),
            config: spec.config.clone(),
            socket: spec.socket.clone(),
            mount_dir: spec.mount_dir.clone(),
            log: spec.log.clone(),
            fuse_pid: None,
            done: false,
        };
        let start = Instant::now();
        loop {
            if let Ok(s) = Client::connect(&d.socket).and_then(|mut c| c.status()) {
                if let Some(f) = s.fuse_server {
                    d.fuse_pid = Some(f.pid);
                    return Ok(d);
                }
            }
            if let Some(status) = d.try_wait()? {
                return Err(DaemonError::Exited {
                    status,
                    log: d.log.clone(),
                });
            }
            if start.elapsed() > spec.timeout {
                return Err(DaemonError::Timeout {
                    socket: d.socket.clone(),
                    timeout: spec.timeout,
                    log: d.log.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, DaemonError> {
        match &mut self.child {
            Some(c) => c.try_wait().map_err(DaemonError::Wait),
            None => Ok(None),
        }
    }

    /// A client of its API (panics if it does not answer).
    pub fn client(&self) -> Client {
        Client::connect(&self.socket)
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.socket.display()))
    }

    /// What it has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the daemon (SIGKILL) and nothing else: its detached FUSE server keeps serving.
    /// Returns what [`Node`](crate::Node) needs to clean up after it.
    pub fn kill(mut self) -> FuseServerLeft {
        self.done = true;
        self.refresh_fuse_pid();
        self.kill_process();
        self.left()
    }

    /// Stops it cleanly: SIGTERM and wait, then `kof-fetcherd stop-fuse-server` (which
    /// unmounts every view).
    pub fn stop(mut self) -> Result<(), DaemonError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        self.done = true;
        // SAFETY: kill(2) of the child this value owns, not yet waited for.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        child.wait().map_err(DaemonError::Wait)?;
        let out = self
            .stop_fuse_server_command()
            .output()
            .map_err(DaemonError::Wait)?;
        if !out.status.success() {
            return Err(DaemonError::StopFuseServer {
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    fn refresh_fuse_pid(&mut self) {
        if let Ok(s) = Client::connect(&self.socket).and_then(|mut c| c.status()) {
            if let Some(f) = s.fuse_server {
                self.fuse_pid = Some(f.pid);
            }
        }
    }

    fn kill_process(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn left(&self) -> FuseServerLeft {
        FuseServerLeft {
            bin: self.bin.clone(),
            config: self.config.clone(),
            mount_dir: self.mount_dir.clone(),
            fuse_pid: self.fuse_pid,
        }
    }

    fn stop_fuse_server_command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--config")
            .arg(&self.config)
            .arg("stop-fuse-server")
            .stdin(Stdio::null());
        c
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.refresh_fuse_pid();
        self.kill_process();
        self.left().stop();
    }
}

/// A FUSE server a killed daemon left serving, to stop when the node goes.
#[derive(Debug)]
pub struct FuseServerLeft {
    bin: PathBuf,
    config: PathBuf,
    mount_dir: PathBuf,
    fuse_pid: Option<u32>,
}

impl FuseServerLeft {
    /// Runs `kof-fetcherd stop-fuse-server`, waits (up to 10 s) for the FUSE server to exit
    /// and kills it if it has not, then detaches whatever is still mounted on the mount
    /// directory.
    pub fn stop(self) {
        let _ = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .arg("stop-fuse-server")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(pid) = self.fuse_pid {
            let start = Instant::now();
            while is_fetcherd(pid) && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if is_fetcherd(pid) {
                // SAFETY: kill(2) of the FUSE server this node's daemon started, checked to
                // be a kof-fetcherd just above.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
        }
        let start = Instant::now();
        while is_mounted(&self.mount_dir) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if is_mounted(&self.mount_dir) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mount_dir)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Whether process `pid` exists and runs `kof-fetcherd` (a pid may have been reused).
fn is_fetcherd(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        c.windows(b"kof-fetcherd".len())
            .any(|w| w == b"kof-fetcherd")
    })
}

/// Whether `dir` is a mount point of this process's mount namespace.
pub(crate) fn is_mounted(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let d = dir.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(d.as_ref()))
}
