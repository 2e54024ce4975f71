//! hoist-oci owns the OCI formats and their movement: digests, image/index/config types (on
//! oci-spec), the content store, layer tar read/write with whiteouts, compression (parallel
//! gzip, zstd), the one-pass layer export pipeline, the docker archive's `manifest.json`
//! (`archive`), image references, registry credentials
//! and the registry client (pull and push); and, as the workspace's lowest crate, random bytes
//! from the kernel (`random`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod archive;
pub mod auth;
pub mod compress;
pub mod digest;
#[allow(missing_docs)] // documented with the exporter rework (issue 16)
pub mod export;
pub mod image;
pub mod layer;
pub mod random;
pub mod reference;
pub mod registry;
pub mod store;
#[doc(hidden)]
pub mod testing;
pub use registry::Platform;
