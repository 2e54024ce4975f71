//! hoist-server owns the builder service (`hoist serve`, also the embedded builder): the
//! gRPC API over a unix socket or TCP, context sync (the per-project context store and
//! session directories), and running builds on the engine with streamed progress and
//! outputs.

pub mod auth;
pub mod context;
pub mod exports;
pub mod service;

use std::path::PathBuf;

use hoist_engine::Engine;
use hoist_proto::v1::builder_server::BuilderServer;

pub use service::BuilderService;

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid listen address {0:?}: expected unix:///path/to.sock or tcp://host:port")]
    Address(String),
    #[error("refusing to listen on {0} without TLS: plain TCP is only allowed on loopback (pass --insecure to override)")]
    NotLoopback(String),
    #[error("listening on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("serving: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("TLS: {0}")]
    Tls(String),
}

/// TLS files of the server.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates signed by this CA.
    pub client_ca: Option<PathBuf>,
}

/// How the server runs.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    pub insecure_registries: Vec<String>,
    /// Allow plain TCP on a non-loopback address.
    pub allow_insecure_tcp: bool,
    pub tls: Option<TlsFiles>,
    /// Platforms the builder announces as native (`hoist serve --platforms`); empty = the
    /// host's. Clients with several builders route each platform to one announcing it.
    pub platforms: Vec<String>,
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(String),
}

impl Listen {
    /// Parse `unix:///path`, `unix:path` or `tcp://host:port`.
    pub fn parse(s: &str) -> Result<Listen, ServeError> {
        if let Some(p) = s.strip_prefix("unix://").or_else(|| s.strip_prefix("unix:")) {
            if p.is_empty() {
                return Err(ServeError::Address(s.into()));
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp://") {
            if !a.contains(':') {
                return Err(ServeError::Address(s.into()));
            }
            return Ok(Listen::Tcp(a.to_string()));
        }
        Err(ServeError::Address(s.into()))
    }
}

/// Serve `engine` on `listen` until `shutdown` resolves.
pub async fn serve(
    listen: &Listen,
    engine: Engine,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let trusted = matches!(listen, Listen::Unix(_));
    let svc = BuilderServer::new(BuilderService::new(engine, opts.insecure_registries.clone(), trusted).with_platforms(opts.platforms.clone()))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let mut builder = tonic::transport::Server::builder()
        // Vanished clients are noticed (and their builds cancelled) within a minute.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .tcp_keepalive(Some(std::time::Duration::from_secs(30)));
    let tls = opts.tls.is_some();
    if let Some(t) = &opts.tls {
        let cert = std::fs::read(&t.cert).map_err(|e| ServeError::Tls(format!("reading {}: {e}", t.cert.display())))?;
        let key = std::fs::read(&t.key).map_err(|e| ServeError::Tls(format!("reading {}: {e}", t.key.display())))?;
        let mut cfg = tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(cert, key));
        if let Some(ca) = &t.client_ca {
            let ca = std::fs::read(ca).map_err(|e| ServeError::Tls(format!("reading {}: {e}", ca.display())))?;
            cfg = cfg.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        builder = builder.tls_config(cfg).map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    let router = builder.add_service(svc);
    let allow_insecure_tcp = opts.allow_insecure_tcp || tls;
    match listen {
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(path);
            if let Some(parent) = path.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let listener = tokio::net::UnixListener::bind(path)
                .map_err(|source| ServeError::Listen { addr: path.display().to_string(), source })?;
            // Only the owner (root) may talk to the builder over the socket.
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
            router.serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown).await?;
        }
        Listen::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen { addr: addr.clone(), source })?;
            let local = listener.local_addr().map_err(|source| ServeError::Listen { addr: addr.clone(), source })?;
            if !local.ip().is_loopback() && !allow_insecure_tcp {
                return Err(ServeError::NotLoopback(local.to_string()));
            }
            router.serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(Listen::parse("unix:///run/h.sock").unwrap(), Listen::Unix("/run/h.sock".into()));
        assert_eq!(Listen::parse("tcp://127.0.0.1:7000").unwrap(), Listen::Tcp("127.0.0.1:7000".into()));
        for bad in ["", "unix://", "tcp://host", "http://x:1", "/run/h.sock"] {
            assert!(Listen::parse(bad).is_err(), "{bad}");
        }
    }
}
