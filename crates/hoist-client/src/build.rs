//! The build event loop every client shares: one build runs on N ≥ 1 builders (one builder
//! is N = 1; several when each platform goes to a builder that builds it natively). Each
//! [`BuildPart`] is started on its builder, their event streams are merged, vertex ids of
//! different builders are kept apart (builder 0's are unchanged), each part's output data
//! and export sessions go to the caller's sinks through the part's output map, and each
//! part's [`v1::BuildResult`] is collected. Progress goes to a [`BuildObserver`] (a
//! screen, an IDE panel). An error names its builder when there are several, and aborts
//! the sinks; so does a cancellation, which is its own outcome.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use tokio_stream::StreamMap;

use crate::outputs::{OutputError, OutputSink};
use crate::session::{AgentSource, BuildEvents, ContextProvider};
use crate::v1::{self, build_event};
use crate::{Client, ClientError};

/// How far apart the vertex ids of different builders are: builder `k`'s vertex `id` is
/// shown as `id + k * VERTEX_ID_STRIDE`.
pub const VERTEX_ID_STRIDE: u32 = 1_000_000;

/// One builder's share of a build.
pub struct BuildPart {
    /// The builder, for errors and summaries (e.g. its address).
    pub label: String,
    /// The connected builder.
    pub client: Client,
    /// What it builds (with its outputs, in the order of [`BuildPart::outputs`]).
    pub request: v1::BuildRequest,
    /// The ssh agents its `--ssh` ids are served by.
    pub agents: HashMap<String, AgentSource>,
    /// Sends the context paths the builder asks for during the build.
    pub context: Option<Arc<dyn ContextProvider>>,
    /// Output index in this part's request → index into the sinks of the build.
    pub outputs: Vec<usize>,
}

/// A part whose build has started: its event stream.
pub struct StartedPart {
    /// The builder, for errors.
    pub label: String,
    /// The builder (export sessions are read from it).
    pub client: Client,
    /// The builder's events.
    pub events: BuildEvents,
    /// Output index in this part's request → index into the sinks of the build.
    pub outputs: Vec<usize>,
}

/// What the caller is told while a build runs.
pub trait BuildObserver {
    /// A progress event (vertex started, completed, log, warning, queued); vertex ids are
    /// already unique across builders.
    fn event(&mut self, event: build_event::Event);
    /// An output finished: a line saying what it did.
    fn note(&mut self, line: &str);
}

/// How a build ended, when it did not fail.
#[derive(Debug)]
pub enum BuildOutcome {
    /// Every part finished: their results, in the order of the parts.
    Finished(Vec<v1::BuildResult>),
    /// The cancellation future completed first; the sinks were aborted.
    Cancelled,
}

/// What went wrong in a build.
#[derive(Debug, thiserror::Error)]
pub enum BuildErrorKind {
    /// The build could not be started.
    #[error(transparent)]
    Start(ClientError),
    /// The builder reported an error (its message).
    #[error("{0}")]
    Failed(String),
    /// The stream ended before the build's result.
    #[error("the builder closed the connection before the build finished")]
    Closed,
    /// The builder sent data or an export for an output the request does not have.
    #[error("the builder sent {what} for unknown output {index}")]
    UnknownOutput {
        /// "data" or "an export".
        what: &'static str,
        /// The output index the builder sent.
        index: u32,
    },
    /// An output sink failed.
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// A failed build: what went wrong, and on which builder when there were several.
#[derive(Debug)]
pub struct BuildError {
    /// The label of the builder it happened on (`None` when the build had one builder).
    pub builder: Option<String>,
    /// What went wrong.
    pub kind: BuildErrorKind,
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.builder {
            Some(b) => write!(f, "builder {b}: {}", self.kind),
            None => self.kind.fmt(f),
        }
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // The kind's message is part of ours: its source is the next link.
        std::error::Error::source(&self.kind)
    }
}

/// Start every part on its builder and run the build (see [`drive`]).
pub async fn build<O, C>(
    parts: Vec<BuildPart>,
    sinks: &mut [Option<OutputSink>],
    observer: &mut O,
    cancel: C,
) -> Result<BuildOutcome, BuildError>
where
    O: BuildObserver + ?Sized,
    C: Future<Output = ()>,
{
    let several = parts.len() > 1;
    let mut started = Vec::with_capacity(parts.len());
    for mut p in parts {
        match crate::session::start_build(&mut p.client, p.request, p.agents, p.context).await {
            Ok(events) => started.push(StartedPart { label: p.label, client: p.client, events, outputs: p.outputs }),
            Err(e) => {
                abort_all(sinks);
                return Err(BuildError { builder: several.then_some(p.label), kind: BuildErrorKind::Start(e) });
            }
        }
    }
    drive(started, sinks, observer, cancel).await
}

fn abort_all(sinks: &mut [Option<OutputSink>]) {
    for s in sinks.iter_mut().flatten() {
        s.abort();
    }
}

/// Run started parts to their end: merge their events, keep their vertex ids apart, route
/// their outputs to `sinks`, collect their results. Returns when every part has sent its
/// result, on the first error (the sinks are aborted), or when `cancel` completes (the
/// sinks are aborted). Sinks whose output did not end in the stream (a load) are left for
/// [`crate::outputs::finish_sinks`].
pub async fn drive<O, C>(
    parts: Vec<StartedPart>,
    sinks: &mut [Option<OutputSink>],
    observer: &mut O,
    cancel: C,
) -> Result<BuildOutcome, BuildError>
where
    O: BuildObserver + ?Sized,
    C: Future<Output = ()>,
{
    let r = run(parts, sinks, observer, cancel).await;
    if !matches!(r, Ok(BuildOutcome::Finished(_))) {
        abort_all(sinks);
        for s in sinks.iter_mut().flatten() {
            s.clean_up().await;
        }
    }
    r
}

async fn run<O, C>(
    parts: Vec<StartedPart>,
    sinks: &mut [Option<OutputSink>],
    observer: &mut O,
    cancel: C,
) -> Result<BuildOutcome, BuildError>
where
    O: BuildObserver + ?Sized,
    C: Future<Output = ()>,
{
    let several = parts.len() > 1;
    let mut streams = StreamMap::new();
    let mut info = Vec::with_capacity(parts.len());
    for (k, p) in parts.into_iter().enumerate() {
        // A `None` after the last event says that this part's stream ended.
        streams.insert(k, p.events.map(Some).chain(futures::stream::once(async { None })).boxed());
        info.push((p.label, p.client, p.outputs));
    }
    let mut results: Vec<Option<v1::BuildResult>> = vec![None; info.len()];
    let err = |k: usize, kind: BuildErrorKind| BuildError { builder: several.then(|| info[k].0.clone()), kind };
    tokio::pin!(cancel);
    loop {
        let next = tokio::select! {
            n = streams.next() => n,
            _ = &mut cancel => return Ok(BuildOutcome::Cancelled),
        };
        let Some((k, item)) = next else { break };
        let ev = match item {
            None => {
                if results[k].is_none() {
                    return Err(err(k, BuildErrorKind::Closed));
                }
                continue;
            }
            Some(Ok(ev)) => ev,
            Some(Err(status)) => return Err(err(k, BuildErrorKind::Failed(status.message().to_string()))),
        };
        let shift = |id: u32| id + (k as u32) * VERTEX_ID_STRIDE;
        match ev.event {
            Some(build_event::Event::Output(o)) => {
                let unknown = || BuildErrorKind::UnknownOutput { what: "data", index: o.output };
                let i = *info[k].2.get(o.output as usize).ok_or_else(|| err(k, unknown()))?;
                let sink = sinks.get_mut(i).and_then(|s| s.as_mut()).ok_or_else(|| err(k, unknown()))?;
                sink.write(o.data).await.map_err(|e| err(k, e.into()))?;
                if o.eof {
                    if let Some(sink) = sinks[i].take() {
                        let note = sink.finish().await.map_err(|e| err(k, e.into()))?;
                        observer.note(&note);
                    }
                }
            }
            Some(build_event::Event::Export(session)) => {
                let unknown = || BuildErrorKind::UnknownOutput { what: "an export", index: session.output };
                let i = *info[k].2.get(session.output as usize).ok_or_else(|| err(k, unknown()))?;
                let sink = sinks.get_mut(i).and_then(|s| s.as_mut()).ok_or_else(|| err(k, unknown()))?;
                sink.start_export(&info[k].1, session).map_err(|e| err(k, e.into()))?;
            }
            Some(build_event::Event::Result(r)) => {
                results[k] = Some(r);
                // Nothing follows the result: stop listening to this builder.
                streams.remove(&k);
            }
            Some(build_event::Event::Started(mut s)) => {
                s.id = shift(s.id);
                observer.event(build_event::Event::Started(s));
            }
            Some(build_event::Event::Completed(mut c)) => {
                c.id = shift(c.id);
                observer.event(build_event::Event::Completed(c));
            }
            Some(build_event::Event::Log(mut l)) => {
                l.id = shift(l.id);
                observer.event(build_event::Event::Log(l));
            }
            Some(other) => observer.event(other),
            None => {}
        }
    }
    let mut out = Vec::with_capacity(results.len());
    for (k, r) in results.into_iter().enumerate() {
        out.push(r.ok_or_else(|| err(k, BuildErrorKind::Closed))?);
    }
    Ok(BuildOutcome::Finished(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outputs::OutputSink;
    use futures::stream;

    /// A builder client that is never used to connect (no network in these tests).
    fn offline_client() -> Client {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        hoist_proto::v1::builder_client::BuilderClient::with_interceptor(channel, crate::Auth { token: None, project: None })
    }

    fn ev(e: build_event::Event) -> Result<v1::BuildEvent, tonic::Status> {
        Ok(v1::BuildEvent { event: Some(e) })
    }

    fn started(id: u32, name: &str) -> Result<v1::BuildEvent, tonic::Status> {
        ev(build_event::Event::Started(v1::VertexStarted { id, name: name.into() }))
    }

    fn completed(id: u32) -> Result<v1::BuildEvent, tonic::Status> {
        ev(build_event::Event::Completed(v1::VertexCompleted { id, cached: false, seconds: 0.1, error: String::new() }))
    }

    fn output(output: u32, data: &[u8], eof: bool) -> Result<v1::BuildEvent, tonic::Status> {
        ev(build_event::Event::Output(v1::OutputData { output, data: data.to_vec(), eof }))
    }

    fn result(build_id: &str) -> Result<v1::BuildEvent, tonic::Status> {
        ev(build_event::Event::Result(v1::BuildResult { build_id: build_id.into(), ..Default::default() }))
    }

    /// Events from a vector; `then_hang` keeps the stream open afterwards, as a builder
    /// still building does.
    fn events(v: Vec<Result<v1::BuildEvent, tonic::Status>>, then_hang: bool) -> BuildEvents {
        if then_hang {
            Box::pin(stream::iter(v).chain(stream::pending()))
        } else {
            Box::pin(stream::iter(v))
        }
    }

    fn part(label: &str, events: BuildEvents, outputs: Vec<usize>) -> StartedPart {
        StartedPart { label: label.into(), client: offline_client(), events, outputs }
    }

    fn file_sink(dir: &std::path::Path, name: &str) -> Option<OutputSink> {
        let path = dir.join(name);
        let file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        Some(OutputSink::File { file, path, kind: "tar".into() })
    }

    #[derive(Default)]
    struct Seen {
        events: Vec<build_event::Event>,
        notes: Vec<String>,
    }

    impl BuildObserver for Seen {
        fn event(&mut self, event: build_event::Event) {
            self.events.push(event);
        }
        fn note(&mut self, line: &str) {
            self.notes.push(line.to_string());
        }
    }

    impl Seen {
        fn started_ids(&self) -> Vec<u32> {
            self.events.iter().filter_map(|e| if let build_event::Event::Started(s) = e { Some(s.id) } else { None }).collect()
        }
    }

    /// Two builders: their vertex ids stay apart (the first builder's unchanged), each
    /// one's output goes to its own sink through its output map, warnings pass through, and
    /// the results come back in the order of the parts.
    #[tokio::test]
    async fn two_builders_keep_their_vertices_apart_and_their_outputs_in_their_sinks() {
        let dir = tempfile::tempdir().unwrap();
        let mut sinks = vec![file_sink(dir.path(), "amd64.tar"), file_sink(dir.path(), "arm64.tar")];
        let a = events(
            vec![
                started(1, "[amd64 1/2] FROM busybox"),
                output(0, b"amd", false),
                completed(1),
                ev(build_event::Event::Warning("slow disk".into())),
                output(0, b"64", true),
                result("build-a"),
            ],
            false,
        );
        // The second builder's output 0 is the build's output 1.
        let b = events(
            vec![
                started(1, "[arm64 1/2] FROM busybox"),
                ev(build_event::Event::Log(v1::VertexLog { id: 1, stream: 1, data: b"hi\n".to_vec() })),
                output(0, b"arm64", true),
                completed(1),
                result("build-b"),
            ],
            false,
        );
        let mut seen = Seen::default();
        let parts = vec![part("a:1", a, vec![0]), part("b:1", b, vec![1])];
        let outcome = drive(parts, &mut sinks, &mut seen, std::future::pending()).await.unwrap();
        let BuildOutcome::Finished(results) = outcome else { panic!("cancelled") };
        assert_eq!(results.iter().map(|r| r.build_id.as_str()).collect::<Vec<_>>(), ["build-a", "build-b"]);
        let mut ids = seen.started_ids();
        ids.sort();
        assert_eq!(ids, [1, 1 + VERTEX_ID_STRIDE]);
        assert!(seen.events.iter().any(|e| matches!(e, build_event::Event::Log(l) if l.id == 1 + VERTEX_ID_STRIDE)));
        assert!(seen.events.iter().any(|e| matches!(e, build_event::Event::Warning(w) if w == "slow disk")));
        assert_eq!(std::fs::read(dir.path().join("amd64.tar")).unwrap(), b"amd64");
        assert_eq!(std::fs::read(dir.path().join("arm64.tar")).unwrap(), b"arm64");
        assert_eq!(seen.notes.len(), 2, "{:?}", seen.notes);
        assert!(sinks.iter().all(Option::is_none), "both outputs ended in the stream");
    }

    /// One builder fails while the other still builds: the build fails at once, the error
    /// names the failing builder, and the half-written outputs are removed.
    #[tokio::test]
    async fn a_failing_builder_is_named_and_the_outputs_are_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let mut sinks = vec![file_sink(dir.path(), "a.tar"), file_sink(dir.path(), "b.tar")];
        let a = events(vec![started(1, "a"), output(0, b"partial", false)], true);
        let b = events(vec![started(1, "b"), Err(tonic::Status::internal("RUN make: exit code 2"))], false);
        let mut seen = Seen::default();
        let parts = vec![part("tcp://a:7420", a, vec![0]), part("tcp://b:7420", b, vec![1])];
        let e = drive(parts, &mut sinks, &mut seen, std::future::pending()).await.unwrap_err();
        assert_eq!(e.builder.as_deref(), Some("tcp://b:7420"));
        assert_eq!(e.to_string(), "builder tcp://b:7420: RUN make: exit code 2");
        assert!(!dir.path().join("a.tar").exists() && !dir.path().join("b.tar").exists(), "aborted sinks leave no files");
    }

    /// With one builder, errors are the builder's own words (no builder named); a stream
    /// that ends without a result is an error, as is data for an output the request lacks.
    #[tokio::test]
    async fn one_builder_errors_name_no_builder() {
        let dir = tempfile::tempdir().unwrap();
        let mut sinks = vec![file_sink(dir.path(), "out.tar")];
        let cut = events(vec![started(1, "a"), output(0, b"x", false)], false);
        let e = drive(vec![part("embedded", cut, vec![0])], &mut sinks, &mut Seen::default(), std::future::pending()).await.unwrap_err();
        assert_eq!((e.builder.clone(), e.to_string()), (None, "the builder closed the connection before the build finished".to_string()));
        assert!(!dir.path().join("out.tar").exists());

        let mut sinks = vec![file_sink(dir.path(), "out.tar")];
        let stray = events(vec![output(3, b"x", false)], true);
        let e = drive(vec![part("embedded", stray, vec![0])], &mut sinks, &mut Seen::default(), std::future::pending()).await.unwrap_err();
        assert!(matches!(e.kind, BuildErrorKind::UnknownOutput { index: 3, .. }), "{e}");
    }

    /// A cancelled build is its own outcome, and its outputs are removed.
    #[tokio::test]
    async fn cancellation_stops_the_build_and_aborts_the_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let mut sinks = vec![file_sink(dir.path(), "out.tar")];
        let a = events(vec![started(1, "a"), output(0, b"partial", false)], true);
        let b = events(vec![started(1, "b")], true);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let cancel = async move {
            let _ = rx.await;
        };
        let mut seen = Seen::default();
        let run = drive(vec![part("a", a, vec![0]), part("b", b, vec![])], &mut sinks, &mut seen, cancel);
        let cancel_soon = async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let _ = tx.send(());
        };
        let (outcome, ()) = tokio::join!(run, cancel_soon);
        assert!(matches!(outcome, Ok(BuildOutcome::Cancelled)), "{outcome:?}");
        assert_eq!(seen.started_ids().len(), 2, "the events before the cancellation were seen");
        assert!(!dir.path().join("out.tar").exists());
    }
}
