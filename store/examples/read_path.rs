//! Measures the store's read path for raw versus zstd objects, to check that compressing at
//! rest "where it pays" does not cost the FUSE view too much.
//!
//! `cargo run --release -p kof-store --example read_path [MiB]` builds one file of MiB
//! (default 256) from each of three sources: incompressible random bytes (stored raw), real
//! ELF binaries and libraries concatenated from /usr/lib and /usr/bin (what store paths
//! mostly hold), and generated text. For each it reports ingest speed, the bytes on disk,
//! a sequential read through `open_file`, a sequential read through `read_file_range` in
//! 128 KiB blocks (what FUSE does), and random 128 KiB `read_file_range` reads.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek};
use std::path::Path;
use std::time::Instant;

use kof_nar::hash::HashingReader;
use kof_nar::nar::NarWriter;
use kof_nar::{Compression, NarInfo, StorePath};
use kof_store::{NodeKind, Store};

const BLOCK: usize = 128 << 10;

/// A cheap deterministic byte generator (xorshift), so the example needs no extra crates.
struct Random(u64);
impl Read for Random {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let b = self.0.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        Ok(buf.len())
    }
}

/// Word salad: compresses like source code or documentation.
struct Text(u64);
impl Read for Text {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        const WORDS: [&str; 16] = [
            "fn ", "let ", "store", "path", "(", ")", "{\n", "}\n", "object", " = ", "chunk",
            "self.", "return ", "if ", "0x1f", "; ",
        ];
        let mut n = 0;
        while n < buf.len() {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let w = WORDS[(self.0 % 16) as usize].as_bytes();
            let k = w.len().min(buf.len() - n);
            buf[n..n + k].copy_from_slice(&w[..k]);
            n += k;
        }
        Ok(n)
    }
}

/// Real binaries: every regular file under /usr/lib and /usr/bin, one after the other (and
/// over again if they are not enough), opened one at a time.
struct Binaries {
    files: Vec<std::path::PathBuf>,
    next: usize,
    current: Option<File>,
}

impl Read for Binaries {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(f) = &mut self.current {
                let n = f.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
            }
            let p = &self.files[self.next % self.files.len()];
            self.next += 1;
            self.current = File::open(p).ok();
        }
    }
}

fn binaries() -> Box<dyn Read> {
    let mut files = Vec::new();
    let mut stack = vec![Path::new("/usr/lib").to_path_buf(), "/usr/bin".into()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                files.push(e.path());
            }
        }
    }
    files.sort();
    Box::new(Binaries {
        files,
        next: 0,
        current: None,
    })
}

fn mib_s(bytes: u64, secs: f64) -> String {
    format!("{:7.0} MiB/s", bytes as f64 / (1 << 20) as f64 / secs)
}

fn main() {
    let mib: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(256);
    let size = mib << 20;
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    println!(
        "file of {mib} MiB; FUSE-style blocks of {} KiB",
        BLOCK >> 10
    );
    let sources: Vec<(&str, Box<dyn Read>)> = vec![
        ("random", Box::new(Random(0x9e3779b97f4a7c15))),
        ("binaries", binaries()),
        ("text", Box::new(Text(42))),
    ];
    for (i, (name, source)) in sources.into_iter().enumerate() {
        // The NAR of a single-file store path, on disk.
        let nar_path = tmp.path().join(format!("{name}.nar"));
        {
            let mut w = NarWriter::new(BufWriter::new(File::create(&nar_path).unwrap())).unwrap();
            w.regular(false, size, &mut source.take(size)).unwrap();
            w.finish().unwrap();
        }
        let mut f = File::open(&nar_path).unwrap();
        let mut h = HashingReader::new(&mut f);
        io::copy(&mut h, &mut io::sink()).unwrap();
        let (nar_hash, nar_size, _) = h.finish();
        f.rewind().unwrap();
        let store_path =
            StorePath::from_base_name(&format!("{}-{name}", "0".repeat(31) + &i.to_string()))
                .unwrap();
        let info = NarInfo {
            store_path: store_path.clone(),
            url: "nar/x.nar".into(),
            compression: Compression::None,
            file_hash: None,
            file_size: None,
            nar_hash,
            nar_size,
            references: vec![],
            deriver: None,
            system: None,
            sigs: vec![],
            ca: None,
        };
        let t = Instant::now();
        let stats = store
            .ingest_nar(&info, "bench", &mut BufReader::new(f))
            .unwrap();
        let ingest = t.elapsed().as_secs_f64();
        let content = match &store.tree(&store_path).unwrap()[0].kind {
            NodeKind::Regular { content, .. } => *content,
            _ => unreachable!(),
        };
        let pieces = store.file_pieces(&content).unwrap();
        let zstd = pieces
            .iter()
            .filter(|p| p.object.codec == kof_store::Codec::Zstd)
            .count();

        // What one zstd frame per object (instead of 64 KiB frames) would have stored.
        let mut one_frame = 0u64;
        for p in &pieces {
            let mut data = vec![0u8; p.object.size as usize];
            store
                .read_file_range(&content, p.offset, &mut data)
                .unwrap();
            let z = zstd::bulk::compress(&data, kof_store::objects::ZSTD_LEVEL).unwrap();
            one_frame += (z.len() as u64).min(p.object.size);
        }

        let t = Instant::now();
        let mut r = store.open_file(&content).unwrap();
        let mut buf = vec![0u8; BLOCK];
        let mut total = 0u64;
        loop {
            let n = r.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        assert_eq!(total, size);
        let seq_stream = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let mut off = 0;
        while off < size {
            off += store.read_file_range(&content, off, &mut buf).unwrap() as u64;
        }
        let seq_range = t.elapsed().as_secs_f64();

        let reads = 2000u64;
        let mut rng = Random(7);
        let t = Instant::now();
        for _ in 0..reads {
            let mut b = [0u8; 8];
            rng.read_exact(&mut b).unwrap();
            let at = u64::from_le_bytes(b) % (size - BLOCK as u64);
            store.read_file_range(&content, at, &mut buf).unwrap();
        }
        let random = t.elapsed().as_secs_f64();

        println!(
            "{name:>8}: {} objects ({zstd} zstd), on disk {:5.1}% of {mib} MiB (one frame per \
             object: {:5.1}%) | ingest {} | open_file seq {} | read_file_range seq {} | \
             random 128K reads {:6.0}/s ({:.0} us each)",
            stats.objects,
            100.0 * stats.new_stored_bytes as f64 / size as f64,
            100.0 * one_frame as f64 / size as f64,
            mib_s(nar_size, ingest),
            mib_s(size, seq_stream),
            mib_s(size, seq_range),
            reads as f64 / random,
            random * 1e6 / reads as f64,
        );
        std::fs::remove_file(&nar_path).unwrap();
    }
}
