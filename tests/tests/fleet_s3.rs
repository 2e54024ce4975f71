//! End-to-end: the fleet of fleet.rs (several `hoist serve` nodes sharing one cache store,
//! issue 13) on a real S3 endpoint: moto's server on loopback, which tests/lab/setup.sh
//! installs and starts. Each test has a bucket of its own, so reruns against a moto that
//! kept running see nothing of earlier runs; the objects are checked through S3 itself.

mod common;

use std::process::Command;

use common::*;

/// The S3 server the lab started (tests/lab/setup.sh).
fn s3_addr() -> String {
    std::env::var("HOIST_TEST_S3").unwrap_or_else(|_| "127.0.0.1:9000".to_string())
}

/// Whether the lab's S3 server answers. In CI it must: a missing one fails the test instead
/// of skipping it (as [`lab_available`] does for the rest of the lab).
fn s3_available() -> bool {
    let ok = Command::new("curl")
        .args(["-fsS", "-m", "5", &format!("http://{}/", s3_addr())])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ListAllMyBucketsResult"))
        .unwrap_or(false);
    if !ok {
        let msg = format!("no S3 server (moto) at http://{}; run tests/lab/setup.sh as root", s3_addr());
        if std::env::var("CI").is_ok() {
            panic!("{msg}");
        }
        eprintln!("SKIP: {msg}");
    }
    ok
}

/// Point the AWS settings hoist reads (crates/hoist-engine/src/shared/url.rs) at the lab's
/// S3 server. The servers are child processes: they inherit this process's environment.
/// Every test sets the same values, so tests sharing a process agree.
fn use_lab_s3() {
    std::env::set_var("AWS_ENDPOINT_URL", format!("http://{}", s3_addr()));
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    for var in ["AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "HOIST_CACHE_STORE"] {
        std::env::remove_var(var);
    }
}

/// An object as a bucket listing shows it.
#[derive(Debug)]
struct Object {
    key: String,
    size: u64,
    etag: String,
}

/// The text between `<tag>` and `</tag>` of each element `tag` in `xml`.
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(at) = rest.find(&open) {
        let from = &rest[at + open.len()..];
        let end = from.find(&close).unwrap_or_else(|| panic!("unclosed <{tag}> in {xml}"));
        out.push(&from[..end]);
        rest = &from[end + close.len()..];
    }
    out
}

/// A bucket of one test's own on the lab's S3 server; emptied and removed when dropped,
/// unless the test failed (then it is left to look at).
struct Bucket {
    name: String,
}

impl Bucket {
    fn create() -> Bucket {
        let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let bucket = Bucket { name: unique(&format!("hoist-fleet-{since_epoch}")) };
        let (code, body) = bucket.request("PUT", "", &[]);
        assert_eq!(code, 200, "creating bucket {}: {body}", bucket.name);
        bucket
    }

    /// A signed request (curl's SigV4) for `path` in the bucket (`""`: the bucket itself);
    /// returns the HTTP status and the body.
    fn request(&self, method: &str, path: &str, extra: &[&str]) -> (u16, String) {
        let out = Command::new("curl")
            .args(["-sS", "-m", "60", "-X", method, "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", "testing:testing"])
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-w", "\n%{http_code}"])
            .args(extra)
            .arg(format!("http://{}/{}{path}", s3_addr(), self.name))
            .output()
            .expect("running curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "curl {method} {path}: {}", String::from_utf8_lossy(&out.stderr));
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.trim().parse().unwrap(), body.to_string())
    }

    /// The store URL of `prefix` in this bucket.
    fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.name)
    }

    /// Every object whose key starts with `prefix` (ListObjectsV2; a test's few objects fit
    /// in one page). `prefix` is plain: letters, digits, `-` and `/`.
    fn list(&self, prefix: &str) -> Vec<Object> {
        let (code, xml) = self.request("GET", &format!("?list-type=2&prefix={prefix}"), &[]);
        assert_eq!(code, 200, "listing {}: {xml}", self.name);
        assert_eq!(elements(&xml, "IsTruncated"), ["false"], "one page: {xml}");
        let objects = elements(&xml, "Contents").into_iter().map(|contents| {
            let one = |tag: &str| elements(contents, tag).first().unwrap_or_else(|| panic!("no <{tag}> in {contents}")).to_string();
            Object {
                key: one("Key"),
                size: one("Size").parse().unwrap(),
                etag: one("ETag").replace("&#34;", "").replace("&quot;", "").replace('"', ""),
            }
        });
        objects.collect()
    }
}

impl Drop for Bucket {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("bucket {} is left on http://{} to look at", self.name, s3_addr());
            return;
        }
        for o in self.list("") {
            self.request("DELETE", &format!("/{}", o.key), &[]);
        }
        self.request("DELETE", "", &[]);
    }
}

/// `hoist <args> --cache-store <url>`: an admin command on the fleet's shared store, from
/// no node in particular; its stdout.
fn fleet_admin(url: &str, args: &[&str]) -> String {
    let out = Command::new(hoist_bin()).args(args).args(["--cache-store", url]).env_remove("HOIST_ROOT").output().unwrap();
    assert!(out.status.success(), "hoist {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Project "web" in the store at `url` (a fleet's projects and tokens live there), then two
/// nodes on it with a teammate on each: alice on A, bob on B. The tokens are made first: a
/// running node learns of a new one on its next re-read of the store, within seconds.
fn fleet(url: &str) -> (Server, Server, Teammate, Teammate) {
    let alice = fleet_admin(url, &["project", "create", "web", "--token-name", "alice"]);
    let bob = fleet_admin(url, &["token", "create", "web", "--name", "bob"]);
    let a = Server::start_with(&["--cache-store", url]);
    let b = Server::start_with(&["--cache-store", url]);
    let (alice, bob) = (Teammate::new(&a, &alice), Teammate::new(&b, &bob));
    (a, b, alice, bob)
}

/// What the store's S3 server did not like, as a node logged it.
fn store_warnings(node: &Server) -> Vec<String> {
    node.log().lines().filter(|l| l.contains("WARN") && l.contains("shared cache")).map(str::to_string).collect()
}

#[test]
fn a_teammate_routed_to_another_node_gets_every_step_from_s3_and_the_same_image() {
    if !lab_available() || !s3_available() {
        return;
    }
    use_lab_s3();
    let bucket = Bucket::create();
    let (a, b, alice, bob) = fleet(&bucket.url("team/cache"));
    let dockerfile = format!("FROM {}\nRUN echo one > /one\nCOPY app.txt /app/\nRUN cat /app/app.txt /one > /both\n", busybox());
    let files = [("Dockerfile", dockerfile.as_str()), ("app.txt", "hello s3 fleet\n")];
    let (a_dir, b_dir) = (context(&files), context(&files));
    let tag = format!("{}/{}:1", registry(), unique("fleet-s3"));
    let (a_iid, b_iid) = (a_dir.path().join("iid"), b_dir.path().join("iid"));

    // A pushed result is in the shared store when the build reports done.
    let first = alice.build_ok(&["-t", &tag, "--push", "--iidfile", a_iid.to_str().unwrap(), a_dir.path().to_str().unwrap()]);
    assert_eq!(count_before(&first, "steps run"), 3, "{first}");
    let objects = bucket.list("team/cache/");
    let keys: Vec<&str> = objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys.iter().filter(|k| k.starts_with("team/cache/ac/web/")).count(), 3, "one entry per step: {keys:?}");
    assert!(keys.iter().filter(|k| k.starts_with("team/cache/cas/sha256/")).count() >= 2, "the RUN and COPY layers' blobs: {keys:?}");
    let known = |k: &&str| k.starts_with("team/cache/ac/web/") || k.starts_with("team/cache/cas/sha256/") || *k == "team/cache/auth.json";
    assert!(keys.iter().all(known), "{keys:?}");

    let second = bob.build_ok(&["--iidfile", b_iid.to_str().unwrap(), b_dir.path().to_str().unwrap()]);
    assert_eq!(count_before(&second, "steps run"), 0, "{second}");
    assert_eq!(count_before(&second, "cached"), 3, "{second}");
    assert_eq!(count_before(&second, "containers"), 0, "node B ran no container: {second}");
    assert_eq!(std::fs::read_to_string(&b_iid).unwrap(), std::fs::read_to_string(&a_iid).unwrap(), "the same image id on both nodes");
    // B's result is usable: loaded into the engine, it runs with A's files.
    let loaded = bob.build_ok(&["-t", &unique("fleet-s3-load"), "--load", b_dir.path().to_str().unwrap()]);
    assert_eq!(count_before(&loaded, "steps run"), 0, "{loaded}");
    let image = std::fs::read_to_string(&b_iid).unwrap();
    assert_eq!(docker_ok(&["run", "--rm", image.trim(), "cat", "/both"]), "hello s3 fleet\none\n");
    // Node B only read: the store holds the entries A wrote, and neither node had trouble
    // with it (the base image's blob goes up behind A's build, so it may come later).
    let after: Vec<String> = bucket.list("team/cache/").into_iter().map(|o| o.key).collect();
    let entries = |keys: &[&str]| keys.iter().filter(|k| !k.starts_with("team/cache/cas/")).map(|k| k.to_string()).collect::<Vec<_>>();
    assert_eq!(entries(&after.iter().map(String::as_str).collect::<Vec<_>>()), entries(&keys), "B wrote no entry");
    assert!(keys.iter().all(|k| after.iter().any(|a| a == k)), "every blob stayed: {after:?}");
    for node in [&a, &b] {
        assert!(store_warnings(node).is_empty(), "{}", node.log());
    }
}

#[test]
fn a_layer_over_32_mib_goes_up_in_parts_and_another_node_gets_it_from_s3() {
    if !lab_available() || !s3_available() {
        return;
    }
    use_lab_s3();
    let bucket = Bucket::create();
    let (a, b, alice, bob) = fleet(&bucket.url("big"));
    // 40 MB of random bytes: its layer stays over 32 MiB compressed.
    let dockerfile = format!("FROM {}\nRUN head -c 40000000 /dev/urandom > /big\n", busybox());
    let files = [("Dockerfile", dockerfile.as_str())];
    let (a_dir, b_dir) = (context(&files), context(&files));
    let tag = format!("{}/{}:1", registry(), unique("fleet-s3-big"));
    let (a_iid, b_iid) = (a_dir.path().join("iid"), b_dir.path().join("iid"));

    let first = alice.build_ok(&["-t", &tag, "--push", "--iidfile", a_iid.to_str().unwrap(), a_dir.path().to_str().unwrap()]);
    assert_eq!(count_before(&first, "steps run"), 1, "{first}");
    let objects = bucket.list("big/");
    assert_eq!(objects.iter().filter(|o| o.key.starts_with("big/ac/web/")).count(), 1, "{objects:?}");
    let big: Vec<&Object> = objects.iter().filter(|o| o.key.starts_with("big/cas/sha256/") && o.size > 32 << 20).collect();
    assert_eq!(big.len(), 1, "the layer's blob, over 32 MiB: {objects:?}");
    // S3 gives an object completed from parts an ETag ending in -<number of parts>.
    let parts = big[0].etag.rsplit_once('-').and_then(|(_, n)| n.parse::<u32>().ok());
    assert!(parts.is_some_and(|n| n >= 2), "uploaded in parts: {:?}", big[0]);

    let second =
        bob.build_ok(&["-t", &unique("fleet-s3-big-load"), "--load", "--iidfile", b_iid.to_str().unwrap(), b_dir.path().to_str().unwrap()]);
    assert_eq!(count_before(&second, "steps run"), 0, "{second}");
    assert_eq!(count_before(&second, "containers"), 0, "node B ran no container: {second}");
    assert_eq!(std::fs::read_to_string(&b_iid).unwrap(), std::fs::read_to_string(&a_iid).unwrap(), "the same image id on both nodes");
    let image = std::fs::read_to_string(&b_iid).unwrap();
    assert_eq!(docker_ok(&["run", "--rm", image.trim(), "wc", "-c", "/big"]).split_whitespace().next(), Some("40000000"));
    for node in [&a, &b] {
        assert!(store_warnings(node).is_empty(), "{}", node.log());
    }
}

/// What hoist relies on in an S3 store, checked on the lab's: a create-if-absent write
/// (`If-None-Match: *`) of a key that exists is refused with 412 (object_store's
/// AlreadyExists: the first entry of a key stays) and leaves the object as it was; a write
/// on a version (`If-Match: <etag>`, the fleet's projects and tokens) is refused with 412
/// once the object changed; a missing key is 404 (a miss, not an error). If a new moto
/// drops one of these, this says so before the fleet tests fail in stranger ways.
#[test]
fn the_lab_s3_refuses_stale_conditional_writes_with_412_and_answers_404_for_a_missing_key() {
    if !s3_available() {
        return;
    }
    let bucket = Bucket::create();
    let put = |body: &str, condition: Option<&str>| {
        let mut args = vec!["-H".to_string(), "Content-Type: application/octet-stream".into(), "--data-binary".into(), body.into()];
        if let Some(c) = condition {
            args.extend(["-H".to_string(), c.to_string()]);
        }
        bucket.request("PUT", "/ac/web/k", &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    assert_eq!(put("first", Some("If-None-Match: *")).0, 200);
    let (code, body) = put("second", Some("If-None-Match: *"));
    assert_eq!(code, 412, "{body}");
    assert!(body.contains("PreconditionFailed"), "{body}");
    assert_eq!(bucket.request("GET", "/ac/web/k", &[]), (200, "first".to_string()), "the first write stays");

    let etag = &bucket.list("ac/web/k")[0].etag;
    assert_eq!(put("third", Some(&format!("If-Match: \"{etag}\""))).0, 200, "a write on the current version");
    let (code, body) = put("fourth", Some(&format!("If-Match: \"{etag}\"")));
    assert_eq!(code, 412, "a write on a stale version: {body}");
    assert_eq!(bucket.request("GET", "/ac/web/k", &[]), (200, "third".to_string()));

    assert_eq!(bucket.request("HEAD", "/cas/sha256/0000", &["-I"]).0, 404);
    assert_eq!(bucket.request("GET", "/cas/sha256/0000", &[]).0, 404);
    assert_eq!(bucket.request("HEAD", "/ac/web/k", &["-I"]).0, 200);
}

/// A TCP relay from a port on loopback to the lab's S3 server that can be cut: the store
/// as a node reaches it, to take away mid-run.
struct Relay {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    fn start() -> Relay {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let relay = Relay { port: listener.local_addr().unwrap().port(), cut: Default::default(), conns: Default::default() };
        let (cut, conns) = (relay.cut.clone(), relay.conns.clone());
        std::thread::spawn(move || {
            // Cut: the listener goes (connections are refused) and open ones are shut.
            while !cut.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let server = std::net::TcpStream::connect(s3_addr()).unwrap();
                conns.lock().unwrap().extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        relay
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(50));
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The store lost mid-run (a real node, a real S3 client): builds go on with the node's own
/// cache and say so once, and what the store held before is still there for the others.
#[test]
fn a_node_that_loses_its_store_builds_on_with_its_own_cache_and_says_so_once() {
    if !lab_available() || !s3_available() {
        return;
    }
    use_lab_s3();
    let bucket = Bucket::create();
    let url = bucket.url("team/cache");
    let alice = fleet_admin(&url, &["project", "create", "web", "--token-name", "alice"]);
    let relay = Relay::start();
    let mut a = Server {
        root: tempfile::Builder::new().prefix("hoist-server-").tempdir_in(test_tmp()).unwrap(),
        port: free_port(),
        child: None,
        extra: vec!["--cache-store".into(), url.clone()],
        env: vec![("AWS_ENDPOINT_URL".into(), format!("http://127.0.0.1:{}", relay.port))],
    };
    a.spawn();
    let alice = Teammate::new(&a, &alice);
    let dockerfile = format!("FROM {}\nRUN echo one > /one\nCOPY app.txt /app/\nRUN cat /app/app.txt /one > /both\n", busybox());
    let dir = context(&[("Dockerfile", dockerfile.as_str()), ("app.txt", "before\n")]);
    let tag = format!("{}/{}:1", registry(), unique("fleet-outage"));
    let first = alice.build_ok(&["-t", &tag, "--push", dir.path().to_str().unwrap()]);
    assert_eq!(count_before(&first, "steps run"), 3, "{first}");
    let entries = || bucket.list("team/cache/ac/web/").len();
    assert_eq!(entries(), 3, "the pushed result is in the store");

    relay.cut();
    std::fs::write(dir.path().join("app.txt"), "after\n").unwrap();
    let warning = "building with this node's cache only";
    let second = alice.build_ok(&[dir.path().to_str().unwrap()]);
    assert_eq!((count_before(&second, "steps run"), count_before(&second, "cached")), (2, 1), "{second}");
    assert_eq!(second.matches(warning).count(), 1, "one warning: {second}");
    let third = alice.build_ok(&[dir.path().to_str().unwrap()]);
    assert_eq!(count_before(&third, "cached"), 3, "the node's own cache kept the new results: {third}");
    assert!(!third.contains(warning), "the store is left alone for a while, and said nothing of: {third}");

    // Nothing was lost: another node reaches the store and gets alice's first result.
    let bob = fleet_admin(&url, &["token", "create", "web", "--name", "bob"]);
    let b = Server::start_with(&["--cache-store", &url]);
    let bob = Teammate::new(&b, &bob);
    std::fs::write(dir.path().join("app.txt"), "before\n").unwrap();
    let fourth = bob.build_ok(&[dir.path().to_str().unwrap()]);
    assert_eq!(count_before(&fourth, "cached"), 3, "{fourth}");
    assert_eq!(entries(), 3);
}
