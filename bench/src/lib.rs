//! Benchmark support for `hoist-bench` (the runner, `bench/src/main.rs`): the generated
//! workloads, reading builders' progress output, statistics, the engine's import floor,
//! and the gzip throughput check. Criterion microbenches live in `bench/benches`.

pub mod floor;
pub mod gzip;
pub mod progress;
pub mod stats;
pub mod workloads;
