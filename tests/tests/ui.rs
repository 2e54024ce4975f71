//! End-to-end: the builder's web UI (issue 17) in a real browser — headless Chromium driven
//! through WebDriver (chromedriver, started here on a loopback port) — against a real
//! `hoist serve` whose UI shares the gRPC port, after real two-stage builds.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};

/// Whether chromium and chromedriver are installed (tests/lab/setup.sh installs them); in CI
/// they must be: a missing browser fails the test instead of skipping it.
fn browser_available() -> bool {
    let ok = ["chromium", "chromedriver"].iter().all(|b| Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()));
    if !ok {
        let msg = "chromium/chromedriver not installed; run tests/lab/setup.sh as root";
        if std::env::var("CI").is_ok() {
            panic!("{msg}");
        }
        eprintln!("SKIP: {msg}");
    }
    ok
}

/// chromedriver on a free loopback port, stopped when dropped.
struct Driver {
    child: std::process::Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        let port = free_port();
        let child = Command::new("chromedriver")
            .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver { child, port }
    }

    async fn browser(&self) -> Client {
        // Two rustls providers are compiled in (ring, ours; aws-lc-rs, hyper-rustls'): pick ours.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]}),
        );
        ClientBuilder::rustls()
            .expect("rustls")
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status line and body of a GET with the session cookie, over plain HTTP/1.1 (a browser
/// does not show status codes to WebDriver).
fn http_get(port: u16, path: &str, session: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: hoist_session={session}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status in {out:?}"));
    (code, out)
}

/// Status and response of a form POST to the sign-in page, with `cookie` (if any).
fn http_post_signin(port: u16, form: &str, cookie: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let cookie = cookie.map(|c| format!("Cookie: {c}\r\n")).unwrap_or_default();
    write!(
        s,
        "POST /ui/signin HTTP/1.1\r\nHost: 127.0.0.1\r\n{cookie}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
        form.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status in {out:?}"));
    (code, out)
}

/// The value of cookie `name` a response sets.
fn set_cookie<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .filter_map(|l| l.strip_prefix("set-cookie: ").or_else(|| l.strip_prefix("Set-Cookie: ")))
        .find_map(|c| c.strip_prefix(name)?.strip_prefix('='))
        .and_then(|c| c.split(';').next())
}

fn dockerfile() -> String {
    let b = busybox();
    format!(
        "FROM {b} AS deps\nRUN echo deps-ready > /deps && sleep 1\nFROM {b}\nCOPY --from=deps /deps /deps\nCOPY app.txt /app.txt\nRUN printf '\\033[32mbuilt\\033[0m %s\\n' \"$(cat /app.txt)\" && sleep 0.3\n"
    )
}

/// The newest build id of a teammate's project.
fn newest_build(t: &Teammate) -> String {
    let out = t.cmd().args(["builds", "ls"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().nth(1).and_then(|l| l.split('\t').next()).expect("a build").to_string()
}

async fn sign_in(c: &Client, port: u16, token: &str) {
    c.goto(&format!("http://127.0.0.1:{port}/ui/builds")).await.unwrap();
    assert!(c.current_url().await.unwrap().path().ends_with("/ui/signin"), "signed out, the builds page sends to sign-in");
    c.find(Locator::Id("token")).await.unwrap().send_keys(token).await.unwrap();
    c.find(Locator::Id("go")).await.unwrap().click().await.unwrap();
    c.wait().for_element(Locator::Id("builds")).await.expect("the builds page after sign-in");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_waterfall_of_a_two_stage_build_in_a_browser_and_only_for_its_project() {
    if !lab_available() || !browser_available() {
        return;
    }
    let server = Server::start();
    let token_a = server.admin(&["project", "create", "alpha", "--token-name", "alice"]);
    let token_b = server.admin(&["project", "create", "beta", "--token-name", "bob"]);
    let alice = Teammate::new(&server, &token_a);
    let dir = context(&[("Dockerfile", &dockerfile()), ("app.txt", "v1")]);
    let ctx = dir.path().to_str().unwrap();
    alice.build_ok(&["-t", "ui-test:v1", ctx]);
    let first = newest_build(&alice);
    // The second build: the first stage from the cache, the second stage's last steps run.
    std::fs::write(dir.path().join("app.txt"), "v2").unwrap();
    alice.build_ok(&["-t", "ui-test:v2", ctx]);
    let id = newest_build(&alice);
    assert_ne!(id, first);

    // The record's steps, as scripts read them.
    let out = alice.cmd().args(["builds", "show", &id, "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout).expect("builds show --json prints JSON");
    let steps = rec["steps"].as_array().expect("steps").clone();
    let step = |prefix: &str| {
        steps.iter().find(|s| s["name"].as_str().unwrap().starts_with(prefix)).unwrap_or_else(|| panic!("no step {prefix}: {rec}")).clone()
    };
    assert_eq!(step("RUN echo deps-ready")["stage"], "deps");
    assert_eq!(step("RUN echo deps-ready")["cached"], true);
    assert_eq!(step("COPY app.txt")["cached"], false);
    let run = step("RUN printf");
    assert_eq!(run["cached"], false);
    assert_eq!(run["log"], "\u{1b}[32mbuilt\u{1b}[0m v2\n", "the step's own log, as it printed it");
    assert!(run["end_ms"].as_u64().unwrap() - run["start_ms"].as_u64().unwrap() >= 300, "it slept 0.3 s: {run}");
    let table = alice.cmd().args(["builds", "show", &id]).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.lines().any(|l| l.contains("\tcached\tdeps\tRUN echo deps-ready")), "{table}");
    assert!(table.lines().any(|l| l.contains("\tran\tstage-1\tRUN printf")), "{table}");
    // Why steps missed: app.txt changed, so its COPY, and the RUN below it because of it;
    // a cached step has no reason.
    let copy = step("COPY app.txt");
    assert_eq!(
        (copy["miss_reason"].as_str(), copy["miss_detail"].as_str()),
        (Some("context"), Some("the files it copies changed")),
        "{copy}"
    );
    assert_eq!(run["miss_reason"], "parent", "{run}");
    assert!(run["miss_detail"].as_str().unwrap().contains("COPY app.txt"), "{run}");
    assert_eq!(step("RUN echo deps-ready")["miss_reason"], "", "a cached step did not miss");
    assert_eq!((copy["line"].as_u64(), run["line"].as_u64()), (Some(5), Some(6)), "their Dockerfile lines");
    assert_eq!(rec["dockerfile"], dockerfile(), "the record keeps the Dockerfile");
    assert!(
        table.lines().any(|l| l.contains("\tCOPY app.txt /app.txt\t5\t") && l.ends_with("\tcontext: the files it copies changed")),
        "{table}"
    );
    // The critical path ends with the last step (it ended last), through the COPY it waited for.
    let critical: Vec<u64> = steps.iter().filter(|s| s["critical"] == true).map(|s| s["id"].as_u64().unwrap()).collect();
    assert!(critical.ends_with(&[copy["id"].as_u64().unwrap(), run["id"].as_u64().unwrap()]), "{critical:?}: {rec}");
    assert!(table.contains("critical path:  "), "{table}");
    // The first build's steps that ran had no earlier build to compare with.
    let out = alice.cmd().args(["builds", "show", &first, "--json"]).output().unwrap();
    let rec1: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reasons: Vec<&str> =
        rec1["steps"].as_array().unwrap().iter().filter_map(|s| s["miss_reason"].as_str()).filter(|r| !r.is_empty()).collect();
    assert!(!reasons.is_empty() && reasons.iter().all(|r| *r == "first"), "{reasons:?}");

    let driver = Driver::start();
    let c = driver.browser().await;
    let port = server.port;

    // The sign-in form's POST must carry the value of its pre-sign-in cookie.
    let form = format!("token={token_a}");
    let (code, body) = http_post_signin(port, &form, None);
    assert_eq!(code, 403, "a POST without the form's token: {body}");
    assert!(set_cookie(&body, "hoist_session").is_none(), "{body}");
    let (code, page) = http_get(port, "/ui/signin", "");
    assert_eq!(code, 200);
    let csrf = set_cookie(&page, "hoist_csrf").unwrap_or_else(|| panic!("a pre-sign-in cookie: {page}")).to_string();
    assert!(page.contains(&format!(r#"name="csrf" value="{csrf}""#)), "{page}");
    let (code, body) = http_post_signin(port, &format!("{form}&csrf={csrf}"), None);
    assert_eq!(code, 403, "the form's token without its cookie: {body}");
    let (code, body) = http_post_signin(port, &format!("{form}&csrf=0{}", &csrf[1..]), Some(&format!("hoist_csrf={csrf}")));
    assert_eq!(code, 403, "another token than the cookie's: {body}");
    let (code, body) = http_post_signin(port, &format!("{form}&csrf={csrf}"), Some(&format!("hoist_csrf={csrf}")));
    assert_eq!(code, 303, "with both: signed in: {body}");
    assert!(set_cookie(&body, "hoist_session").is_some(), "{body}");

    // Sign in with project A's token: its builds, newest first, with the filter.
    sign_in(&c, port, &token_a).await;
    let rows = c.find_all(Locator::Css("#builds tbody tr")).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows[0].text().await.unwrap().contains(&id), "newest first");
    assert!(rows[0].text().await.unwrap().contains("ui-test:v2"));
    c.goto(&format!("http://127.0.0.1:{port}/ui/builds?tag=v1")).await.unwrap();
    let rows = c.find_all(Locator::Css("#builds tbody tr")).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].text().await.unwrap().contains(&first));
    c.goto(&format!("http://127.0.0.1:{port}/ui/builds?status=failed")).await.unwrap();
    assert!(c.find_all(Locator::Css("#builds tbody tr")).await.unwrap().is_empty(), "both builds succeeded");

    // The project page: today's hit rate over both builds, and the slowest steps that ran.
    let ls = alice.cmd().args(["builds", "ls"]).output().unwrap();
    let (mut run, mut cached) = (0u32, 0u32);
    for l in String::from_utf8_lossy(&ls.stdout).lines().skip(1) {
        let cols: Vec<&str> = l.split('\t').collect();
        run += cols[5].parse::<u32>().unwrap();
        cached += cols[6].parse::<u32>().unwrap();
    }
    assert!(cached > 0 && run > 0, "{}", String::from_utf8_lossy(&ls.stdout));
    c.find(Locator::LinkText("project")).await.unwrap().click().await.unwrap();
    let day = c.find(Locator::Css("#days tbody tr")).await.expect("a day").text().await.unwrap();
    let rate = (f64::from(cached) * 100.0 / f64::from(run + cached)).round();
    assert!(day.contains(&format!(" 2 {run} {cached} {rate:.0}%")), "{day:?}: 2 builds, {run} run, {cached} cached");
    let mut last = f64::MAX;
    let mut names = Vec::new();
    for row in c.find_all(Locator::Css("#slowest tbody tr")).await.unwrap() {
        let d: f64 = row.find(Locator::Css(".duration")).await.unwrap().text().await.unwrap().trim_end_matches('s').parse().unwrap();
        assert!(d <= last, "slowest first");
        last = d;
        names.push(row.find(Locator::Css(".name")).await.unwrap().text().await.unwrap());
    }
    assert!(names.iter().any(|n| n.starts_with("RUN echo deps-ready")), "{names:?}");
    // Storage by kind (as hoist cache du has it) and after each of the two builds.
    let du = alice.cmd().args(["cache", "du"]).output().unwrap();
    let du = String::from_utf8_lossy(&du.stdout).to_string();
    let layers = du.lines().find_map(|l| l.strip_prefix("layers:")).expect("layers in cache du").trim().to_string();
    let row = c.find(Locator::Id("storage-layers")).await.expect("storage by kind").text().await.unwrap();
    // (the CLI counts in kB/MB, the page in KiB/MiB)
    let count = layers.split_once(" (").unwrap_or_else(|| panic!("{layers:?}")).0;
    assert!(row.starts_with("layers ") && row.ends_with(&format!(" ({count} layers)")), "{row:?}: as hoist cache du says: {du}");
    let series = c.find_all(Locator::Css("#storage-series tbody tr")).await.unwrap();
    assert_eq!(series.len(), 2, "a sample per build");
    assert!(series[1].text().await.unwrap().contains(&id), "oldest first, this build last");

    // The build: every step on the waterfall with its duration and cached state.
    c.goto(&format!("http://127.0.0.1:{port}/ui/builds/{id}")).await.unwrap();
    let items = c.find_all(Locator::Css("#waterfall li.step")).await.unwrap();
    assert_eq!(items.len(), steps.len(), "a bar per step");
    for (li, s) in items.iter().zip(&steps) {
        let name = li.find(Locator::Css(".name")).await.unwrap().text().await.unwrap();
        assert_eq!(name, s["name"].as_str().unwrap());
        let duration = li.find(Locator::Css(".duration")).await.unwrap().text().await.unwrap();
        let ms = s["end_ms"].as_u64().unwrap() - s["start_ms"].as_u64().unwrap();
        assert_eq!(duration, format!("{:.1}s", ms as f64 / 1000.0), "{name}");
        let state = li.find(Locator::Css(".state")).await.unwrap().text().await.unwrap();
        assert_eq!(state, if s["cached"].as_bool().unwrap() { "cached" } else { "ran" }, "{name}");
        let bar = li.find(Locator::Css(".bar")).await.unwrap();
        assert!(bar.is_displayed().await.unwrap(), "{name}: its bar is drawn");
        let style = bar.attr("style").await.unwrap().unwrap_or_default();
        assert!(style.contains("left:") && style.contains("width:"), "{name}: {style}");
    }
    // The longest step's bar is the widest on the page.
    let widths = futures_widths(&c).await;
    let longest = steps.iter().enumerate().max_by_key(|(_, s)| s["end_ms"].as_u64().unwrap() - s["start_ms"].as_u64().unwrap()).unwrap().0;
    assert_eq!(widths.iter().cloned().fold(f64::MIN, f64::max), widths[longest], "{widths:?}");

    // The miss reason on the page, the critical path marked, the Dockerfile linked to steps.
    let copy_li = c.find(Locator::Id(&format!("step-{}", copy["id"]))).await.unwrap();
    let miss = copy_li.find(Locator::Css(".miss")).await.expect("the COPY's miss reason");
    assert_eq!(miss.attr("data-reason").await.unwrap().as_deref(), Some("context"));
    assert!(miss.text().await.unwrap().contains("the files it copies changed"));
    let deps_li = c.find(Locator::XPath("//li[contains(@class,'step')][.//code[starts-with(.,'RUN echo deps-ready')]]")).await.unwrap();
    assert!(deps_li.find(Locator::Css(".miss")).await.is_err(), "a cached step shows no miss reason");
    let mut marked = Vec::new();
    for li in c.find_all(Locator::Css("#waterfall li.step.critical")).await.unwrap() {
        marked.push(li.attr("data-id").await.unwrap().unwrap().parse::<u64>().unwrap());
    }
    assert_eq!(marked, critical, "the critical path is marked on the waterfall");
    let link = c.find(Locator::Css("#dockerfile li#L5 a.step-link")).await.expect("line 5 links to its step");
    let ms = copy["end_ms"].as_u64().unwrap() - copy["start_ms"].as_u64().unwrap();
    assert_eq!(link.text().await.unwrap(), format!("{:.1}s ran", ms as f64 / 1000.0));
    assert_eq!(c.find(Locator::Css("#dockerfile li#L5 code")).await.unwrap().text().await.unwrap(), "COPY app.txt /app.txt");
    link.click().await.unwrap();
    assert_eq!(c.current_url().await.unwrap().fragment(), Some(format!("step-{}", copy["id"]).as_str()), "the link goes to the step");
    // A FROM line links to its base image's vertex.
    let base = steps
        .iter()
        .find(|s| s["stage"] == "stage-1" && s["name"].as_str().unwrap().starts_with("FROM "))
        .unwrap_or_else(|| panic!("no base image vertex of stage-1: {rec}"));
    assert_eq!(base["line"], 3, "{base}");
    let from = c.find(Locator::Css("#dockerfile li#L3 a.step-link")).await.expect("line 3 links to its base image");
    assert_eq!(from.attr("data-step").await.unwrap(), Some(base["id"].to_string()));
    let context = c.find(Locator::Id("bytes-context")).await.unwrap().text().await.unwrap();
    assert!(context.ends_with(&format!("in {} files (of {} entries)", rec["context_files_sent"], rec["context_entries"])), "{context}");

    // A step's log: collapsed, then opened, ANSI colours rendered, escapes gone.
    let run_li = c.find(Locator::XPath("//li[contains(@class,'step')][.//code[starts-with(.,'RUN printf')]]")).await.unwrap();
    let pre = run_li.find(Locator::Css("details pre")).await.unwrap();
    assert!(!pre.is_displayed().await.unwrap(), "the log starts collapsed");
    run_li.find(Locator::Css("details summary")).await.unwrap().click().await.unwrap();
    assert!(pre.is_displayed().await.unwrap(), "the log opens");
    let log = pre.text().await.unwrap();
    assert!(log.contains("built v2") && !log.contains('\u{1b}') && !log.contains("[32m"), "{log:?}");
    let green = pre.find(Locator::Css("span.ansi-f2")).await.expect("the step's green is rendered as green");
    assert_eq!(green.text().await.unwrap(), "built");

    // Project B's token: A's build is not found, and the page holds nothing of it.
    c.find(Locator::Css("nav form button")).await.unwrap().click().await.unwrap();
    sign_in(&c, port, &token_b).await;
    assert!(c.find_all(Locator::Css("#builds tbody tr")).await.unwrap().is_empty(), "B has no builds");
    c.goto(&format!("http://127.0.0.1:{port}/ui/builds/{id}")).await.unwrap();
    let page = c.source().await.unwrap();
    assert!(page.contains("not found"), "{page}");
    for secret in [id.as_str(), "deps-ready", "RUN printf", "ui-test", "alice"] {
        assert!(!page.contains(secret), "B's page shows {secret:?}: {page}");
    }
    let session_b = c.get_named_cookie("hoist_session").await.expect("B's session cookie");
    assert_eq!(session_b.http_only(), Some(true));
    assert_eq!(format!("{:?}", session_b.same_site()), "Some(Strict)");
    let (code, body) = http_get(port, &format!("/ui/builds/{id}"), session_b.value());
    assert_eq!(code, 404, "{body}");
    assert!(!body.contains("deps-ready") && !body.contains(&id), "{body}");
    let (code, _) = http_get(port, &format!("/ui/builds/{id}"), "not-a-session");
    assert_eq!(code, 303, "no session: to sign-in");

    // `hoist builds open`: a one-time link straight to the build, in a browser without a
    // session; used twice, it is refused.
    c.delete_all_cookies().await.unwrap();
    let out = alice.cmd().env("HOIST_NO_BROWSER", "1").args(["builds", "open", &id]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let link = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(link.starts_with(&format!("http://127.0.0.1:{port}/ui/signin?code=")), "{link}");
    c.goto(&link).await.unwrap();
    assert_eq!(c.find(Locator::Id("build-id")).await.expect("the build's page").text().await.unwrap(), id);
    c.delete_all_cookies().await.unwrap();
    c.goto(&link).await.unwrap();
    assert!(c.find(Locator::Id("error")).await.expect("refused").text().await.unwrap().contains("used already"));
    let out = Teammate::new(&server, &token_b).cmd().args(["builds", "open", &id]).output().unwrap();
    assert!(!out.status.success(), "B gets no link to A's build");
    c.close().await.unwrap();
}

/// The widths (percent) of the waterfall's bars, in order.
async fn futures_widths(c: &Client) -> Vec<f64> {
    let mut out = Vec::new();
    for bar in c.find_all(Locator::Css("#waterfall .bar")).await.unwrap() {
        let style = bar.attr("style").await.unwrap().unwrap_or_default();
        let w = style.split("width:").nth(1).and_then(|w| w.trim_end_matches([';', '%']).parse().ok());
        out.push(w.unwrap_or_else(|| panic!("no width in {style:?}")));
    }
    out
}

/// The embedded builder (the one `hoist build` starts) serves its UI only when
/// HOIST_UI_LISTEN names a loopback address: another address keeps it from starting at all.
/// Its pages open with `hoist builds open` (it has no tokens to sign in with).
#[test]
fn the_embedded_builders_ui_is_on_loopback_only() {
    if !lab_available() {
        return;
    }
    let dir = context(&[("Dockerfile", &format!("FROM {}\nRUN echo embedded-ui\n", busybox()))]);
    let ctx = dir.path().to_str().unwrap();

    let h = Hoist::new();
    let out = h.cmd().env("HOIST_UI_LISTEN", "0.0.0.0:0").args(["build", "--progress=plain", ctx]).output().unwrap();
    assert!(!out.status.success(), "an embedded builder with its UI on every address must not start");
    let log = std::fs::read_to_string(h.root.path().join("hoistd.log")).unwrap_or_default();
    assert!(log.contains("plain TCP is only allowed on loopback"), "the builder's log says why: {log}");
    drop(h);

    let h = Hoist::new();
    let port = free_port();
    let out = h.cmd().env("HOIST_UI_LISTEN", format!("127.0.0.1:{port}")).args(["build", "--progress=plain", ctx]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ls = h.cmd().args(["builds", "ls"]).output().unwrap();
    let id = String::from_utf8_lossy(&ls.stdout).lines().nth(1).and_then(|l| l.split('\t').next()).expect("a build").to_string();
    let out = h.cmd().env("HOIST_NO_BROWSER", "1").args(["builds", "open", &id]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let link = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let path = link.strip_prefix(&format!("http://127.0.0.1:{port}")).unwrap_or_else(|| panic!("a link to the loopback UI: {link}"));
    let (code, head) = http_get(port, path, "");
    assert_eq!(code, 303, "{head}");
    let session = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: hoist_session=").or_else(|| l.strip_prefix("Set-Cookie: hoist_session=")))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("a session cookie: {head}"));
    let (code, page) = http_get(port, &format!("/ui/builds/{id}"), session);
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("RUN echo embedded-ui"), "{page}");
    // Without a session: to sign-in.
    assert_eq!(http_get(port, &format!("/ui/builds/{id}"), "").0, 303);
}

/// A running build's page follows it without a reload (server-sent events on the same
/// listener) and shows its record once it is over.
#[tokio::test(flavor = "multi_thread")]
async fn a_running_build_updates_in_the_browser_until_it_finishes() {
    if !lab_available() || !browser_available() {
        return;
    }
    let server = Server::start();
    let token = server.admin(&["project", "create", "live", "--token-name", "carol"]);
    let carol = Teammate::new(&server, &token);
    let dir = context(&[("Dockerfile", &format!("FROM {}\nRUN echo live-start && sleep 6 && echo live-end\n", busybox()))]);
    let mut build = carol
        .cmd()
        .args(["build", "--progress=plain", dir.path().to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let driver = Driver::start();
    let c = driver.browser().await;
    let port = server.port;
    sign_in(&c, port, &token).await;
    // The running build is listed, and its page says it runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    let link = loop {
        c.goto(&format!("http://127.0.0.1:{port}/ui/builds?status=running")).await.unwrap();
        if let Ok(a) = c.find(Locator::Css("#builds tbody tr.running a")).await {
            break a.attr("href").await.unwrap().expect("a link");
        }
        assert!(Instant::now() < deadline, "the build never showed as running");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    c.goto(&format!("http://127.0.0.1:{port}{link}")).await.unwrap();
    assert_eq!(c.find(Locator::Id("status")).await.unwrap().text().await.unwrap(), "running");
    // Mark this page: the updates below come without a reload.
    c.execute("window.hoistMarker = 1;", vec![]).await.unwrap();
    let step = Locator::XPath("//li[contains(@class,'step')][.//code[starts-with(.,'RUN echo live-start')]]");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(li) = c.find(step).await {
            let class = li.attr("class").await.unwrap().unwrap_or_default();
            let log = match li.find(Locator::Css("details pre")).await {
                Ok(pre) => pre.prop("textContent").await.unwrap().unwrap_or_default(),
                Err(_) => String::new(),
            };
            if class.contains("running") && log.contains("live-start") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the running step and its first output never showed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let marker = c.execute("return window.hoistMarker === 1;", vec![]).await.unwrap();
    assert_eq!(marker, serde_json::json!(true), "the page was updated in place, not reloaded");
    assert_eq!(c.find(Locator::Id("status")).await.unwrap().text().await.unwrap(), "running", "not over yet");

    // It finishes: the page shows the finished record.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(s) = c.find(Locator::Id("status")).await {
            if s.text().await.unwrap_or_default() == "ok" {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the page never showed the finished build");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(build.wait().unwrap().success());
    let li = c.find(step).await.unwrap();
    assert_eq!(li.find(Locator::Css(".state")).await.unwrap().text().await.unwrap(), "ran");
    let duration = li.find(Locator::Css(".duration")).await.unwrap().text().await.unwrap();
    let secs: f64 = duration.trim_end_matches('s').parse().unwrap();
    assert!(secs >= 6.0, "it slept 6 s: {duration}");
    let log = li.find(Locator::Css("details pre")).await.unwrap().prop("textContent").await.unwrap().unwrap_or_default();
    assert!(log.contains("live-start") && log.contains("live-end"), "{log:?}");
    c.close().await.unwrap();
}
