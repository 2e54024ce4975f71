//! `--chmod` with a symbolic mode (`u+x,g-w,o=r`), applied as chmod(1) does — BSD `setmode`
//! semantics with a umask of 0, which is what BuildKit uses (fsutil parses `ModeStr` with
//! `mode.ParseWithUmask(s, 0)` and applies it to every copied file and directory, not to
//! symlinks). `X` adds execute only to directories and to files that already have an execute
//! bit; `s`/`t` are set-id and sticky; `g=u` copies bits between classes.

const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;
const S_ISVTX: u32 = 0o1000;
/// `a`: set-id bits and all permission bits (not sticky).
const STANDARD: u32 = 0o6777;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Add(u32),
    Clear(u32),
    /// `X`: add these bits if the original mode has any execute bit or is a directory.
    AddX(u32),
    /// `u`/`g`/`o` as the *source* of a copy (`g=u`): which class to read, which classes to
    /// write (`U`/`G`/`O` flags), set and/or clear, and the mask of writable bits.
    Copy {
        from: u8,
        to_u: bool,
        to_g: bool,
        to_o: bool,
        set: bool,
        clear: bool,
        bits: u32,
    },
}

/// A parsed symbolic (or octal) mode, ready to apply to file modes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeSet {
    cmds: Vec<Cmd>,
}

/// A mode string chmod(1) would reject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid chmod {mode:?}: expected octal digits or a symbolic mode like u+x,g-w,o=r")]
pub struct BadMode {
    /// The mode as written.
    pub mode: String,
}

impl ModeSet {
    /// Parse `s`: octal (`0755`) or comma-separated clauses `[ugoa]*([-+=]([rwxXst]*|[ugo]))+`.
    pub fn parse(s: &str) -> Result<ModeSet, BadMode> {
        let err = || BadMode { mode: s.to_string() };
        let b = s.as_bytes();
        if b.is_empty() {
            return Err(err());
        }
        if b[0].is_ascii_digit() {
            if !b.iter().all(|c| (b'0'..=b'7').contains(c)) {
                return Err(err());
            }
            let v = u32::from_str_radix(s, 8).map_err(|_| err())?;
            if v > 0o7777 {
                return Err(err());
            }
            return Ok(ModeSet { cmds: vec![Cmd::Clear(0o7777), Cmd::Add(v)] });
        }
        // umask 0: the bits a who-less clause may touch are all of them
        let mask: u32 = 0o7777;
        let mut cmds = Vec::new();
        let mut i = 0usize;
        let mut equal_op_done = false;
        loop {
            let mut who = 0u32;
            while i < b.len() {
                match b[i] {
                    b'a' => who |= STANDARD,
                    b'u' => who |= S_ISUID | 0o700,
                    b'g' => who |= S_ISGID | 0o070,
                    b'o' => who |= 0o007,
                    _ => break,
                }
                i += 1;
            }
            // one or more operations for this `who`
            loop {
                let op = *b.get(i).ok_or_else(err)?;
                i += 1;
                match op {
                    b'+' | b'-' => {}
                    b'=' => equal_op_done = false,
                    _ => return Err(err()),
                }
                who &= !S_ISVTX;
                let mut perm = 0u32;
                let mut perm_x = 0u32;
                loop {
                    let c = b.get(i).copied().unwrap_or(0);
                    match c {
                        b'r' => perm |= 0o444,
                        b's' => {
                            if who == 0 || who & !0o007 != 0 {
                                perm |= S_ISUID | S_ISGID;
                            }
                        }
                        b't' => {
                            if who == 0 || who & !0o007 != 0 {
                                who |= S_ISVTX;
                                perm |= S_ISVTX;
                            }
                        }
                        b'w' => perm |= 0o222,
                        b'X' => {
                            if op == b'+' {
                                perm_x = 0o111;
                            }
                        }
                        b'x' => perm |= 0o111,
                        b'u' | b'g' | b'o' => {
                            if perm != 0 {
                                add_cmd(&mut cmds, op, who, perm, mask);
                                perm = 0;
                            }
                            if op == b'=' {
                                equal_op_done = true;
                            }
                            if perm_x != 0 {
                                add_cmd(&mut cmds, b'X', who, perm_x, mask);
                                perm_x = 0;
                            }
                            add_copy(&mut cmds, c, who, op, mask);
                        }
                        _ => {
                            if perm != 0 || (op == b'=' && !equal_op_done) {
                                if op == b'=' {
                                    equal_op_done = true;
                                }
                                add_cmd(&mut cmds, op, who, perm, mask);
                            }
                            if perm_x != 0 {
                                add_cmd(&mut cmds, b'X', who, perm_x, mask);
                            }
                            break;
                        }
                    }
                    i += 1;
                }
                if i >= b.len() {
                    return Ok(ModeSet { cmds });
                }
                if b[i] == b',' {
                    i += 1;
                    if i >= b.len() {
                        return Err(err());
                    }
                    break;
                }
                // another operator for the same `who` (`u+x-w`)
            }
        }
    }

    /// Apply to a mode (permission and set-id/sticky bits, `0o7777`); `is_dir` matters for `X`.
    pub fn apply(&self, mode: u32, is_dir: bool) -> u32 {
        let orig = mode & 0o7777;
        let mut m = orig;
        for c in &self.cmds {
            match *c {
                Cmd::Add(bits) => m |= bits,
                Cmd::Clear(bits) => m &= !bits,
                Cmd::AddX(bits) => {
                    if orig & 0o111 != 0 || is_dir {
                        m |= bits;
                    }
                }
                Cmd::Copy { from, to_u, to_g, to_o, set, clear, bits } => {
                    let value = match from {
                        b'u' => (m & 0o700) >> 6,
                        b'g' => (m & 0o070) >> 3,
                        _ => m & 0o007,
                    };
                    if clear {
                        let clr = if set { 0o7 } else { value };
                        if to_u {
                            m &= !((clr << 6) & bits);
                        }
                        if to_g {
                            m &= !((clr << 3) & bits);
                        }
                        if to_o {
                            m &= !(clr & bits);
                        }
                    }
                    if set {
                        if to_u {
                            m |= (value << 6) & bits;
                        }
                        if to_g {
                            m |= (value << 3) & bits;
                        }
                        if to_o {
                            m |= value & bits;
                        }
                    }
                }
            }
        }
        m & 0o7777
    }
}

fn add_cmd(cmds: &mut Vec<Cmd>, op: u8, who: u32, arg: u32, mask: u32) {
    let sel = |w: u32| if w != 0 { w & arg } else { mask & arg };
    match op {
        b'=' => {
            cmds.push(Cmd::Clear(if who != 0 { who } else { STANDARD }));
            cmds.push(Cmd::Add(sel(who)));
        }
        b'+' => cmds.push(Cmd::Add(sel(who))),
        b'-' => cmds.push(Cmd::Clear(sel(who))),
        _ => cmds.push(Cmd::AddX(sel(who))),
    }
}

fn add_copy(cmds: &mut Vec<Cmd>, from: u8, who: u32, op: u8, mask: u32) {
    let (to_u, to_g, to_o, bits) =
        if who != 0 { (who & 0o400 != 0, who & 0o040 != 0, who & 0o004 != 0, u32::MAX) } else { (true, true, true, mask) };
    let (set, clear) = match op {
        b'+' => (true, false),
        b'-' => (false, true),
        _ => (true, true),
    };
    cmds.push(Cmd::Copy { from, to_u, to_g, to_o, set, clear, bits });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbolic_modes_table() {
        // (mode string, start mode, is_dir, expected) — chmod(1) semantics with umask 0
        let cases: &[(&str, u32, bool, u32)] = &[
            ("u+x", 0o644, false, 0o744),
            ("u+x", 0o755, true, 0o755),
            ("g-w", 0o664, false, 0o644),
            ("o=r", 0o777, false, 0o774),
            ("u+x,g-w,o=r", 0o664, false, 0o744),
            ("+x", 0o644, false, 0o755),
            ("a+x", 0o600, false, 0o711),
            ("-w", 0o666, false, 0o444),
            ("=r", 0o777, false, 0o444),
            ("go=", 0o755, false, 0o700),
            ("u=rwx,go=rx", 0o000, false, 0o755),
            ("u=rwx,go=u-w", 0o000, false, 0o755),
            ("go=u-w", 0o700, false, 0o755),
            ("g=u", 0o640, false, 0o660),
            ("o+g", 0o650, false, 0o655),
            ("a+X", 0o644, false, 0o644),
            ("a+X", 0o744, false, 0o755),
            ("a+X", 0o600, true, 0o711),
            ("+X", 0o640, true, 0o751),
            ("=rw,+X", 0o755, false, 0o777),
            ("=rw,+X", 0o644, false, 0o666),
            ("u+s", 0o755, false, 0o4755),
            ("g+s", 0o755, true, 0o2755),
            ("+t", 0o777, true, 0o1777),
            ("o+t", 0o777, true, 0o777),
            ("u-s,g-s", 0o6755, false, 0o755),
            ("u+x-w", 0o644, false, 0o544),
            ("0755", 0o4600, false, 0o755),
            ("1777", 0o755, true, 0o1777),
            ("a=", 0o7777, false, 0o1000),
        ];
        for (s, start, dir, want) in cases {
            let set = ModeSet::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(set.apply(*start, *dir), *want, "chmod {s} on {start:o} (dir={dir}) = {:o}", set.apply(*start, *dir));
        }
    }

    #[test]
    fn bad_modes_are_rejected() {
        for s in ["", "u", "u+x,", "z+x", "u*x", "888", "17777", "u+x,,g+w", "+q"] {
            assert!(ModeSet::parse(s).is_err(), "{s:?} should be rejected");
        }
    }
}
