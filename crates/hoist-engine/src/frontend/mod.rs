//! The Dockerfile frontend: turns a Dockerfile into a [`BuildGraph`] whose every value is
//! final (variables expanded, the stage's shell applied, paths absolute), following
//! BuildKit's `dockerfile2llb` for every semantic: ARG scoping with global (meta) args and
//! build-arg overrides, the predefined platform args, stages by name and index, implicit
//! image stages for `COPY --from=<image>` / `RUN --mount=from=<image>`, only the stages
//! reachable from the target, cycle and forward-reference errors, ONBUILD triggers of a base
//! image, and the image config and history exactly as BuildKit writes them.
//!
//! Base images are resolved through an [`ImageResolver`] (the engine fetches manifests and
//! configs; tests use a map).

mod convert;
mod env;
#[cfg(test)]
mod tests;

use crate::graph::{BuildGraph, FrontendOptions, Platform, ResolvedImage};

pub use hoist_dockerfile::Limits;

pub use convert::is_git_source;

/// Resolves base images for the frontend.
#[async_trait::async_trait]
pub trait ImageResolver: Send + Sync {
    /// Resolve `reference` (as written after expansion, e.g. "busybox",
    /// "127.0.0.1:5000/library/busybox:latest") for `platform`: fetch manifest (index →
    /// platform manifest) and config.
    async fn resolve(&self, reference: &str, platform: &Platform) -> Result<ResolvedImage, crate::images::ImageError>;
}

/// Why a Dockerfile could not be turned into a build graph. Every variant's message starts
/// with the Dockerfile name and, when known, the line: `Dockerfile:7: unknown instruction "RUNN"`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FrontendError {
    /// The file is empty.
    #[error("{file}: the Dockerfile cannot be empty")]
    Empty {
        /// The Dockerfile's name ([`FrontendOptions::dockerfile_name`], default `Dockerfile`).
        file: String,
    },
    /// The file has ARGs but no FROM.
    #[error("{file}: the Dockerfile contains no stages to build (expected a FROM instruction)")]
    NoStages {
        /// The Dockerfile's name ([`FrontendOptions::dockerfile_name`], default `Dockerfile`).
        file: String,
    },
    /// Syntax: parser directives, continuations, heredocs, unknown instructions or flags,
    /// wrong argument counts.
    #[error("{file}:{line}: {message}")]
    Syntax {
        /// The Dockerfile's name ([`FrontendOptions::dockerfile_name`], default `Dockerfile`).
        file: String,
        /// The line the error points at (1-based).
        line: usize,
        /// What is wrong, as BuildKit words it.
        message: String,
    },
    /// Variable expansion failed (`${X:?must be set}`, unbalanced quotes, bad substitution).
    #[error("{file}:{line}: {message}")]
    Expansion {
        /// The Dockerfile's name ([`FrontendOptions::dockerfile_name`], default `Dockerfile`).
        file: String,
        /// The line the error points at (1-based).
        line: usize,
        /// What failed to expand, and why.
        message: String,
    },
    /// A value is invalid once expanded (platform, mount, chmod, port, signal, stage
    /// reference, cycle...).
    #[error("{file}:{line}: {message}")]
    Invalid {
        /// The Dockerfile's name ([`FrontendOptions::dockerfile_name`], default `Dockerfile`).
        file: String,
        /// The line the error points at (1-based).
        line: usize,
        /// Which value is invalid, and why.
        message: String,
    },
    /// A base image could not be resolved.
    #[error("{file}:{line}: failed to resolve image {reference:?} for {platform}: {source}")]
    Resolve {
        /// The Dockerfile's name ([`FrontendOptions::dockerfile_name`], default `Dockerfile`).
        file: String,
        /// The line of the `FROM` (or `--from`) that names the image.
        line: usize,
        /// The image reference as written after expansion.
        reference: String,
        /// The platform it was resolved for, e.g. `linux/amd64`.
        platform: String,
        /// Why it failed (shared by every stage that names the same image).
        source: std::sync::Arc<crate::images::ImageError>,
    },
    /// `--target` names no stage.
    #[error("{file}: target stage {target:?} could not be found (stages: {available})")]
    TargetNotFound {
        /// The Dockerfile's name ([`FrontendOptions::dockerfile_name`], default `Dockerfile`).
        file: String,
        /// The `--target` value.
        target: String,
        /// The stage names there are, comma-separated (or the index range when no stage is
        /// named).
        available: String,
    },
}

impl FrontendError {
    /// The line the error points at, if any.
    pub fn line(&self) -> Option<usize> {
        match self {
            FrontendError::Syntax { line, .. }
            | FrontendError::Expansion { line, .. }
            | FrontendError::Invalid { line, .. }
            | FrontendError::Resolve { line, .. } => Some(*line),
            _ => None,
        }
    }
}

/// Build the graph for one target platform within the default [`Limits`].
pub async fn build_graph(dockerfile: &[u8], opts: &FrontendOptions, resolver: &dyn ImageResolver) -> Result<BuildGraph, FrontendError> {
    build_graph_limited(dockerfile, opts, &Limits::default(), resolver).await
}

/// Build the graph for one target platform (the engine calls this once per platform) from
/// the raw bytes of an untrusted Dockerfile: size, NUL bytes, UTF-8, line length, instruction
/// count and variable expansion are held to `limits`, each failure naming its line.
pub async fn build_graph_limited(
    dockerfile: &[u8],
    opts: &FrontendOptions,
    limits: &Limits,
    resolver: &dyn ImageResolver,
) -> Result<BuildGraph, FrontendError> {
    convert::Converter::new(opts, *limits).run(dockerfile, resolver).await
}
