//! Reading builders' `--progress=plain` output (hoist and BuildKit print the same shape:
//! `#5 [app 2/4] RUN make`, output lines, then `#5 DONE 1.2s` or `#5 CACHED`) to find how
//! much of a build's wall time went into RUN steps, and so the overhead outside them.

use std::collections::HashMap;

/// One line of a builder's stderr and when it arrived (seconds since the command started).
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// Arrival time in seconds since the command started.
    pub t: f64,
    /// The line without its newline.
    pub text: String,
}

/// What the progress output says about the steps of one build.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepTimes {
    /// Each finished RUN step as (start, end) in seconds since the command started: the end
    /// is when its DONE line arrived, the start that minus the duration it reports.
    pub run_intervals: Vec<(f64, f64)>,
    /// Sum of the reported RUN durations (counts parallel steps twice).
    pub run_sum: f64,
    /// Vertices reported DONE (run), of any kind.
    pub done: usize,
    /// Vertices reported CACHED.
    pub cached: usize,
}

impl StepTimes {
    /// Time covered by at least one RUN step: the summed durations of the issue's
    /// definition, with overlapping (parallel) steps counted once.
    pub fn run_covered(&self) -> f64 {
        union_length(&self.run_intervals)
    }

    /// Wall time minus the time covered by RUN steps.
    pub fn overhead(&self, wall: f64) -> f64 {
        (wall - self.run_covered()).max(0.0)
    }
}

/// Total length of a set of intervals, overlaps counted once.
pub fn union_length(intervals: &[(f64, f64)]) -> f64 {
    let mut v: Vec<(f64, f64)> = intervals.iter().copied().filter(|(a, b)| b > a).collect();
    v.sort_by(|x, y| x.0.total_cmp(&y.0));
    let mut total = 0.0;
    let mut cur: Option<(f64, f64)> = None;
    for (a, b) in v {
        cur = match cur {
            Some((ca, cb)) if a <= cb => Some((ca, cb.max(b))),
            Some((ca, cb)) => {
                total += cb - ca;
                Some((a, b))
            }
            None => Some((a, b)),
        };
    }
    if let Some((a, b)) = cur {
        total += b - a;
    }
    total
}

/// `#12 rest` → (12, rest).
fn split_id(text: &str) -> Option<(u32, &str)> {
    let rest = text.strip_prefix('#')?;
    let sp = rest.find(' ')?;
    let id = rest[..sp].parse().ok()?;
    Some((id, &rest[sp + 1..]))
}

/// Whether a vertex name is a RUN step (`[stage 2/4] RUN ...`).
pub fn is_run_vertex(name: &str) -> bool {
    name.starts_with('[') && name.split_once("] ").is_some_and(|(_, instr)| instr.starts_with("RUN "))
}

/// Parse plain progress lines.
pub fn parse_plain(lines: &[Line]) -> StepTimes {
    let mut names: HashMap<u32, String> = HashMap::new();
    let mut out = StepTimes::default();
    for l in lines {
        let Some((id, rest)) = split_id(l.text.trim_end()) else { continue };
        if rest.starts_with('[') && !names.contains_key(&id) {
            names.insert(id, rest.to_string());
            continue;
        }
        if rest == "CACHED" {
            out.cached += 1;
            continue;
        }
        if let Some(d) = rest.strip_prefix("DONE ").and_then(|d| d.strip_suffix('s')).and_then(|d| d.parse::<f64>().ok()) {
            out.done += 1;
            if names.get(&id).is_some_and(|n| is_run_vertex(n)) {
                out.run_sum += d;
                out.run_intervals.push(((l.t - d).max(0.0), l.t));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[(f64, &str)]) -> Vec<Line> {
        v.iter().map(|(t, s)| Line { t: *t, text: s.to_string() }).collect()
    }

    #[test]
    fn buildkit_plain_output_yields_run_durations_and_overhead() {
        let l = lines(&[
            (0.1, "#1 [internal] load build definition from Dockerfile"),
            (0.2, "#1 DONE 0.0s"),
            (0.5, "#5 [build 2/3] COPY . ."),
            (0.9, "#5 DONE 0.4s"),
            (1.0, "#6 [build 3/3] RUN make -j\"$(nproc)\""),
            (2.0, "#6 0.512 gcc -O2 -c a.c"),
            (4.0, "#6 DONE 3.0s"),
            (4.1, "#7 [stage-1 2/2] COPY --from=build /src/out/app /app"),
            (4.2, "#7 CACHED"),
            (6.0, "#8 exporting to image"),
            (6.5, "#8 DONE 2.3s"),
        ]);
        let s = parse_plain(&l);
        assert_eq!(s.run_sum, 3.0);
        assert_eq!(s.run_intervals, vec![(1.0, 4.0)]);
        assert_eq!(s.done, 4);
        assert_eq!(s.cached, 1);
        assert!((s.overhead(7.0) - 4.0).abs() < 1e-9);
    }

    #[test]
    fn parallel_run_steps_are_counted_once_in_the_covered_time() {
        let l = lines(&[
            (0.0, "#3 [s1 2/2] RUN work 1"),
            (0.0, "#4 [s2 2/2] RUN work 2"),
            (3.0, "#3 DONE 3.0s"),
            (4.0, "#4 DONE 3.5s"),
            (5.0, "#9 [s3 2/2] RUN work 3"),
            (6.0, "#9 DONE 1.0s"),
        ]);
        let s = parse_plain(&l);
        assert_eq!(s.run_sum, 7.5);
        // [0,3] ∪ [0.5,4] ∪ [5,6] = 4 + 1
        assert!((s.run_covered() - 5.0).abs() < 1e-9, "{}", s.run_covered());
    }

    #[test]
    fn a_name_line_is_not_overwritten_by_later_output_starting_with_a_bracket() {
        let l = lines(&[(0.0, "#2 [a 1/1] RUN echo"), (0.5, "#2 [output] looks like a name"), (1.0, "#2 DONE 1.0s")]);
        assert_eq!(parse_plain(&l).run_sum, 1.0);
    }

    #[test]
    fn only_run_instructions_are_run_vertices() {
        assert!(is_run_vertex("[app 2/4] RUN make"));
        assert!(!is_run_vertex("[app 2/4] COPY RUN /x"));
        assert!(!is_run_vertex("[internal] load build context"));
        assert!(!is_run_vertex("RUN make"));
    }

    #[test]
    fn union_of_nothing_is_zero() {
        assert_eq!(union_length(&[]), 0.0);
        assert_eq!(union_length(&[(2.0, 1.0)]), 0.0);
    }
}
