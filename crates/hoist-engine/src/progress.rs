//! Progress events of a build: one vertex per stage base and per step, with logs.
//!
//! The engine emits [`Event`]s on an unbounded channel; the server forwards them to the
//! client, which renders them (plain, tty or raw JSON).

use bytes::Bytes;
use tokio::sync::mpsc;

/// One progress event.
#[derive(Debug, Clone)]
pub enum Event {
    /// A vertex (a base image resolution, or a step) started.
    Started {
        /// The vertex's id, unique within the build; later events of the vertex carry it.
        id: u32,
        /// What is shown, e.g. `[build 2/5] RUN make` or `[base] FROM docker.io/...@sha256:...`.
        name: String,
    },
    /// A vertex finished: from cache, by running, or with an error.
    Completed {
        /// The vertex's id from [`Event::Started`].
        id: u32,
        /// The result came from the cache (no container ran, no layer was pulled).
        cached: bool,
        /// Wall-clock time since the vertex started, in seconds.
        seconds: f64,
        /// The vertex's error message if it failed.
        error: Option<String>,
    },
    /// Output of a running step (`stream` 1 = stdout, 2 = stderr).
    Log {
        /// The vertex's id from [`Event::Started`].
        id: u32,
        /// 1 for stdout, 2 for stderr.
        stream: u8,
        /// The bytes as they arrived (not split at lines).
        data: Bytes,
    },
    /// A non-fatal finding worth showing (unused build arg, ...).
    Warning(String),
    /// What a vertex's cache key was made of, sent before its [`Event::Completed`] (a step
    /// that failed may have none): the builder keeps it in the build record, to tell a later
    /// build why a step missed the cache. Not shown to clients.
    Key(Box<StepKey>),
}

/// The inputs of a step's cache key (or, for a base image vertex, the key of the state it
/// starts its stage with).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepKey {
    /// The vertex's id from [`Event::Started`].
    pub id: u32,
    /// The Dockerfile line of the instruction (1-based; 0 for a base image).
    pub line: u32,
    /// The key its cache record is under (empty for a base image).
    pub cache_key: String,
    /// The key of the state it ran on (its parent step's, or its stage base's).
    pub parent_key: String,
    /// The key of the state after it (what the next step, or a stage copying from this
    /// one, names as its parent or input).
    pub state_key: String,
    /// A digest of the operation as it runs (the instruction with its variables expanded,
    /// its environment, user, workdir...).
    pub op: String,
    /// Its other inputs by kind: `sources` (the files a COPY reads), `context` (a bind
    /// mount of the context), `stage` (the key of a stage it reads), `git`, `url`, ...
    pub inputs: Vec<(String, String)>,
    /// The build args in the step's environment, each `NAME=` a digest of its value.
    pub args: Vec<String>,
    /// The cache was not consulted (`--no-cache`, `--no-cache-filter`).
    pub no_cache: bool,
    /// The size of its layer (uncompressed), or of a base image's layers.
    pub layer_bytes: u64,
    /// For a base image: how many of its layers were pulled.
    pub pulled_layers: u64,
    /// For a base image: the position of its stage's `FROM` among the Dockerfile's (0-based).
    pub from_index: Option<u32>,
}

/// Where events go. Sending never fails the build: a vanished receiver just drops events.
#[derive(Debug, Clone)]
pub struct Progress {
    tx: Option<mpsc::UnboundedSender<Event>>,
}

impl Progress {
    /// A sink that forwards to `tx`.
    pub fn new(tx: mpsc::UnboundedSender<Event>) -> Progress {
        Progress { tx: Some(tx) }
    }

    /// A sink that drops everything.
    pub fn discard() -> Progress {
        Progress { tx: None }
    }

    /// Send an event.
    pub fn send(&self, ev: Event) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(ev);
        }
    }
}
