//! Content digests (`sha256:<64 hex>`), and a hashing writer that computes one while bytes
//! stream through it.

use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A validated `sha256:<64 lowercase hex>` digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

/// A string that is not a valid sha256 digest (holds the string).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest {0:?}: expected sha256:<64 lowercase hex digits>")]
pub struct DigestError(pub String);

impl Digest {
    /// Digest of a byte slice.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_hasher(Sha256::new_with_prefix(bytes))
    }

    /// Finish a SHA-256 hasher into a digest.
    pub fn from_hasher(h: Sha256) -> Digest {
        Digest(format!("sha256:{}", hex::encode(h.finalize())))
    }

    /// The full `sha256:...` form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 hex digits without the algorithm.
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    /// The algorithm name (always `sha256`).
    pub fn algorithm(&self) -> &str {
        "sha256"
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.strip_prefix("sha256:").ok_or_else(|| DigestError(s.to_string()))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(DigestError(s.to_string()));
        }
        Ok(Digest(s.to_string()))
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.0)
    }
}

/// A writer that hashes and counts everything written through it to `inner`.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    /// A writer to `inner` that has counted and hashed nothing yet.
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), count: 0 }
    }

    /// Bytes written so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The inner writer, the digest and the byte count of what passed through.
    pub fn finish(self) -> (W, Digest, u64) {
        (self.inner, Digest::from_hasher(self.hasher), self.count)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// ChainID of a list of diff_ids (OCI image spec): the identity of a stack of layers.
pub fn chain_id(diff_ids: &[Digest]) -> Option<Digest> {
    let mut it = diff_ids.iter();
    let mut chain = it.next()?.clone();
    for d in it {
        chain = Digest::of(format!("{chain} {d}").as_bytes());
    }
    Some(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_empty_is_the_well_known_value() {
        assert_eq!(Digest::of(b"").as_str(), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn parse_rejects_malformed() {
        for bad in ["", "sha256:", "sha512:00", "sha256:ABC", &format!("sha256:{}", "g".repeat(64))] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
        let ok = format!("sha256:{}", "a".repeat(64));
        assert_eq!(ok.parse::<Digest>().unwrap().hex(), "a".repeat(64));
    }

    #[test]
    fn hashing_writer_matches_digest_of() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        let (out, d, n) = w.finish();
        assert_eq!(out, b"hello world");
        assert_eq!(n, 11);
        assert_eq!(d, Digest::of(b"hello world"));
    }

    #[test]
    fn chain_id_follows_the_spec() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        assert_eq!(chain_id(std::slice::from_ref(&a)), Some(a.clone()));
        assert_eq!(chain_id(&[a.clone(), b.clone()]), Some(Digest::of(format!("{a} {b}").as_bytes())));
        assert_eq!(chain_id(&[]), None);
    }
}
