//! The `hoist` binary: `hoist build` (a drop-in for `docker build`), `hoist serve` (the
//! builder; only with the `builder` feature, the default — without it, the client alone)
//! and the management commands. It parses arguments, renders progress and prints
//! summaries; connecting, context sync, the build loop and the outputs (the load into the
//! local Docker engine among them) are hoist-client's.

#![forbid(unsafe_code)]

mod attest;
mod bake;
mod build;
mod check;
mod conn;
mod container;
mod limits;
mod manage;
mod multi;
mod named;
mod outputs;
mod plugin;
mod progress;
mod pull;
mod remote;

#[cfg(feature = "builder")]
use std::path::PathBuf;

#[cfg(feature = "builder")]
use anyhow::Context as _;
#[cfg(feature = "builder")]
use clap::Args;
use clap::{Parser, Subcommand};

/// Build container images fast, with a cache the whole team shares.
#[derive(Parser, Debug)]
#[command(name = "hoist", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build an image from a Dockerfile (accepts docker build's flags).
    Build(Box<build::BuildArgs>),
    /// Build the targets of a bake file (HCL, JSON) or the services of a compose file.
    Bake(Box<bake::BakeArgs>),
    /// Load an image a build kept with --save (by build id or tag) into the local Docker engine.
    Pull(pull::PullArgs),
    /// Run a builder (the embedded builder is this, on a unix socket).
    #[cfg(feature = "builder")]
    Serve(Box<ServeArgs>),
    /// Projects of a builder (run on the builder's machine).
    #[cfg(feature = "builder")]
    #[command(subcommand)]
    Project(manage::ProjectCmd),
    /// Access tokens of a builder (run on the builder's machine).
    #[cfg(feature = "builder")]
    #[command(subcommand)]
    Token(manage::TokenCmd),
    /// Save a token for a builder.
    Login(manage::LoginArgs),
    /// The project's cache on the builder: du, prune, reset.
    #[command(subcommand)]
    Cache(manage::CacheCmd),
    /// The project's build records.
    #[command(subcommand)]
    Builds(manage::BuildsCmd),
    /// The builder container (the embedded builder in the Docker engine, for users who
    /// cannot run it on the host): status, stop, rm [--volume], logs.
    #[command(subcommand)]
    Builder(container::BuilderCmd),
    /// Print a shell completion script: `hoist completion bash > /etc/bash_completion.d/hoist`.
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print hoist's man page (roff): `hoist man > /usr/local/share/man/man1/hoist.1`.
    Man,
    /// Make `docker build`, `docker buildx build` and `docker hoist build` run on hoist
    /// (Docker CLI plugins in ~/.docker/cli-plugins and the `builder` alias); --uninstall undoes it.
    ConfigureDocker(plugin::ConfigureArgs),
}

#[cfg(feature = "builder")]
#[derive(Args, Debug)]
struct ServeArgs {
    /// Where to listen: unix:///path/to.sock or tcp://host:port.
    #[arg(long)]
    listen: Option<String>,
    /// State directory.
    #[arg(long, env = "HOIST_ROOT", default_value = "/var/lib/hoist")]
    root: PathBuf,
    /// OCI runtime binary (default: runc or crun on PATH).
    #[arg(long, env = "HOIST_RUNTIME")]
    runtime: Option<PathBuf>,
    /// A registry to reach over plain HTTP (loopback registries always are).
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// Allow plain TCP on a non-loopback address.
    #[arg(long)]
    insecure: bool,
    /// Entitlements granted to every project (network.host, security.insecure; comma-
    /// separated or repeated). Builds still ask for them with `hoist build --allow`. Per
    /// project: `hoist project allow NAME ENTITLEMENT`.
    #[arg(long = "allow-entitlement", value_delimiter = ',')]
    allow_entitlements: Vec<String>,
    /// Run as the embedded builder of one user (started by `hoist build`): no token on its
    /// unix socket, every entitlement granted.
    #[arg(long, hide = true)]
    embedded: bool,
    /// TLS certificate (PEM) to serve with.
    #[arg(long = "tls-cert", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long = "tls-key", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM).
    #[arg(long = "tls-client-ca", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Platforms to announce as native (e.g. linux/arm64), comma-separated; default: the
    /// host's. Clients with several builders send each platform to one announcing it.
    #[arg(long, value_delimiter = ',')]
    platforms: Vec<String>,
    /// The fleet's shared cache: s3://bucket/prefix (endpoint, region and credentials from
    /// AWS_* variables and ~/.aws) or file:///dir. Every node given the same store shares
    /// its build cache; each node's disk stays the first tier.
    #[arg(long = "cache-store", env = "HOIST_CACHE_STORE")]
    cache_store: Option<String>,
    #[command(flatten)]
    limits: limits::LimitArgs,
    /// Serve the web UI (build insights) on this host:port instead of on --listen; it
    /// must be loopback unless --insecure (always, for the embedded builder).
    #[arg(long = "ui-listen", env = "HOIST_UI_LISTEN")]
    ui_listen: Option<String>,
}

fn main() {
    // Run as a Docker CLI plugin (docker-hoist, docker-buildx): the hoist command it stands for.
    let cli = match plugin::hoist_args(<Cli as clap::CommandFactory>::command) {
        Some(args) => Cli::parse_from(args),
        None => Cli::parse(),
    };
    // Printed from the CLI's own definition, so they always match it.
    match cli.command {
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "hoist", &mut std::io::stdout());
            return;
        }
        Command::Man => {
            if let Err(e) = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut std::io::stdout()) {
                eprintln!("error: writing the man page: {e}");
                std::process::exit(1);
            }
            return;
        }
        _ => {}
    }
    // Two TLS stacks link rustls (tonic with ring, reqwest); pick one provider for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOIST_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(async move {
        match cli.command {
            Command::Build(args) => build::run(*args).await,
            Command::Bake(args) => bake::run(*args).await,
            Command::Pull(args) => pull::run(args).await.map(|_| 0),
            #[cfg(feature = "builder")]
            Command::Serve(args) => serve(*args).await.map(|_| 0),
            #[cfg(feature = "builder")]
            Command::Project(c) => manage::project(c).map(|_| 0),
            #[cfg(feature = "builder")]
            Command::Token(c) => manage::token(c).map(|_| 0),
            Command::Login(a) => manage::login(a).await.map(|_| 0),
            Command::Cache(c) => manage::cache(c).await.map(|_| 0),
            Command::Builds(c) => manage::builds(c).await.map(|_| 0),
            Command::Builder(c) => container::builder(c).await.map(|_| 0),
            Command::ConfigureDocker(a) => plugin::configure_docker(a).map(|_| 0),
            Command::Completion { .. } | Command::Man => Ok(0),
        }
    });
    match code {
        Ok(c) => std::process::exit(c),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

#[cfg(feature = "builder")]
async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let engine = hoist_engine::Engine::open(&hoist_engine::EngineConfig {
        root: args.root.clone(),
        runtime: args.runtime.clone(),
        insecure_registries: args.insecure_registries.clone(),
        limits: args.limits.limits(),
        cache_store: args.cache_store.clone(),
    })
    .with_context(|| format!("opening builder state in {}", args.root.display()))?;
    let listen = args.listen.clone().unwrap_or_else(|| format!("unix://{}", hoist_client::embedded_socket(&args.root).display()));
    let listen = hoist_server::Listen::parse(&listen)?;
    let pid_file = args.root.join("hoistd.pid");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&pid_file) {
            let _ = f.write_all(std::process::id().to_string().as_bytes());
        }
    }
    let shutdown = async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    eprintln!("hoist builder listening on {listen:?} (state in {})", args.root.display());
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(hoist_server::TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: args.tls_client_ca.clone() })
        }
        _ => None,
    };
    let mut platforms = Vec::new();
    for p in args.platforms.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let parsed = hoist_engine::graph::Platform::parse(p).map_err(|e| anyhow::anyhow!("--platforms: {e}"))?;
        platforms.push(parsed.to_string());
    }
    let entitlements = hoist_engine::entitlements::Entitlement::parse_list(args.allow_entitlements.iter().map(String::as_str))
        .map_err(|e| anyhow::anyhow!("--allow-entitlement: {e}"))?;
    // The embedded builder of a user in a container (the docker-container builder) is
    // reached over TCP; a request must carry the owner token its client gave it.
    let owner_token = std::env::var("HOIST_OWNER_TOKEN").ok().filter(|t| !t.is_empty());
    if args.embedded && !matches!(listen, hoist_server::Listen::Unix(_)) && owner_token.is_none() {
        anyhow::bail!("--embedded needs a unix socket (--listen unix:///path), or HOIST_OWNER_TOKEN on TCP");
    }
    let opts = hoist_server::ServeOptions {
        insecure_registries: args.insecure_registries,
        allow_insecure_tcp: args.insecure,
        tls,
        platforms,
        entitlements,
        embedded: args.embedded,
        owner_token: if args.embedded { owner_token } else { None },
        ui_listen: args.ui_listen,
    };
    hoist_server::serve(&listen, engine.clone(), opts, shutdown).await?;
    // What builds queued for the shared tier goes up before the node exits.
    engine.flush_shared().await;
    let _ = std::fs::remove_file(&pid_file);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size flag reads units the same way, Docker's: `10GB` and `10GiB` are both
    /// 10 × 2^30 bytes (once `project limit` read `10GB` as 10^10 and `serve` as 10 GiB).
    #[cfg(feature = "builder")]
    #[test]
    fn every_size_flag_reads_units_alike() {
        const TEN_GIB: u64 = 10 << 30;
        for size in ["10GB", "10GiB", "10g", "10G"] {
            let parse = |args: &[&str]| Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}")).command;
            match parse(&["hoist", "project", "limit", "web", size]) {
                Command::Project(manage::ProjectCmd::Limit { size: Some(b), .. }) => assert_eq!(b, TEN_GIB, "project limit {size}"),
                other => panic!("{other:?}"),
            }
            match parse(&["hoist", "cache", "prune", "--keep-storage", size]) {
                Command::Cache(manage::CacheCmd::Prune { keep_storage, .. }) => assert_eq!(keep_storage, TEN_GIB, "--keep-storage {size}"),
                other => panic!("{other:?}"),
            }
            match parse(&["hoist", "serve", "--max-context-bytes", size, "--build-memory", size]) {
                Command::Serve(a) => {
                    let l = a.limits.limits();
                    assert_eq!((l.max_context_bytes, l.build_memory), (TEN_GIB, Some(TEN_GIB)), "serve {size}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(Cli::try_parse_from(["hoist", "project", "limit", "web", "10 parsecs"]).is_err());
    }
}
