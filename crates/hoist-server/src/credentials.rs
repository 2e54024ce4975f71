//! The builder's end of credential requests: when a registry a build uses asks for
//! credentials the builder was not given, the build's registry client asks the client for
//! that registry's credential with a `CredentialRequest` on the build's event stream, and
//! waits for its `CredentialReply` (as BuildKit's auth session does). The client answers
//! from the user's Docker config for that registry only, so no credential is read on the
//! builder and none is sent that the build does not need.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use hoist_oci::auth::Credential;
use hoist_oci::registry::CredentialSource;
use hoist_proto::v1::{self, build_event};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

/// Longest wait for the client's answer (a credential helper may ask its user to unlock a
/// keychain).
const ANSWER_WITHIN: Duration = Duration::from_secs(120);

/// Longest registry name asked about.
const MAX_HOST: usize = 255;

/// Credential requests of one build.
pub struct CredentialRequests {
    events: Mutex<Option<mpsc::Sender<Result<v1::BuildEvent, Status>>>>,
    replies: Mutex<HashMap<u64, oneshot::Sender<v1::CredentialReply>>>,
    next: AtomicU64,
}

impl CredentialRequests {
    /// Requests sent on `events` (the build's event stream).
    pub fn new(events: mpsc::Sender<Result<v1::BuildEvent, Status>>) -> CredentialRequests {
        CredentialRequests { events: Mutex::new(Some(events)), replies: Mutex::default(), next: AtomicU64::new(1) }
    }

    /// Hand the client's reply to the request waiting for it (unknown ids are dropped).
    pub fn deliver(&self, reply: v1::CredentialReply) {
        if let Some(tx) = self.replies.lock().unwrap_or_else(|e| e.into_inner()).remove(&reply.id) {
            let _ = tx.send(reply);
        }
    }

    /// The build is over: the event stream is released and waiting requests end.
    pub fn close(&self) {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.replies.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    async fn ask(&self, host: &str) -> Result<Option<Credential>, String> {
        if host.is_empty() || host.len() > MAX_HOST {
            return Err("not a registry name".into());
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.replies.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or("the build is over")?;
        let request = v1::CredentialRequest { id, host: host.to_string() };
        events
            .send(Ok(v1::BuildEvent { event: Some(build_event::Event::CredentialRequest(request)) }))
            .await
            .map_err(|_| "the client went away")?;
        drop(events);
        let reply = match tokio::time::timeout(ANSWER_WITHIN, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => return Err("the client went away".into()),
            Err(_) => return Err(format!("the client did not answer within {} s", ANSWER_WITHIN.as_secs())),
        };
        if !reply.error.is_empty() {
            return Err(reply.error);
        }
        Ok(reply.credential.map(|c| {
            if c.identity_token.is_empty() {
                Credential::basic(c.username, c.password)
            } else {
                Credential::IdentityToken(c.identity_token)
            }
        }))
    }

    fn warn(&self, message: String) {
        if let Some(events) = self.events.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            let _ = events.try_send(Ok(v1::BuildEvent { event: Some(build_event::Event::Warning(message)) }));
        }
    }
}

impl CredentialSource for CredentialRequests {
    fn credential<'a>(&'a self, registry: &'a str) -> BoxFuture<'a, Option<Credential>> {
        Box::pin(async move {
            match self.ask(registry).await {
                Ok(c) => c,
                Err(e) => {
                    self.warn(format!("no credentials for registry {registry}: {e}; going on anonymously"));
                    None
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_is_answered_by_the_reply_with_its_id() {
        let (tx, mut rx) = mpsc::channel(4);
        let requests = std::sync::Arc::new(CredentialRequests::new(tx));
        let asking = {
            let r = requests.clone();
            tokio::spawn(async move { r.credential("reg.example:5000").await })
        };
        let Some(Ok(v1::BuildEvent { event: Some(build_event::Event::CredentialRequest(req)) })) = rx.recv().await else {
            panic!("expected a credential request")
        };
        assert_eq!(req.host, "reg.example:5000");
        // A reply to another request is dropped; the right one answers.
        requests.deliver(v1::CredentialReply { id: req.id + 100, ..Default::default() });
        let credential =
            v1::RegistryCredential { host: req.host.clone(), username: "u".into(), password: "p".into(), ..Default::default() };
        requests.deliver(v1::CredentialReply { id: req.id, credential: Some(credential), error: String::new() });
        assert_eq!(asking.await.unwrap(), Some(Credential::basic("u", "p")));
    }

    #[tokio::test]
    async fn an_error_or_a_closed_build_goes_anonymous_with_a_warning() {
        let (tx, mut rx) = mpsc::channel(4);
        let requests = std::sync::Arc::new(CredentialRequests::new(tx));
        let asking = {
            let r = requests.clone();
            tokio::spawn(async move { r.credential("reg.example").await })
        };
        let Some(Ok(v1::BuildEvent { event: Some(build_event::Event::CredentialRequest(req)) })) = rx.recv().await else {
            panic!("expected a credential request")
        };
        requests.deliver(v1::CredentialReply { id: req.id, credential: None, error: "helper failed".into() });
        assert_eq!(asking.await.unwrap(), None);
        let Some(Ok(v1::BuildEvent { event: Some(build_event::Event::Warning(w)) })) = rx.recv().await else {
            panic!("expected a warning")
        };
        assert!(w.contains("reg.example") && w.contains("helper failed"), "{w}");
        requests.close();
        assert_eq!(requests.credential("other.example").await, None);
    }
}
