//! hoist-server owns the builder service (`hoist serve`, also the embedded builder): the
//! gRPC API over a unix socket or TCP, context sync (the per-project context store and
//! session directories), and running builds on the engine with streamed progress and
//! outputs; what a build asks its client for on the build stream (context paths, registry
//! credentials, ssh agent connections).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod context;
pub mod credentials;
pub mod exports;
pub mod fetch;
pub mod outputs;
mod records;
pub mod running;
pub mod service;
pub mod ssh;
pub mod ui;

use std::path::PathBuf;

use hoist_engine::Engine;
use hoist_proto::v1::builder_server::BuilderServer;

pub use service::BuilderService;

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listen address that is neither `unix:` with a path nor `tcp://host:port` (the
    /// address as given).
    #[error("invalid listen address {0:?}: expected unix:///path/to.sock or tcp://host:port")]
    Address(String),
    /// Plain TCP bound to a non-loopback address (the one bound) with neither TLS nor
    /// [`ServeOptions::allow_insecure_tcp`].
    #[error("refusing to listen on {0} without TLS: plain TCP is only allowed on loopback (pass --insecure to override)")]
    NotLoopback(String),
    /// Binding the unix socket or TCP listener failed.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The socket path or `host:port`.
        addr: String,
        /// Why it could not be bound.
        source: std::io::Error,
    },
    /// The gRPC transport failed while serving.
    #[error("serving: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A TLS file could not be read, or the TLS configuration was refused.
    #[error("TLS: {0}")]
    Tls(String),
    /// The fleet's projects and tokens cannot be read from the shared store.
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
}

/// TLS files of the server.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server's certificate (chain), PEM.
    pub cert: PathBuf,
    /// The private key of `cert`, PEM.
    pub key: PathBuf,
    /// Require client certificates signed by this CA.
    pub client_ca: Option<PathBuf>,
}

/// How the server runs.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Registries every build reaches over plain HTTP (`--insecure-registry`), besides those
    /// a request names.
    pub insecure_registries: Vec<String>,
    /// Allow plain TCP on a non-loopback address.
    pub allow_insecure_tcp: bool,
    /// Serve TLS with these files (then any TCP address is allowed); `None`: plaintext.
    pub tls: Option<TlsFiles>,
    /// Platforms the builder announces as native (`hoist serve --platforms`); empty = the
    /// host's. Clients with several builders route each platform to one announcing it.
    pub platforms: Vec<String>,
    /// Entitlements granted to every project (`--allow-entitlement`).
    pub entitlements: std::collections::BTreeSet<hoist_engine::entitlements::Entitlement>,
    /// The embedded builder: its unix socket (in the 0700 state root) takes requests without
    /// a token, and it grants every entitlement (it is its user's own machine). Any other
    /// listener requires tokens.
    pub embedded: bool,
    /// The owner token of an embedded builder on TCP (the docker-container builder): a
    /// request carrying it is trusted as on the embedded builder's unix socket.
    pub owner_token: Option<String>,
    /// Serve the web UI on this `host:port` (plain HTTP) instead of on the gRPC listener.
    /// Only loopback for the embedded builder, and without [`ServeOptions::allow_insecure_tcp`].
    pub ui_listen: Option<String>,
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket at this path, connectable only by its owner (mode 0600); a file
    /// already there is replaced.
    Unix(PathBuf),
    /// A TCP address, `host:port`.
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
    let trusted = opts.embedded && matches!(listen, Listen::Unix(_));
    let mut service = BuilderService::new(engine, opts.insecure_registries.clone(), trusted)
        .with_platforms(opts.platforms.clone())
        .with_entitlements(opts.entitlements.clone());
    if let Some(t) = opts.owner_token.as_deref().filter(|t| !t.is_empty()) {
        service = service.with_owner_token(t);
    }
    // A fleet's projects and tokens are read now and then every few seconds.
    let refresh = service.auth().keep_fresh().await?;
    let _stop_refresh = refresh.map(AbortOnDrop);
    // A revoked token's builds and exports end within a second (of this node learning it).
    let enforcer = service.clone();
    let revocations = tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            let (builds, exports) = enforcer.enforce_revocations();
            if builds + exports > 0 {
                tracing::info!("token revoked: cancelled {builds} builds and closed {exports} export sessions");
            }
        }
    });
    let _stop_revocations = AbortOnDrop(revocations);
    // The web UI: on its own listener, or beside gRPC on the same one (HTTP/1.1 for browsers).
    let tls = opts.tls.is_some();
    let ui = ui::router(service.clone());
    let mut ui_beside_grpc = Some(ui);
    let _stop_ui = match &opts.ui_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Listen { addr: addr.clone(), source })?;
            let local = listener.local_addr().map_err(|source| ServeError::Listen { addr: addr.clone(), source })?;
            if !local.ip().is_loopback() && (opts.embedded || !opts.allow_insecure_tcp) {
                return Err(ServeError::NotLoopback(format!("{local} (--ui-listen)")));
            }
            service.ui.set_base(format!("http://{local}"));
            let ui = ui_beside_grpc.take().unwrap_or_default();
            Some(AbortOnDrop(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, ui).await {
                    tracing::warn!("the web UI stopped: {e}");
                }
            })))
        }
        None => {
            service.ui.set_secure(tls);
            None
        }
    };
    let ui_access = service.ui.clone();
    let svc = BuilderServer::new(service).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
    let mut builder = tonic::transport::Server::builder()
        .accept_http1(ui_beside_grpc.is_some())
        // Vanished clients are noticed (and their builds cancelled) within a minute.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .tcp_keepalive(Some(std::time::Duration::from_secs(30)));
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
    let mut routes = tonic::service::Routes::new(svc).into_axum_router();
    let ui_on_grpc = ui_beside_grpc.is_some();
    if let Some(ui) = ui_beside_grpc {
        routes = routes.merge(ui);
    }
    let router = builder.add_routes(routes.into());
    let allow_insecure_tcp = opts.allow_insecure_tcp || tls;
    match listen {
        Listen::Unix(path) => {
            let listener = bind_private_socket(path).map_err(|source| ServeError::Listen { addr: path.display().to_string(), source })?;
            router.serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown).await?;
        }
        Listen::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Listen { addr: addr.clone(), source })?;
            let local = listener.local_addr().map_err(|source| ServeError::Listen { addr: addr.clone(), source })?;
            if !local.ip().is_loopback() && !allow_insecure_tcp {
                return Err(ServeError::NotLoopback(local.to_string()));
            }
            // Plain HTTP on loopback: sign-in links name this address (the builder in a
            // container is reached on it, and its client names no address).
            if ui_on_grpc && !tls && local.ip().is_loopback() {
                ui_access.set_base(format!("http://{local}"));
            }
            router.serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown).await?;
        }
    }
    Ok(())
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Listen on a unix socket at `path` that only its owner (root) can connect to: it is bound
/// inside a fresh 0700 directory, made 0600, and only then renamed into place, so it is
/// never reachable with wider permissions.
fn bind_private_socket(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(parent)?;
    let private = tempfile::Builder::new().prefix(".hoist-sock-").tempdir_in(parent)?;
    let tmp = private.path().join("s");
    let listener = tokio::net::UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::rename(&tmp, path)?;
    Ok(listener)
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

    #[tokio::test]
    async fn the_socket_is_only_its_owners_and_replaces_a_stale_one() {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/b.sock");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "stale").unwrap();
        let _l = bind_private_socket(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        tokio::net::UnixStream::connect(&path).await.expect("the renamed socket still accepts");
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("b.sock")], "the private directory is gone");
    }
}
