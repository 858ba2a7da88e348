//! The command line containerd gives a v2 shim binary.
//!
//! containerd runs `<shim> -namespace NS -address ADDR -publish-binary BIN -id ID start` (cwd:
//! the bundle) to start a shim, and `<shim> -namespace NS -address ADDR -publish-binary BIN -id
//! ID -bundle DIR delete` to clean up after one. The flags are Go `flag` package syntax
//! (`-name value`, `-name=value`, `--name`, boolean `-debug`), which is parsed by hand here
//! because the flag set belongs to containerd-shim-runc-v2: kof reads the few it needs and
//! hands the whole argv, unchanged, to the runc shim.

use std::ffi::OsString;
use std::path::PathBuf;

/// What containerd asked the shim binary to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `start`: start (or find) the shim for a container whose bundle is the working directory.
    Start,
    /// `delete`: clean up a container whose shim is gone (or that was just deleted).
    Delete,
    /// `serve` (kof's own, from [`crate::bootstrap`]): be a pod's task-API proxy.
    Serve,
    /// Anything else (`-v`, no action): passed to the runc shim as it is.
    Other,
}

/// The parts of the shim's command line kof uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimArgs {
    /// `-namespace`.
    pub namespace: Option<String>,
    /// `-id`: the container (or task) id.
    pub id: Option<String>,
    /// `-bundle` (given with `delete`).
    pub bundle: Option<PathBuf>,
    /// `-address`: containerd's socket.
    pub address: Option<String>,
    /// The action.
    pub action: Action,
}

/// Flags of containerd-shim-runc-v2 that take no value.
const BOOL_FLAGS: &[&str] = &["debug", "v", "version"];

impl ShimArgs {
    /// Reads the flags kof needs from `argv` (without the program name). Unknown flags are
    /// skipped with their value, so a newer containerd's additions do not break the shim.
    pub fn parse(argv: &[OsString]) -> ShimArgs {
        let mut out = ShimArgs {
            namespace: None,
            id: None,
            bundle: None,
            address: None,
            action: Action::Other,
        };
        let mut i = 0;
        while i < argv.len() {
            let arg = argv[i].to_string_lossy().into_owned();
            i += 1;
            let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
                out.action = match arg.as_str() {
                    "start" => Action::Start,
                    "delete" => Action::Delete,
                    crate::bootstrap::SERVE_ACTION => Action::Serve,
                    _ => Action::Other,
                };
                continue;
            };
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (flag.to_string(), None),
            };
            if BOOL_FLAGS.contains(&name.as_str()) {
                continue;
            }
            let value = match inline {
                Some(v) => Some(v),
                None if i < argv.len() => {
                    i += 1;
                    Some(argv[i - 1].to_string_lossy().into_owned())
                }
                None => None,
            };
            match name.as_str() {
                "namespace" => out.namespace = value,
                "id" => out.id = value,
                "bundle" => out.bundle = value.map(PathBuf::from),
                "address" => out.address = value,
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn reads_containerds_start_and_delete_lines() {
        let a = ShimArgs::parse(&argv(
            "-namespace k8s.io -address /run/containerd/containerd.sock -publish-binary /usr/bin/containerd -id abc start",
        ));
        assert_eq!(a.action, Action::Start);
        assert_eq!(a.namespace.as_deref(), Some("k8s.io"));
        assert_eq!(a.id.as_deref(), Some("abc"));
        assert_eq!(a.bundle, None);
        let d = ShimArgs::parse(&argv(
            "-namespace default -address=/s -publish-binary /b -debug -id t1 -bundle /run/b/t1 delete",
        ));
        assert_eq!(d.action, Action::Delete);
        assert_eq!(d.address.as_deref(), Some("/s"));
        assert_eq!(d.bundle, Some(PathBuf::from("/run/b/t1")));
        assert_eq!(d.id.as_deref(), Some("t1"));
        assert_eq!(ShimArgs::parse(&argv("-v")).action, Action::Other);
    }
}
