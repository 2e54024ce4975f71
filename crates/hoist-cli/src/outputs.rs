//! Outputs on the client side: `-o type=...` parsing, and the sinks that receive an
//! output's stream from the builder (a file, a directory), or load an exported image into
//! the local Docker engine ([`crate::load`]: only the layers the engine lacks move).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _};
use hoist_client::{v1, Client};
use hoist_oci::compress::Compression;
use tokio::task::JoinHandle;
use v1::output::Kind;

use crate::load::{DockerEngine, LoadReport};

/// Where the client puts an output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// Nowhere: it stays on the builder or goes to a registry.
    Builder,
    /// A file (`dest=PATH`).
    File(PathBuf),
    /// Standard output (`dest=-`).
    Stdout,
    /// A directory the tar is extracted into (`type=local`).
    Dir(PathBuf),
    /// The local Docker engine (`--load`, `type=docker` without dest).
    Engine,
}

/// One `--output` (or `--push` / `--load` / `--save`): what the builder makes, as the typed
/// wire message, and where the client puts it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputSpec {
    pub kind: Kind,
    pub dest: Dest,
}

/// The keys each `type=` takes.
const IMAGE_KEYS: &[&str] = &["name", "push", "push-by-digest", "compression", "compression-level", "force-compression"];
const DOCKER_KEYS: &[&str] = &["name", "dest", "compression", "compression-level", "force-compression"];
const OCI_KEYS: &[&str] = &["name", "dest", "compression", "compression-level", "force-compression"];
const ROOTFS_KEYS: &[&str] = &["dest"];

/// Exporter options buildx takes that hoist does not implement: accepted (with a warning)
/// rather than refused, so that scripts written for `docker buildx build` run unchanged.
const BUILDX_KEYS: &[&str] = &[
    "oci-mediatypes",
    "oci-artifact",
    "unpack",
    "store",
    "dangling-name-prefix",
    "name-canonical",
    "buildinfo",
    "buildinfo-attrs",
    "rewrite-timestamp",
    "registry.insecure",
    "insecure",
    "tar",
    "platform-split",
];

fn is_buildx_key(k: &str) -> bool {
    BUILDX_KEYS.contains(&k) || k.starts_with("annotation")
}

/// A `-o` option's attributes, which say which one is bad.
struct Attrs<'a> {
    spec: &'a str,
    kind: &'a str,
    map: BTreeMap<&'a str, &'a str>,
}

impl<'a> Attrs<'a> {
    fn check_keys(&self, allowed: &[&str]) -> anyhow::Result<()> {
        for k in self.map.keys() {
            if allowed.contains(k) {
                continue;
            }
            if is_buildx_key(k) {
                // A CI script written for buildx keeps working; the user is told what hoist
                // does not do.
                eprintln!("hoist: --output {:?}: {k}= is a buildx option hoist does not support yet; it is ignored", self.spec);
                continue;
            }
            bail!("--output {:?}: unknown key {k:?} for type={} (it takes {})", self.spec, self.kind, allowed.join(", "));
        }
        Ok(())
    }

    fn names(&self) -> Vec<String> {
        self.map.get("name").map(|n| n.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()).unwrap_or_default()
    }

    /// A boolean as BuildKit reads it (Go's `strconv.ParseBool`); absent is false.
    fn bool(&self, key: &str) -> anyhow::Result<bool> {
        match self.map.get(key).map(|v| v.trim()) {
            None => Ok(false),
            Some(v) => hoist_dockerfile::gocompat::parse_bool(v)
                .ok_or_else(|| anyhow!("--output {:?}: invalid {key} {v:?}: expected true or false", self.spec)),
        }
    }

    /// `compression=`, `compression-level=`, `force-compression=`; `None` when none is given.
    fn compression(&self) -> anyhow::Result<Option<v1::LayerCompression>> {
        let keys = ["compression", "compression-level", "force-compression"];
        if !keys.iter().any(|k| self.map.contains_key(k)) {
            return Ok(None);
        }
        let c = Compression::from_attrs(self.map.iter().map(|(k, v)| (*k, *v))).with_context(|| format!("--output {:?}", self.spec))?;
        Ok(Some(layer_compression(c, self.bool("force-compression")?)))
    }

    fn dest(&self) -> anyhow::Result<Dest> {
        match self.map.get("dest") {
            None => bail!("--output {:?}: dest= is required for type={}", self.spec, self.kind),
            Some(&"") => bail!("--output {:?}: dest= is empty; name a file, or - for stdout", self.spec),
            Some(&"-") => Ok(Dest::Stdout),
            Some(d) => Ok(Dest::File(PathBuf::from(d))),
        }
    }
}

/// The wire form of a layer compression.
pub fn layer_compression(c: Compression, force: bool) -> v1::LayerCompression {
    let (t, level) = match c {
        Compression::Gzip { level } => (v1::CompressionType::CompressionGzip, Some(level as i32)),
        Compression::Zstd { level } => (v1::CompressionType::CompressionZstd, Some(level)),
        Compression::Uncompressed => (v1::CompressionType::CompressionUncompressed, None),
    };
    v1::LayerCompression { r#type: t as i32, level, force }
}

impl OutputSpec {
    /// Parse `type=local,dest=out`, a bare path (local), or `-` (a tar on stdout).
    pub fn parse(s: &str) -> anyhow::Result<OutputSpec> {
        if s == "-" {
            return Ok(OutputSpec { kind: Kind::Tar(v1::TarOutput {}), dest: Dest::Stdout });
        }
        if !s.contains('=') {
            return Ok(OutputSpec { kind: Kind::Local(v1::LocalOutput {}), dest: Dest::Dir(PathBuf::from(s)) });
        }
        let mut kind = None;
        let mut map = BTreeMap::new();
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| anyhow!("--output {s:?}: expected key=value pairs, got {part:?}"))?;
            let k = k.trim();
            if k == "type" {
                if kind.replace(v.trim()).is_some() {
                    bail!("--output {s:?}: type= is given twice");
                }
            } else if map.insert(k, v).is_some() {
                bail!("--output {s:?}: key {k:?} is given twice");
            }
        }
        let kind = kind.ok_or_else(|| anyhow!("--output {s:?}: type= is required (image, registry, docker, oci, tar or local)"))?;
        let a = Attrs { spec: s, kind, map };
        Ok(match kind {
            "image" | "registry" => {
                a.check_keys(IMAGE_KEYS)?;
                let image = v1::ImageOutput {
                    names: a.names(),
                    push: kind == "registry" || a.bool("push")?,
                    push_by_digest: a.bool("push-by-digest")?,
                    compression: a.compression()?,
                };
                OutputSpec { kind: Kind::Image(image), dest: Dest::Builder }
            }
            "docker" => {
                a.check_keys(DOCKER_KEYS)?;
                if a.map.contains_key("dest") {
                    OutputSpec { kind: Kind::Docker(v1::DockerArchiveOutput { names: a.names() }), dest: a.dest()? }
                } else {
                    // No file: load it into the local engine, as buildx does.
                    let export = v1::ClientExportOutput { names: a.names(), platform: String::new(), compression: a.compression()? };
                    OutputSpec { kind: Kind::ClientExport(export), dest: Dest::Engine }
                }
            }
            "oci" => {
                a.check_keys(OCI_KEYS)?;
                OutputSpec { kind: Kind::Oci(v1::OciArchiveOutput { names: a.names(), compression: a.compression()? }), dest: a.dest()? }
            }
            "tar" => {
                a.check_keys(ROOTFS_KEYS)?;
                OutputSpec { kind: Kind::Tar(v1::TarOutput {}), dest: a.dest()? }
            }
            "local" => {
                a.check_keys(ROOTFS_KEYS)?;
                let dest = match a.dest()? {
                    Dest::File(d) => Dest::Dir(d),
                    other => other,
                };
                OutputSpec { kind: Kind::Local(v1::LocalOutput {}), dest }
            }
            other => bail!("--output {s:?}: unknown type {other:?} (expected image, registry, docker, oci, tar or local)"),
        })
    }

    /// `--push`.
    pub fn push(tags: &[String]) -> OutputSpec {
        let image = v1::ImageOutput { names: tags.to_vec(), push: true, push_by_digest: false, compression: None };
        OutputSpec { kind: Kind::Image(image), dest: Dest::Builder }
    }

    /// `--load`.
    pub fn load() -> OutputSpec {
        let export = v1::ClientExportOutput { names: Vec::new(), platform: String::new(), compression: None };
        OutputSpec { kind: Kind::ClientExport(export), dest: Dest::Engine }
    }

    /// `--save`: keep the result on the builder for `hoist pull`.
    pub fn save(tags: &[String]) -> OutputSpec {
        OutputSpec { kind: Kind::Save(v1::SaveOutput { names: tags.to_vec() }), dest: Dest::Builder }
    }

    /// Whether this output pushes an image.
    pub fn is_push(&self) -> bool {
        matches!(&self.kind, Kind::Image(i) if i.push)
    }

    /// Whether this output loads into the local Docker engine.
    pub fn is_load(&self) -> bool {
        self.dest == Dest::Engine
    }

    /// The `type=` of this output, for messages.
    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            Kind::Image(_) => "image",
            Kind::Docker(_) => "docker",
            Kind::Oci(_) => "oci",
            Kind::Tar(_) => "tar",
            Kind::Local(_) => "local",
            Kind::Save(_) => "save",
            Kind::ClientExport(_) => "docker",
        }
    }

    /// A push of this builder's manifests by digest only (the client pushes the index).
    pub fn by_digest(&self) -> OutputSpec {
        let mut o = self.clone();
        if let Kind::Image(i) = &mut o.kind {
            i.push_by_digest = true;
        }
        o
    }

    /// The wire form.
    pub fn to_proto(&self) -> v1::Output {
        v1::Output { kind: Some(self.kind.clone()) }
    }

    /// The wire form once the sink is open: a load asks the builder for an export of the
    /// engine's platform, with new layers uncompressed when the builder is on this machine
    /// (nothing to save on a loopback link) and gzip otherwise, unless the output says.
    pub fn to_proto_for(&self, sink: Option<&OutputSink>, local_builder: bool) -> v1::Output {
        match (&self.kind, sink) {
            (Kind::ClientExport(c), Some(OutputSink::Load { engine, .. })) => {
                let mut c = c.clone();
                c.platform = engine.platform.clone();
                c.compression.get_or_insert_with(|| {
                    layer_compression(if local_builder { Compression::Uncompressed } else { Compression::default() }, false)
                });
                v1::Output { kind: Some(Kind::ClientExport(c)) }
            }
            _ => self.to_proto(),
        }
    }

    /// The names this output gives the image: its own, else the build's tags.
    fn names_or<'a>(&'a self, tags: &'a [String]) -> &'a [String] {
        let own = match &self.kind {
            Kind::Image(i) => &i.names,
            Kind::Docker(d) => &d.names,
            Kind::Oci(o) => &o.names,
            Kind::Save(s) => &s.names,
            Kind::ClientExport(c) => &c.names,
            Kind::Tar(_) | Kind::Local(_) => return tags,
        };
        if own.is_empty() {
            tags
        } else {
            own
        }
    }

    /// Prepare to receive this output; `None` for outputs that stay on the builder.
    pub async fn open(&self, tags: &[String]) -> anyhow::Result<Option<OutputSink>> {
        let kind = self.type_name();
        Ok(Some(match &self.dest {
            Dest::Builder => return Ok(None),
            Dest::Engine => OutputSink::load(self.names_or(tags)).await?,
            Dest::Stdout => OutputSink::Stdout { describe: format!("type={kind} to stdout") },
            Dest::Dir(d) => OutputSink::local(d.clone())?,
            Dest::File(path) => {
                let file = std::fs::File::create(path).with_context(|| format!("--output type={kind},dest={}", path.display()))?;
                OutputSink::File { file: io::BufWriter::new(file), path: path.clone(), kind: kind.to_string() }
            }
        }))
    }
}

/// Where an output's bytes go.
pub enum OutputSink {
    File {
        file: io::BufWriter<std::fs::File>,
        path: PathBuf,
        kind: String,
    },
    Stdout {
        describe: String,
    },
    Local {
        tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
        handle: Option<std::thread::JoinHandle<anyhow::Result<u64>>>,
        dest: PathBuf,
    },
    /// The local Docker engine; the load starts when the builder's export session arrives.
    Load {
        engine: DockerEngine,
        tags: Vec<String>,
        task: Option<JoinHandle<anyhow::Result<LoadReport>>>,
    },
}

/// Reads what a channel delivers.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.rx.recv() {
                Ok(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl OutputSink {
    async fn load(tags: &[String]) -> anyhow::Result<OutputSink> {
        let engine = DockerEngine::connect("--load").await?;
        Ok(OutputSink::Load { engine, tags: tags.to_vec(), task: None })
    }

    /// The builder exported the images of this output: load them (in the background, so
    /// that the build's other outputs, e.g. a push, proceed meanwhile).
    pub fn start_export(&mut self, client: &Client, session: v1::ExportSession) -> anyhow::Result<()> {
        match self {
            OutputSink::Load { engine, tags, task } => {
                if task.is_some() {
                    bail!("the builder exported the --load image twice");
                }
                let (client, engine, tags) = (client.clone(), engine.clone(), tags.clone());
                *task = Some(tokio::spawn(async move { crate::load::load(&client, &engine, &session, &tags).await }));
                Ok(())
            }
            other => bail!("the builder sent an export session for {}, which expects a stream", other.describe()),
        }
    }

    /// Whether this sink has all it needs from the builder (a started load).
    pub fn started(&self) -> bool {
        matches!(self, OutputSink::Load { task: Some(_), .. })
    }

    fn local(dest: PathBuf) -> anyhow::Result<OutputSink> {
        std::fs::create_dir_all(&dest).with_context(|| format!("--output type=local: creating {}", dest.display()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
        let d = dest.clone();
        let handle = std::thread::spawn(move || -> anyhow::Result<u64> {
            let mut reader = ChannelReader { rx, buf: Vec::new(), pos: 0 };
            let root = rustix::process::geteuid().is_root();
            let opts = hoist_oci::layer::ExtractOptions {
                whiteouts: hoist_oci::layer::WhiteoutMode::Keep,
                same_owner: root,
                ..Default::default()
            };
            let stats = hoist_oci::layer::extract_layer_tar(&mut reader, &d, &opts)
                .with_context(|| format!("--output type=local: writing into {}", d.display()))?;
            // The extraction stops at the end-of-archive marker; the padding after it may
            // still be on its way: take it, or the sink would see the stream cut short.
            std::io::copy(&mut reader, &mut std::io::sink()).context("--output type=local: reading the rest of the stream")?;
            Ok(stats.entries)
        });
        Ok(OutputSink::Local { tx: Some(tx), handle: Some(handle), dest })
    }

    /// What this sink is, for messages.
    pub fn describe(&self) -> String {
        match self {
            OutputSink::File { path, kind, .. } => format!("type={kind},dest={}", path.display()),
            OutputSink::Stdout { describe } => describe.clone(),
            OutputSink::Local { dest, .. } => format!("type=local,dest={}", dest.display()),
            OutputSink::Load { .. } => "--load".into(),
        }
    }

    /// Take the next chunk.
    pub async fn write(&mut self, data: Vec<u8>) -> anyhow::Result<()> {
        match self {
            OutputSink::File { file, path, .. } => file.write_all(&data).with_context(|| format!("writing {}", path.display())),
            OutputSink::Stdout { .. } => io::stdout().lock().write_all(&data).context("writing the output to stdout"),
            OutputSink::Local { tx, dest, handle } => {
                let sender = tx.clone().ok_or_else(|| anyhow!("output closed"))?;
                if tokio::task::spawn_blocking(move || sender.send(data)).await?.is_ok() {
                    return Ok(());
                }
                // The extraction ended early: its own error says why.
                tx.take();
                match handle.take() {
                    Some(h) => match tokio::task::spawn_blocking(move || h.join()).await? {
                        Ok(Err(e)) => Err(e),
                        Ok(Ok(_)) => Err(anyhow!("--output type=local: extraction into {} ended before the output did", dest.display())),
                        Err(_) => Err(anyhow!("--output type=local: extraction into {} panicked", dest.display())),
                    },
                    None => Err(anyhow!("--output type=local: extraction into {} stopped", dest.display())),
                }
            }
            OutputSink::Load { .. } => {
                let _ = data;
                bail!("the builder streamed an archive for --load instead of exporting the image (is it an older hoist?)")
            }
        }
    }

    /// The output is complete; returns a line for the progress display.
    pub async fn finish(self) -> anyhow::Result<String> {
        match self {
            OutputSink::File { mut file, path, kind } => {
                file.flush().with_context(|| format!("writing {}", path.display()))?;
                Ok(format!("exported type={kind} to {}", path.display()))
            }
            OutputSink::Stdout { describe } => {
                io::stdout().flush()?;
                Ok(format!("exported {describe}"))
            }
            OutputSink::Local { tx, handle, dest } => {
                drop(tx);
                let n = match handle {
                    Some(h) => tokio::task::spawn_blocking(move || h.join()).await?.map_err(|_| anyhow!("extraction panicked"))??,
                    None => 0,
                };
                Ok(format!("exported {n} entries to {}", dest.display()))
            }
            OutputSink::Load { task, .. } => {
                let report = match task {
                    Some(h) => h.await.map_err(|e| anyhow!("--load: {e}"))?.context("--load")?,
                    None => bail!("--load: the builder did not export the image"),
                };
                Ok(report.line("--load"))
            }
        }
    }

    /// Drop a half-received output (a failed build must not leave a truncated file).
    pub fn abort(&mut self) {
        match self {
            OutputSink::File { path, .. } => {
                let _ = std::fs::remove_file(path);
            }
            OutputSink::Local { tx, .. } => {
                tx.take();
            }
            OutputSink::Load { task, .. } => {
                if let Some(h) = task.take() {
                    h.abort();
                }
            }
            OutputSink::Stdout { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (CI, under load): the extraction stops at the end-of-archive marker, and
    /// when the padding after it arrived in a later chunk, the sink failed with "extraction
    /// stopped" although every file was written.
    #[tokio::test]
    async fn a_local_output_takes_the_padding_that_follows_the_archive() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, "hello.txt", &b"hello"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut sink = OutputSink::local(dir.path().join("out")).unwrap();
        // The archive with the first zero block of its end marker, then the rest alone.
        sink.write(tar[..1024].to_vec()).await.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        sink.write(tar[1024..].to_vec()).await.unwrap();
        sink.write(vec![0; 8192]).await.unwrap();
        sink.finish().await.unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("out/hello.txt")).unwrap(), "hello");
    }

    fn kind(s: &str) -> Kind {
        OutputSpec::parse(s).unwrap().kind
    }

    fn err(s: &str) -> String {
        format!("{:#}", OutputSpec::parse(s).unwrap_err())
    }

    fn gz(level: i32, force: bool) -> Option<v1::LayerCompression> {
        Some(v1::LayerCompression { r#type: v1::CompressionType::CompressionGzip as i32, level: Some(level), force })
    }

    #[test]
    fn output_strings_map_to_typed_outputs() {
        assert_eq!(
            kind("type=image,name=r/x:1,push=1,compression=zstd,compression-level=19,force-compression=true"),
            Kind::Image(v1::ImageOutput {
                names: vec!["r/x:1".into()],
                push: true,
                push_by_digest: false,
                compression: Some(v1::LayerCompression {
                    r#type: v1::CompressionType::CompressionZstd as i32,
                    level: Some(19),
                    force: true
                }),
            })
        );
        assert_eq!(
            kind("type=registry,name=r/x"),
            Kind::Image(v1::ImageOutput { names: vec!["r/x".into()], push: true, push_by_digest: false, compression: None }),
            "type=registry pushes"
        );
        assert!(OutputSpec::parse("type=image,name=r/x,push=1").unwrap().is_push(), "push is a Go boolean");
        assert!(!OutputSpec::parse("type=image,name=r/x,push=false").unwrap().is_push());
        assert!(matches!(kind("type=image,push-by-digest=true"), Kind::Image(i) if i.push_by_digest && !i.push));
        let oci = OutputSpec::parse("type=oci,dest=out.tar,compression=gzip,compression-level=1").unwrap();
        assert_eq!(oci.kind, Kind::Oci(v1::OciArchiveOutput { names: vec![], compression: gz(1, false) }));
        assert_eq!(oci.dest, Dest::File("out.tar".into()));
        assert_eq!(
            kind("type=oci,dest=o.tar,compression=uncompressed"),
            Kind::Oci(v1::OciArchiveOutput {
                names: vec![],
                compression: Some(v1::LayerCompression {
                    r#type: v1::CompressionType::CompressionUncompressed as i32,
                    level: None,
                    force: false
                }),
            })
        );
        assert_eq!(
            kind("type=oci,dest=o.tar,force-compression=1"),
            Kind::Oci(v1::OciArchiveOutput { names: vec![], compression: gz(6, true) })
        );
        let docker = OutputSpec::parse("type=docker,dest=-,name=app:1").unwrap();
        assert_eq!((docker.kind, docker.dest), (Kind::Docker(v1::DockerArchiveOutput { names: vec!["app:1".into()] }), Dest::Stdout));
        let tar = OutputSpec::parse("type=tar,dest=fs.tar").unwrap();
        assert_eq!((tar.kind, tar.dest), (Kind::Tar(v1::TarOutput {}), Dest::File("fs.tar".into())));
        let local = OutputSpec::parse("type=local,dest=out").unwrap();
        assert_eq!((local.kind, local.dest), (Kind::Local(v1::LocalOutput {}), Dest::Dir("out".into())));
        assert_eq!(OutputSpec::parse("outdir").unwrap().dest, Dest::Dir("outdir".into()), "a bare path is a local output");
        assert_eq!(OutputSpec::parse("-").unwrap(), OutputSpec { kind: Kind::Tar(v1::TarOutput {}), dest: Dest::Stdout });
    }

    #[test]
    fn load_push_and_save_flags_map_to_typed_outputs() {
        let p = OutputSpec::push(&["a:1".into(), "b:2".into()]);
        assert_eq!(
            p.kind,
            Kind::Image(v1::ImageOutput { names: vec!["a:1".into(), "b:2".into()], push: true, push_by_digest: false, compression: None })
        );
        assert!(p.is_push() && !p.is_load());
        assert!(matches!(p.by_digest().kind, Kind::Image(i) if i.push && i.push_by_digest), "a multi-builder push goes by digest");
        let l = OutputSpec::load();
        assert!(l.is_load() && !l.is_push());
        assert!(matches!(l.to_proto().kind, Some(Kind::ClientExport(_))), "--load is a client export");
        let docker = OutputSpec::parse("type=docker").unwrap();
        assert!(docker.is_load(), "type=docker without dest loads");
        assert!(matches!(docker.kind, Kind::ClientExport(_)));
        assert!(!OutputSpec::parse("type=docker,dest=x.tar").unwrap().is_load());
        assert_eq!(OutputSpec::save(&["a:1".into()]).to_proto().kind, Some(Kind::Save(v1::SaveOutput { names: vec!["a:1".into()] })));
        // Without a sink, a load's wire form is the spec's own.
        assert_eq!(
            OutputSpec::parse("type=oci,dest=x.tar").unwrap().to_proto_for(None, true).kind.map(|k| matches!(k, Kind::Oci(_))),
            Some(true)
        );
    }

    /// Regression (issue 6): `force-compression=maybe` (or `=1`) was silently taken as false.
    #[test]
    fn force_compression_is_a_boolean_and_bad_values_name_the_option() {
        assert!(matches!(kind("type=oci,dest=x,compression=zstd,force-compression=1"), Kind::Oci(o) if o.compression.unwrap().force));
        assert!(matches!(kind("type=oci,dest=x,force-compression=False"), Kind::Oci(o) if !o.compression.unwrap().force));
        let e = err("type=oci,dest=x,force-compression=maybe");
        assert!(e.contains("force-compression") && e.contains("maybe"), "{e}");
    }

    /// A script written for buildx keeps working: its exporter options hoist lacks are
    /// ignored (with a warning), while a typo is still an error.
    #[test]
    fn buildx_options_hoist_lacks_are_accepted_and_typos_are_not() {
        let k = kind("type=image,name=r/app,push=true,oci-mediatypes=true,annotation.org.opencontainers.image.title=x,store=false");
        assert!(matches!(k, Kind::Image(i) if i.push && i.names == ["r/app"]));
        assert!(matches!(kind("type=oci,dest=x,tar=true"), Kind::Oci(_)));
        assert!(err("type=image,name=r/app,pushh=true").contains("unknown key \"pushh\""));
    }

    #[test]
    fn bad_outputs_name_the_bad_key_or_value() {
        for (spec, needles) in [
            ("type=local", &["dest=", "type=local"][..]),
            ("type=oci", &["dest=", "type=oci"]),
            ("type=tar,dest=", &["dest= is empty"]),
            ("type=bogus,dest=x", &["unknown type", "\"bogus\""]),
            ("dest=x", &["type= is required"]),
            ("type=oci,dest=x,push=true", &["unknown key \"push\"", "type=oci"]),
            ("type=image,dest=x", &["unknown key \"dest\"", "type=image"]),
            ("type=local,dest=x,compression=zstd", &["unknown key \"compression\""]),
            ("type=image,name=a,name=b", &["\"name\" is given twice"]),
            ("type=image,type=oci", &["type= is given twice"]),
            ("type=image,push", &["key=value", "\"push\""]),
            ("type=image,push=maybe", &["push", "maybe"]),
            ("type=image,push-by-digest=2", &["push-by-digest", "\"2\""]),
            ("type=image,compression=lz4", &["lz4"]),
            ("type=oci,dest=x,compression=gzip,compression-level=99", &["compression-level", "99", "0..=9"]),
            ("type=oci,dest=x,compression=zstd,compression-level=fast", &["compression-level", "fast", "zstd"]),
        ] {
            let e = err(spec);
            for n in needles {
                assert!(e.contains(n), "the error for {spec:?} names {n:?}: {e}");
            }
        }
    }

    /// A load asks the builder for an export of the engine's platform: plain tar layers
    /// from a builder on this machine, gzip from a remote one.
    #[test]
    fn a_load_requests_an_export_for_the_engine() {
        let docker = bollard::Docker::connect_with_local_defaults();
        if !hoist_oci::testing::needs("a Docker client configuration", docker.is_ok()) {
            return;
        }
        let engine = DockerEngine { docker: docker.unwrap(), platform: "linux/arm64/v8".into(), remote: None };
        let sink = OutputSink::Load { engine, tags: vec![], task: None };
        let export = |o: v1::Output| match o.kind {
            Some(Kind::ClientExport(c)) => c,
            other => panic!("a load is a client export, not {other:?}"),
        };
        let local = export(OutputSpec::load().to_proto_for(Some(&sink), true));
        assert_eq!(local.platform, "linux/arm64/v8");
        assert_eq!(local.compression.unwrap().r#type, v1::CompressionType::CompressionUncompressed as i32);
        let remote = export(OutputSpec::load().to_proto_for(Some(&sink), false));
        assert_eq!(remote.compression, gz(6, false));
        let docker = export(OutputSpec::parse("type=docker,compression=zstd").unwrap().to_proto_for(Some(&sink), false));
        assert_eq!(docker.compression.unwrap().r#type, v1::CompressionType::CompressionZstd as i32, "an explicit compression wins");
        let file = OutputSpec::parse("type=oci,dest=x.tar").unwrap().to_proto_for(None, true);
        assert!(matches!(file.kind, Some(Kind::Oci(_))));
    }
}
