//! `kof-node-install probe` against the real `kof-fetcherd` (with its real FUSE server and
//! mount): ready and alive while it runs, failing with the socket named once it is killed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kof_testkit::fetcherd_bin;

struct Daemon {
    tmp: tempfile::TempDir,
    config: PathBuf,
    child: Option<Child>,
    fuse_pid: Option<u32>,
}

impl Daemon {
    fn start() -> Daemon {
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "store_dir = \"{}\"\nsocket = \"{}\"\nmount_dir = \"{}\"\n",
                tmp.path().join("store").display(),
                tmp.path().join("run/fetcherd.sock").display(),
                tmp.path().join("mnt").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(tmp.path().join("daemon.log")).unwrap();
        let child = Command::new(fetcherd_bin())
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Daemon {
            tmp,
            config,
            child: Some(child),
            fuse_pid: None,
        }
    }

    fn socket(&self) -> PathBuf {
        self.tmp.path().join("run/fetcherd.sock")
    }

    fn probe(&self, ready: bool) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kof-node-install"));
        c.args(["probe", "--config"]).arg(&self.config);
        if ready {
            c.arg("--ready");
        }
        c.output().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("daemon.log")).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        let _ = Command::new(fetcherd_bin())
            .arg("--config")
            .arg(&self.config)
            .arg("stop-fuse-server")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(pid) = self.fuse_pid {
            let start = Instant::now();
            while Path::new(&format!("/proc/{pid}")).exists()
                && start.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            // The FUSE server this test's daemon started, by its pid (it may be gone).
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let mnt = self.tmp.path().join("mnt");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        if mounts.contains(&format!(" {} ", mnt.display())) {
            let _ = Command::new("umount").arg("-l").arg(&mnt).status();
        }
    }
}

#[test]
fn probe_reports_a_running_daemon_and_a_dead_one() {
    let mut d = Daemon::start();
    // Wait for readiness, as the startup probe does (bounded, so a broken daemon fails the
    // test with its log instead of hanging it).
    let start = Instant::now();
    let ready = loop {
        let out = d.probe(true);
        if out.status.success() {
            break String::from_utf8(out.stdout).unwrap();
        }
        if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("kof-fetcherd exited with {st}: {}", d.log());
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "not ready: {}; daemon log: {}",
            String::from_utf8_lossy(&out.stderr),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let status = kof_node_api::api::Client::connect(&d.socket())
        .unwrap()
        .status()
        .unwrap();
    let fuse = status.fuse_server.expect("ready means a FUSE server");
    d.fuse_pid = Some(fuse.pid);
    assert_eq!(
        ready,
        format!(
            "kof-fetcherd at {} is ready (pid {}, 0 leases, FUSE server pid {} at {})\n",
            d.socket().display(),
            status.pid,
            fuse.pid,
            d.tmp.path().join("mnt").display()
        )
    );
    let out = d.probe(false);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!(
            "kof-fetcherd at {} is alive (pid {}, store {})\n",
            d.socket().display(),
            status.pid,
            d.tmp.path().join("store").display()
        )
    );

    // Killed: both probes fail, naming the socket.
    d.kill();
    for ready in [false, true] {
        let out = d.probe(ready);
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.starts_with(&format!(
                "kof-node-install probe: cannot connect to kof-fetcherd at {}: ",
                d.socket().display()
            )),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
