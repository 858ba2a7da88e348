//! The `Content-Encoding` of binary-cache metadata, decoded the way Nix decodes it.
//!
//! S3-hosted caches (cache.nixos.org among them) serve `.ls` listings, and with Nix ≥ 2.30
//! narinfos too, with a `Content-Encoding` header: `br` on older uploads, `zstd` on newer.
//! Nix decodes every body by that header (`br` itself, the rest through libarchive), so kof
//! decodes the same set: `br`, `zstd`, `xz`, `gzip` (also spelt `x-gzip`) and `bzip2`. No
//! header, an empty one, `identity` or `none` leaves the body as it is. Anything else,
//! `deflate` and lists of codings included, is refused by name rather than guessed at.
//!
//! [`decode`] is the one entry point. Its output is bounded: a body that decodes to more than
//! the caller's limit (a decompression bomb) is refused before more than `limit + 1` bytes are
//! produced. This module decodes metadata only; NAR bodies are decompressed by the fetcher
//! according to the narinfo's `Compression`, never by a header.

use std::fmt;
use std::io::Read;

use thiserror::Error;

/// A `Content-Encoding` kof decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// Brotli (`br`).
    Brotli,
    /// Zstandard (`zstd`).
    Zstd,
    /// xz (`xz`).
    Xz,
    /// gzip (`gzip`, `x-gzip`).
    Gzip,
    /// bzip2 (`bzip2`).
    Bzip2,
}

impl Encoding {
    /// Every encoding, in the order the docs list them.
    pub const ALL: [Encoding; 5] = [
        Encoding::Brotli,
        Encoding::Zstd,
        Encoding::Xz,
        Encoding::Gzip,
        Encoding::Bzip2,
    ];

    /// The header value a server sends for it (`br`, `zstd`, `xz`, `gzip`, `bzip2`).
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Brotli => "br",
            Encoding::Zstd => "zstd",
            Encoding::Xz => "xz",
            Encoding::Gzip => "gzip",
            Encoding::Bzip2 => "bzip2",
        }
    }

    /// What a `Content-Encoding` header value asks for: `Ok(None)` for no encoding (an absent
    /// or empty header, `identity`, `none`), `Ok(Some(_))` for one kof decodes, and
    /// [`DecodeError::Unknown`] for anything else. Names are matched without regard to case
    /// or surrounding blanks.
    pub fn from_header(value: Option<&str>) -> Result<Option<Encoding>, DecodeError> {
        let Some(raw) = value else {
            return Ok(None);
        };
        let name = raw.trim().to_ascii_lowercase();
        Ok(Some(match name.as_str() {
            "" | "identity" | "none" => return Ok(None),
            "br" => Encoding::Brotli,
            "zstd" => Encoding::Zstd,
            "xz" => Encoding::Xz,
            "gzip" | "x-gzip" => Encoding::Gzip,
            "bzip2" => Encoding::Bzip2,
            _ => {
                return Err(DecodeError::Unknown {
                    encoding: raw.to_string(),
                })
            }
        }))
    }

    /// A reader of `body` decoded.
    fn decoder<'a>(self, body: &'a [u8]) -> std::io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Encoding::Brotli => Box::new(brotli_decompressor::Decompressor::new(body, 64 * 1024)),
            Encoding::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(body)?),
            // Concatenated streams are one body, as Nix's LZMA_CONCATENATED decoder reads them.
            Encoding::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(body)),
            Encoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(body)),
            Encoding::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(body)),
        })
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a Content-Encoded body was refused.
#[derive(Debug, Error)]
pub enum DecodeError {
    /// The header names an encoding kof does not decode.
    #[error("unknown Content-Encoding {encoding:?} (kof decodes br, zstd, xz, gzip and bzip2)")]
    Unknown {
        /// The header value as received.
        encoding: String,
    },
    /// The body is not valid in its encoding (corrupt, truncated, or not encoded at all).
    #[error("corrupt {encoding}-encoded body")]
    Corrupt {
        /// The encoding.
        encoding: Encoding,
        /// The decoder's error.
        #[source]
        source: std::io::Error,
    },
    /// The body decodes to more than the limit.
    #[error("{encoding}-encoded body decodes to more than {limit} bytes")]
    TooLarge {
        /// The encoding.
        encoding: Encoding,
        /// The limit on decoded bytes.
        limit: usize,
    },
}

impl DecodeError {
    /// The encoding as the header named it (`br`, `zstd`, ..., or the unknown value).
    pub fn encoding(&self) -> &str {
        match self {
            DecodeError::Unknown { encoding } => encoding,
            DecodeError::Corrupt { encoding, .. } | DecodeError::TooLarge { encoding, .. } => {
                encoding.name()
            }
        }
    }
}

/// Decodes `body` as the `Content-Encoding` header `content_encoding` says (`None`: no
/// header), producing at most `limit` bytes. A body without an encoding comes back as it is
/// (even if longer than `limit`: the caller bounds what it reads).
pub fn decode(
    content_encoding: Option<&str>,
    body: Vec<u8>,
    limit: usize,
) -> Result<Vec<u8>, DecodeError> {
    match Encoding::from_header(content_encoding)? {
        None => Ok(body),
        Some(encoding) => decode_as(encoding, &body, limit),
    }
}

/// Decodes `body` in `encoding`, producing at most `limit` bytes.
pub fn decode_as(encoding: Encoding, body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let corrupt = |source| DecodeError::Corrupt { encoding, source };
    let reader = encoding.decoder(body).map_err(corrupt)?;
    let mut out = Vec::new();
    // One byte past the limit tells a body of exactly `limit` bytes from a larger one.
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(corrupt)?;
    if out.len() > limit {
        return Err(DecodeError::TooLarge { encoding, limit });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn encode(encoding: Encoding, data: &[u8]) -> Vec<u8> {
        match encoding {
            Encoding::Brotli => {
                let mut w = brotli::CompressorWriter::new(Vec::new(), 4096, 9, 22);
                w.write_all(data).unwrap();
                w.into_inner()
            }
            Encoding::Zstd => zstd::encode_all(data, 3).unwrap(),
            Encoding::Xz => {
                let mut w = xz2::write::XzEncoder::new(Vec::new(), 6);
                w.write_all(data).unwrap();
                w.finish().unwrap()
            }
            Encoding::Gzip => {
                let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
                w.write_all(data).unwrap();
                w.finish().unwrap()
            }
            Encoding::Bzip2 => {
                let mut w = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
                w.write_all(data).unwrap();
                w.finish().unwrap()
            }
        }
    }

    #[test]
    fn every_encoding_round_trips_and_identity_is_untouched() {
        let data = b"StorePath: /nix/store/x\nURL: nar/x.nar\n".repeat(100);
        for enc in Encoding::ALL {
            let body = encode(enc, &data);
            assert_ne!(body, data, "{enc}");
            assert_eq!(
                decode(Some(enc.name()), body, 1 << 20).unwrap(),
                data,
                "{enc}"
            );
        }
        for header in [None, Some(""), Some("identity"), Some(" none ")] {
            assert_eq!(decode(header, data.clone(), 1).unwrap(), data, "{header:?}");
        }
        let gz = encode(Encoding::Gzip, &data);
        assert_eq!(decode(Some("X-GZIP"), gz, 1 << 20).unwrap(), data);
    }

    #[test]
    fn a_bomb_is_refused_at_the_limit() {
        // 16 MiB of zeros: a few kilobytes at most in every encoding.
        let zeros = vec![0u8; 16 << 20];
        let limit = 1 << 20;
        for enc in Encoding::ALL {
            let body = encode(enc, &zeros);
            assert!(body.len() < 64 << 10, "{enc}: {} bytes", body.len());
            match decode(Some(enc.name()), body, limit) {
                Err(DecodeError::TooLarge { encoding, limit: l }) => {
                    assert_eq!((encoding, l), (enc, limit));
                }
                other => panic!("{enc}: {other:?}"),
            }
        }
    }

    #[test]
    fn exactly_the_limit_is_accepted() {
        let data = vec![7u8; 4096];
        for enc in Encoding::ALL {
            let body = encode(enc, &data);
            assert_eq!(decode_as(enc, &body, 4096).unwrap(), data, "{enc}");
            assert!(
                matches!(
                    decode_as(enc, &body, 4095),
                    Err(DecodeError::TooLarge { .. })
                ),
                "{enc}"
            );
        }
    }

    #[test]
    fn unknown_and_corrupt_bodies_are_typed_errors() {
        for header in ["compress", "deflate", "gzip, br", "x-kof"] {
            match decode(Some(header), b"x".to_vec(), 100) {
                Err(e @ DecodeError::Unknown { .. }) => assert_eq!(e.encoding(), header),
                other => panic!("{header}: {other:?}"),
            }
        }
        let data = b"not encoded at all, just text\n".repeat(10);
        for enc in Encoding::ALL {
            // Plain text under an encoding's name, and an encoded body cut in half.
            let encoded = encode(enc, &data);
            for body in [data.clone(), encoded[..encoded.len() / 2].to_vec()] {
                match decode(Some(enc.name()), body, 1 << 20) {
                    Err(e @ DecodeError::Corrupt { .. }) => {
                        assert_eq!(e.encoding(), enc.name());
                        assert!(std::error::Error::source(&e).is_some());
                    }
                    other => panic!("{enc}: {other:?}"),
                }
            }
        }
    }
}
