//! Fixtures shared by the layer tests: trees with every kind of entry, snapshots that
//! compare trees, and tars built from a directory or entry by entry with raw names.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::io::{BufWriter, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps};

use super::header::{Hdr, TarWriter};
use super::walk::read_xattrs;
use super::{write_layer_tar, TarOptions, TarStats};
use crate::digest::Digest;

pub(super) fn is_root() -> bool {
    crate::testing::needs_root()
}

pub(super) fn set_mtime(path: &Path, secs: i64) {
    let t = Timestamps { last_access: Timespec { tv_sec: secs, tv_nsec: 0 }, last_modification: Timespec { tv_sec: secs, tv_nsec: 0 } };
    rustix::fs::utimensat(rustix::fs::CWD, path, &t, AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

pub(super) fn lset(path: &Path, k: &str, v: &[u8]) {
    rustix::fs::lsetxattr(path, k, v, rustix::fs::XattrFlags::empty()).unwrap();
}

pub(super) fn mknod(path: &Path, ft: FileType, mode: u32, major: u32, minor: u32) {
    rustix::fs::mknodat(rustix::fs::CWD, path, ft, Mode::from_raw_mode(mode), rustix::fs::makedev(major, minor)).unwrap();
}

/// Everything the layer format must preserve about a tree, keyed by relative path.
#[derive(Debug, PartialEq, Eq, Clone)]
pub(super) struct Node {
    pub(super) kind: &'static str,
    pub(super) mode: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) size: u64,
    pub(super) content: Option<Digest>,
    pub(super) link: Option<Vec<u8>>,
    pub(super) rdev: (u32, u32),
    pub(super) mtime: i64,
    pub(super) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// For the second and later names of a multiply-linked file: the first name.
    pub(super) hardlink_of: Option<String>,
}

pub(super) fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>, inodes: &mut HashMap<(u64, u64), String>) {
        let mut names: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        for n in names {
            let p = dir.join(&n);
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let md = fs::symlink_metadata(&p).unwrap();
            use std::os::unix::fs::FileTypeExt;
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                "dir"
            } else if ft.is_file() {
                "file"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_char_device() {
                "char"
            } else if ft.is_block_device() {
                "block"
            } else if ft.is_fifo() {
                "fifo"
            } else {
                "socket"
            };
            let mut hardlink_of = None;
            if !ft.is_dir() && md.nlink() > 1 {
                match inodes.get(&(md.dev(), md.ino())) {
                    Some(first) => hardlink_of = Some(first.clone()),
                    None => {
                        inodes.insert((md.dev(), md.ino()), rel.clone());
                    }
                }
            }
            out.insert(
                rel,
                Node {
                    kind,
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    size: if ft.is_file() { md.len() } else { 0 },
                    content: ft.is_file().then(|| Digest::of(&fs::read(&p).unwrap())),
                    link: ft.is_symlink().then(|| fs::read_link(&p).unwrap().into_os_string().into_vec()),
                    rdev: (rustix::fs::major(md.rdev()), rustix::fs::minor(md.rdev())),
                    mtime: if ft.is_dir() || ft.is_file() || ft.is_symlink() || kind != "socket" { md.mtime() } else { 0 },
                    xattrs: read_xattrs(&p).unwrap(),
                    hardlink_of,
                },
            );
            if ft.is_dir() {
                walk(root, &p, out, inodes);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out, &mut HashMap::new());
    out
}

pub(super) fn tar_of(dir: &Path, opts: &TarOptions) -> (Vec<u8>, TarStats) {
    let mut out = Vec::new();
    let stats = write_layer_tar(dir, &mut out, opts).unwrap();
    assert_eq!(stats.bytes, out.len() as u64);
    (out, stats)
}

/// (name, type, size, linkname, pax records) of one entry, read back with the tar crate.
pub(super) type Listed = (String, char, u64, String, Vec<(String, Vec<u8>)>);

pub(super) fn list(tar_bytes: &[u8]) -> Vec<Listed> {
    let mut a = tar::Archive::new(tar_bytes);
    let mut out = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let link = e.link_name_bytes().map(|l| String::from_utf8_lossy(&l).into_owned()).unwrap_or_default();
        let t = e.header().entry_type().as_byte() as char;
        let size = e.size();
        let mut pax = Vec::new();
        if let Some(exts) = e.pax_extensions().unwrap() {
            for x in exts {
                let x = x.unwrap();
                pax.push((x.key().unwrap().to_string(), x.value_bytes().to_vec()));
            }
        }
        out.push((name, t, size, link, pax));
    }
    out
}

/// A tree with every kind of entry and metadata the format carries.
pub(super) fn rich_tree(dir: &Path) {
    fs::create_dir_all(dir.join("usr/bin")).unwrap();
    fs::create_dir_all(dir.join("tmp")).unwrap();
    fs::write(dir.join("usr/bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
    fs::set_permissions(dir.join("usr/bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(dir.join("empty"), b"").unwrap();
    let big: Vec<u8> = (0..(1u32 << 20) + 3).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    fs::write(dir.join("big.bin"), &big).unwrap();
    fs::hard_link(dir.join("big.bin"), dir.join("usr/big-link")).unwrap();
    symlink("bin/tool", dir.join("usr/rel-link")).unwrap();
    symlink("/etc/passwd", dir.join("abs-link")).unwrap();
    let long_dir = dir.join("d".repeat(60)).join("e".repeat(60));
    fs::create_dir_all(&long_dir).unwrap();
    fs::write(long_dir.join("f".repeat(120)), b"long name").unwrap();
    symlink("t".repeat(150), dir.join("long-target")).unwrap();
    fs::write(dir.join("naïve-ünïcode"), b"utf8 name").unwrap();
    fs::write(dir.join(OsStr::from_bytes(b"latin1-\xe9")), b"non-utf8 name").unwrap();
    lset(&dir.join("usr/bin/tool"), "user.origin", b"tested");
    // A file capability: cap_net_bind_service+ep (VFS_CAP_REVISION_2 layout).
    let mut cap = vec![0u8; 20];
    cap[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
    cap[4..8].copy_from_slice(&(1u32 << 10).to_le_bytes());
    if is_root() {
        fs::write(dir.join("usr/bin/ping"), b"ping").unwrap();
        lset(&dir.join("usr/bin/ping"), "security.capability", &cap);
        std::os::unix::fs::chown(dir.join("usr/bin/tool"), Some(1234), Some(5678)).unwrap();
        // chown cleared setuid; set it again.
        fs::set_permissions(dir.join("usr/bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::lchown(dir.join("usr/rel-link"), Some(42), Some(43)).unwrap();
        fs::create_dir(dir.join("dev")).unwrap();
        mknod(&dir.join("dev/null"), FileType::CharacterDevice, 0o666, 1, 3);
        mknod(&dir.join("dev/loop9"), FileType::BlockDevice, 0o660, 7, 9);
    }
    mknod(&dir.join("fifo"), FileType::Fifo, 0o600, 0, 0);
    let _sock = std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap();
    for (i, p) in ["usr/bin/tool", "empty", "big.bin", "usr/rel-link", "fifo", "usr/bin", "usr", "tmp"].iter().enumerate() {
        set_mtime(&dir.join(p), 1_500_000_000 + i as i64 * 1000);
    }
}

/// A tar built entry by entry with raw names (no validation), for hostile inputs.
pub(super) fn raw_tar(entries: &[(Hdr, &[u8])]) -> Vec<u8> {
    let mut w = TarWriter { out: BufWriter::new(Vec::new()), bytes: 0 };
    for (h, data) in entries {
        let h = Hdr { size: data.len() as u64, ..h.clone() };
        w.header(&h).unwrap();
        w.out.write_all(data).unwrap();
        w.pad(data.len() as u64).unwrap();
    }
    w.out.write_all(&[0u8; 1024]).unwrap();
    w.out.into_inner().unwrap()
}

pub(super) fn hdr(name: &str, typeflag: u8) -> Hdr {
    Hdr {
        name: name.as_bytes().to_vec(),
        typeflag,
        mode: if typeflag == b'5' { 0o755 } else { 0o644 },
        uid: 0,
        gid: 0,
        size: 0,
        mtime: 1_600_000_000,
        linkname: Vec::new(),
        devmajor: 0,
        devminor: 0,
        xattrs: Vec::new(),
    }
}

pub(super) fn link(name: &str, typeflag: u8, target: &str) -> Hdr {
    Hdr { linkname: target.as_bytes().to_vec(), ..hdr(name, typeflag) }
}
