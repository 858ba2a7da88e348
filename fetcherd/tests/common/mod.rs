//! What the daemon's integration tests share: a node of the shared scaffold running this
//! package's own `kof-fetcherd`, and its metrics endpoint read over HTTP.
#![allow(dead_code)]

use std::io::{Read, Write};

/// How a [`Node`] of these tests is set up (the scaffold's other options at their defaults).
pub struct NodeOptions {
    pub flavour: &'static str,
    pub bandwidth: Option<u64>,
    pub prefetch: &'static str,
    pub metrics_port: Option<u16>,
    pub extra_config: String,
    /// Prefix of the node's temporary directory.
    pub prefix: &'static str,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            flavour: "zstd",
            bandwidth: None,
            prefetch: "none",
            metrics_port: None,
            extra_config: String::new(),
            prefix: "kof-fetcherd-test",
        }
    }
}

/// A node of these tests: the shared scaffold with this package's own `kof-fetcherd`.
pub struct Node(kof_testkit::Node);

impl std::ops::Deref for Node {
    type Target = kof_testkit::Node;
    fn deref(&self) -> &kof_testkit::Node {
        &self.0
    }
}

impl std::ops::DerefMut for Node {
    fn deref_mut(&mut self) -> &mut kof_testkit::Node {
        &mut self.0
    }
}

impl Node {
    pub fn new(opts: NodeOptions) -> Node {
        Node(kof_testkit::Node::new(kof_testkit::NodeOptions {
            flavour: opts.flavour,
            bandwidth: opts.bandwidth,
            prefetch: Some(opts.prefetch),
            metrics_port: opts.metrics_port,
            extra_config: opts.extra_config,
            fetcherd: Some(env!("CARGO_BIN_EXE_kof-fetcherd").into()),
            prefix: opts.prefix,
            ..kof_testkit::NodeOptions::default()
        }))
    }

    /// The FUSE server's pid, from its control socket.
    pub fn fuse_pid(&self) -> Option<u32> {
        kof_fetcherd::daemon::control::ControlClient::connect(&self.control())
            .and_then(|mut c| c.ping())
            .ok()
            .map(|i| i.pid)
    }
}

/// A free TCP port on 127.0.0.1 (for a node's metrics endpoint).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The whole HTTP response of `GET /metrics` on 127.0.0.1:`port`, which must be a 200.
pub fn metrics(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of the sample `series` (its name and labels, as exposed) in metrics `text`.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the metrics:\n{text}"))
}
