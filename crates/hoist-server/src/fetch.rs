//! The builder's end of context requests: when a build's steps read context paths the
//! client did not send (a base image's `ONBUILD COPY`, or anything the client's reading of
//! the Dockerfile missed), the engine asks for them; this sends a `ContextRequest` on the
//! build's event stream, waits for the client's `ContextReply` (a context it prepared and
//! uploaded the usual way, under the same session), and gives the engine the build's
//! context with those paths added. So the client's analysis is an optimisation, never a
//! correctness risk.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hoist_engine::context::{Context, ContextFetcher, Unavailable};
use hoist_proto::v1::{self, build_event};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::context::{ContextStore, MaterializedContext};

/// The context of one build and the requests for more of it.
pub struct ContextRequests {
    events: Mutex<Option<mpsc::Sender<Result<v1::BuildEvent, Status>>>>,
    replies: Mutex<HashMap<u64, oneshot::Sender<v1::ContextReply>>>,
    next: AtomicU64,
    store: Arc<ContextStore>,
    /// The build's current context (the first, then each extension), and every path asked
    /// for so far. Held until the build ends: the trees stay as the steps read them.
    state: tokio::sync::Mutex<State>,
}

struct State {
    current: Arc<MaterializedContext>,
    asked: BTreeSet<String>,
    earlier: Vec<Arc<MaterializedContext>>,
}

impl ContextRequests {
    /// Requests for build context `base`, sent on `events` (the build's event stream).
    pub fn new(
        events: mpsc::Sender<Result<v1::BuildEvent, Status>>,
        store: Arc<ContextStore>,
        base: Arc<MaterializedContext>,
    ) -> ContextRequests {
        ContextRequests {
            events: Mutex::new(Some(events)),
            replies: Mutex::default(),
            next: AtomicU64::new(1),
            store,
            state: tokio::sync::Mutex::new(State { current: base, asked: BTreeSet::new(), earlier: Vec::new() }),
        }
    }

    /// Hand the client's reply to the request waiting for it (unknown ids are dropped).
    pub fn deliver(&self, reply: v1::ContextReply) {
        if let Some(tx) = self.replies.lock().unwrap_or_else(|e| e.into_inner()).remove(&reply.id) {
            let _ = tx.send(reply);
        }
    }

    /// The build is over: nothing of this holds the event stream open any more, and waiting
    /// requests fail.
    pub fn close(&self) {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.replies.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

#[tonic::async_trait]
impl ContextFetcher for ContextRequests {
    async fn extend(&self, paths: Vec<String>) -> Result<Arc<Context>, Unavailable> {
        // One request at a time (the platforms of a build ask for the same paths).
        let mut state = self.state.lock().await;
        let new: Vec<String> = paths.into_iter().filter(|p| !state.asked.contains(p)).collect();
        if new.is_empty() {
            return Ok(state.current.context.clone());
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.replies.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or_else(|| Unavailable::new("the build is over"))?;
        let request = v1::BuildEvent { event: Some(build_event::Event::ContextRequest(v1::ContextRequest { id, paths: new.clone() })) };
        events.send(Ok(request)).await.map_err(|_| Unavailable::new("the client went away"))?;
        drop(events);
        let reply = rx
            .await
            .map_err(|_| Unavailable::new("the client did not answer (a client older than the builder cannot send more of the context)"))?;
        if !reply.error.is_empty() {
            return Err(Unavailable::new(reply.error));
        }
        let extended = self.store.extend(&state.current, &reply.context_id).map_err(Unavailable::new)?;
        let extended = Arc::new(extended);
        let previous = std::mem::replace(&mut state.current, extended.clone());
        state.earlier.push(previous);
        state.asked.extend(new);
        Ok(extended.context.clone())
    }
}
