//! Activation: the environment variables and the argv that run a command inside an environment
//! the way `flox activate -- CMD` does.
//!
//! From a base (the caller's environment when one is inherited, as a container's is, else
//! `PATH`, `HOME` and optionally `TERM`), `FLOX_ENV` and
//! `FLOX_ENV_DESCRIPTION` are set, the `[vars]` exported in order (a value may reference
//! variables set before it, `$NAME` or `${NAME}`, as the double-quoted `export` of Flox's
//! activation script does), and `$FLOX_ENV/bin:$FLOX_ENV/sbin` put first on `PATH`.
//! `[profile]` is skipped. When the lockfile has an `on-activate` hook, the command is run by
//! the environment's own bash, which sources the hook (it may export more variables; its
//! stdout goes to stderr, as in Flox) and then `exec`s the command, so `CMD` is looked up on
//! the final `PATH`; an environment with a hook but no bash is an error. Without a hook the
//! argv is the command itself, to be looked up on the activated `PATH` by the runner.
//!
//! Used by `kof-store run` and by the shim.

use std::collections::BTreeMap;

use thiserror::Error;

/// `PATH` before activation puts the environment first.
pub const BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The variable the hook travels in to the activation script (unset before the command runs).
pub const HOOK_VAR: &str = "_KOF_ON_ACTIVATE";

/// `$0` of the activation script.
pub const SCRIPT_NAME: &str = "kof-activate";

/// The activation script run by the environment's bash when there is a hook: source the hook
/// from [`HOOK_VAR`] (stdout to stderr), then exec the command.
pub const HOOK_SCRIPT: &str = concat!(
    "__kof_hook=\"${_KOF_ON_ACTIVATE-}\"; unset _KOF_ON_ACTIVATE\n",
    "{ eval \"$__kof_hook\"; } 1>&2\n",
    "unset __kof_hook\n",
    "exec \"$@\"\n",
);

/// Why an activation could not be made.
#[derive(Debug, Error)]
pub enum ActivateError {
    /// No command to run.
    #[error("environment {env}: no command to run")]
    NoCommand {
        /// The environment.
        env: String,
    },
    /// The lockfile has an `on-activate` hook but the environment has no `bin/bash` to run it.
    #[error("environment {env} has an on-activate hook but provides no bash to run it (install bash in the environment)")]
    HookWithoutBash {
        /// The environment.
        env: String,
    },
    /// A `[vars]` name is not a valid environment variable name.
    #[error("environment {env}: [vars] name {name:?} is not a valid variable name")]
    BadVarName {
        /// The environment.
        env: String,
        /// The name.
        name: String,
    },
    /// A value (or an argument) holds a NUL byte, which no process environment can carry.
    #[error("environment {env}: {what} holds a NUL byte")]
    Nul {
        /// The environment.
        env: String,
        /// Which variable or argument.
        what: String,
    },
}

/// What an activation is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivationInput {
    /// `owner/name:generation`, for errors.
    pub env: String,
    /// `FLOX_ENV`: the rendered environment's absolute path.
    pub flox_env: String,
    /// `FLOX_ENV_DESCRIPTION`: the environment's name.
    pub description: String,
    /// `[vars]`, in order.
    pub vars: BTreeMap<String, String>,
    /// The `on-activate` hook.
    pub hook: Option<String>,
    /// The environment's bash (absolute `/nix/store/...` path), when it has one.
    pub bash: Option<String>,
    /// `HOME` (`/root` by default).
    pub home: String,
    /// `TERM` to pass through, if any.
    pub term: Option<String>,
    /// An environment to start from, as `flox activate` starts from its caller's (a
    /// container's variables: the image's, the pod's, Kubernetes' service variables). Its
    /// `PATH` and `HOME`, when set, replace [`BASE_PATH`] and `home`; everything in it is kept
    /// unless the activation sets the same name. Empty for `kof-store run`, whose command gets
    /// exactly the activation's variables.
    pub inherit: BTreeMap<String, String>,
}

/// A command ready to exec: its environment (exactly these variables) and its argv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    /// The environment, sorted by name.
    pub env: Vec<(String, String)>,
    /// The program and its arguments; `argv[0]` may need a `PATH` lookup (see the module doc).
    pub argv: Vec<String>,
}

impl Activation {
    /// The value of `name` in the environment.
    pub fn var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Expands `$NAME` and `${NAME}` in `value` from `env` (unset → empty), as a shell's
/// double-quoted string does; `\$` and `\\` are escapes, anything else is literal. Written by
/// hand because only this small part of shell expansion is wanted: command substitution and the
/// other expansions are not performed.
fn expand(value: &str, env: &BTreeMap<String, String>) -> String {
    let b = value.as_bytes();
    let mut out = String::with_capacity(value.len());
    let mut i = 0;
    let mut lit = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if i + 1 < b.len() && matches!(b[i + 1], b'$' | b'\\' | b'"' | b'`') => {
                out.push_str(&value[lit..i]);
                out.push(b[i + 1] as char);
                i += 2;
                lit = i;
            }
            b'$' => {
                let (name, end) = if b.get(i + 1) == Some(&b'{') {
                    match value[i + 2..].find('}') {
                        Some(close) if valid_name(&value[i + 2..i + 2 + close]) => {
                            (&value[i + 2..i + 2 + close], i + 3 + close)
                        }
                        _ => ("", i),
                    }
                } else {
                    let len = value[i + 1..]
                        .bytes()
                        .take_while(|c| *c == b'_' || c.is_ascii_alphanumeric())
                        .count();
                    let n = &value[i + 1..i + 1 + len];
                    if valid_name(n) {
                        (n, i + 1 + len)
                    } else {
                        ("", i)
                    }
                };
                if name.is_empty() {
                    i += 1;
                    continue;
                }
                out.push_str(&value[lit..i]);
                out.push_str(env.get(name).map(String::as_str).unwrap_or(""));
                i = end;
                lit = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&value[lit..]);
    out
}

/// The activation of `cmd` in the environment `input` describes.
pub fn activate(input: &ActivationInput, cmd: &[String]) -> Result<Activation, ActivateError> {
    let env_label = || input.env.clone();
    if cmd.is_empty() {
        return Err(ActivateError::NoCommand { env: env_label() });
    }
    let mut env: BTreeMap<String, String> = input.inherit.clone();
    env.entry("PATH".into())
        .or_insert_with(|| BASE_PATH.to_string());
    env.entry("HOME".into())
        .or_insert_with(|| input.home.clone());
    if let Some(t) = &input.term {
        env.insert("TERM".into(), t.clone());
    }
    env.insert("FLOX_ENV".into(), input.flox_env.clone());
    env.insert("FLOX_ENV_DESCRIPTION".into(), input.description.clone());
    for (k, v) in &input.vars {
        if !valid_name(k) {
            return Err(ActivateError::BadVarName {
                env: env_label(),
                name: k.clone(),
            });
        }
        let v = expand(v, &env);
        env.insert(k.clone(), v);
    }
    // Activation's own variables win over [vars].
    env.insert("FLOX_ENV".into(), input.flox_env.clone());
    env.insert("FLOX_ENV_DESCRIPTION".into(), input.description.clone());
    let path = format!(
        "{fe}/bin:{fe}/sbin:{rest}",
        fe = input.flox_env,
        rest = env["PATH"]
    );
    env.insert("PATH".into(), path);

    let argv = match &input.hook {
        Some(hook) => {
            let bash = input
                .bash
                .clone()
                .ok_or_else(|| ActivateError::HookWithoutBash { env: env_label() })?;
            env.insert(HOOK_VAR.into(), hook.clone());
            let mut argv = vec![bash, "-c".into(), HOOK_SCRIPT.into(), SCRIPT_NAME.into()];
            argv.extend(cmd.iter().cloned());
            argv
        }
        None => cmd.to_vec(),
    };
    for (k, v) in &env {
        if v.contains('\0') {
            return Err(ActivateError::Nul {
                env: env_label(),
                what: format!("variable {k}"),
            });
        }
    }
    if let Some(a) = argv.iter().find(|a| a.contains('\0')) {
        return Err(ActivateError::Nul {
            env: env_label(),
            what: format!("argument {a:?}"),
        });
    }
    Ok(Activation {
        env: env.into_iter().collect(),
        argv,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_is_the_double_quoted_subset() {
        let env: BTreeMap<String, String> = [("A".to_string(), "x".to_string())].into();
        assert_eq!(expand("$A/${A}-$B.$", &env), "x/x-.$");
        assert_eq!(expand("\\$A \\\\ $1 ${A", &env), "$A \\ $1 ${A");
        assert_eq!(expand("héllo $A€", &env), "héllo x€");
    }
}
