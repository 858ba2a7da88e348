//! Recording the demand ranges ensured, per key, into learned [`Profile`]s.

use std::collections::HashSet;

use kof_nar::StorePath;

use super::LazyStore;
use crate::profile::Profile;

/// A recording of demand ranges.
pub(super) struct Recording {
    /// Only these paths, when set.
    only: Option<HashSet<StorePath>>,
    ranges: Vec<(StorePath, u64, u64)>,
}

impl LazyStore {
    /// Starts recording the demand ranges ensured from now on under `key` (replacing a
    /// recording of that key).
    pub fn start_recording(&self, key: &str) {
        self.start_recording_only(key, None);
    }

    /// Like [`LazyStore::start_recording`], recording only ranges of `paths` (an environment's
    /// closure), so concurrent environments do not mix.
    pub fn start_recording_only(&self, key: &str, paths: Option<Vec<StorePath>>) {
        self.recordings.lock().insert(
            key.to_string(),
            Recording {
                only: paths.map(|p| p.into_iter().collect()),
                ranges: Vec::new(),
            },
        );
    }

    /// Stops the recording of `key` and gives its profile (`None` if none was on).
    pub fn stop_recording(&self, key: &str) -> Option<Profile> {
        let rec = self.recordings.lock().remove(key)?;
        Some(Profile::from_ranges(key, rec.ranges))
    }

    pub(super) fn record(&self, path: &StorePath, start: u64, end: u64) {
        let mut recs = self.recordings.lock();
        for rec in recs.values_mut() {
            if rec.only.as_ref().is_none_or(|o| o.contains(path)) {
                rec.ranges.push((path.clone(), start, end));
            }
        }
    }
}
