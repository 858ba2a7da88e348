//! Printing results: a table for people, JSON for tools.

use crate::dedup::DedupReport;
use crate::prefetch::PrefetchReport;

fn mb(n: u64) -> String {
    format!("{:.1} MB", n as f64 / 1e6)
}

/// A Markdown table of prefetch comparisons.
pub fn prefetch_table(reports: &[PrefetchReport]) -> String {
    let mut s = String::from(
        "| environment | cache | paths | NAR | download | kof (median) | Nix (median) | kof/Nix | kof link use | Nix link use | kof requests | Nix requests |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let pct = |u: Option<f64>| u.map_or("-".into(), |u| format!("{:.0}%", u * 100.0));
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.2} s | {:.2} s | {:.2}x | {} | {} | {} | {} |\n",
            r.env,
            r.flavour,
            r.paths,
            mb(r.nar_bytes),
            mb(r.download_bytes),
            r.kof_median_s,
            r.nix_median_s,
            r.ratio,
            pct(r.kof_link_utilisation),
            pct(r.nix_link_utilisation),
            r.kof.first().map_or(0, |x| x.requests),
            r.nix.first().map_or(0, |x| x.requests),
        ));
    }
    s
}

/// A Markdown table of the dedup result.
pub fn dedup_table(r: &DedupReport) -> String {
    format!(
        "| generations | paths | logical (NarSize) | unique content | kof stored | kof/unique | Nix store | kof/Nix |\n|---|---|---|---|---|---|---|---|\n| {} of {} | {} | {} | {} | {} | {:.2}x | {} | {:.2}x |\n",
        r.generations.len(),
        r.env,
        r.paths,
        mb(r.logical_bytes),
        mb(r.unique_content_bytes),
        mb(r.kof_stored_bytes),
        r.kof_vs_unique,
        mb(r.nix_store_bytes),
        r.kof_vs_nix
    )
}
