//! Printing a parsed Dockerfile back to text: directives, then every instruction as its
//! logical line (continuations joined, comments dropped) followed by its here-documents.
//! Parsing the printed text gives the same instructions (parse → print → parse is stable).

use crate::parser::Dockerfile;

/// Print `df` as Dockerfile text.
pub fn print(df: &Dockerfile) -> String {
    let mut out = String::new();
    for d in &df.directives {
        out.push_str(&format!("# {}={}\n", d.name, d.value));
    }
    for (i, n) in df.nodes.iter().enumerate() {
        let full = n.original.trim_start_matches(crate::gocompat::is_space);
        let line = full.trim_end_matches(['\r', '\n']);
        // A logical line that still ends in a lone escape came from a continuation cut by
        // the end of the file (`RUN a\ \` gives `RUN a\ `): print it the same way, or the
        // escape would become a continuation when parsed again.
        let t = line.trim_end_matches([' ', '\t']);
        let lone_escape = t.strip_suffix(df.escape).is_some_and(|b| !b.ends_with(df.escape));
        if lone_escape && i + 1 == df.nodes.len() && n.heredocs.is_empty() {
            out.push_str(full);
            out.push(df.escape);
            continue;
        }
        out.push_str(line);
        out.push('\n');
        for h in &n.heredocs {
            out.push_str(&h.content);
            if !h.content.is_empty() && !h.content.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&h.name);
            out.push('\n');
        }
    }
    if out.starts_with('\u{feff}') {
        // the parser drops a byte-order mark at the start of the file: keep the node's own
        out.insert(0, '\u{feff}');
    }
    out
}
