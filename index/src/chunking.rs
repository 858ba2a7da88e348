//! Where chunks start and end: at file boundaries for small files, every [`max`] bytes inside
//! large ones.
//!
//! [`max`]: chunk_boundaries

use kof_nar::listing::ListingNode;

/// The chunks of a NAR of `nar_size` bytes whose tree is `root`, as `(nar_offset, nar_len)`
/// covering `0..nar_size` in order.
///
/// - A regular file of at most `max` bytes lies whole inside one chunk: when adding it would
///   make the current chunk longer than `max`, a new chunk starts at the file's first byte.
/// - A larger file starts a chunk of its own at its first byte and is cut every `max` bytes
///   from there; its last piece goes on with the NAR bytes that follow.
/// - The NAR's framing between files (names, lengths, padding, symlinks, directories) rides
///   with its neighbours; where it alone runs past `max` (a path of many thousands of
///   symlinks), it is cut every `max` bytes too, never inside a file, so no chunk is much
///   larger than `max`.
pub fn chunk_boundaries(root: &ListingNode, nar_size: u64, max: u64) -> Vec<(u64, u64)> {
    let max = max.max(1);
    let mut files = Vec::new();
    extents(root, &mut files);
    files.sort_unstable();
    let mut cuts = vec![0u64];
    for &(off, size) in &files {
        let start = *cuts.last().expect("cuts starts with 0");
        let end = off + size;
        if off < start {
            continue;
        }
        if size > max {
            if off > start {
                cuts.push(off);
            }
            let mut c = off + max;
            while c < end {
                cuts.push(c);
                c += max;
            }
        } else if end - start > max && off > start {
            cuts.push(off);
        }
    }
    cuts.retain(|c| *c < nar_size);
    cuts.dedup();
    let cuts = split_framing(&cuts, &files, nar_size, max);
    let mut out = Vec::with_capacity(cuts.len());
    for (i, s) in cuts.iter().enumerate() {
        let e = cuts.get(i + 1).copied().unwrap_or(nar_size);
        if e > *s {
            out.push((*s, e - s));
        }
    }
    out
}

/// Adds cuts inside chunks longer than `max` (framing between files), every `max` bytes, each
/// moved back to the start of a file it would fall in (when that file starts after the
/// previous cut). `files` is sorted by offset.
fn split_framing(cuts: &[u64], files: &[(u64, u64)], nar_size: u64, max: u64) -> Vec<u64> {
    let mut out = Vec::with_capacity(cuts.len());
    for (i, &s) in cuts.iter().enumerate() {
        let e = cuts.get(i + 1).copied().unwrap_or(nar_size);
        out.push(s);
        let mut last = s;
        while e - last > max {
            let mut c = last + max;
            // The file holding byte c, if any: cut at its start instead.
            let j = files.partition_point(|(off, _)| *off <= c);
            if let Some(&(off, size)) = j.checked_sub(1).map(|j| &files[j]) {
                if off < c && c < off + size {
                    if off > last {
                        c = off;
                    } else {
                        // A large-file piece running over `c`: already cut where it must be.
                        break;
                    }
                }
            }
            out.push(c);
            last = c;
        }
    }
    out
}

fn extents(node: &ListingNode, out: &mut Vec<(u64, u64)>) {
    match node {
        ListingNode::Regular {
            size,
            nar_offset: Some(o),
            ..
        } => out.push((*o, *size)),
        ListingNode::Regular { .. } | ListingNode::Symlink { .. } => {}
        ListingNode::Directory { entries } => entries.values().for_each(|c| extents(c, out)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn file(off: u64, size: u64) -> ListingNode {
        ListingNode::Regular {
            size,
            executable: false,
            nar_offset: Some(off),
        }
    }

    fn dir(files: &[(u64, u64)]) -> ListingNode {
        ListingNode::Directory {
            entries: files
                .iter()
                .enumerate()
                .map(|(i, (o, s))| (format!("f{i:03}"), file(*o, *s)))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn covers(chunks: &[(u64, u64)], nar_size: u64) {
        let mut at = 0;
        for (o, l) in chunks {
            assert_eq!(*o, at, "chunks are contiguous: {chunks:?}");
            assert!(*l > 0);
            at += l;
        }
        assert_eq!(at, nar_size);
    }

    #[test]
    fn small_files_are_whole_in_one_chunk() {
        // Files of 300 bytes with 100 bytes of framing between them; max 1000.
        let files: Vec<_> = (0..20).map(|i| (100 + i * 400, 300)).collect();
        let nar = 100 + 20 * 400;
        let chunks = chunk_boundaries(&dir(&files), nar, 1000);
        covers(&chunks, nar);
        for (o, s) in &files {
            let inside = chunks
                .iter()
                .filter(|(co, cl)| *co <= *o && o + s <= co + cl)
                .count();
            assert_eq!(inside, 1, "file at {o} lies whole in one chunk: {chunks:?}");
        }
        assert!(chunks.len() >= 8, "{chunks:?}");
    }

    #[test]
    fn large_files_are_split_at_max_from_their_start() {
        let chunks = chunk_boundaries(&dir(&[(50, 100), (300, 2500), (2900, 10)]), 3000, 1000);
        covers(&chunks, 3000);
        assert_eq!(
            chunks,
            vec![(0, 300), (300, 1000), (1300, 1000), (2300, 700)]
        );
    }

    #[test]
    fn framing_alone_is_cut_too_but_never_inside_a_file() {
        // 10 000 bytes of framing (symlinks, say) around two small files; max 1000.
        let chunks = chunk_boundaries(&dir(&[(4000, 600), (9000, 50)]), 10_000, 1000);
        covers(&chunks, 10_000);
        assert!(chunks.iter().all(|(_, l)| *l <= 1000), "{chunks:?}");
        for (o, s) in [(4000u64, 600u64), (9000, 50)] {
            assert!(
                chunks.iter().any(|(co, cl)| *co <= o && o + s <= co + cl),
                "file at {o} whole in one chunk: {chunks:?}"
            );
        }
    }

    #[test]
    fn a_single_file_nar() {
        let chunks = chunk_boundaries(&file(96, 10), 112, 1000);
        assert_eq!(chunks, vec![(0, 112)]);
        let chunks = chunk_boundaries(&file(96, 2500), 2600, 1000);
        assert_eq!(chunks, vec![(0, 96), (96, 1000), (1096, 1000), (2096, 504)]);
    }
}
