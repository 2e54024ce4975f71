//! `--load` imports the image's lower layers while the build goes on (issue 18): the
//! builder sends provisional images of the final lower layers, the engine pulls them from
//! the client's loopback registry, and at the end only the layers above them move. Nothing
//! provisional stays in the engine after success, failure or Ctrl-C.
//!
//! The client talks to the engine through a relay on a unix socket that records every
//! `POST /images/create` (each pull, provisional or final), so the test knows exactly which
//! temporary references the client made, whatever other tests do in the engine meanwhile.
//!
//! Needs: the lab (tests/lab/setup.sh).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A relay to the engine's socket that keeps what clients sent.
struct EngineRelay {
    dir: tempfile::TempDir,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl EngineRelay {
    fn start() -> EngineRelay {
        let dir = tempfile::tempdir_in(test_tmp()).unwrap();
        let listener = UnixListener::bind(dir.path().join("docker.sock")).unwrap();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let log = sent.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { return };
                let engine = UnixStream::connect("/var/run/docker.sock").expect("the engine's socket");
                let (mut c_read, mut e_write) = (client.try_clone().unwrap(), engine.try_clone().unwrap());
                let log = log.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64 << 10];
                    while let Ok(n) = c_read.read(&mut buf) {
                        if n == 0 || e_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        log.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = e_write.shutdown(std::net::Shutdown::Write);
                });
                let (mut e_read, mut c_write) = (engine, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut e_read, &mut c_write);
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        EngineRelay { dir, sent }
    }

    fn host(&self) -> String {
        format!("unix://{}", self.dir.path().join("docker.sock").display())
    }

    /// The references the clients pulled (`fromImage@tag` of each `POST /images/create`).
    fn pulled(&self) -> Vec<String> {
        let sent = String::from_utf8_lossy(&self.sent.lock().unwrap()).into_owned();
        let mut out = Vec::new();
        for line in sent.lines().filter(|l| l.starts_with("POST ") && l.contains("/images/create?")) {
            let query = line.split_once('?').unwrap().1.split(' ').next().unwrap();
            let param = |k: &str| query.split('&').find_map(|kv| kv.strip_prefix(&format!("{k}="))).map(decode).unwrap_or_default();
            out.push(format!("{}@{}", param("fromImage"), param("tag")));
        }
        out
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn in_engine(reference: &str) -> bool {
    docker().args(["image", "inspect", reference]).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap().success()
}

/// Every reference the client pulled is gone from the engine.
fn assert_none_left(pulled: &[String], when: &str) {
    let left: Vec<&String> = pulled.iter().filter(|r| in_engine(r)).collect();
    assert!(left.is_empty(), "{when}: provisional or temporary images left in the engine: {left:?}");
}

/// A Dockerfile whose big lower layer (new to the builder: `marker`) is final long before
/// the build ends, then `last`.
fn dockerfile(marker: &str, last: &str) -> String {
    format!("FROM {}\nRUN head -c 20000000 /dev/urandom > /big && echo {marker} > /marker\nRUN {last}\n", busybox())
}

/// `hoist build --load -t TAG CTX` talking to the engine through `relay`.
fn load_through(h: &Hoist, relay: &EngineRelay, tag: &str, ctx: &tempfile::TempDir) -> Command {
    let mut c = h.cmd();
    c.env("DOCKER_HOST", relay.host()).args(["build", "--progress=plain", "--load", "-t", tag, ctx.path().to_str().unwrap()]);
    c
}

#[test]
fn lower_layers_are_imported_while_the_build_runs_and_nothing_provisional_remains() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let relay = EngineRelay::start();
    let tag = format!("{}:1", unique("early-load"));
    let ctx = context(&[("Dockerfile", &dockerfile("ok", "sleep 4 && echo done > /done"))]);
    let out = load_through(&h, &relay, &tag, &ctx).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let line = stderr.lines().find(|l| l.contains("--load: loaded")).unwrap_or_else(|| panic!("no load line:\n{stderr}"));
    assert!(line.contains("imported while building"), "the lower layers came early: {line}");
    // The final pull moved at most the last step's layer: the engine had the rest.
    assert!(line.contains(": 1 layer(s) moved") || line.contains(": 0 layer(s) moved"), "{line}");
    let pulled = relay.pulled();
    assert!(pulled.len() >= 2, "a provisional pull and the final one: {pulled:?}");
    assert_none_left(&pulled, "after a successful load");
    let layers = docker_ok(&["image", "inspect", "-f", "{{len .RootFS.Layers}}", &tag]);
    assert_eq!(layers.trim(), "3", "the loaded image is whole");
    let run = docker_ok(&["run", "--rm", &tag, "sh", "-c", "wc -c < /big; cat /done"]);
    assert_eq!(run.split_whitespace().collect::<Vec<_>>(), ["20000000", "done"]);
    let _ = docker().args(["rmi", &tag]).output();

    // A build that fails after the early import leaves nothing of it in the engine.
    let ctx = context(&[("Dockerfile", &dockerfile("fails", "sleep 4 && exit 3"))]);
    let relay = EngineRelay::start();
    let tag = format!("{}:1", unique("early-fail"));
    let out = load_through(&h, &relay, &tag, &ctx).output().unwrap();
    assert!(!out.status.success());
    let pulled = relay.pulled();
    assert!(!pulled.is_empty(), "the lower layers were imported before the step failed");
    assert_none_left(&pulled, "after a failed build");
    assert!(!in_engine(&tag));
}

#[test]
fn ctrl_c_after_an_early_import_leaves_nothing_provisional() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let relay = EngineRelay::start();
    let tag = format!("{}:1", unique("early-ctrl-c"));
    let ctx = context(&[("Dockerfile", &dockerfile("ctrl-c", "sleep 60"))]);
    let mut child = load_through(&h, &relay, &tag, &ctx).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let seen = Arc::new(Mutex::new(String::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            seen2.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    // The provisional image is in the engine (its pull finished) while `sleep 60` runs.
    let deadline = Instant::now() + Duration::from_secs(50);
    while !relay.pulled().first().is_some_and(|r| in_engine(r)) {
        assert!(Instant::now() < deadline, "no provisional import during the build:\n{}", seen.lock().unwrap());
        std::thread::sleep(Duration::from_millis(100));
    }
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "a cancelled build does not succeed");
    assert_none_left(&relay.pulled(), "after Ctrl-C");
    assert!(!in_engine(&tag));
}

#[test]
fn a_layer_of_small_files_is_kept_as_its_tar_for_the_engine_and_a_big_file_layer_is_not() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let relay = EngineRelay::start();
    let tag = format!("{}:1", unique("early-kept"));
    let df = format!(
        "FROM {}\nRUN mkdir /many && for i in $(seq 1 2000); do echo \"file $i\" > /many/f$i; done\n\
         RUN head -c 20000000 /dev/urandom > /big\nRUN echo done > /done\n",
        busybox()
    );
    let ctx = context(&[("Dockerfile", &df)]);
    let out = load_through(&h, &relay, &tag, &ctx).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let layers = docker_ok(&["image", "inspect", "-f", "{{range .RootFS.Layers}}{{println .}}{{end}}", &tag]);
    let layers: Vec<&str> = layers.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(layers.len(), 4, "{layers:?}");
    let blob = |diff_id: &str| h.root.path().join("content/blobs/sha256").join(diff_id.trim_start_matches("sha256:"));
    // The 2,000-file layer's tar was kept as the diff_id was computed, byte for byte.
    let kept = std::fs::read(blob(layers[1])).unwrap_or_else(|e| panic!("the small-file layer's tar is not kept: {e}"));
    assert_eq!(sha256_digest(&kept), layers[1]);
    assert!(!blob(layers[2]).exists(), "a layer of one 20 MB file is not written twice");
    let run = docker_ok(&["run", "--rm", &tag, "sh", "-c", "ls /many | wc -l; cat /many/f1234; cat /done"]);
    assert_eq!(run.lines().map(str::trim).collect::<Vec<_>>(), ["2000", "file 1234", "done"]);
    assert_none_left(&relay.pulled(), "after the load");
    let _ = docker().args(["rmi", &tag]).output();
}
