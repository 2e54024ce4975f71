//! Wire outputs to engine output specs: each kind of `v1::Output` maps to one
//! [`OutputSpec`]; the engine's exporter does the rest. Also the request's annotations and
//! provenance, which image outputs add ([`image_meta`]).

use hoist_engine::export::annotations::{AnnotationError, Annotations};
use hoist_engine::export::provenance::{Mode, Provenance};
use hoist_engine::export::{ImageMeta, LayerCompression, OutputError, OutputSpec};
use hoist_engine::graph::FrontendOptions;
use hoist_oci::compress::{Compression, DEFAULT_GZIP_LEVEL, DEFAULT_ZSTD_LEVEL};
use hoist_proto::v1;

/// Errors of wire outputs.
#[derive(Debug, thiserror::Error)]
pub enum WireOutputError {
    /// An output with no kind set (or one this builder does not know: a newer client).
    #[error("output {0} has no kind this builder knows (image, docker, oci, tar, local, save or client export); is the client newer than the builder?")]
    NoKind(usize),
    /// A compression type this builder does not know.
    #[error("output {index}: unknown layer compression type {value}")]
    UnknownCompression {
        /// The output's position in the request, from 0.
        index: usize,
        /// The wire `CompressionType` number.
        value: i32,
    },
    /// A spec the engine refuses.
    #[error("output {index}: {source}")]
    Spec {
        /// The output's position in the request, from 0.
        index: usize,
        /// The engine's error.
        source: OutputError,
    },
}

/// The engine spec of output `index` of a request.
pub fn output_spec(index: usize, out: &v1::Output) -> Result<OutputSpec, WireOutputError> {
    use v1::output::Kind;
    let layers = |c: &Option<v1::LayerCompression>| layer_compression(c.as_ref()).map_err(|e| e.at(index));
    Ok(match out.kind.as_ref().ok_or(WireOutputError::NoKind(index))? {
        Kind::Image(i) => {
            OutputSpec::Image { names: i.names.clone(), push: i.push, push_by_digest: i.push_by_digest, layers: layers(&i.compression)? }
        }
        Kind::Docker(d) => OutputSpec::DockerArchive { names: d.names.clone() },
        Kind::Oci(o) => OutputSpec::OciArchive { names: o.names.clone(), layers: layers(&o.compression)? },
        Kind::Tar(_) | Kind::Local(_) => OutputSpec::Rootfs,
        Kind::Save(s) => OutputSpec::Save { names: s.names.clone() },
        Kind::ClientExport(c) => OutputSpec::Client {
            names: c.names.clone(),
            platform: (!c.platform.is_empty()).then(|| c.platform.clone()),
            layers: layers(&c.compression)?,
        },
    })
}

/// The client export that asked for provisional sessions (`early`): its index, platform
/// and layer compression.
pub fn early_export(outputs: &[v1::Output]) -> Option<(u32, Option<hoist_engine::graph::Platform>, LayerCompression)> {
    outputs.iter().enumerate().find_map(|(i, o)| match &o.kind {
        Some(v1::output::Kind::ClientExport(c)) if c.early => {
            let platform = match c.platform.as_str() {
                "" => None,
                p => Some(hoist_engine::graph::Platform::parse(p).ok()?),
            };
            Some((i as u32, platform, layer_compression(c.compression.as_ref()).ok()?))
        }
        _ => None,
    })
}

/// Most bytes of a provenance `builder-id=`.
const MAX_BUILDER_ID: usize = 1024;

/// Annotations or a provenance request the builder refuses.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// A bad `--annotation`.
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
    /// A provenance mode other than min or max.
    #[error("--provenance mode={0:?}: expected min or max")]
    Mode(String),
    /// A builder id too long or with control characters.
    #[error("--provenance builder-id: at most {MAX_BUILDER_ID} bytes without control characters")]
    BuilderId,
}

/// The annotations and provenance attestation of a request's image outputs, checked (the
/// strings come from the client). No provenance message is buildx's default: `mode=min`.
pub fn image_meta(annotations: &[String], provenance: Option<&v1::Provenance>, frontend: &FrontendOptions) -> Result<ImageMeta, MetaError> {
    let annotations = Annotations::parse(annotations)?;
    let provenance = match provenance {
        Some(p) if p.disabled => ImageMeta::default(),
        // buildx's default: `mode=min,inline-only=true`.
        None => ImageMeta {
            provenance: Some(Provenance::new(Mode::Min, String::new(), false, frontend)),
            inline_only: true,
            ..Default::default()
        },
        Some(p) => {
            let mode = match p.mode.as_str() {
                "" | "min" => Mode::Min,
                "max" | "full" => Mode::Max,
                other => return Err(MetaError::Mode(other.chars().take(64).collect())),
            };
            if p.builder_id.len() > MAX_BUILDER_ID || p.builder_id.chars().any(char::is_control) {
                return Err(MetaError::BuilderId);
            }
            ImageMeta { provenance: Some(Provenance::new(mode, p.builder_id.clone(), p.reproducible, frontend)), ..Default::default() }
        }
    };
    Ok(ImageMeta { annotations, provenance: provenance.provenance, inline_only: provenance.inline_only })
}

/// A layer compression the engine cannot take (before it is placed at an output).
#[derive(Debug, thiserror::Error)]
pub enum CompressionError {
    /// A wire `CompressionType` number this builder does not know.
    #[error("unknown layer compression type {0}")]
    Unknown(i32),
    /// A compression the engine refuses, such as a level out of its range.
    #[error(transparent)]
    Spec(OutputError),
}

impl CompressionError {
    fn at(self, index: usize) -> WireOutputError {
        match self {
            CompressionError::Unknown(value) => WireOutputError::UnknownCompression { index, value },
            CompressionError::Spec(source) => WireOutputError::Spec { index, source },
        }
    }
}

/// The engine's layer compression of a wire one (absent: gzip at its default level).
pub fn layer_compression(c: Option<&v1::LayerCompression>) -> Result<LayerCompression, CompressionError> {
    let Some(c) = c else { return Ok(LayerCompression::default()) };
    use v1::CompressionType as T;
    let t = T::try_from(c.r#type).map_err(|_| CompressionError::Unknown(c.r#type))?;
    let compression = match t {
        T::CompressionDefault | T::CompressionGzip => Compression::Gzip {
            level: match c.level {
                None => DEFAULT_GZIP_LEVEL,
                // A negative level is out of range; say so with the number given.
                Some(l) => u32::try_from(l)
                    .map_err(|_| CompressionError::Spec(OutputError::BadLevel { compression: "gzip", level: l, range: "0..=9".into() }))?,
            },
        },
        T::CompressionZstd => Compression::Zstd { level: c.level.unwrap_or(DEFAULT_ZSTD_LEVEL) },
        T::CompressionUncompressed => Compression::Uncompressed,
    };
    LayerCompression::new(compression, c.force).map_err(CompressionError::Spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::output::Kind;

    fn wire(kind: Kind) -> v1::Output {
        v1::Output { kind: Some(kind) }
    }

    fn compression(t: v1::CompressionType, level: Option<i32>, force: bool) -> Option<v1::LayerCompression> {
        Some(v1::LayerCompression { r#type: t as i32, level, force })
    }

    #[test]
    fn each_kind_maps_to_its_spec() {
        let image = wire(Kind::Image(v1::ImageOutput {
            names: vec!["r/a:1".into()],
            push: true,
            push_by_digest: true,
            compression: compression(v1::CompressionType::CompressionZstd, Some(19), true),
        }));
        assert_eq!(
            output_spec(0, &image).unwrap(),
            OutputSpec::Image {
                names: vec!["r/a:1".into()],
                push: true,
                push_by_digest: true,
                layers: LayerCompression { compression: Compression::Zstd { level: 19 }, force: true },
            }
        );
        let docker = wire(Kind::Docker(v1::DockerArchiveOutput { names: vec!["a".into()] }));
        assert_eq!(output_spec(0, &docker).unwrap(), OutputSpec::DockerArchive { names: vec!["a".into()] });
        let oci = wire(Kind::Oci(v1::OciArchiveOutput { names: vec![], compression: None }));
        assert_eq!(output_spec(0, &oci).unwrap(), OutputSpec::OciArchive { names: vec![], layers: LayerCompression::default() });
        assert_eq!(output_spec(0, &wire(Kind::Tar(v1::TarOutput {}))).unwrap(), OutputSpec::Rootfs);
        assert_eq!(output_spec(0, &wire(Kind::Local(v1::LocalOutput {}))).unwrap(), OutputSpec::Rootfs);
        let save = wire(Kind::Save(v1::SaveOutput { names: vec!["t".into()] }));
        assert_eq!(output_spec(0, &save).unwrap(), OutputSpec::Save { names: vec!["t".into()] });
        let client = wire(Kind::ClientExport(v1::ClientExportOutput {
            names: vec![],
            platform: "linux/arm64".into(),
            compression: compression(v1::CompressionType::CompressionUncompressed, None, false),
            early: true,
        }));
        let (index, platform, layers) = early_export(&[save.clone(), client.clone()]).expect("the early client export");
        assert_eq!((index, platform.map(|p| p.to_string())), (1, Some("linux/arm64".to_string())));
        assert_eq!(layers.compression, hoist_oci::compress::Compression::Uncompressed);
        assert_eq!(
            output_spec(0, &client).unwrap(),
            OutputSpec::Client {
                names: vec![],
                platform: Some("linux/arm64".into()),
                layers: LayerCompression { compression: Compression::Uncompressed, force: false },
            }
        );
        let all =
            wire(Kind::ClientExport(v1::ClientExportOutput { names: vec![], platform: String::new(), compression: None, early: false }));
        assert!(early_export(std::slice::from_ref(&all)).is_none(), "only an export that asks gets provisional sessions");
        assert!(matches!(output_spec(0, &all).unwrap(), OutputSpec::Client { platform: None, .. }), "empty platform: all");
    }

    #[test]
    fn provenance_is_min_by_default_and_checked() {
        let f = FrontendOptions { dockerfile_name: "Dockerfile".into(), ..Default::default() };
        let meta = image_meta(&[], None, &f).unwrap();
        assert_eq!((meta.provenance.map(|p| p.mode), meta.inline_only), (Some(Mode::Min), true), "buildx's default");
        let off = v1::Provenance { disabled: true, ..Default::default() };
        assert!(image_meta(&[], Some(&off), &f).unwrap().provenance.is_none());
        let max = v1::Provenance { mode: "max".into(), builder_id: "https://ci/1".into(), ..Default::default() };
        let meta = image_meta(&[], Some(&max), &f).unwrap();
        assert!(!meta.inline_only, "asked for: every image output carries it");
        let p = meta.provenance.unwrap();
        assert_eq!((p.mode, p.builder_id.as_str()), (Mode::Max, "https://ci/1"));
        let e = image_meta(&[], Some(&v1::Provenance { mode: "everything".into(), ..Default::default() }), &f).unwrap_err();
        assert!(e.to_string().contains("\"everything\""), "{e}");
        let e = image_meta(&[], Some(&v1::Provenance { builder_id: "a\u{1b}[2J".into(), ..Default::default() }), &f).unwrap_err();
        assert!(matches!(e, MetaError::BuilderId), "{e}");
        let e = image_meta(&["k=v\nx".into()], None, &f).unwrap_err();
        assert!(e.to_string().contains("--annotation") && e.to_string().contains("control character"), "{e}");
    }

    #[test]
    fn compression_defaults_are_the_algorithms() {
        assert_eq!(layer_compression(None).unwrap().compression, Compression::Gzip { level: DEFAULT_GZIP_LEVEL });
        let c = |t, level| layer_compression(compression(t, level, false).as_ref()).unwrap().compression;
        assert_eq!(c(v1::CompressionType::CompressionDefault, None), Compression::Gzip { level: DEFAULT_GZIP_LEVEL });
        assert_eq!(c(v1::CompressionType::CompressionGzip, Some(1)), Compression::Gzip { level: 1 });
        assert_eq!(c(v1::CompressionType::CompressionZstd, None), Compression::Zstd { level: DEFAULT_ZSTD_LEVEL });
    }

    #[test]
    fn bad_outputs_name_the_output_and_the_value() {
        let e = output_spec(2, &v1::Output { kind: None }).unwrap_err();
        assert!(matches!(e, WireOutputError::NoKind(2)), "{e}");
        let bad_type = wire(Kind::Oci(v1::OciArchiveOutput {
            names: vec![],
            compression: Some(v1::LayerCompression { r#type: 42, level: None, force: false }),
        }));
        let e = output_spec(1, &bad_type).unwrap_err();
        assert!(matches!(e, WireOutputError::UnknownCompression { index: 1, value: 42 }), "{e}");
        for (t, level) in [
            (v1::CompressionType::CompressionGzip, 10),
            (v1::CompressionType::CompressionGzip, -1),
            (v1::CompressionType::CompressionZstd, 99),
        ] {
            let out = wire(Kind::Image(v1::ImageOutput {
                names: vec![],
                push: false,
                push_by_digest: false,
                compression: compression(t, Some(level), false),
            }));
            let e = output_spec(0, &out).unwrap_err().to_string();
            assert!(e.contains("compression-level") && e.contains(&level.to_string()), "{e}");
        }
    }
}
