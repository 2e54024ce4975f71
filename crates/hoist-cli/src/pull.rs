//! `hoist pull BUILD-ID|TAG [-t NAME]`: load an image a build of the project kept on the
//! builder with `--save` into the local Docker engine, the same way `--load` does (only
//! the layers the engine lacks move), so a teammate can use it without a registry.

use anyhow::Context as _;
use clap::Args;
use hoist_client::v1;
use hoist_oci::compress::Compression;

use crate::conn::ConnArgs;
use hoist_client::load::DockerEngine;

/// `hoist pull`.
#[derive(Args, Debug)]
pub struct PullArgs {
    /// A build id (from `hoist build --save` or `hoist builds ls`), or a tag that build had.
    pub name: String,
    /// Name the image (repeatable); default: the saved build's tags.
    #[arg(short = 't', long = "tag")]
    pub tags: Vec<String>,
    /// The platform to load (default: the Docker engine's).
    #[arg(long)]
    pub platform: Option<String>,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Run `hoist pull`.
pub async fn run(args: PullArgs) -> anyhow::Result<()> {
    let engine = DockerEngine::connect("hoist pull").await?;
    let mut client = args.conn.connect(None).await?;
    let local = args.conn.builder_is_local()?;
    let platform = args.platform.clone().unwrap_or_else(|| engine.platform.clone());
    let compression = if local { Compression::Uncompressed } else { Compression::default() };
    let req = v1::OpenSavedRequest {
        name: args.name.clone(),
        platform,
        compression: Some(hoist_client::outputs::layer_compression(compression, false)),
    };
    let session = client
        .open_saved(req)
        .await
        .map_err(hoist_client::ClientError::from_status)
        .with_context(|| format!("hoist pull {}", args.name))?
        .into_inner();
    let tags = if args.tags.is_empty() { session.tags.clone() } else { args.tags.clone() };
    let report =
        hoist_client::load::load(&client, &engine, &session, &tags, None).await.with_context(|| format!("hoist pull {}", args.name))?;
    eprintln!("hoist: {} (saved by build {})", report.line("pull"), session.build_id);
    println!("{}", report.image_id);
    Ok(())
}
