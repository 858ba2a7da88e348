//! Printing results: a table for people, JSON for tools.

use crate::coldstart::ColdStartReport;
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

/// A Markdown table of cold-start comparisons: medians, ratios to Nix, bytes and requests.
pub fn coldstart_table(reports: &[ColdStartReport]) -> String {
    let mut s = String::from(
        "| environment | side | median | vs Nix | bytes (first run) | requests | bytes / closure NAR |\n|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let m = &r.medians;
        let rows: [(&str, f64, &[crate::node::Run]); 6] = [
            ("Nix: nix copy + chroot", m.nix, &r.nix),
            ("kof eager: prefetch + run", m.eager, &r.eager),
            ("kof lazy (range cache)", m.lazy, &r.lazy),
            ("kof lazy, prefetch none", m.lazy_none, &r.lazy_none),
            ("kof lazy, zstd-only cache", m.lazy_zstd, &r.lazy_zstd),
            ("kof lazy, learned profile", m.lazy_profile, &r.lazy_profile),
        ];
        for (name, med, runs) in rows {
            let first = runs.first();
            s.push_str(&format!(
                "| {} | {} | {:.2} s | {:.2}x | {} | {} | {:.0}% |\n",
                r.env,
                name,
                med,
                med / m.nix,
                mb(first.map_or(0, |x| x.bytes)),
                first.map_or(0, |x| x.requests),
                first.map_or(0, |x| x.bytes) as f64 / r.nar_bytes as f64 * 100.0,
            ));
        }
        s.push_str(&format!(
            "| {} | physical limit | {:.2} s | {:.2}x | closure {} in {} paths | | touched {:.0}% |\n",
            r.env,
            r.physical_limit_s,
            r.physical_limit_s / m.nix,
            mb(r.nar_bytes),
            r.paths,
            r.touched_fraction * 100.0
        ));
        s.push_str(&format!(
            "| {} | warm: view / local disk | {:.3} s / {:.3} s | {:.2}x (view/local) | | | |\n",
            r.env,
            m.warm_view,
            m.warm_local,
            m.warm_view / m.warm_local
        ));
    }
    s
}
