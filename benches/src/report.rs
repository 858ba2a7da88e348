//! Printing results: a table for people, JSON for tools.

use crate::coldstart::ColdStartReport;
use crate::concurrent::ConcurrentReport;
use crate::dedup::DedupReport;
use crate::prefetch::PrefetchReport;
use crate::prepare::PrepareReport;
use crate::seqread::SeqReadReport;

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
        // Each side against the Nix copying from the same kind of cache: xz sides against Nix
        // from xz, the rest against Nix from zstd.
        let rows: [(&str, f64, &[crate::node::Run], f64); 8] = [
            ("Nix: nix copy (zstd) + chroot", m.nix, &r.nix, m.nix),
            ("Nix: nix copy (xz) + chroot", m.nix_xz, &r.nix_xz, m.nix_xz),
            ("kof eager: prefetch + run", m.eager, &r.eager, m.nix),
            ("kof lazy (published cache)", m.lazy, &r.lazy, m.nix),
            ("kof lazy, prefetch none", m.lazy_none, &r.lazy_none, m.nix),
            (
                "kof lazy, plain zstd cache",
                m.lazy_zstd,
                &r.lazy_zstd,
                m.nix,
            ),
            (
                "kof lazy, plain xz cache (vs Nix xz)",
                m.lazy_xz,
                &r.lazy_xz,
                m.nix_xz,
            ),
            (
                "kof lazy, learned profile",
                m.lazy_profile,
                &r.lazy_profile,
                m.nix,
            ),
        ];
        for (name, med, runs, base) in rows {
            let first = runs.first();
            s.push_str(&format!(
                "| {} | {} | {:.2} s | {:.2}x | {} | {} | {:.0}% |\n",
                r.env,
                name,
                med,
                med / base,
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
            "| {} | warm (pinned): kof-store run alone / local disk | {:.3} s / {:.3} s | {:.2}x (view/local) | | | |\n",
            r.env,
            m.warm_view,
            m.warm_local,
            m.warm_view / m.warm_local
        ));
        s.push_str(&format!(
            "| {} | warm (pinned): through kof-fetcherd / local disk | {:.3} s / {:.3} s | {:.2}x (view/local) | | | |\n",
            r.env,
            m.warm_daemon,
            m.warm_local_daemon,
            m.warm_daemon / m.warm_local_daemon
        ));
    }
    s
}

/// A Markdown table of concurrent cold starts through one daemon.
pub fn concurrent_table(r: &ConcurrentReport) -> String {
    let mut s = String::from(
        "| environment | cache | starts | wall time | requests | NAR requests | NAR bytes | vs closure NAR | vs one start |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for (starts, t) in [(1, &r.one), (r.starts, &r.many)] {
        s.push_str(&format!(
            "| {} | {} | {} | {:.2} s | {} | {} | {} | {:.2}x | {:.2}x |\n",
            r.env,
            r.flavour,
            starts,
            t.seconds,
            t.requests,
            t.nar_requests,
            mb(t.nar_bytes),
            t.nar_bytes as f64 / r.closure_nar_bytes as f64,
            t.nar_bytes as f64 / r.one.nar_bytes.max(1) as f64,
        ));
    }
    s
}

/// A Markdown table of cold view preparations.
pub fn prepare_table(reports: &[PrepareReport]) -> String {
    let mut s = String::from(
        "| environment | cache | paths | depth | closure NAR | kof prepare | requests (narinfo, listings, git) | bytes | nix path-info -r | requests | kof/nix |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let (k, n) = (r.kof_seconds(), r.nix_seconds());
        let last = r.kof.last();
        let nix_req = r.nix.last().map_or(0, |x| x.requests);
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.3} s | {} ({}, {}, {}) | {} | {:.3} s | {} | {:.2}x |\n",
            r.env,
            r.flavour,
            r.paths,
            r.depth,
            mb(r.closure_nar_bytes),
            k,
            last.map_or(0, |x| x.requests),
            last.map_or(0, |x| x.narinfo_requests),
            last.map_or(0, |x| x.listing_requests),
            last.map_or(0, |x| x.git_requests),
            mb(last.map_or(0, |x| x.bytes)),
            n,
            nix_req,
            k / n,
        ));
    }
    s
}

/// A Markdown table of the sequential read.
pub fn seqread_table(r: &SeqReadReport) -> String {
    let med = |v: &[f64]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            format!("{:.0} MB/s", crate::prefetch::median(v))
        }
    };
    let mut s = format!(
        "| {} file, 1 MiB reads | warm cache | cold cache | FUSE reads served | warm vs native |\n|---|---|---|---|---|\n",
        mb(r.size)
    );
    for (name, side, ratio) in [
        ("native (same disk)", &r.native, 1.0),
        ("view, passthrough", &r.passthrough, r.passthrough_ratio),
        ("view, no passthrough", &r.fuse, r.fuse_ratio),
    ] {
        s.push_str(&format!(
            "| {name} | {} | {} | {} | {:.2}x |\n",
            med(&side.warm_mb_s),
            med(&side.cold_mb_s),
            side.fuse_reads,
            ratio
        ));
    }
    s
}
