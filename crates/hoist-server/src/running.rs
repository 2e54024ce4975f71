//! The builds running on the builder: each project runs at most its limit at once (later
//! builds wait for a slot, and the client is told), and a revoked token's builds are
//! cancelled within a second.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

struct Entry {
    project: String,
    token_id: Option<String>,
    cancel: CancellationToken,
    revoked: Arc<AtomicBool>,
}

/// Running builds by id.
#[derive(Default)]
pub struct Running {
    builds: Mutex<HashMap<String, Entry>>,
    freed: tokio::sync::Notify,
}

/// A build's slot; dropping it frees the slot for the next waiting build of the project.
pub struct Slot {
    running: Arc<Running>,
    id: String,
    revoked: Arc<AtomicBool>,
}

impl Slot {
    /// Whether the build's token was revoked while it ran (its cancellation came from that).
    pub fn revoked(&self) -> bool {
        self.revoked.load(Ordering::Relaxed)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.running.builds.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
        self.running.freed.notify_waiters();
    }
}

impl Running {
    /// Builds of `project` running now.
    pub fn count(&self, project: &str) -> usize {
        self.builds.lock().unwrap_or_else(|e| e.into_inner()).values().filter(|e| e.project == project).count()
    }

    /// Take a slot for build `id` of `project` once fewer than `limit()` of its builds run
    /// (`limit` is asked again each time a slot frees, so a changed limit applies).
    /// `on_wait(running, limit)` is called once if the build has to wait. Returns `None`
    /// when `cancel` fires first.
    pub async fn acquire(
        self: &Arc<Self>,
        id: &str,
        project: &str,
        token_id: Option<String>,
        cancel: &CancellationToken,
        limit: impl Fn() -> u32,
        mut on_wait: impl FnMut(u32, u32),
    ) -> Option<Slot> {
        let mut told = false;
        loop {
            // Register for the wake-up before looking, so a slot freed in between is seen.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut builds = self.builds.lock().unwrap_or_else(|e| e.into_inner());
                let running = builds.values().filter(|e| e.project == project).count() as u32;
                let max = limit().max(1);
                if running < max {
                    let revoked = Arc::new(AtomicBool::new(false));
                    builds.insert(
                        id.to_string(),
                        Entry { project: project.to_string(), token_id, cancel: cancel.clone(), revoked: revoked.clone() },
                    );
                    return Some(Slot { running: self.clone(), id: id.to_string(), revoked });
                }
                if !told {
                    on_wait(running, max);
                    told = true;
                }
            }
            tokio::select! {
                _ = &mut freed => {}
                _ = cancel.cancelled() => return None,
                // A build that registered nothing (cancelled before its slot) frees nothing.
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    }

    /// Cancel the builds of the tokens in `revoked`; returns how many.
    pub fn revoke(&self, revoked: &HashSet<String>) -> usize {
        let builds = self.builds.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for e in builds.values() {
            if e.token_id.as_ref().is_some_and(|t| revoked.contains(t)) && !e.cancel.is_cancelled() {
                e.revoked.store(true, Ordering::Relaxed);
                e.cancel.cancel();
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_project_over_its_limit_waits_and_other_projects_do_not() {
        let running = Arc::new(Running::default());
        let cancel = CancellationToken::new();
        let a1 = running.acquire("a1", "alpha", None, &cancel, || 1, |_, _| panic!("must not wait")).await.unwrap();
        let b1 = running.acquire("b1", "beta", None, &cancel, || 1, |_, _| panic!("another project's slot")).await.unwrap();
        let waited = Arc::new(Mutex::new(None));
        let w = waited.clone();
        let r = running.clone();
        let c = cancel.clone();
        let second =
            tokio::spawn(async move { r.acquire("a2", "alpha", None, &c, || 1, move |n, max| *w.lock().unwrap() = Some((n, max))).await });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!second.is_finished(), "the second build of alpha waits");
        assert_eq!(*waited.lock().unwrap(), Some((1, 1)), "and is told why");
        assert_eq!(running.count("alpha"), 1);
        drop(a1);
        let a2 = tokio::time::timeout(std::time::Duration::from_secs(2), second).await.unwrap().unwrap().unwrap();
        assert_eq!(running.count("alpha"), 1);
        drop((a2, b1));
        assert_eq!(running.count("alpha") + running.count("beta"), 0);
    }

    #[tokio::test]
    async fn a_waiting_build_can_be_cancelled() {
        let running = Arc::new(Running::default());
        let cancel = CancellationToken::new();
        let _held = running.acquire("a1", "alpha", None, &cancel, || 1, |_, _| {}).await.unwrap();
        let other = CancellationToken::new();
        other.cancel();
        assert!(running.acquire("a2", "alpha", None, &other, || 1, |_, _| {}).await.is_none());
        assert_eq!(running.count("alpha"), 1);
    }

    #[tokio::test]
    async fn revoking_a_token_cancels_its_builds_only() {
        let running = Arc::new(Running::default());
        let (c1, c2) = (CancellationToken::new(), CancellationToken::new());
        let s1 = running.acquire("x", "alpha", Some("tok1".into()), &c1, || 4, |_, _| {}).await.unwrap();
        let s2 = running.acquire("y", "alpha", Some("tok2".into()), &c2, || 4, |_, _| {}).await.unwrap();
        assert_eq!(running.revoke(&["tok1".to_string()].into()), 1);
        assert!(c1.is_cancelled() && s1.revoked());
        assert!(!c2.is_cancelled() && !s2.revoked());
        assert_eq!(running.revoke(&["tok1".to_string()].into()), 0, "once");
    }
}
