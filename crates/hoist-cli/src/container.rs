//! The embedded builder in a container (`docker-container`, as buildx's driver of that
//! name): when the builder cannot run on the host (not root, not Linux, or
//! `HOIST_BUILDER=docker-container`), `hoist build` runs it as the container
//! `hoist-builder` in the user's Docker engine (the one `--load` uses: `DOCKER_HOST`, the
//! current Docker context), its state in the volume `hoist-state`. It is reached on
//! loopback only — with an engine on this Linux machine it shares the host's network and
//! listens on `127.0.0.1:PORT` (registries on localhost stay reachable, its steps get the
//! host builder's sandboxed network); with another engine (Docker Desktop's VM) its port is
//! published on `127.0.0.1` — and only with the owner token the client gave it when it
//! created the container (an environment variable of the container, which only users of
//! the engine can read: they can do anything with the engine anyway).
//!
//! The image, `hoist-builder:<version>-<12 hex of the binary's SHA-256>`, is the builder
//! image of `packaging/builder/Dockerfile`: `HOIST_BUILDER_IMAGE` names one in a registry;
//! else the client makes it from itself — its own binary, and the host's `runc`, `ip` and
//! `iptables` with the libraries they load — and loads it into the engine, with no
//! network. A client of another version (another binary) replaces the container and its
//! image, and keeps the volume.
//!
//! Privileges: the default capabilities plus `SYS_ADMIN` (overlay and bind mounts, the
//! steps' namespaces, remounting its cgroups read-write) and `NET_ADMIN` (the steps'
//! bridge, veths and iptables rules); seccomp, AppArmor and the masking of `/proc` and
//! `/sys` paths off, for this container only (runc mounts a fresh `/proc` and `/sys` for
//! each step, which the kernel refuses below masked ones). Not `--privileged`: no other
//! capability (some engines cannot grant `CAP_SYS_RESOURCE`), and its devices cgroup stays
//! the default, which the builder then gives insecure steps.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters as q;
use bollard::Docker;
use futures::StreamExt as _;
use hoist_client::load::DockerEngine;
use hoist_client::{BuilderAddr, Client, ConnectOptions};
use sha2::Digest as _;

/// The value of `--builder`/`HOIST_BUILDER` (or hoist.json's `builders`) that asks for it.
pub const DRIVER: &str = "docker-container";
/// The builder's container (`HOIST_BUILDER_NAME` names another, for a second one).
const DEFAULT_NAME: &str = "hoist-builder";
/// The volume of its state (`<HOIST_BUILDER_NAME>-state` for another name).
const DEFAULT_VOLUME: &str = "hoist-state";
/// The repository of its image.
pub const IMAGE_REPO: &str = "hoist-builder";
/// Label on the container, volume and image: what hoist made (the image tag).
const LABEL: &str = "dev.hoist.builder";
/// Label on the container: the loopback port it listens on with the host's network.
const PORT_LABEL: &str = "dev.hoist.builder.port";
/// The port the builder listens on in the container.
const PORT: &str = "7420/tcp";
/// Where its state lives in the container.
const STATE: &str = "/var/lib/hoist";

/// Why the embedded builder must run in a container, or `None` when it runs on the host.
/// `named`: `docker-container` was given as the builder.
#[cfg(feature = "builder")]
pub fn reason(named: bool) -> Option<String> {
    if named {
        return Some(format!("the builder is {DRIVER}"));
    }
    if !cfg!(target_os = "linux") {
        return Some("the builder needs Linux".into());
    }
    if !rustix::process::geteuid().is_root() {
        return Some("the builder needs root on the host and this user is not".into());
    }
    None
}

/// The names of the builder's container and volume.
#[derive(Debug, Clone)]
struct Names {
    container: String,
    volume: String,
}

impl Names {
    fn get() -> anyhow::Result<Names> {
        match std::env::var("HOIST_BUILDER_NAME").ok().filter(|n| !n.is_empty() && n != DEFAULT_NAME) {
            None => Ok(Names { container: DEFAULT_NAME.into(), volume: DEFAULT_VOLUME.into() }),
            Some(n) if n.len() <= 64 && n.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) => {
                Ok(Names { volume: format!("{n}-state"), container: n })
            }
            Some(n) => bail!("HOIST_BUILDER_NAME={n:?}: a container name is letters, digits, '-', '_' and '.'"),
        }
    }
}

/// The engine the builder container runs in.
async fn engine() -> anyhow::Result<Docker> {
    Ok(DockerEngine::connect("the docker-container builder").await?.docker)
}

fn not_found(e: &bollard::errors::Error) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })
}

/// The image tag of this client: its version and a hash of its binary, so that any other
/// build of hoist is another version. The hash is kept beside the client's config, keyed
/// by the binary's size, mtime and inode, so that it is computed once per binary.
pub fn image_tag() -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let exe = std::env::current_exe().context("locating the hoist binary")?;
    let meta = std::fs::metadata(&exe).with_context(|| format!("reading {}", exe.display()))?;
    let key = format!("{}:{}:{}:{}", exe.display(), meta.size(), meta.mtime_nsec() + meta.mtime() * 1_000_000_000, meta.ino());
    let cache = crate::conn::config_dir().join("builder-image.json");
    let cached: HashMap<String, String> = std::fs::read(&cache).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let hash = match cached.get(&key) {
        Some(h) => h.clone(),
        None => {
            let mut f = std::fs::File::open(&exe).with_context(|| format!("reading {}", exe.display()))?;
            let mut h = HashingWriter { inner: std::io::sink(), hash: sha2::Sha256::new() };
            std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", exe.display()))?;
            let hash = hex::encode(h.hash.finalize())[..12].to_string();
            let _ = std::fs::create_dir_all(crate::conn::config_dir());
            let one: HashMap<&str, &str> = [(key.as_str(), hash.as_str())].into();
            if let Ok(b) = serde_json::to_vec(&one) {
                let tmp = cache.with_extension(format!("{}.tmp", std::process::id()));
                if std::fs::write(&tmp, b).is_ok() {
                    let _ = std::fs::rename(&tmp, &cache);
                }
            }
            hash
        }
    };
    Ok(format!("{IMAGE_REPO}:{}-{hash}", env!("CARGO_PKG_VERSION")))
}

/// Start (or reach) the builder container and connect to it.
pub async fn connect(opts: &ConnectOptions, why: &str) -> anyhow::Result<Client> {
    let names = Names::get()?;
    let engine = DockerEngine::connect("the docker-container builder").await?;
    // An engine on this machine runs the builder in the host's network, as the builder on
    // the host would be (it reaches registries on localhost; its steps get the same
    // sandboxed network); another (Docker Desktop's VM, a remote engine) publishes its port
    // on loopback.
    let host_network = cfg!(target_os = "linux") && engine.remote.is_none();
    let docker = engine.docker;
    let tag = image_tag()?;
    let (port, token) = ensure_running(&docker, &names, &tag, why, host_network).await?;
    let addr = BuilderAddr::Tcp(format!("127.0.0.1:{port}"));
    let opts = ConnectOptions { token: Some(token), ..opts.clone() };
    // The builder may still be opening its state: a few seconds the first time.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let err = match hoist_client::connect(&addr, &opts).await {
            Ok(mut c) => match c.info(hoist_client::v1::InfoRequest {}).await {
                Ok(_) => return Ok(c),
                Err(e) => e.message().to_string(),
            },
            Err(e) => e.to_string(),
        };
        if std::time::Instant::now() > deadline {
            bail!("the builder container {} does not answer on {addr}: {err} (see `hoist builder logs`)", names.container);
        }
        if let Ok(c) = docker.inspect_container(&names.container, None::<q::InspectContainerOptions>).await {
            if c.state.and_then(|s| s.running) == Some(false) {
                bail!("the builder container {} stopped while starting (see `hoist builder logs`)", names.container);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The loopback port a builder container listens on: its label (host network) or its
/// published port.
fn port_of(c: &bollard::models::ContainerInspectResponse) -> Option<u16> {
    let labels = c.config.as_ref().and_then(|c| c.labels.as_ref());
    if let Some(p) = labels.and_then(|l| l.get(PORT_LABEL)) {
        return p.parse().ok();
    }
    c.network_settings
        .as_ref()
        .and_then(|n| n.ports.as_ref())
        .and_then(|p| p.get(PORT).cloned().flatten())
        .and_then(|b| b.into_iter().find_map(|b| b.host_port.and_then(|p| p.parse::<u16>().ok())))
}

/// What a running builder container of this version answers on: its loopback port and
/// owner token. Creates (and first, the image and the volume) or starts it as needed, and
/// replaces a container of another version.
async fn ensure_running(docker: &Docker, names: &Names, tag: &str, why: &str, host_network: bool) -> anyhow::Result<(u16, String)> {
    let name = names.container.as_str();
    for _attempt in 0..5 {
        match docker.inspect_container(name, None::<q::InspectContainerOptions>).await {
            Ok(c) => {
                let labels = c.config.as_ref().and_then(|c| c.labels.clone()).unwrap_or_default();
                let Some(version) = labels.get(LABEL) else {
                    bail!("a container named {name} exists and is not hoist's builder: remove or rename it (or set HOIST_BUILDER_NAME)");
                };
                if version != tag {
                    eprintln!(
                        "hoist: replacing the builder container {name} ({version} → {tag}); the cache in volume {} stays",
                        names.volume
                    );
                    remove_container(docker, name).await?;
                    // Its image too, unless another container still runs on it.
                    if let Some(image) = c.config.as_ref().and_then(|c| c.image.clone()) {
                        let _ = docker.remove_image(&image, None::<q::RemoveImageOptions>, None).await;
                    }
                    continue;
                }
                if c.state.as_ref().and_then(|s| s.running) != Some(true) {
                    eprintln!("hoist: starting the builder container {name}");
                    match docker.start_container(name, None::<q::StartContainerOptions>).await {
                        Ok(()) => {}
                        // Another client started it at the same moment.
                        Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. }) => {}
                        Err(e) => {
                            return Err(e)
                                .context(format!("starting the builder container {name} (`hoist builder rm` removes it; the cache stays)"))
                        }
                    }
                    continue;
                }
                let token = c
                    .config
                    .as_ref()
                    .and_then(|c| c.env.as_ref())
                    .and_then(|env| env.iter().find_map(|e| e.strip_prefix("HOIST_OWNER_TOKEN=").map(str::to_string)))
                    .with_context(|| format!("the builder container {name} has no owner token: remove it (`hoist builder rm`)"))?;
                match port_of(&c) {
                    Some(p) => return Ok((p, token)),
                    None => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            Err(e) if not_found(&e) => {
                eprintln!("hoist: starting the builder in a container of the Docker engine ({why}); first time only");
                ensure_image(docker, tag).await?;
                create(docker, names, tag, host_network).await?;
            }
            Err(e) => return Err(e).context(format!("asking the Docker engine about the container {name}")),
        }
    }
    bail!("the builder container {name} did not come up (see `hoist builder logs`)")
}

/// A free TCP port on loopback (for a builder in the host's network).
fn free_loopback_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?;
    Ok(l.local_addr()?.port())
}

async fn create(docker: &Docker, names: &Names, tag: &str, host_network: bool) -> anyhow::Result<()> {
    let mut labels: HashMap<String, String> = [(LABEL.to_string(), tag.to_string())].into();
    docker
        .create_volume(bollard::models::VolumeCreateRequest {
            name: Some(names.volume.clone()),
            labels: Some([(LABEL.to_string(), "state".to_string())].into()),
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the volume {}", names.volume))?;
    let token = format!("hst_owner_{}", hex::encode(rand_bytes()?));
    let mut host = HostConfig {
        binds: Some(vec![format!("{}:{STATE}", names.volume)]),
        cap_add: Some(vec!["SYS_ADMIN".into(), "NET_ADMIN".into()]),
        security_opt: Some(vec!["seccomp=unconfined".into(), "apparmor=unconfined".into()]),
        // `--security-opt systempaths=unconfined`: no masked or read-only /proc and /sys paths.
        masked_paths: Some(Vec::new()),
        readonly_paths: Some(Vec::new()),
        ..Default::default()
    };
    let listen = if host_network {
        let port = free_loopback_port()?;
        labels.insert(PORT_LABEL.into(), port.to_string());
        host.network_mode = Some("host".into());
        format!("tcp://127.0.0.1:{port}")
    } else {
        // Loopback only, on a port the engine picks.
        host.port_bindings = Some(
            [(PORT.to_string(), Some(vec![PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(String::new()) }]))].into(),
        );
        "tcp://0.0.0.0:7420".to_string()
    };
    let mut cmd = vec!["serve".to_string(), "--embedded".into(), "--root".into(), STATE.into(), "--listen".into(), listen];
    if !host_network {
        // Published on the host's loopback only; the token guards the container's address.
        cmd.push("--insecure".into());
    }
    let body = ContainerCreateBody {
        image: Some(tag.to_string()),
        entrypoint: Some(vec!["/usr/local/bin/hoist".into()]),
        cmd: Some(cmd),
        env: Some(vec![format!("HOIST_OWNER_TOKEN={token}"), "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()]),
        exposed_ports: (!host_network).then(|| vec![PORT.to_string()]),
        labels: Some(labels),
        host_config: Some(host),
        ..Default::default()
    };
    let opts = q::CreateContainerOptionsBuilder::new().name(&names.container).build();
    match docker.create_container(Some(opts), body).await {
        Ok(_) => Ok(()),
        // Another client created it at the same moment.
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => Ok(()),
        Err(e) => Err(e).context(format!("creating the builder container {} from {tag}", names.container)),
    }
}

fn rand_bytes() -> anyhow::Result<[u8; 24]> {
    let mut b = [0u8; 24];
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).context("reading random bytes")?;
    Ok(b)
}

async fn remove_container(docker: &Docker, name: &str) -> anyhow::Result<()> {
    match docker.remove_container(name, Some(q::RemoveContainerOptionsBuilder::new().force(true).build())).await {
        Ok(()) => Ok(()),
        Err(e) if not_found(&e) => Ok(()),
        Err(e) => Err(e).context(format!("removing the builder container {name}")),
    }
}

/// Make sure the engine has image `tag`: it has it, or `HOIST_BUILDER_IMAGE` names one to
/// pull, or the client makes it from itself.
async fn ensure_image(docker: &Docker, tag: &str) -> anyhow::Result<()> {
    if docker.inspect_image(tag).await.is_ok() {
        return Ok(());
    }
    if let Ok(from) = std::env::var("HOIST_BUILDER_IMAGE") {
        eprintln!("hoist: pulling the builder image {from}");
        let mut s = docker.create_image(Some(q::CreateImageOptionsBuilder::new().from_image(&from).build()), None, None);
        while let Some(r) = s.next().await {
            r.with_context(|| format!("pulling the builder image {from} (HOIST_BUILDER_IMAGE)"))?;
        }
        let (repo, t) = tag.split_once(':').unwrap_or((tag, "latest"));
        docker
            .tag_image(&from, Some(q::TagImageOptionsBuilder::new().repo(repo).tag(t).build()))
            .await
            .with_context(|| format!("tagging {from} as {tag}"))?;
        return Ok(());
    }
    if !cfg!(all(target_os = "linux", feature = "builder")) {
        bail!("this hoist cannot make the builder image from itself (it is not a Linux build with the builder): set HOIST_BUILDER_IMAGE to a hoist builder image of version {}", env!("CARGO_PKG_VERSION"));
    }
    eprintln!("hoist: loading the builder image {tag} into the engine from this binary");
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let archive = dir.path().join("image.tar");
    let (a, t) = (archive.clone(), tag.to_string());
    tokio::task::spawn_blocking(move || image_archive(&a, &t)).await??;
    let file = tokio::fs::File::open(&archive).await.with_context(|| format!("reading {}", archive.display()))?;
    let body = file_chunks(file);
    let mut s = docker.import_image_stream(q::ImportImageOptionsBuilder::new().quiet(true).build(), body, None);
    while let Some(r) = s.next().await {
        let info = r.with_context(|| format!("loading the builder image {tag} into the engine"))?;
        if let Some(e) = info.error_detail.and_then(|d| d.message) {
            bail!("loading the builder image {tag} into the engine: {e}");
        }
    }
    Ok(())
}

/// A file as a stream of chunks.
fn file_chunks(file: tokio::fs::File) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    futures::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt as _;
        let mut buf = vec![0u8; 1 << 20];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    })
}

/// The host files the builder image is made of: this binary (as `/usr/local/bin/hoist`),
/// the tools the builder runs and what they load, and a few files of `/etc`.
fn image_files() -> anyhow::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut files = Vec::new();
    let mut optional = Vec::new();
    for (tool, needed) in [("runc", true), ("ip", true), ("iptables", true), ("git", false)] {
        match which(tool) {
            Some(p) => files.push(p),
            None if needed => bail!("making the builder image: `{tool}` is not on this machine (install it, or set HOIST_BUILDER_IMAGE)"),
            None => {}
        }
    }
    // iptables loads its matches and targets (libxt_*.so) at run time.
    let mut libs = Vec::new();
    for f in files.clone() {
        libs.extend(shared_libs(&f)?);
    }
    libs.extend(shared_libs(&std::env::current_exe()?)?);
    let mut modules = Vec::new();
    for l in &libs {
        if l.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libxtables")) {
            if let Some(dir) = l.canonicalize().ok().and_then(|c| c.parent().map(|p| p.join("xtables"))) {
                if let Ok(rd) = std::fs::read_dir(&dir) {
                    for e in rd.flatten() {
                        modules.push(e.path());
                    }
                }
            }
        }
    }
    for m in &modules {
        libs.extend(shared_libs(m).unwrap_or_default());
    }
    files.extend(modules);
    files.extend(libs);
    for etc in ["/etc/ssl/certs/ca-certificates.crt", "/etc/protocols", "/etc/services", "/etc/ethertypes", "/etc/nsswitch.conf"] {
        optional.push(PathBuf::from(etc));
    }
    Ok((files, optional))
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path.split(':').chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"]).map(|d| Path::new(d).join(tool)).find(|p| p.is_file());
    found
}

/// The shared libraries `bin` loads (and its ELF interpreter), as `ldd` lists them.
fn shared_libs(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = std::process::Command::new("ldd").arg(bin).output().context("running ldd (to find what the builder's tools load)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once(" => ") {
            Some((_, rest)) => rest.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Write the builder image as a `docker load` archive at `out`, tagged `tag`: one layer of
/// the files [`image_files`] names, each at its host path (symbolic links as links, so that
/// merged-/usr and alternatives links resolve as on the host), this binary as
/// `/usr/local/bin/hoist`.
fn image_archive(out: &Path, tag: &str) -> anyhow::Result<()> {
    let (files, optional) = image_files()?;
    let dir = out.parent().unwrap_or(Path::new("."));
    let layer_path = dir.join("layer.tar");
    let layer_file = std::fs::File::create(&layer_path)?;
    let mut hashed = HashingWriter { inner: std::io::BufWriter::new(layer_file), hash: sha2::Sha256::new() };
    {
        let mut tar = tar::Builder::new(&mut hashed);
        tar.follow_symlinks(false);
        // The engine's tar reader knows no GNU sparse entries.
        tar.sparse(false);
        let mut done = std::collections::BTreeSet::new();
        for d in ["tmp", "var/lib/hoist", "run", "usr/local/bin", "etc", "proc", "sys", "dev"] {
            append_dir(&mut tar, d, if d == "tmp" { 0o1777 } else { 0o755 })?;
            done.insert(PathBuf::from("/").join(d));
        }
        for (name, text) in [("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"), ("etc/group", "root:x:0:\n")] {
            let mut h = tar::Header::new_gnu();
            h.set_size(text.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, name, text.as_bytes())?;
        }
        let exe = std::env::current_exe()?;
        tar.append_path_with_name(&exe, "usr/local/bin/hoist").with_context(|| format!("adding {}", exe.display()))?;
        let present: Vec<PathBuf> = optional.into_iter().filter(|p| p.exists()).collect();
        for f in files.iter().chain(&present) {
            add_with_links(&mut tar, f, &mut done)?;
        }
        tar.finish()?;
    }
    hashed.inner.flush()?;
    let diff_id = format!("sha256:{}", hex::encode(hashed.hash.finalize()));
    let config = serde_json::json!({
        "architecture": hoist_oci::Platform::host().architecture,
        "os": "linux",
        "config": {
            "Entrypoint": ["/usr/local/bin/hoist"],
            "Cmd": ["serve"],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", format!("HOIST_ROOT={STATE}")],
            "Labels": { LABEL: tag },
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
    });
    let config = serde_json::to_vec(&config)?;
    let config_name = format!("{}.json", hex::encode(sha2::Sha256::digest(&config)));
    let manifest = serde_json::to_vec(&serde_json::json!([{ "Config": config_name, "RepoTags": [tag], "Layers": ["layer.tar"] }]))?;
    let mut outer = tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(out)?));
    outer.sparse(false);
    outer.append_path_with_name(&layer_path, "layer.tar")?;
    for (name, data) in [(config_name.as_str(), &config), ("manifest.json", &manifest)] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        outer.append_data(&mut h, name, data.as_slice())?;
    }
    outer.into_inner()?.flush()?;
    std::fs::remove_file(&layer_path)?;
    Ok(())
}

fn append_dir<W: std::io::Write>(tar: &mut tar::Builder<W>, name: &str, mode: u32) -> anyhow::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(mode);
    h.set_size(0);
    tar.append_data(&mut h, format!("{name}/"), std::io::empty())?;
    Ok(())
}

/// Add `path` as the host has it: each symbolic link on the way (a merged-/usr `/lib`, an
/// alternatives link) as a link, the file at the end as a file.
fn add_with_links<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    path: &Path,
    done: &mut std::collections::BTreeSet<PathBuf>,
) -> anyhow::Result<()> {
    let mut cur = PathBuf::from("/");
    let comps: Vec<_> = path.components().skip(1).collect();
    for (i, c) in comps.iter().enumerate() {
        cur.push(c);
        let meta = std::fs::symlink_metadata(&cur).with_context(|| format!("reading {}", cur.display()))?;
        let rel = cur.strip_prefix("/").unwrap_or(&cur).to_path_buf();
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&cur)?;
            if done.insert(cur.clone()) {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mode(0o777);
                tar.append_link(&mut h, &rel, &target)?;
            }
            // Continue from where the link points, then with the rest of the path.
            let resolved = if target.is_absolute() { target } else { cur.parent().unwrap_or(Path::new("/")).join(target) };
            let rest: PathBuf = comps[i + 1..].iter().collect();
            return add_with_links(tar, &normalize(&resolved.join(rest)), done);
        }
        if i + 1 == comps.len() {
            if done.insert(cur.clone()) {
                tar.append_path_with_name(&cur, &rel).with_context(|| format!("adding {}", cur.display()))?;
            }
        } else if meta.is_dir() && done.insert(cur.clone()) {
            append_dir(tar, &rel.to_string_lossy(), 0o755)?;
        }
    }
    Ok(())
}

/// `a/./b/../c` → `a/c`, without touching the filesystem.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

struct HashingWriter<W> {
    inner: W,
    hash: sha2::Sha256,
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// `hoist builder …`: the builder container.
#[derive(clap::Subcommand, Debug)]
pub enum BuilderCmd {
    /// Whether the builder container runs, its version, port and cache volume.
    Status,
    /// Stop the builder container (its cache stays in the volume; the next build starts it).
    Stop,
    /// Remove the builder container and its image (with --volume, the cache too).
    Rm {
        /// Also remove the volume with the builder's state (its whole cache).
        #[arg(long)]
        volume: bool,
    },
    /// Print the builder container's log.
    Logs {
        /// Keep following it.
        #[arg(long, short)]
        follow: bool,
    },
}

/// Run a `hoist builder` command.
pub async fn builder(cmd: BuilderCmd) -> anyhow::Result<()> {
    let names = Names::get()?;
    let name = names.container.as_str();
    let docker = engine().await?;
    match cmd {
        BuilderCmd::Status => match docker.inspect_container(name, None::<q::InspectContainerOptions>).await {
            Ok(c) => {
                let running = c.state.as_ref().and_then(|s| s.running) == Some(true);
                let version = c.config.as_ref().and_then(|c| c.labels.as_ref()).and_then(|l| l.get(LABEL).cloned()).unwrap_or_default();
                println!("container: {name} ({})", if running { "running" } else { "stopped" });
                println!(
                    "image:     {version}{}",
                    if version == image_tag()? { "" } else { " (another version: the next build replaces it)" }
                );
                if let Some(p) = port_of(&c).filter(|_| running) {
                    println!("address:   127.0.0.1:{p}");
                }
                println!("volume:    {}", names.volume);
            }
            Err(e) if not_found(&e) => println!("no builder container {name} (the next build that needs one starts it)"),
            Err(e) => return Err(e).context("asking the Docker engine about the builder container"),
        },
        BuilderCmd::Stop => match docker.stop_container(name, Some(q::StopContainerOptionsBuilder::new().t(30).build())).await {
            Ok(()) => println!("stopped {name}; the cache stays in volume {}", names.volume),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. }) => println!("{name} is not running"),
            Err(e) if not_found(&e) => println!("no builder container {name}"),
            Err(e) => return Err(e).context(format!("stopping {name}")),
        },
        BuilderCmd::Rm { volume } => {
            let image =
                docker.inspect_container(name, None::<q::InspectContainerOptions>).await.ok().and_then(|c| c.config.and_then(|c| c.image));
            remove_container(&docker, name).await?;
            // Its image, unless another builder container still runs on it.
            if let Some(image) = image {
                match docker.remove_image(&image, None::<q::RemoveImageOptions>, None).await {
                    Ok(_) => {}
                    Err(e) if not_found(&e) => {}
                    Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => {}
                    Err(e) => return Err(e).context(format!("removing the image {image}")),
                }
            }
            if volume {
                match docker.remove_volume(&names.volume, None::<q::RemoveVolumeOptions>).await {
                    Ok(()) => {}
                    Err(e) if not_found(&e) => {}
                    Err(e) => return Err(e).context(format!("removing the volume {}", names.volume)),
                }
                println!("removed {name}, its image and its cache (volume {})", names.volume);
            } else {
                println!("removed {name} and its image; the cache stays in volume {} (--volume removes it)", names.volume);
            }
        }
        BuilderCmd::Logs { follow } => {
            let opts = q::LogsOptionsBuilder::new().stdout(true).stderr(true).follow(follow).build();
            let mut s = docker.logs(name, Some(opts));
            let mut out = std::io::stdout();
            while let Some(chunk) = s.next().await {
                let chunk = chunk.with_context(|| format!("reading the log of {name}"))?;
                out.write_all(chunk.as_ref())?;
            }
        }
    }
    Ok(())
}
