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
