//! Fuzz the Dockerfile parser: any input must parse or fail with an error (never panic);
//! what parses must print and re-parse to the same instructions, and its words must go
//! through the shell lexer without panicking.
#![no_main]

use hoist_dockerfile::shell::{Lexer, NoEnv};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(df) = hoist_dockerfile::parse(&text) else {
        return;
    };
    let _ = hoist_dockerfile::parse_stages(&df);
    let printed = hoist_dockerfile::print::print(&df);
    let again = hoist_dockerfile::parse(&printed).expect("printed Dockerfile must parse");
    assert_eq!(df.nodes.len(), again.nodes.len());
    for (a, b) in df.nodes.iter().zip(&again.nodes) {
        assert_eq!((&a.cmd, &a.flags, &a.args, a.json), (&b.cmd, &b.flags, &b.args, b.json));
        assert_eq!(a.heredocs, b.heredocs);
    }
    let lex = Lexer::new(df.escape);
    for n in &df.nodes {
        for a in &n.args {
            let _ = lex.process_words(a, &NoEnv);
        }
        for m in n.flags.iter().filter_map(|f| f.strip_prefix("--mount=")) {
            let _ = hoist_dockerfile::instructions::parse_mount(m, &mut |w: &str| Ok(w.to_string()));
        }
    }
});
