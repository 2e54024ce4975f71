//! Random bytes for names, ids and tokens, from the kernel (`getrandom(2)`). There is no
//! fallback: a failure is an error (or, for [`hex`](fn@hex), a panic), never predictable bytes.

use std::io;

/// Fill `buf` from the kernel's random source.
pub fn fill(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::rand::getrandom(&mut buf[done..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// `n` random bytes, hex-encoded. Panics if the kernel gives none: ids and names built from
/// it must never repeat or be guessable.
pub fn hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    if let Err(e) = fill(&mut b) {
        panic!("getrandom(2) failed: {e}");
    }
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_are_filled_and_differ() {
        let mut a = [0u8; 300];
        let mut b = [0u8; 300];
        super::fill(&mut a).unwrap();
        super::fill(&mut b).unwrap();
        assert_ne!(a, b);
        assert!(a.iter().any(|&x| x != 0));
        assert_eq!(super::hex(8).len(), 16);
    }
}
