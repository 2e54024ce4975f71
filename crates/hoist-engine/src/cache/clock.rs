//! The time cache records carry.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the epoch, by the system clock.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Where the engine reads the time its records carry (when a step was made, last used, a
/// tag resolved): the system clock in a builder, a [`ManualClock`] in tests of what the
/// times decide (least-recently-used collection, the times in images).
pub trait Clock: Send + Sync {
    /// Seconds since the Unix epoch.
    fn now(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        now()
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock(std::sync::atomic::AtomicU64);

impl ManualClock {
    /// A clock that reads `secs`.
    pub fn at(secs: u64) -> ManualClock {
        ManualClock(secs.into())
    }

    /// Move the clock `secs` forward.
    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}
