//! End-to-end: SOURCE_DATE_EPOCH makes layers reproducible (issue 6). Two separate builders
//! (two hoist roots), two checkouts with different file mtimes, builds at different times:
//! with the same epoch they produce the same manifest digest; without it they do not.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const EPOCH: u64 = 1_700_000_000;

fn dockerfile() -> String {
    format!(
        "FROM {}\n\
         WORKDIR /app\n\
         COPY src/ /app/src/\n\
         RUN mkdir -p /app/gen && echo built > /app/gen/out && touch /app/gen/stamp\n\
         COPY --link extra.txt /extra.txt\n\
         RUN echo more >> /app/gen/out\n",
        busybox()
    )
}

/// A checkout of the project whose files have mtime `mtime`.
fn checkout(mtime: u64) -> tempfile::TempDir {
    let df = dockerfile();
    let dir = context(&[("Dockerfile", df.as_str()), ("src/main.txt", "main\n"), ("src/lib/util.txt", "util\n"), ("extra.txt", "extra\n")]);
    let st = Command::new("find").arg(dir.path()).args(["-exec", "touch", "-h", "-d", &format!("@{mtime}"), "{}", "+"]).status().unwrap();
    assert!(st.success());
    dir
}

/// Build `ctx` on `h` into an OCI archive; returns (manifest digest, archive path).
fn build_oci(h: &Hoist, ctx: &Path, epoch_env: Option<u64>, epoch_arg: Option<u64>, out: &Path) -> String {
    let meta = out.with_extension("json");
    let mut c = h.cmd();
    c.args(["build", "--progress=plain", "-o"]).arg(format!("type=oci,dest={}", out.display())).arg("--metadata-file").arg(&meta);
    c.env_remove("SOURCE_DATE_EPOCH");
    if let Some(e) = epoch_env {
        c.env("SOURCE_DATE_EPOCH", e.to_string());
    }
    if let Some(e) = epoch_arg {
        c.args(["--build-arg", &format!("SOURCE_DATE_EPOCH={e}")]);
    }
    c.arg(ctx);
    let o = c.output().unwrap();
    assert!(o.status.success(), "hoist build failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    m["containerimage.digest"].as_str().expect("containerimage.digest in the metadata file").to_string()
}

/// Every (layer path, entry mtime) of the new layers in an OCI archive, and the config's
/// `created`.
fn layer_mtimes(archive: &Path) -> (Vec<(String, u64)>, String) {
    let oci = OciArchive::read(archive);
    let (manifest, config) = (oci.manifest(), oci.config());
    let mut out = Vec::new();
    // Skip the base image's layer (its files keep the mtimes it was built with).
    for l in manifest["layers"].as_array().unwrap().iter().skip(1) {
        let blob = oci.blob(l["digest"].as_str().unwrap());
        let mut t = tar::Archive::new(flate2::read::GzDecoder::new(blob));
        for e in t.entries().unwrap() {
            let e = e.unwrap();
            out.push((e.path().unwrap().display().to_string(), e.header().mtime().unwrap()));
        }
    }
    (out, config["created"].as_str().unwrap_or_default().to_string())
}

#[test]
fn two_builders_with_source_date_epoch_produce_identical_digests() {
    if !lab_available() {
        return;
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let (a_dir, b_dir) = (checkout(now - 5000), checkout(now - 100));
    let (a, b) = (Hoist::new(), Hoist::new());
    let out = tempfile::Builder::new().prefix("repro-").tempdir_in(test_tmp()).unwrap();

    // Without an epoch the two builders disagree (file mtimes differ): the test can fail.
    let a_plain = build_oci(&a, a_dir.path(), None, None, &out.path().join("a-plain.tar"));
    let b_plain = build_oci(&b, b_dir.path(), None, None, &out.path().join("b-plain.tar"));
    assert_ne!(a_plain, b_plain, "builds without SOURCE_DATE_EPOCH should differ by mtimes");

    // A has those steps cached without the clamp; with the epoch they must not be reused.
    // A gets the epoch from the environment (forwarded like buildx), B as a build arg.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let a_repro = build_oci(&a, a_dir.path(), Some(EPOCH), None, &out.path().join("a.tar"));
    let b_repro = build_oci(&b, b_dir.path(), None, Some(EPOCH), &out.path().join("b.tar"));
    assert_eq!(a_repro, b_repro, "same inputs and SOURCE_DATE_EPOCH on two builders must give one digest");
    assert_ne!(a_repro, a_plain);

    let (entries, created) = layer_mtimes(&out.path().join("a.tar"));
    assert!(entries.iter().any(|(p, _)| p.contains("gen/out")), "{entries:?}");
    for (path, mtime) in &entries {
        assert!(*mtime <= EPOCH, "{path} has mtime {mtime}, after SOURCE_DATE_EPOCH {EPOCH}");
    }
    // As Go's RFC 3339 (BuildKit): no zero fraction.
    assert_eq!(created, "2023-11-14T22:13:20Z", "config created is the epoch");

    // A rebuild with the same epoch is a cache hit and the same image.
    let again = build_oci(&a, a_dir.path(), Some(EPOCH), None, &out.path().join("a2.tar"));
    assert_eq!(again, a_repro);
}
