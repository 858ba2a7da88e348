//! Lease ids: the name a caller gives the view it asks `kof-fetcherd` for. A lease id names a
//! file under `<store_dir>/leases/` and a directory of the FUSE mount, so it is kept to a safe
//! alphabet; the daemon, the shim and `kof-store run` all check ids with [`check_lease_id`].

use thiserror::Error;

/// Longest lease id.
pub const MAX_LEASE_LEN: usize = 128;

/// Why a lease id is refused.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("lease id {id:?} is invalid: {reason} (1 to 128 characters of A-Z a-z 0-9 . _ -, not starting with .)")]
pub struct BadLeaseId {
    /// The id as given (cut to a readable length).
    pub id: String,
    /// What is wrong.
    pub reason: &'static str,
}

/// Checks a lease id: it names a file and a view directory, so it is kept to a safe alphabet.
pub fn check_lease_id(id: &str) -> Result<(), BadLeaseId> {
    let bad = |reason| BadLeaseId {
        id: id.chars().take(160).collect(),
        reason,
    };
    if id.is_empty() {
        return Err(bad("empty"));
    }
    if id.len() > MAX_LEASE_LEN {
        return Err(bad("too long"));
    }
    if id.starts_with('.') {
        return Err(bad("starts with ."));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return Err(bad("has a character outside the allowed set"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ids_are_checked() {
        for ok in ["c1", "pod-abc_1.2", &"x".repeat(128)] {
            assert_eq!(check_lease_id(ok), Ok(()), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", "é", &"x".repeat(129)] {
            assert!(check_lease_id(bad).is_err(), "{bad}");
        }
    }
}
