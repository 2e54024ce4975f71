//! The registry client: resolving image references to a platform's manifest and config,
//! streaming blobs into the content store with digest verification, and pushing blobs
//! (HEAD first, cross-repository mount, monolithic or chunked upload) and manifests.
//!
//! One [`RegistryClient`] is built per build (or per process) from explicit
//! [`Credentials`] and a list of insecure registries; it is cheap to clone, shares one
//! connection pool and one token cache, and every method can run concurrently.
//!
//! Plain HTTP is used for loopback registries (`127.0.0.0/8`, `::1`, `localhost`) and the
//! registries listed as insecure, HTTPS otherwise. Authentication follows the Docker client:
//! `GET /v2/` once per registry to learn the challenge, then anonymous, Basic, or Bearer
//! tokens from the token server, cached per set of scopes until they expire. Transient
//! failures (connection errors, timeouts, 408, 429, 5xx) are retried with exponential
//! backoff; blob downloads resume with `Range` and restart from zero when the registry
//! ignores it.
//!
//! Why this talks to the registry with reqwest directly rather than through oci-client
//! (0.18, the crate DESIGN.md names): read against its source, it would need working around
//! for most of what hoist needs. Its token errors are swallowed (a rejected password
//! becomes an anonymous request and an opaque 401, so no error could say which registry
//! refused what); it has no identity-token (refresh-token) grant; `mount_blob` treats the
//! registry's `202` "not mounted, upload instead" as an error instead of an upload session;
//! it has no retries, and its streaming push consumes the stream, so a retry could not
//! restart it from the store file; it keys credentials by the host it resolves docker.io
//! to (`index.docker.io`); and its errors do not name the registry. What it would still
//! contribute (URL building, header parsing) is a few lines here, so one client with one
//! token cache and one retry policy is simpler than two layered ones. oci-spec provides the
//! manifest and configuration types.

pub mod media;
mod platform;
mod token;

use std::collections::HashMap;
use std::io::{self, Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{RequestBuilder, Response, StatusCode, Url};
use tokio::io::AsyncReadExt;
use tokio::sync::Mutex as AsyncMutex;

pub use media::ManifestKind;
pub use platform::{Platform, PlatformError};

use crate::auth::{Credential, Credentials};
use crate::digest::Digest;
use crate::reference::Reference;
use crate::store::{BlobWriter, ContentStore, StoreError};
use token::{Challenge, Scope, Token};

/// Largest manifest or index accepted (containerd uses the same limit).
pub const MANIFEST_LIMIT: usize = 4 << 20;
/// Largest image configuration accepted.
pub const CONFIG_LIMIT: usize = 32 << 20;

/// Errors of the registry client. Every message names the registry (and the image or
/// digest involved) and why it failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No connection could be made.
    #[error("registry {registry} is unreachable: {reason}")]
    Unreachable {
        /// The registry name (`docker.io`, `ghcr.io`, `localhost:5000`).
        registry: String,
        /// The connection error.
        reason: String,
    },
    /// A connection failed or timed out during a request.
    #[error("registry {registry}: {what} failed: {reason}")]
    Transport {
        /// The registry name (`docker.io`, `ghcr.io`, `localhost:5000`).
        registry: String,
        /// The request (`blob sha256:... of <image>`, `pushing manifest ...`).
        what: String,
        /// The transport error.
        reason: String,
    },
    /// The registry or its token server refused the credentials (or their absence).
    #[error("registry {registry} denied {what}: {reason}; check the credentials for {registry} (docker login {registry})")]
    Unauthorized {
        /// The registry name (`docker.io`, `ghcr.io`, `localhost:5000`).
        registry: String,
        /// The request (`blob sha256:... of <image>`, `pushing manifest ...`).
        what: String,
        /// The registry's or token server's explanation.
        reason: String,
    },
    /// The manifest, tag or blob does not exist.
    #[error("{what} was not found in registry {registry}: {reason}")]
    NotFound {
        /// The registry name (`docker.io`, `ghcr.io`, `localhost:5000`).
        registry: String,
        /// The request (`blob sha256:... of <image>`, `pushing manifest ...`).
        what: String,
        /// The registry's explanation.
        reason: String,
    },
    /// Any other error status.
    #[error("registry {registry}: {what} failed with HTTP {status}: {reason}")]
    Status {
        /// The registry name (`docker.io`, `ghcr.io`, `localhost:5000`).
        registry: String,
        /// The request (`blob sha256:... of <image>`, `pushing manifest ...`).
        what: String,
        /// The HTTP status code.
        status: u16,
        /// The registry's explanation (its error codes and messages, or the body).
        reason: String,
        /// The `Retry-After` the registry sent (seconds form only); retries wait this long.
        retry_after: Option<Duration>,
    },
    /// The registry did not follow the protocol (missing Location, bad token answer, ...).
    #[error("registry {registry} answered unexpectedly: {reason}")]
    Protocol {
        /// The registry name (`docker.io`, `ghcr.io`, `localhost:5000`).
        registry: String,
        /// What was wrong with the answer.
        reason: String,
    },
    /// Content whose digest is not the one asked for; nothing was stored.
    #[error("digest mismatch for {what} of {image}: expected {expected}, got {actual}; the data was discarded")]
    DigestMismatch {
        /// The image reference, canonical form.
        image: String,
        /// What was fetched (`manifest`, `blob`, `image config`).
        what: String,
        /// The digest asked for.
        expected: Digest,
        /// The digest of what was received.
        actual: Digest,
    },
    /// A manifest or configuration that cannot be used.
    #[error("{image}: invalid {what}: {reason}")]
    Invalid {
        /// The image reference, canonical form.
        image: String,
        /// What is invalid (`manifest`, `index`, `manifest to push`).
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A manifest or index document that is not one we can use (see [`media::MediaError`]).
    #[error("{image}: invalid {what}: {source}")]
    InvalidDocument {
        /// The image reference, canonical form.
        image: String,
        /// `manifest` or `index`.
        what: String,
        /// What is wrong with it.
        source: media::MediaError,
    },
    /// A manifest or configuration that is not the JSON its type requires.
    #[error("{image}: invalid {what}: {source}")]
    InvalidJson {
        /// The image reference, canonical form.
        image: String,
        /// `manifest` or `image config`.
        what: String,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// The index has no manifest for the requested platform.
    #[error("{image} has no manifest for platform {wanted}; available: {}", list_platforms(.available))]
    NoMatchingPlatform {
        /// The image reference, canonical form.
        image: String,
        /// The platform asked for.
        wanted: Platform,
        /// The platforms the index offers (attestations left out).
        available: Vec<Platform>,
    },
    /// A manifest or configuration larger than the limit.
    #[error("{image}: the {what} is larger than {limit} bytes")]
    TooLarge {
        /// The image reference, canonical form.
        image: String,
        /// What was fetched (`manifest`, `image config`).
        what: String,
        /// The limit in bytes (such as [`MANIFEST_LIMIT`] or [`CONFIG_LIMIT`]).
        limit: usize,
    },
    /// The content store failed.
    #[error("{image}: {source}")]
    Store {
        /// The image reference, canonical form.
        image: String,
        /// The store's error.
        source: StoreError,
    },
    /// A blob to push is not the size the caller said.
    #[error("blob {digest} to push to {image} is {actual} bytes, not {expected}")]
    SizeMismatch {
        /// The image reference, canonical form.
        image: String,
        /// The blob.
        digest: Digest,
        /// The size the caller gave, in bytes.
        expected: u64,
        /// The size of the source, in bytes.
        actual: u64,
    },
    /// The client could not be built.
    #[error("cannot build the registry client: {0}")]
    Config(String),
}

fn list_platforms(p: &[Platform]) -> String {
    if p.is_empty() {
        "none".to_string()
    } else {
        p.iter().map(Platform::to_string).collect::<Vec<_>>().join(", ")
    }
}

impl RegistryError {
    /// Whether retrying may succeed: connection failures, timeouts, 408, 429 and 5xx.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. } | RegistryError::Transport { .. } => true,
            RegistryError::Status { status, .. } => is_transient_status(*status),
            _ => false,
        }
    }

    /// The registry involved, when there is one.
    pub fn registry(&self) -> Option<&str> {
        match self {
            RegistryError::Unreachable { registry, .. }
            | RegistryError::Transport { registry, .. }
            | RegistryError::Unauthorized { registry, .. }
            | RegistryError::NotFound { registry, .. }
            | RegistryError::Status { registry, .. }
            | RegistryError::Protocol { registry, .. } => Some(registry),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            RegistryError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

fn is_transient_status(status: u16) -> bool {
    status == 408 || status == 429 || (500..600).contains(&status)
}

/// How often and how patiently transient failures are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (1 = no retry).
    pub attempts: u32,
    /// Delay before the first retry; doubled for each further one.
    pub base_delay: Duration,
    /// Upper bound of a delay (also caps a registry's `Retry-After`).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 4, base_delay: Duration::from_millis(250), max_delay: Duration::from_secs(8) }
    }
}

impl RetryPolicy {
    fn delay(&self, failed_attempts: u32) -> Duration {
        let exp = self.base_delay.saturating_mul(1u32 << failed_attempts.saturating_sub(1).min(16));
        // up to 25% jitter, so parallel pushes do not retry in lockstep
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let jitter = exp.mul_f64(f64::from(nanos % 250) / 1000.0);
        (exp + jitter).min(self.max_delay)
    }
}

/// Options of a [`RegistryClient`].
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Credentials per registry (forwarded by the client; never read from files here).
    pub credentials: Credentials,
    /// Asked, once per registry, for the credential of a registry that asks for one and is
    /// not in `credentials` (a builder asks its client over the build stream).
    pub source: Option<Arc<dyn CredentialSource>>,
    /// Registries (`host:port` or `host`) reached over plain HTTP besides loopback ones.
    pub insecure: Vec<String>,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// `None`: upload a blob with one streaming PUT. `Some(n)`: PATCH chunks of `n` bytes,
    /// then PUT (for registries that limit request sizes).
    pub chunk_size: Option<u64>,
    /// Time allowed to establish a connection.
    pub connect_timeout: Duration,
    /// Longest silence while reading a response before it counts as failed.
    pub read_timeout: Duration,
    /// The User-Agent header.
    pub user_agent: String,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            credentials: Credentials::new(),
            source: None,
            insecure: Vec::new(),
            retry: RetryPolicy::default(),
            chunk_size: None,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(120),
            user_agent: format!("hoist/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// Where a client gets the credential of a registry it has none for, when the registry
/// asks for one: the builder's end of the build stream asks the user's client, which
/// answers from its Docker config for that registry only.
pub trait CredentialSource: Send + Sync {
    /// The credential of `registry` (`None`: go anonymous).
    fn credential<'a>(&'a self, registry: &'a str) -> futures::future::BoxFuture<'a, Option<Credential>>;
}

impl std::fmt::Debug for dyn CredentialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialSource")
    }
}

/// Counters of what a client moved (for build summaries and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// Blobs fetched into a store.
    pub blobs_downloaded: u64,
    /// Bytes received for blobs (retries included).
    pub bytes_downloaded: u64,
    /// Blobs uploaded.
    pub blobs_uploaded: u64,
    /// Bytes of uploaded blobs.
    pub bytes_uploaded: u64,
    /// Blobs mounted from another repository.
    pub blobs_mounted: u64,
    /// Blobs a push found already present.
    pub blobs_existed: u64,
    /// Manifests and indexes pushed.
    pub manifests_pushed: u64,
    /// Retried attempts.
    pub retries: u64,
}

#[derive(Default)]
struct Counters {
    blobs_downloaded: AtomicU64,
    bytes_downloaded: AtomicU64,
    blobs_uploaded: AtomicU64,
    bytes_uploaded: AtomicU64,
    blobs_mounted: AtomicU64,
    blobs_existed: AtomicU64,
    manifests_pushed: AtomicU64,
    retries: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A manifest (or index) as fetched, verified against the reference's digest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// SHA-256 of `bytes`.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Manifest or index.
    pub kind: ManifestKind,
    /// The exact bytes (what the digest covers).
    pub bytes: Vec<u8>,
}

/// A layer of a resolved image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDescriptor {
    /// Digest of the (compressed) blob.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Its media type (`...tar+gzip`, `...tar+zstd`, `...tar`, Docker's `...rootfs.diff.tar.gzip`).
    pub media_type: String,
    /// The uncompressed digest from the config's `rootfs.diff_ids`.
    pub diff_id: Digest,
}

/// An image reference resolved for one platform.
#[derive(Debug, Clone)]
pub struct ResolvedManifest {
    /// The reference as given.
    pub reference: Reference,
    /// Digest of the index or manifest list, when the reference named one.
    pub index_digest: Option<Digest>,
    /// The platform of the chosen index entry (None for a single-platform manifest).
    pub platform: Option<Platform>,
    /// Digest of the platform's image manifest.
    pub manifest_digest: Digest,
    /// The manifest, parsed.
    pub manifest: crate::image::Manifest,
    /// The manifest's exact bytes.
    pub manifest_bytes: Vec<u8>,
    /// The manifest's media type (OCI or Docker schema 2).
    pub media_type: String,
    /// The image configuration, parsed.
    pub config: crate::image::ImageConfig,
    /// Its exact bytes.
    pub config_bytes: Vec<u8>,
    /// Its digest (verified).
    pub config_digest: Digest,
    /// The layers, bottom first, with their diff_ids.
    pub layers: Vec<LayerDescriptor>,
}

/// Where the bytes of a blob to push come from. Files are streamed (and re-opened on a
/// retry), never read whole into memory.
#[derive(Debug, Clone)]
pub enum BlobSource<'a> {
    /// The blob of the same digest in a content store.
    Store(&'a ContentStore),
    /// A file holding exactly the blob.
    File(&'a Path),
    /// Bytes in memory (configs, small blobs).
    Bytes(Bytes),
}

impl BlobSource<'_> {
    fn len(&self, digest: &Digest) -> io::Result<u64> {
        match self {
            BlobSource::Store(store) => std::fs::metadata(store.blob_path(digest)).map(|m| m.len()),
            BlobSource::File(path) => std::fs::metadata(path).map(|m| m.len()),
            BlobSource::Bytes(b) => Ok(b.len() as u64),
        }
    }

    /// The file the blob is read from, for error messages.
    fn path(&self, digest: &Digest) -> std::path::PathBuf {
        match self {
            BlobSource::Store(store) => store.blob_path(digest),
            BlobSource::File(path) => path.to_path_buf(),
            BlobSource::Bytes(_) => std::path::PathBuf::from("<memory>"),
        }
    }

    fn body(&self, digest: &Digest, offset: u64, len: u64) -> io::Result<reqwest::Body> {
        let path = match self {
            BlobSource::Store(store) => store.blob_path(digest),
            BlobSource::File(path) => path.to_path_buf(),
            BlobSource::Bytes(b) => {
                let (start, end) = (offset as usize, (offset + len) as usize);
                return b
                    .get(start..end)
                    .map(|_| reqwest::Body::from(b.slice(start..end)))
                    .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the blob is shorter than its declared size"));
            }
        };
        let mut file = std::fs::File::open(&path)?;
        file.seek(SeekFrom::Start(offset))?;
        let file = tokio::fs::File::from_std(file).take(len);
        Ok(reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(file, 256 << 10)))
    }
}

/// What [`RegistryClient::ensure_blob`] had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobPush {
    /// The repository already had it (HEAD).
    Existed,
    /// Mounted from another repository of the same registry.
    Mounted,
    /// Uploaded.
    Uploaded,
}

/// The answer to an upload POST.
enum UploadStart {
    Mounted,
    Session(Url),
}

/// The registry a request goes to and the token scopes it needs.
struct Target<'a> {
    registry: &'a str,
    host: &'a str,
    image: String,
    scopes: Vec<Scope>,
}

/// A value learnt once and shared; its lock is held while it is being fetched, so
/// concurrent requests wait for one fetch instead of each making their own.
type Slot<T> = Arc<AsyncMutex<Option<T>>>;

struct Inner {
    http: reqwest::Client,
    credentials: Credentials,
    source: Option<Arc<dyn CredentialSource>>,
    /// Per registry: what `source` answered, asked once.
    asked: Mutex<HashMap<String, Slot<Option<Credential>>>>,
    insecure: Vec<String>,
    retry: RetryPolicy,
    chunk_size: Option<u64>,
    /// Per registry: the challenge of `GET /v2/`, learnt once.
    challenges: Mutex<HashMap<String, Slot<Challenge>>>,
    /// Per (registry, scopes): the current bearer token.
    tokens: Mutex<HashMap<(String, String), Slot<Token>>>,
    stats: Counters,
}

/// A registry client; clone it freely (clones share connections, tokens and counters).
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("registries_with_credentials", &self.inner.credentials.iter().map(|(r, _)| r).collect::<Vec<_>>())
            .field("insecure", &self.inner.insecure)
            .finish()
    }
}

/// Whether a registry name (`host`, `host:port`, `[v6]:port`) is on the loopback interface.
pub fn is_loopback(registry: &str) -> bool {
    let host = host_of(registry);
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether `url` points at the registry host `host` (`name`, `name:port`, `[v6]:port`).
fn same_authority(url: &Url, host: &str) -> bool {
    let Some(url_host) = url.host_str() else { return false };
    let url_host = url_host.trim_start_matches('[').trim_end_matches(']');
    if !url_host.eq_ignore_ascii_case(host_of(host)) {
        return false;
    }
    match port_of(host) {
        Some(port) => url.port_or_known_default() == Some(port),
        None => url.port().is_none(), // the scheme's default port
    }
}

fn port_of(registry: &str) -> Option<u16> {
    let rest = match registry.strip_prefix('[') {
        Some(r) => r.split_once(']').map_or("", |(_, p)| p),
        None => registry,
    };
    rest.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match registry.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => registry,
    }
}

impl RegistryClient {
    /// Build a client.
    pub fn new(options: RegistryOptions) -> Result<RegistryClient, RegistryError> {
        let http = reqwest::Client::builder()
            .user_agent(options.user_agent.clone())
            .connect_timeout(options.connect_timeout)
            .read_timeout(options.read_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| RegistryError::Config(error_chain(&e)))?;
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                http,
                credentials: options.credentials,
                source: options.source,
                asked: Mutex::new(HashMap::new()),
                insecure: options.insecure,
                retry: RetryPolicy { attempts: options.retry.attempts.max(1), ..options.retry },
                chunk_size: options.chunk_size.filter(|&c| c > 0),
                challenges: Mutex::new(HashMap::new()),
                tokens: Mutex::new(HashMap::new()),
                stats: Counters::default(),
            }),
        })
    }

    /// A client without credentials and with default options.
    pub fn anonymous() -> Result<RegistryClient, RegistryError> {
        RegistryClient::new(RegistryOptions::default())
    }

    /// What this client moved so far.
    pub fn stats(&self) -> TransferStats {
        let c = &self.inner.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TransferStats {
            blobs_downloaded: get(&c.blobs_downloaded),
            bytes_downloaded: get(&c.bytes_downloaded),
            blobs_uploaded: get(&c.blobs_uploaded),
            bytes_uploaded: get(&c.bytes_uploaded),
            blobs_mounted: get(&c.blobs_mounted),
            blobs_existed: get(&c.blobs_existed),
            manifests_pushed: get(&c.manifests_pushed),
            retries: get(&c.retries),
        }
    }

    /// `http` for loopback and insecure registries, `https` otherwise.
    pub fn scheme(&self, registry: &str) -> &'static str {
        let host = host_of(registry);
        let listed = self.inner.insecure.iter().any(|i| i == registry || (host_of(i) == i.as_str() && i == host));
        if listed || is_loopback(registry) {
            "http"
        } else {
            "https"
        }
    }

    // ----- pull -------------------------------------------------------------------------

    /// Resolve `reference` for `platform`: fetch the manifest (choosing the platform's entry
    /// of an index or manifest list), then the configuration, verifying every digest.
    ///
    /// A reference that names a single-platform manifest is returned whatever its platform
    /// (`platform` is then `None`); as BuildKit does, the caller may warn when
    /// `config.architecture()` differs from what it asked for.
    pub async fn resolve(&self, reference: &Reference, platform: &Platform) -> Result<ResolvedManifest, RegistryError> {
        let image = reference.to_string();
        let top = self.fetch_manifest(reference).await?;
        let (index_digest, chosen_platform, manifest) = match top.kind {
            ManifestKind::Manifest => (None, None, top),
            ManifestKind::Index => {
                let invalid = |reason: String| RegistryError::Invalid { image: image.clone(), what: "index".into(), reason };
                let entries = media::index_entries(&top.bytes).map_err(|source| RegistryError::InvalidDocument {
                    image: image.clone(),
                    what: "index".into(),
                    source,
                })?;
                let chosen = media::choose(&entries, platform).map_err(|available| RegistryError::NoMatchingPlatform {
                    image: image.clone(),
                    wanted: platform.clone(),
                    available,
                })?;
                let child = self.fetch_manifest(&reference.with_digest(chosen.digest.clone())).await?;
                if let Some(size) = chosen.size {
                    if size != child.bytes.len() as u64 {
                        return Err(invalid(format!(
                            "the index says the manifest {} for {} is {size} bytes, the registry sent {}",
                            chosen.digest,
                            chosen.platform,
                            child.bytes.len()
                        )));
                    }
                }
                if child.kind != ManifestKind::Manifest {
                    return Err(invalid(format!("the entry {} for {} is an index, not an image manifest", chosen.digest, chosen.platform)));
                }
                (Some(top.digest), Some(chosen.platform), child)
            }
        };

        let invalid = |reason: String| RegistryError::Invalid { image: image.clone(), what: "manifest".into(), reason };
        let parsed: crate::image::Manifest = serde_json::from_slice(&manifest.bytes).map_err(|source| RegistryError::InvalidJson {
            image: image.clone(),
            what: "manifest".into(),
            source,
        })?;
        let config_digest = parsed.config.digest.clone();
        let config_bytes = self.fetch_blob_bytes(reference, &config_digest, "image config", CONFIG_LIMIT).await?;
        let config: crate::image::ImageConfig = serde_json::from_slice(&config_bytes).map_err(|source| RegistryError::InvalidJson {
            image: image.clone(),
            what: "image config".into(),
            source,
        })?;

        let diff_ids = &config.rootfs.diff_ids;
        if diff_ids.len() != parsed.layers.len() {
            return Err(invalid(format!("it has {} layers but the config lists {} diff_ids", parsed.layers.len(), diff_ids.len())));
        }
        let layers = parsed
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(layer, diff_id)| LayerDescriptor {
                digest: layer.digest.clone(),
                size: layer.size,
                media_type: layer.media_type.clone(),
                diff_id: diff_id.clone(),
            })
            .collect();

        Ok(ResolvedManifest {
            reference: reference.clone(),
            index_digest,
            platform: chosen_platform,
            manifest_digest: manifest.digest,
            manifest: parsed,
            manifest_bytes: manifest.bytes,
            media_type: manifest.media_type,
            config,
            config_bytes,
            config_digest,
            layers,
        })
    }

    /// Fetch the manifest or index `reference` names, verifying it against the reference's
    /// digest (or the registry's `Docker-Content-Digest` when pulled by tag).
    pub async fn fetch_manifest(&self, reference: &Reference) -> Result<FetchedManifest, RegistryError> {
        let t = self.target(reference, vec![Scope::pull(&reference.repository)]);
        let url = format!("{}{}/manifests/{}", self.base(&t), reference.repository, reference.target());
        let what = format!("image {}", t.image);
        let (content_type, header_digest, body) = self
            .retry(&what, || {
                let (t, url, what) = (&t, &url, &what);
                async move {
                    let resp = self.send(t, what, &|c| Ok(c.get(url).header(ACCEPT, media::MANIFEST_ACCEPT))).await?;
                    if !resp.status().is_success() {
                        return Err(self.status_error(t, what, resp).await);
                    }
                    let ct = header_str(&resp, CONTENT_TYPE);
                    let hd = header_str(&resp, "docker-content-digest");
                    let body = read_limited(resp, MANIFEST_LIMIT + 1).await.map_err(|e| transport_error(t.registry, what, e))?;
                    Ok((ct, hd, body))
                }
            })
            .await?;
        if body.len() > MANIFEST_LIMIT {
            return Err(RegistryError::TooLarge { image: t.image, what: "manifest".into(), limit: MANIFEST_LIMIT });
        }
        let digest = Digest::of(&body);
        let expected = match &reference.digest {
            Some(d) => Some((d.clone(), "manifest")),
            None => header_digest.and_then(|h| h.parse::<Digest>().ok()).map(|d| (d, "manifest (Docker-Content-Digest)")),
        };
        if let Some((expected, what)) = expected {
            if expected != digest {
                return Err(RegistryError::DigestMismatch { image: t.image, what: what.into(), expected, actual: digest });
            }
        }
        let (kind, media_type) = media::classify(content_type.as_deref(), &body).map_err(|source| RegistryError::InvalidDocument {
            image: t.image.clone(),
            what: "manifest".into(),
            source,
        })?;
        Ok(FetchedManifest { digest, media_type, kind, bytes: body })
    }

    /// Download blob `digest` of `reference`'s repository into `store`, streaming, and
    /// verify it; returns its size. A blob already in the store is not fetched again. A
    /// digest mismatch is an error and leaves nothing in the store.
    pub async fn fetch_blob(&self, reference: &Reference, digest: &Digest, store: &ContentStore) -> Result<u64, RegistryError> {
        let t = self.target(reference, vec![Scope::pull(&reference.repository)]);
        let store_err = |source| RegistryError::Store { image: t.image.clone(), source };
        if let Some(size) = store.size(digest).map_err(store_err)? {
            return Ok(size);
        }
        let url = format!("{}{}/blobs/{digest}", self.base(&t), reference.repository);
        let what = format!("blob {digest} of {}", t.image);

        let (tx, rx) = tokio::sync::mpsc::channel::<WriterMsg>(16);
        let writer = store.writer().map_err(store_err)?;
        let writer_task = tokio::task::spawn_blocking({
            let store = store.clone();
            move || write_blob(store, writer, rx)
        });

        // Bytes handed to the writer since its last restart: where a retry resumes.
        let mut sent = 0u64;
        let mut attempt = 1;
        let outcome = loop {
            match self.fetch_blob_attempt(&t, &what, &url, &mut sent, &tx).await {
                Err(e) if e.is_transient() && attempt < self.inner.retry.attempts => {
                    self.backoff(&what, &e, attempt).await;
                    attempt += 1;
                }
                other => break other,
            }
        };
        drop(tx);
        let writer =
            writer_task.await.map_err(|e| store_err(StoreError::Io { path: store.root().join("ingest"), source: io::Error::other(e) }))?;
        let writer = writer.map_err(store_err)?;
        outcome?;
        let expected = digest.clone();
        let committed = tokio::task::spawn_blocking(move || {
            let size = writer.size();
            writer.commit(Some(&expected)).map(|_| size)
        })
        .await
        .map_err(|e| store_err(StoreError::Io { path: store.root().join("ingest"), source: io::Error::other(e) }))?;
        match committed {
            Ok(size) => {
                bump(&self.inner.stats.blobs_downloaded, 1);
                Ok(size)
            }
            Err(StoreError::DigestMismatch { expected, actual, .. }) => {
                Err(RegistryError::DigestMismatch { image: t.image.clone(), what: "blob".into(), expected, actual })
            }
            Err(e) => Err(store_err(e)),
        }
    }

    async fn fetch_blob_attempt(
        &self,
        t: &Target<'_>,
        what: &str,
        url: &str,
        sent: &mut u64,
        tx: &tokio::sync::mpsc::Sender<WriterMsg>,
    ) -> Result<(), RegistryError> {
        let offset = *sent;
        let resp = self
            .send(t, what, &|c| {
                let rb = c.get(url);
                Ok(if offset > 0 { rb.header(RANGE, format!("bytes={offset}-")) } else { rb })
            })
            .await?;
        let writer_gone = || RegistryError::Protocol { registry: t.registry.to_string(), reason: "the blob writer stopped".into() };
        match resp.status() {
            StatusCode::OK => {
                if offset > 0 {
                    // The registry ignored Range: start over.
                    tx.send(WriterMsg::Restart).await.map_err(|_| writer_gone())?;
                    *sent = 0;
                }
            }
            StatusCode::PARTIAL_CONTENT if offset > 0 && content_range_start(&resp) == Some(offset) => {}
            StatusCode::PARTIAL_CONTENT | StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
                tx.send(WriterMsg::Restart).await.map_err(|_| writer_gone())?;
                *sent = 0;
                return Err(RegistryError::Transport {
                    registry: t.registry.to_string(),
                    what: what.to_string(),
                    reason: format!("the registry did not resume at byte {offset}; restarting"),
                });
            }
            _ => return Err(self.status_error(t, what, resp).await),
        }
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| transport_error(t.registry, what, e))?;
            *sent += chunk.len() as u64;
            bump(&self.inner.stats.bytes_downloaded, chunk.len() as u64);
            tx.send(WriterMsg::Data(chunk)).await.map_err(|_| writer_gone())?;
        }
        Ok(())
    }

    /// A small blob (an image config) into memory, verified.
    async fn fetch_blob_bytes(
        &self,
        reference: &Reference,
        digest: &Digest,
        what_kind: &str,
        limit: usize,
    ) -> Result<Vec<u8>, RegistryError> {
        let t = self.target(reference, vec![Scope::pull(&reference.repository)]);
        let url = format!("{}{}/blobs/{digest}", self.base(&t), reference.repository);
        let what = format!("{what_kind} {digest} of {}", t.image);
        let body = self
            .retry(&what, || {
                let (t, url, what) = (&t, &url, &what);
                async move {
                    let resp = self.send(t, what, &|c| Ok(c.get(url))).await?;
                    if !resp.status().is_success() {
                        return Err(self.status_error(t, what, resp).await);
                    }
                    read_limited(resp, limit + 1).await.map_err(|e| transport_error(t.registry, what, e))
                }
            })
            .await?;
        if body.len() > limit {
            return Err(RegistryError::TooLarge { image: t.image, what: what_kind.into(), limit });
        }
        let actual = Digest::of(&body);
        if actual != *digest {
            return Err(RegistryError::DigestMismatch { image: t.image, what: what_kind.into(), expected: digest.clone(), actual });
        }
        Ok(body)
    }

    // ----- push -------------------------------------------------------------------------

    /// Whether `reference`'s repository has blob `digest` (HEAD).
    pub async fn blob_exists(&self, reference: &Reference, digest: &Digest) -> Result<bool, RegistryError> {
        let t = self.target(reference, vec![Scope::pull(&reference.repository)]);
        self.head_blob(&t, reference, digest).await
    }

    async fn head_blob(&self, t: &Target<'_>, reference: &Reference, digest: &Digest) -> Result<bool, RegistryError> {
        let url = format!("{}{}/blobs/{digest}", self.base(t), reference.repository);
        let what = format!("checking blob {digest} in {}", reference.name());
        self.retry(&what, || {
            let (url, what) = (&url, &what);
            async move {
                let resp = self.send(t, what, &|c| Ok(c.head(url))).await?;
                match resp.status() {
                    s if s.is_success() => Ok(true),
                    StatusCode::NOT_FOUND => Ok(false),
                    _ => Err(self.status_error(t, what, resp).await),
                }
            }
        })
        .await
    }

    /// Mount blob `digest` from repository `from_repository` into `to`'s repository on the
    /// same registry. `Ok(false)` when the registry declined (it answered 202: the blob is
    /// not readable there); the caller then uploads it.
    pub async fn mount_blob(&self, from_repository: &str, to: &Reference, digest: &Digest) -> Result<bool, RegistryError> {
        let t = self.target(to, vec![Scope::push(&to.repository), Scope::pull(from_repository)]);
        let what = format!("mounting blob {digest} from {from_repository} into {}", to.name());
        self.retry(&what, || {
            let t = &t;
            async move {
                match self.start_upload(t, to, Some((from_repository, digest))).await? {
                    UploadStart::Mounted => Ok(true),
                    UploadStart::Session(location) => {
                        self.cancel_upload(t, location).await;
                        Ok(false)
                    }
                }
            }
        })
        .await
        .inspect(|&mounted| {
            if mounted {
                bump(&self.inner.stats.blobs_mounted, 1)
            }
        })
    }

    /// Upload blob `digest` of `size` bytes to `reference`'s repository, streaming it from
    /// `source` (monolithic PUT, or PATCH chunks when the client has a chunk size).
    pub async fn push_blob(&self, reference: &Reference, digest: &Digest, size: u64, source: BlobSource<'_>) -> Result<(), RegistryError> {
        let t = self.target(reference, vec![Scope::push(&reference.repository)]);
        self.check_source(&t, digest, size, &source)?;
        let what = format!("uploading blob {digest} to {}", reference.name());
        self.retry(&what, || {
            let (t, source) = (&t, &source);
            async move {
                match self.start_upload(t, reference, None).await? {
                    UploadStart::Session(location) => self.upload(t, location, digest, size, source).await,
                    UploadStart::Mounted => Ok(()),
                }
            }
        })
        .await
    }

    /// Make sure `reference`'s repository has blob `digest`: HEAD, then a cross-repository
    /// mount from `mount_from` when it is on the same registry, then an upload (also when
    /// the mount is declined).
    pub async fn ensure_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: u64,
        source: BlobSource<'_>,
        mount_from: Option<&Reference>,
    ) -> Result<BlobPush, RegistryError> {
        let mount_from = mount_from.filter(|m| m.registry == reference.registry && m.repository != reference.repository);
        let mut scopes = vec![Scope::push(&reference.repository)];
        if let Some(m) = mount_from {
            scopes.push(Scope::pull(&m.repository));
        }
        let t = self.target(reference, scopes);
        if self.head_blob(&t, reference, digest).await? {
            bump(&self.inner.stats.blobs_existed, 1);
            return Ok(BlobPush::Existed);
        }
        self.check_source(&t, digest, size, &source)?;
        let what = format!("pushing blob {digest} to {}", reference.name());
        self.retry(&what, || {
            let (t, source) = (&t, &source);
            async move {
                match self.start_upload(t, reference, mount_from.map(|m| (m.repository.as_str(), digest))).await? {
                    UploadStart::Mounted => {
                        bump(&self.inner.stats.blobs_mounted, 1);
                        Ok(BlobPush::Mounted)
                    }
                    UploadStart::Session(location) => {
                        self.upload(t, location, digest, size, source).await?;
                        Ok(BlobPush::Uploaded)
                    }
                }
            }
        })
        .await
    }

    /// Whether `reference` (its tag, or `digest` when it has none) already names manifest
    /// `digest` (HEAD): pushing an unchanged image then moves nothing.
    pub async fn manifest_is(&self, reference: &Reference, digest: &Digest) -> Result<bool, RegistryError> {
        let t = self.target(reference, vec![Scope::push(&reference.repository)]);
        let target = reference.tag.clone().unwrap_or_else(|| digest.to_string());
        let url = format!("{}{}/manifests/{target}", self.base(&t), reference.repository);
        let what = format!("checking manifest {target} of {}", t.image);
        self.retry(&what, || {
            let (t, url, what) = (&t, &url, &what);
            async move {
                let resp = self.send(t, what, &|c| Ok(c.head(url).header(ACCEPT, media::MANIFEST_ACCEPT))).await?;
                match resp.status() {
                    s if s.is_success() => {
                        Ok(header_str(&resp, "docker-content-digest").and_then(|h| h.parse::<Digest>().ok()).as_ref() == Some(digest))
                    }
                    StatusCode::NOT_FOUND => Ok(false),
                    _ => Err(self.status_error(t, what, resp).await),
                }
            }
        })
        .await
    }

    /// Push a manifest (or index) under `reference`'s tag (or digest, when it has no tag);
    /// returns its digest.
    pub async fn push_manifest(&self, reference: &Reference, bytes: &[u8], media_type: &str) -> Result<Digest, RegistryError> {
        let t = self.target(reference, vec![Scope::push(&reference.repository)]);
        let digest = Digest::of(bytes);
        if let (Some(expected), None) = (&reference.digest, &reference.tag) {
            if *expected != digest {
                return Err(RegistryError::DigestMismatch {
                    image: t.image.clone(),
                    what: "manifest to push".into(),
                    expected: expected.clone(),
                    actual: digest,
                });
            }
        }
        let target = reference.tag.clone().unwrap_or_else(|| digest.to_string());
        let url = format!("{}{}/manifests/{target}", self.base(&t), reference.repository);
        let what = format!("pushing manifest {digest} to {}", t.image);
        let body = Bytes::copy_from_slice(bytes);
        let header_digest = self
            .retry(&what, || {
                let (t, url, what, body) = (&t, &url, &what, &body);
                async move {
                    let resp = self.send(t, what, &|c| Ok(c.put(url).header(CONTENT_TYPE, media_type).body(body.clone()))).await?;
                    if !resp.status().is_success() {
                        return Err(self.status_error(t, what, resp).await);
                    }
                    Ok(header_str(&resp, "docker-content-digest"))
                }
            })
            .await?;
        if let Some(h) = header_digest.and_then(|h| h.parse::<Digest>().ok()) {
            if h != digest {
                return Err(RegistryError::Protocol {
                    registry: t.registry.to_string(),
                    reason: format!("it stored manifest {h} for {} while {digest} was pushed", t.image),
                });
            }
        }
        bump(&self.inner.stats.manifests_pushed, 1);
        Ok(digest)
    }

    /// Push an index (OCI index or Docker manifest list, told by its `mediaType`).
    pub async fn push_index(&self, reference: &Reference, bytes: &[u8]) -> Result<Digest, RegistryError> {
        match media::classify(None, bytes) {
            Ok((ManifestKind::Index, media_type)) => self.push_manifest(reference, bytes, &media_type).await,
            Ok((ManifestKind::Manifest, _)) => Err(RegistryError::Invalid {
                image: reference.to_string(),
                what: "index".into(),
                reason: "the document is an image manifest, not an index".into(),
            }),
            Err(source) => Err(RegistryError::InvalidDocument { image: reference.to_string(), what: "index".into(), source }),
        }
    }

    fn check_source(&self, t: &Target<'_>, digest: &Digest, size: u64, source: &BlobSource<'_>) -> Result<(), RegistryError> {
        match source.len(digest) {
            Ok(actual) if actual == size => Ok(()),
            Ok(actual) => Err(RegistryError::SizeMismatch { image: t.image.clone(), digest: digest.clone(), expected: size, actual }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(RegistryError::Store { image: t.image.clone(), source: StoreError::NotFound(digest.clone()) })
            }
            Err(e) => Err(RegistryError::Store { image: t.image.clone(), source: StoreError::Io { path: source.path(digest), source: e } }),
        }
    }

    /// `POST /v2/<name>/blobs/uploads/`, with `mount`/`from` when mounting.
    async fn start_upload(
        &self,
        t: &Target<'_>,
        reference: &Reference,
        mount: Option<(&str, &Digest)>,
    ) -> Result<UploadStart, RegistryError> {
        let mut url = Url::parse(&format!("{}{}/blobs/uploads/", self.base(t), reference.repository))
            .map_err(|e| RegistryError::Protocol { registry: t.registry.to_string(), reason: e.to_string() })?;
        if let Some((from, digest)) = mount {
            url.query_pairs_mut().append_pair("mount", digest.as_str()).append_pair("from", from);
        }
        let what = match mount {
            Some((from, digest)) => format!("mounting blob {digest} from {from} into {}", reference.name()),
            None => format!("starting an upload to {}", reference.name()),
        };
        let resp = self.send(t, &what, &|c| Ok(c.post(url.clone()).header(CONTENT_LENGTH, 0))).await?;
        match resp.status() {
            StatusCode::CREATED if mount.is_some() => Ok(UploadStart::Mounted),
            StatusCode::ACCEPTED => Ok(UploadStart::Session(self.location(t, &url, &resp)?)),
            _ => Err(self.status_error(t, &what, resp).await),
        }
    }

    /// Send the blob into an upload session and commit it with its digest.
    async fn upload(
        &self,
        t: &Target<'_>,
        mut location: Url,
        digest: &Digest,
        size: u64,
        source: &BlobSource<'_>,
    ) -> Result<(), RegistryError> {
        let what = format!("uploading blob {digest} to {}", t.image);
        let io_err =
            |e: io::Error| RegistryError::Store { image: t.image.clone(), source: StoreError::Io { path: source.path(digest), source: e } };
        let chunked = self.inner.chunk_size.filter(|&c| size > c);
        if let Some(chunk) = chunked {
            let mut offset = 0;
            while offset < size {
                let len = chunk.min(size - offset);
                let resp = self
                    .send(t, &what, &|c| {
                        let body = source.body(digest, offset, len).map_err(io_err)?;
                        Ok(c.patch(location.clone())
                            .header(CONTENT_TYPE, "application/octet-stream")
                            .header(CONTENT_RANGE, format!("{}-{}", offset, offset + len - 1))
                            .header(CONTENT_LENGTH, len)
                            .body(body))
                    })
                    .await?;
                if resp.status() != StatusCode::ACCEPTED {
                    return Err(self.status_error(t, &what, resp).await);
                }
                location = self.location(t, &location, &resp)?;
                offset += len;
            }
            location.query_pairs_mut().append_pair("digest", digest.as_str());
            let resp = self.send(t, &what, &|c| Ok(c.put(location.clone()).header(CONTENT_LENGTH, 0))).await?;
            self.finish_upload(t, &what, digest, resp).await?;
        } else {
            location.query_pairs_mut().append_pair("digest", digest.as_str());
            let resp = self
                .send(t, &what, &|c| {
                    let body = source.body(digest, 0, size).map_err(io_err)?;
                    Ok(c.put(location.clone()).header(CONTENT_TYPE, "application/octet-stream").header(CONTENT_LENGTH, size).body(body))
                })
                .await?;
            self.finish_upload(t, &what, digest, resp).await?;
        }
        bump(&self.inner.stats.blobs_uploaded, 1);
        bump(&self.inner.stats.bytes_uploaded, size);
        Ok(())
    }

    async fn finish_upload(&self, t: &Target<'_>, what: &str, digest: &Digest, resp: Response) -> Result<(), RegistryError> {
        if !resp.status().is_success() {
            return Err(self.status_error(t, what, resp).await);
        }
        if let Some(h) = header_str(&resp, "docker-content-digest").and_then(|h| h.parse::<Digest>().ok()) {
            if h != *digest {
                return Err(RegistryError::Protocol {
                    registry: t.registry.to_string(),
                    reason: format!("it stored blob {h} in {} while {digest} was uploaded", t.image),
                });
            }
        }
        Ok(())
    }

    /// Abandon an upload session (best effort).
    async fn cancel_upload(&self, t: &Target<'_>, location: Url) {
        let _ = self.send(t, "cancelling an upload", &|c| Ok(c.delete(location.clone()))).await;
    }

    fn location(&self, t: &Target<'_>, request_url: &Url, resp: &Response) -> Result<Url, RegistryError> {
        let loc = header_str(resp, LOCATION).ok_or_else(|| RegistryError::Protocol {
            registry: t.registry.to_string(),
            reason: format!("no Location header in the {} answer to an upload request", resp.status()),
        })?;
        request_url.join(&loc).map_err(|e| RegistryError::Protocol {
            registry: t.registry.to_string(),
            reason: format!("invalid upload Location {loc:?}: {e}"),
        })
    }

    // ----- plumbing ---------------------------------------------------------------------

    fn target<'a>(&self, reference: &'a Reference, scopes: Vec<Scope>) -> Target<'a> {
        Target { registry: &reference.registry, host: reference.api_host(), image: reference.to_string(), scopes }
    }

    fn base(&self, t: &Target<'_>) -> String {
        format!("{}://{}/v2/", self.scheme(t.registry), t.host)
    }

    async fn backoff(&self, what: &str, error: &RegistryError, failed_attempts: u32) {
        let policy = &self.inner.retry;
        let delay = error.retry_after().unwrap_or_else(|| policy.delay(failed_attempts)).min(policy.max_delay);
        tracing::warn!(%error, attempt = failed_attempts, ?delay, "retrying {what}");
        bump(&self.inner.stats.retries, 1);
        tokio::time::sleep(delay).await;
    }

    /// Run `op` until it succeeds, fails permanently, or the attempts are used up.
    async fn retry<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Err(e) if e.is_transient() && attempt < self.inner.retry.attempts => {
                    self.backoff(what, &e, attempt).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// One request with authentication: on a 401 the challenge is re-read and the token
    /// renewed once.
    async fn send(
        &self,
        t: &Target<'_>,
        what: &str,
        build: &(dyn Fn(&reqwest::Client) -> Result<RequestBuilder, RegistryError> + Send + Sync),
    ) -> Result<Response, RegistryError> {
        let mut renew = false;
        loop {
            let (challenge, auth) = self.authorization(t, renew).await?;
            let mut request = build(&self.inner.http)?.build().map_err(|e| transport_error(t.registry, what, e))?;
            // Credentials go to the registry's own host only, never to an upload Location
            // or redirect elsewhere (a storage backend, a CDN).
            if let Some(a) = auth.filter(|_| same_authority(request.url(), t.host)) {
                let value = reqwest::header::HeaderValue::from_str(&a).map_err(|_| RegistryError::Protocol {
                    registry: t.registry.to_string(),
                    reason: "the token contains characters not allowed in a header".into(),
                })?;
                request.headers_mut().insert(AUTHORIZATION, value);
            }
            let resp = self.inner.http.execute(request).await.map_err(|e| transport_error(t.registry, what, e))?;
            if resp.status() == StatusCode::UNAUTHORIZED && !renew {
                let fresh = header_str(&resp, WWW_AUTHENTICATE).and_then(|h| token::parse_challenge(&h));
                let changed = match &fresh {
                    Some(c) if *c != challenge => {
                        self.set_challenge(t.registry, c.clone()).await;
                        true
                    }
                    _ => false,
                };
                if changed || matches!(challenge, Challenge::Bearer { .. }) {
                    renew = true;
                    continue;
                }
            }
            return Ok(resp);
        }
    }

    /// The challenge of a registry and the Authorization header for `t`'s scopes.
    async fn authorization(&self, t: &Target<'_>, renew: bool) -> Result<(Challenge, Option<String>), RegistryError> {
        let challenge = self.challenge(t).await?;
        let header = match &challenge {
            Challenge::Anonymous => None,
            Challenge::Basic => match self.credential(t.registry).await {
                Some(Credential::UsernamePassword { username, password }) => Some(basic_header(&username, &password)),
                _ => None,
            },
            Challenge::Bearer { realm, service } => {
                let credential = self.credential(t.registry).await;
                Some(format!("Bearer {}", self.token(t, realm, service.as_deref(), credential.as_ref(), renew).await?))
            }
        };
        Ok((challenge, header))
    }

    /// The credential of a registry that asked for one: the given one, else what the
    /// source answers (asked once per registry; concurrent requests wait for that answer).
    async fn credential(&self, registry: &str) -> Option<Credential> {
        if let Some(c) = self.inner.credentials.get(registry) {
            return Some(c.clone());
        }
        let source = self.inner.source.as_ref()?;
        let cell = {
            let mut map = self.inner.asked.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(registry.to_string()).or_default().clone()
        };
        let mut guard = cell.lock().await;
        if let Some(answer) = guard.as_ref() {
            return answer.clone();
        }
        let answer = source.credential(registry).await;
        *guard = Some(answer.clone());
        answer
    }

    /// Whether a credential for `registry` was given or answered (without asking).
    fn has_credential(&self, registry: &str) -> bool {
        if self.inner.credentials.get(registry).is_some() {
            return true;
        }
        let cell = self.inner.asked.lock().unwrap_or_else(|e| e.into_inner()).get(registry).cloned();
        cell.is_some_and(|c| c.try_lock().is_ok_and(|g| matches!(*g, Some(Some(_)))))
    }

    async fn challenge(&self, t: &Target<'_>) -> Result<Challenge, RegistryError> {
        let cell = {
            let mut map = self.inner.challenges.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(t.registry.to_string()).or_default().clone()
        };
        let mut guard = cell.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let url = self.base(t);
        let what = "GET /v2/";
        let resp = self.inner.http.get(&url).send().await.map_err(|e| transport_error(t.registry, what, e))?;
        let status = resp.status();
        let challenge = if status == StatusCode::UNAUTHORIZED {
            header_str(&resp, WWW_AUTHENTICATE).and_then(|h| token::parse_challenge(&h)).unwrap_or(Challenge::Basic)
        } else if is_transient_status(status.as_u16()) {
            return Err(self.status_error(t, what, resp).await);
        } else {
            // 200, or a registry without a /v2/ endpoint: go anonymous and let the real
            // request report what is wrong.
            Challenge::Anonymous
        };
        *guard = Some(challenge.clone());
        Ok(challenge)
    }

    async fn set_challenge(&self, registry: &str, challenge: Challenge) {
        let cell = {
            let mut map = self.inner.challenges.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(registry.to_string()).or_default().clone()
        };
        *cell.lock().await = Some(challenge);
    }

    async fn token(
        &self,
        t: &Target<'_>,
        realm: &str,
        service: Option<&str>,
        credential: Option<&Credential>,
        renew: bool,
    ) -> Result<String, RegistryError> {
        let key = (t.registry.to_string(), token::scope_key(&t.scopes));
        let cell = {
            let mut map = self.inner.tokens.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key).or_default().clone()
        };
        let mut guard = cell.lock().await;
        if !renew {
            if let Some(tok) = guard.as_ref().filter(|t| t.fresh()) {
                return Ok(tok.value.clone());
            }
        }
        let tok = token::fetch_token(&self.inner.http, t.registry, realm, service, &t.scopes, credential).await?;
        let value = tok.value.clone();
        *guard = Some(tok);
        Ok(value)
    }

    /// Turn an unsuccessful response into an error naming the registry and the reason.
    async fn status_error(&self, t: &Target<'_>, what: &str, resp: Response) -> RegistryError {
        let status = resp.status();
        let retry_after = header_str(&resp, RETRY_AFTER).and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs);
        let body = read_limited(resp, 64 << 10).await.unwrap_or_default();
        let message = error_message(&body);
        let (registry, what) = (t.registry.to_string(), what.to_string());
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                let who =
                    if self.has_credential(t.registry) { "with the given credentials" } else { "anonymously (no credentials for it)" };
                RegistryError::Unauthorized { registry, what, reason: format!("{status} {who}: {message}") }
            }
            StatusCode::NOT_FOUND => RegistryError::NotFound { registry, what, reason: message },
            _ => RegistryError::Status { registry, what, status: status.as_u16(), reason: message, retry_after },
        }
    }
}

enum WriterMsg {
    Data(Bytes),
    Restart,
}

/// The blocking side of a blob download: writes chunks into the store's ingest file.
fn write_blob(
    store: ContentStore,
    mut writer: BlobWriter,
    mut rx: tokio::sync::mpsc::Receiver<WriterMsg>,
) -> Result<BlobWriter, StoreError> {
    let ingest = store.root().join("ingest");
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            WriterMsg::Data(b) => writer.write_all(&b).map_err(|source| StoreError::Io { path: ingest.clone(), source })?,
            WriterMsg::Restart => writer = store.writer()?,
        }
    }
    Ok(writer)
}

fn basic_header(username: &str, password: &str) -> String {
    format!("Basic {}", base64_encode(format!("{username}:{password}").as_bytes()))
}

/// Standard base64 (RFC 4648, with padding), as docker config `auth` fields and Basic
/// credentials use it.
pub fn base64_encode(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn header_str(resp: &Response, name: impl reqwest::header::AsHeaderName) -> Option<String> {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// The first byte position of a `Content-Range: bytes <start>-<end>/<total>` header.
fn content_range_start(resp: &Response) -> Option<u64> {
    let v = header_str(resp, CONTENT_RANGE)?;
    let range = v.trim().strip_prefix("bytes")?.trim();
    range.split('-').next()?.trim().parse().ok()
}

/// Read at most `limit` bytes of a body (the rest is not read).
pub(crate) async fn read_limited(resp: Response, limit: usize) -> Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        let room = limit - out.len();
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

/// The `errors` of a registry error body (`CODE: message`), else the start of the body.
pub(crate) fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        code: Option<String>,
        message: Option<String>,
    }
    if let Ok(e) = serde_json::from_slice::<Errors>(body) {
        let parts: Vec<String> = e
            .errors
            .into_iter()
            .map(|e| match (e.code, e.message) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c,
                (None, Some(m)) => m,
                (None, None) => "unknown error".into(),
            })
            .collect();
        if !parts.is_empty() {
            return parts.join("; ");
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "no details given".to_string()
    } else {
        text.chars().take(300).collect()
    }
}

/// A reqwest error as a registry error: connection failures are `Unreachable`.
pub(crate) fn transport_error(registry: &str, what: &str, e: reqwest::Error) -> RegistryError {
    let reason = error_chain(&e);
    if e.is_connect() {
        RegistryError::Unreachable { registry: registry.to_string(), reason }
    } else {
        RegistryError::Transport { registry: registry.to_string(), what: what.to_string(), reason }
    }
}

/// An error and its sources, without repeating a message its source already contains.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let msg = err.to_string();
        if !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        cur = err.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_insecure_registries_use_http() {
        let client = RegistryClient::new(RegistryOptions {
            insecure: vec!["reg.internal:5000".into(), "plain.example".into()],
            ..Default::default()
        })
        .unwrap();
        for (registry, scheme) in [
            ("127.0.0.1:5000", "http"),
            ("127.1.2.3", "http"),
            ("localhost:5000", "http"),
            ("localhost", "http"),
            ("[::1]:5000", "http"),
            ("reg.internal:5000", "http"),
            ("reg.internal:6000", "https"),
            ("plain.example", "http"),
            ("plain.example:8080", "http"),
            ("docker.io", "https"),
            ("10.0.0.1:5000", "https"),
            ("ghcr.io", "https"),
        ] {
            assert_eq!(client.scheme(registry), scheme, "{registry}");
        }
    }

    #[test]
    fn credentials_are_sent_to_the_registry_host_only() {
        let url = |u: &str| Url::parse(u).unwrap();
        assert!(same_authority(&url("http://127.0.0.1:5000/v2/x/blobs/uploads/abc"), "127.0.0.1:5000"));
        assert!(same_authority(&url("https://registry-1.docker.io/v2/"), "registry-1.docker.io"));
        assert!(same_authority(&url("https://Registry-1.Docker.io:443/v2/"), "registry-1.docker.io"));
        assert!(same_authority(&url("http://[::1]:5000/v2/"), "[::1]:5000"));
        assert!(!same_authority(&url("http://127.0.0.1:5001/v2/"), "127.0.0.1:5000"));
        assert!(!same_authority(&url("https://production.cloudflare.docker.com/blob"), "registry-1.docker.io"));
        assert!(!same_authority(&url("https://registry-1.docker.io:8443/v2/"), "registry-1.docker.io"));
        assert!(!same_authority(&url("https://s3.example/bucket?sig=1"), "s3.example:9000"));
    }

    #[test]
    fn transient_errors_are_the_retryable_ones() {
        let status =
            |s: u16| RegistryError::Status { registry: "r".into(), what: "w".into(), status: s, reason: String::new(), retry_after: None };
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(status(s).is_transient(), "{s}");
        }
        for s in [400, 404, 405, 413] {
            assert!(!status(s).is_transient(), "{s}");
        }
        assert!(RegistryError::Unreachable { registry: "r".into(), reason: String::new() }.is_transient());
        let unauthorized = RegistryError::Unauthorized { registry: "r".into(), what: "w".into(), reason: String::new() };
        assert!(!unauthorized.is_transient());
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = RetryPolicy { attempts: 10, base_delay: Duration::from_millis(100), max_delay: Duration::from_secs(1) };
        let d1 = p.delay(1);
        let d3 = p.delay(3);
        assert!(d1 >= Duration::from_millis(100) && d1 < Duration::from_millis(126), "{d1:?}");
        assert!(d3 >= Duration::from_millis(400) && d3 < Duration::from_millis(501), "{d3:?}");
        assert_eq!(p.delay(9), Duration::from_secs(1));
    }

    #[test]
    fn registry_error_bodies_are_summarized() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#;
        assert_eq!(error_message(body), "MANIFEST_UNKNOWN: manifest unknown");
        assert_eq!(error_message(b""), "no details given");
        assert_eq!(error_message(b"  upstream timeout \n"), "upstream timeout");
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, enc) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")]
        {
            assert_eq!(base64_encode(plain.as_bytes()), enc);
        }
        assert_eq!(basic_header("u", "p:w"), "Basic dTpwOnc=");
    }

    #[test]
    fn no_matching_platform_lists_what_exists() {
        let e = RegistryError::NoMatchingPlatform {
            image: "127.0.0.1:5000/x:1".into(),
            wanted: "linux/s390x".parse().unwrap(),
            available: vec!["linux/amd64".parse().unwrap(), "linux/arm64/v8".parse().unwrap()],
        };
        assert_eq!(e.to_string(), "127.0.0.1:5000/x:1 has no manifest for platform linux/s390x; available: linux/amd64, linux/arm64");
    }

    /// The engine spawns these futures on tokio's multi-threaded runtime.
    #[test]
    fn client_futures_are_send() {
        fn is_send<T: Send>(_: &T) {}
        let client = RegistryClient::anonymous().unwrap();
        let r: Reference = "127.0.0.1:1/x".parse().unwrap();
        let d = Digest::of(b"");
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let p = Platform::host();
        is_send(&client.resolve(&r, &p));
        is_send(&client.fetch_blob(&r, &d, &store));
        is_send(&client.ensure_blob(&r, &d, 0, BlobSource::Store(&store), None));
        is_send(&client.push_blob(&r, &d, 0, BlobSource::Bytes(Bytes::new())));
        is_send(&client.mount_blob("a", &r, &d));
        is_send(&client.push_manifest(&r, b"{}", media::OCI_MANIFEST));
        fn is_sync_clone<T: Send + Sync + Clone>(_: &T) {}
        is_sync_clone(&client);
    }
}
