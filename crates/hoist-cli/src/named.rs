//! `--build-context NAME=VALUE` (buildx's named contexts): what `FROM NAME`,
//! `COPY --from=NAME` and `RUN --mount=from=NAME` read instead of the image or the stage of
//! that name. A value is an image (`docker-image://REF`), a local directory, or a git or
//! https URL (fetched here, as a build's own context is); a directory is uploaded as a
//! context of its own (after its own `.dockerignore`), so the builder never opens a path
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
        } else if value.starts_with("oci-layout://") {
            bail!("--build-context {name}={value}: oci-layout:// contexts are not supported by hoist yet (push the image to a registry and use docker-image://)");
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
            ("x=oci-layout:///tmp/l", "not supported"),
            ("x=docker-image://UPPER/Case", "--build-context x="),
        ] {
            let e = parse(&[spec.to_string()]).err().map(|e| format!("{e:#}")).unwrap_or_default();
            assert!(e.contains(expect), "{spec}: {e}");
        }
        let twice = [format!("a={}", dir.path().display()), format!("a={}", dir.path().display())];
        assert!(parse(&twice).is_err());
    }
}
