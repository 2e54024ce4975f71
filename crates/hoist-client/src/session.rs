//! One build call and the client's side of its session: the request goes first on the
//! build stream, and what the builder asks of the client while the build runs is answered
//! on the same stream. Today that is ssh agent forwarding: each connection a RUN step opens
//! to `--mount=type=ssh` arrives as numbered frames, which the client connects to the
//! agent it serves for that id (a local agent socket, or keys held in this process). The
//! agent never leaves the client's machine.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use hoist_proto::v1::{self, build_client_message, build_event};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::agent::KeyAgent;
use crate::{Client, ClientError};

/// Largest frame sent to the builder (it refuses bigger ones).
const MAX_FRAME: usize = 64 << 10;

/// Where the connections of one forwarded agent id go.
#[derive(Clone)]
pub enum AgentSource {
    /// An agent socket on this machine (`--ssh default` is `$SSH_AUTH_SOCK`).
    Socket(PathBuf),
    /// Private keys served by this process (`--ssh id=~/.ssh/id_ed25519`).
    Keys(Arc<KeyAgent>),
}

impl std::fmt::Debug for AgentSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentSource::Socket(p) => write!(f, "Socket({})", p.display()),
            AgentSource::Keys(_) => f.write_str("Keys"),
        }
    }
}

/// Sends the builder context paths it asks for during a build.
#[tonic::async_trait]
pub trait ContextProvider: Send + Sync {
    /// Sync `paths` (selectors; "" is the whole context) to the builder; returns the
    /// prepared context's id.
    async fn provide(&self, client: &mut Client, paths: Vec<String>) -> Result<String, ClientError>;
}

/// The builder's events of one build; agent connections are served in the background for
/// as long as this stream lives.
pub type BuildEvents = Pin<Box<dyn Stream<Item = Result<v1::BuildEvent, tonic::Status>> + Send>>;

trait AgentIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AgentIo for T {}

async fn open_agent(source: &AgentSource) -> std::io::Result<Box<dyn AgentIo>> {
    match source {
        AgentSource::Socket(path) => Ok(Box::new(tokio::net::UnixStream::connect(path).await?)),
        AgentSource::Keys(agent) => {
            let (ours, theirs) = tokio::io::duplex(MAX_FRAME);
            let agent = agent.clone();
            tokio::spawn(async move {
                let _ = agent.serve(theirs).await;
            });
            Ok(Box::new(ours))
        }
    }
}

fn ssh_frame(conn: u64, data: Vec<u8>, eof: bool) -> v1::BuildClientMessage {
    v1::BuildClientMessage { msg: Some(build_client_message::Msg::Ssh(v1::SshFrame { conn, id: String::new(), data, eof })) }
}

/// What the builder sent for one connection.
enum ToAgent {
    Data(Vec<u8>),
    Eof,
}

/// Relay one connection between the builder's frames and an agent.
async fn relay(conn: u64, agent: Box<dyn AgentIo>, mut from_builder: mpsc::Receiver<ToAgent>, out: mpsc::Sender<v1::BuildClientMessage>) {
    let (mut rd, mut wr) = tokio::io::split(agent);
    let to_builder = async {
        let mut buf = vec![0u8; MAX_FRAME];
        loop {
            let n = rd.read(&mut buf).await.unwrap_or(0);
            let eof = n == 0;
            if out.send(ssh_frame(conn, buf[..n].to_vec(), eof)).await.is_err() || eof {
                break;
            }
        }
    };
    let to_agent = async {
        while let Some(m) = from_builder.recv().await {
            match m {
                ToAgent::Data(d) => {
                    if wr.write_all(&d).await.is_err() {
                        break;
                    }
                }
                ToAgent::Eof => break,
            }
        }
        let _ = wr.shutdown().await;
    };
    tokio::join!(to_builder, to_agent);
}

/// The answer to the builder's request for a registry's credential: the user's Docker
/// config (and its credential helpers) for that registry only.
fn credential_reply(r: v1::CredentialRequest) -> v1::CredentialReply {
    use hoist_oci::auth::Credential;
    let (credential, error) = match hoist_oci::auth::credentials_for(&r.host) {
        Ok(None) => (None, String::new()),
        Ok(Some(Credential::UsernamePassword { username, password })) => {
            (Some(v1::RegistryCredential { host: r.host.clone(), username, password, identity_token: String::new() }), String::new())
        }
        Ok(Some(Credential::IdentityToken(token))) => {
            (Some(v1::RegistryCredential { host: r.host.clone(), identity_token: token, ..Default::default() }), String::new())
        }
        Err(e) => (None, e.to_string()),
    };
    v1::CredentialReply { id: r.id, credential, error }
}

/// Start `req` on the builder; `agents` serves its `--ssh` ids and `context` the context
/// paths the builder asks for. The stream yields the builder's events (ssh frames and
/// context requests are handled here and never appear in it).
pub async fn start_build(
    client: &mut Client,
    req: v1::BuildRequest,
    agents: HashMap<String, AgentSource>,
    context: Option<Arc<dyn ContextProvider>>,
) -> Result<BuildEvents, ClientError> {
    let requests_client = client.clone();
    let (out_tx, out_rx) = mpsc::channel::<v1::BuildClientMessage>(64);
    out_tx
        .send(v1::BuildClientMessage { msg: Some(build_client_message::Msg::Request(req)) })
        .await
        .map_err(|_| ClientError::Builder("the build stream closed before its request was sent".into()))?;
    let mut inbound = client.build(ReceiverStream::new(out_rx)).await.map_err(ClientError::from_status)?.into_inner();
    let (ev_tx, ev_rx) = mpsc::channel::<Result<v1::BuildEvent, tonic::Status>>(64);
    tokio::spawn(async move {
        // Holding `out_tx` keeps the request stream open for as long as the build runs.
        let mut conns: HashMap<u64, mpsc::Sender<ToAgent>> = HashMap::new();
        while let Some(msg) = inbound.next().await {
            let frame = match msg {
                Ok(v1::BuildEvent { event: Some(build_event::Event::Ssh(f)) }) => f,
                Ok(v1::BuildEvent { event: Some(build_event::Event::CredentialRequest(r)) }) => {
                    let out = out_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let reply = credential_reply(r);
                        let _ = out.blocking_send(v1::BuildClientMessage { msg: Some(build_client_message::Msg::Credential(reply)) });
                    });
                    continue;
                }
                Ok(v1::BuildEvent { event: Some(build_event::Event::ContextRequest(r)) }) => {
                    let (provider, mut c, out) = (context.clone(), requests_client.clone(), out_tx.clone());
                    tokio::spawn(async move {
                        let answer = match provider {
                            Some(p) => p.provide(&mut c, r.paths).await.map_err(|e| e.to_string()),
                            None => Err("this build sent no context directory".to_string()),
                        };
                        let (context_id, error) = match answer {
                            Ok(id) => (id, String::new()),
                            Err(e) => (String::new(), e),
                        };
                        let reply = v1::ContextReply { id: r.id, context_id, error };
                        let _ = out.send(v1::BuildClientMessage { msg: Some(build_client_message::Msg::Context(reply)) }).await;
                    });
                    continue;
                }
                other => {
                    if ev_tx.send(other).await.is_err() {
                        break; // the caller stopped listening: the build is abandoned
                    }
                    continue;
                }
            };
            if let std::collections::hash_map::Entry::Vacant(slot) = conns.entry(frame.conn) {
                if frame.id.is_empty() {
                    continue; // not an opening frame: a connection that already ended
                }
                let agent = match agents.get(&frame.id) {
                    Some(source) => open_agent(source).await.map_err(|e| format!("ssh agent {:?} ({source:?}): {e}", frame.id)),
                    None => Err(format!("the builder asked for ssh agent {:?}, which this build does not forward", frame.id)),
                };
                match agent {
                    Ok(agent) => {
                        let (tx, rx) = mpsc::channel(16);
                        slot.insert(tx);
                        tokio::spawn(relay(frame.conn, agent, rx, out_tx.clone()));
                    }
                    Err(message) => {
                        let _ = ev_tx.send(Ok(v1::BuildEvent { event: Some(build_event::Event::Warning(message)) })).await;
                        let _ = out_tx.send(ssh_frame(frame.conn, Vec::new(), true)).await;
                        continue;
                    }
                }
            }
            let Some(tx) = conns.get(&frame.conn) else { continue };
            let mut open = true;
            if !frame.data.is_empty() {
                open = tx.send(ToAgent::Data(frame.data)).await.is_ok();
            }
            if frame.eof && open {
                let _ = tx.send(ToAgent::Eof).await;
            }
            if frame.eof || !open {
                conns.remove(&frame.conn);
            }
        }
        drop(out_tx);
    });
    Ok(Box::pin(ReceiverStream::new(ev_rx)))
}
