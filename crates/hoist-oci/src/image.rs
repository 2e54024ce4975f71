//! The image configuration blob, as Docker and BuildKit write it.
//!
//! Our own type rather than oci-spec's `ImageConfiguration`: that one lacks Docker's
//! `Healthcheck`, `Shell`, `OnBuild` and `ArgsEscaped`, and serializes labels, ports and
//! volumes from a `HashMap` in random order, which would make identical builds produce
//! different config digests. Here every map is a `BTreeMap`, so serialization is stable.
//! Unknown fields of pulled configs are ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// An empty JSON object, the value type of Docker's set-like maps (`"80/tcp": {}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// The whole config blob (`application/vnd.oci.image.config.v1+json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// When the image was built (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// The `MAINTAINER`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// CPU architecture, in Go's spelling (`amd64`, `arm64`).
    #[serde(default)]
    pub architecture: String,
    /// Operating system (`linux`).
    #[serde(default)]
    pub os: String,
    /// `os.version`: the OS build the image needs (Windows images only).
    #[serde(default, rename = "os.version", skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    /// CPU variant (`v7` for 32-bit arm, `v8` for arm64), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// How containers of the image run.
    #[serde(default)]
    pub config: RunConfig,
    /// The layers, as uncompressed digests.
    #[serde(default)]
    pub rootfs: RootFs,
    /// One entry per build step, oldest first; entries without `empty_layer` match the
    /// layers in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
}

/// The execution defaults of an image (the config blob's `config` object).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    /// `USER`: `user[:group]`, names or numeric ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `EXPOSE`: `port/proto` keys (`80/tcp`).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "null_as_none")]
    pub exposed_ports: Option<BTreeMap<String, Empty>>,
    /// `ENV`: `KEY=value` entries, one per key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// `ENTRYPOINT`; a shell-form one is stored with the shell prepended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `CMD` (the arguments of the entrypoint when there is one); a shell-form one is stored
    /// with the shell prepended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// `VOLUME`: mount point paths.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "null_as_none")]
    pub volumes: Option<BTreeMap<String, Empty>>,
    /// `WORKDIR`: an absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// `LABEL`s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// `STOPSIGNAL`: the signal as written (`SIGTERM`, `9`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// Docker's `ArgsEscaped`: the command line is one pre-escaped string (Windows images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_escaped: Option<bool>,
    /// `HEALTHCHECK`; `test: ["NONE"]` turns off one inherited from the base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
    /// `ONBUILD` triggers, each the instruction text after `ONBUILD`, run by builds that use
    /// this image as a base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_build: Option<Vec<String>>,
    /// `SHELL`: the shell that shell-form commands run with; `None` is `/bin/sh -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<Vec<String>>,
}

/// `HEALTHCHECK` (durations in nanoseconds, as Docker stores them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Healthcheck {
    /// `["NONE"]`, `["CMD", args...]` or `["CMD-SHELL", command]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test: Vec<String>,
    /// Time between checks, in nanoseconds; 0 = inherit (the runtime's default).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interval: i64,
    /// How long one check may run, in nanoseconds; 0 = inherit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout: i64,
    /// Time after start during which failures do not count, in nanoseconds; 0 = inherit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_period: i64,
    /// Time between checks during the start period, in nanoseconds; 0 = inherit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_interval: i64,
    /// Consecutive failures before the container is unhealthy; 0 = inherit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

fn null_as_none<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d)
}

/// `rootfs`: the layers' diff_ids, bottom first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    /// `type`: always `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The digest of each layer's uncompressed tar, bottom first.
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

impl Default for RootFs {
    fn default() -> Self {
        RootFs { kind: "layers".into(), diff_ids: Vec::new() }
    }
}

/// One history entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// When the step ran (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// The `MAINTAINER` at the time, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// The step, as Docker shows it (`RUN /bin/sh -c make`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// A free-form note (BuildKit writes `buildkit.dockerfile.v0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The step made no layer (ENV, LABEL, ...).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

/// Media types hoist writes and reads.
pub mod media {
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// OCI image configuration.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// OCI layer, uncompressed tar.
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    /// OCI layer, gzip-compressed tar.
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// OCI layer, zstd-compressed tar.
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    /// Docker image manifest, schema 2.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list (the Docker index).
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker image configuration (same JSON as OCI's).
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    /// Docker layer, gzip-compressed tar.
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

    /// The OCI media type of a layer with the same encoding as `media_type` (Docker's
    /// gzip layer type becomes OCI's; the bytes are the same).
    pub fn oci_layer(media_type: &str) -> &'static str {
        if media_type.ends_with("zstd") {
            OCI_LAYER_ZSTD
        } else if media_type.ends_with("gzip") {
            OCI_LAYER_GZIP
        } else {
            OCI_LAYER
        }
    }
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// What the content is (one of [`media`]'s types, or another).
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// The content's digest.
    pub digest: Digest,
    /// The content's size in bytes.
    pub size: u64,
    /// The image's platform (entries of an index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<crate::registry::Platform>,
    /// Arbitrary metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An image manifest (OCI or Docker schema 2: same shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// [`media::OCI_MANIFEST`] or [`media::DOCKER_MANIFEST`]; may be absent in OCI manifests.
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The image configuration blob.
    pub config: Descriptor,
    /// The layer blobs, bottom first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// Arbitrary metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Manifest {
    /// An OCI image manifest of a config (its digest and size) and layers.
    pub fn oci(config_digest: Digest, config_size: u64, layers: Vec<Descriptor>) -> Manifest {
        Manifest {
            schema_version: 2,
            media_type: Some(media::OCI_MANIFEST.into()),
            config: Descriptor {
                media_type: media::OCI_CONFIG.into(),
                digest: config_digest,
                size: config_size,
                platform: None,
                annotations: None,
            },
            layers,
            annotations: None,
        }
    }
}

/// An image index / manifest list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// [`media::OCI_INDEX`] or [`media::DOCKER_LIST`]; may be absent in OCI indexes.
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The manifests, each with its platform.
    pub manifests: Vec<Descriptor>,
    /// Arbitrary metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_docker_config_with_nulls_and_unknown_fields() {
        let json = r#"{"architecture":"amd64","os":"linux","container":"abc",
            "config":{"Env":["PATH=/bin"],"Cmd":["sh"],"ExposedPorts":null,"Volumes":{"/data":{}},
                      "Labels":{"b":"2","a":"1"},"OnBuild":null,"Healthcheck":{"Test":["CMD","true"],"Interval":30000000000}},
            "rootfs":{"type":"layers","diff_ids":["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]},
            "history":[{"created_by":"/bin/sh","empty_layer":true}]}"#;
        let c: ImageConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.config.cmd.as_deref(), Some(&["sh".to_string()][..]));
        assert_eq!(c.config.exposed_ports, None);
        assert!(c.config.volumes.as_ref().unwrap().contains_key("/data"));
        assert_eq!(c.config.healthcheck.as_ref().unwrap().interval, 30_000_000_000);
        assert!(c.history[0].empty_layer);
        assert_eq!(c.rootfs.diff_ids.len(), 1);
    }

    #[test]
    fn serialization_is_stable_and_sorted() {
        let a = RunConfig {
            labels: Some([("z".to_string(), "1".to_string()), ("a".to_string(), "2".to_string())].into_iter().collect()),
            exposed_ports: Some([("8080/tcp".to_string(), Empty {}), ("80/tcp".to_string(), Empty {})].into_iter().collect()),
            ..Default::default()
        };
        let s = serde_json::to_string(&a).unwrap();
        assert_eq!(s, r#"{"ExposedPorts":{"80/tcp":{},"8080/tcp":{}},"Labels":{"a":"2","z":"1"}}"#);
    }
}
