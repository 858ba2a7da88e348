//! Many cold starts of one environment at once through one `kof-fetcherd` on a fresh node: the
//! daemon shares fetches (single-flight per store path and range), so every object should
//! cross the link once whatever the number of starts.
//!
//! Measured on the shaped link: one cold start through a daemon on a fresh node (the
//! reference), then `starts` concurrent `kof-store run`s through another daemon on another
//! fresh node; NAR (and range) requests and bytes against the closure's NAR bytes and against
//! the one start's, and the wall time until the last start ends.

use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use kof_fixtures::build::Manifest;
use serde::Serialize;

use crate::node::{self, Daemon, KofNode, Link};

/// The comparison.
#[derive(Debug, Clone)]
pub struct ConcurrentBench {
    /// `owner/name`.
    pub env: String,
    /// The command.
    pub cmd: Vec<String>,
    /// Concurrent starts.
    pub starts: usize,
    /// The link.
    pub link: Link,
    /// Cache flavour (`published`: signed indexes, verified chunk reads).
    pub flavour: String,
}

/// What one side moved over the link.
#[derive(Debug, Clone, Serialize)]
pub struct Traffic {
    /// Wall time until every start ended.
    pub seconds: f64,
    /// Every request.
    pub requests: u64,
    /// NAR requests (whole NARs and ranges).
    pub nar_requests: u64,
    /// Every body byte.
    pub bytes: u64,
    /// NAR body bytes.
    pub nar_bytes: u64,
}

/// What it measured.
#[derive(Debug, Clone, Serialize)]
pub struct ConcurrentReport {
    /// `owner/name`.
    pub env: String,
    /// The command.
    pub cmd: Vec<String>,
    /// Cache flavour.
    pub flavour: String,
    /// Store paths in the closure.
    pub paths: usize,
    /// The closure's NarSize sum.
    pub closure_nar_bytes: u64,
    /// One cold start through a daemon.
    pub one: Traffic,
    /// `starts` concurrent cold starts through one daemon.
    pub many: Traffic,
    /// Concurrent starts.
    pub starts: usize,
    /// `many.nar_bytes / closure_nar_bytes`.
    pub many_vs_closure: f64,
    /// `many.nar_bytes / one.nar_bytes`.
    pub many_vs_one: f64,
}

impl ConcurrentBench {
    /// `starts` cold starts through one daemon on a fresh node (1 for the reference).
    fn side(
        &self,
        fixtures: &Path,
        manifest: &Manifest,
        kof_store: &Path,
        starts: usize,
    ) -> Result<Traffic> {
        let server = node::serve(fixtures, self.link)?;
        let n = KofNode::new(&server, manifest, &self.flavour, "")?;
        n.enable_daemon()?;
        let daemon = Daemon::start(&n, kof_store)?;
        let mut args = vec!["run", self.env.as_str(), "--"];
        args.extend(self.cmd.iter().map(String::as_str));
        server.reset();
        let start = Instant::now();
        let children = (0..starts)
            .map(|_| {
                n.cmd(kof_store, &args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("starting kof-store run")
            })
            .collect::<Result<Vec<_>>>()?;
        let mut failed = Vec::new();
        for c in children {
            let out = c.wait_with_output()?;
            if !out.status.success() {
                failed.push(String::from_utf8_lossy(&out.stderr).trim().to_string());
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        // The background prefetch of the closure goes on after the runs: its bytes count too
        // (the question is whether anything crosses twice), so wait until the daemon is idle.
        let settled = wait_idle(&server);
        let s = server.stats();
        daemon.stop()?;
        server.shutdown();
        if !failed.is_empty() {
            bail!("{} of {starts} starts failed: {}", failed.len(), failed[0]);
        }
        settled?;
        Ok(Traffic {
            seconds,
            requests: s.requests,
            nar_requests: s.requests_by_kind.nar,
            bytes: s.bytes_sent,
            nar_bytes: s.bytes_by_kind.nar,
        })
    }

    /// Runs it.
    pub fn run(
        &self,
        fixtures: &Path,
        manifest: &Manifest,
        kof_store: &Path,
    ) -> Result<ConcurrentReport> {
        let (_, closure, closure_nar_bytes) = node::generation(manifest, &self.env, None)?;
        let one = self.side(fixtures, manifest, kof_store, 1)?;
        eprintln!(
            "  1 start: {:.2} s, {} NAR requests, {} NAR bytes",
            one.seconds, one.nar_requests, one.nar_bytes
        );
        let many = self.side(fixtures, manifest, kof_store, self.starts)?;
        eprintln!(
            "  {} starts: {:.2} s, {} NAR requests, {} NAR bytes",
            self.starts, many.seconds, many.nar_requests, many.nar_bytes
        );
        Ok(ConcurrentReport {
            env: self.env.clone(),
            cmd: self.cmd.clone(),
            flavour: self.flavour.clone(),
            paths: closure.len(),
            closure_nar_bytes,
            many_vs_closure: many.nar_bytes as f64 / closure_nar_bytes as f64,
            many_vs_one: many.nar_bytes as f64 / one.nar_bytes.max(1) as f64,
            one,
            many,
            starts: self.starts,
        })
    }
}

/// Waits until the server has answered nothing new for 2 s (at most 120 s).
fn wait_idle(server: &kof_fixtures::serve::ServerHandle) -> Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    let mut last = (server.stats().requests, server.stats().bytes_sent);
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let s = server.stats();
        let now = (s.requests, s.bytes_sent);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed().as_secs_f64() >= 2.0 {
            return Ok(());
        }
    }
    bail!("the node kept fetching for 120 s after the starts")
}
