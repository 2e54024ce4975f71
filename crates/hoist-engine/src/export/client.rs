//! Exports a client reads blob by blob (`--load`, `hoist pull`), and results a project
//! keeps on the builder (`--save`).
//!
//! An uncompressed client export (for a client on the builder's machine) writes no blob: a
//! new layer's plain tar is its diff_id, its size was recorded when the diff_id was computed
//! ([`crate::cache::CacheIndex::layer_tar_size`]), and its bytes are made from the snapshot
//! as the client reads them — a first `--load` of a big layer costs one pass over its files,
//! not a copy of the layer into the content store. Base layers keep their original blobs,
//! and a layer of small files whose tar a `--load` build kept (see `steps::commit_dir`) is
//! served from that blob.

use std::collections::HashMap;
use std::io::{self, Read, Seek, SeekFrom, Write};

use hoist_oci::digest::Digest;
use hoist_oci::image::{media, Descriptor, ImageConfig};
use hoist_oci::layer::{write_layer_tar, TarOptions};

use super::spec::{LayerCompression, OutputError};
use super::{ExportError, ExportedSet};
use crate::cache::{BlobRecord, SavedImage, SavedRecord};
use crate::gc::LeaseSet;
use crate::graph::Platform;
use crate::{BuiltImage, Engine, EngineError};

/// Where a blob of a client export is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServedBlob {
    /// The content store.
    Store,
    /// The plain tar of this layer (its digest is its diff_id), made from the layer's
    /// snapshot while it is read.
    LayerTar,
}

/// Images exported for a client: their manifests (and index) in the content store, every
/// blob the client may read with its size and source, and a lease on their layers.
pub struct ClientExport {
    /// The manifests (and index) of the exported images.
    pub set: ExportedSet,
    /// Digest → (size, source), for every config and layer of the set.
    pub blobs: HashMap<Digest, (u64, ServedBlob)>,
    /// Keeps the layers from garbage collection while the export lives.
    pub lease: LeaseSet,
}

impl std::fmt::Debug for ClientExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientExport").field("set", &self.set).field("blobs", &self.blobs).finish_non_exhaustive()
    }
}

/// The images of `images` for `platform` (`None`: all): the matching one, else the only one.
pub fn select_platform(images: &[BuiltImage], platform: Option<&Platform>) -> Result<Vec<BuiltImage>, OutputError> {
    let Some(want) = platform else { return Ok(images.to_vec()) };
    if let Some(i) = images.iter().find(|i| want.matches(&i.platform)) {
        return Ok(vec![i.clone()]);
    }
    match images {
        [only] => Ok(vec![only.clone()]),
        [] => Err(OutputError::NoImage),
        _ => Err(OutputError::NoImageFor {
            platform: want.to_string(),
            built: images.iter().map(|i| i.platform.to_string()).collect::<Vec<_>>().join(", "),
        }),
    }
}

/// The label of a provisional image ([`Engine::provisional_image`]): when it was made, in
/// Unix seconds.
pub const PROVISIONAL_LABEL: &str = "dev.hoist.provisional";

impl Engine {
    /// A provisional image of `early`'s layers: a config with nothing but the platform, the
    /// layers and [`PROVISIONAL_LABEL`], stored. An engine that imports it while the build
    /// goes on already has those layers when the real image comes.
    pub fn provisional_image(&self, early: &crate::EarlyLayers) -> Result<BuiltImage, EngineError> {
        let p = &early.platform;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let config = ImageConfig {
            architecture: p.architecture.clone(),
            os: p.os.clone(),
            variant: p.variant.clone(),
            config: hoist_oci::image::RunConfig {
                labels: Some([(PROVISIONAL_LABEL.to_string(), now.to_string())].into_iter().collect()),
                ..Default::default()
            },
            rootfs: hoist_oci::image::RootFs { kind: "layers".into(), diff_ids: early.diff_ids.clone() },
            ..Default::default()
        };
        let config_bytes =
            serde_json::to_vec(&config).map_err(|e| ExportError::Io { what: "a provisional config".into(), source: e.into() })?;
        let config_digest = self
            .store()
            .put(&config_bytes)
            .map_err(|e| ExportError::Io { what: "a provisional config".into(), source: io::Error::other(e) })?;
        Ok(BuiltImage { platform: p.clone(), config, config_bytes, config_digest, materials: Vec::new() })
    }

    /// Export `images` for a client to read: as [`Engine::export_images`] does, except that
    /// an uncompressed export (not forced) stores no new blob — a layer without a stored
    /// plain-tar or original blob is served from its snapshot (digest = diff_id), its size
    /// the one recorded with its diff_id.
    pub async fn export_for_client(&self, images: &[BuiltImage], layers: LayerCompression) -> Result<ClientExport, EngineError> {
        let lease = self.lease_set();
        for img in images {
            for d in img.diff_ids() {
                lease.add(d);
            }
        }
        let mut blobs = HashMap::new();
        let set = if layers.compression != hoist_oci::compress::Compression::Uncompressed || layers.force {
            self.export_images(images, layers.compression, layers.force).await?
        } else {
            let mut all_layers = Vec::new();
            for img in images {
                let mut of_image = Vec::new();
                for d in img.diff_ids() {
                    let (desc, served) = self.plain_layer(d).await?;
                    blobs.insert(desc.digest.clone(), (desc.size, served));
                    of_image.push(desc);
                }
                all_layers.push(of_image);
            }
            self.assemble_images(images, all_layers)?
        };
        for img in &set.images {
            blobs.insert(img.config_digest.clone(), (img.config_size, ServedBlob::Store));
            for l in &img.manifest.layers {
                blobs.entry(l.digest.clone()).or_insert((l.size, ServedBlob::Store));
            }
        }
        Ok(ClientExport { set, blobs, lease })
    }

    /// Layer `diff_id` for an uncompressed export: a stored plain-tar blob, else the original
    /// blob of a base layer, else the layer's tar made from its snapshot when read.
    async fn plain_layer(&self, diff_id: &Digest) -> Result<(Descriptor, ServedBlob), EngineError> {
        let known = self.index().layer_blobs(diff_id)?;
        let stored = |b: &&BlobRecord| self.store().contains(&b.digest);
        let blob = known
            .iter()
            .filter(stored)
            .find(|b| media::oci_layer(&b.media_type) == media::OCI_LAYER)
            .or_else(|| known.iter().filter(stored).find(|b| b.original));
        if let Some(b) = blob {
            let desc = Descriptor {
                media_type: media::oci_layer(&b.media_type).to_string(),
                digest: b.digest.clone(),
                size: b.size,
                platform: None,
                annotations: None,
            };
            return Ok((desc, ServedBlob::Store));
        }
        if !self.snapshots().has_layer(diff_id) {
            return Err(ExportError::LayerMissing(diff_id.clone()).into());
        }
        let size = self.layer_tar_size(diff_id).await?;
        let desc = Descriptor { media_type: media::OCI_LAYER.into(), digest: diff_id.clone(), size, platform: None, annotations: None };
        Ok((desc, ServedBlob::LayerTar))
    }

    /// The size of layer `diff_id`'s plain tar: the one recorded when its diff_id was
    /// computed; for a layer committed before sizes were recorded, counted once (one pass
    /// over its files) and recorded.
    pub async fn layer_tar_size(&self, diff_id: &Digest) -> Result<u64, EngineError> {
        if let Some(size) = self.index().layer_tar_size(diff_id)? {
            return Ok(size);
        }
        let (engine, d) = (self.clone(), diff_id.clone());
        tokio::task::spawn_blocking(move || engine.layer_tar_size_blocking(&d)).await?
    }

    /// [`Engine::layer_tar_size`], blocking.
    pub fn layer_tar_size_blocking(&self, diff_id: &Digest) -> Result<u64, EngineError> {
        if let Some(size) = self.index().layer_tar_size(diff_id)? {
            return Ok(size);
        }
        let dir = self.snapshots().layer_dir(diff_id);
        let (digest, size, _) = hoist_oci::export::diff_id_of(&dir, &TarOptions::default())
            .map_err(|source| ExportError::Blob { diff_id: diff_id.clone(), source })?;
        if digest != *diff_id {
            return Err(ExportError::LayerChanged { diff_id: diff_id.clone(), now: digest }.into());
        }
        self.index().put_layer_tar_size(diff_id, size)?;
        Ok(size)
    }

    /// Write blob `digest` of a client export (`size` bytes, from `served`) to `out`, from
    /// `offset` on. Blocking.
    pub fn write_served_blob(
        &self,
        digest: &Digest,
        served: &ServedBlob,
        size: u64,
        offset: u64,
        out: &mut dyn Write,
    ) -> Result<(), EngineError> {
        match served {
            ServedBlob::Store => {
                let mut file = self.store().open_blob(digest)?;
                let reading = |source| ExportError::Io { what: format!("reading blob {digest}"), source };
                file.seek(SeekFrom::Start(offset)).map_err(reading)?;
                let want = size.saturating_sub(offset);
                let n = io::copy(&mut file.take(want), out).map_err(reading)?;
                if n != want {
                    return Err(ExportError::BlobShort { digest: digest.clone(), size }.into());
                }
                Ok(())
            }
            ServedBlob::LayerTar => {
                let dir = self.snapshots().layer_dir(digest);
                let mut w = SkipWriter { skip: offset, seen: 0, out };
                write_layer_tar(&dir, &mut w, &TarOptions::default())
                    .map_err(|source| ExportError::Tar { diff_id: digest.clone(), source })?;
                if w.seen != size {
                    return Err(ExportError::TarSizeChanged { diff_id: digest.clone(), now: w.seen, recorded: size }.into());
                }
                Ok(())
            }
        }
    }

    /// Keep `images` as project `namespace`'s saved result of build `build_id`, named `tags`.
    /// Blocking.
    pub fn save_result(&self, namespace: &str, build_id: &str, tags: &[String], images: &[BuiltImage]) -> Result<SavedRecord, EngineError> {
        let mut layers: Vec<(Digest, u64)> = Vec::new();
        let mut saved = Vec::new();
        for img in images {
            self.store().put(&img.config_bytes)?;
            saved.push(SavedImage { platform: img.platform.to_string(), config_digest: img.config_digest.clone() });
            for d in img.diff_ids() {
                if layers.iter().any(|(l, _)| l == d) {
                    continue;
                }
                layers.push((d.clone(), self.saved_layer_size(d)));
            }
        }
        let now = crate::cache::now();
        let record =
            SavedRecord { build_id: build_id.to_string(), tags: tags.to_vec(), images: saved, layers, created: now, last_used: now };
        self.index().put_saved(namespace, &record)?;
        Ok(record)
    }

    /// The uncompressed size of a layer: its recorded tar size, else its plain tar blob, else
    /// the largest blob, else the size of its directory.
    fn saved_layer_size(&self, d: &Digest) -> u64 {
        if let Ok(Some(size)) = self.index().layer_tar_size(d) {
            return size;
        }
        let blobs = self.index().layer_blobs(d).unwrap_or_default();
        if let Some(b) = blobs.iter().find(|b| media::oci_layer(&b.media_type) == media::OCI_LAYER) {
            return b.size;
        }
        match blobs.iter().map(|b| b.size).max() {
            Some(s) => s,
            None => crate::gc::dir_size(&self.snapshots().layer_dir(d)),
        }
    }

    /// The images of project `namespace`'s saved result `name` (a build id or a tag).
    /// Blocking.
    pub fn load_saved(&self, namespace: &str, name: &str) -> Result<(SavedRecord, Vec<BuiltImage>), EngineError> {
        let record = self.index().find_saved(namespace, name)?.ok_or_else(|| OutputError::NoSaved(name.to_string()))?;
        let broken = |message: String| OutputError::SavedBroken { name: name.to_string(), message };
        let mut images = Vec::new();
        for s in &record.images {
            let bytes = self.store().read(&s.config_digest).map_err(|e| broken(format!("its config {}: {e}", s.config_digest)))?;
            let config: ImageConfig =
                serde_json::from_slice(&bytes).map_err(|e| broken(format!("its config {} is invalid: {e}", s.config_digest)))?;
            let platform = Platform::parse(&s.platform).map_err(|e| broken(e.to_string()))?;
            images.push(BuiltImage {
                platform,
                config,
                config_bytes: bytes,
                config_digest: s.config_digest.clone(),
                materials: Vec::new(),
            });
        }
        let _ = self.index().touch_saved(namespace, &record.build_id);
        Ok((record, images))
    }
}

/// A `Write` that drops the first `skip` bytes and hands the rest on, counting all it saw.
struct SkipWriter<'a> {
    skip: u64,
    seen: u64,
    out: &'a mut dyn Write,
}

impl Write for SkipWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let start = self.seen;
        let from = self.skip.saturating_sub(start).min(data.len() as u64) as usize;
        self.out.write_all(&data[from..])?;
        self.seen += data.len() as u64;
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(platform: &str) -> BuiltImage {
        crate::testing::empty_image(platform)
    }

    #[test]
    fn platform_selection_prefers_the_match_then_the_only_image() {
        let both = [image("linux/amd64"), image("linux/arm64")];
        let p = |s: &str| Platform::parse(s).unwrap();
        assert_eq!(select_platform(&both, Some(&p("linux/arm64"))).unwrap()[0].platform.architecture, "arm64");
        assert_eq!(select_platform(&both, Some(&p("linux/amd64"))).unwrap()[0].platform.architecture, "amd64");
        assert_eq!(select_platform(&both, None).unwrap().len(), 2);
        let err = select_platform(&both, Some(&p("linux/s390x"))).unwrap_err();
        assert!(err.to_string().contains("linux/amd64, linux/arm64"), "{err}");
        assert_eq!(select_platform(&both[1..], Some(&p("linux/amd64"))).unwrap()[0].platform.architecture, "arm64", "the only image");
        assert!(matches!(select_platform(&[], Some(&p("linux/amd64"))), Err(OutputError::NoImage)));
    }

    fn engine(dir: &std::path::Path) -> Engine {
        Engine::open(&crate::EngineConfig {
            root: dir.to_path_buf(),
            runtime: None,
            insecure_registries: vec![],
            limits: Default::default(),
            cache_store: None,
        })
        .expect("opening an engine needs an OCI runtime (runc) on PATH")
    }

    /// A committed layer and an image of it.
    fn layer_image(engine: &Engine, content: &[u8]) -> (Digest, BuiltImage) {
        let tmp = engine.snapshots().temp_dir().unwrap();
        std::fs::write(tmp.path().join("file"), content).unwrap();
        let (diff_id, _, _) = hoist_oci::export::diff_id_of(tmp.path(), &TarOptions::default()).unwrap();
        engine.snapshots().commit(tmp, &diff_id).unwrap();
        let mut img = image("linux/amd64");
        img.config.rootfs.diff_ids = vec![diff_id.clone()];
        img.config_bytes = serde_json::to_vec(&img.config).unwrap();
        img.config_digest = Digest::of(&img.config_bytes);
        engine.store().put(&img.config_bytes).unwrap();
        (diff_id, img)
    }

    fn plain() -> LayerCompression {
        LayerCompression { compression: hoist_oci::compress::Compression::Uncompressed, force: false }
    }

    /// Issue 16: the size of a new layer served uncompressed is the one recorded with its
    /// diff_id: no pass over the layer (and no blob) only to learn it.
    #[tokio::test]
    async fn an_uncompressed_client_export_takes_the_recorded_tar_size_and_stores_no_blob() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path());
        let (diff_id, img) = layer_image(&engine, b"hello");
        let (_, real_size, _) = hoist_oci::export::diff_id_of(&engine.snapshots().layer_dir(&diff_id), &TarOptions::default()).unwrap();
        // A recorded size that no tar pass could give shows the record is what is used.
        engine.index().put_layer_tar_size(&diff_id, real_size + 512).unwrap();
        let export = engine.export_for_client(std::slice::from_ref(&img), plain()).await.unwrap();
        let layer = &export.set.images[0].manifest.layers[0];
        assert_eq!((&layer.digest, layer.size, layer.media_type.as_str()), (&diff_id, real_size + 512, media::OCI_LAYER));
        assert_eq!(export.blobs[&diff_id], (real_size + 512, ServedBlob::LayerTar));
        assert_eq!(export.blobs[&img.config_digest], (img.config_bytes.len() as u64, ServedBlob::Store));
        assert!(!engine.store().contains(&diff_id), "no blob of the layer was written");
        assert!(engine.index().layer_blobs(&diff_id).unwrap().is_empty());
    }

    /// A layer committed before sizes were recorded is counted once, and the count kept.
    #[tokio::test]
    async fn an_unrecorded_tar_size_is_counted_once_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path());
        let (diff_id, img) = layer_image(&engine, b"counted");
        assert_eq!(engine.index().layer_tar_size(&diff_id).unwrap(), None);
        let export = engine.export_for_client(std::slice::from_ref(&img), plain()).await.unwrap();
        let (size, served) = export.blobs[&diff_id].clone();
        assert_eq!(served, ServedBlob::LayerTar);
        assert_eq!(engine.index().layer_tar_size(&diff_id).unwrap(), Some(size));
        // What the client reads is the layer's tar: its bytes hash to the diff_id, and a
        // read from an offset gives the rest.
        let mut all = Vec::new();
        engine.write_served_blob(&diff_id, &served, size, 0, &mut all).unwrap();
        assert_eq!((all.len() as u64, Digest::of(&all)), (size, diff_id.clone()));
        let mut tail = Vec::new();
        engine.write_served_blob(&diff_id, &served, size, 700, &mut tail).unwrap();
        assert_eq!(tail, all[700..]);
        // A size that no longer matches the layer is an error, not a short blob.
        let e = engine.write_served_blob(&diff_id, &served, size + 1, 0, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("changed on the builder"), "{e}");
        let mut config = Vec::new();
        engine.write_served_blob(&img.config_digest, &ServedBlob::Store, img.config_bytes.len() as u64, 2, &mut config).unwrap();
        assert_eq!(config, img.config_bytes[2..]);
    }

    /// A layer whose tar a `--load` build kept (`steps::commit_dir`) is served from that
    /// blob, not made again from its files.
    #[tokio::test]
    async fn a_kept_layer_tar_is_served_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path());
        let (diff_id, img) = layer_image(&engine, b"kept");
        let layer_dir = engine.snapshots().layer_dir(&diff_id);
        let (kept_id, size, _, kept) =
            hoist_oci::export::diff_id_keeping_small_files(&layer_dir, &TarOptions::default(), engine.store()).unwrap();
        assert!(kept && kept_id == diff_id);
        engine.index().put_layer_tar_size(&diff_id, size).unwrap();
        let blob = BlobRecord { digest: diff_id.clone(), size, media_type: media::OCI_LAYER.into(), original: false };
        engine.index().add_layer_blob(&diff_id, blob).unwrap();
        // The snapshot is gone: only the kept blob can serve the layer.
        engine.snapshots().remove_layer(&diff_id).unwrap();
        let export = engine.export_for_client(std::slice::from_ref(&img), plain()).await.unwrap();
        assert_eq!(export.blobs[&diff_id], (size, ServedBlob::Store));
        let mut all = Vec::new();
        engine.write_served_blob(&diff_id, &ServedBlob::Store, size, 0, &mut all).unwrap();
        assert_eq!(Digest::of(&all), diff_id);
    }

    #[test]
    fn the_skip_writer_drops_the_offset() {
        let mut out = Vec::new();
        let mut w = SkipWriter { skip: 5, seen: 0, out: &mut out };
        w.write_all(b"abc").unwrap();
        w.write_all(b"defghij").unwrap();
        w.write_all(b"kl").unwrap();
        assert_eq!(w.seen, 12);
        assert_eq!(out, b"fghijkl");
    }
}
