//! Builds over a fleet of builders (`--builder a --builder b`, `HOIST_BUILDER=a,b`, or the
//! `builders` of hoist.json). Each platform goes to one builder: among those that announce
//! it as native (`hoist serve --platforms`; every builder when none does), the one ranked
//! first by rendezvous (highest random weight) hashing of (project, platform, builder
//! address). Every teammate and CI machine ranks alike, so a project's builds for a platform
//! land on one node and most cache hits come from its disk (the fleet's shared store holds
//! the rest); the rest of the ranking is the order to fall over in. A builder that does not
//! answer is passed over, and when the connection to a builder breaks during a build the
//! whole build runs again on the next one; the client says so either way. An error a
//! builder reports (a failing RUN, a bad Dockerfile) is never retried.
//!
//! When every platform lands on one builder, the build is an ordinary one-builder build
//! ([`crate::build::on_builder`]: every output type). Otherwise the builders run at once and
//! the client combines their results — each builder pushes its platform's manifest (by
//! digest) and the client pushes the index over them to every tag; `--load` takes the
//! engine's platform from the builder that made it.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{anyhow, bail, Context as _};
use hoist_client::build::BuildPart;
use hoist_client::outputs::{Dest, OutputSink, OutputSpec};
use hoist_client::v1;
use hoist_client::{human_bytes, BuilderAddr, Client, ClientError};
use hoist_oci::digest::Digest;
use hoist_oci::image::{media, Descriptor, Index};
use hoist_oci::reference::Reference;
use hoist_oci::Platform;

use crate::build::{
    connection_failed, lost_if_gone, make_request, push_line, report_failure, run_parts, sync_context, BuildArgs, Job, Lost, ANSWER_WITHIN,
};
use crate::conn::{addr_is_local, ConnArgs};
use crate::progress::{Mode, Renderer};

/// The rendezvous weight of builder `node` (its address as written, e.g.
/// `tcp://10.0.0.5:7420`) for the builds of `platform` in project `key`: the first 8 bytes
/// of SHA-256(key NUL platform NUL node), the platform normalized (`linux/arm64/v8` is
/// `linux/arm64`). Every client must compute the same, or teammates' builds scatter.
pub fn weight(key: &str, platform: &Platform, node: &str) -> u64 {
    let digest = Digest::of(format!("{key}\0{}\0{node}", platform.normalize()).as_bytes());
    u64::from_str_radix(&digest.hex()[..16], 16).unwrap_or(0)
}

/// The builders `nodes` (indices into it) from the highest weight for (`key`, `platform`)
/// to the lowest: the first builds, the others are the fallbacks in order. Equal weights
/// (never seen in practice) go by address.
pub fn rendezvous(key: &str, platform: &Platform, nodes: &[String]) -> Vec<usize> {
    let mut ranked: Vec<(u64, usize)> = nodes.iter().enumerate().map(|(i, n)| (weight(key, platform, n), i)).collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| nodes[a.1].cmp(&nodes[b.1])));
    ranked.into_iter().map(|(_, i)| i).collect()
}

/// Whether builder `i` may build `platform`, given what each builder announced as native
/// (`None`: unknown, it did not answer): those that announce it, and the unknown ones (they
/// may); every builder when none announces it.
pub fn eligible(platform: &Platform, announced: &[Option<Vec<Platform>>], i: usize) -> bool {
    let native = |a: &Option<Vec<Platform>>| a.as_ref().is_some_and(|a| a.iter().any(|h| platform.matches(h)));
    !announced.iter().any(native) || announced[i].is_none() || native(&announced[i])
}

/// For each platform, the builders to try in order: the eligible ones (see [`eligible`]) by
/// rendezvous rank (see [`rendezvous`]).
pub fn route(key: &str, platforms: &[Platform], nodes: &[String], announced: &[Option<Vec<Platform>>]) -> Vec<Vec<usize>> {
    platforms.iter().map(|p| rendezvous(key, p, nodes).into_iter().filter(|&i| eligible(p, announced, i)).collect()).collect()
}

/// A builder of the fleet as this build found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// It answered, announcing these platforms as native, and the project the client's
    /// token acts in there.
    Up(Vec<Platform>, String),
    /// It did not answer, or the connection to it broke during this build: why.
    Down(String),
    /// It answered with an error (e.g. a token it does not know): reported when a build is
    /// routed to it, never passed over (that would hide the mistake).
    Refused(String),
}

/// Which builder builds which platforms.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// Builder index and its platforms, in the order of the platforms asked for.
    pub parts: Vec<(usize, Vec<Platform>)>,
    /// Builders passed over because they are down: (that builder, the platform, the builder
    /// that builds it instead).
    pub passed: Vec<(usize, Platform, usize)>,
}

/// Send each of `requested` to the first builder of its [`route`] that is up.
pub fn plan(key: &str, requested: &[Platform], nodes: &[String], states: &[State]) -> anyhow::Result<Plan> {
    let announced: Vec<Option<Vec<Platform>>> =
        states.iter().map(|s| if let State::Up(p, _) = s { Some(p.clone()) } else { None }).collect();
    let mut out = Plan { parts: Vec::new(), passed: Vec::new() };
    for (p, order) in requested.iter().zip(route(key, requested, nodes, &announced)) {
        let mut down = Vec::new();
        let mut chosen = None;
        for i in order {
            match &states[i] {
                State::Up(..) => {
                    chosen = Some(i);
                    break;
                }
                State::Down(_) => down.push(i),
                State::Refused(e) => bail!("builder {}: {e}", nodes[i]),
            }
        }
        let Some(c) = chosen else {
            let why: Vec<String> = down
                .iter()
                .map(|&i| match &states[i] {
                    State::Down(why) => format!("{} ({why})", nodes[i]),
                    _ => nodes[i].clone(),
                })
                .collect();
            bail!("no builder answered for {p}: {}", why.join("; "));
        };
        out.passed.extend(down.into_iter().map(|d| (d, p.clone(), c)));
        match out.parts.iter_mut().find(|(n, _)| *n == c) {
            Some((_, ps)) if ps.contains(p) => {}
            Some((_, ps)) => ps.push(p.clone()),
            None => out.parts.push((c, vec![p.clone()])),
        }
    }
    Ok(out)
}

/// A builder of the fleet: its address, the client connected to it (when it answered) and
/// how it answered.
struct Node {
    addr: BuilderAddr,
    client: Option<Client>,
    state: State,
}

/// Connect to every builder at once and ask each for its native platforms.
async fn discover(conn: &ConnArgs, dir: Option<&Path>, addrs: Vec<BuilderAddr>) -> anyhow::Result<Vec<Node>> {
    let hellos = addrs.into_iter().map(|addr| async move {
        match tokio::time::timeout(ANSWER_WITHIN, hello(conn, &addr, dir)).await {
            Ok(Ok((client, state))) => Ok(Node { addr, client, state }),
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(Node { addr, client: None, state: State::Down(format!("no answer within {}s", ANSWER_WITHIN.as_secs())) }),
        }
    });
    futures::future::join_all(hellos).await.into_iter().collect()
}

/// Connect to `addr` and ask for its native platforms. Errors are the client's own (a
/// missing --tls-key); a builder that cannot be reached is [`State::Down`].
async fn hello(conn: &ConnArgs, addr: &BuilderAddr, dir: Option<&Path>) -> anyhow::Result<(Option<Client>, State)> {
    let mut client = match conn.connect_to(Some(addr.clone()), dir).await {
        Ok(c) => c,
        Err(e) => {
            return match e.downcast_ref::<ClientError>() {
                Some(ClientError::Connect { message, .. }) => Ok((None, State::Down(message.clone()))),
                _ => Err(e),
            }
        }
    };
    let state = match client.info(v1::InfoRequest {}).await {
        Ok(r) => {
            let r = r.into_inner();
            State::Up(r.platforms.iter().filter_map(|p| Platform::parse(p).ok()).collect(), r.project)
        }
        Err(s) if connection_failed(s.code().into(), std::error::Error::source(&s)) => State::Down(s.message().to_string()),
        Err(s) => State::Refused(s.message().to_string()),
    };
    Ok((Some(client), state))
}

/// What builds are routed by: the project the client names (`--project`, HOIST_PROJECT,
/// hoist.json), else the token's project as the first builder that answered reports it.
fn project_key(conn: &ConnArgs, dir: Option<&Path>, nodes: &[Node]) -> anyhow::Result<String> {
    if let Some(p) = conn.project_for(dir)? {
        return Ok(p);
    }
    Ok(nodes.iter().find_map(|n| if let State::Up(_, p) = &n.state { Some(p.clone()) } else { None }).unwrap_or_default())
}

/// The platforms asked for (`--platform`, comma-separated or repeated), else the host's.
fn requested_platforms(args: &BuildArgs) -> anyhow::Result<Vec<Platform>> {
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
    Ok(requested)
}

/// Run a build over the fleet `addrs` (at least two builders); returns the exit code.
pub async fn run(job: &Job<'_>, addrs: Vec<BuilderAddr>) -> anyhow::Result<i32> {
    let args = job.args;
    let dir = job.inputs.context_dir.as_deref();
    let requested = requested_platforms(args)?;
    let mut nodes = discover(&args.conn, dir, addrs).await?;
    let key = project_key(&args.conn, dir, &nodes)?;
    let names: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
    // Bytes already written to stdout cannot be taken back: such a build is not run again.
    let to_stdout = job.outputs.iter().any(|o| o.dest == Dest::Stdout);
    let mut told = HashSet::new();
    // Builders whose connection broke during this build, in order.
    let mut lost: Vec<usize> = Vec::new();
    loop {
        let states: Vec<State> = nodes.iter().map(|n| n.state.clone()).collect();
        let plan = match plan(&key, &requested, &names, &states) {
            Ok(plan) => plan,
            Err(e) => {
                return Err(match lost.last() {
                    Some(&l) => e.context(format!("the connection to builder {} was lost during the build", names[l])),
                    None => e,
                })
            }
        };
        for (down, p, instead) in &plan.passed {
            if !told.insert((*down, *instead)) {
                continue;
            }
            let what = if requested.len() > 1 { format!("{p} ") } else { String::new() };
            let why = match &states[*down] {
                State::Down(why) => why.as_str(),
                _ => "",
            };
            if lost.contains(down) {
                eprintln!(
                    "hoist: the connection to builder {} was lost during the build ({why}); building {what}again on {}",
                    names[*down], names[*instead]
                );
            } else {
                eprintln!("hoist: builder {} did not answer ({why}); building {what}on {}", names[*down], names[*instead]);
            }
        }
        let attempt = match plan.parts.as_slice() {
            [(n, platforms)] => {
                let client = nodes[*n].client.clone().ok_or_else(|| anyhow!("builder {} is not connected", names[*n]))?;
                crate::build::on_builder(job, Some(&nodes[*n].addr), client, Some(platforms)).await
            }
            _ => combined(job, &requested, &plan, &nodes).await,
        };
        let e = match attempt {
            Ok(code) => return Ok(code),
            Err(e) => e,
        };
        let Some(l) = e.downcast_ref::<Lost>() else { return Err(e) };
        if to_stdout {
            return Err(e.context("not building again on another builder: part of an output may already be on stdout"));
        }
        let n = plan.parts[l.part].0;
        nodes[n].state = State::Down(l.why.clone());
        lost.push(n);
    }
}

/// One builder's share of a combined build.
struct Part {
    addr: BuilderAddr,
    client: Client,
    platforms: Vec<Platform>,
}

/// Run the build over the builders of `plan` at once, combining their results.
async fn combined(job: &Job<'_>, requested: &[Platform], plan: &Plan, nodes: &[Node]) -> anyhow::Result<i32> {
    let (args, inputs, outputs, mode, started) = (job.args, job.inputs, job.outputs, job.mode, job.started);
    for o in outputs {
        if !(o.is_push() || o.is_load()) {
            bail!(
                "output type={} is not supported when platforms are built on several builders (use --push or --load, or one builder)",
                o.type_name()
            );
        }
    }
    let mut parts = Vec::new();
    for (n, platforms) in &plan.parts {
        let node = &nodes[*n];
        let client = node.client.clone().ok_or_else(|| anyhow!("builder {} is not connected", node.addr))?;
        parts.push(Part { addr: node.addr.clone(), client, platforms: platforms.clone() });
    }

    let mut sinks: Vec<Option<OutputSink>> = Vec::new();
    for o in outputs {
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
        let sent = match sync_context(&mut part.client, inputs, job.ignore, &mut renderer, &label).await {
            Ok(sent) => sent,
            Err(e) => {
                renderer.finish();
                return Err(lost_if_gone(e, &mut part.client, k, &part.addr.to_string()).await);
            }
        };
        let mut req = make_request(args, inputs, &sent)?;
        req.platforms = part.platforms.iter().map(|p| p.to_string()).collect();
        let local = addr_is_local(Some(&part.addr));
        let mut outs = Vec::new();
        // Output index in this builder's request → index into the overall outputs.
        let mut map = Vec::new();
        for (i, (o, s)) in outputs.iter().zip(&sinks).enumerate() {
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
            agents: job.agents.clone(),
            context: sent.provider.clone(),
            outputs: map,
        });
    }
    let ran = run_parts(build_parts, &mut sinks, &mut renderer, mode).await;
    let Some(results) = report_failure(ran, &renderer, inputs)? else { return Ok(130) };

    // Per-platform manifests in the order the platforms were asked for.
    let mut manifests: Vec<v1::ManifestRef> = results.iter().flat_map(|r| r.manifests.clone()).collect();
    manifests.sort_by_key(|m| {
        Platform::parse(&m.platform).ok().and_then(|p| requested.iter().position(|q| q.matches(&p))).unwrap_or(usize::MAX)
    });
    let mut seen = std::collections::HashSet::new();
    manifests.retain(|m| seen.insert(m.platform.clone()));
    let pushing = outputs.iter().any(OutputSpec::is_push);
    let mut index_digest = None;
    if pushing {
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

    fn nodes(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("tcp://10.0.0.{i}:7420")).collect()
    }

    fn projects() -> Vec<String> {
        (0..200).map(|i| format!("project-{i}")).collect()
    }

    /// The weight is SHA-256 of (project, platform, address) as documented, so clients of
    /// every version and machine rank alike (the values were computed outside Rust).
    #[test]
    fn the_weight_is_pinned_and_the_order_ignores_how_the_builders_are_listed() {
        assert_eq!(weight("web", &p("linux/amd64"), "tcp://10.0.0.1:7420"), 12363312824619001937);
        assert_eq!(weight("web", &p("linux/arm64"), "tcp://10.0.0.1:7420"), 84310307339199005);
        // Spellings of one platform weigh the same.
        assert_eq!(weight("web", &p("linux/arm64/v8"), "tcp://a:1"), weight("web", &p("linux/aarch64"), "tcp://a:1"));
        let fleet = nodes(4);
        let order: Vec<&str> = rendezvous("web", &p("linux/amd64"), &fleet).into_iter().map(|i| fleet[i].as_str()).collect();
        assert_eq!(order, rendezvous("web", &p("linux/amd64"), &fleet).into_iter().map(|i| fleet[i].as_str()).collect::<Vec<_>>());
        let mut reversed = fleet.clone();
        reversed.reverse();
        let again: Vec<&str> = rendezvous("web", &p("linux/amd64"), &reversed).into_iter().map(|i| reversed[i].as_str()).collect();
        assert_eq!(order, again, "the order does not depend on the order of --builder");
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, fleet.iter().map(String::as_str).collect::<Vec<_>>(), "every builder once");
    }

    /// Different projects, and one project's different platforms, spread over the fleet.
    #[test]
    fn the_choice_depends_on_the_project_and_the_platform() {
        let fleet = nodes(3);
        let (amd, arm) = (p("linux/amd64"), p("linux/arm64"));
        let mut per_node = [0; 3];
        let mut platform_moves = 0;
        for key in projects() {
            let a = rendezvous(&key, &amd, &fleet)[0];
            per_node[a] += 1;
            if rendezvous(&key, &arm, &fleet)[0] != a {
                platform_moves += 1;
            }
        }
        // 200 keys over 3 nodes: about 67 each.
        assert!(per_node.iter().all(|&n| n >= 40), "{per_node:?}");
        // About 2 in 3 projects build arm64 elsewhere than amd64.
        assert!(platform_moves >= 90, "{platform_moves}");
    }

    /// The property rendezvous hashing is chosen for: taking a builder out moves only the
    /// (project, platform) pairs that were on it, each to its next builder; the others keep
    /// their node and its warm disk.
    #[test]
    fn removing_a_builder_moves_only_the_keys_it_had() {
        let three = nodes(3);
        let removed = 1;
        let two: Vec<String> = three.iter().enumerate().filter(|&(i, _)| i != removed).map(|(_, n)| n.clone()).collect();
        let mut moved = 0;
        for key in projects() {
            for platform in [p("linux/amd64"), p("linux/arm64")] {
                let before = rendezvous(&key, &platform, &three);
                let after = rendezvous(&key, &platform, &two);
                let after_names: Vec<&str> = after.iter().map(|&i| two[i].as_str()).collect();
                // The fallback order is the old one without the removed builder.
                let expected: Vec<&str> = before.iter().filter(|&&i| i != removed).map(|&i| three[i].as_str()).collect();
                assert_eq!(after_names, expected, "{key} {platform}");
                if before[0] == removed {
                    moved += 1;
                } else {
                    assert_eq!(after_names[0], three[before[0]], "{key} {platform} stayed put");
                }
            }
        }
        assert!((80..=190).contains(&moved), "about a third of 400 keys were on the removed builder: {moved}");
    }

    /// Only builders announcing a platform as native may build it (those whose platforms are
    /// unknown may too); when none announces it, every builder may.
    #[test]
    fn a_platform_goes_to_native_builders_else_to_any() {
        let (amd, arm, s390) = (p("linux/amd64"), p("linux/arm64"), p("linux/s390x"));
        let fleet = nodes(3);
        let announced = vec![Some(vec![amd.clone()]), Some(vec![arm.clone()]), Some(vec![amd.clone()])];
        let r = route("web", &[amd.clone(), arm.clone(), s390.clone()], &fleet, &announced);
        let mut natives = r[0].clone();
        natives.sort();
        assert_eq!(natives, vec![0, 2]);
        assert_eq!(r[1], vec![1]);
        assert_eq!(r[2], rendezvous("web", &s390, &fleet), "nobody announces s390x: every builder, by rank");
        // arm64 with and without its v8 variant are the same platform.
        let bare = Platform { os: "linux".into(), architecture: "arm64".into(), variant: None };
        assert_eq!(route("web", std::slice::from_ref(&arm), &fleet, &[Some(vec![amd.clone()]), Some(vec![bare]), None])[0].len(), 2);
        // A builder that did not answer may be native: it keeps its place.
        let unknown = vec![Some(vec![amd.clone()]), None, Some(vec![arm.clone()])];
        let mut r = route("web", std::slice::from_ref(&arm), &fleet, &unknown)[0].clone();
        r.sort();
        assert_eq!(r, vec![1, 2]);
        assert!(eligible(&s390, &unknown, 0) && eligible(&s390, &unknown, 1));
        assert!(!eligible(&arm, &unknown, 0));
    }

    /// Builders that are down are passed over in rank order (and said so); one that refuses
    /// the client is an error, as is a fleet with nobody up.
    #[test]
    fn the_plan_falls_over_in_rank_order() {
        let fleet = nodes(3);
        let amd = p("linux/amd64");
        let order = rendezvous("web", &amd, &fleet);
        let up = State::Up(vec![amd.clone()], String::new());
        let down = |why: &str| State::Down(why.into());
        let mut states = vec![up.clone(), up.clone(), up.clone()];
        let all_up = plan("web", std::slice::from_ref(&amd), &fleet, &states).unwrap();
        assert_eq!(all_up, Plan { parts: vec![(order[0], vec![amd.clone()])], passed: vec![] });

        states[order[0]] = down("connection refused");
        let one_down = plan("web", std::slice::from_ref(&amd), &fleet, &states).unwrap();
        assert_eq!(one_down.parts, vec![(order[1], vec![amd.clone()])]);
        assert_eq!(one_down.passed, vec![(order[0], amd.clone(), order[1])]);

        states[order[1]] = down("timed out");
        assert_eq!(plan("web", std::slice::from_ref(&amd), &fleet, &states).unwrap().parts, vec![(order[2], vec![amd.clone()])]);

        states[order[2]] = down("reset");
        let e = plan("web", std::slice::from_ref(&amd), &fleet, &states).unwrap_err().to_string();
        assert!(e.starts_with("no builder answered for linux/amd64"), "{e}");
        assert!(e.contains(&format!("{} (connection refused)", fleet[order[0]])) && e.contains("(reset)"), "{e}");

        let mut states = vec![up.clone(), up.clone(), up.clone()];
        states[order[0]] = State::Refused("the token is not valid for this builder".into());
        let e = plan("web", std::slice::from_ref(&amd), &fleet, &states).unwrap_err().to_string();
        assert_eq!(e, format!("builder {}: the token is not valid for this builder", fleet[order[0]]));

        // Two platforms on the one builder that is up: one part with both.
        let arm = p("linux/arm64");
        let states = vec![down("refused"), up.clone(), down("refused")];
        let both = plan("web", &[amd.clone(), arm.clone()], &fleet, &states).unwrap();
        assert_eq!(both.parts, vec![(1, vec![amd, arm])]);
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
