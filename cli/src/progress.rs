//! Progress reporting for `prefetch`: bars on a terminal, plain lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use kof_substituter::fetcher::FetchEvent;

/// Renders fetch events.
pub enum Progress {
    /// Interactive: one byte bar for the whole closure.
    Bar(ProgressBar),
    /// Plain lines on stderr, at most one progress line per few seconds plus one per path.
    Lines {
        last: Instant,
        done: u64,
        total: u64,
        bytes: u64,
        total_bytes: u64,
    },
}

impl Progress {
    /// Bars when stderr is a terminal, lines otherwise.
    pub fn new() -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            Progress::Bar(bar)
        } else {
            Progress::Lines {
                last: Instant::now(),
                done: 0,
                total: 0,
                bytes: 0,
                total_bytes: 0,
            }
        }
    }

    /// Shows one event.
    pub fn event(&mut self, ev: &FetchEvent) {
        match self {
            Progress::Bar(bar) => match ev {
                FetchEvent::Resolved {
                    paths,
                    total_download_bytes,
                    ..
                } => {
                    bar.set_length(*total_download_bytes);
                    bar.set_message(format!("{paths} paths"));
                }
                FetchEvent::Progress { bytes, .. } => bar.inc(*bytes),
                FetchEvent::PathDone { path, .. } => bar.set_message(path.name().to_string()),
                FetchEvent::PathFailed { path, .. } => {
                    bar.println(format!("failed: {path}"));
                }
                _ => {}
            },
            Progress::Lines {
                last,
                done,
                total,
                bytes,
                total_bytes,
            } => match ev {
                FetchEvent::Resolved {
                    paths,
                    total_download_bytes,
                    ..
                } => {
                    *total = *paths as u64;
                    *total_bytes = *total_download_bytes;
                    eprintln!(
                        "resolved closure: {paths} paths, {} to download",
                        human_bytes(*total_download_bytes)
                    );
                }
                FetchEvent::Progress { bytes: n, .. } => {
                    *bytes += n;
                    if last.elapsed() >= Duration::from_secs(5) {
                        *last = Instant::now();
                        eprintln!(
                            "progress: {done}/{total} paths, {} of {}",
                            human_bytes(*bytes),
                            human_bytes(*total_bytes)
                        );
                    }
                }
                FetchEvent::PathDone {
                    path,
                    downloaded_bytes,
                    ..
                } => {
                    *done += 1;
                    eprintln!(
                        "fetched {path} ({}) [{done}/{total}]",
                        human_bytes(*downloaded_bytes)
                    );
                }
                FetchEvent::PathSkipped { path } => {
                    *done += 1;
                    eprintln!("present {path} [{done}/{total}]");
                }
                FetchEvent::PathFailed { path, error } => {
                    eprintln!("failed {path}: {error}");
                }
                _ => {}
            },
        }
    }

    /// Ends the display.
    pub fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// `12.3 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
