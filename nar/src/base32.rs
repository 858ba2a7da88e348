//! nixbase32: Nix's own base-32 (not RFC 4648).
//!
//! Alphabet `0123456789abcdfghijklmnpqrsvwxyz`; the encoded string is written most significant
//! character first while bits are taken from the end of the byte string, so a 32-byte digest is 52
//! characters and a 20-byte store path hash is 32.

use thiserror::Error;

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a nixbase32 string was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Base32Error {
    /// The string holds a character outside the alphabet.
    #[error("invalid nixbase32 character {0:?}")]
    InvalidChar(char),
    /// The string's length is not that of the expected number of bytes.
    #[error("nixbase32 string has length {got}, expected {expected}")]
    BadLength {
        /// characters received
        got: usize,
        /// characters expected
        expected: usize,
    },
    /// Bits beyond the last byte are set: the string is not a canonical encoding.
    #[error("nixbase32 string has non-zero padding bits")]
    NonZeroPadding,
}

/// Length of the nixbase32 encoding of `n` bytes.
pub fn encoded_len(n: usize) -> usize {
    (n * 8).div_ceil(5)
}

/// Encodes bytes as nixbase32.
pub fn encode(input: &[u8]) -> String {
    let len = encoded_len(input.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = input[i] as u16 >> j;
        let hi = if i + 1 < input.len() {
            (input[i + 1] as u16) << (8 - j)
        } else {
            0
        };
        out.push(ALPHABET[((lo | hi) & 0x1f) as usize] as char);
    }
    out
}

/// Decodes a nixbase32 string into exactly `N` bytes.
pub fn decode_exact<const N: usize>(s: &str) -> Result<[u8; N], Base32Error> {
    let v = decode(s, N)?;
    let mut out = [0u8; N];
    out.copy_from_slice(&v);
    Ok(out)
}

/// Decodes a nixbase32 string that must encode exactly `n` bytes.
pub fn decode(s: &str, n: usize) -> Result<Vec<u8>, Base32Error> {
    let expected = encoded_len(n);
    if s.len() != expected {
        return Err(Base32Error::BadLength {
            got: s.len(),
            expected,
        });
    }
    let mut out = vec![0u8; n];
    for (pos, c) in s.bytes().rev().enumerate() {
        let digit = ALPHABET
            .iter()
            .position(|&a| a == c)
            .ok_or(Base32Error::InvalidChar(c as char))? as u16;
        let b = pos * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= (digit << j) as u8;
        let carry = digit >> (8 - j);
        if i + 1 < n {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return Err(Base32Error::NonZeroPadding);
        }
    }
    Ok(out)
}

/// Whether `c` belongs to the nixbase32 alphabet.
pub fn is_valid_char(c: u8) -> bool {
    ALPHABET.contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // sha256("") as Nix prints it: `nix hash file --base32 /dev/null`.
        let digest =
            hex::decode("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
                .unwrap();
        let s = encode(&digest);
        assert_eq!(s, "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(decode(&s, 32).unwrap(), digest);
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0x1f]), "0z");
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(
            decode("e", 1),
            Err(Base32Error::BadLength {
                got: 1,
                expected: 2
            })
        );
        assert_eq!(decode("0e", 1), Err(Base32Error::InvalidChar('e')));
        assert_eq!(decode("zz", 1), Err(Base32Error::NonZeroPadding));
    }

    #[test]
    fn round_trips_every_length() {
        for n in 0..70 {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(decode(&encode(&bytes), n).unwrap(), bytes);
        }
    }
}
