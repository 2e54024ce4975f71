//! The engine's logic on fakes (no root, no runc, no registry): the solver, cache hits after
//! misses, steps shared between concurrent builds, cancellation, leases against collection,
//! least-recently-used collection by the clock, and base images. The real parts have their
//! own tests (exec.rs, network.rs, the e2e suites of hoist-cli).

use hoist_engine::progress::{Event, Progress};
use hoist_engine::testing::TestEngine;
use hoist_engine::{BuildOutcome, EngineError};
use tokio_util::sync::CancellationToken;

/// Start a build in its own task.
fn spawn(
    t: &TestEngine,
    req: hoist_engine::BuildRequest,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<Result<BuildOutcome, EngineError>> {
    let engine = t.engine.clone();
    tokio::spawn(async move { engine.build(req, Progress::discard(), cancel).await })
}

fn assert_cancelled(r: Result<BuildOutcome, EngineError>) {
    match r {
        Err(e) => assert!(matches!(e.root(), EngineError::Cancelled), "{e:?}"),
        Ok(_) => panic!("the cancelled build succeeded"),
    }
}

fn layers(o: &BuildOutcome) -> Vec<hoist_oci::digest::Digest> {
    o.images[0].diff_ids().to_vec()
}

#[tokio::test]
async fn a_rebuild_reuses_every_step_and_a_changed_file_reruns_only_what_follows_it() {
    let t = TestEngine::new();
    let dockerfile = "FROM scratch\nRUN write /first 1\nCOPY a.txt /\nRUN write /second 2\n";
    let first = t.build(t.request("team", dockerfile, &[("a.txt", "v1")])).await.unwrap();
    assert_eq!((first.steps_run, first.steps_cached, first.containers_run), (3, 0, 2));
    assert_eq!(t.executor.scripts(), ["write /first 1", "write /second 2"]);
    assert_eq!(layers(&first).len(), 3, "{:#?}", first.images[0].config.history);

    let again = t.build(t.request("team", dockerfile, &[("a.txt", "v1")])).await.unwrap();
    assert_eq!((again.steps_run, again.steps_cached, again.containers_run), (0, 3, 0));
    assert_eq!(again.images[0].config_digest, first.images[0].config_digest, "the same image, byte for byte");
    assert_eq!(t.executor.runs().len(), 2, "nothing ran again");

    let changed = t.build(t.request("team", dockerfile, &[("a.txt", "v2")])).await.unwrap();
    assert_eq!((changed.steps_run, changed.steps_cached), (2, 1), "the RUN before the COPY stays cached");
    assert_eq!(t.executor.scripts(), ["write /first 1", "write /second 2", "write /second 2"]);
    assert_eq!(layers(&changed)[0], layers(&first)[0]);
    assert_ne!(layers(&changed)[1], layers(&first)[1]);

    // Another project shares no cache records with this one.
    let other = t.build(t.request("other", dockerfile, &[("a.txt", "v1")])).await.unwrap();
    assert_eq!((other.steps_cached, other.steps_run), (0, 3));
}

#[tokio::test]
async fn a_step_sees_its_parents_files_and_its_layer_holds_only_what_it_wrote() {
    let t = TestEngine::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let req = t.request("team", "FROM scratch\nCOPY a.txt /\nRUN cat /a.txt; write /b.txt made\n", &[("a.txt", "from the context")]);
    let out = t.engine.build(req, Progress::new(tx), CancellationToken::new()).await.unwrap();
    let mut stdout = String::new();
    while let Ok(ev) = rx.try_recv() {
        if let Event::Log { stream: 1, data, .. } = ev {
            stdout.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert_eq!(stdout, "from the context");
    let run_layer = t.engine.snapshots().layer_dir(&layers(&out)[1]);
    assert_eq!(std::fs::read_to_string(run_layer.join("b.txt")).unwrap(), "made");
    assert!(!run_layer.join("a.txt").exists(), "the parent's file is not copied into the RUN's layer");
    assert!(t.mounter.mounted().is_empty(), "every mount was released");
}

#[tokio::test]
async fn a_failing_step_names_its_line_and_its_exit_code_and_caches_nothing() {
    let t = TestEngine::new();
    let dockerfile = "FROM scratch\nRUN write /ok 1\nRUN exit 3\n";
    let err = t.build(t.request("team", dockerfile, &[])).await.err().expect("the build fails");
    match err.root() {
        EngineError::Step { location, source, .. } => {
            assert_eq!(location, "Dockerfile:3");
            assert!(source.to_string().contains("exit code: 3"), "{source}");
        }
        other => panic!("expected a step error, got {other:?}"),
    }
    assert!(t.mounter.mounted().is_empty(), "the failed step's mount was released");
    // The step before it was recorded; the failed one runs again next time.
    let _ = t.build(t.request("team", dockerfile, &[])).await;
    assert_eq!(t.executor.scripts(), ["write /ok 1", "exit 3", "exit 3"]);
}

#[tokio::test]
async fn a_failed_run_in_a_base_stage_is_a_step_error_where_it_surfaces() {
    let t = TestEngine::new();
    let dockerfile = "FROM scratch AS base\nRUN exit 2\nFROM base\nRUN write /x 1\n";
    let err = t.build(t.request("team", dockerfile, &[])).await.err().expect("the build fails");
    assert!(matches!(err.root(), EngineError::Step { location, .. } if location == "Dockerfile:2"), "{err:?}");
}

#[tokio::test]
async fn identical_steps_of_concurrent_builds_run_once_even_when_one_build_is_cancelled() {
    let t = TestEngine::new();
    let dockerfile = "FROM scratch\nRUN hold; write /slow done\n";
    let cancel_a = CancellationToken::new();
    let a = spawn(&t, t.request("team", dockerfile, &[]), cancel_a.clone());
    let b = spawn(&t, t.request("team", dockerfile, &[]), CancellationToken::new());
    t.executor.wait_started(1).await;
    // Both builds are waiting on the one running step; cancelling the first leaves it to
    // the second.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    cancel_a.cancel();
    assert_cancelled(a.await.unwrap());
    t.executor.release();
    let b = b.await.unwrap().unwrap();
    assert_eq!(t.executor.runs().len(), 1, "one run for both builds");
    assert_eq!(b.steps_run, 1);
    assert!(t.mounter.mounted().is_empty());
}

#[tokio::test]
async fn cancelling_a_build_stops_its_step_keeps_nothing_and_releases_every_mount() {
    let t = TestEngine::new();
    let dockerfile = "FROM scratch\nRUN write /a 1\nRUN hold; write /b 2\n";
    let cancel = CancellationToken::new();
    let build = spawn(&t, t.request("team", dockerfile, &[]), cancel.clone());
    t.executor.wait_started(2).await;
    cancel.cancel();
    assert_cancelled(build.await.unwrap());
    assert!(t.mounter.mounted().is_empty(), "the held step's mount was released");
    t.executor.release();
    let again = t.build(t.request("team", dockerfile, &[])).await.unwrap();
    assert_eq!((again.steps_cached, again.steps_run), (1, 1), "the finished step was kept, the cancelled one runs again");
}

#[tokio::test]
async fn layers_of_a_build_in_use_survive_a_reset_until_the_outcome_is_dropped() {
    let t = TestEngine::new();
    let out = t.build(t.request("team", "FROM scratch\nRUN write /a 1\n", &[])).await.unwrap();
    let layer = layers(&out)[0].clone();
    t.engine.reset("team").unwrap();
    assert!(t.engine.snapshots().has_layer(&layer), "the outcome leases its layers");
    assert!(t.engine.index().records("team").unwrap().is_empty());
    drop(out);
    assert_eq!(t.engine.sweep().unwrap(), 1);
    assert!(!t.engine.snapshots().has_layer(&layer));
}

#[tokio::test]
async fn collection_drops_the_least_recently_used_build_by_the_clock() {
    let t = TestEngine::new();
    let old = t.build(t.request("team", "FROM scratch\nRUN write /old 1\n", &[])).await.unwrap();
    t.clock.advance(3600);
    let new = t.build(t.request("team", "FROM scratch\nRUN write /new 2\n", &[])).await.unwrap();
    t.clock.advance(3600);
    // Using the old build's step again makes it the most recent.
    let reused = t.build(t.request("team", "FROM scratch\nRUN write /old 1\n", &[])).await.unwrap();
    assert_eq!(reused.steps_cached, 1);
    let (old_layer, new_layer) = (layers(&old)[0].clone(), layers(&new)[0].clone());
    drop((old, new, reused));
    let usage = t.engine.usage("team").unwrap();
    assert_eq!(usage.layers, 2);
    // Room for one layer: the one used an hour ago goes, the one used now stays.
    let (freed, _) = t.engine.collect("team", usage.layer_bytes - 1, &[]).unwrap();
    assert!(freed > 0);
    assert!(t.engine.snapshots().has_layer(&old_layer), "used last: kept");
    assert!(!t.engine.snapshots().has_layer(&new_layer), "least recently used: dropped");
}

#[tokio::test]
async fn a_base_image_is_fetched_once_and_its_files_and_env_reach_the_steps() {
    let t = TestEngine::new();
    t.images.add("base:1", &[&[("etc/greeting", "hello")], &[("etc/second", "x")]], &["GREETING=from-base"]);
    let dockerfile = "FROM base:1\nRUN cat /etc/greeting; write /out 1\n";
    let first = t.build(t.request("team", dockerfile, &[])).await.unwrap();
    assert_eq!(t.images.fetched().len(), 2, "both layers");
    assert_eq!(layers(&first).len(), 3, "{:#?}", first.images[0].config.history);
    let run = &t.executor.runs()[0];
    assert!(run.env.iter().any(|e| e == "GREETING=from-base"), "{:?}", run.env);
    assert!(first.images[0].config.config.env.as_ref().is_some_and(|e| e.iter().any(|v| v == "GREETING=from-base")));

    // Another project using the same base: resolved again, nothing fetched again.
    let other = t.build(t.request("other", dockerfile, &[])).await.unwrap();
    assert_eq!(t.images.fetched().len(), 2);
    assert_eq!(layers(&other)[..2], layers(&first)[..2], "the base's layers are the same ones");

    let missing = t.build(t.request("team", "FROM nothere:1\n", &[])).await.err().expect("an unknown image fails");
    assert!(missing.to_string().contains("nothere"), "{missing}");
}

#[tokio::test]
async fn secrets_reach_the_step_through_a_mount_and_never_its_layer() {
    let t = TestEngine::new();
    let mut req = t.request("team", "FROM scratch\nRUN --mount=type=secret,id=tok cat /run/secrets/tok; write /done 1\n", &[]);
    req.secrets.secrets.insert("tok".into(), b"s3cret".to_vec());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let out = t.engine.build(req, Progress::new(tx), CancellationToken::new()).await.unwrap();
    let mut logs = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        if let Event::Log { data, .. } = ev {
            logs.extend_from_slice(&data);
        }
    }
    assert_eq!(String::from_utf8_lossy(&logs), "s3cret");
    let layer = t.engine.snapshots().layer_dir(&layers(&out)[0]);
    assert!(!layer.join("run/secrets/tok").exists());
}

#[tokio::test]
async fn a_file_a_step_removes_becomes_a_whiteout_in_its_layer() {
    if !hoist_oci::testing::needs_root() {
        return;
    }
    let t = TestEngine::new();
    let out =
        t.build(t.request("team", "FROM scratch\nCOPY a.txt b.txt /\nRUN rm /a.txt\n", &[("a.txt", "1"), ("b.txt", "2")])).await.unwrap();
    let layer = t.engine.snapshots().layer_dir(&layers(&out)[1]);
    let meta = std::fs::symlink_metadata(layer.join("a.txt")).unwrap();
    assert!(hoist_engine::snapshot::mount::is_whiteout(&meta), "a 0/0 character device");
    assert_eq!(std::fs::read_dir(&layer).unwrap().count(), 1, "and nothing else");
}

/// An [`hoist_engine::export::ExportStream`] into memory.
struct Memory(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Memory {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl hoist_engine::export::ExportStream for Memory {
    fn close(self: Box<Self>) -> std::io::Result<()> {
        Ok(())
    }
}

/// Export `out`'s images with `spec`; the streamed bytes, as tar entries (path → bytes).
async fn export(t: &TestEngine, out: &BuildOutcome, spec: hoist_engine::export::OutputSpec) -> std::collections::BTreeMap<String, Vec<u8>> {
    use std::io::Read;
    let bytes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let registry = hoist_oci::registry::RegistryClient::new(Default::default()).unwrap();
    let target = hoist_engine::export::ExportTarget {
        registry: &registry,
        namespace: "team",
        build_id: "b1",
        stream: Box::new(Memory(bytes.clone())),
        progress: hoist_engine::progress::Progress::discard(),
        first_vertex: 0,
    };
    spec.resolve(&["app:1".to_string()]).unwrap().export(&t.engine, &out.images, target).await.unwrap();
    let bytes = bytes.lock().unwrap().clone();
    let mut entries = std::collections::BTreeMap::new();
    for e in tar::Archive::new(bytes.as_slice()).entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        entries.insert(path, data);
    }
    entries
}

#[tokio::test]
async fn exports_of_a_build_hold_its_layers_byte_for_byte() {
    use hoist_engine::export::{LayerCompression, OutputSpec};
    use hoist_oci::digest::Digest;
    let t = TestEngine::new();
    t.images.add("base:1", &[&[("etc/os", "base")]], &[]);
    let out = t.build(t.request("team", "FROM base:1\nCOPY a.txt /\nRUN write /b.txt b\n", &[("a.txt", "a")])).await.unwrap();
    let diff_ids = layers(&out);

    // docker save format: manifest.json names the tag and every layer is the plain tar of
    // its diff_id.
    let docker = export(&t, &out, OutputSpec::DockerArchive { names: vec![] }).await;
    let manifest: serde_json::Value = serde_json::from_slice(&docker["manifest.json"]).unwrap();
    assert_eq!(manifest[0]["RepoTags"], serde_json::json!(["app:1"]));
    let layer_paths: Vec<String> = serde_json::from_value(manifest[0]["Layers"].clone()).unwrap();
    let got: Vec<Digest> = layer_paths.iter().map(|p| Digest::of(&docker[p])).collect();
    assert_eq!(got, diff_ids);

    // OCI layout: every blob is named by its digest; the manifest's layers gunzip to the
    // diff_ids.
    let gzip = LayerCompression::new(hoist_oci::compress::Compression::Gzip { level: 6 }, false).unwrap();
    let oci = export(&t, &out, OutputSpec::OciArchive { names: vec![], layers: gzip }).await;
    for (path, data) in oci.iter().filter(|(p, _)| p.starts_with("blobs/sha256/") && !p.ends_with('/')) {
        assert_eq!(Digest::of(data).hex(), path.trim_start_matches("blobs/sha256/"), "{path}");
    }
    let index: serde_json::Value = serde_json::from_slice(&oci["index.json"]).unwrap();
    let blob = |d: &serde_json::Value| oci[&format!("blobs/sha256/{}", d.as_str().unwrap().trim_start_matches("sha256:"))].clone();
    let image_manifest: serde_json::Value = serde_json::from_slice(&blob(&index["manifests"][0]["digest"])).unwrap();
    let unzipped: Vec<Digest> = image_manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let data = blob(&l["digest"]);
            if !l["mediaType"].as_str().unwrap().ends_with("+gzip") {
                return Digest::of(&data);
            }
            let mut plain = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(data.as_slice()), &mut plain).unwrap();
            Digest::of(&plain)
        })
        .collect();
    assert_eq!(unzipped, diff_ids);
    let types: Vec<&str> = image_manifest["layers"].as_array().unwrap().iter().map(|l| l["mediaType"].as_str().unwrap()).collect();
    assert!(types[0].ends_with(".tar") && types[1..].iter().all(|t| t.ends_with("+gzip")), "the base keeps its blob: {types:?}");

    // The same export twice is the same bytes.
    assert_eq!(export(&t, &out, OutputSpec::OciArchive { names: vec![], layers: gzip }).await, oci);
}

#[tokio::test]
async fn concurrent_builds_on_one_base_fetch_each_of_its_blobs_once() {
    let t = TestEngine::new();
    t.images.add("base:1", &[&[("a", "1")], &[("b", "2")], &[("c", "3")]], &[]);
    let builds: Vec<_> = (0..3)
        .map(|i| spawn(&t, t.request(&format!("p{i}"), &format!("FROM base:1\nRUN write /x{i} {i}\n"), &[]), CancellationToken::new()))
        .collect();
    for b in builds {
        b.await.unwrap().unwrap();
    }
    let mut fetched = t.images.fetched();
    fetched.sort();
    fetched.dedup();
    assert_eq!((t.images.fetched().len(), fetched.len()), (3, 3), "three layers, each fetched once for three projects");
}

#[tokio::test]
async fn a_build_for_two_platforms_makes_two_images_and_an_index() {
    use hoist_engine::export::{LayerCompression, OutputSpec};
    let t = TestEngine::new();
    let mut req = t.request("team", "FROM scratch\nARG TARGETARCH\nCOPY a.txt /\nLABEL arch=$TARGETARCH\n", &[("a.txt", "a")]);
    req.platforms = vec!["linux/amd64".parse().unwrap(), "linux/arm64".parse().unwrap()];
    let out = t.build(req).await.unwrap();
    let archs: Vec<&str> = out.images.iter().map(|i| i.platform.architecture.as_str()).collect();
    assert_eq!(archs, ["amd64", "arm64"]);
    assert_eq!(out.images[0].diff_ids(), out.images[1].diff_ids(), "the same COPY makes the same layer");
    let labels: Vec<_> = out.images.iter().map(|i| i.config.config.labels.as_ref().and_then(|l| l.get("arch").cloned())).collect();
    assert_eq!(labels, [Some("amd64".to_string()), Some("arm64".to_string())]);
    assert_eq!(out.steps_run, 2, "the COPY is shared between the platforms; each label is its own");
    let spec = OutputSpec::Image { names: vec![], push: false, push_by_digest: false, layers: LayerCompression::default() };
    let registry = hoist_oci::registry::RegistryClient::new(Default::default()).unwrap();
    let target = hoist_engine::export::ExportTarget {
        registry: &registry,
        namespace: "team",
        build_id: "b1",
        stream: Box::new(Memory(Default::default())),
        progress: hoist_engine::progress::Progress::discard(),
        first_vertex: 0,
    };
    let exported = spec.resolve(&[]).unwrap().export(&t.engine, &out.images, target).await.unwrap();
    let index: serde_json::Value = serde_json::from_slice(&t.engine.store().read(&exported.digest.unwrap()).unwrap()).unwrap();
    let platforms: Vec<&str> =
        index["manifests"].as_array().unwrap().iter().map(|m| m["platform"]["architecture"].as_str().unwrap()).collect();
    assert_eq!(platforms, ["amd64", "arm64"]);
}

#[tokio::test]
async fn new_layers_of_the_target_are_compressed_while_the_build_runs_and_other_stages_are_not() {
    let t = TestEngine::new();
    let mut req = t.request(
        "team",
        "FROM scratch AS tools\nRUN write /tool t\nFROM scratch\nCOPY --from=tools /tool /bin/tool\nRUN write /app a\n",
        &[],
    );
    req.eager_blobs =
        Some(hoist_engine::export::LayerCompression::new(hoist_oci::compress::Compression::Gzip { level: 1 }, false).unwrap());
    let out = t.build(req).await.unwrap();
    let image = layers(&out);
    assert_eq!(image.len(), 2);
    // The compression runs behind the build: wait for it (bounded).
    let compressed = |d: &hoist_oci::digest::Digest| t.engine.index().layer_blobs(d).unwrap();
    for _ in 0..200 {
        if image.iter().all(|d| !compressed(d).is_empty()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    for d in &image {
        let blobs = compressed(d);
        assert!(
            blobs.len() == 1 && blobs[0].media_type.ends_with("+gzip"),
            "layer {d} of the image has its gzip blob before any export asked"
        );
    }
    let all = t.engine.snapshots().layers().unwrap();
    let tool = all.iter().map(|(d, _)| d).find(|d| !image.contains(d)).expect("the tools stage's layer");
    assert!(compressed(tool).is_empty(), "a stage outside the image is not compressed");
}

#[tokio::test]
async fn no_cache_reruns_every_step_and_a_record_whose_layer_is_gone_is_a_miss() {
    let t = TestEngine::new();
    let dockerfile = "FROM scratch\nRUN write /a 1\nRUN write /b 2\n";
    let first = t.build(t.request("team", dockerfile, &[])).await.unwrap();
    let mut req = t.request("team", dockerfile, &[]);
    req.no_cache = true;
    let again = t.build(req).await.unwrap();
    assert_eq!((again.steps_run, again.steps_cached), (2, 0));
    assert_eq!(t.executor.runs().len(), 4);
    drop((first, again));
    // The first step's layer disappears (a crash mid-collection): that record is a miss, the
    // step runs again and the build is whole.
    let lost = t.build(t.request("team", dockerfile, &[])).await.unwrap();
    let gone = layers(&lost)[0].clone();
    drop(lost);
    assert!(t.engine.snapshots().remove_layer(&gone).unwrap());
    let before = t.executor.scripts().len();
    let healed = t.build(t.request("team", dockerfile, &[])).await.unwrap();
    assert_eq!(t.executor.scripts()[before], "write /a 1", "the lost layer's step ran again");
    assert!(healed.steps_run >= 1);
    assert!(healed.images[0].diff_ids().iter().all(|d| t.engine.snapshots().has_layer(d)), "every layer of the image is there");
}

#[tokio::test]
async fn the_targets_lower_layers_are_announced_as_they_become_final_and_only_when_new() {
    let t = TestEngine::new();
    let dockerfile =
        "FROM scratch AS tools\nRUN write /tool t\nFROM scratch\nRUN write /one 1\nCOPY --from=tools /tool /bin/tool\nRUN write /app a\n";
    let announced = |req: &mut hoist_engine::BuildRequest| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        req.early_layers = Some(tx);
        rx
    };
    let mut req = t.request("team", dockerfile, &[]);
    let mut rx = announced(&mut req);
    let out = t.build(req).await.unwrap();
    let image = layers(&out);
    assert_eq!(image.len(), 3);
    let mut seen = Vec::new();
    while let Ok(e) = rx.try_recv() {
        assert_eq!(e.platform, out.images[0].platform);
        seen.push(e.diff_ids);
    }
    // Each announcement is the image's bottom, one layer more each time; the tools
    // stage's layer (not in the image) is never announced.
    assert_eq!(seen, vec![image[..1].to_vec(), image[..2].to_vec(), image.to_vec()]);

    // A rebuild from the cache announces nothing: the engine that loaded the image has it.
    let mut req = t.request("team", dockerfile, &[]);
    let mut rx = announced(&mut req);
    t.build(req).await.unwrap();
    assert!(rx.try_recv().is_err(), "cached steps are not announced");
}
