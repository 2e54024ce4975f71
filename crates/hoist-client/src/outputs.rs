//! Outputs on the client side: the typed output of each `-o`/`--push`/`--load`/`--save`
//! ([`OutputSpec`]: what the builder makes, as the wire message, and where the client puts
//! it) and the sinks that receive an output's stream from the builder (a file, stdout, a
//! directory), or load an exported image into the local Docker engine ([`crate::load`]: only
//! the layers the engine lacks move). Parsing `-o` strings is the caller's.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use hoist_oci::compress::Compression;
use tokio::task::JoinHandle;
use v1::output::Kind;

use crate::load::{DockerEngine, LoadError, LoadReport};
use crate::{v1, Client};

/// Why an output could not be received.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// Creating, writing or flushing a file or stdout failed.
    #[error("{what}: {error}")]
    Io {
        /// What was being done, naming the output.
        what: String,
        /// The error.
        error: io::Error,
    },
    /// Extracting a `type=local` output failed.
    #[error("--output type=local: {0}")]
    Local(String),
    /// The Docker engine cannot be reached (the message names `--load`).
    #[error(transparent)]
    Engine(LoadError),
    /// Loading into the Docker engine failed.
    #[error("--load: {0}")]
    Load(#[from] LoadError),
    /// The builder sent something this output does not take.
    #[error("{0}")]
    Unexpected(String),
    /// The build ended without the builder sending this output.
    #[error("the builder did not send the output {0}")]
    Missing(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> OutputError {
    let what = what.into();
    move |error| OutputError::Io { what, error }
}

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
    /// What the builder makes.
    pub kind: Kind,
    /// Where the client puts it.
    pub dest: Dest,
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
    /// `--push`.
    pub fn push(tags: &[String]) -> OutputSpec {
        let image = v1::ImageOutput { names: tags.to_vec(), push: true, push_by_digest: false, compression: None };
        OutputSpec { kind: Kind::Image(image), dest: Dest::Builder }
    }

    /// `--load`.
    pub fn load() -> OutputSpec {
        let export = v1::ClientExportOutput { names: Vec::new(), platform: String::new(), compression: None, early: false };
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
            (Kind::ClientExport(c), Some(OutputSink::Load { engine, tags, .. })) => {
                let mut c = c.clone();
                c.platform = engine.platform.clone();
                // The engine imports the lower layers while the build runs when it pulls
                // from this machine's loopback ([`crate::load`]); `HOIST_LOAD_EARLY=0` waits
                // for the whole image.
                let env = |k: &str, v: &str| std::env::var(k).is_ok_and(|x| x == v);
                c.early = engine.remote.is_none() && !tags.is_empty() && !env("HOIST_LOAD_VIA", "archive") && !env("HOIST_LOAD_EARLY", "0");
                // Uncompressed only where no network is crossed: a builder and an engine here.
                let nearby = local_builder && engine.remote.is_none();
                c.compression.get_or_insert_with(|| {
                    layer_compression(if nearby { Compression::Uncompressed } else { Compression::default() }, false)
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

    /// Prepare to receive this output (`tags` name the image when the output names none);
    /// `None` for outputs that stay on the builder.
    pub async fn open(&self, tags: &[String]) -> Result<Option<OutputSink>, OutputError> {
        let kind = self.type_name();
        Ok(Some(match &self.dest {
            Dest::Builder => return Ok(None),
            Dest::Engine => OutputSink::load(self.names_or(tags)).await?,
            Dest::Stdout => OutputSink::Stdout { describe: format!("type={kind} to stdout") },
            Dest::Dir(d) => OutputSink::local(d.clone())?,
            Dest::File(path) => {
                let file = std::fs::File::create(path).map_err(io_err(format!("--output type={kind},dest={}", path.display())))?;
                OutputSink::File { file: io::BufWriter::new(file), path: path.clone(), kind: kind.to_string() }
            }
        }))
    }
}

/// Where an output's bytes go.
pub enum OutputSink {
    /// A file (`dest=PATH`).
    File {
        /// The open file.
        file: io::BufWriter<std::fs::File>,
        /// Its path.
        path: PathBuf,
        /// The output's `type=`, for messages.
        kind: String,
    },
    /// Standard output (`dest=-`).
    Stdout {
        /// What the output is, for messages.
        describe: String,
    },
    /// A directory a tar stream is extracted into (`type=local`), by a thread.
    Local {
        /// Chunks to the extracting thread.
        tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
        /// The extracting thread; it returns the number of entries written.
        handle: Option<std::thread::JoinHandle<Result<u64, OutputError>>>,
        /// The directory.
        dest: PathBuf,
    },
    /// The local Docker engine; the load starts when the builder's export session arrives.
    Load {
        /// The engine.
        engine: DockerEngine,
        /// The names to give the image.
        tags: Vec<String>,
        /// The running load.
        task: Option<JoinHandle<Result<LoadReport, LoadError>>>,
        /// Provisional images imported while the build runs (`early` exports).
        early: Option<crate::load::EarlyLoads>,
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
    async fn load(tags: &[String]) -> Result<OutputSink, OutputError> {
        let engine = DockerEngine::connect("--load").await.map_err(OutputError::Engine)?;
        Ok(OutputSink::Load { engine, tags: tags.to_vec(), task: None, early: None })
    }

    /// The builder exported the images of this output: load them (in the background, so
    /// that the build's other outputs, e.g. a push, proceed meanwhile).
    pub fn start_export(&mut self, client: &Client, session: v1::ExportSession) -> Result<(), OutputError> {
        match self {
            OutputSink::Load { engine, tags, task, early } => {
                if session.provisional {
                    // (One that comes after the image is not used; the builder drops it.)
                    if task.is_none() {
                        early.get_or_insert_with(|| crate::load::EarlyLoads::start(client.clone(), engine.clone())).offer(session);
                    }
                    return Ok(());
                }
                if task.is_some() {
                    return Err(OutputError::Unexpected("the builder exported the --load image twice".into()));
                }
                let (client, engine, tags, early) = (client.clone(), engine.clone(), tags.clone(), early.take());
                *task = Some(tokio::spawn(async move { crate::load::load(&client, &engine, &session, &tags, early).await }));
                Ok(())
            }
            other => {
                Err(OutputError::Unexpected(format!("the builder sent an export session for {}, which expects a stream", other.describe())))
            }
        }
    }

    /// Whether this sink has all it needs from the builder (a started load).
    pub fn started(&self) -> bool {
        matches!(self, OutputSink::Load { task: Some(_), .. })
    }

    /// A sink that extracts a tar stream into `dest` (created if missing).
    pub fn local(dest: PathBuf) -> Result<OutputSink, OutputError> {
        std::fs::create_dir_all(&dest).map_err(io_err(format!("--output type=local: creating {}", dest.display())))?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
        let d = dest.clone();
        let handle = std::thread::spawn(move || -> Result<u64, OutputError> {
            let mut reader = ChannelReader { rx, buf: Vec::new(), pos: 0 };
            let root = rustix::process::geteuid().is_root();
            let opts = hoist_oci::layer::ExtractOptions {
                whiteouts: hoist_oci::layer::WhiteoutMode::Keep,
                same_owner: root,
                ..Default::default()
            };
            let stats = hoist_oci::layer::extract_layer_tar(&mut reader, &d, &opts)
                .map_err(|e| OutputError::Local(format!("writing into {}: {e}", d.display())))?;
            // The extraction stops at the end-of-archive marker; the padding after it may
            // still be on its way: take it, or the sink would see the stream cut short.
            std::io::copy(&mut reader, &mut std::io::sink()).map_err(io_err("--output type=local: reading the rest of the stream"))?;
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
    pub async fn write(&mut self, data: Vec<u8>) -> Result<(), OutputError> {
        match self {
            OutputSink::File { file, path, .. } => file.write_all(&data).map_err(io_err(format!("writing {}", path.display()))),
            OutputSink::Stdout { .. } => io::stdout().lock().write_all(&data).map_err(io_err("writing the output to stdout")),
            OutputSink::Local { tx, dest, handle } => {
                let sender = tx.clone().ok_or_else(|| OutputError::Local(format!("extraction into {} was closed", dest.display())))?;
                let panicked = |d: &PathBuf| OutputError::Local(format!("extraction into {} panicked", d.display()));
                if tokio::task::spawn_blocking(move || sender.send(data)).await.map_err(|_| panicked(dest))?.is_ok() {
                    return Ok(());
                }
                // The extraction ended early: its own error says why.
                tx.take();
                match handle.take() {
                    Some(h) => match tokio::task::spawn_blocking(move || h.join()).await {
                        Ok(Ok(Err(e))) => Err(e),
                        Ok(Ok(Ok(_))) => Err(OutputError::Local(format!("extraction into {} ended before the output did", dest.display()))),
                        Ok(Err(_)) | Err(_) => Err(panicked(dest)),
                    },
                    None => Err(OutputError::Local(format!("extraction into {} stopped", dest.display()))),
                }
            }
            OutputSink::Load { .. } => {
                let _ = data;
                Err(OutputError::Unexpected(
                    "the builder streamed an archive for --load instead of exporting the image (is it an older hoist?)".into(),
                ))
            }
        }
    }

    /// The output is complete; returns a line for the progress display.
    pub async fn finish(self) -> Result<String, OutputError> {
        match self {
            OutputSink::File { mut file, path, kind } => {
                file.flush().map_err(io_err(format!("writing {}", path.display())))?;
                Ok(format!("exported type={kind} to {}", path.display()))
            }
            OutputSink::Stdout { describe } => {
                io::stdout().flush().map_err(io_err("writing the output to stdout"))?;
                Ok(format!("exported {describe}"))
            }
            OutputSink::Local { tx, handle, dest } => {
                drop(tx);
                let panicked = || OutputError::Local(format!("extraction into {} panicked", dest.display()));
                let n = match handle {
                    Some(h) => tokio::task::spawn_blocking(move || h.join()).await.map_err(|_| panicked())?.map_err(|_| panicked())??,
                    None => 0,
                };
                Ok(format!("exported {n} entries to {}", dest.display()))
            }
            OutputSink::Load { task, .. } => {
                let report = match task {
                    Some(h) => h.await.map_err(|e| OutputError::Unexpected(format!("--load: {e}")))??,
                    None => return Err(OutputError::Unexpected("--load: the builder did not export the image".into())),
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

    /// After [`OutputSink::abort`]: remove what a load imported before the build failed
    /// (its provisional images).
    pub async fn clean_up(&mut self) {
        if let OutputSink::Load { engine, early, .. } = self {
            if let Some(e) = early.take() {
                e.discard(engine).await;
            }
        }
    }
}

/// Finish every sink whose output the builder sent but did not end (a load waits for the
/// engine); returns a line per sink saying what it did. A sink the builder never sent
/// anything for is an error (every sink is then aborted).
pub async fn finish_sinks(sinks: &mut [Option<OutputSink>]) -> Result<Vec<String>, OutputError> {
    let mut notes = Vec::new();
    for s in sinks.iter_mut() {
        if s.as_ref().is_some_and(|s| s.started()) {
            if let Some(sink) = s.take() {
                notes.push(sink.finish().await?);
            }
        }
    }
    if let Some(s) = sinks.iter_mut().flatten().next() {
        let what = s.describe();
        for s in sinks.iter_mut().flatten() {
            s.abort();
            s.clean_up().await;
        }
        return Err(OutputError::Missing(what));
    }
    Ok(notes)
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

    fn gz(level: i32, force: bool) -> Option<v1::LayerCompression> {
        Some(v1::LayerCompression { r#type: v1::CompressionType::CompressionGzip as i32, level: Some(level), force })
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
        let sink = OutputSink::Load { engine, tags: vec![], task: None, early: None };
        let export = |o: v1::Output| match o.kind {
            Some(Kind::ClientExport(c)) => c,
            other => panic!("a load is a client export, not {other:?}"),
        };
        let local = export(OutputSpec::load().to_proto_for(Some(&sink), true));
        assert_eq!(local.platform, "linux/arm64/v8");
        assert_eq!(local.compression.unwrap().r#type, v1::CompressionType::CompressionUncompressed as i32);
        let remote = export(OutputSpec::load().to_proto_for(Some(&sink), false));
        assert_eq!(remote.compression, gz(6, false));
        assert!(!local.early, "an untagged image comes as an archive: nothing to import early");
        let OutputSink::Load { engine, .. } = sink else { unreachable!() };
        let tagged = OutputSink::Load { engine: engine.clone(), tags: vec!["app:1".into()], task: None, early: None };
        assert!(
            export(OutputSpec::load().to_proto_for(Some(&tagged), true)).early,
            "a tagged load into this machine's engine imports early"
        );
        let far = DockerEngine { remote: Some("DOCKER_HOST names another machine".into()), ..engine };
        let far = OutputSink::Load { engine: far, tags: vec!["app:1".into()], task: None, early: None };
        assert!(!export(OutputSpec::load().to_proto_for(Some(&far), true)).early, "a remote engine gets an archive");
        let sink = tagged;
        let zstd = v1::LayerCompression { r#type: v1::CompressionType::CompressionZstd as i32, level: None, force: false };
        let own = v1::ClientExportOutput { names: vec![], platform: String::new(), compression: Some(zstd), early: false };
        let docker = export(OutputSpec { kind: Kind::ClientExport(own), dest: Dest::Engine }.to_proto_for(Some(&sink), false));
        assert_eq!(docker.compression.unwrap().r#type, v1::CompressionType::CompressionZstd as i32, "an explicit compression wins");
        let oci =
            OutputSpec { kind: Kind::Oci(v1::OciArchiveOutput { names: vec![], compression: None }), dest: Dest::File("x.tar".into()) };
        let file = oci.to_proto_for(None, true);
        assert!(matches!(file.kind, Some(Kind::Oci(_))));
    }
}
