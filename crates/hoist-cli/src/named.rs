//! `--build-context NAME=VALUE` (buildx's named contexts): what `FROM NAME`,
//! `COPY --from=NAME` and `RUN --mount=from=NAME` read instead of the image or the stage of
//! that name. A value is an image (`docker-image://REF`), a local directory, or a git or
//! https URL (fetched here, as a build's own context is), or an image of an OCI image
//! layout (`oci-layout://DIR[:TAG|@DIGEST]`). A directory is uploaded as a context of its
//! own (after its own `.dockerignore`; a layout as it is), so the builder never opens a path
//! the client names.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _};
use hoist_client::sync::SentContext;
use hoist_client::v1;

/// One named context, ready to send.
pub(crate) enum Named {
    /// An image reference.
    Image(String),
    /// A directory (and the temporary directory holding it, for a fetched URL).
    Dir(PathBuf, Option<tempfile::TempDir>),
    /// An OCI image layout directory and the digest of the image (index or manifest) in it.
    Layout(PathBuf, String),
}

/// The annotation of `index.json` entries that holds their tag.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The directory and the image digest of `DIR[:TAG][@DIGEST]` (buildx's form): the image
/// of that digest, else the entry of `index.json` tagged TAG, else its only entry, else the
/// one tagged `latest`.
fn layout_image(spec: &str) -> anyhow::Result<(PathBuf, String)> {
    let (rest, digest) = match spec.rsplit_once('@') {
        Some((rest, d)) => (rest, Some(d)),
        None => (spec, None),
    };
    let (dir, tag) = match rest.rsplit_once(':') {
        Some((dir, tag)) if !tag.contains('/') && !tag.is_empty() => (dir, Some(tag)),
        _ => (rest, None),
    };
    let dir = std::fs::canonicalize(dir).with_context(|| format!("{dir}: not a directory"))?;
    let index_path = dir.join("index.json");
    let index: hoist_oci::image::Index =
        serde_json::from_slice(&std::fs::read(&index_path).with_context(|| format!("{}: not an OCI image layout", dir.display()))?)
            .with_context(|| format!("{}", index_path.display()))?;
    let tag_of = |d: &hoist_oci::image::Descriptor| d.annotations.as_ref().and_then(|a| a.get(REF_NAME)).cloned();
    if let Some(d) = digest {
        let digest: hoist_oci::digest::Digest = d.parse().map_err(|e| anyhow!("{e}"))?;
        let blob = dir.join("blobs").join(digest.to_string().replacen(':', "/", 1));
        if !blob.is_file() {
            bail!("{} has no blob {digest}", dir.display());
        }
        return Ok((dir, digest.to_string()));
    }
    let wanted = tag.unwrap_or("latest");
    let chosen = match (tag, &index.manifests[..]) {
        (None, [only]) => Some(only),
        _ => index.manifests.iter().find(|d| tag_of(d).as_deref() == Some(wanted)),
    };
    match chosen {
        Some(d) => Ok((dir, d.digest.to_string())),
        None => {
            let tags: Vec<String> = index.manifests.iter().filter_map(tag_of).collect();
            bail!(
                "{} has no image tagged {wanted:?} (its tags: {})",
                index_path.display(),
                if tags.is_empty() { "none".into() } else { tags.join(", ") }
            )
        }
    }
}

/// Parse `--build-context` values, fetching URL values.
pub(crate) fn parse(specs: &[String]) -> anyhow::Result<Vec<(String, Named)>> {
    let mut out: Vec<(String, Named)> = Vec::new();
    for spec in specs {
        let (name, value) = spec
            .split_once('=')
            .filter(|(n, v)| !n.is_empty() && !v.is_empty())
            .ok_or_else(|| anyhow!("--build-context {spec:?}: expected NAME=VALUE (a directory, docker-image://REF or a git/https URL)"))?;
        if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("--build-context {spec:?}: the name may not contain spaces");
        }
        if out.iter().any(|(n, _)| n == name) {
            bail!("--build-context {name}: given twice");
        }
        let named = if let Some(r) = value.strip_prefix("docker-image://") {
            hoist_oci::reference::Reference::parse(r).map_err(|e| anyhow!("--build-context {name}={value}: {e}"))?;
            Named::Image(r.to_string())
        } else if let Some(layout) = value.strip_prefix("oci-layout://") {
            let (dir, digest) = layout_image(layout).with_context(|| format!("--build-context {name}={value}"))?;
            Named::Layout(dir, digest)
        } else if value.starts_with("target:") {
            bail!("--build-context {name}={value}: target: contexts exist only in bake files");
        } else if let Some(remote) = crate::remote::Remote::parse(value) {
            match remote.fetch(&[]).with_context(|| format!("--build-context {name}={value}"))? {
                crate::remote::Fetched::Dir(tmp, dir) => Named::Dir(dir, Some(tmp)),
                crate::remote::Fetched::Data(data) => match crate::build::archive_or_dockerfile(data, value)? {
                    (Some(dir), tmp, None) => Named::Dir(dir, tmp),
                    _ => bail!("--build-context {name}={value}: expected a git repository or a tar archive"),
                },
            }
        } else {
            let dir = PathBuf::from(value);
            if !dir.is_dir() {
                bail!("--build-context {name}={value}: not a directory");
            }
            Named::Dir(std::fs::canonicalize(&dir).with_context(|| format!("--build-context {name}={value}"))?, None)
        };
        out.push((name.to_string(), named));
    }
    Ok(out)
}

/// Send the named contexts: directories are uploaded (after their own `.dockerignore`).
pub(crate) async fn send(client: &mut hoist_client::Client, named: &[(String, Named)], sent: &mut SentContext) -> anyhow::Result<()> {
    let mut out = BTreeMap::new();
    for (name, n) in named {
        let kind = match n {
            Named::Image(r) => v1::named_context::Kind::Image(r.clone()),
            Named::Dir(dir, tmp) => {
                let ignore = crate::build::ignore_file_in(dir)?;
                let cache = tmp.is_none().then(crate::build::cache_root);
                let s = hoist_client::sync::sync_whole(client, dir, ignore.as_ref(), cache.as_deref())
                    .await
                    .with_context(|| format!("sending --build-context {name} ({})", dir.display()))?;
                v1::named_context::Kind::ContextId(s.id)
            }
            // Uploaded as it is (no .dockerignore): the builder reads only its blobs.
            Named::Layout(dir, digest) => {
                let s = hoist_client::sync::sync_whole(client, dir, None, Some(&crate::build::cache_root()))
                    .await
                    .with_context(|| format!("sending --build-context {name} ({})", dir.display()))?;
                v1::named_context::Kind::OciLayout(v1::OciLayout { context_id: s.id, digest: digest.clone() })
            }
        };
        out.insert(name.clone(), v1::NamedContext { kind: Some(kind) });
    }
    sent.named = out;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_images_or_directories_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let specs =
            vec!["base=docker-image://127.0.0.1:5000/library/busybox:latest".to_string(), format!("assets={}", dir.path().display())];
        let parsed = parse(&specs).unwrap();
        assert!(matches!(&parsed[0], (n, Named::Image(r)) if n == "base" && r == "127.0.0.1:5000/library/busybox:latest"));
        assert!(matches!(&parsed[1], (n, Named::Dir(_, None)) if n == "assets"));
        for (spec, expect) in [
            ("novalue", "expected NAME=VALUE"),
            ("x=/does/not/exist", "not a directory"),
            ("x=oci-layout:///does/not/exist:v1", "/does/not/exist: not a directory"),
            ("x=docker-image://UPPER/Case", "--build-context x="),
        ] {
            let e = parse(&[spec.to_string()]).err().map(|e| format!("{e:#}")).unwrap_or_default();
            assert!(e.contains(expect), "{spec}: {e}");
        }
        let twice = [format!("a={}", dir.path().display()), format!("a={}", dir.path().display())];
        assert!(parse(&twice).is_err());
    }

    #[test]
    fn a_layout_image_is_chosen_by_digest_tag_or_as_the_only_one() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let entry = |hex: char, tag: Option<&str>| {
            let ann = tag.map(|t| format!(r#","annotations":{{"{REF_NAME}":"{t}"}}"#)).unwrap_or_default();
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":1{ann}}}"#,
                hex.to_string().repeat(64)
            )
        };
        let write = |entries: &[String]| {
            std::fs::write(d.join("index.json"), format!(r#"{{"schemaVersion":2,"manifests":[{}]}}"#, entries.join(","))).unwrap()
        };
        let digest = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        write(&[entry('a', None)]);
        assert_eq!(layout_image(&d.display().to_string()).unwrap().1, digest('a'));
        write(&[entry('a', Some("v1")), entry('b', Some("latest"))]);
        assert_eq!(layout_image(&format!("{}:v1", d.display())).unwrap().1, digest('a'));
        assert_eq!(layout_image(&d.display().to_string()).unwrap().1, digest('b'));
        let e = format!("{:#}", layout_image(&format!("{}:v2", d.display())).unwrap_err());
        assert!(e.contains(r#"no image tagged "v2" (its tags: v1, latest)"#), "{e}");
        let e = format!("{:#}", layout_image(&format!("{}@{}", d.display(), digest('c'))).unwrap_err());
        assert!(e.contains("has no blob"), "{e}");
        std::fs::create_dir_all(d.join("blobs/sha256")).unwrap();
        std::fs::write(d.join("blobs/sha256").join("c".repeat(64)), b"{}").unwrap();
        assert_eq!(layout_image(&format!("{}@{}", d.display(), digest('c'))).unwrap().1, digest('c'));
        let e = format!("{:#}", layout_image(&format!("{}", d.join("blobs").display())).unwrap_err());
        assert!(e.contains("not an OCI image layout"), "{e}");
    }
}
