//! hoist-client is the library a hoist client is made of (the `hoist` CLI, an IDE plugin,
//! a bake runner): finding or starting a builder and connecting to it ([`connect`],
//! [`connect_embedded`]), context sync ([`sync`]), the build event loop that one builder
//! and several share ([`build`]: merged streams, output routing, results, cancellation),
//! the client's side of the build session ([`session`]: ssh agents it forwards, in-process
//! agents for key files, context the builder asks for), and the outputs the client
//! receives ([`outputs`]: files, stdout, directories, and a load into the user's Docker
//! engine through [`load`] and the loopback registry of [`proxy`]; [`docker_host`] picks
//! that engine as the Docker CLI does: `DOCKER_HOST`, contexts, TLS, ssh). Screens and
//! argument parsing are the caller's.

#![warn(missing_docs)]

pub mod agent;
pub mod build;
pub mod docker_host;
pub mod load;
pub mod outputs;
pub mod proxy;
pub mod reach;
pub mod session;
pub mod sync;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use hoist_proto::v1::builder_client::BuilderClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

pub use hoist_proto::v1;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Walking, reading or sending the build context failed (the message names the path).
    #[error("{0}")]
    Context(String),
    /// The builder could not be reached (or started, for the embedded one).
    #[error("cannot reach the builder at {addr}: {message}")]
    Connect {
        /// The builder's address.
        addr: String,
        /// Why it could not be reached.
        message: String,
    },
    /// The builder answered with an error; the message is the builder's.
    #[error("{0}")]
    Builder(String),
    /// A builder address that does not parse.
    #[error("invalid builder address {0:?}: expected unix:///path/to.sock or tcp://host:port")]
    Address(String),
}

impl ClientError {
    /// Turn a gRPC status into the builder's message.
    pub fn from_status(s: tonic::Status) -> ClientError {
        ClientError::Builder(s.message().to_string())
    }
}

/// Where the builder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuilderAddr {
    /// A unix socket (`unix:///path/to.sock`): the embedded builder, or one on this machine.
    Unix(PathBuf),
    /// Plain TCP (`tcp://host:port`), refused off loopback unless insecure is allowed.
    Tcp(String),
    /// TCP with TLS (`tls://host:port`).
    Tls(String),
}

/// How to present ourselves to a builder.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Bearer token (required by TCP builders).
    pub token: Option<String>,
    /// Project to act in (must match the token's, if a token is given).
    pub project: Option<String>,
    /// CA certificate (PEM) to trust for a `tls://` builder (default: public roots).
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for builders that require one.
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Allow plain `tcp://` to a builder that is not on loopback (tokens, secrets and
    /// registry passwords then travel in clear).
    pub allow_insecure: bool,
}

/// Adds the token and project to every request.
#[derive(Clone)]
pub struct Auth {
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
    project: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.token {
            req.metadata_mut().insert("authorization", t.clone());
        }
        if let Some(p) = &self.project {
            req.metadata_mut().insert("x-hoist-project", p.clone());
        }
        Ok(req)
    }
}

/// A connected builder client.
pub type Client = BuilderClient<InterceptedService<Channel, Auth>>;

impl BuilderAddr {
    /// Parse `unix:///path`, `tcp://host:port` or `tls://host:port`.
    pub fn parse(s: &str) -> Result<BuilderAddr, ClientError> {
        if let Some(a) = s.strip_prefix("tls://") {
            if a.contains(':') {
                return Ok(BuilderAddr::Tls(a.to_string()));
            }
        }
        if let Some(p) = s.strip_prefix("unix://").or_else(|| s.strip_prefix("unix:")) {
            if !p.is_empty() {
                return Ok(BuilderAddr::Unix(PathBuf::from(p)));
            }
        }
        if let Some(a) = s.strip_prefix("tcp://") {
            if a.contains(':') {
                return Ok(BuilderAddr::Tcp(a.to_string()));
            }
        }
        Err(ClientError::Address(s.to_string()))
    }
}

impl std::fmt::Display for BuilderAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuilderAddr::Unix(p) => write!(f, "unix://{}", p.display()),
            BuilderAddr::Tcp(a) => write!(f, "tcp://{a}"),
            BuilderAddr::Tls(a) => write!(f, "tls://{a}"),
        }
    }
}

/// An error with its sources ("transport error: tls: invalid peer certificate: ...").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// TLS settings for `tls://host:port`: the CA to trust (default: public roots) and an
/// optional client certificate.
fn client_tls(addr: &str, opts: &ConnectOptions) -> Result<ClientTlsConfig, ClientError> {
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr).trim_matches(|c| c == '[' || c == ']').to_string();
    let mut tls = ClientTlsConfig::new().domain_name(host);
    let read = |what: String, p: &Path| {
        std::fs::read(p)
            .map_err(|e| ClientError::Connect { addr: format!("tls://{addr}"), message: format!("reading {what}{}: {e}", p.display()) })
    };
    match &opts.tls_ca {
        Some(ca) => {
            let pem = read("the CA certificate ".into(), ca)?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        None => tls = tls.with_webpki_roots(),
    }
    if let (Some(c), Some(k)) = (&opts.tls_cert, &opts.tls_key) {
        let cert = read(String::new(), c)?;
        let key = read(String::new(), k)?;
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Ok(tls)
}

/// Connect to a builder.
pub async fn connect(addr: &BuilderAddr, opts: &ConnectOptions) -> Result<Client, ClientError> {
    let err = |e: &dyn std::fmt::Display| ClientError::Connect { addr: addr.to_string(), message: e.to_string() };
    let terr = |e: tonic::transport::Error| ClientError::Connect { addr: addr.to_string(), message: chain(&e) };
    if let BuilderAddr::Tcp(a) = addr {
        if !opts.allow_insecure && !hoist_oci::registry::is_loopback(a) {
            return Err(err(&format!(
                "refusing plain tcp:// to a builder that is not on loopback: the token, secrets and registry passwords \
                 would travel in clear; use tls://{a} (hoist serve --tls-cert/--tls-key), or pass --insecure"
            )));
        }
    }
    let channel = match addr {
        BuilderAddr::Tcp(_) | BuilderAddr::Tls(_) => {
            let (scheme, a) = match addr {
                BuilderAddr::Tls(a) => ("https", a),
                BuilderAddr::Tcp(a) => ("http", a),
                BuilderAddr::Unix(_) => unreachable!(),
            };
            let mut endpoint = Endpoint::from_shared(format!("{scheme}://{a}"))
                .map_err(|e| err(&e))?
                .connect_timeout(Duration::from_secs(10))
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_while_idle(true);
            if let BuilderAddr::Tls(a) = addr {
                endpoint = endpoint.tls_config(client_tls(a, opts)?).map_err(|e| err(&e))?;
            }
            endpoint.connect().await.map_err(terr)?
        }
        BuilderAddr::Unix(path) => {
            let path = path.clone();
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
                }))
                .await
                .map_err(terr)?
        }
    };
    let meta = |v: &str, what: &str| -> Result<MetadataValue<tonic::metadata::Ascii>, ClientError> {
        v.parse()
            .map_err(|_| ClientError::Connect { addr: addr.to_string(), message: format!("the {what} has characters that cannot be sent") })
    };
    let auth = Auth {
        token: opts.token.as_deref().map(|t| meta(&format!("Bearer {t}"), "token")).transpose()?,
        project: opts.project.as_deref().map(|p| meta(p, "project name")).transpose()?,
    };
    Ok(BuilderClient::with_interceptor(channel, auth).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20))
}

/// `1.2 MB`-style sizes (decimal units, as Docker prints them).
pub fn human_bytes(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// The socket of the embedded builder for a state root.
pub fn embedded_socket(root: &Path) -> PathBuf {
    root.join("hoistd.sock")
}

/// Connect to the embedded builder of `root`, starting it (`exe serve`) when none runs.
pub async fn connect_embedded(root: &Path, exe: &Path, opts: &ConnectOptions) -> Result<Client, ClientError> {
    let sock = embedded_socket(root);
    let addr = BuilderAddr::Unix(sock.clone());
    if sock.exists() {
        if let Ok(mut c) = connect(&addr, opts).await {
            if c.info(v1::InfoRequest {}).await.is_ok() {
                return Ok(c);
            }
        }
    }
    // Several clients may race to start it: the lock makes one of them do it.
    // Private from the first call: only root may read the builder's state.
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|e| ClientError::Connect { addr: addr.to_string(), message: format!("creating {}: {e}", root.display()) })?;
    }
    let lock_path = root.join("hoistd.start.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| ClientError::Connect { addr: addr.to_string(), message: format!("{}: {e}", lock_path.display()) })?;
    let lock = tokio::task::spawn_blocking(move || rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).map(|_| lock))
        .await
        .map_err(|e| ClientError::Connect { addr: addr.to_string(), message: e.to_string() })?
        .map_err(|e| ClientError::Connect { addr: addr.to_string(), message: e.to_string() })?;
    if let Ok(mut c) = connect(&addr, opts).await {
        if c.info(v1::InfoRequest {}).await.is_ok() {
            return Ok(c);
        }
    }
    let log_path = root.join("hoistd.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(|e| ClientError::Connect { addr: addr.to_string(), message: format!("{}: {e}", log_path.display()) })?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("serve")
        .arg("--embedded")
        .arg("--root")
        .arg(root)
        .arg("--listen")
        .arg(addr.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| ClientError::Connect { addr: addr.to_string(), message: e.to_string() })?)
        .stderr(log);
    // Its own session: a Ctrl-C of this build must not kill the builder.
    // SAFETY: the closure runs between fork and exec and calls only setsid(2), which is
    // async-signal-safe; it allocates nothing and touches no lock.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            rustix::process::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| ClientError::Connect {
        addr: addr.to_string(),
        message: format!("starting the embedded builder {}: {e}", exe.display()),
    })?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = connect(&addr, opts).await {
            if c.info(v1::InfoRequest {}).await.is_ok() {
                drop(lock);
                return Ok(c);
            }
        }
        if std::time::Instant::now() > deadline {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: String = tail.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            return Err(ClientError::Connect {
                addr: addr.to_string(),
                message: format!("the embedded builder did not start within 30s; its log ({}) ends with:\n{tail}", log_path.display()),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_addresses() {
        assert_eq!(BuilderAddr::parse("unix:///x.sock").unwrap(), BuilderAddr::Unix("/x.sock".into()));
        assert_eq!(BuilderAddr::parse("tcp://10.0.0.1:7000").unwrap().to_string(), "tcp://10.0.0.1:7000");
        assert!(BuilderAddr::parse("10.0.0.1:7000").is_err());
        assert!(BuilderAddr::parse("tcp://host").is_err());
        assert_eq!(BuilderAddr::parse("tls://b.example:443").unwrap(), BuilderAddr::Tls("b.example:443".into()));
    }

    /// Issue 12: a token, secrets and registry passwords must not cross a network in clear
    /// unless the user says so.
    #[tokio::test]
    async fn plain_tcp_to_a_remote_builder_is_refused_unless_insecure() {
        let remote = BuilderAddr::Tcp("192.0.2.10:7420".into());
        let e = connect(&remote, &ConnectOptions::default()).await.expect_err("refused");
        let m = e.to_string();
        assert!(m.contains("in clear") && m.contains("tls://192.0.2.10:7420") && m.contains("--insecure"), "{m}");
        // Loopback is fine; with --insecure the refusal is gone (nothing listens: a
        // connection error, not the refusal). No traffic leaves this machine: port 1 of
        // loopback only.
        let local = BuilderAddr::Tcp("127.0.0.1:1".into());
        let e = connect(&local, &ConnectOptions::default()).await.expect_err("nothing listens");
        assert!(!e.to_string().contains("in clear"), "{e}");
    }
}
