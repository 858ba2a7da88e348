//! The index format end to end on a real NAR: build (chunk boundaries, seekable frames), sign,
//! open, and every way an index or a chunk can lie.

use kof_index::seekable::SeekableWriter;
use kof_index::{
    chunk_boundaries, ChunkCompression, ChunkError, Expected, Index, IndexError, VerifiedIndex,
};
use kof_nar::listing::{listing_of_nar, ListingNode};
use kof_nar::signature::{PublicKey, SecretKey};
use kof_nar::{NixHash, StorePath};

struct Built {
    nar: Vec<u8>,
    file: Vec<u8>,
    index: Index,
    key: SecretKey,
}

fn build() -> Built {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pkg");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("lib")).unwrap();
    std::fs::write(root.join("bin/hello"), b"#!/bin/sh\necho hello\n").unwrap();
    let big: Vec<u8> = (0..700_000u32).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(root.join("lib/big.so"), &big).unwrap();
    for i in 0..50 {
        std::fs::write(
            root.join(format!("lib/small{i}.py")),
            format!("x = {i}\n").repeat(200),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("hello", root.join("bin/hi")).unwrap();
    let nar = kof_nar::nar::dump_path(&root, Vec::new()).unwrap();
    let listing = listing_of_nar(&nar[..]).unwrap();
    let mut w = SeekableWriter::new(Vec::new(), 3).unwrap();
    for (o, l) in chunk_boundaries(&listing.root, nar.len() as u64, 64 << 10) {
        w.chunk(&nar[o as usize..(o + l) as usize]).unwrap();
    }
    let (file, chunks, _) = w.finish().unwrap();
    let index = Index {
        store_path: StorePath::from_base_name("7w4dipmv4f1fm5832c22jxax1jp7klax-pkg-1.0").unwrap(),
        nar_hash: NixHash::digest(&nar),
        nar_size: nar.len() as u64,
        compression: ChunkCompression::Zstd,
        root: listing.root,
        chunks,
    };
    Built {
        nar,
        file,
        index,
        key: SecretKey::generate("test-1"),
    }
}

fn open(b: &Built, file: &[u8], trusted: &[PublicKey]) -> Result<VerifiedIndex, IndexError> {
    VerifiedIndex::open(
        file,
        Expected {
            store_path: &b.index.store_path,
            nar_hash: &b.index.nar_hash,
            nar_size: b.index.nar_size,
        },
        trusted,
    )
}

#[test]
fn a_signed_index_opens_and_every_chunk_decodes_to_the_nar() {
    let b = build();
    let v = open(&b, &b.index.to_file(&[&b.key]), &[b.key.public()]).unwrap();
    assert_eq!(v.signer(), "test-1");
    assert!(v.index().chunks.len() > 10);
    let mut nar = Vec::new();
    for (i, c) in v.index().chunks.iter().enumerate() {
        let raw = &b.file[c.file_offset as usize..(c.file_offset + c.file_len) as usize];
        nar.extend(v.decode_chunk(i, raw).unwrap());
    }
    assert_eq!(nar, b.nar);
    // chunks_for finds exactly the chunks overlapping a range.
    let idx = v.index();
    let r = idx.chunks_for(100, idx.nar_size);
    assert_eq!(r, 0..idx.chunks.len());
    let c5 = idx.chunks[5];
    assert_eq!(idx.chunks_for(c5.nar_offset, c5.nar_offset + 1), 5..6);
    assert_eq!(
        idx.chunks_for(
            c5.nar_offset + c5.nar_len - 1,
            c5.nar_offset + c5.nar_len + 1
        ),
        5..7
    );
}

#[test]
fn a_lying_chunk_is_refused() {
    let b = build();
    let v = open(&b, &b.index.to_file(&[&b.key]), &[b.key.public()]).unwrap();
    let c = v.index().chunks[3];
    let raw = &b.file[c.file_offset as usize..(c.file_offset + c.file_len) as usize];
    // Valid zstd, other content.
    let mut other = zstd::bulk::decompress(raw, c.nar_len as usize).unwrap();
    other[10] ^= 1;
    let recompressed = zstd::bulk::compress(&other, 19).unwrap();
    let mut padded = recompressed.clone();
    padded.resize(c.file_len as usize, 0);
    let err = v.decode_chunk(3, &recompressed).unwrap_err();
    assert!(
        matches!(
            err,
            ChunkError::FileLength { .. } | ChunkError::Digest { .. }
        ),
        "{err}"
    );
    // A flipped byte in the frame.
    let mut flipped = raw.to_vec();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let err = v.decode_chunk(3, &flipped).unwrap_err();
    assert!(
        matches!(
            err,
            ChunkError::Decode { .. } | ChunkError::Digest { .. } | ChunkError::NarLength { .. }
        ),
        "{err}"
    );
    // Right length, wrong bytes, uncompressed check.
    let err = v.check_chunk(3, &other).unwrap_err();
    assert!(matches!(err, ChunkError::Digest { index: 3, .. }), "{err}");
    assert!(err.to_string().contains("does not match"), "{err}");
}

fn retarget(node: &mut ListingNode) -> bool {
    match node {
        ListingNode::Symlink { target } => {
            *target = "/etc/shadow".into();
            true
        }
        ListingNode::Directory { entries } => entries.values_mut().any(retarget),
        ListingNode::Regular { .. } => false,
    }
}

#[test]
fn a_lying_or_foreign_index_is_refused() {
    let b = build();
    let trusted = [b.key.public()];
    let good = b.index.to_file(&[&b.key]);
    // The tree lies after signing: a symlink retargeted in the body.
    let mut lying = b.index.clone();
    assert!(retarget(&mut lying.root));
    let body = lying.body();
    let head_len = good.len() - b.index.body().len();
    let mut forged = good[..head_len].to_vec();
    forged.extend_from_slice(&body);
    assert!(matches!(
        open(&b, &forged, &trusted),
        Err(IndexError::BadSignature { .. })
    ));
    // A chunk digest changed.
    let mut lying = b.index.clone();
    lying.chunks[2].digest[0] ^= 1;
    let mut forged = good[..head_len].to_vec();
    forged.extend_from_slice(&lying.body());
    assert!(matches!(
        open(&b, &forged, &trusted),
        Err(IndexError::BadSignature { .. })
    ));
    // Signed by an untrusted key.
    let stranger = SecretKey::generate("stranger-1");
    let err = open(&b, &b.index.to_file(&[&stranger]), &trusted).unwrap_err();
    assert!(matches!(err, IndexError::Untrusted { .. }), "{err}");
    // Unsigned.
    assert!(matches!(
        open(&b, &b.index.to_file(&[]), &trusted),
        Err(IndexError::Unsigned)
    ));
    // Made (and properly signed) for another NarHash.
    let mut other = b.index.clone();
    other.nar_hash = NixHash::digest(b"another nar");
    let err = open(&b, &other.to_file(&[&b.key]), &trusted).unwrap_err();
    assert!(
        matches!(
            err,
            IndexError::OtherNar {
                what: "NarHash",
                ..
            }
        ),
        "{err}"
    );
    // A trusted signer's index with a gap in its chunk table is still refused.
    let mut gap = b.index.clone();
    gap.chunks[1].nar_offset += 1;
    let err = open(&b, &gap.to_file(&[&b.key]), &trusted).unwrap_err();
    assert!(matches!(err, IndexError::Invalid(_)), "{err}");
    // Garbage.
    assert!(matches!(
        open(&b, b"hello", &trusted),
        Err(IndexError::Header(_))
    ));
}
