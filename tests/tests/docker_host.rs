//! End-to-end: the user's Docker (issue 14). `--load` goes to the engine the Docker CLI
//! would use — `DOCKER_HOST` (plain tcp://, tcp:// with TLS), else the current Docker
//! context — proven by a relay on loopback that the test runs in front of the lab's
//! dockerd and that counts the connections it carries. And the client alone (`hoist-cli`
//! without its `builder` feature) builds against a remote builder.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use sha2::Digest as _;

const ENGINE_SOCKET: &str = "/var/run/docker.sock";

/// A TCP listener on loopback relaying each connection to the lab's dockerd, optionally
/// terminating TLS (and then requiring a client certificate of the test CA).
struct Relay {
    port: u16,
    connections: Arc<AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

impl Relay {
    fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Relay {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        rt.spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let tls = tls.clone();
                let count = count.clone();
                tokio::spawn(async move {
                    let Ok(mut engine) = tokio::net::UnixStream::connect(ENGINE_SOCKET).await else { return };
                    match tls {
                        Some(config) => {
                            // Counted once the handshake (with the client's certificate) passed.
                            let Ok(mut s) = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await else { return };
                            count.fetch_add(1, Ordering::SeqCst);
                            let _ = tokio::io::copy_bidirectional(&mut s, &mut engine).await;
                        }
                        None => {
                            count.fetch_add(1, Ordering::SeqCst);
                            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut engine).await;
                        }
                    }
                });
            }
        });
        Relay { port, connections, _rt: rt }
    }

    fn count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// A context whose image is new (a fresh layer), so the load moves something.
fn new_image_context(marker: &str) -> tempfile::TempDir {
    context(&[("Dockerfile", &format!("FROM {}\nRUN echo {marker} > /marker\n", busybox()))])
}

/// `hoist build --load -t TAG CTX` with the Docker variables of `env` (and none else).
fn load_with(h: &Hoist, env: &[(&str, &str)], tag: &str, ctx: &Path) -> Output {
    let mut c = h.cmd();
    for k in ["DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_CONFIG", "DOCKER_TLS_VERIFY", "DOCKER_TLS", "DOCKER_CERT_PATH"] {
        c.env_remove(k);
    }
    c.envs(env.iter().copied());
    c.args(["build", "--progress=plain", "-t", tag, "--load", ctx.to_str().unwrap()]).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The image is in the lab's engine (asked directly, not through hoist) and runs.
fn assert_runs(tag: &str, marker: &str) {
    let out = docker_ok(&["run", "--rm", tag, "cat", "/marker"]);
    assert_eq!(out.trim(), marker);
    let _ = docker().args(["rmi", "-f", tag]).output();
}

#[test]
fn load_through_docker_host_tcp() {
    if !lab_available() {
        return;
    }
    let relay = Relay::start(None);
    let h = Hoist::new();
    let marker = unique("tcp");
    let ctx = new_image_context(&marker);
    let tag = format!("hoist-e2e/{marker}:1");
    let host = format!("tcp://127.0.0.1:{}", relay.port);
    let out = load_with(&h, &[("DOCKER_HOST", &host)], &tag, ctx.path());
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(relay.count() > 0, "the load did not go through DOCKER_HOST's relay:\n{err}");
    // The engine is on loopback: it pulls from hoist's loopback registry.
    assert!(err.contains("via the loopback registry"), "{err}");
    assert_runs(&tag, &marker);
}

/// The Docker CLI's layout of a context: `contexts/meta/<sha256 of its name>/meta.json`.
fn write_context(config: &Path, name: &str, host: &str) -> PathBuf {
    let id = hex::encode(sha2::Sha256::digest(name.as_bytes()));
    let meta = config.join("contexts/meta").join(&id);
    std::fs::create_dir_all(&meta).unwrap();
    let json = serde_json::json!({"Name": name, "Metadata": {}, "Endpoints": {"docker": {"Host": host, "SkipTLSVerify": false}}});
    std::fs::write(meta.join("meta.json"), json.to_string()).unwrap();
    config.join("contexts/tls").join(id).join("docker")
}

#[test]
fn load_through_the_current_docker_context() {
    if !lab_available() {
        return;
    }
    let relay = Relay::start(None);
    let h = Hoist::new();
    let config = tempfile::tempdir().unwrap();
    write_context(config.path(), "relay", &format!("tcp://127.0.0.1:{}", relay.port));
    std::fs::write(config.path().join("config.json"), r#"{"auths": {}, "currentContext": "relay"}"#).unwrap();
    let marker = unique("ctx");
    let ctx = new_image_context(&marker);
    let tag = format!("hoist-e2e/{marker}:1");
    let out = load_with(&h, &[("DOCKER_CONFIG", config.path().to_str().unwrap())], &tag, ctx.path());
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(relay.count() > 0, "the load did not go through the context's endpoint:\n{err}");
    assert_runs(&tag, &marker);

    // DOCKER_CONTEXT names another context, and wins over currentContext.
    let before = relay.count();
    write_context(config.path(), "gone", "tcp://127.0.0.1:1");
    let out = load_with(&h, &[("DOCKER_CONFIG", config.path().to_str().unwrap()), ("DOCKER_CONTEXT", "gone")], &tag, ctx.path());
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("docker context \"gone\" (tcp://127.0.0.1:1)") && err.contains("does not answer"), "{err}");
    assert_eq!(relay.count(), before, "DOCKER_CONTEXT wins over currentContext");
}

/// A CA, an engine certificate for 127.0.0.1 and a client certificate, as `DOCKER_CERT_PATH`
/// holds them; and the relay's TLS settings (which require the client certificate).
fn tls_material(dir: &Path) -> Arc<rustls::ServerConfig> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |san: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![san.to_string()]).unwrap();
        p.extended_key_usages = vec![usage];
        (p.signed_by(&key, &ca).unwrap(), key)
    };
    let (server, server_key) = leaf("127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth);
    let (client, client_key) = leaf("client", ExtendedKeyUsagePurpose::ClientAuth);
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), client.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), client_key.serialize_pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(clients)
        .with_single_cert(vec![server.der().clone()], key)
        .unwrap();
    Arc::new(config)
}

#[test]
fn load_through_docker_host_with_tls() {
    if !lab_available() {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let relay = Relay::start(Some(tls_material(certs.path())));
    let h = Hoist::new();
    let marker = unique("tls");
    let ctx = new_image_context(&marker);
    let tag = format!("hoist-e2e/{marker}:1");
    let host = format!("tcp://127.0.0.1:{}", relay.port);
    let cert_path = certs.path().to_str().unwrap();
    let env = [("DOCKER_HOST", host.as_str()), ("DOCKER_TLS_VERIFY", "1"), ("DOCKER_CERT_PATH", cert_path)];
    let out = load_with(&h, &env, &tag, ctx.path());
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(relay.count() > 0, "no TLS connection with the client certificate reached the relay:\n{err}");
    assert_runs(&tag, &marker);

    // Without the CA, verification cannot be done: refused, naming what is missing.
    std::fs::remove_file(certs.path().join("ca.pem")).unwrap();
    let out = load_with(&h, &env, &tag, ctx.path());
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains(&format!("DOCKER_HOST={host}")) && err.contains("ca.pem"), "{err}");
}

#[test]
fn a_bad_docker_host_is_named() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = new_image_context("unused");
    let out = load_with(&h, &[("DOCKER_HOST", "bogus://x")], "hoist-e2e/bad:1", ctx.path());
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("--load: DOCKER_HOST=bogus://x: unsupported scheme \"bogus\""), "{err}");
    let port = free_port();
    let out = load_with(&h, &[("DOCKER_HOST", &format!("tcp://127.0.0.1:{port}"))], "hoist-e2e/bad:1", ctx.path());
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains(&format!("DOCKER_HOST=tcp://127.0.0.1:{port}")) && err.contains("does not answer"), "{err}");
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The `hoist` binary without its `builder` feature (the client alone, as shipped for
/// macOS), in a target directory of its own so that it does not replace the main binary.
fn client_only_bin() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| workspace().join("target")).join("client-only");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "hoist-cli", "--bin", "hoist", "--no-default-features", "--target-dir"])
        .arg(&target)
        .current_dir(workspace())
        .status()
        .unwrap();
    assert!(status.success(), "cargo build -p hoist-cli --no-default-features failed");
    target.join("debug/hoist")
}

#[test]
fn the_client_alone_builds_on_a_remote_builder() {
    if !lab_available() {
        return;
    }
    let bin = client_only_bin();
    let help = Command::new(&bin).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    assert!(help.contains("build") && !help.contains("serve"), "the client alone has no `hoist serve`:\n{help}");
    let home = tempfile::Builder::new().prefix("client-only-").tempdir_in(test_tmp()).unwrap();
    let client = |env: &[(&str, &str)], args: &[&str]| {
        let mut c = Command::new(&bin);
        c.current_dir(home.path())
            .env("HOME", home.path())
            .env("HOIST_CONFIG_DIR", home.path().join("config"))
            .env("HOIST_CACHE_DIR", home.path().join("cache"));
        for k in ["HOIST_BUILDER", "HOIST_TOKEN", "HOIST_ROOT", "HOIST_PROJECT", "DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_CONFIG"] {
            c.env_remove(k);
        }
        c.envs(env.iter().copied()).args(args).output().unwrap()
    };
    let serve = client(&[], &["serve"]);
    assert!(!serve.status.success());

    let marker = unique("client-only");
    let ctx = new_image_context(&marker);
    let dir = ctx.path().to_str().unwrap();
    let alone = client(&[], &["build", "--progress=plain", dir]);
    let err = stderr(&alone);
    assert!(!alone.status.success());
    assert!(err.contains("--builder") && err.contains("without the embedded builder"), "{err}");

    let server = Server::start();
    let token = server.admin(&["project", "create", "client-only"]);
    let tag = format!("hoist-e2e/{marker}:1");
    let out = client(&[("HOIST_TOKEN", &token)], &["build", "--progress=plain", "--builder", &server.addr(), "-t", &tag, "--load", dir]);
    assert!(out.status.success(), "{}\nserver log:\n{}", stderr(&out), server.log());
    assert_runs(&tag, &marker);
}

/// `DOCKER_HOST=ssh://…` runs `ssh [flags] -- HOST docker system dial-stdio` per connection,
/// as the Docker CLI does. No sshd here: an `ssh` first on PATH records its arguments and
/// runs the real `docker system dial-stdio` on this machine, so the bytes still go through
/// the Docker CLI's own stdio bridge to the lab's engine. The host is not loopback, so the
/// engine counts as remote: the image goes as an archive, and the summary says why.
#[test]
fn load_through_docker_host_ssh() {
    if !lab_available() {
        return;
    }
    let bin = tempfile::tempdir().unwrap();
    let log = bin.path().join("ssh.log");
    let script = format!(
        "#!/bin/sh\necho \"$@\" >> {log}\nwhile [ \"$1\" != \"--\" ]; do shift; done\nshift 3\nunset DOCKER_HOST DOCKER_CONTEXT\nexec /usr/bin/docker \"$@\"\n",
        log = log.display()
    );
    let ssh = bin.path().join("ssh");
    std::fs::write(&ssh, script).unwrap();
    std::fs::set_permissions(&ssh, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.path().display(), std::env::var("PATH").unwrap_or_default());
    let h = Hoist::new();
    let marker = unique("ssh");
    let ctx = new_image_context(&marker);
    let tag = format!("hoist-e2e/{marker}:1");
    let out = load_with(&h, &[("DOCKER_HOST", "ssh://me@build.example:2222"), ("PATH", &path)], &tag, ctx.path());
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        calls.lines().next().is_some_and(|l| l == "-o ConnectTimeout=30 -T -l me -p 2222 -- build.example docker system dial-stdio"),
        "ssh was not run as the Docker CLI runs it:\n{calls}\n{err}"
    );
    assert!(
        err.contains("as a docker load archive")
            && err.contains("archive because the engine (DOCKER_HOST=ssh://me@build.example:2222) is on another machine"),
        "{err}"
    );
    assert_runs(&tag, &marker);
}
