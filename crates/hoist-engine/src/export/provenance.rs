//! SLSA provenance attestations (`--provenance`, `--attest type=provenance`), written as
//! BuildKit writes them with `version=v0.2`: an in-toto statement
//! (`https://in-toto.io/Statement/v0.1`) whose subjects are an image manifest's digest under
//! each name of the image (as package URLs with the platform), and whose predicate
//! (`https://slsa.dev/provenance/v0.2`, build type `https://mobyproject.org/buildkit@v1`)
//! records the Dockerfile, the frontend parameters and the base images with their digests.
//! The exporter stores it as BuildKit does ([attestation storage]): per platform, a manifest
//! of platform `unknown/unknown` whose one layer is the statement, listed in the image's
//! index after the images with `vnd.docker.reference.type: attestation-manifest`.
//!
//! `mode=min` (the default) leaves out the values of build args and labels (and says the
//! parameters are incomplete); `mode=max` records them. BuildKit's `max` also records its
//! LLB definition and layer map, which hoist has no equivalent of.
//!
//! Unlike BuildKit, the statement is deterministic: it carries no invocation id and no
//! timestamps, except `SOURCE_DATE_EPOCH` (when the build has it) as the start and finish
//! time. An identical build then pushes an identical attestation, hence an identical index.
//!
//! [attestation storage]: https://github.com/moby/buildkit/blob/master/docs/attestations/attestation-storage.md

use std::collections::BTreeMap;

use hoist_oci::digest::Digest;
use hoist_oci::reference::{Reference, DOCKER_HUB};
use serde::Serialize;

use crate::graph::{FrontendOptions, Platform};

/// The in-toto statement type.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v0.1";
/// The predicate type of SLSA provenance v0.2.
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v0.2";
/// BuildKit's build type, which the predicate's fields follow.
pub const BUILD_TYPE: &str = "https://mobyproject.org/buildkit@v1";
/// Media type of a statement blob.
pub const MEDIA_TYPE: &str = "application/vnd.in-toto+json";
/// Layer annotation naming the statement's predicate type.
pub const PREDICATE_TYPE_ANNOTATION: &str = "in-toto.io/predicate-type";
/// Index entry annotation: what kind of reference the entry is.
pub const REFERENCE_TYPE: &str = "vnd.docker.reference.type";
/// Index entry annotation: the image manifest an attestation manifest is about.
pub const REFERENCE_DIGEST: &str = "vnd.docker.reference.digest";
/// [`REFERENCE_TYPE`] of an attestation manifest.
pub const ATTESTATION_MANIFEST: &str = "attestation-manifest";

/// How much the provenance records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// No build arg or label values.
    #[default]
    Min,
    /// Build args and labels too.
    Max,
}

/// An image the build read, with the digest it resolved to (a provenance material).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Material {
    /// The reference as resolved (`docker.io/library/alpine:3.20`).
    pub reference: String,
    /// The platform it was resolved for.
    pub platform: Platform,
    /// The manifest digest it resolved to.
    pub digest: Digest,
}

/// What the provenance of a build says, besides each image's subject and materials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    /// `mode=`.
    pub mode: Mode,
    /// `builder-id=`: the SLSA `builder.id` (empty unless given, as with BuildKit).
    pub builder_id: String,
    /// `reproducible=`: `metadata.reproducible`.
    pub reproducible: bool,
    /// The Dockerfile's name; its last component is the config source's entry point.
    pub dockerfile_name: String,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// `--label` values.
    pub labels: BTreeMap<String, String>,
    /// `--target`.
    pub target: Option<String>,
    /// `SOURCE_DATE_EPOCH`: the build's start and finish time when given.
    pub epoch: Option<i64>,
    /// The platform of the builder (`invocation.environment.platform`).
    pub builder_platform: Platform,
}

impl Provenance {
    /// The provenance of a build with frontend options `frontend`, made on this machine.
    pub fn new(mode: Mode, builder_id: String, reproducible: bool, frontend: &FrontendOptions) -> Provenance {
        Provenance {
            mode,
            builder_id,
            reproducible,
            dockerfile_name: frontend.dockerfile_name.clone(),
            build_args: frontend.build_args.clone(),
            labels: frontend.labels.clone(),
            target: frontend.target.clone(),
            epoch: crate::solver::source_date_epoch(frontend),
            builder_platform: Platform::host(),
        }
    }

    /// The statement about the image manifest `manifest` (of `platform`, named `names`,
    /// built from `materials`), as JSON.
    pub fn statement(&self, names: &[String], platform: &Platform, manifest: &Digest, materials: &[Material]) -> Vec<u8> {
        let digest_set = |d: &Digest| BTreeMap::from([(d.algorithm().to_string(), d.hex().to_string())]);
        let mut subject: Vec<Subject> =
            names.iter().filter_map(|n| purl(n, Some(platform))).map(|name| Subject { name, digest: digest_set(manifest) }).collect();
        if subject.is_empty() {
            // An unnamed image (an OCI archive without -t): in-toto's name for "no name".
            subject.push(Subject { name: "_".into(), digest: digest_set(manifest) });
        }
        let mut args = BTreeMap::new();
        if let Some(t) = self.target.as_ref().filter(|t| !t.is_empty()) {
            args.insert("target".to_string(), t.clone());
        }
        // As BuildKit's min mode: build args and labels are left out, and the parameters
        // marked incomplete when there were some.
        let mut complete = true;
        for (prefix, values) in [("build-arg:", &self.build_args), ("label:", &self.labels)] {
            for (k, v) in values {
                match self.mode {
                    Mode::Max => {
                        args.insert(format!("{prefix}{k}"), v.clone());
                    }
                    Mode::Min => complete = false,
                }
            }
        }
        let entry_point = self.dockerfile_name.rsplit('/').next().unwrap_or_default().to_string();
        let time = self.epoch.map(crate::solver::time_string);
        let statement = Statement {
            kind: STATEMENT_TYPE,
            predicate_type: PREDICATE_TYPE,
            subject,
            predicate: Predicate {
                builder: Builder { id: &self.builder_id },
                build_type: BUILD_TYPE,
                materials: materials
                    .iter()
                    .map(|m| MaterialJson {
                        uri: purl(&m.reference, Some(&m.platform)).unwrap_or_else(|| m.reference.clone()),
                        digest: digest_set(&m.digest),
                    })
                    .collect(),
                invocation: Invocation {
                    config_source: ConfigSource { entry_point },
                    parameters: Parameters {
                        frontend: "dockerfile.v0",
                        args,
                        // The context and the Dockerfile come from the client, as BuildKit's
                        // local sources: the materials are therefore incomplete.
                        locals: vec![Local { name: "context" }, Local { name: "dockerfile" }],
                    },
                    environment: Environment { platform: self.builder_platform.to_string() },
                },
                metadata: Metadata {
                    started: time.clone(),
                    finished: time,
                    completeness: Completeness { parameters: complete, environment: true, materials: false },
                    reproducible: self.reproducible,
                    buildkit: Empty {},
                },
            },
        };
        serde_json::to_vec(&statement).expect("a statement of strings serializes")
    }
}

#[derive(Serialize)]
struct Statement<'a> {
    #[serde(rename = "_type")]
    kind: &'static str,
    #[serde(rename = "predicateType")]
    predicate_type: &'static str,
    subject: Vec<Subject>,
    predicate: Predicate<'a>,
}

#[derive(Serialize)]
struct Subject {
    name: String,
    digest: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct Predicate<'a> {
    builder: Builder<'a>,
    #[serde(rename = "buildType")]
    build_type: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    materials: Vec<MaterialJson>,
    invocation: Invocation,
    metadata: Metadata,
}

#[derive(Serialize)]
struct Builder<'a> {
    id: &'a str,
}

#[derive(Serialize)]
struct MaterialJson {
    uri: String,
    digest: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct Invocation {
    #[serde(rename = "configSource")]
    config_source: ConfigSource,
    parameters: Parameters,
    environment: Environment,
}

#[derive(Serialize)]
struct ConfigSource {
    #[serde(rename = "entryPoint", skip_serializing_if = "String::is_empty")]
    entry_point: String,
}

#[derive(Serialize)]
struct Parameters {
    frontend: &'static str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    args: BTreeMap<String, String>,
    locals: Vec<Local>,
}

#[derive(Serialize)]
struct Local {
    name: &'static str,
}

#[derive(Serialize)]
struct Environment {
    platform: String,
}

#[derive(Serialize)]
struct Metadata {
    #[serde(rename = "buildStartedOn", skip_serializing_if = "Option::is_none")]
    started: Option<String>,
    #[serde(rename = "buildFinishedOn", skip_serializing_if = "Option::is_none")]
    finished: Option<String>,
    completeness: Completeness,
    reproducible: bool,
    #[serde(rename = "https://mobyproject.org/buildkit@v1#metadata")]
    buildkit: Empty,
}

#[derive(Serialize)]
struct Completeness {
    parameters: bool,
    environment: bool,
    materials: bool,
}

#[derive(Serialize)]
struct Empty {}

/// The package URL BuildKit gives an image reference: `pkg:docker/alpine@3.20`,
/// `pkg:docker/ghcr.io/org/app@1?platform=linux%2Famd64`, with `digest=` for a pinned one.
/// `None` for a string that is not a reference.
pub fn purl(reference: &str, platform: Option<&Platform>) -> Option<String> {
    let r = Reference::parse(reference).ok()?;
    let name = match r.registry.as_str() {
        DOCKER_HUB => r.repository.strip_prefix("library/").unwrap_or(&r.repository).to_string(),
        _ => r.name(),
    };
    // Go's url.QueryEscape for the name's parts, url.PathEscape for version and qualifiers.
    const QUERY: &str = "-_.~";
    const PATH: &str = "-_.~$&+:=@";
    let mut out = String::from("pkg:docker/");
    out.push_str(&name.split('/').map(|part| escape(part, QUERY)).collect::<Vec<_>>().join("/"));
    if let Some(t) = &r.tag {
        out.push('@');
        out.push_str(&escape(t, PATH));
    }
    let mut qualifiers = Vec::new();
    if let Some(d) = &r.digest {
        qualifiers.push(format!("digest={}", escape(d.as_str(), PATH)));
    }
    if let Some(p) = platform {
        qualifiers.push(format!("platform={}", escape(&p.normalize().to_string(), PATH)));
    }
    if !qualifiers.is_empty() {
        out.push('?');
        out.push_str(&qualifiers.join("&"));
    }
    Some(out)
}

/// Percent-encode every byte but ASCII letters, digits and `keep`.
fn escape(s: &str, keep: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || keep.as_bytes().contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn p(s: &str) -> Platform {
        Platform::parse(s).unwrap()
    }

    #[test]
    fn package_urls_are_buildkits() {
        let d = Digest::of(b"test");
        let amd = p("linux/amd64");
        for (r, platform, want) in [
            ("alpine", None, "pkg:docker/alpine@latest".to_string()),
            ("docker.io/library/alpine:3.15", None, "pkg:docker/alpine@3.15".to_string()),
            ("user/test:v2", None, "pkg:docker/user/test@v2".to_string()),
            ("ghcr.io/foo/bar", None, "pkg:docker/ghcr.io/foo/bar@latest".to_string()),
            (&format!("alpine@{d}") as &str, None, format!("pkg:docker/alpine?digest={d}")),
            (&format!("alpine:latest@{d}") as &str, Some(&amd), format!("pkg:docker/alpine@latest?digest={d}&platform=linux%2Famd64")),
            ("busybox", Some(&amd), "pkg:docker/busybox@latest?platform=linux%2Famd64".to_string()),
            ("127.0.0.1:5000/library/busybox:latest", Some(&p("linux/arm64/v8")), {
                "pkg:docker/127.0.0.1%3A5000/library/busybox@latest?platform=linux%2Farm64".to_string()
            }),
        ] {
            assert_eq!(purl(r, platform).as_deref(), Some(want.as_str()), "{r}");
        }
        assert_eq!(purl("Not A Reference", None), None);
    }

    fn provenance(mode: Mode) -> Provenance {
        let frontend = FrontendOptions {
            dockerfile_name: "docker/app.Dockerfile".into(),
            build_args: [("TOKEN".to_string(), "s3cret".to_string())].into_iter().collect(),
            labels: [("team".to_string(), "web".to_string())].into_iter().collect(),
            target: Some("release".into()),
            ..Default::default()
        };
        Provenance { builder_platform: p("linux/amd64"), ..Provenance::new(mode, String::new(), false, &frontend) }
    }

    fn statement(pr: &Provenance) -> Value {
        let base = Material { reference: "docker.io/library/alpine:3.20".into(), platform: p("linux/arm64"), digest: Digest::of(b"base") };
        let bytes = pr.statement(&["127.0.0.1:5000/app:1".into(), "app:latest".into()], &p("linux/arm64"), &Digest::of(b"m"), &[base]);
        assert_eq!(
            bytes,
            pr.statement(
                &["127.0.0.1:5000/app:1".into(), "app:latest".into()],
                &p("linux/arm64"),
                &Digest::of(b"m"),
                &[Material { reference: "docker.io/library/alpine:3.20".into(), platform: p("linux/arm64"), digest: Digest::of(b"base") }]
            )
        );
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn a_min_statement_names_the_image_and_its_base_but_no_arg_values() {
        let s = statement(&provenance(Mode::Min));
        assert_eq!(s["_type"], STATEMENT_TYPE);
        assert_eq!(s["predicateType"], PREDICATE_TYPE);
        let m = Digest::of(b"m");
        assert_eq!(s["subject"][0]["name"], "pkg:docker/127.0.0.1%3A5000/app@1?platform=linux%2Farm64");
        assert_eq!(s["subject"][1]["name"], "pkg:docker/app@latest?platform=linux%2Farm64");
        assert_eq!(s["subject"][0]["digest"]["sha256"], m.hex());
        let pr = &s["predicate"];
        assert_eq!(pr["buildType"], BUILD_TYPE);
        assert_eq!(pr["builder"]["id"], "");
        assert_eq!(pr["materials"][0]["uri"], "pkg:docker/alpine@3.20?platform=linux%2Farm64");
        assert_eq!(pr["materials"][0]["digest"]["sha256"], Digest::of(b"base").hex());
        assert_eq!(pr["invocation"]["configSource"]["entryPoint"], "app.Dockerfile");
        assert_eq!(pr["invocation"]["parameters"]["frontend"], "dockerfile.v0");
        assert_eq!(pr["invocation"]["parameters"]["args"], serde_json::json!({"target": "release"}));
        assert_eq!(pr["invocation"]["parameters"]["locals"], serde_json::json!([{"name": "context"}, {"name": "dockerfile"}]));
        assert_eq!(pr["invocation"]["environment"]["platform"], "linux/amd64");
        assert!(!s.to_string().contains("s3cret"), "min mode leaves out build arg values");
        assert_eq!(pr["metadata"]["completeness"], serde_json::json!({"parameters": false, "environment": true, "materials": false}));
        assert_eq!(pr["metadata"]["https://mobyproject.org/buildkit@v1#metadata"], serde_json::json!({}));
        assert!(pr["metadata"].get("buildStartedOn").is_none() && pr["metadata"].get("buildInvocationID").is_none(), "deterministic");
    }

    #[test]
    fn max_records_args_and_labels_and_the_epoch_is_the_build_time() {
        let mut pr = provenance(Mode::Max);
        pr.epoch = Some(1_700_000_000);
        pr.builder_id = "https://ci.example/run/1".into();
        let s = statement(&pr);
        let args = &s["predicate"]["invocation"]["parameters"]["args"];
        assert_eq!(args["build-arg:TOKEN"], "s3cret");
        assert_eq!(args["label:team"], "web");
        assert_eq!(s["predicate"]["metadata"]["completeness"]["parameters"], true);
        assert_eq!(s["predicate"]["metadata"]["buildStartedOn"], "2023-11-14T22:13:20Z");
        assert_eq!(s["predicate"]["metadata"]["buildFinishedOn"], "2023-11-14T22:13:20Z");
        assert_eq!(s["predicate"]["builder"]["id"], "https://ci.example/run/1");
        // Without names, the subject is in-toto's "_".
        let bytes = pr.statement(&[], &p("linux/amd64"), &Digest::of(b"m"), &[]);
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["subject"][0]["name"], "_");
        assert!(v["predicate"].get("materials").is_none(), "no base image (FROM scratch): no materials");
    }
}
