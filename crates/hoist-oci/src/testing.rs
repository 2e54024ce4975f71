//! The workspace's one skip policy for tests that need a real part (root, an OCI runtime,
//! the Docker engine, the lab registry): without it a test skips with a note, except under
//! CI (`CI` set), where a skipped test would look like a pass — there it fails.

/// Whether the part a test needs is here: `true` to go on, `false` (after a note) to skip.
/// Panics when it is missing and `CI` is set.
pub fn needs(part: &str, present: bool) -> bool {
    if present {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "this test needs {part}, which is missing, and CI is set");
    eprintln!("skipping: this test needs {part}");
    false
}

/// [`needs`] for root (mounts, namespaces, chown, device nodes).
pub fn needs_root() -> bool {
    needs("root", rustix::process::geteuid().is_root())
}
