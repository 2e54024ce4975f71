//! Commands besides build and serve: projects and tokens (run on the builder's machine, on
//! its state directory), `hoist login`, `hoist cache`, `hoist builds`.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use hoist_client::v1;
#[cfg(feature = "builder")]
use hoist_server::auth::AuthStore;

use crate::conn::{ClientConfig, ConnArgs};
use hoist_client::human_bytes;

/// Where projects and tokens are: the builder's state root, or a fleet's shared store.
#[cfg(feature = "builder")]
#[derive(Args, Debug)]
pub struct AuthArgs {
    /// The builder's state directory.
    #[arg(long, env = "HOIST_ROOT", default_value = "/var/lib/hoist")]
    root: PathBuf,
    /// A fleet's shared store (as `hoist serve --cache-store`): projects and tokens are
    /// there, for every node, instead of in --root.
    #[arg(long = "cache-store", env = "HOIST_CACHE_STORE")]
    cache_store: Option<String>,
}

#[cfg(feature = "builder")]
impl AuthArgs {
    fn open(&self) -> anyhow::Result<AuthStore> {
        let shared = self.cache_store.as_deref().map(hoist_engine::shared::SharedStore::from_url).transpose()?;
        Ok(AuthStore::open(&self.root, shared.as_ref()))
    }
}

/// `hoist project ...` (on the builder's machine, or anywhere with the fleet's store).
#[cfg(feature = "builder")]
#[derive(Subcommand, Debug)]
pub enum ProjectCmd {
    /// Create a project and print its first token.
    Create {
        name: String,
        /// Name of the first token (shown in build records).
        #[arg(long = "token-name", default_value = "default")]
        token_name: String,
        #[command(flatten)]
        store: AuthArgs,
    },
    /// Set a project's cache size limit (automatic GC, e.g. 20GB) and how many builds it
    /// runs at once (--builds; default 4, more wait for a slot).
    Limit {
        name: String,
        /// Storage limit: its cache, contexts, build records and logs, e.g. 20GB (binary
        /// units, as Docker's: 20GB = 20GiB).
        #[arg(required_unless_present = "builds", value_parser = crate::limits::parse_size)]
        size: Option<u64>,
        /// Builds the project runs at once.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        builds: Option<u32>,
        #[command(flatten)]
        store: AuthArgs,
    },
    /// Grant a project an entitlement (network.host, security.insecure): its builds may then
    /// use it when they ask with `hoist build --allow`.
    Allow {
        name: String,
        entitlement: String,
        #[command(flatten)]
        store: AuthArgs,
    },
    /// Take back an entitlement granted with `hoist project allow`.
    Deny {
        name: String,
        entitlement: String,
        #[command(flatten)]
        store: AuthArgs,
    },
    /// List projects.
    Ls {
        #[command(flatten)]
        store: AuthArgs,
    },
}

/// `hoist token ...` (on the builder's machine, or anywhere with the fleet's store).
#[cfg(feature = "builder")]
#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Issue a new token for a project and print it.
    Create {
        project: String,
        #[arg(long, default_value = "default")]
        name: String,
        #[command(flatten)]
        store: AuthArgs,
    },
    /// Revoke a token by id or name; its running builds and exports end within a second.
    Revoke {
        id_or_name: String,
        /// Only tokens of this project (required when several projects have a token of
        /// that name).
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        store: AuthArgs,
    },
    /// List tokens (never the tokens themselves).
    Ls {
        #[command(flatten)]
        store: AuthArgs,
    },
}

/// `hoist cache ...`.
#[derive(Subcommand, Debug)]
pub enum CacheCmd {
    /// Show the project's share of the builder's storage.
    Du {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Drop least recently used cache entries until the project uses at most SIZE.
    Prune {
        /// e.g. 10GB, 512MB (binary units, as Docker's: 10GB = 10GiB); 0 drops everything
        /// not in use.
        #[arg(long = "keep-storage", default_value = "0", value_parser = crate::limits::parse_size)]
        keep_storage: u64,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Drop everything the project has cached.
    Reset {
        #[command(flatten)]
        conn: ConnArgs,
    },
}

/// `hoist builds ...`.
#[derive(Subcommand, Debug)]
pub enum BuildsCmd {
    /// The project's recent builds, newest first.
    Ls {
        #[arg(long, default_value = "20")]
        limit: u32,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// One build: its steps with durations and cache status, and its log.
    Show {
        id: String,
        /// Print the record (with its steps and their logs) as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print a one-time sign-in link to the builder's web UI (valid a few minutes), for a
    /// build or (without ID) the project's builds, and open it in a browser where one exists
    /// (macOS, or DISPLAY/WAYLAND_DISPLAY set; HOIST_NO_BROWSER=1 never opens one).
    Open {
        id: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

/// `hoist login`.
#[derive(Args, Debug)]
pub struct LoginArgs {
    /// The token (default: read from stdin). A token given here is visible to other users
    /// of this machine in the process list: prefer stdin or HOIST_TOKEN.
    #[arg(long)]
    pub token: Option<String>,
    /// The builder to log in to.
    #[arg(long, env = "HOIST_BUILDER")]
    pub builder: String,
    #[arg(long = "tls-ca", env = "HOIST_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Allow plain tcp:// to a builder that is not on loopback (the token travels in clear).
    #[arg(long)]
    pub insecure: bool,
}

#[cfg(feature = "builder")]
pub fn project(cmd: ProjectCmd) -> anyhow::Result<()> {
    match cmd {
        ProjectCmd::Create { name, token_name, store } => {
            let token = store.open()?.create_project(&name, &token_name)?;
            eprintln!("created project {name:?}; its token (shown once):");
            println!("{token}");
        }
        ProjectCmd::Limit { name, size, builds, store } => {
            let store = store.open()?;
            if let Some(bytes) = size {
                store.set_limit(&name, bytes)?;
                eprintln!("project {name:?}: storage limit {}", human_bytes(bytes));
            }
            if let Some(n) = builds {
                store.set_max_builds(&name, n)?;
                eprintln!("project {name:?}: {n} builds at once");
            }
        }
        ProjectCmd::Allow { name, entitlement, store } => {
            store.open()?.set_entitlement(&name, &entitlement, true)?;
            eprintln!("project {name:?}: {entitlement} granted (builds ask for it with --allow {entitlement})");
        }
        ProjectCmd::Deny { name, entitlement, store } => {
            store.open()?.set_entitlement(&name, &entitlement, false)?;
            eprintln!("project {name:?}: {entitlement} no longer granted");
        }
        ProjectCmd::Ls { store } => {
            let f = store.open()?.load()?;
            for (name, p) in f.projects {
                let ents = if p.entitlements.is_empty() { String::new() } else { format!("\tallow {}", p.entitlements.join(",")) };
                println!("{name}\tlimit {}\tbuilds {}{ents}", human_bytes(p.limit_bytes), p.max_builds);
            }
        }
    }
    Ok(())
}

#[cfg(feature = "builder")]
pub fn token(cmd: TokenCmd) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create { project, name, store } => {
            let token = store.open()?.create_token(&project, &name)?;
            println!("{token}");
        }
        TokenCmd::Revoke { id_or_name, project, store } => {
            let n = store.open()?.revoke(&id_or_name, project.as_deref())?;
            eprintln!("revoked {n} token(s)");
        }
        TokenCmd::Ls { store } => {
            for t in store.open()?.load()?.tokens {
                println!("{}\t{}\t{}\t{}", t.id, t.project, t.name, if t.revoked { "revoked" } else { "active" });
            }
        }
    }
    Ok(())
}

pub async fn login(args: LoginArgs) -> anyhow::Result<()> {
    let token = match args.token {
        Some(t) => t,
        None => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).context("reading the token from stdin")?;
            s.trim().to_string()
        }
    };
    if token.is_empty() {
        bail!("no token given (pass --token or pipe it on stdin)");
    }
    let addr = hoist_client::BuilderAddr::parse(&args.builder)?;
    let opts = hoist_client::ConnectOptions {
        token: Some(token.clone()),
        tls_ca: args.tls_ca,
        allow_insecure: args.insecure,
        ..Default::default()
    };
    let mut client = hoist_client::connect(&addr, &opts).await?;
    let info = client.info(v1::InfoRequest {}).await.map_err(hoist_client::ClientError::from_status)?.into_inner();
    let mut cfg = ClientConfig::load()?;
    cfg.tokens.insert(addr.to_string(), token);
    cfg.save()?;
    eprintln!("logged in to {addr} (project {:?})", info.project);
    Ok(())
}

fn print_usage(u: &v1::CacheUsageReply) {
    println!("project:        {}", u.project);
    println!("layers:         {} ({})", u.layers, human_bytes(u.layer_bytes));
    println!("contexts:       {} ({} sessions)", human_bytes(u.context_bytes), u.context_sessions);
    println!("cache mounts:   {}", human_bytes(u.cache_mount_bytes));
    println!("records:        {}", u.records);
    println!("build records:  {} (logs {})", u.build_records, human_bytes(u.build_log_bytes));
    println!("total:          {}", human_bytes(u.total_bytes));
    println!("limit:          {}", human_bytes(u.limit_bytes));
    if u.freed_bytes > 0 {
        println!("freed:          {}", human_bytes(u.freed_bytes));
    }
    if !u.shared_store.is_empty() {
        println!("shared store:   {}", u.shared_store);
        println!("  entries:      {} ({} of blobs)", u.shared_entries, human_bytes(u.shared_bytes));
        if u.shared_freed_bytes > 0 {
            println!("  freed:        {}", human_bytes(u.shared_freed_bytes));
        }
    }
}

pub async fn cache(cmd: CacheCmd) -> anyhow::Result<()> {
    let status = hoist_client::ClientError::from_status;
    match cmd {
        CacheCmd::Du { conn } => {
            let u = conn.connect(None).await?.cache_usage(v1::CacheUsageRequest {}).await.map_err(status)?.into_inner();
            print_usage(&u);
        }
        CacheCmd::Prune { keep_storage: keep_bytes, conn } => {
            let u = conn.connect(None).await?.cache_prune(v1::CachePruneRequest { keep_bytes }).await.map_err(status)?.into_inner();
            print_usage(&u);
        }
        CacheCmd::Reset { conn } => {
            let u = conn.connect(None).await?.cache_reset(v1::CacheUsageRequest {}).await.map_err(status)?.into_inner();
            print_usage(&u);
        }
    }
    Ok(())
}

fn when(secs: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp(secs, 0).map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_default()
}

/// The command that opens a link in a browser here, if there is one: `open` on macOS,
/// `xdg-open` under a graphical session; none when HOIST_NO_BROWSER=1.
fn browser_command(macos: bool, env: &dyn Fn(&str) -> Option<String>) -> Option<&'static str> {
    let set = |k: &str| env(k).is_some_and(|v| !v.is_empty());
    if env("HOIST_NO_BROWSER").is_some_and(|v| v == "1") {
        return None;
    }
    if macos {
        return Some("open");
    }
    (set("DISPLAY") || set("WAYLAND_DISPLAY")).then_some("xdg-open")
}

/// Open `link` in a browser where one exists; never fails (the link is printed anyway).
fn open_browser(link: &str) {
    let Some(cmd) = browser_command(cfg!(target_os = "macos"), &|k| std::env::var(k).ok()) else { return };
    let spawned = std::process::Command::new(cmd)
        .arg(link)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match spawned {
        // (reaped in the background: the browser may outlive this command)
        Ok(mut child) => {
            std::thread::spawn(move || child.wait());
        }
        Err(e) => eprintln!("(could not run {cmd}: {e})"),
    }
}

pub async fn builds(cmd: BuildsCmd) -> anyhow::Result<()> {
    let status = hoist_client::ClientError::from_status;
    match cmd {
        BuildsCmd::Ls { limit, conn } => {
            let r = conn.connect(None).await?.list_builds(v1::ListBuildsRequest { limit }).await.map_err(status)?.into_inner();
            println!("ID\tSTARTED\tSECONDS\tWHO\tSTATUS\tRUN\tCACHED\tSENT\tIMAGE");
            for b in r.builds {
                println!(
                    "{}\t{}\t{:.1}\t{}\t{}\t{}\t{}\t{} files ({})\t{}",
                    b.id,
                    when(b.started),
                    b.seconds,
                    b.who,
                    b.status,
                    b.steps_run,
                    b.steps_cached,
                    b.context_files_sent,
                    human_bytes(b.context_bytes_sent),
                    b.image_id
                );
            }
        }
        BuildsCmd::Show { id, json, conn } => {
            let b = conn.connect(None).await?.get_build(v1::GetBuildRequest { id }).await.map_err(status)?.into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
                return Ok(());
            }
            println!("id:             {}", b.id);
            println!("started:        {}", when(b.started));
            println!("seconds:        {:.1}", b.seconds);
            println!("who:            {}", b.who);
            println!("status:         {}", b.status);
            if !b.error.is_empty() {
                println!("error:          {}", b.error);
            }
            println!("steps run:      {}", b.steps_run);
            println!("steps cached:   {}", b.steps_cached);
            println!("containers run: {}", b.containers_run);
            println!(
                "context:        {} entries, {} files sent ({})",
                b.context_entries,
                b.context_files_sent,
                human_bytes(b.context_bytes_sent)
            );
            println!("image:          {}", b.image_id);
            if !b.manifest_digest.is_empty() {
                println!("manifest:       {}", b.manifest_digest);
            }
            if !b.tags.is_empty() {
                println!("tags:           {}", b.tags.join(", "));
            }
            if b.bytes_pushed > 0 {
                println!("pushed:         {}", human_bytes(b.bytes_pushed));
            }
            if !b.steps.is_empty() {
                println!("\nSTEP\tSTART\tDURATION\tCACHE\tSTAGE\tINSTRUCTION\tLINE\tSIZE\tMISS");
                for s in &b.steps {
                    let state = if !s.error.is_empty() {
                        "failed"
                    } else if s.cached {
                        "cached"
                    } else {
                        "ran"
                    };
                    let secs = |ms: u64| format!("{:.1}s", ms as f64 / 1000.0);
                    let line = if s.line > 0 { s.line.to_string() } else { "-".into() };
                    let size = if s.layer_bytes > 0 { human_bytes(s.layer_bytes) } else { "-".into() };
                    let miss = if s.miss_reason.is_empty() { "-".into() } else { format!("{}: {}", s.miss_reason, s.miss_detail) };
                    println!(
                        "#{}\t{}\t{}\t{state}\t{}\t{}\t{line}\t{size}\t{miss}",
                        s.id,
                        secs(s.start_ms),
                        secs(s.end_ms.saturating_sub(s.start_ms)),
                        s.stage,
                        s.name
                    );
                }
                // From its start: each step waited for the one before.
                let on_path: Vec<&v1::BuildStep> = b.steps.iter().filter(|s| s.critical).collect();
                let mut at = on_path.iter().copied().rev().find(|s| !on_path.iter().any(|o| o.deps.contains(&s.id)));
                let mut critical = Vec::new();
                while let Some(s) = at.filter(|s| !critical.contains(&format!("#{}", s.id))) {
                    critical.push(format!("#{}", s.id));
                    at = on_path.iter().copied().find(|o| s.deps.contains(&o.id));
                }
                critical.reverse();
                if !critical.is_empty() {
                    println!("\ncritical path:  {}", critical.join(" → "));
                }
            }
            println!("\n{}", b.log);
        }
        BuildsCmd::Open { id, conn } => {
            let addr = conn.addr()?;
            let r = conn
                .connect(None)
                .await?
                .open_ui(v1::OpenUiRequest { build_id: id.unwrap_or_default() })
                .await
                .map_err(status)?
                .into_inner();
            let base = match (r.base.is_empty(), addr) {
                (false, _) => r.base,
                (true, Some(hoist_client::BuilderAddr::Tcp(a))) => format!("http://{a}"),
                (true, Some(hoist_client::BuilderAddr::Tls(a))) => format!("https://{a}"),
                (true, _) => anyhow::bail!(
                    "this builder serves its web UI on no TCP address: start it with --ui-listen 127.0.0.1:PORT (HOIST_UI_LISTEN for the embedded builder)"
                ),
            };
            let link = format!("{base}{}", r.path);
            println!("{link}");
            eprintln!("(a one-time link, valid for {} s)", r.valid_seconds);
            open_browser(&link);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_browser_opens_only_where_one_exists() {
        let env =
            |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        assert_eq!(browser_command(false, &env(&[])), None, "no graphical session");
        assert_eq!(browser_command(false, &env(&[("DISPLAY", "")])), None, "an empty DISPLAY");
        assert_eq!(browser_command(false, &env(&[("DISPLAY", ":0")])), Some("xdg-open"));
        assert_eq!(browser_command(false, &env(&[("WAYLAND_DISPLAY", "wayland-0")])), Some("xdg-open"));
        assert_eq!(browser_command(true, &env(&[])), Some("open"));
        assert_eq!(browser_command(true, &env(&[("HOIST_NO_BROWSER", "1")])), None);
        assert_eq!(browser_command(false, &env(&[("DISPLAY", ":0"), ("HOIST_NO_BROWSER", "1")])), None);
    }
}
