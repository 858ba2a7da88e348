//! Waiting for a process to exit through a pidfd (Linux 5.3 and later): the moment it exits,
//! without polling, and without reaping it (a child's pid stays its own until it is waited for).
//!
//! Shared by the FloxHub client, which bounds its git runs, and the shim's proxy, which lives
//! as long as the runc shim behind it. std has no pidfd wait on stable Rust, so the two system
//! calls are made here.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Waits until process `pid` has exited, at most `timeout` (`None`: unbounded): `Ok(true)` once
/// it has, `Ok(false)` at the timeout. An error when the kernel has no pidfds, or `pid` names
/// no process: callers fall back to polling.
pub fn wait_exit(pid: i32, timeout: Option<Duration>) -> std::io::Result<bool> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let ms = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                left.as_millis().min(i32::MAX as u128) as i32
            }
            None => -1,
        };
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            return Ok(true);
        }
        if n == 0 {
            return Ok(false);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_the_exit_and_the_timeout_of_a_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        assert!(!wait_exit(pid, Some(Duration::from_millis(10))).unwrap());
        assert!(wait_exit(pid, Some(Duration::from_secs(30))).unwrap());
        // Not reaped: the exit status is still the child's to collect.
        assert!(child.wait().unwrap().success());
        assert!(wait_exit(-5, None).is_err());
    }
}
