//! The lazy engine's counters, for `/metrics`: bytes and requests by [`Cause`], local hits,
//! fetches in flight, paths completed or refused, and a fetch latency histogram (kof-metrics'
//! one [`Histogram`], so its buckets are every other histogram's).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use kof_metrics::{Histogram, HistogramSnapshot};
use serde::{Deserialize, Serialize};

use super::Cause;

/// One value per [`Cause`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByCause {
    /// Reads waiting for their bytes.
    pub demand: u64,
    /// Background fetch of a closure.
    pub prefetch: u64,
    /// Ranges of a learned profile.
    pub profile: u64,
}

impl ByCause {
    /// The value of `cause`.
    pub fn get(&self, cause: Cause) -> u64 {
        match cause {
            Cause::Demand => self.demand,
            Cause::Prefetch => self.prefetch,
            Cause::Profile => self.profile,
        }
    }

    /// The sum over every cause.
    pub fn total(&self) -> u64 {
        self.demand + self.prefetch + self.profile
    }
}

/// A snapshot of the engine's counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LazyCounters {
    /// Bytes received from caches (range bodies; for a streamed path, its file as downloaded).
    pub bytes_fetched: ByCause,
    /// Requests sent for NAR bytes (one per range GET or streamed path).
    pub requests: ByCause,
    /// Ensures answered without any fetch (path stored, or its bytes already local).
    pub local_hits: u64,
    /// Fetches (range GETs and streams) in flight now.
    pub in_flight: i64,
    /// Prefetch fetches waiting for a prefetch slot now.
    pub prefetch_queued: i64,
    /// Paths completed into the store by the engine.
    pub paths_completed: u64,
    /// Paths refused (fetched bytes failed verification, or a listing lied).
    pub paths_refused: u64,
    /// Indexes refused (bad signature, untrusted key, another NAR, malformed): their paths
    /// were read whole instead.
    pub indexes_refused: u64,
    /// Ensures that failed or timed out.
    pub ensure_failures: u64,
    /// Prefetch GETs stopped early to leave the link to demand reads.
    #[serde(default)]
    pub prefetch_yields: u64,
    /// Duration of each fetch (range GET from request to last byte; streamed path to commit).
    pub fetch_latency: HistogramSnapshot,
}

/// The live counters.
#[derive(Debug)]
pub(crate) struct Counters {
    bytes: [AtomicU64; 3],
    requests: [AtomicU64; 3],
    local_hits: AtomicU64,
    in_flight: AtomicI64,
    queued: AtomicI64,
    completed: AtomicU64,
    refused: AtomicU64,
    indexes_refused: AtomicU64,
    failures: AtomicU64,
    yields: AtomicU64,
    latency: Histogram,
}

fn slot(cause: Cause) -> usize {
    match cause {
        Cause::Demand => 0,
        Cause::Prefetch => 1,
        Cause::Profile => 2,
    }
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            bytes: Default::default(),
            requests: Default::default(),
            local_hits: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            queued: AtomicI64::new(0),
            completed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            indexes_refused: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            yields: AtomicU64::new(0),
            latency: Histogram::new(),
        }
    }
}

/// Counts one fetch in flight while alive.
pub(crate) struct InFlight<'a>(&'a Counters);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one prefetch waiting for a slot while alive.
pub(crate) struct Queued<'a>(&'a Counters);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Counters {
    pub(crate) fn queued(&self) -> Queued<'_> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        Queued(self)
    }

    pub(crate) fn bytes(&self, cause: Cause, n: u64) {
        self.bytes[slot(cause)].fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a request of `cause` and holds it in flight until the guard drops.
    pub(crate) fn request(&self, cause: Cause) -> InFlight<'_> {
        self.requests[slot(cause)].fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    pub(crate) fn local_hit(&self) {
        self.local_hits.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn completed(&self) {
        self.completed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn index_refused(&self) {
        self.indexes_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn prefetch_yield(&self) {
        self.yields.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn latency(&self, d: Duration) {
        self.latency.observe(d);
    }

    pub(crate) fn snapshot(&self) -> LazyCounters {
        let by = |a: &[AtomicU64; 3]| ByCause {
            demand: a[0].load(Ordering::Relaxed),
            prefetch: a[1].load(Ordering::Relaxed),
            profile: a[2].load(Ordering::Relaxed),
        };
        LazyCounters {
            bytes_fetched: by(&self.bytes),
            requests: by(&self.requests),
            local_hits: self.local_hits.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            prefetch_queued: self.queued.load(Ordering::Relaxed),
            paths_completed: self.completed.load(Ordering::Relaxed),
            paths_refused: self.refused.load(Ordering::Relaxed),
            indexes_refused: self.indexes_refused.load(Ordering::Relaxed),
            ensure_failures: self.failures.load(Ordering::Relaxed),
            prefetch_yields: self.yields.load(Ordering::Relaxed),
            fetch_latency: self.latency.snapshot(),
        }
    }
}
