//! The containerd releases the end-to-end tests run against (issue 12's test matrix): Debian 12's
//! own containerd 1.6 in `/usr/bin` ([`Release::Bookworm`]), and the newer releases
//! `scripts/fetch-containerd.sh` unpacks from Debian's archive without installing them: trixie's
//! 1.7 ([`Release::Trixie`]) and sid's 2.x ([`Release::Sid`]), under
//! `target/containerd/<suite>/root/usr/bin`, each with a `VERSION` stamp written once its
//! binaries are in place. Every release runs Debian 12's runc (`/usr/sbin/runc`): the newer
//! suites' runc needs a newer glibc than this machine has.
//!
//! [`releases_to_test`] lists the releases a test should run against: all of them, narrowed by
//! `KOF_CONTAINERD_RELEASES` (a comma list of release names), less those that are not there,
//! each of which it reports loudly on stderr (once per process) with how to get it.
//! [`crate::for_each_release!`] makes one test per release from one test body.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

/// Narrows [`releases_to_test`]: a comma list of release names (`bookworm,trixie,sid`).
pub const RELEASES_ENV: &str = "KOF_CONTAINERD_RELEASES";
/// Where `scripts/fetch-containerd.sh` unpacks the fetched releases, when not
/// `<workspace>/target/containerd` (the script reads the same variable).
pub const CONTAINERD_DIR_ENV: &str = "KOF_CONTAINERD_DIR";

/// One containerd release of the test matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Release {
    /// Debian 12's containerd 1.6.20: the system's `/usr/bin/containerd` (apt `containerd`).
    Bookworm,
    /// Debian trixie's containerd 1.7.x, fetched into `target/containerd/trixie`.
    Trixie,
    /// Debian sid's containerd 2.x, fetched into `target/containerd/sid`.
    Sid,
}

/// The configuration file form a release reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigForm {
    /// `version = 2`, CRI in one plugin, `plugins."io.containerd.grpc.v1.cri"` (1.6 and 1.7).
    V2,
    /// `version = 3`, CRI split into `io.containerd.cri.v1.runtime` and
    /// `io.containerd.cri.v1.images` (2.x).
    V3,
}

/// A release name [`Release::from_str`] does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown containerd release {name:?} (known: bookworm, trixie, sid)")]
pub struct UnknownRelease {
    /// the name given
    pub name: String,
}

impl Release {
    /// Every release, oldest first.
    pub const ALL: [Release; 3] = [Release::Bookworm, Release::Trixie, Release::Sid];

    /// The Debian suite name, which is also the release's name here.
    pub fn name(self) -> &'static str {
        match self {
            Release::Bookworm => "bookworm",
            Release::Trixie => "trixie",
            Release::Sid => "sid",
        }
    }

    /// Whether it comes from `scripts/fetch-containerd.sh` (not from the system).
    pub fn is_fetched(self) -> bool {
        self != Release::Bookworm
    }

    /// The fetched release's directory: `target/containerd/<suite>` (or under
    /// `$KOF_CONTAINERD_DIR`). `None` for the system's release.
    pub fn fetch_dir(self) -> Option<PathBuf> {
        self.is_fetched()
            .then(|| containerd_dir().join(self.name()))
    }

    /// The directory holding its `containerd`, `ctr` and `containerd-shim-runc-v2`; put first
    /// on containerd's `PATH` so containerd starts this release's shim.
    pub fn bin_dir(self) -> PathBuf {
        match self.fetch_dir() {
            Some(dir) => dir.join("root/usr/bin"),
            None => PathBuf::from("/usr/bin"),
        }
    }

    /// Its `containerd` binary.
    pub fn containerd(self) -> PathBuf {
        self.bin_dir().join("containerd")
    }

    /// Its `ctr` binary.
    pub fn ctr(self) -> PathBuf {
        self.bin_dir().join("ctr")
    }

    /// Its `containerd-shim-runc-v2` binary.
    pub fn runc_shim(self) -> PathBuf {
        self.bin_dir().join("containerd-shim-runc-v2")
    }

    /// The Debian package version (`1.6.20~ds1-1+deb12u3`, `2.1.9+ds1-5`): the fetched
    /// release's `VERSION` stamp, or the installed `containerd` package's. `None` when it is
    /// not there.
    pub fn version(self) -> Option<String> {
        let version = match self.fetch_dir() {
            Some(dir) => std::fs::read_to_string(dir.join("VERSION")).ok()?,
            None => {
                let out = Command::new("dpkg-query")
                    .args(["-W", "-f=${Version}", "containerd"])
                    .output()
                    .ok()?;
                if !out.status.success() {
                    return None;
                }
                String::from_utf8(out.stdout).ok()?
            }
        };
        let version = version.trim();
        (!version.is_empty()).then(|| version.to_owned())
    }

    /// Whether its binaries are there: for a fetched release, its `VERSION` stamp (written
    /// last by the fetch) and the three binaries.
    pub fn is_available(self) -> bool {
        let bins = [self.containerd(), self.ctr(), self.runc_shim()];
        let stamped = match self.fetch_dir() {
            Some(dir) => dir.join("VERSION").is_file(),
            None => true,
        };
        stamped && bins.iter().all(|b| is_executable(b))
    }

    /// The configuration form it reads: [`ConfigForm::V3`] from containerd 2 on, by the
    /// version when known (a later sid may carry a later 2.x), else by the suite.
    pub fn config_form(self) -> ConfigForm {
        let major = self
            .version()
            .and_then(|v| v.split(['.', ':']).next()?.parse::<u32>().ok());
        match major {
            Some(m) if m >= 2 => ConfigForm::V3,
            Some(_) => ConfigForm::V2,
            None if self == Release::Sid => ConfigForm::V3,
            None => ConfigForm::V2,
        }
    }

    /// How to make it available, for skip messages.
    pub fn how_to_get(self) -> &'static str {
        match self {
            Release::Bookworm => "apt-get install containerd runc",
            Release::Trixie => "scripts/fetch-containerd.sh trixie",
            Release::Sid => "scripts/fetch-containerd.sh sid",
        }
    }
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Release {
    type Err = UnknownRelease;

    fn from_str(s: &str) -> Result<Release, UnknownRelease> {
        Release::ALL
            .into_iter()
            .find(|r| r.name() == s.trim())
            .ok_or_else(|| UnknownRelease { name: s.to_owned() })
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `$KOF_CONTAINERD_DIR`, else `target/containerd` of this workspace.
fn containerd_dir() -> PathBuf {
    match std::env::var_os(CONTAINERD_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new("."))
            .join("target/containerd"),
    }
}

/// The releases `$KOF_CONTAINERD_RELEASES` names (all of them when it is unset or empty).
pub fn selected_releases() -> Result<Vec<Release>, UnknownRelease> {
    let list = std::env::var(RELEASES_ENV).unwrap_or_default();
    if list.trim().is_empty() {
        return Ok(Release::ALL.to_vec());
    }
    let mut releases = list
        .split(',')
        .filter(|n| !n.trim().is_empty())
        .map(Release::from_str)
        .collect::<Result<Vec<_>, _>>()?;
    releases.sort();
    releases.dedup();
    Ok(releases)
}

/// The releases to run a test against: [`selected_releases`] that are available. Each selected
/// release that is not is left out and reported on stderr, loudly, once per process (written
/// straight to the stderr stream, so the test harness's output capture does not hide it).
pub fn releases_to_test() -> Result<Vec<Release>, UnknownRelease> {
    Ok(selected_releases()?
        .into_iter()
        .filter(|r| {
            let available = r.is_available();
            if !available {
                report_missing(*r);
            }
            available
        })
        .collect())
}

/// Whether a test should run against `release`: selected and available (a missing one is
/// reported as [`releases_to_test`] does).
pub fn should_test(release: Release) -> Result<bool, UnknownRelease> {
    Ok(selected_releases()?.contains(&release) && {
        let available = release.is_available();
        if !available {
            report_missing(release);
        }
        available
    })
}

fn report_missing(release: Release) {
    static REPORTED: [AtomicBool; 3] = [
        AtomicBool::new(false),
        AtomicBool::new(false),
        AtomicBool::new(false),
    ];
    let i = Release::ALL.iter().position(|r| *r == release).unwrap_or(0);
    if REPORTED[i].swap(true, Ordering::Relaxed) {
        return;
    }
    let where_ = match release.fetch_dir() {
        Some(dir) => format!("no {}", dir.join("VERSION").display()),
        None => format!("no {}", release.containerd().display()),
    };
    let bar = "#".repeat(88);
    let _ = writeln!(
        std::io::stderr(),
        "{bar}\n## containerd {release} is not available ({where_}):\n\
         ## the tests against containerd {release} are SKIPPED.\n\
         ## Get it with: {how}\n{bar}",
        how = release.how_to_get(),
    );
}

/// Makes one `#[test]` per containerd release for each named test body (a
/// `fn NAME(release: Release)` in the same module), in modules named after the releases
/// (`bookworm::NAME`, `trixie::NAME`, `sid::NAME`), so each release passes or fails on its own.
/// Each runs only when [`should_test`] says so (a missing release is reported loudly and its
/// tests return at once).
///
/// ```ignore
/// kof_harness::for_each_release!(ctr_runs_a_container, cri_runs_a_pod);
///
/// fn ctr_runs_a_container(release: Release) {
///     let ctrd = Containerd::start(ContainerdOptions { release, ..Default::default() }).unwrap();
/// }
/// ```
#[macro_export]
macro_rules! for_each_release {
    ($($name:ident),* $(,)?) => {
        $crate::for_each_release!(@module bookworm Bookworm; $($name)*);
        $crate::for_each_release!(@module trixie Trixie; $($name)*);
        $crate::for_each_release!(@module sid Sid; $($name)*);
    };
    (@module $module:ident $variant:ident; $($name:ident)*) => {
        mod $module {
            $(
                #[test]
                fn $name() {
                    let release = $crate::release::Release::$variant;
                    if $crate::release::should_test(release)
                        .unwrap_or_else(|e| panic!("{e}"))
                    {
                        super::$name(release)
                    }
                }
            )*
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for r in Release::ALL {
            assert_eq!(r.name().parse::<Release>().unwrap(), r);
        }
        assert!("buster".parse::<Release>().is_err());
    }

    #[test]
    fn bookworm_is_the_system_release() {
        assert_eq!(Release::Bookworm.bin_dir(), Path::new("/usr/bin"));
        assert_eq!(Release::Bookworm.config_form(), ConfigForm::V2);
        assert!(Release::Sid
            .bin_dir()
            .ends_with("target/containerd/sid/root/usr/bin"));
    }
}
