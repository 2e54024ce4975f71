//! `--cache-store` URLs: `s3://bucket/prefix` and `file:///dir`.
//!
//! S3 settings come from the usual places, in the order the AWS tools read them: `AWS_*`
//! variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, …), then the profile
//! (`AWS_PROFILE`, else `default`) of `~/.aws/credentials` and `~/.aws/config`
//! (`AWS_SHARED_CREDENTIALS_FILE`, `AWS_CONFIG_FILE`). An `http://` endpoint (a store on
//! the same network, a test server) is allowed without setting `AWS_ALLOW_HTTP`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::{ClientOptions, RetryConfig};

use super::{SharedError, SharedStore};

pub(super) fn open(url: &str) -> Result<SharedStore, SharedError> {
    let bad = |reason: String| SharedError::Url { url: url.to_string(), reason };
    if let Some(dir) = url.strip_prefix("file://") {
        if !dir.starts_with('/') {
            return Err(bad("a file store needs an absolute path: file:///dir".into()));
        }
        std::fs::create_dir_all(dir).map_err(|e| bad(format!("creating {dir}: {e}")))?;
        let fs = LocalFileSystem::new_with_prefix(dir).map_err(|e| bad(e.to_string()))?;
        return Ok(SharedStore::new(Arc::new(fs), "", url));
    }
    let Some(rest) = url.strip_prefix("s3://") else {
        return Err(bad("expected s3://bucket/prefix or file:///dir".into()));
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(bad("no bucket: expected s3://bucket/prefix".into()));
    }
    let env: HashMap<String, String> = std::env::vars().filter(|(k, _)| k.starts_with("AWS_")).collect();
    let settings = settings(&env, &home());
    let mut builder = AmazonS3Builder::new().with_bucket_name(bucket);
    let mut endpoint_http = false;
    for (key, value) in &settings {
        if let Ok(k) = key.parse::<AmazonS3ConfigKey>() {
            if matches!(k, AmazonS3ConfigKey::Endpoint) {
                endpoint_http = value.starts_with("http://");
            }
            builder = builder.with_config(k, value);
        }
    }
    if !settings.contains_key("aws_region") && !settings.contains_key("aws_default_region") {
        builder = builder.with_region("us-east-1");
    }
    // A store that does not answer is noticed in seconds, not minutes: builds go on
    // without it (the local tier) rather than wait.
    let mut client = ClientOptions::new().with_connect_timeout(Duration::from_secs(3)).with_timeout(Duration::from_secs(300));
    if endpoint_http || settings.get("aws_allow_http").is_some_and(|v| v == "true") {
        client = client.with_allow_http(true);
    }
    let retry = RetryConfig { max_retries: 2, retry_timeout: Duration::from_secs(15), ..Default::default() };
    let s3 = builder.with_client_options(client).with_retry(retry).build().map_err(|e| bad(e.to_string()))?;
    Ok(SharedStore::new(Arc::new(s3), prefix, url))
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"))
}

/// Lower-case `aws_*` settings: the variables in `env`, then what the profile's files add.
fn settings(env: &HashMap<String, String>, home: &Path) -> HashMap<String, String> {
    let mut out: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect();
    let profile = env.get("AWS_PROFILE").cloned().unwrap_or_else(|| "default".into());
    let file = |var: &str, name: &str| env.get(var).map(PathBuf::from).unwrap_or_else(|| home.join(".aws").join(name));
    let credentials = read_ini(&file("AWS_SHARED_CREDENTIALS_FILE", "credentials"), &profile);
    let config_section = if profile == "default" { profile.clone() } else { format!("profile {profile}") };
    let config = read_ini(&file("AWS_CONFIG_FILE", "config"), &config_section);
    for (k, v) in credentials.into_iter().chain(config) {
        let k = if k.starts_with("aws_") { k } else { format!("aws_{k}") };
        out.entry(k).or_insert(v);
    }
    out
}

/// The `key = value` lines of section `[section]` of an INI file (empty when unreadable).
fn read_ini(path: &Path, section: &str) -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
            continue;
        }
        if let (true, Some((k, v))) = (inside, line.split_once('=')) {
            out.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_win_over_the_profile_files_which_fill_in_the_rest() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(home.path().join(".aws")).unwrap();
        std::fs::write(
            home.path().join(".aws/credentials"),
            "[default]\naws_access_key_id = DEF\n[ci]\naws_access_key_id = CI\naws_secret_access_key = s3cret\n",
        )
        .unwrap();
        std::fs::write(
            home.path().join(".aws/config"),
            "[default]\nregion = eu-west-1\n[profile ci]\nregion = eu-north-1\nendpoint_url = http://127.0.0.1:9000\n",
        )
        .unwrap();
        let env = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>();
        let s = settings(&env(&[]), home.path());
        assert_eq!((s["aws_access_key_id"].as_str(), s["aws_region"].as_str()), ("DEF", "eu-west-1"));
        let s = settings(&env(&[("AWS_PROFILE", "ci"), ("AWS_REGION", "us-west-2")]), home.path());
        assert_eq!(s["aws_access_key_id"], "CI");
        assert_eq!(s["aws_secret_access_key"], "s3cret");
        assert_eq!(s["aws_region"], "us-west-2", "a variable wins over the file");
        assert_eq!(s["aws_endpoint_url"], "http://127.0.0.1:9000");
    }

    #[test]
    fn urls_that_name_no_store_are_refused_with_the_reason() {
        for (url, says) in [("ftp://x", "expected s3://"), ("s3://", "no bucket"), ("file://relative", "absolute path")] {
            let e = open(url).unwrap_err().to_string();
            assert!(e.contains(url) && e.contains(says), "{url}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/store", dir.path().display());
        let s = open(&url).unwrap();
        assert_eq!(s.name(), url);
        assert!(dir.path().join("store").is_dir());
        let s3 = open("s3://bucket/team/cache").unwrap();
        assert_eq!(s3.entry_path("p", "k").to_string(), "team/cache/ac/p/k");
    }
}
