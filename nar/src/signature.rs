//! ed25519 signatures over narinfo fingerprints, with keys in Nix's `name:base64` form.

use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use thiserror::Error;

use crate::narinfo::NarInfo;

/// Why a key or signature string was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SignatureError {
    /// Not `name:base64`.
    #[error("{what} {text:?} is not of the form name:base64")]
    Format {
        /// key or signature
        what: &'static str,
        /// the text, shortened; never a secret key
        text: String,
    },
    /// The base64 part does not decode to the right number of bytes.
    #[error("{what} named {name:?} has {got} bytes, expected {expected}")]
    Length {
        /// key or signature
        what: &'static str,
        /// its name
        name: String,
        /// decoded length
        got: usize,
        /// required length
        expected: usize,
    },
    /// The bytes are not a valid ed25519 public key.
    #[error("public key {0:?} is not a valid ed25519 point")]
    BadKey(String),
}

fn split<'a>(
    what: &'static str,
    s: &'a str,
    show: bool,
) -> Result<(&'a str, Vec<u8>), SignatureError> {
    let fmt_err = || SignatureError::Format {
        what,
        text: if show {
            s.chars().take(80).collect()
        } else {
            "<secret>".into()
        },
    };
    let (name, b64) = s.trim().split_once(':').ok_or_else(fmt_err)?;
    if name.is_empty() {
        return Err(fmt_err());
    }
    let bytes = B64.decode(b64).map_err(|_| fmt_err())?;
    Ok((name, bytes))
}

fn exact<const N: usize>(
    what: &'static str,
    name: &str,
    b: Vec<u8>,
) -> Result<[u8; N], SignatureError> {
    let got = b.len();
    b.try_into().map_err(|_| SignatureError::Length {
        what,
        name: name.to_string(),
        got,
        expected: N,
    })
}

/// A trusted public key, as in nix.conf's `trusted-public-keys`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// The key's name (`cache.nixos.org-1`).
    pub name: String,
    key: VerifyingKey,
}

impl PublicKey {
    /// Parses `name:base64(32 bytes)`.
    pub fn parse(s: &str) -> Result<Self, SignatureError> {
        let (name, bytes) = split("public key", s, true)?;
        let arr = exact::<32>("public key", name, bytes)?;
        let key =
            VerifyingKey::from_bytes(&arr).map_err(|_| SignatureError::BadKey(name.into()))?;
        Ok(PublicKey {
            name: name.to_string(),
            key,
        })
    }

    /// Whether `sig` is this key's valid signature of `message`.
    pub fn verify(&self, message: &[u8], sig: &Signature) -> bool {
        sig.name == self.name
            && self
                .key
                .verify(message, &ed25519_dalek::Signature::from_bytes(&sig.bytes))
                .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, B64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A signing key in Nix's secret-key format `name:base64(seed ‖ public key)`, as
/// `nix-store --generate-binary-cache-key` writes it.
pub struct SecretKey {
    /// The key's name.
    pub name: String,
    key: SigningKey,
}

impl SecretKey {
    /// Parses `name:base64(64 bytes)`.
    pub fn parse(s: &str) -> Result<Self, SignatureError> {
        let (name, bytes) = split("secret key", s, false)?;
        let arr = exact::<64>("secret key", name, bytes)?;
        let key = SigningKey::from_keypair_bytes(&arr)
            .map_err(|_| SignatureError::BadKey(name.to_string()))?;
        Ok(SecretKey {
            name: name.to_string(),
            key,
        })
    }

    /// A fresh random key.
    pub fn generate(name: &str) -> Self {
        SecretKey {
            name: name.to_string(),
            key: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature {
            name: self.name.clone(),
            bytes: self.key.sign(message).to_bytes(),
        }
    }

    /// The Nix secret-key text (handle with care).
    pub fn to_secret_string(&self) -> String {
        format!("{}:{}", self.name, B64.encode(self.key.to_keypair_bytes()))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}:<redacted>)", self.name)
    }
}

/// A `Sig:` line's value.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature {
    /// The signing key's name.
    pub name: String,
    /// The 64 signature bytes.
    pub bytes: [u8; 64],
}

impl Signature {
    /// Parses `name:base64(64 bytes)`.
    pub fn parse(s: &str) -> Result<Self, SignatureError> {
        let (name, bytes) = split("signature", s, true)?;
        let arr = exact::<64>("signature", name, bytes)?;
        Ok(Signature {
            name: name.to_string(),
            bytes: arr,
        })
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, B64.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

/// The outcome of checking a narinfo's signatures against trusted keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SigCheck {
    /// Signed by this trusted key.
    Trusted(String),
    /// No `Sig:` at all.
    Unsigned,
    /// Signatures exist, but none by a trusted key.
    Untrusted(Vec<String>),
    /// A signature by a trusted key's name does not verify.
    Invalid(String),
}

/// Checks `info`'s signatures against `keys`, as Nix's `require-sigs` does.
pub fn check_narinfo(info: &NarInfo, keys: &[PublicKey]) -> SigCheck {
    if info.sigs.is_empty() {
        return SigCheck::Unsigned;
    }
    let fp = info.fingerprint();
    let mut invalid = None;
    for sig in &info.sigs {
        for key in keys.iter().filter(|k| k.name == sig.name) {
            if key.verify(fp.as_bytes(), sig) {
                return SigCheck::Trusted(key.name.clone());
            }
            invalid = Some(key.name.clone());
        }
    }
    match invalid {
        Some(name) => SigCheck::Invalid(name),
        None => SigCheck::Untrusted(info.sigs.iter().map(|s| s.name.clone()).collect()),
    }
}

/// Signs `info` with `key`, appending the signature.
pub fn sign_narinfo(info: &mut NarInfo, key: &SecretKey) {
    let sig = key.sign(info.fingerprint().as_bytes());
    info.sigs.push(sig);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_nixos_org_key_parses() {
        let k = PublicKey::parse("cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=")
            .unwrap();
        assert_eq!(k.name, "cache.nixos.org-1");
        assert_eq!(
            k.to_string(),
            "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
        );
    }

    #[test]
    fn sign_and_verify_round_trip() {
        let sk = SecretKey::generate("test-1");
        let sk2 = SecretKey::parse(&sk.to_secret_string()).unwrap();
        let pk = sk2.public();
        let sig = sk.sign(b"hello");
        assert!(pk.verify(b"hello", &sig));
        assert!(!pk.verify(b"hellO", &sig));
        let other = SecretKey::generate("test-1").public();
        assert!(!other.verify(b"hello", &sig));
        assert!(format!("{sk:?}").contains("redacted"));
    }

    #[test]
    fn rejects_malformed() {
        assert!(PublicKey::parse("nocolon").is_err());
        assert!(PublicKey::parse(":AAAA").is_err());
        assert!(PublicKey::parse("k:AAAA").is_err());
        assert!(Signature::parse("k:!!!").is_err());
        let e = SecretKey::parse("k:AAAA").unwrap_err();
        assert!(!e.to_string().contains("AAAA"));
    }
}
