//! `-o`/`--output` strings as docker buildx reads them, parsed into the typed outputs of
//! [`hoist_client::outputs`] (which also holds the sinks that receive them).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _};
use hoist_client::outputs::{layer_compression, Dest, OutputSpec};
use hoist_client::v1;
use hoist_oci::compress::Compression;
use v1::output::Kind;

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

/// Parse one `-o`: `type=local,dest=out`, a bare path (local), or `-` (a tar on stdout).
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
                let export =
                    v1::ClientExportOutput { names: a.names(), platform: String::new(), compression: a.compression()?, early: false };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(s: &str) -> Kind {
        parse(s).unwrap().kind
    }

    fn err(s: &str) -> String {
        format!("{:#}", parse(s).unwrap_err())
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
        assert!(parse("type=image,name=r/x,push=1").unwrap().is_push(), "push is a Go boolean");
        assert!(!parse("type=image,name=r/x,push=false").unwrap().is_push());
        assert!(matches!(kind("type=image,push-by-digest=true"), Kind::Image(i) if i.push_by_digest && !i.push));
        let oci = parse("type=oci,dest=out.tar,compression=gzip,compression-level=1").unwrap();
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
        let docker = parse("type=docker,dest=-,name=app:1").unwrap();
        assert_eq!((docker.kind, docker.dest), (Kind::Docker(v1::DockerArchiveOutput { names: vec!["app:1".into()] }), Dest::Stdout));
        let tar = parse("type=tar,dest=fs.tar").unwrap();
        assert_eq!((tar.kind, tar.dest), (Kind::Tar(v1::TarOutput {}), Dest::File("fs.tar".into())));
        let local = parse("type=local,dest=out").unwrap();
        assert_eq!((local.kind, local.dest), (Kind::Local(v1::LocalOutput {}), Dest::Dir("out".into())));
        assert_eq!(parse("outdir").unwrap().dest, Dest::Dir("outdir".into()), "a bare path is a local output");
        assert_eq!(parse("-").unwrap(), OutputSpec { kind: Kind::Tar(v1::TarOutput {}), dest: Dest::Stdout });
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
        let docker = parse("type=docker").unwrap();
        assert!(docker.is_load(), "type=docker without dest loads");
        assert!(matches!(docker.kind, Kind::ClientExport(_)));
        assert!(!parse("type=docker,dest=x.tar").unwrap().is_load());
        assert_eq!(OutputSpec::save(&["a:1".into()]).to_proto().kind, Some(Kind::Save(v1::SaveOutput { names: vec!["a:1".into()] })));
        // Without a sink, a load's wire form is the spec's own.
        assert_eq!(parse("type=oci,dest=x.tar").unwrap().to_proto_for(None, true).kind.map(|k| matches!(k, Kind::Oci(_))), Some(true));
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
}
