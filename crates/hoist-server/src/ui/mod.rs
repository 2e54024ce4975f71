//! The builder's web UI (build insights): server-rendered pages of a project's builds and of
//! one build's steps on a time axis, served on the gRPC listener (HTTP/1.1 and HTTP/2) or on
//! `hoist serve --ui-listen`. A project token signs in (or a one-time code from
//! `hoist builds open`) and gets a session cookie; a session sees only its project.

mod pages;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;

use hoist_proto::v1;

use crate::auth::Caller;
use crate::service::BuilderService;

/// How long a sign-in code of `hoist builds open` is valid.
pub const CODE_TTL: Duration = Duration::from_secs(300);
/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The session cookie.
const COOKIE: &str = "hoist_session";
/// The pre-sign-in cookie: the sign-in form carries its value, and a POST without it (a form
/// another site made the browser send) is refused.
const CSRF_COOKIE: &str = "hoist_csrf";

/// Sign-in codes and sessions of the UI, kept in memory (a restart signs everyone out).
#[derive(Default)]
pub struct Access {
    inner: Mutex<Grants>,
    base: std::sync::OnceLock<String>,
    secure: std::sync::OnceLock<bool>,
    /// Builds running now, by (project, id).
    live: Mutex<HashMap<(String, String), Live>>,
}

/// What a running build's record looks like now: its steps (each with whether it still
/// runs) and its log so far.
pub(crate) type Snapshot = Arc<dyn Fn() -> (Vec<(v1::BuildStep, bool)>, String) + Send + Sync>;

/// A running build: the facts known at its start, and how to see the rest.
struct Live {
    record: v1::BuildRecord,
    snapshot: Snapshot,
}

/// Shows a build as running until dropped.
pub(crate) struct LiveGuard {
    access: Arc<Access>,
    key: (String, String),
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.access.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
    }
}

#[derive(Default)]
struct Grants {
    codes: HashMap<String, Grant>,
    sessions: HashMap<String, Grant>,
}

/// Who a code or session is for, until when; a code also names the build it opens.
#[derive(Clone)]
struct Grant {
    caller: Caller,
    build_id: String,
    expires: Instant,
}

impl Access {
    /// A one-time sign-in code for `caller` (to open `build_id`, or the builds page when
    /// empty), valid for [`CODE_TTL`] from `now`.
    pub(crate) fn new_code(&self, caller: &Caller, build_id: &str, now: Instant) -> String {
        let code = hoist_oci::random::hex(24);
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.codes.retain(|_, c| c.expires > now);
        g.codes.insert(code.clone(), Grant { caller: caller.clone(), build_id: build_id.into(), expires: now + CODE_TTL });
        code
    }

    /// Exchange a code (once) for a new session: its id and the build the code opens.
    fn redeem(&self, code: &str, now: Instant) -> Option<(String, String)> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let grant = g.codes.remove(code).filter(|c| c.expires > now)?;
        let build = grant.build_id.clone();
        drop(g);
        Some((self.new_session(grant.caller, now), build))
    }

    fn new_session(&self, caller: Caller, now: Instant) -> String {
        let id = hoist_oci::random::hex(32);
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.sessions.retain(|_, s| s.expires > now);
        g.sessions.insert(id.clone(), Grant { caller, build_id: String::new(), expires: now + SESSION_TTL });
        id
    }

    /// The caller of an unexpired session.
    fn session(&self, id: &str, now: Instant) -> Option<Caller> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.sessions.get(id).filter(|s| s.expires > now).map(|s| s.caller.clone())
    }

    fn end(&self, id: &str) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).sessions.remove(id);
    }

    /// Show `record` (its id, start, who, tags) of `project` as running, its steps and log
    /// from `snapshot`, until the guard is dropped.
    pub(crate) fn live(self: &Arc<Self>, project: &str, record: &v1::BuildRecord, snapshot: Snapshot) -> LiveGuard {
        let key = (project.to_string(), record.id.clone());
        let live = Live { record: v1::BuildRecord { status: "running".into(), ..record.clone() }, snapshot };
        self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), live);
        LiveGuard { access: self.clone(), key }
    }

    /// A running build of `project` as it is now, and which of its steps still run.
    fn running(&self, project: &str, id: &str) -> Option<(v1::BuildRecord, Vec<bool>)> {
        let (mut rec, snapshot) = {
            let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            let l = live.get(&(project.to_string(), id.to_string()))?;
            (l.record.clone(), l.snapshot.clone())
        };
        let (steps, log) = snapshot();
        let running = steps.iter().map(|(_, r)| *r).collect();
        rec.steps = steps.into_iter().map(|(s, _)| s).collect();
        crate::records::split_log(&log, &mut rec.steps);
        rec.log = log;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        rec.seconds = (now - rec.started as f64).max(0.0);
        Some((rec, running))
    }

    /// The running builds of `project`, newest first.
    fn running_of(&self, project: &str) -> Vec<v1::BuildRecord> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = live.iter().filter(|((p, _), _)| p == project).map(|(_, l)| l.record.clone()).collect();
        out.sort_by(|a, b| b.id.cmp(&a.id));
        out
    }

    /// `http://host:port` of the UI's own listener, if it has one.
    pub(crate) fn base(&self) -> Option<String> {
        self.base.get().cloned()
    }

    /// The UI listens on `base` (`--ui-listen`), not on the gRPC listener.
    pub(crate) fn set_base(&self, base: String) {
        let _ = self.base.set(base);
    }

    /// Cookies are sent only over TLS (the listener has it).
    pub(crate) fn set_secure(&self, secure: bool) {
        let _ = self.secure.set(secure);
    }
}

/// The UI's routes, all under `/ui`.
pub fn router(service: BuilderService) -> axum::Router {
    axum::Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/builds") }))
        .route("/ui/signin", get(signin_page).post(signin))
        .route("/ui/signout", axum::routing::post(signout))
        .route("/ui/builds", get(builds_page))
        .route("/ui/project", get(project_page))
        .route("/ui/builds/{id}", get(build_page))
        .route("/ui/builds/{id}/events", get(build_events))
        .with_state(service)
}

/// The signed-in caller, unless the session is missing, expired, or its token revoked.
fn signed_in(svc: &BuilderService, headers: &HeaderMap) -> Option<Caller> {
    let id = session_cookie(headers)?;
    let caller = svc.ui.session(&id, Instant::now())?;
    if let Some(t) = &caller.token_id {
        if svc.auth().revoked_ids().contains(t) {
            svc.ui.end(&id);
            return None;
        }
    }
    Some(caller)
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    cookie(headers, COOKIE)
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(name).and_then(|v| v.strip_prefix('=')).map(str::to_string))
}

/// Whether a sign-in POST carries the value of its pre-sign-in cookie.
fn csrf_ok(cookie: Option<&str>, form: Option<&str>) -> bool {
    match (cookie, form) {
        (Some(c), Some(f)) if c.len() >= 32 => {
            // (the same time whatever the first difference)
            c.len() == f.len() && c.bytes().zip(f.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        }
        _ => false,
    }
}

/// The sign-in page with `status` and `error`: a new pre-sign-in cookie, and its value in
/// the form.
fn signin_form(svc: &BuilderService, status: StatusCode, error: Option<&str>) -> Response {
    let token = hoist_oci::random::hex(16);
    let secure = if svc.ui.secure.get().copied().unwrap_or(false) { "; Secure" } else { "" };
    let cookie = format!("{CSRF_COOKIE}={token}; Path=/ui/signin; HttpOnly; SameSite=Strict; Max-Age=3600{secure}");
    (status, [(header::SET_COOKIE, cookie)], Html(pages::signin(error, &token))).into_response()
}

/// A response that sets the session cookie and goes to `to`.
fn with_session(svc: &BuilderService, id: &str, to: &str) -> Response {
    let secure = if svc.ui.secure.get().copied().unwrap_or(false) { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{secure}", SESSION_TTL.as_secs());
    ([(header::SET_COOKIE, cookie)], Redirect::to(to)).into_response()
}

#[derive(serde::Deserialize)]
struct CodeQuery {
    code: Option<String>,
}

async fn signin_page(State(svc): State<BuilderService>, Query(q): Query<CodeQuery>) -> Response {
    let Some(code) = q.code else { return signin_form(&svc, StatusCode::OK, None) };
    match svc.ui.redeem(&code, Instant::now()) {
        Some((session, build)) if build.is_empty() => with_session(&svc, &session, "/ui/builds"),
        Some((session, build)) => with_session(&svc, &session, &format!("/ui/builds/{build}")),
        None => signin_form(
            &svc,
            StatusCode::UNAUTHORIZED,
            Some("this sign-in link was used already or has expired: run `hoist builds open` again"),
        ),
    }
}

#[derive(serde::Deserialize)]
struct TokenForm {
    token: String,
    csrf: Option<String>,
}

async fn signin(State(svc): State<BuilderService>, headers: HeaderMap, Form(f): Form<TokenForm>) -> Response {
    if !csrf_ok(cookie(&headers, CSRF_COOKIE).as_deref(), f.csrf.as_deref()) {
        return signin_form(&svc, StatusCode::FORBIDDEN, Some("this sign-in form has expired or came from elsewhere: sign in again"));
    }
    // The UI never trusts a request without a token, even on the embedded builder.
    match svc.auth().authenticate(Some(f.token.trim()), None, false) {
        Ok(caller) => {
            let id = svc.ui.new_session(caller, Instant::now());
            with_session(&svc, &id, "/ui/builds")
        }
        Err(e) => signin_form(&svc, StatusCode::UNAUTHORIZED, Some(&e.to_string())),
    }
}

async fn signout(State(svc): State<BuilderService>, headers: HeaderMap) -> Response {
    if let Some(id) = session_cookie(&headers) {
        svc.ui.end(&id);
    }
    ([(header::SET_COOKIE, format!("{COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"))], Redirect::to("/ui/signin"))
        .into_response()
}

async fn builds_page(State(svc): State<BuilderService>, headers: HeaderMap, Query(f): Query<pages::Filter>) -> Response {
    let Some(caller) = signed_in(&svc, &headers) else { return Redirect::to("/ui/signin").into_response() };
    match svc.builds_of(&caller.project, 200) {
        Ok(builds) => {
            let all: Vec<_> = svc.ui.running_of(&caller.project).into_iter().chain(builds).collect();
            Html(pages::builds(&caller, &all, &f)).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.message().to_string()).into_response(),
    }
}

/// The builds the project page sums up.
const PROJECT_BUILDS: usize = 200;

async fn project_page(State(svc): State<BuilderService>, headers: HeaderMap) -> Response {
    let Some(caller) = signed_in(&svc, &headers) else { return Redirect::to("/ui/signin").into_response() };
    let usage = svc.usage_reply(&caller.project, 0).await;
    if let Err(e) = &usage {
        tracing::warn!("the storage of project {}: {}", caller.project, e.message());
    }
    match svc.builds_of(&caller.project, PROJECT_BUILDS) {
        Ok(builds) => Html(pages::project(&caller, &builds, usage.as_ref().ok())).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.message().to_string()).into_response(),
    }
}

async fn build_page(State(svc): State<BuilderService>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let Some(caller) = signed_in(&svc, &headers) else { return Redirect::to("/ui/signin").into_response() };
    if let Some((b, running)) = svc.ui.running(&caller.project, &id) {
        return Html(pages::build(&caller, &b, &running)).into_response();
    }
    match svc.build_of(&caller.project, &id) {
        Ok(Some(b)) => Html(pages::build(&caller, &b, &[])).into_response(),
        // Another project's build is not found, and the page says nothing of it.
        Ok(None) => (StatusCode::NOT_FOUND, Html(pages::not_found(&caller))).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.message().to_string()).into_response(),
    }
}

/// A running build's waterfall, every half second while it runs, then `done`.
async fn build_events(State(svc): State<BuilderService>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let Some(caller) = signed_in(&svc, &headers) else { return StatusCode::UNAUTHORIZED.into_response() };
    if svc.ui.running(&caller.project, &id).is_none() && !matches!(svc.build_of(&caller.project, &id), Ok(Some(_))) {
        return (StatusCode::NOT_FOUND, Html(pages::not_found(&caller))).into_response();
    }
    let updates = futures::stream::unfold(false, move |ended| {
        let (svc, project, id) = (svc.clone(), caller.project.clone(), id.clone());
        async move {
            if ended {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let ev = match svc.ui.running(&project, &id) {
                Some((b, running)) => (SseEvent::default().data(pages::waterfall(&b.steps, &running)), false),
                // (an event without data is never dispatched)
                None => (SseEvent::default().event("done").data("over"), true),
            };
            Some((Ok::<_, std::convert::Infallible>(ev.0), ev.1))
        }
    });
    Sse::new(updates).keep_alive(KeepAlive::default()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller() -> Caller {
        Caller { project: "a".into(), who: "ci".into(), token_id: Some("t1".into()) }
    }

    #[test]
    fn a_code_is_redeemed_once_and_not_after_it_expired() {
        let a = Access::default();
        let t0 = Instant::now();
        let code = a.new_code(&caller(), "b1", t0);
        let (session, build) = a.redeem(&code, t0 + Duration::from_secs(10)).expect("a fresh code");
        assert_eq!(build, "b1");
        assert_eq!(a.session(&session, t0).map(|c| c.project), Some("a".into()));
        assert!(a.redeem(&code, t0 + Duration::from_secs(11)).is_none(), "a code works once");
        let late = a.new_code(&caller(), "", t0);
        assert!(a.redeem(&late, t0 + CODE_TTL + Duration::from_secs(1)).is_none(), "an expired code");
    }

    #[test]
    fn sessions_expire_and_end() {
        let a = Access::default();
        let t0 = Instant::now();
        let s = a.new_session(caller(), t0);
        assert!(a.session(&s, t0 + SESSION_TTL - Duration::from_secs(1)).is_some());
        assert!(a.session(&s, t0 + SESSION_TTL + Duration::from_secs(1)).is_none());
        assert!(a.session("not-a-session", t0).is_none());
        a.end(&s);
        assert!(a.session(&s, t0).is_none());
    }

    #[test]
    fn a_running_build_is_seen_by_its_project_until_it_ends() {
        let a = Arc::new(Access::default());
        let rec = v1::BuildRecord { id: "b1".into(), who: "ci".into(), ..Default::default() };
        let step = v1::BuildStep { id: 1, name: "RUN x".into(), log_lines: 1, ..Default::default() };
        let guard = a.live("p", &rec, Arc::new(move || (vec![(step.clone(), true)], "#1 [s 1/1] RUN x\n#1 out\n".into())));
        let (b, running) = a.running("p", "b1").expect("running");
        assert_eq!((b.status.as_str(), running), ("running", vec![true]));
        assert_eq!(b.steps[0].log, "out\n", "the step's log so far");
        assert!(a.running("other", "b1").is_none(), "another project sees nothing of it");
        assert_eq!(a.running_of("p").len(), 1);
        assert!(a.running_of("other").is_empty());
        drop(guard);
        assert!(a.running("p", "b1").is_none() && a.running_of("p").is_empty());
    }

    #[test]
    fn a_sign_in_post_must_carry_its_cookies_value() {
        let t = hoist_oci::random::hex(16);
        assert!(csrf_ok(Some(&t), Some(&t)));
        assert!(!csrf_ok(Some(&t), None), "no token in the form");
        assert!(!csrf_ok(None, Some(&t)), "no cookie");
        assert!(!csrf_ok(Some(&t), Some(&hoist_oci::random::hex(16))), "another token");
        assert!(!csrf_ok(Some(&t), Some(&t[..31])));
        assert!(!csrf_ok(Some(""), Some("")), "empty is no token");
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, format!("hoist_session=s; hoist_csrf={t}").parse().unwrap());
        assert_eq!(cookie(&h, CSRF_COOKIE), Some(t));
    }

    #[test]
    fn the_session_cookie_among_others() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "x=1; hoist_session=abc; hoist_sessionx=no".parse().unwrap());
        assert_eq!(session_cookie(&h).as_deref(), Some("abc"));
        assert_eq!(session_cookie(&HeaderMap::new()), None);
    }
}
