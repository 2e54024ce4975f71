//! The limits a builder holds every build to, so that no Dockerfile or context — a typo or a
//! hostile pull request — can exhaust it: Dockerfile size and shape, variable expansion,
//! context size, archive expansion for ADD, base layer extraction, RUN wall time, the
//! output a step may stream and the memory of a build's RUN steps. `hoist serve` sets them
//! from its flags; each error names the limit that was hit.

use std::time::Duration;

use crate::copy::CopyLimits;

/// Default [`Limits::max_context_entries`].
pub const DEFAULT_MAX_CONTEXT_ENTRIES: u64 = 1_000_000;
/// Default [`Limits::max_context_bytes`]: 32 GiB.
pub const DEFAULT_MAX_CONTEXT_BYTES: u64 = 32 << 30;
/// Default [`Limits::max_layer_bytes`]: 64 GiB of tar stream per base image layer.
pub const DEFAULT_MAX_LAYER_BYTES: u64 = 64 << 30;
/// Default [`Limits::max_layer_entries`].
pub const DEFAULT_MAX_LAYER_ENTRIES: u64 = 10_000_000;
/// Default [`Limits::max_step_log_bytes`]: 8 MiB of output shown per step (BuildKit: 2 MiB).
pub const DEFAULT_MAX_STEP_LOG_BYTES: u64 = 8 << 20;

/// Every limit of a builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Dockerfile size, line length, instruction count and variable expansion.
    pub dockerfile: hoist_dockerfile::Limits,
    /// Most entries (files, directories, symlinks) in one build context.
    pub max_context_entries: u64,
    /// Most bytes of file content in one build context (and in one upload).
    pub max_context_bytes: u64,
    /// What one ADD may extract from an archive (and download from a URL: `max_bytes`).
    pub archive: CopyLimits,
    /// Most bytes of (uncompressed) tar stream in one base image layer.
    pub max_layer_bytes: u64,
    /// Most entries in one base image layer.
    pub max_layer_entries: u64,
    /// Wall-clock limit of one RUN step; `None` (the default) is no limit.
    pub run_timeout: Option<Duration>,
    /// Output of one step forwarded to the client; the rest is dropped with a marker (the
    /// step keeps running).
    pub max_step_log_bytes: u64,
    /// Memory (bytes) all RUN steps of one build may use together: the steps of all its
    /// stages and platforms run in one cgroup with this limit
    /// ([`crate::executor::BuildCgroup`]), and a step the kernel kills for it fails saying
    /// so. `None` (the default) is no limit beyond the builder's own.
    pub build_memory: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            dockerfile: hoist_dockerfile::Limits::default(),
            max_context_entries: DEFAULT_MAX_CONTEXT_ENTRIES,
            max_context_bytes: DEFAULT_MAX_CONTEXT_BYTES,
            archive: CopyLimits::default(),
            max_layer_bytes: DEFAULT_MAX_LAYER_BYTES,
            max_layer_entries: DEFAULT_MAX_LAYER_ENTRIES,
            run_timeout: None,
            max_step_log_bytes: DEFAULT_MAX_STEP_LOG_BYTES,
            build_memory: None,
        }
    }
}

impl Limits {
    /// Extraction options for a base image layer.
    pub fn layer_extract_options(&self) -> hoist_oci::layer::ExtractOptions {
        hoist_oci::layer::ExtractOptions {
            max_bytes: Some(self.max_layer_bytes),
            max_entries: Some(self.max_layer_entries),
            ..Default::default()
        }
    }
}

/// `8 MiB`, `512 KiB`, `100 B`: a size as limits are shown in messages.
pub fn human_bytes(n: u64) -> String {
    for (unit, name) in [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
        if n >= unit && n % unit == 0 {
            return format!("{} {name}", n / unit);
        }
    }
    format!("{n} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_bound_everything_but_run_time() {
        let l = Limits::default();
        assert!(l.run_timeout.is_none(), "RUN wall time is off by default");
        assert!(l.build_memory.is_none(), "a build's memory is limited only when the operator says how much");
        let x = l.layer_extract_options();
        assert_eq!(x.max_bytes, Some(DEFAULT_MAX_LAYER_BYTES));
        assert_eq!(x.max_entries, Some(DEFAULT_MAX_LAYER_ENTRIES));
        assert!(l.archive.max_bytes <= 16 << 30 && l.archive.max_ratio <= 100);
        assert!(l.dockerfile.max_instructions < 10_000, "a 10,000-instruction Dockerfile is refused at once");
    }

    #[test]
    fn sizes_are_shown_in_their_largest_exact_unit() {
        assert_eq!(human_bytes(8 << 20), "8 MiB");
        assert_eq!(human_bytes(1536), "1536 B");
        assert_eq!(human_bytes(3 << 30), "3 GiB");
        assert_eq!(human_bytes(2048), "2 KiB");
    }
}
