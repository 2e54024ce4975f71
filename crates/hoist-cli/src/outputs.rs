//! Outputs on the client side: `-o type=...` parsing, and the sinks that receive an
//! output's stream from the builder (a file, a directory, or the local Docker engine).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _};
use bollard::Docker;
use bytes::Bytes;
use futures::StreamExt;
use hoist_client::v1;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

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

    /// The wire form.
    pub fn to_proto(&self) -> v1::Output {
        v1::Output { r#type: self.kind.clone(), attrs: self.attrs.clone().into_iter().collect() }
    }

    /// Prepare to receive this output; `None` for outputs that stay on the builder.
    pub async fn open(&self, tags: &[String]) -> anyhow::Result<Option<OutputSink>> {
        let dest = self.attrs.get("dest").cloned();
        Ok(Some(match (self.kind.as_str(), dest) {
            ("image" | "registry", _) => return Ok(None),
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
    File { file: io::BufWriter<std::fs::File>, path: PathBuf, kind: String },
    Stdout { describe: String },
    Local { tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>, handle: Option<std::thread::JoinHandle<anyhow::Result<u64>>>, dest: PathBuf },
    Load { tx: Option<mpsc::Sender<Result<Bytes, io::Error>>>, handle: Option<JoinHandle<anyhow::Result<String>>>, bytes: u64 },
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
    async fn load(_tags: &[String]) -> anyhow::Result<OutputSink> {
        let docker = Docker::connect_with_local_defaults().context("--load: connecting to the Docker engine")?;
        let docker = docker.negotiate_version().await.context("--load: the Docker engine does not answer (is dockerd running? DOCKER_HOST?)")?;
        let (tx, rx) = mpsc::channel::<Result<Bytes, io::Error>>(16);
        let handle = tokio::spawn(async move {
            let opts = bollard::query_parameters::ImportImageOptionsBuilder::new().quiet(true).build();
            let mut s = docker.import_image_stream(opts, tokio_stream::wrappers::ReceiverStream::new(rx), None);
            let mut msgs = String::new();
            while let Some(r) = s.next().await {
                let info = r.context("--load: the Docker engine refused the image")?;
                if let Some(e) = info.error_detail.and_then(|d| d.message) {
                    bail!("--load: {e}");
                }
                if let Some(m) = info.stream {
                    msgs.push_str(&m);
                }
            }
            Ok(msgs.trim().to_string())
        });
        Ok(OutputSink::Load { tx: Some(tx), handle: Some(handle), bytes: 0 })
    }

    fn local(dest: PathBuf) -> anyhow::Result<OutputSink> {
        std::fs::create_dir_all(&dest).with_context(|| format!("--output type=local: creating {}", dest.display()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
        let d = dest.clone();
        let handle = std::thread::spawn(move || -> anyhow::Result<u64> {
            let reader = ChannelReader { rx, buf: Vec::new(), pos: 0 };
            let root = rustix::process::geteuid().is_root();
            let opts = hoist_oci::layer::ExtractOptions {
                whiteouts: hoist_oci::layer::WhiteoutMode::Keep,
                same_owner: root,
                ..Default::default()
            };
            let stats = hoist_oci::layer::extract_layer_tar(reader, &d, &opts).with_context(|| format!("--output type=local: writing into {}", d.display()))?;
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
            OutputSink::Local { tx, dest, .. } => {
                let tx = tx.clone().ok_or_else(|| anyhow!("output closed"))?;
                tokio::task::spawn_blocking(move || tx.send(data))
                    .await?
                    .map_err(|_| anyhow!("--output type=local: extraction into {} stopped", dest.display()))
            }
            OutputSink::Load { tx, bytes, .. } => {
                *bytes += data.len() as u64;
                let tx = tx.as_ref().ok_or_else(|| anyhow!("output closed"))?;
                if tx.send(Ok(Bytes::from(data))).await.is_err() {
                    bail!("--load: the Docker engine stopped reading the image");
                }
                Ok(())
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
            OutputSink::Load { tx, handle, bytes } => {
                drop(tx);
                let msg = match handle {
                    Some(h) => h.await??,
                    None => String::new(),
                };
                Ok(format!("loaded into the Docker engine ({}): {msg}", crate::build::human_bytes(bytes)))
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
            OutputSink::Load { tx, handle, .. } => {
                tx.take();
                if let Some(h) = handle.take() {
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

    #[test]
    fn output_specs() {
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
    }
}
