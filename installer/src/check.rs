//! Checking a new containerd config with the node's own containerd before it replaces the old
//! one.
//!
//! The new text is written beside the config (`config.toml.kof-check`, in the same directory,
//! so relative `imports` resolve as they will for the real file) and the node's containerd is
//! asked to load it: `containerd --config FILE config dump`. That catches what containerd's
//! config loader refuses (TOML it cannot read, a version it does not know, imports it cannot
//! find or parse). It does not start any plugin, so it cannot see the CRI plugin's own refusals;
//! the dump is therefore read as well, for the ones that matter to kof. The dump is the config
//! containerd would run with: imports merged the way this release merges them, the file migrated
//! to the release's version, defaults filled in. In it:
//!
//! - the CRI plugin must not be disabled (`disabled_plugins`);
//! - the `flox` runtime must be there with the `runtime_type` kof wrote (a drop-in imported after
//!   the file can replace the whole CRI section on containerd 1.x, taking it away);
//! - the default runtime (`default_runtime_name`) must have a table, or containerd 1.6 and 1.7
//!   refuse to load the CRI plugin and the node runs no pod.
//!
//! What neither sees is left to the wait for CRI after the restart ([`crate::cri`]), which rolls
//! the config back when CRI does not come up with the flox runtime.

use std::path::PathBuf;
use std::process::Command;

use thiserror::Error;
use toml_edit::{DocumentMut, Item};

use crate::containerd_config::{ConfigVersion, DEFAULT_RUNTIME_NAME, RUNTIME_NAME};

/// The suffix of the file checked beside containerd's config.
pub const CHECK_SUFFIX: &str = ".kof-check";

/// Why the node's containerd refused a new config.
#[derive(Debug, Error)]
pub enum CheckError {
    /// The check command could not be started.
    #[error("checking the new containerd config: cannot run {command}")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        source: std::io::Error,
    },
    /// containerd could not load the config: its output is its answer.
    #[error("the node's containerd refuses the new config: {command} failed ({status}): {output}")]
    Refused {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its stderr (and stdout), on one line.
        output: String,
    },
    /// containerd loads it, but what it would run with is wrong for kof.
    #[error("checked with {command}: containerd loads the new config, but {problem}")]
    Dump {
        /// The command line.
        command: String,
        /// What is wrong.
        problem: String,
    },
}

/// The check command for `candidate` (a host path, and the same file as this process sees it):
/// `{host_path}` and `{path}` in `template` replaced.
pub fn command_for(template: &[String], host_path: &str, path: &str) -> Vec<String> {
    template
        .iter()
        .map(|w| w.replace("{host_path}", host_path).replace("{path}", path))
        .collect()
}

/// Runs `argv` (the check command for the candidate) and checks containerd's dump of it: see the
/// module doc. `flox_type` is the `runtime_type` the flox runtime must have.
pub fn check(argv: &[String], flox_type: &str) -> Result<(), CheckError> {
    let command = argv.join(" ");
    let Some((program, args)) = argv.split_first() else {
        return Err(CheckError::Spawn {
            command,
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
        });
    };
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| CheckError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        let mut output = String::from_utf8_lossy(&out.stderr).into_owned();
        output.push(' ');
        output.push_str(&String::from_utf8_lossy(&out.stdout));
        let output = output.split_whitespace().collect::<Vec<_>>().join(" ");
        return Err(CheckError::Refused {
            command,
            status: out.status,
            output: if output.is_empty() {
                "no output".to_string()
            } else {
                output
            },
        });
    }
    let dump = String::from_utf8_lossy(&out.stdout);
    dump_problem(&dump, flox_type)
        .map_or(Ok(()), |problem| Err(CheckError::Dump { command, problem }))
}

/// What is wrong for kof in containerd's dump of a config, if anything.
pub fn dump_problem(dump: &str, flox_type: &str) -> Option<String> {
    let doc = match dump.parse::<DocumentMut>() {
        Ok(d) => d,
        Err(e) => return Some(format!("its dump is not TOML ({})", crate::one_line(&e))),
    };
    let version = doc
        .get("version")
        .and_then(Item::as_integer)
        .and_then(ConfigVersion::from_number)
        .unwrap_or(ConfigVersion::V2);
    let plugin = version.cri_plugin();
    // containerd 2.x's CRI is two plugins; the old names are its aliases.
    let cri_names: &[&str] = match version {
        ConfigVersion::V3 => &[
            "io.containerd.cri.v1.runtime",
            "io.containerd.cri.v1.images",
            "io.containerd.grpc.v1.cri",
            "cri",
        ],
        _ => &["io.containerd.grpc.v1.cri", "cri"],
    };
    let disabled: Vec<&str> = doc
        .get("disabled_plugins")
        .and_then(Item::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    if let Some(d) = disabled.iter().find(|d| cri_names.contains(d)) {
        return Some(format!(
            "it disables the CRI plugin (disabled_plugins has {d:?}): kubelet could run no pod"
        ));
    }
    let containerd = doc
        .get("plugins")
        .and_then(|p| p.get(plugin))
        .and_then(|c| c.get("containerd"));
    let runtimes = containerd.and_then(|c| c.get("runtimes"));
    let section = format!("plugins.\"{plugin}\".containerd.runtimes");
    let names: Vec<String> = runtimes
        .and_then(Item::as_table_like)
        .map(|t| t.iter().map(|(k, _)| k.to_string()).collect())
        .unwrap_or_default();
    let flox = runtimes.and_then(|r| r.get(RUNTIME_NAME));
    match flox.and_then(|f| f.get("runtime_type")).and_then(Item::as_str) {
        None => {
            return Some(format!(
                "{section} has no {RUNTIME_NAME:?} runtime (it has {names:?}): an imported drop-in that configures the CRI plugin probably replaces the file's section; register the flox runtime in that drop-in"
            ))
        }
        Some(t) if t != flox_type => {
            return Some(format!(
                "{section}.{RUNTIME_NAME} has runtime_type {t:?}, not {flox_type:?}: an imported drop-in probably overrides it"
            ))
        }
        Some(_) => {}
    }
    let default = containerd
        .and_then(|c| c.get("default_runtime_name"))
        .and_then(Item::as_str)
        .filter(|d| !d.is_empty())
        .unwrap_or(DEFAULT_RUNTIME_NAME);
    let legacy_default = containerd
        .and_then(|c| c.get("default_runtime"))
        .and_then(|d| d.get("runtime_type"))
        .and_then(Item::as_str)
        .is_some_and(|t| !t.is_empty());
    if !legacy_default && !names.iter().any(|n| n == default) {
        return Some(format!(
            "{section} has no table for the default runtime {default:?} (it has {names:?}): containerd would refuse to load its CRI plugin and the node would run no pod"
        ));
    }
    None
}

/// The candidate's file name beside `config`.
pub fn candidate_path(config: &std::path::Path) -> PathBuf {
    let mut name = config.as_os_str().to_owned();
    name.push(CHECK_SUFFIX);
    PathBuf::from(name)
}
