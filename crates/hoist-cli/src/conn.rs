//! Choosing and reaching a builder: `--builder`/`HOIST_BUILDER` (else the `builders` of
//! `hoist.json`, else the embedded one), the project (`--project`/`HOIST_PROJECT`, or
//! `hoist.json` in the context or its parents), the token (`--token`/`HOIST_TOKEN`, or the
//! one `hoist login` saved), and TLS. The client alone (no `builder` feature) has no
//! embedded builder and says so when none is named.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Args;
use hoist_client::{BuilderAddr, Client, ConnectOptions};
use serde::{Deserialize, Serialize};

/// What the client alone (built without the `builder` feature) says when no builder is named.
#[cfg(not(feature = "builder"))]
const NO_EMBEDDED_BUILDER: &str = "no builder given, and this hoist is the client alone, built without the embedded builder \
     (cargo feature `builder`): pass --builder tls://HOST:PORT (or set HOIST_BUILDER, or `builders` in hoist.json) and a token \
     (HOIST_TOKEN, or `hoist login --builder ...`)";

/// Flags every command that talks to a builder takes.
#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// The builder: tcp://host:port, tls://host:port or unix:///path (default: the
    /// `builders` of hoist.json, else the embedded one). Several (repeated, or
    /// comma-separated) are a fleet: `hoist build` sends a project's builds for one platform
    /// to one of them, chosen by rendezvous hashing of (project, platform) among those that
    /// announce the platform as native, and falls over to the next when it does not answer;
    /// other commands use the first.
    #[arg(long = "builder", env = "HOIST_BUILDER", value_delimiter = ',')]
    pub builders: Vec<String>,
    /// State directory of the embedded builder.
    #[arg(long, env = "HOIST_ROOT", default_value = "/var/lib/hoist")]
    pub root: PathBuf,
    /// The project (cache namespace); default: hoist.json, or the token's project.
    #[arg(long, env = "HOIST_PROJECT")]
    pub project: Option<String>,
    /// Access token for the builder (default: the one saved by `hoist login`). Prefer
    /// HOIST_TOKEN or `hoist login`: a token given as --token is visible to other users of
    /// this machine in the process list.
    #[arg(long, env = "HOIST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Allow plain tcp:// to a builder that is not on loopback: the token, secrets and
    /// registry passwords then travel in clear (use tls:// instead).
    #[arg(long, env = "HOIST_INSECURE")]
    pub insecure: bool,
    /// CA certificate (PEM) that signed a tls:// builder's certificate.
    #[arg(long = "tls-ca", env = "HOIST_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for builders that require one.
    #[arg(long = "tls-cert", env = "HOIST_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long = "tls-key", env = "HOIST_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

/// The client's saved settings (`$HOIST_CONFIG_DIR/config.json`).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ClientConfig {
    /// Token per builder address.
    #[serde(default)]
    pub tokens: BTreeMap<String, String>,
}

/// The client's configuration directory.
pub fn config_dir() -> PathBuf {
    if let Ok(d) = std::env::var("HOIST_CONFIG_DIR") {
        return PathBuf::from(d);
    }
    if let Ok(d) = std::env::var("XDG_CONFIG_HOME") {
        return Path::new(&d).join("hoist");
    }
    match std::env::var("HOME") {
        Ok(h) => Path::new(&h).join(".config").join("hoist"),
        Err(_) => PathBuf::from("/etc/hoist"),
    }
}

impl ClientConfig {
    /// Load (missing = empty).
    pub fn load() -> anyhow::Result<ClientConfig> {
        let path = config_dir().join("config.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{} is not valid JSON", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ClientConfig::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Save (only the user can read it: it holds tokens).
    pub fn save(&self) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = config_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // A file of this process's own: builds that save at once must not write into one.
        let tmp = dir.join(format!("config.json.{}.tmp", std::process::id()));
        let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, dir.join("config.json"))?;
        Ok(())
    }
}

/// Whether a builder address is on this machine (`None` = the embedded builder).
pub fn addr_is_local(addr: Option<&BuilderAddr>) -> bool {
    match addr {
        None | Some(BuilderAddr::Unix(_)) => true,
        Some(BuilderAddr::Tcp(a)) | Some(BuilderAddr::Tls(a)) => hoist_oci::registry::is_loopback(a),
    }
}

/// `hoist.json`: which project a directory tree builds in (like depot.json), and the
/// builders of the team's fleet.
#[derive(Debug, Default, Deserialize)]
pub struct ProjectFile {
    /// The project (cache namespace).
    #[serde(default)]
    pub project: Option<String>,
    /// The builders (as `--builder`), used when neither `--builder` nor `HOIST_BUILDER` is
    /// given.
    #[serde(default)]
    pub builders: Vec<String>,
}

/// The nearest `hoist.json` at or above `dir`, if any.
pub fn project_file(dir: &Path) -> anyhow::Result<Option<ProjectFile>> {
    let mut cur = Some(dir);
    while let Some(d) = cur {
        let f = d.join("hoist.json");
        if f.is_file() {
            let text = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
            let p: ProjectFile = serde_json::from_slice(&text).with_context(|| {
                format!("{}: expected {{\"project\": \"NAME\", \"builders\": [\"tcp://host:port\", ...]}}", f.display())
            })?;
            return Ok(Some(p));
        }
        cur = d.parent();
    }
    Ok(None)
}

/// The project named by the nearest `hoist.json` at or above `dir`.
pub fn project_from_file(dir: &Path) -> anyhow::Result<Option<String>> {
    Ok(project_file(dir)?.and_then(|p| p.project))
}

/// Where `hoist.json` is looked for: `dir`, else the current directory.
fn start_dir(dir: Option<&Path>) -> PathBuf {
    match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::current_dir().unwrap_or_default(),
    }
}

impl ConnArgs {
    /// Take the builders of the `hoist.json` at or above `dir` (else the current directory)
    /// when neither `--builder` nor `HOIST_BUILDER` named any.
    pub fn resolve_builders(&mut self, dir: Option<&Path>) -> anyhow::Result<()> {
        if self.builders.iter().all(|b| b.trim().is_empty()) {
            if let Some(f) = project_file(&start_dir(dir))? {
                self.builders = f.builders;
            }
        }
        Ok(())
    }

    /// The builders named: `--builder`/`HOIST_BUILDER`, else hoist.json's in the current
    /// directory or its parents (see [`ConnArgs::resolve_builders`] for another directory).
    /// `docker-container` (the embedded builder, in a container) is not among them.
    fn named(&self) -> anyhow::Result<Vec<String>> {
        Ok(self.named_all()?.into_iter().filter(|b| b != crate::container::DRIVER).collect())
    }

    /// The builders named, `docker-container` included.
    fn named_all(&self) -> anyhow::Result<Vec<String>> {
        let given: Vec<String> = self.builders.iter().map(|b| b.trim().to_string()).filter(|b| !b.is_empty()).collect();
        if !given.is_empty() {
            return Ok(given);
        }
        let Some(f) = project_file(&start_dir(None))? else { return Ok(Vec::new()) };
        Ok(f.builders.iter().map(|b| b.trim().to_string()).filter(|b| !b.is_empty()).collect())
    }

    /// Why the embedded builder runs in a container of the Docker engine
    /// ([`crate::container`]), or `None` when it runs on the host.
    #[cfg(feature = "builder")]
    pub fn in_container(&self) -> anyhow::Result<Option<String>> {
        Ok(crate::container::reason(self.named_all()?.iter().any(|b| b == crate::container::DRIVER)))
    }

    /// The (first) builder's address, `None` for the embedded one.
    pub fn addr(&self) -> anyhow::Result<Option<BuilderAddr>> {
        Ok(self.addrs()?.into_iter().next())
    }

    /// Every builder given (empty: the embedded one only).
    pub fn addrs(&self) -> anyhow::Result<Vec<BuilderAddr>> {
        self.named()?.iter().map(|b| BuilderAddr::parse(b).map_err(Into::into)).collect()
    }

    /// The project the client names: `--project`/`HOIST_PROJECT`, else the nearest
    /// hoist.json at or above `dir` (else the current directory). `None`: the token's.
    pub fn project_for(&self, dir: Option<&Path>) -> anyhow::Result<Option<String>> {
        match &self.project {
            Some(p) => Ok(Some(p.clone())),
            None => project_from_file(&start_dir(dir)),
        }
    }

    /// The token for builder `addr`: `--token`/`HOIST_TOKEN`, else the one `hoist login`
    /// saved for it.
    pub fn token_for(&self, addr: Option<&BuilderAddr>) -> anyhow::Result<Option<String>> {
        Ok(match (&self.token, addr) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(a)) => ClientConfig::load()?.tokens.get(&a.to_string()).cloned(),
            (None, None) => None,
        })
    }

    /// Whether the (first) builder runs on this machine (embedded, a unix socket, or
    /// loopback TCP): layers then travel uncompressed.
    pub fn builder_is_local(&self) -> anyhow::Result<bool> {
        Ok(addr_is_local(self.addr()?.as_ref()))
    }

    /// Connect to the (first) builder, naming the project (`dir` is where hoist.json is
    /// looked for).
    pub async fn connect(&self, dir: Option<&Path>) -> anyhow::Result<Client> {
        let addr = self.addr()?;
        self.connect_to(addr, dir).await
    }

    /// Connect to builder `addr` (`None`: the embedded one).
    pub async fn connect_to(&self, addr: Option<BuilderAddr>, dir: Option<&Path>) -> anyhow::Result<Client> {
        let project = self.project_for(dir)?;
        let token = self.token_for(addr.as_ref())?;
        let opts = ConnectOptions {
            token,
            project,
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            allow_insecure: self.insecure,
        };
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            bail!("--tls-cert and --tls-key go together");
        }
        Ok(match addr {
            Some(a) => hoist_client::connect(&a, &opts).await?,
            None => self.connect_embedded(&opts).await?,
        })
    }

    /// Start (or reach) the embedded builder: on the host, or in a container of the Docker
    /// engine when it cannot run on the host.
    #[cfg(feature = "builder")]
    async fn connect_embedded(&self, opts: &ConnectOptions) -> anyhow::Result<Client> {
        if let Some(why) = self.in_container()? {
            return crate::container::connect(opts, &why).await;
        }
        let exe = std::env::current_exe().context("locating the hoist binary")?;
        Ok(hoist_client::connect_embedded(&self.root, &exe, opts).await?)
    }

    /// The client alone has no embedded builder: a builder container when asked for
    /// (`docker-container`, with `HOIST_BUILDER_IMAGE`), else say what to give instead.
    #[cfg(not(feature = "builder"))]
    async fn connect_embedded(&self, opts: &ConnectOptions) -> anyhow::Result<Client> {
        if self.named_all()?.iter().any(|b| b == crate::container::DRIVER) || std::env::var_os("HOIST_BUILDER_IMAGE").is_some() {
            return crate::container::connect(opts, "this hoist is the client alone").await;
        }
        bail!(NO_EMBEDDED_BUILDER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        conn: ConnArgs,
    }

    #[test]
    fn several_builders_and_which_are_local() {
        let c = Cli::parse_from(["x", "--builder", "tcp://127.0.0.1:7000,tcp://10.0.0.5:7000", "--builder", "unix:///run/h.sock"]).conn;
        let addrs = c.addrs().unwrap();
        assert_eq!(addrs.len(), 3);
        assert_eq!(c.addr().unwrap(), Some(BuilderAddr::Tcp("127.0.0.1:7000".into())), "the first is the default");
        assert!(c.builder_is_local().unwrap());
        assert!(addr_is_local(None), "the embedded builder");
        assert!(addr_is_local(Some(&addrs[2])));
        assert!(!addr_is_local(Some(&addrs[1])));
        assert!(!addr_is_local(Some(&BuilderAddr::Tls("builder.example:443".into()))));
        assert!(addr_is_local(Some(&BuilderAddr::Tcp("localhost:7000".into()))));
        let none = Cli::parse_from(["x"]).conn;
        if std::env::var_os("HOIST_BUILDER").is_none() {
            assert!(none.addrs().unwrap().is_empty());
            assert_eq!(none.addr().unwrap(), None);
        }
        let bad = Cli::parse_from(["x", "--builder", "nonsense"]).conn;
        assert!(bad.addrs().is_err());
    }

    /// hoist.json names the fleet when neither --builder nor HOIST_BUILDER does; either of
    /// those wins over it. A file with only a project (the older form) still reads.
    #[test]
    fn builders_come_from_hoist_json_unless_given() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("app/src");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(dir.path().join("hoist.json"), r#"{"project": "web", "builders": ["tcp://10.0.0.1:7420", "tcp://10.0.0.2:7420"]}"#)
            .unwrap();
        let mut c = Cli::parse_from(["x", "--builder", "tcp://127.0.0.1:9"]).conn;
        c.resolve_builders(Some(&sub)).unwrap();
        assert_eq!(c.addrs().unwrap(), vec![BuilderAddr::Tcp("127.0.0.1:9".into())], "--builder wins");
        c.builders.clear();
        c.resolve_builders(Some(&sub)).unwrap();
        assert_eq!(c.addrs().unwrap(), vec![BuilderAddr::Tcp("10.0.0.1:7420".into()), BuilderAddr::Tcp("10.0.0.2:7420".into())]);
        c.project = None;
        assert_eq!(c.project_for(Some(&sub)).unwrap().as_deref(), Some("web"));
        c.project = Some("api".into());
        assert_eq!(c.project_for(Some(&sub)).unwrap().as_deref(), Some("api"), "--project wins");

        std::fs::write(dir.path().join("hoist.json"), r#"{"project": "web"}"#).unwrap();
        assert_eq!(project_from_file(&sub).unwrap().as_deref(), Some("web"));
        assert!(project_file(&sub).unwrap().unwrap().builders.is_empty());
        std::fs::write(dir.path().join("hoist.json"), r#"{"builders": "tcp://10.0.0.1:7420"}"#).unwrap();
        let e = format!("{:#}", project_file(&sub).unwrap_err());
        assert!(e.contains("hoist.json") && e.contains("\"builders\": ["), "{e}");
    }
}
