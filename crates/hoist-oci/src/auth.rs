//! Registry credentials: reading them from the Docker client configuration
//! (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`: `auths` with a base64 `auth`,
//! `username`/`password` or `identitytoken`, `credsStore` and `credHelpers` through
//! `docker-credential-<name> get`), and [`Credentials`], the explicit registry → credential
//! map the registry client works from.
//!
//! The config is read on the client side only: the client collects the credentials of the
//! registries a build involves and forwards them with the request; the builder never reads
//! its own user's Docker config for them.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};

use docker_credential::{CredentialRetrievalError, DockerCredential};
use serde::{Deserialize, Serialize};

use crate::reference::DOCKER_HUB;

/// The server address Docker stores Docker Hub credentials under.
pub const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";

/// Errors reading credentials.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The config file exists but cannot be read.
    #[error("cannot read docker config {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why reading it failed.
        source: io::Error,
    },
    /// The config file has an unexpected shape (not an object, or `auths`, `credsStore` or
    /// `credHelpers` not as Docker writes them).
    #[error("docker config {path} is not valid: {reason}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The config file is not JSON.
    #[error("docker config {path} is not valid: {source}")]
    Json {
        /// The config file.
        path: PathBuf,
        /// The JSON error, with its line and column.
        source: serde_json::Error,
    },
    /// The `auth` entry of a registry is not base64 of `user:password`, or disagrees with
    /// the `username`/`password` fields next to it.
    #[error("docker config {path}: the credentials for {registry} are malformed: {reason}")]
    Malformed {
        /// The config file.
        path: PathBuf,
        /// The registry key of the entry, as written in the file.
        registry: String,
        /// What is wrong with the entry.
        reason: String,
    },
    /// A credential helper could not be run or failed.
    #[error("credential helper docker-credential-{helper} failed for {registry}: {reason}")]
    Helper {
        /// The helper's name: the program is `docker-credential-<helper>`.
        helper: String,
        /// The registry the credentials were asked for.
        registry: String,
        /// How it failed.
        reason: String,
    },
}

/// A credential for one registry.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Credential {
    /// A user name and password (or personal access token), sent as Basic auth or to the
    /// token server.
    UsernamePassword {
        /// The user name.
        username: String,
        /// The password or access token (`Debug` shows `<redacted>`).
        password: String,
    },
    /// An OAuth2 refresh token (`identitytoken` in the config, `<token>` from a helper),
    /// exchanged at the token server for access tokens.
    IdentityToken(String),
}

impl Credential {
    /// A user name / password credential.
    pub fn basic(username: impl Into<String>, password: impl Into<String>) -> Credential {
        Credential::UsernamePassword { username: username.into(), password: password.into() }
    }
}

/// Never prints secrets.
impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::UsernamePassword { username, .. } => {
                write!(f, "UsernamePassword {{ username: {username:?}, password: <redacted> }}")
            }
            Credential::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
        }
    }
}

/// Credentials per registry, keyed by the registry name of [`crate::reference::Reference`]
/// (`docker.io`, `ghcr.io`, `127.0.0.1:5000`). This is what the registry client is given;
/// it never reads config files itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    by_registry: BTreeMap<String, Credential>,
}

impl Credentials {
    /// No credentials: every registry is accessed anonymously.
    pub fn new() -> Credentials {
        Credentials::default()
    }

    /// Set the credential of a registry (Docker Hub aliases are folded into `docker.io`).
    pub fn insert(&mut self, registry: &str, credential: Credential) {
        self.by_registry.insert(normalize_registry(registry).to_string(), credential);
    }

    /// The credential of a registry, if any.
    pub fn get(&self, registry: &str) -> Option<&Credential> {
        self.by_registry.get(normalize_registry(registry))
    }

    /// Registries that have a credential, with it.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Credential)> {
        self.by_registry.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Whether no registry has a credential.
    pub fn is_empty(&self) -> bool {
        self.by_registry.is_empty()
    }

    /// Collect, from the user's Docker config, the credentials of the given registries
    /// (the client side of a build: the registries of its base images and push targets).
    /// Registries without a credential are simply absent.
    pub fn from_docker_config<'a>(registries: impl IntoIterator<Item = &'a str>) -> Result<Credentials, AuthError> {
        let mut out = Credentials::new();
        let Some(path) = docker_config_path() else { return Ok(out) };
        for registry in registries {
            if let Some(c) = credentials_in(&path, registry)? {
                out.insert(registry, c);
            }
        }
        Ok(out)
    }
}

impl FromIterator<(String, Credential)> for Credentials {
    fn from_iter<I: IntoIterator<Item = (String, Credential)>>(iter: I) -> Self {
        let mut out = Credentials::new();
        for (registry, credential) in iter {
            out.insert(&registry, credential);
        }
        out
    }
}

fn normalize_registry(registry: &str) -> &str {
    match registry {
        "index.docker.io" | "registry-1.docker.io" | DOCKER_HUB_AUTH_KEY => DOCKER_HUB,
        r => r,
    }
}

/// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".docker")))?;
    Some(dir.join("config.json"))
}

/// The credential of `registry` (a registry name such as `docker.io` or `host:5000`) in the
/// user's Docker config; `Ok(None)` when the config or an entry for it does not exist.
pub fn credentials_for(registry: &str) -> Result<Option<Credential>, AuthError> {
    match docker_config_path() {
        Some(path) => credentials_in(&path, registry),
        None => Ok(None),
    }
}

/// The credential of `registry` in the Docker config file at `config_path`; `Ok(None)` when
/// the file does not exist, has no entry for it, or its helper holds nothing for it.
pub fn credentials_in(config_path: &Path, registry: &str) -> Result<Option<Credential>, AuthError> {
    let registry = normalize_registry(registry);
    let file = match File::open(config_path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(AuthError::Read { path: config_path.to_path_buf(), source }),
    };
    // Parse once ourselves for an error message with line and column: docker_credential
    // reports every parse failure as the same opaque error.
    let value: serde_json::Value =
        serde_json::from_reader(BufReader::new(file)).map_err(|source| AuthError::Json { path: config_path.to_path_buf(), source })?;
    if !value.is_object() {
        return Err(AuthError::Invalid { path: config_path.to_path_buf(), reason: "expected a JSON object".into() });
    }
    // Docker keeps Docker Hub credentials under its v1 index URL, other registries under
    // their host name (auths keys with a scheme are matched by docker_credential).
    let server = if registry == DOCKER_HUB { DOCKER_HUB_AUTH_KEY } else { registry };
    let bytes = serde_json::to_vec(&value).map_err(|source| AuthError::Json { path: config_path.to_path_buf(), source })?;
    match docker_credential::get_credential_from_reader(bytes.as_slice(), server) {
        Ok(DockerCredential::UsernamePassword(username, password)) => {
            if username.is_empty() && password.is_empty() {
                Ok(None)
            } else {
                Ok(Some(Credential::UsernamePassword { username, password }))
            }
        }
        Ok(DockerCredential::IdentityToken(token)) => Ok(Some(Credential::IdentityToken(token))),
        Err(CredentialRetrievalError::NoCredentialConfigured) => Ok(None),
        Err(e) => match map_error(e, config_path, registry, helper_name(&value, server)) {
            // docker-credential-helpers answer `credentials not found in native keychain`
            // for a registry they hold nothing for; Docker then goes anonymous, and so do we.
            e if is_not_found(&e) => Ok(None),
            e => Err(e),
        },
    }
}

/// The helper docker_credential would have run for `server`, for error messages.
fn helper_name(config: &serde_json::Value, server: &str) -> String {
    config
        .get("credHelpers")
        .and_then(|h| h.get(server))
        .and_then(|h| h.as_str())
        .filter(|h| !h.is_empty())
        .or_else(|| config.get("credsStore").and_then(|s| s.as_str()))
        .unwrap_or("?")
        .to_string()
}

fn map_error(e: CredentialRetrievalError, path: &Path, registry: &str, helper: String) -> AuthError {
    let registry = registry.to_string();
    let malformed = |reason: &str| AuthError::Malformed { path: path.to_path_buf(), registry: registry.clone(), reason: reason.into() };
    match e {
        CredentialRetrievalError::CredentialDecodingError => malformed("`auth` is not base64 of user:password"),
        CredentialRetrievalError::CredentialMismatchError => malformed("`auth` does not match the `username` and `password` fields"),
        CredentialRetrievalError::HelperCommunicationError => AuthError::Helper {
            reason: format!("docker-credential-{helper} could not be run; is it installed and on PATH?"),
            helper,
            registry,
        },
        CredentialRetrievalError::MalformedHelperResponse => AuthError::Helper {
            helper,
            registry,
            reason: "its answer is not the JSON {\"Username\":..,\"Secret\":..} it should print".into(),
        },
        CredentialRetrievalError::HelperFailure { stdout, stderr, .. } => {
            let out = format!("{} {}", stdout.trim(), stderr.trim());
            let reason = if out.trim().is_empty() { "it exited with an error".to_string() } else { out.trim().to_string() };
            AuthError::Helper { helper, registry, reason }
        }
        CredentialRetrievalError::ConfigNotFound | CredentialRetrievalError::ConfigReadError => {
            AuthError::Invalid { path: path.to_path_buf(), reason: "unexpected shape of auths, credsStore or credHelpers".into() }
        }
        CredentialRetrievalError::NoCredentialConfigured => {
            AuthError::Invalid { path: path.to_path_buf(), reason: "no credential configured".into() }
        }
    }
}

/// Whether a helper's failure means "no credential stored".
fn is_not_found(e: &AuthError) -> bool {
    matches!(e, AuthError::Helper { reason, .. } if reason.to_ascii_lowercase().contains("credentials not found"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Mutex;

    /// Tests that change PATH or DOCKER_CONFIG hold this lock (the environment is global).
    static ENV: Mutex<()> = Mutex::new(());

    fn b64(s: &str) -> String {
        crate::registry::base64_encode(s.as_bytes())
    }

    fn config(dir: &Path, json: &str) -> PathBuf {
        let path = dir.join("config.json");
        std::fs::write(&path, json).unwrap();
        path
    }

    /// A fake `docker-credential-<name>` that answers for one server and fails otherwise.
    fn helper(dir: &Path, name: &str, server: &str, username: &str, secret: &str) {
        let path = dir.join(format!("docker-credential-{name}"));
        let mut f = File::create(&path).unwrap();
        writeln!(
            f,
            "#!/bin/sh\n[ \"$1\" = get ] || exit 3\nread server\nif [ \"$server\" = '{server}' ]; then\n  printf '{{\"ServerURL\":\"%s\",\"Username\":\"{username}\",\"Secret\":\"{secret}\"}}' \"$server\"\nelse\n  echo 'credentials not found in native keychain'; exit 1\nfi"
        )
        .unwrap();
        drop(f);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn with_path<T>(dir: &Path, f: impl FnOnce() -> T) -> T {
        let old = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![dir.to_path_buf()];
        paths.extend(std::env::split_paths(&old));
        std::env::set_var("PATH", std::env::join_paths(paths).unwrap());
        let out = f();
        std::env::set_var("PATH", old);
        out
    }

    #[test]
    fn auths_base64_username_password_and_identity_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = config(
            dir.path(),
            &format!(
                r#"{{"auths": {{
                    "https://index.docker.io/v1/": {{"auth": "{}"}},
                    "reg.example:5000": {{"username": "bob", "password": "pw"}},
                    "http://plain.example": {{"auth": "{}"}},
                    "tok.example": {{"identitytoken": "refresh-123"}},
                    "empty.example": {{}}
                }}}}"#,
                b64("alice:s3cr:et"),
                b64("carol:pw2")
            ),
        );
        assert_eq!(credentials_in(&path, "docker.io").unwrap(), Some(Credential::basic("alice", "s3cr:et")));
        assert_eq!(credentials_in(&path, "index.docker.io").unwrap(), Some(Credential::basic("alice", "s3cr:et")));
        assert_eq!(credentials_in(&path, "reg.example:5000").unwrap(), Some(Credential::basic("bob", "pw")));
        assert_eq!(credentials_in(&path, "plain.example").unwrap(), Some(Credential::basic("carol", "pw2")));
        assert_eq!(credentials_in(&path, "tok.example").unwrap(), Some(Credential::IdentityToken("refresh-123".into())));
        assert_eq!(credentials_in(&path, "empty.example").unwrap(), None);
        assert_eq!(credentials_in(&path, "other.example").unwrap(), None);
    }

    #[test]
    fn missing_config_means_no_credentials() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(credentials_in(&dir.path().join("config.json"), "docker.io").unwrap(), None);
    }

    #[test]
    fn malformed_config_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = config(dir.path(), "{\"auths\": {");
        let err = credentials_in(&path, "docker.io").unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()) && err.contains("not valid"), "{err}");

        let path = config(dir.path(), r#"{"auths": {"r.example": {"auth": "!!notbase64"}}}"#);
        let err = credentials_in(&path, "r.example").unwrap_err().to_string();
        assert!(err.contains("r.example") && err.contains("base64"), "{err}");

        let path =
            config(dir.path(), &format!(r#"{{"auths": {{"r.example": {{"auth": "{}", "username": "x", "password": "y"}}}}}}"#, b64("a:b")));
        let err = credentials_in(&path, "r.example").unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
    }

    #[test]
    fn cred_helpers_and_creds_store_run_the_helper() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        helper(dir.path(), "hoisttest", "reg.example", "helper-user", "helper-secret");
        helper(dir.path(), "hoiststore", DOCKER_HUB_AUTH_KEY, "<token>", "refresh-xyz");
        let locked = dir.path().join("docker-credential-hoistlocked");
        std::fs::write(&locked, "#!/bin/sh\nread server\necho 'error: keychain is locked' >&2\nexit 1\n").unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = config(
            dir.path(),
            r#"{"auths": {"https://index.docker.io/v1/": {}},
                "credsStore": "hoiststore",
                "credHelpers": {"reg.example": "hoisttest", "gone.example": "doesnotexist", "locked.example": "hoistlocked"}}"#,
        );
        with_path(dir.path(), || {
            assert_eq!(credentials_in(&path, "reg.example").unwrap(), Some(Credential::basic("helper-user", "helper-secret")));
            // Docker Hub goes to credsStore, asked for the v1 index URL; `<token>` is an identity token
            assert_eq!(credentials_in(&path, "docker.io").unwrap(), Some(Credential::IdentityToken("refresh-xyz".into())));
            // the store does not know this registry: "credentials not found" means anonymous
            assert_eq!(credentials_in(&path, "unknown.example").unwrap(), None);
            // a helper that is not installed is an error naming it
            let err = credentials_in(&path, "gone.example").unwrap_err().to_string();
            assert!(err.contains("docker-credential-doesnotexist") && err.contains("PATH"), "{err}");
            // any other helper failure is an error naming helper, registry and its message
            let err = credentials_in(&path, "locked.example").unwrap_err().to_string();
            assert!(
                err.contains("docker-credential-hoistlocked") && err.contains("locked.example") && err.contains("keychain is locked"),
                "{err}"
            );
        });
    }

    #[test]
    fn credentials_for_reads_docker_config_env() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        config(dir.path(), r#"{"auths": {"127.0.0.1:5999": {"username": "u", "password": "p"}}}"#);
        let old = std::env::var_os("DOCKER_CONFIG");
        std::env::set_var("DOCKER_CONFIG", dir.path());
        let got = credentials_for("127.0.0.1:5999");
        let map = Credentials::from_docker_config(["127.0.0.1:5999", "docker.io"]);
        match old {
            Some(v) => std::env::set_var("DOCKER_CONFIG", v),
            None => std::env::remove_var("DOCKER_CONFIG"),
        }
        assert_eq!(got.unwrap(), Some(Credential::basic("u", "p")));
        let map = map.unwrap();
        assert_eq!(map.get("127.0.0.1:5999"), Some(&Credential::basic("u", "p")));
        assert_eq!(map.get("docker.io"), None);
        assert_eq!(map.iter().count(), 1);
    }

    #[test]
    fn credentials_map_folds_docker_hub_aliases_and_redacts() {
        let mut c = Credentials::new();
        c.insert("index.docker.io", Credential::basic("u", "topsecret"));
        assert_eq!(c.get("docker.io"), Some(&Credential::basic("u", "topsecret")));
        assert_eq!(c.get("registry-1.docker.io"), Some(&Credential::basic("u", "topsecret")));
        let debug = format!("{c:?} {:?}", Credential::IdentityToken("tok-secret".into()));
        assert!(!debug.contains("topsecret") && !debug.contains("tok-secret"), "{debug}");
    }
}
