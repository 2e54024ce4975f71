//! Fuzz the .dockerignore matcher: the first line-block is the ignore file, the lines after
//! a NUL byte are paths. Nothing may panic, and a directory the matcher says can be skipped
//! must not contain a path that `matches` keeps.
#![no_main]

use hoist_dockerfile::IgnoreMatcher;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (patterns, paths) = text.split_once('\0').unwrap_or((&text, "a/b/c"));
    let Ok(m) = IgnoreMatcher::from_file_text(patterns) else {
        return;
    };
    let paths: Vec<&str> = paths.split('\n').filter(|p| !p.is_empty()).take(16).collect();
    for p in &paths {
        let _ = m.matches(p);
        if m.can_skip_dir(p) {
            for q in &paths {
                if q.starts_with(&format!("{p}/")) && !q.contains("..") && !q.contains("//") && !q.contains("/./") {
                    assert!(m.matches(q), "skipped {p:?} but {q:?} is included");
                }
            }
        }
    }
});
