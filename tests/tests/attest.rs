//! `--provenance`/`--attest` and `--annotation` against the lab registry: what a push leaves
//! there, read back with plain HTTP as any registry client would.

mod common;

use std::process::Command;

use common::*;

const ACCEPT: &str = "Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
                      application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// GET `/v2/{path}` from the lab registry: the bytes.
fn get(path: &str) -> Vec<u8> {
    let out = Command::new("curl").args(["-fsSL", "-H", ACCEPT, &format!("http://{}/v2/{path}", registry())]).output().unwrap();
    assert!(out.status.success(), "GET /v2/{path}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn json(path: &str) -> serde_json::Value {
    serde_json::from_slice(&get(path)).unwrap_or_else(|e| panic!("/v2/{path} is not JSON: {e}"))
}

/// The repository of `tag` (`127.0.0.1:5000/repo:1` → `repo`).
fn repo_of(tag: &str) -> String {
    tag.split_once('/').unwrap().1.rsplit_once(':').unwrap().0.to_string()
}

/// The digest of the lab busybox's manifest for `arch`.
fn busybox_digest(arch: &str) -> String {
    let index = json("library/busybox/manifests/latest");
    let m = index["manifests"].as_array().unwrap().iter().find(|m| m["platform"]["architecture"] == arch).expect("busybox for arch");
    m["digest"].as_str().unwrap().to_string()
}

fn host_arch() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "arm64"
    } else {
        "amd64"
    }
}

/// `hoist build ARGS` with hoist's defaults (the harness turns the default provenance off
/// for the other tests).
fn build(h: &Hoist, args: &[&str]) -> std::process::Output {
    let mut c = h.cmd();
    c.env_remove(NO_DEFAULT_ATTESTATIONS).arg("build").arg("--progress=plain").args(args);
    c.output().unwrap()
}

/// [`build`], which must succeed; its stderr.
fn build_ok(h: &Hoist, args: &[&str]) -> String {
    let out = build(h, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "hoist build {args:?} failed:\n{stderr}");
    stderr
}

/// `containerimage.digest` of a build's `--metadata-file`.
fn pushed_digest(h: &Hoist, args: &[&str]) -> String {
    let dir = tempfile::tempdir_in(test_tmp()).unwrap();
    let meta = dir.path().join("meta.json");
    let mut all: Vec<&str> = args.to_vec();
    all.splice(all.len() - 1..all.len() - 1, ["--metadata-file", meta.to_str().unwrap()]);
    build_ok(h, &all);
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    m["containerimage.digest"].as_str().expect("containerimage.digest").to_string()
}

/// A push carries, per platform, a provenance attestation stored as buildx stores it: the
/// tag names an index holding the image manifest and an attestation manifest about it,
/// whose one layer is an in-toto statement naming the image manifest as its subject and the
/// base image (with its digest) as a material. Build arg values stay out (mode=min). The
/// attestation does not change the image manifest (`--provenance=false` pushes that very
/// manifest), and an identical build pushes the identical index.
#[test]
fn a_push_carries_a_deterministic_provenance_attestation() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = context(&[("Dockerfile", &format!("FROM {}\nARG TOKEN\nCOPY app.txt /app.txt\n", busybox())), ("app.txt", "hello\n")]);
    let dir = ctx.path().to_str().unwrap();
    let tag = format!("{}/{}:1", registry(), unique("attest"));
    let repo = repo_of(&tag);
    let top = pushed_digest(&h, &["-t", &tag, "--push", "--build-arg", "TOKEN=s3cret-value", dir]);

    let index_bytes = get(&format!("{repo}/manifests/1"));
    assert_eq!(sha256_digest(&index_bytes), top, "containerimage.digest is the pushed index");
    let index: serde_json::Value = serde_json::from_slice(&index_bytes).unwrap();
    assert_eq!(index["mediaType"], "application/vnd.oci.image.index.v1+json", "{index}");
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "the image and its attestation: {index}");
    let image = &entries[0];
    assert_eq!(image["platform"]["architecture"], host_arch());
    let image_digest = image["digest"].as_str().unwrap();
    let att = &entries[1];
    assert_eq!(att["platform"], serde_json::json!({"architecture": "unknown", "os": "unknown"}), "{index}");
    assert_eq!(att["annotations"]["vnd.docker.reference.type"], "attestation-manifest");
    assert_eq!(att["annotations"]["vnd.docker.reference.digest"], image_digest);

    let att_manifest = json(&format!("{repo}/manifests/{}", att["digest"].as_str().unwrap()));
    let layer = &att_manifest["layers"][0];
    assert_eq!(layer["mediaType"], "application/vnd.in-toto+json", "{att_manifest}");
    assert_eq!(layer["annotations"]["in-toto.io/predicate-type"], "https://slsa.dev/provenance/v0.2");
    let config = json(&format!("{repo}/blobs/{}", att_manifest["config"]["digest"].as_str().unwrap()));
    assert_eq!((config["architecture"].as_str(), config["os"].as_str()), (Some("unknown"), Some("unknown")));
    let statement_bytes = get(&format!("{repo}/blobs/{}", layer["digest"].as_str().unwrap()));
    let statement: serde_json::Value = serde_json::from_slice(&statement_bytes).unwrap();
    assert_eq!(statement["predicateType"], "https://slsa.dev/provenance/v0.2");
    let subject = &statement["subject"][0];
    assert_eq!(format!("sha256:{}", subject["digest"]["sha256"].as_str().unwrap()), image_digest, "{statement}");
    assert!(subject["name"].as_str().unwrap().starts_with("pkg:docker/127.0.0.1%3A5000/"), "{subject}");
    let predicate = &statement["predicate"];
    assert_eq!(predicate["buildType"], "https://mobyproject.org/buildkit@v1");
    assert_eq!(predicate["invocation"]["configSource"]["entryPoint"], "Dockerfile");
    assert_eq!(predicate["invocation"]["parameters"]["frontend"], "dockerfile.v0");
    let material = &predicate["materials"][0];
    assert!(material["uri"].as_str().unwrap().contains("library/busybox@latest"), "{material}");
    assert_eq!(format!("sha256:{}", material["digest"]["sha256"].as_str().unwrap()), busybox_digest(host_arch()), "{material}");
    let text = String::from_utf8_lossy(&statement_bytes);
    assert!(!text.contains("s3cret-value"), "mode=min leaves build arg values out: {text}");
    assert_eq!(predicate["metadata"]["completeness"]["parameters"], false, "and says so");
    assert!(predicate["metadata"].get("buildStartedOn").is_none(), "no timestamp without SOURCE_DATE_EPOCH: {predicate}");

    // The same build again pushes the same index.
    let again = pushed_digest(&h, &["-t", &tag, "--push", "--build-arg", "TOKEN=s3cret-value", dir]);
    assert_eq!(again, top, "an identical build pushes identical digests");

    // Without provenance: the plain image manifest, the very one the index lists.
    let plain_tag = format!("{}/{repo}:plain", registry());
    let plain = pushed_digest(&h, &["-t", &plain_tag, "--push", "--provenance=false", "--build-arg", "TOKEN=s3cret-value", dir]);
    assert_eq!(plain, image_digest, "the attestation does not change the image manifest");
    let m = json(&format!("{repo}/manifests/plain"));
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json", "{m}");
    let env_off = h.cmd().args(["build", "-t", &plain_tag, "--push", dir]).env(NO_DEFAULT_ATTESTATIONS, "1").output().unwrap();
    assert!(env_off.status.success(), "{}", String::from_utf8_lossy(&env_off.stderr));
    assert_eq!(json(&format!("{repo}/manifests/plain"))["mediaType"], "application/vnd.oci.image.manifest.v1+json");

    // mode=max records the build arg; SOURCE_DATE_EPOCH is the build's time.
    let max_tag = format!("{}/{repo}:max", registry());
    let out = h
        .cmd()
        .env_remove(NO_DEFAULT_ATTESTATIONS)
        .args(["build", "-t", &max_tag, "--push", "--provenance=mode=max", "--build-arg", "TOKEN=s3cret-value", "--sbom=true", dir])
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("does not produce SBOM"), "--sbom is accepted with a warning: {stderr}");
    let index = json(&format!("{repo}/manifests/max"));
    let att_manifest = json(&format!("{repo}/manifests/{}", index["manifests"][1]["digest"].as_str().unwrap()));
    let statement = json(&format!("{repo}/blobs/{}", att_manifest["layers"][0]["digest"].as_str().unwrap()));
    let predicate = &statement["predicate"];
    assert_eq!(predicate["invocation"]["parameters"]["args"]["build-arg:TOKEN"], "s3cret-value", "{predicate}");
    assert_eq!(predicate["metadata"]["buildStartedOn"], "2023-11-14T22:13:20Z", "{predicate}");
}

/// `--annotation` lands where its type says: the image manifests (all, or one platform's),
/// their entries in the index, the index; a one-platform build with an `index:` annotation
/// pushes an index. An OCI archive keeps them too, `index-descriptor:` in its index.json.
/// Bad annotations fail with a clear error naming the flag.
#[test]
fn annotations_land_where_their_type_says() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = context(&[("Dockerfile", &format!("FROM {}\nCOPY a /a\n", busybox())), ("a", "a\n")]);
    let dir = ctx.path().to_str().unwrap();
    let tag = format!("{}/{}:multi", registry(), unique("annotate"));
    let repo = repo_of(&tag);
    build_ok(
        &h,
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "-t",
            &tag,
            "--push",
            "--annotation",
            "org.opencontainers.image.title=Title",
            "--annotation",
            "manifest[linux/arm64]:arch.note=arm only",
            "--annotation",
            "index:org.opencontainers.image.vendor=Acme",
            "--annotation",
            "manifest-descriptor:desc=entry",
            dir,
        ],
    );
    let index = json(&format!("{repo}/manifests/multi"));
    assert_eq!(index["annotations"], serde_json::json!({"org.opencontainers.image.vendor": "Acme"}), "{index}");
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 4, "two images, two attestations: {index}");
    for e in &entries[..2] {
        let arch = e["platform"]["architecture"].as_str().unwrap();
        assert_eq!(e["annotations"], serde_json::json!({"desc": "entry"}), "{arch}: {index}");
        let m = json(&format!("{repo}/manifests/{}", e["digest"].as_str().unwrap()));
        assert_eq!(m["annotations"]["org.opencontainers.image.title"], "Title", "{arch}: {m}");
        let arm_only = m["annotations"].get("arch.note").and_then(|v| v.as_str());
        assert_eq!(arm_only, (arch == "arm64").then_some("arm only"), "{arch}: {m}");
    }
    for e in &entries[2..] {
        assert_eq!(e["annotations"]["vnd.docker.reference.type"], "attestation-manifest");
        assert!(e["annotations"].get("desc").is_none(), "attestation entries get no manifest-descriptor annotation: {index}");
    }

    // One platform, no provenance: an index: annotation still makes an index.
    let one = format!("{}/{repo}:one", registry());
    build_ok(&h, &["-t", &one, "--push", "--provenance=false", "--annotation", "index:k=v", dir]);
    let index = json(&format!("{repo}/manifests/one"));
    assert_eq!(index["mediaType"], "application/vnd.oci.image.index.v1+json", "{index}");
    assert_eq!(index["annotations"]["k"], "v");
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1, "the image alone: {index}");

    // An OCI archive: manifest annotations, and index-descriptor ones in index.json.
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let tar = out.path().join("img.tar");
    build_ok(
        &h,
        &[
            "-o",
            &format!("type=oci,dest={}", tar.display()),
            "--annotation",
            "index-descriptor:top=yes",
            "--annotation",
            "manifest:m=1",
            dir,
        ],
    );
    let archive = OciArchive::read(&tar);
    assert_eq!(archive.index["manifests"][0]["annotations"]["top"], "yes", "{}", archive.index);
    let inner = archive.json(archive.index["manifests"][0]["digest"].as_str().unwrap());
    assert_eq!(inner["mediaType"], "application/vnd.oci.image.index.v1+json", "provenance makes an index: {inner}");
    let m = archive.json(inner["manifests"][0]["digest"].as_str().unwrap());
    assert_eq!(m["annotations"]["m"], "1", "{m}");

    // The default provenance is buildx's inline-only one: a one-platform OCI archive without
    // an index stays a plain manifest; asked for, it gets the attestation.
    let plain = out.path().join("plain.tar");
    build_ok(&h, &["-o", &format!("type=oci,dest={}", plain.display()), dir]);
    let top = &OciArchive::read(&plain).index["manifests"][0];
    assert_eq!(top["mediaType"], "application/vnd.oci.image.manifest.v1+json", "{top}");
    let asked = out.path().join("asked.tar");
    build_ok(&h, &["-o", &format!("type=oci,dest={}", asked.display()), "--provenance=mode=min", dir]);
    let archive = OciArchive::read(&asked);
    let inner = archive.json(archive.index["manifests"][0]["digest"].as_str().unwrap());
    assert_eq!(inner["manifests"][1]["annotations"]["vnd.docker.reference.type"], "attestation-manifest", "{inner}");

    // --load cannot keep them: a note, and the build goes on.
    let loaded = unique("annotate-load");
    let stderr = build_ok(&h, &["--load", "-t", &loaded, "--annotation", "k=v", dir]);
    assert!(stderr.contains("--annotation: --load cannot keep OCI annotations"), "{stderr}");
    let _ = docker().args(["rmi", "-f", &loaded]).output();

    // Bad annotations: a clear error naming the flag, before anything is built.
    for (bad, says) in [
        ("layer:k=v", "unknown annotation type \"layer\""),
        ("k=a\u{1b}[2Jb", "control character"),
        ("manifest[linux/s390x]:k=v", "no image for linux/s390x"),
    ] {
        let out = build(&h, &["-o", &format!("type=oci,dest={}", out.path().join("bad.tar").display()), "--annotation", bad, dir]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} was taken");
        assert!(stderr.contains("--annotation") && stderr.contains(says), "{bad:?}: {stderr}");
    }
}
