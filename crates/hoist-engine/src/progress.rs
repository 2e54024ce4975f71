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
    Started { id: u32, name: String },
    /// A vertex finished: from cache, by running, or with an error.
    Completed { id: u32, cached: bool, seconds: f64, error: Option<String> },
    /// Output of a running step (`stream` 1 = stdout, 2 = stderr).
    Log { id: u32, stream: u8, data: Bytes },
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
