//! Nodes of a fleet on fakes: engines with their own state roots sharing one object store
//! (`object_store`'s in-memory one, behind a wrapper that records, delays and fails
//! requests). What a node built is in the shared tier for the others, entries only after
//! their blobs, lookups in one parallel batch, and a failing store costs a warning, not a
//! build. The real store (S3 on loopback, a directory) is tested end to end in hoist-cli.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::TryStreamExt;
use hoist_engine::progress::{Event, Progress};
use hoist_engine::shared::SharedStore;
use hoist_engine::testing::TestEngine;
use hoist_engine::{BuildOutcome, LayerNeeds};
use hoist_oci::compress::Compression;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt, PutMultipartOptions,
    PutOptions, PutPayload, PutResult,
};
use tokio_util::sync::CancellationToken;

/// An in-memory store that logs writes, can hold every read for a while (to see how many
/// run at once), and can fail.
#[derive(Debug, Default)]
struct Watched {
    inner: InMemory,
    /// Paths written, in order.
    puts: Mutex<Vec<String>>,
    /// Every request fails.
    down: AtomicBool,
    /// Blob uploads fail (entries would still go through).
    blobs_fail: AtomicBool,
    /// Every request, failed or not.
    requests: AtomicUsize,
    get_delay: Mutex<Duration>,
    reading: AtomicUsize,
    most_reading: AtomicUsize,
}

impl std::fmt::Display for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Watched")
    }
}

impl Watched {
    fn check(&self, path: &Path) -> object_store::Result<()> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let fail = self.down.load(Ordering::Relaxed) || (self.blobs_fail.load(Ordering::Relaxed) && path.as_ref().contains("/cas/"));
        if fail {
            return Err(object_store::Error::Generic { store: "watched", source: "connection refused".into() });
        }
        Ok(())
    }

    fn entries(&self) -> Vec<String> {
        self.puts.lock().unwrap().iter().filter(|p| p.contains("/ac/")).cloned().collect()
    }
}

#[async_trait]
impl ObjectStore for Watched {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> object_store::Result<PutResult> {
        self.check(location)?;
        let r = self.inner.put_opts(location, payload, opts).await?;
        self.puts.lock().unwrap().push(location.to_string());
        Ok(r)
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.check(location)?;
        self.puts.lock().unwrap().push(location.to_string());
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.check(location)?;
        let now = self.reading.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_reading.fetch_max(now, Ordering::SeqCst);
        let delay = *self.get_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        let r = self.inner.get_opts(location, options).await;
        self.reading.fetch_sub(1, Ordering::SeqCst);
        r
    }

    fn delete_stream(&self, locations: BoxStream<'static, object_store::Result<Path>>) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// Two nodes (engines with their own roots) sharing `store`; the second node's clock is
/// an hour ahead, so an image that only its own records would date differs.
fn fleet(store: &Arc<Watched>) -> (TestEngine, TestEngine) {
    let node = || TestEngine::with_shared(Some(SharedStore::new(store.clone(), "team", "memory://team")));
    let (a, b) = (node(), node());
    b.clock.advance(3600);
    (a, b)
}

const DOCKERFILE: &str = "FROM scratch\nRUN write /one 1\nCOPY a.txt /\nRUN write /two 2\nENV X=1\nRUN write /three 3\n";

async fn build(t: &TestEngine, dockerfile: &str) -> (BuildOutcome, Vec<String>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let req = t.request("web", dockerfile, &[("a.txt", "hello")]);
    let out = t.engine.build(req, Progress::new(tx), CancellationToken::new()).await.expect("the build");
    let mut warnings = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        if let Event::Warning(w) = ev {
            warnings.push(w);
        }
    }
    (out, warnings)
}

#[tokio::test]
async fn a_teammate_on_another_node_takes_every_step_from_the_shared_tier_and_gets_the_same_image() {
    let store = Arc::new(Watched::default());
    let (a, b) = fleet(&store);
    let (alice, _) = build(&a, DOCKERFILE).await;
    assert_eq!((alice.steps_run, alice.steps_cached), (4, 0));
    a.engine.flush_shared().await;
    assert_eq!(store.entries().len(), 4, "one entry per step: {:?}", store.puts.lock().unwrap());

    let (bob, warnings) = build(&b, DOCKERFILE).await;
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!((bob.steps_run, bob.steps_cached, bob.containers_run), (0, 4, 0));
    assert!(b.executor.runs().is_empty(), "node B ran no container");
    assert_eq!(bob.images[0].config_digest, alice.images[0].config_digest, "the same image id on both nodes");
    for d in bob.images[0].diff_ids() {
        assert!(b.engine.snapshots().has_layer(d), "layer {d} is on node B now");
    }
    // Node B recorded the hits: a rebuild there asks the store nothing.
    let before = store.requests.load(Ordering::Relaxed);
    let (again, _) = build(&b, DOCKERFILE).await;
    assert_eq!((again.steps_cached, again.images[0].config_digest.clone()), (4, alice.images[0].config_digest.clone()));
    assert_eq!(store.requests.load(Ordering::Relaxed), before, "local hits need no store");

    // A changed file: B runs what follows it and takes what precedes it from the store.
    let changed = DOCKERFILE.replace("write /two 2", "write /two 22");
    let (b2, _) = build(&b, &changed).await;
    assert_eq!((b2.steps_run, b2.steps_cached), (2, 2));
    b.engine.flush_shared().await;
    let (a2, _) = build(&a, &changed).await;
    assert_eq!((a2.steps_run, a2.steps_cached), (0, 4), "and A takes B's new steps");
    assert_eq!(a2.images[0].config_digest, b2.images[0].config_digest);
}

#[tokio::test]
async fn the_lookups_of_a_build_go_out_as_one_parallel_batch() {
    let store = Arc::new(Watched::default());
    let (a, b) = fleet(&store);
    build(&a, DOCKERFILE).await;
    a.engine.flush_shared().await;
    *store.get_delay.lock().unwrap() = Duration::from_millis(30);
    let tier = b.engine.shared().expect("a shared tier");
    let (bob, _) = build(&b, DOCKERFILE).await;
    assert_eq!(bob.steps_cached, 4);
    assert_eq!(tier.requests.entry_gets.load(Ordering::Relaxed), 4, "one request per step, no more");
    assert!(store.most_reading.load(Ordering::SeqCst) >= 4, "the four entries were read side by side");
}

#[tokio::test]
async fn an_entry_whose_blob_is_gone_counts_as_a_miss() {
    let store = Arc::new(Watched::default());
    let (a, b) = fleet(&store);
    build(&a, DOCKERFILE).await;
    a.engine.flush_shared().await;
    let blobs: Vec<ObjectMeta> = store.list(Some(&Path::from("team/cas"))).try_collect().await.unwrap();
    assert_eq!(blobs.len(), 4, "one blob per layer");
    store.delete(&blobs[0].location).await.unwrap();
    let (bob, warnings) = build(&b, DOCKERFILE).await;
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(bob.steps_run >= 1, "the step whose blob went ran again");
    assert_eq!(bob.steps_run + bob.steps_cached, 4);
}

#[tokio::test]
async fn entries_are_written_only_after_their_blobs() {
    let store = Arc::new(Watched::default());
    let (a, _b) = fleet(&store);
    store.blobs_fail.store(true, Ordering::Relaxed);
    let (first, _) = build(&a, "FROM scratch\nRUN write /x 1\n").await;
    a.engine.flush_shared().await;
    assert_eq!(first.steps_run, 1);
    assert!(store.entries().is_empty(), "a blob that did not go up leaves no entry: {:?}", store.puts.lock().unwrap());

    store.blobs_fail.store(false, Ordering::Relaxed);
    let (a, _b) = fleet(&store);
    build(&a, DOCKERFILE).await;
    a.engine.flush_shared().await;
    let puts = store.puts.lock().unwrap().clone();
    for (i, entry) in puts.iter().enumerate().filter(|(_, p)| p.contains("/ac/")) {
        let path = Path::from(entry.as_str());
        let bytes = store.inner.get(&path).await.unwrap().bytes().await.unwrap();
        let e: hoist_engine::shared::Entry = serde_json::from_slice(&bytes).unwrap();
        if let Some(blob) = e.blob {
            let at = puts.iter().position(|p| p.ends_with(blob.digest.hex())).expect("the blob was written");
            assert!(at < i, "blob {} written after its entry {entry}", blob.digest);
        }
    }
}

#[tokio::test]
async fn an_unreachable_store_costs_one_warning_and_the_build_goes_on_with_the_local_tier() {
    let store = Arc::new(Watched::default());
    let (a, _b) = fleet(&store);
    store.down.store(true, Ordering::Relaxed);
    let (first, warnings) = build(&a, DOCKERFILE).await;
    assert_eq!(first.steps_run, 4);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("memory://team") && warnings[0].contains("this node's cache"), "{}", warnings[0]);
    a.engine.flush_shared().await;
    // The store is left alone for a while: the next build asks it nothing and says nothing.
    let before = store.requests.load(Ordering::Relaxed);
    let (second, warnings) = build(&a, &DOCKERFILE.replace("three 3", "three 4")).await;
    assert_eq!((second.steps_cached, second.steps_run), (3, 1), "the local tier kept everything");
    assert!(warnings.is_empty(), "{warnings:?}");
    a.engine.flush_shared().await;
    assert_eq!(store.requests.load(Ordering::Relaxed), before);
}

#[tokio::test]
async fn the_first_result_of_a_key_stays_so_every_later_reader_gets_one_image() {
    let store = Arc::new(Watched::default());
    let (a, b) = fleet(&store);
    let (alice, _) = build(&a, DOCKERFILE).await;
    a.engine.flush_shared().await;
    // B runs the same steps again (--no-cache), an hour later by its clock: its layers and
    // times differ, and must not replace A's.
    let mut req = b.request("web", DOCKERFILE, &[("a.txt", "hello")]);
    req.no_cache = true;
    let bob = b.build(req).await.unwrap();
    assert_ne!(bob.images[0].config_digest, alice.images[0].config_digest);
    b.engine.flush_shared().await;
    let (c, _) = fleet(&store);
    let (carol, _) = build(&c, DOCKERFILE).await;
    assert_eq!(carol.steps_cached, 4);
    assert_eq!(carol.images[0].config_digest, alice.images[0].config_digest, "the first result stayed");

    // Two nodes racing on new steps both succeed; whatever they wrote, later readers agree.
    let other = DOCKERFILE.replace("write /one 1", "write /one 9");
    let (ra, rb) = tokio::join!(build(&a, &other), build(&b, &other));
    assert_eq!((ra.0.steps_run, rb.0.steps_run), (4, 4), "neither had written yet");
    a.engine.flush_shared().await;
    b.engine.flush_shared().await;
    let (c, d) = fleet(&store);
    let (third, _) = build(&c, &other).await;
    let (fourth, _) = build(&d, &other).await;
    assert_eq!((third.steps_cached, fourth.steps_cached), (4, 4));
    assert_eq!(third.images[0].config_digest, fourth.images[0].config_digest, "one image for everyone after the race");
}

#[tokio::test]
async fn a_base_image_one_node_pulled_comes_to_the_others_from_the_shared_tier() {
    let store = Arc::new(Watched::default());
    let registry = Arc::new(hoist_engine::testing::MemoryImages::new());
    registry.add("base:1", &[&[("etc/os", "base")], &[("etc/more", "more")]], &[]);
    let node = || TestEngine::with_shared_images(Some(SharedStore::new(store.clone(), "team", "memory://team")), registry.clone());
    let (a, b) = (node(), node());
    let dockerfile = "FROM base:1\nRUN cat /etc/os; write /x 1\n";
    let (first, _) = build(&a, dockerfile).await;
    assert_eq!(registry.fetched().len(), 2, "node A pulled both layers");
    a.engine.flush_shared().await;
    let (second, _) = build(&b, dockerfile).await;
    assert_eq!(registry.fetched().len(), 2, "node B pulled nothing from the registry");
    assert_eq!(second.images[0].config_digest, first.images[0].config_digest);
    for d in second.images[0].diff_ids() {
        assert!(b.engine.snapshots().has_layer(d), "layer {d} is on node B");
    }
}

/// Regression: a step that waits for another stage (`COPY --from`) was keyed only when the
/// solver reached it, and never looked up in the shared tier, so every other node ran it.
#[tokio::test]
async fn a_step_that_waits_for_another_stage_is_looked_up_too() {
    let store = Arc::new(Watched::default());
    let (a, b) = fleet(&store);
    let dockerfile = "FROM scratch AS build\nRUN write /out built\nFROM scratch\nCOPY --from=build /out /app/out\nRUN write /two 2\n";
    let (alice, _) = build(&a, dockerfile).await;
    assert_eq!(alice.steps_run, 3);
    a.engine.flush_shared().await;
    let (bob, _) = build(&b, dockerfile).await;
    assert_eq!((bob.steps_run, bob.steps_cached), (0, 3));
    assert_eq!(bob.images[0].config_digest, alice.images[0].config_digest);
}

/// A build of project "web" whose outputs need only the result's descriptors (a push).
fn descriptors(t: &TestEngine, dockerfile: &str) -> hoist_engine::BuildRequest {
    let mut req = t.request("web", dockerfile, &[("a.txt", "hello")]);
    req.needs = LayerNeeds::Descriptors;
    req
}

/// Issue 13: a node takes a hit's layer only as far as the build's outputs need it. A
/// pushed result needs descriptors: nothing comes down (no blob, no base layer) and nothing
/// is extracted; a step run on top needs its parents' files, fetched then; an output that
/// reads files fetches them itself; a reset forgets layers known only by their blobs.
#[tokio::test]
async fn a_hit_is_fetched_only_as_far_as_its_outputs_need() {
    let store = Arc::new(Watched::default());
    let registry = Arc::new(hoist_engine::testing::MemoryImages::new());
    registry.add("base:1", &[&[("etc/os", "base")], &[("etc/more", "more")]], &[]);
    let node = || TestEngine::with_shared_images(Some(SharedStore::new(store.clone(), "team", "memory://team")), registry.clone());
    let (a, b) = (node(), node());
    let dockerfile = "FROM base:1\nRUN write /one 1\nCOPY a.txt /\n";
    let (alice, _) = build(&a, dockerfile).await;
    a.engine.flush_shared().await;
    assert_eq!(registry.fetched().len(), 2, "node A pulled the base");

    let tier = b.engine.shared().expect("a shared tier").clone();
    let bob = b.build(descriptors(&b, dockerfile)).await.unwrap();
    assert_eq!((bob.steps_run, bob.steps_cached), (0, 2));
    assert_eq!(bob.images[0].config_digest, alice.images[0].config_digest);
    // The base's fetch starts while the first step is looked up and stops when it is found
    // (here the in-memory store may have served some of it by then).
    let gets = tier.requests.blob_gets.load(Ordering::Relaxed);
    assert!(gets <= 2, "at most the base's two blobs came down: {gets}");
    assert_eq!(registry.fetched().len(), 2, "nothing from the base's registry");
    for d in bob.images[0].diff_ids() {
        assert!(b.engine.layer_at_hand(d), "layer {d} is known to be here or in the shared tier");
    }
    for d in &bob.images[0].diff_ids()[2..] {
        assert!(!b.engine.snapshots().has_layer(d), "the hit's layer {d} was not fetched");
    }
    // A push's manifest names the blobs the store has (no re-compression, no download).
    let set = b.engine.export_images(&bob.images, Compression::default(), false).await.unwrap();
    let want = a.engine.export_images(&alice.images, Compression::default(), false).await.unwrap();
    assert_eq!(set.images[0].manifest_digest, want.images[0].manifest_digest);
    assert_eq!(tier.requests.blob_gets.load(Ordering::Relaxed), gets);

    // A step on top runs on its parents' files: they come down now, the base's from the
    // shared tier too.
    let on_top = b.build(descriptors(&b, &format!("{dockerfile}RUN cat /etc/os; cat /a.txt; cat /one; write /two 2\n"))).await.unwrap();
    assert_eq!((on_top.steps_run, on_top.steps_cached), (1, 2));
    for d in on_top.images[0].diff_ids() {
        assert!(b.engine.snapshots().has_layer(d), "layer {d} is on node B now");
    }
    assert_eq!(registry.fetched().len(), 2, "the base came from the shared tier");
    let gets_after = tier.requests.blob_gets.load(Ordering::Relaxed);
    // The four layers under the step, each once, and at most a stopped prefetch of the base.
    assert!(gets_after - gets <= 6, "each layer under the step, once: {gets} then {gets_after}");

    // A reset forgets every layer of the project, those known only by their blobs too.
    let c = node();
    let carol = c.build(descriptors(&c, dockerfile)).await.unwrap();
    let layers = carol.images[0].diff_ids().to_vec();
    assert!(layers.iter().all(|d| !c.engine.index().layer_blobs(d).unwrap().is_empty()));
    // An output that reads files gets them.
    let made = c.engine.ensure_output_layers(&layers).await.unwrap();
    assert!((2..=4).contains(&made), "the hit's two layers at least (the base's may have come with the prefetch): {made}");
    assert!(layers.iter().all(|d| c.engine.snapshots().has_layer(d)));
    drop(carol);
    c.engine.reset("web").unwrap();
    for d in &layers {
        assert!(!c.engine.snapshots().has_layer(d) && c.engine.index().layer_blobs(d).unwrap().is_empty(), "{d} is gone");
    }
    let again = c.build(descriptors(&c, dockerfile)).await.unwrap();
    assert!(again.images[0].diff_ids()[2..].iter().all(|d| !c.engine.snapshots().has_layer(d)), "the hit's layers are blobs elsewhere");
    let before = c.engine.index().blob_layers().unwrap().len();
    drop(again);
    c.engine.reset("web").unwrap();
    assert!(c.engine.index().blob_layers().unwrap().len() < before, "blob-only layers were swept");
}
