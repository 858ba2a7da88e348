//! Flox `manifest.lock` (lockfile-version 1): what an environment generation installs, per
//! system, down to the store path of every output.
//!
//! Both kinds of package entries are understood: catalog packages (`outputs_to_install`,
//! `locked_url`, `attr_path`, ...) and flake packages (`outputs-to-install`, `locked-url`,
//! `locked-flake-attr-path`, ...). The whole file is validated when parsed, whatever system it
//! is later used for: every output must be a well-formed store path, every output to install
//! must exist, identifiers are bounded. The node then asks for the [`Lockfile::roots_for`] its
//! system: the outputs to install of each package of that system.

use std::collections::{BTreeMap, BTreeSet};

use kof_nar::store_path::StorePathError;
use kof_nar::StorePath;
use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

/// Largest lockfile accepted.
pub const MAX_LOCKFILE_BYTES: usize = 64 << 20;
/// Most package entries accepted.
pub const MAX_PACKAGES: usize = 100_000;
/// Longest install id, system or output name accepted.
pub const MAX_IDENT_LEN: usize = 256;
/// Most outputs of one package accepted.
pub const MAX_OUTPUTS: usize = 256;

/// Why a lockfile was refused.
#[derive(Debug, Error)]
pub enum LockfileError {
    /// Bigger than [`MAX_LOCKFILE_BYTES`].
    #[error("manifest.lock is {0} bytes, more than the {MAX_LOCKFILE_BYTES} accepted")]
    TooLarge(usize),
    /// Not JSON or not an object of the expected shape.
    #[error("manifest.lock is malformed")]
    Json(#[source] serde_json::Error),
    /// `lockfile-version` is missing or not 1.
    #[error("manifest.lock has unsupported lockfile-version {0}")]
    UnsupportedVersion(String),
    /// The `manifest` section is not of the expected shape.
    #[error("manifest.lock: bad manifest")]
    Manifest(#[source] ShapeProblem),
    /// The manifest uses the old `hook.script`, which Flox no longer accepts.
    #[error("manifest.lock: the manifest uses the old [hook] script, which Flox no longer supports (use on-activate)")]
    HookScript,
    /// `packages` is missing or not an array, or too long.
    #[error("manifest.lock: packages: {0}")]
    Packages(String),
    /// A package entry is not of the expected shape.
    #[error("manifest.lock: package #{index} ({install_id})")]
    Package {
        /// Position in `packages`.
        index: usize,
        /// Its install id (or `?`).
        install_id: String,
        /// What is wrong.
        #[source]
        cause: ShapeProblem,
    },
    /// An output is not a valid store path.
    #[error("manifest.lock: package {install_id} ({system}): output {output:?}")]
    BadStorePath {
        /// The package's install id.
        install_id: String,
        /// The package's system.
        system: String,
        /// The output name.
        output: String,
        /// Why the path was refused.
        #[source]
        source: StorePathError,
    },
    /// `outputs_to_install` names an output the package does not have.
    #[error("manifest.lock: package {install_id} ({system}): output to install {output:?} is not among its outputs")]
    MissingOutput {
        /// The package's install id.
        install_id: String,
        /// The package's system.
        system: String,
        /// The output name.
        output: String,
    },
}

/// What is wrong with the manifest or a package entry of a lockfile.
#[derive(Debug, Error)]
pub enum ShapeProblem {
    /// It does not decode as the expected shape (a field missing or of the wrong type).
    #[error(transparent)]
    Json(serde_json::Error),
    /// It decodes but a value is refused.
    #[error("{0}")]
    Invalid(String),
}

impl From<&str> for ShapeProblem {
    fn from(s: &str) -> Self {
        ShapeProblem::Invalid(s.to_string())
    }
}

/// The `hook` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hook {
    /// `on-activate`: a bash script sourced at activation.
    pub on_activate: Option<String>,
}

/// The `options` section (the parts the node uses).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// `options.systems`.
    pub systems: Option<Vec<String>>,
    /// `options.activate.mode` (`run` or `dev`).
    pub activate_mode: Option<String>,
}

/// The manifest as recorded in the lockfile.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// `[vars]`.
    pub vars: BTreeMap<String, String>,
    /// `[hook]`.
    pub hook: Hook,
    /// `[profile]`, kept raw (`flox activate -- cmd` does not run it).
    pub profile: Option<Value>,
    /// `[options]`.
    pub options: Options,
    /// The whole manifest as JSON.
    pub raw: Value,
}

/// Where a package comes from, with the fields specific to its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackageSource {
    /// A Flox catalog package.
    Catalog {
        /// `attr_path`.
        attr_path: Option<String>,
        /// `locked_url`.
        locked_url: Option<String>,
        /// `group`.
        group: Option<String>,
    },
    /// A package from a flake.
    Flake {
        /// `locked-url`.
        locked_url: Option<String>,
        /// `locked-flake-attr-path`.
        locked_flake_attr_path: Option<String>,
    },
}

/// One package for one system.
#[derive(Debug, Clone, PartialEq)]
pub struct LockedPackage {
    /// `install_id`: the name in the manifest's `[install]`.
    pub install_id: String,
    /// The Nix system this entry is for.
    pub system: String,
    /// Lower wins when two packages provide the same file; Flox's default is 5.
    pub priority: u64,
    /// Output name → store path.
    pub outputs: BTreeMap<String, StorePath>,
    /// The outputs to install (deduplicated, in first-seen order); `None` when the lockfile
    /// does not say, meaning all outputs.
    pub outputs_to_install: Option<Vec<String>>,
    /// `pname`.
    pub pname: Option<String>,
    /// `version`.
    pub version: Option<String>,
    /// `name`.
    pub name: Option<String>,
    /// Catalog or flake, with the fields particular to each.
    pub source: PackageSource,
    /// The entry as JSON.
    pub raw: Value,
}

impl LockedPackage {
    /// The store paths to install: the outputs in `outputs_to_install`, all outputs when absent.
    pub fn installed_paths(&self) -> Vec<&StorePath> {
        match &self.outputs_to_install {
            // Parsing checked that every name is among the outputs.
            Some(names) => names.iter().filter_map(|n| self.outputs.get(n)).collect(),
            None => self.outputs.values().collect(),
        }
    }
}

/// A parsed `manifest.lock`.
#[derive(Debug, Clone, PartialEq)]
pub struct Lockfile {
    /// The manifest section.
    pub manifest: Manifest,
    /// All package entries, every system.
    pub packages: Vec<LockedPackage>,
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(default)]
    vars: Option<BTreeMap<String, String>>,
    #[serde(default)]
    hook: Option<RawHook>,
    #[serde(default)]
    profile: Option<Value>,
    #[serde(default)]
    options: Option<RawOptions>,
}

#[derive(Deserialize)]
struct RawHook {
    #[serde(default, rename = "on-activate")]
    on_activate: Option<String>,
    #[serde(default)]
    script: Option<Value>,
}

#[derive(Deserialize)]
struct RawOptions {
    #[serde(default)]
    systems: Option<Vec<String>>,
    #[serde(default)]
    activate: Option<RawActivate>,
}

#[derive(Deserialize)]
struct RawActivate {
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Deserialize)]
struct RawPackage {
    install_id: String,
    system: String,
    #[serde(default)]
    priority: Option<u64>,
    outputs: BTreeMap<String, String>,
    #[serde(default, alias = "outputs-to-install")]
    outputs_to_install: Option<Vec<String>>,
    #[serde(default)]
    pname: Option<String>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    name: Option<String>,
    // catalog
    #[serde(default)]
    attr_path: Option<String>,
    #[serde(default)]
    locked_url: Option<String>,
    #[serde(default)]
    group: Option<String>,
    // flake
    #[serde(default, rename = "locked-url")]
    flake_locked_url: Option<String>,
    #[serde(default, rename = "locked-flake-attr-path")]
    locked_flake_attr_path: Option<String>,
}

fn check_ident(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if s.len() > MAX_IDENT_LEN {
        return Err(format!(
            "{what} is {} bytes, more than {MAX_IDENT_LEN}",
            s.len()
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{what} holds control characters"));
    }
    Ok(())
}

fn short(s: &str) -> String {
    if s.len() <= 64 {
        return s.to_string();
    }
    let mut cut = 64;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &s[..cut])
}

impl Lockfile {
    /// Parses and validates a `manifest.lock`.
    pub fn parse(text: &str) -> Result<Self, LockfileError> {
        if text.len() > MAX_LOCKFILE_BYTES {
            return Err(LockfileError::TooLarge(text.len()));
        }
        let doc: Value = serde_json::from_str(text).map_err(LockfileError::Json)?;
        let obj = doc.as_object().ok_or_else(|| {
            LockfileError::UnsupportedVersion("(document is not a JSON object)".into())
        })?;
        match obj.get("lockfile-version") {
            Some(v) if v.as_u64() == Some(1) => {}
            Some(v) => {
                return Err(LockfileError::UnsupportedVersion(short(&v.to_string())));
            }
            None => return Err(LockfileError::UnsupportedVersion("(missing)".into())),
        }
        let manifest = Self::parse_manifest(obj.get("manifest"))?;
        let packages = match obj.get("packages") {
            Some(Value::Array(a)) => a,
            Some(_) => return Err(LockfileError::Packages("not an array".into())),
            None => return Err(LockfileError::Packages("missing".into())),
        };
        if packages.len() > MAX_PACKAGES {
            return Err(LockfileError::Packages(format!(
                "{} entries, more than {MAX_PACKAGES}",
                packages.len()
            )));
        }
        let packages = packages
            .iter()
            .enumerate()
            .map(|(i, v)| Self::parse_package(i, v))
            .collect::<Result<_, _>>()?;
        Ok(Lockfile { manifest, packages })
    }

    fn parse_manifest(v: Option<&Value>) -> Result<Manifest, LockfileError> {
        let raw = match v {
            Some(v @ Value::Object(_)) => v.clone(),
            Some(_) => return Err(LockfileError::Manifest("not an object".into())),
            None => return Err(LockfileError::Manifest("missing".into())),
        };
        let m: RawManifest = serde_json::from_value(raw.clone())
            .map_err(|e| LockfileError::Manifest(ShapeProblem::Json(e)))?;
        let hook = match m.hook {
            Some(RawHook {
                script: Some(_), ..
            }) => return Err(LockfileError::HookScript),
            Some(h) => Hook {
                on_activate: h.on_activate,
            },
            None => Hook::default(),
        };
        let options = m.options.map_or_else(Options::default, |o| Options {
            systems: o.systems,
            activate_mode: o.activate.and_then(|a| a.mode),
        });
        Ok(Manifest {
            vars: m.vars.unwrap_or_default(),
            hook,
            profile: m.profile,
            options,
            raw,
        })
    }

    fn parse_package(index: usize, v: &Value) -> Result<LockedPackage, LockfileError> {
        let named = v
            .get("install_id")
            .and_then(Value::as_str)
            .map(short)
            .unwrap_or_else(|| "?".into());
        let fail = |cause: String| LockfileError::Package {
            index,
            install_id: named.clone(),
            cause: ShapeProblem::Invalid(cause),
        };
        let p: RawPackage =
            serde_json::from_value(v.clone()).map_err(|e| LockfileError::Package {
                index,
                install_id: named.clone(),
                cause: ShapeProblem::Json(e),
            })?;
        check_ident("install_id", &p.install_id).map_err(fail)?;
        check_ident("system", &p.system).map_err(fail)?;
        if p.outputs.is_empty() {
            return Err(fail("no outputs".into()));
        }
        if p.outputs.len() > MAX_OUTPUTS {
            return Err(fail(format!(
                "{} outputs, more than {MAX_OUTPUTS}",
                p.outputs.len()
            )));
        }
        let mut outputs = BTreeMap::new();
        for (name, path) in &p.outputs {
            check_ident("output name", name).map_err(fail)?;
            let sp =
                StorePath::from_absolute(path).map_err(|source| LockfileError::BadStorePath {
                    install_id: p.install_id.clone(),
                    system: p.system.clone(),
                    output: name.clone(),
                    source,
                })?;
            outputs.insert(name.clone(), sp);
        }
        let outputs_to_install = match p.outputs_to_install {
            Some(list) => {
                if list.len() > MAX_OUTPUTS * 16 {
                    return Err(fail(format!("{} outputs to install", list.len())));
                }
                let mut seen = BTreeSet::new();
                let mut names = Vec::new();
                for o in list {
                    if !outputs.contains_key(&o) {
                        return Err(LockfileError::MissingOutput {
                            install_id: p.install_id.clone(),
                            system: p.system.clone(),
                            output: short(&o),
                        });
                    }
                    if seen.insert(o.clone()) {
                        names.push(o);
                    }
                }
                Some(names)
            }
            None => None,
        };
        let is_flake = v.get("locked-url").is_some()
            || v.get("locked-flake-attr-path").is_some()
            || v.get("outputs-to-install").is_some();
        let source = if is_flake {
            PackageSource::Flake {
                locked_url: p.flake_locked_url,
                locked_flake_attr_path: p.locked_flake_attr_path,
            }
        } else {
            PackageSource::Catalog {
                attr_path: p.attr_path,
                locked_url: p.locked_url,
                group: p.group,
            }
        };
        Ok(LockedPackage {
            install_id: p.install_id,
            system: p.system,
            priority: p.priority.unwrap_or(5),
            outputs,
            outputs_to_install,
            pname: p.pname,
            version: p.version,
            name: p.name,
            source,
            raw: v.clone(),
        })
    }

    /// `[vars]`.
    pub fn vars(&self) -> &BTreeMap<String, String> {
        &self.manifest.vars
    }

    /// The `on-activate` hook, if any.
    pub fn hook(&self) -> Option<&str> {
        self.manifest.hook.on_activate.as_deref()
    }

    /// The package entries for `system`, in lockfile order.
    pub fn packages_for(&self, system: &str) -> Vec<&LockedPackage> {
        self.packages
            .iter()
            .filter(|p| p.system == system)
            .collect()
    }

    /// The store paths to install on `system`, sorted and deduplicated.
    pub fn roots_for(&self, system: &str) -> Vec<StorePath> {
        let roots: BTreeSet<StorePath> = self
            .packages_for(system)
            .into_iter()
            .flat_map(|p| p.installed_paths())
            .cloned()
            .collect();
        roots.into_iter().collect()
    }

    /// The systems the lockfile has packages for, sorted.
    pub fn systems(&self) -> Vec<String> {
        let s: BTreeSet<&str> = self.packages.iter().map(|p| p.system.as_str()).collect();
        s.into_iter().map(str::to_string).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = "/nix/store/nm7p8wxflggcwxfzayhysq4z6a1wg373-hello-2.12.3";

    fn doc(packages: &str) -> String {
        format!(r#"{{"lockfile-version":1,"manifest":{{"version":1}},"packages":{packages}}}"#)
    }

    #[test]
    fn all_outputs_when_outputs_to_install_absent() {
        let lf = Lockfile::parse(&doc(&format!(
            r#"[{{"install_id":"h","system":"x86_64-linux","outputs":{{"out":"{HELLO}","man":"/nix/store/arjpl2nnq7khwfhy16qphyxxg924apy1-gnumake-4.4.1-man"}}}}]"#
        )))
        .unwrap();
        let roots: Vec<String> = lf
            .roots_for("x86_64-linux")
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            roots,
            vec![
                "/nix/store/arjpl2nnq7khwfhy16qphyxxg924apy1-gnumake-4.4.1-man".to_string(),
                HELLO.to_string()
            ]
        );
        assert_eq!(lf.packages[0].priority, 5);
        assert!(lf.roots_for("aarch64-linux").is_empty());
        assert!(lf.vars().is_empty());
        assert_eq!(lf.hook(), None);
    }

    #[test]
    fn manifest_sections() {
        let lf = Lockfile::parse(&format!(
            r#"{{"lockfile-version":1,"manifest":{{"schema-version":"1.10.0",
                "vars":{{"A":"1","B":"two words"}},
                "hook":{{"on-activate":"export C=3\n"}},
                "profile":{{"bash":"alias x=y"}},
                "options":{{"systems":["x86_64-linux"],"activate":{{"mode":"dev"}},"cuda-detection":false}},
                "services":{{"web":{{"command":"serve"}}}}}},
              "packages":[{{"install_id":"h","system":"x86_64-linux","priority":3,
                "outputs":{{"out":"{HELLO}"}},"outputs_to_install":["out"],"group":"g"}}]}}"#
        ))
        .unwrap();
        assert_eq!(lf.vars().get("B").map(String::as_str), Some("two words"));
        assert_eq!(lf.hook(), Some("export C=3\n"));
        assert_eq!(lf.manifest.options.activate_mode.as_deref(), Some("dev"));
        assert_eq!(
            lf.manifest.options.systems.as_deref(),
            Some(&["x86_64-linux".to_string()][..])
        );
        assert_eq!(lf.manifest.profile.as_ref().unwrap()["bash"], "alias x=y");
        assert_eq!(lf.manifest.raw["services"]["web"]["command"], "serve");
        assert_eq!(lf.packages[0].priority, 3);
        assert_eq!(lf.systems(), vec!["x86_64-linux".to_string()]);
    }

    #[test]
    fn refuses_hostile_lockfiles() {
        let err = |s: &str| Lockfile::parse(s).unwrap_err();
        assert!(matches!(err("{"), LockfileError::Json(_)));
        assert!(matches!(err("[1]"), LockfileError::UnsupportedVersion(_)));
        assert!(matches!(
            err(r#"{"lockfile-version":0,"manifest":{},"packages":[]}"#),
            LockfileError::UnsupportedVersion(v) if v == "0"
        ));
        assert!(matches!(
            err(r#"{"lockfile-version":"1","manifest":{},"packages":[]}"#),
            LockfileError::UnsupportedVersion(_)
        ));
        assert!(matches!(
            err(r#"{"manifest":{},"packages":[]}"#),
            LockfileError::UnsupportedVersion(_)
        ));
        assert!(matches!(
            err(r#"{"lockfile-version":1,"manifest":{},"packages":{}}"#),
            LockfileError::Packages(_)
        ));
        assert!(matches!(
            err(r#"{"lockfile-version":1,"manifest":{}}"#),
            LockfileError::Packages(_)
        ));
        assert!(matches!(
            err(r#"{"lockfile-version":1,"manifest":[],"packages":[]}"#),
            LockfileError::Manifest(_)
        ));
        assert!(matches!(
            err(r#"{"lockfile-version":1,"manifest":{"vars":{"A":1}},"packages":[]}"#),
            LockfileError::Manifest(_)
        ));
        assert!(matches!(
            err(r#"{"lockfile-version":1,"manifest":{"hook":{"script":"echo hi"}},"packages":[]}"#),
            LockfileError::HookScript
        ));

        // An output that is not a store path: the error names package, system and output.
        let e = err(&doc(
            r#"[{"install_id":"evil","system":"x86_64-linux","outputs":{"out":"/etc/passwd"}}]"#,
        ));
        assert!(
            matches!(&e, LockfileError::BadStorePath { install_id, output, .. } if install_id == "evil" && output == "out")
        );
        let msg = kof_node_api::report::chain(&e);
        assert!(
            msg.contains("evil") && msg.contains("\"out\"") && msg.contains("/etc/passwd"),
            "{msg}"
        );
        for bad in [
            "/nix/store/../../etc",
            "/nix/store/nm7p8wxflggcwxfzayhysq4z6a1wg373-hello/bin",
            "/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x",
            "nm7p8wxflggcwxfzayhysq4z6a1wg373-hello-2.12.3",
        ] {
            let e = err(&doc(&format!(
                r#"[{{"install_id":"p","system":"x86_64-linux","outputs":{{"out":"{bad}"}}}}]"#
            )));
            assert!(
                matches!(e, LockfileError::BadStorePath { .. }),
                "{bad}: {e}"
            );
        }
        let e = err(&doc(&format!(
            r#"[{{"install_id":"h","system":"x86_64-linux","outputs":{{"out":"{HELLO}"}},"outputs_to_install":["out","dev"]}}]"#
        )));
        assert!(
            matches!(&e, LockfileError::MissingOutput { output, .. } if output == "dev"),
            "{e}"
        );
        let e = err(&doc(
            r#"[{"install_id":"h","system":"x86_64-linux","outputs":{}}]"#,
        ));
        assert!(
            matches!(&e, LockfileError::Package { index: 0, install_id, .. } if install_id == "h"),
            "{e}"
        );
        let e = err(&doc(r#"[{"install_id":"h","outputs":{}}]"#));
        assert!(matches!(&e, LockfileError::Package { .. }), "{e}");
        let e = err(&doc(&format!(
            r#"[{{"install_id":"h","system":"x86_64-linux","outputs":"{HELLO}"}}]"#
        )));
        assert!(matches!(&e, LockfileError::Package { .. }), "{e}");
        let e = err(&doc(&format!(
            r#"[{{"install_id":"h","system":"x86_64-linux","priority":-1,"outputs":{{"out":"{HELLO}"}}}}]"#
        )));
        assert!(matches!(&e, LockfileError::Package { .. }), "{e}");
        let e = err(&doc("[42]"));
        assert!(matches!(&e, LockfileError::Package { index: 0, .. }), "{e}");

        // Huge strings: a huge install id is refused, and the error does not echo it whole.
        let huge = "x".repeat(1 << 20);
        let e = err(&doc(&format!(
            r#"[{{"install_id":"{huge}","system":"x86_64-linux","outputs":{{"out":"{HELLO}"}}}}]"#
        )));
        assert!(matches!(&e, LockfileError::Package { .. }), "{e}");
        assert!(e.to_string().len() < 1000);
        let e = err(&doc(&format!(
            r#"[{{"install_id":"h","system":"x86_64-linux","outputs":{{"out":"/nix/store/nm7p8wxflggcwxfzayhysq4z6a1wg373-{huge}"}}}}]"#
        )));
        assert!(matches!(&e, LockfileError::BadStorePath { .. }), "{e}");
        let e = err(&doc(&format!(
            r#"[{{"install_id":"h","system":"x86_64-linux","outputs":{{"out":"{HELLO}"}},"outputs_to_install":["{huge}"]}}]"#
        )));
        assert!(matches!(&e, LockfileError::MissingOutput { .. }), "{e}");
        assert!(e.to_string().len() < 1000);
        let too_big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(MAX_LOCKFILE_BYTES));
        assert!(matches!(err(&too_big), LockfileError::TooLarge(_)));
    }
}
