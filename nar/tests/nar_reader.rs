//! The NAR reader against hostile archives, and the writer against the real Nix.
//!
//! Malformed archives are written token by token (the grammar's strings, each length-prefixed
//! and zero-padded), so each test states exactly which rule it breaks.

use std::io::Read;

use kof_nar::nar::{self, Limits, NarError, NarVisitor, NarWriter, Restorer};
use kof_testkit::nix_dump;

/// Serialises tokens the way NAR does.
fn tokens(ts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in ts {
        out.extend_from_slice(&(t.len() as u64).to_le_bytes());
        out.extend_from_slice(t);
        out.resize(out.len() + (8 - t.len() % 8) % 8, 0);
    }
    out
}

/// A directory archive with the given (name, contents) regular-file entries, in the given order.
fn dir_with(entries: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut ts: Vec<&[u8]> = vec![b"nix-archive-1", b"(", b"type", b"directory"];
    for (name, contents) in entries {
        ts.extend_from_slice(&[
            b"entry",
            b"(",
            b"name",
            name,
            b"node",
            b"(",
            b"type",
            b"regular",
            b"contents",
            contents,
            b")",
            b")",
        ]);
    }
    ts.push(b")");
    tokens(&ts)
}

/// Counts what it sees, reading every file.
#[derive(Debug, Default)]
struct Count {
    files: usize,
    bytes: u64,
}

impl NarVisitor for Count {
    fn regular(
        &mut self,
        _: Option<&[u8]>,
        _: bool,
        _: u64,
        _: u64,
        c: &mut dyn Read,
    ) -> Result<(), NarError> {
        self.files += 1;
        self.bytes += std::io::copy(c, &mut std::io::sink())?;
        Ok(())
    }
}

fn parse(bytes: &[u8]) -> Result<Count, NarError> {
    let mut c = Count::default();
    nar::parse(bytes, &mut c)?;
    Ok(c)
}

#[test]
fn a_well_formed_archive_parses() {
    let c = parse(&dir_with(&[(b"a", b"hello"), (b"b", b"")])).unwrap();
    assert_eq!((c.files, c.bytes), (2, 5));
}

#[test]
fn bad_names_are_refused() {
    for name in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0b"] {
        let e = parse(&dir_with(&[(name, b"x")])).unwrap_err();
        assert!(matches!(e, NarError::BadName { .. }), "{name:?}: {e}");
    }
}

#[test]
fn unsorted_and_duplicate_entries_are_refused() {
    let e = parse(&dir_with(&[(b"b", b""), (b"a", b"")])).unwrap_err();
    assert!(matches!(e, NarError::Unsorted { .. }), "{e}");
    let e = parse(&dir_with(&[(b"a", b""), (b"a", b"")])).unwrap_err();
    assert!(matches!(e, NarError::Unsorted { .. }), "{e}");
}

#[test]
fn unknown_tags_and_a_wrong_magic_are_refused() {
    let cases: [(&str, &[&[u8]]); 4] = [
        (
            "unknown type",
            &[b"nix-archive-1", b"(", b"type", b"fifo", b")"],
        ),
        (
            "wrong magic",
            &[
                b"nix-archive-2",
                b"(",
                b"type",
                b"regular",
                b"contents",
                b"",
                b")",
            ],
        ),
        (
            "unknown field",
            &[
                b"nix-archive-1",
                b"(",
                b"type",
                b"regular",
                b"mode",
                b"",
                b")",
            ],
        ),
        (
            "executable with a value",
            &[
                b"nix-archive-1",
                b"(",
                b"type",
                b"regular",
                b"executable",
                b"yes",
                b"contents",
                b"",
                b")",
            ],
        ),
    ];
    for (what, ts) in cases {
        let e = parse(&tokens(ts)).unwrap_err();
        assert!(matches!(e, NarError::UnexpectedToken { .. }), "{what}: {e}");
    }
}

#[test]
fn truncation_anywhere_is_refused() {
    let whole = dir_with(&[(b"a", b"some contents"), (b"b", b"more")]);
    parse(&whole).unwrap();
    for cut in 0..whole.len() {
        let e = parse(&whole[..cut]).unwrap_err();
        assert!(
            matches!(e, NarError::Truncated(_) | NarError::Io(_)),
            "cut at {cut}: {e}"
        );
    }
}

#[test]
fn trailing_bytes_and_non_zero_padding_are_refused() {
    let mut t = dir_with(&[(b"a", b"x")]);
    t.push(0);
    assert!(matches!(parse(&t), Err(NarError::TrailingData(_))));
    // "x" is padded with seven zeros: make one of them non-zero.
    let mut p = dir_with(&[(b"a", b"x")]);
    let at = p.windows(8).position(|w| w == b"x\0\0\0\0\0\0\0").unwrap();
    p[at + 3] = 1;
    assert!(matches!(parse(&p), Err(NarError::BadPadding(_))));
}

#[test]
fn lengths_past_the_limits_are_refused() {
    // A name longer than NAME_MAX.
    let long = vec![b'a'; 256];
    assert!(matches!(
        parse(&dir_with(&[(&long, b"")])),
        Err(NarError::TooLong { .. })
    ));
    // A file claiming an absurd size is refused before anything is read.
    let mut huge = tokens(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
    huge.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(parse(&huge), Err(NarError::TooLong { .. })));
    // A tag token declaring gigabytes is refused without allocating them.
    let mut tag = Vec::new();
    tag.extend_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(parse(&tag), Err(NarError::TooLong { .. })));
    // Nesting deeper than the limit.
    let depth = 5;
    let mut ts: Vec<&[u8]> = vec![b"nix-archive-1"];
    for _ in 0..depth {
        ts.extend_from_slice(&[
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"d",
            b"node",
        ]);
    }
    ts.extend_from_slice(&[b"(", b"type", b"directory", b")"]);
    for _ in 0..depth {
        ts.extend_from_slice(&[b")", b")"]);
    }
    let nested = tokens(&ts);
    let mut c = Count::default();
    nar::parse(&nested[..], &mut c).unwrap();
    let limits = Limits {
        max_depth: depth - 1,
        ..Limits::default()
    };
    assert!(matches!(
        nar::parse_with_limits(&nested[..], &mut Count::default(), limits),
        Err(NarError::TooDeep(_))
    ));
}

#[test]
fn restoring_never_writes_outside_the_target() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("out");
    // A symlink pointing out, then a file "through" it: the parser refuses the `/` in the name
    // before the restorer sees it, and the symlink itself is created as a link, never followed.
    let evil = tokens(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
        b"link",
        b"node",
        b"(",
        b"type",
        b"symlink",
        b"target",
        b"..",
        b")",
        b")",
        b"entry",
        b"(",
        b"name",
        b"link/escaped",
        b"node",
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"x",
        b")",
        b")",
        b")",
    ]);
    let e = nar::parse(&evil[..], &mut Restorer::new(&target)).unwrap_err();
    assert!(matches!(e, NarError::BadName { .. }), "{e}");
    assert!(!tmp.path().join("escaped").exists());
    let listed: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(listed.len(), 1, "only the target itself");
    // `..` as an entry name is refused too.
    let target2 = tmp.path().join("out2");
    let e = nar::parse(
        &dir_with(&[(b"..", b"x")])[..],
        &mut Restorer::new(&target2),
    )
    .unwrap_err();
    assert!(matches!(e, NarError::BadName { .. }));
}

#[test]
fn the_writer_and_the_reader_agree_with_the_real_nix() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    std::fs::write(root.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(
        root.join("bin/tool"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(root.join("empty-file"), b"").unwrap();
    std::fs::write(root.join("name with spaces"), b"x").unwrap();
    std::fs::write(root.join("ünïcödé"), vec![7u8; 100_003]).unwrap();
    std::fs::write(root.join("B-upper"), b"sorted before lower-case").unwrap();
    std::os::unix::fs::symlink("/nix/store/abs-target", root.join("abs")).unwrap();
    std::os::unix::fs::symlink("../dangling", root.join("rel")).unwrap();

    let theirs = nix_dump(&root);
    let ours = nar::dump_path(&root, Vec::new()).unwrap();
    assert!(ours == theirs, "dump_path differs from nix-store --dump");

    // Parse Nix's archive and restore it; Nix's dump of our restore is the same archive.
    let restored = tmp.path().join("restored");
    nar::parse(&theirs[..], &mut Restorer::new(&restored)).unwrap();
    assert!(nix_dump(&restored) == theirs);

    // A single file written with NarWriter equals Nix's archive of that file.
    let script: &[u8] = b"#!/bin/sh\necho hi\n";
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.regular(true, script.len() as u64, &mut &script[..])
        .unwrap();
    assert!(w.finish().unwrap() == nix_dump(&root.join("bin/tool")));
}
