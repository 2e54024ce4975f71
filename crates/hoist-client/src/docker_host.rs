//! Which Docker engine the client talks to (`--load`, `hoist pull`), chosen as the Docker CLI
//! chooses it, and the connection to it.
//!
//! Precedence: `DOCKER_HOST`, else the Docker context named by `DOCKER_CONTEXT`, else the
//! `currentContext` of `$DOCKER_CONFIG/config.json` (default `~/.docker`), else the
//! platform's default socket (`/var/run/docker.sock`; the context `default` is that too).
//!
//! - `unix:///path` — a socket on this machine;
//! - `tcp://host[:port]` (or `host:port`) — plain HTTP, or TLS when `DOCKER_TLS_VERIFY` (the
//!   server is verified against `ca.pem`) or `DOCKER_TLS` (not verified) is set, with
//!   `ca.pem`, `cert.pem` and `key.pem` from `DOCKER_CERT_PATH` (default: the Docker config
//!   directory); the port defaults to 2375, or 2376 with TLS;
//! - `ssh://[user@]host[:port][/socket]` — `ssh … HOST docker system dial-stdio` per
//!   connection, as the Docker CLI runs it (the user's ssh config, agent and known hosts
//!   apply).
//!
//! A context's endpoint is `Endpoints.docker.Host` (and `SkipTLSVerify`) of
//! `contexts/meta/<sha256 of its name>/meta.json` in the Docker config directory, its TLS
//! material `contexts/tls/<sha256 of its name>/docker/{ca,cert,key}.pem`. Docker Desktop,
//! colima, OrbStack and rootless Docker install such contexts (`docker context ls`).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bollard::{BollardRequest, Docker, API_DEFAULT_VERSION};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;
use sha2::Digest as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Seconds a request to the engine may take to answer (bollard's default).
const TIMEOUT: u64 = 120;

/// The platform's default engine socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// Why the engine's endpoint cannot be used; each names the variable, context or file.
#[derive(Debug, thiserror::Error)]
pub enum DockerHostError {
    /// An endpoint that does not parse or cannot be used.
    #[error("{origin}: {message}")]
    Invalid {
        /// Where the endpoint came from (`DOCKER_HOST=…`, `docker context "x"`).
        origin: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// A file of the Docker configuration could not be read.
    #[error("reading {path} ({why}): {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why it was read.
        why: String,
        /// The error.
        error: io::Error,
    },
    /// A file of the Docker configuration is not what Docker writes.
    #[error("{path} is not valid JSON ({why}): {error}")]
    Json {
        /// The file.
        path: PathBuf,
        /// Why it was read.
        why: String,
        /// The error.
        error: serde_json::Error,
    },
    /// The context named does not exist.
    #[error("docker context {name:?} (from {by}) does not exist: there is no {path} (see `docker context ls`)")]
    NoContext {
        /// The context's name.
        name: String,
        /// What named it (`DOCKER_CONTEXT`, or the config file).
        by: String,
        /// The metadata file looked for.
        path: PathBuf,
    },
    /// The engine's client could not be made.
    #[error("{origin}: {error}")]
    Client {
        /// Where the endpoint came from.
        origin: String,
        /// bollard's error.
        error: bollard::errors::Error,
    },
}

/// TLS to a `tcp://` engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineTls {
    /// The CA that signed the engine's certificate (`ca.pem`, if it exists).
    pub ca: Option<PathBuf>,
    /// The client certificate (`cert.pem`, if it exists).
    pub cert: Option<PathBuf>,
    /// Its key (`key.pem`, if it exists).
    pub key: Option<PathBuf>,
    /// Whether the engine's certificate is verified (against `ca`, for the host's name).
    pub verify: bool,
}

/// An engine reached through `ssh … docker system dial-stdio`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// `-l USER`.
    pub user: Option<String>,
    /// The host.
    pub host: String,
    /// `-p PORT`.
    pub port: Option<u16>,
    /// The engine's socket on the host (`ssh://host/run/docker.sock`), else the host's default.
    pub socket: Option<String>,
}

impl SshTarget {
    /// Parse `ssh://[user@]host[:port][/socket]`.
    pub fn parse(url: &str) -> Result<SshTarget, String> {
        let rest = url.strip_prefix("ssh://").ok_or_else(|| "expected ssh://[user@]host[:port]".to_string())?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains(['?', '#']) || path.contains(['?', '#']) {
            return Err("an ssh:// address takes no query or fragment".into());
        }
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u.to_string()), h),
            None => (None, authority),
        };
        if user.as_deref().is_some_and(|u| u.is_empty() || u.contains(':')) {
            return Err("the user of an ssh:// address cannot be empty or carry a password (use keys or the ssh agent)".into());
        }
        let (host, port) = split_port(hostport);
        let port = port.map(|p| p.parse::<u16>().map_err(|_| format!("invalid ssh port {p:?}"))).transpose()?;
        if host.is_empty() || host.starts_with('-') {
            return Err("expected ssh://[user@]host[:port]: the host is missing".into());
        }
        let socket = (!path.is_empty() && path != "/").then(|| path.to_string());
        Ok(SshTarget { user, host: host.to_string(), port, socket })
    }

    /// The arguments of `ssh` that open a connection to the engine, as the Docker CLI passes
    /// them: its timeout, no terminal, `-l`, `-p`, then `-- HOST docker [--host
    /// unix://SOCKET] system dial-stdio`.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = ["-o", "ConnectTimeout=30", "-T"].map(String::from).to_vec();
        if let Some(u) = &self.user {
            a.extend(["-l".to_string(), u.clone()]);
        }
        if let Some(p) = self.port {
            a.extend(["-p".to_string(), p.to_string()]);
        }
        a.extend(["--".to_string(), self.host.clone(), "docker".to_string()]);
        if let Some(s) = &self.socket {
            a.extend(["--host".to_string(), format!("unix://{s}")]);
        }
        a.extend(["system".to_string(), "dial-stdio".to_string()]);
        a
    }
}

/// How to reach the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineHost {
    /// A unix socket on this machine.
    Unix(PathBuf),
    /// TCP to `host:port`, plain or TLS.
    Tcp {
        /// `host:port`.
        addr: String,
        /// TLS settings, if TLS.
        tls: Option<EngineTls>,
    },
    /// Through ssh.
    Ssh(SshTarget),
}

/// The engine to talk to and where that choice came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// How to reach it.
    pub host: EngineHost,
    /// Where it came from, for messages: `DOCKER_HOST=tcp://…`, `docker context "colima"
    /// (unix:///…)`, `the default socket unix:///var/run/docker.sock`.
    pub origin: String,
}

/// The environment that chooses the engine (the process's, or a test's). Empty values count
/// as unset, as for the Docker CLI.
#[derive(Debug, Clone, Default)]
pub struct DockerEnv {
    /// `DOCKER_HOST`.
    pub docker_host: Option<String>,
    /// `DOCKER_CONTEXT`.
    pub docker_context: Option<String>,
    /// `DOCKER_CONFIG` (the Docker config directory).
    pub docker_config: Option<PathBuf>,
    /// `HOME` (the config directory defaults to `~/.docker`).
    pub home: Option<PathBuf>,
    /// `DOCKER_TLS_VERIFY`.
    pub tls_verify: bool,
    /// `DOCKER_TLS`.
    pub tls: bool,
    /// `DOCKER_CERT_PATH`.
    pub cert_path: Option<PathBuf>,
}

impl DockerEnv {
    /// The variables of this process.
    pub fn from_process() -> DockerEnv {
        let var = |k: &str| std::env::var(k).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        DockerEnv {
            docker_host: var("DOCKER_HOST"),
            docker_context: var("DOCKER_CONTEXT"),
            docker_config: var("DOCKER_CONFIG").map(PathBuf::from),
            home: var("HOME").map(PathBuf::from),
            tls_verify: var("DOCKER_TLS_VERIFY").is_some(),
            tls: var("DOCKER_TLS").is_some(),
            cert_path: var("DOCKER_CERT_PATH").map(PathBuf::from),
        }
    }

    /// The Docker config directory: `DOCKER_CONFIG`, else `~/.docker`.
    fn config_dir(&self) -> Option<PathBuf> {
        self.docker_config.clone().or_else(|| self.home.as_ref().map(|h| h.join(".docker")))
    }
}

/// `host:port` → (host, Some(port)); `[v6]:port` too; no port → (host, None).
fn split_port(authority: &str) -> (&str, Option<&str>) {
    if let Some(r) = authority.strip_prefix('[') {
        return match r.split_once(']') {
            Some((h, rest)) => (h, rest.strip_prefix(':')),
            None => (authority, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, Some(p)),
        _ => (authority, None),
    }
}

/// Parse an engine address (`DOCKER_HOST`'s or a context's) as the Docker CLI does.
pub fn parse_host(value: &str, tls: Option<EngineTls>, origin: &str) -> Result<EngineHost, DockerHostError> {
    let bad = |message: String| DockerHostError::Invalid { origin: origin.to_string(), message };
    let value = value.trim();
    let (scheme, rest) = value.split_once("://").unwrap_or(("tcp", value));
    match scheme {
        "unix" => {
            if rest.is_empty() {
                return Err(bad("unix:// needs the socket's path (unix:///var/run/docker.sock)".into()));
            }
            Ok(EngineHost::Unix(PathBuf::from(rest)))
        }
        "tcp" => {
            let authority = rest.split('/').next().unwrap_or_default();
            let (host, port) = split_port(authority);
            if host.is_empty() {
                return Err(bad("expected tcp://host[:port]: the host is missing".into()));
            }
            let port = match port {
                Some(p) => p.parse::<u16>().map_err(|_| bad(format!("invalid port {p:?}")))?,
                None if tls.is_some() => 2376,
                None => 2375,
            };
            let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
            Ok(EngineHost::Tcp { addr: format!("{host}:{port}"), tls })
        }
        "ssh" => SshTarget::parse(value).map(EngineHost::Ssh).map_err(bad),
        "npipe" => Err(bad("npipe:// is a Windows named pipe; hoist talks to unix://, tcp:// and ssh:// engines".into())),
        other => Err(bad(format!("unsupported scheme {other:?}: expected unix:///path, tcp://host:port or ssh://[user@]host"))),
    }
}

/// The TLS files of a directory (`ca.pem`, `cert.pem`, `key.pem`; those that exist).
fn tls_files(dir: &Path, verify: bool) -> EngineTls {
    let file = |n: &str| Some(dir.join(n)).filter(|p| p.is_file());
    EngineTls { ca: file("ca.pem"), cert: file("cert.pem"), key: file("key.pem"), verify }
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(rename = "currentContext", default)]
    current_context: Option<String>,
}

#[derive(Deserialize)]
struct ContextMeta {
    #[serde(rename = "Endpoints", default)]
    endpoints: HashMap<String, ContextEndpoint>,
}

#[derive(Deserialize)]
struct ContextEndpoint {
    #[serde(rename = "Host", default)]
    host: Option<String>,
    #[serde(rename = "SkipTLSVerify", default)]
    skip_tls_verify: bool,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, why: &str) -> Result<Option<T>, DockerHostError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|error| DockerHostError::Json { path: path.into(), why: why.into(), error }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(DockerHostError::Read { path: path.into(), why: why.into(), error }),
    }
}

fn default_endpoint(why: &str) -> Endpoint {
    Endpoint { host: EngineHost::Unix(PathBuf::from(DEFAULT_SOCKET)), origin: format!("the default socket unix://{DEFAULT_SOCKET}{why}") }
}

/// Choose the engine: `DOCKER_HOST`, else `DOCKER_CONTEXT`, else the config's
/// `currentContext`, else the default socket.
pub fn resolve(env: &DockerEnv) -> Result<Endpoint, DockerHostError> {
    if let Some(h) = &env.docker_host {
        let origin = format!("DOCKER_HOST={h}");
        let tls = (env.tls_verify || env.tls).then(|| {
            let dir = env.cert_path.clone().or_else(|| env.config_dir()).unwrap_or_default();
            tls_files(&dir, env.tls_verify)
        });
        return Ok(Endpoint { host: parse_host(h, tls, &origin)?, origin });
    }
    let Some(config) = env.config_dir() else { return Ok(default_endpoint("")) };
    let (name, by) = match &env.docker_context {
        Some(c) => (c.clone(), "DOCKER_CONTEXT".to_string()),
        None => {
            let path = config.join("config.json");
            let current = read_json::<ConfigFile>(&path, "the current Docker context")?.and_then(|c| c.current_context);
            match current.filter(|c| !c.is_empty()) {
                Some(c) => (c, format!("currentContext in {}", path.display())),
                None => return Ok(default_endpoint("")),
            }
        }
    };
    if name == "default" {
        return Ok(default_endpoint(&format!(" (docker context \"default\" from {by})")));
    }
    let id = hex::encode(sha2::Sha256::digest(name.as_bytes()));
    let meta_path = config.join("contexts").join("meta").join(&id).join("meta.json");
    let meta = read_json::<ContextMeta>(&meta_path, &format!("docker context {name:?}"))?.ok_or_else(|| DockerHostError::NoContext {
        name: name.clone(),
        by: by.clone(),
        path: meta_path.clone(),
    })?;
    let origin = format!("docker context {name:?} ({})", meta_path.display());
    let endpoint = meta.endpoints.get("docker").and_then(|e| e.host.as_deref().map(|h| (h, e.skip_tls_verify)));
    let Some((host, skip)) = endpoint else {
        return Err(DockerHostError::Invalid { origin, message: "it has no Endpoints.docker.Host".into() });
    };
    let tls_dir = config.join("contexts").join("tls").join(&id).join("docker");
    let files = tls_files(&tls_dir, !skip);
    let has_files = files.ca.is_some() || files.cert.is_some() || files.key.is_some();
    let tls = (has_files || skip).then_some(files);
    let origin = format!("docker context {name:?} ({host})");
    Ok(Endpoint { host: parse_host(host, tls, &origin)?, origin })
}

impl Endpoint {
    /// The engine of this process's environment.
    pub fn from_env() -> Result<Endpoint, DockerHostError> {
        resolve(&DockerEnv::from_process())
    }

    /// Why the engine cannot reach this machine's loopback (it is on another machine), or
    /// `None` when it is on this one.
    pub fn remote(&self) -> Option<String> {
        let local = match &self.host {
            EngineHost::Unix(_) => true,
            EngineHost::Tcp { addr, .. } => hoist_oci::registry::is_loopback(addr),
            EngineHost::Ssh(s) => hoist_oci::registry::is_loopback(&s.host),
        };
        (!local).then(|| format!("the engine ({}) is on another machine, so it cannot reach hoist's loopback registry", self.origin))
    }

    /// A client of the engine (nothing is sent yet).
    pub fn connect(&self) -> Result<Docker, DockerHostError> {
        let client_err = |error| DockerHostError::Client { origin: self.origin.clone(), error };
        match &self.host {
            EngineHost::Unix(p) => {
                Docker::connect_with_unix(&format!("unix://{}", p.display()), TIMEOUT, API_DEFAULT_VERSION).map_err(client_err)
            }
            EngineHost::Tcp { addr, tls: None } => {
                Docker::connect_with_http(&format!("tcp://{addr}"), TIMEOUT, API_DEFAULT_VERSION).map_err(client_err)
            }
            EngineHost::Tcp { addr, tls: Some(tls) } => {
                let (host, _) = split_port(addr);
                let server_name = ServerName::try_from(host.to_string()).map_err(|e| DockerHostError::Invalid {
                    origin: self.origin.clone(),
                    message: format!("{host:?} is not a name TLS can verify: {e}"),
                })?;
                let config = Arc::new(tls_config(tls, &self.origin)?);
                self.custom(Dial::Tls { addr: addr.clone(), server_name, config })
            }
            EngineHost::Ssh(s) => self.custom(Dial::Ssh { args: s.args() }),
        }
    }

    /// A client whose connections `dial` opens (pooled, HTTP/1.1 over them).
    fn custom(&self, dial: Dial) -> Result<Docker, DockerHostError> {
        let dial = Arc::new(dial);
        let connector = tower::service_fn(move |_: hyper::Uri| {
            let dial = dial.clone();
            Box::pin(async move { dial.open().await.map(|s| TokioIo::new(Conn(s))) })
                as Pin<Box<dyn Future<Output = io::Result<TokioIo<Conn>>> + Send>>
        });
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector);
        let transport = move |req: BollardRequest| {
            let client = client.clone();
            async move { client.request(req).await.map_err(bollard::errors::Error::from) }
        };
        Docker::connect_with_custom_transport(transport, Some("http://docker"), TIMEOUT, API_DEFAULT_VERSION)
            .map_err(|error| DockerHostError::Client { origin: self.origin.clone(), error })
    }
}

/// Opens one connection to the engine.
enum Dial {
    Tls { addr: String, server_name: ServerName<'static>, config: Arc<rustls::ClientConfig> },
    Ssh { args: Vec<String> },
}

/// A byte stream to the engine.
trait EngineStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> EngineStream for T {}

impl Dial {
    async fn open(&self) -> io::Result<Box<dyn EngineStream>> {
        match self {
            Dial::Tls { addr, server_name, config } => {
                let tcp = tokio::net::TcpStream::connect(addr.as_str()).await?;
                let _ = tcp.set_nodelay(true);
                let tls = tokio_rustls::TlsConnector::from(config.clone()).connect(server_name.clone(), tcp).await?;
                Ok(Box::new(tls))
            }
            Dial::Ssh { args } => {
                let mut child = tokio::process::Command::new("ssh")
                    .args(args)
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::inherit())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| io::Error::new(e.kind(), format!("running ssh {}: {e}", args.join(" "))))?;
                let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                    return Err(io::Error::other("ssh was started without pipes"));
                };
                Ok(Box::new(SshStream { _child: child, stdin, stdout }))
            }
        }
    }
}

/// `ssh … docker system dial-stdio`: its stdout is what the engine sends, its stdin what
/// it receives; the process ends with the connection.
struct SshStream {
    _child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::process::ChildStdout,
}

impl AsyncRead for SshStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdout).poll_read(cx, buf)
    }
}

impl AsyncWrite for SshStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stdin).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdin).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdin).poll_shutdown(cx)
    }
}

/// A dialed stream as the HTTP client takes it.
struct Conn(Box<dyn EngineStream>);

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// The rustls client settings of `tls` (ring, as the rest of the client).
fn tls_config(tls: &EngineTls, origin: &str) -> Result<rustls::ClientConfig, DockerHostError> {
    let bad = |message: String| DockerHostError::Invalid { origin: origin.to_string(), message };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS: {e}")))?;
    let builder = if tls.verify {
        let Some(ca) = &tls.ca else {
            return Err(bad(
                "TLS verification is on (DOCKER_TLS_VERIFY, or a context without SkipTLSVerify) but there is no ca.pem in the \
                 certificate directory (DOCKER_CERT_PATH, else the Docker config directory)"
                    .into(),
            ));
        };
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca).map_err(|e| bad(format!("reading {}: {e}", ca.display())))?;
        for c in certs {
            let c = c.map_err(|e| bad(format!("reading {}: {e}", ca.display())))?;
            roots.add(c).map_err(|e| bad(format!("{}: {e}", ca.display())))?;
        }
        builder.with_root_certificates(roots)
    } else {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    };
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad(format!("reading {}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(format!("reading {}: {e}", key.display())))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| bad(format!("the client certificate {}: {e}", cert.display())))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// `DOCKER_TLS` without `DOCKER_TLS_VERIFY`, or a context's `SkipTLSVerify`: the engine's
/// certificate is not checked (its signatures still are), as the Docker CLI does.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(config: &Path) -> DockerEnv {
        DockerEnv { docker_config: Some(config.to_path_buf()), ..Default::default() }
    }

    /// Write a context as `docker context create` does.
    fn context(config: &Path, name: &str, meta: &str) -> PathBuf {
        let id = hex::encode(sha2::Sha256::digest(name.as_bytes()));
        let dir = config.join("contexts/meta").join(&id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("meta.json"), meta).unwrap();
        config.join("contexts/tls").join(id).join("docker")
    }

    fn meta(name: &str, host: &str, skip: bool) -> String {
        format!(r#"{{"Name":"{name}","Metadata":{{}},"Endpoints":{{"docker":{{"Host":"{host}","SkipTLSVerify":{skip}}}}}}}"#)
    }

    #[test]
    fn docker_host_forms() {
        let o = "DOCKER_HOST=x";
        assert_eq!(parse_host("unix:///run/d.sock", None, o).unwrap(), EngineHost::Unix("/run/d.sock".into()));
        assert_eq!(parse_host("tcp://10.0.0.1:2375", None, o).unwrap(), EngineHost::Tcp { addr: "10.0.0.1:2375".into(), tls: None });
        assert_eq!(parse_host("tcp://docker.example", None, o).unwrap(), EngineHost::Tcp { addr: "docker.example:2375".into(), tls: None });
        assert_eq!(parse_host("10.0.0.1:2375", None, o).unwrap(), EngineHost::Tcp { addr: "10.0.0.1:2375".into(), tls: None });
        assert_eq!(parse_host("tcp://[::1]:99/", None, o).unwrap(), EngineHost::Tcp { addr: "[::1]:99".into(), tls: None });
        let tls = EngineTls { ca: None, cert: None, key: None, verify: true };
        assert_eq!(
            parse_host("tcp://docker.example", Some(tls.clone()), o).unwrap(),
            EngineHost::Tcp { addr: "docker.example:2376".into(), tls: Some(tls) },
            "TLS's default port"
        );
        for (bad, says) in [
            ("bogus://x", "unsupported scheme \"bogus\""),
            ("unix://", "socket's path"),
            ("tcp://:2375", "host is missing"),
            ("tcp://h:port", "invalid port"),
            ("npipe:////./pipe/docker_engine", "Windows"),
            ("ssh://", "host is missing"),
            ("ssh://u:pw@h", "password"),
        ] {
            let e = parse_host(bad, None, "DOCKER_HOST=bad").unwrap_err().to_string();
            assert!(e.starts_with("DOCKER_HOST=bad: ") && e.contains(says), "{bad}: {e}");
        }
    }

    /// The command is the Docker CLI's, so the same ssh config, keys and remote `docker`
    /// serve both.
    #[test]
    fn ssh_runs_docker_system_dial_stdio() {
        let t = SshTarget::parse("ssh://me@build.example:2222").unwrap();
        assert_eq!(t, SshTarget { user: Some("me".into()), host: "build.example".into(), port: Some(2222), socket: None });
        assert_eq!(t.args().join(" "), "-o ConnectTimeout=30 -T -l me -p 2222 -- build.example docker system dial-stdio");
        let t = SshTarget::parse("ssh://build.example/run/user/1000/docker.sock").unwrap();
        assert_eq!(
            t.args().join(" "),
            "-o ConnectTimeout=30 -T -- build.example docker --host unix:///run/user/1000/docker.sock system dial-stdio"
        );
        assert_eq!(SshTarget::parse("ssh://h/").unwrap().socket, None);
        assert!(SshTarget::parse("ssh://-oProxyCommand=x").is_err(), "a host is never an ssh option");
        assert!(SshTarget::parse("ssh://h:notaport").is_err());
    }

    /// DOCKER_HOST > DOCKER_CONTEXT > currentContext > the default socket.
    #[test]
    fn precedence() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path();
        context(config, "colima", &meta("colima", "unix:///home/me/.colima/default/docker.sock", false));
        context(config, "ci", &meta("ci", "tcp://10.9.8.7:2375", false));
        let mut e = env(config);
        let d = resolve(&e).unwrap();
        assert_eq!(d.host, EngineHost::Unix(DEFAULT_SOCKET.into()), "no config.json: the default socket");
        std::fs::write(config.join("config.json"), r#"{"auths":{},"currentContext":"colima"}"#).unwrap();
        let c = resolve(&e).unwrap();
        assert_eq!(c.host, EngineHost::Unix("/home/me/.colima/default/docker.sock".into()));
        assert!(c.origin.contains("docker context \"colima\""), "{}", c.origin);
        e.docker_context = Some("ci".into());
        assert_eq!(resolve(&e).unwrap().host, EngineHost::Tcp { addr: "10.9.8.7:2375".into(), tls: None }, "DOCKER_CONTEXT wins");
        e.docker_context = Some("default".into());
        assert_eq!(resolve(&e).unwrap().host, EngineHost::Unix(DEFAULT_SOCKET.into()), "\"default\" is the default socket");
        e.docker_host = Some("tcp://127.0.0.1:2375".into());
        let h = resolve(&e).unwrap();
        assert_eq!(h.host, EngineHost::Tcp { addr: "127.0.0.1:2375".into(), tls: None }, "DOCKER_HOST wins");
        assert_eq!(h.origin, "DOCKER_HOST=tcp://127.0.0.1:2375");
        // The config directory defaults to ~/.docker.
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(home.path().join(".docker")).unwrap();
        std::fs::write(home.path().join(".docker/config.json"), r#"{"currentContext":"gone"}"#).unwrap();
        let e = DockerEnv { home: Some(home.path().into()), ..Default::default() };
        let m = resolve(&e).unwrap_err().to_string();
        assert!(m.contains("docker context \"gone\"") && m.contains(".docker/config.json") && m.contains("does not exist"), "{m}");
    }

    #[test]
    fn tls_material_from_the_environment_and_from_contexts() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            std::fs::write(certs.join(f), "x").unwrap();
        }
        let e = DockerEnv {
            docker_host: Some("tcp://docker.example".into()),
            tls_verify: true,
            cert_path: Some(certs.clone()),
            ..Default::default()
        };
        let want = EngineTls {
            ca: Some(certs.join("ca.pem")),
            cert: Some(certs.join("cert.pem")),
            key: Some(certs.join("key.pem")),
            verify: true,
        };
        assert_eq!(resolve(&e).unwrap().host, EngineHost::Tcp { addr: "docker.example:2376".into(), tls: Some(want) });
        let e = DockerEnv { tls_verify: false, tls: true, cert_path: Some(dir.path().join("none")), ..e };
        let none = EngineTls { ca: None, cert: None, key: None, verify: false };
        assert_eq!(
            resolve(&e).unwrap().host,
            EngineHost::Tcp { addr: "docker.example:2376".into(), tls: Some(none) },
            "DOCKER_TLS: no verify"
        );

        let config = dir.path().join("config");
        let tls_dir = context(&config, "remote", &meta("remote", "tcp://10.1.1.1:2376", false));
        let mut e = env(&config);
        e.docker_context = Some("remote".into());
        assert_eq!(resolve(&e).unwrap().host, EngineHost::Tcp { addr: "10.1.1.1:2376".into(), tls: None }, "no TLS material: plain");
        std::fs::create_dir_all(&tls_dir).unwrap();
        std::fs::write(tls_dir.join("ca.pem"), "x").unwrap();
        let EngineHost::Tcp { tls: Some(t), .. } = resolve(&e).unwrap().host else { panic!("TLS") };
        assert_eq!((t.ca, t.cert, t.verify), (Some(tls_dir.join("ca.pem")), None, true));
        context(&config, "skip", &meta("skip", "tcp://10.1.1.1:2376", true));
        e.docker_context = Some("skip".into());
        let EngineHost::Tcp { tls: Some(t), .. } = resolve(&e).unwrap().host else { panic!("TLS") };
        assert!(!t.verify, "SkipTLSVerify");
        // Verification without a CA is refused, naming where it was looked for.
        let m = tls_config(&EngineTls { ca: None, cert: None, key: None, verify: true }, "DOCKER_HOST=tcp://h").unwrap_err().to_string();
        assert!(m.starts_with("DOCKER_HOST=tcp://h: ") && m.contains("ca.pem") && m.contains("DOCKER_CERT_PATH"), "{m}");
    }

    #[test]
    fn bad_configuration_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path();
        std::fs::write(config.join("config.json"), "{not json").unwrap();
        let m = resolve(&env(config)).unwrap_err().to_string();
        assert!(m.contains("config.json is not valid JSON"), "{m}");
        let mut e = env(config);
        e.docker_context = Some("nope".into());
        let m = resolve(&e).unwrap_err().to_string();
        assert!(m.contains("\"nope\" (from DOCKER_CONTEXT) does not exist") && m.contains("meta.json"), "{m}");
        context(config, "k8s", r#"{"Name":"k8s","Endpoints":{"kubernetes":{"Host":"https://k"}}}"#);
        e.docker_context = Some("k8s".into());
        let m = resolve(&e).unwrap_err().to_string();
        assert!(m.contains("docker context \"k8s\"") && m.contains("Endpoints.docker.Host"), "{m}");
        context(config, "odd", &meta("odd", "bogus://x", false));
        e.docker_context = Some("odd".into());
        let m = resolve(&e).unwrap_err().to_string();
        assert!(m.starts_with("docker context \"odd\" (bogus://x): unsupported scheme"), "{m}");
    }

    #[test]
    fn which_engines_are_remote() {
        let at = |h: &str| {
            let origin = format!("DOCKER_HOST={h}");
            Endpoint { host: parse_host(h, None, &origin).unwrap(), origin }.remote()
        };
        assert_eq!(at("unix:///var/run/docker.sock"), None);
        assert_eq!(at("tcp://127.0.0.1:2375"), None);
        assert_eq!(at("tcp://localhost:2375"), None);
        assert_eq!(at("tcp://[::1]:2375"), None);
        assert_eq!(at("ssh://me@localhost"), None);
        let why = at("tcp://10.1.2.3:2376").unwrap();
        assert!(why.contains("DOCKER_HOST=tcp://10.1.2.3:2376") && why.contains("another machine"), "{why}");
        assert!(at("ssh://me@build.example").is_some());
    }
}
