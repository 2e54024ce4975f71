//! Layer compression: the [`Compression`] choice of an export (with its media types and the
//! `compression=...,compression-level=N` output options), a pigz-style [`ParallelGzip`]
//! writer that compresses independent blocks on every core into ONE standard gzip stream,
//! multi-threaded zstd, and [`decompress_reader`], which reads gzip, zstd, bzip2, xz or plain
//! data (by media type or by sniffing the magic bytes).
//!
//! Everything here is synchronous `std::io`; async callers use `spawn_blocking`.
//!
//! Determinism: for a given input, level and block size, [`ParallelGzip`] produces the same
//! bytes whatever the number of threads and however the input is split into `write` calls,
//! and zstd output (always in worker mode, `nbWorkers >= 1`) does not depend on the worker
//! count. Two builders therefore produce identical blob digests for identical layers.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flate2::{Compress, Crc, FlushCompress, Status};

/// OCI media type of an uncompressed layer.
pub const MEDIA_TYPE_OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI media type of a gzip layer.
pub const MEDIA_TYPE_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI media type of a zstd layer.
pub const MEDIA_TYPE_OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker (schema 2) media type of an uncompressed layer.
pub const MEDIA_TYPE_DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Docker (schema 2) media type of a gzip layer.
pub const MEDIA_TYPE_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker media type of a zstd layer (as containerd and BuildKit name it).
pub const MEDIA_TYPE_DOCKER_LAYER_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";
/// Docker media type of a foreign (non-distributable) gzip layer.
pub const MEDIA_TYPE_DOCKER_FOREIGN_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

/// Default gzip level (Go's `gzip.DefaultCompression`, what BuildKit uses).
pub const DEFAULT_GZIP_LEVEL: u32 = 6;
/// Default zstd level (BuildKit's default).
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// Default block size of [`ParallelGzip`]. Part of the output format: changing it changes
/// the compressed bytes (and so blob digests) of every new layer.
pub const DEFAULT_GZIP_BLOCK_SIZE: usize = 1 << 20;

/// The deflate window: each block is compressed with the previous block's last 32 KiB as
/// dictionary, so matches can reach back across block boundaries as in a single stream.
const DICT_SIZE: usize = 32 * 1024;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    /// A compression name other than gzip, zstd, uncompressed.
    #[error("unknown compression {0:?}: expected gzip, zstd or uncompressed")]
    UnknownCompression(String),
    /// A compression level out of range or not a number.
    #[error("invalid compression-level {value:?} for {compression}: expected an integer in {range}")]
    InvalidLevel {
        /// `gzip` or `zstd`.
        compression: &'static str,
        /// The level as given.
        value: String,
        /// The levels allowed, as a Rust range (`0..=9`).
        range: String,
    },
    /// An output attribute without `=`.
    #[error("invalid output option {0:?}: expected key=value")]
    InvalidOption(String),
    /// The media type promises compression the data does not have.
    #[error("blob has media type {media_type} but its data does not start with the {expected} magic bytes")]
    MagicMismatch {
        /// The blob's media type.
        media_type: String,
        /// The compression it names (`gzip`, `zstd`).
        expected: &'static str,
    },
    /// A compressor or decompressor could not be started.
    #[error("setting up {what}: {source}")]
    Setup {
        /// The compressor or step (`zstd`, `parallel gzip`, `reading magic bytes`).
        what: &'static str,
        /// Why it failed.
        source: io::Error,
    },
}

/// How a new layer is compressed on export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// gzip (deflate) at `level` 0..=9, compressed in parallel by [`ParallelGzip`].
    Gzip {
        /// Compression level: 0 (none) to 9 (smallest).
        level: u32,
    },
    /// zstd at `level` (1..=22, negative levels are the fast modes), with worker threads.
    Zstd {
        /// Compression level, as zstd's: higher is smaller and slower.
        level: i32,
    },
    /// A plain tar.
    Uncompressed,
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Gzip { level: DEFAULT_GZIP_LEVEL }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::Gzip { level } => write!(f, "compression=gzip,compression-level={level}"),
            Compression::Zstd { level } => write!(f, "compression=zstd,compression-level={level}"),
            Compression::Uncompressed => f.write_str("compression=uncompressed"),
        }
    }
}

impl Compression {
    /// The algorithm, without the level.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Compression::Gzip { .. } => Algorithm::Gzip,
            Compression::Zstd { .. } => Algorithm::Zstd,
            Compression::Uncompressed => Algorithm::None,
        }
    }

    /// The OCI layer media type of blobs compressed this way.
    pub fn media_type(&self) -> &'static str {
        match self {
            Compression::Gzip { .. } => MEDIA_TYPE_OCI_LAYER_GZIP,
            Compression::Zstd { .. } => MEDIA_TYPE_OCI_LAYER_ZSTD,
            Compression::Uncompressed => MEDIA_TYPE_OCI_LAYER_TAR,
        }
    }

    /// The Docker schema-2 layer media type of blobs compressed this way.
    pub fn docker_media_type(&self) -> &'static str {
        match self {
            Compression::Gzip { .. } => MEDIA_TYPE_DOCKER_LAYER_GZIP,
            Compression::Zstd { .. } => MEDIA_TYPE_DOCKER_LAYER_ZSTD,
            Compression::Uncompressed => MEDIA_TYPE_DOCKER_LAYER_TAR,
        }
    }

    /// Build from the `compression` and `compression-level` keys of an output's attributes
    /// (`--output type=image,compression=zstd,compression-level=19`); other keys are ignored.
    /// Without `compression`, gzip; without a level, the algorithm's default.
    pub fn from_attrs<'a>(attrs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Compression, CompressError> {
        let mut algo = None;
        let mut level = None;
        for (k, v) in attrs {
            match k.trim() {
                "compression" => algo = Some(v.trim()),
                "compression-level" => level = Some(v.trim()),
                _ => {}
            }
        }
        let bad_level = |compression: &'static str, value: &str, range: String| CompressError::InvalidLevel {
            compression,
            value: value.to_string(),
            range,
        };
        match algo.unwrap_or("gzip") {
            "gzip" => {
                let level = match level {
                    None => DEFAULT_GZIP_LEVEL,
                    Some(v) => match v.parse::<u32>() {
                        Ok(l) if l <= 9 => l,
                        _ => return Err(bad_level("gzip", v, "0..=9".into())),
                    },
                };
                Ok(Compression::Gzip { level })
            }
            "zstd" => {
                let range = zstd_level_range();
                let level = match level {
                    None => DEFAULT_ZSTD_LEVEL,
                    Some(v) => match v.parse::<i32>() {
                        Ok(l) if range.contains(&l) => l,
                        _ => return Err(bad_level("zstd", v, format!("{}..={}", range.start(), range.end()))),
                    },
                };
                Ok(Compression::Zstd { level })
            }
            "uncompressed" => Ok(Compression::Uncompressed),
            other => Err(CompressError::UnknownCompression(other.to_string())),
        }
    }

    /// A writer that compresses into `inner` this way; call [`CompressWriter::finish`].
    pub fn writer<W: Write>(&self, inner: W) -> Result<CompressWriter<W>, CompressError> {
        Ok(match *self {
            Compression::Gzip { level } => CompressWriter::Gzip(
                ParallelGzip::new(inner, level).map_err(|source| CompressError::Setup { what: "parallel gzip", source })?,
            ),
            Compression::Zstd { level } => {
                CompressWriter::Zstd(zstd_encoder(inner, level).map_err(|source| CompressError::Setup { what: "zstd", source })?)
            }
            Compression::Uncompressed => CompressWriter::Plain(inner),
        })
    }
}

/// The zstd compression levels [`Compression::Zstd`] takes (negative ones are the fast modes).
pub fn zstd_level_range() -> std::ops::RangeInclusive<i32> {
    zstd::compression_level_range()
}

/// Parses `gzip`, `zstd`, `uncompressed`, or a comma-separated list of output attributes
/// such as `compression=zstd,compression-level=19` (unrelated keys are ignored, see
/// [`Compression::from_attrs`]).
impl FromStr for Compression {
    type Err = CompressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if !s.contains('=') {
            return Compression::from_attrs([("compression", s)]);
        }
        let mut attrs = Vec::new();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| CompressError::InvalidOption(part.to_string()))?;
            attrs.push((k, v));
        }
        Compression::from_attrs(attrs)
    }
}

/// A compression algorithm, as named by a media type or found by its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// gzip (RFC 1952), also multi-member.
    Gzip,
    /// zstd frames.
    Zstd,
    /// bzip2 streams (ADD of `.tar.bz2`).
    Bzip2,
    /// xz streams (ADD of `.tar.xz`).
    Xz,
    /// Not compressed.
    None,
}

impl Algorithm {
    /// Name as used in messages.
    pub fn name(&self) -> &'static str {
        match self {
            Algorithm::Gzip => "gzip",
            Algorithm::Zstd => "zstd",
            Algorithm::Bzip2 => "bzip2",
            Algorithm::Xz => "xz",
            Algorithm::None => "uncompressed",
        }
    }

    /// The algorithm of a layer media type (OCI or Docker, distributable or not); `None`
    /// for a media type that is not a layer.
    pub fn from_media_type(media_type: &str) -> Option<Algorithm> {
        let mt = media_type.trim();
        match mt {
            MEDIA_TYPE_DOCKER_LAYER_GZIP | MEDIA_TYPE_DOCKER_FOREIGN_LAYER_GZIP => return Some(Algorithm::Gzip),
            MEDIA_TYPE_DOCKER_LAYER_ZSTD => return Some(Algorithm::Zstd),
            MEDIA_TYPE_DOCKER_LAYER_TAR => return Some(Algorithm::None),
            _ => {}
        }
        let rest = mt
            .strip_prefix("application/vnd.oci.image.layer.v1.tar")
            .or_else(|| mt.strip_prefix("application/vnd.oci.image.layer.nondistributable.v1.tar"))
            .or_else(|| mt.strip_prefix("application/x-tar"))?;
        match rest {
            "" => Some(Algorithm::None),
            "+gzip" => Some(Algorithm::Gzip),
            "+zstd" => Some(Algorithm::Zstd),
            "+bzip2" => Some(Algorithm::Bzip2),
            "+xz" => Some(Algorithm::Xz),
            _ => None,
        }
    }

    /// The algorithm whose magic bytes start `prefix` (which should hold at least 6 bytes
    /// when the data is that long); [`Algorithm::None`] when no magic matches.
    pub fn sniff(prefix: &[u8]) -> Algorithm {
        if prefix.starts_with(&[0x1f, 0x8b]) {
            Algorithm::Gzip
        } else if prefix.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Algorithm::Zstd
        } else if prefix.starts_with(b"BZh") {
            Algorithm::Bzip2
        } else if prefix.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Algorithm::Xz
        } else {
            Algorithm::None
        }
    }
}

/// A reader of the decompressed content of `reader`.
///
/// The algorithm is found from the magic bytes of the data (as the Docker engine does, so a
/// registry that mislabels a layer still works). `media_type`, when given, is checked: a
/// media type that says compressed for data without any known magic is an error (the blob
/// is corrupt or not what the manifest claims). gzip and bzip2 inputs may hold several
/// members/streams; xz several streams; zstd several frames — all are decoded in sequence.
pub fn decompress_reader<'a, R: Read + Send + 'a>(reader: R, media_type: Option<&str>) -> Result<Box<dyn Read + Send + 'a>, CompressError> {
    let (prefix, reader) = peek(reader, 6).map_err(|source| CompressError::Setup { what: "reading magic bytes", source })?;
    let sniffed = Algorithm::sniff(&prefix);
    if let Some(mt) = media_type {
        match Algorithm::from_media_type(mt) {
            Some(declared) if declared != Algorithm::None && sniffed == Algorithm::None => {
                return Err(CompressError::MagicMismatch { media_type: mt.to_string(), expected: declared.name() });
            }
            Some(declared) if declared != sniffed => {
                tracing::debug!(
                    media_type = mt,
                    found = sniffed.name(),
                    "layer media type disagrees with its magic bytes; using the data's"
                );
            }
            _ => {}
        }
    }
    let reader = io::Cursor::new(prefix).chain(reader);
    let setup = |what| move |source| CompressError::Setup { what, source };
    Ok(match sniffed {
        Algorithm::Gzip => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::with_capacity(256 * 1024, reader))),
        Algorithm::Zstd => Box::new(zstd::stream::read::Decoder::new(reader).map_err(setup("zstd decoder"))?),
        Algorithm::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(io::BufReader::with_capacity(256 * 1024, reader))),
        Algorithm::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(io::BufReader::with_capacity(256 * 1024, reader))),
        Algorithm::None => Box::new(reader),
    })
}

/// Read up to `n` bytes (fewer only at end of input) and hand them back with the reader.
fn peek<R: Read>(mut reader: R, n: usize) -> io::Result<(Vec<u8>, R)> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok((buf, reader))
}

fn zstd_encoder<W: Write>(inner: W, level: i32) -> io::Result<zstd::stream::write::Encoder<'static, W>> {
    let mut enc = zstd::stream::write::Encoder::new(inner, level)?;
    enc.include_checksum(true)?;
    // Always worker mode (even with one core): its output differs from single-thread mode
    // but not between worker counts, so every builder writes the same bytes.
    enc.multithread(available_threads() as u32)?;
    Ok(enc)
}

/// Number of threads to compress with: the cores this process may use.
pub fn available_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// A compressing writer of any [`Compression`]; [`CompressWriter::finish`] ends the stream.
#[allow(clippy::large_enum_variant)] // one per export, never moved in a hot loop
pub enum CompressWriter<W: Write> {
    /// Parallel gzip.
    Gzip(ParallelGzip<W>),
    /// zstd in worker mode.
    Zstd(zstd::stream::write::Encoder<'static, W>),
    /// No compression.
    Plain(W),
}

impl<W: Write> CompressWriter<W> {
    /// End the compressed stream and return the inner writer (not flushed).
    pub fn finish(self) -> io::Result<W> {
        match self {
            CompressWriter::Gzip(g) => g.finish(),
            CompressWriter::Zstd(z) => z.finish(),
            CompressWriter::Plain(w) => Ok(w),
        }
    }

    /// The inner writer.
    pub fn get_ref(&self) -> &W {
        match self {
            CompressWriter::Gzip(g) => g.get_ref(),
            CompressWriter::Zstd(z) => z.get_ref(),
            CompressWriter::Plain(w) => w,
        }
    }
}

impl<W: Write> Write for CompressWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            CompressWriter::Gzip(g) => g.write(buf),
            CompressWriter::Zstd(z) => z.write(buf),
            CompressWriter::Plain(w) => w.write(buf),
        }
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            CompressWriter::Gzip(g) => g.write_all(buf),
            CompressWriter::Zstd(z) => z.write_all(buf),
            CompressWriter::Plain(w) => w.write_all(buf),
        }
    }
    /// For zstd a flush ends the current job early, which changes the output bytes: the
    /// export pipeline never flushes before `finish`.
    fn flush(&mut self) -> io::Result<()> {
        match self {
            CompressWriter::Gzip(g) => g.flush(),
            CompressWriter::Zstd(z) => z.flush(),
            CompressWriter::Plain(w) => w.flush(),
        }
    }
}

/// Tuning of a [`ParallelGzip`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelGzipOptions {
    /// Input block size; part of the output format (see [`DEFAULT_GZIP_BLOCK_SIZE`]).
    /// Values below 64 KiB are raised to 64 KiB.
    pub block_size: usize,
    /// Worker threads; 0 or 1 compresses on the writing thread. Does not change the output.
    pub threads: usize,
    /// Blocks queued or being compressed at most (memory bound ≈ this × 2.1 × block size);
    /// raised to at least `threads`.
    pub max_in_flight: usize,
}

impl Default for ParallelGzipOptions {
    fn default() -> Self {
        let threads = available_threads();
        ParallelGzipOptions { block_size: DEFAULT_GZIP_BLOCK_SIZE, threads, max_in_flight: threads * 2 }
    }
}

struct Job {
    seq: u64,
    data: Vec<u8>,
    dict: Vec<u8>,
    last: bool,
}

struct Done {
    seq: u64,
    out: io::Result<Vec<u8>>,
    crc: Crc,
    data: Vec<u8>,
}

/// Compresses one block as raw deflate with `dict` as preset dictionary, ending with a sync
/// flush (byte aligned, not final) or, for the last block, the final deflate block. The
/// outputs of consecutive blocks concatenate into one valid deflate stream.
///
/// Each block gets a fresh compressor (no state can leak between blocks: with zlib-rs
/// 0.6.8, `reset()` after a flush that ran out of output room leaves pending output behind
/// and the next level-1 block panics in `deflate_quick`) and an output buffer above deflate's
/// worst case (level 1 uses static Huffman codes, up to 9 bits per literal: 1/8 growth), so
/// one call normally completes.
fn deflate_block(level: flate2::Compression, data: &[u8], dict: &[u8], last: bool, mut out: Vec<u8>) -> io::Result<Vec<u8>> {
    let mut c = Compress::new(level, false);
    if !dict.is_empty() {
        c.set_dictionary(dict).map_err(io::Error::other)?;
    }
    out.clear();
    out.reserve(data.len() + data.len() / 8 + 4096);
    let flush = if last { FlushCompress::Finish } else { FlushCompress::Sync };
    loop {
        if out.len() == out.capacity() {
            out.reserve(64 * 1024);
        }
        let consumed = c.total_in() as usize;
        let status = c.compress_vec(&data[consumed..], &mut out, flush).map_err(io::Error::other)?;
        let consumed = c.total_in() as usize;
        if status == Status::StreamEnd {
            break;
        }
        // A sync flush is complete when all input is consumed and output room was left.
        if !last && consumed == data.len() && out.len() < out.capacity() {
            break;
        }
    }
    Ok(out)
}

/// Output buffers handed back by the writing thread for reuse (fresh 1 MiB buffers cost page
/// faults on every block).
type BufPool = Arc<Mutex<Vec<Vec<u8>>>>;

/// Compress one job, turning a panic of the compressor into an error.
fn compress_job(level: flate2::Compression, job: &Job, pool: &BufPool) -> (io::Result<Vec<u8>>, Crc) {
    let mut crc = Crc::new();
    crc.update(&job.data);
    let buf = pool.lock().ok().and_then(|mut p| p.pop()).unwrap_or_default();
    let out = std::panic::catch_unwind(|| deflate_block(level, &job.data, &job.dict, job.last, buf))
        .unwrap_or_else(|_| Err(io::Error::other(format!("deflate of gzip block {} panicked", job.seq))));
    (out, crc)
}

/// A pigz-style parallel gzip writer producing one standard gzip member.
///
/// Input is cut into fixed-size blocks; each block is compressed as raw deflate with the
/// previous block's last 32 KiB as dictionary (so the ratio stays within a fraction of a
/// percent of single-stream gzip) and ends with a sync flush, so the blocks concatenate into
/// ONE deflate stream behind one gzip header and trailer (CRC32 combined from per-block
/// CRCs). Blocks are compressed on `threads` worker threads, at most `max_in_flight` at a
/// time, and written in order. The output depends only on the input, the level and the
/// block size. [`Write::flush`] writes the blocks already compressed and flushes the inner
/// writer; it never cuts a block short, so it does not change the output.
///
/// Call [`ParallelGzip::finish`]; dropping the writer discards unwritten data.
pub struct ParallelGzip<W: Write> {
    inner: Option<W>,
    level: flate2::Compression,
    block_size: usize,
    max_in_flight: usize,
    cur: Vec<u8>,
    dict: Vec<u8>,
    next_seq: u64,
    next_write: u64,
    pending: BTreeMap<u64, Done>,
    crc: Crc,
    header_written: bool,
    spare: Vec<Vec<u8>>,
    out_pool: BufPool,
    /// None: compress inline on the caller's thread.
    pool: Option<Pool>,
    failed: bool,
}

struct Pool {
    jobs: Option<Sender<Job>>,
    results: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl<W: Write> ParallelGzip<W> {
    /// A writer with the default block size and one thread per core. `level` above 9 is
    /// treated as 9.
    pub fn new(inner: W, level: u32) -> io::Result<Self> {
        Self::with_options(inner, level, ParallelGzipOptions::default())
    }

    /// A writer with explicit options.
    pub fn with_options(inner: W, level: u32, opts: ParallelGzipOptions) -> io::Result<Self> {
        let block_size = opts.block_size.max(64 * 1024);
        let level = flate2::Compression::new(level.min(9));
        let threads = opts.threads;
        let out_pool: BufPool = Arc::new(Mutex::new(Vec::new()));
        let pool = if threads <= 1 {
            None
        } else {
            let (job_tx, job_rx) = mpsc::channel::<Job>();
            let (done_tx, done_rx) = mpsc::channel::<Done>();
            let job_rx = Arc::new(Mutex::new(job_rx));
            let mut workers = Vec::with_capacity(threads);
            for i in 0..threads {
                let job_rx = Arc::clone(&job_rx);
                let done_tx = done_tx.clone();
                let out_pool = Arc::clone(&out_pool);
                let handle = std::thread::Builder::new().name(format!("hoist-gzip-{i}")).spawn(move || loop {
                    let job = {
                        let Ok(rx) = job_rx.lock() else { return };
                        match rx.recv() {
                            Ok(job) => job,
                            Err(_) => return,
                        }
                    };
                    let (out, crc) = compress_job(level, &job, &out_pool);
                    if done_tx.send(Done { seq: job.seq, out, crc, data: job.data }).is_err() {
                        return;
                    }
                })?;
                workers.push(handle);
            }
            Some(Pool { jobs: Some(job_tx), results: done_rx, workers })
        };
        Ok(ParallelGzip {
            inner: Some(inner),
            level,
            block_size,
            max_in_flight: opts.max_in_flight.max(threads).max(1),
            cur: Vec::with_capacity(block_size),
            dict: Vec::new(),
            next_seq: 0,
            next_write: 0,
            pending: BTreeMap::new(),
            crc: Crc::new(),
            header_written: false,
            spare: Vec::new(),
            out_pool,
            pool,
            failed: false,
        })
    }

    /// The inner writer.
    pub fn get_ref(&self) -> &W {
        self.inner.as_ref().expect("inner writer is present until finish")
    }

    fn inner(&mut self) -> &mut W {
        self.inner.as_mut().expect("inner writer is present until finish")
    }

    fn write_header(&mut self) -> io::Result<()> {
        if !self.header_written {
            // ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL OS=255 (unknown), as Go's gzip writes.
            let xfl = match self.level.level() {
                9 => 2,
                1 => 4,
                _ => 0,
            };
            let header = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 255];
            self.inner().write_all(&header)?;
            self.header_written = true;
        }
        Ok(())
    }

    fn check(&self) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other("parallel gzip writer failed earlier"));
        }
        Ok(())
    }

    /// Hand the current block to a worker (or compress it here).
    fn dispatch(&mut self, last: bool) -> io::Result<()> {
        let fresh = self.spare.pop().unwrap_or_else(|| Vec::with_capacity(self.block_size));
        let data = std::mem::replace(&mut self.cur, fresh);
        let tail = data.len().saturating_sub(DICT_SIZE);
        let next_dict = data[tail..].to_vec();
        let dict = std::mem::replace(&mut self.dict, next_dict);
        let job = Job { seq: self.next_seq, data, dict, last };
        self.next_seq += 1;
        if self.pool.is_none() {
            let (out, crc) = compress_job(self.level, &job, &self.out_pool);
            self.pending.insert(job.seq, Done { seq: job.seq, out, crc, data: job.data });
            return self.write_ready();
        }
        let pool = self.pool.as_ref().expect("a pool when not inline");
        let sent = pool.jobs.as_ref().map(|tx| tx.send(job).is_ok()).unwrap_or(false);
        if !sent {
            self.failed = true;
            return Err(io::Error::other("gzip worker threads are gone"));
        }
        // Bound memory: wait while too many blocks are queued or being compressed.
        while self.next_seq - self.next_write > self.max_in_flight as u64 {
            self.recv_one(true)?;
        }
        // Opportunistically write what is already done.
        while self.recv_one(false)? {}
        Ok(())
    }

    /// Receive one finished block (blocking or not) and write every block now in order.
    /// Returns whether a block was received.
    fn recv_one(&mut self, block: bool) -> io::Result<bool> {
        let Some(pool) = self.pool.as_ref() else { return Ok(false) };
        let done = if block {
            match pool.results.recv() {
                Ok(d) => d,
                Err(_) => {
                    self.failed = true;
                    return Err(io::Error::other("gzip worker threads exited unexpectedly"));
                }
            }
        } else {
            match pool.results.try_recv() {
                Ok(d) => d,
                Err(_) => return Ok(false),
            }
        };
        self.pending.insert(done.seq, done);
        self.write_ready()?;
        Ok(true)
    }

    fn write_ready(&mut self) -> io::Result<()> {
        while let Some(done) = self.pending.remove(&self.next_write) {
            let Done { out, crc, mut data, .. } = done;
            let out = match out {
                Ok(o) => o,
                Err(e) => {
                    self.failed = true;
                    return Err(e);
                }
            };
            self.write_header()?;
            if let Err(e) = self.inner().write_all(&out) {
                self.failed = true;
                return Err(e);
            }
            self.crc.combine(&crc);
            self.next_write += 1;
            if let Ok(mut p) = self.out_pool.lock() {
                if p.len() <= self.max_in_flight {
                    p.push(out);
                }
            }
            if self.spare.len() < 2 {
                data.clear();
                self.spare.push(data);
            }
        }
        Ok(())
    }

    /// Compress what remains, write the gzip trailer and return the inner writer (not
    /// flushed).
    pub fn finish(mut self) -> io::Result<W> {
        self.check()?;
        self.dispatch(true)?;
        while self.next_write < self.next_seq {
            self.recv_one(true)?;
        }
        self.write_header()?;
        let mut trailer = [0u8; 8];
        trailer[..4].copy_from_slice(&self.crc.sum().to_le_bytes());
        trailer[4..].copy_from_slice(&self.crc.amount().to_le_bytes());
        self.inner().write_all(&trailer)?;
        self.pool.take();
        Ok(self.inner.take().expect("inner writer is present until finish"))
    }
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.check()?;
        if buf.is_empty() {
            return Ok(0);
        }
        // A full block is dispatched only when more data arrives, so the last block (handled
        // by finish) is never empty unless the whole input is.
        if self.cur.len() == self.block_size {
            self.dispatch(false)?;
        }
        let n = buf.len().min(self.block_size - self.cur.len());
        self.cur.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.check()?;
        while self.recv_one(false)? {}
        self.inner().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn gzip_parallel(data: &[u8], level: u32, block: usize, threads: usize, chunk: usize) -> Vec<u8> {
        let opts = ParallelGzipOptions { block_size: block, threads, max_in_flight: threads * 2 };
        let mut w = ParallelGzip::with_options(Vec::new(), level, opts).unwrap();
        for c in data.chunks(chunk.max(1)) {
            w.write_all(c).unwrap();
        }
        w.finish().unwrap()
    }

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(gz).read_to_end(&mut out).unwrap();
        out
    }

    /// Deterministic pseudo-random bytes (xorshift).
    fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            v.extend_from_slice(&s.to_le_bytes());
        }
        v.truncate(n);
        v
    }

    /// Text-like data that compresses about 3-5x, with long-range repeats.
    fn compressible_bytes(n: usize) -> Vec<u8> {
        let words = ["layer", "digest", "sha256", "overlay", "whiteout", "manifest", "registry", "blob", "\n", " ", "0", "1"];
        let mut s: u64 = 0x9e3779b97f4a7c15;
        let mut v = Vec::with_capacity(n + 16);
        while v.len() < n {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            v.extend_from_slice(words[(s % words.len() as u64) as usize].as_bytes());
        }
        v.truncate(n);
        v
    }

    fn system_tool_accepts(tool: &str, gz: &[u8]) -> Option<bool> {
        let mut child = Command::new(tool).arg("-t").stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().ok()?;
        let mut stdin = child.stdin.take()?;
        let gz = gz.to_vec();
        let t = std::thread::spawn(move || {
            let _ = stdin.write_all(&gz);
        });
        let out = child.wait_with_output().ok()?;
        t.join().ok()?;
        if !out.status.success() {
            eprintln!("{tool} -t: {}", String::from_utf8_lossy(&out.stderr));
        }
        Some(out.status.success())
    }

    const B: usize = 64 * 1024;

    #[test]
    fn round_trips_at_block_boundaries() {
        for size in [0, 1, B - 1, B, B + 1, 3 * B, 3 * B + 7] {
            let data = compressible_bytes(size);
            for threads in [1, 3] {
                let gz = gzip_parallel(&data, 6, B, threads, 10_000);
                assert_eq!(gunzip(&gz), data, "size {size} threads {threads}");
                assert_eq!(system_tool_accepts("gzip", &gz), Some(true), "gzip -t rejects size {size}");
            }
        }
    }

    #[test]
    fn round_trips_10_mib_random_and_compressible_and_system_tools_accept() {
        let random = random_bytes(10 << 20, 7);
        let text = compressible_bytes(10 << 20);
        for data in [&random, &text] {
            let gz = gzip_parallel(data, 6, DEFAULT_GZIP_BLOCK_SIZE, 2, 1 << 16);
            assert_eq!(gunzip(&gz), *data);
            assert_eq!(system_tool_accepts("gzip", &gz), Some(true));
            if let Some(ok) = system_tool_accepts("pigz", &gz) {
                assert!(ok, "pigz -t rejects the stream");
            }
            // The system gzip decodes to the same bytes.
            let mut child = Command::new("gzip").arg("-dc").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let gz2 = gz.clone();
            let t = std::thread::spawn(move || stdin.write_all(&gz2));
            let out = child.wait_with_output().unwrap();
            t.join().unwrap().unwrap();
            assert!(out.status.success());
            assert!(out.stdout == *data, "gzip -dc output differs");
        }
        // Random data does not blow up (stored blocks), text compresses well.
        let gz_random = gzip_parallel(&random, 6, DEFAULT_GZIP_BLOCK_SIZE, 2, 1 << 16);
        assert!(gz_random.len() < random.len() + random.len() / 100, "{} vs {}", gz_random.len(), random.len());
    }

    #[test]
    fn output_is_independent_of_threads_and_write_chunking() {
        let data = compressible_bytes(5 * B + 123);
        let reference = gzip_parallel(&data, 6, B, 1, data.len());
        for (threads, chunk) in [(2, 1), (2, 4096), (4, 100_000), (8, 7), (1, 3)] {
            if chunk == 1 {
                // byte-by-byte is slow; do it on a prefix-sized input only
                let small = &data[..B + 10];
                assert_eq!(gzip_parallel(small, 6, B, threads, 1), gzip_parallel(small, 6, B, 1, small.len()));
                continue;
            }
            assert_eq!(gzip_parallel(&data, 6, B, threads, chunk), reference, "threads {threads} chunk {chunk}");
        }
        // A different level gives different bytes (the level is really applied).
        assert_ne!(gzip_parallel(&data, 1, B, 2, 4096), reference);
    }

    #[test]
    fn dictionary_keeps_ratio_close_to_single_stream() {
        let data = compressible_bytes(4 << 20);
        let parallel = gzip_parallel(&data, 6, 128 * 1024, 2, 1 << 16);
        let mut single = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        single.write_all(&data).unwrap();
        let single = single.finish().unwrap();
        let ratio = parallel.len() as f64 / single.len() as f64;
        assert!(ratio < 1.01, "parallel {} vs single {} bytes ({ratio:.4})", parallel.len(), single.len());
        // Without the dictionary (independent blocks) the same data is measurably larger:
        // this proves the dictionary is used.
        let mut indep = Vec::new();
        for chunk in data.chunks(128 * 1024) {
            indep.extend(deflate_block(flate2::Compression::new(6), chunk, &[], false, Vec::new()).unwrap());
        }
        assert!(indep.len() > parallel.len(), "independent {} vs dictionary {}", indep.len(), parallel.len());
    }

    #[test]
    fn all_levels_round_trip() {
        let data = compressible_bytes(B * 2 + 5);
        for level in 0..=9 {
            assert_eq!(gunzip(&gzip_parallel(&data, level, B, 2, 9000)), data, "level {level}");
        }
    }

    /// Level 1 (zlib-rs `deflate_quick`, static Huffman codes) grows incompressible data by
    /// up to 1/8; a too-small output buffer once made a reused compressor panic on binaries
    /// from /usr/bin. Every level must round-trip data that grows.
    #[test]
    fn incompressible_data_at_every_level_round_trips() {
        let mut data = random_bytes(8 * B + 99, 11);
        // Literals 144..=255 take 9 bits in the static Huffman code: 12.5% growth at level 1.
        for b in data.iter_mut().skip(3 * B) {
            *b |= 0x90;
        }
        for level in 0..=9 {
            let gz = gzip_parallel(&data, level, B, 1, 1 << 20);
            assert_eq!(gunzip(&gz), data, "level {level}");
        }
        // 128 KiB blocks of real binaries hit it too.
        let mut real = Vec::new();
        for f in ["/usr/bin/busybox", "/usr/bin/docker", "/usr/bin/skopeo"] {
            if let Ok(mut file) = std::fs::File::open(f) {
                let _ = (&mut file).take(16 << 20).read_to_end(&mut real);
            }
        }
        real.extend_from_slice(&data);
        let gz = gzip_parallel(&real, 1, 128 * 1024, 1, 1 << 20);
        assert!(gunzip(&gz) == real);
        let high = gzip_parallel(&data[3 * B..], 1, B, 2, 1 << 20);
        assert!(high.len() > data.len() - 3 * B, "the high-byte data really grows at level 1");
        assert_eq!(system_tool_accepts("gzip", &high), Some(true));
    }

    #[test]
    fn multi_member_gzip_decodes_fully() {
        let a = gzip_parallel(b"first member\n", 6, B, 1, 100);
        let b = gzip_parallel(b"second member\n", 9, B, 1, 100);
        let mut cat = a.clone();
        cat.extend_from_slice(&b);
        let mut out = Vec::new();
        decompress_reader(&cat[..], Some(MEDIA_TYPE_OCI_LAYER_GZIP)).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out, b"first member\nsecond member\n");
    }

    #[test]
    fn zstd_is_deterministic_across_worker_counts_and_round_trips() {
        let data = compressible_bytes(6 << 20);
        let mut outs = Vec::new();
        for workers in [1u32, 2, 4] {
            let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
            enc.include_checksum(true).unwrap();
            enc.multithread(workers).unwrap();
            for c in data.chunks(10_007) {
                enc.write_all(c).unwrap();
            }
            outs.push(enc.finish().unwrap());
        }
        assert_eq!(outs[0], outs[1]);
        assert_eq!(outs[0], outs[2]);
        let mut w = Compression::Zstd { level: 3 }.writer(Vec::new()).unwrap();
        w.write_all(&data).unwrap();
        let z = w.finish().unwrap();
        assert_eq!(z, outs[0], "the writer used by exports matches worker-mode output");
        let mut back = Vec::new();
        decompress_reader(&z[..], Some(MEDIA_TYPE_OCI_LAYER_ZSTD)).unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn decompress_reader_handles_every_format_by_magic() {
        let data = compressible_bytes(300_000);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        gz.write_all(&data).unwrap();
        let gz = gz.finish().unwrap();
        let zs = zstd::encode_all(&data[..], 3).unwrap();
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::new(6));
        bz.write_all(&data).unwrap();
        let bz = bz.finish().unwrap();
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(&data).unwrap();
        let xz = xz.finish().unwrap();
        for (name, blob) in [("gzip", &gz), ("zstd", &zs), ("bzip2", &bz), ("xz", &xz), ("plain", &data)] {
            let mut out = Vec::new();
            decompress_reader(&blob[..], None).unwrap().read_to_end(&mut out).unwrap();
            assert!(out == data, "{name}");
        }
        // Short inputs (shorter than the magic) are passed through.
        let mut out = Vec::new();
        decompress_reader(&b"ab"[..], None).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out, b"ab");
    }

    #[test]
    fn declared_compression_without_magic_is_an_error() {
        let err = decompress_reader(&b"not gzip at all, a tar perhaps"[..], Some(MEDIA_TYPE_DOCKER_LAYER_GZIP)).err().unwrap();
        assert!(matches!(err, CompressError::MagicMismatch { expected: "gzip", .. }), "{err}");
    }

    #[test]
    fn truncated_gzip_is_an_error_not_a_short_read() {
        let data = compressible_bytes(200_000);
        let gz = gzip_parallel(&data, 6, B, 2, 4096);
        let cut = &gz[..gz.len() / 2];
        let mut out = Vec::new();
        assert!(decompress_reader(cut, None).unwrap().read_to_end(&mut out).is_err());
    }

    #[test]
    fn parses_output_options() {
        assert_eq!("gzip".parse::<Compression>().unwrap(), Compression::Gzip { level: 6 });
        assert_eq!("zstd".parse::<Compression>().unwrap(), Compression::Zstd { level: 3 });
        assert_eq!("uncompressed".parse::<Compression>().unwrap(), Compression::Uncompressed);
        assert_eq!("compression=zstd,compression-level=19".parse::<Compression>().unwrap(), Compression::Zstd { level: 19 });
        assert_eq!(
            "type=image,compression=gzip,compression-level=1,push=true".parse::<Compression>().unwrap(),
            Compression::Gzip { level: 1 }
        );
        assert!(matches!("compression=lz4".parse::<Compression>(), Err(CompressError::UnknownCompression(_))));
        assert!(matches!("compression=gzip,compression-level=10".parse::<Compression>(), Err(CompressError::InvalidLevel { .. })));
        assert!(matches!("compression=zstd,compression-level=99".parse::<Compression>(), Err(CompressError::InvalidLevel { .. })));
        assert!(matches!("compression=gzip,compression-level=x".parse::<Compression>(), Err(CompressError::InvalidLevel { .. })));
        assert!(matches!("compression=gzip,oops".parse::<Compression>(), Err(CompressError::InvalidOption(_))));
        // Display round-trips.
        for c in [Compression::Gzip { level: 9 }, Compression::Zstd { level: 7 }, Compression::Uncompressed] {
            assert_eq!(c.to_string().parse::<Compression>().unwrap(), c);
        }
    }

    #[test]
    fn media_types_map_both_ways() {
        for c in [Compression::Gzip { level: 6 }, Compression::Zstd { level: 3 }, Compression::Uncompressed] {
            assert_eq!(Algorithm::from_media_type(c.media_type()), Some(c.algorithm()));
            assert_eq!(Algorithm::from_media_type(c.docker_media_type()), Some(c.algorithm()));
        }
        assert_eq!(Algorithm::from_media_type("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"), Some(Algorithm::Gzip));
        assert_eq!(Algorithm::from_media_type(MEDIA_TYPE_DOCKER_FOREIGN_LAYER_GZIP), Some(Algorithm::Gzip));
        assert_eq!(Algorithm::from_media_type("application/vnd.oci.image.config.v1+json"), None);
        assert_eq!(Algorithm::from_media_type("application/vnd.oci.image.layer.v1.tar+lz4"), None);
    }

    #[test]
    fn writer_error_is_reported_not_swallowed() {
        struct Failing;
        impl Write for Failing {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let data = random_bytes(5 * B, 3);
        let opts = ParallelGzipOptions { block_size: B, threads: 2, max_in_flight: 2 };
        let mut w = ParallelGzip::with_options(Failing, 6, opts).unwrap();
        let r = w.write_all(&data).and_then(|_| w.finish().map(|_| ()));
        assert!(r.unwrap_err().to_string().contains("disk full"));
    }
}
