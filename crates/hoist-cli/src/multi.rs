//! Builds over several builders (`--builder a --builder b`, or `HOIST_BUILDER=a,b`): each
//! platform goes to a builder that announces it as native (`hoist serve --platforms`), else
//! to the first builder; the builders run at once and the client combines their results —
//! each builder pushes its platform's manifest (by digest) and the client pushes the index
//! over them to every tag; `--load` takes the engine's platform from the builder that made it.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Context as _};
use hoist_client::build::BuildPart;
use hoist_client::outputs::{OutputSink, OutputSpec};
use hoist_client::session::AgentSource;
use hoist_client::v1;
use hoist_client::{human_bytes, BuilderAddr};
use hoist_dockerfile::IgnoreMatcher;
use hoist_engine::graph::Platform;
use hoist_oci::digest::Digest;
use hoist_oci::image::{media, Descriptor, Index};
use hoist_oci::reference::Reference;

use crate::build::{make_request, push_line, run_parts, sync_context, BuildArgs, Inputs};
use crate::conn::addr_is_local;
use crate::progress::{Mode, Renderer};

/// For each builder, the platforms it builds: each platform goes to the first builder that
/// announces it, else to the first builder.
pub fn route(platforms: &[Platform], announced: &[Vec<Platform>]) -> Vec<Vec<Platform>> {
    let mut out = vec![Vec::new(); announced.len().max(1)];
    for p in platforms {
        let i = announced.iter().position(|a| a.iter().any(|h| p.matches(h))).unwrap_or(0);
        if !out[i].contains(p) {
            out[i].push(p.clone());
        }
    }
    out
}

/// The OCI index over per-platform manifests (in the order given).
pub fn index_of(manifests: &[v1::ManifestRef]) -> anyhow::Result<Vec<u8>> {
    let mut entries = Vec::new();
    for m in manifests {
        let p = Platform::parse(&m.platform).map_err(|e| anyhow!("a builder reported {e}"))?;
        let digest: Digest = m.digest.parse().map_err(|_| anyhow!("a builder reported an invalid manifest digest {:?}", m.digest))?;
        entries.push(Descriptor {
            media_type: if m.media_type.is_empty() { media::OCI_MANIFEST.into() } else { m.media_type.clone() },
            digest,
            size: m.size,
            platform: Some(p.canonical()),
            annotations: None,
        });
    }
    let index = Index { schema_version: 2, media_type: Some(media::OCI_INDEX.into()), manifests: entries, annotations: None };
    Ok(serde_json::to_vec(&index)?)
}

struct Part {
    addr: BuilderAddr,
    client: hoist_client::Client,
    platforms: Vec<Platform>,
}

/// Run a build over several builders; returns the exit code.
pub async fn run(
    args: &BuildArgs,
    inputs: &Inputs,
    ignore: Option<&IgnoreMatcher>,
    outputs: Vec<OutputSpec>,
    agents: HashMap<String, AgentSource>,
    mode: Mode,
    started: Instant,
) -> anyhow::Result<i32> {
    let dir: Option<&Path> = inputs.context_dir.as_deref();
    let mut requested = Vec::new();
    for p in args.platform.iter().flat_map(|p| p.split(',')).map(str::trim).filter(|p| !p.is_empty()) {
        let parsed = Platform::parse(p)?;
        if !requested.contains(&parsed) {
            requested.push(parsed);
        }
    }
    if requested.is_empty() {
        requested.push(Platform::host());
    }
    let mut parts = Vec::new();
    let mut announced = Vec::new();
    for addr in args.conn.addrs()? {
        let mut client = args.conn.connect_to(Some(addr.clone()), dir).await?;
        let info = client
            .info(v1::InfoRequest {})
            .await
            .map_err(hoist_client::ClientError::from_status)
            .with_context(|| format!("builder {addr}"))?
            .into_inner();
        announced.push(info.platforms.iter().filter_map(|p| Platform::parse(p).ok()).collect::<Vec<_>>());
        parts.push(Part { addr, client, platforms: Vec::new() });
    }
    for (part, platforms) in parts.iter_mut().zip(route(&requested, &announced)) {
        part.platforms = platforms;
    }
    parts.retain(|p| !p.platforms.is_empty());
    let combined = parts.len() > 1;
    if combined {
        for o in &outputs {
            if !(o.is_push() || o.is_load()) {
                bail!(
                    "output type={} is not supported when platforms are built on several builders (use --push or --load, or one builder)",
                    o.type_name()
                );
            }
        }
    }

    let mut sinks: Vec<Option<OutputSink>> = Vec::new();
    for o in &outputs {
        sinks.push(o.open(&args.tags).await?);
    }
    // The engine's platform decides which builder's image --load takes.
    let engine_platform = sinks.iter().flatten().find_map(|s| match s {
        OutputSink::Load { engine, .. } => Platform::parse(&engine.platform).ok(),
        _ => None,
    });
    let load_part =
        engine_platform.as_ref().and_then(|ep| parts.iter().position(|p| p.platforms.iter().any(|q| ep.matches(q)))).unwrap_or(0);

    let mut renderer = Renderer::new(mode);
    let mut build_parts = Vec::new();
    for (k, part) in parts.iter_mut().enumerate() {
        let label = format!("[internal] load build context ({})", part.addr);
        let sent = sync_context(&mut part.client, inputs, ignore, &mut renderer, &label).await?;
        let mut req = make_request(args, inputs, &sent)?;
        req.platforms = part.platforms.iter().map(|p| p.to_string()).collect();
        let local = addr_is_local(Some(&part.addr));
        let mut outs = Vec::new();
        // Output index in this builder's request → index into the overall outputs.
        let mut map = Vec::new();
        for (i, (o, s)) in outputs.iter().zip(&sinks).enumerate() {
            if !combined {
                outs.push(o.to_proto_for(s.as_ref(), local));
                map.push(i);
                continue;
            }
            if o.is_load() {
                if k == load_part {
                    outs.push(o.to_proto_for(s.as_ref(), local));
                    map.push(i);
                }
                continue;
            }
            // A push: this builder's manifests by digest; the client pushes the index.
            outs.push(o.by_digest().to_proto());
            map.push(i);
        }
        req.outputs = outs;
        build_parts.push(BuildPart {
            label: part.addr.to_string(),
            client: part.client.clone(),
            request: req,
            agents: agents.clone(),
            context: sent.provider.clone(),
            outputs: map,
        });
    }
    let Some(results) = run_parts(build_parts, &mut sinks, &mut renderer, mode).await? else { return Ok(130) };

    // Per-platform manifests in the order the platforms were asked for.
    let mut manifests: Vec<v1::ManifestRef> = results.iter().flat_map(|r| r.manifests.clone()).collect();
    manifests.sort_by_key(|m| {
        Platform::parse(&m.platform).ok().and_then(|p| requested.iter().position(|q| q.matches(&p))).unwrap_or(usize::MAX)
    });
    let mut seen = std::collections::HashSet::new();
    manifests.retain(|m| seen.insert(m.platform.clone()));
    let pushing = outputs.iter().any(OutputSpec::is_push);
    let mut index_digest = None;
    if combined && pushing {
        let index = index_of(&manifests)?;
        let digest = Digest::of(&index);
        push_index(args, &index).await?;
        index_digest = Some(digest);
    }
    let image_id = results.first().map(|r| r.image_id.clone()).unwrap_or_default();
    let top = match &index_digest {
        Some(d) => d.to_string(),
        None => results.first().map(|r| r.manifest_digest.clone()).unwrap_or_default(),
    };
    if let Some(path) = &args.iidfile {
        std::fs::write(path, &image_id).with_context(|| format!("writing --iidfile {}", path.display()))?;
    }
    if let Some(path) = &args.metadata_file {
        let mut meta = serde_json::json!({ "containerimage.config.digest": image_id });
        if !top.is_empty() {
            meta["containerimage.digest"] = serde_json::json!(top);
        }
        if !args.tags.is_empty() {
            meta["image.name"] = serde_json::json!(args.tags.join(","));
        }
        std::fs::write(path, meta.to_string()).with_context(|| format!("writing --metadata-file {}", path.display()))?;
    }
    if args.quiet {
        println!("{image_id}");
    } else if mode != Mode::Quiet {
        for r in &results {
            for p in &r.pushes {
                eprintln!("hoist: {}", push_line(p));
            }
        }
        if let Some(d) = &index_digest {
            eprintln!("hoist: pushed index {d} over {} platforms to {}", manifests.len(), args.tags.join(", "));
        }
        let per: Vec<String> = parts
            .iter()
            .enumerate()
            .map(|(k, p)| {
                let r = &results[k];
                format!(
                    "{} on {} ({} steps run, {} cached, {} containers, context {} files sent ({}), build {})",
                    p.platforms.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","),
                    p.addr,
                    r.steps_run,
                    r.steps_cached,
                    r.containers_run,
                    r.context_files_sent,
                    human_bytes(r.context_bytes_sent),
                    r.build_id
                )
            })
            .collect();
        eprintln!("hoist: built {image_id} in {:.1}s on {} builders: {}", started.elapsed().as_secs_f64(), parts.len(), per.join("; "));
    }
    Ok(0)
}

/// Push the index over the builders' manifests to every tag (the builders pushed the
/// manifests and blobs); credentials from the docker config of the tags' registries.
async fn push_index(args: &BuildArgs, index: &[u8]) -> anyhow::Result<()> {
    let refs = args.tags.iter().map(|t| Reference::parse(t).map_err(|e| anyhow!("{e}"))).collect::<anyhow::Result<Vec<_>>>()?;
    let hosts: Vec<&str> = refs.iter().map(|r| r.registry.as_str()).collect();
    let credentials = hoist_oci::auth::Credentials::from_docker_config(hosts.iter().copied())
        .context("reading registry credentials from the docker config")?;
    let registry = hoist_oci::registry::RegistryClient::new(hoist_oci::registry::RegistryOptions {
        credentials,
        insecure: args.insecure_registries.clone(),
        ..Default::default()
    })?;
    let pushes = refs.iter().map(|r| {
        let registry = registry.clone();
        async move { registry.push_index(r, index).await.map_err(|e| format!("pushing the index to {r}: {e}")) }
    });
    let errors: Vec<String> = futures::future::join_all(pushes).await.into_iter().filter_map(|r| r.err()).collect();
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        Platform::parse(s).unwrap()
    }

    #[test]
    fn each_platform_goes_to_a_native_builder_else_the_first() {
        let amd = p("linux/amd64");
        let arm = p("linux/arm64");
        let s390 = p("linux/s390x");
        let announced = vec![vec![amd.clone()], vec![arm.clone()]];
        let r = route(&[amd.clone(), arm.clone(), s390.clone()], &announced);
        assert_eq!(r, vec![vec![amd.clone(), s390.clone()], vec![arm.clone()]]);
        // Nobody announces arm64: everything on the first.
        let r = route(&[amd.clone(), arm.clone()], &[vec![amd.clone()], vec![amd.clone()]]);
        assert_eq!(r, vec![vec![amd.clone(), arm.clone()], vec![]]);
        // The first builder that announces it wins.
        let r = route(std::slice::from_ref(&arm), &[vec![amd.clone()], vec![arm.clone()], vec![arm.clone()]]);
        assert_eq!(r, vec![vec![], vec![arm.clone()], vec![]]);
        // arm64 with and without its v8 variant are the same platform.
        let bare = Platform { os: "linux".into(), architecture: "arm64".into(), variant: None };
        assert_eq!(route(std::slice::from_ref(&arm), &[vec![amd], vec![bare]])[1], vec![arm]);
    }

    #[test]
    fn the_index_lists_each_platform_manifest() {
        let m = |plat: &str, body: &[u8]| v1::ManifestRef {
            platform: plat.into(),
            digest: Digest::of(body).to_string(),
            size: body.len() as u64,
            media_type: String::new(),
            config_digest: String::new(),
        };
        let bytes = index_of(&[m("linux/amd64", b"a"), m("linux/arm64", b"bb")]).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["mediaType"], media::OCI_INDEX);
        assert_eq!(v["manifests"][0]["platform"]["architecture"], "amd64");
        assert_eq!(v["manifests"][1]["platform"]["architecture"], "arm64");
        // As the builder's own indexes: arm64's default v8 variant is left out.
        assert_eq!(v["manifests"][1]["platform"]["variant"], serde_json::Value::Null);
        assert_eq!(v["manifests"][1]["size"], 2);
        assert_eq!(v["manifests"][1]["digest"], Digest::of(b"bb").to_string());
        assert!(index_of(&[m("bogus", b"x")]).is_err());
    }
}
