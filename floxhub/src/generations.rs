//! The generations metadata of a FloxHub environment (`metadata.json` at the top of the
//! environment's floxmeta branch), parsed into one model whatever its version.
//!
//! Version 2 keeps an append-only `history`; the live generation is the `current_generation`
//! of its **last** entry (a rollback or switch appends an entry and creates no generation, so
//! the live generation is not always the newest). Version 1 (older data) keeps `currentGen`
//! and a map of generations, converted here to the same model. The data comes from the
//! network: versions, generation ids and sizes are checked, and anything odd is refused.

use std::collections::BTreeSet;

use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

/// Largest `metadata.json` accepted.
pub const MAX_METADATA_BYTES: usize = 16 << 20;
/// Most history entries (or v1 generations) accepted.
pub const MAX_HISTORY_ENTRIES: usize = 1_000_000;
/// Largest generation number accepted.
pub const MAX_GENERATION: u64 = 100_000_000;

/// What kind of change a history entry records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryKind {
    /// `import`
    Import,
    /// `initialize`
    Initialize,
    /// `migrate_v1`
    MigrateV1,
    /// `install`
    Install,
    /// `edit`
    Edit,
    /// `uninstall`
    Uninstall,
    /// `upgrade`
    Upgrade,
    /// `include_upgrade`
    IncludeUpgrade,
    /// `switch_generation` (rollbacks and switches)
    SwitchGeneration,
    /// `other` and any kind this code does not know, kept verbatim.
    Other(String),
}

impl HistoryKind {
    fn from_str(s: &str) -> Self {
        match s {
            "import" => Self::Import,
            "initialize" => Self::Initialize,
            "migrate_v1" => Self::MigrateV1,
            "install" => Self::Install,
            "edit" => Self::Edit,
            "uninstall" => Self::Uninstall,
            "upgrade" => Self::Upgrade,
            "include_upgrade" => Self::IncludeUpgrade,
            "switch_generation" => Self::SwitchGeneration,
            other => Self::Other(other.to_string()),
        }
    }

    /// The kind as `metadata.json` spells it (the tests compare parsed kinds by it; the node
    /// passes the raw history on).
    #[cfg(test)]
    pub fn as_str(&self) -> &str {
        match self {
            Self::Import => "import",
            Self::Initialize => "initialize",
            Self::MigrateV1 => "migrate_v1",
            Self::Install => "install",
            Self::Edit => "edit",
            Self::Uninstall => "uninstall",
            Self::Upgrade => "upgrade",
            Self::IncludeUpgrade => "include_upgrade",
            Self::SwitchGeneration => "switch_generation",
            Self::Other(s) => s,
        }
    }
}

/// One change of the environment, by whom and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// What changed.
    pub kind: HistoryKind,
    /// Packages concerned (install, uninstall, upgrade).
    pub targets: Vec<String>,
    /// Who.
    pub author: Option<String>,
    /// From which machine.
    pub hostname: Option<String>,
    /// When (Unix seconds).
    pub timestamp: Option<i64>,
    /// The generation live after this change.
    pub current_generation: u64,
    /// The generation live before it.
    pub previous_generation: Option<u64>,
    /// The command that made the change.
    pub command: Option<Vec<String>>,
    /// Free text (`other` entries; the log message of v1 data).
    pub summary: Option<String>,
}

/// The parsed `metadata.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Generations {
    /// The `version` field (1 or 2).
    pub version: u64,
    /// The live generation.
    pub live: u64,
    /// The highest generation number that exists.
    pub newest: u64,
    /// Generation numbers the metadata mentions (v2: as current or previous generation of a
    /// history entry; v1: the generations map), sorted.
    pub known: BTreeSet<u64>,
    /// The history, oldest first (v1: one entry per generation, by generation number).
    pub history: Vec<HistoryEntry>,
    /// The history as JSON, raw entries as stored (v1: the generation objects with a
    /// `"generation"` field added): the audit trail kept with the environment.
    pub history_raw: Value,
    /// The whole document as parsed.
    pub raw: Value,
}

/// Why `metadata.json` was refused.
#[derive(Debug, Error)]
pub enum GenerationsError {
    /// Bigger than [`MAX_METADATA_BYTES`].
    #[error("metadata.json is {0} bytes, more than the {MAX_METADATA_BYTES} accepted")]
    TooLarge(usize),
    /// Not JSON, or not of the expected shape.
    #[error("metadata.json is malformed")]
    Json(#[source] serde_json::Error),
    /// `version` is missing or neither 1 nor 2.
    #[error("metadata.json has unsupported version {0}")]
    UnsupportedVersion(String),
    /// A generation id is not a string of digits (or out of range).
    #[error("metadata.json: {field} {value} is not a generation number (a string of digits from 1 to {MAX_GENERATION})")]
    BadGeneration {
        /// Which field.
        field: String,
        /// Its value, as JSON.
        value: String,
    },
    /// Version 2 with no history entry: no live generation.
    #[error("metadata.json has an empty history: no live generation")]
    EmptyHistory,
    /// More entries than [`MAX_HISTORY_ENTRIES`], or `total_generations` absurd.
    #[error("metadata.json is absurd: {0}")]
    Absurd(String),
    /// Version 1 whose `currentGen` is not among its generations.
    #[error("metadata.json: current generation {0} is not among its generations")]
    UnknownCurrent(u64),
}

#[derive(Deserialize)]
struct V2 {
    total_generations: Option<u64>,
    history: Vec<Value>,
}

#[derive(Deserialize)]
struct V2Entry {
    kind: String,
    #[serde(default)]
    targets: Option<Vec<String>>,
    #[serde(default)]
    author: Option<String>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    timestamp: Option<i64>,
    current_generation: Value,
    #[serde(default)]
    previous_generation: Value,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    summary: Option<String>,
}

#[derive(Deserialize)]
struct V1 {
    #[serde(rename = "currentGen")]
    current_gen: Value,
    generations: serde_json::Map<String, Value>,
}

#[derive(Deserialize)]
struct V1Generation {
    #[serde(default)]
    created: Option<i64>,
    #[serde(default, rename = "lastActive")]
    _last_active: Option<i64>,
    #[serde(default, rename = "logMessage")]
    log_message: Option<Value>,
}

/// A generation id: a JSON string of digits, 1..=[`MAX_GENERATION`], canonical decimal.
fn generation_id(field: &str, v: &Value) -> Result<u64, GenerationsError> {
    let bad = || GenerationsError::BadGeneration {
        field: field.to_string(),
        value: truncate_json(v),
    };
    let s = v.as_str().ok_or_else(bad)?;
    let n = kof_node_api::envref::parse_generation(s).map_err(|_| bad())?;
    if n > MAX_GENERATION {
        return Err(bad());
    }
    Ok(n)
}

fn truncate_json(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 64 {
        let mut cut = 64;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

impl Generations {
    /// Parses `metadata.json` (version 1 or 2).
    pub fn parse(text: &str) -> Result<Self, GenerationsError> {
        if text.len() > MAX_METADATA_BYTES {
            return Err(GenerationsError::TooLarge(text.len()));
        }
        let raw: Value = serde_json::from_str(text).map_err(GenerationsError::Json)?;
        let version = raw.get("version").cloned().unwrap_or(Value::Null);
        match version.as_u64() {
            Some(2) => Self::parse_v2(raw),
            Some(1) => Self::parse_v1(raw),
            _ => Err(GenerationsError::UnsupportedVersion(truncate_json(
                &version,
            ))),
        }
    }

    fn parse_v2(raw: Value) -> Result<Self, GenerationsError> {
        let doc: V2 = serde_json::from_value(raw.clone()).map_err(GenerationsError::Json)?;
        if doc.history.len() > MAX_HISTORY_ENTRIES {
            return Err(GenerationsError::Absurd(format!(
                "{} history entries",
                doc.history.len()
            )));
        }
        let mut history = Vec::with_capacity(doc.history.len());
        let mut known = BTreeSet::new();
        for (i, v) in doc.history.iter().enumerate() {
            let e: V2Entry = serde_json::from_value(v.clone()).map_err(GenerationsError::Json)?;
            let current = generation_id(
                &format!("history[{i}].current_generation"),
                &e.current_generation,
            )?;
            let previous = match &e.previous_generation {
                Value::Null => None,
                p => Some(generation_id(
                    &format!("history[{i}].previous_generation"),
                    p,
                )?),
            };
            known.insert(current);
            known.extend(previous);
            history.push(HistoryEntry {
                kind: HistoryKind::from_str(&e.kind),
                targets: e.targets.unwrap_or_default(),
                author: e.author,
                hostname: e.hostname,
                timestamp: e.timestamp,
                current_generation: current,
                previous_generation: previous,
                command: e.command,
                summary: e.summary,
            });
        }
        let live = history
            .last()
            .ok_or(GenerationsError::EmptyHistory)?
            .current_generation;
        let highest = known.last().copied().unwrap_or(live);
        let newest = match doc.total_generations {
            Some(t) if t > MAX_GENERATION => {
                return Err(GenerationsError::Absurd(format!("total_generations {t}")))
            }
            Some(t) => t.max(highest),
            None => highest,
        };
        Ok(Generations {
            version: 2,
            live,
            newest,
            known,
            history,
            history_raw: Value::Array(doc.history),
            raw,
        })
    }

    fn parse_v1(raw: Value) -> Result<Self, GenerationsError> {
        let doc: V1 = serde_json::from_value(raw.clone()).map_err(GenerationsError::Json)?;
        if doc.generations.len() > MAX_HISTORY_ENTRIES {
            return Err(GenerationsError::Absurd(format!(
                "{} generations",
                doc.generations.len()
            )));
        }
        let live = generation_id("currentGen", &doc.current_gen)?;
        let mut gens = Vec::with_capacity(doc.generations.len());
        for (key, v) in &doc.generations {
            let n = generation_id(
                &format!("generations key {key:?}"),
                &Value::String(key.clone()),
            )?;
            let g: V1Generation =
                serde_json::from_value(v.clone()).map_err(GenerationsError::Json)?;
            let summary = match g.log_message {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s),
                Some(Value::Array(a)) => Some(
                    a.iter()
                        .map(|m| {
                            m.as_str()
                                .map(str::to_string)
                                .unwrap_or_else(|| m.to_string())
                        })
                        .collect::<Vec<_>>()
                        .join("\n"),
                ),
                Some(other) => Some(other.to_string()),
            };
            let mut raw_entry = v.clone();
            if let Value::Object(o) = &mut raw_entry {
                o.insert("generation".into(), Value::String(key.clone()));
            }
            gens.push((n, g.created, summary, raw_entry));
        }
        gens.sort_by_key(|g| g.0);
        let known: BTreeSet<u64> = gens.iter().map(|g| g.0).collect();
        if !known.contains(&live) {
            return Err(GenerationsError::UnknownCurrent(live));
        }
        let newest = known.last().copied().unwrap_or(live);
        let mut history = Vec::with_capacity(gens.len());
        let mut history_raw = Vec::with_capacity(gens.len());
        let mut previous = None;
        for (n, created, summary, raw_entry) in gens {
            history.push(HistoryEntry {
                kind: HistoryKind::Other("v1_generation".into()),
                targets: Vec::new(),
                author: None,
                hostname: None,
                timestamp: created,
                current_generation: n,
                previous_generation: previous,
                command: None,
                summary,
            });
            history_raw.push(raw_entry);
            previous = Some(n);
        }
        Ok(Generations {
            version: 1,
            live,
            newest,
            known,
            history,
            history_raw: Value::Array(history_raw),
            raw,
        })
    }

    /// Whether generation `n` exists.
    pub fn contains(&self, n: u64) -> bool {
        self.known.contains(&n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2_ROLLBACK: &str = r#"{ "version": 2, "total_generations": 3, "extra": {"ignored": true},
      "history": [
        {"kind": "install", "targets": ["python3"], "author": "alice", "hostname": "laptop",
         "timestamp": 1767003600, "current_generation": "1", "previous_generation": null,
         "command": ["flox", "install", "python3"]},
        {"kind": "edit", "author": "alice", "hostname": "laptop", "timestamp": 1767003700,
         "current_generation": "2", "previous_generation": "1", "command": ["flox", "edit"],
         "new_field": 42},
        {"kind": "upgrade", "targets": [], "author": "bob", "hostname": "ci", "timestamp": 1767003800,
         "current_generation": "3", "previous_generation": "2", "command": null},
        {"kind": "switch_generation", "author": "bob", "hostname": "ci", "timestamp": 1767007200,
         "current_generation": "2", "previous_generation": "3", "command": null},
        {"kind": "teleport", "current_generation": "2", "previous_generation": "2"},
        {"kind": "other", "summary": "manual fix", "current_generation": "2"}
      ] }"#;

    #[test]
    fn v2_live_is_last_entry_not_newest() {
        let g = Generations::parse(V2_ROLLBACK).unwrap();
        assert_eq!(g.version, 2);
        assert_eq!(g.live, 2);
        assert_eq!(g.newest, 3);
        assert_eq!(g.known, BTreeSet::from([1, 2, 3]));
        assert_eq!(g.history.len(), 6);
        let first = &g.history[0];
        assert_eq!(first.kind, HistoryKind::Install);
        assert_eq!(first.targets, vec!["python3".to_string()]);
        assert_eq!(first.author.as_deref(), Some("alice"));
        assert_eq!(first.hostname.as_deref(), Some("laptop"));
        assert_eq!(first.timestamp, Some(1767003600));
        assert_eq!(first.previous_generation, None);
        assert_eq!(
            first.command.as_deref(),
            Some(&["flox".to_string(), "install".into(), "python3".into()][..])
        );
        assert_eq!(g.history[3].kind, HistoryKind::SwitchGeneration);
        assert_eq!(g.history[3].previous_generation, Some(3));
        assert_eq!(g.history[4].kind, HistoryKind::Other("teleport".into()));
        assert_eq!(g.history[5].kind, HistoryKind::Other("other".into()));
        assert_eq!(g.history[5].summary.as_deref(), Some("manual fix"));
        assert_eq!(g.history[5].kind.as_str(), "other");
        // The raw history keeps unknown fields verbatim.
        assert_eq!(g.history_raw[1]["new_field"], 42);
        assert_eq!(g.history_raw.as_array().unwrap().len(), 6);
        assert!(g.contains(3) && !g.contains(4) && !g.contains(0));
    }

    #[test]
    fn v2_without_total_uses_highest_mentioned() {
        let g = Generations::parse(
            r#"{"version":2,"history":[{"kind":"install","current_generation":"1"},
               {"kind":"install","current_generation":"2","previous_generation":"1"}]}"#,
        )
        .unwrap();
        assert_eq!((g.live, g.newest), (2, 2));
    }

    #[test]
    fn v1_is_converted() {
        let g = Generations::parse(
            r#"{"version": 1, "currentGen": "2", "generations": {
                "10": {"created": 1700000300, "lastActive": 1700000400, "logMessage": ["flox install jq"]},
                "2": {"created": 1700000100, "lastActive": 1700000500, "logMessage": "flox install hello"},
                "1": {"created": 1700000000, "lastActive": 1700000000}
            }}"#,
        )
        .unwrap();
        assert_eq!(g.version, 1);
        assert_eq!(g.live, 2);
        assert_eq!(g.newest, 10);
        assert_eq!(g.known, BTreeSet::from([1, 2, 10]));
        let nums: Vec<u64> = g.history.iter().map(|e| e.current_generation).collect();
        assert_eq!(nums, vec![1, 2, 10]);
        assert_eq!(g.history[1].summary.as_deref(), Some("flox install hello"));
        assert_eq!(g.history[2].summary.as_deref(), Some("flox install jq"));
        assert_eq!(g.history[2].timestamp, Some(1700000300));
        assert_eq!(g.history[2].previous_generation, Some(2));
        assert_eq!(g.history_raw[2]["generation"], "10");
        assert_eq!(g.history_raw[2]["lastActive"], 1700000400);
    }

    #[test]
    fn refuses_hostile_metadata() {
        let err = |s: &str| Generations::parse(s).unwrap_err();
        assert!(matches!(err("not json"), GenerationsError::Json(_)));
        assert!(matches!(err("[]"), GenerationsError::UnsupportedVersion(_)));
        assert!(matches!(
            err(r#"{"history":[]}"#),
            GenerationsError::UnsupportedVersion(_)
        ));
        let e = err(r#"{"version":3,"history":[]}"#);
        assert!(matches!(&e, GenerationsError::UnsupportedVersion(v) if v == "3"));
        assert!(matches!(
            err(r#"{"version":"2","history":[]}"#),
            GenerationsError::UnsupportedVersion(_)
        ));
        assert!(matches!(
            err(r#"{"version":2,"history":[]}"#),
            GenerationsError::EmptyHistory
        ));
        assert!(matches!(err(r#"{"version":2}"#), GenerationsError::Json(_)));
        for bad in [
            r#"3"#,
            r#""3a""#,
            r#""-1""#,
            r#""0""#,
            r#""03""#,
            r#""""#,
            r#"null"#,
            r#"" 3""#,
            r#""999999999999""#,
        ] {
            let doc = format!(
                r#"{{"version":2,"history":[{{"kind":"install","current_generation":{bad}}}]}}"#
            );
            assert!(
                matches!(err(&doc), GenerationsError::BadGeneration { ref field, .. } if field == "history[0].current_generation"),
                "{bad}"
            );
        }
        assert!(matches!(
            err(
                r#"{"version":2,"history":[{"kind":"install","current_generation":"1","previous_generation":"x"}]}"#
            ),
            GenerationsError::BadGeneration { .. }
        ));
        assert!(matches!(
            err(
                r#"{"version":2,"total_generations":18446744073709551615,"history":[{"kind":"install","current_generation":"1"}]}"#
            ),
            GenerationsError::Absurd(_)
        ));
        assert!(matches!(
            err(r#"{"version":2,"history":[{"current_generation":"1"}]}"#),
            GenerationsError::Json(_)
        ));
        assert!(matches!(
            err(r#"{"version":1,"currentGen":"5","generations":{"1":{}}}"#),
            GenerationsError::UnknownCurrent(5)
        ));
        assert!(matches!(
            err(r#"{"version":1,"currentGen":1,"generations":{"1":{}}}"#),
            GenerationsError::BadGeneration { .. }
        ));
        assert!(matches!(
            err(r#"{"version":1,"currentGen":"1","generations":{"1":{},"x":{}}}"#),
            GenerationsError::BadGeneration { .. }
        ));
        let huge = format!(
            r#"{{"version":2,"pad":"{}"}}"#,
            "x".repeat(MAX_METADATA_BYTES)
        );
        assert!(matches!(err(&huge), GenerationsError::TooLarge(_)));
    }
}
