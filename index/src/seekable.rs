//! Seekable zstd NAR files: one independent zstd frame per chunk, then zstd's seekable-format
//! seek table in a skippable frame (`contrib/seekable_format/zstd_seekable_compression_format.md`
//! in the zstd sources).
//!
//! Written by hand because the seek table is thirty lines of framing, while the crates that
//! implement the seekable format bind zstd's C `contrib` code, which the `zstd` crate does not
//! build. Any zstd decoder reads the file as one stream (it skips the skippable frame), so the
//! file stays a valid `Compression: zstd` NAR for stock Nix.

use std::io::{self, Write};

use crate::format::IndexChunk;

/// Magic of a skippable frame carrying a seek table.
const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
/// Magic at the very end of a seekable file.
const SEEKABLE_MAGIC: u32 = 0x8F92_EAB1;

/// Writes chunks as independent zstd frames and records where each went.
pub struct SeekableWriter<W: Write> {
    out: W,
    level: i32,
    compressor: zstd::bulk::Compressor<'static>,
    chunks: Vec<IndexChunk>,
    nar_at: u64,
    file_at: u64,
}

impl<W: Write> SeekableWriter<W> {
    /// A writer compressing at zstd `level`.
    pub fn new(out: W, level: i32) -> io::Result<Self> {
        Ok(SeekableWriter {
            out,
            level,
            compressor: zstd::bulk::Compressor::new(level)?,
            chunks: Vec::new(),
            nar_at: 0,
            file_at: 0,
        })
    }

    /// The zstd level.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Compresses the next chunk (the NAR bytes after the previous one) into a frame of its
    /// own, with its content size in the frame header.
    pub fn chunk(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.compressor
            .set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(true))?;
        let frame = self.compressor.compress(bytes)?;
        self.out.write_all(&frame)?;
        self.chunks.push(IndexChunk {
            nar_offset: self.nar_at,
            nar_len: bytes.len() as u64,
            file_offset: self.file_at,
            file_len: frame.len() as u64,
            digest: *blake3::hash(bytes).as_bytes(),
        });
        self.nar_at += bytes.len() as u64;
        self.file_at += frame.len() as u64;
        Ok(())
    }

    /// Writes the seek table and returns the output, the chunk table, and the file's length.
    pub fn finish(mut self) -> io::Result<(W, Vec<IndexChunk>, u64)> {
        let table = seek_table(&self.chunks)?;
        self.out.write_all(&table)?;
        self.file_at += table.len() as u64;
        Ok((self.out, self.chunks, self.file_at))
    }
}

/// The seek table frame for `chunks` (no per-frame checksums).
fn seek_table(chunks: &[IndexChunk]) -> io::Result<Vec<u8>> {
    let too_big = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "chunk too large for a seek table",
        )
    };
    let entries = chunks.len() * 8;
    let mut t = Vec::with_capacity(8 + entries + 9);
    t.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    t.extend_from_slice(
        &u32::try_from(entries + 9)
            .map_err(|_| too_big())?
            .to_le_bytes(),
    );
    for c in chunks {
        t.extend_from_slice(
            &u32::try_from(c.file_len)
                .map_err(|_| too_big())?
                .to_le_bytes(),
        );
        t.extend_from_slice(
            &u32::try_from(c.nar_len)
                .map_err(|_| too_big())?
                .to_le_bytes(),
        );
    }
    t.extend_from_slice(
        &u32::try_from(chunks.len())
            .map_err(|_| too_big())?
            .to_le_bytes(),
    );
    t.push(0); // descriptor: no checksums
    t.extend_from_slice(&SEEKABLE_MAGIC.to_le_bytes());
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn frames_decode_alone_and_the_file_decodes_whole() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = SeekableWriter::new(Vec::new(), 3).unwrap();
        for piece in data.chunks(65_536) {
            w.chunk(piece).unwrap();
        }
        let (file, chunks, len) = w.finish().unwrap();
        assert_eq!(file.len() as u64, len);
        // The whole file is one zstd stream to a stock decoder (the seek table is skipped).
        let mut whole = Vec::new();
        zstd::stream::read::Decoder::new(&file[..])
            .unwrap()
            .read_to_end(&mut whole)
            .unwrap();
        assert_eq!(whole, data);
        // Each frame decodes alone to its chunk.
        for c in &chunks {
            let raw = &file[c.file_range().start as usize..c.file_range().end as usize];
            let bytes = zstd::bulk::decompress(raw, c.nar_len as usize).unwrap();
            assert_eq!(
                bytes,
                &data[c.nar_range().start as usize..c.nar_range().end as usize]
            );
        }
        // The footer is the seekable magic.
        assert_eq!(&file[file.len() - 4..], &SEEKABLE_MAGIC.to_le_bytes());
    }
}
