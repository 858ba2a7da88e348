//! Prometheus metrics of the daemon: the counters it keeps itself, the text exposition format,
//! and the HTTP endpoint (`GET /metrics` on config `metrics_addr`).
//!
//! Why the exposition is written here rather than with a client library: most values live in
//! other components and are read at scrape time (the lazy engine's byte and fetch counters, the
//! FUSE server's per-operation latency histograms, fetched over its control socket). A client
//! library's registry keeps its own metric state, which would be a second copy to keep in sync;
//! what is needed is only the text format of snapshots, which is a few lines
//! (<https://prometheus.io/docs/instrumenting/exposition_formats/>).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The one histogram type of kof (`kof-metrics`), which the exposition writes.
pub use kof_metrics::{Histogram, HistogramSnapshot};

/// The requests the API serves, for the per-op counters.
pub const OPS: &[&str] = &[
    "prepare", "release", "prefetch", "resolve", "status", "ensure", "leases", "gc", "invalid",
];

/// The triggers of a collection, as labelled (`kof_gc_runs_total{trigger}`).
pub const GC_TRIGGERS: &[&str] = &["manual", "quota", "no-space"];

/// What the daemon's collections did (`kof_gc_*`).
#[derive(Debug)]
pub struct GcMetrics {
    runs: Vec<AtomicU64>,
    bytes_freed: AtomicU64,
    last_run: AtomicI64,
    /// How long each collection took.
    pub duration: Histogram,
}

impl Default for GcMetrics {
    fn default() -> Self {
        GcMetrics {
            runs: GC_TRIGGERS.iter().map(|_| AtomicU64::new(0)).collect(),
            bytes_freed: AtomicU64::new(0),
            last_run: AtomicI64::new(0),
            duration: Histogram::new(),
        }
    }
}

impl GcMetrics {
    /// Counts a run of `trigger` (one of [`GC_TRIGGERS`]) that freed `bytes` (store and derived
    /// data), ended at unix time `finished_at` and took `took`.
    pub fn run(&self, trigger: &str, bytes: u64, finished_at: i64, took: Duration) {
        if let Some(i) = GC_TRIGGERS.iter().position(|t| *t == trigger) {
            self.runs[i].fetch_add(1, Ordering::Relaxed);
        }
        self.bytes_freed.fetch_add(bytes, Ordering::Relaxed);
        self.last_run.store(finished_at, Ordering::Relaxed);
        self.duration.observe(took);
    }

    /// Writes the `kof_gc_*` families.
    pub fn encode(&self, out: &mut Exposition) {
        out.header(
            "kof_gc_runs_total",
            "counter",
            "Garbage collections run by this daemon, by trigger (manual, quota, no-space).",
        );
        for (i, t) in GC_TRIGGERS.iter().enumerate() {
            out.sample(
                "kof_gc_runs_total",
                &[("trigger", t)],
                self.runs[i].load(Ordering::Relaxed) as f64,
            );
        }
        out.header(
            "kof_gc_bytes_freed_total",
            "counter",
            "Bytes garbage collections freed (objects, temporary files and derived data).",
        );
        out.sample(
            "kof_gc_bytes_freed_total",
            &[],
            self.bytes_freed.load(Ordering::Relaxed) as f64,
        );
        out.header(
            "kof_gc_last_run_timestamp_seconds",
            "gauge",
            "Unix time the last garbage collection ended (0: none yet).",
        );
        out.sample(
            "kof_gc_last_run_timestamp_seconds",
            &[],
            self.last_run.load(Ordering::Relaxed) as f64,
        );
        out.histogram(
            "kof_gc_duration_seconds",
            "Time a garbage collection took.",
            &[],
            &self.duration.snapshot(),
        );
    }
}

/// Counters the daemon keeps itself.
#[derive(Debug)]
pub struct DaemonMetrics {
    requests: Vec<AtomicU64>,
    errors: Vec<AtomicU64>,
    /// How long `ensure` requests (demand reads from the FUSE server) waited for their bytes.
    pub ensure_latency: Histogram,
    /// `ensure` requests being served now.
    pub ensure_in_flight: AtomicI64,
    /// How long `prepare` took.
    pub prepare_latency: Histogram,
    /// Garbage collections.
    pub gc: GcMetrics,
}

impl Default for DaemonMetrics {
    fn default() -> Self {
        DaemonMetrics {
            requests: OPS.iter().map(|_| AtomicU64::new(0)).collect(),
            errors: OPS.iter().map(|_| AtomicU64::new(0)).collect(),
            ensure_latency: Histogram::new(),
            ensure_in_flight: AtomicI64::new(0),
            prepare_latency: Histogram::new(),
            gc: GcMetrics::default(),
        }
    }
}

impl DaemonMetrics {
    fn index(op: &str) -> usize {
        OPS.iter().position(|o| *o == op).unwrap_or(OPS.len() - 1)
    }

    /// Counts a request of `op` and whether it failed.
    pub fn request(&self, op: &str, failed: bool) {
        let i = Self::index(op);
        self.requests[i].fetch_add(1, Ordering::Relaxed);
        if failed {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes the daemon's own metrics.
    pub fn encode(&self, out: &mut Exposition) {
        out.header(
            "kof_api_requests_total",
            "counter",
            "API requests served, by op.",
        );
        for (i, op) in OPS.iter().enumerate() {
            out.sample(
                "kof_api_requests_total",
                &[("op", op)],
                self.requests[i].load(Ordering::Relaxed) as f64,
            );
        }
        out.header(
            "kof_api_errors_total",
            "counter",
            "API requests that failed, by op.",
        );
        for (i, op) in OPS.iter().enumerate() {
            out.sample(
                "kof_api_errors_total",
                &[("op", op)],
                self.errors[i].load(Ordering::Relaxed) as f64,
            );
        }
        out.header(
            "kof_ensure_in_flight",
            "gauge",
            "Demand reads (ensure requests) waiting for their bytes now.",
        );
        out.sample(
            "kof_ensure_in_flight",
            &[],
            self.ensure_in_flight.load(Ordering::Relaxed) as f64,
        );
        out.histogram(
            "kof_ensure_seconds",
            "Time a demand read (ensure request) waited for its bytes.",
            &[],
            &self.ensure_latency.snapshot(),
        );
        out.histogram(
            "kof_prepare_seconds",
            "Time to prepare a view (resolve, closure metadata, view).",
            &[],
            &self.prepare_latency.snapshot(),
        );
        self.gc.encode(out);
    }
}

/// A Prometheus text exposition being written.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else {
        format!("{v}")
    }
}

impl Exposition {
    /// `# HELP` and `# TYPE` of a metric family (write once per family, before its samples).
    pub fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", help.replace('\n', " "));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// One sample.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", number(value));
    }

    /// A whole histogram family with one label set.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        h: &HistogramSnapshot,
    ) {
        self.header(name, "histogram", help);
        self.histogram_samples(name, labels, h);
    }

    /// A histogram's samples (for families with several label sets: write the header once).
    pub fn histogram_samples(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        h: &HistogramSnapshot,
    ) {
        let bucket = format!("{name}_bucket");
        for (le, c) in &h.buckets {
            let le = number(*le);
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&bucket, &l, *c as f64);
        }
        let mut l = labels.to_vec();
        l.push(("le", "+Inf"));
        self.sample(&bucket, &l, h.count as f64);
        self.sample(&format!("{name}_sum"), labels, h.sum);
        self.sample(&format!("{name}_count"), labels, h.count as f64);
    }

    /// The text.
    pub fn finish(self) -> String {
        self.text
    }
}

/// Serves `GET /metrics` on `addr` with the text `render` produces (run on a blocking thread:
/// it may ask the FUSE server over its socket), until the task is dropped. Returns once the
/// listener is bound, with the bound address.
pub async fn serve(
    addr: &str,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Request, Response, StatusCode};

    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %kof_node_api::report::chain(&e), "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let render = render.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<_>| {
                    let render = render.clone();
                    async move {
                        let resp = if req.uri().path() == "/metrics" {
                            let text = tokio::task::spawn_blocking(move || render())
                                .await
                                .unwrap_or_else(|e| format!("# render failed: {e}\n"));
                            Response::builder()
                                .header("content-type", "text/plain; version=0.0.4")
                                .body(Full::new(Bytes::from(text)))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"not found; try /metrics\n")))
                        };
                        Ok::<_, Infallible>(resp.expect("a static response is valid"))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!(error = %kof_node_api::report::chain(&e), "metrics connection ended");
                }
            });
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_counted() {
        let h = Histogram::new();
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(5));
        let s = h.snapshot();
        // The one set of buckets (kof-metrics'): the counts at three of its bounds.
        let at = |le: f64| s.buckets.iter().find(|(b, _)| *b == le).unwrap().1;
        assert_eq!([at(0.01), at(0.1), at(1.0)], [1, 3, 3]);
        assert_eq!(s.count, 4);
        assert!((s.sum - 5.105).abs() < 1e-9, "{}", s.sum);
        let mut e = Exposition::default();
        e.histogram("x_seconds", "X.", &[("op", "read")], &s);
        let text = e.finish();
        assert!(
            text.contains("x_seconds_bucket{op=\"read\",le=\"0.1\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{op=\"read\",le=\"+Inf\"} 4\n"),
            "{text}"
        );
        assert!(text.contains("x_seconds_count{op=\"read\"} 4\n"), "{text}");
        assert!(text.contains("# TYPE x_seconds histogram\n"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut e = Exposition::default();
        e.sample("m", &[("path", "a\"b\\c\nd")], 1.0);
        assert_eq!(e.finish(), "m{path=\"a\\\"b\\\\c\\nd\"} 1\n");
    }
}
