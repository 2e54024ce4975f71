//! `hoist serve` flags for the limits every build is held to (issue 7: a shared builder must
//! stay safe and responsive on hostile Dockerfiles and contexts). Each flag can also be set
//! through the environment (`HOIST_RUN_TIMEOUT=30m`), which the embedded builder inherits
//! from the `hoist build` that starts it.

use std::time::Duration;

#[cfg(feature = "builder")]
use clap::Args;
#[cfg(feature = "builder")]
use hoist_engine::limits::Limits;

/// Limits of `hoist serve`; sizes take `K`/`M`/`G` (or `KiB`/`MiB`/`GiB`) suffixes, durations
/// `s`/`m`/`h`.
#[cfg(feature = "builder")]
#[derive(Args, Debug, Clone, Default)]
pub struct LimitArgs {
    /// Largest Dockerfile [default: 2MiB].
    #[arg(long, env = "HOIST_MAX_DOCKERFILE_BYTES", value_parser = parse_size, value_name = "SIZE")]
    max_dockerfile_bytes: Option<u64>,
    /// Longest Dockerfile line [default: 256KiB].
    #[arg(long, env = "HOIST_MAX_DOCKERFILE_LINE", value_parser = parse_size, value_name = "SIZE")]
    max_dockerfile_line: Option<u64>,
    /// Most instructions in a Dockerfile [default: 4096].
    #[arg(long, env = "HOIST_MAX_INSTRUCTIONS", value_name = "N")]
    max_instructions: Option<u64>,
    /// Most bytes variable expansion may add to a word; also the largest environment of a
    /// stage [default: 1MiB].
    #[arg(long, env = "HOIST_MAX_EXPANSION_BYTES", value_parser = parse_size, value_name = "SIZE")]
    max_expansion_bytes: Option<u64>,
    /// Most entries in a build context [default: 1000000].
    #[arg(long, env = "HOIST_MAX_CONTEXT_ENTRIES", value_name = "N")]
    max_context_entries: Option<u64>,
    /// Most bytes of files in a build context [default: 32GiB].
    #[arg(long, env = "HOIST_MAX_CONTEXT_BYTES", value_parser = parse_size, value_name = "SIZE")]
    max_context_bytes: Option<u64>,
    /// Most bytes one ADD may extract from an archive or download from a URL [default: 16GiB].
    #[arg(long, env = "HOIST_MAX_ARCHIVE_BYTES", value_parser = parse_size, value_name = "SIZE")]
    max_archive_bytes: Option<u64>,
    /// Most entries one ADD may extract from an archive [default: 2000000].
    #[arg(long, env = "HOIST_MAX_ARCHIVE_ENTRIES", value_name = "N")]
    max_archive_entries: Option<u64>,
    /// Largest expansion ratio of an ADD archive (decompressed / compressed), checked past
    /// 64 MiB [default: 100].
    #[arg(long, env = "HOIST_MAX_ARCHIVE_RATIO", value_name = "N")]
    max_archive_ratio: Option<u64>,
    /// Most bytes of one base image layer's tar [default: 64GiB].
    #[arg(long, env = "HOIST_MAX_LAYER_BYTES", value_parser = parse_size, value_name = "SIZE")]
    max_layer_bytes: Option<u64>,
    /// Most entries of one base image layer [default: 10000000].
    #[arg(long, env = "HOIST_MAX_LAYER_ENTRIES", value_name = "N")]
    max_layer_entries: Option<u64>,
    /// Wall-clock limit of one RUN step: it is killed after it [default: none].
    #[arg(long, env = "HOIST_RUN_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    run_timeout: Option<Duration>,
    /// Output of one step sent to the client; the rest is dropped with a marker [default: 8MiB].
    #[arg(long, env = "HOIST_MAX_STEP_LOG", value_parser = parse_size, value_name = "SIZE")]
    max_step_log: Option<u64>,
    /// Memory all RUN steps of one build may use together (e.g. 4G): the steps of all its
    /// stages and platforms share one cgroup with this limit, and a step killed for it fails
    /// saying so. Needs the cgroup memory controller [default: no limit].
    #[arg(long, env = "HOIST_BUILD_MEMORY", value_parser = parse_size, value_name = "SIZE")]
    build_memory: Option<u64>,
}

#[cfg(feature = "builder")]
fn usize_of(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

#[cfg(feature = "builder")]
impl LimitArgs {
    /// The limits: the defaults with every given flag applied.
    pub fn limits(&self) -> Limits {
        let mut l = Limits::default();
        let d = &mut l.dockerfile;
        if let Some(v) = self.max_dockerfile_bytes {
            d.max_bytes = usize_of(v);
        }
        if let Some(v) = self.max_dockerfile_line {
            d.max_line_bytes = usize_of(v);
        }
        if let Some(v) = self.max_instructions {
            d.max_instructions = usize_of(v);
        }
        if let Some(v) = self.max_expansion_bytes {
            d.max_expansion_bytes = usize_of(v);
        }
        if let Some(v) = self.max_context_entries {
            l.max_context_entries = v;
        }
        if let Some(v) = self.max_context_bytes {
            l.max_context_bytes = v;
        }
        if let Some(v) = self.max_archive_bytes {
            l.archive.max_bytes = v;
        }
        if let Some(v) = self.max_archive_entries {
            l.archive.max_entries = v;
        }
        if let Some(v) = self.max_archive_ratio {
            l.archive.max_ratio = v;
        }
        if let Some(v) = self.max_layer_bytes {
            l.max_layer_bytes = v;
        }
        if let Some(v) = self.max_layer_entries {
            l.max_layer_entries = v;
        }
        if self.run_timeout.is_some() {
            l.run_timeout = self.run_timeout;
        }
        if let Some(v) = self.max_step_log {
            l.max_step_log_bytes = v;
        }
        if self.build_memory.is_some() {
            l.build_memory = self.build_memory;
        }
        l
    }
}

/// `1048576`, `64K`, `2MiB`, `1.5G` → bytes (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("invalid size {s:?}: expected a number with an optional K, M, G or T suffix")),
    };
    let n: f64 = num.parse().map_err(|_| format!("invalid size {s:?}: expected a number with an optional K, M, G or T suffix"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("invalid size {s:?}: expected a non-negative number"));
    }
    Ok((n * mult as f64) as u64)
}

/// `90`, `90s`, `15m`, `2h`, `500ms` → a duration (`0` is refused: leave the flag out for none).
#[cfg_attr(not(feature = "builder"), allow(dead_code))]
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}: expected e.g. 90s, 15m or 2h"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration {s:?}: expected e.g. 90s, 15m or 2h")),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("invalid duration {s:?}: expected a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_with_units() {
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("2MiB").unwrap(), 2 << 20);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[cfg(feature = "builder")]
    #[test]
    fn flags_override_only_what_they_name() {
        let a = LimitArgs {
            run_timeout: Some(Duration::from_secs(5)),
            max_instructions: Some(10),
            build_memory: Some(parse_size("4G").unwrap()),
            ..Default::default()
        };
        let l = a.limits();
        assert_eq!(l.run_timeout, Some(Duration::from_secs(5)));
        assert_eq!(l.build_memory, Some(4 << 30));
        assert_eq!(l.dockerfile.max_instructions, 10);
        let d = Limits::default();
        assert_eq!(l.archive, d.archive);
        assert_eq!(l.max_context_entries, d.max_context_entries);
        assert_eq!(LimitArgs::default().limits(), d);
    }
}
