//! A bundle's OCI runtime spec (`config.json`), read and rewritten in place.
//!
//! The spec is kept as a JSON value: kof changes the root path, the process's argv and
//! environment, and adds mounts; every other field, including ones newer than this code, goes
//! back to runc exactly as containerd wrote it. The rewrite replaces the file atomically (a
//! temporary file in the bundle, fsynced, renamed over `config.json`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use thiserror::Error;

/// The spec's file name in a bundle.
pub const CONFIG_JSON: &str = "config.json";

/// Largest `config.json` read (containerd's are a few KiB).
const MAX_SPEC_BYTES: u64 = 16 << 20;

/// Why the spec could not be read or written.
#[derive(Debug, Error)]
pub enum SpecError {
    /// Reading or writing the file failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{path}: not an OCI runtime spec")]
    Json {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The file is not an OCI runtime spec.
    #[error("{path}: not an OCI runtime spec: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A bind mount to add to the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// The host path.
    pub source: PathBuf,
    /// The path inside the container.
    pub destination: String,
    /// Read-only.
    pub readonly: bool,
}

/// A bundle's `config.json`.
#[derive(Debug, Clone)]
pub struct Spec {
    path: PathBuf,
    value: Map<String, Value>,
}

impl Spec {
    /// Reads `<bundle>/config.json`.
    pub fn read(bundle: &Path) -> Result<Spec, SpecError> {
        use std::io::Read;
        let path = bundle.join(CONFIG_JSON);
        let io = |source| SpecError::Io {
            path: path.clone(),
            source,
        };
        let mut text = Vec::new();
        std::fs::File::open(&path)
            .map_err(io)?
            .take(MAX_SPEC_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(io)?;
        if text.len() as u64 > MAX_SPEC_BYTES {
            return Err(SpecError::Malformed {
                path,
                reason: format!("larger than {MAX_SPEC_BYTES} bytes"),
            });
        }
        let value: Value = serde_json::from_slice(&text).map_err(|source| SpecError::Json {
            path: path.clone(),
            source,
        })?;
        let Value::Object(value) = value else {
            return Err(SpecError::Malformed {
                path,
                reason: "not a JSON object".into(),
            });
        };
        let spec = Spec { path, value };
        spec.process()?;
        Ok(spec)
    }

    fn malformed(&self, reason: impl Into<String>) -> SpecError {
        SpecError::Malformed {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn process(&self) -> Result<&Map<String, Value>, SpecError> {
        self.value
            .get("process")
            .and_then(Value::as_object)
            .ok_or_else(|| self.malformed("no \"process\" object"))
    }

    fn process_mut(&mut self) -> &mut Map<String, Value> {
        self.value
            .entry("process")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("checked by read")
    }

    fn strings(&self, v: Option<&Value>, what: &str) -> Result<Vec<String>, SpecError> {
        string_list(v).map_err(|why| self.malformed(format!("{what} {why}")))
    }

    /// The OCI annotations.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        self.value
            .get("annotations")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `process.args`.
    pub fn args(&self) -> Result<Vec<String>, SpecError> {
        self.strings(self.process()?.get("args"), "process.args")
    }

    /// `process.env`, as `NAME=value` strings.
    pub fn env(&self) -> Result<Vec<String>, SpecError> {
        self.strings(self.process()?.get("env"), "process.env")
    }

    /// `process.terminal`.
    pub fn terminal(&self) -> bool {
        self.process()
            .ok()
            .and_then(|p| p.get("terminal"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// `root.path`, as written (relative paths are relative to the bundle).
    pub fn root_path(&self) -> Option<String> {
        self.value
            .get("root")
            .and_then(|r| r.get("path"))
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    /// `root.path`, resolved against the bundle.
    pub fn root_dir(&self) -> Option<PathBuf> {
        let bundle = self.path.parent()?;
        self.root_path().map(|p| bundle.join(p))
    }

    /// The `source` of the mount at `destination`, if the spec has one.
    pub fn mount_source(&self, destination: &str) -> Option<PathBuf> {
        self.value
            .get("mounts")?
            .as_array()?
            .iter()
            .rev()
            .find(|m| {
                m.get("destination")
                    .and_then(Value::as_str)
                    .map(|d| d.trim_end_matches('/') == destination)
                    .unwrap_or(false)
            })
            .and_then(|m| m.get("source"))
            .and_then(Value::as_str)
            .map(PathBuf::from)
    }

    /// `linux.cgroupsPath`, as containerd wrote it (kof never changes it: the runc shim and
    /// runc read it with the configured cgroup driver).
    pub fn cgroups_path(&self) -> Option<String> {
        self.value
            .get("linux")
            .and_then(|l| l.get("cgroupsPath"))
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    /// Sets `root.path` (keeping `root.readonly`).
    pub fn set_root_path(&mut self, path: &Path) {
        let root = self.value.entry("root").or_insert_with(|| json!({}));
        if !root.is_object() {
            *root = json!({});
        }
        root.as_object_mut()
            .expect("made an object")
            .insert("path".into(), Value::String(path.display().to_string()));
    }

    /// Replaces `process.args` and `process.env`.
    pub fn set_process(&mut self, args: &[String], env: &[(String, String)]) {
        set_args_and_env(self.process_mut(), args, env);
    }

    /// Adds a bind mount after containerd's (so it is mounted over anything they put there).
    pub fn add_bind_mount(&mut self, m: &BindMount) {
        let mounts = self.value.entry("mounts").or_insert_with(|| json!([]));
        if !mounts.is_array() {
            *mounts = json!([]);
        }
        let mut options = vec!["rbind", "nosuid", "nodev"];
        options.push(if m.readonly { "ro" } else { "rw" });
        mounts.as_array_mut().expect("made an array").push(json!({
            "destination": m.destination,
            "type": "bind",
            "source": m.source.display().to_string(),
            "options": options,
        }));
    }

    /// Writes the spec back over `config.json`, atomically.
    pub fn write(&self) -> Result<(), SpecError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(".{CONFIG_JSON}.kof-{}", std::process::id()));
        let io = |source| SpecError::Io {
            path: tmp.clone(),
            source,
        };
        let text = serde_json::to_vec(&self.value).expect("a JSON value serialises");
        let result = (|| {
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&text).map_err(io)?;
            f.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &self.path).map_err(|source| SpecError::Io {
                path: self.path.clone(),
                source,
            })
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Splits `NAME=value` strings into pairs (an entry without `=` is a name with an empty value,
/// The strings of a JSON list (absent or `null`: none); otherwise what the value is instead.
pub fn string_list(v: Option<&Value>) -> Result<Vec<String>, &'static str> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string).ok_or("holds a non-string"))
            .collect(),
        Some(_) => Err("is not an array"),
    }
}

/// Sets `args` and `env` (as `NAME=value`) of an OCI process object: a bundle's
/// `process`, or the process of an exec.
pub fn set_args_and_env(p: &mut Map<String, Value>, args: &[String], env: &[(String, String)]) {
    p.insert("args".into(), json!(args));
    let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    p.insert("env".into(), json!(env));
}

/// as runc treats it).
pub fn env_pairs(env: &[String]) -> BTreeMap<String, String> {
    env.iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (e.clone(), String::new()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"{"ociVersion":"1.0.2-dev","process":{"terminal":false,"user":{"uid":0,"gid":0},
        "args":["echoip"],"env":["PATH=/usr/bin:/bin","HOSTNAME=x"],"cwd":"/"},
        "root":{"path":"rootfs","readonly":false},"hostname":"h",
        "mounts":[{"destination":"/etc/hosts","type":"bind","source":"/var/lib/pod/hosts","options":["rbind","rw"]}],
        "annotations":{"flox.dev/environment":"kof/hello"},
        "linux":{"cgroupsPath":"kubepods-besteffort-pod1.slice:cri-containerd:abc","unknownFuture":{"x":1}}}"#;

    #[test]
    fn rewrites_only_what_kof_owns() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_JSON), SPEC).unwrap();
        let mut s = Spec::read(dir.path()).unwrap();
        assert_eq!(s.args().unwrap(), vec!["echoip"]);
        assert_eq!(s.root_dir(), Some(dir.path().join("rootfs")));
        assert_eq!(
            s.mount_source("/etc/hosts"),
            Some(PathBuf::from("/var/lib/pod/hosts"))
        );
        assert_eq!(s.annotations()["flox.dev/environment"], "kof/hello");
        s.set_root_path(Path::new("/var/lib/kof/containers/k8s.io/abc/rootfs"));
        s.set_process(&["/bin/sh".into()], &[("A".into(), "b=c".into())]);
        s.add_bind_mount(&BindMount {
            source: "/var/lib/kof/mnt/l/nix/store".into(),
            destination: "/nix/store".into(),
            readonly: true,
        });
        s.write().unwrap();
        let back: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(CONFIG_JSON)).unwrap()).unwrap();
        assert_eq!(back["root"]["readonly"], json!(false));
        assert_eq!(
            back["root"]["path"],
            json!("/var/lib/kof/containers/k8s.io/abc/rootfs")
        );
        assert_eq!(back["process"]["env"], json!(["A=b=c"]));
        assert_eq!(back["process"]["user"]["uid"], json!(0));
        // The cgroup path and unknown fields go back unchanged.
        assert_eq!(
            back["linux"]["cgroupsPath"],
            json!("kubepods-besteffort-pod1.slice:cri-containerd:abc")
        );
        assert_eq!(back["linux"]["unknownFuture"]["x"], json!(1));
        assert_eq!(
            back["mounts"][1]["options"],
            json!(["rbind", "nosuid", "nodev", "ro"])
        );
        // No temporary file is left in the bundle.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(CONFIG_JSON)]);
    }

    #[test]
    fn a_spec_without_a_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_JSON), r#"{"root":{}}"#).unwrap();
        let e = Spec::read(dir.path()).unwrap_err();
        assert!(e.to_string().contains("no \"process\" object"), "{e}");
        std::fs::write(dir.path().join(CONFIG_JSON), "[1]").unwrap();
        assert!(Spec::read(dir.path()).is_err());
    }

    #[test]
    fn env_entries_split_at_the_first_equals() {
        let m = env_pairs(&["A=1=2".into(), "B".into()]);
        assert_eq!(m["A"], "1=2");
        assert_eq!(m["B"], "");
    }
}
