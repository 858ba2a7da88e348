//! Latency statistics of FUSE operations: per operation one [`kof_metrics::Histogram`] (a
//! count, a sum and cumulative buckets over [`kof_metrics::LATENCY_BUCKETS`], the buckets of
//! every kof histogram), recorded lock-free by the worker threads and snapshot for `/metrics`.

use std::collections::BTreeMap;
use std::time::Instant;

use kof_metrics::{Histogram, HistogramSnapshot};

/// A snapshot of the operation statistics of one mount.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OpStats {
    /// By operation name: `lookup`, `getattr`, `readdir`, `open`, `read`, `readlink`.
    pub ops: BTreeMap<&'static str, OpStat>,
}

/// The statistics of one operation: its latency histogram's value (`count`, `sum` in seconds,
/// and cumulative `buckets` without `+Inf`, whose count is `count`).
pub type OpStat = HistogramSnapshot;

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

/// The live histograms, shared by the worker threads.
#[derive(Default)]
pub(crate) struct OpRecorder {
    ops: [Histogram; Op::ALL.len()],
}

impl OpRecorder {
    /// Starts timing one operation; the time is recorded when the guard drops.
    pub(crate) fn start(&self, op: Op) -> OpTimer<'_> {
        OpTimer {
            histogram: &self.ops[op as usize],
            started: Instant::now(),
        }
    }

    pub(crate) fn snapshot(&self) -> OpStats {
        let ops = Op::ALL
            .iter()
            .map(|&op| (op.name(), self.ops[op as usize].snapshot()))
            .collect();
        OpStats { ops }
    }
}

/// Records the elapsed time of one operation when dropped.
pub(crate) struct OpTimer<'a> {
    histogram: &'a Histogram,
    started: Instant,
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kof_metrics::LATENCY_BUCKETS;

    #[test]
    fn snapshot_is_cumulative_and_counts_every_operation() {
        let rec = OpRecorder::default();
        for _ in 0..3 {
            drop(rec.start(Op::Read));
        }
        let stats = rec.snapshot();
        let read = &stats.ops["read"];
        assert_eq!(read.count, 3);
        assert_eq!(read.buckets.len(), LATENCY_BUCKETS.len());
        assert_eq!(*read.buckets.last().unwrap(), (60.0, 3));
        assert!(read
            .buckets
            .windows(2)
            .all(|w| w[0].1 <= w[1].1 && w[0].0 < w[1].0));
        assert_eq!(stats.ops["lookup"].count, 0);
        assert_eq!(stats.ops.len(), 6);
    }
}
