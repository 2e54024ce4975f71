//! The content store: blobs addressed by digest under `<root>/blobs/sha256/<hex>`.
//!
//! Writes go to `<root>/ingest/` and are renamed into place only after their digest is
//! verified, so a reader never sees a partial blob, even after the process is killed
//! mid-write (leftover ingest files are removed by [`ContentStore::open`]). Data is not
//! fsynced: the store survives a killed process, not a power loss, and a lost blob is
//! simply fetched or rebuilt again.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;

/// Errors of the content store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system operation on the store failed.
    #[error("content store {path}: {source}")]
    Io {
        /// The file or directory operated on.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// No blob with this digest is stored.
    #[error("blob {0} is not in the content store")]
    NotFound(Digest),
    /// Data written for a blob hashed to another digest; nothing was stored.
    #[error("digest mismatch: expected {expected}, got {actual} ({size} bytes); the data was discarded")]
    DigestMismatch {
        /// The digest the data was written under.
        expected: Digest,
        /// The digest of the data received.
        actual: Digest,
        /// Bytes received.
        size: u64,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// A content-addressed blob store on the local filesystem.
#[derive(Debug, Clone)]
pub struct ContentStore {
    root: PathBuf,
}

impl ContentStore {
    /// Open (creating if needed) a store at `root`, removing leftovers of interrupted writes.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let store = ContentStore { root };
        for dir in [store.blobs_dir(), store.ingest_dir()] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let ingest = store.ingest_dir();
        for entry in fs::read_dir(&ingest).map_err(io_err(&ingest))? {
            let entry = entry.map_err(io_err(&ingest))?;
            let _ = fs::remove_file(entry.path());
        }
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    fn ingest_dir(&self) -> PathBuf {
        self.root.join("ingest")
    }

    /// Where the blob lives (whether or not it is present).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.hex())
    }

    /// Whether the blob is present.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Size of a present blob, `None` if absent.
    pub fn size(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let path = self.blob_path(digest);
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Start writing a new blob.
    pub fn writer(&self) -> Result<BlobWriter, StoreError> {
        let dir = self.ingest_dir();
        let file = tempfile::Builder::new().prefix("blob-").tempfile_in(&dir).map_err(io_err(&dir))?;
        // A small buffer: a context upload makes tens of thousands of small blobs, and larger
        // writes go straight through.
        Ok(BlobWriter { store: self.clone(), file: io::BufWriter::with_capacity(64 << 10, file), hasher: Sha256::new(), size: 0 })
    }

    /// Store bytes, returning their digest.
    pub fn put(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        let digest = Digest::of(bytes);
        if self.contains(&digest) {
            return Ok(digest);
        }
        let mut w = self.writer()?;
        w.write_all(bytes).map_err(io_err(&self.ingest_dir()))?;
        w.commit(Some(&digest))
    }

    /// Read a whole blob into memory (for manifests and configs).
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let mut buf = Vec::new();
        self.open_blob(digest)?.read_to_end(&mut buf).map_err(io_err(&self.blob_path(digest)))?;
        Ok(buf)
    }

    /// Open a blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, StoreError> {
        let path = self.blob_path(digest);
        File::open(&path).map_err(
            |e| {
                if e.kind() == io::ErrorKind::NotFound {
                    StoreError::NotFound(digest.clone())
                } else {
                    io_err(&path)(e)
                }
            },
        )
    }

    /// Remove a blob (no error if absent).
    pub fn remove(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.blob_path(digest);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
    }

    /// The digests of every blob (one directory listing: cheaper than [`ContentStore::contains`]
    /// for many digests).
    pub fn digests(&self) -> Result<std::collections::HashSet<Digest>, StoreError> {
        let dir = self.blobs_dir();
        let mut out = std::collections::HashSet::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            if let Ok(d) = format!("sha256:{}", entry.file_name().to_string_lossy()).parse::<Digest>() {
                out.insert(d);
            }
        }
        Ok(out)
    }

    /// Every blob with its size, sorted by digest.
    pub fn list(&self) -> Result<Vec<(Digest, u64)>, StoreError> {
        let dir = self.blobs_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let Ok(d) = format!("sha256:{}", entry.file_name().to_string_lossy()).parse::<Digest>() else { continue };
            let len = entry.metadata().map_err(io_err(&entry.path()))?.len();
            out.push((d, len));
        }
        out.sort();
        Ok(out)
    }
}

/// A blob being written; [`BlobWriter::commit`] makes it visible, dropping discards it.
pub struct BlobWriter {
    store: ContentStore,
    file: io::BufWriter<tempfile::NamedTempFile>,
    hasher: Sha256,
    size: u64,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Verify against `expected` (if given) and move the blob into place.
    pub fn commit(self, expected: Option<&Digest>) -> Result<Digest, StoreError> {
        let digest = Digest::from_hasher(self.hasher);
        if let Some(expected) = expected {
            if *expected != digest {
                return Err(StoreError::DigestMismatch { expected: expected.clone(), actual: digest, size: self.size });
            }
        }
        let ingest = self.store.ingest_dir();
        let file = self.file.into_inner().map_err(|e| io_err(&ingest)(e.into_error()))?;
        let dest = self.store.blob_path(&digest);
        if !dest.exists() {
            file.persist(&dest).map_err(|e| io_err(&dest)(e.error))?;
        }
        Ok(digest)
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_read_and_dedupe() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let d = store.put(b"layer bytes").unwrap();
        assert_eq!(d, Digest::of(b"layer bytes"));
        assert!(store.contains(&d));
        assert_eq!(store.read(&d).unwrap(), b"layer bytes");
        assert_eq!(store.put(b"layer bytes").unwrap(), d);
        assert_eq!(store.list().unwrap(), vec![(d.clone(), 11)]);
        store.remove(&d).unwrap();
        assert!(matches!(store.read(&d), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn mismatched_digest_leaves_nothing_visible() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let expected = Digest::of(b"what the registry promised");
        let mut w = store.writer().unwrap();
        w.write_all(b"what it sent").unwrap();
        let err = w.commit(Some(&expected)).unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(!store.contains(&expected));
        assert!(store.list().unwrap().is_empty());
        assert_eq!(fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);
    }

    #[test]
    fn open_removes_interrupted_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let mut w = store.writer().unwrap();
        w.write_all(b"partial").unwrap();
        std::mem::forget(w); // as if the process died mid-write
        assert_eq!(fs::read_dir(dir.path().join("ingest")).unwrap().count(), 1);
        ContentStore::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);
    }
}
