//! Latency statistics of FUSE operations: per operation a count, a sum and a Prometheus-style
//! cumulative histogram, recorded lock-free by the worker threads and snapshot for `/metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Upper bounds (seconds) of the latency histogram buckets, before the final `+Inf` one.
const BOUNDS: [f64; 20] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// A snapshot of the operation statistics of one mount.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OpStats {
    /// By operation name: `lookup`, `getattr`, `readdir`, `open`, `read`, `readlink`.
    pub ops: BTreeMap<&'static str, OpStat>,
}

/// The statistics of one operation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OpStat {
    /// How many were answered.
    pub count: u64,
    /// Their total latency.
    pub sum_seconds: f64,
    /// `(le, cumulative count)` pairs, ascending; the last one is `(f64::INFINITY, count)`.
    pub buckets: Vec<(f64, u64)>,
}

/// The operations measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Lookup,
    Getattr,
    Readdir,
    Open,
    Read,
    Readlink,
}

impl Op {
    const ALL: [Op; 6] = [
        Op::Lookup,
        Op::Getattr,
        Op::Readdir,
        Op::Open,
        Op::Read,
        Op::Readlink,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Getattr => "getattr",
            Op::Readdir => "readdir",
            Op::Open => "open",
            Op::Read => "read",
            Op::Readlink => "readlink",
        }
    }
}

#[derive(Default)]
struct Counters {
    sum_nanos: AtomicU64,
    /// Per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; BOUNDS.len() + 1],
}

/// The live counters, shared by the worker threads.
#[derive(Default)]
pub(crate) struct OpRecorder {
    ops: [Counters; Op::ALL.len()],
}

impl OpRecorder {
    /// Starts timing one operation; the time is recorded when the guard drops.
    pub(crate) fn start(&self, op: Op) -> OpTimer<'_> {
        OpTimer {
            counters: &self.ops[op as usize],
            started: Instant::now(),
        }
    }

    pub(crate) fn snapshot(&self) -> OpStats {
        let ops = Op::ALL
            .iter()
            .map(|&op| {
                let c = &self.ops[op as usize];
                let mut cumulative = 0;
                let buckets = BOUNDS
                    .iter()
                    .copied()
                    .chain(std::iter::once(f64::INFINITY))
                    .zip(&c.buckets)
                    .map(|(le, n)| {
                        cumulative += n.load(Ordering::Relaxed);
                        (le, cumulative)
                    })
                    .collect();
                let stat = OpStat {
                    // The +Inf bucket is the count, so the snapshot is self-consistent even while
                    // workers record.
                    count: cumulative,
                    sum_seconds: c.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
                    buckets,
                };
                (op.name(), stat)
            })
            .collect();
        OpStats { ops }
    }
}

/// Records the elapsed time of one operation when dropped.
pub(crate) struct OpTimer<'a> {
    counters: &'a Counters,
    started: Instant,
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let seconds = elapsed.as_secs_f64();
        let bucket = BOUNDS
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(BOUNDS.len());
        let c = self.counters;
        c.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        c.sum_nanos.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_is_cumulative_and_ends_with_inf() {
        let rec = OpRecorder::default();
        for _ in 0..3 {
            drop(rec.start(Op::Read));
        }
        let stats = rec.snapshot();
        let read = &stats.ops["read"];
        assert_eq!(read.count, 3);
        assert_eq!(read.buckets.len(), BOUNDS.len() + 1);
        assert_eq!(*read.buckets.last().unwrap(), (f64::INFINITY, 3));
        assert!(read
            .buckets
            .windows(2)
            .all(|w| w[0].1 <= w[1].1 && w[0].0 < w[1].0));
        assert_eq!(stats.ops["lookup"].count, 0);
        assert_eq!(stats.ops.len(), 6);
    }
}
