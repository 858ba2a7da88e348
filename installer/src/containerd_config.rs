//! containerd's config file: registering the `flox` runtime the way Flox documents it.
//!
//! The file is edited with `toml_edit`, so comments, order and formatting of everything kof does
//! not own stay as they were, and a second run over an up-to-date file changes no byte. The
//! runtime's section depends on the config's `version`:
//!
//! | `version` | containerd | section |
//! | --- | --- | --- |
//! | absent or 1 | 1.x (legacy format) | `plugins.cri.containerd.runtimes.flox` |
//! | 2 | 1.6, 1.7 | `plugins."io.containerd.grpc.v1.cri".containerd.runtimes.flox` |
//! | 3 | 2.x | `plugins."io.containerd.cri.v1.runtime".containerd.runtimes.flox` |
//!
//! Version 1 is supported rather than refused: containerd 1.6 and 1.7 still read it (and 2.x
//! migrates it), and its CRI section takes the same runtime keys; the integration test checks
//! that containerd 1.6 reads what we write.
//!
//! The section always holds `pod_annotations` and `container_annotations` (`["flox.dev/*"]`,
//! which make containerd copy the pod's `flox.dev/*` annotations into each container's OCI
//! config). The rest depends on containerd's release ([`ContainerdRelease`]), in one of the
//! two forms Flox documents ([`FloxRuntime`]):
//!
//! - containerd 1.7 and 2.x: `runtime_type = "io.containerd.runc.v2"`, `runtime_path` (the shim)
//!   and `options.SystemdCgroup`. The latter must match the node's cgroup driver (a
//!   cgroupfs-style `cgroupsPath` under `SystemdCgroup = true` is a known failure of Flox's own
//!   shim), so it is copied from the runtime runc pods use on this node: see
//!   [`ContainerdConfig::node_systemd_cgroup`].
//! - containerd 1.6 and older: its CRI plugin ignores `runtime_path` (it would start
//!   `containerd-shim-runc-v2`, and flox pods would silently run without their environment), so
//!   the runtime is `runtime_type = "io.containerd.flox.v2"` and containerd finds
//!   `containerd-shim-flox-v2` on its `PATH`. With that type containerd sends the `options`
//!   table as `runtimeoptions.v1.Options`, which the runc shim kof's shim wraps refuses, so there
//!   must be no `options` table: an existing one (and a `runtime_path`) is removed.
//!
//! Keys of the section that kof does not own are left alone.

use std::fmt;
use std::path::{Path, PathBuf};

use thiserror::Error;
use toml_edit::{Array, DocumentMut, Item, Table, Value};

/// The runtime's name in containerd (the RuntimeClass `handler`).
pub const RUNTIME_NAME: &str = "flox";
/// containerd's default `default_runtime_name`.
pub const DEFAULT_RUNTIME_NAME: &str = "runc";
/// The runtime type of runc's shim, which kof's shim wraps (and the type of the flox runtime
/// where containerd honours `runtime_path`).
pub const RUNTIME_TYPE: &str = "io.containerd.runc.v2";
/// The flox runtime's type where containerd ignores `runtime_path` (1.6 and older): containerd
/// runs `containerd-shim-flox-v2` from its `PATH`.
pub const SHIM_RUNTIME_TYPE: &str = "io.containerd.flox.v2";
/// The shim's file name, as containerd derives it from [`SHIM_RUNTIME_TYPE`].
pub const SHIM_FILE_NAME: &str = "containerd-shim-flox-v2";
/// The annotations containerd passes to the shim.
pub const ANNOTATIONS: &str = "flox.dev/*";
/// Where the shim is installed on the host.
pub const DEFAULT_RUNTIME_PATH: &str = "/usr/local/bin/containerd-shim-flox-v2";

/// Why containerd's config could not be read or edited.
#[derive(Debug, Error)]
pub enum ContainerdConfigError {
    /// The file is not TOML.
    #[error("{path}: not valid TOML")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: toml_edit::TomlError,
    },
    /// `version` is not a supported integer.
    #[error("{path}: unsupported containerd config version {value} (kof knows 1, 2 and 3)")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The value as written.
        value: String,
    },
    /// A key on the runtime's path holds something other than a `[section]`.
    #[error("{path}: {key} is {found}, not a [section]; kof edits only [section] tables there")]
    NotASection {
        /// The file.
        path: PathBuf,
        /// The dotted key.
        key: String,
        /// What it is instead ("a string", "an inline table"...).
        found: &'static str,
    },
    /// `imports` is not an array of strings.
    #[error("{path}: imports must be an array of strings")]
    BadImports {
        /// The file.
        path: PathBuf,
    },
}

/// A containerd config file format version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigVersion {
    /// Absent or `version = 1`: the legacy format (containerd 1.x).
    V1,
    /// `version = 2`: containerd 1.6 and 1.7.
    V2,
    /// `version = 3`: containerd 2.x.
    V3,
}

impl ConfigVersion {
    /// The `version` number.
    pub fn number(self) -> i64 {
        match self {
            ConfigVersion::V1 => 1,
            ConfigVersion::V2 => 2,
            ConfigVersion::V3 => 3,
        }
    }

    /// The version for a `version = N` value.
    pub fn from_number(n: i64) -> Option<ConfigVersion> {
        match n {
            1 => Some(ConfigVersion::V1),
            2 => Some(ConfigVersion::V2),
            3 => Some(ConfigVersion::V3),
            _ => None,
        }
    }

    /// The CRI plugin whose `containerd.runtimes` table holds runtimes.
    pub fn cri_plugin(self) -> &'static str {
        match self {
            ConfigVersion::V1 => "cri",
            ConfigVersion::V2 => "io.containerd.grpc.v1.cri",
            ConfigVersion::V3 => "io.containerd.cri.v1.runtime",
        }
    }

    /// The path of the `runtimes` table.
    pub fn runtimes_path(self) -> [&'static str; 4] {
        ["plugins", self.cri_plugin(), "containerd", "runtimes"]
    }
}

impl fmt::Display for ConfigVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}

/// The release number in `containerd --version` output, e.g. `1.6.20~ds1` from
/// `containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3` or `v2.0.0`
/// from `containerd github.com/containerd/containerd/v2 v2.0.0 207ad71`: the first word after
/// the first that starts with a digit (after an optional `v`) and has a dot.
pub fn release_from_version_output(output: &str) -> Option<&str> {
    output.split_whitespace().skip(1).find(|w| {
        let w = w.trim_start_matches('v');
        w.starts_with(|c: char| c.is_ascii_digit()) && w.contains('.')
    })
}

/// A containerd release, as far as kof's choices depend on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdRelease {
    /// As given or printed (`1.6.20~ds1`, `v2.0.0`).
    pub text: String,
    /// The major number.
    pub major: u32,
    /// The minor number.
    pub minor: u32,
}

impl ContainerdRelease {
    /// Reads `1.6.20~ds1`, `v1.7.2`, `2.0.0-rc.1`: `None` without a `major.minor` start.
    pub fn parse(text: &str) -> Option<ContainerdRelease> {
        let mut numbers = text.trim().trim_start_matches('v').split('.');
        let number = |s: Option<&str>| -> Option<u32> {
            let s = s?;
            let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            s[..end].parse().ok()
        };
        let major = number(numbers.next())?;
        let minor = number(numbers.next())?;
        Some(ContainerdRelease {
            text: text.trim().to_string(),
            major,
            minor,
        })
    }

    /// The config version this release reads natively (1.x: 2, 2.x: 3); `None` for a major
    /// kof does not know.
    pub fn config_version(&self) -> Option<ConfigVersion> {
        match self.major {
            1 => Some(ConfigVersion::V2),
            2 => Some(ConfigVersion::V3),
            _ => None,
        }
    }

    /// Whether its CRI plugin honours a runtime's `runtime_path` (1.7 and later; 1.6 ignores it).
    pub fn honours_runtime_path(&self) -> bool {
        (self.major, self.minor) >= (1, 7)
    }
}

impl fmt::Display for ContainerdRelease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.text)
    }
}

/// A dotted key as containerd's docs write it: `plugins."io.containerd.grpc.v1.cri".containerd`.
pub fn dotted(path: &[&str]) -> String {
    path.iter()
        .map(|k| {
            if !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                k.to_string()
            } else {
                format!("\"{k}\"")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// What the flox runtime should look like: one of the two forms Flox documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FloxRuntime {
    /// containerd 1.7 and 2.x: `runtime_type = "io.containerd.runc.v2"`, `runtime_path` and
    /// `options.SystemdCgroup`.
    RuntimePath {
        /// The shim on the host.
        runtime_path: String,
        /// `options.SystemdCgroup`.
        systemd_cgroup: bool,
    },
    /// containerd 1.6 and older, which ignore `runtime_path`: `runtime_type =
    /// "io.containerd.flox.v2"` (the shim is found on containerd's `PATH`), no `runtime_path`
    /// and no `options` table (the runc shim refuses the options containerd would send).
    ShimOnPath,
}

impl FloxRuntime {
    /// The `runtime_type` of this form.
    pub fn runtime_type(&self) -> &'static str {
        match self {
            FloxRuntime::RuntimePath { .. } => RUNTIME_TYPE,
            FloxRuntime::ShimOnPath => SHIM_RUNTIME_TYPE,
        }
    }
}

/// One key [`ContainerdConfig::register_flox`] set or removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The dotted key.
    pub key: String,
    /// The value before (as written), if there was one.
    pub old: Option<String>,
    /// The value now (as written); `None`: the key was removed.
    pub new: Option<String>,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.new, &self.old) {
            (Some(new), Some(old)) => write!(f, "set {} = {} (was {})", self.key, new, old),
            (Some(new), None) => write!(f, "set {} = {}", self.key, new),
            (None, Some(old)) => write!(f, "removed {} (was {})", self.key, old),
            (None, None) => write!(f, "removed {}", self.key),
        }
    }
}

/// Where the node's `SystemdCgroup` value was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCgroup {
    /// The runtime it was read from.
    pub runtime: String,
    /// Its `options.SystemdCgroup`.
    pub systemd_cgroup: bool,
}

/// A containerd config file, parsed for editing.
#[derive(Debug, Clone)]
pub struct ContainerdConfig {
    path: PathBuf,
    doc: DocumentMut,
}

impl ContainerdConfig {
    /// Parses `text`, the content of `path` (named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<ContainerdConfig, ContainerdConfigError> {
        let doc = text
            .parse::<DocumentMut>()
            .map_err(|source| ContainerdConfigError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(ContainerdConfig {
            path: path.to_path_buf(),
            doc,
        })
    }

    /// The file this config is for.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file has no keys or tables at all (only comments and blank lines).
    pub fn is_empty(&self) -> bool {
        self.doc.as_table().is_empty()
    }

    /// Sets `version` (for an empty file, before anything else is added).
    /// A file of comments only keeps them above `version`.
    pub fn set_version(&mut self, version: ConfigVersion) {
        let comments = if self.is_empty() {
            let t = self.doc.trailing().as_str().unwrap_or("").to_string();
            self.doc.set_trailing("");
            t
        } else {
            String::new()
        };
        self.doc
            .insert("version", toml_edit::value(version.number()));
        if let Some(mut key) = self.doc.as_table_mut().key_mut("version") {
            if !comments.is_empty() {
                key.leaf_decor_mut().set_prefix(comments);
            }
        }
    }

    /// The format version: `version`, or 1 when it is absent (as containerd reads it).
    pub fn version(&self) -> Result<ConfigVersion, ContainerdConfigError> {
        match self.doc.get("version") {
            None => Ok(ConfigVersion::V1),
            Some(item) => item
                .as_integer()
                .and_then(ConfigVersion::from_number)
                .ok_or_else(|| ContainerdConfigError::UnsupportedVersion {
                    path: self.path.clone(),
                    value: item.to_string().trim().to_string(),
                }),
        }
    }

    /// The `imports` entries (drop-in files or globs), empty when there is none.
    pub fn imports(&self) -> Result<Vec<String>, ContainerdConfigError> {
        let Some(item) = self.doc.get("imports") else {
            return Ok(Vec::new());
        };
        let bad = || ContainerdConfigError::BadImports {
            path: self.path.clone(),
        };
        let array = item.as_array().ok_or_else(bad)?;
        array
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
            .collect()
    }

    /// Whether this file has anything under `plugins.<the CRI plugin of version>`: in an
    /// imported drop-in, such a section can replace the main file's (containerd 1.x merges
    /// imports plugin by plugin), taking the flox runtime away.
    pub fn configures_cri_plugin(&self, version: ConfigVersion) -> bool {
        self.doc
            .get("plugins")
            .and_then(Item::as_table_like)
            .is_some_and(|p| p.contains_key(version.cri_plugin()))
    }

    /// The `SystemdCgroup` runc pods use on this node: the `options.SystemdCgroup` of the
    /// default runtime (`default_runtime_name`) if it is a runc runtime that sets it, else of
    /// the `runc` runtime; `None` when neither sets it (containerd then uses `false`).
    pub fn node_systemd_cgroup(
        &self,
        version: ConfigVersion,
    ) -> Result<Option<NodeCgroup>, ContainerdConfigError> {
        let cri = [
            version.runtimes_path()[0],
            version.runtimes_path()[1],
            "containerd",
        ];
        let default = self
            .table_at(&cri)?
            .and_then(|t| t.get("default_runtime_name"))
            .and_then(Item::as_str)
            .map(str::to_string);
        let mut candidates = Vec::new();
        if let Some(d) = default.filter(|d| d != RUNTIME_NAME) {
            candidates.push(d);
        }
        if !candidates.iter().any(|c| c == "runc") {
            candidates.push("runc".to_string());
        }
        let runtimes = version.runtimes_path();
        for name in candidates {
            let mut path = runtimes.to_vec();
            path.push(&name);
            let Some(runtime) = self.table_at(&path)? else {
                continue;
            };
            let is_runc = runtime
                .get("runtime_type")
                .and_then(Item::as_str)
                .is_none_or(|t| t == RUNTIME_TYPE);
            if !is_runc {
                continue;
            }
            path.push("options");
            let value = self
                .table_at(&path)?
                .and_then(|o| o.get("SystemdCgroup"))
                .and_then(Item::as_bool);
            if let Some(systemd_cgroup) = value {
                return Ok(Some(NodeCgroup {
                    runtime: name,
                    systemd_cgroup,
                }));
            }
        }
        Ok(None)
    }

    /// Makes the `flox` runtime section say what `runtime` says; returns what it changed
    /// (nothing when the section was already right, and then the text is unchanged).
    pub fn register_flox(
        &mut self,
        runtime: &FloxRuntime,
    ) -> Result<Vec<Change>, ContainerdConfigError> {
        let version = self.version()?;
        let mut path: Vec<&str> = version.runtimes_path().to_vec();
        path.push(RUNTIME_NAME);
        let annotations = vec![ANNOTATIONS.to_string()];
        let mut changes = Vec::new();
        let key = dotted(&path);
        // Checked before anything is edited, so that a refusal leaves the document as it was.
        let mut options_path = path.clone();
        options_path.push("options");
        if let Some((i, item)) = self.first_non_section(&options_path) {
            return Err(self.not_a_section(&options_path[..=i], item));
        }
        {
            let table = self.table_mut(&path)?;
            set_string(
                table,
                &key,
                "runtime_type",
                runtime.runtime_type(),
                &mut changes,
            );
            match runtime {
                FloxRuntime::RuntimePath { runtime_path, .. } => {
                    set_string(table, &key, "runtime_path", runtime_path, &mut changes);
                }
                FloxRuntime::ShimOnPath => {
                    if let Some(old) = table.remove("runtime_path") {
                        changes.push(Change {
                            key: format!("{key}.runtime_path"),
                            old: Some(value_text(&old)),
                            new: None,
                        });
                    }
                }
            }
            set_strings(table, &key, "pod_annotations", &annotations, &mut changes);
            set_strings(
                table,
                &key,
                "container_annotations",
                &annotations,
                &mut changes,
            );
            if matches!(runtime, FloxRuntime::ShimOnPath) {
                if let Some(old) = table.remove("options") {
                    changes.push(Change {
                        key: format!("{key}.options"),
                        old: Some(describe_table(&old)),
                        new: None,
                    });
                }
                return Ok(changes);
            }
        }
        let FloxRuntime::RuntimePath { systemd_cgroup, .. } = *runtime else {
            unreachable!("the other form returned above");
        };
        let key = dotted(&options_path);
        let options = self.table_mut(&options_path)?;
        let current = options.get("SystemdCgroup");
        if current.and_then(Item::as_bool) != Some(systemd_cgroup) {
            let old = current.map(value_text);
            replace_value(options, "SystemdCgroup", Value::from(systemd_cgroup));
            changes.push(Change {
                key: format!("{key}.SystemdCgroup"),
                old,
                new: Some(systemd_cgroup.to_string()),
            });
        }
        Ok(changes)
    }

    /// containerd's socket as the file sets it (`[grpc] address`), if it does.
    pub fn grpc_address(&self) -> Option<&str> {
        self.doc
            .get("grpc")
            .and_then(|g| g.get("address"))
            .and_then(Item::as_str)
            .filter(|a| !a.is_empty())
    }

    /// The default runtime's name (`default_runtime_name` of the CRI plugin's `containerd`
    /// section, containerd's default `runc` when unset).
    pub fn default_runtime_name(
        &self,
        version: ConfigVersion,
    ) -> Result<String, ContainerdConfigError> {
        let cri = [
            version.runtimes_path()[0],
            version.runtimes_path()[1],
            "containerd",
        ];
        Ok(self
            .table_at(&cri)?
            .and_then(|t| t.get("default_runtime_name"))
            .and_then(Item::as_str)
            .unwrap_or(DEFAULT_RUNTIME_NAME)
            .to_string())
    }

    /// Makes sure the config has a table for its default runtime, which containerd 1.6 and 1.7
    /// need once the file names any runtime: their CRI plugin replaces its default runtimes
    /// (a `runc` of type `io.containerd.runc.v2`) with the file's, and refuses to load ("no
    /// corresponding runtime configured in `containerd.runtimes` for `containerd`
    /// `default_runtime_name = \"runc\"`") when the default is not among them. containerd 2.x
    /// merges the file's runtimes into its defaults, but the table written there is the same.
    ///
    /// When the default runtime is `runc` and has no table, writes the one containerd would
    /// have used: `runtime_type = "io.containerd.runc.v2"` and `options.SystemdCgroup = false`,
    /// as `containerd config default` of 1.6.20, 1.7.24 and 2.1.9 prints it (the node's runc
    /// pods used exactly that, since the file said nothing). A legacy `default_runtime` table
    /// with a `runtime_type` (versions 1 and 2) is containerd's default runtime instead, and
    /// another missing default is left for the check to refuse: containerd has no default for
    /// it. Returns what it added.
    pub fn ensure_default_runtime(&mut self) -> Result<Vec<Change>, ContainerdConfigError> {
        let version = self.version()?;
        let name = self.default_runtime_name(version)?;
        let mut path: Vec<&str> = version.runtimes_path().to_vec();
        let cri = &path[..3].to_vec();
        if version != ConfigVersion::V3 {
            let mut legacy = cri.clone();
            legacy.push("default_runtime");
            let legacy_type = self
                .table_at(&legacy)?
                .and_then(|t| t.get("runtime_type"))
                .and_then(Item::as_str)
                .is_some_and(|t| !t.is_empty());
            if legacy_type {
                return Ok(Vec::new());
            }
        }
        path.push(&name);
        if name != DEFAULT_RUNTIME_NAME || self.table_at(&path)?.is_some() {
            return Ok(Vec::new());
        }
        let mut options_path = path.clone();
        options_path.push("options");
        if let Some((i, item)) = self.first_non_section(&options_path) {
            return Err(self.not_a_section(&options_path[..=i], item));
        }
        let key = dotted(&path);
        let mut changes = Vec::new();
        let table = self.table_mut(&path)?;
        set_string(table, &key, "runtime_type", RUNTIME_TYPE, &mut changes);
        let options = self.table_mut(&options_path)?;
        replace_value(options, "SystemdCgroup", Value::from(false));
        changes.push(Change {
            key: format!("{}.SystemdCgroup", dotted(&options_path)),
            old: None,
            new: Some("false".to_string()),
        });
        Ok(changes)
    }

    /// The `[section]` at `path`, if every step exists.
    fn table_at(&self, path: &[&str]) -> Result<Option<&Table>, ContainerdConfigError> {
        let mut table = self.doc.as_table();
        for (i, key) in path.iter().enumerate() {
            match table.get(key) {
                None => return Ok(None),
                Some(Item::Table(t)) => table = t,
                Some(other) => return Err(self.not_a_section(&path[..=i], other)),
            }
        }
        Ok(Some(table))
    }

    /// The `[section]` at `path`, created (its parents implicit, itself with a header) when
    /// missing.
    fn table_mut(&mut self, path: &[&str]) -> Result<&mut Table, ContainerdConfigError> {
        // Checked first, so the error can borrow `self` while the walk below borrows the doc.
        if let Some((i, item)) = self.first_non_section(path) {
            return Err(self.not_a_section(&path[..=i], item));
        }
        let mut table = self.doc.as_table_mut();
        for (i, key) in path.iter().enumerate() {
            let last = i + 1 == path.len();
            let dotted_parent = table.is_dotted();
            let item = table.entry(key).or_insert_with(|| {
                let mut t = Table::new();
                t.set_implicit(!last);
                // Below a table written with dotted keys, a new child must be dotted too to
                // remain valid TOML.
                t.set_dotted(dotted_parent);
                Item::Table(t)
            });
            table = item.as_table_mut().expect("checked above: a [section]");
        }
        Ok(table)
    }

    fn first_non_section(&self, path: &[&str]) -> Option<(usize, &Item)> {
        let mut table = self.doc.as_table();
        for (i, key) in path.iter().enumerate() {
            match table.get(key) {
                None => return None,
                Some(Item::Table(t)) => table = t,
                Some(other) => return Some((i, other)),
            }
        }
        None
    }

    fn not_a_section(&self, path: &[&str], item: &Item) -> ContainerdConfigError {
        let found = match item {
            Item::Value(Value::InlineTable(_)) => "an inline table",
            Item::Value(Value::String(_)) => "a string",
            Item::Value(Value::Array(_)) => "an array",
            Item::ArrayOfTables(_) => "an array of tables",
            Item::Value(_) => "a scalar value",
            Item::None | Item::Table(_) => "empty",
        };
        ContainerdConfigError::NotASection {
            path: self.path.clone(),
            key: dotted(path),
            found,
        }
    }
}

impl fmt::Display for ContainerdConfig {
    /// The file's text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.doc)
    }
}

/// A value as written, without its comment or surrounding space.
fn value_text(item: &Item) -> String {
    match item.as_value() {
        Some(v) => {
            let mut v = v.clone();
            v.decor_mut().clear();
            v.to_string()
        }
        None => item.to_string().trim().to_string(),
    }
}

/// A removed table in one line: `{ SystemdCgroup = true }`.
fn describe_table(item: &Item) -> String {
    let Some(table) = item.as_table_like() else {
        return item.to_string().trim().to_string();
    };
    let entries: Vec<String> = table
        .iter()
        .map(|(k, v)| format!("{k} = {}", value_text(v)))
        .collect();
    format!("{{ {} }}", entries.join(", "))
}

/// Sets `name` to `value`; an existing key keeps its place, indentation and trailing comment.
fn replace_value(table: &mut Table, name: &str, mut value: Value) {
    match table.get_mut(name) {
        Some(Item::Value(old)) => {
            let decor = old.decor().clone();
            *value.decor_mut() = decor;
            *old = value;
        }
        _ => {
            table.insert(name, Item::Value(value));
        }
    }
}

fn set_string(table: &mut Table, key: &str, name: &str, want: &str, changes: &mut Vec<Change>) {
    let current = table.get(name);
    if current.and_then(Item::as_str) == Some(want) {
        return;
    }
    let old = current.map(value_text);
    replace_value(table, name, Value::from(want));
    changes.push(Change {
        key: format!("{key}.{name}"),
        old,
        new: Some(format!("{want:?}")),
    });
}

fn set_strings(
    table: &mut Table,
    key: &str,
    name: &str,
    want: &[String],
    changes: &mut Vec<Change>,
) {
    let current = table.get(name);
    let have: Option<Vec<&str>> = current
        .and_then(Item::as_array)
        .and_then(|a| a.iter().map(Value::as_str).collect());
    if have.is_some_and(|h| h == want) {
        return;
    }
    let old = current.map(value_text);
    let array: Array = want.iter().map(String::as_str).collect();
    let new = array.to_string();
    replace_value(table, name, Value::Array(array));
    changes.push(Change {
        key: format!("{key}.{name}"),
        old,
        new: Some(new),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ContainerdConfig {
        ContainerdConfig::parse(Path::new("/etc/containerd/config.toml"), text).unwrap()
    }

    fn flox(systemd_cgroup: bool) -> FloxRuntime {
        FloxRuntime::RuntimePath {
            runtime_path: DEFAULT_RUNTIME_PATH.to_string(),
            systemd_cgroup,
        }
    }

    #[test]
    fn versions() {
        assert_eq!(parse("").version().unwrap(), ConfigVersion::V1);
        assert_eq!(parse("version = 2").version().unwrap(), ConfigVersion::V2);
        assert_eq!(parse("version = 3").version().unwrap(), ConfigVersion::V3);
        let e = parse("version = 4").version().unwrap_err().to_string();
        assert_eq!(
            e,
            "/etc/containerd/config.toml: unsupported containerd config version 4 (kof knows 1, 2 and 3)"
        );
        assert!(parse("version = \"2\"").version().is_err());
    }

    #[test]
    fn release_parsing() {
        let debian = "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3";
        assert_eq!(release_from_version_output(debian), Some("1.6.20~ds1"));
        let v2 = "containerd github.com/containerd/containerd/v2 v2.0.0 207ad711eabd375a01713109a8a197d197ff6542\n";
        assert_eq!(release_from_version_output(v2), Some("v2.0.0"));
        assert_eq!(release_from_version_output("containerd"), None);
        let release = |t: &str| ContainerdRelease::parse(t);
        let r16 = release("1.6.20~ds1").unwrap();
        assert_eq!((r16.major, r16.minor), (1, 6));
        assert_eq!(r16.config_version(), Some(ConfigVersion::V2));
        assert!(!r16.honours_runtime_path());
        assert!(!release("1.5.11").unwrap().honours_runtime_path());
        let r17 = release("1.7.27").unwrap();
        assert_eq!(r17.config_version(), Some(ConfigVersion::V2));
        assert!(r17.honours_runtime_path());
        let r2 = release("v2.1.0").unwrap();
        assert_eq!((r2.major, r2.minor), (2, 1));
        assert_eq!(r2.config_version(), Some(ConfigVersion::V3));
        assert!(r2.honours_runtime_path());
        assert_eq!(release("2.0.0-rc.1").unwrap().minor, 0);
        assert_eq!(release("3.0").unwrap().config_version(), None);
        assert_eq!(release("0.9").unwrap().config_version(), None);
        assert_eq!(release("x"), None);
        assert_eq!(release("1"), None);
        assert_eq!(release("1.x"), None);
    }

    #[test]
    fn dotted_keys_quote_what_needs_it() {
        assert_eq!(
            dotted(&ConfigVersion::V2.runtimes_path()),
            "plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes"
        );
        assert_eq!(
            dotted(&ConfigVersion::V1.runtimes_path()),
            "plugins.cri.containerd.runtimes"
        );
    }

    #[test]
    fn version_1_gets_the_legacy_section() {
        let mut c = parse("# a comment\nroot = \"/var/lib/containerd\"\n");
        let changes = c.register_flox(&flox(false)).unwrap();
        assert_eq!(changes.len(), 5);
        let text = c.to_string();
        assert!(text.starts_with("# a comment\nroot = "), "{text}");
        assert!(
            text.contains("[plugins.cri.containerd.runtimes.flox]\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "[plugins.cri.containerd.runtimes.flox.options]\nSystemdCgroup = false\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn shim_on_path_replaces_the_runtime_path_form() {
        let text = r#"version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.flox]
runtime_type = "io.containerd.runc.v2"  # kept comment
runtime_path = "/usr/local/bin/containerd-shim-flox-v2"
pod_annotations = ["flox.dev/*"]
container_annotations = ["flox.dev/*"]
privileged_without_host_devices = false

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.flox.options]
SystemdCgroup = true
BinaryName = "/usr/bin/runc"
"#;
        let mut c = parse(text);
        let changes = c.register_flox(&FloxRuntime::ShimOnPath).unwrap();
        let lines: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
        let section = "plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.flox";
        assert_eq!(
            lines,
            [
                format!("set {section}.runtime_type = \"io.containerd.flox.v2\" (was \"io.containerd.runc.v2\")"),
                format!("removed {section}.runtime_path (was \"/usr/local/bin/containerd-shim-flox-v2\")"),
                format!("removed {section}.options (was {{ SystemdCgroup = true, BinaryName = \"/usr/bin/runc\" }})"),
            ]
        );
        assert_eq!(
            c.to_string(),
            r#"version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.flox]
runtime_type = "io.containerd.flox.v2"  # kept comment
pod_annotations = ["flox.dev/*"]
container_annotations = ["flox.dev/*"]
privileged_without_host_devices = false
"#
        );
        let again = c.to_string();
        assert_eq!(c.register_flox(&FloxRuntime::ShimOnPath).unwrap(), vec![]);
        assert_eq!(c.to_string(), again);

        // And back, when containerd is upgraded to 1.7.
        let changes = c.register_flox(&flox(true)).unwrap();
        assert_eq!(changes.len(), 3, "{changes:?}");
        let text = c.to_string();
        assert!(
            text.contains("runtime_type = \"io.containerd.runc.v2\""),
            "{text}"
        );
        assert!(
            text.contains(".flox.options]\nSystemdCgroup = true\n"),
            "{text}"
        );
    }

    #[test]
    fn a_file_of_comments_keeps_them_on_top() {
        let mut c = parse("# managed by hand\n\n");
        assert!(c.is_empty());
        c.set_version(ConfigVersion::V2);
        assert_eq!(c.to_string(), "# managed by hand\n\nversion = 2\n");
    }

    #[test]
    fn systemd_cgroup_comes_from_the_default_runtime_first() {
        let text = r#"version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
default_runtime_name = "crun"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.crun]
runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.crun.options]
BinaryName = "/usr/bin/crun"
SystemdCgroup = true
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
SystemdCgroup = false
"#;
        let c = parse(text);
        assert_eq!(
            c.node_systemd_cgroup(ConfigVersion::V2).unwrap(),
            Some(NodeCgroup {
                runtime: "crun".into(),
                systemd_cgroup: true
            })
        );
        // A default runtime of another type (e.g. kata) says nothing about runc's cgroups.
        let kata = text.replace(
            "runtimes.crun]\nruntime_type = \"io.containerd.runc.v2\"",
            "runtimes.crun]\nruntime_type = \"io.containerd.kata.v2\"",
        );
        assert_eq!(
            parse(&kata).node_systemd_cgroup(ConfigVersion::V2).unwrap(),
            Some(NodeCgroup {
                runtime: "runc".into(),
                systemd_cgroup: false
            })
        );
        assert_eq!(
            parse("version = 2")
                .node_systemd_cgroup(ConfigVersion::V2)
                .unwrap(),
            None
        );
    }

    #[test]
    fn an_inline_table_on_the_path_is_refused_by_name() {
        let mut c = parse(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\ncontainerd = { snapshotter = \"overlayfs\" }\n",
        );
        let e = c.register_flox(&flox(true)).unwrap_err().to_string();
        assert_eq!(
            e,
            "/etc/containerd/config.toml: plugins.\"io.containerd.grpc.v1.cri\".containerd is an inline table, not a [section]; kof edits only [section] tables there"
        );
    }

    #[test]
    fn dotted_key_tables_stay_valid() {
        let mut c = parse(
            "version = 2\n[plugins]\n\"io.containerd.grpc.v1.cri\".containerd.snapshotter = \"overlayfs\"\n",
        );
        c.register_flox(&flox(true)).unwrap();
        let text = c.to_string();
        let again = parse(&text);
        assert!(again.configures_cri_plugin(ConfigVersion::V2));
        let mut again2 = again.clone();
        assert_eq!(again2.register_flox(&flox(true)).unwrap(), vec![], "{text}");
        assert!(text.contains("snapshotter = \"overlayfs\""), "{text}");
    }

    #[test]
    fn imports_are_read() {
        let c = parse("version = 2\nimports = [\"/etc/containerd/config.d/*.toml\"]\n");
        assert_eq!(
            c.imports().unwrap(),
            vec!["/etc/containerd/config.d/*.toml"]
        );
        assert!(parse("imports = [1]").imports().is_err());
        assert_eq!(
            parse("version = 2").imports().unwrap(),
            Vec::<String>::new()
        );
    }
}
