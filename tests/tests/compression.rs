//! End-to-end: layer compression of the exporters (issue 6). `--output ...,compression=zstd|
//! gzip|uncompressed,compression-level=N,force-compression=true` on OCI archives and pushes:
//! media types, blob digests and diff_ids of every layer, base layers keeping their original
//! blobs unless forced, deterministic gzip at each level, clear errors for bad values, and
//! the target image's new layers compressed while later steps still run.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::Command;

use common::*;

const OCI_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const OCI_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// busybox + a COPY layer + a RUN layer with ~600 KB of compressible output.
fn project() -> tempfile::TempDir {
    let df = format!("FROM {}\nCOPY data.txt /data/\nRUN seq 1 100000 > /data/seq.txt && echo ran > /data/ran\n", busybox());
    context(&[("Dockerfile", df.as_str()), ("data.txt", "some data to compress\n")])
}

/// Build `ctx` into an OCI archive at `dest` with extra output options `opts` (clamped to a
/// fixed SOURCE_DATE_EPOCH so that separate builders make identical layers).
fn build_oci(h: &Hoist, ctx: &Path, dest: &Path, opts: &str) -> OciArchive {
    let output = format!("type=oci,dest={}{}{opts}", dest.display(), if opts.is_empty() { "" } else { "," });
    h.build_ok(&["--build-arg", "SOURCE_DATE_EPOCH=1700000000", "-o", &output, ctx.to_str().unwrap()]);
    OciArchive::read(dest)
}

/// One layer of an image: its descriptor, its diff_id from the config and its blob.
struct Layer {
    media_type: String,
    digest: String,
    size: u64,
    diff_id: String,
    blob: Vec<u8>,
}

/// The layers of a manifest with the config's diff_ids and the blobs `fetch` returns.
fn layers(manifest: &serde_json::Value, config: &serde_json::Value, fetch: impl Fn(&str) -> Vec<u8>) -> Vec<Layer> {
    let descs = manifest["layers"].as_array().expect("manifest layers");
    let diff_ids = config["rootfs"]["diff_ids"].as_array().expect("config diff_ids");
    assert_eq!(descs.len(), diff_ids.len(), "one diff_id per layer: {manifest} {config}");
    descs
        .iter()
        .zip(diff_ids)
        .map(|(d, id)| {
            let digest = d["digest"].as_str().unwrap().to_string();
            Layer {
                media_type: d["mediaType"].as_str().unwrap().to_string(),
                size: d["size"].as_u64().unwrap(),
                diff_id: id.as_str().unwrap().to_string(),
                blob: fetch(&digest),
                digest,
            }
        })
        .collect()
}

fn archive_layers(a: &OciArchive) -> Vec<Layer> {
    layers(&a.manifest(), &a.config(), |d| a.blob(d).to_vec())
}

/// Check a layer: the blob has the advertised digest and size, is compressed as its media
/// type says, and decompresses to the tar of its diff_id.
fn check_layer(l: &Layer, want_media_type: &str) {
    assert_eq!(l.media_type, want_media_type, "layer {}", l.digest);
    assert_eq!(sha256_digest(&l.blob), l.digest, "the blob's bytes have the advertised digest");
    assert_eq!(l.blob.len() as u64, l.size, "layer {}: size", l.digest);
    let tar = match want_media_type {
        OCI_ZSTD => zstd::decode_all(l.blob.as_slice()).unwrap_or_else(|e| panic!("layer {} is not zstd: {e}", l.digest)),
        OCI_GZIP => {
            assert!(l.blob.starts_with(&[0x1f, 0x8b]), "layer {} has no gzip magic", l.digest);
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(l.blob.as_slice())
                .read_to_end(&mut out)
                .unwrap_or_else(|e| panic!("layer {}: bad gzip: {e}", l.digest));
            out
        }
        _ => l.blob.clone(),
    };
    assert_eq!(sha256_digest(&tar), l.diff_id, "layer {} decompresses to its diff_id", l.digest);
    let mut entries = tar::Archive::new(tar.as_slice());
    assert!(entries.entries().unwrap().all(|e| e.is_ok()), "layer {} is a valid tar", l.digest);
}

/// GET `path` from the lab registry (OCI manifests accepted).
fn registry_get(path: &str) -> Vec<u8> {
    let accept = "Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";
    let out = Command::new("curl").args(["-fsSL", "-H", accept, &format!("http://{}/v2/{path}", registry())]).output().unwrap();
    assert!(out.status.success(), "GET /v2/{path}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn registry_json(path: &str) -> serde_json::Value {
    serde_json::from_slice(&registry_get(path)).unwrap_or_else(|e| panic!("/v2/{path} is not JSON: {e}"))
}

/// (blob digest, diff_id) of the lab's busybox layer for this machine's architecture.
fn busybox_base_layer() -> (String, String) {
    let arch = if cfg!(target_arch = "aarch64") { "arm64" } else { "amd64" };
    let index = registry_json("library/busybox/manifests/latest");
    let entry =
        index["manifests"].as_array().unwrap().iter().find(|m| m["platform"]["architecture"] == arch).expect("busybox for this arch");
    let manifest = registry_json(&format!("library/busybox/manifests/{}", entry["digest"].as_str().unwrap()));
    let config = registry_json(&format!("library/busybox/blobs/{}", manifest["config"]["digest"].as_str().unwrap()));
    (manifest["layers"][0]["digest"].as_str().unwrap().to_string(), config["rootfs"]["diff_ids"][0].as_str().unwrap().to_string())
}

#[test]
fn zstd_archive_keeps_the_base_blob_unless_compression_is_forced() {
    if !lab_available() {
        return;
    }
    let (h, ctx) = (Hoist::new(), project());
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let (base_digest, base_diff_id) = busybox_base_layer();

    let plain = archive_layers(&build_oci(&h, ctx.path(), &out.path().join("zstd.tar"), "compression=zstd"));
    assert_eq!(plain.len(), 3, "busybox + COPY + RUN");
    assert_eq!(plain[0].digest, base_digest, "the base layer keeps the blob the registry has");
    assert_eq!(plain[0].diff_id, base_diff_id);
    check_layer(&plain[0], OCI_GZIP);
    for l in &plain[1..] {
        check_layer(l, OCI_ZSTD);
    }

    let forced = archive_layers(&build_oci(&h, ctx.path(), &out.path().join("forced.tar"), "compression=zstd,force-compression=true"));
    for l in &forced {
        check_layer(l, OCI_ZSTD);
    }
    assert_ne!(forced[0].digest, base_digest, "force-compression re-compresses the base layer");
    assert_eq!(forced[0].diff_id, base_diff_id, "re-compressing does not change the content");
    for (a, b) in plain[1..].iter().zip(&forced[1..]) {
        assert_eq!(a.digest, b.digest, "new layers reuse their zstd blob");
    }
    // skopeo reads the layout too.
    let skopeo =
        Command::new("skopeo").args(["inspect", &format!("oci-archive:{}", out.path().join("forced.tar").display())]).output().unwrap();
    assert!(skopeo.status.success(), "skopeo rejects the zstd archive: {}", String::from_utf8_lossy(&skopeo.stderr));
}

#[test]
fn uncompressed_layers_are_plain_tars_whose_digest_is_the_diff_id() {
    if !lab_available() {
        return;
    }
    let (h, ctx) = (Hoist::new(), project());
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let layers = archive_layers(&build_oci(&h, ctx.path(), &out.path().join("plain.tar"), "compression=uncompressed"));
    assert_eq!(layers[0].media_type, OCI_GZIP, "the base layer keeps its original blob");
    for l in &layers[1..] {
        check_layer(l, OCI_TAR);
        assert_eq!(l.digest, l.diff_id);
    }
}

#[test]
fn gzip_levels_apply_and_give_the_same_blobs_on_every_builder() {
    if !lab_available() {
        return;
    }
    let ctx = project();
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    // Three separate builders, so that every blob is compressed anew.
    let build = |name: &str, level: u32| {
        let path = out.path().join(format!("{name}.tar"));
        archive_layers(&build_oci(&Hoist::new(), ctx.path(), &path, &format!("compression=gzip,compression-level={level}")))
    };
    let (fast, best, fast_again) = (build("fast", 1), build("best", 9), build("fast-again", 1));
    for l in fast.iter().chain(&best).chain(&fast_again) {
        check_layer(l, OCI_GZIP);
    }
    let (run_fast, run_best) = (&fast[2], &best[2]);
    assert_eq!(run_fast.diff_id, run_best.diff_id, "SOURCE_DATE_EPOCH makes the layers identical");
    assert_ne!(run_fast.digest, run_best.digest, "the level changes the compressed bytes");
    assert!(run_best.size < run_fast.size, "level 9 ({} bytes) compresses better than level 1 ({} bytes)", run_best.size, run_fast.size);
    let digests = |ls: &[Layer]| ls.iter().map(|l| l.digest.clone()).collect::<Vec<_>>();
    assert_eq!(digests(&fast), digests(&fast_again), "the same layers at the same level give the same blobs");
}

#[test]
fn push_with_zstd_puts_zstd_layers_in_the_registry() {
    if !lab_available() {
        return;
    }
    let (h, ctx) = (Hoist::new(), project());
    let repo = format!("e2e/{}", unique("zstd"));
    let name = format!("{}/{repo}:1", registry());
    h.build_ok(&["-o", &format!("type=image,name={name},push=true,compression=zstd"), ctx.path().to_str().unwrap()]);

    let manifest = registry_json(&format!("{repo}/manifests/1"));
    assert_eq!(manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json", "{manifest}");
    let config = registry_json(&format!("{repo}/blobs/{}", manifest["config"]["digest"].as_str().unwrap()));
    let pushed = layers(&manifest, &config, |d| registry_get(&format!("{repo}/blobs/{d}")));
    check_layer(&pushed[0], OCI_GZIP);
    assert_eq!(pushed[0].digest, busybox_base_layer().0);
    for l in &pushed[1..] {
        check_layer(l, OCI_ZSTD);
    }
    // skopeo sees the same layers.
    let skopeo = Command::new("skopeo").args(["inspect", "--tls-verify=false", &format!("docker://{name}")]).output().unwrap();
    assert!(skopeo.status.success(), "skopeo inspect {name}: {}", String::from_utf8_lossy(&skopeo.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&skopeo.stdout).unwrap();
    let seen: Vec<&str> = seen["Layers"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    assert_eq!(seen, pushed.iter().map(|l| l.digest.as_str()).collect::<Vec<_>>());
}

#[test]
fn bad_compression_options_are_clear_errors_and_the_builder_keeps_serving() {
    if !lab_available() {
        return;
    }
    let (h, ctx) = (Hoist::new(), project());
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let dest = out.path().join("bad.tar");
    let cases: [(&str, &[&str]); 4] = [
        ("compression=lz4", &["compression", "lz4", "gzip, zstd or uncompressed"]),
        ("compression=gzip,compression-level=99", &["compression-level", "99", "0..=9"]),
        ("compression=zstd,compression-level=fast", &["compression-level", "fast", "zstd"]),
        ("compression=zstd,force-compression=maybe", &["force-compression", "maybe"]),
    ];
    // The client refuses them before it sends anything; the builder (started by a good
    // build first) must not notice them.
    let first = build_oci(&h, ctx.path(), &out.path().join("first.tar"), "");
    assert_eq!(archive_layers(&first).len(), 3);
    let pid = h.daemon_pid();
    assert!(pid.is_some(), "the embedded builder is running");
    for (opts, needles) in cases {
        let o = h.build(&["-o", &format!("type=oci,dest={},{opts}", dest.display()), ctx.path().to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{opts} must fail:\n{stderr}");
        for n in needles {
            assert!(stderr.contains(n), "the error for {opts} names {n:?}:\n{stderr}");
        }
        assert!(!stderr.contains("RUN seq"), "{opts} is refused before the build runs:\n{stderr}");
        assert_eq!(h.daemon_pid(), pid, "the builder survived {opts}");
    }
    // An ordinary build on the same builder still works.
    let ok = build_oci(&h, ctx.path(), &out.path().join("ok.tar"), "");
    assert_eq!(archive_layers(&ok).len(), 3);
    assert_eq!(h.daemon_pid(), pid, "the same builder served it");
}

/// Sizes of the blobs in the builder's content store under `root`.
fn store_blob_sizes(root: &Path) -> Vec<u64> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() && p.parent().is_some_and(|d| d.ends_with("content/blobs/sha256")) => {
                    out.extend(e.metadata().ok().map(|m| m.len()));
                }
                _ => {}
            }
        }
    }
    out
}

#[test]
fn a_target_layer_is_compressed_while_later_steps_run_and_no_other_stage_is() {
    if !lab_available() {
        return;
    }
    // The target's first RUN makes a ~3 MB layer of random bytes; a later RUN sleeps. The
    // side stage's ~1.7 MB layer is not part of the image (only a small file is copied).
    let df = format!(
        "FROM {bb} AS side\nRUN head -c 1700000 /dev/urandom > /noise && echo hi > /small\n\n\
         FROM {bb}\nRUN head -c 3000000 /dev/urandom > /big\nCOPY --from=side /small /small\nRUN sleep 4 && echo done > /done\n",
        bb = busybox()
    );
    let ctx = context(&[("Dockerfile", df.as_str())]);
    let h = Hoist::new();
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let dest = out.path().join("img.tar");
    let output = format!("type=oci,dest={}", dest.display());
    let started = std::time::Instant::now();
    let mut child = h.cmd().args(["build", "--progress=plain", "-o", &output, ctx.path().to_str().unwrap()]).spawn().unwrap();
    let (mut big_seen, mut side_seen) = (None, false);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        let sizes = store_blob_sizes(h.root.path());
        if big_seen.is_none() && sizes.iter().any(|&s| (2_900_000..3_200_000).contains(&s)) {
            big_seen = Some(started.elapsed());
        }
        side_seen |= sizes.iter().any(|&s| (1_600_000..1_900_000).contains(&s));
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let ended = started.elapsed();
    assert!(status.success());
    let big_seen = big_seen.expect("the 3 MB layer's blob never showed up in the store");
    assert!(
        ended.saturating_sub(big_seen) > std::time::Duration::from_secs(2),
        "the 3 MB layer's blob appeared at {big_seen:?}, the build ended at {ended:?}: it was compressed after the build, not while `RUN sleep 4` ran"
    );
    let sizes = store_blob_sizes(h.root.path());
    assert!(!side_seen && !sizes.iter().any(|&s| (1_600_000..1_900_000).contains(&s)), "the side stage's layer was compressed: {sizes:?}");
    let layers = archive_layers(&OciArchive::read(&dest));
    assert!(layers.iter().any(|l| (2_900_000..3_200_000).contains(&l.size)), "the archive holds the early blob");
}
