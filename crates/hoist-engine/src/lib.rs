//! hoist-engine owns everything between a parsed Dockerfile and a finished image:
//! the frontend (AST → [`graph::BuildGraph`]), cache keys and the cache index, the solver and
//! scheduler, the snapshotter (overlayfs), the executor (OCI runtime), COPY/ADD, and the
//! exporters. Kernel- and process-touching code sits behind the [`snapshot::Mounter`] and
//! [`executor::Executor`] traits so that the logic above them is unit-tested without root.

#![warn(missing_docs)]

pub mod cache;
pub mod cachekey;
pub mod cachemount;
pub mod context;
pub mod copy;
pub mod engine;
pub mod entitlements;
pub mod executor;
pub mod export;
pub mod frontend;
pub mod gc;
pub mod git;
pub mod graph;
mod images;
pub mod layers;
pub mod layout;
pub mod limits;
pub mod progress;
pub mod rootfs;
pub mod shared;
pub mod snapshot;
mod solver;
pub mod sshforward;
mod steps;
pub mod testing;

pub use engine::{
    BuildOutcome, BuildRequest, BuildSecrets, BuiltImage, EarlyLayers, Engine, EngineConfig, EngineError, EngineParts, StepCause,
};
pub use images::{ImageSource, Registries, SourceImage};
pub use layers::LayerNeeds;
pub use limits::Limits;
