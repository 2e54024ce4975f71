//! Fuzz layer tar extraction (`hoist_oci::layer::extract_layer_tar`) with hostile archives:
//! whatever the entries (`..`, absolute names, symlinks written through, hard links out,
//! whiteouts, devices), nothing may be created, changed or removed outside the extraction
//! directory, and nothing may panic. The extraction directory starts with symlinks that point
//! outside it (relative and absolute), as a lower layer's rootfs may have.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use hoist_oci::layer::{extract_layer_tar, ExtractOptions, WhiteoutMode};
use libfuzzer_sys::fuzz_target;

/// Every entry below `dir` with its kind, size and content (symlinks not followed).
fn listing(dir: &Path) -> BTreeMap<String, String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap_or(&p).display().to_string();
            let Ok(m) = std::fs::symlink_metadata(&p) else { continue };
            let what = if m.file_type().is_symlink() {
                format!("link {:?}", std::fs::read_link(&p).ok())
            } else if m.is_dir() {
                walk(base, &p, out);
                "dir".to_string()
            } else {
                format!("file {:?}", std::fs::read(&p).ok())
            };
            out.insert(rel, what);
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(base) = tempfile::tempdir() else { return };
    let root = base.path().join("root");
    let outside = base.path().join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(outside.join("dir")).unwrap();
    std::fs::write(outside.join("canary"), b"canary").unwrap();
    std::os::unix::fs::symlink("../outside", root.join("up")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("abs")).unwrap();
    std::os::unix::fs::symlink(outside.join("canary"), root.join("file")).unwrap();
    let before = listing(base.path());
    let before_outside = listing(&outside);

    // the first byte picks the whiteout mode, the rest is the tar stream
    let (mode, tar) = match data.split_first() {
        Some((m, rest)) => (*m, rest),
        None => (0, data),
    };
    let whiteouts = match mode % 3 {
        0 => WhiteoutMode::Overlay,
        1 => WhiteoutMode::OverlayUserXattr,
        _ => WhiteoutMode::Keep,
    };
    let opts = ExtractOptions { max_bytes: Some(4 << 20), max_entries: Some(2000), whiteouts, ..Default::default() };
    let _ = extract_layer_tar(tar, &root, &opts);

    // outside the extraction directory nothing changed
    assert_eq!(listing(&outside), before_outside, "an entry reached outside the extraction directory");
    let after = listing(base.path());
    for (k, v) in &before {
        if !k.starts_with("root/") && !k.starts_with("root") {
            assert_eq!(after.get(k), Some(v), "{k} changed outside the extraction directory");
        }
    }
    for k in after.keys() {
        assert!(k == "root" || k.starts_with("root/") || before.contains_key(k), "{k} was created outside the extraction directory");
    }
});
