//! Integration tests of the registry client against real registries: `docker-registry`
//! processes (Debian's distribution 2.8) started by each test on free loopback ports with
//! temporary storage — plain, with htpasswd Basic auth, and with token auth served by a
//! small token server in this file — plus tiny HTTP servers that lie (wrong bytes, 503s,
//! truncated bodies) for the failure paths. Test images are built here (tar + gzip layers,
//! config and manifests written by hand); nothing depends on the lab registry.
//!
//! Needs: docker-registry (package docker-registry), htpasswd (apache2-utils), openssl.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hoist_oci::auth::{Credential, Credentials};
use hoist_oci::digest::Digest;
use hoist_oci::reference::Reference;
use hoist_oci::registry::media::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
use hoist_oci::registry::{BlobPush, BlobSource, RegistryClient, RegistryError, RegistryOptions, RetryPolicy};
use hoist_oci::store::ContentStore;
use hoist_oci::Platform;

// ----- fixtures: registries --------------------------------------------------------------

fn tool(name: &str, package: &str) -> PathBuf {
    for dir in std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default() {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is needed by these tests: apt-get install {package}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

enum Auth {
    None,
    Htpasswd { user: &'static str, password: &'static str },
    Token { realm: String, cert: PathBuf },
}

/// A docker-registry process; killed on drop.
struct Registry {
    child: Child,
    host: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start(auth: Auth) -> Registry {
        let bin = tool("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let auth_yaml = match &auth {
            Auth::None => String::new(),
            Auth::Htpasswd { user, password } => {
                let out = Command::new(tool("htpasswd", "apache2-utils")).args(["-Bbn", user, password]).output().unwrap();
                assert!(out.status.success(), "htpasswd failed");
                std::fs::write(dir.path().join("htpasswd"), &out.stdout).unwrap();
                format!("auth:\n  htpasswd:\n    realm: hoist-test\n    path: {}\n", dir.path().join("htpasswd").display())
            }
            Auth::Token { realm, cert } => format!(
                "auth:\n  token:\n    realm: {realm}\n    service: hoist-test\n    issuer: hoist-test-issuer\n    rootcertbundle: {}\n",
                cert.display()
            ),
        };
        for _ in 0..5 {
            let port = free_port();
            let host = format!("127.0.0.1:{port}");
            let cfg = dir.path().join("config.yml");
            std::fs::write(
                &cfg,
                format!(
                    "version: 0.1\nlog: {{level: info}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\n  delete: {{enabled: true}}\nhttp: {{addr: {host}}}\n{auth_yaml}",
                    dir.path().join("data").display()
                ),
            )
            .unwrap();
            let log = dir.path().join(format!("registry-{port}.log"));
            let out = std::fs::File::create(&log).unwrap();
            let mut child = Command::new(&bin)
                .arg("serve")
                .arg(&cfg)
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .stdin(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken or bad config: try another port
                }
                if http_status(&host, "/v2/").is_some_and(|s| s == 200 || s == 401) {
                    return Registry { child, host, log, _dir: dir };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("docker-registry did not start; see its logs in a kept temp dir");
    }

    fn reference(&self, repo_tag: &str) -> Reference {
        format!("{}/{repo_tag}", self.host).parse().unwrap()
    }

    /// Access-log lines of requests whose request line contains all of `needles`. The
    /// registry logs a request after answering it, so a busy machine can show the answer
    /// before the line: count until the count holds still for 150 ms (at most 3 s).
    fn requests(&self, needles: &[&str]) -> usize {
        let count = || {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            log.lines().filter(|l| l.contains("HTTP/1.1\" ") && needles.iter().all(|n| l.contains(n))).count()
        };
        let mut last = count();
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(150));
            let now = count();
            if now == last {
                break;
            }
            last = now;
        }
        last
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status of a plain GET, by hand (no client code involved).
fn http_status(host: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ----- fixtures: tiny HTTP servers (token server, lying registries) ------------------------

#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many body bytes (while announcing all of them), then close.
    cut_after: Option<usize>,
}

impl Resp {
    fn new(status: u16, body: impl Into<Vec<u8>>) -> Resp {
        Resp { status, headers: Vec::new(), body: body.into(), cut_after: None }
    }
    fn header(mut self, k: &str, v: &str) -> Resp {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
}

type Handler = dyn Fn(&Req) -> Resp + Send + Sync;

/// Serve `handler` on a free loopback port, one request per connection.
fn serve(handler: Arc<Handler>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let handler = handler.clone();
            std::thread::spawn(move || handle(conn, &*handler));
        }
    });
    port
}

fn handle(conn: TcpStream, handler: &Handler) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    let mut body = vec![0; len];
    let _ = reader.read_exact(&mut body);
    let resp = handler(&Req { method: method.clone(), path, headers, body });
    let mut out = conn;
    let reason = match resp.status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        206 => "Partial Content",
        401 => "Unauthorized",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n", resp.status, resp.body.len());
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = out.write_all(head.as_bytes());
    if method != "HEAD" {
        let n = resp.cut_after.unwrap_or(resp.body.len()).min(resp.body.len());
        let _ = out.write_all(&resp.body[..n]);
    }
    let _ = out.flush();
    let _ = out.shutdown(std::net::Shutdown::Both);
}

fn b64(input: &[u8], url: bool) -> String {
    let table: &[u8; 64] = if url {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(table[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else if !url {
                out.push('=');
            }
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn form_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

const TOKEN_USER: &str = "alice";
const TOKEN_PASSWORD: &str = "wonderland";
const REFRESH_TOKEN: &str = "refresh-alice";

/// A token server issuing JWTs the registry trusts (RS256, signed with openssl, the
/// certificate in `x5c`). alice (password or refresh token) may pull and push anything;
/// anonymous users may pull `public/*`.
struct TokenServer {
    realm: String,
    cert: PathBuf,
    requests: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl TokenServer {
    fn start() -> TokenServer {
        let openssl = tool("openssl", "openssl");
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
        let ok = Command::new(&openssl)
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=hoist-test-token"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success());
        let der = Command::new(&openssl).args(["x509", "-outform", "DER", "-in"]).arg(&cert).output().unwrap().stdout;
        let x5c = b64(&der, false);
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let handler: Arc<Handler> = Arc::new(move |req: &Req| {
            counter.fetch_add(1, Ordering::SeqCst);
            let query = req.path.split_once('?').map(|(_, q)| q).unwrap_or("");
            let mut pairs = form_pairs(query);
            let user = if req.method == "POST" {
                pairs.extend(form_pairs(&String::from_utf8_lossy(&req.body)));
                let get = |k: &str| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
                if get("grant_type").as_deref() != Some("refresh_token") || get("refresh_token").as_deref() != Some(REFRESH_TOKEN) {
                    return Resp::new(401, r#"{"error":"invalid refresh token"}"#);
                }
                Some(TOKEN_USER)
            } else {
                match req.headers.get("authorization") {
                    None => None,
                    Some(h) if *h == format!("Basic {}", b64(format!("{TOKEN_USER}:{TOKEN_PASSWORD}").as_bytes(), false)) => {
                        Some(TOKEN_USER)
                    }
                    Some(_) => return Resp::new(401, r#"{"details":"incorrect username or password"}"#),
                }
            };
            let mut access = Vec::new();
            let scopes: Vec<String> = pairs
                .iter()
                .filter(|(k, _)| k == "scope")
                .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
                .collect();
            for scope in scopes {
                let parts: Vec<&str> = scope.splitn(3, ':').collect();
                if parts.len() != 3 {
                    continue;
                }
                let actions: Vec<&str> =
                    parts[2].split(',').filter(|a| user.is_some() || (*a == "pull" && parts[1].starts_with("public/"))).collect();
                access.push(serde_json::json!({"type": parts[0], "name": parts[1], "actions": actions}));
            }
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
            let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [x5c]});
            let claims = serde_json::json!({
                "iss": "hoist-test-issuer", "sub": user.unwrap_or(""), "aud": "hoist-test",
                "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", counter.load(Ordering::SeqCst)),
                "access": access,
            });
            let signing_input = format!("{}.{}", b64(header.to_string().as_bytes(), true), b64(claims.to_string().as_bytes(), true));
            let mut child = Command::new("openssl")
                .args(["dgst", "-sha256", "-sign"])
                .arg(&key)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(signing_input.as_bytes()).unwrap();
            let sig = child.wait_with_output().unwrap().stdout;
            let jwt = format!("{signing_input}.{}", b64(&sig, true));
            Resp::new(200, serde_json::json!({"token": jwt, "expires_in": 300}).to_string()).header("Content-Type", "application/json")
        });
        let port = serve(handler);
        TokenServer { realm: format!("http://127.0.0.1:{port}/token"), cert, requests, _dir: dir }
    }
}

// ----- fixtures: test images ------------------------------------------------------------

#[derive(Clone)]
struct Blob {
    bytes: Vec<u8>,
    digest: Digest,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Blob {
        Blob { digest: Digest::of(&bytes), bytes }
    }
}

#[derive(Clone)]
struct TestImage {
    layers: Vec<Blob>,
    diff_ids: Vec<Digest>,
    config: Blob,
    manifest: Blob,
    media_type: &'static str,
    platform: Platform,
}

fn layer(files: &[(&str, &[u8])]) -> (Blob, Digest) {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        tar.append_data(&mut h, path, *data).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    let diff_id = Digest::of(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    (Blob::new(gz.finish().unwrap()), diff_id)
}

/// A one-or-two-layer image for `platform`; `docker` selects Docker schema 2 media types.
fn image(platform: &str, docker: bool, tag: &str) -> TestImage {
    let platform: Platform = platform.parse().unwrap();
    let (l1, d1) = layer(&[("etc/os-release", b"ID=hoist-test\n"), ("bin/marker", platform.to_string().as_bytes())]);
    let (l2, d2) = layer(&[("app/tag", tag.as_bytes())]);
    let mut config = serde_json::json!({
        "architecture": platform.architecture, "os": platform.os,
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "Labels": {"tag": tag}},
        "rootfs": {"type": "layers", "diff_ids": [d1.to_string(), d2.to_string()]},
    });
    if let Some(v) = &platform.variant {
        config["variant"] = serde_json::json!(v);
    }
    let config = Blob::new(serde_json::to_vec(&config).unwrap());
    let (media_type, config_type, layer_type) = if docker {
        (DOCKER_MANIFEST, "application/vnd.docker.container.image.v1+json", "application/vnd.docker.image.rootfs.diff.tar.gzip")
    } else {
        (OCI_MANIFEST, "application/vnd.oci.image.config.v1+json", "application/vnd.oci.image.layer.v1.tar+gzip")
    };
    let desc = |media: &str, b: &Blob| serde_json::json!({"mediaType": media, "digest": b.digest.to_string(), "size": b.bytes.len()});
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": media_type,
        "config": desc(config_type, &config),
        "layers": [desc(layer_type, &l1), desc(layer_type, &l2)],
    });
    TestImage {
        layers: vec![l1, l2],
        diff_ids: vec![d1, d2],
        config,
        manifest: Blob::new(serde_json::to_vec_pretty(&manifest).unwrap()),
        media_type,
        platform,
    }
}

fn index(images: &[&TestImage], docker: bool) -> Blob {
    let manifests: Vec<serde_json::Value> = images
        .iter()
        .map(|i| {
            let mut p = serde_json::json!({"architecture": i.platform.architecture, "os": i.platform.os});
            if let Some(v) = &i.platform.variant {
                p["variant"] = serde_json::json!(v);
            }
            serde_json::json!({"mediaType": i.media_type, "digest": i.manifest.digest.to_string(), "size": i.manifest.bytes.len(), "platform": p})
        })
        .collect();
    let media = if docker { DOCKER_MANIFEST_LIST } else { OCI_INDEX };
    Blob::new(serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": media, "manifests": manifests})).unwrap())
}

/// Push with plain HTTP requests written here, independent of the client under test.
struct RawPusher {
    http: reqwest::Client,
    base: String,
    basic: Option<(&'static str, &'static str)>,
}

impl RawPusher {
    fn new(host: &str, basic: Option<(&'static str, &'static str)>) -> RawPusher {
        RawPusher { http: reqwest::Client::new(), base: format!("http://{host}/v2/"), basic }
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.basic {
            Some((u, p)) => rb.basic_auth(u, Some(p)),
            None => rb,
        }
    }

    async fn blob(&self, repo: &str, blob: &Blob) {
        let resp = self.auth(self.http.post(format!("{}{repo}/blobs/uploads/", self.base))).send().await.unwrap();
        assert_eq!(resp.status(), 202, "start upload");
        let location = resp.headers()["location"].to_str().unwrap().to_string();
        let mut url = reqwest::Url::parse(&self.base).unwrap().join(&location).unwrap();
        url.query_pairs_mut().append_pair("digest", blob.digest.as_str());
        let resp = self.auth(self.http.put(url)).body(blob.bytes.clone()).send().await.unwrap();
        assert_eq!(resp.status(), 201, "finish upload");
    }

    async fn manifest(&self, repo: &str, tag: &str, bytes: &[u8], media_type: &str) {
        let resp = self
            .auth(self.http.put(format!("{}{repo}/manifests/{tag}", self.base)))
            .header("content-type", media_type)
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        assert_eq!(status, 201, "push manifest: {}", resp.text().await.unwrap_or_default());
    }

    async fn image(&self, repo: &str, tag: &str, img: &TestImage) {
        for b in img.layers.iter().chain([&img.config]) {
            self.blob(repo, b).await;
        }
        self.manifest(repo, tag, &img.manifest.bytes, img.media_type).await;
    }

    async fn get(&self, path: &str) -> (u16, Vec<u8>, Option<String>) {
        let resp = self
            .auth(self.http.get(format!("{}{path}", self.base)))
            .header("accept", format!("{OCI_MANIFEST}, {OCI_INDEX}, {DOCKER_MANIFEST}, {DOCKER_MANIFEST_LIST}"))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let digest = resp.headers().get("docker-content-digest").map(|v| v.to_str().unwrap().to_string());
        (status, resp.bytes().await.unwrap().to_vec(), digest)
    }
}

fn client() -> RegistryClient {
    RegistryClient::anonymous().unwrap()
}

fn client_with(credentials: Credentials, retry: RetryPolicy, chunk_size: Option<u64>) -> RegistryClient {
    RegistryClient::new(RegistryOptions { credentials, retry, chunk_size, ..Default::default() }).unwrap()
}

fn fast_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy { attempts, base_delay: Duration::from_millis(20), max_delay: Duration::from_millis(100) }
}

fn store() -> (tempfile::TempDir, ContentStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = ContentStore::open(dir.path().join("store")).unwrap();
    (dir, store)
}

fn ingest_is_empty(store: &ContentStore) -> bool {
    std::fs::read_dir(store.root().join("ingest")).unwrap().count() == 0
}

/// Push an image with the client under test: every blob through ensure_blob, then the manifest.
async fn push_image(
    client: &RegistryClient,
    store: &ContentStore,
    reference: &Reference,
    img: &TestImage,
) -> Result<(Digest, Vec<BlobPush>), RegistryError> {
    let mut outcomes = Vec::new();
    for b in img.layers.iter().chain([&img.config]) {
        store.put(&b.bytes).unwrap();
        outcomes.push(client.ensure_blob(reference, &b.digest, b.bytes.len() as u64, BlobSource::Store(store), None).await?);
    }
    let digest = client.push_manifest(reference, &img.manifest.bytes, img.media_type).await?;
    Ok((digest, outcomes))
}

// ----- pull -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_oci_index_by_tag_and_by_digest() {
    let reg = Registry::start(Auth::None);
    let raw = RawPusher::new(&reg.host, None);
    let amd = image("linux/amd64", false, "amd");
    let arm = image("linux/arm64/v8", false, "arm");
    raw.image("team/app", "amd-only", &amd).await;
    raw.image("team/app", "arm-only", &arm).await;
    let idx = index(&[&amd, &arm], false);
    raw.manifest("team/app", "1.0", &idx.bytes, OCI_INDEX).await;
    let c = client();

    let r = c.resolve(&reg.reference("team/app:1.0"), &"linux/amd64".parse().unwrap()).await.unwrap();
    assert_eq!(r.index_digest.as_ref(), Some(&idx.digest));
    assert_eq!(r.manifest_digest, amd.manifest.digest);
    assert_eq!(r.manifest_bytes, amd.manifest.bytes);
    assert_eq!(r.media_type, OCI_MANIFEST);
    assert_eq!(r.config_digest, amd.config.digest);
    assert_eq!(r.config_bytes, amd.config.bytes);
    assert_eq!(r.config.architecture, "amd64");
    assert_eq!(r.platform, Some("linux/amd64".parse().unwrap()));
    let layer_digests: Vec<&Digest> = r.layers.iter().map(|l| &l.digest).collect();
    assert_eq!(layer_digests, amd.layers.iter().map(|l| &l.digest).collect::<Vec<_>>());
    assert_eq!(r.layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(), amd.diff_ids);
    assert_eq!(r.layers[0].size, amd.layers[0].bytes.len() as u64);

    // arm64 without a variant matches the arm64/v8 entry
    let r = c.resolve(&reg.reference("team/app:1.0"), &"linux/arm64".parse().unwrap()).await.unwrap();
    assert_eq!(r.manifest_digest, arm.manifest.digest);
    assert_eq!(r.config.architecture, "arm64");

    // by the index digest
    let by_digest = reg.reference(&format!("team/app@{}", idx.digest));
    let r = c.resolve(&by_digest, &"linux/arm64/v8".parse().unwrap()).await.unwrap();
    assert_eq!((r.index_digest.as_ref(), &r.manifest_digest), (Some(&idx.digest), &arm.manifest.digest));

    // by a platform manifest's digest: no index involved
    let direct = reg.reference(&format!("team/app@{}", amd.manifest.digest));
    let r = c.resolve(&direct, &"linux/amd64".parse().unwrap()).await.unwrap();
    assert_eq!((r.index_digest, r.platform, r.manifest_digest), (None, None, amd.manifest.digest.clone()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_docker_manifest_list_and_platform_mismatch() {
    let reg = Registry::start(Auth::None);
    let raw = RawPusher::new(&reg.host, None);
    let amd = image("linux/amd64", true, "amd");
    let arm = image("linux/arm64", true, "arm"); // Docker lists often omit arm64's variant
    raw.image("library/base", "amd", &amd).await;
    raw.image("library/base", "arm", &arm).await;
    let list = index(&[&amd, &arm], true);
    raw.manifest("library/base", "latest", &list.bytes, DOCKER_MANIFEST_LIST).await;
    let c = client();
    let reference = reg.reference("library/base");

    let r = c.resolve(&reference, &"linux/arm64/v8".parse().unwrap()).await.unwrap();
    assert_eq!(r.manifest_digest, arm.manifest.digest);
    assert_eq!(r.media_type, DOCKER_MANIFEST);
    assert_eq!(r.index_digest, Some(list.digest.clone()));
    assert_eq!(r.layers[1].media_type, "application/vnd.docker.image.rootfs.diff.tar.gzip");
    let r = c.resolve(&reference, &"linux/x86_64".parse().unwrap()).await.unwrap();
    assert_eq!(r.manifest_digest, amd.manifest.digest);

    let err = c.resolve(&reference, &"linux/s390x".parse().unwrap()).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RegistryError::NoMatchingPlatform { .. }), "{msg}");
    assert!(msg.contains(&format!("{}/library/base:latest", reg.host)), "{msg}");
    assert!(msg.contains("linux/s390x") && msg.contains("linux/amd64") && msg.contains("linux/arm64"), "{msg}");
    // arm/v7 is not arm64
    assert!(c.resolve(&reference, &"linux/arm/v7".parse().unwrap()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_and_blob_are_not_found_errors() {
    let reg = Registry::start(Auth::None);
    let c = client();
    let err = c.resolve(&reg.reference("nobody/here:1"), &Platform::host()).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{msg}");
    assert!(msg.contains(&reg.host) && msg.contains("nobody/here:1"), "{msg}");

    let (_d, store) = store();
    let digest = Digest::of(b"absent");
    let err = c.fetch_blob(&reg.reference("nobody/here:1"), &digest, &store).await.unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }) && err.to_string().contains(digest.as_str()), "{err}");
    assert!(store.list().unwrap().is_empty() && ingest_is_empty(&store));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_blob_streams_into_the_store_and_skips_present_blobs() {
    let reg = Registry::start(Auth::None);
    let raw = RawPusher::new(&reg.host, None);
    // a layer of a few MiB, so the body arrives in many chunks
    let big: Vec<u8> = (0..6_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let (big_layer, _) = layer(&[("big.bin", &big)]);
    raw.blob("data/big", &big_layer).await;
    let c = client();
    let (_d, store) = store();
    let reference = reg.reference("data/big:any");

    let size = c.fetch_blob(&reference, &big_layer.digest, &store).await.unwrap();
    assert_eq!(size, big_layer.bytes.len() as u64);
    assert_eq!(store.read(&big_layer.digest).unwrap(), big_layer.bytes);
    assert!(ingest_is_empty(&store));
    let gets = reg.requests(&["\"GET /v2/data/big/blobs/"]);
    assert_eq!(gets, 1);

    // present: no request at all
    let size = c.fetch_blob(&reference, &big_layer.digest, &store).await.unwrap();
    assert_eq!(size, big_layer.bytes.len() as u64);
    assert_eq!(reg.requests(&["\"GET /v2/data/big/blobs/"]), 1);
    assert_eq!(c.stats().blobs_downloaded, 1);
    assert_eq!(c.stats().bytes_downloaded, big_layer.bytes.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_blob_is_a_digest_mismatch_and_leaves_nothing_stored() {
    let promised = Blob::new(b"the layer the manifest promised".to_vec());
    let handler: Arc<Handler> = Arc::new(|req: &Req| {
        if req.path == "/v2/" {
            Resp::new(200, "{}")
        } else if req.path.contains("/blobs/") {
            Resp::new(200, b"bytes a broken mirror sent".to_vec())
        } else {
            Resp::new(404, "")
        }
    });
    let port = serve(handler);
    let reference: Reference = format!("127.0.0.1:{port}/evil/image:1").parse().unwrap();
    let c = client();
    let (_d, store) = store();
    let err = c.fetch_blob(&reference, &promised.digest, &store).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{msg}");
    assert!(msg.contains(promised.digest.as_str()) && msg.contains(&reference.to_string()), "{msg}");
    assert!(!store.contains(&promised.digest));
    assert!(store.list().unwrap().is_empty(), "nothing stored");
    assert!(ingest_is_empty(&store), "no partial file left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_not_matching_the_pulled_digest_is_rejected() {
    let real = image("linux/amd64", false, "x");
    let other = image("linux/arm64", false, "y");
    let body = other.manifest.bytes.clone();
    let handler: Arc<Handler> =
        Arc::new(
            move |req: &Req| {
                if req.path == "/v2/" {
                    Resp::new(200, "{}")
                } else {
                    Resp::new(200, body.clone()).header("Content-Type", OCI_MANIFEST)
                }
            },
        );
    let port = serve(handler);
    let reference: Reference = format!("127.0.0.1:{port}/evil/image@{}", real.manifest.digest).parse().unwrap();
    let err = client().resolve(&reference, &Platform::host()).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{msg}");
    assert!(msg.contains(real.manifest.digest.as_str()) && msg.contains(other.manifest.digest.as_str()), "{msg}");
}

/// A registry that fails first (503), then cuts the body halfway; `honour_range` decides
/// whether the retry gets a 206 continuation or the whole blob again.
fn flaky_blob_server(blob: Blob, honour_range: bool) -> (u16, Arc<Mutex<Vec<Req>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let handler: Arc<Handler> = Arc::new(move |req: &Req| {
        if req.path == "/v2/" {
            return Resp::new(200, "{}");
        }
        let n = {
            let mut l = log.lock().unwrap();
            l.push(req.clone());
            l.len()
        };
        match n {
            1 => Resp::new(503, r#"{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}"#),
            2 => Resp { cut_after: Some(blob.bytes.len() / 2), ..Resp::new(200, blob.bytes.clone()) },
            _ => match req.headers.get("range").and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.strip_suffix('-')) {
                Some(start) if honour_range => {
                    let start: usize = start.parse().unwrap();
                    let total = blob.bytes.len();
                    Resp::new(206, blob.bytes[start..].to_vec()).header("Content-Range", &format!("bytes {start}-{}/{total}", total - 1))
                }
                _ => Resp::new(200, blob.bytes.clone()),
            },
        }
    });
    (serve(handler), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_and_downloads_resume_with_range() {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let blob = Blob::new(data);
    let (port, seen) = flaky_blob_server(blob.clone(), true);
    let reference: Reference = format!("127.0.0.1:{port}/flaky/image:1").parse().unwrap();
    let c = client_with(Credentials::new(), fast_retry(4), None);
    let (_d, store) = store();
    let size = c.fetch_blob(&reference, &blob.digest, &store).await.unwrap();
    assert_eq!(size, blob.bytes.len() as u64);
    assert_eq!(store.read(&blob.digest).unwrap(), blob.bytes);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3, "503, cut body, resumed");
    assert_eq!(seen[0].headers.get("range"), None);
    let resumed_at = seen[2].headers.get("range").cloned().expect("the third request resumes with Range");
    let start: usize = resumed_at.trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
    assert!(start > 0 && start <= blob.bytes.len() / 2, "{resumed_at}");
    assert_eq!(c.stats().retries, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_restarts_from_zero_when_the_registry_ignores_range() {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    let blob = Blob::new(data);
    let (port, seen) = flaky_blob_server(blob.clone(), false);
    let reference: Reference = format!("127.0.0.1:{port}/flaky/image:1").parse().unwrap();
    let c = client_with(Credentials::new(), fast_retry(4), None);
    let (_d, store) = store();
    c.fetch_blob(&reference, &blob.digest, &store).await.unwrap();
    assert_eq!(store.read(&blob.digest).unwrap(), blob.bytes, "no duplicated prefix from the first, cut response");
    assert_eq!(seen.lock().unwrap().len(), 3);
    assert!(ingest_is_empty(&store));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_give_up_after_the_policy_and_name_the_registry() {
    let handler: Arc<Handler> = Arc::new(|req: &Req| {
        if req.path == "/v2/" {
            Resp::new(200, "{}")
        } else {
            Resp::new(503, r#"{"errors":[{"code":"UNAVAILABLE","message":"maintenance"}]}"#)
        }
    });
    let port = serve(handler);
    let reference: Reference = format!("127.0.0.1:{port}/down/image:1").parse().unwrap();
    let c = client_with(Credentials::new(), fast_retry(3), None);
    let err = c.resolve(&reference, &Platform::host()).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RegistryError::Status { status: 503, .. }), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("maintenance"), "{msg}");
    assert_eq!(c.stats().retries, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_registry_fails_quickly_with_a_clear_error() {
    let port = free_port(); // bound and released: nothing listens there
    let reference: Reference = format!("127.0.0.1:{port}/x/y:1").parse().unwrap();
    let c = client(); // default retry policy
    let started = Instant::now();
    let err = c.resolve(&reference, &Platform::host()).await.unwrap_err();
    let elapsed = started.elapsed();
    let msg = err.to_string();
    assert!(matches!(err, RegistryError::Unreachable { .. }), "{msg}");
    assert!(msg.contains(&format!("registry 127.0.0.1:{port} is unreachable")), "{msg}");
    assert!(msg.to_lowercase().contains("connection refused"), "{msg}");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
}

// ----- push -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_blobs_and_manifest_then_repush_uploads_nothing() {
    let reg = Registry::start(Auth::None);
    let c = client();
    let (_d, store) = store();
    let img = image("linux/amd64", false, "pushed");
    let reference = reg.reference("team/pushed:v1");

    let (digest, outcomes) = push_image(&c, &store, &reference, &img).await.unwrap();
    assert_eq!(digest, img.manifest.digest);
    assert_eq!(outcomes, vec![BlobPush::Uploaded; 3]);
    // check with plain requests what the registry now serves
    let raw = RawPusher::new(&reg.host, None);
    let (status, body, header_digest) = raw.get("team/pushed/manifests/v1").await;
    assert_eq!((status, &body), (200, &img.manifest.bytes));
    assert_eq!(header_digest.as_deref(), Some(img.manifest.digest.as_str()));
    for b in img.layers.iter().chain([&img.config]) {
        let (status, body, _) = raw.get(&format!("team/pushed/blobs/{}", b.digest)).await;
        assert_eq!((status, Digest::of(&body)), (200, b.digest.clone()));
    }
    let uploads = reg.requests(&["/v2/team/pushed/blobs/uploads/"]);
    assert!(uploads >= 6, "a POST and a PUT per blob: {uploads}");
    let stats = c.stats();
    assert_eq!((stats.blobs_uploaded, stats.manifests_pushed), (3, 1));
    assert_eq!(stats.bytes_uploaded, img.layers.iter().chain([&img.config]).map(|b| b.bytes.len() as u64).sum::<u64>());

    // push again, also under a second tag: HEAD finds every blob, nothing is uploaded
    let (_, outcomes) = push_image(&c, &store, &reg.reference("team/pushed:v2"), &img).await.unwrap();
    assert_eq!(outcomes, vec![BlobPush::Existed; 3]);
    assert_eq!(reg.requests(&["/v2/team/pushed/blobs/uploads/"]), uploads, "no upload request");
    assert_eq!(c.stats().blobs_uploaded, 3);

    // and what was pushed resolves back
    let r = c.resolve(&reg.reference("team/pushed:v2"), &"linux/amd64".parse().unwrap()).await.unwrap();
    assert_eq!(r.manifest_digest, img.manifest.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload_streams_from_a_file_and_index_push() {
    let reg = Registry::start(Auth::None);
    let c = client_with(Credentials::new(), RetryPolicy::default(), Some(64 * 1024));
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 239) as u8).collect();
    let blob = Blob::new(data);
    let file = dir.path().join("blob");
    std::fs::write(&file, &blob.bytes).unwrap();
    let reference = reg.reference("chunks/app:1");
    c.push_blob(&reference, &blob.digest, blob.bytes.len() as u64, BlobSource::File(&file)).await.unwrap();
    assert_eq!(reg.requests(&["\"PATCH /v2/chunks/app/blobs/uploads/"]), 4, "200000 bytes in 64 KiB chunks");
    let raw = RawPusher::new(&reg.host, None);
    let (status, body, _) = raw.get(&format!("chunks/app/blobs/{}", blob.digest)).await;
    assert_eq!((status, body), (200, blob.bytes.clone()));

    // a wrong size is refused before anything is sent
    let err = c.push_blob(&reference, &blob.digest, 5, BlobSource::File(&file)).await.unwrap_err();
    assert!(matches!(err, RegistryError::SizeMismatch { .. }), "{err}");

    // a two-platform index, pushed after its manifests
    let (_d, store) = store();
    let amd = image("linux/amd64", false, "a");
    let arm = image("linux/arm64/v8", false, "b");
    push_image(&c, &store, &reg.reference(&format!("chunks/app@{}", amd.manifest.digest)), &amd).await.unwrap();
    push_image(&c, &store, &reg.reference(&format!("chunks/app@{}", arm.manifest.digest)), &arm).await.unwrap();
    let idx = index(&[&amd, &arm], false);
    let d = c.push_index(&reg.reference("chunks/app:multi"), &idx.bytes).await.unwrap();
    assert_eq!(d, idx.digest);
    let r = c.resolve(&reg.reference("chunks/app:multi"), &"linux/arm64".parse().unwrap()).await.unwrap();
    assert_eq!(r.manifest_digest, arm.manifest.digest);
    assert!(c.push_index(&reference, &amd.manifest.bytes).await.is_err(), "a manifest is not an index");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_repository_mount_and_fallback_to_upload() {
    let reg = Registry::start(Auth::None);
    let c = client();
    let (_d, store) = store();
    let img = image("linux/amd64", false, "base");
    let base = reg.reference("base/image:1");
    push_image(&c, &store, &base, &img).await.unwrap();
    let posts_before = reg.requests(&["\"PUT /v2/app/one/blobs/uploads/"]);
    assert_eq!(posts_before, 0);

    let target = reg.reference("app/one:1");
    let layer0 = &img.layers[0];
    assert!(!c.blob_exists(&target, &layer0.digest).await.unwrap());
    assert!(c.mount_blob("base/image", &target, &layer0.digest).await.unwrap());
    assert!(c.blob_exists(&target, &layer0.digest).await.unwrap());

    let layer1 = &img.layers[1];
    let outcome = c.ensure_blob(&target, &layer1.digest, layer1.bytes.len() as u64, BlobSource::Store(&store), Some(&base)).await.unwrap();
    assert_eq!(outcome, BlobPush::Mounted);
    assert_eq!(reg.requests(&["\"PUT /v2/app/one/blobs/uploads/"]), 0, "mounted blobs are not uploaded");

    // the source repository does not have this blob: the registry answers 202 and the
    // blob is uploaded into that session instead
    let fresh = Blob::new(b"only in the store".to_vec());
    store.put(&fresh.bytes).unwrap();
    assert!(!c.mount_blob("base/image", &target, &fresh.digest).await.unwrap());
    let outcome = c.ensure_blob(&target, &fresh.digest, fresh.bytes.len() as u64, BlobSource::Store(&store), Some(&base)).await.unwrap();
    assert_eq!(outcome, BlobPush::Uploaded);
    assert_eq!(reg.requests(&["\"PUT /v2/app/one/blobs/uploads/"]), 1);
    assert!(c.blob_exists(&target, &fresh.digest).await.unwrap());

    // a mount source on another registry is ignored (upload instead)
    let elsewhere: Reference = "ghcr.io/some/base:1".parse().unwrap();
    let other = Blob::new(b"another blob".to_vec());
    store.put(&other.bytes).unwrap();
    let outcome =
        c.ensure_blob(&target, &other.digest, other.bytes.len() as u64, BlobSource::Store(&store), Some(&elsewhere)).await.unwrap();
    assert_eq!(outcome, BlobPush::Uploaded);
    assert_eq!(c.stats().blobs_mounted, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_to_two_registries_concurrently() {
    let (a, b) = (Registry::start(Auth::None), Registry::start(Auth::None));
    let c = client();
    let (_d, store) = store();
    let img = image("linux/amd64", false, "twice");
    let mut tasks = Vec::new();
    for reference in [a.reference("dup/app:1"), b.reference("dup/app:1"), b.reference("dup/app:latest")] {
        let (c, store, img) = (c.clone(), store.clone(), img.clone());
        tasks.push(tokio::spawn(async move { push_image(&c, &store, &reference, &img).await }));
    }
    for t in tasks {
        let (digest, _) = t.await.unwrap().unwrap();
        assert_eq!(digest, img.manifest.digest);
    }
    for reg in [&a, &b] {
        let (status, body, _) = RawPusher::new(&reg.host, None).get("dup/app/manifests/1").await;
        assert_eq!((status, Digest::of(&body)), (200, img.manifest.digest.clone()), "{}", reg.host);
    }
    // a got each blob once; b's two tags raced, so a blob may have gone up twice there
    assert_eq!(a.requests(&["\"PUT /v2/dup/app/blobs/uploads/"]), 3);
    assert!(b.requests(&["\"PUT /v2/dup/app/blobs/uploads/"]) >= 3);
}

// ----- auth -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_registry_with_and_without_credentials() {
    let reg = Registry::start(Auth::Htpasswd { user: "bob", password: "builder" });
    let img = image("linux/amd64", false, "secret");
    RawPusher::new(&reg.host, Some(("bob", "builder"))).image("private/app", "1", &img).await;
    let reference = reg.reference("private/app:1");

    let mut creds = Credentials::new();
    creds.insert(&reg.host, Credential::basic("bob", "builder"));
    let c = client_with(creds, RetryPolicy::default(), None);
    let r = c.resolve(&reference, &"linux/amd64".parse().unwrap()).await.unwrap();
    assert_eq!(r.manifest_digest, img.manifest.digest);
    let (_d, store) = store();
    c.fetch_blob(&reference, &img.layers[0].digest, &store).await.unwrap();
    push_image(&c, &store, &reg.reference("private/copy:1"), &img).await.unwrap();

    for (who, client) in [
        ("anonymous", client()),
        ("wrong password", {
            let mut creds = Credentials::new();
            creds.insert(&reg.host, Credential::basic("bob", "wrong"));
            client_with(creds, RetryPolicy::default(), None)
        }),
    ] {
        let err = client.resolve(&reference, &"linux/amd64".parse().unwrap()).await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, RegistryError::Unauthorized { .. }), "{who}: {msg}");
        assert!(msg.contains(&format!("registry {}", reg.host)) && msg.contains("401"), "{who}: {msg}");
        let err = push_image(&client, &store, &reg.reference("private/other:1"), &img).await.unwrap_err();
        assert!(matches!(err, RegistryError::Unauthorized { .. }) && err.to_string().contains(&reg.host), "{who}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_flow_with_password_identity_token_and_anonymous() {
    let tokens = TokenServer::start();
    let reg = Registry::start(Auth::Token { realm: tokens.realm.clone(), cert: tokens.cert.clone() });
    let (_d, store) = store();
    let img = image("linux/arm64/v8", false, "tok");

    let mut creds = Credentials::new();
    creds.insert(&reg.host, Credential::basic(TOKEN_USER, TOKEN_PASSWORD));
    let alice = client_with(creds, RetryPolicy::default(), None);
    let before = tokens.requests.load(Ordering::SeqCst);
    push_image(&alice, &store, &reg.reference("private/app:1"), &img).await.unwrap();
    push_image(&alice, &store, &reg.reference("public/app:1"), &img).await.unwrap();
    let used = tokens.requests.load(Ordering::SeqCst) - before;
    assert_eq!(used, 2, "one pull,push token per repository, cached across blobs and manifest");

    // cross-repository mount needs push on the target and pull on the source in one token
    let layer = &img.layers[0];
    assert!(alice.mount_blob("private/app", &reg.reference("private/mounted:1"), &layer.digest).await.unwrap());

    // identity token (refresh-token grant)
    let mut creds = Credentials::new();
    creds.insert(&reg.host, Credential::IdentityToken(REFRESH_TOKEN.into()));
    let r = client_with(creds, RetryPolicy::default(), None)
        .resolve(&reg.reference("private/app:1"), &"linux/arm64".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(r.manifest_digest, img.manifest.digest);

    // anonymous: public pulls work, private ones are refused naming the registry
    let anon = client();
    let r = anon.resolve(&reg.reference("public/app:1"), &"linux/arm64".parse().unwrap()).await.unwrap();
    assert_eq!(r.manifest_digest, img.manifest.digest);
    anon.fetch_blob(&reg.reference("public/app:1"), &layer.digest, &store).await.unwrap();
    let err = anon.resolve(&reg.reference("private/app:1"), &Platform::host()).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }) && err.to_string().contains(&reg.host), "{err}");
    let err = push_image(&anon, &store, &reg.reference("public/app:2"), &img).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");

    // a wrong password is refused by the token server; the error says so
    let mut creds = Credentials::new();
    creds.insert(&reg.host, Credential::basic(TOKEN_USER, "guess"));
    let err =
        client_with(creds, RetryPolicy::default(), None).resolve(&reg.reference("public/app:1"), &Platform::host()).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{msg}");
    assert!(
        msg.contains(&format!("registry {}", reg.host)) && msg.contains(&tokens.realm) && msg.contains("incorrect username or password"),
        "{msg}"
    );
}
