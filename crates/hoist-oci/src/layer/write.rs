//! Writing the OCI layer tar of a directory ([`write_layer_tar`]): a depth-first walk in
//! bytewise name order over the entries `walk` reads, turning each into tar headers and
//! content through `header`'s [`TarWriter`]. Whiteouts become empty `.wh.<name>` files,
//! opaque directories get a `.wh..wh..opq` marker right after their own entry, later names
//! of a multiply-linked file become hardlink entries (whiteouts never do, though the kernel
//! shares their inode), mtimes are clamped to `SOURCE_DATE_EPOCH`, and a file that changes
//! size while it is copied is an error.
//!
//! A layer of many small files costs a few syscalls per file, not bytes: threads read the
//! next directories (their entries, and the content of their small files) ahead of the one
//! thread that writes the tar in order, within a bound on the bytes read ahead.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};

use super::header::{Hdr, TarWriter};
use super::walk::{rd_err, read_children, Child, Kind};
use super::{LayerError, TarOptions, TarStats, WHITEOUT_OPAQUE};

/// Directories of one level read ahead of the writer.
const DIRS_AHEAD: usize = 16;
/// Files up to this size are read ahead whole.
const SMALL_FILE: u64 = 256 * 1024;
/// Most bytes of file content read ahead and not yet written.
const AHEAD_BYTES: u64 = 32 << 20;

/// Write the OCI layer tar of `dir` to `out`; see the `layer` module doc for the format.
/// `out` is never flushed (so a zstd compressor behind it does not cut a frame job short).
pub fn write_layer_tar(dir: &Path, out: impl Write, opts: &TarOptions) -> Result<TarStats, LayerError> {
    write_layer_tar_with(dir, out, opts, &mut |_, _| {})
}

/// [`write_layer_tar`], telling `before_content` the regular files written so far and their
/// bytes, this one's included, before each file's content is written.
pub fn write_layer_tar_with(
    dir: &Path,
    out: impl Write,
    opts: &TarOptions,
    before_content: &mut dyn FnMut(u64, u64),
) -> Result<TarStats, LayerError> {
    let md = fs::symlink_metadata(dir).map_err(|source| LayerError::ReadDir { path: dir.to_path_buf(), source })?;
    if !md.is_dir() {
        return Err(LayerError::NotADirectory { path: dir.to_path_buf() });
    }
    let (jobs, queue) = mpsc::channel::<Job>();
    let queue = Mutex::new(queue);
    let ahead = AtomicU64::new(0);
    let readers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
    std::thread::scope(|scope| {
        for _ in 0..readers {
            scope.spawn(|| loop {
                let job = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                let Ok((path, reply)) = job else { return };
                let _ = reply.send(read_dir_ahead(&path, &ahead));
            });
        }
        let mut walker = Walker {
            opts,
            links: HashMap::new(),
            stats: TarStats::default(),
            buf: vec![0u8; 256 * 1024],
            jobs: Some(jobs),
            ahead: &ahead,
            before_content,
        };
        let result = (|| {
            let mut w = TarWriter { out: BufWriter::with_capacity(256 * 1024, out), bytes: 0 };
            let top = read_dir_ahead(dir, &ahead)?;
            walker.walk(dir, b"", top, &mut w)?;
            w.out.write_all(&[0u8; 1024]).map_err(LayerError::Write)?;
            w.bytes += 1024;
            w.out.into_inner().map_err(|e| LayerError::Write(e.into_error()))?;
            Ok(w.bytes)
        })();
        // Closing the queue ends the readers, also after an error.
        walker.jobs = None;
        let bytes = result?;
        walker.stats.bytes = bytes;
        Ok(walker.stats)
    })
}

/// A directory to read ahead, and where its entries go.
type Job = (PathBuf, mpsc::SyncSender<Result<Vec<Entry>, LayerError>>);

/// A directory's child, with its content when it is a small file read ahead.
struct Entry {
    child: Child,
    content: Option<Vec<u8>>,
}

/// The children of `abs` (see [`read_children`]) with the content of each small file that
/// has one name, while fewer than [`AHEAD_BYTES`] are held (`ahead` counts them).
fn read_dir_ahead(abs: &Path, ahead: &AtomicU64) -> Result<Vec<Entry>, LayerError> {
    let children = read_children(abs)?;
    Ok(children
        .into_iter()
        .map(|child| {
            let small = child.kind == Kind::File && child.md.nlink() == 1 && child.md.len() <= SMALL_FILE;
            let content = if small { read_small(&abs.join(&child.name), child.md.len(), ahead) } else { None };
            Entry { child, content }
        })
        .collect())
}

/// The `size` bytes of file `path`, or `None` (the writer then reads it itself, and reports
/// what went wrong): no room ahead, or the file cannot be read or is not `size` bytes now.
fn read_small(path: &Path, size: u64, ahead: &AtomicU64) -> Option<Vec<u8>> {
    if ahead.fetch_add(size, Ordering::Relaxed) + size > AHEAD_BYTES {
        ahead.fetch_sub(size, Ordering::Relaxed);
        return None;
    }
    let read = || -> io::Result<Option<Vec<u8>>> {
        let mut f = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
        // One byte more than expected tells a file that grew.
        let mut buf = Vec::with_capacity(size as usize + 1);
        (&mut f).take(size + 1).read_to_end(&mut buf)?;
        Ok((buf.len() as u64 == size).then_some(buf))
    };
    let content = read().ok().flatten();
    if content.is_none() {
        ahead.fetch_sub(size, Ordering::Relaxed);
    }
    content
}

struct Walker<'a> {
    opts: &'a TarOptions,
    /// (dev, ino) of multiply-linked files already written → their tar name.
    links: HashMap<(u64, u64), Vec<u8>>,
    stats: TarStats,
    buf: Vec<u8>,
    /// Where directories to read ahead are sent (`None`: the queue is closed).
    jobs: Option<mpsc::Sender<Job>>,
    /// Bytes of file content read ahead and not yet written.
    ahead: &'a AtomicU64,
    /// See [`write_layer_tar_with`].
    before_content: &'a mut dyn FnMut(u64, u64),
}

fn join_rel(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(parent.len() + name.len() + 1);
    if !parent.is_empty() {
        v.extend_from_slice(parent);
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

impl Walker<'_> {
    fn mtime(&self, md: &fs::Metadata) -> u64 {
        let mut t = md.mtime();
        if let Some(epoch) = self.opts.source_date_epoch {
            t = t.min(epoch);
        }
        t.max(0) as u64
    }

    /// Have `dir` read by a reader thread; its entries arrive on the returned channel (read
    /// here when no reader can take it).
    fn read_ahead(&self, dir: PathBuf) -> mpsc::Receiver<Result<Vec<Entry>, LayerError>> {
        let (reply, entries) = mpsc::sync_channel(1);
        if let Some(jobs) = &self.jobs {
            if let Err(mpsc::SendError((dir, reply))) = jobs.send((dir, reply)) {
                let _ = reply.send(read_dir_ahead(&dir, self.ahead));
            }
        } else {
            let _ = reply.send(read_dir_ahead(&dir, self.ahead));
        }
        entries
    }

    fn walk<W: Write>(&mut self, abs: &Path, rel: &[u8], entries: Vec<Entry>, w: &mut TarWriter<W>) -> Result<(), LayerError> {
        // The subdirectories, in the order they are written, read up to DIRS_AHEAD ahead.
        let mut subdirs =
            entries.iter().filter(|e| matches!(e.child.kind, Kind::Dir { .. })).map(|e| abs.join(&e.child.name)).collect::<VecDeque<_>>();
        let mut pending = VecDeque::new();
        let mut top_up = |this: &Self, pending: &mut VecDeque<_>| {
            while pending.len() < DIRS_AHEAD {
                let Some(d) = subdirs.pop_front() else { break };
                pending.push_back((d.clone(), this.read_ahead(d)));
            }
        };
        top_up(self, &mut pending);
        for Entry { child, content } in entries {
            let path = abs.join(&child.name);
            let tar_path = join_rel(rel, &child.tar_name);
            let md = &child.md;
            let mut h = Hdr {
                name: tar_path.clone(),
                typeflag: b'0',
                mode: md.mode() & 0o7777,
                uid: md.uid() as u64,
                gid: md.gid() as u64,
                size: 0,
                mtime: self.mtime(md),
                linkname: Vec::new(),
                devmajor: 0,
                devminor: 0,
                xattrs: child.xattrs.clone(),
            };
            match child.kind {
                Kind::Socket => {
                    self.stats.skipped += 1;
                    continue;
                }
                Kind::Whiteout => {
                    h = Hdr { mode: 0, uid: 0, gid: 0, xattrs: Vec::new(), ..h };
                    w.header(&h)?;
                    self.stats.whiteouts += 1;
                }
                Kind::Dir { opaque } => {
                    h.typeflag = b'5';
                    h.name.push(b'/');
                    w.header(&h)?;
                    self.stats.dirs += 1;
                    if opaque {
                        let marker = Hdr {
                            name: join_rel(&tar_path, WHITEOUT_OPAQUE.as_bytes()),
                            typeflag: b'0',
                            mode: 0,
                            uid: 0,
                            gid: 0,
                            xattrs: Vec::new(),
                            ..h.clone()
                        };
                        w.header(&marker)?;
                        self.stats.opaque_dirs += 1;
                        self.stats.entries += 1;
                    }
                    self.stats.entries += 1;
                    let (dir, reply) = pending.pop_front().expect("every subdirectory is read ahead in order");
                    debug_assert_eq!(dir, path);
                    top_up(self, &mut pending);
                    let sub = reply.recv().unwrap_or_else(|_| {
                        Err(LayerError::ReadDir { path: path.clone(), source: io::Error::other("a reader thread stopped") })
                    })?;
                    self.walk(&path, &tar_path, sub, w)?;
                    continue;
                }
                _ => {
                    if md.nlink() > 1 {
                        let key = (md.dev(), md.ino());
                        if let Some(first) = self.links.get(&key) {
                            h.typeflag = b'1';
                            h.linkname = first.clone();
                            w.header(&h)?;
                            self.stats.hardlinks += 1;
                            self.stats.entries += 1;
                            continue;
                        }
                        self.links.insert(key, tar_path.clone());
                    }
                    match child.kind {
                        Kind::File => {
                            h.size = md.len();
                            w.header(&h)?;
                            (self.before_content)(self.stats.files + 1, self.stats.content_bytes + md.len());
                            match content {
                                Some(bytes) => {
                                    w.out.write_all(&bytes).map_err(LayerError::Write)?;
                                    self.ahead.fetch_sub(md.len(), Ordering::Relaxed);
                                    w.bytes += md.len();
                                    w.pad(md.len())?;
                                }
                                None => self.copy_file(&path, md.len(), w)?,
                            }
                            self.stats.files += 1;
                            self.stats.content_bytes += md.len();
                        }
                        Kind::Symlink => {
                            h.typeflag = b'2';
                            h.linkname = fs::read_link(&path).map_err(rd_err(&path))?.into_os_string().into_vec();
                            w.header(&h)?;
                            self.stats.symlinks += 1;
                        }
                        Kind::Char | Kind::Block | Kind::Fifo => {
                            h.typeflag = match child.kind {
                                Kind::Char => b'3',
                                Kind::Block => b'4',
                                _ => b'6',
                            };
                            if child.kind != Kind::Fifo {
                                h.devmajor = rustix::fs::major(md.rdev()) as u64;
                                h.devminor = rustix::fs::minor(md.rdev()) as u64;
                            }
                            w.header(&h)?;
                            self.stats.devices += 1;
                        }
                        _ => unreachable!("handled above"),
                    }
                }
            }
            self.stats.entries += 1;
        }
        Ok(())
    }

    fn copy_file<W: Write>(&mut self, path: &Path, size: u64, w: &mut TarWriter<W>) -> Result<(), LayerError> {
        let mut f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|source| LayerError::ReadDir { path: path.to_path_buf(), source })?;
        let mut left = size;
        while left > 0 {
            let want = left.min(self.buf.len() as u64) as usize;
            let n = match f.read(&mut self.buf[..want]) {
                Ok(0) => return Err(LayerError::Changed { path: path.to_path_buf(), what: format!("shrank below {size} bytes") }),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(LayerError::ReadDir { path: path.to_path_buf(), source }),
            };
            w.out.write_all(&self.buf[..n]).map_err(LayerError::Write)?;
            left -= n as u64;
        }
        let mut probe = [0u8; 1];
        if f.read(&mut probe).map_err(|source| LayerError::ReadDir { path: path.to_path_buf(), source })? != 0 {
            return Err(LayerError::Changed { path: path.to_path_buf(), what: format!("grew beyond {size} bytes") });
        }
        w.bytes += size;
        w.pad(size)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::Path;

    use rustix::fs::FileType;

    use super::*;
    use crate::layer::test_support::*;

    #[test]
    fn tar_format_details() {
        let t = tempfile::tempdir().unwrap();
        rich_tree(t.path());
        let (tar_bytes, _) = tar_of(t.path(), &TarOptions::default());
        let entries = list(&tar_bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        // Depth-first, sorted, parents before children, directories with a trailing slash.
        let pos = |n: &str| names.iter().position(|x| *x == n).unwrap_or_else(|| panic!("{n} missing from {names:?}"));
        assert!(pos("usr/") < pos("usr/bin/") && pos("usr/bin/") < pos("usr/bin/tool"));
        assert!(pos("big.bin") < pos("usr/big-link"));
        let link = &entries[pos("usr/big-link")];
        assert_eq!((link.1, link.3.as_str()), ('1', "big.bin"));
        let long = format!("{}/{}/{}", "d".repeat(60), "e".repeat(60), "f".repeat(120));
        assert!(entries.iter().any(|e| e.0 == long && e.4.iter().any(|(k, _)| k == "path")), "long names use PAX path");
        assert_eq!(entries[pos("long-target")].3, "t".repeat(150));
        assert!(entries[pos("usr/bin/tool")].4.contains(&("SCHILY.xattr.user.origin".to_string(), b"tested".to_vec())));
        assert!(!names.contains(&"sock"));
        // No atime/ctime records, empty uname/gname.
        for e in &entries {
            assert!(e.4.iter().all(|(k, _)| k != "atime" && k != "ctime"), "{}", e.0);
        }
        let mut a = tar::Archive::new(&tar_bytes[..]);
        for e in a.entries().unwrap() {
            let e = e.unwrap();
            assert_eq!(e.header().username_bytes(), Some(&b""[..]));
            assert_eq!(e.header().groupname_bytes(), Some(&b""[..]));
        }
        // GNU tar accepts and lists the archive.
        let tarfile = tempfile::NamedTempFile::new().unwrap();
        fs::write(tarfile.path(), &tar_bytes).unwrap();
        let out = std::process::Command::new("tar").arg("-tvf").arg(tarfile.path()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains(&"f".repeat(120)));
    }

    /// Names of `dir`'s tree in the order a layer tar holds them: depth-first, each
    /// directory's children sorted bytewise, a directory before its children.
    fn depth_first(dir: &Path, rel: &str, out: &mut Vec<String>) {
        let mut names: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        for n in names {
            let r = if rel.is_empty() { n.clone() } else { format!("{rel}/{n}") };
            let p = dir.join(&n);
            if p.symlink_metadata().unwrap().is_dir() {
                out.push(format!("{r}/"));
                depth_first(&p, &r, out);
            } else {
                out.push(r);
            }
        }
    }

    #[test]
    fn a_wide_tree_read_ahead_by_threads_is_written_in_order_and_round_trips() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        // More directories per level than are read ahead, nested, with small files whose
        // content together exceeds what may be held ahead, files too big to read ahead, and
        // hard links across directories (never read ahead).
        let mut n = 0u32;
        for a in 0..(DIRS_AHEAD as u32 + 5) {
            for b in 0..3 {
                let d = src.join(format!("d{a:02}/e{b}"));
                fs::create_dir_all(&d).unwrap();
                for f in 0..4 {
                    n += 1;
                    let len = if n % 10 == 0 { SMALL_FILE as usize + 1000 } else { 150_000 + (n as usize % 7) * 13 };
                    fs::write(d.join(format!("f{f}")), vec![n as u8; len]).unwrap();
                }
            }
            fs::write(src.join(format!("d{a:02}/top")), format!("top {a}")).unwrap();
        }
        fs::hard_link(src.join("d03/e1/f2"), src.join("d20/e0/linked")).unwrap();
        fs::hard_link(src.join("d03/e1/f2"), src.join("d00/linked")).unwrap();
        let small: u64 = fs::read_dir(src.join("d01/e0")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum::<u64>()
            * (DIRS_AHEAD as u64 + 5)
            * 3;
        assert!(small > AHEAD_BYTES, "the tree holds more than may be read ahead");

        let (bytes, stats) = tar_of(&src, &TarOptions::default());
        let names: Vec<String> = list(&bytes).into_iter().map(|e| e.0).collect();
        let mut want = Vec::new();
        depth_first(&src, "", &mut want);
        assert_eq!(names, want);
        assert_eq!(stats.hardlinks, 2);
        assert_eq!(tar_of(&src, &TarOptions::default()).0, bytes, "the same bytes each time");

        let dst = t.path().join("dst");
        fs::create_dir(&dst).unwrap();
        crate::layer::extract_layer_tar(&bytes[..], &dst, &crate::layer::ExtractOptions::default()).unwrap();
        assert_eq!(snapshot(&src), snapshot(&dst));
    }

    #[test]
    fn a_small_file_is_read_ahead_only_at_its_size_and_within_the_bound() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        fs::write(&p, b"0123456789").unwrap();
        let ahead = AtomicU64::new(0);
        assert_eq!(read_small(&p, 10, &ahead).as_deref(), Some(&b"0123456789"[..]));
        assert_eq!(ahead.load(Ordering::Relaxed), 10, "held until written");
        let ahead = AtomicU64::new(0);
        assert_eq!(read_small(&p, 5, &ahead), None, "grown since its size was read: the writer reads it and reports that");
        assert_eq!(read_small(&p, 20, &ahead), None, "shrunk");
        assert_eq!(read_small(&t.path().join("gone"), 3, &ahead), None);
        assert_eq!(ahead.load(Ordering::Relaxed), 0, "nothing held for what was not read");
        let full = AtomicU64::new(AHEAD_BYTES - 5);
        assert_eq!(read_small(&p, 10, &full), None, "no room ahead");
        assert_eq!(full.load(Ordering::Relaxed), AHEAD_BYTES - 5);
    }

    #[test]
    fn a_file_that_grew_since_its_directory_was_read_is_an_error() {
        // The writer's own read reports it when the read ahead declined the file.
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        fs::write(&p, b"0123456789").unwrap();
        let ahead = AtomicU64::new(0);
        let mut walker = Walker {
            opts: &TarOptions::default(),
            links: HashMap::new(),
            stats: TarStats::default(),
            buf: vec![0u8; 16],
            jobs: None,
            ahead: &ahead,
            before_content: &mut |_, _| {},
        };
        let mut w = TarWriter { out: BufWriter::new(Vec::new()), bytes: 0 };
        let err = walker.copy_file(&p, 4, &mut w).unwrap_err();
        assert!(matches!(err, LayerError::Changed { .. }), "{err}");
        assert!(err.to_string().contains("grew"), "{err}");
    }

    #[test]
    fn same_input_twice_gives_the_same_bytes_and_source_date_epoch_clamps_mtimes() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        for d in [&a, &b] {
            fs::create_dir_all(d.join("etc")).unwrap();
            fs::write(d.join("etc/conf"), b"x=1\n").unwrap();
            fs::write(d.join("app"), b"binary").unwrap();
            symlink("app", d.join("link")).unwrap();
        }
        let stamp = |d: &Path, secs: i64| {
            for p in ["etc/conf", "app", "link", "etc", ""] {
                set_mtime(&d.join(p), secs);
            }
        };
        stamp(&a, 1_700_000_000);
        stamp(&b, 1_700_000_555);
        assert_eq!(tar_of(&a, &TarOptions::default()).0, tar_of(&a, &TarOptions::default()).0);
        assert_ne!(tar_of(&a, &TarOptions::default()).0, tar_of(&b, &TarOptions::default()).0, "mtimes are in the tar");
        let sde = TarOptions { source_date_epoch: Some(1_600_000_000) };
        let (ta, tb) = (tar_of(&a, &sde).0, tar_of(&b, &sde).0);
        assert!(ta == tb, "SOURCE_DATE_EPOCH makes both builders' layers identical");
        let mut arch = tar::Archive::new(&ta[..]);
        for e in arch.entries().unwrap() {
            assert_eq!(e.unwrap().header().mtime().unwrap(), 1_600_000_000);
        }
        // Older files keep their own time.
        let old = TarOptions { source_date_epoch: Some(1_800_000_000) };
        let old_tar = tar_of(&a, &old).0;
        let first_mtime = tar::Archive::new(&old_tar[..]).entries().unwrap().next().unwrap().unwrap().header().mtime().unwrap();
        assert_eq!(first_mtime, 1_700_000_000);
    }

    #[test]
    fn overlay_whiteouts_become_oci_whiteouts() {
        if !crate::testing::needs_root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        mknod(&d.join("gone"), FileType::CharacterDevice, 0, 0, 0);
        fs::create_dir_all(d.join("opq/sub")).unwrap();
        fs::write(d.join("opq/keep"), b"k").unwrap();
        lset(&d.join("opq"), "trusted.overlay.opaque", b"y");
        fs::create_dir(d.join("uopq")).unwrap();
        lset(&d.join("uopq"), "user.overlay.opaque", b"y");
        fs::create_dir(d.join("notopq")).unwrap();
        lset(&d.join("notopq"), "trusted.overlay.opaque", b"x");
        fs::write(d.join("copied-up"), b"c").unwrap();
        lset(&d.join("copied-up"), "trusted.overlay.origin", b"\x00\xfb");
        lset(&d.join("copied-up"), "user.keep", b"1");
        // An xattr whiteout (zero-size file marked with overlay.whiteout).
        fs::write(d.join("xwh"), b"").unwrap();
        lset(&d.join("xwh"), "trusted.overlay.whiteout", b"");
        // The kernel shares one inode among whiteouts: they must not become hardlinks.
        fs::hard_link(d.join("gone"), d.join("opq/gone2")).unwrap();
        let (bytes, stats) = tar_of(d, &TarOptions::default());
        let entries = list(&bytes);
        let get = |n: &str| entries.iter().find(|e| e.0 == n).unwrap_or_else(|| panic!("{n} missing: {entries:?}"));
        assert_eq!((get(".wh.gone").1, get(".wh.gone").2), ('0', 0));
        assert_eq!(get("opq/.wh.gone2").1, '0');
        assert_eq!(get(".wh.xwh").1, '0');
        assert!(get("opq/.wh..wh..opq").1 == '0');
        assert!(get("uopq/.wh..wh..opq").1 == '0');
        assert!(!entries.iter().any(|e| e.0 == "notopq/.wh..wh..opq"), "opaque=x is not opaque");
        assert!(!entries.iter().any(|e| e.0 == "gone" || e.0 == "xwh"));
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        let p = |n| names.iter().position(|x| *x == n).unwrap();
        assert_eq!(p("opq/.wh..wh..opq"), p("opq/") + 1, "the opaque marker follows its directory");
        for e in &entries {
            assert!(e.4.iter().all(|(k, _)| !k.contains(".overlay.")), "overlay xattr leaked on {}", e.0);
        }
        assert!(get("copied-up").4.iter().any(|(k, _)| k == "SCHILY.xattr.user.keep"));
        assert_eq!((stats.whiteouts, stats.opaque_dirs, stats.hardlinks), (3, 2, 0));
    }
}
