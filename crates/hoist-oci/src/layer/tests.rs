//! Round trips through both directions: a tree written and extracted again, and layers
//! used as real overlayfs lowerdirs and upperdirs.

use std::ffi::CString;
use std::fs;
use std::path::{Path, PathBuf};

use super::test_support::*;
use super::*;

#[test]
fn round_trip_preserves_modes_owners_links_devices_xattrs_and_mtimes() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    rich_tree(&src);
    let (tar_bytes, stats) = tar_of(&src, &TarOptions::default());
    assert_eq!(stats.skipped, 1, "the socket is skipped");
    assert_eq!(stats.hardlinks, 1);
    let dst = t.path().join("dst");
    fs::create_dir(&dst).unwrap();
    let xs = extract_layer_tar(&tar_bytes[..], &dst, &ExtractOptions::default()).unwrap();
    assert_eq!(xs.entries, stats.entries);
    assert_eq!(xs.hardlinks, 1);
    // Read up to the end-of-archive marker (the first of its two zero blocks).
    assert_eq!(xs.bytes, tar_bytes.len() as u64 - 512);

    let mut want = snapshot(&src);
    want.remove("sock").expect("socket existed in the source");
    let got = snapshot(&dst);
    assert_eq!(want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>());
    for (k, w) in &want {
        assert_eq!(Some(w), got.get(k), "{k}");
    }
    // Spot checks that the comparison really covered what matters.
    assert_eq!(got["usr/bin/tool"].mode, 0o4755);
    assert_eq!(got["tmp"].mode, 0o1777);
    assert_eq!(got["usr/big-link"].hardlink_of.as_deref(), Some("big.bin"));
    assert_eq!(got["usr/bin/tool"].xattrs, vec![(b"user.origin".to_vec(), b"tested".to_vec())]);
    if is_root() {
        assert_eq!((got["usr/bin/tool"].uid, got["usr/bin/tool"].gid), (1234, 5678));
        assert_eq!(got["dev/null"].rdev, (1, 3));
        assert_eq!(got["dev/loop9"].kind, "block");
        assert_eq!(got["usr/bin/ping"].xattrs[0].0, b"security.capability".to_vec());
    }
    // And writing the extracted tree again gives the same bytes.
    let (again, _) = tar_of(&dst, &TarOptions::default());
    assert!(again == tar_bytes, "re-archiving the extracted tree differs");
}

#[test]
fn empty_directory_is_an_empty_layer() {
    let t = tempfile::tempdir().unwrap();
    let (bytes, stats) = tar_of(t.path(), &TarOptions::default());
    assert!(stats.is_empty());
    assert_eq!(bytes, vec![0u8; 1024]);
    let dst = tempfile::tempdir().unwrap();
    let xs = extract_layer_tar(&bytes[..], dst.path(), &ExtractOptions::default()).unwrap();
    assert_eq!(xs.entries, 0);
}

// --- overlayfs -----------------------------------------------------------------------

struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

fn mount_overlay(lowers: &[&Path], upper: &Path, work: &Path, merged: &Path) -> Mount {
    let lower = lowers.iter().map(|p| p.to_str().unwrap()).collect::<Vec<_>>().join(":");
    let data = CString::new(format!("lowerdir={lower},upperdir={},workdir={}", upper.display(), work.display())).unwrap();
    rustix::mount::mount("overlay", merged, "overlay", rustix::mount::MountFlags::empty(), Some(data.as_c_str()))
        .unwrap_or_else(|e| panic!("mount overlay {data:?}: {e}"));
    Mount(merged.to_path_buf())
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn extracted_layer_works_as_overlay_lowerdir_and_upperdir_round_trips() {
    if !crate::testing::needs_root() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| {
        let d = t.path().join(n);
        fs::create_dir_all(&d).unwrap();
        d
    };
    // Base layer.
    let base = p("base");
    fs::write(base.join("a"), b"a").unwrap();
    fs::write(base.join("b"), b"b").unwrap();
    fs::create_dir(base.join("d")).unwrap();
    fs::write(base.join("d/x"), b"x").unwrap();
    fs::create_dir(base.join("e")).unwrap();
    fs::write(base.join("e/old"), b"old").unwrap();

    // 1. An OCI layer with whiteouts, extracted, hides files of the layer below.
    let l2 = p("l2");
    let tar_bytes =
        raw_tar(&[(hdr(".wh.a", b'0'), b""), (hdr("d/", b'5'), b""), (hdr("d/.wh..wh..opq", b'0'), b""), (hdr("d/y", b'0'), b"y")]);
    extract_layer_tar(&tar_bytes[..], &l2, &ExtractOptions::default()).unwrap();
    let (up, work, merged) = (p("up1"), p("work1"), p("merged1"));
    {
        let _m = mount_overlay(&[&l2, &base], &up, &work, &merged);
        assert_eq!(names(&merged), vec!["b", "d", "e"], "whiteout hides a");
        assert_eq!(names(&merged.join("d")), vec!["y"], "opaque d hides d/x");
        assert_eq!(fs::read(merged.join("e/old")).unwrap(), b"old");
    }

    // 2. Changes made through a real overlay mount: the upperdir's tar has the OCI
    // whiteouts, and extracting it gives a lowerdir with the same merged view.
    let (up, work, merged) = (p("up2"), p("work2"), p("merged2"));
    let view_before;
    {
        let _m = mount_overlay(&[&base], &up, &work, &merged);
        fs::remove_file(merged.join("a")).unwrap();
        fs::remove_file(merged.join("b")).unwrap();
        fs::remove_dir_all(merged.join("d")).unwrap();
        fs::create_dir(merged.join("d")).unwrap();
        fs::write(merged.join("d/z"), b"z").unwrap();
        fs::write(merged.join("e/new"), b"new").unwrap();
        fs::write(merged.join("n"), b"n").unwrap();
        view_before = snapshot(&merged);
    }
    let (tar_bytes, stats) = tar_of(&up, &TarOptions::default());
    let entries = list(&tar_bytes);
    let names_in_tar: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
    for want in [".wh.a", ".wh.b", "d/", "d/.wh..wh..opq", "d/z", "e/", "e/new", "n"] {
        assert!(names_in_tar.contains(&want), "{want} missing from {names_in_tar:?}");
    }
    assert_eq!(stats.hardlinks, 0, "shared whiteout inodes are not hardlinks");
    let l3 = p("l3");
    extract_layer_tar(&tar_bytes[..], &l3, &ExtractOptions::default()).unwrap();
    let (up, work, merged) = (p("up3"), p("work3"), p("merged3"));
    let _m = mount_overlay(&[&l3, &base], &up, &work, &merged);
    let view_after = snapshot(&merged);
    assert_eq!(view_after.keys().collect::<Vec<_>>(), view_before.keys().collect::<Vec<_>>());
    for (k, v) in &view_before {
        let w = &view_after[k];
        assert_eq!((v.kind, v.mode, v.content.as_ref()), (w.kind, w.mode, w.content.as_ref()), "{k}");
    }
}
