//! The latency histogram every kof component records with: the FUSE server's operations, the
//! lazy engine's fetches, the daemon's `ensure` and `prepare`.
//!
//! One type, one set of buckets ([`LATENCY_BUCKETS`], 10 µs to 60 s), so every histogram of a
//! node's `/metrics` can be compared with every other. [`Histogram`] records lock-free from any
//! thread; [`HistogramSnapshot`] is its value, Prometheus-style (cumulative counts per upper
//! bound), serialisable so it can cross a socket (the FUSE server sends its snapshots to the
//! daemon).
//!
//! This crate never writes the exposition format or serves HTTP: `kof-fetcherd` does. It is
//! written here rather than taken from a metrics client library because the values live in
//! different processes and are read at scrape time: a library's registry would be a second
//! copy of the state.

#![deny(missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds (seconds) of the buckets, before `+Inf`: from a page-cache hit through FUSE
/// (tens of µs) to a read waiting for the network's bound (60 s).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A histogram of durations over [`LATENCY_BUCKETS`], recorded lock-free.
#[derive(Debug)]
pub struct Histogram {
    /// Per bucket (not cumulative), plus one for `+Inf`.
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: (0..=LATENCY_BUCKETS.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Histogram {
        Histogram::default()
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Its value now, with cumulative buckets. The count is the `+Inf` bucket's, so a snapshot
    /// taken while other threads record is consistent with itself.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut acc = 0;
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len());
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            acc += self.counts[i].load(Ordering::Relaxed);
            buckets.push((*b, acc));
        }
        acc += self.counts[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        HistogramSnapshot {
            buckets,
            count: acc,
            sum: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// A histogram's value: cumulative counts per upper bound (seconds), Prometheus-style.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    /// `(le, observations <= le)`, increasing; `+Inf` is `count`.
    pub buckets: Vec<(f64, u64)>,
    /// Observations.
    pub count: u64,
    /// Their sum, seconds. (`sum_seconds` is how a FUSE server of an earlier release names it
    /// on its control socket: the FUSE server outlives daemon upgrades.)
    #[serde(alias = "sum_seconds")]
    pub sum: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_cumulative_buckets() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(5));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(120));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets.len(), LATENCY_BUCKETS.len());
        assert_eq!(s.buckets[0], (0.000_01, 1));
        let at = |le: f64| s.buckets.iter().find(|(b, _)| *b == le).unwrap().1;
        assert_eq!(at(0.0025), 1);
        assert_eq!(at(0.005), 2);
        assert_eq!(at(60.0), 2, "120 s is only in +Inf");
        assert!((s.sum - 120.003_005).abs() < 1e-6, "{}", s.sum);
    }

    #[test]
    fn a_snapshot_of_an_earlier_fuse_server_still_reads() {
        let old = r#"{"count":2,"sum_seconds":0.5,"buckets":[[0.001,1],[60.0,2]]}"#;
        let s: HistogramSnapshot = serde_json::from_str(old).unwrap();
        assert_eq!((s.count, s.sum), (2, 0.5));
        assert_eq!(s.buckets, vec![(0.001, 1), (60.0, 2)]);
    }
}
