//! `RUN --mount=type=ssh`: a unix socket in the step whose connections go to an ssh agent
//! the client serves. The engine makes the socket (in a private directory of the state
//! root, owned and moded as the mount asks) and accepts on it while the step runs; each
//! connection is handed to an [`SshForwarder`], which the builder service implements by
//! relaying the bytes over the build stream to the client. The builder never opens an
//! agent path a client names: the agent stays on the client, as with BuildKit's session.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream to one agent connection of the client.
pub trait AgentStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AgentStream for T {}

/// Opens connections to the ssh agents a client forwards for a build (`--ssh ID`).
#[async_trait::async_trait]
pub trait SshForwarder: Send + Sync {
    /// A new connection to the client's agent `id`.
    async fn connect(&self, id: &str) -> std::io::Result<Box<dyn AgentStream>>;
}

/// The ssh agents of a build: which ids the client serves and how to reach them.
#[derive(Clone, Default)]
pub struct SshAgents {
    /// Ids the client forwards (`--ssh default`, `--ssh id=...`).
    pub ids: std::collections::BTreeSet<String>,
    /// Where connections go; `None` when the build forwards no agent.
    pub forwarder: Option<Arc<dyn SshForwarder>>,
}

impl std::fmt::Debug for SshAgents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshAgents").field("ids", &self.ids).finish_non_exhaustive()
    }
}

impl SshAgents {
    /// Whether the client forwards agent `id`.
    pub fn has(&self, id: &str) -> bool {
        self.forwarder.is_some() && self.ids.contains(id)
    }
}

/// A listening agent socket for one step; closed and removed when dropped.
pub(crate) struct AgentSocket {
    dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl AgentSocket {
    /// Listen on a fresh socket under `parent` (a 0700 directory) for agent `id`; the socket
    /// is owned by `uid:gid` with `mode`, as the mount asks.
    pub(crate) fn listen(parent: &Path, id: &str, agents: &SshAgents, uid: u32, gid: u32, mode: u32) -> std::io::Result<AgentSocket> {
        use std::os::unix::fs::PermissionsExt;
        let forwarder = agents
            .forwarder
            .clone()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("ssh agent {id:?} is not forwarded")))?;
        std::fs::create_dir_all(parent)?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))?;
        let dir = tempfile::Builder::new().prefix("agent-").tempdir_in(parent)?;
        let path = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&path)?;
        rustix::fs::chown(&path, Some(rustix::fs::Uid::from_raw(uid)), Some(rustix::fs::Gid::from_raw(gid)))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o777))?;
        let id = id.to_string();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { break };
                let forwarder = forwarder.clone();
                let id = id.clone();
                conns.spawn(async move {
                    match forwarder.connect(&id).await {
                        Ok(mut remote) => {
                            let _ = tokio::io::copy_bidirectional(&mut stream, &mut remote).await;
                        }
                        Err(e) => tracing::debug!("ssh agent {id}: {e}"),
                    }
                });
                // Finished connections are reaped as new ones come in.
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(AgentSocket { dir, task })
    }

    /// The socket, to bind-mount into the step.
    pub(crate) fn path(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }
}

impl Drop for AgentSocket {
    fn drop(&mut self) {
        // Aborting the accept loop drops the listener and every open connection.
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers every connection with "agent <id>: " and echoes what it reads.
    struct Echo;

    #[async_trait::async_trait]
    impl SshForwarder for Echo {
        async fn connect(&self, id: &str) -> std::io::Result<Box<dyn AgentStream>> {
            let (a, mut b) = tokio::io::duplex(1024);
            let hello = format!("agent {id}: ");
            tokio::spawn(async move {
                let _ = b.write_all(hello.as_bytes()).await;
                let mut buf = [0u8; 64];
                while let Ok(n) = b.read(&mut buf).await {
                    if n == 0 || b.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            Ok(Box::new(a))
        }
    }

    #[tokio::test]
    async fn each_connection_reaches_the_forwarder_and_the_socket_goes_away_when_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let agents = SshAgents { ids: ["default".to_string()].into(), forwarder: Some(Arc::new(Echo)) };
        assert!(agents.has("default") && !agents.has("other"));
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
        let sock = AgentSocket::listen(&tmp.path().join("ssh"), "default", &agents, uid, gid, 0o600).unwrap();
        let path = sock.path();
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(tmp.path().join("ssh")).unwrap().permissions().mode() & 0o777, 0o700);
        for _ in 0..2 {
            let mut c = tokio::net::UnixStream::connect(&path).await.unwrap();
            c.write_all(b"ping").await.unwrap();
            let mut got = vec![0u8; "agent default: ping".len()];
            c.read_exact(&mut got).await.unwrap();
            assert_eq!(got, b"agent default: ping");
        }
        drop(sock);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!path.exists(), "the socket's directory is removed");
    }

    #[test]
    fn a_build_without_a_forwarder_has_no_agent() {
        let agents = SshAgents { ids: ["default".to_string()].into(), forwarder: None };
        assert!(!agents.has("default"));
        let tmp = tempfile::tempdir().unwrap();
        assert!(AgentSocket::listen(tmp.path(), "default", &agents, 0, 0, 0o600).is_err());
    }
}
