//! Reads container logs in the CRI log format containerd writes to a pod's `log_directory`:
//! one record per line, `<RFC3339Nano time> <stdout|stderr> <F|P> <text>`, where `P` marks a
//! partial line (containerd splits lines longer than `max_container_log_line_size`) that the
//! next records of the same stream continue up to an `F`.
//!
//! Small enough to write here: no crate parses this format.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a CRI log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CriLogError {
    /// The log file could not be read.
    #[error("reading CRI log {path}")]
    Read {
        /// the log file
        path: PathBuf,
        /// the cause
        source: std::io::Error,
    },
    /// A record is not in the CRI log format.
    #[error("CRI log line {line_no} is malformed ({reason}): {text:?}")]
    Malformed {
        /// its 1-based line number
        line_no: usize,
        /// what is wrong
        reason: &'static str,
        /// the record
        text: String,
    },
    /// No line matched before the deadline.
    #[error("no matching line in CRI log {path} within {timeout:?}; it holds {} lines: {lines:?}", lines.len())]
    Timeout {
        /// the log file
        path: PathBuf,
        /// how long it was watched
        timeout: Duration,
        /// the lines it held
        lines: Vec<LogLine>,
    },
}

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The container's stdout.
    Stdout,
    /// The container's stderr.
    Stderr,
}

/// One complete line of container output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The time of the line's first record, as written (RFC 3339 with nanoseconds).
    pub timestamp: String,
    /// Its stream.
    pub stream: Stream,
    /// The text without its newline; partial records joined.
    pub line: String,
}

/// Parses CRI log text into complete lines. A last line without its newline (being written) and
/// partial records not yet finished by an `F` record are left out.
pub fn parse_cri_log(text: &str) -> Result<Vec<LogLine>, CriLogError> {
    let mut out = Vec::new();
    // Partial lines in progress, per stream: (timestamp of first record, text so far).
    let mut pending: [Option<(String, String)>; 2] = [None, None];
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i + 1],
        None => "",
    };
    for (i, raw) in complete.lines().enumerate() {
        let malformed = |reason| CriLogError::Malformed {
            line_no: i + 1,
            reason,
            text: raw.to_owned(),
        };
        let mut parts = raw.splitn(4, ' ');
        let timestamp = parts.next().filter(|t| !t.is_empty());
        let (Some(timestamp), Some(stream), Some(tag)) = (timestamp, parts.next(), parts.next())
        else {
            return Err(malformed("fewer than three fields"));
        };
        // An empty line is written as "<time> stdout F " or, by some writers, without the space.
        let content = parts.next().unwrap_or("");
        let stream = match stream {
            "stdout" => Stream::Stdout,
            "stderr" => Stream::Stderr,
            _ => return Err(malformed("stream is neither stdout nor stderr")),
        };
        let slot = &mut pending[stream as usize];
        match tag {
            "P" => match slot {
                Some((_, text)) => text.push_str(content),
                None => *slot = Some((timestamp.to_owned(), content.to_owned())),
            },
            "F" => {
                let (timestamp, line) = match slot.take() {
                    Some((ts, mut text)) => {
                        text.push_str(content);
                        (ts, text)
                    }
                    None => (timestamp.to_owned(), content.to_owned()),
                };
                out.push(LogLine {
                    timestamp,
                    stream,
                    line,
                });
            }
            _ => return Err(malformed("tag is neither F nor P")),
        }
    }
    Ok(out)
}

/// Reads and parses a CRI log file.
pub fn read_cri_log(path: &Path) -> Result<Vec<LogLine>, CriLogError> {
    let bytes = std::fs::read(path).map_err(|source| CriLogError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_cri_log(&String::from_utf8_lossy(&bytes))
}

/// Polls the log at `path` (which need not exist yet) until a line satisfies `predicate`, and
/// returns it; after `timeout`, fails with the lines seen. Polling is fine for tests and
/// benchmarks; nothing should assert on how long it took.
pub fn wait_for_line(
    path: &Path,
    predicate: impl Fn(&LogLine) -> bool,
    timeout: Duration,
) -> Result<LogLine, CriLogError> {
    let deadline = Instant::now() + timeout;
    loop {
        let lines = match read_cri_log(path) {
            Ok(lines) => lines,
            Err(CriLogError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        if let Some(found) = lines.iter().find(|l| predicate(l)) {
            return Ok(found.clone());
        }
        if Instant::now() >= deadline {
            return Err(CriLogError::Timeout {
                path: path.to_owned(),
                timeout,
                lines,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_and_partial_lines() {
        let text = "\
2024-01-01T00:00:00.000000001Z stdout F hello world\n\
2024-01-01T00:00:00.000000002Z stdout P abc\n\
2024-01-01T00:00:00.000000003Z stderr F oops\n\
2024-01-01T00:00:00.000000004Z stdout P def\n\
2024-01-01T00:00:00.000000005Z stdout F ghi\n\
2024-01-01T00:00:00.000000006Z stdout F \n\
2024-01-01T00:00:00.000000007Z stderr P unfinished\n\
2024-01-01T00:00:00.000000008Z stdout F being wri";
        let lines = parse_cri_log(text).unwrap();
        let got: Vec<(Stream, &str, &str)> = lines
            .iter()
            .map(|l| (l.stream, l.line.as_str(), &l.timestamp[26..29]))
            .collect();
        assert_eq!(
            got,
            [
                (Stream::Stdout, "hello world", "001"),
                (Stream::Stderr, "oops", "003"),
                (Stream::Stdout, "abcdefghi", "002"),
                (Stream::Stdout, "", "006"),
            ]
        );
    }

    #[test]
    fn rejects_malformed_lines() {
        for bad in [
            "justtext\n",
            "t stdin F x\n",
            "t stdout X x\n",
            "t stdout\n",
        ] {
            match parse_cri_log(bad) {
                Err(CriLogError::Malformed { line_no: 1, .. }) => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn wait_for_line_finds_a_line_written_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let writer_path = path.clone();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            std::fs::write(
                &writer_path,
                "2024-01-01T00:00:00Z stdout F first\n2024-01-01T00:00:01Z stderr F ready\n",
            )
            .unwrap();
        });
        let found = wait_for_line(
            &path,
            |l| l.stream == Stream::Stderr,
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(found.line, "ready");
        writer.join().unwrap();
        match wait_for_line(&path, |l| l.line == "never", Duration::ZERO) {
            Err(CriLogError::Timeout { lines, .. }) => assert_eq!(lines.len(), 2),
            other => panic!("{other:?}"),
        }
    }
}
