//! The published narinfo: the source's text with the fields naming the NAR file changed.

use kof_nar::{Compression, NixHash};

/// Rewrites narinfo `text` so it names a new NAR file: `URL`, `Compression`, `FileHash` and
/// `FileSize` get the values given (added in Nix's field order where the source lacks them);
/// every other line, `Sig:` lines and fields kof does not know included, is kept as it is.
pub fn rewrite_narinfo(
    text: &str,
    url: &str,
    compression: Compression,
    file_hash: &NixHash,
    file_size: u64,
) -> String {
    let has = |key: &str| text.lines().any(|l| l.starts_with(&format!("{key}: ")));
    let (has_compression, has_hash, has_size) =
        (has("Compression"), has("FileHash"), has("FileSize"));
    let compression_line = format!("Compression: {compression}");
    let hash_line = format!("FileHash: {file_hash}");
    let size_line = format!("FileSize: {file_size}");
    let mut out = Vec::new();
    let after_compression = |out: &mut Vec<String>| {
        if !has_hash {
            out.push(hash_line.clone());
        }
        if !has_size {
            out.push(size_line.clone());
        }
    };
    for line in text.lines() {
        let key = line.split_once(": ").map(|(k, _)| k);
        match key {
            Some("URL") => {
                out.push(format!("URL: {url}"));
                if !has_compression {
                    out.push(compression_line.clone());
                    after_compression(&mut out);
                }
            }
            Some("Compression") => {
                out.push(compression_line.clone());
                after_compression(&mut out);
            }
            Some("FileHash") => out.push(hash_line.clone()),
            Some("FileSize") => out.push(size_line.clone()),
            _ => out.push(line.to_string()),
        }
    }
    let mut s = out.join("\n");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use kof_nar::NarInfo;

    const XZ: &str = "StorePath: /nix/store/gqfp6kcvhd30nkr6ydcmr0kljk7f0g8a-pkg2
URL: nar/0000000000000000000000000000000000000000000000000000.nar.xz
Compression: xz
FileHash: sha256:1ngxzidcy58dypff88rhfvxp2hjbd7v3za0dw5kq8b5b82i3m7jj
FileSize: 500
NarHash: sha256:1ngxzidcy58dypff88rhfvxp2hjbd7v3za0dw5kq8b5b82i3m7jj
NarSize: 824
References: gqfp6kcvhd30nkr6ydcmr0kljk7f0g8a-pkg2
Deriver: unknown-deriver
X-Custom: kept
Sig: cache.example-1:6wzr1QlOPHG+knFuJIaw+85Z5ivwbdI512JikexG+nQ7JDSZM2hw8zzlcLOguSjLmTFRmVTLQm03d7ed3zz+DQ==
";

    #[test]
    fn changes_the_file_fields_and_keeps_the_rest() {
        let h = NixHash::digest(b"x");
        let out = rewrite_narinfo(XZ, "nar/abc.nar.zst", Compression::Zstd, &h, 77);
        let expected = XZ
            .replace(
                "URL: nar/0000000000000000000000000000000000000000000000000000.nar.xz",
                "URL: nar/abc.nar.zst",
            )
            .replace("Compression: xz", "Compression: zstd")
            .replace(
                "FileHash: sha256:1ngxzidcy58dypff88rhfvxp2hjbd7v3za0dw5kq8b5b82i3m7jj",
                &format!("FileHash: {h}"),
            )
            .replace("FileSize: 500", "FileSize: 77");
        assert_eq!(out, expected);
    }

    #[test]
    fn adds_missing_fields_in_nix_order() {
        // bzip2 is implied by an absent Compression; FileHash and FileSize are optional.
        let text: String = XZ
            .lines()
            .filter(|l| !l.starts_with("Compression") && !l.starts_with("File"))
            .map(|l| format!("{l}\n"))
            .collect();
        let h = NixHash::digest(b"y");
        let out = rewrite_narinfo(&text, "nar/x.nar.zst", Compression::Zstd, &h, 9);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[1], "URL: nar/x.nar.zst");
        assert_eq!(lines[2], "Compression: zstd");
        assert_eq!(lines[3], format!("FileHash: {h}"));
        assert_eq!(lines[4], "FileSize: 9");
        assert!(lines[5].starts_with("NarHash: "));
        let info = NarInfo::parse(&out).unwrap();
        assert_eq!(info.file_size, Some(9));
        assert_eq!(info.sigs.len(), 1);
    }
}
