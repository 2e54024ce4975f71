//! Tar header encoding for the layer writer: [`Hdr`] holds one entry's metadata and
//! [`TarWriter`] writes it as a ustar header block, preceded by a PAX extended header when a
//! name, link target, id, size or mtime does not fit the ustar fields or when the entry has
//! extended attributes (`SCHILY.xattr.*` records); device numbers too large for octal use
//! GNU base-256. The writer counts the bytes it emits and pads content to 512-byte blocks;
//! it never writes the end-of-archive marker (the caller does).

use std::io::{self, BufWriter, Write};

use super::LayerError;

/// One tar header's worth of metadata.
#[derive(Clone)]
pub(super) struct Hdr {
    pub(super) name: Vec<u8>,
    pub(super) typeflag: u8,
    pub(super) mode: u32,
    pub(super) uid: u64,
    pub(super) gid: u64,
    pub(super) size: u64,
    pub(super) mtime: u64,
    pub(super) linkname: Vec<u8>,
    pub(super) devmajor: u64,
    pub(super) devminor: u64,
    pub(super) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

pub(super) struct TarWriter<W: Write> {
    pub(super) out: BufWriter<W>,
    pub(super) bytes: u64,
}

/// Write `v` as zero-padded octal filling `field` but its last byte (NUL); false if it
/// does not fit.
fn put_octal(field: &mut [u8], v: u64) -> bool {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    if s.len() > digits {
        return false;
    }
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
    true
}

/// GNU base-256 encoding for numbers too large for octal.
fn put_base256(field: &mut [u8], v: u64) {
    field.fill(0);
    let n = field.len();
    let bytes = v.to_be_bytes();
    field[n - 8..].copy_from_slice(&bytes);
    field[0] |= 0x80;
}

/// One PAX record: `"<len> <key>=<value>\n"` where len counts the whole record.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    loop {
        let total = body + len.to_string().len();
        if total == len {
            break;
        }
        len = total;
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

impl<W: Write> TarWriter<W> {
    pub(super) fn pad(&mut self, size: u64) -> Result<(), LayerError> {
        let rem = (size % 512) as usize;
        if rem != 0 {
            self.out.write_all(&[0u8; 512][..512 - rem]).map_err(LayerError::Write)?;
            self.bytes += (512 - rem) as u64;
        }
        Ok(())
    }

    fn block(&mut self, block: &[u8; 512]) -> Result<(), LayerError> {
        self.out.write_all(block).map_err(LayerError::Write)?;
        self.bytes += 512;
        Ok(())
    }

    /// Write the header of an entry (preceded by a PAX header when a value does not fit the
    /// ustar fields). The caller writes the content and padding.
    pub(super) fn header(&mut self, h: &Hdr) -> Result<(), LayerError> {
        let mut b = [0u8; 512];
        let mut pax = Vec::new();
        if h.name.len() > 100 || !h.name.is_ascii() {
            pax_record(&mut pax, b"path", &h.name);
        }
        let n = h.name.len().min(100);
        b[..n].copy_from_slice(&h.name[..n]);
        if h.linkname.len() > 100 || !h.linkname.is_ascii() {
            pax_record(&mut pax, b"linkpath", &h.linkname);
        }
        let n = h.linkname.len().min(100);
        b[157..157 + n].copy_from_slice(&h.linkname[..n]);
        put_octal(&mut b[100..108], h.mode as u64);
        if !put_octal(&mut b[108..116], h.uid) {
            pax_record(&mut pax, b"uid", h.uid.to_string().as_bytes());
            put_octal(&mut b[108..116], 0);
        }
        if !put_octal(&mut b[116..124], h.gid) {
            pax_record(&mut pax, b"gid", h.gid.to_string().as_bytes());
            put_octal(&mut b[116..124], 0);
        }
        if !put_octal(&mut b[124..136], h.size) {
            pax_record(&mut pax, b"size", h.size.to_string().as_bytes());
            put_octal(&mut b[124..136], 0);
        }
        if !put_octal(&mut b[136..148], h.mtime) {
            pax_record(&mut pax, b"mtime", h.mtime.to_string().as_bytes());
            put_octal(&mut b[136..148], 0);
        }
        b[156] = h.typeflag;
        b[257..263].copy_from_slice(b"ustar\0");
        b[263..265].copy_from_slice(b"00");
        if !put_octal(&mut b[329..337], h.devmajor) {
            put_base256(&mut b[329..337], h.devmajor);
        }
        if !put_octal(&mut b[337..345], h.devminor) {
            put_base256(&mut b[337..345], h.devminor);
        }
        for (k, v) in &h.xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            pax_record(&mut pax, &key, v);
        }
        if !pax.is_empty() {
            let mut p = [0u8; 512];
            // Name of the extended header itself, as Go names it; readers ignore it.
            let base = h.name.strip_suffix(b"/").unwrap_or(&h.name);
            let base = base.rsplit(|c| *c == b'/').next().unwrap_or(base);
            let mut pname = b"PaxHeaders.0/".to_vec();
            pname.extend(base.iter().take(80).map(|c| if c.is_ascii() && *c != 0 { *c } else { b'_' }));
            p[..pname.len()].copy_from_slice(&pname);
            put_octal(&mut p[100..108], 0o644);
            put_octal(&mut p[108..116], 0);
            put_octal(&mut p[116..124], 0);
            if !put_octal(&mut p[124..136], pax.len() as u64) {
                return Err(LayerError::Write(io::Error::other("pax header larger than 8 GiB")));
            }
            put_octal(&mut p[136..148], 0);
            p[156] = b'x';
            p[257..263].copy_from_slice(b"ustar\0");
            p[263..265].copy_from_slice(b"00");
            put_octal(&mut p[329..337], 0);
            put_octal(&mut p[337..345], 0);
            finish_checksum(&mut p);
            self.block(&p)?;
            self.out.write_all(&pax).map_err(LayerError::Write)?;
            self.bytes += pax.len() as u64;
            self.pad(pax.len() as u64)?;
        }
        finish_checksum(&mut b);
        self.block(&b)
    }
}

fn finish_checksum(b: &mut [u8; 512]) {
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|x| *x as u32).sum();
    let s = format!("{sum:06o}\0 ");
    b[148..156].copy_from_slice(s.as_bytes());
}
