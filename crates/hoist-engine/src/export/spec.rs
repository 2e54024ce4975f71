//! The one exporter interface: a typed [`OutputSpec`] is resolved (checked, before the build
//! runs) into an [`Exporter`], which exports a build's images wherever its spec says. The
//! solver never knows which output it feeds; the builder service only maps its wire
//! messages to specs and carries what an export returns (streamed bytes, an export session,
//! push reports) back to the client. BuildKit's `exporter.Exporter` has the same shape:
//! `Resolve(attrs)` gives an instance that `Export`s.

use std::io::{self, Write};

use hoist_oci::archive;
use hoist_oci::compress::Compression;
use hoist_oci::digest::Digest;
use hoist_oci::reference::Reference;
use hoist_oci::registry::RegistryClient;

use super::client::{select_platform, ClientExport};
use super::{push_result, ExportError, ExportedImage, PushOutcome};
use crate::cache::SavedRecord;
use crate::graph::Platform;
use crate::{BuiltImage, Engine, EngineError, LayerNeeds};

/// Errors of output specs: found when an output is resolved (before the build), or when the
/// build's images do not fit it.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// A name that is not an image reference.
    #[error("output name {name:?}: {reason}")]
    BadName {
        /// The name as given.
        name: String,
        /// Why it is not a reference.
        reason: String,
    },
    /// A push with nowhere to push to.
    #[error("--push needs at least one -t/--tag (or name= in --output)")]
    PushWithoutName,
    /// A compression level out of range for its algorithm.
    #[error("invalid compression-level {level} for {compression}: expected an integer in {range}")]
    BadLevel {
        /// The algorithm (`gzip`, `zstd`).
        compression: &'static str,
        /// The level asked for.
        level: i32,
        /// The levels it takes, e.g. `0..=9`.
        range: String,
    },
    /// A platform that does not parse.
    #[error("output platform {platform:?}: {reason}")]
    BadPlatform {
        /// The platform as given.
        platform: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The build made no image for the platform the output asks for.
    #[error("the build has no image for {platform} (it built {built})")]
    NoImageFor {
        /// The platform the output asks for.
        platform: String,
        /// The platforms the build made, comma-separated.
        built: String,
    },
    /// The build made no image at all.
    #[error("the build produced no image")]
    NoImage,
    /// No saved result of that name.
    #[error("no saved image {0:?} in this project (save one with `hoist build --save -t NAME`)")]
    NoSaved(String),
    /// An `--annotation` that does not fit the build's images.
    #[error(transparent)]
    Annotation(#[from] super::annotations::AnnotationError),
    /// A saved result whose images cannot be read back.
    #[error("saved image {name:?}: {message}")]
    SavedBroken {
        /// The name `hoist pull` was given.
        name: String,
        /// What is missing or unreadable.
        message: String,
    },
}

/// How an output makes blobs of the image's new layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerCompression {
    /// Algorithm and level of new layer blobs.
    pub compression: Compression,
    /// Re-compress base layers too (their original blobs are kept otherwise).
    pub force: bool,
}

impl LayerCompression {
    /// `compression` at `level` (`None`: the algorithm's default), checked.
    pub fn new(compression: Compression, force: bool) -> Result<LayerCompression, OutputError> {
        let bad = |c: &'static str, level: i32, range: String| OutputError::BadLevel { compression: c, level, range };
        match compression {
            Compression::Gzip { level } if level > 9 => return Err(bad("gzip", level as i32, "0..=9".into())),
            Compression::Zstd { level } => {
                let range = zstd_levels();
                if !range.contains(&level) {
                    return Err(bad("zstd", level, format!("{}..={}", range.start(), range.end())));
                }
            }
            _ => {}
        }
        Ok(LayerCompression { compression, force })
    }
}

fn zstd_levels() -> std::ops::RangeInclusive<i32> {
    hoist_oci::compress::zstd_level_range()
}

/// What an output asks for: one kind, with its own typed fields. Names left empty default
/// to the build's tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputSpec {
    /// Image manifests (and an index for several platforms) in the content store; with
    /// `push`, pushed to every name (by digest only, moving no tag, with `push_by_digest`).
    Image {
        /// Names (references) to push to and to record.
        names: Vec<String>,
        /// Push to every name.
        push: bool,
        /// Push the manifests by digest only, moving no tag.
        push_by_digest: bool,
        /// How layer blobs are made.
        layers: LayerCompression,
    },
    /// A `docker save` archive of the host platform's image, streamed.
    DockerArchive {
        /// The `RepoTags` of the archive.
        names: Vec<String>,
    },
    /// An OCI image layout tar, streamed.
    OciArchive {
        /// The `org.opencontainers.image.ref.name` annotations of the layout's index.
        names: Vec<String>,
        /// How layer blobs are made.
        layers: LayerCompression,
    },
    /// The host platform's flattened root filesystem as a tar, streamed (`type=tar`, and
    /// `type=local`, which the client extracts).
    Rootfs,
    /// Keep the result on the builder for the project (`--save`, read by `hoist pull`).
    Save {
        /// The tags `hoist pull` finds it by (besides its build id).
        names: Vec<String>,
    },
    /// Export the images for the client to read blob by blob (`--load`): the platform's
    /// image only when one is given.
    Client {
        /// The names the client gives the loaded image.
        names: Vec<String>,
        /// Only the image of this platform (`os/arch[/variant]`); all when `None`.
        platform: Option<String>,
        /// How layer blobs are made (plain tar for a builder on the client's machine).
        layers: LayerCompression,
    },
}

/// An output spec resolved against a build's tags: names checked, ready to export.
#[derive(Debug, Clone)]
pub struct Exporter {
    kind: Resolved,
    /// The names the output gives the image (its own, else the build's tags).
    names: Vec<String>,
    /// Whether the spec named its images itself.
    named: bool,
    /// Annotations and attestations of image outputs (pushes, OCI archives).
    meta: std::sync::Arc<super::ImageMeta>,
}

#[derive(Debug, Clone)]
enum Resolved {
    Image { refs: Vec<Reference>, push: bool, by_digest: bool, layers: LayerCompression },
    DockerArchive,
    OciArchive { layers: LayerCompression },
    Rootfs,
    Save,
    Client { platform: Option<Platform>, layers: LayerCompression },
}

/// Where an exporter's bytes go (the builder service streams them to the client).
pub trait ExportStream: Write + Send {
    /// The output is complete.
    fn close(self: Box<Self>) -> io::Result<()>;
}

/// What an export needs besides the images.
pub struct ExportTarget<'a> {
    /// Registry access for pushes (the credentials the client forwarded).
    pub registry: &'a RegistryClient,
    /// The project the result is kept for (`Save`).
    pub namespace: &'a str,
    /// The build's id (names a saved result).
    pub build_id: &'a str,
    /// Where a streaming output writes (unused by the others).
    pub stream: Box<dyn ExportStream>,
    /// Where a push shows its progress: one vertex per reference, numbered from
    /// `first_vertex`.
    pub progress: crate::progress::Progress,
    /// The id of the first push vertex (after the build's own).
    pub first_vertex: u32,
}

/// What an export did.
#[derive(Debug, Default)]
pub struct ExportOutcome {
    /// The manifest (or index) digest the output made, if it made one.
    pub digest: Option<Digest>,
    /// The per-platform manifests an image output made.
    pub manifests: Vec<ExportedImage>,
    /// What each push did.
    pub pushes: Vec<PushOutcome>,
    /// Images kept for the client to read (the caller opens a session over them).
    pub client: Option<ClientExport>,
    /// The result kept for the project.
    pub saved: Option<SavedRecord>,
    /// Whether the output wrote (and closed) the stream.
    pub streamed: bool,
}

impl OutputSpec {
    /// Check the spec and resolve it for a build tagged `build_tags`. Called before the
    /// build runs: a bad output fails at once, not after the whole build.
    pub fn resolve(&self, build_tags: &[String]) -> Result<Exporter, OutputError> {
        let own = match self {
            OutputSpec::Image { names, .. }
            | OutputSpec::DockerArchive { names }
            | OutputSpec::OciArchive { names, .. }
            | OutputSpec::Save { names }
            | OutputSpec::Client { names, .. } => names.as_slice(),
            OutputSpec::Rootfs => &[],
        };
        let named = !own.is_empty();
        let names: Vec<String> = if named { own.to_vec() } else { build_tags.to_vec() };
        let bad = |name: &str, reason: String| OutputError::BadName { name: name.to_string(), reason };
        let refs = || names.iter().map(|n| Reference::parse(n).map_err(|e| bad(n, e.reason.to_string()))).collect::<Result<Vec<_>, _>>();
        let kind = match self {
            OutputSpec::Image { push, push_by_digest, layers, .. } => {
                if *push && names.is_empty() {
                    return Err(OutputError::PushWithoutName);
                }
                Resolved::Image { refs: if *push { refs()? } else { Vec::new() }, push: *push, by_digest: *push_by_digest, layers: *layers }
            }
            OutputSpec::DockerArchive { .. } => {
                for n in &names {
                    archive::repo_tag(n).map_err(|e| bad(n, e.to_string()))?;
                }
                Resolved::DockerArchive
            }
            OutputSpec::OciArchive { layers, .. } => Resolved::OciArchive { layers: *layers },
            OutputSpec::Rootfs => Resolved::Rootfs,
            OutputSpec::Save { .. } => Resolved::Save,
            OutputSpec::Client { platform, layers, .. } => {
                let platform = match platform.as_deref().map(str::trim).filter(|p| !p.is_empty()) {
                    None => None,
                    Some(p) => {
                        Some(Platform::parse(p).map_err(|e| OutputError::BadPlatform { platform: p.to_string(), reason: e.to_string() })?)
                    }
                };
                Resolved::Client { platform, layers: *layers }
            }
        };
        Ok(Exporter { kind, names, named, meta: Default::default() })
    }
}

impl Exporter {
    /// The output with the build's annotations and attestations (those of `meta` that the
    /// output can hold: image outputs and OCI archives hold both, the others neither).
    pub fn with_meta(self, meta: std::sync::Arc<super::ImageMeta>) -> Exporter {
        Exporter { meta, ..self }
    }

    /// The blobs this output makes of the image's layers, when it makes any: the build makes
    /// them while it runs, as each layer is done.
    pub fn eager_blobs(&self) -> Option<LayerCompression> {
        match &self.kind {
            Resolved::Image { layers, .. } | Resolved::OciArchive { layers } => Some(*layers),
            _ => None,
        }
    }

    /// Whether the output keeps the result beyond the build (a push, `--save`): its steps'
    /// results go to the fleet's shared tier before the build reports done.
    pub fn keeps_result(&self) -> bool {
        matches!(&self.kind, Resolved::Image { push: true, .. } | Resolved::Save)
    }

    /// What the output needs of the result's layers: a push only their descriptors (it
    /// fetches what the registry lacks), a kept result their blobs, the others their files.
    pub fn needs(&self) -> LayerNeeds {
        match &self.kind {
            Resolved::Image { push: true, .. } => LayerNeeds::Descriptors,
            Resolved::Image { .. } | Resolved::Save => LayerNeeds::Blobs,
            _ => LayerNeeds::Files,
        }
    }

    /// The names the output gives the image (its own, else the build's tags).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The names the output gives the image, when the output spec named them itself.
    pub fn own_names(&self) -> Option<&[String]> {
        self.named.then_some(self.names.as_slice())
    }

    /// Export `images` to where this output goes.
    pub async fn export(&self, engine: &Engine, images: &[BuiltImage], target: ExportTarget<'_>) -> Result<ExportOutcome, EngineError> {
        if self.needs() == LayerNeeds::Files {
            // A fleet node may hold some layers only as blobs (a saved result, say).
            let layers: Vec<Digest> = images.iter().flat_map(|i| i.diff_ids().iter().cloned()).collect();
            engine.ensure_output_layers(&layers).await?;
        }
        let tags = self.names.clone();
        match &self.kind {
            Resolved::Image { refs, push, by_digest, layers } => {
                let set = engine.export_images_with(images, layers.compression, layers.force, &self.meta, &tags).await?;
                let mut outcome = ExportOutcome { digest: Some(set.top_digest().clone()), ..Default::default() };
                if *push {
                    let shown = crate::export::PushProgress { progress: &target.progress, first_vertex: target.first_vertex };
                    outcome.pushes = engine.push_all(&set, refs, target.registry, *by_digest, &shown).await;
                    push_result(&outcome.pushes)?;
                }
                outcome.manifests = set.images;
                Ok(outcome)
            }
            Resolved::DockerArchive => {
                let image = host_image(images)?.clone();
                let engine = engine.clone();
                stream(target.stream, move |w| engine.write_docker_archive(&image, &tags, w)).await?;
                Ok(ExportOutcome { streamed: true, ..Default::default() })
            }
            Resolved::OciArchive { layers } => {
                let meta = self.meta.for_archive(images.len());
                let set = engine.export_images_with(images, layers.compression, layers.force, &meta, &tags).await?;
                let digest = set.top_digest().clone();
                let engine = engine.clone();
                stream(target.stream, move |w| engine.write_oci_archive(&set, &tags, w)).await?;
                Ok(ExportOutcome { digest: Some(digest), streamed: true, ..Default::default() })
            }
            Resolved::Rootfs => {
                let image = host_image(images)?.clone();
                let engine = engine.clone();
                stream(target.stream, move |w| engine.write_rootfs_tar(&image, w)).await?;
                Ok(ExportOutcome { streamed: true, ..Default::default() })
            }
            Resolved::Save => {
                let (engine, ns, id, images) = (engine.clone(), target.namespace.to_string(), target.build_id.to_string(), images.to_vec());
                let record = tokio::task::spawn_blocking(move || engine.save_result(&ns, &id, &tags, &images)).await??;
                Ok(ExportOutcome { saved: Some(record), ..Default::default() })
            }
            Resolved::Client { platform, layers } => {
                let chosen = select_platform(images, platform.as_ref())?;
                let client = engine.export_for_client(&chosen, *layers).await?;
                Ok(ExportOutcome { digest: Some(client.set.top_digest().clone()), client: Some(client), ..Default::default() })
            }
        }
    }
}

/// The image of the host's platform (or the only one).
fn host_image(images: &[BuiltImage]) -> Result<&BuiltImage, OutputError> {
    let host = Platform::host();
    images.iter().find(|i| host.matches(&i.platform)).or_else(|| images.first()).ok_or(OutputError::NoImage)
}

/// Run the blocking writer `f` on `out`, then close it.
async fn stream(
    mut out: Box<dyn ExportStream>,
    f: impl FnOnce(&mut dyn Write) -> Result<(), EngineError> + Send + 'static,
) -> Result<(), EngineError> {
    tokio::task::spawn_blocking(move || {
        f(&mut out)?;
        out.close().map_err(|source| ExportError::Io { what: "sending the output".into(), source }.into())
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gzip() -> LayerCompression {
        LayerCompression::default()
    }

    #[test]
    fn names_default_to_the_builds_tags() {
        let tags = vec!["app:1".to_string()];
        let e = OutputSpec::DockerArchive { names: vec![] }.resolve(&tags).unwrap();
        assert_eq!((e.names.as_slice(), e.own_names()), (tags.as_slice(), None));
        let e = OutputSpec::Save { names: vec!["other:2".into()] }.resolve(&tags).unwrap();
        assert_eq!(e.own_names(), Some(&["other:2".to_string()][..]));
    }

    #[test]
    fn a_push_needs_a_valid_name() {
        let push = |names: Vec<String>| OutputSpec::Image { names, push: true, push_by_digest: false, layers: gzip() };
        assert!(matches!(push(vec![]).resolve(&[]), Err(OutputError::PushWithoutName)));
        let e = push(vec!["Bad Name".into()]).resolve(&[]).unwrap_err();
        assert!(e.to_string().contains("\"Bad Name\""), "the error names the bad name: {e}");
        let ok = push(vec![]).resolve(&["127.0.0.1:5000/a:1".into()]).unwrap();
        assert!(matches!(&ok.kind, Resolved::Image { refs, push: true, .. } if refs.len() == 1));
        // Not pushing: names are only metadata, and none is needed.
        let local = OutputSpec::Image { names: vec![], push: false, push_by_digest: false, layers: gzip() }.resolve(&[]).unwrap();
        assert!(matches!(&local.kind, Resolved::Image { refs, push: false, .. } if refs.is_empty()));
    }

    #[test]
    fn bad_archive_names_and_platforms_fail_at_resolve() {
        let d = Digest::of(b"m");
        let e = OutputSpec::DockerArchive { names: vec![format!("app@{d}")] }.resolve(&[]).unwrap_err();
        assert!(matches!(&e, OutputError::BadName { name, .. } if name.starts_with("app@")), "{e}");
        let e = OutputSpec::Client { names: vec![], platform: Some("linux/".into()), layers: gzip() }.resolve(&[]).unwrap_err();
        assert!(matches!(&e, OutputError::BadPlatform { platform, .. } if platform == "linux/"), "{e}");
        let ok = OutputSpec::Client { names: vec![], platform: Some("linux/arm64".into()), layers: gzip() }.resolve(&[]).unwrap();
        assert!(matches!(&ok.kind, Resolved::Client { platform: Some(p), .. } if p.architecture == "arm64"));
        let all = OutputSpec::Client { names: vec![], platform: Some(String::new()), layers: gzip() }.resolve(&[]).unwrap();
        assert!(matches!(&all.kind, Resolved::Client { platform: None, .. }), "an empty platform is every platform");
    }

    #[test]
    fn only_outputs_that_make_blobs_make_them_early() {
        let zstd = LayerCompression::new(Compression::Zstd { level: 3 }, true).unwrap();
        let image = OutputSpec::Image { names: vec![], push: false, push_by_digest: false, layers: zstd };
        assert_eq!(image.resolve(&[]).unwrap().eager_blobs(), Some(zstd));
        assert_eq!(OutputSpec::OciArchive { names: vec![], layers: zstd }.resolve(&[]).unwrap().eager_blobs(), Some(zstd));
        assert_eq!(OutputSpec::Rootfs.resolve(&[]).unwrap().eager_blobs(), None);
        assert_eq!(OutputSpec::DockerArchive { names: vec![] }.resolve(&[]).unwrap().eager_blobs(), None);
        let client = OutputSpec::Client { names: vec![], platform: None, layers: zstd };
        assert_eq!(client.resolve(&[]).unwrap().eager_blobs(), None, "a client export compresses only what it serves");
    }

    #[test]
    fn compression_levels_are_checked() {
        assert!(LayerCompression::new(Compression::Gzip { level: 9 }, false).is_ok());
        let e = LayerCompression::new(Compression::Gzip { level: 10 }, false).unwrap_err();
        assert!(e.to_string().contains("compression-level 10") && e.to_string().contains("0..=9"), "{e}");
        let e = LayerCompression::new(Compression::Zstd { level: 99 }, false).unwrap_err();
        assert!(e.to_string().contains("zstd"), "{e}");
        assert!(LayerCompression::new(Compression::Uncompressed, true).unwrap().force);
    }
}
