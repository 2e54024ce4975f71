//! The builder's end of ssh agent forwarding: each connection a RUN step opens to its agent
//! socket becomes a numbered stream of `SshFrame`s on the build's event stream, answered by
//! the client's frames on the request stream. The client connects each one to its agent;
//! the builder never opens an agent path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hoist_engine::sshforward::{AgentStream, SshForwarder};
use hoist_proto::v1::{self, build_event};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::Status;

/// Most agent connections of one build open at once (a step that opens more gets errors).
const MAX_CONNECTIONS: usize = 64;
/// Largest frame either side sends; a bigger frame from the client closes its connection.
const MAX_FRAME: usize = 64 << 10;

/// What the client sent for one connection: bytes, or the end of its side.
enum FromClient {
    Data(Vec<u8>),
    Eof,
}

/// Relays a build's agent connections over its streams.
pub struct SshRelay {
    /// The build's event stream; taken by [`SshRelay::close`] so that nothing of the relay
    /// keeps the stream open after the build.
    events: Mutex<Option<mpsc::Sender<Result<v1::BuildEvent, Status>>>>,
    conns: Arc<Mutex<HashMap<u64, mpsc::Sender<FromClient>>>>,
    next: AtomicU64,
    closed: tokio_util::sync::CancellationToken,
}

fn frame(conn: u64, id: String, data: Vec<u8>, eof: bool) -> Result<v1::BuildEvent, Status> {
    Ok(v1::BuildEvent { event: Some(build_event::Event::Ssh(v1::SshFrame { conn, id, data, eof })) })
}

impl SshRelay {
    /// A relay sending its frames on `events` (the build's event stream).
    pub fn new(events: mpsc::Sender<Result<v1::BuildEvent, Status>>) -> SshRelay {
        SshRelay { events: Mutex::new(Some(events)), conns: Arc::default(), next: AtomicU64::new(1), closed: Default::default() }
    }

    /// End every connection and stop relaying (the build is over).
    pub fn close(&self) {
        self.closed.cancel();
        self.events.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Hand a frame the client sent to its connection. Frames of unknown (closed)
    /// connections are dropped; an oversized frame closes its connection.
    pub async fn deliver(&self, f: v1::SshFrame) {
        let tx = self.conns.lock().unwrap_or_else(|e| e.into_inner()).get(&f.conn).cloned();
        let Some(tx) = tx else { return };
        if f.data.len() > MAX_FRAME {
            self.conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&f.conn);
            return;
        }
        if !f.data.is_empty() && tx.send(FromClient::Data(f.data)).await.is_err() {
            return;
        }
        if f.eof {
            let _ = tx.send(FromClient::Eof).await;
        }
    }
}

#[tonic::async_trait]
impl SshForwarder for SshRelay {
    async fn connect(&self, id: &str) -> std::io::Result<Box<dyn AgentStream>> {
        let conn = self.next.fetch_add(1, Ordering::Relaxed);
        let gone = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the build is over");
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or_else(gone)?;
        let (from_client_tx, mut from_client) = mpsc::channel::<FromClient>(16);
        {
            let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            if conns.len() >= MAX_CONNECTIONS {
                return Err(std::io::Error::other(format!("more than {MAX_CONNECTIONS} ssh agent connections open in one build")));
            }
            conns.insert(conn, from_client_tx);
        }
        if events.send(frame(conn, id.to_string(), Vec::new(), false)).await.is_err() {
            self.conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&conn);
            return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away"));
        }
        let (ours, theirs) = tokio::io::duplex(MAX_FRAME);
        let (mut rd, mut wr) = tokio::io::split(theirs);
        let conns = self.conns.clone();
        let closed = self.closed.clone();
        tokio::spawn(async move {
            let to_client = async {
                let mut buf = vec![0u8; MAX_FRAME];
                loop {
                    let n = rd.read(&mut buf).await.unwrap_or(0);
                    let eof = n == 0;
                    if events.send(frame(conn, String::new(), buf[..n].to_vec(), eof)).await.is_err() || eof {
                        break;
                    }
                }
            };
            let to_step = async {
                while let Some(m) = from_client.recv().await {
                    match m {
                        FromClient::Data(d) => {
                            if wr.write_all(&d).await.is_err() {
                                break;
                            }
                        }
                        FromClient::Eof => break,
                    }
                }
                let _ = wr.shutdown().await;
            };
            tokio::select! {
                _ = async { tokio::join!(to_client, to_step) } => {}
                _ = closed.cancelled() => {}
            }
            conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&conn);
        });
        Ok(Box::new(ours))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relay's two directions: what a step writes comes out as frames of one
    /// connection (opened with the agent's id), and the client's frames reach the step.
    #[tokio::test]
    async fn a_connection_is_framed_both_ways_and_closed_by_either_side() {
        let (tx, mut rx) = mpsc::channel(16);
        let relay = Arc::new(SshRelay::new(tx));
        let mut step = relay.connect("default").await.unwrap();
        let open = rx.recv().await.unwrap().unwrap();
        let Some(build_event::Event::Ssh(open)) = open.event else { panic!("expected an ssh frame") };
        assert_eq!(open.id, "default");
        assert!(open.data.is_empty() && !open.eof);
        step.write_all(b"request").await.unwrap();
        let Some(build_event::Event::Ssh(f)) = rx.recv().await.unwrap().unwrap().event else { panic!() };
        assert_eq!((f.conn, f.data.as_slice()), (open.conn, &b"request"[..]));
        relay.deliver(v1::SshFrame { conn: open.conn, id: String::new(), data: b"answer".to_vec(), eof: true }).await;
        let mut got = Vec::new();
        step.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"answer", "the client's eof ends the step's reads");
        drop(step);
        let Some(build_event::Event::Ssh(f)) = rx.recv().await.unwrap().unwrap().event else { panic!() };
        assert!(f.eof, "the step closing its end is sent as eof");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(relay.conns.lock().unwrap().is_empty(), "the connection is forgotten");
        // Frames for a connection that is gone are dropped.
        relay.deliver(v1::SshFrame { conn: open.conn, id: String::new(), data: b"late".to_vec(), eof: false }).await;
        // A connection the client never closes ends with the build, and then nothing of the
        // relay holds the event stream open.
        let _held = relay.connect("default").await.unwrap();
        relay.close();
        assert!(relay.connect("default").await.is_err());
        let end = tokio::time::timeout(std::time::Duration::from_secs(2), async { while rx.recv().await.is_some() {} });
        end.await.expect("the event stream ends once the relay is closed");
    }

    #[tokio::test]
    async fn a_step_cannot_open_unbounded_connections() {
        let (tx, mut rx) = mpsc::channel(1024);
        let relay = SshRelay::new(tx);
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(relay.connect("default").await.unwrap());
        }
        assert!(relay.connect("default").await.is_err());
        drop(held);
        while rx.try_recv().is_ok() {}
    }
}
