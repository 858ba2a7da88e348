//! Activated processes: a container's own process at Create, and every exec into it.
//!
//! A process runs the way `flox activate -- CMD` would run it: its environment is the one it
//! was given (CRI gives an exec the container's configured environment), with the
//! environment's `[vars]`, `FLOX_ENV` and `PATH` over it and the `on-activate` hook sourced
//! ([`kof_node_api::activate`]). What an exec needs for that is kept in the container's record
//! as its [`ExecProfile`] when the container is created.

use kof_node_api::activate::{activate, ActivateError, Activation as Activated};
use kof_node_api::api::Activation;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

use crate::spec::{env_pairs, set_args_and_env, string_list};

/// How execs into a container run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecProfile {
    /// The environment's activation (from the container's lease).
    pub activation: Activation,
    /// `flox.dev/skip-containers-exec` names the container: execs run unmodified.
    pub skip: bool,
}

/// Why an exec's process could not be activated.
#[derive(Debug, Error)]
pub enum ExecError {
    /// The process spec is not JSON.
    #[error("the exec's process spec is not JSON")]
    Json(#[source] serde_json::Error),
    /// The process spec has no usable `args` or `env`.
    #[error("the exec's process spec is malformed: {0}")]
    Malformed(&'static str),
    /// The activation failed.
    #[error(transparent)]
    Activate(#[from] ActivateError),
}

/// The activated argv and environment of a process given `args` and `env` (`NAME=value`).
pub fn activated(
    activation: &Activation,
    args: &[String],
    env: &[String],
) -> Result<Activated, ActivateError> {
    let inherit = env_pairs(env);
    let home = inherit
        .get("HOME")
        .cloned()
        .unwrap_or_else(|| "/root".into());
    let mut input = activation.input(&home, None);
    input.inherit = inherit;
    activate(&input, args)
}

fn strings(v: Option<&Value>, what: &'static str) -> Result<Vec<String>, ExecError> {
    string_list(v).map_err(|_| ExecError::Malformed(what))
}

/// Rewrites an exec's OCI process spec (JSON, as containerd sends it) to run activated; every
/// other field (user, cwd, terminal, capabilities, rlimits) is kept as it came.
pub fn activate_process(process: &[u8], activation: &Activation) -> Result<Vec<u8>, ExecError> {
    let mut p: Map<String, Value> = serde_json::from_slice(process).map_err(ExecError::Json)?;
    let args = strings(p.get("args"), "args is not a list of strings")?;
    if args.is_empty() {
        return Err(ExecError::Malformed("no args"));
    }
    let env = strings(p.get("env"), "env is not a list of strings")?;
    let act = activated(activation, &args, &env)?;
    set_args_and_env(&mut p, &act.argv, &act.env);
    serde_json::to_vec(&p).map_err(ExecError::Json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn activation(hook: Option<&str>) -> Activation {
        Activation {
            env: "o/e:3".into(),
            flox_env: "/nix/store/aaaa-env".into(),
            description: "e".into(),
            vars: BTreeMap::from([("GREETING".to_string(), "hi $USER".to_string())]),
            hook: hook.map(str::to_string),
            bash: Some("/nix/store/bbbb-bash/bin/bash".into()),
        }
    }

    #[test]
    fn an_exec_runs_activated_and_keeps_the_rest_of_its_spec() {
        let process = br#"{"terminal":false,"user":{"uid":0,"gid":0},"args":["pyapp","--x"],
            "env":["PATH=/usr/bin:/bin","USER=ann","HOSTNAME=p"],"cwd":"/work","noNewPrivileges":true}"#;
        let out = activate_process(process, &activation(None)).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["args"], serde_json::json!(["pyapp", "--x"]));
        assert_eq!(v["cwd"], "/work");
        assert_eq!(v["noNewPrivileges"], true);
        assert_eq!(v["user"]["uid"], 0);
        let env: Vec<&str> = v["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        assert!(env.contains(&"FLOX_ENV=/nix/store/aaaa-env"), "{env:?}");
        assert!(env.contains(&"GREETING=hi ann"), "{env:?}");
        assert!(env.contains(&"HOSTNAME=p"), "{env:?}");
        let path = env.iter().find(|e| e.starts_with("PATH=")).unwrap();
        assert!(
            path.starts_with("PATH=/nix/store/aaaa-env/bin:/nix/store/aaaa-env/sbin:"),
            "{path}"
        );
    }

    #[test]
    fn a_hook_runs_the_exec_through_the_environments_bash() {
        let process = br#"{"args":["sh","-c","echo $X"],"env":["PATH=/bin"]}"#;
        let out = activate_process(process, &activation(Some("export X=1"))).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        let argv: Vec<&str> = v["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        assert_eq!(argv[0], "/nix/store/bbbb-bash/bin/bash");
        assert_eq!(&argv[argv.len() - 3..], ["sh", "-c", "echo $X"]);
    }

    #[test]
    fn a_malformed_process_is_refused_with_its_reason() {
        let e = activate_process(b"[1]", &activation(None)).unwrap_err();
        assert!(matches!(e, ExecError::Json(_)), "{e}");
        let e = activate_process(br#"{"args":[],"env":[]}"#, &activation(None)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the exec's process spec is malformed: no args"
        );
        let e = activate_process(br#"{"args":["a"],"env":"X=1"}"#, &activation(None)).unwrap_err();
        assert!(e.to_string().contains("env is not a list"), "{e}");
    }
}
