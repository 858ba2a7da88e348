//! An upgrade of kof-fetcherd under a running reader, as Kubernetes does it to the DaemonSet:
//! the daemon runs in a "container" (a restart loop in cgroups of its own, killed the way runc
//! kills a container: freeze the cgroup, SIGKILL every member, thaw), the container is killed,
//! and a new one starts with a newer build of the binary. The FUSE server left its starter's
//! cgroup and survives the kill; the new daemon finds it is another build, and the new build's
//! FUSE server takes the mount over (the connection, the views, the inodes, the open files)
//! without unmounting. A reader streaming a large file through a view, fetched on demand over
//! a slow link, gets every byte and no error.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kof_node_api::api::Client;
use kof_testkit::{closure_of, staged};

/// The mount points of this machine's cgroup hierarchies (one per hierarchy).
fn hierarchies() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in info.lines() {
        let (left, right) = line.split_once(" - ").unwrap();
        let fstype = right.split(' ').next().unwrap();
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        let f: Vec<&str> = left.split(' ').collect();
        let opts = right.split(' ').nth(2).unwrap_or("");
        if f[3] == "/" && seen.insert(format!("{fstype} {opts}")) {
            out.push(PathBuf::from(f[4]));
        }
    }
    out
}

/// A "container": cgroup `name` in every hierarchy, and what runs in it.
struct Container {
    cgroups: Vec<PathBuf>,
    child: Option<Child>,
}

impl Container {
    /// Runs `kof-fetcherd` (the binary `bin`) in a restart loop, as a DaemonSet's container
    /// whose process is restarted by the kubelet, in cgroups named `name`.
    fn start(name: &str, bin: &Path, config: &Path, log: &Path) -> Container {
        let mut cgroups = Vec::new();
        for h in hierarchies() {
            let dir = h.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            for file in ["cpuset.cpus", "cpuset.mems"] {
                // v1's cpuset refuses members until it has CPUs and memory nodes (v2's root has
                // no such files, and needs none).
                let own = std::fs::read_to_string(dir.join(file));
                let theirs = std::fs::read_to_string(h.join(file));
                if let (Ok(own), Ok(theirs)) = (own, theirs) {
                    if own.trim().is_empty() {
                        std::fs::write(dir.join(file), theirs.trim()).unwrap();
                    }
                }
            }
            cgroups.push(dir);
        }
        // The loop waits for a line on stdin, so that it is in its cgroups before it starts
        // anything.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"read go; while :; do "$0" --config "$1" >>"$2" 2>&1; sleep 0.2; done"#)
            .arg(bin)
            .arg(config)
            .arg(log)
            .env("KOF_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        for dir in &cgroups {
            std::fs::write(dir.join("cgroup.procs"), child.id().to_string()).unwrap();
        }
        child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
        Container {
            cgroups,
            child: Some(child),
        }
    }

    /// Every process in the container's cgroups.
    fn members(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .cgroups
            .iter()
            .flat_map(|d| {
                std::fs::read_to_string(d.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kills the container as runc does: freeze, SIGKILL every member, thaw (cgroup v1), or
    /// `cgroup.kill` (v2); waits until the cgroups are empty.
    fn kill(&mut self) {
        let freezer = self
            .cgroups
            .iter()
            .find(|d| d.join("freezer.state").exists())
            .cloned();
        if let Some(f) = &freezer {
            std::fs::write(f.join("freezer.state"), "FROZEN").unwrap();
        }
        // cgroup v2: the kernel kills every member at once.
        for d in &self.cgroups {
            if d.join("cgroup.kill").exists() {
                let _ = std::fs::write(d.join("cgroup.kill"), "1");
            }
        }
        for pid in self.members() {
            // SAFETY: kill(2) of a member of this test's own cgroup.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        if let Some(f) = &freezer {
            std::fs::write(f.join("freezer.state"), "THAWED").unwrap();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        let start = Instant::now();
        while !self.members().is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the container's processes did not die: {:?}",
                self.members()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.kill();
        for d in &self.cgroups {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// The cgroups (one per hierarchy) process `pid` is in.
fn cgroups_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The mount id of the FUSE mount on `dir` (changes if it is ever unmounted and mounted again).
fn mount_id(dir: &Path) -> Option<String> {
    let d = dir.canonicalize().ok()?;
    let d = d.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(d.as_str()) && l.contains(" - fuse"))
        .map(|l| l.split(' ').next().unwrap().to_string())
}

fn ping(control: &Path) -> Option<kof_node_api::api::FuseServerInfo> {
    kof_fetcherd::daemon::control::ControlClient::connect(control)
        .and_then(|mut c| c.ping())
        .ok()
}

/// Waits until the daemon answers with its FUSE server up and of build `build`.
fn wait_for_daemon(socket: &Path, control: &Path, build: &str, logs: &dyn Fn() -> String) {
    let start = Instant::now();
    loop {
        let up = Client::connect(socket)
            .and_then(|mut c| c.status())
            .is_ok_and(|s| s.fuse_server.is_some());
        if up && ping(control).is_some_and(|i| i.build.as_deref() == Some(build)) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the daemon did not come up with a FUSE server of build {build}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn blake3_file(p: &Path) -> String {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(p).unwrap()).unwrap();
    h.finalize().to_hex().to_string()
}

/// The test's node (with its FUSE server's cgroup named), the binary of this build and a newer
/// build of it (the same program with other bytes: another build id, at another path, as a new
/// image's binary would be).
struct Upgrade {
    node: kof_testkit::Node,
    /// Names this test's cgroups (tests run in parallel).
    tag: String,
    fuse_cgroup: String,
    old_bin: PathBuf,
    new_bin: PathBuf,
    old_build: String,
    new_build: String,
}

impl Upgrade {
    fn new(test: &str, flavour: &'static str, bandwidth: Option<u64>) -> Upgrade {
        let tag = format!("{}-{test}", std::process::id());
        let fuse_cgroup = format!("kof-test-fuse-{tag}");
        let node = kof_testkit::Node::new(kof_testkit::NodeOptions {
            flavour,
            bandwidth,
            fetcherd: Some(env!("CARGO_BIN_EXE_kof-fetcherd").into()),
            prefix: "kof-fetcherd-upgrade",
            start_daemon: false,
            extra_config: format!("fuse_server_cgroup = \"{fuse_cgroup}\"\n"),
            ..kof_testkit::NodeOptions::default()
        });
        let old_bin = PathBuf::from(env!("CARGO_BIN_EXE_kof-fetcherd"));
        let new_bin = node.dir().join("kof-fetcherd-new");
        std::fs::copy(&old_bin, &new_bin).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&new_bin)
            .unwrap()
            .write_all(b"\0kof newer build\0")
            .unwrap();
        let (old_build, new_build) = (blake3_file(&old_bin), blake3_file(&new_bin));
        assert_ne!(old_build, new_build);
        Upgrade {
            node,
            tag,
            fuse_cgroup,
            old_bin,
            new_bin,
            old_build,
            new_build,
        }
    }

    /// Starts container `n` running `bin` and waits until its daemon answers with a FUSE server
    /// of `build`.
    fn container(&self, n: u32, bin: &Path, build: &str) -> Container {
        let c = Container::start(
            &format!("kof-test-ds-{}-{n}", self.tag),
            bin,
            &self.node.config,
            &self.node.dir().join(format!("daemon-{n}.log")),
        );
        let logs = || self.node.logs();
        wait_for_daemon(&self.node.socket(), &self.node.control(), build, &logs);
        c
    }
}

impl Drop for Upgrade {
    /// Stops the FUSE server (in no container; the test's containers, declared after this, are
    /// gone already), detaches a mount left behind, and removes the FUSE server's cgroups.
    fn drop(&mut self) {
        let pid = ping(&self.node.control()).map(|i| i.pid);
        let _ = Command::new(&self.new_bin)
            .arg("--config")
            .arg(&self.node.config)
            .arg("stop-fuse-server")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let start = Instant::now();
        while pid.is_some_and(alive) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(pid) = pid.filter(|&p| alive(p)) {
            // SAFETY: kill(2) of the FUSE server this test's daemons started.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        if mount_id(&self.node.mount_dir()).is_some() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.node.mount_dir())
                .status();
        }
        for h in hierarchies() {
            let _ = std::fs::remove_dir(h.join(&self.fuse_cgroup));
        }
    }
}

/// FUSE `read` requests the running FUSE server has answered.
fn fuse_reads(control: &Path) -> u64 {
    kof_fetcherd::daemon::control::ControlClient::connect(control)
        .and_then(|mut c| c.op_stats())
        .unwrap()
        .ops
        .get("read")
        .map_or(0, |h| h.count)
}

/// The test the issue names: the DaemonSet's container killed and replaced by a newer build,
/// under a running reader; every byte arrives and no read fails.
#[test]
fn an_upgrade_under_a_running_reader_keeps_every_byte() {
    let up = Upgrade::new("reader", "published", Some(2 << 20));
    let node = &up.node;
    let logs = || node.logs();
    let control = node.control();

    // The first container, and a lease served by its daemon's FUSE server.
    let mut first = up.container(1, &up.old_bin, &up.old_build);
    let old_fuse = ping(&control).unwrap();
    assert!(
        cgroups_of(old_fuse.pid).contains(&up.fuse_cgroup),
        "the FUSE server did not leave its starter's cgroup:\n{}\n{}",
        cgroups_of(old_fuse.pid),
        logs()
    );
    let mount = mount_id(&node.mount_dir()).expect("the views are mounted");
    let p = node.client().prepare("kof/python", "pod-1", None).unwrap();
    let python = closure_of("kof/python", None)
        .into_iter()
        .find(|p| p.contains("-python3-"))
        .expect("the python environment has python");
    let rel = "bin/python3.11";
    let want = std::fs::read(staged(&python).join(rel)).unwrap();
    let file = p.view_root.join(python.trim_start_matches('/')).join(rel);

    // A reader streams the file through the view (fetched on demand, 2 MiB/s).
    let progress = Arc::new(AtomicU64::new(0));
    let reader = {
        let progress = progress.clone();
        let file = file.clone();
        std::thread::spawn(move || -> Result<Vec<u8>, (u64, std::io::Error)> {
            let mut f = std::fs::File::open(&file).map_err(|e| (0, e))?;
            let mut all = Vec::new();
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = f.read(&mut buf).map_err(|e| (all.len() as u64, e))?;
                if n == 0 {
                    return Ok(all);
                }
                all.extend_from_slice(&buf[..n]);
                progress.store(all.len() as u64, Ordering::SeqCst);
                // Slow enough that the upgrade happens mid-file even when it is local.
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    while progress.load(Ordering::SeqCst) == 0 && !reader.is_finished() {
        std::thread::sleep(Duration::from_millis(5));
    }

    // Kubernetes replaces the pod: the container is killed, all of it.
    first.kill();
    let at_kill = progress.load(Ordering::SeqCst);
    assert!(
        alive(old_fuse.pid),
        "killing the container killed the FUSE server\n{}",
        logs()
    );
    // The new pod's container, with the newer build.
    let upgrade_started = Instant::now();
    let second = up.container(2, &up.new_bin, &up.new_build);
    let upgraded_in = upgrade_started.elapsed();
    let new_fuse = ping(&control).unwrap();
    let at_upgrade = progress.load(Ordering::SeqCst);

    let got = reader.join().unwrap().unwrap_or_else(|(at, e)| {
        panic!(
            "the read failed at byte {at} across the upgrade: {e}\n{}",
            logs()
        )
    });
    assert_eq!(got.len(), want.len());
    assert!(got == want, "the bytes read differ from the file's");
    eprintln!(
        "upgrade under a reader: {} bytes read, 0 read errors; container killed at byte {at_kill}, \
         new build serving at byte {at_upgrade}, {:.2} s from the new container's start",
        got.len(),
        upgraded_in.as_secs_f64()
    );
    assert!(
        at_kill < want.len() as u64 && at_upgrade < want.len() as u64,
        "the reader finished ({at_kill}, {at_upgrade} of {} bytes) before the upgrade: not a test of it",
        want.len()
    );

    // The newer build serves the same mount (never unmounted), the old server is gone, the
    // view and its lease are there.
    assert_ne!(new_fuse.pid, old_fuse.pid);
    assert!(!alive(old_fuse.pid), "the old FUSE server still runs");
    assert_eq!(mount_id(&node.mount_dir()).as_deref(), Some(mount.as_str()));
    assert!(
        new_fuse.views.contains(&view_name(&p.view_root)),
        "{:?}",
        new_fuse.views
    );
    let fuse_log = std::fs::read_to_string(node.dir().join("run/fuse-server.log")).unwrap();
    // The reader was waiting on the old server for bytes when the container died: that read
    // was left unanswered at the hand-over and answered by the new build.
    assert!(fuse_log.contains("daemon away"), "{}", logs());
    assert!(fuse_log.contains("FUSE view handed over"), "{}", logs());
    assert!(fuse_log.contains("FUSE view taken over"), "{}", logs());
    assert!(cgroups_of(new_fuse.pid).contains(&up.fuse_cgroup));
    // A new open and a directory listing through the view, served by the new build.
    let listed = std::fs::read_dir(p.view_root.join("nix/store"))
        .unwrap()
        .count();
    assert!(listed > 0);
    assert!(std::fs::read(&file).unwrap() == want);
    let leases = node.client().leases().unwrap();
    assert_eq!(leases.len(), 1);
    drop(second);
}

/// A file open by FUSE passthrough (the kernel reads its backing file; the server holds the
/// backing id) stays open and readable across the hand-over; a new open of it reuses the
/// backing id the old server opened (the kernel refuses a second one for the inode); after
/// the last close it is released, and the next open gets a new one.
#[test]
fn passthrough_files_stay_open_across_an_upgrade() {
    let up = Upgrade::new("passthrough", "zstd", None);
    let node = &up.node;
    let control = node.control();
    let first = up.container(1, &up.old_bin, &up.old_build);
    node.client().prefetch("kof/python", None).unwrap();
    let p = node.client().prepare("kof/python", "pod-1", None).unwrap();
    let python = closure_of("kof/python", None)
        .into_iter()
        .find(|p| p.contains("-python3-"))
        .unwrap();
    let rel = "bin/python3.11";
    let want = std::fs::read(staged(&python).join(rel)).unwrap();
    let file = p.view_root.join(python.trim_start_matches('/')).join(rel);
    // The first opens read through FUSE while the raw copy (the backing file) is written; once
    // it is there, an open is by passthrough: reading the whole file asks the server nothing.
    let start = Instant::now();
    let mut held = loop {
        let mut f = std::fs::File::open(&file).unwrap();
        let before = fuse_reads(&control);
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        assert!(got == want);
        if fuse_reads(&control) == before {
            break f;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no open of {rel} was by passthrough\n{}",
            node.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };

    drop(first);
    let second = up.container(2, &up.new_bin, &up.new_build);
    let fuse_log = std::fs::read_to_string(node.dir().join("run/fuse-server.log")).unwrap();
    assert!(fuse_log.contains("FUSE view taken over"), "{}", node.logs());

    // The handle held across the hand-over reads on.
    use std::io::Seek;
    held.seek(std::io::SeekFrom::Start(0)).unwrap();
    let mut got = Vec::new();
    held.read_to_end(&mut got).unwrap();
    assert!(got == want);
    // A new open while it is held: by passthrough, on the adopted backing id.
    let reads = fuse_reads(&control);
    let again = std::fs::read(&file).unwrap_or_else(|e| {
        panic!(
            "opening {rel} again after the hand-over: {e}\n{}",
            node.logs()
        )
    });
    assert!(again == want);
    assert_eq!(
        fuse_reads(&control),
        reads,
        "the new open was not by passthrough"
    );
    // All closed: the adopted id is closed; the next open opens a new one, by passthrough too.
    drop(held);
    let start = Instant::now();
    loop {
        let reads = fuse_reads(&control);
        let got = std::fs::read(&file).unwrap();
        assert!(got == want);
        if fuse_reads(&control) == reads {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{}", node.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(second);
}

fn view_name(view_root: &Path) -> String {
    view_root
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// A FUSE server of a release before hand-over, as far as its control socket goes: it answers
/// `ping` with another build and refuses `hand_over` as an unknown request.
fn older_fuse_server(control: &Path, mount_dir: &Path) -> std::thread::JoinHandle<()> {
    use std::io::BufRead;
    std::fs::create_dir_all(control.parent().unwrap()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(control).unwrap();
    let mount_dir = mount_dir.to_path_buf();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mount_dir = mount_dir.clone();
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                for line in std::io::BufReader::new(conn).lines() {
                    let Ok(line) = line else { return };
                    let answer = if line.contains("\"ping\"") {
                        // No process of its own (pid 0): nothing to stop at the end.
                        let mut v = serde_json::to_vec(&serde_json::json!({
                            "pid": 0,
                            "mount_dir": mount_dir,
                            "views": [],
                            "build": "an-older-build",
                        }))
                        .unwrap();
                        v.push(b'\n');
                        v
                    } else if line.contains("\"shutdown\"") {
                        b"{\"ok\":true}\n".to_vec()
                    } else {
                        kof_node_api::api::error_line(
                            kof_node_api::api::ErrorKind::BadRequest,
                            "bad control request: unknown variant",
                        )
                    };
                    if w.write_all(&answer).is_err() {
                        return;
                    }
                }
            });
        }
    })
}

/// A running FUSE server that cannot hand over (a release before hand-over) stays: the new
/// build's take-over gives up at once, the daemon says so and serves through the running one.
#[test]
fn a_fuse_server_that_cannot_hand_over_stays() {
    let up = Upgrade::new("older", "zstd", None);
    let node = &up.node;
    let _older = older_fuse_server(&node.control(), &node.mount_dir());
    let mut c = Container::start(
        &format!("kof-test-ds-{}-1", up.tag),
        &up.old_bin,
        &node.config,
        &node.dir().join("daemon-1.log"),
    );
    let start = Instant::now();
    loop {
        let status = Client::connect(&node.socket()).and_then(|mut c| c.status());
        if let Ok(s) = status {
            let info = s.fuse_server.expect("the running FUSE server answers");
            assert_eq!(info.build.as_deref(), Some("an-older-build"));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the daemon did not come up\n{}",
            node.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The daemon serves while it adopts the FUSE server: wait for the take-over's outcome.
    let log = loop {
        let log = std::fs::read_to_string(node.dir().join("daemon-1.log")).unwrap_or_default();
        if log.contains("the running one stays") || log.contains("the FUSE server was replaced") {
            break log;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no outcome of the take-over\n{}",
            node.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // It gave up because the successor exited, not because the start bound passed.
    assert!(
        log.contains("the FUSE server started to take over exited"),
        "{log}"
    );
    let fuse_log = std::fs::read_to_string(node.dir().join("run/fuse-server.log")).unwrap();
    assert!(fuse_log.contains("instead of handing over"), "{fuse_log}");
    c.kill();
}
