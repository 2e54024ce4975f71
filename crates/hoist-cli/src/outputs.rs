//! Outputs on the client side: `-o type=...` parsing, and the sinks that receive an
//! output's stream from the builder (a file, a directory), or load an exported image into
//! the local Docker engine ([`crate::load`]: only the layers the engine lacks move).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _};
use hoist_client::{v1, Client};
use tokio::task::JoinHandle;

use crate::load::{DockerEngine, LoadReport};

/// One `--output` (or `--push` / `--load`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSpec {
    pub kind: String,
    pub attrs: BTreeMap<String, String>,
}

impl OutputSpec {
    /// Parse `type=local,dest=out`, a bare path (local), or `-` (a tar on stdout).
    pub fn parse(s: &str) -> anyhow::Result<OutputSpec> {
        if s == "-" {
            return Ok(OutputSpec { kind: "tar".into(), attrs: [("dest".to_string(), "-".to_string())].into_iter().collect() });
        }
        if !s.contains('=') {
            return Ok(OutputSpec { kind: "local".into(), attrs: [("dest".to_string(), s.to_string())].into_iter().collect() });
        }
        let mut kind = None;
        let mut attrs = BTreeMap::new();
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| anyhow!("--output {s:?}: expected key=value pairs, got {part:?}"))?;
            if k == "type" {
                kind = Some(v.to_string());
            } else {
                attrs.insert(k.to_string(), v.to_string());
            }
        }
        let kind = kind.ok_or_else(|| anyhow!("--output {s:?}: type= is required (image, registry, docker, oci, tar or local)"))?;
        match kind.as_str() {
            "image" | "registry" => {}
            "docker" => {}
            "oci" | "tar" | "local" => {
                if !attrs.contains_key("dest") {
                    bail!("--output {s:?}: dest= is required for type={kind}");
                }
            }
            other => bail!("--output {s:?}: unknown type {other:?} (expected image, registry, docker, oci, tar or local)"),
        }
        Ok(OutputSpec { kind, attrs })
    }

    /// `--push`.
    pub fn push(tags: &[String]) -> OutputSpec {
        OutputSpec {
            kind: "image".into(),
            attrs: [("name".to_string(), tags.join(",")), ("push".to_string(), "true".to_string())].into_iter().collect(),
        }
    }

    /// `--load`.
    pub fn load() -> OutputSpec {
        OutputSpec { kind: "load".into(), attrs: BTreeMap::new() }
    }

    /// `--save`: keep the result on the builder for `hoist pull`.
    pub fn save(tags: &[String]) -> OutputSpec {
        OutputSpec { kind: "save".into(), attrs: [("name".to_string(), tags.join(","))].into_iter().collect() }
    }

    /// Whether this output pushes an image (`type=image,push=true`).
    pub fn is_push(&self) -> bool {
        self.kind == "image" && self.attrs.get("push").and_then(|v| hoist_dockerfile::gocompat::parse_bool(v.trim())) == Some(true)
    }

    /// Whether this output loads into the local Docker engine.
    pub fn is_load(&self) -> bool {
        self.kind == "load" || (self.kind == "docker" && !self.attrs.contains_key("dest"))
    }

    /// The wire form.
    pub fn to_proto(&self) -> v1::Output {
        v1::Output { r#type: self.kind.clone(), attrs: self.attrs.clone().into_iter().collect() }
    }

    /// The wire form once the sink is open: a load asks the builder for an export session
    /// of the engine's platform, with new layers uncompressed when the builder is on this
    /// machine (nothing to save on a loopback link) and gzip otherwise.
    pub fn to_proto_for(&self, sink: Option<&OutputSink>, local_builder: bool) -> v1::Output {
        match sink {
            Some(OutputSink::Load { engine, .. }) => {
                let mut attrs: std::collections::HashMap<String, String> = self.attrs.clone().into_iter().collect();
                attrs.remove("dest");
                attrs.entry("compression".into()).or_insert_with(|| if local_builder { "uncompressed" } else { "gzip" }.into());
                attrs.insert("platform".into(), engine.platform.clone());
                v1::Output { r#type: "proxy".into(), attrs }
            }
            _ => self.to_proto(),
        }
    }

    /// Prepare to receive this output; `None` for outputs that stay on the builder.
    pub async fn open(&self, tags: &[String]) -> anyhow::Result<Option<OutputSink>> {
        let dest = self.attrs.get("dest").cloned();
        Ok(Some(match (self.kind.as_str(), dest) {
            ("image" | "registry", _) => return Ok(None),
            ("save", _) => return Ok(None),
            ("load", _) | ("docker", None) => OutputSink::load(tags).await?,
            (_, Some(d)) if d == "-" => OutputSink::Stdout { describe: format!("type={} to stdout", self.kind) },
            ("local", Some(d)) => OutputSink::local(PathBuf::from(d))?,
            (_, Some(d)) => {
                let path = PathBuf::from(&d);
                let file = std::fs::File::create(&path).with_context(|| format!("--output type={},dest={d}", self.kind))?;
                OutputSink::File { file: io::BufWriter::new(file), path, kind: self.kind.clone() }
            }
            (kind, None) => bail!("output type={kind} needs dest="),
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

    #[test]
    fn output_specs() {
        assert!(OutputSpec::parse("type=image,name=r/x,push=1").unwrap().is_push(), "push is a Go boolean");
        assert!(!OutputSpec::parse("type=image,name=r/x,push=false").unwrap().is_push());
        assert!(!OutputSpec::parse("type=oci,dest=o.tar,push=true").unwrap().is_push());
        let o = OutputSpec::parse("type=oci,dest=out.tar,compression=zstd").unwrap();
        assert_eq!(o.kind, "oci");
        assert_eq!(o.attrs["compression"], "zstd");
        assert_eq!(OutputSpec::parse("outdir").unwrap().kind, "local");
        assert_eq!(OutputSpec::parse("-").unwrap().attrs["dest"], "-");
        assert!(OutputSpec::parse("type=local").is_err(), "local needs dest");
        assert!(OutputSpec::parse("type=bogus,dest=x").is_err());
        assert!(OutputSpec::parse("dest=x").is_err(), "type is required");
        let p = OutputSpec::push(&["a:1".into(), "b:2".into()]);
        assert_eq!(p.attrs["name"], "a:1,b:2");
        assert!(OutputSpec::load().is_load());
        assert!(OutputSpec::parse("type=docker").unwrap().is_load(), "type=docker without dest loads");
        assert!(!OutputSpec::parse("type=docker,dest=x.tar").unwrap().is_load());
        assert_eq!(OutputSpec::save(&["a:1".into()]).to_proto().r#type, "save");
    }

    /// A load asks the builder for an export of the engine's platform: plain tar layers
    /// from a builder on this machine, gzip from a remote one.
    #[test]
    fn a_load_requests_an_export_for_the_engine() {
        let Ok(docker) = bollard::Docker::connect_with_local_defaults() else { return };
        let engine = DockerEngine { docker, platform: "linux/arm64/v8".into(), remote: None };
        let sink = OutputSink::Load { engine, tags: vec![], task: None };
        let local = OutputSpec::load().to_proto_for(Some(&sink), true);
        assert_eq!(local.r#type, "proxy");
        assert_eq!(local.attrs["compression"], "uncompressed");
        assert_eq!(local.attrs["platform"], "linux/arm64/v8");
        let remote = OutputSpec::load().to_proto_for(Some(&sink), false);
        assert_eq!(remote.attrs["compression"], "gzip");
        let docker = OutputSpec::parse("type=docker,compression=zstd").unwrap().to_proto_for(Some(&sink), false);
        assert_eq!((docker.r#type.as_str(), docker.attrs["compression"].as_str()), ("proxy", "zstd"), "an explicit compression wins");
        let file = OutputSpec::parse("type=oci,dest=x.tar").unwrap().to_proto_for(None, true);
        assert_eq!(file.r#type, "oci");
    }
}
