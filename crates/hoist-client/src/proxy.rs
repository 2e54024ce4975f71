//! The loopback registry `--load` and `hoist pull` serve to the local Docker engine: a
//! read-only OCI distribution endpoint on 127.0.0.1 whose manifests and configs come with
//! the builder's export session and whose blobs stream from the builder (`ReadBlob`) only
//! when the engine asks for them — so the engine fetches exactly the layers it lacks.
//!
//! It counts what it served (blob GETs and bytes), which is what `--load` reports as moved.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use hoist_oci::digest::Digest;
use tokio_util::sync::CancellationToken;

use crate::{v1, Client};

/// Why an export session cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A digest the builder sent does not parse.
    #[error("the builder sent an invalid digest {0:?}")]
    InvalidDigest(String),
    /// A document's bytes do not hash to its digest.
    #[error("the builder sent document {0} whose bytes do not match its digest")]
    Mismatch(Digest),
    /// The session lacks a manifest it names.
    #[error("the builder's export session lacks manifest {0}")]
    MissingManifest(Digest),
    /// A manifest of the session is not a valid image manifest.
    #[error("manifest {digest} from the builder is invalid: {error}")]
    InvalidManifest {
        /// The manifest's digest.
        digest: Digest,
        /// Why it does not parse.
        error: serde_json::Error,
    },
}

/// What the registry serves: one repository, its tag, the documents of an export session
/// and the sizes of its blobs.
#[derive(Debug, Clone)]
pub struct Content {
    /// Repository path (`hoist-load/<random>`).
    pub repository: String,
    /// Tag → digest of the manifest (or index) it names.
    pub tags: HashMap<String, Digest>,
    /// Manifests, indexes and configs: digest → (media type, bytes).
    pub documents: HashMap<Digest, (String, bytes::Bytes)>,
    /// Blobs streamed from the builder: digest → size.
    pub blobs: HashMap<Digest, u64>,
    /// Which of the blobs are layers (the rest are configs).
    pub layers: std::collections::HashSet<Digest>,
}

/// Counters of what the registry served.
#[derive(Debug, Default)]
pub struct Served {
    /// Distinct layer blobs requested with GET (a retried GET counts once).
    pub layers: std::sync::Mutex<std::collections::HashSet<Digest>>,
    /// Layer blob GETs (retries included).
    pub layer_gets: AtomicU64,
    /// Bytes of layer blobs sent.
    pub layer_bytes: AtomicU64,
    /// Config and other blob GETs.
    pub other_gets: AtomicU64,
    /// Bytes of those.
    pub other_bytes: AtomicU64,
    /// Manifest GETs.
    pub manifest_gets: AtomicU64,
}

impl Served {
    fn add(&self, layer: bool, n: u64) {
        if layer {
            self.layer_bytes.fetch_add(n, Ordering::Relaxed);
        } else {
            self.other_bytes.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// (distinct layers fetched, layer bytes sent, blob GETs, all blob bytes sent).
    pub fn totals(&self) -> (u64, u64, u64, u64) {
        let distinct = self.layers.lock().map(|s| s.len() as u64).unwrap_or(0);
        let l = self.layer_gets.load(Ordering::Relaxed);
        let lb = self.layer_bytes.load(Ordering::Relaxed);
        let o = self.other_gets.load(Ordering::Relaxed);
        let ob = self.other_bytes.load(Ordering::Relaxed);
        (distinct, lb, l + o, lb + ob)
    }
}

/// Where blob bytes come from.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // one per proxy
pub enum BlobBackend {
    /// An export session on the builder.
    Builder {
        /// The builder that holds the session.
        client: Client,
        /// The export session's id.
        session: String,
    },
    /// Bytes in memory (tests).
    Memory(Arc<HashMap<Digest, bytes::Bytes>>),
}

struct Shared {
    content: Content,
    backend: BlobBackend,
    served: Arc<Served>,
}

/// A running loopback registry; stopped when dropped.
pub struct LoopbackRegistry {
    /// `127.0.0.1:PORT`.
    pub addr: SocketAddr,
    /// What it served so far.
    pub served: Arc<Served>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl LoopbackRegistry {
    /// Serve `content` on a free port of 127.0.0.1.
    pub async fn start(content: Content, backend: BlobBackend) -> std::io::Result<LoopbackRegistry> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let served = Arc::new(Served::default());
        let shared = Arc::new(Shared { content, backend, served: served.clone() });
        let app = axum::Router::new().fallback(handle).with_state(shared);
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(async move { s.cancelled().await }).await;
        });
        Ok(LoopbackRegistry { addr, served, stop, task: Some(task) })
    }

    /// Stop serving and wait for the server to end.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
        }
    }
}

impl Drop for LoopbackRegistry {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    let body = serde_json::json!({ "errors": [{ "code": code, "message": message }] }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// What a request path names.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Base,
    Manifest { name: &'a str, reference: &'a str },
    Blob { name: &'a str, digest: &'a str },
}

fn route(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Route::Base);
    }
    let rest = rest.strip_prefix('/')?;
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        return Some(Route::Manifest { name, reference });
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        if !digest.contains('/') {
            return Some(Route::Blob { name, digest });
        }
    }
    None
}

/// `bytes=N-` (the only form the engine sends when resuming).
fn range_start(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get(header::RANGE)?.to_str().ok()?;
    let (start, end) = v.strip_prefix("bytes=")?.split_once('-')?;
    if !end.is_empty() {
        return None;
    }
    start.parse().ok()
}

async fn handle(State(shared): State<Arc<Shared>>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", "this registry is read-only".into());
    }
    let head = method == Method::HEAD;
    let content = &shared.content;
    match route(uri.path()) {
        Some(Route::Base) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::HeaderName::from_static("docker-distribution-api-version"), "registry/2.0"),
            ],
            "{}",
        )
            .into_response(),
        Some(Route::Manifest { name, reference }) => {
            if name != content.repository {
                return error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", format!("repository {name} is not served here"));
            }
            let digest = match reference.parse::<Digest>() {
                Ok(d) => Some(d),
                Err(_) => content.tags.get(reference).cloned(),
            };
            let Some((media_type, bytes)) = digest.as_ref().and_then(|d| content.documents.get(d)) else {
                return error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", format!("manifest {reference} is not served here"));
            };
            let digest = digest.map(|d| d.to_string()).unwrap_or_default();
            if !head {
                shared.served.manifest_gets.fetch_add(1, Ordering::Relaxed);
            }
            let body = if head { Body::empty() } else { Body::from(bytes.clone()) };
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, media_type.as_str())
                .header(header::CONTENT_LENGTH, bytes.len())
                .header("docker-content-digest", digest)
                .body(body)
                .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string()))
        }
        Some(Route::Blob { name, digest }) => {
            if name != content.repository {
                return error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", format!("repository {name} is not served here"));
            }
            let Ok(d) = digest.parse::<Digest>() else {
                return error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", format!("{digest:?} is not a digest"));
            };
            // Configs travel with the session; they are blobs to the engine.
            if let Some((_, bytes)) = content.documents.get(&d).filter(|_| !content.blobs.contains_key(&d)) {
                if !head {
                    shared.served.other_gets.fetch_add(1, Ordering::Relaxed);
                    shared.served.add(false, bytes.len() as u64);
                }
                return blob_response(head, bytes.len() as u64, 0, &d, if head { Body::empty() } else { Body::from(bytes.clone()) });
            }
            let Some(&size) = content.blobs.get(&d) else {
                return error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", format!("blob {d} is not served here"));
            };
            let offset = range_start(&headers).unwrap_or(0).min(size);
            if head {
                return blob_response(true, size, 0, &d, Body::empty());
            }
            let layer = content.layers.contains(&d);
            if layer {
                shared.served.layer_gets.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut s) = shared.served.layers.lock() {
                    s.insert(d.clone());
                }
            } else {
                shared.served.other_gets.fetch_add(1, Ordering::Relaxed);
            }
            let served = shared.served.clone();
            let body = match &shared.backend {
                BlobBackend::Memory(map) => {
                    let bytes = map.get(&d).cloned().unwrap_or_default().slice(offset as usize..);
                    served.add(layer, bytes.len() as u64);
                    Body::from(bytes)
                }
                BlobBackend::Builder { client, session } => {
                    let mut client = client.clone();
                    let req = v1::ReadBlobRequest { session: session.clone(), digest: d.to_string(), offset };
                    let stream = match client.read_blob(req).await {
                        Ok(r) => r.into_inner(),
                        Err(s) => return error(StatusCode::BAD_GATEWAY, "UNKNOWN", format!("the builder: {}", s.message())),
                    };
                    Body::from_stream(stream.map(move |m| match m {
                        Ok(b) => {
                            served.add(layer, b.data.len() as u64);
                            Ok(bytes::Bytes::from(b.data))
                        }
                        Err(s) => Err(std::io::Error::other(format!("the builder: {}", s.message()))),
                    }))
                }
            };
            blob_response(false, size, offset, &d, body)
        }
        None => error(StatusCode::NOT_FOUND, "UNSUPPORTED", format!("{} is not part of the registry API served here", uri.path())),
    }
}

fn blob_response(head: bool, size: u64, offset: u64, digest: &Digest, body: Body) -> Response {
    let mut b = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, size - offset)
        .header("docker-content-digest", digest.to_string())
        .header(header::ACCEPT_RANGES, "bytes");
    if offset > 0 && !head {
        b = b
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_RANGE, format!("bytes {offset}-{}/{size}", size.saturating_sub(1)));
    } else {
        b = b.status(StatusCode::OK);
    }
    b.body(body).unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string()))
}

/// The content of an export session served under `repository:tag`.
pub fn content_of(session: &v1::ExportSession, repository: &str, tag: &str) -> Result<Content, ProxyError> {
    let parse = |d: &str| d.parse::<Digest>().map_err(|_| ProxyError::InvalidDigest(d.to_string()));
    let mut documents = HashMap::new();
    for d in &session.documents {
        let digest = parse(&d.digest)?;
        if Digest::of(&d.data) != digest {
            return Err(ProxyError::Mismatch(digest));
        }
        documents.insert(digest, (d.media_type.clone(), bytes::Bytes::from(d.data.clone())));
    }
    let top = parse(&session.digest)?;
    if !documents.contains_key(&top) {
        return Err(ProxyError::MissingManifest(top));
    }
    let mut blobs = HashMap::new();
    let mut layers = std::collections::HashSet::new();
    for m in &session.manifests {
        let d = parse(&m.digest)?;
        let (_, bytes) = documents.get(&d).ok_or_else(|| ProxyError::MissingManifest(d.clone()))?;
        let manifest: hoist_oci::image::Manifest =
            serde_json::from_slice(bytes).map_err(|error| ProxyError::InvalidManifest { digest: d.clone(), error })?;
        for l in &manifest.layers {
            blobs.insert(l.digest.clone(), l.size);
            layers.insert(l.digest.clone());
        }
    }
    Ok(Content { repository: repository.to_string(), tags: [(tag.to_string(), top)].into_iter().collect(), documents, blobs, layers })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/v2/"), Some(Route::Base));
        assert_eq!(route("/v2"), Some(Route::Base));
        assert_eq!(route("/v2/hoist-load/abc/manifests/t1"), Some(Route::Manifest { name: "hoist-load/abc", reference: "t1" }));
        assert_eq!(route("/v2/a/blobs/sha256:00"), Some(Route::Blob { name: "a", digest: "sha256:00" }));
        assert_eq!(route("/v2/a/blobs/uploads/"), None);
        assert_eq!(route("/v3/a/manifests/x"), None);
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, "bytes=10-".parse().unwrap());
        assert_eq!(range_start(&h), Some(10));
        h.insert(header::RANGE, "bytes=10-20".parse().unwrap());
        assert_eq!(range_start(&h), None);
    }

    /// The registry answers as the distribution API says, serves only its own content, and
    /// counts the blob bytes it sends.
    #[tokio::test]
    async fn serves_manifests_and_blobs_and_counts_them() {
        let layer = bytes::Bytes::from_static(b"layer bytes");
        let ld = Digest::of(&layer);
        let config = bytes::Bytes::from_static(b"{}");
        let cd = Digest::of(&config);
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld.to_string(), "size": layer.len()}]
        })
        .to_string();
        let md = Digest::of(manifest.as_bytes());
        let session = v1::ExportSession {
            id: "s".into(),
            digest: md.to_string(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            documents: vec![
                v1::ExportDocument {
                    digest: md.to_string(),
                    media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                    data: manifest.clone().into_bytes(),
                },
                v1::ExportDocument {
                    digest: cd.to_string(),
                    media_type: "application/vnd.oci.image.config.v1+json".into(),
                    data: config.to_vec(),
                },
            ],
            manifests: vec![v1::ManifestRef { digest: md.to_string(), ..Default::default() }],
            ..Default::default()
        };
        let content = content_of(&session, "hoist-load/x", "t").unwrap();
        let backend = BlobBackend::Memory(Arc::new([(ld.clone(), layer.clone())].into_iter().collect()));
        let reg = LoopbackRegistry::start(content, backend).await.unwrap();
        let base = format!("http://{}", reg.addr);
        let http = reqwest_like::Client::new();
        let (s, _, body) = http.get(&format!("{base}/v2/")).await;
        assert_eq!((s, body.as_slice()), (200, &b"{}"[..]));
        let (s, h, body) = http.get(&format!("{base}/v2/hoist-load/x/manifests/t")).await;
        assert_eq!(s, 200);
        assert_eq!(body, manifest.as_bytes());
        assert!(h.contains(&format!("docker-content-digest: {md}")), "{h}");
        let (s, _, body) = http.get(&format!("{base}/v2/hoist-load/x/manifests/{md}")).await;
        assert_eq!((s, body.len()), (200, manifest.len()));
        assert_eq!(http.get(&format!("{base}/v2/hoist-load/x/manifests/other")).await.0, 404);
        assert_eq!(http.get(&format!("{base}/v2/someone/else/manifests/t")).await.0, 404);
        let (s, h, body) = http.head(&format!("{base}/v2/hoist-load/x/blobs/{ld}")).await;
        assert_eq!(s, 200);
        assert!(h.contains(&format!("content-length: {}", layer.len())), "{h}");
        assert!(body.is_empty());
        assert_eq!(reg.served.totals(), (0, 0, 0, 0), "HEAD moves nothing");
        let (s, _, body) = http.get(&format!("{base}/v2/hoist-load/x/blobs/{ld}")).await;
        assert_eq!((s, body.as_slice()), (200, &layer[..]));
        // A resumed GET (the engine retrying): the rest of the blob, counted once as a layer.
        let (s, h, body) = http.get_range(&format!("{base}/v2/hoist-load/x/blobs/{ld}"), 6).await;
        assert_eq!((s, body.as_slice()), (206, &layer[6..]));
        assert!(h.contains(&format!("content-range: bytes 6-{}/{}", layer.len() - 1, layer.len())), "{h}");
        let (s, _, body) = http.get(&format!("{base}/v2/hoist-load/x/blobs/{cd}")).await;
        assert_eq!((s, body.as_slice()), (200, &b"{}"[..]));
        let unknown = Digest::of(b"not here");
        assert_eq!(http.get(&format!("{base}/v2/hoist-load/x/blobs/{unknown}")).await.0, 404);
        let sent = (2 * layer.len() - 6) as u64;
        assert_eq!(reg.served.totals(), (1, sent, 3, sent + 2), "one distinct layer, three GETs");
        reg.stop().await;
    }

    /// A minimal HTTP/1.1 client over a TcpStream (the crate has no HTTP client dependency).
    mod reqwest_like {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        pub struct Client;

        impl Client {
            pub fn new() -> Client {
                Client
            }
            pub async fn get(&self, url: &str) -> (u16, String, Vec<u8>) {
                self.request("GET", url, "").await
            }
            pub async fn head(&self, url: &str) -> (u16, String, Vec<u8>) {
                self.request("HEAD", url, "").await
            }
            pub async fn get_range(&self, url: &str, from: u64) -> (u16, String, Vec<u8>) {
                self.request("GET", url, &format!("Range: bytes={from}-\r\n")).await
            }
            async fn request(&self, method: &str, url: &str, extra: &str) -> (u16, String, Vec<u8>) {
                let rest = url.strip_prefix("http://").unwrap();
                let (host, path) = rest.split_once('/').unwrap();
                let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
                let req = format!("{method} /{path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n");
                s.write_all(req.as_bytes()).await.unwrap();
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.unwrap();
                let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                let head = String::from_utf8_lossy(&buf[..split]).to_ascii_lowercase();
                let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
                let mut body = buf[split + 4..].to_vec();
                if head.contains("transfer-encoding: chunked") {
                    body = dechunk(&body);
                }
                (status, head, body)
            }
        }

        fn dechunk(mut b: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            loop {
                let line_end = b.windows(2).position(|w| w == b"\r\n").unwrap();
                let n = usize::from_str_radix(std::str::from_utf8(&b[..line_end]).unwrap().trim(), 16).unwrap();
                if n == 0 {
                    return out;
                }
                out.extend_from_slice(&b[line_end + 2..line_end + 2 + n]);
                b = &b[line_end + 2 + n + 2..];
            }
        }
    }
}
